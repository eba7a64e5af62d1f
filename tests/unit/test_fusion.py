"""Gradient buckets without Ray: the gradients live in the bucket buffers (no pack or
unpack copy per step), the torus's shards need no padded copy, and a one-worker grid
does no communication work at all, with the same numbers as plain autograd."""

from __future__ import annotations

import threading

import torch

from flashtrain.collective.allreduce import GridComm
from flashtrain.collective.fusion import GradientSynchronizer, plan_buckets
from flashtrain.collective.overlap import OverlappedSynchronizer
from flashtrain.topology import Grid


def comm_for(grid: Grid) -> GridComm:
    # Never used for a collective by these tests: only the grid's shape is read.
    return GridComm(grid, 0, 0, "gloo", 5.0, "row", "col", "world")


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 5))


def loss_of(model: torch.nn.Module, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(6, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 5, (6,), generator=generator)
    return torch.nn.functional.cross_entropy(model(images), labels)


def train(synchronizer_kind, steps: int = 3) -> list[torch.Tensor]:
    """SGD with momentum on a 1x1 grid through ``synchronizer_kind`` (None: plain
    autograd, the reference)."""
    model = small_model()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sync = synchronizer_kind(params, comm_for(Grid(1, 1)), "torus",
                             bucket_bytes=400) if synchronizer_kind else None
    for step in range(steps):
        optimizer.zero_grad(set_to_none=False)
        if sync:
            sync.begin("sum")
        loss_of(model, step).backward()
        if sync:
            sync.sync("sum")
        optimizer.step()
    if sync:
        sync.close()
    return [p.detach().clone() for p in params]


def test_gradients_are_views_of_the_bucket_buffers():
    model = small_model()
    params = list(model.parameters())
    sync = GradientSynchronizer(params, comm_for(Grid(2, 2)), "torus", bucket_bytes=400)
    assert len(sync.buckets) > 1
    loss_of(model, 0).backward()
    for bucket in sync.buckets:
        for param, offset in zip(bucket.params, bucket.offsets, strict=True):
            piece = bucket.buffer[offset: offset + param.numel()]
            assert param.grad.data_ptr() == piece.data_ptr()  # the backward wrote the buffer
            assert torch.equal(param.grad.reshape(-1), piece)


def test_existing_and_missing_gradients_move_into_the_buffer_once():
    model = small_model()
    params = list(model.parameters())
    loss_of(model, 0).backward()
    before = [p.grad.clone() for p in params]
    params[0].grad = None  # a parameter that got no gradient contributes zeros
    sync = GradientSynchronizer(params, comm_for(Grid(2, 2)), "torus", bucket_bytes=400)
    assert torch.equal(params[0].grad, torch.zeros_like(params[0]))
    for param, old in zip(params[1:], before[1:], strict=True):
        assert torch.equal(param.grad, old)
    params[1].grad = torch.full_like(params[1], 3.0)  # replaced: copied back in at sync,
    bucket = next(b for b in sync.buckets if any(p is params[1] for p in b.params))
    sync._pack(bucket)  # which packs each bucket before its all-reduce
    offset = bucket.offsets[[i for i, p in enumerate(bucket.params) if p is params[1]][0]]
    assert params[1].grad.data_ptr() == bucket.buffer[offset:].data_ptr()
    assert torch.equal(params[1].grad, torch.full_like(params[1], 3.0))


def test_one_worker_keeps_autograds_own_gradients():
    model = small_model()
    params = list(model.parameters())
    sync = GradientSynchronizer(params, comm_for(Grid(1, 1)), "torus", bucket_bytes=400)
    assert sync.identity and sync.buckets == []
    loss_of(model, 0).backward()
    grads = [p.grad for p in params]
    sync.sync("sum")  # nothing to sum over one worker: the same tensors, untouched
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))


def test_buffers_are_padded_to_whole_torus_shards():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 7, 11)]
    for bucket in plan_buckets(params, bucket_bytes=48, align=4):
        assert bucket.buffer.numel() % 4 == 0
        assert bucket.buffer.numel() >= sum(p.numel() for p in bucket.params)
    assert [b.buffer.numel() for b in plan_buckets(params, bucket_bytes=48)] == [12, 11]


def test_one_worker_sync_is_plain_autograd_bit_for_bit():
    reference = train(None)
    for kind in (GradientSynchronizer, OverlappedSynchronizer):
        for mine, expected in zip(train(kind), reference, strict=True):
            assert torch.equal(mine, expected), kind.__name__


def test_one_worker_overlap_starts_no_thread_and_no_hooks():
    before = threading.active_count()
    sync = OverlappedSynchronizer(list(small_model().parameters()), comm_for(Grid(1, 1)))
    assert sync.identity and sync._hooks == [] and threading.active_count() == before
    sync.close()
    rounded = OverlappedSynchronizer(list(small_model().parameters()), comm_for(Grid(1, 1)),
                                     comm_dtype=torch.float16)
    assert not rounded.identity  # a 16-bit wire rounds, even on one worker
    rounded.close()
