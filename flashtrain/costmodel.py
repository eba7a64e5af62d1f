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

Pure functions and the named assumptions (ABCI's links, ResNet-50's compute per step);
:func:`fit_from_bench_json` fits alpha/beta from a ``bench allreduce --json`` file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


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
    return Link(alpha=(s_at * s_bb - s_bt * s_ab) / det, beta=(s_aa * s_bt - s_ab * s_at) / det)


def fit_from_bench_json(path: str) -> tuple[Link, int]:
    """Fit one link from the ``flat`` rows of a ``bench allreduce --json`` file."""
    with open(path) as handle:
        data = json.load(handle)
    n = int(data["meta"]["num_workers"])
    points = [(n, r["bytes"], r["median_s"]) for r in data["results"] if r["algo"] == "flat"]
    return fit_alpha_beta(points), n


# --- ABCI assumptions (stated, not measured) -----------------------------------------
# Intra-node: 4 V100 SXM2 on NVLink 2; assumed 40 GB/s effective per ring hop and 10 us
# per message (kernel launch + NCCL step). Inter-node: 2 x InfiniBand EDR (100 Gb/s =
# 12.5 GB/s each) per node; assumed 10 GB/s effective per flow and 20 us per message.
ABCI = Cluster(intra=Link(10e-6, 1 / 40e9), inter=Link(20e-6, 1 / 10e9),
               workers_per_node=4, inter_links_per_node=2)
RESNET50_PARAMS = 25.6e6
FP16_BYTES = 2
# Compute per step: assumed per-GPU batch 32 at ~1,100 images/s (V100, fp16, ResNet-50,
# 2018-era frameworks) = 29 ms per step. The paper reports only end-to-end figures.
STEP_COMPUTE_S = 32 / 1100
IMAGENET_TRAIN = 1_281_167
EPOCHS = 90
PAPER = {1088: {"scaling_efficiency": 0.9162}, 2176: {"train_seconds": 224.0}}


def predict_abci(num_gpus: int, cluster: Cluster = ABCI) -> dict:
    """All-reduce time of ResNet-50 fp16 gradients and the scaling efficiency it allows."""
    x = cluster.workers_per_node
    y = num_gpus // x
    size = RESNET50_PARAMS * FP16_BYTES
    times = {
        "ring": ring_cost(size, num_gpus).time(cluster),
        "torus": torus_cost(size, x, y, cluster.inter_links_per_node).time(cluster),
        "hierarchical": hierarchical_cost(size, x, y).time(cluster),
    }
    efficiency = {k: STEP_COMPUTE_S / (STEP_COMPUTE_S + t) for k, t in times.items()}
    steps = EPOCHS * IMAGENET_TRAIN / (32 * num_gpus)
    return {"gpus": num_gpus, "grid": f"{y}x{x}", "allreduce_s": times,
            "scaling_efficiency": efficiency,
            "train_seconds_torus": steps * (STEP_COMPUTE_S + times["torus"]),
            "paper": PAPER.get(num_gpus, {})}
