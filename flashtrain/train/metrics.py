"""The run's record: ``metrics.jsonl`` (one JSON object a line) and ``summary.json``.

Every record has ``kind`` and ``time`` (seconds since the run started). Fields by kind,
as :mod:`flashtrain.train.plots` reads them (others may be added freely):

- ``step``: ``step`` (global step), ``epoch``, ``loss``, ``lr``, ``global_batch``,
  ``images_per_sec``, ``grid``
- ``epoch``: ``epoch``, ``top1``, ``top5`` (fractions 0-1), ``val_loss``, ``samples``
- ``event``: ``name`` and whatever explains it
- ``reform``: ``step``, ``reason``, ``old_grid``, ``new_grid`` ("RxC"),
  ``recovery_seconds``, ``steps_rolled_back``

With ``tensorboard=True`` the writer mirrors every number of the step, epoch and reform
records into TensorBoard's event format under ``<run_dir>/tensorboard/`` (see
:class:`TensorBoardMirror`); ``metrics.jsonl`` stays the record of truth.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
RECORD_KINDS = ("step", "epoch", "event", "reform")
SUMMARY_KEYS = ("final_top1", "final_top5", "epochs", "global_steps", "images_per_sec",
                "wall_seconds", "dataset_train_size", "samples_per_epoch", "skipped_files",
                "reforms")


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data: numpy and torch scalars and arrays become numbers and
    lists, paths strings, and NaN/inf ``null`` (a diverged loss must still leave a
    readable file). Anything else unknown is written as its ``str``."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays/scalars and torch tensors alike
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# Which field of a record is TensorBoard's step axis, by record kind. A reform record
# has no step of its own: it is placed at the step training resumed from.
TENSORBOARD_STEP_KEYS = {"step": "step", "epoch": "epoch", "reform": "resume_step"}


def scalar_fields(record: dict[str, Any]) -> dict[str, float]:
    """The plain numbers of a record (booleans, strings, lists and nulls are not
    scalars), less ``kind`` and the field that is its kind's step axis."""
    axis = TENSORBOARD_STEP_KEYS.get(record.get("kind"))
    return {key: value for key, value in record.items()
            if key != axis and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardMirror:
    """The step, epoch and reform records of a run as TensorBoard scalars.

    Tag ``<kind>/<field>`` (e.g. ``step/loss``, ``epoch/top1``, ``reform/recovery_seconds``)
    for each number of :func:`scalar_fields`, at the record's step axis
    (``TENSORBOARD_STEP_KEYS``; the count of earlier records of that kind when the field is
    missing) and with the record's wall time. Events are not mirrored: their fields differ
    from one event to the next and mean little as curves. Not thread-safe by itself: the
    :class:`MetricsWriter` calls it under its lock.
    """

    def __init__(self, log_dir: Path, start_time: float, flush_secs: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # the package is a dependency; a broken install says so
            raise RuntimeError(f"runtime.tensorboard needs the tensorboard package ({err}): "
                               "`pip install tensorboard`, or set runtime.tensorboard=false") from err
        self._summary_writer_class = SummaryWriter
        self._log_dir = log_dir
        self._flush_secs = flush_secs  # a running job's curves show up within seconds
        self._writer = None  # opened at the first scalar: a run that never trained has none
        self._start_time = start_time
        self._counts = {kind: 0 for kind in TENSORBOARD_STEP_KEYS}

    def add(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind not in TENSORBOARD_STEP_KEYS:
            return
        if self._writer is None:
            self._writer = self._summary_writer_class(log_dir=str(self._log_dir),
                                                      flush_secs=self._flush_secs)
        step = record.get(TENSORBOARD_STEP_KEYS[kind])
        if not isinstance(step, int) or isinstance(step, bool):
            step = self._counts[kind]
        self._counts[kind] += 1
        walltime = self._start_time + float(record.get("time", 0.0))
        for field, value in scalar_fields(record).items():
            self._writer.add_scalar(f"{kind}/{field}", value, global_step=step, walltime=walltime)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


class MetricsWriter:
    """Appends records to ``<run_dir>/metrics.jsonl``, one flushed line each.

    ``start_time`` (a ``clock()`` reading) is the run's start; pass the original one when
    a resumed run keeps appending to the same file. ``clock`` defaults to ``time.time``.
    ``tensorboard``: also mirror the records into ``<run_dir>/tensorboard/``
    (:class:`TensorBoardMirror`). Thread-safe: the driver's controller and its training
    loop may both write.
    """

    def __init__(self, run_dir: Path | str, start_time: float | None = None,
                 clock: Callable[[], float] = time.time, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self.start_time = clock() if start_time is None else start_time
        self._lock = threading.Lock()
        self._mirror = (TensorBoardMirror(self.path.parent / TENSORBOARD_DIR, self.start_time)
                        if tensorboard else None)
        self._file = open(self.path, "a", encoding="utf-8")

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return self._clock() - self.start_time

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append one record of ``kind`` (one of ``RECORD_KINDS``); returns it."""
        if kind not in RECORD_KINDS:
            raise ValueError(f"unknown record kind {kind!r}: use one of {RECORD_KINDS}")
        record = {"kind": kind, "time": round(self.elapsed(), 6)}
        record.update(_plain(fields))
        line = json.dumps(record, allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            if self._mirror is not None:
                self._mirror_record(record)
        return record

    def _mirror_record(self, record: dict[str, Any]) -> None:
        """Mirror one record into TensorBoard; a failure there (a full disk, say) stops
        the mirror with a warning but never the run: metrics.jsonl is the record."""
        try:
            self._mirror.add(record)
        except Exception as err:  # noqa: BLE001 - the mirror is optional, the run is not
            log.warning("TensorBoard mirror stopped: %s: %s", type(err).__name__, err)
            self._mirror = None

    def step(self, **fields: Any) -> dict[str, Any]:
        return self.write("step", **fields)

    def epoch(self, **fields: Any) -> dict[str, Any]:
        return self.write("epoch", **fields)

    def event(self, name: str, **fields: Any) -> dict[str, Any]:
        return self.write("event", name=name, **fields)

    def reform(self, **fields: Any) -> dict[str, Any]:
        return self.write("reform", **fields)

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
                if self._mirror is not None:
                    self._mirror.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (or of the run directory holding one).

    A torn last line (the writer died mid-line) is ignored; other bad lines are skipped
    with a warning. A missing file reads as no records.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):
                log.warning("%s:%d is not JSON; skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def records_of(records: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of one ``kind``, in file order."""
    return [record for record in records if record.get("kind") == kind]


def write_summary(run_dir: Path | str, summary: dict[str, Any]) -> Path:
    """Write ``<run_dir>/summary.json`` atomically (temp file, fsync, rename). Warns
    about keys of ``SUMMARY_KEYS`` that are missing."""
    has_final = any(key.startswith("final_") for key in summary)  # a task's own metrics
    missing = [key for key in SUMMARY_KEYS if key not in summary
               and not (has_final and key.startswith("final_"))]
    if missing:
        log.warning("summary.json lacks %s", ", ".join(missing))
    target = Path(run_dir) / SUMMARY_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_plain(summary), indent=2, allow_nan=False)
    fd, temp_name = tempfile.mkstemp(prefix=".summary.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def topk_correct(logits: Any, targets: Any, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows of ``logits`` (torch, N x C) have their target among the top k, for
    each k (capped at C). Counts, not means, so ranks' results can simply be summed."""
    if len(targets) == 0:
        return {k: 0 for k in ks}
    widest = min(max(ks), logits.shape[1])
    top = logits.topk(widest, dim=1).indices
    hits = top == targets.view(-1, 1)
    return {k: int(hits[:, : min(k, widest)].any(dim=1).sum()) for k in ks}


def describe_metrics(result: dict) -> str:
    """A validation result as one line: top-1/top-5 as before tasks, any other metric
    by its name."""
    labels = {"top1": "top-1", "top5": "top-5"}
    return "  ".join(f"{labels.get(name, name)} {value:.4f}" for name, value in result.items()
                     if name not in ("val_loss", "val_skipped"))


def task_name(task) -> str:
    """``module:Class`` of a task, for the summary."""
    return f"{type(task).__module__}:{type(task).__qualname__}"
