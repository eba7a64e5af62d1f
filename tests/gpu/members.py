"""Ray actors of the GPU tier (a module of its own so that workers can import it)."""

from __future__ import annotations

import time

import pytest
import ray
import torch


def same_gpu_env(rank: int) -> dict[str, str]:
    """Environment of the ``rank``-th of several NCCL ranks sharing one GPU (see
    conftest.py): a host id of its own, and only the socket transport."""
    return {"NCCL_HOSTID": f"flashtrain-gpu-test-{rank}", "NCCL_P2P_DISABLE": "1",
            "NCCL_SHM_DISABLE": "1", "NCCL_IB_DISABLE": "1", "NCCL_NVLS_ENABLE": "0",
            "NCCL_CUMEM_ENABLE": "0"}


def gpu_share(num_ranks: int) -> float:
    """Ray's GPU fraction per actor when ``num_ranks`` actors share the GPUs here."""
    count = torch.cuda.device_count()
    return min(1.0, count / num_ranks) if count else 0.0


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def placed(actors: list, gpus_each: float, timeout_s: float = 300.0) -> None:
    """Wait until Ray has started every actor of ``actors`` (each asking ``gpus_each``).

    The one reason besides "no GPU" for a test of this tier to skip is that the cluster
    has too few GPUs for its ranks, decided from Ray's resources, not from a clock: an
    actor that fails or is slow to start (a timeout below) or an NCCL error is a failure
    and shows as one."""
    total = ray.cluster_resources().get("GPU", 0.0)
    needed = gpus_each * len(actors)
    if total + 1e-6 < needed:
        pytest.skip(f"cannot place {len(actors)} ranks: they need {needed:g} GPU(s) and "
                    f"the cluster has {total:g}")
    ray.get([actor.__ray_ready__.remote() for actor in actors], timeout=timeout_s)


@ray.remote(num_cpus=0, concurrency_groups={"control": 1})
class GpuMember:
    """One NCCL rank: joins flashtrain groups or grids and runs collectives on its GPU."""

    def __init__(self):
        from flashtrain.collective import nccl_backend

        self.backend = nccl_backend.register()
        self.comm = None

    def join_group(self, name: str, size: int, rank: int, timeout_s: float = 60.0) -> bool:
        import ray.util.collective as col

        from flashtrain.collective.group_base import set_group_timeout

        set_group_timeout(name, timeout_s, 120.0)
        col.init_collective_group(size, rank, backend=self.backend, group_name=name)
        return True

    def leave_group(self, name: str) -> float:
        import ray.util.collective as col

        began = time.monotonic()
        col.destroy_collective_group(name)
        return time.monotonic() - began

    def every_op(self, name: str, dtype: str) -> dict:
        """Every op of the group (flashtrain.collective.selfcheck): the mismatches with
        the closed-form results (empty when all are right) and the group's device."""
        import ray.util.collective as col
        from ray.util.collective.collective import get_group_handle

        from flashtrain.collective import selfcheck

        kind = DTYPES[dtype]
        results = selfcheck.run_every_op(name, torch.device("cuda"), kind)
        wrong = selfcheck.mismatches(results, col.get_collective_group_size(name),
                                     col.get_rank(name), kind)
        return {"mismatches": wrong, "device": str(get_group_handle(name).device)}

    def cpu_tensor_error(self, name: str) -> str:
        import ray.util.collective as col

        try:
            col.allreduce(torch.ones(4), group_name=name)
        except Exception as exc:  # noqa: BLE001 - the message is the result
            return f"{type(exc).__name__}: {exc}"
        return ""

    def ray_nccl_allreduce(self) -> list[float]:
        """Join a one-rank grid through Ray's cupy-based backend and all-reduce on it."""
        import ray.util.collective as col

        from flashtrain.collective import join_grid
        from flashtrain.topology import Grid

        comm = join_grid(Grid(1, 1), 0, 0, backend="ray_nccl", prefix="raynccl-")
        x = torch.arange(4.0, device="cuda")
        col.allreduce(x, group_name=comm.world_group)
        torch.cuda.synchronize()
        return x.cpu().tolist()

    def join_grid(self, grid, rank: int, generation: int, timeout_s: float = 60.0) -> bool:
        from flashtrain.collective import join_grid

        self.comm = join_grid(grid, rank, generation, backend="nccl", timeout_s=timeout_s,
                              rendezvous_timeout_s=120.0, prefix="gpu-")
        return True

    def leave_grid(self) -> float:
        from flashtrain.collective import leave_grid

        began = time.monotonic()
        if self.comm is not None:
            leave_grid(self.comm)
            self.comm = None
        return time.monotonic() - began

    def allreduce(self, numel: int, algorithm: str, comm_dtype: str | None = None,
                  value: float | None = None) -> dict:
        """All-reduce an fp32 buffer on the GPU; errors come back as data."""
        from flashtrain.collective import CollectiveError, allreduce_

        x = torch.full((numel,), float(self.comm.rank + 1 if value is None else value),
                       device="cuda")
        began = time.monotonic()
        try:
            allreduce_(x, self.comm, algorithm,
                       comm_dtype=DTYPES[comm_dtype] if comm_dtype else None)
        except CollectiveError as exc:
            return {"error": type(exc).__name__, "message": str(exc),
                    "elapsed": time.monotonic() - began}
        torch.cuda.synchronize()
        return {"error": None, "result": x.cpu(), "elapsed": time.monotonic() - began}

    @ray.method(concurrency_group="control")
    def abort(self, generation: int, reason: str) -> int:
        from flashtrain.collective import abort_grid

        comm = self.comm
        return abort_grid(comm, reason) if comm is not None and comm.generation == generation else 0
