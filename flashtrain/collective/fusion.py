"""Gradient bucketing: pack many small gradients into a few flat buffers.

One all-reduce per parameter would pay the latency term once per tensor (ResNet-50 has
161 of them); packing gradients into buckets of ``bucket_bytes`` pays it once per bucket
while a bucket stays large enough to run at link bandwidth.

The gradients live *in* the buckets (as DDP's ``gradient_as_bucket_view``): each
``param.grad`` is a view of its slice of the bucket's buffer, so the backward accumulates
straight into the buffer and the all-reduce writes the result where the optimizer reads
it; no pack or unpack copy per step. A gradient that is not such a view (it was ``None``,
or something replaced it) is copied in once and the view put in its place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from flashtrain.collective.allreduce import PIPELINE_MAX_CHUNKS, GridComm, allreduce_


@dataclass(frozen=True)
class Bucket:
    """Parameters whose gradients travel together, and where each sits in the buffer."""

    params: tuple[torch.nn.Parameter, ...]
    offsets: tuple[int, ...]
    buffer: torch.Tensor


def plan_buckets(params: list[torch.nn.Parameter], bucket_bytes: int,
                 align: int = 1) -> list[Bucket]:
    """Group ``params`` in order into buckets of at most ``bucket_bytes`` (one dtype each).

    A parameter larger than ``bucket_bytes`` gets a bucket of its own. Each buffer is
    zero-padded to a multiple of ``align`` elements (the torus splits it into that many
    equal shards; a padded buffer needs no padded copy per call).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[Bucket] = []
    current: list[torch.nn.Parameter] = []
    current_bytes = 0
    for param in params:
        nbytes = param.numel() * param.element_size()
        starts_new = current and (current_bytes + nbytes > bucket_bytes
                                  or param.dtype != current[0].dtype)
        if starts_new:
            buckets.append(_make_bucket(current, align))
            current, current_bytes = [], 0
        current.append(param)
        current_bytes += nbytes
    if current:
        buckets.append(_make_bucket(current, align))
    return buckets


def _make_bucket(params: list[torch.nn.Parameter], align: int) -> Bucket:
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += param.numel()
    total = -(-total // align) * align
    buffer = torch.zeros(total, dtype=params[0].dtype, device=params[0].device)
    return Bucket(tuple(params), tuple(offsets), buffer)


class GradientSynchronizer:
    """All-reduce the ``.grad`` of ``params`` across the grid, bucket by bucket, in place.

    Buckets are planned in reverse parameter order, the order in which the backward pass
    produces gradients (as DDP does): the overlapped synchronizer
    (:mod:`flashtrain.collective.overlap`) starts the first bucket early in the backward,
    and uses the same buckets as this one, so both give bit-identical updates.

    A parameter without a gradient contributes zeros; after :meth:`sync` it holds the
    reduced gradient like the others, so every replica steps the same way.

    On a one-worker grid whose wire is the gradients' own dtype the sum (and the mean)
    is the gradient itself: :attr:`identity` is then true, there are no buckets and
    :meth:`sync` does nothing.
    """

    def __init__(self, params: list[torch.nn.Parameter], comm: GridComm,
                 algorithm: str = "torus", bucket_bytes: int = 25 * 2**20,
                 comm_dtype: torch.dtype | None = None,
                 pipeline_chunks: int = PIPELINE_MAX_CHUNKS):
        self.comm = comm
        self.algorithm = algorithm
        self.comm_dtype = comm_dtype
        self.pipeline_chunks = pipeline_chunks
        params = list(params)
        align = comm.grid.cols if algorithm == "torus" else 1
        self.comm_seconds = 0.0  # wall time of the last step's bucket all-reduces
        self.identity = comm.grid.num_workers == 1 and all(
            comm_dtype in (None, p.dtype) for p in params)
        # One worker: no buckets at all, the gradients stay autograd's own tensors (the
        # caller may set them to None between steps, as a plain loop does).
        self.buckets = [] if self.identity else plan_buckets(params[::-1], bucket_bytes, align)
        for bucket in self.buckets:  # from here on the gradients live in the buffers
            self._pack(bucket)

    def begin(self, op: str = "sum") -> None:
        """Before the backward: nothing to do here (everything happens in :meth:`sync`)."""

    def cancel(self) -> None:
        """The backward failed: nothing is in flight here."""

    def close(self) -> None:
        """Leaving the grid: nothing to release here."""

    def sync(self, op: str = "sum") -> None:
        """Reduce every gradient (``op``: ``"sum"`` or ``"mean"`` over the workers)."""
        began = time.perf_counter()
        for bucket in self.buckets:
            self._reduce_bucket(bucket, op)
        self.comm_seconds = time.perf_counter() - began

    def _reduce_bucket(self, bucket: Bucket, op: str) -> None:
        self._pack(bucket)
        if not self.identity:
            allreduce_(bucket.buffer, self.comm, self.algorithm, op, self.comm_dtype,
                       pipeline_chunks=self.pipeline_chunks)

    @staticmethod
    def _pack(bucket: Bucket) -> None:
        """Make every gradient of ``bucket`` a view of its slice of the buffer; a pointer
        compare per parameter when they already are (every step after the first)."""
        for param, offset in zip(bucket.params, bucket.offsets, strict=True):
            grad = param.grad
            piece = bucket.buffer[offset: offset + param.numel()]
            if grad is not None and grad.data_ptr() == piece.data_ptr() \
                    and grad.shape == param.shape:
                continue
            if grad is None:
                piece.zero_()
            else:
                piece.copy_(grad.reshape(-1))
            param.grad = piece.view_as(param)
