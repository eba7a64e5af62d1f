"""Where a run lives and what a ``--resume`` may change: pure rules, no Ray, no torch.

**The runs root.** Relative run directories resolve against one folder, the first of:

1. ``runtime.runs_root`` (the job's config or ``--set``);
2. the ``FLASHTRAIN_RUNS_ROOT`` environment variable (a cluster sets it once; the batch
   launcher sets it to the folder of its shared directory);
3. ``~/flashtrain-runs`` when the job runs inside Ray's temporary copy of a working
   directory (``ray job submit --working-dir``, a ``runtime_env`` working_dir): that copy
   lives in Ray's session folder, which Ray deletes, under a hashed name nobody chose;
4. otherwise none: relative paths are relative to the current directory and new runs go
   to ``./runs``, as a plain ``python -m flashtrain.jobs.imagenet`` always did.

An absolute ``--run-dir`` is used as it is. ``--resume --run-dir NAME`` resolves NAME by
the same rule, so the name a job printed finds its run again.

**What a resume may change.** A resumed run starts from its saved ``config.yaml``; a
``--set`` (or a ``--config``) may change only the fields that say *how* the run is
executed, never *what* it computes (:data:`RESUMABLE`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNS_ROOT_ENV = "FLASHTRAIN_RUNS_ROOT"
HOME_RUNS = "~/flashtrain-runs"  # the default root for jobs running in Ray's temporary copy
# Ray unpacks a job's working_dir into <temp>/session_*/runtime_resources/working_dir_files/
# _ray_pkg_<hash>; both names are Ray's own and have not changed across 2.x.
_RAY_COPY_PARTS = ("runtime_resources", "working_dir_files")
_RAY_PKG_PREFIX = "_ray_pkg_"

# Fields a resumed segment may change: how the run is executed (where, on what grid,
# with what timeouts and reporting), never what it computes. "section." means every
# field of the section; everything else (model, optimizer, schedule, the data's content
# and seeds, runtime.seed) is the run itself.
RESUMABLE = ("runtime.", "grid.", "collective.", "elastic.", "checkpoint.", "faults.",
             "data.root", "data.loader_workers", "data.verify_images")
NOT_RESUMABLE = ("runtime.seed",)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (the message says what to do)."""


@dataclass(frozen=True)
class RunsRoot:
    """The folder relative run directories resolve against (``None``: the current
    directory, with new runs in ./runs) and why."""

    path: Path | None
    reason: str


def in_ray_working_dir_copy(cwd: Path | str) -> bool:
    """Whether ``cwd`` is (inside) Ray's temporary copy of a job's working directory."""
    parts = Path(cwd).parts
    pairs = any(parts[i:i + 2] == _RAY_COPY_PARTS for i in range(len(parts) - 1))
    return pairs or any(part.startswith(_RAY_PKG_PREFIX) for part in parts)


def choose_runs_root(configured: str | None, env: Mapping[str, str], cwd: Path | str) -> RunsRoot:
    """The runs root by the rule of this module's docstring (``~`` expanded)."""
    if configured:
        return RunsRoot(Path(configured).expanduser(), "runtime.runs_root")
    if env.get(RUNS_ROOT_ENV):
        return RunsRoot(Path(env[RUNS_ROOT_ENV]).expanduser(), f"${RUNS_ROOT_ENV}")
    if in_ray_working_dir_copy(cwd):
        return RunsRoot(Path(HOME_RUNS).expanduser(),
                        "the job runs in Ray's temporary copy of its working directory, "
                        f"which Ray deletes; set runtime.runs_root or ${RUNS_ROOT_ENV} to "
                        "choose another place")
    return RunsRoot(None, "no runtime.runs_root or $FLASHTRAIN_RUNS_ROOT: ./runs")


def run_path(root: RunsRoot, run_dir: str | None, preset: str, cwd: Path | str,
             now: float | None = None) -> Path:
    """The absolute run directory: ``run_dir`` (absolute as given, relative under the
    root), or a new ``<preset>-<timestamp>`` under the root (./runs without one)."""
    base = Path(root.path) if root.path is not None else Path(cwd)
    if run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        name = f"{preset}-{stamp}"
        path = base / name if root.path is not None else base / "runs" / name
    else:
        path = Path(run_dir).expanduser()
        if not path.is_absolute():
            path = base / path
    return Path(os.path.abspath(path))


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resumable(field: str) -> bool:
    """Whether ``field`` (dotted, e.g. ``grid.shape``) may differ in a resumed segment."""
    if field in NOT_RESUMABLE:
        return False
    return any(field.startswith(p) if p.endswith(".") else field == p for p in RESUMABLE)


def refused_changes(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, wanted value)`` for every field that differs between the
    run's saved config and the resumed one and may not (both as ``model_dump(mode="json")``)."""
    old, new = _leaves(saved), _leaves(wanted)
    return [(name, old.get(name), new.get(name)) for name in sorted(old.keys() | new.keys())
            if old.get(name) != new.get(name) and not resumable(name)]


def refusal_message(changes: list[tuple[str, Any, Any]], run_dir: Path) -> str:
    """One message for a resume that would make another run."""
    named = ", ".join(f"{name} ({old!r} in the run, {new!r} asked)" for name, old, new in changes)
    return (f"--resume: {named} would make this another run, so it cannot change when "
            f"{run_dir} is resumed; start a new run for it (no --resume), or resume "
            f"without it. A resume may change: {', '.join(_shown(p) for p in RESUMABLE)} "
            f"(not {', '.join(NOT_RESUMABLE)})")


def _shown(prefix: str) -> str:
    return prefix + "*" if prefix.endswith(".") else prefix


def run_finished(summary: Mapping[str, Any] | None, epochs: int, max_steps: int | None) -> bool:
    """Whether a run whose summary.json holds ``summary`` has nothing left to train:
    every epoch of its schedule, or its ``runtime.max_steps``."""
    if not summary:
        return False
    if summary.get("epochs", 0) >= epochs - 1e-9:
        return True
    return max_steps is not None and summary.get("global_steps", 0) >= max_steps


def where_and_why(root: RunsRoot, run_dir_arg: str | None) -> str:
    """Why the run directory is where it is, for the job's first line."""
    if run_dir_arg is not None and Path(run_dir_arg).expanduser().is_absolute():
        return "as given by --run-dir"
    if root.path is None:
        return "relative to the current directory: no runtime.runs_root or $" + RUNS_ROOT_ENV
    return f"under the runs root {root.path}: {root.reason}"


def find_run(root: RunsRoot, run_dir: str, cwd: Path | str) -> Path:
    """The run ``--resume --run-dir run_dir`` means: resolved like a new run's; without a
    runs root a relative name not found there is also looked for in ~/flashtrain-runs
    (where a job submitted with ``--working-dir`` put it), so the name it printed is
    enough from the checkout too. Returns the first path holding a config.yaml, else
    the rule's own path (the caller says it is not a run)."""
    path = run_path(root, run_dir, "", cwd)
    if root.path is None and not (path / "config.yaml").is_file():
        home = run_path(RunsRoot(Path(HOME_RUNS).expanduser(), ""), run_dir, "", cwd)
        if (home / "config.yaml").is_file():
            return home
    return path
