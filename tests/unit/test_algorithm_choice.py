"""collective.algorithm=auto (flashtrain.algorithm): the rules per node layout, and that
the choice is the cost model's fastest where the model decides."""

from __future__ import annotations

import pytest

from flashtrain.algorithm import choose_algorithm, rows_span_nodes
from flashtrain.config import load_config
from flashtrain.costmodel import ABCI
from flashtrain.plan import allreduce_times
from flashtrain.topology import Grid

BUCKET = 64 * 2**20


def test_a_configured_algorithm_is_kept():
    choice = choose_algorithm("hierarchical", Grid(2, 2), ["a"] * 4, True, BUCKET)
    assert choice.algorithm == "hierarchical" and "collective.algorithm" in choice.reason


def test_one_worker_and_one_gpu_node_use_one_flat_call():
    assert choose_algorithm("auto", Grid(1, 1), ["a"], True, BUCKET).algorithm == "flat"
    choice = choose_algorithm("auto", Grid(2, 4), ["a"] * 8, True, BUCKET)
    assert choice.algorithm == "flat" and "one NCCL all-reduce" in choice.reason


def test_across_nodes_the_cost_models_fastest_wins():
    grid = Grid(4, 8)  # 4 nodes of 8 GPUs, one row per node
    nodes = [f"node{rank // 8}" for rank in range(32)]
    choice = choose_algorithm("auto", grid, nodes, True, BUCKET)
    times = allreduce_times(grid, BUCKET, ABCI, single_node=False)
    fastest = min(times, key=times.get)
    assert choice.algorithm == {"ring": "flat"}.get(fastest, fastest)
    assert set(choice.predicted_s) == {"torus", "flat", "hierarchical"}
    assert "4 node(s)" in choice.reason and "rows span" not in choice.reason


def test_rows_that_span_nodes_are_seen():
    assert not rows_span_nodes(Grid(2, 2), ["a", "a", "b", "b"])
    assert rows_span_nodes(Grid(2, 2), ["a", "b", "a", "b"])
    choice = choose_algorithm("auto", Grid(2, 2), ["a", "b", "a", "b"], True, BUCKET)
    assert "rows span nodes" in choice.reason


def test_cpu_workers_on_one_node_go_by_the_model_too():
    choice = choose_algorithm("auto", Grid(2, 2), ["a"] * 4, False, BUCKET)
    assert choice.algorithm in ("torus", "flat", "hierarchical") and choice.predicted_s


def test_auto_is_a_valid_setting():
    assert load_config(None, ["collective.algorithm=auto"]).collective.algorithm == "auto"
    with pytest.raises(ValueError):
        load_config(None, ["collective.algorithm=fastest"])
