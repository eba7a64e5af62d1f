"""The GPU tier runs where CUDA is; elsewhere its tests are collected and reported as
skipped (not skipped at import), so a CPU machine still sees what it left out and pytest
does not end with "no tests ran"."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    reasons = []
    if torch.cuda.device_count() < 1:
        reasons.append("needs a CUDA GPU")
    if importlib.util.find_spec("cupy") is None:
        reasons.append("Ray's NCCL collective backend needs cupy (pip install '.[gpu]')")
    if not reasons:
        return
    here = str(config.rootpath / "tests" / "gpu")
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))
