"""Grid arithmetic for the 2D torus: ranks, coordinates, row/column members, group names
and the layout of grid cells onto nodes.

Pure code: no Ray, no torch. Conventions (used everywhere in flashtrain):

* A grid is ``rows x cols`` and is written ``"RxC"``. ``cols`` is the *row length*
  (the paper's X, usually the GPUs of one node); ``rows`` is the paper's Y.
* Rank ``r`` sits at ``(row, col) = divmod(r, cols)``: the ranks of one row are
  consecutive, so a row can be placed on one node.
* The torus all-reduce reduce-scatters along a row (``cols`` members), all-reduces along
  a column (``rows`` members) and all-gathers along the row.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

_GRID_PATTERN = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Grid:
    """A ``rows x cols`` grid of workers."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"grid {self.rows}x{self.cols}: rows and cols must both be >= 1")

    @classmethod
    def parse(cls, text: str) -> Grid:
        """Parse ``"RxC"`` (e.g. ``"2x4"``: 2 rows of 4 workers)."""
        match = _GRID_PATTERN.match(str(text))
        if not match:
            raise ValueError(f"grid {text!r} is not of the form RxC, e.g. '2x4' (2 rows of 4)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def num_workers(self) -> int:
        return self.rows * self.cols

    def coords(self, rank: int) -> tuple[int, int]:
        """``(row, col)`` of ``rank``."""
        self._check_rank(rank)
        return divmod(rank, self.cols)

    def rank(self, row: int, col: int) -> int:
        """Rank of the cell at ``(row, col)``."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise ValueError(f"cell ({row}, {col}) is outside grid {self}")
        return row * self.cols + col

    def row_members(self, row: int) -> list[int]:
        """Ranks of row ``row``, in column order (the row group's rank order)."""
        return [self.rank(row, col) for col in range(self.cols)]

    def col_members(self, col: int) -> list[int]:
        """Ranks of column ``col``, in row order (the column group's rank order)."""
        return [self.rank(row, col) for row in range(self.rows)]

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_workers:
            raise ValueError(f"rank {rank} is outside grid {self} (0..{self.num_workers - 1})")


def row_group_name(row: int, generation: int, prefix: str = "") -> str:
    """Name of the collective group of ``row`` in grid generation ``generation``.

    The generation is part of the name so a re-formed grid never meets the rendezvous
    of a stale group with the same row number.
    """
    return f"{prefix}row{row}@g{generation}"


def col_group_name(col: int, generation: int, prefix: str = "") -> str:
    """Name of the collective group of column ``col`` in grid generation ``generation``."""
    return f"{prefix}col{col}@g{generation}"


def world_group_name(generation: int, prefix: str = "") -> str:
    """Name of the group of all workers (used by the flat baseline and validation)."""
    return f"{prefix}world@g{generation}"


@dataclass(frozen=True)
class Layout:
    """Which worker slot serves each rank of a grid.

    ``slot_of_rank[r]`` is an index into the slot list given to :func:`layout_grid`.
    ``split_rows`` counts rows whose members sit on more than one node (their
    reduce-scatter and all-gather then cross the slower inter-node links).
    """

    grid: Grid
    slot_of_rank: tuple[int, ...]
    split_rows: int


def layout_grid(slot_nodes: Sequence[Hashable], grid: Grid) -> Layout:
    """Assign grid ranks to worker slots so that each row stays on one node when it can.

    ``slot_nodes[i]`` is the node that slot ``i`` (a placement-group bundle or an actor)
    sits on. Rows are carved whole out of the nodes with the most free slots first; the
    slots left over (fewer than ``cols`` on any node) fill the remaining rows, which then
    span nodes. Slots beyond ``grid.num_workers`` stay unused.
    """
    if len(slot_nodes) < grid.num_workers:
        raise ValueError(
            f"grid {grid} needs {grid.num_workers} workers but only {len(slot_nodes)} "
            "slots are available"
        )
    by_node: dict[Hashable, list[int]] = defaultdict(list)
    for slot, node in enumerate(slot_nodes):
        by_node[node].append(slot)
    # Deterministic order: most slots first, then by first slot index.
    nodes = sorted(by_node, key=lambda n: (-len(by_node[n]), by_node[n][0]))

    rows: list[list[int]] = []
    for node in nodes:
        free = by_node[node]
        while len(free) >= grid.cols and len(rows) < grid.rows:
            rows.append(free[: grid.cols])
            del free[: grid.cols]

    leftovers = [slot for node in nodes for slot in by_node[node]]
    split_rows = 0
    while len(rows) < grid.rows:
        row, leftovers = leftovers[: grid.cols], leftovers[grid.cols :]
        split_rows += len({slot_nodes[s] for s in row}) > 1
        rows.append(row)

    return Layout(grid, tuple(slot for row in rows for slot in row), split_rows)
