"""What a user trains: :class:`Task`, the one interface between a model and the engine.

A task says *what* to train: the model (built from a seed, so every worker starts from
the same weights), the training and validation data sets (map-style: the engine's
exactly-once sharding addresses samples by index), the loss and the per-epoch metrics,
and optionally the optimizer's parameter groups and a collate function. Everything
about *how* (the grid and its torus all-reduce, the batch-size schedule and learning
rate, label smoothing for classification losses, commits, rollback and re-forming,
checkpoints, the report) stays the engine's.

A task object is built in the driver and sent to every worker (Ray pickles it), so it
should hold settings, not data: each worker calls :meth:`Task.datasets` itself.

Example (a full task is ``flashtrain/tasks/diabetes.py``)::

    class MyTask(flashtrain.Task):
        def build_model(self, seed):
            return torch.nn.Linear(8, 1)
        def datasets(self):
            return train_set, val_set            # map-style: __len__ and __getitem__
        def loss(self, outputs, targets, label_smoothing):
            return F.mse_loss(outputs.squeeze(1), targets)   # the batch mean
        def metrics(self, outputs, targets):
            return {"mse": ((outputs.squeeze(1) - targets) ** 2).sum()}   # batch sums
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate


class Task:
    """A model, its data, its loss and its metrics (module docstring).

    Subclass it and define :meth:`build_model`, :meth:`datasets`, :meth:`loss` and
    :meth:`metrics`; :meth:`param_groups`, :meth:`collate`, :meth:`num_correct` and
    :meth:`preflight` have defaults. Samples are ``(input, target)`` pairs; the collate
    turns a list of them into batched ``(inputs, targets)`` tensors.
    """

    def build_model(self, seed: int) -> nn.Module:
        """The model. The engine calls ``torch.manual_seed(seed)`` just before, so a
        model initialised with torch's generator is the same on every worker; a model
        drawing from another generator must seed it from ``seed``. Two builds with the
        same seed must hold the same parameters (checked before the run starts)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_model(seed)")

    def datasets(self) -> tuple[Dataset, Dataset]:
        """``(train, val)``: map-style data sets (``__len__`` and ``__getitem__`` by
        index), each sample an ``(input, target)`` pair. Called once in the driver (for
        the sizes and the checks) and once in every worker."""
        raise NotImplementedError(f"{type(self).__name__} must define datasets()")

    def loss(self, outputs: Any, targets: Any, label_smoothing: float) -> torch.Tensor:
        """The mean loss over the batch, a 0-dim tensor. The engine weights it by the
        batch's share of the global batch (shards differ in size by a sample), so the
        summed update is the mean over the global batch. ``label_smoothing`` is the
        schedule's (``schedule.label_smoothing``) in training and 0 in validation; a loss
        that is not a classification loss ignores it."""
        raise NotImplementedError(f"{type(self).__name__} must define loss(...)")

    def metrics(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor | float]:
        """Validation metrics of one batch as **sums over its samples** (e.g. the number
        of correct answers, the summed squared error): the engine adds them up over the
        batches and the workers and divides by the number of samples, so each metric
        reported per epoch (``metrics.jsonl``) and at the end (``summary.json``'s
        ``final_<name>``) is a per-sample mean."""
        raise NotImplementedError(f"{type(self).__name__} must define metrics(...)")

    def param_groups(self, model: nn.Module, weight_decay: float,
                     no_decay_bn_bias: bool) -> list[dict]:
        """The optimizer's parameter groups (SGD; the learning rate is the schedule's).
        Default: the engine's large-batch recipe (``optimizer.*``), no weight decay on
        normalisation layers and biases when ``no_decay_bn_bias``."""
        from flashtrain.train.models import parameter_groups

        return parameter_groups(model, weight_decay, no_decay_bn_bias)

    def collate(self, samples: list) -> tuple[Any, Any]:
        """Batch a list of samples into ``(inputs, targets)``; default torch's."""
        return default_collate(samples)

    def num_correct(self, outputs: Any, targets: Any) -> torch.Tensor | None:
        """How many of the batch's training samples were right (for the training
        accuracy in ``metrics.jsonl``), or None where that means nothing (regression)."""
        return None

    def preflight(self) -> None:
        """Cheap checks of the task's own settings before anything starts (no Ray, no
        run directory); raise :class:`flashtrain.preflight.PreflightError` with the fix."""

    @property
    def num_classes(self) -> int | None:
        """The number of classes, if the task is a classifier (kept in checkpoints)."""
        return None


class ClassificationTask(Task):
    """A :class:`Task` whose model returns class logits and whose targets are class
    indices: cross-entropy with the engine's label smoothing, and top-1/top-5 accuracy."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=label_smoothing)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        best = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        return {"top1": (best[:, 0] == targets).sum(),
                "top5": (best == targets[:, None]).any(dim=1).sum()}

    def num_correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.detach().argmax(1) == targets).sum()


def build_seeded(task: Task, seed: int) -> nn.Module:
    """``task``'s model as every worker builds it (torch's generator seeded first)."""
    torch.manual_seed(seed)
    return task.build_model(seed)


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or tuples, lists and dicts of them) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(item, device) for item in value)
    return value

