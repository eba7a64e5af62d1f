"""``python -m flashtrain.bench recipe``: the paper's recipe, ingredient by ingredient.

Trains the same model on the same data with the same budget of samples (same epochs)
under three batch schedules, each with and without label smoothing, over several seeds:

* ``small``: a fixed small global batch for the whole run;
* ``large``: a fixed large global batch for the whole run;
* ``control``: the paper's batch-size control, the small batch until ``--switch-epoch``
  and the large one after (Mikami et al. went 34K -> 68K at a third of the run).

Every run is the job's own :class:`flashtrain.driver.trainer.Trainer` with a config
built from the embedded default and ``--set``-style overrides, exactly what
``python -m flashtrain.jobs.imagenet --set ...`` builds (all runs share one local Ray,
so Ray's start-up is paid once). The learning rate follows the schedule's linear-scaling
rule (``base_lr`` per ``base_batch``), with warm-up and, at the control's switch, the
schedule's ramp to the larger batch's LR. Prints final top-1 (mean and spread over
seeds) and wall time per variant, writes a PNG and, with ``--json``, the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flashtrain.topology import Grid

SCHEDULES = ("small", "large", "control")


@dataclass(frozen=True)
class Variant:
    """One cell of the sweep: a batch schedule and a label smoothing value."""

    schedule: str
    label_smoothing: float

    @property
    def name(self) -> str:
        return f"{self.schedule}{'+ls' if self.label_smoothing else ''}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench recipe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="image folder with train/<class>/* and val/<class>/* "
                        "(default: the embedded digits)")
    parser.add_argument("--model", default="tiny_cnn", help="tiny_cnn or a torchvision model name")
    parser.add_argument("--grid", type=Grid.parse, default=Grid(1, 2), help="RxC (default 1x2)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of every run (the sample budget)")
    parser.add_argument("--small-batch", type=int, default=32, help="global batch of 'small'")
    parser.add_argument("--large-batch", type=int, default=256, help="global batch of 'large'")
    parser.add_argument("--switch-epoch", type=int, default=2,
                        help="epoch at which 'control' moves from the small to the large batch")
    parser.add_argument("--label-smoothing", type=float, default=0.1,
                        help="the smoothing of the '+ls' variants (the others use 0)")
    parser.add_argument("--base-lr", type=float, default=0.4, help="LR at --base-batch (linear scaling)")
    parser.add_argument("--base-batch", type=int, default=256)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (0, 1, ...)")
    parser.add_argument("--variants", help="comma-separated subset, e.g. small,control+ls "
                        "(default: all six)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="one more job override for every run, as the job's --set takes it "
                        "(repeatable; applied after the sweep's own)")
    parser.add_argument("--runs-dir", help="keep every run directory here (default: a temporary "
                        "folder removed at the end)")
    parser.add_argument("--plot", default="recipe.png", help="PNG to write (default %(default)s)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def all_variants(label_smoothing: float) -> list[Variant]:
    return [Variant(s, ls) for s in SCHEDULES for ls in (0.0, label_smoothing)]


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One clear message for a sweep that cannot run."""
    names = {v.name: v for v in all_variants(args.label_smoothing)}
    wanted = [n for n in (args.variants or ",".join(names)).split(",") if n]
    unknown = [n for n in wanted if n not in names]
    if unknown or not wanted:
        parser.error(f"--variants {','.join(unknown) or '(empty)'}: choose from {', '.join(names)}")
    args.variant_list = [names[n] for n in wanted]
    if not 0 < args.label_smoothing < 1:
        parser.error(f"--label-smoothing {args.label_smoothing}: must be in (0, 1)")
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be >= 1")
    if any(v.schedule == "control" for v in args.variant_list) and not 0 < args.switch_epoch < args.epochs:
        parser.error(f"--switch-epoch {args.switch_epoch}: batch-size control needs a switch "
                     f"inside the run (1 .. {args.epochs - 1}); raise --epochs")
    if not args.small_batch < args.large_batch:
        parser.error("--small-batch must be smaller than --large-batch")
    if args.small_batch < 2 * args.grid.num_workers:
        parser.error(f"--small-batch {args.small_batch} is too small for grid {args.grid} "
                     f"(at least {2 * args.grid.num_workers})")
    if args.warmup_epochs >= args.epochs:
        parser.error("--warmup-epochs must be shorter than --epochs")
    if args.runs_dir and Path(args.runs_dir).is_dir() and any(Path(args.runs_dir).iterdir()):
        parser.error(f"--runs-dir {args.runs_dir} is not empty: choose a new folder")
    from flashtrain.config import ConfigError, load_config

    try:
        load_config(None, overrides(args.variant_list[0], 0, args))
    except ConfigError as err:
        parser.error(str(err))
    if args.data and not (Path(args.data) / "train").is_dir():
        parser.error(f"--data {args.data}: no train/ folder inside (expected train/<class>/* "
                     "and val/<class>/*)")


def phases(variant: Variant, args: argparse.Namespace) -> list[tuple[int, int]]:
    """``(start_epoch, global_batch)`` of each batch phase of ``variant``."""
    if variant.schedule == "small":
        return [(0, args.small_batch)]
    if variant.schedule == "large":
        return [(0, args.large_batch)]
    return [(0, args.small_batch), (args.switch_epoch, args.large_batch)]


def overrides(variant: Variant, seed: int, args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides of one run (what ``python -m flashtrain.jobs.imagenet`` takes)."""
    phase_text = ", ".join(f"{{start_epoch: {s}, global_batch: {b}}}" for s, b in phases(variant, args))
    data = (["data.source=imagefolder", f"data.root={Path(args.data).resolve()}"]
            if args.data else ["data.source=digits"])
    return [
        "runtime.preset=recipe", "runtime.progress=false", f"runtime.seed={seed}",
        f"data.seed={seed}", *data, f"model.name={args.model}", f"grid.shape={args.grid}",
        "grid.cpus_per_worker=0.5", "collective.algorithm=torus", "collective.bucket_mb=1",
        f"schedule.epochs={args.epochs}", f"schedule.phases=[{phase_text}]",
        f"schedule.base_lr={args.base_lr}", f"schedule.base_batch={args.base_batch}",
        f"schedule.warmup_epochs={args.warmup_epochs}", "schedule.batch_ramp_epochs=0.5",
        "schedule.decay=cosine", f"schedule.label_smoothing={variant.label_smoothing}",
        # Durable checkpoints cost time and change nothing the sweep measures. (Commits stay
        # at their default: they also bound the driver's step windows.)
        "checkpoint.every_steps=100000",
        *args.extra,
    ]


def run_one(variant: Variant, seed: int, args: argparse.Namespace, runs_dir: Path) -> dict:
    """One training run through the job's Trainer; its summary and batch history."""
    from flashtrain.config import dump_config, load_config
    from flashtrain.driver.trainer import Trainer
    from flashtrain.train.metrics import read_metrics, records_of

    config = load_config(None, overrides(variant, seed, args))
    run_dir = runs_dir / f"{variant.name}-seed{seed}"
    run_dir.mkdir(parents=True)
    run_dir.joinpath("config.yaml").write_text(dump_config(config))  # as the job writes it
    trainer = Trainer(config, run_dir, runs_dir / "data-cache", say=lambda message: None)
    began = time.perf_counter()
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    wall = time.perf_counter() - began
    steps = records_of(read_metrics(run_dir / "metrics.jsonl"), "step")
    batches = sorted({r["global_batch"] for r in steps})
    return {"variant": variant.name, "seed": seed, "top1": summary["final_top1"],
            "top5": summary["final_top5"], "wall_s": wall, "global_steps": summary["global_steps"],
            "global_batches": batches, "samples": sum(summary["samples_per_epoch"]),
            "run_dir": str(run_dir)}


def aggregate(runs: list[dict], variants: list[Variant]) -> list[dict]:
    """Mean and spread of top-1 and wall time per variant."""
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant.name]
        top1 = [r["top1"] for r in mine]
        wall = [r["wall_s"] for r in mine]
        rows.append({"variant": variant.name, "schedule": variant.schedule,
                     "label_smoothing": variant.label_smoothing, "seeds": len(mine),
                     "top1_mean": statistics.fmean(top1),
                     "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                     "top1_min": min(top1), "top1_max": max(top1),
                     "wall_s_mean": statistics.fmean(wall),
                     "global_steps": mine[0]["global_steps"],
                     "global_batches": mine[0]["global_batches"]})
    return rows


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    data = args.data or "digits (1,438 train / 359 val)"
    lines = [f"{args.model} on {data}, grid {args.grid}, {args.epochs} epochs per run, batch "
             f"{args.small_batch} / {args.large_batch} (control switches at epoch "
             f"{args.switch_epoch}), LR {args.base_lr} per {args.base_batch}, {os.cpu_count()} cores",
             f"{'variant':>12}{'batches':>10}{'steps':>7}{'top-1 mean':>12}{'std':>7}"
             f"{'min..max':>15}{'wall s':>8}{'seeds':>6}"]
    for r in rows:
        batches = "->".join(str(b) for b in r["global_batches"])
        spread = f"{r['top1_min']:.1%}..{r['top1_max']:.1%}"
        lines.append(f"{r['variant']:>12}{batches:>10}{r['global_steps']:>7}"
                     f"{r['top1_mean']:>12.2%}{r['top1_std']:>7.2%}{spread:>15}"
                     f"{r['wall_s_mean']:>8.1f}{r['seeds']:>6}")
    return "\n".join(lines)


def write_plot(rows: list[dict], runs: list[dict], path: Path) -> None:
    """Top-1 per variant (each seed a dot, the mean a bar) beside the mean wall time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    accuracy, wall = figure.subplots(1, 2)
    names = [r["variant"] for r in rows]
    positions = range(len(rows))
    accuracy.bar(positions, [r["top1_mean"] for r in rows], color="tab:blue", alpha=0.5)
    for index, name in enumerate(names):
        seeds = [r["top1"] for r in runs if r["variant"] == name]
        accuracy.plot([index] * len(seeds), seeds, "k.")
    low = min(r["top1_min"] for r in rows)
    accuracy.set_ylim(max(0.0, low - 0.05), 1.0)
    accuracy.set_ylabel("final top-1 (validation)")
    wall.bar(positions, [r["wall_s_mean"] for r in rows], color="tab:orange")
    wall.set_ylabel("wall seconds per run (mean)")
    for axes in (accuracy, wall):
        axes.set_xticks(list(positions), names, rotation=30, ha="right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def sweep(args: argparse.Namespace, runs_dir: Path) -> list[dict]:
    import ray

    cpus = max(2, int(args.grid.num_workers * 0.5 + 1))
    # address="local": always a fresh instance, never a cluster someone else started.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        for seed in range(args.seeds):
            for variant in args.variant_list:
                run = run_one(variant, seed, args, runs_dir)
                print(f"  {variant.name:>10} seed {seed}: top-1 {run['top1']:.2%}, "
                      f"{run['wall_s']:.1f} s, batches {run['global_batches']}", flush=True)
                runs.append(run)
    finally:
        ray.shutdown()
    return runs


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flashtrain-recipe-") as scratch:
        runs_dir = Path(args.runs_dir).resolve() if args.runs_dir else Path(scratch)
        runs = sweep(args, runs_dir)
    rows = aggregate(runs, args.variant_list)
    print(format_table(rows, args))
    write_plot(rows, runs, Path(args.plot))
    print(f"plot: {args.plot}")
    if args.json:
        meta = {key: getattr(args, key) for key in ("data", "model", "epochs", "small_batch",
                                                    "large_batch", "switch_epoch", "label_smoothing",
                                                    "base_lr", "base_batch", "warmup_epochs", "seeds")}
        meta.update(grid=str(args.grid), cpu_count=os.cpu_count())
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "variants": rows, "runs": runs}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
