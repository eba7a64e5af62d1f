"""Decoding images, and skipping the ones that cannot be decoded.

A real copy of ImageNet holds files whose header reads but whose pixels do not (a JPEG
cut short by a failed copy): the start-up scan (headers only, see
:class:`flashtrain.train.data._ReadableImageFilter`) cannot see them, and a full decode
of every file at start would cost as much as an epoch. So the decode at training time
decides: a sample whose image cannot be decoded is *skipped*, by whichever rank was
given it, and reported by name. Nothing else changes: the step still covers its planned
samples (the clock and the sharding never hear about it), and the skipped sample
simply contributes no gradient.

The decision is made inside ``Dataset.__getitem__`` (which may run in a DataLoader
worker process), so an undecodable image never raises out of the loader: the dataset
returns a :class:`SkippedSample` marker in its place and :func:`collate_skipping` drops
the markers, returning their names next to the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate


class UndecodableImage(Exception):
    """An image file whose pixels could not be decoded; ``name`` is its path relative
    to the dataset root (e.g. ``train/n01440764/x.JPEG``)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


class RGBLoader:
    """ImageFolder's ``loader``: the file as an RGB image, fully decoded.

    Whatever PIL can read is converted, so CMYK and grayscale JPEGs and PNG bytes behind
    a ``.JPEG`` name (PIL goes by content, not by name) train like any photo. Any failure
    of the decode itself becomes :class:`UndecodableImage`; failures of the transforms
    that follow are bugs and still raise. A plain class, not a closure, so datasets
    pickle into DataLoader worker processes.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = str(root)

    def __call__(self, path: str) -> Image.Image:
        try:
            with open(path, "rb") as file, Image.open(file) as image:
                return image.convert("RGB")  # convert() forces the full decode here
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
            raise UndecodableImage(os.path.relpath(path, self.root),
                                   f"{type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for a sample whose image could not be decoded."""

    name: str  # path relative to the dataset root
    reason: str  # the decoder's error, for the log
    rank: int | None = None  # the rank whose share it was (set by the worker)


class LoadedBatch(NamedTuple):
    """One batch from a loader: the decoded samples and the names of the skipped ones.
    ``images`` and ``labels`` are empty when every sample of the batch was skipped."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: tuple[SkippedSample, ...]


class SkipUndecodable(Dataset):
    """``dataset``, with each sample whose image cannot be decoded replaced by a
    :class:`SkippedSample` (use :func:`collate_skipping` as the loader's collate)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except UndecodableImage as err:
            return SkippedSample(err.name, err.reason)


def collate_skipping(items: list[Any], collate: Callable[[list], Any] = default_collate) -> LoadedBatch:
    """Collate the decoded samples of ``items`` with ``collate`` (a task's, see
    :meth:`flashtrain.Task.collate`); the skipped ones leave only their names."""
    skipped = tuple(item for item in items if isinstance(item, SkippedSample))
    kept = [item for item in items if not isinstance(item, SkippedSample)]
    if not kept:
        return LoadedBatch(torch.empty(0), torch.empty(0, dtype=torch.long), skipped)
    images, labels = collate(kept)
    return LoadedBatch(images, labels, skipped)


class SkippingCollate:
    """:func:`collate_skipping` with a task's ``collate`` (a class, so it pickles into
    DataLoader worker processes)."""

    def __init__(self, collate: Callable[[list], Any] | None = None) -> None:
        self.collate = collate or default_collate

    def __call__(self, items: list[Any]) -> LoadedBatch:
        return collate_skipping(items, self.collate)
