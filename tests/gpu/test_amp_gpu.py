"""AMP and channels-last on the GPU with real worker actors: fp16 with its loss scale,
bf16 without, fp32; an overflow one rank saw alone skipped by every rank (several ranks,
as in test_nccl_backend)."""

from __future__ import annotations

import pytest
import torch
from members import gpu_share, placed, same_gpu_env

from flashtrain.config import load_config
from flashtrain.topology import Grid
from flashtrain.train.clock import TrainingClock

BASE = [
    "grid.use_gpu=true", "model.name=resnet18",
    "model.channels_last=true", "data.source=synthetic", "data.synthetic_samples=256",
    "data.image_size=64", "data.min_samples_per_worker=1", "schedule.epochs=2",
    "schedule.warmup_epochs=0.5", "schedule.phases=[{start_epoch: 0, global_batch: 32}]",
]


def plans_for(config, count: int) -> list:
    clock = TrainingClock(num_samples=config.data.synthetic_samples, seed=0, min_tail=1)
    plans = []
    for _ in range(count):
        plans.append(clock.plan(config.schedule))
        clock.advance(plans[-1])
    return plans


def read(worker) -> dict:
    conv = next(m for m in worker.model.modules() if isinstance(m, torch.nn.Conv2d))
    params = torch.cat([p.detach().float().reshape(-1).cpu() for p in worker.model.parameters()])
    return {"params": params, "scaler": worker.scaler.state_dict(),
            "skipped": worker.scaler.skipped_steps, "device": str(conv.weight.device),
            "channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last)}


def start_workers(ray, config, tmp_path, count: int) -> list:
    from flashtrain.elastic.membership import WorkerActor
    from flashtrain.tasks.images import ImageClassification

    return [WorkerActor.options(num_gpus=gpu_share(count),
                                runtime_env={"env_vars": same_gpu_env(rank)}).remote(
        config, ImageClassification.from_config(config, str(tmp_path / "cache")))
        for rank in range(count)]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_one_gpu_worker_trains_in_each_precision(ray_gpu, tmp_path, precision):
    config = load_config(None, [*BASE, "grid.shape=1x1", f"model.precision={precision}"])
    (worker,) = start_workers(ray_gpu, config, tmp_path, 1)
    try:
        ray_gpu.get(worker.join.remote(Grid(1, 1), 0, 0), timeout=300)
        before = ray_gpu.get(worker.__ray_call__.remote(read), timeout=60)
        results = ray_gpu.get(worker.train_window.remote(plans_for(config, 6)), timeout=600)
        after = ray_gpu.get(worker.__ray_call__.remote(read), timeout=60)
    finally:
        ray_gpu.kill(worker)
    assert after["device"].startswith("cuda") and after["channels_last"]
    assert all(torch.isfinite(torch.tensor(r.loss_sum)) for r in results)
    assert not torch.equal(before["params"], after["params"])
    if precision == "fp16":
        assert after["skipped"] < 6 and after["scaler"]["scale"] > 0  # it did train
    else:
        assert after["scaler"] == {}  # no loss scale without fp16


def test_an_overflow_on_one_gpu_rank_is_skipped_by_both(ray_gpu, tmp_path):
    config = load_config(None, [*BASE, "grid.shape=1x2", "model.precision=fp16"])
    workers = start_workers(ray_gpu, config, tmp_path, 2)
    try:
        placed(workers, gpu_share(2))  # the only skip: too few GPUs for two ranks
        ray_gpu.get([w.join.remote(Grid(1, 2), r, 0) for r, w in enumerate(workers)],
                    timeout=300)  # an error here is a bug: the test fails
        plans = plans_for(config, 4)
        ray_gpu.get(workers[1].arm_nonfinite_grad.remote(2), timeout=30)
        history = []
        for plan in plans:
            ray_gpu.get([w.train_step.remote(plan) for w in workers], timeout=300)
            history.append(ray_gpu.get([w.__ray_call__.remote(read) for w in workers], timeout=60))
    finally:
        for worker in workers:
            ray_gpu.kill(worker)
    for states in history:
        assert torch.equal(states[0]["params"], states[1]["params"])
        assert states[0]["scaler"] == states[1]["scaler"]
    assert torch.equal(history[1][0]["params"], history[2][0]["params"])  # step 2 skipped
    assert history[2][0]["scaler"]["scale"] == history[1][0]["scaler"]["scale"] / 2
    assert not torch.equal(history[2][0]["params"], history[3][0]["params"])

