"""Which grid to form from the workers that are available: a pure policy.

Pure code: no Ray, no torch. The elastic controller asks :func:`decide` and carries out
the decision it returns (decisions are data, the controller acts and logs the reason).

Rule (rows never straddle nodes, as in the paper, where a row is the GPUs of one node
on NVLink):

* Try every row length ``c`` from the preferred one down to 1. With row length ``c``
  each node contributes ``slots // c`` whole rows; the grid is ``sum(...) x c``.
* Take the grid that uses the most workers; among equals, the longest rows (fewer
  latency steps in the column phase, more traffic on the fast intra-node links).
* Workers left over (for example 7 workers on nodes of 4 and 3 with preferred rows of
  4: a 1x4 grid would idle 3, a 2x3 grid idles 1, a 7x1 grid idles none) stay idle as
  warm spares and join when the grid next grows; the reason string says so.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from flashtrain.topology import Grid


@dataclass(frozen=True)
class GridProposal:
    """The grid to form and why."""

    grid: Grid
    num_idle: int
    reason: str


def propose_grid(
    node_slots: Mapping[Hashable, int],
    preferred_cols: int,
    max_workers: int | None = None,
) -> GridProposal | None:
    """The best grid over ``node_slots`` (free worker slots per node), or None if there
    is no worker at all. ``max_workers`` caps the grid size."""
    if preferred_cols < 1:
        raise ValueError("preferred_cols must be >= 1")
    total = sum(max(n, 0) for n in node_slots.values())
    cap = total if max_workers is None else min(total, max_workers)
    if cap < 1:
        return None
    best: Grid | None = None
    for cols in range(min(preferred_cols, cap), 0, -1):
        rows = sum(max(n, 0) // cols for n in node_slots.values())
        rows = min(rows, cap // cols)
        if rows < 1:
            continue
        candidate = Grid(rows, cols)
        if best is None or candidate.num_workers > best.num_workers:
            best = candidate
    assert best is not None  # cols == 1 always fits when cap >= 1
    idle = total - best.num_workers
    reason = f"{total} workers on {len(node_slots)} node(s), preferred row length {preferred_cols}: grid {best}"
    if idle:
        why = "the cap max_workers" if max_workers is not None and total > max_workers else (
            "rows must not straddle nodes")
        reason += f", {idle} idle as spares ({why})"
    return GridProposal(best, idle, reason)


@dataclass(frozen=True)
class Keep:
    """Nothing to do: the current grid is the best one."""

    reason: str


@dataclass(frozen=True)
class Reform:
    """Re-form into ``grid``."""

    grid: Grid
    reason: str


@dataclass(frozen=True)
class Wait:
    """Too few workers: wait (bounded) for resources."""

    reason: str


@dataclass(frozen=True)
class Abort:
    """Give up; the controller writes a durable checkpoint and exits with ``reason``."""

    reason: str


Decision = Keep | Reform | Wait | Abort


def decide(
    current: Grid | None,
    node_slots: Mapping[Hashable, int],
    *,
    preferred_cols: int,
    min_workers: int,
    max_workers: int | None = None,
    lost_members: bool = False,
    waited_s: float = 0.0,
    wait_limit_s: float = 0.0,
) -> Decision:
    """The action for a membership change.

    ``node_slots`` counts live workers (survivors plus ready spares) per node;
    ``lost_members`` says whether the current grid lost a member (then it cannot be
    kept even if the best shape is unchanged).
    """
    proposal = propose_grid(node_slots, preferred_cols, max_workers)
    available = 0 if proposal is None else proposal.grid.num_workers
    if proposal is None or available < min_workers:
        detail = f"{available} usable worker(s) < elastic.min_workers={min_workers}"
        if waited_s >= wait_limit_s:
            return Abort(f"{detail}, waited {waited_s:.0f}s (limit {wait_limit_s:.0f}s)")
        return Wait(detail)
    if current == proposal.grid and not lost_members:
        return Keep(f"grid {current} is still the best: {proposal.reason}")
    before = "none" if current is None else str(current)
    return Reform(proposal.grid, f"{before} -> {proposal.grid}: {proposal.reason}")
