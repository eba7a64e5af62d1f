"""The relay tree's shape and the merging of step results (pure parts of
:mod:`flashtrain.train.relay`; the tree itself runs in the integration tier)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flashtrain.train.clock import StepResult
from flashtrain.train.decode import SkippedSample
from flashtrain.train.relay import (
    WindowAnswer,
    children_of,
    merge_results,
    subtree_of,
    tree_depth,
)


def depth_of(rank: int, fanout: int) -> int:
    depth = 1
    while rank:
        rank = (rank - 1) // fanout
        depth += 1
    return depth


@given(st.integers(1, 3000), st.integers(2, 64))
def test_every_rank_has_one_parent_and_the_root_reaches_all(size, fanout):
    parents = {}
    for rank in range(size):
        kids = children_of(rank, size, fanout)
        assert len(kids) <= fanout
        for kid in kids:
            assert kid not in parents
            parents[kid] = rank
    assert sorted(parents) == list(range(1, size))
    assert subtree_of(0, size, fanout) == list(range(size))
    assert tree_depth(size, fanout) == max(depth_of(r, fanout) for r in range(size))


def test_paper_scale_tree_is_shallow():
    assert tree_depth(2176, 16) == 4  # 1 + 16 + 256 + 4096 >= 2,176
    assert len(children_of(0, 2176, 16)) == 16
    assert len(subtree_of(1, 2176, 16)) == 1 + 16 + 256  # what rank 1 aborts on a failure


results = st.builds(
    StepResult, global_step=st.just(7), rank=st.integers(0, 99), samples=st.integers(0, 64),
    loss_sum=st.floats(0, 100), correct=st.integers(0, 64), compute_s=st.floats(0, 10),
    sync_s=st.floats(0, 10), skipped=st.lists(st.builds(SkippedSample, st.text(max_size=3),
                                                        st.just("bad")), max_size=2).map(tuple),
    data_wait_s=st.floats(0, 10), comm_exposed_s=st.floats(0, 10), seconds=st.floats(0, 30),
    finished_at=st.floats(0, 1e9))


@given(st.lists(results, min_size=1, max_size=9), st.integers(1, 8))
def test_merging_in_any_grouping_gives_the_drivers_sums(step, cut):
    """A tree merges subtrees in groups; the driver must see what it would have computed
    from every rank's own result."""
    answer, rest = WindowAnswer(), WindowAnswer()
    for result in step[:cut]:
        answer.add_results([result])
    for result in step[cut:]:
        rest.add_results([result])
    answer.add(rest)
    (merged,) = answer.steps
    assert answer.ranks == len(step)
    assert merged.samples == sum(r.samples for r in step)
    assert merged.correct == sum(r.correct for r in step)
    assert abs(merged.loss_sum - sum(r.loss_sum for r in step)) <= 1e-9 * max(1, merged.loss_sum)
    assert merged.seconds == max(r.seconds for r in step)
    assert merged.finished_at == max(r.finished_at for r in step)
    assert merged.sync_s == max(r.sync_s for r in step)
    slowest = max(r.compute_s + r.comm_exposed_s + r.data_wait_s for r in step)
    assert merged.compute_s + merged.comm_exposed_s + merged.data_wait_s == slowest
    assert sorted(s.name for s in merged.skipped) == sorted(s.name for r in step for s in r.skipped)


def test_merge_results_of_one_rank_is_that_rank():
    one = StepResult(3, 2, 8, 1.5, 4, 0.1, 0.2, seconds=0.4, finished_at=12.0)
    assert merge_results([one]) == one


def test_collective_errors_keep_their_window_step_across_processes():
    """Relays and the driver place a failed window by the step its survivors' errors
    carry; the errors cross two pickles on the way up."""
    import pickle

    from flashtrain.collective.errors import CollectiveAbortedError, CollectiveTimeoutError

    for err in (CollectiveTimeoutError("row0", 1, "allreduce", 4.0, "peer closed"),
                CollectiveAbortedError("col1", 0, "allreduce", "rank 3 died")):
        err.window_step = 8
        again = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(err))))
        assert (type(again), str(again), again.window_step) == (type(err), str(err), 8)
