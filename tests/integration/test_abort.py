"""The out-of-band abort: a collective blocked on a peer that will never come fails at
once when the controller says so, through the actor's control concurrency group, long
before the collective timeout; the same actors then form a new grid and sum right."""

from __future__ import annotations

import time

import pytest
import torch

from flashtrain.topology import Grid

ray = pytest.importorskip("ray")

LONG_TIMEOUT_S = 60.0  # the abort must not wait for this


@ray.remote(num_cpus=0.25, concurrency_groups={"control": 1})
class AbortableMember:
    """A grid member whose control method runs beside a blocked collective."""

    def __init__(self):
        torch.set_num_threads(1)
        from flashtrain.collective import register

        register()
        self.comm = None

    def join(self, grid: Grid, rank: int, generation: int) -> bool:
        from flashtrain.collective import join_grid

        self.comm = join_grid(grid, rank, generation, timeout_s=LONG_TIMEOUT_S,
                              rendezvous_timeout_s=60.0)
        return True

    def leave(self) -> bool:
        from flashtrain.collective import leave_grid

        if self.comm is not None:
            leave_grid(self.comm)
            self.comm = None
        return True

    def allreduce(self, value: float, algorithm: str) -> dict:
        from flashtrain.collective import CollectiveAbortedError, allreduce_

        started = time.monotonic()
        tensor = torch.full((1001,), value)
        try:
            allreduce_(tensor, self.comm, algorithm)
        except CollectiveAbortedError as exc:
            return {"aborted": True, "elapsed": time.monotonic() - started, "group": exc.group,
                    "message": str(exc)}
        return {"aborted": False, "elapsed": time.monotonic() - started,
                "sum": float(tensor[0])}

    @ray.method(concurrency_group="control")
    def abort(self, reason: str) -> int:
        from flashtrain.collective import abort_grid

        return abort_grid(self.comm, reason) if self.comm is not None else 0


@pytest.fixture(scope="module")
def members(ray_session):
    """Four members, for both algorithms: each case forms its own grids (generations)."""
    members = [AbortableMember.remote() for _ in range(4)]
    yield members
    for member in members:
        ray.kill(member)


@pytest.mark.parametrize(("algorithm", "generation"), [("torus", 70), ("flat", 72)])
def test_abort_ends_a_blocked_allreduce_at_once(members, algorithm, generation):
    grid = Grid(2, 2)
    ray.get([m.join.remote(grid, rank, generation) for rank, m in enumerate(members)],
            timeout=120)
    # Rank 3 never calls: ranks 0-2 block inside the collective (torus: some in the
    # row phase, some in the column phase, waiting on peers that are themselves stuck).
    pending = [m.allreduce.remote(1.0, algorithm) for m in members[:3]]
    ready, _ = ray.wait(pending, num_returns=3, timeout=1.0)
    assert not ready, "the collective finished without rank 3"
    aborted_at = time.monotonic()
    counts = ray.get([m.abort.remote("rank 3 died") for m in members[:3]], timeout=10)
    reports = ray.get(pending, timeout=10)
    waited = time.monotonic() - aborted_at
    assert counts == [3, 3, 3]  # row, column and world group of each
    assert waited < 5.0, f"abort took {waited:.1f}s"
    for report in reports:
        assert report["aborted"], report
        assert "rank 3 died" in report["message"] and f"@g{generation}" in report["group"]
        assert report["elapsed"] < LONG_TIMEOUT_S / 2
    # Leaving an aborted grid is safe, and the same actors sum right in a new one.
    ray.get([m.leave.remote() for m in members], timeout=30)
    ray.get([m.join.remote(grid, rank, generation + 1) for rank, m in enumerate(members)],
            timeout=120)
    results = ray.get([m.allreduce.remote(float(rank + 1), algorithm)
                       for rank, m in enumerate(members)], timeout=60)
    assert [r["sum"] for r in results] == [10.0] * 4
    ray.get([m.leave.remote() for m in members], timeout=30)
