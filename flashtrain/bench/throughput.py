"""``python -m flashtrain.bench throughput``: flashtrain against the loops users write.

For each worker count, on one fresh local Ray instance, ``--repeats`` rounds, each round
one run of every system in the same order (A B A B A B: a load change on the shared
machine falls on both sides):

- flashtrain: a short synthetic-data run of :class:`flashtrain.driver.trainer.Trainer`
  per all-reduce algorithm in ``--algos`` (grid ``1x1`` for one worker, else ``(N/2)x2``,
  a row per two workers);
- its peer (:mod:`flashtrain.bench.plain_peer`): for N > 1 a plain Ray Train v2
  ``TorchTrainer`` + ``DistributedDataParallel`` loop as Ray's documentation shows it
  (``prepare_data_loader``, ``prepare_model``, SGD with momentum, one report per epoch);
  for N = 1 the same loop in one plain process, no Ray.

Every system gets one CPU and ``--torch-threads`` torch threads per worker, the same
model, image size and per-worker batch. A run's step time is the median, after the
``--warmup`` steps, of the time between consecutive step ends (flashtrain: the last
worker's, from ``metrics.jsonl``; the peers: rank 0's); flashtrain's slowest worker's
split into compute (forward, backward, optimizer), exposed communication (waiting for
the gradient all-reduce after the backward) and data wait comes beside. The summary gives
each system's median, min and max images/s over the rounds, the ratio of the medians and
each round's ratio (a system's run over the peer's run of the same round).
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
SINGLE = "plain_single_process"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4",
                        help="comma-separated worker counts (1, or even: grid (N/2)x2)")
    parser.add_argument("--model", default="resnet50", help="tiny_cnn or a torchvision model name")
    parser.add_argument("--algos", default="torus",
                        help="comma-separated, from " + ", ".join(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per system")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per worker count, systems interleaved in each")
    parser.add_argument("--per-worker-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1, help="per worker, every system")
    parser.add_argument("--no-peer", action="store_true", help="skip the peer rows")
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
    if not args.workers or any(n != 1 and (n < 2 or n % 2) for n in args.workers):
        parser.error(f"--workers {args.workers}: every count must be 1 or even "
                     "(the grid is 1x1 or (N/2)x2)")
    args.algos = [a for a in args.algos.split(",") if a]
    unknown = sorted(set(args.algos) - set(ALGORITHMS))
    if unknown or not args.algos:
        parser.error(f"--algos {','.join(unknown) or '(empty)'}: choose from {', '.join(ALGORITHMS)}")
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be >= 1")
    if args.torch_threads != 1 and not args.no_peer:
        parser.error("the peers run one torch thread per worker, as flashtrain's default: "
                     "use --torch-threads 1 (or --no-peer)")
    if args.per_worker_batch < 2:
        parser.error("--per-worker-batch must be >= 2")
    return args


def grid_for(num_workers: int) -> Grid:
    """A row per two workers: on 2 workers the torus is one row (reduce-scatter and
    all-gather only), on 4 a 2x2 with all three phases; one worker is a 1x1 grid."""
    return Grid(1, 1) if num_workers == 1 else Grid(num_workers // 2, 2)


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


def wall_step_seconds(ends: list[float], warmup: int) -> list[float]:
    """The time between consecutive step ends, for the steps after ``warmup``."""
    return [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:], strict=False)]


def summarize_steps(records: list[dict], warmup: int) -> dict:
    """Medians over the step records after ``warmup``."""
    all_steps = [r for r in records if r.get("kind") == "step"]
    steps = all_steps[warmup:]
    if not steps:
        raise RuntimeError("the run wrote no step records after the warm-up")

    def median(key: str) -> float:
        return statistics.median(r[key] for r in steps)

    step_s = statistics.median(wall_step_seconds([r["time"] for r in all_steps], warmup))
    return {"steps": len(steps), "step_s": step_s, "worker_step_s": median("step_seconds"),
            "sync_s": median("sync_seconds"), "compute_s": median("compute_seconds"),
            "comm_exposed_s": median("comm_exposed_seconds"),
            "data_wait_s": median("data_wait_seconds"),
            "comm_exposed_share": statistics.median(r["comm_exposed_seconds"] / r["step_seconds"]
                                                    for r in steps),
            "images_per_sec": steps[0]["global_batch"] / step_s,
            "global_batch": steps[0]["global_batch"]}


def run_flashtrain(args: argparse.Namespace, num_workers: int, algorithm: str,
                   workdir: Path, repeat: int) -> dict:
    """One Trainer run with ``algorithm``; its step records summarized. The run directory
    (``metrics.jsonl``, ``step_split.png``) is kept under ``workdir``."""
    from flashtrain.config import load_config
    from flashtrain.driver.trainer import Trainer

    config = load_config(None, overrides(args, num_workers, algorithm))
    run_dir = workdir / f"{algorithm}-{num_workers}-{repeat}"
    run_dir.mkdir(parents=True)
    trainer = Trainer(config, run_dir, workdir / "cache", say=lambda message: None)
    began = time.perf_counter()
    try:
        trainer.train()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"system": f"flashtrain_{algorithm}", "workers": num_workers, "repeat": repeat,
            "grid": str(grid_for(num_workers)), **summarize_steps(records, args.warmup),
            "overlap": config.collective.overlap, "bucket_mb": config.collective.bucket_mb,
            "run_wall_s": time.perf_counter() - began, "run_dir": str(run_dir)}


def peer_name(num_workers: int) -> str:
    return SINGLE if num_workers == 1 else PEER


def run_peer(args: argparse.Namespace, num_workers: int, workdir: Path, repeat: int) -> dict:
    """The plain loop on the same model, data, batch and threads, for as many steps."""
    from flashtrain.bench import plain_peer
    from flashtrain.config import load_config

    data = load_config(None, overrides(args, num_workers, "torus")).data
    total_steps = args.warmup + args.steps
    spec = {"model": args.model, "samples": args.per_worker_batch * num_workers * total_steps,
            "image_size": args.image_size, "seed": data.seed, "batch": args.per_worker_batch,
            "torch_threads": args.torch_threads, "loader_workers": 0, "epochs": 1}
    began = time.perf_counter()
    if num_workers == 1:
        ends = plain_peer.run_single_process({**spec, "niceness": ray_worker_niceness()})
    else:
        storage = workdir / f"{PEER}-{num_workers}-{repeat}"
        ends = plain_peer.run_ray_train(spec, num_workers, str(storage.resolve()))
    step_times = wall_step_seconds(ends, args.warmup)
    if not step_times:
        raise RuntimeError(f"{peer_name(num_workers)} recorded no steps after the warm-up")
    step_s = statistics.median(step_times)
    global_batch = args.per_worker_batch * num_workers
    return {"system": peer_name(num_workers), "workers": num_workers, "repeat": repeat,
            "grid": None, "steps": len(step_times), "step_s": step_s,
            "images_per_sec": global_batch / step_s, "global_batch": global_batch,
            "run_wall_s": time.perf_counter() - began}


def ray_worker_niceness() -> int:
    """The niceness Ray starts its worker processes with (15 unless the raylet was told
    otherwise), asked from one: flashtrain's workers run at it, so the plain process
    gets it too, and on a shared machine both get the same share of the cores."""
    import ray

    return ray.get(ray.remote(num_cpus=0)(_own_niceness).remote(), timeout=120)


def _own_niceness() -> int:
    return os.nice(0)


def summarize(runs: list[dict]) -> list[dict]:
    """Per worker count and system: median, min and max images/s over the rounds, the
    medians of the split, and the ratio of the medians against the peer."""
    keys = list(dict.fromkeys((r["workers"], r["system"]) for r in runs))
    rows = []
    for workers, system in keys:
        mine = [r for r in runs if (r["workers"], r["system"]) == (workers, system)]
        ips = [r["images_per_sec"] for r in mine]
        row = {"workers": workers, "system": system, "grid": mine[0]["grid"],
               "repeats": len(mine), "images_per_sec": statistics.median(ips),
               "images_per_sec_min": min(ips), "images_per_sec_max": max(ips),
               "step_s": statistics.median(r["step_s"] for r in mine)}
        for key in ("compute_s", "comm_exposed_s", "comm_exposed_share", "data_wait_s"):
            if key in mine[0]:
                row[key] = statistics.median(r[key] for r in mine)
        rows.append(row)
    peers = {r["workers"]: r for r in rows if r["system"] in (PEER, SINGLE)}
    for row in rows:
        peer = peers.get(row["workers"])
        row["vs_peer"] = row["images_per_sec"] / peer["images_per_sec"] if peer else None
        row["vs_peer_rounds"] = _round_ratios(runs, row) if peer else None
    return rows


def _round_ratios(runs: list[dict], row: dict) -> list[float]:
    """Each round's run of ``row``'s system over the peer's run of the same round (the
    pairs that shared the machine's load most closely)."""
    def speeds(systems) -> dict:
        return {r["repeat"]: r["images_per_sec"] for r in runs
                if r["workers"] == row["workers"] and r["system"] in systems}

    mine, peer = speeds((row["system"],)), speeds((PEER, SINGLE))
    return [mine[k] / peer[k] for k in sorted(mine) if k in peer]


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{args.model}, {args.per_worker_batch} images per worker, {args.image_size}px "
             f"synthetic, {args.torch_threads} torch thread(s) per worker, {args.steps} steps "
             f"after {args.warmup} warm-up per run, {args.repeats} interleaved rounds, "
             f"{os.cpu_count()} cores",
             f"{'workers':>7} {'system':<21}{'img/s med':>10}{'min':>8}{'max':>8}{'step s':>8}"
             f"{'compute s':>10}{'exposed s':>10}{'exposed':>8}{'data s':>8}{'vs peer':>9}"
             "  per round"]
    for r in rows:
        ratio = f"{r['vs_peer']:.3f}x" if r["vs_peer"] else "-"
        rounds = " ".join(f"{x:.2f}" for x in r["vs_peer_rounds"] or [])

        def cell(key: str, width: int, fmt: str, row=r) -> str:
            return f"{format(row[key], fmt):>{width}}" if key in row else f"{'-':>{width}}"

        lines.append(f"{r['workers']:>7} {r['system']:<21}{r['images_per_sec']:>10.1f}"
                     f"{r['images_per_sec_min']:>8.1f}{r['images_per_sec_max']:>8.1f}"
                     f"{r['step_s']:>8.3f}{cell('compute_s', 10, '.3f')}"
                     f"{cell('comm_exposed_s', 10, '.3f')}{cell('comm_exposed_share', 8, '.1%')}"
                     f"{cell('data_wait_s', 8, '.3f')}{ratio:>9}  {rounds}")
    return "\n".join(lines)


def run_round(args: argparse.Namespace, num_workers: int, workdir: Path, repeat: int) -> list:
    """One run of every system, in a fixed order."""
    runs = [run_flashtrain(args, num_workers, algorithm, workdir, repeat)
            for algorithm in args.algos]
    if not args.no_peer:
        runs.append(run_peer(args, num_workers, workdir, repeat))
    for run in runs:
        print(f"  round {repeat} {run['workers']} worker(s) {run['system']}: "
              f"{run['images_per_sec']:.1f} img/s", file=sys.stderr, flush=True)
    return runs


def main(argv: list[str]) -> int:
    import ray

    if "--gpu" in argv:  # one GPU: the worker against a plain PyTorch loop
        return __import__("flashtrain.bench.gpu_throughput", fromlist=["main"]).main(argv)
    args = parse_args(argv)
    runs = []
    if args.keep_runs:
        Path(args.keep_runs).mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(args.keep_runs) if args.keep_runs
          else tempfile.TemporaryDirectory(prefix="flashtrain-throughput-")) as workdir:
        for num_workers in args.workers:
            # address="local": always a fresh instance, never a cluster someone else started.
            ray.init(address="local", num_cpus=num_workers + 1, include_dashboard=False,
                     log_to_driver=False)
            try:
                for repeat in range(args.repeats):
                    runs.extend(run_round(args, num_workers, Path(workdir), repeat))
            finally:
                ray.shutdown()
        rows = summarize(runs)
        print(format_table(rows, args))
        if args.json:
            meta = {"workers": args.workers, "model": args.model,
                    "per_worker_batch": args.per_worker_batch, "image_size": args.image_size,
                    "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                    "torch_threads": args.torch_threads, "overrides": args.overrides,
                    "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
            with open(args.json, "w") as handle:
                json.dump({"meta": meta, "summary": rows, "runs": runs}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
