"""Shared fixtures for the integration tier: one local Ray instance per test module
(modules that build their own clusters, like test_elastic, start from a clean slate)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Actor classes defined in test modules are pickled by reference to the module
# (``test_collective``, imported by pytest from this folder): workers must find it too.
_TEST_DIR = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance with a few logical CPUs; shut down (all workers gone) at the end."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    python_path = os.pathsep.join(p for p in (_TEST_DIR, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    try:
        yield ray
    finally:
        ray.shutdown()
