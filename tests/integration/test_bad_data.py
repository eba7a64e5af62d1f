"""A bad sample is not a dead worker: the training job, run as a user runs it, on an
ImageNet-layout folder with the quirks real copies have.

The folder holds JPEGs cut short whose header still reads (PIL's ``verify()`` passes, so
the start-up scan keeps them, and they fail only when decoded at training time), CMYK
and grayscale JPEGs and PNG bytes behind a ``.JPEG`` name (good images: they must
train), an empty file (skipped by the scan, as before) and copying debris.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from flashtrain.driver.trainer import RunTotals

REPO = Path(__file__).resolve().parents[2]
TRAIN_PER_CLASS, VAL_PER_CLASS = 15, 4
TORN = ("train/n00000003/torn_a.JPEG", "train/n00000007/torn_b.JPEG")
TORN_VAL = "val/n00000001/torn_val.JPEG"
ODD_BUT_GOOD = ("train/n00000000/cmyk.JPEG", "train/n00000004/gray.JPEG",
                "train/n00000009/png_inside.JPEG")


def _write_torn_jpeg(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path, "JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    with Image.open(path) as image:  # the header reads and verify() passes ...
        image.verify()
    with Image.open(path) as image:  # ... but the pixels do not decode
        try:
            image.load()
        except OSError:
            return
    raise AssertionError(f"{path} decodes: it is not torn")


def write_quirky_imagenet(root: Path) -> int:
    """Digits as ``root/{train,val}/<wnid>/*.JPEG`` plus the quirks; returns how many
    training samples the dataset should hold."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for label in range(10):
        members = np.flatnonzero(bunch.target == label)[: TRAIN_PER_CLASS + VAL_PER_CLASS]
        for number, index in enumerate(members):
            split = "train" if number < TRAIN_PER_CLASS else "val"
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(bunch.images[index] * 16, 0, 255).astype(np.uint8)
            picture = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.BICUBIC)
            picture.convert("RGB").save(folder / f"n{label:08d}_{index:05d}.JPEG", "JPEG")
    for seed, name in enumerate((*TORN, TORN_VAL)):
        _write_torn_jpeg(root / name, seed)
    digit = Image.fromarray((bunch.images[0] * 16).astype(np.uint8), mode="L").resize((32, 32))
    digit.convert("CMYK").save(root / ODD_BUT_GOOD[0], "JPEG")
    digit.save(root / ODD_BUT_GOOD[1], "JPEG")  # grayscale ("L")
    digit.save(root / ODD_BUT_GOOD[2], "PNG")
    (root / "train/n00000005/empty.JPEG").write_bytes(b"")
    for debris in ("train/.DS_Store", "train/n00000002/.DS_Store", "train/README.txt",
                   "val/README.txt", "train/n00000006/._n00000006_00006.JPEG"):
        (root / debris).write_bytes(b"\x00\x05\x16\x07 not an image")
    return 10 * TRAIN_PER_CLASS + len(TORN) + len(ODD_BUT_GOOD)


def test_undecodable_images_are_skipped_counted_and_named(tmp_path, ray_address):
    data = tmp_path / "imagenet"
    train_size = write_quirky_imagenet(data)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "flashtrain.jobs.imagenet", "--config", "jobs/cpu-smoke.yaml",
               "--set", "data.source=imagefolder", "--set", f"data.root={data}",
               "--set", "grid.shape=1x2", "--set", "schedule.epochs=2",
               # This pytest process's Ray, never a cluster another test started.
               "--set", f"runtime.ray_address={ray_address}", "--run-dir", str(run_dir)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset_train_size"] == train_size  # the odd-but-good images are samples
    assert summary["skipped_files"] == 1  # the empty file, found by the start-up scan
    assert summary["reforms"] == []  # a bad sample is not a dead worker
    assert summary["skipped_sample_files"] == sorted(TORN)
    assert summary["num_skipped_sample_files"] == len(TORN)
    assert summary["samples_per_epoch"] == [train_size, train_size]
    assert summary["skipped_samples_per_epoch"] == [len(TORN), len(TORN)]
    assert summary["skipped_samples"] == 2 * len(TORN)
    for trained, skipped in zip(summary["trained_samples_per_epoch"],
                                summary["skipped_samples_per_epoch"], strict=True):
        assert trained + skipped == train_size
    assert summary["val_skipped"] == 1 and summary["dataset_val_size"] == 10 * VAL_PER_CLASS + 1

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if r["kind"] == "event" and r["name"] == "skipped_sample"]
    assert sorted((e["epoch"], e["file"]) for e in events) == sorted(
        (epoch, name) for epoch in (0, 1) for name in TORN)
    assert all("truncated" in e["reason"] for e in events)
    # Every step trained its whole planned batch but the torn samples in it.
    steps = [r for r in records if r["kind"] == "step"]
    assert sum(r["samples"] for r in steps) == 2 * (train_size - len(TORN))
    # One line per bad file, the first time it is met; none for the odd-but-good ones.
    for name in TORN:
        assert result.stdout.count(f"skipping {name} ") == 1, result.stdout
    assert not any(name in result.stdout + result.stderr for name in ODD_BUT_GOOD)


def test_skipped_samples_survive_a_resume_exactly_once():
    """``--resume`` rebuilds the per-epoch skip sets from metrics.jsonl: skips logged at
    steps the resumed process redoes are forgotten (it logs them again), earlier ones kept."""

    def skip(epoch, name, step):
        return {"kind": "event", "name": "skipped_sample", "epoch": epoch, "file": name,
                "step": step}

    records = [
        {"kind": "event", "name": "start", "global_step": 0},
        skip(0, "train/a/x.JPEG", 1), skip(0, "train/b/y.JPEG", 2),
        skip(1, "train/a/x.JPEG", 5), skip(1, "train/b/y.JPEG", 8),  # stopped after step 8
        {"kind": "event", "name": "start", "global_step": 6},  # resumed from checkpoint 6
        skip(1, "train/b/y.JPEG", 8),  # redone
    ]
    totals = RunTotals()
    totals.restore_skipped(records)
    assert totals.skipped == {0: {"train/a/x.JPEG", "train/b/y.JPEG"},
                              1: {"train/a/x.JPEG", "train/b/y.JPEG"}}
    totals.restore_skipped(records[:5] + [{"kind": "event", "name": "start", "global_step": 4}])
    assert totals.skipped_per_epoch(2) == [2, 0]  # both epoch-1 skips come after step 4
