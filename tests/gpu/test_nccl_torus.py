"""Torus / flat / hierarchical all-reduce through Ray's built-in NCCL backend on GPUs.

Skipped without CUDA, and without cupy (Ray's NCCL backend needs it)."""

from __future__ import annotations

import pytest
import ray
import torch

from flashtrain.topology import Grid


@pytest.fixture(scope="module")
def ray_gpu():
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote(num_gpus=0.25, num_cpus=0)
class GpuMember:
    def join(self, grid: Grid, rank: int):
        from flashtrain.collective import join_grid

        self.comm = join_grid(grid, rank, 0, backend="nccl", timeout_s=60.0, prefix="gpu-")
        return True

    def run(self, numel: int, algorithm: str):
        from flashtrain.collective import allreduce_

        x = torch.full((numel,), float(self.comm.rank + 1), device="cuda")
        allreduce_(x, self.comm, algorithm)
        return x.cpu()


@pytest.mark.parametrize("algorithm", ["flat", "torus", "hierarchical"])
def test_nccl_allreduce_on_a_2x2_grid(ray_gpu, algorithm):
    grid = Grid(2, 2)
    members = [GpuMember.remote() for _ in range(grid.num_workers)]
    try:
        ray.get([m.join.remote(grid, r) for r, m in enumerate(members)], timeout=120)
        outs = ray.get([m.run.remote(1001, algorithm) for m in members], timeout=120)
    finally:
        for m in members:
            ray.kill(m)
    for out in outs:
        assert torch.allclose(out, torch.full((1001,), 10.0))
