"""Watching a training job from outside, through its ``metrics.jsonl``.

:class:`MetricsTail` reads the records the job appends (steps, commits, checkpoints,
grids, re-forms) and stamps each with the benchmark's own clock when it is first seen
and with the driver *instance* that wrote it (the job is started again after a driver
kill, and a resumed driver's ``time`` restarts at 0). Polled every 50 ms, so a stamp is
at most that late; the same instrument for every fault.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

POLL_S = 0.05


class MetricsTail:
    """The records of a growing JSONL file, each with ``_seen`` (``time.time()`` when first
    read) and ``_instance`` (the driver instance current when it was read)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        self.instance = 1
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[dict]:
        """Read what was appended since the last poll; returns the new records."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # a line being written right now
        now = time.time()
        new = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            record["_seen"], record["_instance"] = now, self.instance
            new.append(record)
        self.records.extend(new)
        return new

    def wait_for(self, condition: Callable[[dict], bool], limit_s: float,
                 alive: Callable[[], bool] = lambda: True, start: int = 0) -> dict | None:
        """The first record from index ``start`` on for which ``condition`` holds, waiting
        (polling) at most ``limit_s``; None on timeout or when ``alive()`` turns false
        (the records it wrote before are still read)."""
        deadline = time.monotonic() + limit_s
        index = start
        while True:
            self.poll()
            while index < len(self.records):
                if condition(self.records[index]):
                    return self.records[index]
                index += 1
            if time.monotonic() > deadline:
                return None
            if not alive():
                self.poll()
                found = [r for r in self.records[index:] if condition(r)]
                return found[0] if found else None
            time.sleep(POLL_S)

    # -- what the job has said so far -----------------------------------------------------

    def steps(self, start: int = 0) -> list[dict]:
        return [r for r in self.records[start:] if r.get("kind") == "step"]

    def last(self, kind: str, name: str | None = None, instance: int | None = None) -> dict | None:
        """The newest record of ``kind`` (an event called ``name``), of one instance."""
        for record in reversed(self.records):
            if record.get("kind") != kind or (name is not None and record.get("name") != name):
                continue
            if instance is None or record["_instance"] == instance:
                return record
        return None

    def last_step(self) -> dict | None:
        return self.last("step")

    def grid(self) -> dict | None:
        """The newest ``grid`` event of the current driver instance (members, their nodes)."""
        return self.last("event", "grid", instance=self.instance)


def is_step(record: dict) -> bool:
    return record.get("kind") == "step"
