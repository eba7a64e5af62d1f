"""``flashtrain.fit(task, config)``: train a :class:`~flashtrain.Task` from Python.

The same job as ``python -m flashtrain.run`` (:mod:`flashtrain.jobs.job`): the task is
checked before Ray starts, a run directory is written, and the summary is returned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flashtrain.config import FlashtrainConfig
from flashtrain.jobs.job import prepare_job, start_job
from flashtrain.task import Task
from flashtrain.train.metrics import SUMMARY_FILE


class FitFailed(RuntimeError):
    """The run started and failed; the message says where its error log is."""


def fit(task: Task, config: FlashtrainConfig | str | Path | None = None,
        overrides: list[str] | tuple[str, ...] = (), run_dir: str | Path | None = None,
        resume: bool = False) -> dict:
    """Train ``task`` with ``config`` (a :class:`~flashtrain.config.FlashtrainConfig`, a
    YAML job file, or None for the embedded default) and ``overrides``
    (``"section.key=value"`` strings, applied to a file or the default); returns the
    run's ``summary.json`` with ``run_dir`` added.

    A bad task or config raises its error (:class:`~flashtrain.task_checks.TaskError`,
    :class:`~flashtrain.config.ConfigError`, ...) before Ray starts or anything is
    written; a run that fails raises :class:`FitFailed`. Uses the Ray of
    ``ray.init`` if one is running in this process, else joins or starts one as the
    command line does (and shuts it down at the end).
    """
    config_object = config if isinstance(config, FlashtrainConfig) else None
    if config_object is not None and overrides:
        raise ValueError("fit(): give overrides with a YAML file or the default, not with a "
                         "FlashtrainConfig (use config.model_copy(update=...) for that)")
    args = argparse.Namespace(
        config=None if config_object is not None or config is None else str(config),
        overrides=list(overrides), run_dir=None if run_dir is None else str(run_dir),
        resume=resume, config_object=config_object)
    prepared = prepare_job(args, lambda resolved: task)
    if prepared is None:  # a resumed run that was already finished
        status = 0
    else:
        status = start_job(args, prepared)
    run_path = prepared.run_dir if prepared is not None else Path(run_dir)
    if status != 0:
        raise FitFailed(f"the run failed (exit status {status}); see {run_path / 'error.log'} "
                        "and the messages above")
    summary = json.loads((run_path / SUMMARY_FILE).read_text())
    return {**summary, "run_dir": str(run_path)}
