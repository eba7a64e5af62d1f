"""``python -m flashtrain.plan``: choose a grid before reserving a cluster.

Given the cluster shape (nodes x GPUs per node, or a worker count), the model's
parameter count and the global batch (or a job's batch phases), list every grid whose
rows stay on one node (the rule of :mod:`flashtrain.policy`), predict the gradient
all-reduce time of the flat ring, the 2D torus and the hierarchical all-reduce with the
alpha-beta model of :mod:`flashtrain.costmodel`, show how each batch phase splits
over the workers, and recommend one grid and algorithm.

Recommendation: the candidate with the highest predicted throughput, averaged over the
batch phases, where one step takes ``largest per-worker share / worker images/s`` of
compute (the costmodel's V100 figure unless ``--worker-images-per-sec`` says otherwise)
plus the fastest algorithm's *exposed* all-reduce: the costmodel's overlap model, where
gradient buckets are reduced during the backward pass as they become ready (ResNet-50's
measured backward profile, stretched to the model's size) and only what outlasts the
backward adds to the step. ``--no-overlap`` adds the whole all-reduce instead (the old,
conservative model). Ties go to the longer rows, as in the policy.

The planning core (:func:`node_slots`, :func:`candidate_grids`, :func:`evaluate`,
:func:`recommend`) is pure: no Ray, no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from flashtrain.costmodel import (
    ABCI,
    ASSUMPTIONS,
    STEP_COMPUTE_S,
    BackwardProfile,
    Cluster,
    Link,
    StepModel,
    hierarchical_cost,
    load_profile,
    predict_step,
    ring_cost,
    torus_cost,
)
from flashtrain.schedule import split_batch
from flashtrain.topology import Grid

ALGORITHMS = ("torus", "ring", "hierarchical")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# The costmodel's compute assumption: a per-GPU batch of 32 in STEP_COMPUTE_S seconds.
DEFAULT_WORKER_IMAGES_PER_SEC = 32 / STEP_COMPUTE_S
EXIT_USAGE = 2


class PlanError(ValueError):
    """Input the planner cannot work with; the message says what to change."""


@dataclass(frozen=True)
class Candidate:
    """One grid over the cluster and what the model predicts for it."""

    grid: str
    rows: int
    cols: int
    num_workers: int
    num_idle: int
    allreduce_s: dict[str, float]
    best_algorithm: str
    per_worker_batch: dict[int, tuple[int, int]]  # global batch -> (smallest, largest share)
    even_split: dict[int, bool]
    step_s: dict[int, float]  # global batch -> predicted step time with the best algorithm
    images_per_sec: float  # averaged over the phases
    exposed_s: dict[int, float]  # global batch -> all-reduce time left after the backward


@dataclass(frozen=True)
class Recommendation:
    candidate: Candidate
    reason: str


def node_slots(num_nodes: int | None, gpus_per_node: int, num_workers: int | None) -> dict[int, int]:
    """Worker slots per node: ``num_nodes`` full nodes, or ``num_workers`` filling nodes
    of ``gpus_per_node`` with the remainder on a last, partial node."""
    if gpus_per_node < 1:
        raise PlanError(f"--gpus-per-node {gpus_per_node}: must be >= 1")
    if num_nodes is not None and num_workers is not None:
        raise PlanError("give either --nodes N (with --gpus-per-node) or --workers W, not both")
    if num_nodes is None and num_workers is None:
        raise PlanError("give the cluster: --nodes N (with --gpus-per-node) or --workers W")
    if num_nodes is not None:
        if num_nodes < 1:
            raise PlanError(f"--nodes {num_nodes}: must be >= 1")
        return {node: gpus_per_node for node in range(num_nodes)}
    if num_workers < 1:
        raise PlanError(f"--workers {num_workers}: must be >= 1")
    full, rest = divmod(num_workers, gpus_per_node)
    slots = {node: gpus_per_node for node in range(full)}
    if rest:
        slots[full] = rest
    return slots


def candidate_grids(slots: Mapping[int, int]) -> list[tuple[Grid, int]]:
    """Every grid whose rows stay on one node: for each row length ``c`` up to the
    largest node, each node gives ``slots // c`` whole rows. Returns ``(grid, idle)``,
    longest rows first."""
    total = sum(slots.values())
    result = []
    for cols in range(max(slots.values()), 0, -1):
        rows = sum(n // cols for n in slots.values())
        if rows >= 1:
            result.append((Grid(rows, cols), total - rows * cols))
    return result


def link_cluster(intra: Link, inter: Link, gpus_per_node: int, inter_links_per_node: int) -> Cluster:
    return Cluster(intra=intra, inter=inter, workers_per_node=gpus_per_node,
                   inter_links_per_node=inter_links_per_node)


def allreduce_times(grid: Grid, size_bytes: float, cluster: Cluster, single_node: bool) -> dict[str, float]:
    """Predicted all-reduce seconds per algorithm (costmodel formulas).

    Two adjustments of the inputs, not of the formulas: on a single node every link is
    an intra-node one; in the hierarchical all-reduce every row has a leader, so a node
    holding several rows has that many leaders sharing its inter-node links.
    """
    if single_node:
        cluster = replace(cluster, inter=cluster.intra)
    links = cluster.inter_links_per_node
    leaders_per_node = max(cluster.workers_per_node // grid.cols, 1)
    hierarchical = hierarchical_cost(size_bytes, grid.cols, grid.rows)
    if grid.rows > 1 and not single_node:
        hierarchical = replace(hierarchical, inter_sharing=leaders_per_node / links)
    costs = {"torus": torus_cost(size_bytes, grid.cols, grid.rows, links),
             "ring": ring_cost(size_bytes, grid.num_workers),
             "hierarchical": hierarchical}
    return {name: cost.time(cluster) for name, cost in costs.items()}


def evaluate(slots: Mapping[int, int], size_bytes: float, batches: Sequence[int],
             cluster: Cluster, worker_images_per_sec: float, *, overlap: bool = True,
             wire_bytes: int = 2, bucket_mb: float = ASSUMPTIONS["bucket_mb"].value,
             profile: BackwardProfile | None = None) -> list[Candidate]:
    """Every candidate grid with its predicted all-reduce and step times.

    ``size_bytes`` is the gradient on the wire (``wire_bytes`` per element); buckets hold
    ``bucket_mb`` MiB of fp32 gradients, as the workers bucket them.
    """
    if overlap and profile is None:
        profile = load_profile()
    if not batches or min(batches) < 1:
        raise PlanError("the global batch must be >= 1")
    candidates = []
    for grid, idle in candidate_grids(slots):
        # Every node with room for a row holds rows of this grid.
        single_node = sum(1 for n in slots.values() if n >= grid.cols) == 1
        times = allreduce_times(grid, size_bytes, cluster, single_node)
        best = min(ALGORITHMS, key=lambda name: (times[name], ALGORITHMS.index(name)))
        shares, even, step_s, exposed = {}, {}, {}, {}
        for batch in batches:
            split = split_batch(batch, grid.num_workers)
            shares[batch] = (min(split), max(split))
            even[batch] = batch % grid.num_workers == 0
            compute = max(split) / worker_images_per_sec
            exposed[batch] = times[best]
            if overlap and times[best] > 0:
                exposed[batch] = overlapped_exposure(
                    grid, single_node, cluster, best, compute, size_bytes, wire_bytes,
                    bucket_mb, profile)
            step_s[batch] = compute + exposed[batch]
        ips = sum(batch / step_s[batch] for batch in batches) / len(batches)
        candidates.append(Candidate(str(grid), grid.rows, grid.cols, grid.num_workers, idle,
                                    times, best, shares, even, step_s, ips, exposed))
    return candidates


def overlapped_exposure(grid: Grid, single_node: bool, cluster: Cluster, algorithm: str,
                        compute_s: float, size_bytes: float, wire_bytes: int,
                        bucket_mb: float, profile: BackwardProfile) -> float:
    """The costmodel's overlap of ``algorithm``'s bucketed all-reduces with the backward
    of a step of ``compute_s``; each bucket timed as :func:`allreduce_times` times it."""
    def comm_time(nbytes: float) -> float:
        return allreduce_times(grid, nbytes, cluster, single_node)[algorithm]

    model = StepModel(compute_s=compute_s, batch=1, bucket_bytes=bucket_mb * 2**20,
                      wire_bytes=wire_bytes)
    step = predict_step(1, comm_time, profile, model, num_params=size_bytes / wire_bytes)
    return step["exposed_s"]


def recommend(candidates: Sequence[Candidate], batches: Sequence[int]) -> Recommendation:
    """The candidate with the highest predicted throughput; ties to longer rows."""
    best = max(candidates, key=lambda c: (round(c.images_per_sec, 6), c.cols))
    times = best.allreduce_s
    others = ", ".join(f"{name} {times[name] * 1e3:.2f} ms" for name in ALGORITHMS
                       if name != best.best_algorithm)
    uneven = [b for b in batches if not best.even_split[b]]
    split = ("every global batch divides evenly" if not uneven else
             f"global batch {', '.join(map(str, uneven))} splits unevenly "
             "(flashtrain weights the shares, the largest share paces the step)")
    idle = f"{best.num_idle} worker(s) idle as spares" if best.num_idle else "no worker idle"
    reason = (f"grid {best.grid} with {best.best_algorithm} all-reduce: predicted "
              f"{best.images_per_sec:,.0f} images/s, the highest of {len(candidates)} "
              f"candidate(s); {best.best_algorithm} {times[best.best_algorithm] * 1e3:.2f} ms "
              f"per step vs {others}; {idle}; {split}")
    return Recommendation(best, reason)


# --- command line --------------------------------------------------------------------


def count_parameters(model_name: str, num_classes: int) -> int:
    """Trainable parameters of a flashtrain model, built on the meta device (no
    weights downloaded, no memory allocated)."""
    import torch

    from flashtrain.train.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(model_name, num_classes, seed=0)
    except ValueError as err:
        raise PlanError(str(err)) from err
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.plan",
                                     description=__doc__.split("\n\n")[1])
    where = parser.add_argument_group("cluster")
    where.add_argument("--nodes", type=int, help="number of nodes")
    where.add_argument("--workers", type=int, help="number of workers (instead of --nodes); "
                       "they fill nodes of --gpus-per-node, the last one possibly partial")
    where.add_argument("--gpus-per-node", type=int, default=ABCI.workers_per_node,
                       help="workers (GPUs) per node (default %(default)s)")
    job = parser.add_argument_group("job")
    job.add_argument("--config", help="job YAML (jobs/*.yaml): batch phases, model, comm dtype")
    job.add_argument("--model", help="model name (flashtrain.train.models; default resnet50)")
    job.add_argument("--params", type=float, help="parameter count instead of --model, e.g. 25.6e6")
    job.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    job.add_argument("--global-batch", type=int, help="global batch (overrides the config's phases)")
    job.add_argument("--comm-dtype", choices=sorted(DTYPE_BYTES),
                     help="gradient dtype on the wire (default: the config's, else fp32)")
    job.add_argument("--bucket-mb", type=float,
                     help="gradient bucket size in MiB of fp32 gradients (default: the config's "
                     f"collective.bucket_mb, else {ASSUMPTIONS['bucket_mb'].value:g})")
    job.add_argument("--no-overlap", action="store_true",
                     help="assume the all-reduce starts after the backward pass (old model)")
    job.add_argument("--worker-images-per-sec", type=float, default=DEFAULT_WORKER_IMAGES_PER_SEC,
                     help="compute rate of one worker (default %(default).0f: the costmodel's "
                     "V100 ResNet-50 fp16 assumption)")
    links = parser.add_argument_group("links (defaults: costmodel's ABCI assumptions)")
    links.add_argument("--intra-gbps", type=float, default=1 / ABCI.intra.beta / 1e9,
                       help="intra-node GB/s per hop (default %(default)g)")
    links.add_argument("--intra-latency-us", type=float, default=ABCI.intra.alpha * 1e6,
                       help="intra-node seconds per message, in us (default %(default)g)")
    links.add_argument("--inter-gbps", type=float, default=1 / ABCI.inter.beta / 1e9,
                       help="inter-node GB/s per flow (default %(default)g)")
    links.add_argument("--inter-latency-us", type=float, default=ABCI.inter.alpha * 1e6,
                       help="inter-node seconds per message, in us (default %(default)g)")
    links.add_argument("--inter-links-per-node", type=int, default=ABCI.inter_links_per_node,
                       help="inter-node links (NICs) per node (default %(default)s)")
    parser.add_argument("--json", help="write the candidates and the recommendation here")
    return parser.parse_args(argv)


def resolve_job(args: argparse.Namespace) -> dict:
    """Model size, dtype and batch phases from the flags and the optional config."""
    config = None
    if args.config:
        from flashtrain.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as err:
            raise PlanError(str(err)) from None
    if args.params is not None and args.model is not None:
        raise PlanError("give --model or --params, not both")
    if args.params is not None:
        if args.params < 1:
            raise PlanError(f"--params {args.params:g}: must be >= 1")
        model, params = "custom", int(args.params)
    else:
        model = args.model or (config.model.name if config else "resnet50")
        params = count_parameters(model, args.num_classes)
    dtype = args.comm_dtype or (config.collective.comm_dtype if config else "fp32")
    bucket_mb = args.bucket_mb or (config.collective.bucket_mb if config
                                   else ASSUMPTIONS["bucket_mb"].value)
    if bucket_mb <= 0:
        raise PlanError(f"--bucket-mb {bucket_mb:g}: must be > 0")
    if args.global_batch is not None:
        if args.global_batch < 1:
            raise PlanError(f"--global-batch {args.global_batch}: must be >= 1")
        batches, phase_grids = [args.global_batch], []
    elif config is not None:
        batches = [p.global_batch for p in config.schedule.phases]
        phase_grids = [p.grid for p in config.schedule.phases]
    else:
        raise PlanError("give --global-batch B or --config jobs/X.yaml (its batch phases)")
    for value, flag in ((args.intra_gbps, "--intra-gbps"), (args.inter_gbps, "--inter-gbps"),
                        (args.worker_images_per_sec, "--worker-images-per-sec")):
        if value <= 0:
            raise PlanError(f"{flag} {value:g}: must be > 0")
    if min(args.intra_latency_us, args.inter_latency_us) < 0 or args.inter_links_per_node < 1:
        raise PlanError("latencies must be >= 0 and --inter-links-per-node >= 1")
    return {"model": model, "params": params, "comm_dtype": dtype,
            "bytes": params * DTYPE_BYTES[dtype], "global_batches": sorted(set(batches)),
            "bucket_mb": bucket_mb, "overlap": not args.no_overlap,
            "config_phase_grids": [g for g in phase_grids if g]}


def format_table(candidates: Sequence[Candidate], batches: Sequence[int], chosen: Candidate) -> str:
    batch_cols = "".join(f"{'b/w@' + str(b):>14}" for b in batches)
    exposed_cols = "".join(f"{'exp ms@' + str(b):>14}" for b in batches)
    lines = [f"  {'grid':>9}{'workers':>8}{'idle':>6}{'torus ms':>10}{'ring ms':>10}"
             f"{'hier ms':>10}{'best':>14}{batch_cols}{exposed_cols}{'pred img/s':>13}"]
    for c in candidates:
        shares = ""
        for b in batches:
            low, high = c.per_worker_batch[b]
            text = f"{high}" if low == high else f"{low}-{high}"
            shares += f"{text + ('' if c.even_split[b] else ' uneven'):>14}"
        exposed = "".join(f"{c.exposed_s[b] * 1e3:>14.2f}" for b in batches)
        mark = "*" if c is chosen else " "
        t = c.allreduce_s
        lines.append(f"{mark} {c.grid:>9}{c.num_workers:>8}{c.num_idle:>6}{t['torus'] * 1e3:>10.2f}"
                     f"{t['ring'] * 1e3:>10.2f}{t['hierarchical'] * 1e3:>10.2f}"
                     f"{c.best_algorithm:>14}{shares}{exposed}{c.images_per_sec:>13,.0f}")
    return "\n".join(lines)


def plan(args: argparse.Namespace) -> dict:
    slots = node_slots(args.nodes, args.gpus_per_node, args.workers)
    job = resolve_job(args)
    cluster = link_cluster(Link(args.intra_latency_us * 1e-6, 1 / (args.intra_gbps * 1e9)),
                           Link(args.inter_latency_us * 1e-6, 1 / (args.inter_gbps * 1e9)),
                           args.gpus_per_node, args.inter_links_per_node)
    candidates = evaluate(slots, job["bytes"], job["global_batches"], cluster,
                          args.worker_images_per_sec, overlap=job["overlap"],
                          wire_bytes=DTYPE_BYTES[job["comm_dtype"]], bucket_mb=job["bucket_mb"])
    choice = recommend(candidates, job["global_batches"])
    return {"cluster": {"nodes": len(slots), "slots_per_node": sorted(set(slots.values())),
                        "num_workers": sum(slots.values()), "links": asdict(cluster)},
            "job": job, "worker_images_per_sec": args.worker_images_per_sec,
            "candidates": candidates, "recommendation": choice}


def to_json(result: dict) -> dict:
    def candidate(c: Candidate) -> dict:
        data = asdict(c)
        data["per_worker_batch"] = {str(b): list(v) for b, v in c.per_worker_batch.items()}
        data["even_split"] = {str(b): v for b, v in c.even_split.items()}
        data["step_s"] = {str(b): v for b, v in c.step_s.items()}
        data["exposed_s"] = {str(b): v for b, v in c.exposed_s.items()}
        return data

    choice: Recommendation = result["recommendation"]
    return {**{k: v for k, v in result.items() if k not in ("candidates", "recommendation")},
            "candidates": [candidate(c) for c in result["candidates"]],
            "recommendation": {"grid": choice.candidate.grid,
                               "algorithm": choice.candidate.best_algorithm,
                               "reason": choice.reason}}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = plan(args)
    except PlanError as err:
        print(f"flashtrain.plan: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    job, cl = result["job"], result["cluster"]
    print(f"{job['model']}: {job['params']:,} parameters, {job['comm_dtype']} gradients "
          f"= {job['bytes'] / 1e6:.3g} MB per all-reduce; {cl['num_workers']} workers on "
          f"{cl['nodes']} node(s); compute {result['worker_images_per_sec']:.0f} images/s per worker; "
          + (f"all-reduce overlapped with the backward in {job['bucket_mb']:g} MiB buckets"
             if job["overlap"] else "all-reduce after the backward (--no-overlap)"))
    if job["config_phase_grids"]:
        print(f"the config's phases name grids {', '.join(job['config_phase_grids'])}")
    choice = result["recommendation"]
    print(format_table(result["candidates"], job["global_batches"], choice.candidate))
    print(f"recommendation: {choice.reason}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(to_json(result), handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
