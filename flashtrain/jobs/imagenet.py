"""``python -m flashtrain.jobs.imagenet``: train an image classifier on a grid of workers.

With no arguments it runs the embedded default: a local Ray, four CPU workers in a 2x2
torus, ResNet-50 on scikit-learn's handwritten digits written as an ImageNet-layout
folder. Under ``ray job submit`` (or after ``ray start --head``) it joins that cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from flashtrain.config import ConfigError, FlashtrainConfig, dump_config, load_config
from flashtrain.connect import choose_address
from flashtrain.preflight import PreflightError, check_before_start, initial_num_workers

EXIT_CONFIG = 2
EXIT_FAILED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flashtrain.jobs.imagenet",
        description="Train an image classifier with a 2D-torus all-reduce, batch-size control "
                    "and label smoothing on an elastic grid of Ray workers.")
    parser.add_argument("--config", help="YAML job file (see jobs/*.yaml); default: the embedded default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set schedule.epochs=3 (repeatable)")
    parser.add_argument("--run-dir", help="run directory (default runs/<preset>-<timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its newest valid checkpoint")
    parser.add_argument("--data-cache", default=None,
                        help="where the digits dataset is written once "
                             "(default ~/.cache/flashtrain/digits)")
    return parser.parse_args(argv)


def resolve_run_dir(config: FlashtrainConfig, run_dir: str | None, resume: bool) -> Path:
    """The run directory's path, checked but not created: a new or empty folder, or with
    --resume an existing run (so nothing a user had is overwritten)."""
    if run_dir is None:
        if resume:
            raise ConfigError("--resume needs --run-dir (the run to continue)")
        run_dir = f"runs/{config.runtime.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(run_dir).expanduser().resolve()
    if resume:
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"--resume: {path} is not a flashtrain run directory (no config.yaml)")
    elif path.exists() and any(path.iterdir()):
        raise ConfigError(f"run directory {path} already exists and is not empty: choose another "
                          "--run-dir, or pass --resume to continue that run")
    return path


def create_run_dir(config: FlashtrainConfig, path: Path, resume: bool) -> None:
    """Create the run directory checked by :func:`resolve_run_dir` and write the config."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ("config.yaml" if not resume else "config.resumed.yaml")).write_text(dump_config(config))


def discard_if_unstarted(path: Path) -> bool:
    """Remove a run directory this invocation created when training never began in it
    (only config.yaml and an empty metrics.jsonl): it holds nothing to resume."""
    names = {p.name for p in path.iterdir()}
    metrics = path / "metrics.jsonl"
    if not names <= {"config.yaml", "metrics.jsonl"} or (metrics.exists() and metrics.stat().st_size):
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
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
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


def start_checks(config: FlashtrainConfig):
    """Everything that must hold before the run directory is written: the model and the
    data (before Ray starts), then a cluster that answers and can hold the grid. Returns
    the emulated cluster, if any; raises PreflightError (with Ray shut down again)."""
    check_before_start(config)
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
    return cluster


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.resume and args.config is None and args.run_dir and not args.overrides:
            saved = Path(args.run_dir) / "config.yaml"
            if saved.is_file():
                config = load_config(saved)
        run_dir = resolve_run_dir(config, args.run_dir, args.resume)
        fresh = not run_dir.exists()
        cluster = start_checks(config)
    except (ConfigError, PreflightError) as err:
        print(f"flashtrain: {err}", file=sys.stderr)
        return EXIT_CONFIG
    create_run_dir(config, run_dir, args.resume)
    try:
        return train(config, args, run_dir, cluster, fresh)
    finally:
        write_run_report(run_dir)


def train(config: FlashtrainConfig, args: argparse.Namespace, run_dir: Path, cluster,
          fresh: bool) -> int:
    from flashtrain.driver.trainer import Trainer

    data_cache = Path(args.data_cache or os.path.expanduser("~/.cache/flashtrain/digits"))
    print(f"flashtrain: run directory {run_dir}", flush=True)
    trainer = Trainer(config, run_dir, data_cache, resume=args.resume, cluster=cluster,
                      say=lambda message: print(f"flashtrain: {message}", flush=True))
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        print("flashtrain: interrupted; resume with --resume --run-dir", run_dir, file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns failures into a message
        return report_failure(err, run_dir, fresh and discard_if_unstarted(run_dir))
    finally:
        trainer.close()
        disconnect_ray(cluster)
    print(f"flashtrain: done: top-1 {summary['final_top1']:.4f}, top-5 {summary['final_top5']:.4f}, "
          f"{summary['global_steps']} steps, {summary['images_per_sec']:.1f} images/s, "
          f"{summary['wall_seconds']:.0f}s; results in {run_dir}", flush=True)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
