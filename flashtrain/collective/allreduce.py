"""All-reduce algorithms over a worker grid: flat ring, 2D torus, hierarchical.

A worker joins three groups of its grid generation (:func:`join_grid`): its row
(``cols`` members, the reduce-scatter / all-gather axis), its column (``rows`` members)
and the world group (the flat baseline). :func:`allreduce_` then reduces a flat tensor
in place with one of :data:`ALGORITHMS`:

* ``flat``: one all-reduce over the world group (gloo's ring for large buffers);
* ``torus`` (Mikami et al.): reduce-scatter along the row, all-reduce the owned 1/cols
  shard along the column, all-gather along the row. On gloo, a large buffer is
  pipelined over chunks of the shard: the column all-reduce of chunk k runs on a thread
  of its own while the row reduce-scatters chunk k+1 and all-gathers chunk k-1
  (:func:`pipeline_spans`);
* ``hierarchical``: reduce to the row leader (column 0), all-reduce among the leaders
  (the column-0 group), broadcast within the row.

Wire precision: values travel as ``comm_dtype`` (default: the tensor's dtype). On the
gloo backend reduce-scatter and all-gather are the point-to-point rings of
:mod:`flashtrain.collective.ring` (faster than gloo's own), and every sum over a 16-bit
wire accumulates in fp32 there; fp32 all-reduce and reduce use gloo's own. NCCL uses
its own collectives throughout (16-bit wire sums in 16 bits there).

Every buffer allocated here lives on the input tensor's device (NCCL refuses CPU ones).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from flashtrain.collective import gloo_backend, group_base, nccl_backend, rendezvous, ring
from flashtrain.collective.errors import CollectiveError, CollectiveTimeoutError
from flashtrain.topology import Grid, col_group_name, row_group_name, world_group_name

ALGORITHMS = ("flat", "torus", "hierarchical")
OPS = ("sum", "mean")
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = (torch.float32, *_SIXTEEN_BIT)


@dataclass(frozen=True)
class GridComm:
    """This worker's place in a grid generation and the names of its three groups."""

    grid: Grid
    rank: int
    generation: int
    backend: str
    timeout_s: float
    row_group: str
    col_group: str
    world_group: str

    @property
    def row(self) -> int:
        return self.grid.coords(self.rank)[0]

    @property
    def col(self) -> int:
        return self.grid.coords(self.rank)[1]

    @property
    def group_names(self) -> tuple[str, str, str]:
        return (self.row_group, self.col_group, self.world_group)


def _ray_backend_name(backend: str) -> str:
    """``gloo`` and ``nccl`` are flashtrain's own backends (independent, bounded,
    abortable groups); ``ray_nccl`` is Ray's cupy-based NCCL backend (no deadline, no
    abort). A GPU backend this process cannot run fails here with the fix."""
    if backend == "gloo":
        return gloo_backend.register()
    if backend in ("nccl", "ray_nccl"):
        from flashtrain.preflight import check_gpu_collectives

        check_gpu_collectives("flashtrain" if backend == "nccl" else "ray_nccl")
        return nccl_backend.register() if backend == "nccl" else "nccl"
    raise ValueError(f"backend {backend!r} is not supported: use 'gloo' (CPU), 'nccl' (GPU) "
                     "or 'ray_nccl' (GPU, Ray's cupy-based backend)")


def join_grid(grid: Grid, rank: int, generation: int, *, backend: str = "gloo",
              timeout_s: float = 30.0, prefix: str = "",
              rendezvous_timeout_s: float | None = None) -> GridComm:
    """Join this worker's row, column and world groups (all members call it at once).

    ``timeout_s`` bounds every later collective call; ``rendezvous_timeout_s`` (default:
    ``timeout_s``) bounds forming each group, which waits for the slowest member.

    Every member joins in the same order (row, column, world); rows are disjoint and so
    are columns, so the blocking rendezvous of one group never waits on another.
    """
    import ray.util.collective as col

    ray_backend = _ray_backend_name(backend)
    row, column = grid.coords(rank)
    comm = GridComm(grid, rank, generation, backend, float(timeout_s),
                    row_group_name(row, generation, prefix),
                    col_group_name(column, generation, prefix),
                    world_group_name(generation, prefix))
    memberships = [(comm.row_group, grid.cols, column), (comm.col_group, grid.rows, row),
                   (comm.world_group, grid.num_workers, rank)]
    for name, size, group_rank in memberships:
        if backend in ("gloo", "nccl"):
            gloo_backend.set_group_timeout(name, timeout_s, rendezvous_timeout_s)
        col.init_collective_group(size, group_rank, backend=ray_backend, group_name=name)
    return comm


def leave_grid(comm: GridComm) -> None:
    """Destroy this worker's groups of ``comm`` (safe after a peer died, and twice)."""
    import ray.util.collective as col

    for name in comm.group_names:
        if col.is_group_initialized(name):
            with contextlib.suppress(Exception):  # a broken group still gets dropped
                col.destroy_collective_group(name)


def abort_forming(generation: int, reason: str, prefix: str = "") -> None:
    """Make this process's rendezvous for grid ``generation`` (joins in progress or
    still to come) fail at once with
    :class:`~flashtrain.collective.errors.CollectiveAbortedError`: a member of that grid
    died, so it can never form."""
    rendezvous.abort_forming(world_group_name(generation, prefix).removeprefix(
        f"{prefix}world"), reason)


def abort_grid(comm: GridComm, reason: str) -> int:
    """Make this worker's pending and later collectives of ``comm`` fail at once with
    :class:`~flashtrain.collective.errors.CollectiveAbortedError` (safe from another
    thread while a collective blocks; a no-op for groups already gone). Returns how many
    groups were aborted. flashtrain's gloo and NCCL backends can be aborted; Ray's
    NCCL backend (``ray_nccl``) cannot."""
    import ray.util.collective as col
    from ray.util.collective.collective import get_group_handle

    aborted = 0
    for name in comm.group_names:
        if not col.is_group_initialized(name):
            continue
        with contextlib.suppress(Exception):  # destroyed meanwhile by the worker thread
            handle = get_group_handle(name)
            if isinstance(handle, group_base.IndependentGroup):
                handle.abort(reason)
                aborted += 1
    return aborted


# ----------------------------------------------------------------------- transports


class _NativeTransport:
    """The backend's own collectives through ``ray.util.collective`` (gloo or NCCL)."""

    def __init__(self, comm: GridComm):
        self.comm = comm

    def reduce_scatter(self, group: str, chunks: list[torch.Tensor], index: int) -> None:
        import ray.util.collective as col

        out = torch.empty_like(chunks[index])
        col.reducescatter(out, list(chunks), group_name=group)
        chunks[index].copy_(out)

    def allreduce(self, group: str, acc: torch.Tensor, scale: float) -> None:
        import ray.util.collective as col

        col.allreduce(acc, group_name=group)
        if scale != 1.0:
            acc.mul_(scale)

    def allgather(self, group: str, chunks: list[torch.Tensor], index: int) -> None:
        import ray.util.collective as col

        col.allgather(list(chunks), chunks[index], group_name=group)

    def reduce(self, group: str, acc: torch.Tensor, wire_dtype: torch.dtype) -> None:
        import ray.util.collective as col

        col.reduce(acc, 0, group_name=group)

    def broadcast(self, group: str, tensor: torch.Tensor) -> None:
        import ray.util.collective as col

        col.broadcast(tensor, 0, group_name=group)


class _RingTransport(_NativeTransport):
    """Point-to-point rings on the flashtrain gloo groups: 16-bit wire, fp32 sums."""

    def __init__(self, comm: GridComm, wire_dtype: torch.dtype):
        super().__init__(comm)
        self.wire_dtype = wire_dtype

    @staticmethod
    def _handle(group: str):
        from ray.util.collective.collective import get_group_handle

        return get_group_handle(group)

    def reduce_scatter(self, group: str, chunks: list[torch.Tensor], index: int) -> None:
        ring.ring_reduce_scatter(self._handle(group), chunks, self.wire_dtype)

    def allreduce(self, group: str, acc: torch.Tensor, scale: float) -> None:
        if acc.dtype == self.wire_dtype:  # nothing to accumulate wider: gloo's ring is fine
            super().allreduce(group, acc, scale)
        else:
            ring.ring_allreduce(self._handle(group), acc, self.wire_dtype, scale)

    def allgather(self, group: str, chunks: list[torch.Tensor], index: int) -> None:
        ring.ring_allgather(self._handle(group), chunks)

    def reduce(self, group: str, acc: torch.Tensor, wire_dtype: torch.dtype) -> None:
        if acc.dtype == wire_dtype:
            super().reduce(group, acc, wire_dtype)
        else:
            ring.gather_reduce(self._handle(group), acc, wire_dtype)


# ----------------------------------------------------------------------- algorithms


# A chunk's shard must stay large enough that each of its messages runs near link
# bandwidth; 8 chunks already hide all but 1/8 of the shorter phase.
PIPELINE_MIN_CHUNK_BYTES = 2 * 2**20
PIPELINE_MAX_CHUNKS = 8


def _torus(x, acc, comm, transport, wire_dtype, scale,
           max_chunks: int = PIPELINE_MAX_CHUNKS) -> None:
    cols = comm.grid.cols
    gathered = (acc if acc.dtype == wire_dtype
                else torch.empty(acc.numel(), dtype=wire_dtype, device=acc.device))
    phases = _TorusPhases(acc.view(cols, -1), gathered.view(cols, -1), comm, transport, scale)
    spans = pipeline_spans(acc.numel() // cols, acc.element_size(), comm, max_chunks)
    if len(spans) == 1:
        phases.reduce_scatter(spans[0])
        phases.column_allreduce(spans[0])
        phases.allgather(spans[0])
    else:
        _run_pipelined(phases, spans, comm)
    _copy_out(x, gathered)


def pipeline_spans(shard_numel: int, element_size: int, comm: GridComm,
                   max_chunks: int = PIPELINE_MAX_CHUNKS) -> list[tuple[int, int]]:
    """Element ranges ``[start, stop)`` of each worker's shard that the torus pipelines.

    One span (no pipelining) when the grid has a single row or column (one phase only),
    on NCCL (its calls return once enqueued: the stream, not a host thread, orders them),
    or when the shard is too small to split.
    """
    grid = comm.grid
    chunks = min(max_chunks, shard_numel * element_size // PIPELINE_MIN_CHUNK_BYTES)
    if comm.backend != "gloo" or grid.rows == 1 or grid.cols == 1 or chunks < 2:
        return [(0, shard_numel)]
    bounds = [shard_numel * k // chunks for k in range(chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class _TorusPhases:
    """The torus's three phases on one span of every shard (``shards``: the accumulator
    viewed as ``cols`` rows; ``pieces``: the buffer the row all-gather fills)."""

    def __init__(self, shards, pieces, comm: GridComm, transport, scale: float):
        self.shards, self.pieces, self.comm = shards, pieces, comm
        self.transport, self.scale = transport, scale

    def reduce_scatter(self, span: tuple[int, int]) -> None:
        if self.comm.grid.cols > 1:
            start, stop = span
            self.transport.reduce_scatter(self.comm.row_group,
                                          [row[start:stop] for row in self.shards], self.comm.col)

    def column_allreduce(self, span: tuple[int, int]) -> None:
        start, stop = span
        mine = self.shards[self.comm.col, start:stop]
        if self.comm.grid.rows > 1:
            self.transport.allreduce(self.comm.col_group, mine, self.scale)
        elif self.scale != 1.0:
            mine.mul_(self.scale)
        target = self.pieces[self.comm.col, start:stop]
        if target.data_ptr() != mine.data_ptr():
            target.copy_(mine)

    def allgather(self, span: tuple[int, int]) -> None:
        if self.comm.grid.cols > 1:
            start, stop = span
            self.transport.allgather(self.comm.row_group,
                                     [row[start:stop] for row in self.pieces], self.comm.col)


class _PhaseProgress:
    """How many spans each thread of a pipelined torus has finished, and its first error."""

    def __init__(self, comm: GridComm):
        self._changed = threading.Condition()
        self.done = {"reduce_scatter": 0, "column_allreduce": 0}
        self.error: BaseException | None = None
        self._comm = comm

    def finished(self, phase: str) -> None:
        with self._changed:
            self.done[phase] += 1
            self._changed.notify_all()

    def failed(self, error: BaseException) -> None:
        with self._changed:
            self.error = self.error or error
            self._changed.notify_all()

    def wait(self, phase: str, count: int) -> bool:
        """Wait until ``count`` spans passed ``phase``; False if the other thread failed.
        Each phase call is bounded by the collective timeout, so a wait that outlives it
        means the other thread is stuck."""
        with self._changed:
            ended = self._changed.wait_for(
                lambda: self.done[phase] >= count or self.error is not None,
                timeout=self._comm.timeout_s + 1.0)
            if not ended:
                raise CollectiveTimeoutError(self._comm.col_group, self._comm.rank,
                                             f"torus pipeline ({phase})", self._comm.timeout_s)
            return self.done[phase] >= count


def _run_pipelined(phases: _TorusPhases, spans: list[tuple[int, int]], comm: GridComm) -> None:
    """Row reduce-scatter of span k+1, column all-reduce of span k and row all-gather of
    span k-1 at once: the column phase runs on a thread of its own (the row and column
    groups are independent gloo groups), the row phases stay on this thread in a fixed
    order (RS0, RS1, AG0, RS2, AG1, ...) so every rank issues the row group's operations
    in the same sequence."""
    progress = _PhaseProgress(comm)

    def column_thread() -> None:
        try:
            for index, span in enumerate(spans):
                if not progress.wait("reduce_scatter", index + 1):
                    return
                phases.column_allreduce(span)
                progress.finished("column_allreduce")
        except BaseException as exc:  # noqa: BLE001 - handed to the row thread
            progress.failed(exc)

    helper = threading.Thread(target=column_thread, name="torus-column", daemon=True)
    helper.start()
    try:
        for index, span in enumerate(spans):
            phases.reduce_scatter(span)
            progress.finished("reduce_scatter")
            if index > 0:
                _gather_when_reduced(phases, progress, spans, index - 1)
        _gather_when_reduced(phases, progress, spans, len(spans) - 1)
    except BaseException as exc:
        progress.failed(exc)
        raise
    finally:
        helper.join(comm.timeout_s + 2.0)
    if progress.error is not None:
        raise progress.error


def _gather_when_reduced(phases, progress: _PhaseProgress, spans, index: int) -> None:
    if not progress.wait("column_allreduce", index + 1):
        raise progress.error
    phases.allgather(spans[index])


def _flat(x, acc, comm, transport, wire_dtype, scale) -> None:
    if comm.grid.num_workers > 1:
        transport.allreduce(comm.world_group, acc, scale)
    elif scale != 1.0:
        acc.mul_(scale)
    _copy_out(x, acc)


def _hierarchical(x, acc, comm, transport, wire_dtype, scale) -> None:
    grid, is_leader = comm.grid, comm.col == 0
    if grid.cols > 1:
        transport.reduce(comm.row_group, acc, wire_dtype)
    if is_leader and grid.rows > 1:
        transport.allreduce(comm.col_group, acc, scale)
    elif is_leader and scale != 1.0:
        acc.mul_(scale)
    result = acc if acc.dtype == wire_dtype else acc.to(wire_dtype)
    if grid.cols > 1:
        transport.broadcast(comm.row_group, result)
    _copy_out(x, result)


_ALGORITHM_FUNCS = {"flat": _flat, "torus": _torus, "hierarchical": _hierarchical}


def _copy_out(x: torch.Tensor, result: torch.Tensor) -> None:
    if result.data_ptr() != x.data_ptr():
        x.copy_(result[: x.numel()])


def _check_args(tensor: torch.Tensor, algorithm: str, op: str, comm_dtype) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is unknown; choose one of {ALGORITHMS}")
    if op not in OPS:
        raise ValueError(f"op {op!r} is unknown; choose one of {OPS}")
    if tensor.dim() != 1 or not tensor.is_contiguous():
        raise CollectiveError("allreduce_ needs a contiguous 1-D tensor (flatten it first)")
    if tensor.dtype not in _SUPPORTED_DTYPES:
        raise CollectiveError(f"dtype {tensor.dtype} is not supported: use fp32, fp16 or bf16")
    if comm_dtype is not None and comm_dtype not in _SUPPORTED_DTYPES:
        raise CollectiveError(f"comm_dtype {comm_dtype} is not supported: fp32, fp16 or bf16")


def _working_buffer(x: torch.Tensor, acc_dtype: torch.dtype, parts: int) -> torch.Tensor:
    """``x`` itself when it already fits (no copy), else a zero-padded copy."""
    numel = ring.padded_numel(x.numel(), parts)
    if x.dtype == acc_dtype and numel == x.numel():
        return x
    acc = torch.zeros(numel, dtype=acc_dtype, device=x.device)
    acc[: x.numel()].copy_(x)
    return acc


def allreduce_(tensor: torch.Tensor, comm: GridComm, algorithm: str = "torus",
               op: str = "sum", comm_dtype: torch.dtype | None = None, *,
               pipeline_chunks: int = PIPELINE_MAX_CHUNKS) -> torch.Tensor:
    """All-reduce the flat ``tensor`` in place over the whole grid; returns it.

    ``pipeline_chunks``: the most chunks the gloo torus pipelines a buffer over (1: the
    three phases one after the other). Every rank of the grid must call it with the same
    algorithm, size, dtypes and ``pipeline_chunks``. The
    whole call is bounded by ``comm.timeout_s`` (gloo): a dead or hung peer raises
    :class:`CollectiveTimeoutError` naming the group, rank and operation.
    """
    _check_args(tensor, algorithm, op, comm_dtype)
    wire_dtype = comm_dtype or tensor.dtype
    if comm.backend == "gloo":
        # gloo's own reduce-scatter and all-gather measured 3.5x slower than a flat
        # all-reduce of the same buffer (bench allreduce, 2x2, 25M fp32): the torus
        # uses point-to-point rings for them, and for any sum over a 16-bit wire.
        acc_dtype = torch.float32 if wire_dtype in _SIXTEEN_BIT else wire_dtype
        transport = _RingTransport(comm, wire_dtype)
    else:
        transport, acc_dtype = _NativeTransport(comm), wire_dtype
    parts = comm.grid.cols if algorithm == "torus" else 1
    acc = _working_buffer(tensor, acc_dtype, parts)
    scale = 1.0 / comm.grid.num_workers if op == "mean" else 1.0
    with _deadline(comm):
        if algorithm == "torus":
            _torus(tensor, acc, comm, transport, wire_dtype, scale, pipeline_chunks)
        else:
            _ALGORITHM_FUNCS[algorithm](tensor, acc, comm, transport, wire_dtype, scale)
    return tensor


@contextlib.contextmanager
def _deadline(comm: GridComm):
    """One deadline for every step of a call on flashtrain's backends (Ray's NCCL has none)."""
    if comm.backend not in ("gloo", "nccl"):
        yield
        return
    from ray.util.collective.collective import get_group_handle

    with contextlib.ExitStack() as stack:
        for name in comm.group_names:
            handle = get_group_handle(name)
            if isinstance(handle, group_base.IndependentGroup):
                stack.enter_context(handle.deadline(comm.timeout_s))
        yield
