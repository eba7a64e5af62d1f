"""Gradient all-reduce overlapped with the backward pass.

Backward produces gradients from the last layer to the first. The buckets of
:class:`~flashtrain.collective.fusion.GradientSynchronizer` are planned in that order
(reverse parameter order, as DDP does), so the first bucket is complete while most of the
backward is still ahead. :class:`OverlappedSynchronizer` counts each bucket's gradients
with ``register_post_accumulate_grad_hook`` and hands a complete bucket to a
communication thread (gloo calls block, so they cannot run on the training thread),
which packs, all-reduces and unpacks it while autograd computes the earlier layers.
After the backward, :meth:`~OverlappedSynchronizer.sync` launches the buckets no hook
made ready (parameters without a gradient this step, e.g. an empty share on a tail step)
and waits only for what is still in flight: the *exposed* communication.

Every rank launches the buckets strictly in bucket order (the thread waits for bucket
``k`` before it looks at ``k+1``), whatever order the hooks fire in, so the collectives
of every group are issued in the same sequence on every rank. Packing, the all-reduce
and unpacking are those of the plain synchronizer on the same buckets: in fp32 the
update is bit-identical to the non-overlapped path.

Failures: an error on the communication thread (a timeout, or the out-of-band abort of
:func:`~flashtrain.collective.allreduce.abort_grid`) is raised from the next gradient
hook, which ends the backward at once, or from :meth:`sync`. :meth:`close` aborts a
collective still in flight, so the thread never outlives the grid by more than a wait.

On CUDA the thread works on a side stream that first waits for an event recorded on the
backward's stream when the bucket's last gradient was accumulated; :meth:`sync` makes
the caller's stream wait for the event recorded after the last bucket, so the optimizer
never reads a gradient before the collective wrote it. (Not yet run on a GPU.)
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import torch

from flashtrain.collective.allreduce import PIPELINE_MAX_CHUNKS, GridComm, abort_grid
from flashtrain.collective.errors import CollectiveTimeoutError
from flashtrain.collective.fusion import GradientSynchronizer


class OverlappedSynchronizer(GradientSynchronizer):
    """A :class:`GradientSynchronizer` whose buckets start during the backward.

    Use: ``begin(op)`` before the backward, ``sync(op)`` after it (``sync`` alone also
    works: every bucket then starts after the backward). ``close()`` when leaving the grid.
    """

    def __init__(self, params: list[torch.nn.Parameter], comm: GridComm,
                 algorithm: str = "torus", bucket_bytes: int = 25 * 2**20,
                 comm_dtype: torch.dtype | None = None,
                 pipeline_chunks: int = PIPELINE_MAX_CHUNKS):
        params = list(params)
        super().__init__(params, comm, algorithm, bucket_bytes, comm_dtype, pipeline_chunks)
        self._bucket_of = {id(p): index for index, bucket in enumerate(self.buckets)
                           for p in bucket.params}
        self._changed = threading.Condition()
        self._op = "sum"
        self._armed = False
        self._running = False  # the thread is working through a step's buckets
        self._step_open = False  # between begin() and the end of sync() or cancel()
        self._cancelled = False
        self._closed = False
        self._error: BaseException | None = None
        self._unready = [0] * len(self.buckets)
        self._ready = [False] * len(self.buckets)
        self._reduced = 0
        device = params[0].device if params else torch.device("cpu")
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._ready_events: list = [None] * len(self.buckets)
        self._done_event = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._hooks = []
        if self.identity:  # one worker: nothing to overlap, so no thread and no hooks
            return
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"grad-allreduce-{comm.world_group}")
        self._thread.start()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for p in params]

    # ------------------------------------------------------------- training thread

    def begin(self, op: str = "sum") -> None:
        """Arm the hooks for the backward that follows (every bucket waits for its
        gradients, then all-reduces with ``op``)."""
        if self.identity:
            return
        with self._changed:
            # The previous step is over unless it failed; a failed step's thread may still
            # sit in a collective bounded by the timeout.
            if not self._changed.wait_for(lambda: not self._running,
                                          timeout=self.comm.timeout_s + 1.0):
                raise CollectiveTimeoutError(self.comm.world_group, self.comm.rank,
                                             "gradient all-reduce (previous step)",
                                             self.comm.timeout_s)
            self._raise_if_failed()
            self._op = op
            self._unready = [len(bucket.params) for bucket in self.buckets]
            self._ready = [False] * len(self.buckets)
            self._ready_events = [None] * len(self.buckets)
            self._done_event = None
            self._reduced = 0
            self.comm_seconds = 0.0
            self._cancelled = False
            self._running = True
            self._step_open = True
            self._armed = True
        self._jobs.put("step")

    def sync(self, op: str = "sum") -> None:
        """Launch the buckets no hook made ready, then wait for every bucket."""
        if self.identity:
            super().sync(op)
            return
        # Not ``_running``: the thread may already have finished every bucket (all made
        # ready by hooks) before this call, and must not reduce them a second time.
        if not self._step_open:
            self.begin(op)
        with self._changed:
            self._armed = False
            self._step_open = False
            for index, ready in enumerate(self._ready):
                if not ready:
                    self._mark_ready(index)
            self._wait_for_buckets()
        if self._done_event is not None:
            torch.cuda.current_stream().wait_event(self._done_event)

    def cancel(self) -> None:
        """The backward failed: stop waiting for buckets that will never be ready."""
        with self._changed:
            self._armed = False
            self._step_open = False
            self._cancelled = True
            self._changed.notify_all()

    def close(self) -> None:
        """Remove the hooks and end the thread; a collective still in flight is aborted
        (the worker is leaving the grid)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        with self._changed:
            busy = self._running
            self._closed = True
        self.cancel()
        if busy:
            abort_grid(self.comm, "the worker left the grid")
        if not self.identity:
            self._jobs.put(None)

    @property
    def in_flight(self) -> bool:
        """Whether a step's buckets are being reduced (from :meth:`begin` until done)."""
        return self._running

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        with self._changed:
            self._raise_if_failed()  # ends the backward at once
            index = self._bucket_of[id(param)]
            self._unready[index] -= 1
            if self._unready[index] == 0:
                self._mark_ready(index)

    def _mark_ready(self, index: int) -> None:
        """(Holding the lock.) Bucket ``index`` has all its gradients."""
        if self._cuda:
            event = torch.cuda.Event()
            event.record()  # on the backward's stream: the gradients are written after it
            self._ready_events[index] = event
        self._ready[index] = True
        self._changed.notify_all()

    def _wait_for_buckets(self) -> None:
        """(Holding the lock.) Every bucket is bounded by the collective timeout, so no
        progress for longer than that means the thread is stuck."""
        while self._reduced < len(self.buckets) and self._error is None:
            before = self._reduced
            self._changed.wait_for(lambda before=before: self._reduced > before
                                   or self._error is not None,
                                   timeout=self.comm.timeout_s + 1.0)
            if self._reduced == before and self._error is None:
                raise CollectiveTimeoutError(self.comm.world_group, self.comm.rank,
                                             f"gradient all-reduce (bucket {before})",
                                             self.comm.timeout_s)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # ---------------------------------------------------------- communication thread

    def _serve(self) -> None:
        while self._jobs.get() is not None:
            if not self._reduce_step():  # failed, cancelled or no buckets: ends here
                with self._changed:
                    self._running = False
                    self._changed.notify_all()

    def _reduce_step(self) -> bool:
        """Reduce a step's buckets in order; whether the last one was reduced, which
        also ended the step (in the same hand-off that wakes :meth:`sync`, so the next
        :meth:`begin` never waits for this thread to be scheduled again)."""
        last = len(self.buckets) - 1
        with contextlib.ExitStack() as stack:
            if self._cuda:
                stack.enter_context(torch.cuda.stream(self._stream))
            for index, bucket in enumerate(self.buckets):
                with self._changed:
                    self._changed.wait_for(lambda index=index: self._ready[index] or self._cancelled)
                    if self._cancelled:
                        return False
                    ready_event = self._ready_events[index]
                began = time.perf_counter()
                try:
                    if ready_event is not None:
                        self._stream.wait_event(ready_event)
                    self._reduce_bucket(bucket, self._op)
                except BaseException as exc:  # noqa: BLE001 - raised on the training thread
                    with self._changed:
                        self._error = exc
                        self._changed.notify_all()
                    return False
                if self._cuda and index == last:
                    self._done_event = torch.cuda.Event()
                    self._done_event.record(self._stream)
                with self._changed:
                    self.comm_seconds += time.perf_counter() - began
                    self._reduced += 1
                    self._running = index < last
                    self._changed.notify_all()
        return last >= 0


class SyncClock:
    """Seconds the training thread's stream spent in a block (the exposed sync).

    On CPU the wall clock. On CUDA the work is asynchronous, so the wall clock would time
    only the enqueue: two CUDA events on the current stream time the block on the device
    instead, read (after a wait for the end event) only when :attr:`seconds` is asked.
    """

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._start = self._end = None
        self._began = self._ended = 0.0

    def __enter__(self) -> SyncClock:
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self._ended = time.perf_counter()
        if self._cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()

    @property
    def seconds(self) -> float:
        if self._cuda and self._end is not None:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1000.0
        return self._ended - self._began
