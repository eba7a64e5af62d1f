"""``python -m flashtrain.run MODULE:TASK [--config FILE] [--set KEY=VALUE ...]``: train
any :class:`flashtrain.Task` on the elastic grid.

``MODULE`` is found in the current directory first, then on ``PYTHONPATH``; under
``ray job submit --working-dir .`` the current directory is the shipped copy::

    ray job submit --working-dir . -- python -m flashtrain.run mytask:Regression \\
        --set schedule.epochs=3

A task that cannot be imported or trained stops here with one message and exit status 2,
before Ray starts and before any run directory is written (:mod:`flashtrain.task_checks`).
"""

from __future__ import annotations

import sys

from flashtrain.jobs.job import parse_args, run_job


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def make_task(config):
        # Loaded once the config is resolved (a bad one stops before the task's module, and
        # torch with it, is imported); its TaskError is the job's: one message, status 2.
        from flashtrain.task_checks import load_task

        return load_task(args.task)

    return run_job(args, make_task)


if __name__ == "__main__":
    sys.exit(main())
