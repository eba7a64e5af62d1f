"""Shared by every tier.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadfile``: a
file's tests stay on one worker, so a module's Ray or cluster is its own). Each worker
gets a Ray temp folder of its own (``RAY_TMPDIR``), inherited by everything it starts:
the session folders, sockets and the ``ray_current_cluster`` file that ``ray start``
writes and a job without an address reads. Without it a job of one worker could find
the other worker's ``ray start --head`` and join it. Ports are already the OS's choice
(``ray.init``, ``Cluster``, and the tests that run ``ray start`` ask for free ports).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    base = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    ray_tmpdir = base / f"flashtrain-tests-{worker}"
    ray_tmpdir.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(ray_tmpdir)


# The files that take longest, longest first (from `make test`'s list of the slowest
# tests): with `--dist loadfile --no-loadscope-reorder` xdist hands files out in the
# order collected, so the two workers start on the long ones and end together, instead
# of one worker running a long file alone at the end (xdist's own order, by test count,
# puts the one-test end-to-end files last). A file not named here keeps its place after
# them; the order changes only how long the suite takes, never what it runs.
LONGEST_FIRST = [
    "test_chaos.py", "test_bench_elastic.py", "test_bench_tools.py", "test_external_kills.py",
    "test_training.py", "test_overlap.py", "test_batch_launch.py", "test_elastic.py",
    "test_resume_cli.py", "test_collective.py", "test_bounded_waits.py", "test_job_submit.py",
    "test_report_browser.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
