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

The forming, the deadline and the abort are shared with the NCCL backend
(:mod:`flashtrain.collective.group_base`). ``register()`` must run in the driver and in
every actor process (Ray instantiates the group class by name in the process that joins).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d  # AllgatherOptions is not re-exported

from flashtrain.collective.errors import CollectiveAbortedError, CollectiveTimeoutError
from flashtrain.collective.group_base import (
    DEFAULT_TIMEOUT_S,
    IndependentGroup,
    check_equal_chunks,
    reduce_op,
    register_backend,
    set_group_timeout,
)
from flashtrain.collective.rendezvous import td
from flashtrain.collective.waiter import Waiter

BACKEND_NAME = "FLASHTRAIN_GLOO"

__all__ = ["BACKEND_NAME", "DEFAULT_TIMEOUT_S", "FlashGlooGroup", "register",
           "set_group_timeout"]


def register() -> str:
    """Register the backend with ``ray.util.collective`` in this process (idempotent)."""
    return register_backend(BACKEND_NAME, FlashGlooGroup)


class FlashGlooGroup(IndependentGroup):
    """One independent gloo process group (see the module docstring)."""

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        self._waiter = Waiter(group_name)

    def _new_process_group(self, store, timeout):
        pg = dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)
        pg.set_timeout(td(self.timeout_s))
        return pg

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

    def _wait_work(self, op: str, remaining_s: float, work) -> None:
        self._await(op, remaining_s, lambda: work.wait())

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
            self._raise_failed(op, outcome.error)

    # ----------------------------------------------------------- collectives

    def allgather(self, tensor_list, tensor, allgather_options=None) -> None:
        (outputs,) = tensor_list
        t = self._one(tensor)
        check_equal_chunks("allgather", [t, *outputs])
        opts = c10d.AllgatherOptions()

        def start(timeout):
            opts.timeout = timeout
            return self._pg.allgather([list(outputs)], [t], opts)

        self._run("allgather", start)

    def reducescatter(self, tensor, tensor_list, reducescatter_options=None) -> None:
        out = self._one(tensor)
        (inputs,) = tensor_list
        check_equal_chunks("reducescatter", [out, *inputs])
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = reduce_op(reducescatter_options)

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
