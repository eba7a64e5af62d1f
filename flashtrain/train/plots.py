"""PNG plots of a run, drawn from its ``metrics.jsonl``.

Uses matplotlib's object API with the Agg canvas directly (no ``pyplot``, no global
backend switch), so it is safe in a driver process, a thread, or without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flashtrain.train.metrics import read_metrics, records_of

_REFORM_STYLE = {"color": "tab:red", "linestyle": "--", "linewidth": 1, "alpha": 0.7}


def _series(records: list[dict[str, Any]], x_key: str, y_key: str) -> tuple[list, list]:
    pairs = [(r[x_key], r[y_key]) for r in records
             if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(y_key), (int, float))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _mark_reforms(axes: Any, reforms: list[dict[str, Any]], x_key: str) -> None:
    labelled = False
    for reform in reforms:
        x = reform.get(x_key)
        if not isinstance(x, (int, float)):
            continue
        label = None if labelled else "grid re-form"
        axes.axvline(x, label=label, **_REFORM_STYLE)
        labelled = True
        text = f"{reform.get('old_grid', '?')}->{reform.get('new_grid', '?')}"
        axes.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                      va="top", ha="right", fontsize=7, color=_REFORM_STYLE["color"])


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def _no_data(axes: Any, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=axes.transAxes)


def _loss_plot(steps: list, reforms: list, path: Path) -> Path:
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    times, losses = _series(steps, "time", "loss")
    if times:
        axes.plot(times, losses, color="tab:blue", linewidth=1, label="train loss")
    else:
        _no_data(axes, "steps")
    _mark_reforms(axes, reforms, "time")
    axes.set(xlabel="wall time (s)", ylabel="training loss", title="Loss")
    if times or reforms:
        axes.legend(loc="upper right")
    return _save(figure, path)


def _top1_plot(epochs: list, reforms: list, path: Path) -> Path:
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    times, top1 = _series(epochs, "time", "top1")
    if times:
        axes.plot(times, [100 * v for v in top1], marker="o", color="tab:green", label="val top-1")
        axes.set_ylim(0, 100)
    else:
        _no_data(axes, "validated epochs")
    _mark_reforms(axes, reforms, "time")
    axes.set(xlabel="wall time (s)", ylabel="top-1 accuracy (%)", title="Validation top-1")
    if times or reforms:
        axes.legend(loc="lower right")
    return _save(figure, path)


def _batch_lr_plot(steps: list, reforms: list, path: Path) -> Path:
    figure = Figure(figsize=(7, 4))
    batch_axes = figure.add_subplot()
    step_nums, batches = _series(steps, "step", "global_batch")
    lr_steps, lrs = _series(steps, "step", "lr")
    if step_nums:
        batch_axes.step(step_nums, batches, where="post", color="tab:blue", label="global batch")
    if lr_steps:
        lr_axes = batch_axes.twinx()
        lr_axes.plot(lr_steps, lrs, color="tab:orange", linewidth=1, label="learning rate")
        lr_axes.set_ylabel("learning rate", color="tab:orange")
    if not step_nums and not lr_steps:
        _no_data(batch_axes, "steps")
    _mark_reforms(batch_axes, reforms, "step")
    batch_axes.set(xlabel="global step", title="Batch-size control and learning rate")
    batch_axes.set_ylabel("global batch", color="tab:blue")
    return _save(figure, path)


_SPLIT_PARTS = (("compute_seconds", "compute (forward, backward, optimizer)", "tab:blue"),
                ("comm_exposed_seconds", "exposed communication", "tab:red"),
                ("data_wait_seconds", "data wait", "tab:gray"))


def _step_split_plot(steps: list, path: Path) -> Path:
    """Per step, the slowest worker's compute, exposed communication (the wait for the
    gradient all-reduce after the backward) and data wait, stacked."""
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    split = [r for r in steps if all(isinstance(r.get(key), (int, float))
                                     for key, _, _ in _SPLIT_PARTS)]
    if split:
        x = [r["step"] for r in split]
        bottom = [0.0] * len(split)
        for key, label, color in _SPLIT_PARTS:
            heights = [r[key] for r in split]
            axes.bar(x, heights, bottom=bottom, width=1.0, color=color, label=label)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        step_x, step_s = _series(split, "step", "step_seconds")
        axes.plot(step_x, step_s, color="black", linewidth=1, label="step (driver)")
        axes.legend(loc="upper right", fontsize=8)
    else:
        _no_data(axes, "step splits")
    axes.set(xlabel="global step", ylabel="seconds", title="Where each step's time goes")
    return _save(figure, path)


def write_plots(run_dir: Path | str) -> list[Path]:
    """Write ``loss.png``, ``top1.png``, ``batch_lr.png`` and ``step_split.png`` into
    ``run_dir`` from its
    ``metrics.jsonl`` (re-forms drawn as vertical lines); returns the written paths.
    Works on a run with no steps or no epochs yet (the plot then says so)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps, epochs = records_of(records, "step"), records_of(records, "epoch")
    reforms = records_of(records, "reform")
    return [
        _loss_plot(steps, reforms, run_dir / "loss.png"),
        _top1_plot(epochs, reforms, run_dir / "top1.png"),
        _batch_lr_plot(steps, reforms, run_dir / "batch_lr.png"),
        _step_split_plot(steps, run_dir / "step_split.png"),
    ]
