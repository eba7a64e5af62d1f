"""``python -m flashtrain.jobs.imagenet``: train an image classifier on a grid of workers.

With no arguments it runs the embedded default: a local Ray, four CPU workers in a 2x2
torus, ResNet-50 on scikit-learn's handwritten digits written as an ImageNet-layout
folder. Under ``ray job submit`` (or after ``ray start --head``) it joins that cluster.

It is one task on the engine's interface (:class:`flashtrain.tasks.images.ImageClassification`,
what ``model.*`` and ``data.*`` name) run by the same job as ``python -m flashtrain.run``
(:mod:`flashtrain.jobs.job`).
"""

from __future__ import annotations

import argparse
import sys

from flashtrain.jobs.job import (  # noqa: F401 - the job's helpers, as callers found them here
    EXIT_CONFIG,
    EXIT_FAILED,
    resolve_run,
    run_job,
    write_run_report,
)
from flashtrain.jobs.job import parse_args as _parse_job_args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _parse_job_args(
        argv, prog="python -m flashtrain.jobs.imagenet", task_arg=False,
        description="Train an image classifier with a 2D-torus all-reduce, batch-size control "
                    "and label smoothing on an elastic grid of Ray workers.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def make_task(config):
        # Imported once the config is resolved: a bad one stops before torch is imported.
        from flashtrain.tasks.images import ImageClassification

        return ImageClassification.from_config(config, args.data_cache)

    return run_job(args, make_task)


if __name__ == "__main__":
    sys.exit(main())
