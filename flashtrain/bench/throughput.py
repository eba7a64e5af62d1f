"""``python -m flashtrain.bench throughput``: training throughput through the real Trainer.

For each algorithm, one short synthetic-data run of :class:`flashtrain.driver.trainer.Trainer`
on a fresh set of worker actors (local Ray, gloo, CPU workers). The step records of
``metrics.jsonl`` give the step time (driver wall clock), the sync time (the slowest
worker's gradient all-reduce; compute is the rest: data, forward, backward, optimizer
and Ray's dispatch) and images/s; the first ``--warmup`` steps are dropped and
the medians reported, with the speed against ``flat``.

The peer row is a plain single-process PyTorch loop (same model, optimizer and loss,
one worker's share of the global batch, the same torch thread count), so
``scaling efficiency = images/s of the grid / (workers x images/s of the peer)``. On a
machine with fewer cores than workers that efficiency is capped at cores / workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flashtrain.schedule import split_batch
from flashtrain.topology import Grid

ALGORITHMS = ("flat", "torus", "hierarchical")
PEER = "single_process"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Grid.parse, default=Grid(2, 2), help="RxC, e.g. 2x2")
    parser.add_argument("--model", default="resnet50", help="tiny_cnn or a torchvision model name")
    parser.add_argument("--algos", default=",".join(ALGORITHMS),
                        help="comma-separated, from " + ", ".join(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per algorithm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker and for the peer")
    parser.add_argument("--no-peer", action="store_true", help="skip the single-process row")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    args.algos = [a for a in args.algos.split(",") if a]
    unknown = sorted(set(args.algos) - set(ALGORITHMS))
    if unknown or not args.algos:
        parser.error(f"--algos {','.join(unknown) or '(empty)'}: choose from {', '.join(ALGORITHMS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.global_batch < 2 * args.grid.num_workers:
        parser.error(f"--global-batch {args.global_batch} is too small for {args.grid} "
                     f"(at least {2 * args.grid.num_workers}: two samples per worker)")
    return args


def overrides(args: argparse.Namespace, algorithm: str) -> list[str]:
    """The job configuration of one run: synthetic data, enough samples that the timed
    steps never reach an epoch end (no validation inside the timing)."""
    total_steps = args.warmup + args.steps
    return [
        f"model.name={args.model}", "data.source=synthetic",
        f"data.synthetic_samples={args.global_batch * (total_steps + 1)}",
        f"data.image_size={args.image_size}", f"grid.shape={args.grid}",
        "grid.cpus_per_worker=1",  # main() gives Ray one logical CPU per worker
        f"grid.torch_threads={args.torch_threads}",
        f"collective.algorithm={algorithm}", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
        f"schedule.phases=[{{start_epoch: 0, global_batch: {args.global_batch}}}]",
        f"runtime.max_steps={total_steps}", "runtime.progress=false",
        "checkpoint.every_steps=100000", "elastic.commit_every_steps=100000",
    ]


def summarize_steps(records: list[dict], warmup: int) -> dict:
    """Medians over the step records after ``warmup``."""
    steps = [r for r in records if r.get("kind") == "step"][warmup:]
    if not steps:
        raise RuntimeError("the run wrote no step records after the warm-up")
    step_s = statistics.median(r["step_seconds"] for r in steps)
    sync_s = statistics.median(r["sync_seconds"] for r in steps)
    return {"steps": len(steps), "step_s": step_s, "sync_s": sync_s,
            "compute_s": max(step_s - sync_s, 0.0),
            "images_per_sec": statistics.median(r["images_per_sec"] for r in steps),
            "global_batch": steps[0]["global_batch"]}


def run_algorithm(args: argparse.Namespace, algorithm: str, workdir: Path) -> dict:
    """One Trainer run with ``algorithm``; its step records summarized."""
    from flashtrain.config import load_config
    from flashtrain.driver.trainer import Trainer

    config = load_config(None, overrides(args, algorithm))
    run_dir = workdir / algorithm
    run_dir.mkdir(parents=True)
    trainer = Trainer(config, run_dir, workdir / "cache", say=lambda message: None)
    began = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"algo": algorithm, **summarize_steps(records, args.warmup),
            "run_wall_s": time.perf_counter() - began}


def run_peer(args: argparse.Namespace) -> dict:
    """A plain PyTorch loop in this process on one worker's share of the batch."""
    import torch
    import torch.nn.functional as F

    from flashtrain.train.models import build_model, parameter_groups

    torch.set_num_threads(args.torch_threads)
    batch = max(split_batch(args.global_batch, args.grid.num_workers))
    model = build_model(args.model, 10, seed=0, zero_init_residual=True)
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-5, True), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    model.train()
    times = []
    for step in range(args.warmup + args.steps):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(images), labels, label_smoothing=0.1).backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - began)
    step_s = statistics.median(times)
    return {"algo": PEER, "steps": len(times), "step_s": step_s, "sync_s": 0.0,
            "compute_s": step_s, "images_per_sec": batch / step_s, "global_batch": batch}


def add_ratios(rows: list[dict], num_workers: int) -> None:
    """Speed against flat (step-time ratio) and scaling efficiency against the peer."""
    flat = next((r for r in rows if r["algo"] == "flat"), None)
    peer = next((r for r in rows if r["algo"] == PEER), None)
    for row in rows:
        grid_row = row["algo"] != PEER
        row["speedup_vs_flat"] = flat["step_s"] / row["step_s"] if flat and grid_row else None
        row["scaling_efficiency"] = (row["images_per_sec"] / (num_workers * peer["images_per_sec"])
                                     if peer and grid_row else None)


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{args.model}, grid {args.grid} ({args.grid.num_workers} CPU workers), global batch "
             f"{args.global_batch}, {args.image_size}px synthetic, medians of {args.steps} steps "
             f"after {args.warmup} warm-up, {os.cpu_count()} cores",
             f"{'algo':>22}{'img/s':>9}{'step s':>9}{'compute s':>11}{'sync s':>9}{'sync %':>8}"
             f"{'vs flat':>9}{'scaling eff':>13}"]
    for r in rows:
        ratio = f"{r['speedup_vs_flat']:.2f}x" if r["speedup_vs_flat"] else "-"
        eff = f"{r['scaling_efficiency']:.1%}" if r["scaling_efficiency"] is not None else "-"
        name = r["algo"] if r["algo"] != PEER else f"{PEER}(b={r['global_batch']})"
        lines.append(f"{name:>22}{r['images_per_sec']:>9.1f}{r['step_s']:>9.3f}{r['compute_s']:>11.3f}"
                     f"{r['sync_s']:>9.3f}{r['sync_s'] / r['step_s']:>8.0%}{ratio:>9}{eff:>13}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import ray

    args = parse_args(argv)
    rows = []
    # address="local": always a fresh instance, never a cluster someone else started.
    ray.init(address="local", num_cpus=args.grid.num_workers + 1, include_dashboard=False,
             log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="flashtrain-throughput-") as workdir:
            for algorithm in args.algos:
                rows.append(run_algorithm(args, algorithm, Path(workdir)))
    finally:
        ray.shutdown()
    if not args.no_peer:  # after the workers are gone, so it has the machine to itself
        rows.append(run_peer(args))
    add_ratios(rows, args.grid.num_workers)
    print(format_table(rows, args))
    if args.json:
        meta = {"grid": str(args.grid), "num_workers": args.grid.num_workers, "model": args.model,
                "global_batch": args.global_batch, "image_size": args.image_size,
                "steps": args.steps, "warmup": args.warmup, "torch_threads": args.torch_threads,
                "cpu_count": os.cpu_count()}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
