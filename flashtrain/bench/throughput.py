"""``python -m flashtrain.bench throughput``: flashtrain against Ray Train v2 + DDP.

For each worker count, in one invocation and on one fresh local Ray instance: one short
synthetic-data run of :class:`flashtrain.driver.trainer.Trainer` per all-reduce algorithm
(flat, torus; the grid is ``(N/2)x2``, a row per two workers) and, as the peer to beat,
Ray Train v2's ``TorchTrainer`` with ``DistributedDataParallel`` over gloo
(:mod:`flashtrain.bench.raytrain_peer`'s training loop: the same model, samples, global
batch, learning rate, loss and thread count). Every system gets one CPU and one torch
thread per worker.

flashtrain's step time is the step record's (``metrics.jsonl``: the slowest worker's
time for the step), split on that worker into compute (forward, backward, optimizer),
exposed communication (waiting for the gradient all-reduce after the backward ended) and
data wait. Ray Train's is the time between consecutive steps on its rank 0. The first ``--warmup`` steps are
dropped, medians reported, and images/s compared with Ray Train's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flashtrain.topology import Grid

ALGORITHMS = ("flat", "torus", "hierarchical")
PEER = "raytrain_ddp"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="2,4",
                        help="comma-separated worker counts (even; grid (N/2)x2), e.g. 2,4")
    parser.add_argument("--model", default="resnet50", help="tiny_cnn or a torchvision model name")
    parser.add_argument("--algos", default="flat,torus",
                        help="comma-separated, from " + ", ".join(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per system")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--per-worker-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker, every system")
    parser.add_argument("--no-peer", action="store_true", help=f"skip the {PEER} rows")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="extra flashtrain config, e.g. "
                        "collective.overlap=false (may repeat)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--keep-runs", metavar="DIR",
                        help="keep the run directories (metrics.jsonl, step_split.png) here "
                        "(default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(n) for n in args.workers.split(",") if n]
    except ValueError:
        parser.error(f"--workers {args.workers!r}: give comma-separated integers, e.g. 2,4")
    if not args.workers or any(n < 2 or n % 2 for n in args.workers):
        parser.error(f"--workers {args.workers}: every count must be even and >= 2 "
                     "(the grid is (N/2)x2)")
    args.algos = [a for a in args.algos.split(",") if a]
    unknown = sorted(set(args.algos) - set(ALGORITHMS))
    if unknown or not args.algos:
        parser.error(f"--algos {','.join(unknown) or '(empty)'}: choose from {', '.join(ALGORITHMS)}")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    if args.per_worker_batch < 2:
        parser.error("--per-worker-batch must be >= 2")
    return args


def grid_for(num_workers: int) -> Grid:
    """A row per two workers: on 2 workers the torus is one row (reduce-scatter and
    all-gather only), on 4 a 2x2 with all three phases."""
    return Grid(num_workers // 2, 2)


def overrides(args: argparse.Namespace, num_workers: int, algorithm: str) -> list[str]:
    """The job configuration of one run: synthetic data, enough samples that the timed
    steps never reach an epoch end (no validation inside the timing)."""
    total_steps = args.warmup + args.steps
    global_batch = args.per_worker_batch * num_workers
    return [
        f"model.name={args.model}", "data.source=synthetic",
        f"data.synthetic_samples={global_batch * (total_steps + 1)}",
        f"data.image_size={args.image_size}", f"grid.shape={grid_for(num_workers)}",
        "grid.cpus_per_worker=1",  # main() gives Ray one logical CPU per worker
        f"grid.torch_threads={args.torch_threads}",
        f"collective.algorithm={algorithm}", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
        f"schedule.phases=[{{start_epoch: 0, global_batch: {global_batch}}}]",
        f"runtime.max_steps={total_steps}", "runtime.progress=false",
        "checkpoint.every_steps=100000", "elastic.commit_every_steps=100000",
        *args.overrides,
    ]


def summarize_steps(records: list[dict], warmup: int) -> dict:
    """Medians over the step records after ``warmup``."""
    steps = [r for r in records if r.get("kind") == "step"][warmup:]
    if not steps:
        raise RuntimeError("the run wrote no step records after the warm-up")

    def median(key: str) -> float:
        return statistics.median(r[key] for r in steps)

    step_s = median("step_seconds")
    return {"steps": len(steps), "step_s": step_s, "sync_s": median("sync_seconds"),
            "compute_s": median("compute_seconds"),
            "comm_exposed_s": median("comm_exposed_seconds"),
            "data_wait_s": median("data_wait_seconds"),
            "comm_exposed_share": statistics.median(r["comm_exposed_seconds"] / r["step_seconds"]
                                                    for r in steps),
            "images_per_sec": median("images_per_sec"), "global_batch": steps[0]["global_batch"]}


def run_flashtrain(args: argparse.Namespace, num_workers: int, algorithm: str,
                   workdir: Path) -> dict:
    """One Trainer run with ``algorithm``; its step records summarized. The run directory
    (``metrics.jsonl``, ``step_split.png``) is kept under ``workdir``."""
    from flashtrain.config import load_config
    from flashtrain.driver.trainer import Trainer

    config = load_config(None, overrides(args, num_workers, algorithm))
    run_dir = workdir / f"{algorithm}-{num_workers}"
    run_dir.mkdir(parents=True)
    trainer = Trainer(config, run_dir, workdir / "cache", say=lambda message: None)
    began = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"system": f"flashtrain_{algorithm}", "workers": num_workers,
            "grid": str(grid_for(num_workers)), **summarize_steps(records, args.warmup),
            "overlap": config.collective.overlap, "bucket_mb": config.collective.bucket_mb,
            "run_wall_s": time.perf_counter() - began, "run_dir": str(run_dir)}


def run_peer(args: argparse.Namespace, num_workers: int, workdir: Path) -> dict:
    """Ray Train v2 + DDP on the configuration flashtrain's torus run used, stopped after
    the same number of steps."""
    from flashtrain.bench.raytrain_peer import STOP_MARKER, run_raytrain
    from flashtrain.config import load_config

    config = load_config(None, overrides(args, num_workers, "torus"))
    if args.torch_threads != 1:
        raise SystemExit("the Ray Train peer runs one torch thread per worker: use "
                         "--torch-threads 1 (or --no-peer)")
    peer_dir = workdir / f"{PEER}-{num_workers}"
    peer_dir.mkdir(parents=True)
    total_steps = args.warmup + args.steps
    (peer_dir / STOP_MARKER).write_text(json.dumps({"at_step": total_steps}))
    began = time.perf_counter()
    outcome = run_raytrain(config, workdir=peer_dir, data_cache=workdir / "cache",
                           num_workers=num_workers, min_workers=num_workers,
                           cpus_per_worker=1.0, kill_at_step=None,
                           min_tail=config.data.min_samples_per_worker * num_workers,
                           max_failures=0)
    if outcome["error"]:
        raise RuntimeError(f"Ray Train run failed: {outcome['error']}")
    ends = [r["time"] for r in outcome["timeline"] if r["kind"] in ("start", "step")]
    step_times = [b - a for a, b in zip(ends, ends[1:], strict=False)][args.warmup:]
    if not step_times:
        raise RuntimeError("the Ray Train run recorded no steps after the warm-up")
    step_s = statistics.median(step_times)
    global_batch = args.per_worker_batch * num_workers
    return {"system": PEER, "workers": num_workers, "grid": None, "steps": len(step_times),
            "step_s": step_s, "images_per_sec": global_batch / step_s,
            "global_batch": global_batch, "run_wall_s": time.perf_counter() - began}


def add_ratios(rows: list[dict]) -> None:
    """images/s against Ray Train + DDP at the same worker count."""
    peers = {r["workers"]: r for r in rows if r["system"] == PEER}
    for row in rows:
        peer = peers.get(row["workers"])
        row["vs_raytrain"] = row["images_per_sec"] / peer["images_per_sec"] if peer else None


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{args.model}, {args.per_worker_batch} images per worker, {args.image_size}px "
             f"synthetic, {args.torch_threads} torch thread(s) per worker, medians of "
             f"{args.steps} steps after {args.warmup} warm-up, {os.cpu_count()} cores",
             f"{'workers':>7} {'system':<18}{'img/s':>8}{'step s':>9}{'compute s':>11}"
             f"{'exposed s':>11}{'exposed %':>11}{'data s':>8}{'vs RayTrain':>13}"]
    for r in rows:
        ratio = f"{r['vs_raytrain']:.2f}x" if r["vs_raytrain"] else "-"

        def cell(key: str, width: int, fmt: str, row=r) -> str:
            return f"{format(row[key], fmt):>{width}}" if key in row else f"{'-':>{width}}"

        share = (f"{r['comm_exposed_share']:>11.1%}" if "comm_exposed_share" in r
                 else f"{'-':>11}")
        lines.append(f"{r['workers']:>7} {r['system']:<18}{r['images_per_sec']:>8.1f}"
                     f"{r['step_s']:>9.3f}{cell('compute_s', 11, '.3f')}"
                     f"{cell('comm_exposed_s', 11, '.3f')}{share}{cell('data_wait_s', 8, '.3f')}"
                     f"{ratio:>13}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import ray

    if "--gpu" in argv:  # one GPU: the worker against a plain PyTorch loop
        return __import__("flashtrain.bench.gpu_throughput", fromlist=["main"]).main(argv)
    args = parse_args(argv)
    rows = []
    if args.keep_runs:
        Path(args.keep_runs).mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(args.keep_runs) if args.keep_runs
          else tempfile.TemporaryDirectory(prefix="flashtrain-throughput-")) as workdir:
        for num_workers in args.workers:
            # address="local": always a fresh instance, never a cluster someone else started.
            ray.init(address="local", num_cpus=num_workers + 1, include_dashboard=False,
                     log_to_driver=False)
            try:
                for algorithm in args.algos:
                    rows.append(run_flashtrain(args, num_workers, algorithm, Path(workdir)))
                if not args.no_peer:
                    rows.append(run_peer(args, num_workers, Path(workdir)))
            finally:
                ray.shutdown()
        add_ratios(rows)
        print(format_table(rows, args))
        if args.json:
            meta = {"workers": args.workers, "model": args.model,
                    "per_worker_batch": args.per_worker_batch, "image_size": args.image_size,
                    "steps": args.steps, "warmup": args.warmup,
                    "torch_threads": args.torch_threads, "overrides": args.overrides,
                    "cpu_count": os.cpu_count()}
            with open(args.json, "w") as handle:
                json.dump({"meta": meta, "results": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
