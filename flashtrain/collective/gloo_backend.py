"""A CPU backend for ``ray.util.collective`` in which every group is its own gloo group.

Why: Ray 2.60's built-in gloo backend (``TorchGLOOGroup``) carves every group after an
actor's first one out of that first group's torch *default* process group, so a worker in
its row group and its column group gets wrong sums. Here each group constructs its own
``torch.distributed.ProcessGroupGloo`` over its own ``TCPStore``:

* rank 0 of the group hosts the store on this node and publishes ``host:port`` and a fresh
  nonce in Ray's internal KV under the group name; the other ranks look it up with a
  deadline, connect, and check the nonce (a re-formed group with the same name never
  talks to a stale store; :mod:`flashtrain.collective.rendezvous`);
* every key of the group lives under ``<group>/<nonce>/`` in that store;
* every operation carries a timeout; an expired clock or a broken connection (dead peer)
  is raised as :class:`CollectiveTimeoutError` naming group, rank and operation;
* :meth:`FlashGlooGroup.abort` (called from another thread, e.g. a control method of
  the worker actor) makes the pending operation and every later one raise
  :class:`CollectiveAbortedError` at once. gloo itself cannot interrupt a blocked wait
  (``ProcessGroupGloo.abort()`` does not wake it), so the blocking waits run on a
  waiter thread of the group and the caller waits on an event that either the waiter
  or :meth:`~FlashGlooGroup.abort` sets; an aborted wait is left to end at its own
  (bounded) timeout in the background (:mod:`flashtrain.collective.waiter`).

``register()`` must run in the driver and in every actor process (Ray instantiates the
group class by name in the process that joins).
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
from torch._C import _distributed_c10d as c10d  # AllgatherOptions is not re-exported

from flashtrain.collective.errors import (
    CollectiveAbortedError,
    CollectiveError,
    CollectiveTimeoutError,
)
from flashtrain.collective.rendezvous import Rendezvous, td
from flashtrain.collective.waiter import Waiter

BACKEND_NAME = "FLASHTRAIN_GLOO"
DEFAULT_TIMEOUT_S = 30.0

# Ray constructs a backend as ``cls(world_size, rank, group_name)``: there is no way to
# pass options through. The joiner therefore leaves the timeout here, per group name,
# just before it calls ``init_collective_group`` in the same process.
_timeouts_lock = threading.Lock()
_timeouts_by_group: dict[str, tuple[float, float]] = {}


def set_group_timeout(group_name: str, timeout_s: float,
                      rendezvous_timeout_s: float | None = None) -> None:
    """Timeouts (seconds) for the next group called ``group_name`` in this process.

    ``timeout_s`` bounds each operation; ``rendezvous_timeout_s`` (default: the same)
    bounds forming the group, which waits for the slowest member to arrive.
    """
    for value in (timeout_s, rendezvous_timeout_s):
        if value is not None and value <= 0:
            raise ValueError(f"timeouts must be > 0, got {value}")
    with _timeouts_lock:
        _timeouts_by_group[group_name] = (float(timeout_s),
                                          float(rendezvous_timeout_s or timeout_s))


def _take_group_timeouts(group_name: str) -> tuple[float, float]:
    with _timeouts_lock:
        return _timeouts_by_group.pop(group_name, (DEFAULT_TIMEOUT_S, DEFAULT_TIMEOUT_S))



def register() -> str:
    """Register the backend with ``ray.util.collective`` in this process (idempotent)."""
    import ray.util.collective  # noqa: F401  (registers the built-in backends first)
    from ray.util.collective.backend_registry import (
        _global_registry,
        register_collective_backend,
    )

    if not _global_registry.is_registered(BACKEND_NAME):
        register_collective_backend(BACKEND_NAME, FlashGlooGroup)
    return BACKEND_NAME


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__



class FlashGlooGroup(BaseGroup):
    """One independent gloo process group (see the module docstring)."""

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        self.timeout_s, rendezvous_s = _take_group_timeouts(group_name)
        self._deadline: float | None = None
        self._abort_reason: str | None = None
        self._wakers: set[threading.Event] = set()
        self._wakers_lock = threading.Lock()
        self._rendezvous = Rendezvous(group_name, rank, world_size, rendezvous_s)
        self._store, self._pg = self._connect()
        self._waiter = Waiter(group_name)

    def _connect(self) -> tuple[dist.Store, dist.ProcessGroupGloo]:
        try:
            store, nonce = (self._rendezvous.host() if self.rank == 0
                            else self._rendezvous.join())
            prefixed = dist.PrefixStore(f"{self.group_name}/{nonce}/", store)
            self._rendezvous.wait_for_everyone(prefixed)
            # Forming the mesh waits for every member: the rendezvous timeout applies;
            # operations get the (usually shorter) operation timeout afterwards.
            pg = dist.ProcessGroupGloo(prefixed, self.rank, self.world_size,
                                       td(self._rendezvous.timeout_s))
            pg.set_timeout(td(self.timeout_s))
        except CollectiveError:
            if self.rank == 0:
                self._rendezvous.withdraw()
            raise
        except RuntimeError as exc:
            if self.rank == 0:
                self._rendezvous.withdraw()
            raise CollectiveTimeoutError(
                self.group_name, self.rank, "rendezvous", self._rendezvous.timeout_s,
                _first_line(exc),
            ) from exc
        if self.rank == 0:
            # Every member has connected to rank 0, so none needs the record any more.
            self._rendezvous.withdraw()
        return store, pg

    # ----------------------------------------------------------------- plumbing

    @classmethod
    def backend(cls) -> str:
        return BACKEND_NAME

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available() and dist.is_gloo_available()

    def destroy_group(self) -> None:
        """Drop the process group and the store; safe after a peer died."""
        if self.rank == 0:
            self._rendezvous.withdraw()
        pg, self._pg = self._pg, None
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.abort()
            self._waiter.stop(keep=pg)
            del pg
        self._store = None

    def abort(self, reason: str) -> None:
        """Fail the pending operation and every later one with
        :class:`CollectiveAbortedError` (thread-safe; sticky until the group is gone)."""
        with self._wakers_lock:
            self._abort_reason = reason or "aborted"
            wakers = list(self._wakers)
        for event in wakers:
            event.set()

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

    def _run(self, op: str, start: Callable[[datetime.timedelta], object]) -> None:
        """Start an operation with the remaining time as its timeout and wait for it."""
        self._check_usable(op)
        remaining = self._remaining_s(op)
        work = self._started(op, lambda: start(td(remaining)))
        self._await(op, remaining, lambda: work.wait())

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
                self.group_name, self.rank, op, self.timeout_s, _first_line(exc)
            ) from exc

    def _await(self, op: str, remaining_s: float, wait: Callable[[], None]) -> None:
        """Wait on the waiter thread for ``wait``, for at most ``remaining_s``; an
        :meth:`abort` ends the wait at once."""
        wake = threading.Event()  # set by the waiter when done, or by abort()
        with self._wakers_lock:
            if self._abort_reason is not None:
                raise CollectiveAbortedError(self.group_name, self.rank, op, self._abort_reason)
            self._wakers.add(wake)
        try:
            outcome = self._waiter.submit(wait, wake)
            # gloo's own timeout ends ``wait`` first; the margin only guards against a
            # wait that ignores it.
            wake.wait(remaining_s + 1.0)
        finally:
            with self._wakers_lock:
                self._wakers.discard(wake)
        if not outcome.finished:
            if self._abort_reason is not None:
                raise CollectiveAbortedError(self.group_name, self.rank, op, self._abort_reason)
            raise CollectiveTimeoutError(self.group_name, self.rank, op, self.timeout_s,
                                         "the wait outlived its own timeout")
        if outcome.error is not None:
            if self._abort_reason is not None:
                raise CollectiveAbortedError(self.group_name, self.rank, op,
                                             self._abort_reason) from outcome.error
            if isinstance(outcome.error, RuntimeError):
                raise CollectiveTimeoutError(
                    self.group_name, self.rank, op, self.timeout_s, _first_line(outcome.error)
                ) from outcome.error
            raise outcome.error

    @staticmethod
    def _one(tensors) -> torch.Tensor:
        # ray.util.collective wraps the single tensor argument in a list.
        (tensor,) = tensors
        if not isinstance(tensor, torch.Tensor):
            raise CollectiveError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        return tensor

    # ----------------------------------------------------------- collectives

    def allreduce(self, tensor, allreduce_options=None) -> None:
        t = self._one(tensor)
        opts = dist.AllreduceOptions()
        opts.reduceOp = _reduce_op(allreduce_options)

        def start(timeout):
            opts.timeout = timeout
            return self._pg.allreduce([t], opts)

        self._run("allreduce", start)

    def barrier(self, barrier_options=None) -> None:
        opts = dist.BarrierOptions()

        def start(timeout):
            opts.timeout = timeout
            return self._pg.barrier(opts)

        self._run("barrier", start)

    def reduce(self, tensor, reduce_options=None) -> None:
        t = self._one(tensor)
        opts = dist.ReduceOptions()
        opts.reduceOp = _reduce_op(reduce_options)
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

    def allgather(self, tensor_list, tensor, allgather_options=None) -> None:
        (outputs,) = tensor_list
        t = self._one(tensor)
        _check_equal_chunks("allgather", [t, *outputs])
        opts = c10d.AllgatherOptions()

        def start(timeout):
            opts.timeout = timeout
            return self._pg.allgather([list(outputs)], [t], opts)

        self._run("allgather", start)

    def reducescatter(self, tensor, tensor_list, reducescatter_options=None) -> None:
        out = self._one(tensor)
        (inputs,) = tensor_list
        _check_equal_chunks("reducescatter", [out, *inputs])
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = _reduce_op(reducescatter_options)

        def start(timeout):
            opts.timeout = timeout
            return self._pg.reduce_scatter([out], [list(inputs)], opts)

        self._run("reducescatter", start)

    # ----------------------------------------------------------- point to point

    def send(self, tensor, send_options) -> None:
        self.send_tensor(self._one(tensor), int(send_options.dst_rank))

    def recv(self, tensor, recv_options) -> None:
        self.recv_tensor(self._one(tensor), int(recv_options.src_rank))

    def send_tensor(self, tensor: torch.Tensor, dst: int) -> None:
        """Blocking send of a contiguous tensor to group rank ``dst``."""
        self._p2p("send", lambda: [self._pg.send([tensor], dst, 0)])

    def recv_tensor(self, tensor: torch.Tensor, src: int) -> None:
        """Blocking receive into a contiguous tensor from group rank ``src``."""
        self._p2p("recv", lambda: [self._pg.recv([tensor], src, 0)])

    def exchange(self, send_tensor: torch.Tensor, dst: int,
                 recv_tensor: torch.Tensor, src: int) -> None:
        """Send to ``dst`` and receive from ``src`` at once (one step of a ring).

        gloo only moves a send once the peer posted the matching receive, so a ring
        step must post both before waiting on either.
        """
        self._p2p("sendrecv", lambda: [self._pg.send([send_tensor], dst, 0),
                                       self._pg.recv([recv_tensor], src, 0)])

    def _p2p(self, op: str, start: Callable[[], list]) -> None:
        self._check_usable(op)
        # Point-to-point calls take no options and ignore set_timeout (gloo keeps the
        # timeout the mesh was formed with): bound each wait instead.
        remaining = self._remaining_s(op)
        deadline = time.monotonic() + remaining
        works = self._started(op, start)

        def wait() -> None:
            for work in works:
                work.wait(td(deadline - time.monotonic()))

        self._await(op, remaining, wait)


def _reduce_op(options) -> dist.ReduceOp:
    from ray.util.collective.types import ReduceOp

    mapping = {ReduceOp.SUM: dist.ReduceOp.SUM, ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
               ReduceOp.MIN: dist.ReduceOp.MIN, ReduceOp.MAX: dist.ReduceOp.MAX}
    return mapping[getattr(options, "reduceOp", ReduceOp.SUM)]


def _check_equal_chunks(op: str, tensors: list[torch.Tensor]) -> None:
    sizes = {t.numel() for t in tensors}
    if len(sizes) != 1:
        raise CollectiveError(f"{op} needs equal chunks (pad to a multiple of the group "
                              f"size); got sizes {sorted(sizes)}")
