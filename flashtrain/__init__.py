"""flashtrain: an elastic 2D-torus training engine on Ray.

``flashtrain.Task`` says what to train, ``flashtrain.fit(task, config)`` trains it
(the shell's ``python -m flashtrain.run MODULE:TASK`` does the same). Both are loaded on
first use, so importing a light part of the package does not import torch.
"""

from __future__ import annotations

__all__ = ["ClassificationTask", "Task", "fit"]


def __getattr__(name: str):
    if name in ("Task", "ClassificationTask"):
        from flashtrain import task

        return getattr(task, name)
    if name == "fit":
        from flashtrain.api import fit

        return fit
    raise AttributeError(f"module 'flashtrain' has no attribute {name!r}")
