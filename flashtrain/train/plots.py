"""The run directory's plots: the figures of the run's report
(:mod:`flashtrain.train.figures`), each also written as a PNG file, so a run directory
shows its curves without opening ``report.html``."""

from __future__ import annotations

from pathlib import Path

from flashtrain.train.figures import report_figures
from flashtrain.train.metrics import read_metrics, records_of

# The report's figure names and the run directory's file for each.
PNG_FILES = {"loss": "loss.png", "top1": "top1.png", "validation": "validation.png",
             "batch_lr": "batch_lr.png", "grid": "grid.png", "step_time": "step_split.png"}


def write_plots(run_dir: Path | str) -> list[Path]:
    """Write ``loss.png``, ``top1.png`` (``validation.png`` for a task without top-1:
    its own metrics), ``batch_lr.png``, ``grid.png`` and ``step_split.png`` into ``run_dir`` from its ``metrics.jsonl`` (re-forms drawn as
    vertical lines); returns the written paths. Works on a run with no steps or no epochs
    yet (the plot then says so)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    paths = []
    for figure in report_figures(records, records_of(records, "reform")):
        path = run_dir / PNG_FILES[figure.name]
        path.write_bytes(figure.png)
        paths.append(path)
    return paths
