"""Kill training workers from outside, as the operating system would.

:class:`ExternalKiller` is a thread in the benchmark's driver process. At seeded random
moments it picks one of the training's worker actors, finds its process id in Ray's GCS
actor table (the state Ray keeps about every actor; no code runs inside the worker) and
sends it ``SIGKILL``. Nothing is staged: the moment falls wherever the worker happens to
be (forward, backward, inside a ring step, a commit, validation, a checkpoint).

Between kills it waits until training has recovered (a step completed after the last
kill), then a random gap, so every kill hits a running grid and each recovery can be
measured alone. Progress is read from a JSONL file of completed steps that the training
writes anyway (flashtrain's ``metrics.jsonl``, the Ray Train peer's timeline), so both
systems are observed by the same instrument.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def alive_actor_pids(class_suffix: str, actor_ids: set[str] | None = None) -> dict[str, int]:
    """``{actor id: pid}`` of the live actors whose class name ends with ``class_suffix``
    (only those in ``actor_ids`` when given), from Ray's GCS actor table."""
    from ray._private import state

    return {actor_id: int(info["Pid"]) for actor_id, info in state.actors().items()
            if info["ActorClassName"].endswith(class_suffix) and info["State"] == "ALIVE"
            and info.get("Pid") and (actor_ids is None or actor_id in actor_ids)}


def completed_steps(path: Path, time_offset: float = 0.0) -> list[tuple[int, float, int]]:
    """``(global step, unix time, incarnation)`` of every completed step in a JSONL file.

    A step record has ``"kind": "step"``, ``"step"`` and ``"time"`` (``time_offset`` is
    added). The incarnation tells a step that ran after a failure was handled from one
    that merely finished as the victim died: flashtrain's records carry the grid
    ``generation``; for the Ray Train peer it counts the ``start`` records (worker-group
    restarts) seen before the step.
    """
    if not path.exists():
        return []
    steps, starts = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if record.get("kind") == "start":
            starts += 1
        elif record.get("name") == "window_lost":
            # A step window that a failure ended: its steps before the failed one were
            # trained (and are redone), though their results never reached the driver.
            steps += [(step, float(record["time"]) + time_offset, int(record["generation"]))
                      for step in range(record["first_step"], record["failed_step"])]
        elif record.get("kind") == "step":
            steps.append((int(record["step"]), float(record["time"]) + time_offset,
                          int(record.get("generation", starts))))
    return steps


@dataclass
class Kill:
    """One kill and what followed it."""

    time: float
    pid: int
    activity: str
    last_step_before: int | None
    incarnation_before: int
    recovery_seconds: float | None = None
    resume_step: int | None = None

    @property
    def steps_redone(self) -> int | None:
        if self.resume_step is None or self.last_step_before is None:
            return None
        return self.last_step_before + 1 - self.resume_step


@dataclass
class ExternalKiller:
    """SIGKILLs ``num_kills`` workers, one at a time, at seeded random moments.

    ``victims()`` returns ``{actor id: pid}`` of the workers that may be killed now (a
    kill waits until there are at least two, so that the grid has survivors);
    ``steps()`` returns the completed steps so far (:func:`completed_steps`); a kill has
    recovered at the first step completed after it in a later incarnation (a step that
    finished as the victim died does not count). ``activity()`` (optional) what the
    driver is doing, recorded with each kill. After the last kill has recovered and
    ``steps_after`` more steps completed, ``on_done()`` is called (to end the run).
    """

    num_kills: int
    seed: int
    victims: Callable[[], dict[str, int]]
    steps: Callable[[], list[tuple[int, float, int]]]
    on_done: Callable[[int], None]
    activity: Callable[[], str] = lambda: "-"
    min_gap_s: float = 1.0
    max_gap_s: float = 4.0
    first_after_steps: int = 10
    steps_after: int = 5
    recovery_limit_s: float = 300.0
    kills: list[Kill] = field(default_factory=list)
    error: str | None = None

    def start(self) -> threading.Thread:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="external-killer", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._kill_all()
        except Exception as err:  # noqa: BLE001 - reported in the benchmark's table
            self.error = f"{type(err).__name__}: {err}"

    def _kill_all(self) -> None:
        rng = random.Random(self.seed)
        if not self._wait_for(lambda s: len(s) >= self.first_after_steps, 600):
            self.error = "training never reached its first steps"
            return
        for _ in range(self.num_kills):
            if self._stop.wait(rng.uniform(self.min_gap_s, self.max_gap_s)):
                return
            kill = self._kill_one(rng)
            if kill is None:
                return
            if not self._wait_for(lambda s, k=kill: self._recovered(k, s) is not None,
                                  self.recovery_limit_s):
                self.error = f"no step completed within {self.recovery_limit_s:.0f}s of a kill"
                return
            self._measure(kill)
        after = self.kills[-1].resume_step if self.kills else 0
        self._wait_for(lambda s: max((n for n, *_ in s), default=0) >= after + self.steps_after,
                       120)
        last = max((n for n, *_ in self.steps()), default=0)
        self.on_done(last + 1)

    def _kill_one(self, rng: random.Random) -> Kill | None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            victims = self.victims()
            if len(victims) >= 2:
                pid = victims[rng.choice(sorted(victims))]
                steps = self.steps()
                kill = Kill(time.time(), pid, self.activity(),
                            max((n for n, *_ in steps), default=None),
                            max((g for *_, g in steps), default=0))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it ended on its own just now: pick again
                    continue
                self.kills.append(kill)
                return kill
            time.sleep(0.05)
        self.error = self.error or "fewer than two live workers to choose from for 120 s"
        return None

    @staticmethod
    def _recovered(kill: Kill, steps: list) -> tuple[float, int] | None:
        """(time, step) of the first step that ran after the kill was handled."""
        after = [(at, step) for step, at, incarnation in steps
                 if at > kill.time and incarnation > kill.incarnation_before]
        return min(after) if after else None

    def _measure(self, kill: Kill) -> None:
        steps = self.steps()
        first_time, resume_step = self._recovered(kill, steps)
        kill.recovery_seconds = first_time - kill.time
        kill.resume_step = resume_step
        # Steps trained before the kill in its incarnation; a step window's are known only
        # once the failure is handled (its window_lost record).
        before = [n for n, at, incarnation in steps
                  if incarnation <= kill.incarnation_before and at <= first_time]
        if before:
            kill.last_step_before = max(before)

    def _wait_for(self, condition: Callable[[list], bool], limit_s: float) -> bool:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if condition(self.steps()):
                return True
            if self._stop.wait(0.05):
                return False
        return False


def summarize(kills: list[Kill]) -> dict:
    """Median, max and the list of recovery seconds and steps redone."""
    seconds = sorted(k.recovery_seconds for k in kills if k.recovery_seconds is not None)
    redone = sorted(k.steps_redone for k in kills if k.steps_redone is not None)

    def median(values: list) -> float | None:
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    return {"kills": len(kills), "recovered": len(seconds),
            "recovery_median_s": median(seconds), "recovery_max_s": max(seconds, default=None),
            "recovery_min_s": min(seconds, default=None),
            "steps_redone_median": median(redone), "steps_redone_max": max(redone, default=None),
            "activities": sorted({k.activity for k in kills})}


def write_stop_marker(workdir: Path, at_step: int) -> None:
    """For the Ray Train peer: ask every rank to stop before global step ``at_step``."""
    from flashtrain.bench.raytrain_peer import STOP_MARKER

    (workdir / STOP_MARKER).write_text(json.dumps({"at_step": at_step}))
