"""The training job on GPU workers: NCCL gradient sync, bf16 autocast, fp16 with loss
scaling, channels-last. Skipped without CUDA (and without cupy, which Ray's NCCL
collective backend needs)."""

from __future__ import annotations

import json
import math

import pytest
import ray
import torch

from flashtrain.config import load_config
from flashtrain.driver.trainer import Trainer


@pytest.fixture(scope="module")
def ray_gpu():
    ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_gpu_training_steps(ray_gpu, tmp_path, precision):
    workers = min(torch.cuda.device_count(), 4)
    shape = "1x1" if workers == 1 else f"1x{workers}"
    config = load_config(None, [
        "grid.use_gpu=true", f"grid.shape={shape}", "grid.cpus_per_worker=1",
        "model.name=resnet18", f"model.precision={precision}", "data.source=synthetic",
        "data.image_size=64", "schedule.phases=[{start_epoch: 0, global_batch: 64}]",
        "schedule.epochs=1", "runtime.max_steps=6", "runtime.progress=false",
    ])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(config, run_dir, tmp_path / "cache", say=print)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["global_steps"] == 6
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "step"]
    assert all(math.isfinite(loss) for loss in losses)
