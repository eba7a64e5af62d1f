"""The job around a task: one run directory, the checks, the driver's training, the report.

``python -m flashtrain.run MODULE:TASK``, ``python -m flashtrain.jobs.imagenet`` and
:func:`flashtrain.fit` all come here with a :class:`~flashtrain.Task`: the config and
the run directory are resolved (nothing is created yet), the task is checked
(:mod:`flashtrain.task_checks`) and Ray started, and only then is the run directory
written. Under ``ray job submit`` (or after ``ray start --head``) it joins that cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from flashtrain.config import ConfigError, FlashtrainConfig, dump_config, load_config
from flashtrain.connect import choose_address
from flashtrain.errors import CheckpointError, TaskError
from flashtrain.preflight import PreflightError, check_before_start, initial_num_workers
from flashtrain.runs import (
    RunsRoot,
    choose_runs_root,
    find_run,
    refusal_message,
    refused_changes,
    run_finished,
    run_path,
    where_and_why,
)
from flashtrain.train.metrics import (
    METRICS_FILE,
    SUMMARY_FILE,
    describe_metrics,
    write_summary,
)
from flashtrain.train.segments import (
    SEGMENTS_FILE,
    Segment,
    append_segment,
    begin_segment,
    record_earlier_run,
    records_after,
    segment_steps,
    whole_run_summary,
)

if TYPE_CHECKING:  # torch: imported where a task is checked or trained, not for a bad config
    from flashtrain.task import Task

EXIT_CONFIG = 2
EXIT_FAILED = 1


def parse_args(argv: list[str] | None, prog: str = "python -m flashtrain.run",
               description: str = "Train a task on an elastic grid of Ray workers.",
               task_arg: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if task_arg:
        parser.add_argument("task", metavar="MODULE:TASK",
                            help="the task to train: a flashtrain.Task subclass, instance or "
                                 "factory, e.g. mytask:Regression (mytask.py in the current "
                                 "directory or on PYTHONPATH)")
    parser.add_argument("--config", help="YAML job file (see jobs/*.yaml); default: the embedded default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set schedule.epochs=3 (repeatable)")
    parser.add_argument("--run-dir", help="run directory (default runs/<preset>-<timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its newest valid checkpoint")
    if not task_arg:  # the image classifier's own option
        parser.add_argument("--data-cache", default=None,
                            help="where the digits dataset is written once "
                                 "(default ~/.cache/flashtrain/digits)")
    return parser.parse_args(argv)


def _asked_runs_root(args: argparse.Namespace) -> str | None:
    """runtime.runs_root as this command line asks it (``--config`` and ``--set``), read
    before a resumed run's own config.yaml can be found."""
    if getattr(args, "config_object", None) is not None:
        return args.config_object.runtime.runs_root
    only_root = [item for item in args.overrides if item.split("=", 1)[0].strip() == "runtime.runs_root"]
    return load_config(args.config, only_root).runtime.runs_root


def resolve_run(args: argparse.Namespace, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> tuple[FlashtrainConfig, RunsRoot, Path]:
    """The job's configuration, runs root and run directory (checked, not created).

    A new run: ``--config`` and ``--set``, and a new or empty folder. A resumed run: the
    run's saved config.yaml with the ``--set`` (or ``--config``) on top, refused when that
    would change a field that makes it another run (:func:`flashtrain.runs.refused_changes`).
    Nothing a user had is overwritten."""
    cwd = Path.cwd() if cwd is None else cwd
    env = dict(os.environ) if env is None else env
    given = getattr(args, "config_object", None)  # flashtrain.fit's FlashtrainConfig
    if not args.resume:
        config = given or load_config(args.config, args.overrides)
        root = choose_runs_root(config.runtime.runs_root, env, cwd)
        path = run_path(root, args.run_dir, config.runtime.preset, cwd)
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"run directory {path} already exists and is not empty: choose "
                              "another --run-dir, or pass --resume to continue that run")
        return config, root, path
    if args.run_dir is None:
        raise ConfigError("--resume needs --run-dir (the run to continue)")
    root = choose_runs_root(_asked_runs_root(args), env, cwd)
    path = find_run(root, args.run_dir, cwd)
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        where = f" (relative names resolve against {root.path}: {root.reason})" if root.path else ""
        raise ConfigError(f"--resume: {path} is not a flashtrain run directory (no "
                          f"config.yaml){where}")
    saved = load_config(saved_file)
    config = given or load_config(args.config or saved_file, args.overrides)
    changes = refused_changes(saved.model_dump(mode="json"), config.model_dump(mode="json"))
    if changes:
        raise ConfigError(refusal_message(changes, path))
    return config, root, path


def finished_message(config: FlashtrainConfig, path: Path) -> str | None:
    """What ``--resume`` says of a run that has nothing left to train (None otherwise)."""
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not run_finished(summary, config.schedule.epochs,
                                                         config.runtime.max_steps):
        return None
    return (f"{path} is finished: {describe_final(summary)}, {summary.get('global_steps')} "
            f"steps, {summary.get('images_per_sec', 0):.1f} images/s, "
            f"{summary.get('wall_seconds', 0):.0f}s; nothing to resume, nothing changed")


def describe_final(summary: dict) -> str:
    """The final metrics of ``summary`` (its ``final_<name>`` keys) as one phrase."""
    final = {key.removeprefix("final_"): value for key, value in summary.items()
             if key.startswith("final_") and key not in ("final_val_loss", "final_grid")
             and isinstance(value, int | float)}
    return ", ".join(describe_metrics(final).split("  "))


def check_checkpoint_fits(config: FlashtrainConfig, path: Path, task: Task) -> None:
    """Before any worker starts: the newest checkpoint of a resumed run holds a model of
    the shape this run builds (raises CheckpointError with one message)."""
    from flashtrain.task import build_seeded
    from flashtrain.tasks.images import model_name
    from flashtrain.train.checkpoint import check_fits, latest_checkpoint, load_checkpoint

    checkpoint = latest_checkpoint(path / "checkpoints")
    if checkpoint is None:
        return
    payload = load_checkpoint(checkpoint)
    model = build_seeded(task, config.runtime.seed)  # the task's, as its workers build it
    check_fits(payload, model.state_dict(), checkpoint, model_name(task, config))


def create_run_dir(config: FlashtrainConfig, path: Path, resume: bool) -> None:
    """Create the run directory checked by :func:`resolve_run` and write the config."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ("config.yaml" if not resume else "config.resumed.yaml")).write_text(dump_config(config))


def discard_if_unstarted(path: Path) -> bool:
    """Remove a run directory this invocation created when training never began in it
    (only config.yaml and an empty metrics.jsonl): it holds nothing to resume."""
    names = {p.name for p in path.iterdir()}
    metrics = path / "metrics.jsonl"
    if not names <= {"config.yaml", "metrics.jsonl", SEGMENTS_FILE} or (metrics.exists() and metrics.stat().st_size):
        return False
    shutil.rmtree(path)
    return True


def connect_ray(config: FlashtrainConfig, env_address: str | None = None,
                say=lambda message: print(f"flashtrain: {message}", flush=True)):
    """Join the cluster of `ray start` / `ray job submit` (``env_address``: RAY_ADDRESS) when
    there is one that answers, otherwise start a local Ray for this job; with
    ``runtime.local_nodes`` an emulated multi-node cluster (returned, so node faults can
    act on it). Raises PreflightError, before ray.init, when the cluster does not answer."""
    import ray

    runtime = config.runtime
    if runtime.local_nodes and runtime.ray_address is None:
        from ray.cluster_utils import Cluster

        # The head runs the driver and the schedule actor only; workers go to the nodes.
        # No dashboard, as for a local Ray of one node (below).
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 0, "include_dashboard": False})
        cluster.flashtrain_node_args = {"num_cpus": runtime.cpus_per_local_node}
        for _ in range(runtime.local_nodes):
            cluster.add_node(**cluster.flashtrain_node_args)
        ray.init(address=cluster.address, log_to_driver=True, logging_level=logging.WARNING)
        return cluster
    address = choose_address(runtime, env_address, say)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 logging_level=logging.WARNING)
    except ConnectionError as err:  # "auto" with no cluster found
        raise PreflightError(f"could not join a Ray cluster ({err}): start one with `ray start "
                             "--head`, or leave runtime.ray_address unset for a local Ray") from err
    return None


def disconnect_ray(cluster) -> None:
    import ray

    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()


def start_checks(config: FlashtrainConfig, task: Task):
    """Everything that must hold before the run directory is written: the task (its
    model, data and loss, before Ray starts), the GPU install, then a cluster that
    answers and can hold the grid. Returns the emulated cluster, if any, and whether
    this job started or joined Ray itself (so ends it), rather than finding it running
    in this process; raises PreflightError (with Ray shut down again)."""
    from flashtrain.task_checks import check_task

    check_task(task, config)
    check_before_start(config)
    import ray

    if ray.is_initialized():  # flashtrain.fit in a process that has its own Ray
        return None, False
    cluster = connect_ray(config, os.environ.get("RAY_ADDRESS"))
    from flashtrain.train.placement import PlacementInfeasibleError, check_capacity

    try:
        waiting_for = check_capacity(config.grid, initial_num_workers(config))
    except BaseException as err:
        disconnect_ray(cluster)
        if isinstance(err, PlacementInfeasibleError):
            raise PreflightError(str(err)) from err
        raise
    if waiting_for:
        print(f"flashtrain: waiting up to {config.grid.placement_timeout_s:g}s "
              f"(grid.placement_timeout_s) for nodes to join: {waiting_for}", flush=True)
    return cluster, True


def run_job(args: argparse.Namespace, make_task: Callable[[FlashtrainConfig], Task]) -> int:
    """The job of ``args`` (see :func:`parse_args`) on the task ``make_task`` gives for
    the resolved config; its exit status (2: nothing was started or written)."""
    try:
        prepared = prepare_job(args, make_task)
    except USER_ERRORS as err:
        print(f"flashtrain: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if prepared is None:
        return 0
    return start_job(args, prepared)


# What stops a job before anything starts, with exit status 2 (its message is the story).
USER_ERRORS = (ConfigError, PreflightError, CheckpointError, TaskError)


@dataclass(frozen=True)
class PreparedJob:
    """A checked job, Ray connected, its run directory not yet written."""

    config: FlashtrainConfig
    root: RunsRoot
    run_dir: Path
    task: Task
    cluster: object
    fresh: bool
    owns_ray: bool  # False: the caller's Ray, left running at the end


def prepare_job(args: argparse.Namespace,
                make_task: Callable[[FlashtrainConfig], Task]) -> PreparedJob | None:
    """Resolve, check and connect (raises one of USER_ERRORS); None when ``--resume``
    finds the run finished (said, nothing touched)."""
    config, root, run_dir = resolve_run(args)
    task = make_task(config)
    if args.resume:
        finished = finished_message(config, run_dir)
        if finished is not None:  # touches nothing: a finished run's figures stay
            print(f"flashtrain: {finished}", flush=True)
            return None
        check_checkpoint_fits(config, run_dir, task)
    fresh = not run_dir.exists()
    cluster, owns_ray = start_checks(config, task)
    return PreparedJob(config, root, run_dir, task, cluster, fresh, owns_ray)


def start_job(args: argparse.Namespace, job: PreparedJob) -> int:
    """Write the run directory and train; the exit status."""
    config, run_dir = job.config, job.run_dir
    create_run_dir(config, run_dir, args.resume)
    try:
        return train(config, args, run_dir, job)
    finally:
        write_run_report(run_dir)


def train(config: FlashtrainConfig, args: argparse.Namespace, run_dir: Path,
          job: PreparedJob) -> int:
    from flashtrain.driver.trainer import Trainer
    from flashtrain.task_checks import ship_task_module

    root, cluster, fresh, task = job.root, job.cluster, job.fresh, job.task
    print(f"flashtrain: run directory {run_dir} ({where_and_why(root, args.run_dir)})",
          flush=True)
    ship_task_module(task)
    trainer = Trainer(config, run_dir, task, resume=args.resume, cluster=cluster,
                      say=lambda message: print(f"flashtrain: {message}", flush=True))
    segment = SegmentClock(run_dir)
    summary, ended = None, "finished"
    try:
        summary = trainer.train()
        if not run_finished(summary, config.schedule.epochs, None):
            ended = "stopped at runtime.max_steps"
    except KeyboardInterrupt:
        segment.end(trainer, "interrupted")
        print("flashtrain: interrupted; resume with --resume --run-dir", run_dir, file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns failures into a message
        discarded = fresh and discard_if_unstarted(run_dir)
        if not discarded:
            segment.end(trainer, f"failed ({type(err).__name__})")
        return report_failure(err, run_dir, discarded)
    finally:
        trainer.close()
        if job.owns_ray:
            disconnect_ray(cluster)
    summary = whole_run_summary(summary, segment.end(trainer, ended, summary))
    write_summary(run_dir, summary)
    print(f"flashtrain: done: {describe_final(summary)}, {summary['global_steps']} steps, "
          f"{summary['images_per_sec']:.1f} images/s, {summary['wall_seconds']:.0f}s; "
          f"results in {run_dir}", flush=True)
    return 0


class SegmentClock:
    """Times this invocation's segment of the run and records it in segments.json."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        record_earlier_run(run_dir)
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        metrics = run_dir / METRICS_FILE
        self.offset = metrics.stat().st_size if metrics.exists() else 0
        begin_segment(run_dir, self.started.isoformat(timespec="seconds"), self.offset)

    def end(self, trainer, ended: str, summary: dict | None = None) -> list[dict]:
        """Complete the segment (from the metrics this invocation wrote); all segments."""
        wall = time.perf_counter() - self.t0
        records = records_after(self.run_dir / METRICS_FILE, self.offset)
        first, last = segment_steps(records)
        if summary is not None:
            last = summary["global_steps"] - 1 if summary["global_steps"] > (first or 0) else None
        samples, seconds = trainer.totals.samples, trainer.totals.train_seconds
        return append_segment(self.run_dir, Segment(
            start=self.started.isoformat(timespec="seconds"),
            end=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            first_step=first or 0, last_step=last, ended=ended, wall_seconds=round(wall, 3),
            trained_samples=int(samples), train_seconds=float(seconds),
            metrics_offset=self.offset))


def write_run_report(run_dir: Path) -> None:
    """Write ``report.html`` at the end of a run, whatever its outcome. A report that
    cannot be written is said, never raised: it must not hide the run's own error or
    change the exit code."""
    if not run_dir.is_dir():  # a run that never began was removed: nothing to show
        return
    try:
        from flashtrain.report import write_report

        path = write_report(run_dir)
    except Exception as err:  # noqa: BLE001 - the report is secondary to the run's outcome
        print(f"flashtrain: could not write the report ({type(err).__name__}: {err}); "
              f"rebuild it with `python -m flashtrain.report {run_dir}`", file=sys.stderr)
        return
    print(f"flashtrain: report {path}", flush=True)


def report_failure(err: Exception, run_dir: Path, discarded: bool) -> int:
    """One message for a failed run; a run that never began has nothing to resume."""
    if discarded:
        from flashtrain.train.placement import PlacementTimeoutError

        if not isinstance(err, PlacementTimeoutError):  # its message is the whole story
            traceback.print_exc()
        print(f"flashtrain: run failed before training began: {type(err).__name__}: {err}\n"
              f"  nothing was trained, so {run_dir} was removed; fix the cause and run again",
              file=sys.stderr)
        return EXIT_FAILED
    (run_dir / "error.log").write_text(traceback.format_exc())
    print(f"flashtrain: run failed: {type(err).__name__}: {err}\n"
          f"  details in {run_dir / 'error.log'}\n"
          f"  the newest checkpoint is in {run_dir / 'checkpoints'}; "
          f"continue with --resume --run-dir {run_dir}", file=sys.stderr)
    return EXIT_FAILED

