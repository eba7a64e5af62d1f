"""Collectives for the worker grid: an independent-group gloo backend for
``ray.util.collective``, the flat / 2D-torus / hierarchical all-reduce, and gradient
bucketing. See :mod:`flashtrain.collective.allreduce` for the algorithms."""

from flashtrain.collective.allreduce import (
    ALGORITHMS,
    GridComm,
    abort_forming,
    abort_grid,
    allreduce_,
    join_grid,
    leave_grid,
)
from flashtrain.collective.errors import (
    CollectiveAbortedError,
    CollectiveError,
    CollectivePeerLostError,
    CollectiveTimeoutError,
)
from flashtrain.collective.fusion import GradientSynchronizer
from flashtrain.collective.gloo_backend import BACKEND_NAME, register
from flashtrain.collective.overlap import OverlappedSynchronizer, SyncClock

__all__ = [
    "ALGORITHMS",
    "BACKEND_NAME",
    "CollectiveAbortedError",
    "CollectiveError",
    "CollectivePeerLostError",
    "CollectiveTimeoutError",
    "GradientSynchronizer",
    "GridComm",
    "OverlappedSynchronizer",
    "SyncClock",
    "abort_forming",
    "abort_grid",
    "allreduce_",
    "join_grid",
    "leave_grid",
    "register",
]
