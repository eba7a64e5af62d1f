"""``python -m flashtrain.bench elastic``: recovery from one killed worker, flashtrain
against Ray Train v2's elastic ``TorchTrainer``.

Both systems train the same model on the same samples (flashtrain's sharding and clock:
step ``s`` is the same global batch at the same learning rate in both) with the same
number of CPU workers, each on its own fresh local Ray. In both, the last rank ends its
process at global step ``K`` just as that step's gradient all-reduce begins, so its
peers are blocked inside the collective. flashtrain then re-forms its grid from the last
in-memory commit; Ray Train restarts its worker group from the last checkpoint (one per
epoch, durable in ``RunConfig.storage_path``).

Measured identically for both, from one timeline of completed steps:

- **kill time**: when Ray's GCS recorded the killed worker actor dead (its ``EndTime``),
  the same instrument for both systems; the victim's own clock just before
  ``os._exit`` (Ray Train) or the fault's dispatch time (flashtrain) is the fallback;
- **recovery seconds** = (wall time of the first step completed after the kill) -
  (kill time);
- **resume step** ``R`` = the global step of that first step completed after the kill
  (the step the restarted run resumed from);
- **steps redone** = ``K - R`` = (last step completed before the kill) - ``R`` + 1: how
  many steps had completed before the kill and had to be trained again.

flashtrain's own ``reforms[0]`` (its ``recovery_seconds`` starts at failure detection,
not at the kill) and Ray Train's restart record are kept in the JSON as cross-checks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SYSTEMS = ("flashtrain", "raytrain")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench elastic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="workers in both systems")
    parser.add_argument("--kill-at-step", type=int, default=32,
                        help="global step (0-based) at which the last rank dies; the default "
                             "is mid epoch 1, so Ray Train resumes from its epoch-0 checkpoint")
    parser.add_argument("--model", default="tiny_cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--base-lr", type=float, default=0.8,
                        help="schedule.base_lr (at base_batch 256), the same in both")
    parser.add_argument("--commit-every", type=int, default=5,
                        help="flashtrain elastic.commit_every_steps")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="Ray CPUs per worker (logical; both systems)")
    parser.add_argument("--max-failures", type=int, default=3, help="Ray Train FailureConfig")
    parser.add_argument("--fixed-raytrain", action="store_true",
                        help="Ray Train with a fixed num_workers=N instead of (N-1, N)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra flashtrain config override applied to both (repeatable)")
    parser.add_argument("--data-cache", type=Path, default=None,
                        help="digits cache folder (default ~/.cache/flashtrain/digits)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep run dirs here (default: a temporary folder, removed)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--external-kills", type=int, default=0, metavar="N",
                        help="instead of one injected death: SIGKILL N workers from outside, "
                             "one at a time, at seeded random moments (flashtrain.bench."
                             "external_kills), and report the distribution of recoveries")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments and victims")
    parser.add_argument("--steps-before-kills", type=int, default=10,
                        help="completed steps before the first external kill")
    parser.add_argument("--min-gap", type=float, default=1.0,
                        help="shortest wait (s) after a recovery before the next kill")
    parser.add_argument("--max-gap", type=float, default=4.0,
                        help="longest wait (s) after a recovery before the next kill")
    args = parser.parse_args(argv)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from {SYSTEMS}")
    if args.workers < 2:
        parser.error("--workers must be at least 2 (one of them is killed)")
    return args


def grid_for(num_workers: int) -> str:
    """The squarest ``RxC`` grid of ``num_workers`` (rows <= cols): 4 -> 2x2, 6 -> 2x3."""
    rows = max(r for r in range(1, int(num_workers ** 0.5) + 1) if num_workers % r == 0)
    return f"{rows}x{num_workers // rows}"


def overrides(args: argparse.Namespace) -> list[str]:
    """The flashtrain config both systems train from."""
    return [f"model.name={args.model}", f"grid.shape={grid_for(args.workers)}",
            f"grid.cpus_per_worker={args.cpus_per_worker}", f"schedule.epochs={args.epochs}",
            f"schedule.phases=[{{start_epoch: 0, global_batch: {args.global_batch}}}]",
            f"schedule.base_lr={args.base_lr}", "schedule.warmup_epochs=0.2",
            f"faults.kill_worker_at_steps=[{args.kill_at_step}]", "faults.kill_during=allreduce",
            f"elastic.commit_every_steps={args.commit_every}", "runtime.progress=false",
            "collective.bucket_mb=1", "collective.timeout_s=10", "runtime.remote_timeout_s=120",
            "checkpoint.every_steps=100000", *args.set]


def measure_recovery(kill_time: float, kill_step: int, steps: list[tuple[int, float]]) -> dict:
    """Recovery of one kill from ``steps``: ``(global step, wall time completed)`` of
    every completed step in completion order, redone ones included (module docstring)."""
    before = [step for step, at in steps if at <= kill_time]
    after = [(at, step) for step, at in steps if at > kill_time]
    if not after:
        return {"recovery_seconds": None, "resume_step": None, "steps_redone": None,
                "last_step_before_kill": max(before, default=None)}
    first_time, resume_step = min(after)
    return {"recovery_seconds": first_time - kill_time, "resume_step": resume_step,
            "steps_redone": kill_step - resume_step,
            "last_step_before_kill": max(before, default=None)}


def gcs_death_time(class_name: str, not_before: float | None = None,
                   pid: int | None = None) -> float | None:
    """Unix time at which Ray's GCS first recorded an actor of ``class_name`` dead, at or
    after ``not_before`` (the fault's dispatch) or, given ``pid``, the one in that process.
    The killed worker dies first; the others end later, at a restart or at shutdown."""
    from ray._private import state  # the GCS actor table: no dashboard needed

    ends = [info["EndTime"] / 1000.0 for info in state.actors().values()
            if info["ActorClassName"].endswith(class_name) and info["State"] == "DEAD"
            and info["EndTime"] and (pid is None or info["Pid"] == pid)]
    # GCS stamps in whole milliseconds: allow that much before the dispatch time.
    return min((t for t in ends if not_before is None or t >= not_before - 1e-3), default=None)


def init_ray(args: argparse.Namespace, dashboard: bool) -> None:
    """A fresh local Ray (never a cluster someone else started).

    Ray Train v2 needs the dashboard: its ``PlacementGroupCleaner`` asks the State API
    (served by the dashboard) whether the train controller is alive, and without one it
    takes the controller for dead and removes the worker group's placement group about a
    second after the first start, which costs a spurious restart. flashtrain needs none.
    """
    import ray

    ray.init(address="local", num_cpus=max(4, int(args.workers * args.cpus_per_worker) + 2),
             include_dashboard=dashboard, log_to_driver=False)


def run_flashtrain(args: argparse.Namespace, config, workdir: Path) -> dict:
    import ray

    from flashtrain.driver.trainer import Trainer
    from flashtrain.train.metrics import read_metrics

    run_dir = workdir / "flashtrain"
    run_dir.mkdir(parents=True)
    init_ray(args, dashboard=False)
    try:
        trainer = Trainer(config, run_dir, args.data_cache, say=lambda message: None)
        try:
            summary = trainer.train()
            start = trainer.metrics.start_time
            records = read_metrics(run_dir / "metrics.jsonl")
            fault = next((start + r["time"] for r in records
                          if r["kind"] == "event" and r.get("name") == "fault"), None)
            # Before close(): close ends every worker.
            died = gcs_death_time("Worker", not_before=fault) if fault else None
        finally:
            trainer.close()
    finally:
        ray.shutdown()
    steps = [(r["step"], start + r["time"]) for r in records if r["kind"] == "step"]
    kill_time, source = (died, "gcs_actor_end_time") if died else (fault, "fault_dispatch")
    row = {"system": "flashtrain", "kill_time_source": source,
           **measure_recovery(kill_time, args.kill_at_step, steps),
           # From the fault's dispatch, before the step that kills: an upper bound.
           "recovery_seconds_conservative": measure_recovery(
               fault, args.kill_at_step, steps)["recovery_seconds"] if fault else None}
    reform = summary["reforms"][0] if summary["reforms"] else {}
    row.update(total_steps=summary["global_steps"], wall_seconds=summary["wall_seconds"],
               final_top1=summary["final_top1"], after_kill_workers=_workers(reform.get("new_grid")),
               own_record={k: reform.get(k) for k in ("recovery_seconds", "steps_rolled_back",
                                                       "failed_step", "resume_step", "new_grid")})
    return row


def _workers(grid: str | None) -> int | None:
    if not grid:
        return None
    rows, cols = grid.split("x")
    return int(rows) * int(cols)


def run_raytrain(args: argparse.Namespace, config, workdir: Path, min_tail: int) -> dict:
    import ray

    from flashtrain.bench.raytrain_peer import run_raytrain as fit

    init_ray(args, dashboard=True)
    started = time.time()
    try:
        raw = fit(config, workdir=workdir / "raytrain", data_cache=args.data_cache,
                  num_workers=args.workers,
                  min_workers=args.workers if args.fixed_raytrain else args.workers - 1,
                  cpus_per_worker=args.cpus_per_worker, kill_at_step=args.kill_at_step,
                  min_tail=min_tail, max_failures=args.max_failures)
        marker = raw["kill"]
        died = gcs_death_time("RayTrainWorker", pid=marker["pid"]) if marker else None
    finally:
        ray.shutdown()
    wall = time.time() - started
    timeline = raw["timeline"]
    steps = [(r["step"], r["time"]) for r in timeline if r["kind"] == "step"]
    if died:
        kill_time, source = died, "gcs_actor_end_time"
    else:
        kill_time, source = (marker["time"] if marker else None), "victim_clock"
    row = {"system": "raytrain", "kill_time_source": source}
    if kill_time is None:
        row.update(recovery_seconds=None, resume_step=None, steps_redone=None,
                   last_step_before_kill=None)
    else:
        row.update(measure_recovery(kill_time, args.kill_at_step, steps))
        # From the victim's own clock just before os._exit: the earliest kill estimate.
        row["recovery_seconds_conservative"] = measure_recovery(
            marker["time"], args.kill_at_step, steps)["recovery_seconds"] if marker else None
    starts = [r for r in timeline if r["kind"] == "start"]
    restart = next((r for r in starts if kill_time is not None and r["time"] > kill_time), None)
    row.update(total_steps=len({s for s, _ in steps}), wall_seconds=wall, error=raw["error"],
               after_kill_workers=restart["world"] if restart else None, scaling=raw["scaling"],
               own_record={"victim_clock_kill_time": marker["time"] if marker else None,
                           "gcs_kill_time": died, "restart": restart})
    return row


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    def num(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"elastic recovery: {args.workers} CPU workers, {args.model}, global batch "
             f"{args.global_batch}, {args.epochs} epochs, last rank killed in the all-reduce "
             f"of step {args.kill_at_step}",
             f"{'system':<12}{'recovery s':>12}{'(bound s)':>11}{'resume step':>13}"
             f"{'steps redone':>14}{'workers after':>15}{'total wall s':>14}"]
    for r in rows:
        lines.append(f"{r['system']:<12}{num(r['recovery_seconds'], '.2f'):>12}"
                     f"{num(r.get('recovery_seconds_conservative'), '.2f'):>11}"
                     f"{num(r['resume_step'], 'd'):>13}{num(r['steps_redone'], 'd'):>14}"
                     f"{num(r.get('after_kill_workers'), 'd'):>15}"
                     f"{num(r.get('wall_seconds'), '.1f'):>14}")
    by_name = {r["system"]: r for r in rows}
    ours, peer = (by_name.get(s, {}).get("recovery_seconds") for s in SYSTEMS)
    if ours and peer:
        lines.append(f"flashtrain / Ray Train recovery: {ours / peer:.3f} "
                     f"({peer / ours:.1f}x faster)")
    lines.append("recovery s: GCS-recorded death of the killed worker -> first step completed "
                 "after it; bound s: from the fault's dispatch (flashtrain) or the victim's "
                 "clock before os._exit (Ray Train)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.external_kills > 0:
        return main_external(args)
    return main_single(args)


def main_external(args: argparse.Namespace) -> int:
    """The ``--external-kills`` mode (:mod:`flashtrain.bench.external_kills`)."""
    from flashtrain.bench import external_kills as ext
    from flashtrain.config import load_config
    from flashtrain.driver.trainer import max_grid_workers

    config = load_config(None, ext.external_overrides(args))
    min_tail = config.data.min_samples_per_worker * max_grid_workers(config, args.workers)
    _default_data_cache(args)
    with tempfile.TemporaryDirectory(prefix="bench-kills-") as scratch:
        workdir = args.workdir or Path(scratch)
        rows = []
        if "flashtrain" in args.systems:
            rows.append(ext.run_flashtrain(args, config, workdir))
        if "raytrain" in args.systems:
            rows.append(ext.run_raytrain(args, config, workdir, min_tail))
    print(ext.format_table(rows, args))
    if args.json:
        meta = {"mode": "external-kills", "workers": args.workers, "kills": args.external_kills,
                "seed": args.seed, "model": args.model, "cpu_count": os.cpu_count(),
                "flashtrain_overrides": ext.external_overrides(args)}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": rows}, handle, indent=2)
    return 0 if ext.passed(rows) else 1


def _default_data_cache(args: argparse.Namespace) -> None:
    if args.data_cache is None:
        from flashtrain.train.data import DEFAULT_DIGITS_CACHE

        args.data_cache = DEFAULT_DIGITS_CACHE.expanduser()


def main_single(args: argparse.Namespace) -> int:
    """One death injected inside the all-reduce of ``--kill-at-step``."""
    from flashtrain.config import load_config
    from flashtrain.driver.trainer import max_grid_workers

    config = load_config(None, overrides(args))
    # Ray Train folds the epoch tail exactly as flashtrain does (same steps, same batches).
    min_tail = config.data.min_samples_per_worker * max_grid_workers(config, args.workers)
    with tempfile.TemporaryDirectory(prefix="bench-elastic-") as scratch:
        workdir = args.workdir or Path(scratch)
        _default_data_cache(args)
        rows = []
        if "flashtrain" in args.systems:
            rows.append(run_flashtrain(args, config, workdir))
        if "raytrain" in args.systems:
            rows.append(run_raytrain(args, config, workdir, min_tail))
    print(format_table(rows, args))
    if args.json:
        meta = {"workers": args.workers, "kill_at_step": args.kill_at_step, "model": args.model,
                "epochs": args.epochs, "global_batch": args.global_batch,
                "commit_every_steps": args.commit_every, "cpus_per_worker": args.cpus_per_worker,
                "cpu_count": os.cpu_count(), "flashtrain_overrides": overrides(args)}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": rows}, handle, indent=2)
    failed = [r for r in rows if r["recovery_seconds"] is None]
    return 1 if failed else 0
