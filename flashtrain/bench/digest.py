"""``python -m flashtrain.bench digest``: what the replica check costs a worker.

At every commit each member checksums its parameters, synchronised buffers and
optimizer state (:mod:`flashtrain.train.digest`; ``elastic.check_replicas``). This runs,
in one process and interleaved, a training step of a worker of the default job (its
model, per-worker batch, image size, optimizer and one torch thread: forward, backward,
SGD step, without the all-reduce) and the checksums of the state it leaves, and prints
both and their ratio: per commit, and per step at the job's commit cadence. The step
here has no all-reduce, so the fraction is an upper bound for a real step. The driver's
side of the check (one small call per member per commit) is in metrics.jsonl's
``commit`` events as ``replica_check_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from flashtrain.config import load_config
from flashtrain.train.digest import replica_checksums
from flashtrain.train.models import build_model, parameter_groups


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench digest",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (as for the job), e.g. model.name=resnet18")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    config = load_config(None, args.set)
    torch.set_num_threads(config.grid.torch_threads)
    model = build_model(config.model.name, 10, config.runtime.seed,
                        config.model.zero_init_residual)
    opt = config.optimizer
    optimizer = torch.optim.SGD(parameter_groups(model, opt.weight_decay, opt.no_decay_bn_bias),
                                lr=0.01, momentum=opt.momentum, nesterov=opt.nesterov)
    batch = _per_worker_batch(config)
    size = config.data.image_size
    steps, sums = [], []
    for _ in range(args.repeats):
        images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        began = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        steps.append(time.perf_counter() - began)
        began = time.perf_counter()
        checksums = replica_checksums(model, optimizer)
        sums.append(time.perf_counter() - began)
    state_mb = sum(p.numel() * p.element_size() for p in model.parameters()) * 2 / 2**20
    every = config.elastic.commit_every_steps
    result = {
        "model": config.model.name, "per_worker_batch": batch, "image_size": size,
        "tensors": len(checksums), "state_mb": round(state_mb, 1),
        "step_s": _spread(steps), "checksum_s": _spread(sums),
        "commit_every_steps": every,
        "per_commit_fraction_of_step": statistics.median(sums) / statistics.median(steps),
        "per_step_fraction": statistics.median(sums) / (every * statistics.median(steps)),
    }
    print(f"{config.model.name}, {batch} images of {size} px per worker, {len(checksums)} "
          f"tensors ({state_mb:.0f} MB of parameters and momentum), {args.repeats} rounds")
    for key in ("step_s", "checksum_s"):
        s = result[key]
        print(f"  {key:<11} median {s['median']:.4f} s  min {s['min']:.4f}  max {s['max']:.4f}")
    print(f"  checksums per commit: {100 * result['per_commit_fraction_of_step']:.2f}% of a "
          f"step; every {every} steps: {100 * result['per_step_fraction']:.2f}% per step")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


def _per_worker_batch(config) -> int:
    from flashtrain.topology import Grid

    workers = Grid.parse(config.grid.shape).num_workers if config.grid.shape != "auto" else 1
    return max(config.schedule.phases[0].global_batch // workers, 1)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
