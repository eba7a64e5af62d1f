"""What flashtrain's two ``ray.util.collective`` backends share: one independent
``torch.distributed`` process group per collective group, formed through the
nonce-checked rendezvous of :mod:`flashtrain.collective.rendezvous`, with a deadline on
every operation and an out-of-band :meth:`IndependentGroup.abort`.

The transports differ only in how a started operation is waited for and how an abort
reaches it: gloo cannot interrupt a blocked wait, so
:class:`~flashtrain.collective.gloo_backend.FlashGlooGroup` waits on a waiter thread;
NCCL work is polled and the communicator itself is aborted
(:class:`~flashtrain.collective.nccl_backend.FlashNcclGroup`). Each subclass builds its
process group (:meth:`IndependentGroup._new_process_group`) and waits for a started
operation (:meth:`IndependentGroup._wait_work`); the rest lives here.

Ray constructs a backend as ``cls(world_size, rank, group_name)`` with no options, so
the joiner leaves the timeouts here, per group name, just before it calls
``init_collective_group`` in the same process (:func:`set_group_timeout`).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from ray.util.collective.collective_group.base_collective_group import BaseGroup

from flashtrain.collective.errors import (
    CollectiveAbortedError,
    CollectiveError,
    CollectiveTimeoutError,
)
from flashtrain.collective.rendezvous import Rendezvous, td

DEFAULT_TIMEOUT_S = 30.0

_timeouts_lock = threading.Lock()
_timeouts_by_group: dict[str, tuple[float, float]] = {}


def set_group_timeout(group_name: str, timeout_s: float,
                      rendezvous_timeout_s: float | None = None) -> None:
    """Timeouts (seconds) for the next group called ``group_name`` in this process.

    ``timeout_s`` bounds each operation; ``rendezvous_timeout_s`` (default: the same)
    bounds forming the group, which waits for the slowest member.
    """
    for value in (timeout_s, rendezvous_timeout_s):
        if value is not None and value <= 0:
            raise ValueError(f"timeouts must be > 0, got {value}")
    with _timeouts_lock:
        _timeouts_by_group[group_name] = (float(timeout_s),
                                          float(rendezvous_timeout_s or timeout_s))


def take_group_timeouts(group_name: str) -> tuple[float, float]:
    """The timeouts left for ``group_name`` (forgotten once taken), or the defaults."""
    with _timeouts_lock:
        return _timeouts_by_group.pop(group_name, (DEFAULT_TIMEOUT_S, DEFAULT_TIMEOUT_S))


def register_backend(name: str, group_cls: type[BaseGroup]) -> str:
    """Register ``group_cls`` as ``name`` with ``ray.util.collective`` (idempotent)."""
    import ray.util.collective  # noqa: F401  (registers the built-in backends first)
    from ray.util.collective.backend_registry import (
        _global_registry,
        register_collective_backend,
    )

    if not _global_registry.is_registered(name):
        register_collective_backend(name, group_cls)
    return name


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def reduce_op(options) -> dist.ReduceOp:
    """torch's reduce op for the ``reduceOp`` of Ray's options (default: sum)."""
    from ray.util.collective.types import ReduceOp

    mapping = {ReduceOp.SUM: dist.ReduceOp.SUM, ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
               ReduceOp.MIN: dist.ReduceOp.MIN, ReduceOp.MAX: dist.ReduceOp.MAX}
    return mapping[getattr(options, "reduceOp", ReduceOp.SUM)]


def check_equal_chunks(op: str, tensors: list[torch.Tensor]) -> None:
    sizes = {t.numel() for t in tensors}
    if len(sizes) != 1:
        raise CollectiveError(f"{op} needs equal chunks (pad to a multiple of the group "
                              f"size); got sizes {sorted(sizes)}")


class IndependentGroup(BaseGroup):
    """One collective group with a process group of its own (see the module docstring)."""

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        self.timeout_s, rendezvous_s = take_group_timeouts(group_name)
        self._deadline: float | None = None
        self._abort_reason: str | None = None
        self._wakers: set[threading.Event] = set()
        self._wakers_lock = threading.Lock()
        self._rendezvous = Rendezvous(group_name, rank, world_size, rendezvous_s)
        self._store, self._pg = self._connect()

    # ---------------------------------------------------------- to be provided

    def _new_process_group(self, store: dist.Store, timeout: datetime.timedelta):
        """The transport's process group over ``store``, formed within ``timeout``."""
        raise NotImplementedError

    def _wait_work(self, op: str, remaining_s: float, work) -> None:
        """Wait for a started operation for at most ``remaining_s``; an :meth:`abort`
        must end the wait at once."""
        raise NotImplementedError

    def _interrupt(self) -> None:
        """What an abort does to the transport beyond waking the caller (default: none)."""

    # ---------------------------------------------------------------- forming

    def _connect(self):
        try:
            store, nonce = (self._rendezvous.host() if self.rank == 0
                            else self._rendezvous.join())
            prefixed = dist.PrefixStore(f"{self.group_name}/{nonce}/", store)
            self._rendezvous.wait_for_everyone(prefixed)
            # Forming waits for every member: the rendezvous timeout applies; operations
            # get the (usually shorter) operation timeout afterwards.
            pg = self._new_process_group(prefixed, td(self._rendezvous.timeout_s))
        except CollectiveError:
            if self.rank == 0:
                self._rendezvous.withdraw()
            raise
        except RuntimeError as exc:
            if self.rank == 0:
                self._rendezvous.withdraw()
            raise CollectiveTimeoutError(
                self.group_name, self.rank, "rendezvous", self._rendezvous.timeout_s,
                first_line(exc),
            ) from exc
        if self.rank == 0:
            # Every member has connected to rank 0, so none needs the record any more.
            self._rendezvous.withdraw()
        return store, pg

    # ------------------------------------------------------------ abort, time

    def abort(self, reason: str) -> None:
        """Fail the pending operation and every later one with
        :class:`CollectiveAbortedError` (thread-safe; sticky until the group is gone)."""
        with self._wakers_lock:
            first = self._abort_reason is None
            self._abort_reason = reason or "aborted"
            wakers = list(self._wakers)
        for event in wakers:
            event.set()
        if first:
            self._interrupt()

    @property
    def aborted(self) -> bool:
        return self._abort_reason is not None

    @contextlib.contextmanager
    def deadline(self, seconds: float | None = None) -> Iterator[None]:
        """Bound all operations inside the block by one deadline (default: the timeout).

        A multi-step algorithm then fails within ``seconds`` in total, not per step.
        """
        previous = self._deadline
        self._deadline = time.monotonic() + (self.timeout_s if seconds is None else seconds)
        try:
            yield
        finally:
            self._deadline = previous

    def _remaining_s(self, op: str) -> float:
        if self._deadline is None:
            return self.timeout_s
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise CollectiveTimeoutError(self.group_name, self.rank, op, self.timeout_s,
                                         "deadline passed before the operation started")
        return remaining

    def _check_usable(self, op: str) -> None:
        if self._abort_reason is not None:
            raise CollectiveAbortedError(self.group_name, self.rank, op, self._abort_reason)
        if self._pg is None:
            raise CollectiveError(f"group {self.group_name!r} was destroyed; cannot run {op}")

    def _started(self, op: str, start: Callable[[], object]):
        try:
            return start()
        except RuntimeError as exc:
            raise CollectiveTimeoutError(
                self.group_name, self.rank, op, self.timeout_s, first_line(exc)
            ) from exc

    def _work_timeout(self, remaining_s: float) -> datetime.timedelta:
        """The timeout handed to the transport with an operation (its own clock)."""
        return td(remaining_s)

    def _run(self, op: str, start: Callable[[datetime.timedelta], object]) -> None:
        """Start an operation with the remaining time as its timeout and wait for it."""
        self._check_usable(op)
        remaining = self._remaining_s(op)
        work = self._started(op, lambda: start(self._work_timeout(remaining)))
        self._wait_work(op, remaining, work)

    def _raise_failed(self, op: str, error: BaseException) -> None:
        """Raise the typed error for an operation that ended with ``error``."""
        if self._abort_reason is not None:
            raise CollectiveAbortedError(self.group_name, self.rank, op,
                                         self._abort_reason) from error
        if isinstance(error, RuntimeError):
            raise CollectiveTimeoutError(
                self.group_name, self.rank, op, self.timeout_s, first_line(error)
            ) from error
        raise error

    def _one(self, tensors) -> torch.Tensor:
        # ray.util.collective wraps the single tensor argument in a list.
        (tensor,) = tensors
        if not isinstance(tensor, torch.Tensor):
            raise CollectiveError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        return tensor

    def _barrier_options(self) -> dist.BarrierOptions:
        return dist.BarrierOptions()

    # ----------------------------------------------------------- collectives

    def allreduce(self, tensor, allreduce_options=None) -> None:
        t = self._one(tensor)
        opts = dist.AllreduceOptions()
        opts.reduceOp = reduce_op(allreduce_options)

        def start(timeout):
            opts.timeout = timeout
            return self._pg.allreduce([t], opts)

        self._run("allreduce", start)

    def barrier(self, barrier_options=None) -> None:
        opts = self._barrier_options()

        def start(timeout):
            opts.timeout = timeout
            return self._pg.barrier(opts)

        self._run("barrier", start)

    def reduce(self, tensor, reduce_options=None) -> None:
        t = self._one(tensor)
        opts = dist.ReduceOptions()
        opts.reduceOp = reduce_op(reduce_options)
        opts.rootRank = int(getattr(reduce_options, "root_rank", 0))

        def start(timeout):
            opts.timeout = timeout
            return self._pg.reduce([t], opts)

        self._run("reduce", start)

    def broadcast(self, tensor, broadcast_options=None) -> None:
        t = self._one(tensor)
        opts = dist.BroadcastOptions()
        opts.rootRank = int(getattr(broadcast_options, "root_rank", 0))

        def start(timeout):
            opts.timeout = timeout
            return self._pg.broadcast([t], opts)

        self._run("broadcast", start)
