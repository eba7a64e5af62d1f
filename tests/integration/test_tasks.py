"""Tasks on the engine, on a real local Ray: a user's own task trained through
``flashtrain.fit`` (its update equals single-process SGD), and the shipped regression
task, not an image classifier, killed mid-run (the grid re-forms, every sample is
trained exactly once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accounting import assert_exactly_once
from torch.utils.data import TensorDataset

import flashtrain
from flashtrain.config import load_config
from flashtrain.schedule import split_batch
from flashtrain.sharding import shard_indices
from flashtrain.task import build_seeded
from flashtrain.tasks.diabetes import DiabetesRegression
from flashtrain.train.checkpoint import latest_checkpoint, load_checkpoint
from flashtrain.train.clock import TrainingClock


@pytest.fixture(scope="module")
def local_ray(ray_session):
    return ray_session


class TwoLayerRegression(flashtrain.Task):
    """A user's task, defined outside the package (this file is shipped to the workers
    by value): a small MLP on fixed random data, squared error."""

    def build_model(self, seed):
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def datasets(self):
        generator = torch.Generator().manual_seed(5)
        features = torch.randn(150, 4, generator=generator)
        targets = features @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(
            150, generator=generator)
        return TensorDataset(features, targets), TensorDataset(features[:20], targets[:20])

    def loss(self, outputs, targets, label_smoothing):
        return F.mse_loss(outputs.squeeze(1), targets)

    def metrics(self, outputs, targets):
        return {"mse": ((outputs.squeeze(1) - targets) ** 2).sum()}


EXACT = [
    "grid.shape=1x2", "grid.cpus_per_worker=0.25",
    # 15 over 2 workers is 8, 7: uneven shares.
    "schedule.epochs=1", "schedule.phases=[{start_epoch: 0, global_batch: 15}]",
    "schedule.warmup_epochs=0.5", "runtime.max_steps=4", "runtime.progress=false",
    "collective.bucket_mb=0.0001", "optimizer.weight_decay=0.001",
]


def reference_parameters(task, config, steps: int, losses: list) -> dict:
    """One process, the same global batches, the textbook update, from the task's own
    model, data, loss and parameter groups: no grid at all."""
    train, _ = task.datasets()
    model = build_seeded(task, config.runtime.seed)
    opt = config.optimizer
    optimizer = torch.optim.SGD(task.param_groups(model, opt.weight_decay, opt.no_decay_bn_bias),
                                lr=0.0, momentum=opt.momentum)
    clock = TrainingClock(num_samples=len(train), seed=config.data.seed, min_tail=4)
    for _ in range(steps):
        plan = clock.plan(config.schedule)
        indices = shard_indices(epoch=plan.epoch, cursor=plan.cursor, batch=plan.batch,
                                num_workers=1, rank=0, num_samples=plan.num_samples, seed=plan.seed)
        inputs, targets = task.collate([train[int(i)] for i in indices])
        optimizer.zero_grad()
        loss = task.loss(model(inputs), targets, config.schedule.label_smoothing)
        loss.backward()
        losses.append(loss.item())
        for group in optimizer.param_groups:
            group["lr"] = plan.lr
        optimizer.step()
        clock.advance(plan)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_users_task_through_fit_matches_single_process_sgd(local_ray, tmp_path):
    assert split_batch(15, 2) == [8, 7]
    task = TwoLayerRegression()
    summary = flashtrain.fit(task, overrides=EXACT, run_dir=tmp_path / "run")
    assert summary["global_steps"] == 4 and "final_mse" in summary
    assert summary["task"].endswith(":TwoLayerRegression")
    config = load_config(None, EXACT)
    trained = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))["model"]
    losses: list[float] = []
    expected = reference_parameters(task, config, 4, losses)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["samples"] for r in steps] == [15] * 4  # every rank's share, once
    assert [r["loss"] for r in steps] == pytest.approx(losses, rel=1e-5)
    assert all("train_acc" not in r for r in steps)  # a regression has no accuracy
    initial = build_seeded(task, config.runtime.seed).state_dict()
    assert any(not torch.allclose(initial[k], expected[k]) for k in expected)


def test_the_regression_task_re_forms_after_a_kill_and_trains_each_sample_once(local_ray,
                                                                              tmp_path):
    overrides = ["grid.shape=1x2", "grid.cpus_per_worker=0.5", "schedule.epochs=3",
                 "schedule.phases=[{start_epoch: 0, global_batch: 32}]", "schedule.base_lr=0.8",
                 "schedule.warmup_epochs=0.5", "runtime.progress=false",
                 "collective.timeout_s=4", "elastic.commit_every_steps=3",
                 "faults.kill_worker_at_steps=[7]"]
    summary = flashtrain.fit(DiabetesRegression(), overrides=overrides, run_dir=tmp_path / "run")
    run_dir = Path(summary["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["dataset_train_size"] == 354
    assert_exactly_once(summary, records)
    first = summary["reforms"][0]
    assert first["failed_step"] == 7 and first["old_grid"] == "1x2" and first["new_grid"] == "1x1"
    # Its own metrics, per epoch and at the end: better than predicting the mean (mse 1).
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 3 and all({"mse", "mae"} <= set(r) for r in epochs)
    assert summary["final_mse"] < 0.8 and 0 < summary["final_mae"] < 77
    assert "final_top1" not in summary
