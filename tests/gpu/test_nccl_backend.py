"""flashtrain's NCCL backend on a real GPU: every op of a one-rank group in fp32, fp16 and
bf16, a buffer on the wrong device refused with the fix, and (several ranks) the torus,
flat and hierarchical all-reduce with a padded bucket and 16-bit wires, a dead peer
failing the survivors and the grid re-forming."""

from __future__ import annotations

import time

import pytest
import torch
from members import GpuMember, gpu_share, same_gpu_env

from flashtrain.topology import Grid


@pytest.fixture
def solo(ray_gpu):
    member = GpuMember.options(num_gpus=gpu_share(1)).remote()
    yield member
    ray_gpu.kill(member)


def ranks(ray, count: int) -> list:
    return [GpuMember.options(num_gpus=gpu_share(count),
                              runtime_env={"env_vars": same_gpu_env(rank)}).remote()
            for rank in range(count)]


@pytest.fixture(scope="module")
def several_ranks(ray_gpu):
    """``None`` when NCCL accepts two ranks here (sharing a GPU if there is only one),
    else why not: the tests that need several ranks skip with it."""
    members = ranks(ray_gpu, 2)
    try:
        ray_gpu.get([m.join_group.remote("probe", 2, r, 30.0) for r, m in enumerate(members)],
                    timeout=180)
        ray_gpu.get([m.one_rank_ops.remote("probe", "fp32") for m in members], timeout=120)
        return None
    except Exception as exc:  # noqa: BLE001 - any refusal is the answer
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    finally:
        for member in members:
            ray_gpu.kill(member)


def need_several(several_ranks) -> None:
    if several_ranks is not None:
        pytest.skip("NCCL did not accept several ranks on this machine's GPU(s) with a "
                    f"distinct NCCL_HOSTID per rank and P2P/SHM off: {several_ranks}")


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_every_op_of_a_one_rank_group(ray_gpu, solo, dtype):
    name = f"solo-{dtype}"
    ray_gpu.get(solo.join_group.remote(name, 1, 0), timeout=120)
    report = ray_gpu.get(solo.one_rank_ops.remote(name, dtype), timeout=120)
    expected = torch.arange(12).to({"fp32": torch.float32, "fp16": torch.float16,
                                    "bf16": torch.bfloat16}[dtype])
    assert report["device"].startswith("cuda")
    for op, result in report["results"].items():
        assert torch.equal(result, expected), op
        assert result.dtype == expected.dtype, op
    assert ray_gpu.get(solo.leave_group.remote(name), timeout=60) < 10


def test_a_cpu_buffer_is_refused_with_the_fix(ray_gpu, solo):
    ray_gpu.get(solo.join_group.remote("solo-cpu", 1, 0), timeout=120)
    message = ray_gpu.get(solo.cpu_tensor_error.remote("solo-cpu"), timeout=60)
    assert "CollectiveError" in message and "gradients' device" in message


def test_ray_nccl_stays_selectable(ray_gpu, solo):
    pytest.importorskip("cupy", reason="collective.gpu_backend=ray_nccl needs the gpu extra")
    assert ray_gpu.get(solo.ray_nccl_allreduce.remote(), timeout=300) == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("comm_dtype", [None, "fp16", "bf16"])
@pytest.mark.parametrize("algorithm", ["torus", "flat", "hierarchical"])
def test_grid_allreduce_with_a_padded_bucket(ray_gpu, several_ranks, algorithm, comm_dtype):
    """1001 values on a 2x2 grid: the torus pads to a multiple of the row; a 16-bit wire
    needs a working buffer; both must live on the GPU (the crash of issue 9)."""
    need_several(several_ranks)
    members = ranks(ray_gpu, 4)
    try:
        ray_gpu.get([m.join_grid.remote(Grid(2, 2), r, 0) for r, m in enumerate(members)],
                    timeout=240)
        reports = ray_gpu.get([m.allreduce.remote(1001, algorithm, comm_dtype) for m in members],
                              timeout=120)
    finally:
        for member in members:
            ray_gpu.kill(member)
    for report in reports:
        assert report["error"] is None, report
        assert torch.equal(report["result"], torch.full((1001,), 10.0))  # 1+2+3+4


def test_a_dead_peer_fails_the_survivor_and_the_grid_reforms(ray_gpu, several_ranks):
    need_several(several_ranks)
    members = ranks(ray_gpu, 3)
    survivor, doomed, newcomer = members
    try:
        ray_gpu.get([m.join_grid.remote(Grid(1, 2), r, 0, 120.0)
                     for r, m in enumerate((survivor, doomed))], timeout=240)
        pending = survivor.allreduce.remote(1 << 20, "torus")  # the peer never calls
        ready, _ = ray_gpu.wait([pending], timeout=2.0)
        assert not ready, "the all-reduce finished without its peer"
        ray_gpu.kill(doomed)
        aborted_at = time.monotonic()
        assert ray_gpu.get(survivor.abort.remote(0, "rank 1 died"), timeout=30) == 3
        report = ray_gpu.get(pending, timeout=60)
        assert time.monotonic() - aborted_at < 10
        assert report["error"] == "CollectiveAbortedError" and "rank 1 died" in report["message"]
        assert ray_gpu.get(survivor.leave_grid.remote(), timeout=60) < 10
        ray_gpu.get([m.join_grid.remote(Grid(1, 2), r, 1)
                     for r, m in enumerate((survivor, newcomer))], timeout=240)
        sums = ray_gpu.get([m.allreduce.remote(4097, "torus") for m in (survivor, newcomer)],
                           timeout=120)
        for result in sums:
            assert result["error"] is None and torch.equal(result["result"],
                                                          torch.full((4097,), 3.0))
    finally:
        for member in members:
            ray_gpu.kill(member)


def test_a_missing_peer_times_out_within_the_deadline(ray_gpu, several_ranks):
    need_several(several_ranks)
    members = ranks(ray_gpu, 2)
    try:
        ray_gpu.get([m.join_grid.remote(Grid(1, 2), r, 0, 3.0) for r, m in enumerate(members)],
                    timeout=240)
        report = ray_gpu.get(members[0].allreduce.remote(1024, "flat"), timeout=60)
        assert report["error"] == "CollectiveTimeoutError" and report["elapsed"] < 15, report
        assert ray_gpu.get(members[0].leave_grid.remote(), timeout=60) < 10
    finally:
        for member in members:
            ray_gpu.kill(member)
