"""The training system end to end on a real local Ray: CPU actors, gloo, real images.

In-process runs use the Trainer directly (one Ray per test module); the command-line
tests run ``python -m flashtrain.jobs.imagenet`` as a user would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashtrain.config import load_config
from flashtrain.driver.trainer import Trainer
from flashtrain.schedule import split_batch
from flashtrain.sharding import shard_indices
from flashtrain.train.checkpoint import latest_checkpoint, load_checkpoint
from flashtrain.train.clock import TrainingClock
from flashtrain.train.data import build_datasets
from flashtrain.train.models import build_model, parameter_groups

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray(ray_session):
    return ray_session


def run_trainer(config, run_dir: Path, data_cache: Path, resume=False) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, run_dir, data_cache, resume=resume, say=lambda m: None)
    try:
        return trainer.train()
    finally:
        trainer.close()


EXACT = [
    "model.name=tiny_cnn", "data.source=synthetic", "data.synthetic_samples=150",
    "data.image_size=16", "grid.shape=2x2", "grid.cpus_per_worker=0.25",
    # 30 over 4 workers is 8, 8, 7, 7: uneven shares.
    "schedule.epochs=1", "schedule.phases=[{start_epoch: 0, global_batch: 30}]",
    "schedule.warmup_epochs=0.5", "schedule.label_smoothing=0.1", "runtime.max_steps=4",
    "runtime.progress=false", "collective.bucket_mb=0.001", "optimizer.weight_decay=0.001",
]


def reference_parameters(config, steps: int, losses: list | None = None) -> dict:
    """One process, the same global batches, the textbook update: no grid at all (each
    step's mean loss is appended to ``losses``)."""
    data = build_datasets(config.data)
    model = build_model("tiny_cnn", data.num_classes, config.runtime.seed)
    opt_cfg = config.optimizer
    optimizer = torch.optim.SGD(parameter_groups(model, opt_cfg.weight_decay, True), lr=0.0,
                                momentum=opt_cfg.momentum)
    clock = TrainingClock(num_samples=len(data.train), seed=config.data.seed, min_tail=8)
    for _ in range(steps):
        plan = clock.plan(config.schedule)
        indices = shard_indices(epoch=plan.epoch, cursor=plan.cursor, batch=plan.batch,
                                num_workers=1, rank=0, num_samples=plan.num_samples, seed=plan.seed)
        images = torch.stack([data.train[int(i)][0] for i in indices])
        labels = torch.tensor([data.train[int(i)][1] for i in indices])
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        loss.backward()
        if losses is not None:
            losses.append(loss.item())
        for group in optimizer.param_groups:
            group["lr"] = plan.lr
        optimizer.step()
        clock.advance(plan)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# The torus, down a relay tree (the direct path trains every other run of this file).
# The other algorithms' sums are checked against float64 on every grid in
# test_collective.py, and how a rank's share is weighted does not depend on the
# algorithm that sums it.
def test_uneven_shards_match_single_process_sgd(local_ray, tmp_path):
    # fanout 2: the windows go down a relay tree of the 4 workers (0 -> 1, 2; 1 -> 3) and
    # the driver gets each step's results merged.
    algorithm, fanout = "torus", 2
    assert split_batch(30, 4) == [8, 8, 7, 7]
    config = load_config(None, EXACT + [f"collective.algorithm={algorithm}",
                                        f"runtime.relay_fanout={fanout}"])
    summary = run_trainer(config, tmp_path / "run", tmp_path / "cache")
    assert summary["global_steps"] == 4
    trained = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))["model"]
    losses = []
    expected = reference_parameters(config, 4, losses)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["samples"] for r in steps] == [30] * 4  # every rank's share, once
    assert [r["loss"] for r in steps] == pytest.approx(losses, rel=1e-5)
    # And the parameters moved: the comparison is not between two untouched models.
    initial = build_model("tiny_cnn", 10, config.runtime.seed).state_dict()
    assert any(not torch.allclose(initial[k], expected[k]) for k in expected)


# A 1x2 grid: neither the run directory nor an exact resume depends on the grid's shape
# (the 2x2 torus's exact updates are the overlap tests' and the uneven shards' subject).
SMOKE = ["model.name=tiny_cnn", "grid.shape=1x2", "grid.cpus_per_worker=0.25",
         "schedule.epochs=2", "schedule.phases=[{start_epoch: 0, global_batch: 64}, "
         "{start_epoch: 1, global_batch: 128}]", "schedule.base_lr=0.8",
         "schedule.warmup_epochs=0.2", "runtime.progress=false", "checkpoint.every_steps=7",
         "checkpoint.keep=10", "collective.bucket_mb=1"]


@pytest.fixture(scope="module")
def whole_run(local_ray, tmp_path_factory) -> tuple[dict, Path, Path]:
    """The two-epoch digits run, uninterrupted: its summary, run directory and data cache
    (the run a user gets from the command line, and the reference for resuming)."""
    root = tmp_path_factory.mktemp("whole")
    summary = run_trainer(load_config(None, SMOKE), root / "run", root / "cache")
    return summary, root / "run", root / "cache"


def test_digits_run_writes_a_complete_run_directory(whole_run):
    summary, run_dir, _ = whole_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    size = summary["dataset_train_size"]
    assert size > 1000 and summary["samples_per_epoch"] == [size, size]
    assert summary["skipped_files"] == 0 and summary["reforms"] == []
    assert 0 <= summary["final_top5"] <= 1 and summary["final_top1"] > 0.3  # chance is 0.1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(summary["global_steps"]))
    assert {r["global_batch"] for r in steps} == {64, 128}
    assert len([r for r in records if r["kind"] == "epoch"]) == 2
    for png in ("loss.png", "top1.png", "batch_lr.png"):
        assert (run_dir / png).stat().st_size > 1000
    # Saved weights load into a plain torchvision-style model of the same name.
    payload = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    model = build_model("tiny_cnn", 10, 0)
    model.load_state_dict(payload["model"])


def _step_losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss as metrics.jsonl holds it (a step redone after an interruption
    must have recorded the same loss both times)."""
    losses: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            assert losses.setdefault(record["step"], record["loss"]) == record["loss"], record
    return losses


def test_a_run_resumed_from_its_checkpoint_equals_the_uninterrupted_one_bit_for_bit(
        whole_run, tmp_path):
    # The whole run as a crash after step 15 would have left it: its checkpoint of step
    # 14 (no commit boundary, mid-epoch 0 of the digits with their random affine
    # augmentation) and its metrics up to step 15. Resumed to the end of the second
    # epoch (its batch is 128), it must redo steps 14 and 15 with the same losses and
    # then train every step as the uninterrupted run did.
    whole, whole_dir, cache = whole_run
    run_dir = tmp_path / "crashed"
    (run_dir / "checkpoints").mkdir(parents=True)
    checkpoint = whole_dir / "checkpoints" / "ckpt-00000014.pt"
    for written in (checkpoint, checkpoint.with_name(checkpoint.name + ".sha256")):
        shutil.copy(written, run_dir / "checkpoints" / written.name)
    clock = load_checkpoint(checkpoint)["clock"]
    assert clock["global_step"] == 14 and clock["epoch"] == 0 and clock["cursor"] == 14 * 64
    kept = []
    for line in (whole_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step" and record["step"] > 15:
            break
        kept.append(line)
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")

    resumed = run_trainer(load_config(None, SMOKE), run_dir, cache, resume=True)
    size = resumed["dataset_train_size"]
    assert resumed["samples_per_epoch"] == [size, size]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Steps 0..15 from the crashed run, 14.. from the resumed one: 14 and 15 twice.
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert Counter(steps) == Counter(list(range(whole["global_steps"])) + [14, 15])
    assert _step_losses(run_dir) == _step_losses(whole_dir)  # every step's loss, bit for bit
    # Validation reads BatchNorm's running statistics, averaged across workers at every
    # checkpoint: equal up to rounding.
    assert resumed["final_top1"] == pytest.approx(whole["final_top1"], abs=0.01)


def test_cli_rejects_an_existing_run_dir_and_keeps_it(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("precious")
    result = subprocess.run([sys.executable, "-m", "flashtrain.jobs.imagenet", "--run-dir",
                             str(run_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "--resume" in result.stderr
    assert (run_dir / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
