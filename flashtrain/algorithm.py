"""Which all-reduce a grid uses when ``collective.algorithm=auto``: a decision made per
grid (at every forming) from the node layout and the cost model, returned as data with
its reason; the controller prints it and records it in the run's metrics.

The rules, in order:

* one worker: ``flat`` (there is nothing to reduce; one call that returns at once);
* every worker on one node with GPUs: ``flat``. One NCCL all-reduce per bucket, which
  NCCL itself runs as a ring or tree over NVLink / NVSwitch, instead of the torus's three
  calls (reduce-scatter, all-reduce, all-gather), each waited for on the host by
  flashtrain's NCCL backend;
* otherwise the cost model (:func:`flashtrain.plan.allreduce_times`, the same prediction
  ``python -m flashtrain.plan`` ranks grids by) for one bucket on the wire: the fastest
  of torus, flat ring and hierarchical. A row that spans nodes puts the torus's row
  phase on inter-node links, which the model's layout does not assume: then the torus
  is compared as if every step crossed nodes (flat ring's links).

Pure: no Ray, no torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from flashtrain.costmodel import ABCI, Cluster
from flashtrain.topology import Grid

# The cost model says "ring" for what collective.algorithm calls "flat".
_CONFIG_NAME = {"ring": "flat", "torus": "torus", "hierarchical": "hierarchical"}
_PREFERENCE = ("torus", "flat", "hierarchical")  # ties go to the paper's algorithm


@dataclass(frozen=True)
class AlgorithmChoice:
    """The all-reduce of one grid, why, and the predicted seconds per bucket (if any)."""

    algorithm: str
    reason: str
    predicted_s: dict[str, float]


def rows_span_nodes(grid: Grid, nodes: Sequence[str | None]) -> bool:
    """Whether some row of ``grid`` has ranks on two nodes (``nodes[rank]``)."""
    for row in range(grid.rows):
        row_nodes = {nodes[row * grid.cols + col] for col in range(grid.cols)}
        if len(row_nodes) > 1:
            return True
    return False


def choose_algorithm(configured: str, grid: Grid, nodes: Sequence[str | None], on_gpu: bool,
                     bucket_bytes: float, cluster: Cluster = ABCI) -> AlgorithmChoice:
    """The algorithm for ``grid`` whose rank ``r`` runs on node ``nodes[r]``."""
    from flashtrain.plan import allreduce_times

    if configured != "auto":
        return AlgorithmChoice(configured, f"collective.algorithm={configured}", {})
    if grid.num_workers == 1:
        return AlgorithmChoice("flat", "one worker: nothing to reduce", {})
    num_nodes = len(set(nodes))
    if num_nodes == 1 and on_gpu:
        return AlgorithmChoice(
            "flat", f"all {grid.num_workers} GPU workers on one node: one NCCL all-reduce "
            "per bucket instead of the torus's three host-waited calls", {})
    per_node = max(nodes.count(node) for node in set(nodes))
    layout = replace(cluster, workers_per_node=per_node)
    times = allreduce_times(grid, bucket_bytes, layout, single_node=num_nodes == 1)
    spans = num_nodes > 1 and rows_span_nodes(grid, nodes)
    if spans:  # the torus's row phase crosses nodes too
        torus_on_inter = allreduce_times(grid, bucket_bytes, replace(layout, intra=layout.inter),
                                         single_node=False)["torus"]
        times = {**times, "torus": torus_on_inter}
    predicted = {_CONFIG_NAME[name]: seconds for name, seconds in times.items()}
    best = min(_PREFERENCE, key=lambda name: (predicted[name], _PREFERENCE.index(name)))
    ranked = ", ".join(f"{name} {predicted[name] * 1e3:.2f} ms" for name in
                       sorted(predicted, key=predicted.get))
    where = f"{num_nodes} node(s)" + (", rows span nodes" if spans else "")
    return AlgorithmChoice(best, f"cost model for a {bucket_bytes / 2**20:g} MiB bucket on "
                           f"{grid} over {where}: {ranked}", predicted)
