"""The Ray Train v2 side of ``python -m flashtrain.bench elastic``: the peer to beat.

The same model, samples, learning rate and loss as a flashtrain run of the same
:class:`~flashtrain.config.FlashtrainConfig`, trained by Ray Train v2's elastic
``TorchTrainer`` (``ScalingConfig(num_workers=(N - 1, N))``) with DDP, a durable
checkpoint at the end of every epoch and ``FailureConfig(max_failures=...)``:

- every step is planned by :class:`flashtrain.train.clock.TrainingClock` and sharded by
  :func:`flashtrain.sharding.shard_indices`, so step ``s`` trains on the same global batch
  at the same learning rate as flashtrain's step ``s``, whatever the world size;
- each rank's loss is weighted ``b_r / B * world`` so that DDP's mean of the gradients is
  the gradient of the global-batch mean (flashtrain sums ``b_r / B``-weighted grads);
- the last rank ends its process with ``os._exit(1)`` at global step ``K`` after its
  forward pass, as its backward (DDP's gradient all-reduce) is about to begin, so its
  peers are blocked in the collective: flashtrain's ``faults.kill_during=allreduce``.
  A marker file in the shared work dir makes the kill happen once, and records when.

Rank 0 appends one JSON line per event to ``<workdir>/timeline.jsonl``: ``start`` (the
step the worker group starts or resumes at, its world size) and ``step`` (a completed
global step and its wall time, after ``optimizer.step()``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TIMELINE = "timeline.jsonl"
KILL_MARKER = "killed.json"
STOP_MARKER = "stop.json"
_STATE_FILE = "state.pt"


def _append(path: Path, record: dict) -> None:
    # One short line per write, opened in append mode: a crash never tears earlier lines.
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _batch(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([dataset[int(i)][0] for i in indices])
    labels = torch.tensor([int(dataset[int(i)][1]) for i in indices])
    return images, labels


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: resume from the last checkpoint if any, then train every
    remaining step of the schedule, reporting after each one."""
    import ray.train
    import ray.train.torch

    from flashtrain.config import FlashtrainConfig
    from flashtrain.sharding import shard_indices
    from flashtrain.train.clock import TrainingClock
    from flashtrain.train.data import build_datasets
    from flashtrain.train.models import build_model, parameter_groups

    torch.set_num_threads(1)  # as flashtrain's CPU workers: no oversubscription of the cores
    config = FlashtrainConfig.model_validate(loop_config["config"])
    workdir = Path(loop_config["workdir"])
    kill_at_step = loop_config["kill_at_step"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    data = build_datasets(config.data, loop_config["data_cache"])
    model = build_model(config.model.name, data.num_classes, config.runtime.seed)
    opt = config.optimizer
    optimizer = torch.optim.SGD(parameter_groups(model, opt.weight_decay, opt.no_decay_bn_bias),
                                lr=0.0, momentum=opt.momentum, nesterov=opt.nesterov)
    clock = TrainingClock(num_samples=len(data.train), seed=config.data.seed,
                          min_tail=loop_config["min_tail"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / _STATE_FILE, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        clock.load_state_dict(state["clock"])
    model = ray.train.torch.prepare_model(model)  # DDP over gloo on CPU
    if rank == 0:
        _append(workdir / TIMELINE, {"kind": "start", "step": clock.global_step, "world": world,
                                     "time": time.time()})

    stop_file = workdir / STOP_MARKER
    while clock.epoch < config.schedule.epochs:
        plan = clock.plan(config.schedule)
        if stop_file.exists() and plan.global_step >= json.loads(stop_file.read_text())["at_step"]:
            break  # every rank stops before the same step (an external-kill benchmark is done)
        mine = shard_indices(epoch=plan.epoch, cursor=plan.cursor, batch=plan.batch,
                             num_workers=world, rank=rank, num_samples=plan.num_samples,
                             seed=plan.seed)
        images, labels = _batch(data.train, mine)
        model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels,
                               label_smoothing=config.schedule.label_smoothing)
        marker = workdir / KILL_MARKER
        if kill_at_step is not None and plan.global_step == kill_at_step and \
                rank == world - 1 and not marker.exists():
            marker.write_text(json.dumps({"step": plan.global_step, "rank": rank, "world": world,
                                          "pid": os.getpid(), "time": time.time()}))
            os._exit(1)  # the peers are about to block in DDP's gradient all-reduce
        (loss * (len(labels) / plan.batch) * world).backward()
        for group in optimizer.param_groups:
            group["lr"] = plan.lr
        optimizer.step()
        clock.advance(plan)
        done = time.time()
        if rank == 0:
            _append(workdir / TIMELINE, {"kind": "step", "step": plan.global_step, "time": done})
        metrics = {"step": plan.global_step, "time": done, "loss": float(loss.detach())}
        if plan.end_of_epoch:
            _report_with_checkpoint(metrics, model, optimizer, clock, rank)
        else:
            ray.train.report(metrics=metrics)


def _report_with_checkpoint(metrics: dict, model, optimizer, clock, rank: int) -> None:
    """Every rank reports; rank 0 attaches model + optimizer + clock (DDP keeps the
    replicas identical, so one copy is the whole state)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics=metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                    "clock": clock.state_dict()}, Path(folder) / _STATE_FILE)
        ray.train.report(metrics=metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def run_raytrain(config, *, workdir: Path, data_cache: Path, num_workers: int, min_workers: int,
                 cpus_per_worker: float, kill_at_step: int | None, min_tail: int,
                 max_failures: int) -> dict:
    """Train ``config`` under Ray Train v2 on the Ray instance already initialised, with
    one injected worker death at ``kill_at_step`` (None: no injected death; an external
    killer may act instead, and ``stop.json`` in ``workdir`` ends the run); returns the
    raw timeline.

    Returns ``{"kill": marker record or None, "timeline": [rank 0 records], "error": str or
    None, "scaling": what was asked of Ray Train}``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workdir.mkdir(parents=True, exist_ok=True)
    elastic = min_workers < num_workers
    scaling = ScalingConfig(num_workers=(min_workers, num_workers) if elastic else num_workers,
                            use_gpu=False, resources_per_worker={"CPU": cpus_per_worker})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "workdir": str(workdir),
                           "data_cache": str(data_cache), "kill_at_step": kill_at_step,
                           "min_tail": min_tail},
        scaling_config=scaling,
        run_config=RunConfig(storage_path=str(workdir / "storage"), name="raytrain-peer",
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    error = None
    try:
        trainer.fit()
    except Exception as err:  # a failed run still has a timeline worth reporting
        error = f"{type(err).__name__}: {err}"
    marker = workdir / KILL_MARKER
    timeline_file = workdir / TIMELINE
    timeline = ([json.loads(line) for line in timeline_file.read_text().splitlines() if line]
                if timeline_file.exists() else [])
    return {"kill": json.loads(marker.read_text()) if marker.exists() else None,
            "timeline": timeline, "error": error,
            "scaling": {"num_workers": list(scaling.num_workers) if elastic else num_workers,
                        "resources_per_worker": {"CPU": cpus_per_worker},
                        "max_failures": max_failures, "elastic": elastic}}
