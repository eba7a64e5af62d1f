"""``data.decode=gpu``: JPEGs are read as bytes by the loader processes and decoded on the
worker's GPU, batched, then random-resized-cropped, flipped and normalised there.

Why: decoding and cropping ImageNet JPEGs on CPU runs at roughly 100-200 images/s per core,
while an H100 trains ResNet-50 at about 2,800 images/s: a node's cores cannot feed its
GPUs. MLPerf's ResNet-50 submissions decode on the GPU (nvJPEG). This uses nvJPEG through
``torchvision.io.decode_jpeg(list, device="cuda")`` (one batched call) rather than NVIDIA
DALI: it ships with the torchvision flashtrain already pins (DALI is a separate CUDA-
specific wheel, another version matrix on top of torch's), it keeps the loader a plain
``DataLoader`` (sampling, exactly-once accounting and skipping of undecodable files stay
as they are), and its output is an ordinary tensor on the current stream. DALI's fused
pipelines would save kernel launches per image; the crop here runs per image.

The loader processes only read files (:class:`EncodedImages`): a batch crosses shared
memory as its compressed bytes (~110 kB per ImageNet JPEG instead of 602 kB of float32 at
224 px). A file nvJPEG refuses (CMYK, a PNG behind a ``.JPEG`` name) is decoded by
torchvision on the CPU instead; one that neither decodes is skipped and named, as with the
CPU decode (:mod:`flashtrain.train.decode`).

The same code runs with ``device=cpu`` (torchvision's batched CPU decode), which is how it
is tested without a GPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

from flashtrain.train.decode import LoadedBatch, SkippedSample, UndecodableImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect range


def _path_only(path: str) -> str:
    return path  # EncodedImages reads the file itself


class EncodedImages(Dataset):
    """An ImageFolder split whose samples are ``(file bytes, label, relative name)``."""

    def __init__(self, folder: Path | str, is_valid_file=None) -> None:
        self.root = Path(folder)
        self.folder = datasets.ImageFolder(str(folder), loader=_path_only,
                                           is_valid_file=is_valid_file)
        self.classes = self.folder.classes
        self.class_to_idx = self.folder.class_to_idx

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.folder.samples[index]
        name = os.path.relpath(path, self.root.parent)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as err:
            raise UndecodableImage(name, f"{type(err).__name__}: {err}") from err
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, name


def collate_encoded(items: list[Any]) -> LoadedBatch:
    """A batch of encoded images: ``images`` is ``(list of byte tensors, names)``."""
    skipped = tuple(item for item in items if isinstance(item, SkippedSample))
    kept = [item for item in items if not isinstance(item, SkippedSample)]
    labels = torch.tensor([label for _, label, _ in kept], dtype=torch.long)
    return LoadedBatch(([data for data, _, _ in kept], [name for _, _, name in kept]),
                       labels, skipped)


def crop_box(height: int, width: int, scale: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop, as torchvision's RandomResizedCrop
    draws it (area in ``scale``, log-uniform aspect in :data:`RATIO`, ten tries, then
    the centre crop clamped to the ratio)."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DeviceDecode:
    """Decode a batch of :func:`collate_encoded` on ``device`` and apply the training
    augmentation of photos there: random-resized crop to ``image_size`` (area in
    ``scale``), horizontal flip with probability 1/2, ImageNet normalisation."""

    def __init__(self, image_size: int, device: torch.device,
                 scale: tuple[float, float] = (0.35, 1.0), seed: int | None = None) -> None:
        self.image_size = image_size
        self.device = device
        self.scale = scale
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def decode(self, encoded: list[torch.Tensor], names: list[str]):
        """(decoded images, kept positions, skipped samples)."""
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device), \
                list(range(len(encoded))), []
        except RuntimeError:
            pass  # one file spoils the batched call: decode one by one
        images, kept, skipped = [], [], []
        for index, (data, name) in enumerate(zip(encoded, names, strict=True)):
            try:
                images.append(self._decode_one(data))
                kept.append(index)
            except RuntimeError as err:
                skipped.append(SkippedSample(name, f"{type(err).__name__}: {err}"))
        return images, kept, skipped

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # Not a JPEG nvJPEG takes (CMYK, PNG bytes): torchvision's CPU decoders.
            return decode_image(data, mode=ImageReadMode.RGB).to(self.device)

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        top, left, h, w = crop_box(image.shape[-2], image.shape[-1], self.scale, self.generator)
        crop = F.resized_crop(image, top, left, h, w, [self.image_size, self.image_size],
                              antialias=True)
        if torch.rand(1, generator=self.generator).item() < 0.5:
            crop = crop.flip(-1)
        return crop

    def __call__(self, batch: LoadedBatch) -> LoadedBatch:
        encoded, names = batch.images
        images, kept, skipped = self.decode(list(encoded), list(names))
        labels = batch.labels.to(self.device, non_blocking=True)
        if len(kept) < len(encoded):
            labels = labels[torch.tensor(kept, dtype=torch.long, device=labels.device)]
        if not images:
            empty = torch.empty(0, 3, self.image_size, self.image_size, device=self.device)
            return LoadedBatch(empty, labels, batch.skipped + tuple(skipped))
        crops = torch.stack([self.augment(image) for image in images])
        normalised = (crops.float() / 255.0 - self.mean) / self.std
        return LoadedBatch(normalised, labels, batch.skipped + tuple(skipped))
