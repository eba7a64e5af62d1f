"""Seeded fault schedules that reach every moment of the real system.

A fault fires at the n-th occurrence of its *moment* (a step window, a window that
commits, a re-forming grid, a join wait, a validation, a checkpoint, a spare's start),
so a schedule lands where it means to whatever the run's timing. Kinds:

========== ======================================================================
compute    a member dies during a step's forward/backward
collective a member dies inside a step's all-reduce
commit     a member dies in the commit that ends a window
relaying   a relay (a member with children in the tree) dies as the window starts
forming    a member dies while a re-formed grid forms (a failure during recovery)
second     a member dies in a step, and another while the grid re-forms after it
join_wait  a replacement the controller is waiting for dies
wait_kill  a grid member dies while the controller waits for a replacement
validate   a member dies during validation
checkpoint a member dies while the grid prepares a durable checkpoint
node       a whole node dies in a step; its capacity returns after a while...
lost_node  ...or never
stall      a member stops answering past the collective timeout
spare      a replacement dies while it starts
slow_start a replacement takes 5-15 times the usual process start (a loaded machine)
driver     the driver is killed (its members die with it) somewhere in the span of two
           windows from a window's start (inside the window, its commit, or what follows
           it: a digest check, a validation, a checkpoint, a recovery); the run is
           resumed from the newest durable checkpoint (``--resume``)
========== ======================================================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MOMENT_OF = {
    "compute": "window", "collective": "window", "relaying": "window", "second": "window",
    "node": "window", "lost_node": "window", "stall": "window",
    "commit": "commit_window", "forming": "reform", "join_wait": "join_wait",
    "wait_kill": "join_wait",
    "validate": "validate", "checkpoint": "checkpoint", "spare": "spare_start",
    "slow_start": "spare_start", "driver": "window",
}
KINDS = tuple(MOMENT_OF)


@dataclass(frozen=True)
class Fault:
    """One fault: ``kind`` fires at the ``nth`` (1-based) occurrence of its moment on
    the member at ``pick`` (a fraction of the members' list), ``where`` (a fraction)
    into the window; a node's capacity returns ``returns_after_s`` after it died."""

    kind: str
    nth: int
    pick: float
    where: float
    returns_after_s: float | None = None
    at_step: int | None = None  # instead of ``nth``/``where``: in this global step


    @property
    def moment(self) -> str:
        return MOMENT_OF[self.kind]

    def describe(self) -> str:
        back = "" if self.returns_after_s is None else f", back after {self.returns_after_s:.0f}s"
        if self.at_step is not None:
            return f"{self.kind}@step{self.at_step} pick={self.pick:.3f}{back}"
        return f"{self.kind}@{self.moment}#{self.nth} pick={self.pick:.3f} where={self.where:.3f}{back}"


def schedule_for(seed: int, num_faults: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """``num_faults`` faults drawn from ``seed`` (the same seed, the same schedule)."""
    rng = random.Random(seed)
    faults = []
    for _ in range(num_faults):
        kind = rng.choice(kinds)
        nth = rng.randint(1, 3) if MOMENT_OF[kind] in ("reform", "join_wait", "validate",
                                                        "checkpoint") else rng.randint(1, 8)
        returns = None
        if kind == "node":
            returns = rng.choice((5.0, 20.0, 60.0))
        faults.append(Fault(kind, nth, rng.random(), rng.random(), returns))
    return faults


class FaultPlan:
    """The faults of one run, fired once each at their moments."""

    def __init__(self, faults: list[Fault]):
        self.faults = list(faults)
        self.counts: dict[str, int] = {}
        self.fired: list[tuple[float, Fault]] = []

    def at(self, moment: str, now: float) -> list[Fault]:
        """The faults due at this occurrence of ``moment``."""
        self.counts[moment] = self.counts.get(moment, 0) + 1
        due = [f for f in self.faults if f.moment == moment and f.at_step is None
               and f.nth == self.counts[moment]]
        for fault in due:
            self.faults.remove(fault)
            self.fired.append((now, fault))
        return due

    def in_steps(self, steps: list[int], now: float) -> list[tuple[int, Fault]]:
        """The step-pinned faults due in a window of ``steps``: (index in it, fault)."""
        due = [(steps.index(f.at_step), f) for f in self.faults
               if f.at_step is not None and f.at_step in steps]
        for _, fault in due:
            self.faults.remove(fault)
            self.fired.append((now, fault))
        return due

    @property
    def capacity_lost_for_good(self) -> bool:
        return any(f.kind == "lost_node" for _, f in self.fired)
