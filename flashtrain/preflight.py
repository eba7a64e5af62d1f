"""Checks made before a job starts anything: no Ray, no run directory, no decoding.

A job that cannot run should say so in its first second, not after Ray has started and
a run directory has been written. Each check here raises :class:`PreflightError` with
one message that names what is wrong (the path, the class folder, the model name) and
how to fix it. The checks are cheap on purpose: the data check scans directories (is
there a ``train/<class>`` folder with at least one image file in it?) and never opens an
image; unreadable files are still found and skipped later by :mod:`flashtrain.train.data`.

:func:`capacity_shortfall` is the grid-against-cluster arithmetic behind
:func:`flashtrain.train.placement.check_capacity`, kept here because it is pure.
"""

from __future__ import annotations

import difflib
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flashtrain.config import DataConfig, FlashtrainConfig

TINY_MODEL = "tiny_cnn"
_NAMED = 5  # how many class folders one message names
_EPS = 1e-6  # Ray keeps resources in units of 1e-4: 3 x 0.1 CPU must fit in 0.3 CPU


class PreflightError(Exception):
    """The job cannot start as configured; the message says what is wrong and the fix."""


# --------------------------------------------------------------------------- model


def known_model_names() -> list[str]:
    """Every name ``model.name`` accepts: ``tiny_cnn`` and torchvision's classification
    models (not its detection, segmentation, video or quantized ones)."""
    import torchvision  # local: the other checks must not pay for importing torch

    return [TINY_MODEL, *torchvision.models.list_models(module=torchvision.models)]


def check_model(name: str) -> None:
    """Raise :class:`PreflightError` unless ``name`` is a model the workers can build."""
    known = known_model_names()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise PreflightError(f"model.name={name!r} is not a known model{hint}: set model.name to "
                         f"one of {', '.join(known)}")


# --------------------------------------------------------------------------- data


def _image_suffixes() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def _class_folders(split: Path) -> list[str]:
    """Class names of an ImageFolder split, as torchvision finds them: its sub-folders."""
    return sorted(entry.name for entry in os.scandir(split) if entry.is_dir())


def _holds_an_image(folder: Path, suffixes: tuple[str, ...]) -> bool:
    """Whether any file under ``folder`` (any depth, as ImageFolder walks) has an image
    suffix. Stops at the first one, so a full class folder costs one directory listing."""
    for _, _, filenames in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(suffixes) for name in filenames):
            return True
    return False


def _check_split(root: Path, split: str) -> list[str]:
    """The class folders of ``root/split``; raises when the folder or its classes are missing."""
    folder = root / split
    if not folder.is_dir():
        raise PreflightError(f"data.root {root} has no {split}/ folder: an image folder needs "
                             f"{root}/train/<class>/<images> and {root}/val/<class>/<images>")
    classes = _class_folders(folder)
    if not classes:
        raise PreflightError(f"{folder} holds no class folders: put each class's images in "
                             f"{folder}/<class>/ (e.g. {folder}/n01440764/*.JPEG)")
    return classes


def check_image_folders(root: Path | str) -> None:
    """Raise :class:`PreflightError` unless ``root`` holds ``train/<class>/`` and
    ``val/<class>/`` with the same class folders and at least one image file in each."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise PreflightError(f"data.root {root} {what}: set data.root to a folder with "
                             "train/<class>/<images> and val/<class>/<images>")
    train, val = _check_split(root, "train"), _check_split(root, "val")
    if train != val:
        only_train = sorted(set(train) - set(val))[:_NAMED]
        only_val = sorted(set(val) - set(train))[:_NAMED]
        raise PreflightError(f"{root}: train/ and val/ must have the same class folders (only in "
                             f"train: {only_train}, only in val: {only_val}): add the missing "
                             "folders or remove the extra ones")
    suffixes = _image_suffixes()
    for split in ("train", "val"):
        empty = [name for name in train if not _holds_an_image(root / split / name, suffixes)]
        if empty:
            raise PreflightError(f"class folder {root / split / empty[0]} holds no image files "
                                 f"({', '.join(suffixes)})"
                                 + (f", nor do {len(empty) - 1} other(s) in {split}/ "
                                    f"(e.g. {empty[1:_NAMED]})" if len(empty) > 1 else "")
                                 + ": add images to it, or remove it from both train/ and val/")


def check_data(data_cfg: DataConfig) -> None:
    """Raise :class:`PreflightError` when ``data_cfg`` names data that is not there.
    Only ``imagefolder`` reads the user's files; ``digits`` writes its own folder and
    ``synthetic`` needs none."""
    if data_cfg.source == "imagefolder":
        check_image_folders(data_cfg.root)


def check_before_start(config: FlashtrainConfig) -> None:
    """The engine's checks that need no cluster: the GPU install. (The model and the
    data are the task's: :func:`flashtrain.task_checks.check_task`.)"""
    if config.grid.use_gpu:
        check_gpu_install(config.collective.gpu_backend)
        check_gpu_stack(probe_gpu_stack(), ranks_per_gpu=1,
                        shm_need_bytes=loader_shm_bytes_for(config))


# --------------------------------------------------------------------------- cluster size


def initial_num_workers(config: FlashtrainConfig) -> int:
    """Workers of the grid the job forms first (the first phase's grid, else
    ``grid.shape``); with ``grid.shape=auto`` the job needs room for one at least."""
    shape = config.schedule.phases[0].grid or config.grid.shape
    if shape == "auto":
        return 1
    rows, cols = shape.split("x")
    return int(rows) * int(cols)


def _workers_fitting(bundle: dict[str, float], node: dict[str, float]) -> int:
    return min(math.floor(node.get(name, 0.0) / amount + _EPS) for name, amount in bundle.items())


def _amounts(resources: dict[str, float], names: list[str]) -> str:
    return " and ".join(f"{resources.get(name, 0.0):g} {name}" for name in names)


def _fix_for(bundle: dict[str, float], num_fitting: int, short: list[str]) -> str:
    if "GPU" in short and num_fitting == 0:
        return "set grid.use_gpu=false, or run on a cluster with GPUs"
    fixes = [f"use a grid of at most {num_fitting} worker(s) (grid.shape)"] if num_fitting else []
    if "CPU" in short or not short:
        fixes.append("lower grid.cpus_per_worker")
    return ", ".join(fixes + ["or add nodes"])


def capacity_shortfall(bundle: dict[str, float], num_workers: int,
                       nodes: list[dict[str, float]]) -> str | None:
    """``None`` when ``num_workers`` bundles of ``bundle`` fit on ``nodes`` (each node's
    total resources; a bundle cannot span nodes), otherwise what was asked, what the
    cluster has and how to fix it. Identical bundles pack greedily, so counting per
    node is exact."""
    num_fitting = sum(_workers_fitting(bundle, node) for node in nodes)
    if num_fitting >= num_workers:
        return None
    names = sorted(bundle)
    asked = {name: amount * num_workers for name, amount in bundle.items()}
    total = {name: sum(node.get(name, 0.0) for node in nodes) for name in names}
    per_worker = ", ".join(f"{bundle[name]:g} {name}" for name in names)
    short = [name for name in names if total[name] + _EPS < asked[name]]
    spans = "" if short else " (the totals would do, but one worker cannot span nodes)"
    fix = _fix_for(bundle, num_fitting, short)
    return (f"the grid needs {num_workers} worker(s) of {per_worker} each "
            f"({_amounts(asked, names)} in all), but the cluster's {len(nodes)} node(s) have "
            f"{_amounts(total, names)}, room for {num_fitting} such worker(s){spans}: {fix}")


# --------------------------------------------------------------------------- GPU


def gpu_collectives_problem(gpu_backend: str) -> str | None:
    """Why this process cannot run GPU collectives with ``gpu_backend`` ("flashtrain":
    flashtrain's NCCL backend; "ray_nccl": Ray's cupy-based one), with the fix; ``None``
    when it can. Asked in each worker as it joins a grid (the driver may have no GPU)."""
    import torch  # local: the other checks must not pay for importing torch
    import torch.distributed as dist

    build = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    if not torch.cuda.is_available():
        # The usual cause on a GPU node: a driver older than torch's CUDA needs.
        stack = probe_gpu_stack()
        too_old = driver_problem(stack.driver_version, torch.version.cuda, torch.__version__)
        if too_old is not None:
            return f"grid.use_gpu=true, but this worker sees no CUDA device: {too_old}"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"grid.use_gpu=true, but this worker sees no CUDA device ({build}, "
                f"CUDA_VISIBLE_DEVICES={visible!r}): install an NVIDIA driver that supports "
                f"CUDA {torch.version.cuda or '(a CUDA build of torch is needed)'}, or set "
                "grid.use_gpu=false to train on CPU workers with gloo")
    if not (dist.is_available() and dist.is_nccl_available()):
        return (f"grid.use_gpu=true, but {build} was built without NCCL: install a CUDA "
                "build of torch (pip install torch==2.14.1), or set grid.use_gpu=false")
    if gpu_backend == "ray_nccl":
        return ray_nccl_problem(build)
    return None


def ray_nccl_problem(build: str) -> str | None:
    """Ray registers its NCCL backend only if cupy imports; say so instead of Ray's
    "Backend NCCL not registered"."""
    wanted = f"cupy-cuda{(torch_cuda_major() or 13)}x"
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to load cupy is the answer
        return (f"collective.gpu_backend=ray_nccl needs cupy, which does not load here "
                f"({type(exc).__name__}: {str(exc).strip()[:200]}): pip install "
                f"'flashtrain[gpu]' ({wanted}, matching {build}), or set "
                "collective.gpu_backend=flashtrain (no cupy needed)")
    import ray.util.collective as col

    if not col.nccl_available():
        return (f"collective.gpu_backend=ray_nccl: cupy loads but Ray's NCCL backend is not "
                f"available: check that cupy's CUDA matches {build} ({wanted}), or set "
                "collective.gpu_backend=flashtrain")
    return None


def torch_cuda_major() -> int | None:
    """The CUDA major version torch was built for (``None`` for a CPU build)."""
    import torch

    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def check_gpu_install(gpu_backend: str) -> None:
    """What the driver can check of a GPU job without a GPU of its own (its node may have
    none): torch was built with NCCL, and cupy is installed for ``ray_nccl``. The device
    itself is checked by each worker as it joins (:func:`check_gpu_collectives`)."""
    import importlib.util

    import torch
    import torch.distributed as dist

    build = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
    if not (dist.is_available() and dist.is_nccl_available()):
        raise PreflightError(f"grid.use_gpu=true, but {build} was built without NCCL: install a "
                             "CUDA build of torch (pip install torch==2.14.1), or set "
                             "grid.use_gpu=false")
    if gpu_backend == "ray_nccl" and importlib.util.find_spec("cupy") is None:
        raise PreflightError(f"collective.gpu_backend=ray_nccl needs cupy, which is not "
                             f"installed: pip install 'flashtrain[gpu]' "
                             f"(cupy-cuda{torch_cuda_major() or 13}x, matching {build}), or "
                             "set collective.gpu_backend=flashtrain (no cupy needed)")


def check_gpu_collectives(gpu_backend: str) -> None:
    """Raise :class:`PreflightError` when :func:`gpu_collectives_problem` finds one."""
    problem = gpu_collectives_problem(gpu_backend)
    if problem is not None:
        raise PreflightError(problem)


# --------------------------------------------------------------------------- GPU stack
#
# What a GPU node must have before torch and NCCL are asked anything: a driver new enough
# for torch's CUDA, GPUs that accept the processes placed on them, and room in /dev/shm
# for the loader. Probed once (probe_gpu_stack) and judged by pure functions, so the
# judgement is tested on CPU with recorded values.

# The oldest driver branch each CUDA major version runs on (NVIDIA's CUDA compatibility
# notes, minor-version compatibility): torch 2.14.1 from PyPI is built for CUDA 13.
MIN_DRIVER_BRANCH = {13: 580, 12: 525, 11: 450}
# Compute modes that refuse processes: "Prohibited" refuses all, "Exclusive_Process" all
# but one per GPU (the GPU tier puts two ranks on one GPU).
BLOCKING_COMPUTE_MODES = {"Prohibited": 0, "Exclusive_Process": 1}
NVIDIA_SMI_TIMEOUT_S = 20.0
PREFETCH_FACTOR = 2  # torch DataLoader's default: batches in flight per loader process


@dataclass(frozen=True)
class GpuStack:
    """What :func:`probe_gpu_stack` found on this node (``None``: could not tell)."""

    driver_version: str | None  # e.g. "580.65.06"; None where nvidia-smi is absent
    gpu_names: tuple[str, ...] = ()
    compute_modes: tuple[str, ...] = ()  # one per GPU, as nvidia-smi names them
    shm_free_bytes: int | None = None  # free space of /dev/shm


def parse_nvidia_smi(csv_text: str) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """Driver version, GPU names and compute modes from ``nvidia-smi
    --query-gpu=driver_version,name,compute_mode --format=csv,noheader``."""
    rows = [[cell.strip() for cell in line.split(",")]
            for line in csv_text.strip().splitlines() if line.strip()]
    rows = [row for row in rows if len(row) == 3]
    if not rows:
        return None, (), ()
    return rows[0][0], tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def probe_gpu_stack(shm_path: str = "/dev/shm") -> GpuStack:
    """Ask ``nvidia-smi`` (bounded) and ``statvfs(/dev/shm)``; never raises."""
    driver, names, modes = None, (), ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,compute_mode",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
        if out.returncode == 0:
            driver, names, modes = parse_nvidia_smi(out.stdout)
    except (OSError, subprocess.TimeoutExpired):
        pass  # no driver installed, or a hung one: the checks say what they can
    try:
        stat = os.statvfs(shm_path)
        shm = stat.f_bavail * stat.f_frsize
    except OSError:
        shm = None
    return GpuStack(driver, names, modes, shm)


def driver_problem(driver_version: str | None, torch_cuda: str | None,
                   torch_version: str) -> str | None:
    """Why the driver cannot run torch's CUDA build, with the fix; ``None`` when it can
    or when either version is unknown."""
    if not driver_version or not torch_cuda:
        return None
    cuda_major = int(torch_cuda.split(".")[0])
    needed = MIN_DRIVER_BRANCH.get(cuda_major)
    branch = int(driver_version.split(".")[0])
    if needed is None or branch >= needed:
        return None
    return (f"NVIDIA driver {driver_version} is older than R{needed}, which torch "
            f"{torch_version} (built for CUDA {torch_cuda}) needs: upgrade the driver to "
            f"R{needed} or newer, or install a torch build for an older CUDA that driver "
            f"R{branch} supports (see the README's GPU section)")


def compute_mode_problem(compute_modes: tuple[str, ...], ranks_per_gpu: int) -> str | None:
    """Why a GPU's compute mode refuses ``ranks_per_gpu`` processes, with the fix."""
    for index, mode in enumerate(compute_modes):
        allowed = BLOCKING_COMPUTE_MODES.get(mode)
        if allowed is not None and ranks_per_gpu > allowed:
            return (f"GPU {index} is in compute mode {mode}, which admits {allowed} "
                    f"process(es), and {ranks_per_gpu} must use it: set it to Default "
                    f"(sudo nvidia-smi -i {index} -c DEFAULT)")
    return None


def loader_shm_bytes(batch_per_worker: int, bytes_per_sample: int, loader_workers: int,
                     workers_per_node: int) -> int:
    """Shared memory the training loaders of one node hold at most: each of a worker's
    ``loader_workers`` processes hands finished batches to it through /dev/shm, up to
    :data:`PREFETCH_FACTOR` each."""
    if loader_workers == 0:
        return 0
    in_flight = loader_workers * PREFETCH_FACTOR
    return batch_per_worker * bytes_per_sample * in_flight * workers_per_node


def loader_shm_bytes_for(config: FlashtrainConfig, workers_per_node: int = 1) -> int:
    """:func:`loader_shm_bytes` for ``config``'s largest per-worker batch (float32 images
    of ``data.image_size``, as the CPU decode hands them over)."""
    largest = max(phase.global_batch for phase in config.schedule.phases)
    per_worker = math.ceil(largest / initial_num_workers(config))
    sample = 3 * config.data.image_size ** 2 * 4
    return loader_shm_bytes(per_worker, sample, config.data.loader_workers, workers_per_node)


def shm_problem(free_bytes: int | None, need_bytes: int) -> str | None:
    """Why /dev/shm cannot hold the loaders' batches (they die with "bus error"), with
    the fix; ``None`` when it can or its size is unknown."""
    if free_bytes is None or need_bytes <= free_bytes:
        return None
    return (f"/dev/shm has {free_bytes / 2**20:.0f} MiB free, and the data loaders need "
            f"about {need_bytes / 2**20:.0f} MiB for their batches in flight: give the "
            "container more (docker run --shm-size=16g, or --ipc=host), or lower "
            "data.loader_workers or the batch")


def gpu_stack_problems(stack: GpuStack, torch_cuda: str | None, torch_version: str,
                       ranks_per_gpu: int, shm_need_bytes: int) -> list[str]:
    """Every problem of ``stack`` (empty: none found)."""
    found = [driver_problem(stack.driver_version, torch_cuda, torch_version),
             compute_mode_problem(stack.compute_modes, ranks_per_gpu),
             shm_problem(stack.shm_free_bytes, shm_need_bytes)]
    return [problem for problem in found if problem is not None]


def check_gpu_stack(stack: GpuStack, ranks_per_gpu: int, shm_need_bytes: int) -> None:
    """Raise :class:`PreflightError` with one message naming each problem and its fix."""
    import torch

    problems = gpu_stack_problems(stack, torch.version.cuda, torch.__version__,
                                  ranks_per_gpu, shm_need_bytes)
    if problems:
        raise PreflightError("the GPU stack cannot run this job: " + "; ".join(problems))
