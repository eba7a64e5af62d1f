"""``python -m flashtrain.jobs.imagenet``: train an image classifier on a grid of workers.

With no arguments it runs the embedded default: a local Ray, four CPU workers in a 2x2
torus, ResNet-50 on scikit-learn's handwritten digits written as an ImageNet-layout
folder. Under ``ray job submit`` (or after ``ray start --head``) it joins that cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from flashtrain.config import ConfigError, FlashtrainConfig, dump_config, load_config

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


def prepare_run_dir(config: FlashtrainConfig, run_dir: str | None, resume: bool) -> Path:
    """The run directory, created; an existing non-empty one is only reused by --resume
    (so nothing a user had is overwritten)."""
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
    path.mkdir(parents=True, exist_ok=True)
    (path / ("config.yaml" if not resume else "config.resumed.yaml")).write_text(dump_config(config))
    return path


def connect_ray(config: FlashtrainConfig):
    """Join the cluster of `ray start` / `ray job submit` (RAY_ADDRESS) when there is one,
    otherwise start a local Ray for this job; with ``runtime.local_nodes`` an emulated
    multi-node cluster (returned, so node faults can act on it)."""
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
    ray.init(address=runtime.ray_address, include_dashboard=False, log_to_driver=True,
             logging_level=logging.WARNING)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.resume and args.config is None and args.run_dir and not args.overrides:
            saved = Path(args.run_dir) / "config.yaml"
            if saved.is_file():
                config = load_config(saved)
        run_dir = prepare_run_dir(config, args.run_dir, args.resume)
    except ConfigError as err:
        print(f"flashtrain: {err}", file=sys.stderr)
        return EXIT_CONFIG

    from flashtrain.train.trainer import Trainer

    data_cache = Path(args.data_cache or os.path.expanduser("~/.cache/flashtrain/digits"))
    print(f"flashtrain: run directory {run_dir}", flush=True)
    cluster = connect_ray(config)
    trainer = Trainer(config, run_dir, data_cache, resume=args.resume, cluster=cluster,
                      say=lambda message: print(f"flashtrain: {message}", flush=True))
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        print("flashtrain: interrupted; resume with --resume --run-dir", run_dir, file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns failures into a message
        (run_dir / "error.log").write_text(traceback.format_exc())
        print(f"flashtrain: run failed: {type(err).__name__}: {err}\n"
              f"  details in {run_dir / 'error.log'}\n"
              f"  the newest checkpoint is in {run_dir / 'checkpoints'}; "
              f"continue with --resume --run-dir {run_dir}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        trainer.close()
        import ray

        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    print(f"flashtrain: done: top-1 {summary['final_top1']:.4f}, top-5 {summary['final_top5']:.4f}, "
          f"{summary['global_steps']} steps, {summary['images_per_sec']:.1f} images/s, "
          f"{summary['wall_seconds']:.0f}s; results in {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
