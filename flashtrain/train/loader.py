"""The training data stream of one worker: loader processes that live as long as the
worker, pinned host memory, and the next batch copied to the device while this one trains.

A ``DataLoader`` built per window or epoch starts its decode processes again each time
(and their first batches arrive late); its batches sit in pageable memory, so a
``.to(device, non_blocking=True)`` copy blocks the host anyway. :class:`StepStream`
builds one loader for the worker's whole life instead: its batch sampler is swapped for
each new stretch of steps (new epoch, new grid, rollback) while the processes stay.
Swapping is safe with torch's persistent workers: a new ``iter()`` sends every worker a
``_ResumeIteration`` and drops whatever batches of the old stretch were still in flight
(torch/utils/data/dataloader.py, ``_MultiProcessingDataLoaderIter._reset``); the
sampler itself is read only in this process, so workers never see the swap.

:class:`DevicePrefetcher` then moves batch ``k + 1`` to the GPU on a side stream while
step ``k`` computes: the copy of pinned memory is truly asynchronous, and the step's
stream waits for it (``wait_stream``) only when it takes the batch. On a CPU device it
only passes batches through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flashtrain.config import DataConfig
from flashtrain.train.data import (
    KeyedBatches,
    PerSampleRandom,
    RankStep,
    SampleKey,
    StepBatchSampler,
)
from flashtrain.train.decode import LoadedBatch, SkippingCollate, SkipUndecodable, collate_skipping

# A step's batch on the device, or None where this rank's share of the step is empty.
DeviceStep = tuple[RankStep, LoadedBatch | None]


class _SwappableBatches(Sampler[list[SampleKey]]):
    """The batch sampler of a persistent loader: the current stretch's batches, keyed by
    (seed, epoch, index) so that the loader processes seed each sample's augmentations
    by its own epoch (:class:`~flashtrain.train.data.PerSampleRandom`)."""

    def __init__(self) -> None:
        self.current: StepBatchSampler | None = None

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return iter(KeyedBatches(self.current)) if self.current is not None else iter(())

    def __len__(self) -> int:
        return len(self.current) if self.current is not None else 0


class StepStream:
    """One worker's loader, kept across windows and epochs (module docstring).

    ``batch_transform`` runs on each batch once it is on the device (the GPU decode's
    crop and flip, :mod:`flashtrain.train.gpu_decode`); ``collate`` replaces
    :func:`~flashtrain.train.decode.collate_skipping` for datasets that return other
    samples (encoded bytes).
    """

    def __init__(self, dataset: Dataset, loader_workers: int, device: torch.device,
                 collate: Callable = collate_skipping,
                 batch_transform: Callable[[LoadedBatch], LoadedBatch] | None = None) -> None:
        self.device = device
        self._batches = _SwappableBatches()
        self._transform = batch_transform
        self.loader = DataLoader(SkipUndecodable(PerSampleRandom(dataset)),
                                 batch_sampler=self._batches,
                                 num_workers=loader_workers, collate_fn=collate,
                                 persistent_workers=loader_workers > 0,
                                 pin_memory=device.type == "cuda")

    def close(self) -> None:
        """End the loader processes now (a worker's exit ends them too)."""
        self._batches.current = None
        self.loader = None  # the last reference: torch's iterator shuts its workers down

    def start(self, sampler: StepBatchSampler) -> Iterator[DeviceStep]:
        """Every step of ``sampler`` with its batch on the device (``None`` where this
        rank's share is 0). Starting again abandons the previous stretch."""
        self._batches.current = sampler
        return DevicePrefetcher(_with_plans(sampler, iter(self.loader)), self.device,
                                self._transform)


def make_train_stream(dataset: Dataset, data_cfg: DataConfig, device: torch.device,
                      collate: Callable | None = None) -> StepStream:
    """The worker's stream for ``data_cfg``: with ``decode=gpu`` its loader reads bytes
    and the device decodes and augments them (:mod:`flashtrain.train.gpu_decode`);
    otherwise its batches are put together by ``collate`` (a task's)."""
    if data_cfg.decode == "gpu":
        from flashtrain.train.gpu_decode import DeviceDecode, collate_encoded

        return StepStream(dataset, data_cfg.loader_workers, device, collate=collate_encoded,
                          batch_transform=DeviceDecode(data_cfg.image_size, device))
    return StepStream(dataset, data_cfg.loader_workers, device, collate=SkippingCollate(collate))


def _with_plans(sampler: StepBatchSampler, batches: Iterator[LoadedBatch]) -> Iterator[DeviceStep]:
    for plan in sampler.plans():
        yield plan, (next(batches) if plan.indices else None)


def _to_device(batch: LoadedBatch, device: torch.device) -> LoadedBatch:
    images = batch.images
    if isinstance(images, torch.Tensor):
        images = images.to(device, non_blocking=True)
    return LoadedBatch(images, batch.labels.to(device, non_blocking=True), batch.skipped)


class DevicePrefetcher:
    """Iterate ``steps`` with each batch already on ``device``; on a GPU the next batch
    is copied on a side stream while the caller works on the current one."""

    def __init__(self, steps: Iterator[DeviceStep], device: torch.device,
                 transform: Callable[[LoadedBatch], LoadedBatch] | None = None) -> None:
        self._steps = steps
        self._device = device
        self._transform = transform
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next: DeviceStep | None = None
        self._done = False
        self._fetch()

    def _fetch(self) -> None:
        try:
            plan, batch = next(self._steps)
        except StopIteration:
            self._next, self._done = None, True
            return
        if batch is not None:
            if self._stream is None:
                batch = self._finish(_to_device(batch, self._device))
            else:
                with torch.cuda.stream(self._stream):
                    batch = self._finish(_to_device(batch, self._device))
        self._next = (plan, batch)

    def _finish(self, batch: LoadedBatch) -> LoadedBatch:
        return self._transform(batch) if self._transform is not None else batch

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> DeviceStep:
        if self._done:
            raise StopIteration
        plan, batch = self._next
        if batch is not None and self._stream is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_stream(self._stream)  # the copy (and transform) come first
            for tensor in (batch.images, batch.labels):
                if isinstance(tensor, torch.Tensor):
                    # Made on the side stream, used on this one: the allocator must not
                    # hand its memory out again before this stream is done with it.
                    tensor.record_stream(current)
        self._fetch()
        return plan, batch
