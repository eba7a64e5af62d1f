"""Measure when each parameter's gradient becomes ready in ResNet-50's backward pass.

``python -m flashtrain.bench costmodel --profile-backward`` runs this on the local CPU
and writes :data:`flashtrain.costmodel.PROFILE_PATH`, the table the overlap model reads.
A hook on every parameter (``register_post_accumulate_grad_hook``) notes the moment its
gradient is accumulated, measured from the start of ``loss.backward()``; the per-step
median over ``iters`` steps, divided by the whole backward time, is the parameter's
*ready fraction*. What carries over to a V100 is that relative profile (which layers
finish early, how much of the backward is left after each), not the CPU's seconds.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def measure(batch: int = 8, image_size: int = 224, iters: int = 3, warmup: int = 1,
            threads: int | None = None) -> dict:
    """The profile of torchvision ResNet-50 (1,000 classes): one row per parameter in
    parameter order, with its element count and median ready fraction."""
    import torch
    import torchvision

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.train()
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    stamps: dict[str, float] = {}
    for name, param in params:
        param.register_post_accumulate_grad_hook(
            lambda _p, name=name: stamps.__setitem__(name, time.perf_counter()))
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch,))
    fractions: dict[str, list[float]] = {name: [] for name, _ in params}
    forward_s, backward_s = [], []
    for step in range(warmup + iters):
        model.zero_grad(set_to_none=True)
        stamps.clear()
        began = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        middle = time.perf_counter()
        loss.backward()
        ended = time.perf_counter()
        if step < warmup:
            continue
        forward_s.append(middle - began)
        backward_s.append(ended - middle)
        for name, _ in params:
            fractions[name].append((stamps[name] - middle) / (ended - middle))
    return {
        "model": "torchvision resnet50 (1000 classes)",
        "measured_on": f"CPU, {torch.get_num_threads()} torch threads, batch {batch}, "
                       f"{image_size}px, median of {iters} steps after {warmup} warm-up",
        "torch": torch.__version__,
        "forward_s": statistics.median(forward_s),
        "backward_s": statistics.median(backward_s),
        "params": [{"name": name, "numel": param.numel(),
                    "ready_fraction": round(min(max(statistics.median(fractions[name]), 0.0), 1.0), 5)}
                   for name, param in params],
    }


def write(profile: dict, path: Path) -> None:
    path.write_text(json.dumps(profile, indent=1) + "\n")
