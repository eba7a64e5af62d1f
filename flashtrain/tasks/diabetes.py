"""A second shipped task, and not an image classifier: regression of disease progression
on scikit-learn's diabetes data (442 patients, 10 numeric features; it ships inside
scikit-learn, nothing is downloaded). A small MLP, mean-squared-error loss, and two
metrics of its own: ``mse`` (in units of the target's variance, so 1.0 is as good as
predicting the mean; label smoothing means nothing here and is ignored) and ``mae``
(in the target's own units).

    python -m flashtrain.run flashtrain.tasks.diabetes:DiabetesRegression \\
        --set schedule.epochs=20 --set "schedule.phases=[{start_epoch: 0, global_batch: 32}]"
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from flashtrain.task import Task

_SPLIT_SEED = 20181113  # fixed: the train/val split never moves between runs
_VAL_FRACTION = 0.2


class DiabetesRegression(Task):
    """Predict one year's disease progression from age, sex, BMI, blood pressure and six
    blood serum measurements (targets standardised by the training split)."""

    def __init__(self, hidden: int = 32) -> None:
        self.hidden = hidden

    def build_model(self, seed: int) -> nn.Module:
        return nn.Sequential(nn.Linear(10, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1),
                             nn.Flatten(0))  # (batch,) predictions

    def datasets(self) -> tuple[TensorDataset, TensorDataset]:
        from sklearn.datasets import load_diabetes  # local: only this task needs it

        bunch = load_diabetes()
        order = np.random.default_rng(_SPLIT_SEED).permutation(len(bunch.target))
        num_val = int(round(len(order) * _VAL_FRACTION))
        val, train = order[:num_val], order[num_val:]
        mean, std = bunch.target[train].mean(), bunch.target[train].std()
        self.target_std = float(std)  # mae is reported in the target's own units

        def split(indices: np.ndarray) -> TensorDataset:
            features = torch.tensor(bunch.data[indices] / bunch.data[train].std(0),
                                    dtype=torch.float32)
            targets = torch.tensor((bunch.target[indices] - mean) / std, dtype=torch.float32)
            return TensorDataset(features, targets)

        return split(train), split(val)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        error = outputs - targets
        return {"mse": (error ** 2).sum(), "mae": error.abs().sum() * self._target_std()}

    def _target_std(self) -> float:
        if not hasattr(self, "target_std"):
            self.datasets()
        return self.target_std
