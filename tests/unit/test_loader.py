"""The worker's training stream (flashtrain.train.loader) and the GPU decode's logic
(flashtrain.train.gpu_decode) on CPU: loader processes that outlive a stretch of steps,
batches exactly those of a one-off loader, stale batches dropped on a restart, and JPEGs
decoded, cropped and flipped by the same code the GPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from flashtrain.config import load_config
from flashtrain.train.data import StepBatchSampler, iterate_steps, make_step_loader
from flashtrain.train.gpu_decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceDecode,
    EncodedImages,
    collate_encoded,
    crop_box,
)
from flashtrain.train.loader import DevicePrefetcher, StepStream

CPU = torch.device("cpu")


class Tagged(torch.utils.data.Dataset):
    """Sample i is (i, pid of the process that made it)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        return torch.tensor([float(index), float(os.getpid())]), index % 3


def sampler(epoch: int, rank: int = 0, workers: int = 2) -> StepBatchSampler:
    return StepBatchSampler(num_samples=40, epoch=epoch, start_cursor=0, global_batch=8,
                            num_workers=workers, rank=rank, seed=3, min_tail=1)


def test_the_loader_processes_outlive_a_stretch_and_stale_batches_are_dropped():
    stream = StepStream(Tagged(), loader_workers=2, device=CPU)
    first = stream.start(sampler(0))
    _, batch = next(first)  # the stretch is abandoned after one step (a re-form, say)
    pids = {int(p) for p in batch.images[:, 1].tolist()}
    steps = list(stream.start(sampler(1)))
    reference = list(iterate_steps(sampler(1), make_step_loader(Tagged(), sampler(1), 0)))
    assert len(steps) == len(reference) == 5
    for (plan, got), (want_plan, want) in zip(steps, reference, strict=True):
        assert plan == want_plan
        assert got.images[:, 0].tolist() == want.images[:, 0].tolist()  # no stale batch
        assert torch.equal(got.labels, want.labels)
        pids |= {int(p) for p in got.images[:, 1].tolist()}
    assert os.getpid() not in pids and len(pids) == 2  # the same two processes throughout


def test_a_persistent_stream_augments_each_epoch_as_a_fresh_loader_would(tmp_path: Path):
    """The loader processes outlive an epoch, yet each sample's random augmentation is
    the one of its own (seed, epoch, index): a resumed run, whose loader starts at that
    epoch, sees exactly what the uninterrupted run saw."""
    from flashtrain.config import DataConfig
    from flashtrain.train.data import build_datasets, ensure_digits_imagefolder

    root = ensure_digits_imagefolder(tmp_path / "digits")
    train = build_datasets(DataConfig(source="digits", root=str(root))).train

    def digits_sampler(epoch: int) -> StepBatchSampler:
        return StepBatchSampler(num_samples=len(train), epoch=epoch, start_cursor=0,
                                global_batch=16, num_workers=2, rank=0, seed=3, min_tail=1,
                                max_steps=2)

    stream = StepStream(train, loader_workers=1, device=CPU)
    for epoch in (0, 1):
        got = [batch.images for _, batch in stream.start(digits_sampler(epoch))]
        fresh = make_step_loader(train, digits_sampler(epoch), loader_workers=0)
        want = [batch.images for _, batch in iterate_steps(digits_sampler(epoch), fresh)]
        assert len(got) == len(want) == 2
        for got_images, want_images in zip(got, want, strict=True):
            assert torch.equal(got_images, want_images), epoch
    stream.close()


def test_an_empty_share_is_none_and_the_prefetcher_keeps_order():
    idle = StepBatchSampler(num_samples=10, epoch=0, start_cursor=0, global_batch=2,
                            num_workers=3, rank=2, seed=0, min_tail=1)
    stream = StepStream(Tagged(), loader_workers=0, device=CPU)
    assert [batch for _, batch in stream.start(idle)] == [None] * 5
    plans = list(sampler(0).plans())
    steps = list(DevicePrefetcher(iter([(p, None) for p in plans]), CPU))
    assert [plan for plan, _ in steps] == plans


def write_photo(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    Image.fromarray(base).resize((width, height), Image.BILINEAR).save(path, quality=90)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for label in ("n0", "n1"):
        folder = tmp_path / "train" / label
        folder.mkdir(parents=True)
        for index in range(3):
            write_photo(folder / f"{index}.JPEG", 200, 150, seed=index)
    (tmp_path / "train" / "n1" / "cut.JPEG").write_bytes(
        (tmp_path / "train" / "n0" / "0.JPEG").read_bytes()[:300])  # header only
    return tmp_path


def test_the_device_decode_crops_flips_normalises_and_names_what_it_skips(photos):
    data = EncodedImages(photos / "train")
    batch = collate_encoded([data[i] for i in range(len(data))])
    out = DeviceDecode(64, CPU, seed=0)(batch)
    assert out.images.shape == (6, 3, 64, 64) and out.images.dtype == torch.float32
    assert out.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [s.name for s in out.skipped] == [os.path.join("train", "n1", "cut.JPEG")]
    assert out.images.min() >= (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD) - 1e-5


def test_each_crop_is_the_drawn_box_resized_or_its_mirror(photos):
    data = EncodedImages(photos / "train")
    encoded, _label, _name = data[0]
    decoder = DeviceDecode(48, CPU, seed=1)
    image = decoder.decode([encoded], ["x"])[0][0]
    assert image.shape == (3, 150, 200) and image.dtype == torch.uint8
    flips = 0
    for _ in range(8):
        state = decoder.generator.get_state()
        top, left, h, w = crop_box(150, 200, decoder.scale, decoder.generator)
        decoder.generator.set_state(state)  # augment draws the same box
        reference = F.resize(image[:, top:top + h, left:left + w], [48, 48], antialias=True)
        crop = decoder.augment(image)
        flips += torch.equal(crop, reference.flip(-1)) and not torch.equal(crop, reference)
        assert torch.equal(crop, reference) or torch.equal(crop, reference.flip(-1))
    assert 0 < flips < 8


def test_crop_boxes_stay_inside_and_cover_the_area_range():
    generator = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(300):
        top, left, h, w = crop_box(375, 500, (0.35, 1.0), generator)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        areas.append(h * w / (375 * 500))
    assert min(areas) < 0.45 and max(areas) > 0.9


def test_gpu_decode_is_refused_without_a_gpu_or_jpegs():
    with pytest.raises(ValueError, match="data.decode=gpu"):
        load_config(None, ["data.decode=gpu"])
