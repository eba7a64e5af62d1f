"""``members.placed``, the GPU tier's one skip besides "no GPU", on real Ray here: ranks
the cluster has too few GPUs for skip with that reason; placed ranks pass through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

GPU_TIER = Path(__file__).resolve().parents[1] / "gpu"


def test_placed_skips_only_ranks_ray_cannot_place(ray_session):
    ray = ray_session
    sys.path.insert(0, str(GPU_TIER))
    try:
        from members import placed
    finally:
        sys.path.remove(str(GPU_TIER))

    @ray.remote(num_cpus=0)
    class Rank:
        pass

    ready = [Rank.remote()]
    placed(ready, 0.0, timeout_s=60.0)
    waiting = [Rank.options(num_gpus=0.5).remote() for _ in range(2)]  # no GPU here
    with pytest.raises(pytest.skip.Exception, match="cannot place 2 ranks: they need 1 GPU"):
        placed(waiting, 0.5)
    for actor in ready + waiting:
        ray.kill(actor)
