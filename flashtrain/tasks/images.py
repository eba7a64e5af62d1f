"""The image classifier of ``python -m flashtrain.jobs.imagenet`` as a :class:`~flashtrain.Task`:
a torchvision classification model (or ``tiny_cnn``) named by ``model.name``, on the data
set that ``data.*`` names (ImageNet's folder layout, the digits written as one, or
synthetic tensors), cross-entropy with label smoothing and top-1/top-5 accuracy."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from flashtrain.config import DataConfig, FlashtrainConfig, ModelConfig
from flashtrain.task import ClassificationTask
from flashtrain.train.data import DEFAULT_DIGITS_CACHE, DatasetPair, build_datasets


class ImageClassification(ClassificationTask):
    """``model.name`` on ``data.source``; the sections of the job's config it reads are
    its own copy, so the task pickles small (the data sets are built where used)."""

    def __init__(self, model: ModelConfig, data: DataConfig,
                 data_cache: Path | str | None = None) -> None:
        self.model_cfg = model
        self.data_cfg = data
        self.data_cache = Path(data_cache or DEFAULT_DIGITS_CACHE).expanduser()
        self._pair: DatasetPair | None = None  # built once per process, never pickled

    @classmethod
    def from_config(cls, config: FlashtrainConfig,
                    data_cache: Path | str | None = None) -> ImageClassification:
        return cls(config.model, config.data, data_cache)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pair": None}

    def build_model(self, seed: int) -> nn.Module:
        from flashtrain.train.models import build_model

        return build_model(self.model_cfg.name, self._datasets().num_classes, seed,
                           self.model_cfg.zero_init_residual)

    def datasets(self) -> DatasetPair:
        return self._datasets()

    def _datasets(self) -> DatasetPair:
        if self._pair is None:
            self._pair = build_datasets(self.data_cfg, self.data_cache)
        return self._pair

    @property
    def num_classes(self) -> int:
        return self._datasets().num_classes

    def preflight(self) -> None:
        from flashtrain.preflight import check_data, check_model

        check_model(self.model_cfg.name)
        check_data(self.data_cfg)


def resolve_task(task, config: FlashtrainConfig):
    """``task`` itself, or, where a caller still passes the digits cache folder (a path
    or None) as before tasks existed, the config's image classifier with that cache."""
    from flashtrain.task import Task

    if isinstance(task, Task):
        return task
    return ImageClassification.from_config(config, task)


def model_name(task, config: FlashtrainConfig) -> str:
    """The model's name in summaries, checkpoints and messages: ``model.name`` for the
    image classifier, else the task's ``module:Class``."""
    if isinstance(task, ImageClassification):
        return config.model.name
    return f"{type(task).__module__}:{type(task).__qualname__}"
