"""The job configuration: frozen pydantic models, one small section per component.

``FlashtrainConfig()`` with no arguments *is* the embedded default (CPU workers on a
local Ray, gloo, the scikit-learn digits written as an ImageNet-layout folder). A YAML
file overrides it, ``--set section.key=value`` overrides that, and any mistake becomes
one :class:`ConfigError` that names the file, the field and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_GRID_RE = re.compile(r"^\d+x\d+$")


class ConfigError(ValueError):
    """A configuration the job cannot run with; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_grid_text(value: str | None) -> str | None:
    if value is None or value == "auto":
        return value
    if not _GRID_RE.match(value) or 0 in tuple(int(v) for v in value.split("x")):
        raise ValueError(f"'{value}' is not a grid: write RxC with R, C >= 1, e.g. '2x2', or 'auto'")
    return value


class GridConfig(_Section):
    """How many workers, in which grid, with which resources each."""

    shape: str = Field("2x2", description="Grid 'RxC' (R rows of C workers; C is the row length, "
                       "usually the GPUs of one node), or 'auto' to fit the cluster.")
    max_workers: int | None = Field(None, ge=1, description="With shape 'auto': use at most this many workers.")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL) instead of CPU workers (gloo).")
    cpus_per_worker: float = Field(0.5, gt=0, description="Ray CPUs reserved per worker actor.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per CPU worker, so "
                               "workers do not oversubscribe the cores.")
    placement_timeout_s: float = Field(0.0, ge=0, description="How long to wait for nodes to "
                                       "join (an autoscaler, or nodes still starting after "
                                       "`ray up`) when the cluster's nodes, as they are now, "
                                       "cannot hold the first grid's workers; the job then "
                                       "stops and says what it asked for and what the cluster "
                                       "has. 0 = stop at once (a grid the cluster cannot hold "
                                       "never waits).")

    _shape = field_validator("shape")(classmethod(lambda cls, v: _check_grid_text(v)))


class CollectiveConfig(_Section):
    """Gradient synchronisation."""

    algorithm: Literal["torus", "flat", "hierarchical", "auto"] = Field(
        "torus", description="All-reduce algorithm: 2D torus (the paper), flat ring, or "
        "hierarchical; 'auto' chooses per grid from the node layout and the cost model "
        "(flashtrain/algorithm.py), printed at start and recorded in metrics.jsonl.")
    bucket_mb: float = Field(64.0, gt=0, description="Gradient fusion bucket size in MiB. "
                             "Default from `bench allreduce`'s size sweep on 2x2 (README): the "
                             "smallest size within 90% of the torus's best bus bandwidth.")
    pipeline_chunks: int = Field(8, ge=1, description="The most chunks the gloo torus "
                                 "pipelines a bucket over (its column all-reduce on its own "
                                 "thread beside the row phases); 1: the three phases one "
                                 "after the other.")
    comm_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Dtype on the wire; 16-bit halves the bytes, accumulation stays fp32.")
    timeout_s: float = Field(60.0, gt=0, description="Every collective call fails with a typed "
                             "error after this many seconds instead of hanging.")
    overlap: bool = Field(True, description="Start each gradient bucket's all-reduce during the "
                          "backward pass, as soon as its gradients are ready (same result "
                          "as after the backward; false: all buckets after the backward).")
    gpu_backend: Literal["flashtrain", "ray_nccl"] = Field(
        "flashtrain", description="NCCL backend of GPU workers: 'flashtrain' (each group its "
        "own torch ProcessGroupNCCL; every call has a deadline and can be aborted, so a dead "
        "peer re-forms the grid) or 'ray_nccl' (Ray's cupy-based backend: needs the 'gpu' "
        "extra, has no deadline or abort).")


class ModelConfig(_Section):
    """The network trained on every worker."""

    name: str = Field("resnet50", description="Any torchvision classification model name.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision (GPU, and CPU where torch's CPU autocast "
        "supports it); fp16 uses a loss scale every worker agrees on, bf16 needs none.")
    channels_last: bool = Field(True, description="Use channels-last memory format on GPU.")
    zero_init_residual: bool = Field(True, description="Start each residual branch's last "
                                     "BatchNorm at zero (Goyal et al.), which keeps early "
                                     "large-batch steps stable; ResNet-family models only.")


class OptimizerConfig(_Section):
    """SGD with momentum; the learning rate comes from the schedule."""

    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-5, ge=0, description="L2 weight decay on conv/linear weights.")
    no_decay_bn_bias: bool = Field(True, description="No weight decay on BatchNorm and bias parameters.")
    nesterov: bool = Field(False, description="Nesterov momentum.")


class PhaseConfig(_Section):
    """One batch-size-control phase: from ``start_epoch`` on, this global batch."""

    start_epoch: int = Field(ge=0, description="First epoch of the phase (the first phase starts at 0).")
    global_batch: int = Field(ge=1, description="Global batch size, summed over all workers.")
    grid: str | None = Field(None, description="Optional grid 'RxC' to re-form to at this phase.")

    _grid = field_validator("grid")(classmethod(lambda cls, v: _check_grid_text(v)))


class ScheduleConfig(_Section):
    """Batch-size control, learning rate and label smoothing (pure functions in
    :mod:`flashtrain.schedule`)."""

    epochs: int = Field(10, ge=1, description="Epochs to train.")
    phases: tuple[PhaseConfig, ...] = Field(
        (PhaseConfig(start_epoch=0, global_batch=64), PhaseConfig(start_epoch=4, global_batch=128)),
        description="Batch-size phases, by start epoch.")
    base_lr: float = Field(0.1, gt=0, description="Learning rate at global batch base_batch.")
    base_batch: int = Field(256, ge=1, description="Batch size base_lr refers to (linear scaling).")
    warmup_epochs: float = Field(2.0, ge=0, description="Linear warm-up length in epochs.")
    warmup_start_factor: float = Field(0.1, gt=0, le=1, description="LR factor at position 0.")
    batch_ramp_epochs: float = Field(0.5, ge=0, description="When a phase raises the batch, ramp "
                                     "the scaled LR over this many epochs (0 = jump).")
    decay: Literal["poly", "cosine", "step", "none"] = Field("cosine", description="LR decay shape.")
    poly_power: float = Field(2.0, gt=0, description="Power of the poly decay.")
    step_milestones: tuple[float, ...] = Field((), description="Epochs of the step decay.")
    step_gamma: float = Field(0.1, gt=0, le=1, description="Factor at each step milestone.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the loss.")

    @model_validator(mode="after")
    def _phases_in_order(self) -> ScheduleConfig:
        if not self.phases:
            raise ValueError("schedule.phases is empty: give at least one phase starting at epoch 0")
        starts = [p.start_epoch for p in self.phases]
        if starts[0] != 0:
            raise ValueError("the first phase must start at epoch 0 (set phases[0].start_epoch=0)")
        if any(b <= a for a, b in zip(starts, starts[1:])):  # noqa: B905
            raise ValueError(f"phase start epochs {starts} must be strictly increasing")
        if starts[-1] >= self.epochs:
            raise ValueError(f"a phase starts at epoch {starts[-1]} but the run has only "
                             f"{self.epochs} epochs: raise schedule.epochs or drop the phase")
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be shorter than the run (schedule.epochs)")
        return self


class DataConfig(_Section):
    """Where samples come from and how they are read."""

    source: Literal["digits", "imagefolder", "synthetic"] = Field(
        "digits", description="'digits': scikit-learn's handwritten digits written once as an "
        "ImageNet-layout folder (no download); 'imagefolder': root/train and root/val; "
        "'synthetic': random tensors for benchmarks.")
    root: str | None = Field(None, description="Dataset folder with train/<class>/* and val/<class>/* "
                             "(imagefolder), or the cache folder for digits.")
    image_size: int = Field(32, ge=8, description="Training crop size in pixels.")
    loader_workers: int = Field(0, ge=0, description="DataLoader decode processes per worker.")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu", description="Where training JPEGs are decoded and augmented: 'cpu' in the "
        "loader processes (PIL), 'gpu' on the worker's GPU (nvJPEG through torchvision, "
        "batched; crop and flip there). 'gpu' needs data.source=imagefolder and grid.use_gpu.")
    verify_images: bool = Field(True, description="Open every image once at start (headers "
                                "only) and skip unreadable ones, counted in skipped_files. "
                                "Every worker scans its dataset: turn off for trees of millions "
                                "of files. Either way an image that fails to decode while "
                                "training is skipped and named in summary.json.")
    seed: int = Field(0, description="Seed of the per-epoch permutations.")
    min_samples_per_worker: int = Field(2, ge=1, description="Smallest local batch; the epoch's "
                                        "tail is folded into the previous step below this.")
    synthetic_samples: int = Field(2048, ge=1, description="Dataset size in synthetic mode.")
    synthetic_classes: int = Field(10, ge=2, description="Classes in synthetic mode.")

    @model_validator(mode="after")
    def _root_needed(self) -> DataConfig:
        if self.source == "imagefolder" and not self.root:
            raise ValueError("data.source=imagefolder needs data.root (a folder with train/ and val/)")
        return self


class CheckpointConfig(_Section):
    """Durable checkpoints in the run directory."""

    every_steps: int = Field(50, ge=1, description="Write a durable checkpoint every this many steps.")
    keep: int = Field(3, ge=1, description="Keep the newest this many checkpoints.")


class ElasticConfig(_Section):
    """Re-forming the grid when workers die or nodes join."""

    enabled: bool = Field(True, description="Re-form the grid on failures and new resources.")
    commit_every_steps: int = Field(5, ge=1, description="In-memory commit interval (steps).")
    check_replicas: bool = Field(True, description="At every commit, compare a digest of "
                                 "each member's parameters, synchronised buffers, optimizer "
                                 "and loss-scaler state across the grid; replicas that differ "
                                 "stop the run, naming the ranks and tensors (README: Replica "
                                 "digest, for its cost). false: skip the check.")
    min_workers: int = Field(1, ge=1, description="Below this many workers, wait for resources.")
    wait_for_resources_s: float = Field(60.0, ge=0, description="How long to wait below "
                                        "min_workers before failing with a checkpoint.")
    max_reforms: int = Field(50, ge=0, description="Give up after this many re-forms.")
    warm_spares: int = Field(0, ge=0, description="Extra workers kept started and idle, so a "
                             "lost worker is replaced in the very re-form that drops it "
                             "(costs their resources; 0 = replacements start after a loss).")


class FaultsConfig(_Section):
    """Injected failures, for demos and tests (global step numbers)."""

    kill_worker_at_steps: tuple[int, ...] = Field((), description="Kill a worker at these steps.")
    kill_during: Literal["allreduce", "commit"] = Field(
        "allreduce", description="Where the killed worker dies: as its gradient all-reduce "
        "begins (its peers are then blocked inside the collective) or inside the commit "
        "that follows the step.")
    stall_worker_at_steps: tuple[int, ...] = Field((), description="Stall a worker past the collective timeout.")
    perturb_replica_at_steps: tuple[int, ...] = Field(
        (), description="Change one element of a worker's first parameter just before the "
        "commit after these steps (replicas diverge silently; elastic.check_replicas stops "
        "the run there).")
    remove_node_at_steps: tuple[int, ...] = Field((), description="Remove a node at these steps.")
    add_node_at_steps: tuple[int, ...] = Field((), description="Add a node at these steps.")


class RuntimeConfig(_Section):
    """Where the job runs and what it reports."""

    preset: str = Field("default", description="Name used in the default run directory.")
    runs_root: str | None = Field(None, description="Folder that relative run directories "
                                  "(and new runs) go to; also $FLASHTRAIN_RUNS_ROOT. Unset: "
                                  "./runs, or ~/flashtrain-runs when the job runs in Ray's "
                                  "temporary working_dir copy (see flashtrain.runs). On a "
                                  "cluster, a folder the user can reach (a shared home).")
    ray_address: str | None = Field(None, description="Ray address; None: join a running cluster "
                                    "if there is one (ray start / ray job submit), else start one.")
    seed: int = Field(0, description="Seed of model initialisation.")
    remote_timeout_s: float = Field(300.0, gt=0, description="Deadline of every remote call "
                                    "(of a step window: this much per step in it).")
    step_windows: bool = Field(True, description="The driver hands every worker the steps up "
                               "to the next commit, checkpoint or epoch boundary in one call and "
                               "gets their results back in bulk (false: one call per step; "
                               "`python -m flashtrain.bench control` compares the two).")
    relay_fanout: int = Field(16, ge=0, description="With more workers than this, a step "
                              "window goes down a tree of the workers themselves, each relaying "
                              "to at most this many and merging their answers, so the driver "
                              "makes one call per window at any grid size "
                              "(flashtrain.train.relay); 0: the driver calls every worker.")

    @field_validator("relay_fanout")
    @classmethod
    def _fanout(cls, value: int) -> int:
        if value == 1:
            raise ValueError("1 would relay the window down a chain of every worker: give 0 "
                             "(no relays) or at least 2")
        return value
    log_every_steps: int = Field(1, ge=1, description="metrics.jsonl step records interval.")
    tensorboard: bool = Field(False, description="Also write the numbers of metrics.jsonl's "
                              "step, epoch and reform records as TensorBoard scalars into "
                              "<run_dir>/tensorboard/ (`tensorboard --logdir RUN_DIR`).")
    progress: bool = Field(True, description="Show a progress bar on the driver.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many global steps.")
    local_nodes: int = Field(0, ge=0, description="Without ray_address: emulate a cluster of "
                             "this many worker nodes on this machine (ray.cluster_utils.Cluster), "
                             "so node faults can be injected; 0 = a plain local Ray.")
    cpus_per_local_node: int = Field(2, ge=1, description="Logical CPUs of each emulated node "
                                     "(Ray wants whole numbers per node).")
    connect_timeout_s: float = Field(5.0, gt=0, description="How long the job tries to reach "
                                     "the Ray head's address (a TCP connect, before ray.init) "
                                     "before it stops and says that nothing answers there.")
    on_stale_cluster: Literal["local", "stop"] = Field(
        "local", description="Without ray_address and RAY_ADDRESS, ray.init joins the cluster "
        "recorded in Ray's temp folder (ray_current_cluster, written by `ray start`). When "
        "nothing answers at that address (its head has stopped), 'local' starts a local Ray "
        "for this job and says so; 'stop' stops with a message instead.")


class FlashtrainConfig(_Section):
    """The whole job. Each component receives only its own section."""

    grid: GridConfig = GridConfig()
    collective: CollectiveConfig = CollectiveConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    elastic: ElasticConfig = ElasticConfig()
    faults: FaultsConfig = FaultsConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _gpu_decode_needs_jpegs_and_a_gpu(self) -> FlashtrainConfig:
        if self.data.decode == "gpu" and (self.data.source != "imagefolder"
                                          or not self.grid.use_gpu):
            raise ValueError(f"data.decode=gpu decodes JPEG files on the workers' GPUs: it needs "
                             f"data.source=imagefolder (got {self.data.source!r}) and "
                             f"grid.use_gpu=true (got {self.grid.use_gpu}); set data.decode=cpu")
        return self

    @model_validator(mode="after")
    def _batches_fit_grid(self) -> FlashtrainConfig:
        grids = [self.grid.shape] + [p.grid for p in self.schedule.phases if p.grid]
        widest = max((int(r) * int(c) for g in grids if g != "auto" for r, c in [g.split("x")]),
                     default=1)
        smallest = min(p.global_batch for p in self.schedule.phases)
        node_faults = self.faults.remove_node_at_steps or self.faults.add_node_at_steps
        if node_faults and not self.runtime.local_nodes:
            raise ValueError("faults.remove_node_at_steps/add_node_at_steps act on an emulated "
                             "cluster: set runtime.local_nodes (e.g. 2) as well")
        need = widest * self.data.min_samples_per_worker
        if smallest < need:
            raise ValueError(
                f"global batch {smallest} is too small for {widest} workers with "
                f"data.min_samples_per_worker={self.data.min_samples_per_worker}: use a global "
                f"batch of at least {need} or a smaller grid")
        return self


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set grid.shape=2x2")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if len(path) < 2:
        raise ConfigError(f"--set {item!r}: the key must name a section and a field, "
                          "e.g. schedule.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    return path, value


def _merge(base: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field: check the spelling (see jobs/default.yaml for every field)"
        lines.append(f"  {where}: {message}")
    return f"invalid configuration ({source}):\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FlashtrainConfig:
    """The embedded default, updated by the YAML file at ``path`` and then by
    ``overrides`` (``section.key=value`` strings). Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = "embedded default"
    if path is not None:
        file = Path(path)
        source = str(file)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {file} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a mapping of sections, e.g. 'grid:'")
        data = loaded
    for item in overrides:
        keys, value = _parse_override(item)
        _merge(data, keys, value, item)
    if overrides:
        source += " with --set " + " ".join(overrides)
    try:
        return FlashtrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def dump_config(config: FlashtrainConfig) -> str:
    """The resolved configuration as YAML (``config.yaml`` of a run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
