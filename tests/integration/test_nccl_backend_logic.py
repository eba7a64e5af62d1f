"""flashtrain's NCCL backend without a GPU: its polling wait, deadline, abort, leaving and
flat reduce-scatter / all-gather, run by real Ray actors over a gloo process group.

:class:`GlooBackedNcclGroup` is a real subclass of
:class:`~flashtrain.collective.nccl_backend.FlashNcclGroup` that only swaps the process
group (gloo for NCCL) and the device (CPU): everything else is the backend's own code.
The real NCCL path runs in tests/gpu."""

from __future__ import annotations

import time

import pytest
import torch

from flashtrain.collective.nccl_backend import FlashNcclGroup, flat_view

ray = pytest.importorskip("ray")

TEST_BACKEND = "TEST_NCCL_ON_GLOO"


class GlooBackedNcclGroup(FlashNcclGroup):
    """FlashNcclGroup over gloo on the CPU (see the module docstring)."""

    def _bound_device(self) -> torch.device:
        return torch.device("cpu")

    def _new_process_group(self, store, timeout):
        import torch.distributed as dist

        return dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)

    def _completed(self, op: str, work) -> bool:
        if op == "reducescatter":
            # gloo's reduce-scatter runs inside wait() and never reports completion
            # before: wait for it (the NCCL one is an ordinary pollable operation).
            work.wait()
            return True
        return work.is_completed()

    def _barrier_options(self):
        import torch.distributed as dist

        return dist.BarrierOptions()

    @classmethod
    def backend(cls) -> str:
        return TEST_BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return True


@ray.remote(num_cpus=0.25, concurrency_groups={"control": 1})
class Member:
    def __init__(self):
        torch.set_num_threads(1)
        from flashtrain.collective.group_base import register_backend

        register_backend(TEST_BACKEND, GlooBackedNcclGroup)

    def join(self, name: str, size: int, rank: int, timeout_s: float) -> bool:
        import ray.util.collective as col

        from flashtrain.collective.group_base import set_group_timeout

        set_group_timeout(name, timeout_s, 60.0)
        col.init_collective_group(size, rank, backend=TEST_BACKEND, group_name=name)
        return True

    def flat_ops(self, name: str, numel_per_rank: int) -> dict:
        """Reduce-scatter then all-gather chunks of one flat buffer, as the torus does."""
        import ray.util.collective as col
        from ray.util.collective.collective import get_group_handle

        group = get_group_handle(name)
        n, rank = group.world_size, group.rank
        buffer = torch.arange(n * numel_per_rank, dtype=torch.float32) * (rank + 1)
        chunks = list(buffer.view(n, -1).unbind(0))
        assert flat_view(chunks) is not None
        out = torch.empty(numel_per_rank)
        col.reducescatter(out, chunks, group_name=name)
        reduced = out.clone()
        chunks[rank].copy_(out)
        col.allgather(chunks, chunks[rank], group_name=name)
        total = torch.tensor([float(rank + 1)])
        col.allreduce(total, group_name=name)
        root = torch.tensor([float(rank + 10)])
        col.broadcast(root, 1, group_name=name)
        col.barrier(group_name=name)
        return {"reduced": reduced, "gathered": buffer, "sum": float(total), "root": float(root)}

    def allreduce(self, name: str) -> dict:
        import ray.util.collective as col

        from flashtrain.collective import CollectiveError

        started = time.monotonic()
        try:
            col.allreduce(torch.ones(5), group_name=name)
        except CollectiveError as exc:
            return {"error": type(exc).__name__, "message": str(exc),
                    "elapsed": time.monotonic() - started}
        return {"error": None, "elapsed": time.monotonic() - started}

    def every_op(self, name: str) -> list[str]:
        """The GPU tier's check of every op (flashtrain.collective.selfcheck), on CPU."""
        import ray.util.collective as col

        from flashtrain.collective import selfcheck

        results = selfcheck.run_every_op(name, torch.device("cpu"), torch.float32)
        return selfcheck.mismatches(results, col.get_collective_group_size(name),
                                    col.get_rank(name), torch.float32)

    @ray.method(concurrency_group="control")
    def abort(self, name: str, reason: str) -> bool:
        from ray.util.collective.collective import get_group_handle

        get_group_handle(name).abort(reason)
        return True

    def leave(self, name: str) -> float:
        import ray.util.collective as col

        started = time.monotonic()
        col.destroy_collective_group(name)
        return time.monotonic() - started


def test_flat_view_finds_the_buffer_behind_adjacent_chunks():
    buffer = torch.arange(12.0)
    chunks = list(buffer.view(3, -1).unbind(0))
    view = flat_view(chunks)
    assert view is not None and view.data_ptr() == buffer.data_ptr()
    assert torch.equal(view, buffer)
    shifted = list(buffer[2:].view(2, -1).unbind(0))  # a view that starts inside storage
    assert torch.equal(flat_view(shifted), buffer[2:])
    assert flat_view([chunks[0], chunks[2]]) is None  # not adjacent
    assert flat_view([buffer[:4], torch.zeros(4)]) is None  # not one storage


@pytest.fixture(scope="module")
def pair(ray_session):
    """Two members for the whole module: each test forms a group of its own name (a
    process start is 6-7 s of CPU here). The test that kills one of them comes last."""
    members = [Member.remote() for _ in range(2)]
    yield members
    for member in members:
        ray.kill(member)


def test_flat_collectives_sum_and_gather(pair):
    name = "nccl-logic-flat"
    ray.get([m.join.remote(name, 2, rank, 30.0) for rank, m in enumerate(pair)], timeout=120)
    results = ray.get([m.flat_ops.remote(name, 3) for m in pair], timeout=60)
    base = torch.arange(6, dtype=torch.float32)
    expected = base * 3  # rank 0 holds base * 1, rank 1 base * 2
    for rank, result in enumerate(results):
        assert torch.equal(result["reduced"], expected[rank * 3:(rank + 1) * 3])
        assert torch.equal(result["gathered"], expected)
        assert result["sum"] == 3.0 and result["root"] == 11.0
    assert max(ray.get([m.leave.remote(name) for m in pair], timeout=30)) < 10


def test_a_missing_peer_times_out_and_the_group_stays_failed(pair):
    name = "nccl-logic-timeout"
    ray.get([m.join.remote(name, 2, rank, 2.0) for rank, m in enumerate(pair)], timeout=120)
    report = ray.get(pair[0].allreduce.remote(name), timeout=60)  # rank 1 never calls
    assert report["error"] == "CollectiveTimeoutError", report
    assert "nccl-logic-timeout" in report["message"] and "allreduce" in report["message"]
    assert report["elapsed"] < 30  # the deadline, not gloo's own (later) timeout
    again = ray.get(pair[0].allreduce.remote(name), timeout=60)
    assert again["error"] == "CollectiveAbortedError" and again["elapsed"] < 1.0
    assert ray.get(pair[0].leave.remote(name), timeout=30) < 10


def test_abort_ends_a_blocked_call_at_once(pair):
    name = "nccl-logic-abort"
    ray.get([m.join.remote(name, 2, rank, 120.0) for rank, m in enumerate(pair)], timeout=120)
    pending = pair[0].allreduce.remote(name)  # rank 1 never calls
    ready, _ = ray.wait([pending], timeout=1.0)
    assert not ready
    aborted_at = time.monotonic()
    ray.get(pair[0].abort.remote(name, "peer 1 died"), timeout=10)
    report = ray.get(pending, timeout=30)
    assert time.monotonic() - aborted_at < 5.0
    assert report["error"] == "CollectiveAbortedError" and "peer 1 died" in report["message"]
    assert ray.get(pair[0].leave.remote(name), timeout=30) < 10


def test_every_op_of_the_gpu_tiers_check_on_two_ranks(pair):
    """The GPU tier's several-rank probe passed one tensor to allgather where
    ray.util.collective needs one per rank, so it always failed and every multi-rank GPU
    test skipped: the same check runs here with two ranks and must find every sum."""
    name = "nccl-logic-every-op"
    ray.get([m.join.remote(name, 2, rank, 30.0) for rank, m in enumerate(pair)], timeout=120)
    assert ray.get([m.every_op.remote(name) for m in pair], timeout=60) == [[], []]
    ray.get([m.leave.remote(name) for m in pair], timeout=30)


def test_a_killed_peer_is_reported_as_lost_not_as_a_timeout(pair):
    """A peer that dies mid-operation breaks the connection before any abort or deadline:
    the survivor says a peer was lost (not that time ran out), at once, and the group
    stays failed."""
    name = "nccl-logic-peer-lost"
    ray.get([m.join.remote(name, 2, rank, 120.0) for rank, m in enumerate(pair)], timeout=120)
    pending = pair[0].allreduce.remote(name)  # rank 1 never calls: it dies
    ready, _ = ray.wait([pending], timeout=1.0)
    assert not ready
    ray.kill(pair[1])
    report = ray.get(pending, timeout=60)
    assert report["error"] == "CollectivePeerLostError", report
    assert report["elapsed"] < 60 and "lost a peer" in report["message"]
    again = ray.get(pair[0].allreduce.remote(name), timeout=30)
    assert again["error"] == "CollectiveAbortedError" and again["elapsed"] < 1.0
