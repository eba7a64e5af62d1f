"""Datasets, the per-step sampler and the loaders of one worker.

Three sources (``DataConfig.source``):

- ``digits``: scikit-learn's 1,797 handwritten digits, written once as an ImageNet-layout
  folder (``train/<wnid>/<wnid>_<n>.JPEG``, ``val/...``) and then read exactly like
  ImageNet, through ``torchvision.datasets.ImageFolder``. Nothing is downloaded: the
  images ship inside scikit-learn.
- ``imagefolder``: ``data.root/train`` and ``data.root/val`` (ImageNet itself).
- ``synthetic``: deterministic random tensors, for throughput benchmarks.

Which samples a worker trains on is decided only by :mod:`flashtrain.sharding`;
:class:`StepBatchSampler` turns that into per-step index lists for a ``DataLoader``.
Images that cannot be decoded at training time are skipped and named, never raised
(:mod:`flashtrain.train.decode`): the loaders yield :class:`LoadedBatch`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from flashtrain.config import DataConfig
from flashtrain.schedule import split_batch
from flashtrain.sharding import epoch_permutation, shard_indices, step_batch
from flashtrain.train.decode import (
    LoadedBatch,
    RGBLoader,
    SkippingCollate,
    SkipUndecodable,
    collate_skipping,
)

if TYPE_CHECKING:
    from torchvision import datasets, transforms

# torchvision is imported where an image source needs it, not here: importing it costs
# about 2 s of CPU (it imports torch._dynamo), paid by every worker process at start,
# and a task on tensors (synthetic images, tabular data) never uses it.

log = logging.getLogger(__name__)

DEFAULT_DIGITS_CACHE = Path("~/.cache/flashtrain/digits")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Bump when the written layout changes, so old caches are rebuilt instead of trusted.
_DIGITS_FORMAT = 1
_DIGITS_MARKER = "flashtrain-digits.json"
_DIGITS_SPLIT_SEED = 20181113  # fixed: the train/val split must never move between runs
_DIGITS_VAL_FRACTION = 0.2
_DIGITS_PIXELS = 32  # the 8x8 digits are upscaled so standard crops and ResNet stems make sense
_SKIPPED_NAMED = 5  # how many unreadable files a warning names


# --------------------------------------------------------------------------- digits folder


def _digits_split() -> tuple[np.ndarray, np.ndarray, dict[str, list[int]]]:
    """Images (uint8, N x 8 x 8, ink white on black), labels and the stratified split."""
    from sklearn.datasets import load_digits  # local: only the digits source needs sklearn

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    split: dict[str, list[int]] = {"train": [], "val": []}
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_val = int(round(len(members) * _DIGITS_VAL_FRACTION))
        split["val"].extend(sorted(members[:num_val].tolist()))
        split["train"].extend(sorted(members[num_val:].tolist()))
    return images, labels, split


def _wnid(label: int) -> str:
    return f"n{label:08d}"


def _read_marker(cache_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((cache_dir / _DIGITS_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("format") == _DIGITS_FORMAT else None


def _write_digits_tree(target: Path) -> dict[str, Any]:
    """Write every image and the marker under ``target`` (a fresh private folder)."""
    images, labels, split = _digits_split()
    counts: dict[str, dict[str, int]] = {}
    for split_name, indices in split.items():
        per_class = {_wnid(label): 0 for label in range(10)}
        for index in indices:
            wnid = _wnid(int(labels[index]))
            folder = target / split_name / wnid
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(images[index], mode="L").resize(
                (_DIGITS_PIXELS, _DIGITS_PIXELS), Image.Resampling.BICUBIC)
            # JPEG like ImageNet, at quality 95 with no chroma subsampling: on these smooth,
            # grey upscaled digits the loss is invisible and the decode path is ImageNet's.
            picture.convert("RGB").save(folder / f"{wnid}_{index:05d}.JPEG", "JPEG",
                                        quality=95, subsampling=0)
            per_class[wnid] += 1
        counts[split_name] = per_class
    marker = {"format": _DIGITS_FORMAT, "seed": _DIGITS_SPLIT_SEED, "num_classes": 10,
              "train": sum(counts["train"].values()), "val": sum(counts["val"].values()),
              "per_class": counts}
    (target / _DIGITS_MARKER).write_text(json.dumps(marker, indent=2))
    return marker


def _clear_for_digits(cache_dir: Path) -> None:
    """Make room for the digits at ``cache_dir``: an empty folder or an outdated digits
    tree (one with our marker file) goes; anything else is someone's data, never deleted.
    Our own writes cannot leave a markerless tree: the marker is inside before the rename."""
    if not cache_dir.exists():
        return
    if cache_dir.is_dir() and not any(cache_dir.iterdir()):
        cache_dir.rmdir()
    elif (cache_dir / _DIGITS_MARKER).is_file():
        log.warning("rebuilding %s: it was written by another flashtrain version", cache_dir)
        shutil.rmtree(cache_dir)
    else:
        raise FileExistsError(f"{cache_dir} exists and is not a flashtrain digits folder (no "
                              f"{_DIGITS_MARKER}): point data.root elsewhere or remove it")


def ensure_digits_imagefolder(cache_dir: Path | str | None = None) -> Path:
    """The digits as an ImageNet-layout folder at ``cache_dir`` (default
    ``~/.cache/flashtrain/digits``), written on the first call only.

    Safe against crashes and concurrent callers: the tree is written into a private
    temporary folder next to ``cache_dir`` and published by one ``rename``, under an
    exclusive ``flock`` on ``<cache_dir>.lock``. A complete folder carries a marker file
    with its counts; an empty folder is filled, and a non-empty one without the marker
    raises ``FileExistsError`` rather than being deleted.
    """
    cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_DIGITS_CACHE).expanduser()
    if _read_marker(cache_dir) is not None:
        return cache_dir  # the common case: no lock needed, a marker is only ever published complete
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = cache_dir.with_name(cache_dir.name + ".lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        if _read_marker(cache_dir) is not None:
            return cache_dir  # another process finished it while we waited
        work = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
        try:
            _clear_for_digits(cache_dir)
            marker = _write_digits_tree(work)
            os.rename(work, cache_dir)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    log.info("wrote the digits (%d train, %d val images) to %s", marker["train"], marker["val"],
             cache_dir)
    return cache_dir


# --------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetPair:
    """The train and validation datasets of a run."""

    train: Dataset
    val: Dataset
    num_classes: int | None  # None: not a classifier
    skipped_files: int  # unreadable image files left out of train and val together


def train_transform(source: str, image_size: int) -> transforms.Compose:
    """Training augmentation for ``source``.

    Photos (``imagefolder``) get the standard ResNet recipe: random-resized crop and
    horizontal flip. Digits get neither flips (a mirrored 2 is not a 2) nor aggressive
    crops (the digit fills the whole frame; a 35% crop can cut a 7 into a 1): only a mild
    random affine.
    """
    from torchvision import transforms

    if source == "digits":
        augment = [transforms.Resize((image_size, image_size)),
                   transforms.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1))]
    else:
        augment = [transforms.RandomResizedCrop(image_size, scale=(0.35, 1.0)),
                   transforms.RandomHorizontalFlip()]
    return transforms.Compose([*augment, transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One step of the splitmix64 finaliser: a 64-bit value mixed so that neighbouring
    inputs give unrelated outputs (about a microsecond in Python; numpy's SeedSequence
    costs some 40 times that per sample)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch`` of a run seeded ``seed``:
    a function of those three only, so a resumed run, a replacement worker or a rebuilt
    loader draw exactly what the uninterrupted run drew; neighbouring samples or epochs
    get unrelated streams."""
    mixed = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ epoch) ^ int(index))
    return mixed >> 1  # torch wants a seed below 2**63


class SampleKey(NamedTuple):
    """What a training loader asks its dataset for: sample ``index`` of ``epoch`` in a run
    seeded ``seed``. The key carries the epoch because a loader's processes outlive an
    epoch (:class:`flashtrain.train.loader.StepStream`)."""

    seed: int
    epoch: int
    index: int


class KeyedBatches(Sampler[list[SampleKey]]):
    """The batches of ``sampler`` as lists of :class:`SampleKey` (for
    :class:`PerSampleRandom`)."""

    def __init__(self, sampler: StepBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[SampleKey]]:
        seed, epoch = self.sampler.seed, self.sampler.epoch
        for batch in self.sampler:
            yield [SampleKey(seed, epoch, index) for index in batch]

    def __len__(self) -> int:
        return len(self.sampler)


class PerSampleRandom(Dataset):
    """``dataset`` read by :class:`SampleKey`: each sample is drawn with the CPU random
    generator seeded from ``(seed, epoch, index)`` (:func:`sample_seed`), and the
    generator's state put back after, so nothing outside the sample sees a difference.

    torchvision's random transforms (RandomAffine, RandomResizedCrop, flips) draw from
    torch's process-global generator; left alone, what sample 7 looks like would depend
    on how many samples this process (or DataLoader worker) transformed before it. Only
    the CPU generator is touched: ``torch.manual_seed`` would also reseed CUDA's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Any:
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(sample_seed(*key))
        try:
            return self.dataset[key.index]
        finally:
            generator.set_state(saved)


def val_transform(source: str, image_size: int) -> transforms.Compose:
    """Evaluation transform: resize then center crop (ImageNet's 256 -> 224 ratio for
    photos; digits are only resized, their frame is the whole digit)."""
    from torchvision import transforms

    resize = image_size if source == "digits" else int(round(image_size * 256 / 224))
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                               transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _ReadableImageFilter:
    """``is_valid_file`` for ImageFolder: image extensions only, and only files PIL can
    open and verify (cheap: headers and structure, no full decode). Records the rest.

    Hidden files (``.DS_Store``, macOS's ``._name.JPEG`` resource forks) are ignored like
    any other non-image file: they are copying debris, not broken samples. ``verify()``
    reads no JPEG pixel data, so a truncated JPEG passes here and is skipped when it
    fails to decode at training time (:mod:`flashtrain.train.decode`)."""

    def __init__(self, verify: bool = True) -> None:
        self.verify = verify
        self.unreadable: list[str] = []

    def __call__(self, path: str) -> bool:
        from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

        if os.path.basename(path).startswith(".") or not has_file_allowed_extension(
                path, IMG_EXTENSIONS):
            return False
        if not self.verify:
            return True
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # PIL raises many types for broken files; all mean "skip it"
            self.unreadable.append(path)
            return False
        return True


def _image_folder(folder: Path, transform: transforms.Compose,
                  check: _ReadableImageFilter) -> datasets.ImageFolder:
    from torchvision import datasets

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: an image folder needs train/<class>/* "
                                "and val/<class>/* (set data.root)")
    try:
        return datasets.ImageFolder(str(folder), transform=transform, is_valid_file=check,
                                    loader=RGBLoader(folder.parent))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{folder}: {err} (every class folder needs at least one "
                                "readable image)") from err


def train_split(folder: Path, source: str, image_size: int, decode: str = "cpu",
                check: _ReadableImageFilter | None = None) -> Dataset:
    """The training split at ``folder`` (``root/train``) as the workers read it: decoded
    and augmented in the loader (``decode="cpu"``), or as bytes for the GPU to decode."""
    check = check or _ReadableImageFilter(verify=False)
    if decode == "gpu":
        from flashtrain.train.gpu_decode import EncodedImages

        return EncodedImages(folder, is_valid_file=check)
    return _image_folder(folder, train_transform(source, image_size), check)


def _imagefolder_pair(root: Path, source: str, image_size: int, verify: bool = True,
                      decode: str = "cpu") -> DatasetPair:
    check = _ReadableImageFilter(verify)
    train = train_split(root / "train", source, image_size, decode, check)
    val = _image_folder(root / "val", val_transform(source, image_size), check)
    if train.class_to_idx != val.class_to_idx:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"{root}: train/ and val/ must have the same class folders "
                         f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})")
    if check.unreadable:
        log.warning("skipped %d unreadable image file(s) under %s, e.g. %s",
                    len(check.unreadable), root, ", ".join(check.unreadable[:_SKIPPED_NAMED]))
    return DatasetPair(train, val, len(train.classes), len(check.unreadable))


class SyntheticImages(Dataset):
    """Deterministic random images for benchmarks: sample ``index`` is always the same
    tensor. Each class adds a fixed pattern to the noise, so a model can learn it (a
    smoke run shows a falling loss) while the decode cost stays near zero."""

    def __init__(self, num_samples: int, num_classes: int, image_size: int, seed: int) -> None:
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(num_classes, (num_samples,), generator=generator)
        self.patterns = torch.randn(num_classes, 3, image_size, image_size, generator=generator)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index) + 1)
        label = int(self.labels[index])
        noise = torch.randn(3, self.image_size, self.image_size, generator=generator)
        return noise + 0.5 * self.patterns[label], label


def build_datasets(data_cfg: DataConfig, cache_dir: Path | str | None = None) -> DatasetPair:
    """The train/val datasets of ``data_cfg``.

    For ``digits`` the folder is ``data_cfg.root`` if set, else ``cache_dir``, else
    ``~/.cache/flashtrain/digits``; it is written on first use. Unreadable image files
    are left out and counted in ``skipped_files``.
    """
    if data_cfg.source == "synthetic":
        num_val = max(data_cfg.synthetic_samples // 5, data_cfg.synthetic_classes)
        train = SyntheticImages(data_cfg.synthetic_samples, data_cfg.synthetic_classes,
                                data_cfg.image_size, seed=data_cfg.seed)
        val = SyntheticImages(num_val, data_cfg.synthetic_classes, data_cfg.image_size,
                              seed=data_cfg.seed + 1)
        val.patterns = train.patterns  # same classes, different samples
        return DatasetPair(train, val, data_cfg.synthetic_classes, 0)
    if data_cfg.source == "digits":
        root = ensure_digits_imagefolder(data_cfg.root or cache_dir)
    else:
        root = Path(data_cfg.root).expanduser()  # config guarantees root for imagefolder
    return _imagefolder_pair(root, data_cfg.source, data_cfg.image_size, data_cfg.verify_images,
                             data_cfg.decode)


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class RankStep:
    """One training step as this rank sees it."""

    cursor: int  # samples of the epoch trained on before this step
    batch: int  # the step's global batch (all ranks together): weight losses by it
    indices: tuple[int, ...]  # this rank's dataset indices; empty when its share is 0

    @property
    def end_cursor(self) -> int:
        return self.cursor + self.batch


class StepBatchSampler(Sampler[list[int]]):
    """Per-step index lists of one rank for the rest of epoch ``epoch``, from
    ``start_cursor`` on, at a fixed ``global_batch`` over ``num_workers`` ranks.

    The plan comes only from :func:`flashtrain.sharding.step_batch` and
    :func:`~flashtrain.sharding.shard_indices`, so samplers built for a different worker
    count at the cursor where this one stopped continue the epoch with every sample seen
    exactly once. ``max_steps`` stops after that many steps (at a commit boundary).

    A ``DataLoader`` cannot produce an empty batch, so iterating yields only the
    **non-empty** lists; a rank whose share of a step is 0 (only when the step's batch
    is smaller than ``num_workers``) must drive its loop by :meth:`steps` instead, or use
    :func:`iterate_steps`, which pairs every step with its batch or ``None``.
    """

    def __init__(self, num_samples: int, epoch: int, start_cursor: int, global_batch: int,
                 num_workers: int, rank: int, seed: int, min_tail: int,
                 max_steps: int | None = None) -> None:
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if not 0 <= start_cursor <= num_samples:
            raise ValueError(f"start_cursor {start_cursor} is outside the epoch (0..{num_samples})")
        self.num_samples = num_samples
        self.epoch = epoch
        self.start_cursor = start_cursor
        self.global_batch = global_batch
        self.num_workers = num_workers
        self.rank = rank
        self.seed = seed
        self.min_tail = min_tail
        self.max_steps = max_steps
        self._plans = self._plan()

    def _plan(self) -> tuple[RankStep, ...]:
        permutation = epoch_permutation(self.epoch, self.num_samples, self.seed)
        plans: list[RankStep] = []
        cursor = self.start_cursor
        while cursor < self.num_samples and (self.max_steps is None or len(plans) < self.max_steps):
            batch = step_batch(cursor, self.num_samples, self.global_batch, self.min_tail)
            mine = shard_indices(epoch=self.epoch, cursor=cursor, batch=batch,
                                 num_workers=self.num_workers, rank=self.rank,
                                 num_samples=self.num_samples, seed=self.seed,
                                 permutation=permutation)
            plans.append(RankStep(cursor, batch, tuple(int(i) for i in mine)))
            cursor += batch
        return tuple(plans)

    def plans(self) -> tuple[RankStep, ...]:
        """Every step of this sampler, including the ones where this rank's share is 0."""
        return self._plans

    def steps(self) -> list[tuple[int, int]]:
        """``(cursor, global batch)`` of every step, in order."""
        return [(plan.cursor, plan.batch) for plan in self._plans]

    @property
    def end_cursor(self) -> int:
        """The cursor after the last step (``num_samples`` when the epoch is finished)."""
        return self._plans[-1].end_cursor if self._plans else self.start_cursor

    def __iter__(self) -> Iterator[list[int]]:
        for plan in self._plans:
            if plan.indices:
                yield list(plan.indices)

    def __len__(self) -> int:
        return sum(1 for plan in self._plans if plan.indices)


def make_step_loader(dataset: Dataset, sampler: StepBatchSampler, loader_workers: int) -> DataLoader:
    """A one-off loader (training workers keep one for their life instead:
    :class:`flashtrain.train.loader.StepStream`) yielding this rank's :class:`LoadedBatch` (``images, labels, skipped``)
    for each non-empty step of ``sampler``; with ``loader_workers > 0`` the decoding runs
    in that many processes. Samples whose image cannot be decoded are left out of
    ``images``/``labels`` and named in ``skipped``."""
    # Keys carry (seed, epoch, index): the augmentations are a function of those alone.
    return DataLoader(SkipUndecodable(PerSampleRandom(dataset)),
                      batch_sampler=KeyedBatches(sampler),
                      num_workers=loader_workers, collate_fn=collate_skipping)


def iterate_steps(sampler: StepBatchSampler,
                  loader: DataLoader) -> Iterator[tuple[RankStep, LoadedBatch | None]]:
    """Every step of ``sampler`` with the loader's batch for it, or ``None`` where this
    rank's share is 0 (it still takes part in the step's all-reduce, with zero grads)."""
    batches = iter(loader)
    for plan in sampler.plans():
        yield plan, (next(batches) if plan.indices else None)


def val_slice(num_samples: int, rank: int, num_workers: int) -> range:
    """The contiguous, disjoint part of a ``num_samples`` validation set that ``rank``
    evaluates; the slices of all ranks cover it exactly once."""
    sizes = split_batch(num_samples, num_workers)
    if not 0 <= rank < num_workers:
        raise ValueError(f"rank {rank} is outside 0..{num_workers - 1}")
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def make_val_loader(dataset: Dataset, rank: int, num_workers: int, batch_size: int,
                    collate=None, loader_workers: int = 0) -> DataLoader:
    """Loader of :class:`LoadedBatch` over this rank's :func:`val_slice` of ``dataset``,
    in order; undecodable images are skipped and named, as in training. Callers should
    count (correct, total) over it and sum the counts across ranks, not average means:
    slices differ in size by one."""
    indices = list(val_slice(len(dataset), rank, num_workers))
    return DataLoader(SkipUndecodable(Subset(dataset, indices)), batch_size=batch_size,
                      shuffle=False, num_workers=loader_workers,
                      collate_fn=SkippingCollate(collate), persistent_workers=False)


def task_datasets(task) -> DatasetPair:
    """A :class:`~flashtrain.Task`'s ``(train, val)`` as a :class:`DatasetPair` (a task
    may return one itself, with its class count and skipped files)."""
    pair = task.datasets()
    if isinstance(pair, DatasetPair):
        return pair
    train, val = pair
    return DatasetPair(train, val, task.num_classes, 0)
