"""The GPU tier: flashtrain's NCCL backend, AMP and channels-last on real GPUs.

Where CUDA is absent its tests are collected and reported as skipped (not skipped at
import), so a CPU machine still sees what it left out and pytest does not end with "no
tests ran". Tests that need Ray's cupy-based backend skip on their own without cupy.

With one GPU, tests that need several NCCL ranks put them on the same GPU, each actor
with its own ``NCCL_HOSTID`` and NCCL's peer-to-peer and shared-memory transports off, so
NCCL takes them for ranks on different hosts talking over sockets (NCCL refuses two
ranks of one communicator on one device of one host). :func:`members.same_gpu_env` is that
environment. A test of this tier skips for two reasons only: no CUDA device, or Ray
cannot place its ranks (:func:`members.placed`); any other error fails it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_GPU_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.device_count() >= 1:
        return
    reason = ("needs a CUDA GPU: torch.cuda.device_count() is 0 here "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
    for item in items:
        if str(item.path).startswith(str(_GPU_DIR)):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def ray_gpu():
    """A local Ray with this machine's GPUs; actor classes of this folder importable."""
    import ray

    python_path = os.pathsep.join(p for p in (str(_GPU_DIR), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    try:
        yield ray
    finally:
        ray.shutdown()
