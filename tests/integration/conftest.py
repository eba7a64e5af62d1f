"""Shared fixtures for the integration tier: one local Ray instance per pytest process
(each xdist worker), started by the first module that asks for it and kept for the
modules after it. A test that must find no Ray in its process
(tests/unit/test_task_checks.py) shuts it down first; the next module that asks starts
it again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Actor classes defined in test modules are pickled by reference to the module
# (``test_collective``, imported by pytest from this folder): workers must find it too.
_TEST_DIR = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance with a few logical CPUs. It outlives the module (a Ray start
    and stop is 10-13 s of this machine's two cores, paid once per pytest process instead
    of once per module); every module leaves it as it found it: its actors killed, its
    runs' placement groups removed.

    No idle worker is kept (``prestart_worker_first_driver`` off, ``num_workers_soft_limit``
    0): Ray would start one per core at once and keep up to one per logical CPU after a
    task, and each idle worker costs about 0.7 s of CPU a minute for as long as the
    session lasts (measured here). The tests' actors start workers of their own anyway,
    and the few tasks pay a worker start each."""
    import ray

    if not ray.is_initialized():
        python_path = os.pathsep.join(p for p in (_TEST_DIR, os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": python_path}},
                 _system_config={"prestart_worker_first_driver": False, "num_workers_soft_limit": 0})
    yield ray


@pytest.fixture(scope="module")
def ray_address(ray_session) -> str:
    """The shared Ray's GCS address, for a job run as a subprocess to join
    (``--set runtime.ray_address=<it>``), as a job joins the cluster of ``ray start``.

    A job that starts a Ray of its own pays for a GCS, a raylet, the dashboard head, the
    dashboard and runtime-env agents, the log monitor and the autoscaler's monitor: about
    12 s of CPU per job on this machine (measured over ``make test``: 20 Ray instances,
    30 nodes, 300 s of CPU in those processes). Tests of starting a local Ray
    (``test_bounded_waits.py``, the benchmarks) still start their own. The jobs of one
    pytest process run one after another, and Ray removes a job's actors and placement
    groups when its driver exits, however it exits (checked here: a driver SIGKILLed
    while holding an actor and a placement group; both were gone within a second)."""
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_the_end():
    """Whatever Ray this process still has when the session ends: stopped, all workers gone."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
