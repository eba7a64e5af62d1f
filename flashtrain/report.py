"""``report.html``: one self-contained page that tells a run's story at a glance.

``python -m flashtrain.report RUN_DIR`` (re)builds it from whatever the run directory
holds: ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and ``error.log``, so it works
for a finished run, a failed one and one still running (a file that is missing or cut
short is shown as such). The job writes it at the end of every run. The page needs
nothing but itself: the plots are PNGs embedded as data URIs, there is no script and no
link to anything outside it, so it can be mailed or copied off a cluster as one file.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashtrain.train.metrics import METRICS_FILE, SUMMARY_FILE, read_metrics, records_of
from flashtrain.train.segments import read_segments

REPORT_FILE = "report.html"
CONFIG_FILE = "config.yaml"
RESUMED_CONFIG_FILE = "config.resumed.yaml"  # what a --resume ran with, if it differs
ERROR_FILE = "error.log"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)
EXIT_BAD_RUN_DIR = 2
_ERROR_TAIL_LINES = 40


class NotARunDirectory(ValueError):
    """The path given is not a flashtrain run directory."""


@dataclass
class RunRecord:
    """What a run directory holds, read without trusting any of it to be complete."""

    run_dir: Path
    config_text: str | None = None
    resumed_config_text: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    error_tail: str | None = None
    notes: dict[str, str] = field(default_factory=dict)  # file name -> what is wrong with it

    @property
    def status(self) -> str:
        if self.error_tail is not None:
            return "failed"
        if self.summary is not None:
            return "finished"
        return "incomplete"

    @property
    def reforms(self) -> list[dict[str, Any]]:
        """The grid re-forms: from metrics.jsonl (there as soon as each recovers), else
        from the summary."""
        recorded = records_of(self.records, "reform")
        if recorded or self.summary is None:
            return recorded
        listed = self.summary.get("reforms")
        return [r for r in listed if isinstance(r, dict)] if isinstance(listed, list) else []


def check_run_dir(run_dir: Path | str) -> Path:
    """``run_dir`` as a path, or NotARunDirectory saying what is wrong and what to pass."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise NotARunDirectory(f"{path} is not a directory: pass the run directory a job "
                               "printed at its start (e.g. runs/default-20250101-120000)")
    if not any((path / name).is_file() for name in RUN_FILES):
        raise NotARunDirectory(f"{path} is not a flashtrain run directory: it holds none of "
                               f"{', '.join(RUN_FILES)}; pass the directory a job printed at "
                               "its start")
    return path


def _read_summary(path: Path, notes: dict[str, str]) -> dict[str, Any] | None:
    if not path.is_file():
        notes[SUMMARY_FILE] = "missing: the run failed, was stopped or is still running"
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        notes[SUMMARY_FILE] = f"unreadable ({type(err).__name__}: {err})"
        return None
    if not isinstance(summary, dict):
        notes[SUMMARY_FILE] = "unreadable (not a JSON object)"
        return None
    return summary


def read_run(run_dir: Path | str) -> RunRecord:
    """Everything the report shows, from ``run_dir`` (checked by :func:`check_run_dir`)."""
    path = check_run_dir(run_dir)
    run = RunRecord(path)
    config = path / CONFIG_FILE
    if config.is_file():
        run.config_text = config.read_text(encoding="utf-8", errors="replace")
    else:
        run.notes[CONFIG_FILE] = "missing"
    resumed = path / RESUMED_CONFIG_FILE
    if resumed.is_file():
        run.resumed_config_text = resumed.read_text(encoding="utf-8", errors="replace")
    if (path / METRICS_FILE).is_file():
        run.records = read_metrics(path)
        if not run.records:
            run.notes[METRICS_FILE] = "holds no records yet"
    else:
        run.notes[METRICS_FILE] = "missing"
    run.summary = _read_summary(path / SUMMARY_FILE, run.notes)
    error = path / ERROR_FILE
    if error.is_file():
        lines = error.read_text(encoding="utf-8", errors="replace").splitlines()
        run.error_tail = "\n".join(lines[-_ERROR_TAIL_LINES:])
    return run


# -- the page ------------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 8:
        return f"{len(value)} items"
    return str(value)


def _percent(value: Any) -> str:
    return f"{100 * value:.2f} %" if isinstance(value, (int, float)) else "-"


def summary_rows(run: RunRecord) -> list[tuple[str, str]]:
    """The headline figures: from summary.json, or, without one, from the records so far."""
    summary = run.summary
    if summary is not None:
        # a classifier's accuracies first, as percentages; any task's own final metrics
        # (final_mse, ...) come with the other keys below
        rows = [(label, _percent(summary[key])) for key, label in
                (("final_top1", "final top-1"), ("final_top5", "final top-5")) if key in summary]
        skip = {"final_top1", "final_top5", "reforms", "segments"}
        rows += [(key.replace("_", " "), _fmt(value)) for key, value in summary.items()
                 if key not in skip and not isinstance(value, dict)]
        rows.append(("grid re-forms", str(len(run.reforms))))
        return rows
    steps, epochs = records_of(run.records, "step"), records_of(run.records, "epoch")
    times = [r["time"] for r in run.records if isinstance(r.get("time"), (int, float))]
    last_epoch = epochs[-1] if epochs else {}
    return [("last recorded step", str(steps[-1].get("step", "-")) if steps else "-"),
            ("last validated epoch", str(last_epoch.get("epoch", "-"))),
            *_epoch_metric_rows(last_epoch),
            ("last record at", f"{max(times):.1f} s" if times else "-"),
            ("grid now", str(steps[-1].get("grid", "-")) if steps else "-"),
            ("grid re-forms", str(len(run.reforms)))]


def _epoch_metric_rows(epoch: dict) -> list[tuple[str, str]]:
    """An epoch record's validation metrics: top-1/top-5 as percentages for a
    classifier (shown as "-" before the first epoch), any other task's as numbers."""
    if not epoch or "top1" in epoch:
        return [("its top-1", _percent(epoch.get("top1"))),
                ("its top-5", _percent(epoch.get("top5")))]
    skip = {"kind", "time", "epoch", "samples", "val_skipped"}
    return [(f"its {key.replace('_', ' ')}", _fmt(value)) for key, value in epoch.items()
            if key not in skip and isinstance(value, (int, float))]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _reform_table(reforms: list[dict[str, Any]]) -> str:
    if not reforms:
        return "<p>The grid was never re-formed.</p>"
    rows = []
    for reform in reforms:
        recovery = reform.get("recovery_seconds")
        rows.append([_fmt(reform.get("time", "-")), reform.get("cause", "-"),
                     f"{reform.get('old_grid', '?')} -> {reform.get('new_grid', '?')}",
                     f"{recovery:.3f}" if isinstance(recovery, (int, float)) else "-",
                     reform.get("steps_rolled_back", "-"), reform.get("reason", "-")])
    return _table(["time (s)", "cause", "grid", "recovery (s)", "steps rolled back", "reason"],
                  rows)


def _segment_table(segments: list[dict[str, Any]]) -> str:
    """Each invocation that trained the run: a resumed run has several."""
    if not segments:
        return "<p>No segment recorded (a run from before segments.json existed).</p>"
    rows = [[s.get("start", "-"), s.get("end", "-"), s.get("first_step", "-"),
             "-" if s.get("last_step") is None else s["last_step"], s.get("ended", "-"),
             _fmt(s.get("wall_seconds", "-")),
             _fmt(s["trained_samples"] / s["train_seconds"])
             if s.get("train_seconds") else "-"] for s in segments]
    return _table(["start (UTC)", "end (UTC)", "first step", "last step", "ended",
                   "wall (s)", "images/s"], rows)


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.status-finished { color: #1a7f37; } .status-failed { color: #cf222e; }
.status-incomplete { color: #9a6700; }
"""

_STATUS_TEXT = {
    "finished": "finished (summary.json written)",
    "failed": "failed (see the error at the end of this page)",
    "incomplete": "incomplete: no summary.json yet (still running, stopped, or killed)",
}


def render_html(run: RunRecord) -> str:
    """The whole page for ``run``."""
    from flashtrain.train.figures import report_figures

    reforms = run.reforms
    figures = report_figures(run.records, reforms)
    parts = [f"<h1>flashtrain run {_esc(run.run_dir.name)}</h1>",
             f"<p>Run directory: <code>{_esc(run.run_dir.resolve())}</code><br>Status: "
             f"<strong class=\"status-{run.status}\">{_esc(_STATUS_TEXT[run.status])}</strong></p>"]
    if run.notes:
        parts.append("<h2>Files</h2>" + _table(["file", "state"], [[n, s] for n, s in run.notes.items()]))
    parts.append("<h2>Summary</h2>" + _table(["figure", "value"], [list(r) for r in summary_rows(run)]))
    segments = (run.summary or {}).get("segments") or read_segments(run.run_dir)
    parts.append("<h2>Segments</h2>" + _segment_table(segments))
    parts.append("<h2>Grid re-forms</h2>" + _reform_table(reforms))
    parts.append("<h2>Plots</h2>")
    for figure in figures:
        data = base64.b64encode(figure.png).decode("ascii")
        parts.append(f"<figure id=\"{figure.name}\"><img src=\"data:image/png;base64,{data}\" "
                     f"alt=\"{_esc(figure.caption)}\"><figcaption>{_esc(figure.caption)}"
                     "</figcaption></figure>")
    parts.append("<h2>Configuration</h2>" + (
        f"<pre>{_esc(run.config_text)}</pre>" if run.config_text is not None
        else "<p>config.yaml is missing.</p>"))
    if run.resumed_config_text is not None:
        parts.append(f"<h3>As resumed ({RESUMED_CONFIG_FILE})</h3>"
                     f"<pre>{_esc(run.resumed_config_text)}</pre>")
    if run.error_tail is not None:
        parts.append(f"<h2>Error</h2><p>The last lines of {ERROR_FILE}:</p>"
                     f"<pre>{_esc(run.error_tail)}</pre>")
    title = f"flashtrain run {run.run_dir.name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(run_dir: Path | str, output: Path | str | None = None) -> Path:
    """Write the report of ``run_dir`` (default ``<run_dir>/report.html``) atomically:
    a reader never sees half a page. Returns its path."""
    run = read_run(run_dir)
    target = Path(output) if output is not None else run.run_dir / REPORT_FILE
    text = render_html(run)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A plain open (not mkstemp) so the page gets the usual permissions, readable by the
    # person the run directory is shared with.
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashtrain.report",
        description="Write report.html for a run directory (finished, failed or running).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    parser.add_argument("--output", help="where to write the page (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.output)
    except NotARunDirectory as err:
        print(f"flashtrain.report: {err}", file=sys.stderr)
        return EXIT_BAD_RUN_DIR
    print(f"flashtrain.report: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
