"""``python -m flashtrain.bench control``: what the driver costs per step, per-step loop
against step windows against windows relayed down a tree, as the grid grows.

The driver's own loop (:meth:`flashtrain.driver.trainer.Trainer.train_steps`: the clock actor,
the elastic controller's fail-fast calls, the metrics records, commits) runs unchanged
against *stub* workers: Ray actors, spread over an emulated cluster
(``ray.cluster_utils.Cluster``), that answer ``train_window`` at once without training
and relay windows with the product's own :class:`~flashtrain.train.relay.WindowRelay`.
What is left of a step's time is the control plane's. It is measured for N workers in
three modes:

* ``per-step``: ``runtime.step_windows=false``, one call per worker per step;
* ``windowed``: one call per worker per window (the steps up to the next commit
  boundary, with the commit folded in);
* ``relayed``: windows, and ``runtime.relay_fanout=--fanout``: the driver calls rank 0,
  which relays down a tree of the workers (grids no larger than the fan-out are called
  directly, as in ``windowed``).

Per N and mode it prints the driver process's CPU milliseconds per step (its own
threads, Ray's included: what would saturate a driver at scale), the wall milliseconds
per step, and the calls the driver made per step; it fits ``ms = a + b * N`` per mode
(least squares) and extrapolates to the paper's 2,176 workers beside the paper's step
time (about 0.1 s: 90 epochs of 1.28 M images at 34K-68K per step in 224 s is roughly
2,700 steps in 224 s, 0.083 s a step).

On one machine every stub's process shares the driver's cores, so the *wall* time grows
with N in every mode (the N answers are computed on the same cores); on a cluster the
members run elsewhere. The driver's CPU time is the figure that does not depend on that.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from flashtrain.config import load_config
from flashtrain.driver.progress import Progress
from flashtrain.driver.trainer import Trainer
from flashtrain.elastic.ray_group import RayWorkerGroup
from flashtrain.elastic.worker_group import Member
from flashtrain.tasks.images import ImageClassification
from flashtrain.topology import Grid
from flashtrain.train.clock import StepPlan, StepResult, TrainingClock
from flashtrain.train.relay import RELAY_GROUP, WindowAnswer, WindowRelay, tree_depth
from flashtrain.train.worker import CONTROL_GROUP

PAPER_WORKERS = 2176
PAPER_STEP_S = 224 / 2700  # see the module docstring
PER_WORKER_BATCH = 32


@ray.remote(num_cpus=0, concurrency_groups={CONTROL_GROUP: 1, RELAY_GROUP: 1})
class StubWorker:
    """Answers the driver's step-loop calls at once, like a worker with nothing to train.
    Counts the step loop's calls it gets (validation, once an epoch, is left out)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.calls = 0  # train_window and commit calls, from the driver or a relay
        self.relay_calls = 0
        self.window_thread = ThreadPoolExecutor(max_workers=1)

    def train_window(self, plans: list[StepPlan], commit: bool = False) -> list[StepResult]:
        self.calls += 1
        now = time.time()
        return [StepResult(p.global_step, self.rank, PER_WORKER_BATCH, 0.0, 0, 0.0, 0.0,
                           seconds=0.0, finished_at=now) for p in plans]

    def commit(self, step: int) -> int:
        self.calls += 1
        return 0

    def validate(self) -> dict:
        return {"metrics": {"top1": 0, "top5": 0}, "count": 1, "loss_sum": 0.0, "skipped": 0}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def abort_collectives(self, generation: int, reason: str) -> bool:
        return False

    def set_relay(self, relay: WindowRelay) -> None:
        self.relay = relay

    @ray.method(concurrency_group=RELAY_GROUP)
    def relay_window(self, generation: int, plans: list[StepPlan], commit: bool,
                     timeout: float) -> WindowAnswer:
        """The real relay (:class:`~flashtrain.train.relay.WindowRelay`) over stubs."""
        self.relay_calls += 1
        return self.relay.run(lambda: self.window_thread.submit(self.train_window, plans, commit),
                              plans, commit, timeout)

    def take_calls(self) -> tuple[int, int]:
        """(train_window and commit calls, relay_window calls) since the last time, and
        start again."""
        counts = self.calls, self.relay_calls
        self.calls = self.relay_calls = 0
        return counts


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench control",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="4,16,64,128",
                        help="comma-separated worker counts (default 4,16,64,128)")
    parser.add_argument("--steps", type=int, default=100, help="steps per measurement")
    parser.add_argument("--commit-every", type=int, default=5,
                        help="elastic.commit_every_steps: the window length (default 5, the "
                             "project's default)")
    parser.add_argument("--nodes", type=int, default=4, help="emulated Ray nodes (default 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measurements per (N, mode); the median is reported")
    parser.add_argument("--fanout", type=int, default=8,
                        help="runtime.relay_fanout of the relayed mode (default 8)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    asked = set(args.modes.split(","))
    if not asked or asked - set(MODES):
        parser.error(f"--modes {args.modes!r}: give a comma-separated subset of {','.join(MODES)}")
    args.modes = [m for m in MODES if m in asked]
    if args.fanout < 2:
        parser.error("--fanout must be at least 2")
    try:
        args.sizes = sorted({int(n) for n in args.workers.split(",")})
    except ValueError:
        parser.error(f"--workers {args.workers!r}: give comma-separated integers, e.g. 4,16,64")
    if not args.sizes or args.sizes[0] < 1 or args.steps < 1 or args.commit_every < 1:
        parser.error("--workers, --steps and --commit-every must be positive")
    return args


def start_cluster(nodes: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    return cluster


MODES = ("per-step", "windowed", "relayed")


def measure(stubs: list, size: int, mode: str, args: argparse.Namespace,
            workdir: Path) -> dict:
    """Run the driver's loop for ``args.steps`` steps over the first ``size`` stubs in
    ``mode`` (see the module docstring): wall and driver-process CPU milliseconds per
    step, and the calls the driver made per step."""
    grid = Grid(1, size)
    global_batch = PER_WORKER_BATCH * size
    fanout = args.fanout if mode == "relayed" else 0
    config = load_config(None, [
        f"grid.shape=1x{size}", "runtime.progress=false", "runtime.log_every_steps=1",
        f"runtime.step_windows={str(mode != 'per-step').lower()}",
        f"runtime.relay_fanout={fanout}", "checkpoint.every_steps=1000000000",
        f"elastic.commit_every_steps={args.commit_every}", "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        f"schedule.phases=[{{start_epoch: 0, global_batch: {global_batch}}}]"])
    run_dir = Path(tempfile.mkdtemp(dir=workdir, prefix=f"n{size}-"))
    task = ImageClassification.from_config(config, str(workdir))  # for spares: none here
    group = RayWorkerGroup(config, task)
    trainer = Trainer(config, run_dir, task, say=lambda *_: None, group=group)
    trainer.adopt_grid(grid, [Member(s, "stub", None, 0) for s in stubs[:size]],
                       TrainingClock(num_samples=global_batch * args.steps, seed=0,
                                     min_tail=0).state_dict())
    ray.get([s.take_calls.remote() for s in stubs[:size]])
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train_steps(Progress(args.steps, 0, enabled=False))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    counts = ray.get([s.take_calls.remote() for s in stubs[:size]])
    # Relayed, the driver calls rank 0 only (its relay_window calls); else every
    # train_window and commit call a stub got came from the driver.
    relayed = bool(fanout) and size > fanout
    driver_calls = counts[0][1] if relayed else sum(c for c, _ in counts)
    trainer.metrics.close()
    trainer.clock.close()
    return {"workers": size, "mode": mode, "ms_per_step": 1000 * wall / args.steps,
            "driver_cpu_ms_per_step": 1000 * cpu / args.steps,
            "driver_calls_per_step": driver_calls / args.steps,
            "worker_calls_per_step": [c / args.steps for c, _ in counts],
            "tree_depth": tree_depth(size, fanout) if relayed else 0}


IDLE_SECONDS = 3.0


def idle_cpu_ms_per_s(seconds: float) -> float:
    """The driver process's CPU milliseconds per second while it calls nothing."""
    began, cpu = time.perf_counter(), time.process_time()
    time.sleep(seconds)
    return 1000 * (time.process_time() - cpu) / (time.perf_counter() - began)


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``y = a + b * n``."""
    count = len(points)
    if count == 1:
        return points[0][1], 0.0
    mean_n = sum(n for n, _ in points) / count
    mean_y = sum(y for _, y in points) / count
    spread = sum((n - mean_n) ** 2 for n, _ in points)
    slope = sum((n - mean_n) * (y - mean_y) for n, y in points) / spread
    return mean_y - slope * mean_n, slope


def run(args: argparse.Namespace) -> dict:
    cluster = start_cluster(args.nodes)
    try:
        stubs = [StubWorker.options(scheduling_strategy="SPREAD").remote(rank)
                 for rank in range(args.sizes[-1])]
        ray.get([s.take_calls.remote() for s in stubs], timeout=900)  # all started
        idle = idle_cpu_ms_per_s(IDLE_SECONDS)
        print(f"  driver CPU while idle: {idle:.2f} ms per s", flush=True)
        rows = []
        with tempfile.TemporaryDirectory(prefix="flashtrain-control-") as workdir:
            for size in args.sizes:
                for mode in args.modes:
                    runs = [measure(stubs, size, mode, args, Path(workdir))
                            for _ in range(args.repeats)]
                    runs.sort(key=lambda r: r["driver_cpu_ms_per_step"])
                    row = runs[len(runs) // 2]
                    row["ms_per_step_runs"] = [round(r["ms_per_step"], 3) for r in runs]
                    row["driver_cpu_ms_per_step_runs"] = [
                        round(r["driver_cpu_ms_per_step"], 3) for r in runs]
                    # What the loop itself cost, less what the driver burns anyway
                    # over the same wall time (Ray's threads with the cluster's actors).
                    row["driver_loop_cpu_ms_per_step"] = max(
                        row["driver_cpu_ms_per_step"] - idle * row["ms_per_step"] / 1000, 0.0)
                    rows.append(row)
                    print(f"  N={size:<5} {mode:<9} driver CPU {row['driver_cpu_ms_per_step']:7.2f}"
                          f" ms/step ({row['driver_loop_cpu_ms_per_step']:.2f} less idle), "
                          f"wall {row['ms_per_step']:8.2f} ms/step", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    fits = {}
    for mode in args.modes:
        fit = {}
        for key in ("driver_cpu_ms_per_step", "driver_loop_cpu_ms_per_step", "ms_per_step"):
            a, b = fit_line([(r["workers"], r[key]) for r in rows if r["mode"] == mode])
            fit[key] = {"a_ms": a, "b_ms_per_worker": b, "at_paper_scale_ms": a + b * PAPER_WORKERS}
        fits[mode] = fit
    return {"benchmark": "control", "steps": args.steps, "commit_every": args.commit_every,
            "driver_idle_cpu_ms_per_s": idle,
            "fanout": args.fanout, "nodes": args.nodes, "rows": rows, "fits": fits,
            "paper_workers": PAPER_WORKERS, "paper_step_ms": 1000 * PAPER_STEP_S}


def format_table(result: dict) -> str:
    modes = [m for m in MODES if m in result["fits"]]
    lines = [f"driver cost per step, stub workers on {result['nodes']} emulated nodes, "
             f"{result['steps']} steps, commit every {result['commit_every']} steps, "
             f"relay fan-out {result['fanout']}",
             f"driver CPU ms/step, less idle (wall ms/step) [driver calls/step]; the driver "
             f"burns {result['driver_idle_cpu_ms_per_s']:.2f} ms of CPU per s while idle",
             f"{'workers':>8}" + "".join(f"{m:>34}" for m in modes)]
    by = {(r["workers"], r["mode"]): r for r in result["rows"]}
    for size in sorted({r["workers"] for r in result["rows"]}):
        cells = []
        for mode in modes:
            row = by[(size, mode)]
            cells.append(f"{row['driver_cpu_ms_per_step']:6.2f}, {row['driver_loop_cpu_ms_per_step']:5.2f}"
                         f" ({row['ms_per_step']:6.1f}) [{row['driver_calls_per_step']:6.2f}]")
        lines.append(f"{size:>8}" + "".join(f"{c:>34}" for c in cells))
    for mode in modes:
        for key, what in (("driver_cpu_ms_per_step", "driver CPU"),
                          ("driver_loop_cpu_ms_per_step", "less idle"), ("ms_per_step", "wall")):
            fit = result["fits"][mode][key]
            share = fit["at_paper_scale_ms"] / result["paper_step_ms"]
            lines.append(f"{mode:>9} {what:>10}: {fit['a_ms']:.2f} + {fit['b_ms_per_worker']:.4f} * N"
                         f" ms/step -> {fit['at_paper_scale_ms']:.0f} ms at "
                         f"N={result['paper_workers']:,} ({share:.2f}x the paper's "
                         f"{result['paper_step_ms']:.0f} ms step)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
