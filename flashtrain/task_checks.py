"""Finding a task by name and checking it before anything starts (no Ray, no run directory).

A task that cannot train should say so in the job's first seconds with one message
that names what is wrong and how to fix it, not as a traceback from inside a worker
actor after the grid has formed. :func:`check_task` builds what every worker would
build (the data sets, the model, twice, and one small batch's loss) in the driver, once.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset

from flashtrain.config import FlashtrainConfig
from flashtrain.errors import TaskError
from flashtrain.task import Task, build_seeded
from flashtrain.train.data import DatasetPair, task_datasets
from flashtrain.train.metrics import task_name

_LISTED = 8  # how many of a module's names a message lists


# --------------------------------------------------------------------------- finding it


def load_task(spec: str, cwd: Path | None = None) -> Task:
    """The task ``MODULE:NAME`` names: a :class:`~flashtrain.Task` instance, a subclass
    (instantiated with no arguments) or a function returning a task. The current
    directory is searched first, as ``python -m`` does (under ``ray job submit
    --working-dir .`` it holds the shipped files)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task {spec!r}: expected MODULE:TASK, e.g. mytask:Regression for "
                        "the class Regression in mytask.py")
    here = str(cwd or Path.cwd())
    if here not in sys.path:
        sys.path.insert(0, here)
    module = _import(module_name, spec, here)
    if not hasattr(module, attr):
        tasks = [name for name, value in vars(module).items() if _is_task_like(value)]
        listed = ", ".join(tasks[:_LISTED]) or "none"
        raise TaskError(f"task {spec!r}: module {module_name!r} ({module.__file__}) has no "
                        f"{attr!r}; the tasks it defines: {listed}")
    return _as_task(getattr(module, attr), spec)


def _import(module_name: str, spec: str, here: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise TaskError(f"task {spec!r}: no module named {err.name!r} in {here} nor on "
                            f"PYTHONPATH: run from the folder that holds "
                            f"{module_name.replace('.', '/')}.py (with ray job submit: "
                            "--working-dir that folder) or add its folder to PYTHONPATH") from None
        raise TaskError(f"task {spec!r}: importing module {module_name!r} failed: it needs "
                        f"{err.name!r}, which is not installed ({err})") from None
    except Exception as err:  # noqa: BLE001 - any error of the user's module, named once
        raise TaskError(f"task {spec!r}: importing module {module_name!r} failed: "
                        f"{type(err).__name__}: {err}{_where(err)}") from None


def _where(err: BaseException) -> str:
    """`` (file:line)`` of the innermost frame of ``err``'s traceback."""
    trace = err.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    if trace is None:
        return ""
    return f" ({trace.tb_frame.f_code.co_filename}:{trace.tb_lineno})"


def _is_task_like(value: Any) -> bool:
    return isinstance(value, Task) or (inspect.isclass(value) and issubclass(value, Task)
                                       and value is not Task)


def _as_task(value: Any, spec: str) -> Task:
    if isinstance(value, Task):
        return value
    if inspect.isclass(value) and not issubclass(value, Task):
        raise TaskError(f"task {spec!r} is the class {value.__name__}, which is not a "
                        "flashtrain.Task: subclass flashtrain.Task and define build_model, "
                        "datasets, loss and metrics")
    if not callable(value):
        raise TaskError(f"task {spec!r} is a {type(value).__name__}, not a flashtrain.Task "
                        "(give a Task subclass, instance, or a function that returns one)")
    try:
        made = value()
    except TypeError as err:
        raise TaskError(f"task {spec!r} could not be made with no arguments ({err}): give "
                        "its arguments defaults, or name a function that builds it") from None
    if not isinstance(made, Task):
        raise TaskError(f"task {spec!r}: {spec.split(':')[1]}() returned a "
                        f"{type(made).__name__}, not a flashtrain.Task")
    return made


# --------------------------------------------------------------------------- checking it


def check_task(task: Any, config: FlashtrainConfig) -> None:
    """Raise :class:`TaskError` (or the task's own PreflightError) unless ``task`` can be
    trained with ``config``: map-style data sets of samples, a model that two builds
    with the same seed make identical, and a loss that is one number."""
    if not isinstance(task, Task):
        raise TaskError(f"the task is a {type(task).__name__}, not a flashtrain.Task: subclass "
                        "flashtrain.Task and define build_model, datasets, loss and metrics")
    name = task_name(task)
    task.preflight()
    pair = _checked_datasets(task, name)
    model = _checked_model(task, name, config.runtime.seed)
    _check_loss(task, name, model, pair, config.schedule.label_smoothing)


def _call(name: str, what: str, function, *args):
    """``function(*args)``; an exception becomes a TaskError naming ``what`` raised it."""
    try:
        return function(*args)
    except (TaskError, NotImplementedError) as err:
        raise TaskError(f"task {name}: {err}") from None
    except Exception as err:  # noqa: BLE001 - the user's code: one message, where it failed
        raise TaskError(f"task {name}: {what} raised {type(err).__name__}: {err}"
                        f"{_where(err)}") from err


def _checked_datasets(task: Task, name: str) -> DatasetPair:
    try:
        pair = task_datasets(task)
    except (TypeError, ValueError) as err:
        if isinstance(err, TaskError) or "unpack" not in str(err):
            raise TaskError(f"task {name}: datasets() raised {type(err).__name__}: {err}"
                            f"{_where(err)}") from err
        raise TaskError(f"task {name}: datasets() must return (train, val), two map-style "
                        f"data sets ({err})") from None
    except NotImplementedError as err:
        raise TaskError(f"task {name}: {err}") from None
    except Exception as err:  # noqa: BLE001 - the user's code: one message, where it failed
        raise TaskError(f"task {name}: datasets() raised {type(err).__name__}: {err}"
                        f"{_where(err)}") from err
    for split, dataset in (("training", pair.train), ("validation", pair.val)):
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") \
                or not hasattr(dataset, "__getitem__"):
            raise TaskError(
                f"task {name}: the {split} data set (a {type(dataset).__name__}) is not "
                "map-style (it needs __len__ and __getitem__ by index): flashtrain shards "
                "samples by index so that each is trained exactly once per epoch, across "
                "re-forms; an iterable data set has no stable indices. Give a "
                "torch.utils.data.Dataset with __len__ and __getitem__ (e.g. a TensorDataset, "
                "or a list of (input, target) pairs)")
        if len(dataset) == 0:
            raise TaskError(f"task {name}: the {split} data set is empty")
    return pair


def _checked_model(task: Task, name: str, seed: int) -> nn.Module:
    builds = [_call(name, f"build_model({seed})", build_seeded, task, seed) for _ in range(2)]
    for model in builds:
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {name}: build_model({seed}) returned a "
                            f"{type(model).__name__}, not a torch.nn.Module")
    first, second = (model.state_dict() for model in builds)
    for key, value in first.items():
        other = second.get(key)
        if other is None or other.shape != value.shape or not torch.equal(other, value):
            raise TaskError(
                f"task {name}: two builds of the model with seed {seed} differ (first in "
                f"{key!r}): every worker would start from other weights and the replicas "
                "would diverge. Initialise from torch's generator (the engine seeds it "
                "before build_model) or seed your own generator from the seed argument")
    return builds[0]


def _check_loss(task: Task, name: str, model: nn.Module, pair: DatasetPair,
                label_smoothing: float) -> None:
    """One small batch through collate, the model, the loss and the metrics."""
    samples = [_call(name, f"the training data set's item {index}", pair.train.__getitem__,
                     index) for index in range(min(2, len(pair.train)))]
    inputs, targets = _call(name, "collate(samples)", task.collate, samples)
    model.eval()  # BatchNorm statistics stay as built; gradients still flow
    outputs = _call(name, "the model's forward", model, inputs)
    loss = _call(name, "loss(outputs, targets, label_smoothing)", task.loss, outputs,
                 targets, label_smoothing)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = (f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor)
                 else f"a {type(loss).__name__}")
        raise TaskError(f"task {name}: loss() returned {shape}, not a scalar: return the "
                        "mean over the batch as a 0-dim tensor (e.g. F.mse_loss(...) with "
                        "its default reduction); the engine weights it by the batch's share")
    if not loss.requires_grad:
        raise TaskError(f"task {name}: loss() returned a tensor that does not depend on the "
                        "model's parameters: compute it from outputs (the model's output)")
    metrics = _call(name, "metrics(outputs, targets)", task.metrics, outputs.detach()
                    if isinstance(outputs, torch.Tensor) else outputs, targets)
    if not isinstance(metrics, dict) or not all(
            isinstance(key, str) and _is_number(value) for key, value in metrics.items()):
        raise TaskError(f"task {name}: metrics() must return a dict of name -> number (the "
                        f"batch's sum of each metric), got {metrics!r:.200}")


def _is_number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, int | float) and not isinstance(value, bool)


def ship_task_module(task: Task) -> None:
    """Have Ray send the task's own module to the workers by value (unless it is
    flashtrain's), so a task in a file next to the job trains on workers that do not
    have that file (other nodes, the batch launchers)."""
    module_name = type(task).__module__
    if module_name == "__main__" or module_name.split(".")[0] == "flashtrain":
        return  # __main__ is pickled by value anyway
    from ray import cloudpickle

    module = sys.modules.get(module_name)
    if module is not None and os.path.isfile(getattr(module, "__file__", "") or ""):
        cloudpickle.register_pickle_by_value(module)
