"""Collectives on real Ray CPU actors: the built-in gloo bug, the flashtrain gloo backend
(every grid shape, size, dtype and algorithm), timeouts on dead and hung peers, and
gradient synchronisation of a real module."""

from __future__ import annotations

import time

import pytest
import torch

from flashtrain.topology import Grid, col_group_name, row_group_name

ray = pytest.importorskip("ray")

TIMEOUT_S = 3.0
POOL_SIZE = 6  # the largest grid formed: 2x3
SIZES = (1, 7, 1001)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALGORITHMS = ("flat", "torus", "hierarchical")


def make_input(seed: int, rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor rank ``rank`` contributes in case ``seed`` (rebuilt by the test)."""
    generator = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randn(numel, generator=generator).to(dtype)


@ray.remote(num_cpus=0.25)
class Member:
    """A grid worker: joins groups, runs all-reduces, reports errors as data."""

    def __init__(self):
        torch.set_num_threads(1)
        from flashtrain.collective import register

        register()
        self.comm = None

    def pid(self) -> int:
        import os

        return os.getpid()

    def join(self, grid: Grid, rank: int, generation: int, timeout_s: float = TIMEOUT_S):
        from flashtrain.collective import join_grid

        # Forming groups on 2 busy cores can take seconds; operations get TIMEOUT_S.
        self.comm = join_grid(grid, rank, generation, timeout_s=timeout_s,
                              rendezvous_timeout_s=60.0)
        return True

    def leave(self):
        from flashtrain.collective import leave_grid

        if self.comm is not None:
            leave_grid(self.comm)
            self.comm = None
        return True

    def run_cases(self, cases):
        """Run ``(seed, numel, dtype, algorithm, op, comm_dtype)`` cases in order."""
        from flashtrain.collective import allreduce_

        outputs = []
        for seed, numel, dtype, algorithm, op, comm_dtype in cases:
            tensor = make_input(seed, self.comm.rank, numel, dtype)
            allreduce_(tensor, self.comm, algorithm, op, comm_dtype)
            outputs.append(tensor)
        return outputs

    def try_allreduce(self, numel: int = 1001, algorithm: str = "torus"):
        """All-reduce once; return what happened as data (the error's fields)."""
        from flashtrain.collective import CollectiveTimeoutError, allreduce_

        start = time.monotonic()
        try:
            allreduce_(torch.ones(numel), self.comm, algorithm)
            return {"ok": True, "elapsed": time.monotonic() - start}
        except CollectiveTimeoutError as exc:
            return {"ok": False, "elapsed": time.monotonic() - start, "group": exc.group,
                    "rank": exc.rank, "op": exc.op, "message": str(exc)}

    def sync_module(self, seed: int):
        """Backward on a small model, then GradientSynchronizer; grads before and after."""
        from flashtrain.collective import GradientSynchronizer

        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        unused = torch.nn.Parameter(torch.zeros(4))  # never gets a grad: contributes zeros
        params = [*model.parameters(), unused]
        batch = torch.randn(6, 5, generator=torch.Generator().manual_seed(100 + self.comm.rank))
        model(batch).pow(2).sum().backward()
        before = [p.grad.double().clone() if p.grad is not None else torch.zeros(p.shape,
                  dtype=torch.float64) for p in params]
        GradientSynchronizer(params, self.comm, "torus", bucket_bytes=64).sync("sum")
        return before, [p.grad.double() for p in params]

    def builtin_gloo_row_then_col(self, grid: Grid, rank: int):
        """Ray's built-in gloo: join row then column, all-reduce ``rank+1`` on the column."""
        import ray.util.collective as col

        row, column = grid.coords(rank)
        col.init_collective_group(grid.cols, column, backend="gloo",
                                  group_name=row_group_name(row, 0, "builtin-"))
        col.init_collective_group(grid.rows, row, backend="gloo",
                                  group_name=col_group_name(column, 0, "builtin-"))
        tensor = torch.full((3,), float(rank + 1))
        col.allreduce(tensor, group_name=col_group_name(column, 0, "builtin-"))
        return tensor[0].item()


@pytest.fixture(scope="module")
def pool(ray_session):
    members = [Member.remote() for _ in range(POOL_SIZE)]
    ray.get([m.pid.remote() for m in members])
    yield members
    for member in members:
        ray.kill(member)


def form(members, grid: Grid, generation: int) -> list:
    """Join the first ``grid.num_workers`` members into ``grid``; returns them."""
    chosen = members[: grid.num_workers]
    ray.get([m.join.remote(grid, rank, generation) for rank, m in enumerate(chosen)],
            timeout=60)
    return chosen


def disband(members) -> None:
    ray.get([m.leave.remote() for m in members], timeout=60)


def tolerance(inputs: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Bound on the error of a sum whose partial sums are rounded at most N times."""
    eps = torch.finfo(dtype).eps
    magnitude = sum(x.double().abs() for x in inputs)
    return len(inputs) * eps * magnitude + 1e-6


def check_results(outputs, cases, num_workers: int) -> None:
    for out_per_rank, case in zip(zip(*outputs, strict=True), cases, strict=True):
        seed, numel, dtype, algorithm, op, comm_dtype = case
        inputs = [make_input(seed, rank, numel, dtype) for rank in range(num_workers)]
        expected = sum(x.double() for x in inputs)
        if op == "mean":
            expected = expected / num_workers
        bound = tolerance(inputs, comm_dtype or dtype)
        for rank, result in enumerate(out_per_rank):
            assert result.dtype == dtype
            error = (result.double() - expected).abs()
            assert bool((error <= bound).all()), (
                f"{case} rank {rank}: max error {error.max().item():.3g}")
            # Every replica must hold bit-identical values, or models drift apart.
            assert torch.equal(result, out_per_rank[0]), f"{case}: ranks disagree"


def test_builtin_gloo_backend_gives_wrong_column_sums(ray_session):
    """Reproduces the bug on Ray 2.60: with the built-in "gloo" backend an actor that
    joins its row group and then its column group gets the *row* sum from a column
    all-reduce, silently. ``TorchGLOOGroup`` initializes torch's default process group
    from the first group (the row) and builds the second as
    ``new_group(range(world_size))`` of that default group, so the column group's
    members are really the row's members. In a 2x2 grid where rank r contributes r+1,
    the true column sums are 1+3=4 and 2+4=6; the actors get 1+2=3 and 3+4=7.
    """
    grid = Grid(2, 2)
    members = [Member.remote() for _ in range(grid.num_workers)]
    try:
        results = ray.get([m.builtin_gloo_row_then_col.remote(grid, rank)
                           for rank, m in enumerate(members)], timeout=120)
    finally:
        for member in members:
            ray.kill(member)
    true_column_sums = [4.0, 6.0, 4.0, 6.0]
    row_sums = [3.0, 3.0, 7.0, 7.0]
    assert results != true_column_sums
    assert results == row_sums


def test_all_grids_sizes_dtypes_algorithms(pool):
    """Every algorithm on every shape, odd sizes, fp32/fp16/bf16, sum and mean, with
    the same actors destroyed and re-formed into each shape (and one shape twice under
    the same group names, which must not meet a stale rendezvous)."""
    shapes = [Grid(1, 1), Grid(1, 4), Grid(4, 1), Grid(2, 2), Grid(2, 3), Grid(3, 2),
              Grid(2, 2)]
    for generation, grid in enumerate(shapes):
        generation = min(generation, 5)  # the last 2x2 reuses generation 5's names
        members = form(pool, grid, generation)
        cases = [(seed, numel, dtype, algorithm, "sum", None)
                 for seed, (numel, dtype, algorithm) in enumerate(
                     (n, d, a) for n in SIZES for d in DTYPES for a in ALGORITHMS)]
        cases += [(500, 1001, torch.float32, a, "mean", torch.bfloat16) for a in ALGORITHMS]
        cases += [(600, 999, torch.float32, a, "mean", torch.float16) for a in ALGORITHMS]
        outputs = ray.get([m.run_cases.remote(cases) for m in members], timeout=120)
        check_results(outputs, cases, grid.num_workers)
        disband(members)


def test_hung_peer_times_out_with_named_error(pool):
    """One member never calls: the others raise CollectiveTimeoutError within the
    timeout (one deadline for the whole call), naming group, rank and operation."""
    grid = Grid(2, 2)
    members = form(pool, grid, generation=20)
    try:
        reports = ray.get([m.try_allreduce.remote() for m in members[:3]], timeout=60)
    finally:
        disband(members)
    for _rank, report in enumerate(reports):
        assert not report["ok"], report
        assert report["elapsed"] < TIMEOUT_S + 2.0, report
        assert report["rank"] >= 0 and report["op"] in report["message"]
        assert report["group"] in report["message"] and "@g20" in report["group"]
    # The pool is still usable afterwards.
    members = form(pool, grid, generation=21)
    assert all(r["ok"] for r in ray.get([m.try_allreduce.remote() for m in members]))
    disband(members)


def test_killed_peer_gives_timeout_error_not_hang(ray_session):
    """A peer actor killed while the other waits in an all-reduce: the survivor gets
    CollectiveTimeoutError within the timeout (gloo sees the connection drop)."""
    grid = Grid(1, 2)
    survivor, victim = Member.remote(), Member.remote()
    try:
        ray.get([survivor.join.remote(grid, 0, 30), victim.join.remote(grid, 1, 30)],
                timeout=60)
        pending = survivor.try_allreduce.remote(algorithm="flat")
        ray.kill(victim)
        report = ray.get(pending, timeout=TIMEOUT_S + 30)
        assert not report["ok"], report
        assert report["elapsed"] < TIMEOUT_S + 2.0
        assert report["group"] == "world@g30" and report["rank"] == 0
        assert report["op"] == "allreduce"
        ray.get(survivor.leave.remote(), timeout=30)  # leaving a broken grid is safe
    finally:
        ray.kill(survivor)
        ray.kill(victim)


def test_gradient_synchronizer_matches_float64_sum(pool):
    grid = Grid(2, 2)
    members = form(pool, grid, generation=40)
    try:
        results = ray.get([m.sync_module.remote(seed=7) for m in members], timeout=60)
    finally:
        disband(members)
    befores = [before for before, _ in results]
    expected = [sum(grads) for grads in zip(*befores, strict=True)]
    for _, after in results:
        for got, want in zip(after, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(bool(want.abs().sum() > 0) for want in expected)


# fp32, 2 or 3 columns: each worker's shard spans several pipeline chunks (asserted below).
PIPELINED_NUMEL = 4_500_001


def test_pipelined_torus_matches_float64_sum(pool):
    """The torus pipelined over chunks (row reduce-scatter, column all-reduce and row
    all-gather of successive chunks at once) against the float64 sum of every rank's
    input, on grids whose three phases all run; the ranks agree bit for bit."""
    from flashtrain.collective.allreduce import GridComm, pipeline_spans

    for generation, grid in ((50, Grid(2, 2)), (51, Grid(2, 3))):
        probe = GridComm(grid, 0, generation, "gloo", TIMEOUT_S, "row", "col", "world")
        assert len(pipeline_spans(-(-PIPELINED_NUMEL // grid.cols), 4, probe)) >= 2
        members = form(pool, grid, generation)
        cases = [(700, PIPELINED_NUMEL, torch.float32, "torus", "sum", None),
                 (701, PIPELINED_NUMEL, torch.float32, "torus", "mean", torch.bfloat16)]
        outputs = ray.get([m.run_cases.remote(cases) for m in members], timeout=300)
        check_results(outputs, cases, grid.num_workers)
        disband(members)


def test_hung_peer_ends_a_pipelined_torus_with_named_error(pool):
    """A member missing from a pipelined torus: every other rank's call (row thread or
    column thread, whichever waits on it) raises CollectiveTimeoutError within the
    timeout, and the pool forms again afterwards."""
    grid = Grid(2, 2)
    members = form(pool, grid, generation=52)
    try:
        reports = ray.get([m.try_allreduce.remote(PIPELINED_NUMEL) for m in members[:3]],
                          timeout=120)
    finally:
        disband(members)
    for report in reports:
        assert not report["ok"], report
        assert report["elapsed"] < TIMEOUT_S + 3.0, report
        assert "@g52" in report["group"], report
