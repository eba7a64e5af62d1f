"""A run's segments: each invocation of the job that trained it, so a resumed run reports
the whole run, not its last piece.

Every invocation that reaches training adds one record to ``segments.json`` in the run
directory as it starts (``ended: running``) and completes it when it ends, however it
ends (finished, interrupted, failed), with when it ran, the first and last global step
it trained, why it ended, and its trained samples and training seconds. A record still
``running`` when the next invocation starts belongs to a job that was killed (SIGKILL,
a node lost): it is completed then from that job's own records in metrics.jsonl. :func:`whole_run_summary` folds them into ``summary.json``:
``wall_seconds`` is the sum of the segments' wall times, ``images_per_sec`` the samples
of every trained step over the seconds of every trained step (steps redone after an
interruption count: they were trained), and ``segments`` lists them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SEGMENTS_FILE = "segments.json"


@dataclass(frozen=True)
class Segment:
    """One invocation's part of a run."""

    start: str  # ISO 8601, UTC
    end: str
    first_step: int  # the global step it started at
    last_step: int | None  # the last global step it trained (None: it trained none)
    ended: str  # finished / stopped at runtime.max_steps / interrupted / failed (Error)
    wall_seconds: float
    trained_samples: int
    train_seconds: float
    metrics_offset: int = 0  # where its records begin in metrics.jsonl (bytes)


def read_segments(run_dir: Path | str) -> list[dict[str, Any]]:
    """The segments recorded so far (an unreadable file counts as none: the report and
    the summary then show only what this segment knows)."""
    try:
        loaded = json.loads((Path(run_dir) / SEGMENTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return loaded if isinstance(loaded, list) else []


RUNNING = "running"
KILLED = "killed (the job ended without recording it; figures from its metrics)"


def append_segment(run_dir: Path | str, segment: Segment) -> list[dict[str, Any]]:
    """Add ``segment`` to ``segments.json`` (written atomically), in place of this
    invocation's ``running`` record if there is one; returns them all."""
    segments = read_segments(run_dir)
    if segments and segments[-1].get("ended") == RUNNING:
        segments.pop()
    segments.append(asdict(segment))
    _write(run_dir, segments)
    return segments


def begin_segment(run_dir: Path | str, start: str, metrics_offset: int) -> None:
    """Record that a segment began (completing a killed one's record first)."""
    segments = read_segments(run_dir)
    if segments and segments[-1].get("ended") == RUNNING:
        segments[-1] = killed_segment(segments[-1], records_after(
            Path(run_dir) / "metrics.jsonl", segments[-1].get("metrics_offset", 0)))
    segments.append(asdict(Segment(start, "unknown", 0, None, RUNNING, 0.0, 0, 0.0,
                                   metrics_offset)))
    _write(run_dir, segments)


def killed_segment(segment: Mapping[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``running`` record whose job never completed it, from the job's own records: its
    wall time is its last record's time (seconds since that job's start)."""
    first, last = segment_steps(records)
    steps = [r for r in records if r.get("kind") == "step"]
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    return {**segment, "first_step": first or 0, "last_step": last, "ended": KILLED,
            "wall_seconds": max(times, default=0.0),
            "trained_samples": sum(r.get("samples", 0) for r in steps),
            "train_seconds": sum(r.get("step_seconds", 0.0) for r in steps)}


def records_after(metrics: Path, offset: int) -> list[dict[str, Any]]:
    """The metrics records from byte ``offset`` on (a line cut short by a kill skipped)."""
    try:
        with open(metrics, "rb") as file:
            file.seek(offset)
            lines = file.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict)]


def _write(run_dir: Path | str, segments: list[dict[str, Any]]) -> None:
    target = Path(run_dir) / SEGMENTS_FILE
    fd, temp = tempfile.mkstemp(prefix=f".{SEGMENTS_FILE}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(segments, file, indent=2)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def segment_steps(records: list[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """(first, last) global step of one segment's metrics records: the ``start`` event's
    step, and the highest step record (None where there is none)."""
    first = next((r.get("global_step") for r in records
                  if r.get("kind") == "event" and r.get("name") == "start"), None)
    steps = [r["step"] for r in records if r.get("kind") == "step" and "step" in r]
    return first, (max(steps) if steps else None)


def whole_run_summary(summary: Mapping[str, Any], segments: list[Mapping[str, Any]]) -> dict:
    """``summary`` (written by the last segment) with the figures of the whole run."""
    out = dict(summary)
    if not segments:
        return out
    samples = sum(s.get("trained_samples", 0) for s in segments)
    seconds = sum(s.get("train_seconds", 0.0) for s in segments)
    out["wall_seconds"] = sum(s.get("wall_seconds", 0.0) for s in segments)
    out["images_per_sec"] = samples / seconds if seconds > 0 else 0.0
    out["segments"] = [dict(s) for s in segments]
    return out


def record_earlier_run(run_dir: Path | str) -> None:
    """A run trained before segments.json existed, resumed now: its summary.json becomes
    its first segment (start and end unknown), so the whole-run figures keep it."""
    run_dir = Path(run_dir)
    if (run_dir / SEGMENTS_FILE).exists():
        return
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        samples = int(sum(summary.get("trained_samples_per_epoch") or summary["samples_per_epoch"]))
        ips, wall, steps = summary["images_per_sec"], summary["wall_seconds"], summary["global_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no summary (never finished a segment): nothing earlier to keep
    append_segment(run_dir, Segment("unknown", "unknown", 0, steps - 1 if steps else None,
                                    "ended before segments were recorded", float(wall), samples,
                                    samples / ips if ips else 0.0))
