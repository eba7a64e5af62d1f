"""Datasets, the digits folder and the per-step sampler of flashtrain.train.data."""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashtrain.config import DataConfig
from flashtrain.sharding import epoch_permutation
from flashtrain.train.data import (
    PerSampleRandom,
    SampleKey,
    StepBatchSampler,
    build_datasets,
    ensure_digits_imagefolder,
    iterate_steps,
    make_step_loader,
    make_val_loader,
    val_slice,
)
from flashtrain.train.decode import SkipUndecodable, UndecodableImage, collate_skipping

DIGITS_PER_CLASS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's load_digits


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_digits_imagefolder(tmp_path_factory.mktemp("cache") / "digits")


def _files(folder: Path) -> dict[str, list[Path]]:
    return {c.name: sorted(c.iterdir()) for c in sorted(folder.iterdir()) if c.is_dir()}


# --------------------------------------------------------------------------- digits folder


def test_digits_folder_has_stratified_counts(digits_dir: Path) -> None:
    train, val = _files(digits_dir / "train"), _files(digits_dir / "val")
    assert list(train) == list(val) == [f"n{label:08d}" for label in range(10)]
    marker = json.loads((digits_dir / "flashtrain-digits.json").read_text())
    for label, wnid in enumerate(train):
        num_train, num_val = len(train[wnid]), len(val[wnid])
        assert num_train + num_val == DIGITS_PER_CLASS[label]
        assert num_val == round(DIGITS_PER_CLASS[label] * 0.2)  # stratified ~80/20 per class
        assert marker["per_class"]["train"][wnid] == num_train
        assert marker["per_class"]["val"][wnid] == num_val
    assert marker["train"] + marker["val"] == 1797
    train_names = {p.name for files in train.values() for p in files}
    val_names = {p.name for files in val.values() for p in files}
    assert not train_names & val_names  # no image in both splits


def test_digits_files_are_real_images(digits_dir: Path) -> None:
    paths = sorted(digits_dir.glob("*/*/*.JPEG"))
    assert len(paths) == 1797
    for path in paths[::50]:
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.size == (32, 32)
            pixels = np.asarray(image.convert("L"))
        assert pixels.max() > 128 and pixels.min() < 64  # a white digit on black, not blank


def test_second_call_does_not_rewrite(digits_dir: Path) -> None:
    marker = digits_dir / "flashtrain-digits.json"
    before = {p: p.stat().st_mtime_ns for p in [marker, *digits_dir.glob("train/*/*")]}
    assert ensure_digits_imagefolder(digits_dir) == digits_dir
    after = {p: p.stat().st_mtime_ns for p in [marker, *digits_dir.glob("train/*/*")]}
    assert before == after
    assert not [p for p in digits_dir.parent.iterdir() if ".tmp-" in p.name]


def test_foreign_folder_is_never_deleted(tmp_path: Path) -> None:
    cache = tmp_path / "digits"
    (cache / "train" / "cat").mkdir(parents=True)
    (cache / "train" / "cat" / "precious.JPEG").write_bytes(b"someone's data")
    with pytest.raises(FileExistsError, match="not a flashtrain digits folder"):
        ensure_digits_imagefolder(cache)
    assert (cache / "train" / "cat" / "precious.JPEG").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "digits.lock"]


def test_empty_or_outdated_folder_is_filled(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(list(ensure_digits_imagefolder(empty).glob("*/*/*.JPEG"))) == 1797
    outdated = tmp_path / "outdated"
    (outdated / "train").mkdir(parents=True)
    (outdated / "flashtrain-digits.json").write_text('{"format": 0}')
    ensure_digits_imagefolder(outdated)
    assert len(list(outdated.glob("*/*/*.JPEG"))) == 1797
    assert json.loads((outdated / "flashtrain-digits.json").read_text())["format"] == 1


def _ensure_in_child(cache: str) -> None:
    ensure_digits_imagefolder(Path(cache))


def test_concurrent_callers_build_one_valid_folder(tmp_path: Path) -> None:
    cache = tmp_path / "digits"
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_ensure_in_child, args=(str(cache),)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert len(list(cache.glob("*/*/*.JPEG"))) == 1797
    assert json.loads((cache / "flashtrain-digits.json").read_text())["train"] > 1400
    assert [p.name for p in tmp_path.iterdir() if p.name != "digits.lock"] == ["digits"]


def test_build_datasets_digits(digits_dir: Path) -> None:
    pair = build_datasets(DataConfig(source="digits", image_size=32), cache_dir=digits_dir)
    assert (len(pair.train), len(pair.val), pair.num_classes, pair.skipped_files) == (1438, 359, 10, 0)
    image, label = pair.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    names = [type(t).__name__ for t in pair.train.transform.transforms]
    assert "RandomHorizontalFlip" not in names  # a mirrored digit is another symbol
    val_image, _ = pair.val[0]
    assert torch.equal(val_image, pair.val[0][0])  # evaluation is deterministic


# --------------------------------------------------------------------------- imagefolder


def _write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, 255 - value, 40)).save(path)


def test_corrupt_files_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            for n in range(count):
                _write_png(tmp_path / split / cls / f"{cls}_{n}.png", 30 * n)
    (tmp_path / "train" / "cat" / "garbage.JPEG").write_bytes(b"not an image at all")
    good = (tmp_path / "train" / "dog" / "dog_0.png").read_bytes()
    (tmp_path / "val" / "dog" / "torn.png").write_bytes(good[:20])
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image, not counted")

    cfg = DataConfig(source="imagefolder", root=str(tmp_path), image_size=8)
    with caplog.at_level(logging.WARNING, logger="flashtrain.train.data"):
        pair = build_datasets(cfg)
    assert pair.skipped_files == 2
    assert (len(pair.train), len(pair.val), pair.num_classes) == (8, 4, 2)
    assert "garbage.JPEG" in caplog.text and "torn.png" in caplog.text
    image, label = pair.train[len(pair.train) - 1]
    assert image.shape == (3, 8, 8) and label == 1


def test_imagefolder_with_mismatched_classes_fails_clearly(tmp_path: Path) -> None:
    _write_png(tmp_path / "train" / "cat" / "a.png", 1)
    _write_png(tmp_path / "train" / "dog" / "a.png", 1)
    _write_png(tmp_path / "val" / "cat" / "a.png", 1)
    with pytest.raises(ValueError, match="same class folders"):
        build_datasets(DataConfig(source="imagefolder", root=str(tmp_path)))


def test_synthetic_is_deterministic() -> None:
    cfg = DataConfig(source="synthetic", synthetic_samples=40, synthetic_classes=4, image_size=8)
    first, second = build_datasets(cfg), build_datasets(cfg)
    assert (len(first.train), first.num_classes, first.skipped_files) == (40, 4, 0)
    image, label = first.train[7]
    assert image.shape == (3, 8, 8) and 0 <= label < 4
    assert torch.equal(image, second.train[7][0]) and label == second.train[7][1]
    assert not torch.equal(image, first.train[8][0])


# --------------------------------------------------------------------------- sampler


def _expected_steps(num_samples: int, start: int, batch: int, min_tail: int) -> list[tuple[int, int]]:
    """Written independently of flashtrain.sharding: full steps, the tail folded in."""
    steps, cursor = [], start
    while cursor < num_samples:
        size = batch if num_samples - cursor - batch >= max(min_tail, 1) else num_samples - cursor
        steps.append((cursor, size))
        cursor += size
    return steps


def _rank_slice(perm: np.ndarray, cursor: int, size: int, workers: int, rank: int) -> list[int]:
    shares = [size // workers + (1 if r < size % workers else 0) for r in range(workers)]
    start = cursor + sum(shares[:rank])
    return perm[start : start + shares[rank]].tolist()


def _samplers(workers: int, **kwargs: int) -> list[StepBatchSampler]:
    return [StepBatchSampler(num_workers=workers, rank=rank, **kwargs) for rank in range(workers)]


@pytest.mark.parametrize("num_samples,batch,min_tail", [(103, 16, 8), (100, 20, 2), (37, 5, 1)])
def test_sampler_covers_epoch_once_across_resize(num_samples: int, batch: int, min_tail: int) -> None:
    epoch, seed, steps_before = 3, 11, 2
    common = dict(num_samples=num_samples, epoch=epoch, global_batch=batch, seed=seed,
                  min_tail=min_tail)
    perm = epoch_permutation(epoch, num_samples, seed)
    expected = _expected_steps(num_samples, 0, batch, min_tail)

    first = _samplers(4, start_cursor=0, max_steps=steps_before, **common)
    assert first[0].steps() == expected[:steps_before]
    cursor = first[0].end_cursor
    assert cursor == expected[steps_before][0]
    second = _samplers(3, start_cursor=cursor, **common)
    assert second[0].steps() == expected[steps_before:]
    assert second[0].end_cursor == num_samples

    seen: list[int] = []
    for samplers, workers in ((first, 4), (second, 3)):
        per_rank = [[list(p.indices) for p in s.plans()] for s in samplers]
        for step_number, (step_cursor, size) in enumerate(samplers[0].steps()):
            for rank in range(workers):
                got = per_rank[rank][step_number]
                assert got == _rank_slice(perm, step_cursor, size, workers, rank)
                seen.extend(got)
    assert sorted(seen) == list(range(num_samples))
    assert Counter(seen).most_common(1)[0][1] == 1


def test_zero_share_rank_gets_none_not_an_empty_batch() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10))
    common = dict(num_samples=10, epoch=0, start_cursor=0, global_batch=2, num_workers=3,
                  seed=0, min_tail=1)
    idle = StepBatchSampler(rank=2, **common)
    assert len(idle.steps()) == 5 and len(idle) == 0 and list(idle) == []
    loader = make_step_loader(dataset, idle, loader_workers=0)
    assert [batch for _, batch in iterate_steps(idle, loader)] == [None] * 5

    busy = StepBatchSampler(rank=0, **common)
    loader = make_step_loader(dataset, busy, loader_workers=0)
    pairs = list(iterate_steps(busy, loader))
    assert len(pairs) == 5
    for plan, (values, _labels, _skipped) in pairs:
        assert plan.batch == 2 and values.tolist() == [float(i) for i in plan.indices]


def test_step_loader_decodes_in_worker_processes() -> None:
    cfg = DataConfig(source="synthetic", synthetic_samples=24, synthetic_classes=3, image_size=8)
    pair = build_datasets(cfg)
    sampler = StepBatchSampler(24, 0, 0, 8, 2, 1, seed=5, min_tail=2)
    loader = make_step_loader(pair.train, sampler, loader_workers=1)
    batches = list(loader)
    assert len(batches) == 3
    for plan, (images, labels, skipped) in zip(sampler.plans(), batches, strict=True):
        assert images.shape == (4, 3, 8, 8) and skipped == ()
        assert labels.tolist() == [pair.train[i][1] for i in plan.indices]


def test_val_slices_are_disjoint_and_cover() -> None:
    dataset = torch.utils.data.TensorDataset(torch.arange(11), torch.zeros(11))
    covered = []
    for rank in range(4):
        assert len(val_slice(11, rank, 4)) in (2, 3)
        loader = make_val_loader(dataset, rank, num_workers=4, batch_size=2)
        covered.extend(int(v) for values, _, _ in loader for v in values)
    assert covered == list(range(11))
    idle = make_val_loader(dataset, 11, num_workers=12, batch_size=4)  # 12 ranks, 11 samples
    assert list(val_slice(11, 11, 12)) == [] and list(idle) == []


# --------------------------------------------------------------------------- undecodable images
#
# An ImageNet-layout folder with the quirks of real copies: JPEGs cut short (the header
# still reads), CMYK and grayscale JPEGs, PNG bytes behind a .JPEG name, an empty file,
# and copying debris (.DS_Store, README.txt, macOS ._ resource forks).

TORN = ("train/cat/torn_0.JPEG", "train/dog/torn_1.JPEG")
TORN_VAL = "val/dog/torn_val.JPEG"
ODD_BUT_GOOD = ("train/cat/cmyk.JPEG", "train/dog/gray.JPEG", "train/cat/png_inside.JPEG")


def _noise(size: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _write_torn_jpeg(path: Path, seed: int) -> None:
    """A real JPEG cut to 60% of its bytes: headers and tables intact, scan data not."""
    _noise(24, seed).save(path, "JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def _write_quirky_imagefolder(root: Path) -> None:
    for split, count in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for n in range(count):
                _noise(16, hash((split, cls, n)) % 1000).save(root / split / cls / f"{n}.JPEG")
    for seed, name in enumerate((*TORN, TORN_VAL)):
        _write_torn_jpeg(root / name, seed)
    _noise(20, 1).convert("CMYK").save(root / ODD_BUT_GOOD[0], "JPEG")
    _noise(20, 2).convert("L").save(root / ODD_BUT_GOOD[1], "JPEG")
    _noise(20, 3).save(root / ODD_BUT_GOOD[2], "PNG")
    (root / "train/dog/empty.JPEG").write_bytes(b"")
    for debris in ("train/.DS_Store", "train/cat/.DS_Store", "train/README.txt", "val/README.txt"):
        (root / debris).write_bytes(b"\x00\x00\x00\x01Bud1 not an image")
    (root / "train/cat/._0.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")


@pytest.fixture()
def quirky_dir(tmp_path: Path) -> Path:
    _write_quirky_imagefolder(tmp_path)
    return tmp_path


def test_torn_jpeg_passes_pil_verify_but_not_the_decode(quirky_dir: Path) -> None:
    # Why the start-up scan cannot catch it: verify() reads no JPEG scan data.
    for name in TORN:
        with Image.open(quirky_dir / name) as image:
            assert image.size == (24, 24)
            image.verify()
        with Image.open(quirky_dir / name) as image, pytest.raises(OSError, match="truncated"):
            image.load()


def test_scan_ignores_debris_and_skips_only_empty_files(quirky_dir: Path) -> None:
    pair = build_datasets(DataConfig(source="imagefolder", root=str(quirky_dir), image_size=8))
    assert pair.skipped_files == 1  # the empty file; debris is not counted at all
    names = {str(Path(path).relative_to(quirky_dir)) for path, _ in pair.train.samples}
    assert len(pair.train) == 8 + 2 + 3 and set(TORN) | set(ODD_BUT_GOOD) <= names
    assert not any(Path(name).name.startswith(".") or name.endswith(".txt") for name in names)
    assert "train/dog/empty.JPEG" not in names and len(pair.val) == 4 + 1


def test_cmyk_gray_and_png_behind_jpeg_decode_as_rgb(quirky_dir: Path) -> None:
    pair = build_datasets(DataConfig(source="imagefolder", root=str(quirky_dir), image_size=8))
    for name in ODD_BUT_GOOD:
        index = [str(Path(p).relative_to(quirky_dir)) for p, _ in pair.train.samples].index(name)
        assert pair.train.loader(pair.train.samples[index][0]).mode == "RGB"
        image, _label = pair.train[index]
        assert image.shape == (3, 8, 8)


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_step_loader_skips_undecodable_images_on_the_rank_that_has_them(
        quirky_dir: Path, loader_workers: int) -> None:
    pair = build_datasets(DataConfig(source="imagefolder", root=str(quirky_dir), image_size=8))
    names = [str(Path(path).relative_to(quirky_dir)) for path, _ in pair.train.samples]
    num_samples, trained, skipped = len(pair.train), 0, []
    for rank in range(2):
        sampler = StepBatchSampler(num_samples, epoch=0, start_cursor=0, global_batch=4,
                                   num_workers=2, rank=rank, seed=3, min_tail=2)
        loader = make_step_loader(pair.train, sampler, loader_workers)
        for plan, batch in iterate_steps(sampler, loader):
            mine = [names[i] for i in plan.indices]
            # Exactly this rank's torn files of this step, nothing else is touched.
            assert [s.name for s in batch.skipped] == [n for n in mine if n in TORN]
            assert all("truncated" in s.reason for s in batch.skipped)
            assert len(batch.labels) == len(mine) - len(batch.skipped)
            assert batch.images.shape[1:] == (3, 8, 8) or len(batch.labels) == 0
            trained += len(batch.labels)
            skipped.extend(s.name for s in batch.skipped)
    assert sorted(skipped) == sorted(TORN)
    assert trained + len(skipped) == num_samples


def test_val_loader_skips_and_names_undecodable_images(quirky_dir: Path) -> None:
    pair = build_datasets(DataConfig(source="imagefolder", root=str(quirky_dir), image_size=8))
    counted, skipped = 0, []
    for rank in range(2):
        for _images, labels, undecodable in make_val_loader(pair.val, rank, 2, batch_size=2):
            counted += len(labels)
            skipped.extend(s.name for s in undecodable)
    assert (counted, skipped) == (4, [TORN_VAL])


def test_only_decode_failures_are_skipped_never_other_errors() -> None:
    class BrokenTransform(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            raise ValueError("a bug in a transform must not pass as a bad image")

    sampler = StepBatchSampler(2, 0, 0, 2, 1, 0, seed=0, min_tail=1)
    with pytest.raises(ValueError, match="a bug in a transform"):
        list(make_step_loader(BrokenTransform(), sampler, loader_workers=0))


def test_a_batch_of_only_undecodable_images_is_empty(quirky_dir: Path) -> None:
    pair = build_datasets(DataConfig(source="imagefolder", root=str(quirky_dir), image_size=8))
    torn = [i for i, (path, _) in enumerate(pair.train.samples)
            if str(Path(path).relative_to(quirky_dir)) in TORN]
    with pytest.raises(UndecodableImage, match="torn_.*truncated"):
        pair.train[torn[0]]  # the bare dataset raises; the loaders' wrapper turns it into a name
    loader = torch.utils.data.DataLoader(SkipUndecodable(pair.train), batch_sampler=[torn],
                                         collate_fn=collate_skipping)
    (batch,) = list(loader)
    assert len(batch.images) == len(batch.labels) == 0
    assert sorted(s.name for s in batch.skipped) == sorted(TORN)


# --------------------------------------------------------------------------- augmentation


def test_augmentations_are_a_function_of_seed_epoch_and_sample(digits_dir: Path) -> None:
    """What a training sample looks like depends only on (seed, epoch, index): not on the
    process's RNG history, on the loader's start cursor (a resumed run starts mid-epoch),
    nor on whether it is decoded in a loader process."""
    cfg = DataConfig(source="digits", root=str(digits_dir))
    train = build_datasets(cfg).train

    def step_images(epoch: int, start_cursor: int, workers: int,
                    steps: int = 3) -> dict[int, torch.Tensor]:
        sampler = StepBatchSampler(len(train), epoch, start_cursor, 16, 2, 0, seed=3,
                                   min_tail=2, max_steps=steps)
        loader = make_step_loader(train, sampler, loader_workers=workers)
        indices = [i for plan in sampler.plans() for i in plan.indices]
        images = torch.cat([batch.images for batch in loader])
        return dict(zip(indices, images, strict=True))

    torch.manual_seed(0)
    whole = step_images(epoch=1, start_cursor=0, workers=0)
    torch.rand(12345)  # another history of the global generator
    resumed = step_images(epoch=1, start_cursor=16, workers=1, steps=2)
    assert resumed.keys() <= whole.keys() and len(resumed) == 16
    for index, image in resumed.items():
        assert torch.equal(image, whole[index]), index
    # The augmentation is random: another epoch shows the same sample differently.
    for index, image in whole.items():
        assert torch.equal(PerSampleRandom(train)[SampleKey(3, 1, index)][0], image)
        assert not torch.equal(PerSampleRandom(train)[SampleKey(3, 2, index)][0], image)
    # And the global generator is left as it was: nothing outside a sample is changed.
    before = torch.get_rng_state()
    PerSampleRandom(train)[SampleKey(3, 1, 5)]
    assert torch.equal(before, torch.get_rng_state())
