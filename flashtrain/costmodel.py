"""The cost model: alpha-beta times of ring, 2D-torus and hierarchical all-reduce with
separate intra-node and inter-node links (used by the grid planner and by
``python -m flashtrain.bench costmodel``).

Time of one message of ``b`` bytes on a link: ``alpha + b * beta``. A worker grid is
``X`` workers per node (the torus row, the paper's X) by ``Y`` nodes (N = X * Y):

* ring over all N: ``2(N-1)`` steps of ``S/N`` bytes; each step waits for the slowest
  hop, which crosses nodes: ``2(N-1) * (alpha_e + S/N beta_e)``.
* torus: reduce-scatter and all-gather in the row (intra-node, ``X-1`` steps of
  ``S/X`` each) and a ring all-reduce of the ``S/X`` shard in the column (inter-node,
  ``2(Y-1)`` steps of ``S/(XY)``): latency terms ``2(X-1) + 2(Y-1)``, bytes equal to
  the ring's ``2(N-1)/N S``. All X workers of a node use the node's inter-node links at
  once in the column phase, so each gets ``links_per_node / X`` of one link.
* hierarchical: reduce to the node leader (``X-1`` steps of ``S/X`` plus gathering
  the reduced chunks), ring all-reduce of the whole ``S`` among the Y leaders (one flow
  per node: X times the torus column volume) and a broadcast in the node.

**Overlap** (:func:`predict_step`): gradients become ready during the backward pass,
last layer first. They travel in buckets (reverse parameter order, the bucketing rule of
``flashtrain.collective.fusion``); a bucket's all-reduce starts when its last gradient
is ready and the previous bucket's all-reduce has finished, and only what is still
running when the backward ends adds to the step. When each gradient is ready comes from
a measured profile of torchvision ResNet-50 on a CPU (``costmodel_profile.json``, written
by ``python -m flashtrain.bench costmodel --profile-backward``): its *relative* shape is
what is assumed to carry over to a V100, stretched to the V100 step time.

Everything the project cannot measure is an :class:`Assumption` with its source
(:data:`ASSUMPTIONS`): ABCI's links, the fp16 wire, the bucket size, the V100's compute
per step. The paper gives no per-GPU rate, so :func:`calibrate_compute` derives the
effective step time its 224 s implies; a public V100 benchmark rate is kept beside it.
:func:`fit_from_bench_json` and :func:`fit_compute_from_throughput_json` fit the
constants of *this* machine from ``bench allreduce`` / ``bench throughput`` JSON.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Link:
    """One link type: ``alpha`` seconds per message, ``beta`` seconds per byte."""

    alpha: float
    beta: float


@dataclass(frozen=True)
class Cluster:
    """Links of a cluster and how many workers share a node's inter-node links."""

    intra: Link
    inter: Link
    workers_per_node: int
    inter_links_per_node: int = 1


@dataclass(frozen=True)
class Cost:
    """Per-worker cost of one all-reduce: message counts and bytes on each link type."""

    steps_intra: int
    steps_inter: int
    bytes_intra: float
    bytes_inter: float
    inter_sharing: float = 1.0  # flows per inter-node link at once (divides bandwidth)

    @property
    def steps(self) -> int:
        return self.steps_intra + self.steps_inter

    @property
    def bytes(self) -> float:
        return self.bytes_intra + self.bytes_inter

    def time(self, cluster: Cluster) -> float:
        intra, inter = cluster.intra, cluster.inter
        return (self.steps_intra * intra.alpha + self.bytes_intra * intra.beta
                + self.steps_inter * inter.alpha
                + self.bytes_inter * inter.beta * max(self.inter_sharing, 1.0))


def ring_cost(size_bytes: float, num_workers: int) -> Cost:
    """Flat ring over N workers; every step is paced by an inter-node hop."""
    n = num_workers
    return Cost(0, 2 * (n - 1), 0.0, 2 * (n - 1) / n * size_bytes)


def torus_cost(size_bytes: float, cols: int, rows: int, inter_links_per_node: int = 1) -> Cost:
    """2D torus: ``cols`` (X) workers per node in a row, ``rows`` (Y) nodes per column."""
    x, y = cols, rows
    row_bytes = 2 * (x - 1) / x * size_bytes  # reduce-scatter + all-gather
    col_bytes = 2 * (y - 1) / y * size_bytes / x  # ring all-reduce of the 1/X shard
    sharing = x / inter_links_per_node if y > 1 else 1.0
    return Cost(2 * (x - 1), 2 * (y - 1), row_bytes, col_bytes, sharing)


def hierarchical_cost(size_bytes: float, cols: int, rows: int) -> Cost:
    """Reduce to the node leader, ring among the Y leaders, broadcast in the node.

    The leader's reduce is a reduce-scatter plus a gather (``2(X-1)/X S``), the
    broadcast a pipelined one (``S``); only the leader crosses nodes, with all of S.
    """
    x, y = cols, rows
    intra_bytes = (2 * (x - 1) / x * size_bytes + size_bytes) if x > 1 else 0.0
    inter_bytes = 2 * (y - 1) / y * size_bytes
    return Cost(3 * (x - 1), 2 * (y - 1), intra_bytes, inter_bytes)


def fit_alpha_beta(points: list[tuple[int, float, float]]) -> Link:
    """Least-squares alpha/beta of a flat ring from ``(num_workers, bytes, seconds)``.

    ``t = 2(n-1) alpha + 2(n-1)/n S beta`` is linear in (alpha, beta).
    """
    rows = [(2 * (n - 1), 2 * (n - 1) / n * s, t) for n, s, t in points]
    s_aa = sum(a * a for a, _, _ in rows)
    s_ab = sum(a * b for a, b, _ in rows)
    s_bb = sum(b * b for _, b, _ in rows)
    s_at = sum(a * t for a, _, t in rows)
    s_bt = sum(b * t for _, b, t in rows)
    det = s_aa * s_bb - s_ab * s_ab
    if abs(det) < 1e-300:
        raise ValueError("need flat timings at two or more different sizes to fit alpha/beta")
    alpha, beta = (s_at * s_bb - s_bt * s_ab) / det, (s_aa * s_bt - s_ab * s_at) / det
    # Neither term can be negative; on noisy timings (time growing faster than the size)
    # the unconstrained fit can say so: then fit the other term alone.
    if alpha < 0:
        return Link(alpha=0.0, beta=s_bt / s_bb)
    if beta < 0:
        return Link(alpha=s_at / s_aa, beta=0.0)
    return Link(alpha=alpha, beta=beta)


def fit_from_bench_json(path: str) -> tuple[Link, int]:
    """Fit one link from the ``flat`` rows of a ``bench allreduce --json`` file."""
    with open(path) as handle:
        data = json.load(handle)
    n = int(data["meta"]["num_workers"])
    points = [(n, r["bytes"], r["median_s"]) for r in data["results"] if r["algo"] == "flat"]
    return fit_alpha_beta(points), n


def throughput_grid_runs(data: dict) -> list[dict]:
    """The flashtrain runs on grids of two or more workers in a ``bench throughput
    --json`` document (its ``runs``: one record per system, worker count and round), each
    with ``algo`` (``flat``, ``torus`` or ``hierarchical``) added."""
    rows = []
    for run in data.get("runs", []):
        system = str(run.get("system", ""))
        if system.startswith("flashtrain_") and int(run.get("workers", 0)) >= 2:
            rows.append({**run, "algo": system.removeprefix("flashtrain_")})
    return rows


def fit_compute_from_throughput_json(path: str) -> dict:
    """Compute seconds per image of one worker from a ``bench throughput --json`` file:
    the median, over its flashtrain runs on grids of two or more workers, of
    ``compute_s`` (forward, backward and optimizer of the slowest worker) divided by the
    per-worker batch."""
    with open(path) as handle:
        data = json.load(handle)
    rows = throughput_grid_runs(data)
    if not rows:
        raise ValueError(f"{path}: no flashtrain runs on a grid of 2 or more workers to fit "
                         "compute from (run bench throughput with --workers 2 or more)")
    per_image = statistics.median(r["compute_s"] / (r["global_batch"] / r["workers"])
                                  for r in rows)
    return {"seconds_per_image": per_image,
            "num_workers": sorted({int(r["workers"]) for r in rows}),
            "model": data.get("meta", {}).get("model"),
            "sync_s": statistics.median(r["sync_s"] for r in rows)}


def read_bench_json(path: str) -> str:
    """Which benchmark wrote ``path``: ``"allreduce"`` or ``"throughput"``."""
    try:
        with open(path) as handle:
            data = json.load(handle)
        runs, results = data.get("runs"), data.get("results")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a bench allreduce/throughput --json file ({err})") from err
    if runs and isinstance(runs, list) and "compute_s" in runs[0]:
        return "throughput"
    if results and isinstance(results, list) and "median_s" in results[0] and "bytes" in results[0]:
        return "allreduce"
    raise ValueError(f"{path}: neither bench allreduce (results with median_s, bytes) nor "
                     "bench throughput (runs with compute_s)")


# --- overlap of the gradient all-reduce with the backward pass --------------------------
#
# The backward pass produces gradients from the last layer to the first. The worker packs
# them into buckets in that order (reverse parameter order, the rule of
# flashtrain.collective.fusion.plan_buckets) and starts a bucket's all-reduce when its
# last gradient is ready and the previous bucket's all-reduce has finished (one stream).
# What is still running when the backward ends is exposed: it adds to the step.

PROFILE_PATH = Path(__file__).with_name("costmodel_profile.json")
PROFILE_COMMAND = "python -m flashtrain.bench costmodel --profile-backward"


@dataclass(frozen=True)
class BackwardProfile:
    """When each parameter's gradient is ready, as a fraction of the backward pass (0 at
    its start, 1 at its end), in parameter order; measured, see :data:`PROFILE_COMMAND`."""

    numels: tuple[int, ...]
    ready_fractions: tuple[float, ...]
    backward_share: float  # backward / (forward + backward), as measured
    source: str

    @property
    def num_params(self) -> int:
        return sum(self.numels)


def load_profile(path: Path | str = PROFILE_PATH) -> BackwardProfile:
    """The stored profile (ResNet-50 unless ``path`` names another)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no backward profile at {path}: write it with {PROFILE_COMMAND}")
    data = json.loads(path.read_text())
    rows = data["params"]
    return BackwardProfile(tuple(int(r["numel"]) for r in rows),
                           tuple(float(r["ready_fraction"]) for r in rows),
                           data["backward_s"] / (data["forward_s"] + data["backward_s"]),
                           f"{data['model']}, {data['measured_on']}")


def bucket_indices(nbytes: Sequence[float], bucket_bytes: float) -> list[list[int]]:
    """Group items (already in send order) into buckets of at most ``bucket_bytes``,
    the rule of ``fusion.plan_buckets``: a new bucket when the next item would overflow
    the current one; an item larger than ``bucket_bytes`` travels alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0.0
    for index, item in enumerate(nbytes):
        if current and size + item > bucket_bytes:
            buckets.append(current)
            current, size = [], 0.0
        current.append(index)
        size += item
    if current:
        buckets.append(current)
    return buckets


@dataclass(frozen=True)
class ReadyBucket:
    """One bucket: bytes on the wire and when (seconds into the backward) it is ready."""

    wire_bytes: float
    ready_s: float


def ready_buckets(profile: BackwardProfile, backward_s: float, bucket_bytes: float,
                  grad_bytes: int = 4, wire_bytes: int = 2,
                  num_params: float | None = None) -> list[ReadyBucket]:
    """The buckets of one backward pass in the order they become ready.

    Buckets are formed in reverse parameter order with ``bucket_bytes`` counted in the
    gradient's own dtype (``grad_bytes``, as ``plan_buckets`` counts them); each travels
    in ``wire_bytes`` per element. ``num_params`` scales every parameter so that another
    model of that size is taken to have this profile's shape.
    """
    scale = (num_params / profile.num_params) if num_params else 1.0
    order = list(range(len(profile.numels)))[::-1]
    sizes = [profile.numels[i] * scale * grad_bytes for i in order]
    buckets = []
    for members in bucket_indices(sizes, bucket_bytes):
        params = [order[m] for m in members]
        buckets.append(ReadyBucket(
            wire_bytes=sum(profile.numels[p] for p in params) * scale * wire_bytes,
            ready_s=max(profile.ready_fractions[p] for p in params) * backward_s))
    return sorted(buckets, key=lambda b: b.ready_s)


@dataclass(frozen=True)
class Timeline:
    """When each bucket's all-reduce starts and finishes, from the start of backward."""

    starts: tuple[float, ...]
    finishes: tuple[float, ...]
    backward_s: float

    @property
    def exposed_s(self) -> float:
        """Communication still running when the backward pass ends."""
        return max(self.finishes[-1] - self.backward_s, 0.0) if self.finishes else 0.0

    @property
    def comm_s(self) -> float:
        return sum(f - s for s, f in zip(self.starts, self.finishes, strict=True))


def overlap(buckets: Sequence[ReadyBucket], comm_time: Callable[[float], float],
            backward_s: float) -> Timeline:
    """Run the buckets' all-reduces one after another, each as soon as it is ready and
    the previous one is done; ``comm_time(bytes)`` is one all-reduce's seconds."""
    starts, finishes = [], []
    free_at = 0.0
    for bucket in buckets:
        start = max(bucket.ready_s, free_at)
        free_at = start + comm_time(bucket.wire_bytes)
        starts.append(start)
        finishes.append(free_at)
    return Timeline(tuple(starts), tuple(finishes), backward_s)


# --- ABCI and the paper: named assumptions with their sources ----------------------------


@dataclass(frozen=True)
class Assumption:
    """One input the project cannot measure, with where its value comes from."""

    name: str
    value: float
    unit: str
    source: str


ASSUMPTIONS = {a.name: a for a in (
    Assumption("intra_alpha", 3.4e-6 * 1.9, "s per message", "NCCL's own cost model "
               "(src/graph/tuning.cc): NVLink ring step 3.4 us (hwLat NVLINK Ring Simple), "
               "times its 1.9 'plateau' factor for large multi-node ring all-reduces"),
    Assumption("intra_beta", 1 / 40e9, "s per byte", "V100 SXM2 NVLink 2: 2 links x 25 GB/s "
               "per direction between GPU pairs on ABCI's nodes; 40 GB/s effective per hop"),
    Assumption("inter_alpha", 9.6e-6 * 1.9, "s per message", "NCCL's cost model "
               "(tuning.cc): network ring step 9.6 us (hwLat NET Ring Simple; InfiniBand "
               "EDR's wire latency is ~1 us, the rest is NCCL's per-step handshake) times "
               "the 1.9 plateau factor"),
    Assumption("inter_beta", 1 / 10e9, "s per byte", "ABCI compute node: 2 x InfiniBand EDR "
               "(100 Gb/s = 12.5 GB/s each); 10 GB/s effective per flow (80% of line rate)"),
    Assumption("inter_links_per_node", 2, "links", "ABCI compute node: 2 EDR HCAs"),
    Assumption("workers_per_node", 4, "GPUs", "ABCI compute node: 4 V100 SXM2 (the paper's "
               "torus rows are the 4 GPUs of a node)"),
    Assumption("step_compute_s", 32 / 1100, "s per step of 32 images", "V100 SXM2 ResNet-50 "
               "mixed-precision training ~1,150 images/s at batch 128 (torchvision, AMP, NHWC: "
               "110.9 ms per step, github.com/sandeepkumar-skb/pytorch_experiments "
               "torchvision_exp/README.md); taken as ~1,100 images/s at the paper's 32 per GPU "
               "(forward + backward + update; the paper reports no per-GPU rate)"),
    Assumption("wire_bytes", 2, "bytes per gradient element", "the paper all-reduces fp16 "
               "gradients (jobs/paper-abci.yaml: collective.comm_dtype=fp16)"),
    Assumption("bucket_mb", 64, "MiB of fp32 gradients per bucket",
               "jobs/paper-abci.yaml collective.bucket_mb (the project's preset, not the paper)"),
)}
ABCI = Cluster(intra=Link(ASSUMPTIONS["intra_alpha"].value, ASSUMPTIONS["intra_beta"].value),
               inter=Link(ASSUMPTIONS["inter_alpha"].value, ASSUMPTIONS["inter_beta"].value),
               workers_per_node=int(ASSUMPTIONS["workers_per_node"].value),
               inter_links_per_node=int(ASSUMPTIONS["inter_links_per_node"].value))
RESNET50_PARAMS = 25_557_032  # torchvision resnet50, 1,000 classes
FP16_BYTES = 2
STEP_COMPUTE_S = ASSUMPTIONS["step_compute_s"].value
STEP_COMPUTE_BATCH = 32
IMAGENET_TRAIN = 1_281_167
EPOCHS = 90
# Batch-size control as the paper ran it on 2,176 GPUs (34K then 68K); the switch epoch is
# jobs/paper-abci.yaml's choice (the paper gives the two batches, not the epoch).
PAPER_PHASES = ((0, 34816), (30, 69632))
PAPER = {1088: {"scaling_efficiency": 0.9162}, 2176: {"train_seconds": 224.0}}
ALGORITHMS = ("ring", "torus", "hierarchical")


@dataclass(frozen=True)
class StepModel:
    """What one training step costs a worker, apart from the network."""

    compute_s: float = STEP_COMPUTE_S  # forward + backward + update for ``batch`` images
    batch: int = STEP_COMPUTE_BATCH
    bucket_bytes: float = ASSUMPTIONS["bucket_mb"].value * 2**20
    grad_bytes: int = 4
    wire_bytes: int = FP16_BYTES


def allreduce_time(algorithm: str, size_bytes: float, cols: int, rows: int, cluster: Cluster) -> float:
    """One all-reduce of ``size_bytes`` over ``rows`` nodes of ``cols`` workers."""
    if algorithm == "ring":
        return ring_cost(size_bytes, cols * rows).time(cluster)
    if algorithm == "torus":
        return torus_cost(size_bytes, cols, rows, cluster.inter_links_per_node).time(cluster)
    if algorithm == "hierarchical":
        return hierarchical_cost(size_bytes, cols, rows).time(cluster)
    raise ValueError(f"unknown all-reduce algorithm {algorithm!r}: choose from {ALGORITHMS}")


def predict_step(per_worker_batch: float, comm_time: Callable[[float], float],
                 profile: BackwardProfile, model: StepModel = StepModel(),
                 num_params: float = RESNET50_PARAMS) -> dict:
    """Step time of one worker with and without overlap of the all-reduce and backward.

    ``comm_time(bytes)`` is one all-reduce's seconds on the grid. Compute scales with the
    per-worker batch from ``model``'s reference; the backward is the profile's measured
    share of it. Without overlap the whole gradient is reduced in one all-reduce after
    compute (the old model); with it, bucket by bucket during the backward.
    """
    compute = model.compute_s * per_worker_batch / model.batch
    backward = compute * profile.backward_share
    buckets = ready_buckets(profile, backward, model.bucket_bytes, model.grad_bytes,
                            model.wire_bytes, num_params)
    timeline = overlap(buckets, comm_time, backward)
    whole = comm_time(num_params * model.wire_bytes)
    return {"compute_s": compute, "backward_s": backward, "num_buckets": len(buckets),
            "bucket_mb": [round(b.wire_bytes / 1e6, 2) for b in buckets],
            "allreduce_s": whole, "bucketed_comm_s": timeline.comm_s,
            "exposed_s": timeline.exposed_s,
            "step_s": compute + timeline.exposed_s, "step_no_overlap_s": compute + whole,
            "efficiency": compute / (compute + timeline.exposed_s),
            "efficiency_no_overlap": compute / (compute + whole)}


def predict_abci(num_gpus: int, cluster: Cluster = ABCI, profile: BackwardProfile | None = None,
                 model: StepModel = StepModel()) -> dict:
    """ResNet-50 fp16 on ABCI at the paper's 32 images per GPU: every algorithm with and
    without overlap, and the 90-epoch time of the paper's batch-size control on
    ``num_gpus`` GPUs (torus, overlapped; compute and data loading only, nothing else)."""
    profile = profile or load_profile()
    x = cluster.workers_per_node
    y = num_gpus // x
    per_algorithm = {}
    for name in ALGORITHMS:
        comm = lambda size, name=name: allreduce_time(name, size, x, y, cluster)  # noqa: E731
        per_algorithm[name] = predict_step(STEP_COMPUTE_BATCH, comm, profile, model)
    train_s = {"overlap": 0.0, "no_overlap": 0.0}
    bounds = [start for start, _ in PAPER_PHASES[1:]] + [EPOCHS]
    for (start, batch), end in zip(PAPER_PHASES, bounds, strict=True):
        comm = lambda size: allreduce_time("torus", size, x, y, cluster)  # noqa: E731
        step = predict_step(batch / num_gpus, comm, profile, model)
        steps = (end - start) * IMAGENET_TRAIN / batch
        train_s["overlap"] += steps * step["step_s"]
        train_s["no_overlap"] += steps * step["step_no_overlap_s"]
    return {"gpus": num_gpus, "grid": f"{y}x{x}", "algorithms": per_algorithm,
            "train_seconds_torus": train_s, "paper": PAPER.get(num_gpus, {})}


def calibrate_compute(cluster: Cluster = ABCI, profile: BackwardProfile | None = None,
                      model: StepModel = StepModel(), num_gpus: int = 2176,
                      train_seconds: float = PAPER[2176]["train_seconds"]) -> float:
    """The per-step compute (``model.batch`` images) at which the model's 90 epochs of
    the paper's batch-size control on ``num_gpus`` GPUs take ``train_seconds``.

    The paper gives no per-GPU rate, only end-to-end figures; this is the effective V100
    step time its 224 s implies (everything in its wall clock that is not exposed
    all-reduce counts as compute). Step time only grows with compute, so bisection finds it.
    """
    profile = profile or load_profile()
    low, high = 1e-4, 10.0
    for _ in range(60):
        middle = (low + high) / 2
        trial = replace(model, compute_s=middle)
        seconds = predict_abci(num_gpus, cluster, profile, trial)["train_seconds_torus"]["overlap"]
        low, high = (middle, high) if seconds < train_seconds else (low, middle)
    return (low + high) / 2
