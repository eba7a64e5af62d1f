"""The peers of ``python -m flashtrain.bench throughput``: the loops a user writes.

Two of them, written the way Ray's and PyTorch's documentation show, with nothing of
flashtrain in the loop (the data is the same synthetic set flashtrain trains on, so both
sides see the same tensors):

- :func:`run_ray_train`: Ray Train v2's ``TorchTrainer``; a ``DataLoader`` handed to
  ``ray.train.torch.prepare_data_loader`` (which adds the ``DistributedSampler``), the
  model to ``prepare_model`` (``DistributedDataParallel`` over gloo on CPU), SGD with
  momentum, and ``ray.train.report`` once per epoch, rank 0 with a checkpoint;
- :func:`run_single_process`: the same loop in one plain process (``python -m
  flashtrain.bench.plain_peer``), no Ray and no DDP, the peer of a 1x1 grid.

The only addition to the documented loops is a ``time.perf_counter()`` appended to a
list after each optimizer step (the step's end, as flashtrain's step records have it),
reported with the epoch's metrics. Loader processes: ``loader_workers`` (0 for the
synthetic set, which needs no decoding; give it more for decoded image files).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader

NUM_CLASSES = 10
LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-5


def _dataset(spec: dict):
    from flashtrain.train.data import SyntheticImages  # the data only, not the loop

    return SyntheticImages(spec["samples"], NUM_CLASSES, spec["image_size"], seed=spec["seed"])


def _epoch(model, loader, optimizer) -> dict:
    """One pass over ``loader``: the step end times and the last loss."""
    model.train()
    ends, loss = [], None
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        ends.append(time.perf_counter())
    return {"step_ends": ends, "loss": float(loss) if loss is not None else None}


def _model(spec: dict):
    torch.manual_seed(spec["seed"])
    if spec["model"] == "tiny_cnn":  # the same small network the smoke tests train
        from flashtrain.train.models import TinyCNN

        return TinyCNN(NUM_CLASSES)
    return torchvision.models.get_model(spec["model"], weights=None, num_classes=NUM_CLASSES)


def _optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                           weight_decay=WEIGHT_DECAY)


def train_loop_per_worker(spec: dict) -> None:
    """The Ray Train v2 worker: Ray Train's documented DDP loop."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(spec["torch_threads"])
    loader = DataLoader(_dataset(spec), batch_size=spec["batch"], shuffle=True,
                        num_workers=spec["loader_workers"], drop_last=True)
    loader = ray.train.torch.prepare_data_loader(loader)
    model = ray.train.torch.prepare_model(_model(spec))
    optimizer = _optimizer(model)
    context = ray.train.get_context()
    for epoch in range(spec["epochs"]):
        if context.get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        metrics = {"epoch": epoch, **_epoch(model, loader, optimizer)}
        # As Ray's guide: rank 0 saves the model with the epoch's metrics (Ray Train v2
        # hands back only the metrics reported with a checkpoint).
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if context.get_world_rank() == 0:
                state = getattr(model, "module", model).state_dict()
                torch.save(state, os.path.join(folder, "model.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


def run_ray_train(spec: dict, num_workers: int, storage: str) -> list[float]:
    """Ray Train v2 + DDP on the Ray instance already initialised (one CPU per worker);
    rank 0's step end times of the last epoch."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage, name="plain-ddp"))
    result = trainer.fit()
    return result.metrics["step_ends"]


def run_single_process(spec: dict, timeout_s: float = 1800.0) -> list[float]:
    """The plain loop in a fresh ``python`` process; its step end times."""
    done = subprocess.run([sys.executable, "-m", "flashtrain.bench.plain_peer", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the plain single-process loop failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])["step_ends"]


def main(argv: list[str]) -> int:
    """``python -m flashtrain.bench.plain_peer SPEC_JSON``: the single-process loop;
    prints the last epoch's metrics as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench.plain_peer")
    parser.add_argument("spec", help="JSON: model, samples, image_size, seed, batch, "
                        "torch_threads, loader_workers, epochs; optional niceness")
    spec = json.loads(parser.parse_args(argv).spec)
    # Ray runs its workers niced (15 by default): the bench gives this process the same
    # niceness, so a loaded machine's other processes weigh on both sides alike.
    os.nice(spec.get("niceness", 0))
    torch.set_num_threads(spec["torch_threads"])
    loader = DataLoader(_dataset(spec), batch_size=spec["batch"], shuffle=True,
                        num_workers=spec["loader_workers"], drop_last=True)
    model = _model(spec)
    optimizer = _optimizer(model)
    metrics = {}
    for _ in range(spec["epochs"]):
        metrics = _epoch(model, loader, optimizer)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
