"""``python -m flashtrain.bench throughput --gpu``: flashtrain's worker against a plain
PyTorch loop on one GPU.

Both train torchvision's ResNet-50 (1000 classes, zero-init residuals) on 224x224
synthetic images with autocast (``--precision``: fp16 with a loss scale, or bf16) in
channels-last, SGD with momentum, label smoothing 0.1, the same batch size:

* **flashtrain**: one :class:`~flashtrain.train.worker.Worker` actor on a 1x1 grid
  (local Ray, the GPU reserved for it, flashtrain's NCCL backend), fed by its own data
  path (``data.source=synthetic``, ``--loader-workers`` decode processes); the timed
  steps run as one ``train_window`` call after ``--warmup`` untimed ones, so the number
  includes everything the worker does per step (data, host-to-device copy, forward,
  backward, the fp16 overflow check, optimizer) and one Ray call;
* **plain PyTorch**: the textbook AMP loop in this process, on one batch that stays on
  the GPU (its best case: no data path at all), with ``torch.amp.GradScaler``.

images/s of each, and flashtrain's as a fraction of the plain loop's (issue 9's target:
at least 0.9). Without CUDA it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

TARGET_RATIO = 0.9
EXIT_NO_GPU = 2
NUM_CLASSES = 1000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench throughput --gpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="(selects this benchmark)")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--precision", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--loader-workers", type=int,
                        default=max(0, min(8, (os.cpu_count() or 2) - 2)),
                        help="flashtrain's decode processes (default: min(8, cores - 2))")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--batch, --steps and --warmup must be >= 1")
    return args


def no_gpu_message() -> str | None:
    """Why this benchmark cannot run here, or ``None``."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"throughput --gpu needs a CUDA GPU, and this machine has none (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): run it on a GPU "
            "machine, or leave out --gpu for the CPU benchmark")


def worker_overrides(args: argparse.Namespace) -> list[str]:
    """The job configuration of the flashtrain side: enough samples that the timed steps
    never reach an epoch's end."""
    samples = args.batch * (args.warmup + args.steps + 1)
    return [
        "model.name=resnet50", f"model.precision={args.precision}", "model.channels_last=true",
        "grid.shape=1x1", "grid.use_gpu=true", "grid.cpus_per_worker=1",
        "data.source=synthetic", f"data.synthetic_samples={samples}",
        f"data.synthetic_classes={NUM_CLASSES}", f"data.image_size={args.image_size}",
        f"data.loader_workers={args.loader_workers}", "data.min_samples_per_worker=1",
        "schedule.epochs=2", "schedule.warmup_epochs=0", "schedule.label_smoothing=0.1",
        f"schedule.phases=[{{start_epoch: 0, global_batch: {args.batch}}}]",
    ]


def run_flashtrain(args: argparse.Namespace) -> dict:
    """The worker actor on a 1x1 grid: images/s of one window of ``--steps`` steps."""
    import ray

    from flashtrain.config import load_config
    from flashtrain.elastic.membership import WorkerActor
    from flashtrain.tasks.images import ImageClassification
    from flashtrain.topology import Grid
    from flashtrain.train.clock import TrainingClock

    config = load_config(None, worker_overrides(args))
    clock = TrainingClock(num_samples=config.data.synthetic_samples, seed=config.data.seed,
                          min_tail=1)
    plans = []
    for _ in range(args.warmup + args.steps):
        plans.append(clock.plan(config.schedule))
        clock.advance(plans[-1])
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), num_gpus=1,
             include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="flashtrain-gpu-throughput-") as cache:
            worker = WorkerActor.options(num_cpus=1, num_gpus=1).remote(
                config, ImageClassification.from_config(config, cache))
            ray.get(worker.join.remote(Grid(1, 1), 0, 0), timeout=600)
            ray.get(worker.train_window.remote(plans[:args.warmup]), timeout=1800)
            began = time.perf_counter()
            results = ray.get(worker.train_window.remote(plans[args.warmup:]), timeout=1800)
            elapsed = time.perf_counter() - began
            scale = ray.get(worker.__ray_call__.remote(lambda w: w.scaler.state_dict()))
            ray.kill(worker)
    finally:
        ray.shutdown()
    images = sum(r.samples for r in results)
    data_wait = sum(getattr(r, "data_wait_s", 0.0) for r in results)
    return {"system": "flashtrain worker (1x1)", "images_per_sec": images / elapsed,
            "step_s": elapsed / len(results), "data_wait_s_per_step": data_wait / len(results),
            "steps": len(results), "loss_scale": scale.get("scale")}


def run_plain(args: argparse.Namespace) -> dict:
    """The textbook AMP channels-last loop on one batch resident on the GPU."""
    import torch
    import torch.nn.functional as F

    from flashtrain.train.models import build_model, parameter_groups

    device = torch.device("cuda")
    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    model = build_model("resnet50", NUM_CLASSES, seed=0, zero_init_residual=True)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-5, True), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=generator).to(device)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(images).float(), labels, label_smoothing=0.1)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - began
    return {"system": "plain PyTorch AMP loop", "images_per_sec": args.batch * args.steps / elapsed,
            "step_s": elapsed / args.steps, "data_wait_s_per_step": 0.0, "steps": args.steps,
            "loss_scale": scaler.get_scale() if scaler.is_enabled() else None}


def format_table(rows: list[dict], args: argparse.Namespace, device: str) -> str:
    lines = [f"ResNet-50, {args.image_size}px synthetic, batch {args.batch}, {args.precision} "
             f"autocast, channels-last, {args.steps} timed steps after {args.warmup}, on {device}",
             f"{'system':>26}{'img/s':>10}{'step s':>9}{'data wait s':>13}"]
    for row in rows:
        lines.append(f"{row['system']:>26}{row['images_per_sec']:>10.1f}{row['step_s']:>9.4f}"
                     f"{row['data_wait_s_per_step']:>13.4f}")
    ratio = rows[0]["images_per_sec"] / rows[1]["images_per_sec"]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    lines.append(f"flashtrain / plain = {ratio:.3f} (target >= {TARGET_RATIO}: {verdict})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    problem = no_gpu_message()
    if problem is not None:
        print(f"flashtrain.bench: {problem}", file=sys.stderr)
        return EXIT_NO_GPU
    import torch

    device = torch.cuda.get_device_name(0)
    rows = [run_flashtrain(args)]
    rows.append(run_plain(args))  # after the worker is gone: the GPU to itself
    print(format_table(rows, args, device))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": {**vars(args), "device": device,
                                "ratio": rows[0]["images_per_sec"] / rows[1]["images_per_sec"]},
                       "results": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
