"""Gradient bucketing: pack many small gradients into a few flat buffers.

One all-reduce per parameter would pay the latency term once per tensor (ResNet-50 has
161 of them); packing gradients into buckets of ``bucket_bytes`` pays it once per bucket
while a bucket stays large enough to run at link bandwidth.
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


def plan_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[Bucket]:
    """Group ``params`` in order into buckets of at most ``bucket_bytes`` (one dtype each).

    A parameter larger than ``bucket_bytes`` gets a bucket of its own.
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
            buckets.append(_make_bucket(current))
            current, current_bytes = [], 0
        current.append(param)
        current_bytes += nbytes
    if current:
        buckets.append(_make_bucket(current))
    return buckets


def _make_bucket(params: list[torch.nn.Parameter]) -> Bucket:
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += param.numel()
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
    """

    def __init__(self, params: list[torch.nn.Parameter], comm: GridComm,
                 algorithm: str = "torus", bucket_bytes: int = 25 * 2**20,
                 comm_dtype: torch.dtype | None = None,
                 pipeline_chunks: int = PIPELINE_MAX_CHUNKS):
        self.comm = comm
        self.algorithm = algorithm
        self.comm_dtype = comm_dtype
        self.pipeline_chunks = pipeline_chunks
        self.buckets = plan_buckets(list(params)[::-1], bucket_bytes)
        self.comm_seconds = 0.0  # wall time of the last step's bucket all-reduces

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
        allreduce_(bucket.buffer, self.comm, self.algorithm, op, self.comm_dtype,
                   pipeline_chunks=self.pipeline_chunks)
        self._unpack(bucket)

    @staticmethod
    def _pack(bucket: Bucket) -> None:
        for param, offset in zip(bucket.params, bucket.offsets, strict=True):
            piece = bucket.buffer[offset: offset + param.numel()]
            if param.grad is None:
                piece.zero_()
            else:
                piece.copy_(param.grad.reshape(-1))

    @staticmethod
    def _unpack(bucket: Bucket) -> None:
        for param, offset in zip(bucket.params, bucket.offsets, strict=True):
            piece = bucket.buffer[offset: offset + param.numel()].view_as(param)
            if param.grad is None:
                param.grad = piece.clone()
            else:
                param.grad.copy_(piece)
