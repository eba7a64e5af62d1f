"""Errors that stop a job before anything starts, each with one message for the user.

Here, with no torch import, so that the job's command line can catch them (with the
config's and the preflight checks' own errors) before it imports torch: a mistyped
``--set`` answers at once. Raised by :mod:`flashtrain.task_checks` and
:mod:`flashtrain.train.checkpoint`, which export them too.
"""

from __future__ import annotations


class TaskError(ValueError):
    """A task that cannot be trained; the message says what is wrong and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or not a flashtrain payload."""
