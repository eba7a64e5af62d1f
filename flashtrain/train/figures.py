"""The figures of a run, drawn from its ``metrics.jsonl`` records as PNG bytes: the
report (:mod:`flashtrain.report`) embeds them and :mod:`flashtrain.train.plots` writes
them into the run directory, so both show the same plots.

It uses matplotlib's object API with the Agg canvas (no ``pyplot``, no global backend),
so it runs in a driver, a thread or without a display.
Every figure accepts a run cut short anywhere: with no data for it, it says so.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_REFORM_STYLE = {"color": "tab:red", "linestyle": "--", "linewidth": 1, "alpha": 0.7}
# The per-step time split another part of the driver records when it can measure it; the
# first fields of a step record that every run has are the fallback.
TIME_SPLIT_FIELDS = (("compute_seconds", "compute", "tab:blue"),
                     ("comm_exposed_seconds", "exposed communication", "tab:orange"),
                     ("data_wait_seconds", "data wait", "tab:gray"))


@dataclass(frozen=True)
class ReportFigure:
    """One embedded plot: a short name (its anchor), a caption, and the PNG itself."""

    name: str
    caption: str
    png: bytes


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def series(records: Iterable[dict[str, Any]], x_key: str, y_key: str) -> tuple[list, list]:
    """The (x, y) pairs of ``records`` where both fields are numbers (a diverged loss is
    written as null and simply leaves a gap)."""
    pairs = [(r[x_key], r[y_key]) for r in records if _number(r.get(x_key)) and _number(r.get(y_key))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def last_per_step(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per global step, in step order: after a rollback the same steps are
    trained again and recorded again, and the later record is the one that counted."""
    by_step = {r["step"]: r for r in steps if _number(r.get("step"))}
    return [by_step[step] for step in sorted(by_step)]


def grid_workers(grid: Any) -> int | None:
    """The number of workers of an "RxC" grid string (None when it is not one)."""
    try:
        rows, cols = str(grid).lower().split("x")
        return int(rows) * int(cols)
    except ValueError:
        return None


def reform_label(reform: dict[str, Any]) -> str:
    """``2x2->3x1 ActorDiedError, 0.94 s``: the shape change, its cause, its recovery."""
    recovery = reform.get("recovery_seconds")
    took = f"{recovery:.2f} s" if _number(recovery) else "recovery not measured"
    cause = reform.get("cause") or "re-form"
    return f"{reform.get('old_grid', '?')}->{reform.get('new_grid', '?')} {cause}, {took}"


def _png(figure: Figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _no_data(axes: Any, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center",
              transform=axes.transAxes, color="dimgray")


def _mark_reforms(axes: Any, reforms: list[dict[str, Any]], x_key: str,
                  detailed: bool = False) -> None:
    """A dashed line at each re-form (``x_key``: its time, or the step training resumed
    from); ``detailed`` labels each with its cause and recovery time."""
    labelled = False
    for reform in reforms:
        x = reform.get(x_key)
        if not _number(x):
            continue
        axes.axvline(x, label=None if labelled else "grid re-form", **_REFORM_STYLE)
        labelled = True
        text = reform_label(reform) if detailed else (
            f"{reform.get('old_grid', '?')}->{reform.get('new_grid', '?')}")
        axes.annotate(text, (x, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                      va="top", ha="right", fontsize=7, color=_REFORM_STYLE["color"])


def time_span(records: Iterable[dict[str, Any]]) -> tuple[float, float] | None:
    """The first and last record time of a run: the shared x range of the plots against
    time, so that the same moment lines up on all of them."""
    times = [r["time"] for r in records if _number(r.get("time"))]
    if not times or max(times) <= min(times):
        return None
    margin = 0.02 * (max(times) - min(times))
    return min(times) - margin, max(times) + margin


def _finish_time_axes(axes, reforms: list, span, plotted: bool, ylabel: str, title: str) -> None:
    """The frame of a figure against wall time: re-form marks, labels, span, legend."""
    _mark_reforms(axes, reforms, "time")
    axes.set(xlabel="time since the run started (s)", ylabel=ylabel, title=title, xlim=span)
    if plotted or reforms:
        axes.legend(loc="best")


def loss_figure(steps: list, reforms: list, span: tuple[float, float] | None = None) -> ReportFigure:
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    times, losses = series(steps, "time", "loss")
    if times:
        axes.plot(times, losses, color="tab:blue", linewidth=1, label="training loss")
    else:
        _no_data(axes, "training steps")
    _finish_time_axes(axes, reforms, span, bool(times), ylabel="training loss",
                      title="Training loss against time")
    return ReportFigure("loss", "Training loss of every recorded step against wall time; "
                        "dashed lines are grid re-forms.", _png(figure))


# An epoch record's fields that are bookkeeping, not one of the task's metrics.
_EPOCH_FIELDS = {"kind", "time", "epoch", "samples", "val_skipped"}


def validation_figure(epochs: list, reforms: list,
                      span: tuple[float, float] | None = None) -> ReportFigure:
    """Top-1 (and top-5) for a classifier; for any other task, each of its validation
    metrics and the validation loss, on their own scale."""
    if not epochs or any("top1" in e for e in epochs):
        return top1_figure(epochs, reforms, span)
    names = sorted({k for e in epochs for k, v in e.items()
                    if k not in _EPOCH_FIELDS and _number(v)})
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    for name in names:
        times, values = series(epochs, "time", name)
        axes.plot(times, values, marker="o", label=f"validation {name}")
    _finish_time_axes(axes, reforms, span, bool(names), ylabel="value",
                      title="Validation metrics against time")
    return ReportFigure("validation", "The task's validation metrics and loss at the end of "
                        "each epoch against wall time.", _png(figure))


def top1_figure(epochs: list, reforms: list, span: tuple[float, float] | None = None) -> ReportFigure:
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    times, top1 = series(epochs, "time", "top1")
    top5_times, top5 = series(epochs, "time", "top5")
    if times:
        axes.plot(times, [100 * v for v in top1], marker="o", color="tab:green",
                  label="validation top-1")
        if top5_times:
            axes.plot(top5_times, [100 * v for v in top5], marker=".", linestyle=":",
                      color="tab:olive", label="validation top-5")
        axes.set_ylim(0, 100)
    else:
        _no_data(axes, "validated epochs")
    _finish_time_axes(axes, reforms, span, bool(times), ylabel="accuracy (%)",
                      title="Validation accuracy against time")
    return ReportFigure("top1", "Validation top-1 (and top-5) at the end of each epoch "
                        "against wall time.", _png(figure))


def batch_lr_figure(steps: list, reforms: list) -> ReportFigure:
    figure = Figure(figsize=(8, 3.6))
    batch_axes = figure.add_subplot()
    ordered = last_per_step(steps)
    step_nums, batches = series(ordered, "step", "global_batch")
    lr_steps, lrs = series(ordered, "step", "lr")
    if step_nums:
        batch_axes.step(step_nums, batches, where="post", color="tab:blue", label="global batch")
    if lr_steps:
        lr_axes = batch_axes.twinx()
        lr_axes.plot(lr_steps, lrs, color="tab:orange", linewidth=1)
        lr_axes.set_ylabel("learning rate", color="tab:orange")
    if not step_nums and not lr_steps:
        _no_data(batch_axes, "training steps")
    _mark_reforms(batch_axes, reforms, "resume_step")
    batch_axes.set(xlabel="global step", title="Global batch (batch-size control) and "
                   "learning rate against step")
    batch_axes.set_ylabel("global batch", color="tab:blue")
    return ReportFigure("batch_lr", "Global batch (left axis, blue) and learning rate (right "
                        "axis, orange) by global step; dashed lines mark the step training "
                        "resumed from after each re-form.", _png(figure))


def grid_timeline(records: list[dict[str, Any]]) -> tuple[list[float], list[int], list[str]]:
    """When each grid came into force: the driver's ``grid`` events, or, in a run without
    them, the first step record of each new grid. Returns times, worker counts, shapes."""
    formed = [r for r in records if r.get("kind") == "event" and r.get("name") == "grid"]
    if not formed:
        formed = [r for r in records if r.get("kind") == "step"]
    times, workers, shapes = [], [], []
    for record in formed:
        size = grid_workers(record.get("grid"))
        if size is None or not _number(record.get("time")):
            continue
        if shapes and shapes[-1] == str(record["grid"]):
            continue
        times.append(record["time"])
        workers.append(size)
        shapes.append(str(record["grid"]))
    return times, workers, shapes


def grid_figure(records: list[dict[str, Any]], reforms: list,
                span: tuple[float, float] | None = None) -> ReportFigure:
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    times, workers, shapes = grid_timeline(records)
    if times:
        end = max(r["time"] for r in records if _number(r.get("time")))
        axes.step(times + [max(end, times[-1])], workers + [workers[-1]], where="post",
                  color="tab:purple", linewidth=2, label="workers in the grid")
        for time, size, shape in zip(times, workers, shapes, strict=True):
            axes.annotate(shape, (time, size), textcoords="offset points", xytext=(4, 4),
                          fontsize=8, color="tab:purple")
        axes.set_ylim(0, max(workers) * 1.3)
    else:
        _no_data(axes, "grid")
    _mark_reforms(axes, reforms, "time", detailed=True)
    axes.set(xlabel="time since the run started (s)", ylabel="workers",
             title="Grid size against time (re-forms: cause, recovery time)", xlim=span)
    if times or reforms:
        axes.legend(loc="best")
    return ReportFigure("grid", "Number of workers in the grid against wall time, each "
                        "grid labelled with its shape; each re-form is marked with its cause "
                        "and the time from the failure to the next completed step.",
                        _png(figure))


def has_time_split(steps: list[dict[str, Any]]) -> bool:
    """Whether the step records carry the compute / communication / data-wait split."""
    return any(_number(r.get(field)) for r in steps for field, _, _ in TIME_SPLIT_FIELDS)


def step_time_figure(steps: list[dict[str, Any]]) -> ReportFigure:
    """Per step: the split into compute, exposed communication and data wait, stacked,
    when the records carry it; otherwise the step's wall time and its all-reduce wait."""
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    ordered = last_per_step(steps)
    if has_time_split(ordered):
        nums = [r["step"] for r in ordered]
        layers = [[r.get(field) if _number(r.get(field)) else 0.0 for r in ordered]
                  for field, _, _ in TIME_SPLIT_FIELDS]
        axes.stackplot(nums, *layers, labels=[label for _, label, _ in TIME_SPLIT_FIELDS],
                       colors=[color for _, _, color in TIME_SPLIT_FIELDS], alpha=0.8)
        total_steps, totals = series(ordered, "step", "step_seconds")
        if totals:
            axes.plot(total_steps, totals, color="black", linewidth=0.8, label="step wall time")
        caption = ("Per step: compute, exposed (not overlapped) communication and data wait "
                   "stacked, each the slowest worker's (so the stack can exceed the step); the "
                   "black line is the step's wall time on the driver.")
    else:
        total_steps, totals = series(ordered, "step", "step_seconds")
        sync_steps, syncs = series(ordered, "step", "sync_seconds")
        if totals:
            axes.plot(total_steps, totals, color="black", linewidth=1,
                      label="step wall time (driver)")
        if sync_steps:
            axes.plot(sync_steps, syncs, color="tab:orange", linewidth=1,
                      label="gradient all-reduce (slowest rank)")
        if not totals and not sync_steps:
            _no_data(axes, "step times")
        caption = ("Per step: wall time on the driver and the slowest rank's gradient "
                   "all-reduce time (this run's records carry no compute / exposed "
                   "communication / data-wait split).")
    axes.set(xlabel="global step", ylabel="seconds", title="Where each step's time went")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="best", fontsize=8)
    return ReportFigure("step_time", caption, _png(figure))


def report_figures(records: list[dict[str, Any]], reforms: list[dict[str, Any]]) -> list[ReportFigure]:
    """All figures of the report, in reading order."""
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    span = time_span(records)
    return [loss_figure(steps, reforms, span), validation_figure(epochs, reforms, span),
            batch_lr_figure(steps, reforms), grid_figure(records, reforms, span),
            step_time_figure(steps)]
