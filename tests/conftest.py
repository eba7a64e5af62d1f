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
