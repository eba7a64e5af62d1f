from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from flashtrain.config import PhaseConfig, ScheduleConfig
from flashtrain.sharding import shard_indices
from flashtrain.train.clock import TrainingClock


def schedule():
    return ScheduleConfig(epochs=3, phases=(PhaseConfig(start_epoch=0, global_batch=32),
                                            PhaseConfig(start_epoch=2, global_batch=64)),
                          warmup_epochs=0.5)


def test_clock_walks_epochs_and_counts_samples():
    clock = TrainingClock(num_samples=100, seed=0, min_tail=8)
    plans = []
    while clock.epoch < 3:
        plan = clock.plan(schedule())
        plans.append(plan)
        clock.advance(plan)
    assert clock.samples_per_epoch == [100, 100, 100]
    assert [p.batch for p in plans if p.epoch == 0] == [32, 32, 36]
    assert [p.batch for p in plans if p.epoch == 2] == [64, 36]
    assert all(p.global_batch == 64 for p in plans if p.epoch == 2)
    assert plans[-1].end_of_epoch and clock.global_step == len(plans)


def test_advance_rejects_a_stale_plan():
    import pytest

    clock = TrainingClock(num_samples=100, seed=0, min_tail=8)
    plan = clock.plan(schedule())
    clock.advance(plan)
    with pytest.raises(ValueError, match="does not start at the clock's position"):
        clock.advance(plan)


@settings(max_examples=60)
@given(rollbacks=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 5)), max_size=6),
       workers=st.lists(st.integers(1, 6), min_size=1, max_size=5))
def test_commit_rollback_and_resizes_keep_exactly_once(rollbacks, workers):
    """Run with commits every 3 steps; after some steps 'fail' and roll back to the last
    commit, changing the worker count. The committed history trains every sample of
    every epoch exactly once."""
    clock = TrainingClock(num_samples=90, seed=3, min_tail=6)
    committed = clock.state_dict()
    trained: list[list[int]] = [[] for _ in range(3)]  # only what survives rollbacks
    pending: list[tuple[int, list[int]]] = []
    script = list(rollbacks)
    size_index = 0
    while clock.epoch < 3:
        plan = clock.plan(schedule())
        count = workers[size_index % len(workers)]
        picked = [int(i) for r in range(count) for i in shard_indices(
            epoch=plan.epoch, cursor=plan.cursor, batch=plan.batch, num_workers=count, rank=r,
            num_samples=90, seed=3)]
        pending.append((plan.epoch, picked))
        clock.advance(plan)
        if script and len(pending) >= script[0][0]:
            script.pop(0)
            clock.load_state_dict(committed)  # failure: lose uncommitted steps
            pending.clear()
            size_index += 1
            continue
        if clock.global_step % 3 == 0 or clock.epoch >= 3:
            for epoch, picked_indices in pending:
                trained[epoch].extend(picked_indices)
            pending.clear()
            committed = clock.state_dict()
    assert all(Counter(epoch) == Counter(range(90)) for epoch in trained)
    assert clock.samples_per_epoch == [90, 90, 90]


@settings(max_examples=60)
@given(commit_every=st.integers(1, 7), faults=st.sets(st.integers(0, 12), max_size=4),
       max_steps=st.one_of(st.none(), st.integers(1, 14)))
def test_windows_reproduce_the_per_step_plans_and_end_on_boundaries(commit_every, faults,
                                                                    max_steps):
    """Walking the run window by window gives exactly the plans of the per-step loop; every
    window ends on a commit or epoch boundary (or the cap), and a fault's step only ever
    starts a window."""
    from flashtrain.train.clock import plan_window

    start = TrainingClock(num_samples=100, seed=0, min_tail=8)
    per_step = []
    while start.epoch < 3 and (max_steps is None or start.global_step < max_steps):
        per_step.append(start.plan(schedule()))
        start.advance(start.plan(schedule()))

    def boundary(plan):
        return plan.end_of_epoch or (plan.global_step + 1) % commit_every == 0

    clock = TrainingClock(num_samples=100, seed=0, min_tail=8)
    windowed, windows = [], []
    while window := plan_window(clock.state_dict(), schedule(), ends_after=boundary,
                                starts_apart=lambda p: p.global_step in faults,
                                max_steps=max_steps):
        windows.append(window)
        windowed += window
        for plan in window:
            clock.advance(plan)
    assert windowed == per_step
    for window in windows:
        assert all(not boundary(p) for p in window[:-1])
        assert all(p.global_step not in faults for p in window[1:])
        last = window[-1]
        assert boundary(last) or last.global_step + 1 == max_steps \
            or last.global_step + 1 in faults


def test_a_window_is_one_step_when_every_step_is_a_boundary():
    from flashtrain.train.clock import plan_window

    clock = TrainingClock(num_samples=100, seed=0, min_tail=8)
    assert len(plan_window(clock.state_dict(), schedule(), ends_after=lambda p: True)) == 1
    clock.epoch = 3
    assert plan_window(clock.state_dict(), schedule(), ends_after=lambda p: True) == []
