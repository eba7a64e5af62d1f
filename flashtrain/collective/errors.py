"""Typed errors of the collective layer.

A collective that cannot finish (a peer died, hung, or never joined) must never hang
the caller: it becomes a :class:`CollectiveTimeoutError` that names the group, this
worker's rank in it and the operation, so the elastic controller can decide what to do.
"""

from __future__ import annotations


class CollectiveError(RuntimeError):
    """A collective operation failed (bad input, unknown group, broken transport)."""


class CollectiveTimeoutError(CollectiveError):
    """A collective did not complete in time: a peer is dead, hung or absent.

    A peer that died shows up as a broken connection rather than an expired clock; both
    mean "this group cannot finish", so both are reported as this error (the underlying
    transport error is chained as ``__cause__``).
    """

    def __init__(self, group: str, rank: int, op: str, timeout_s: float, detail: str = ""):
        self.group = group
        self.rank = rank
        self.op = op
        self.timeout_s = timeout_s
        self.detail = detail
        message = (
            f"collective {op!r} in group {group!r} (rank {rank}) did not complete "
            f"within {timeout_s:g} s"
        )
        if detail:
            message += f": {detail}"
        super().__init__(message)

    def __reduce__(self):
        # Ray pickles exceptions across processes; keep the structured fields and any
        # attribute set on the way up (the worker tags its step window's step on it).
        return (type(self), (self.group, self.rank, self.op, self.timeout_s, self.detail),
                self.__dict__)


class CollectivePeerLostError(CollectiveError):
    """A member of the group left in the middle of an operation: its transport reported
    the peer gone (a closed connection, NCCL's remote error) before any abort or deadline.
    The group cannot finish; the controller treats it as it treats an abort."""

    def __init__(self, group: str, rank: int, op: str, detail: str = ""):
        self.group = group
        self.rank = rank
        self.op = op
        self.detail = detail
        message = f"collective {op!r} in group {group!r} (rank {rank}) lost a peer"
        if detail:
            message += f": {detail}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.group, self.rank, self.op, self.detail), self.__dict__)


class CollectiveAbortedError(CollectiveError):
    """A collective was aborted from outside: the controller learnt that a member of the
    grid died and told every survivor to give up its pending and future collectives of
    that grid generation at once, instead of waiting for the collective timeout."""

    def __init__(self, group: str, rank: int, op: str, reason: str = ""):
        self.group = group
        self.rank = rank
        self.op = op
        self.reason = reason
        message = f"collective {op!r} in group {group!r} (rank {rank}) was aborted"
        if reason:
            message += f": {reason}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.group, self.rank, self.op, self.reason), self.__dict__)
