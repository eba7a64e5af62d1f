"""fp16 loss scaling that every worker agrees on, with real worker actors on a 1x2 grid
(CPU autocast, gloo): an overflow seen by one rank alone (injected after the gradient
sync, so only the explicit agreement can spread it) makes both ranks skip that step and
halve their scale; a rank with an empty share steps and moves its scale like the other;
and a fresh replacement loaded from a commit carries on in step with the survivor."""

from __future__ import annotations

import pytest
import torch

from flashtrain.config import load_config
from flashtrain.topology import Grid
from flashtrain.train.clock import TrainingClock

ray = pytest.importorskip("ray")

START_SCALE = 1024.0  # small enough that tiny_cnn never overflows on its own
# 9 samples in steps of 4: steps 4, 4, 1 per epoch; the 1-sample tail leaves rank 1 empty.
CONFIG = [
    "model.name=tiny_cnn", "model.precision=fp16", "data.source=synthetic",
    "data.synthetic_samples=9", "data.image_size=16", "data.min_samples_per_worker=1",
    "grid.shape=1x2", "grid.cpus_per_worker=0.25", "schedule.epochs=3",
    "schedule.phases=[{start_epoch: 0, global_batch: 4}]", "schedule.warmup_epochs=0.5",
    "collective.timeout_s=60", "collective.bucket_mb=0.001",
]


def snapshot(actor) -> dict:
    """Flat parameters and scaler state of one worker."""
    def read(worker):
        params = torch.cat([p.detach().reshape(-1) for p in worker.model.parameters()])
        return {"params": params, "scaler": worker.scaler.state_dict(),
                "skipped": worker.scaler.skipped_steps}
    return ray.get(actor.__ray_call__.remote(read), timeout=60)


@pytest.fixture(scope="module")
def workers(ray_session, tmp_path_factory):
    from flashtrain.elastic.membership import WorkerActor
    from flashtrain.tasks.images import ImageClassification

    config = load_config(None, CONFIG)
    task = ImageClassification.from_config(config, str(tmp_path_factory.mktemp("cache")))

    def start():
        actor = WorkerActor.options(num_cpus=0.25).remote(config, task)
        ray.get(actor.__ray_call__.remote(
            lambda w: setattr(w.scaler, "scale_value", START_SCALE)), timeout=120)
        return actor

    started = [start() for _ in range(2)]
    yield config, started, start
    for actor in started:
        ray.kill(actor)


def test_every_rank_skips_an_overflow_one_rank_saw_and_replacements_agree(workers):
    config, (rank0, rank1), start = workers
    ray.get([w.join.remote(Grid(1, 2), r, 0) for r, w in enumerate((rank0, rank1))], timeout=120)
    clock = TrainingClock(num_samples=9, seed=0, min_tail=1)
    plans = []
    for _ in range(6):
        plans.append(clock.plan(config.schedule))
        clock.advance(plans[-1])
    assert [p.batch for p in plans] == [4, 4, 1, 4, 4, 1]
    ray.get(rank1.arm_nonfinite_grad.remote(1), timeout=30)  # a normal step
    ray.get(rank1.arm_nonfinite_grad.remote(5), timeout=30)  # rank 1's share is empty
    history = [[snapshot(rank0), snapshot(rank1)]]
    for plan in plans:
        results = ray.get([w.train_step.remote(plan) for w in (rank0, rank1)], timeout=300)
        if plan.batch == 1:
            assert [r.samples for r in results] == [1, 0]
        history.append([snapshot(rank0), snapshot(rank1)])

    for step, (before, after) in enumerate(zip(history[:-1], history[1:], strict=True)):
        # The replicas never drift apart, whatever the step did.
        assert torch.equal(after[0]["params"], after[1]["params"]), f"step {step}"
        assert after[0]["scaler"] == after[1]["scaler"], f"step {step}"
        changed = not torch.equal(after[0]["params"], before[0]["params"])
        scale, old_scale = after[0]["scaler"]["scale"], before[0]["scaler"]["scale"]
        if step in (1, 5):  # the injected overflows: skipped everywhere, scale halved
            assert not changed and scale == old_scale / 2, f"step {step}"
        else:  # including step 2, where rank 1 trained on nothing
            assert changed and scale == old_scale, f"step {step}"
    assert [s["skipped"] for s in history[-1]] == [2, 2]
    assert history[-1][0]["scaler"]["_growth_tracker"] == 0  # step 5 reset it

    # Rank 1 is replaced by a fresh worker that loads rank 0's commit of step 6.
    for _ in range(3):
        plans.append(clock.plan(config.schedule))
        clock.advance(plans[-1])
    ray.get(rank0.commit.remote(6), timeout=60)
    ray.get([w.leave.remote() for w in (rank0, rank1)], timeout=60)
    fresh = start()
    ray.get(fresh.load_state.remote(rank0.committed_state.remote(6)), timeout=60)
    assert snapshot(fresh)["scaler"] == snapshot(rank0)["scaler"]
    assert snapshot(fresh)["scaler"]["scale"] == START_SCALE / 4
    ray.get([w.join.remote(Grid(1, 2), r, 1) for r, w in enumerate((rank0, fresh))], timeout=120)
    ray.get(fresh.arm_nonfinite_grad.remote(7), timeout=30)
    for plan in plans[6:]:
        ray.get([w.train_step.remote(plan) for w in (rank0, fresh)], timeout=300)
    final = [snapshot(rank0), snapshot(fresh)]
    assert torch.equal(final[0]["params"], final[1]["params"])
    assert final[0]["scaler"] == final[1]["scaler"]
    assert final[0]["scaler"]["scale"] == START_SCALE / 8
    ray.get([w.leave.remote() for w in (rank0, fresh)], timeout=60)
    ray.kill(fresh)
