"""``python -m flashtrain.bench data``: the training loader's images/s per core against a
plain torchvision ``ImageFolder`` + ``DataLoader`` loop.

Both read the same ImageNet-layout JPEGs (made here at ImageNet's typical 500x375,
quality 90, unless ``--root`` names an existing ``root/train/<class>/*`` tree) with the
same training transforms (random-resized crop to ``--image-size``, flip, normalise) and
the same number of loader processes, for ``--epochs`` epochs each:

* **flashtrain**: a worker's :class:`~flashtrain.train.loader.StepStream` (its loader
  processes persist across epochs; the batches come from the step sampler);
* **plain**: ``DataLoader(ImageFolder(...), batch_size, shuffle=True, num_workers)``,
  the documented loop, which starts its processes again every epoch.

Runs alternate (A B, B A, ...) ``--repeats`` times, after an untimed run of each, so
that the load of a shared machine falls on both; the table gives the median, min and max.
Per core = images per CPU-second of the loop's process and its loader processes
(``getrusage`` of the process and of its reaped children), which a machine shared with
other work distorts far less than the wall clock (images/s is given too).
``--decode gpu`` measures the GPU decode (:mod:`flashtrain.train.gpu_decode`) against the
same plain CPU loop; without CUDA it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

EXIT_NO_GPU = 2
TARGET_RATIO = 1.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="an ImageNet-layout folder (root/train/<class>/*) "
                        "to read instead of JPEGs made here")
    parser.add_argument("--images", type=int, default=384, help="JPEGs to make (no --root)")
    parser.add_argument("--classes", type=int, default=4, help="class folders to make")
    parser.add_argument("--image-size", type=int, default=224, help="training crop (px)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.images, args.classes, args.batch, args.epochs, args.repeats) < 1 \
            or args.loader_workers < 0:
        parser.error("--images, --classes, --batch, --epochs, --repeats must be >= 1 and "
                     "--loader-workers >= 0")
    return args


def make_jpegs(root: Path, num_images: int, num_classes: int, seed: int = 0) -> Path:
    """``num_images`` 500x375 quality-90 JPEGs in ``root/train/<class>/``: smooth colour
    fields plus pixel noise, which compresses to about ImageNet's bytes per image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(num_images):
        folder = root / "train" / f"n{index % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), np.int16)
        noisy = np.clip(field + rng.normal(0, 10, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img_{index:06d}.JPEG", quality=90)
    return root


def _flashtrain_run(root: Path, args: argparse.Namespace, device) -> int:
    """Images delivered by a worker's stream over ``args.epochs`` epochs."""
    from flashtrain.config import DataConfig
    from flashtrain.train.data import StepBatchSampler, train_split
    from flashtrain.train.loader import make_train_stream

    cfg = DataConfig(source="imagefolder", root=str(root), image_size=args.image_size,
                     loader_workers=args.loader_workers, verify_images=False,
                     decode=args.decode)
    dataset = train_split(root / "train", "imagefolder", args.image_size, args.decode)
    stream = make_train_stream(dataset, cfg, device)
    count = 0
    for epoch in range(args.epochs):
        sampler = StepBatchSampler(num_samples=len(dataset), epoch=epoch, start_cursor=0,
                                   global_batch=args.batch, num_workers=1, rank=0, seed=0,
                                   min_tail=1)
        for _plan, batch in stream.start(sampler):
            count += len(batch.labels)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    stream.close()
    return count


def _plain_run(root: Path, args: argparse.Namespace) -> int:
    """The documented loop: ImageFolder + DataLoader, the same transforms."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from flashtrain.train.data import train_transform

    dataset = ImageFolder(str(root / "train"), transform=train_transform("imagefolder",
                                                                          args.image_size))
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True,
                        num_workers=args.loader_workers)
    count = 0
    for _ in range(args.epochs):
        for _images, labels in loader:
            count += len(labels)
    return count


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the loader processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(run) -> dict[str, float]:
    """images/s of ``run`` by the wall clock, and images per CPU-second (per core): the
    latter is what a loaded, shared machine distorts least."""
    gc.collect()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    count = run()
    gc.collect()  # the run's loader processes exit and are reaped: their CPU time counts
    return {"images_per_sec": count / (time.perf_counter() - wall),
            "per_core": count / (_cpu_seconds() - cpu)}


def measure(root: Path, args: argparse.Namespace, device) -> dict[str, list[dict]]:
    """Each loader's figures per run, after one untimed run of each (page cache, lazy
    imports); runs interleaved (A B, B A, ...)."""
    runs = {"flashtrain": lambda: _flashtrain_run(root, args, device),
            "plain": lambda: _plain_run(root, args)}
    for run in runs.values():
        run()
    figures: dict[str, list[dict]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            figures[name].append(_timed(runs[name]))
    return figures


def summarise(figures: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, runs in figures.items():
        per_core = [run["per_core"] for run in runs]
        rows.append({"loader": name,
                     "images_per_sec": statistics.median(r["images_per_sec"] for r in runs),
                     "per_core_median": statistics.median(per_core),
                     "per_core_min": min(per_core), "per_core_max": max(per_core)})
    ratios = [a["per_core"] / b["per_core"]
              for a, b in zip(figures["flashtrain"], figures["plain"], strict=True)]
    rows.append({"loader": "ratio flashtrain/plain", "median": statistics.median(ratios),
                 "min": min(ratios), "max": max(ratios)})
    return rows


def format_table(rows: list[dict], meta: dict) -> str:
    lines = [f"data loader, {meta['images']} JPEGs ({meta['source']}), crop "
             f"{meta['image_size']}, batch {meta['batch']}, {meta['loader_workers']} loader "
             f"process(es), {meta['epochs']} epoch(s) per run, {meta['repeats']} interleaved "
             f"runs, decode={meta['decode']}, load average {meta['load_before']:.2f} -> "
             f"{meta['load_after']:.2f}",
             f"{'loader':<24}{'images/s':>10}{'per core: median':>18}{'min':>8}{'max':>8}"
             "   (per core: images per CPU-second of the loop and its loader processes)"]
    for row in rows[:-1]:
        lines.append(f"{row['loader']:<24}{row['images_per_sec']:>10.1f}"
                     f"{row['per_core_median']:>18.1f}{row['per_core_min']:>8.1f}"
                     f"{row['per_core_max']:>8.1f}")
    ratio = rows[-1]
    verdict = "meets" if ratio["median"] >= TARGET_RATIO else "misses"
    lines.append(f"{ratio['loader']:<24}{'':>10}{ratio['median']:>18.2f}{ratio['min']:>8.2f}"
                 f"{ratio['max']:>8.2f}   ({verdict} the target >= {TARGET_RATIO:g}x)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    if args.decode == "gpu" and not torch.cuda.is_available():
        print("flashtrain.bench data --decode gpu: no GPU here (torch.cuda.is_available() "
              f"is False; torch {torch.__version__}, CUDA build {torch.version.cuda})",
              file=sys.stderr)
        return EXIT_NO_GPU
    device = torch.device("cuda" if args.decode == "gpu" else "cpu")
    with tempfile.TemporaryDirectory(prefix="flashtrain-bench-data-") as scratch:
        root = Path(args.root).expanduser() if args.root else make_jpegs(
            Path(scratch), args.images, args.classes)
        images = sum(1 for _ in (root / "train").rglob("*") if _.is_file())
        load_before = os.getloadavg()[0]
        figures = measure(root, args, device)
        meta = {**vars(args), "images": images, "load_before": load_before,
                "load_after": os.getloadavg()[0], "device": str(device),
                "source": str(root) if args.root else "500x375 q90, made here"}
    rows = summarise(figures)
    print(format_table(rows, meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows,
                                               "runs": figures}, indent=2))
    return 0
