"""A GPU backend for ``ray.util.collective``: every group is its own ``ProcessGroupNCCL``,
with a deadline on every call and an abort that reaches the communicator.

Why not Ray's own NCCL backend (``NCCLGroup``): its calls return once enqueued and ignore
their timeout, nothing aborts its communicators (a dead peer leaves every survivor
spinning in an NCCL kernel and ``destroy`` blocks in ``ncclCommDestroy``), each group
starts a detached unique-id actor that needs a free CPU, and it needs cupy. Here:

* forming is the gloo backend's: rank 0 hosts a ``TCPStore`` published under a nonce in
  Ray's KV, every member counts in (abortable), then torch's ``ProcessGroupNCCL`` is
  built over the group's own prefixed store, bound to this worker's current CUDA device,
  and connected at once (``eager_connect_single_device``) while everyone is known to be
  there, bounded by the rendezvous timeout;
* reduce-scatter and all-gather of equal chunks that are adjacent views of one flat
  buffer (what the torus passes) run as ``reduce_scatter_tensor`` /
  ``all_gather_into_tensor`` on that buffer: no per-chunk copies;
* every call is started asynchronously and its work polled (``Work.is_completed``, a
  CUDA event query) until it completes, the deadline passes or :meth:`abort` is called.
  A passed deadline aborts the communicator (an NCCL operation that did not finish
  cannot be cancelled otherwise) and raises :class:`CollectiveTimeoutError`; an abort
  calls ``ProcessGroupNCCL.abort()`` (``ncclCommAbort``, which ends kernels blocked on a
  dead peer) and fails the pending call with :class:`CollectiveAbortedError`;
* leaving aborts the communicator instead of destroying it gracefully: abort never
  waits for peers, so leaving a grid with a dead member cannot block.

Waiting for completion on the host costs one synchronisation per call; it is the price
of a bound: an enqueue-only call could not notice a dead peer.

torch's watchdog runs beside this: with its default error handling it would *end the
process* on a failed or timed-out operation, turning one dead peer into dead survivors.
:func:`register` therefore sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (abort the
communicator, keep the process) and turns torch's heartbeat monitor off
(``TORCH_NCCL_ENABLE_MONITORING=0``, ``TORCH_NCCL_DUMP_ON_TIMEOUT=0``), unless the user
set them; it must run before the first ``ProcessGroupNCCL`` of the process is built, as
torch reads them in the constructor. The monitor aborts the whole process when the
watchdog's heartbeat stalls (torch/include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp,
``TORCH_NCCL_ENABLE_MONITORING``: "Enable monitoring thread which aborts the process"),
which a blocked ``ncclCommAbort`` of a group with a dead peer can cause minutes later,
whatever the error handling says; this module bounds every wait itself.

torch's watchdog timeout is the *group's* (``ProcessGroupNCCL::Options::timeout``, given
to each work item by ``assignTimeoutToWork(work, options_)`` in the same header): the
``timeout`` field of per-call options is ignored by ``ProcessGroupNCCL``. So the group is
built with :func:`watchdog_timeout_s` (this module's longest deadline plus
:data:`WATCHDOG_MARGIN_S`), and that is also what is handed to each call.

A failed operation is reported by what failed (:func:`failure_kind`): an abort from the
controller, a peer that left (NCCL's ``ncclRemoteError``, "remote process exited or there
was a network error", often seen before the controller's abort arrives), or a timeout.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

from flashtrain.collective.errors import (
    CollectiveAbortedError,
    CollectiveError,
    CollectivePeerLostError,
    CollectiveTimeoutError,
)
from flashtrain.collective.group_base import (
    IndependentGroup,
    check_equal_chunks,
    first_line,
    reduce_op,
    register_backend,
)
from flashtrain.collective.rendezvous import td

BACKEND_NAME = "FLASHTRAIN_NCCL"
# Polling a running collective: start fine (a small bucket finishes in microseconds),
# back off to at most this, so a long one costs little CPU.
POLL_FIRST_S = 20e-6
POLL_MAX_S = 1e-3
# torch's own per-operation timeout is set this far past ours (see the module docstring).
WATCHDOG_MARGIN_S = 30.0
# An abort of a communicator runs on a thread of its own; the caller waits this long.
ABORT_JOIN_S = 5.0
# torch's NCCL settings this backend needs (module docstring); a value the user set wins.
TORCH_NCCL_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",  # CleanUpOnly: abort the communicator, not the process
    "TORCH_NCCL_ENABLE_MONITORING": "0",  # no heartbeat monitor that kills the process
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",  # no flight-recorder dump (it needs the monitor)
}
# How a transport's error text says that a peer is gone. NCCL: ncclRemoteError's text (in
# nvidia/nccl/lib/libnccl.so.2) and ncclSystemError's; gloo (the CPU tests run this
# backend's logic over gloo): the socket errors of its TCP pairs (in torch/lib/libtorch_cpu.so).
PEER_LOST_SIGNS = ("remote process exited", "network error", "unhandled system error",
                   "connection closed by peer", "connection reset by peer", "broken pipe",
                   "read error", "write error")
# How they say an operation ran out of time (torch's watchdog: "Watchdog caught collective
# operation timeout: ... ran for N milliseconds before timing out."; gloo: "Timed out waiting").
TIMEOUT_SIGNS = ("timing out", "timed out", "timeout")


def register() -> str:
    """Register the backend with ``ray.util.collective`` in this process (idempotent).

    Call it before any ``ProcessGroupNCCL`` exists in the process (workers call it as they
    start): torch reads :data:`TORCH_NCCL_ENV` when a process group is constructed."""
    for name, value in TORCH_NCCL_ENV.items():
        os.environ.setdefault(name, value)
    return register_backend(BACKEND_NAME, FlashNcclGroup)


def watchdog_timeout_s(op_timeout_s: float, rendezvous_timeout_s: float) -> float:
    """torch's timeout for every work item of a group: past the longest wait this module
    bounds itself (an operation's deadline, the forming), so its own deadline decides."""
    return max(op_timeout_s, rendezvous_timeout_s) + WATCHDOG_MARGIN_S


def failure_kind(error_text: str, aborted: bool) -> str:
    """Why an operation failed, from its error's text: ``"aborted"`` (the controller
    aborted the group first), ``"peer_lost"``, ``"timeout"`` or ``"failed"``."""
    if aborted:
        return "aborted"
    text = error_text.lower()
    if any(sign in text for sign in PEER_LOST_SIGNS):
        return "peer_lost"
    if any(sign in text for sign in TIMEOUT_SIGNS):
        return "timeout"
    return "failed"


def flat_view(chunks: list[torch.Tensor]) -> torch.Tensor | None:
    """The one flat tensor that ``chunks`` are consecutive equal pieces of, or ``None``.

    ``acc.view(n, -1).unbind(0)`` gives such chunks; the view lets reduce-scatter and
    all-gather run on the buffer itself instead of copying every chunk.
    """
    first = chunks[0]
    numel, step = first.numel(), first.numel() * first.element_size()
    for index, chunk in enumerate(chunks):
        if (chunk.dim() != 1 or not chunk.is_contiguous() or chunk.numel() != numel
                or chunk.dtype != first.dtype or chunk.device != first.device
                or chunk.data_ptr() != first.data_ptr() + index * step):
            return None
    return first.as_strided((numel * len(chunks),), (1,), first.storage_offset())


def _abort_communicator(pg, name: str) -> None:
    """``pg.abort()`` on a thread of its own, waited for at most :data:`ABORT_JOIN_S`:
    ``ncclCommAbort`` is meant to return promptly, but a caller that is leaving a broken
    grid must not depend on it."""
    def abort() -> None:
        with contextlib.suppress(Exception):
            pg.abort()

    thread = threading.Thread(target=abort, name=f"nccl-abort-{name}", daemon=True)
    thread.start()
    thread.join(ABORT_JOIN_S)


class FlashNcclGroup(IndependentGroup):
    """One independent NCCL process group on this worker's GPU (module docstring)."""

    def __init__(self, world_size: int, rank: int, group_name: str):
        self.device = self._bound_device()
        self._comm_lock = threading.Lock()  # one abort of the communicator, not two
        self._comm_aborted = False
        self._watchdog_timeout = None  # set with the process group
        super().__init__(world_size, rank, group_name)

    # ---------------------------------------------------------- transport hooks

    def _bound_device(self) -> torch.device:
        """The CUDA device this group's communicator uses: the worker's current one
        (Ray sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPU, so it is ``cuda:0``)."""
        if not torch.cuda.is_available():
            raise CollectiveError(
                f"{BACKEND_NAME} needs a CUDA device and this process sees none: run the "
                "worker with a GPU (grid.use_gpu=true reserves one per worker) or use the "
                "gloo backend")
        return torch.device("cuda", torch.cuda.current_device())

    def _new_process_group(self, store, timeout):
        options = dist.ProcessGroupNCCL.Options()
        # The only timeout torch's watchdog honours (module docstring).
        self._watchdog_timeout = td(watchdog_timeout_s(self.timeout_s, timeout.total_seconds()))
        options._timeout = self._watchdog_timeout
        pg = dist.ProcessGroupNCCL(store, self.rank, self.world_size, options)
        if self.world_size > 1:
            self._connect_now(pg, timeout.total_seconds())
        return pg

    def _connect_now(self, pg, timeout_s: float) -> None:
        """Create the communicator now, on a thread, bounded by ``timeout_s`` and by an
        abort of the forming: every member has counted in, so this only waits for the
        NCCL bootstrap; a member that dies meanwhile must not hang the joiner."""
        done, failure = threading.Event(), []

        def connect() -> None:
            try:
                pg.eager_connect_single_device(self.device)
            except BaseException as exc:  # noqa: BLE001 - handed to the joining thread
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=connect, name=f"nccl-connect-{self.group_name}",
                         daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not done.wait(0.05):
            try:
                self._rendezvous.check_aborted()
                if time.monotonic() > deadline:
                    raise CollectiveTimeoutError(self.group_name, self.rank, "rendezvous",
                                                 timeout_s, "the NCCL communicator never formed")
            except CollectiveError:
                _abort_communicator(pg, self.group_name)
                raise
        if failure:
            _abort_communicator(pg, self.group_name)
            raise CollectiveTimeoutError(self.group_name, self.rank, "rendezvous", timeout_s,
                                         first_line(failure[0])) from failure[0]

    def _work_timeout(self, remaining_s: float):
        # ProcessGroupNCCL ignores a per-call timeout (module docstring): hand it the
        # group's, which is what its watchdog applies, so the value passed is the truth.
        return self._watchdog_timeout or td(remaining_s)

    def _wait_work(self, op: str, remaining_s: float, work) -> None:
        """Poll ``work`` until it completes, the deadline passes or an abort comes."""
        deadline = time.monotonic() + remaining_s
        wake = threading.Event()  # set by abort(): ends a pause at once
        with self._wakers_lock:
            self._wakers.add(wake)
        pause = POLL_FIRST_S
        try:
            while not self._completed(op, work):
                if self._abort_reason is not None:
                    raise CollectiveAbortedError(self.group_name, self.rank, op,
                                                 self._abort_reason)
                if time.monotonic() >= deadline:
                    self._give_up(f"{op} timed out after {remaining_s:.3g} s")
                    raise CollectiveTimeoutError(self.group_name, self.rank, op,
                                                 self.timeout_s, "aborted the communicator")
                wake.wait(pause)
                pause = min(2 * pause, POLL_MAX_S)
        finally:
            with self._wakers_lock:
                self._wakers.discard(wake)
        try:
            work.wait()  # raises the operation's error; orders the current stream after it
        except Exception as exc:  # noqa: BLE001 - mapped to the typed errors
            self._raise_failed(op, exc)

    def _raise_failed(self, op: str, error: BaseException) -> None:
        """Raise the typed error for a failed ``work.wait()`` (:func:`failure_kind`). A
        peer that left fails this group for good, as a timeout does."""
        kind = failure_kind(str(error), self._abort_reason is not None)
        if kind == "aborted":
            raise CollectiveAbortedError(self.group_name, self.rank, op,
                                         self._abort_reason) from error
        if kind in ("peer_lost", "timeout"):
            self._give_up(f"{op} failed: {first_line(error)}")
        if kind == "peer_lost":
            raise CollectivePeerLostError(self.group_name, self.rank, op,
                                          first_line(error)) from error
        if kind == "timeout":
            raise CollectiveTimeoutError(self.group_name, self.rank, op, self.timeout_s,
                                         first_line(error)) from error
        raise CollectiveError(f"collective {op!r} in group {self.group_name!r} (rank "
                              f"{self.rank}) failed: {first_line(error)}") from error

    def _completed(self, op: str, work) -> bool:
        """Whether ``work`` has finished (a CUDA event query: never blocks)."""
        return work.is_completed()

    def _give_up(self, reason: str) -> None:
        """A timed-out operation leaves the communicator unusable: abort it, and fail
        every later call of this group."""
        with self._wakers_lock:
            if self._abort_reason is None:
                self._abort_reason = reason
        self._interrupt()

    def _interrupt(self) -> None:
        with self._comm_lock:
            pg = self._pg
            if pg is not None and not self._comm_aborted:
                self._comm_aborted = True
                _abort_communicator(pg, self.group_name)

    def _one(self, tensors) -> torch.Tensor:
        tensor = super()._one(tensors)
        self._check_device(tensor)
        return tensor

    def _check_device(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            raise CollectiveError(
                f"group {self.group_name!r} runs on {self.device}, but a tensor is on "
                f"{tensor.device}: allocate collective buffers on the gradients' device")

    def _barrier_options(self) -> dist.BarrierOptions:
        opts = dist.BarrierOptions()
        opts.device_ids = [self.device.index]
        return opts

    # ----------------------------------------------------------------- plumbing

    @classmethod
    def backend(cls) -> str:
        return BACKEND_NAME

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()

    def destroy_group(self) -> None:
        """Abort the communicator (never a graceful destroy, which could wait on a dead
        peer) and drop the store."""
        if self.rank == 0:
            self._rendezvous.withdraw()
        self._interrupt()
        with self._comm_lock:
            holder, self._pg = [self._pg], None
        # The last reference goes on a thread: a process group's destructor may wait for
        # an operation that was abandoned (and is bounded only by its own timeout).
        threading.Thread(target=holder.clear, name=f"nccl-release-{self.group_name}",
                         daemon=True).start()
        self._store = None

    # ----------------------------------------------------------- collectives

    def allgather(self, tensor_list, tensor, allgather_options=None) -> None:
        (outputs,) = tensor_list
        t = self._one(tensor)
        for out in outputs:
            self._check_device(out)
        check_equal_chunks("allgather", [t, *outputs])
        flat = flat_view(list(outputs))
        opts = c10d.AllgatherOptions()

        def start(timeout):
            opts.timeout = timeout
            if flat is not None:
                return self._pg._allgather_base(flat, t, opts)
            return self._pg.allgather([list(outputs)], [t], opts)

        self._run("allgather", start)

    def reducescatter(self, tensor, tensor_list, reducescatter_options=None) -> None:
        out = self._one(tensor)
        (inputs,) = tensor_list
        for piece in inputs:
            self._check_device(piece)
        check_equal_chunks("reducescatter", [out, *inputs])
        flat = flat_view(list(inputs))
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = reduce_op(reducescatter_options)

        def start(timeout):
            opts.timeout = timeout
            if flat is not None:
                return self._pg._reduce_scatter_base(out, flat, opts)
            return self._pg.reduce_scatter([out], [list(inputs)], opts)

        self._run("reducescatter", start)

    # ----------------------------------------------------------- point to point

    def send(self, tensor, send_options) -> None:
        t, dst = self._one(tensor), int(send_options.dst_rank)
        self._run("send", lambda timeout: self._pg.send([t], dst, 0))

    def recv(self, tensor, recv_options) -> None:
        t, src = self._one(tensor), int(recv_options.src_rank)
        self._run("recv", lambda timeout: self._pg.recv([t], src, 0))
