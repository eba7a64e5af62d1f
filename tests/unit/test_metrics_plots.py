"""metrics.jsonl, summary.json and the PNG plots of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flashtrain.train.metrics import (
    MetricsWriter,
    read_metrics,
    records_of,
    topk_correct,
    write_summary,
)
from flashtrain.train.plots import write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write_run(run_dir: Path, with_epochs: bool = True, with_reform: bool = True) -> None:
    clock = FakeClock()
    with MetricsWriter(run_dir, clock=clock) as writer:
        for step in range(1, 31):
            clock.now += 0.5
            writer.step(step=step, epoch=step // 10, loss=2.3 / math.sqrt(step),
                        lr=0.01 * min(step, 10), global_batch=64 if step < 15 else 128)
            if with_epochs and step % 10 == 0:
                writer.epoch(epoch=step // 10, top1=0.3 + step / 100, top5=0.9)
            if with_reform and step == 12:
                writer.reform(step=12, reason="worker 3 died", old_grid="2x2", new_grid="1x3",
                              recovery_seconds=1.2, steps_rolled_back=2)
        writer.event("done", steps=30)


def test_records_have_kind_and_run_time(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = MetricsWriter(tmp_path, clock=clock)
    clock.now += 2.5
    writer.step(step=1, loss=np.float32(1.5), lr=torch.tensor(0.1), global_batch=np.int64(64))
    writer.event("nan-loss", loss=float("nan"), per_rank=[np.float32("inf"), 1.0], where=Path("x"))
    # Flushed per line: readable before close.
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0] == {"kind": "step", "time": 2.5, "step": 1, "loss": 1.5,
                          "lr": pytest.approx(0.1), "global_batch": 64}
    assert records[1] == {"kind": "event", "time": 2.5, "name": "nan-loss", "loss": None,
                          "per_rank": [None, 1.0], "where": "x"}
    with pytest.raises(ValueError, match="kind"):
        writer.write("bogus", x=1)
    writer.close()

    resumed = MetricsWriter(tmp_path, start_time=writer.start_time, clock=clock)
    clock.now += 1.0
    resumed.epoch(epoch=0, top1=0.5)
    resumed.close()
    assert [(r["kind"], r["time"]) for r in read_metrics(tmp_path)] == [
        ("step", 2.5), ("event", 2.5), ("epoch", 3.5)]


def test_read_metrics_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "time": 1, "step": 1}\n{"kind": "st')
    assert read_metrics(path) == [{"kind": "step", "time": 1, "step": 1}]
    assert read_metrics(tmp_path / "missing") == []


def test_summary_is_written_whole(tmp_path: Path) -> None:
    summary = {"final_top1": np.float64(0.91), "final_top5": 0.99, "epochs": 3, "global_steps": 70,
               "images_per_sec": 512.0, "wall_seconds": 140.2, "dataset_train_size": 1438,
               "samples_per_epoch": [1438, 1438, 1438], "skipped_files": 0, "reforms": []}
    path = write_summary(tmp_path / "run", summary)
    assert json.loads(path.read_text()) == {**summary, "final_top1": 0.91}
    write_summary(tmp_path / "run", {**summary, "epochs": 4})
    assert json.loads(path.read_text())["epochs"] == 4
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["summary.json"]


def test_topk_counts() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5)) == {1: 1, 2: 2, 5: 3}
    assert topk_correct(logits[:0], torch.tensor([], dtype=torch.long)) == {1: 0, 5: 0}


def _assert_pngs(paths: list[Path], run_dir: Path, metrics_png: str = "top1.png") -> None:
    assert sorted(p.name for p in paths) == sorted(["batch_lr.png", "grid.png", "loss.png",
                                                    "step_split.png", metrics_png])
    for path in paths:
        assert path.parent == run_dir
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_plots_of_a_full_run(tmp_path: Path) -> None:
    _write_run(tmp_path)
    assert len(records_of(read_metrics(tmp_path), "reform")) == 1
    _assert_pngs(write_plots(tmp_path), tmp_path)


def test_plots_before_any_epoch_or_reform(tmp_path: Path) -> None:
    _write_run(tmp_path, with_epochs=False, with_reform=False)
    _assert_pngs(write_plots(tmp_path), tmp_path)


def test_a_task_without_top1_gets_a_figure_of_its_own_metrics(tmp_path: Path) -> None:
    clock = FakeClock()
    with MetricsWriter(tmp_path, clock=clock) as writer:
        for epoch in range(3):
            clock.now += 5.0
            writer.step(step=epoch, epoch=epoch, loss=1.0 / (epoch + 1), lr=0.1, global_batch=8)
            writer.epoch(epoch=epoch, samples=100, mse=0.9 - 0.2 * epoch,
                         mae=0.7 - 0.1 * epoch, val_loss=0.9 - 0.2 * epoch, val_skipped=0)
    _assert_pngs(write_plots(tmp_path), tmp_path, metrics_png="validation.png")
    from flashtrain.train.figures import report_figures, validation_figure

    figure = validation_figure(records_of(read_metrics(tmp_path), "epoch"), [])
    assert figure.name == "validation"
    assert len(report_figures(read_metrics(tmp_path), [])) == 5


def test_plots_of_an_empty_run(tmp_path: Path) -> None:
    _assert_pngs(write_plots(tmp_path), tmp_path)


# -- the TensorBoard mirror (runtime.tensorboard) --------------------------------------------


def _tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar TensorBoard reads back from ``<run_dir>/tensorboard``, by tag:
    (step, value, wall time), through TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def _expected_scalars(records: list[dict], start_time: float) -> dict[str, list]:
    """What the mirror must hold, worked out from metrics.jsonl by hand: every number of
    each step/epoch/reform record, at the record's step, epoch or resume step."""
    axis = {"step": "step", "epoch": "epoch", "reform": "resume_step"}
    expected: dict[str, list] = {}
    for record in records:
        if record["kind"] not in axis:
            continue
        for key, value in record.items():
            if key in ("kind", axis[record["kind"]]) or isinstance(value, (bool, str, list)):
                continue
            if value is None:
                continue
            expected.setdefault(f"{record['kind']}/{key}", []).append(
                (record[axis[record["kind"]]], value, start_time + record["time"]))
    return expected


def test_tensorboard_mirrors_every_scalar_of_metrics_jsonl(tmp_path: Path) -> None:
    clock = FakeClock()
    with MetricsWriter(tmp_path, clock=clock, tensorboard=True) as writer:
        for step in range(6):
            clock.now += 0.25
            writer.step(step=step, epoch=0, loss=2.0 - 0.1 * step, lr=np.float32(0.05),
                        global_batch=32, grid="2x2", step_seconds=0.2, nan_loss=float("nan"))
        writer.reform(time=writer.elapsed(), cause="ActorDiedError", old_grid="2x2",
                      new_grid="3x1", failed_step=5, resume_step=3, steps_rolled_back=2,
                      recovery_seconds=0.94, newcomers=[])
        writer.event("commit", global_step=3)
        writer.epoch(epoch=0, top1=0.42, top5=0.9, val_loss=1.5)
    records = read_metrics(tmp_path)
    expected = _expected_scalars(records, writer.start_time)
    actual = _tensorboard_scalars(tmp_path)
    assert set(actual) == set(expected)
    assert "step/loss" in actual and "reform/recovery_seconds" in actual
    assert "step/nan_loss" not in actual  # null in metrics.jsonl: no number to plot
    assert "event/global_step" not in actual and "step/grid" not in actual
    for tag, points in expected.items():
        got = sorted(actual[tag])
        assert len(got) == len(points), tag
        for (step, value, wall), (want_step, want_value, want_wall) in zip(
                got, sorted(points), strict=True):
            assert step == want_step, tag
            # TensorBoard stores float32 values and float64 wall times.
            assert value == pytest.approx(want_value, rel=1e-6), tag
            assert wall == pytest.approx(want_wall, abs=1e-3), tag


def test_tensorboard_off_or_unused_writes_no_event_files(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "off") as writer:
        writer.step(step=0, loss=1.0)
    assert not (tmp_path / "off" / "tensorboard").exists()
    # On, but nothing trained yet (a run that fails at start): nothing is created either,
    # so the job can still tell a run that never began.
    with MetricsWriter(tmp_path / "idle", tensorboard=True) as writer:
        writer.event("start")
    assert not (tmp_path / "idle" / "tensorboard").exists()
