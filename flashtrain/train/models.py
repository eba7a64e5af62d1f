"""Model construction: any torchvision classification model by name, plus ``tiny_cnn``
(a small network without BatchNorm or dropout, for exactness tests and rehearsals)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Sequential):
    """Two convolutions and a linear head; deterministic in training mode."""

    def __init__(self, num_classes: int = 10):
        super().__init__(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, num_classes),
        )


def build_model(name: str, num_classes: int, seed: int, zero_init_residual: bool = False) -> nn.Module:
    """The model ``name`` with ``num_classes`` outputs, initialised from ``seed`` so
    every worker starts from the same weights."""
    torch.manual_seed(seed)
    if name == "tiny_cnn":
        return TinyCNN(num_classes)
    import torchvision  # here, not at the top: its import costs every worker about 2 s

    extra = {"zero_init_residual": True} if zero_init_residual and _is_resnet(name) else {}
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    except ValueError as err:
        raise ValueError(f"model.name={name!r} is not a torchvision classification model "
                         "(see torchvision.models.list_models()) nor 'tiny_cnn'") from err


def _is_resnet(name: str) -> bool:
    return name.startswith(("resnet", "resnext", "wide_resnet"))


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool) -> list[dict]:
    """SGD parameter groups: no weight decay on BatchNorm and bias parameters (the usual
    large-batch recipe) when ``no_decay_bn_bias``."""
    if not no_decay_bn_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for name, param in module.named_parameters(recurse=False):
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
