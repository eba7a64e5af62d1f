"""The grid planner: candidates, predictions and the recommendation (pure), and the
command line's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtrain.costmodel import (
    ABCI,
    RESNET50_PARAMS,
    StepModel,
    allreduce_time,
    load_profile,
    predict_step,
    ring_cost,
    torus_cost,
)
from flashtrain.plan import (
    DEFAULT_WORKER_IMAGES_PER_SEC,
    PlanError,
    candidate_grids,
    evaluate,
    node_slots,
    recommend,
)
from flashtrain.policy import propose_grid

REPO = Path(__file__).resolve().parents[2]
RESNET50_FP16 = RESNET50_PARAMS * 2


def plan_for(slots: dict[int, int], batches: list[int], size: float = RESNET50_FP16):
    candidates = evaluate(slots, size, batches, ABCI, DEFAULT_WORKER_IMAGES_PER_SEC)
    return candidates, recommend(candidates, batches)


def test_paper_cluster_recommends_the_paper_grid_with_the_torus():
    slots = node_slots(544, 4, None)
    candidates, choice = plan_for(slots, [34816, 69632])
    assert choice.candidate.grid == "544x4"
    assert choice.candidate.best_algorithm == "torus"
    assert choice.candidate.even_split == {34816: True, 69632: True}
    assert choice.candidate.per_worker_batch[34816] == (16, 16)
    assert "544x4" in choice.reason and "torus" in choice.reason
    # The torus prediction is the costmodel's, not a copy of its formula.
    assert choice.candidate.allreduce_s["torus"] == pytest.approx(
        torus_cost(RESNET50_FP16, 4, 544, ABCI.inter_links_per_node).time(ABCI))
    assert choice.candidate.allreduce_s["torus"] < choice.candidate.allreduce_s["ring"]


def test_prime_worker_count_on_partial_nodes():
    slots = node_slots(None, 4, 7)
    assert slots == {0: 4, 1: 3}
    grids = {c.grid: c.num_idle for c in plan_for(slots, [70])[0]}
    assert grids == {"1x4": 3, "2x3": 1, "3x2": 1, "7x1": 0}


def test_a_prime_count_on_one_node_has_single_row_or_single_column_grids():
    candidates, choice = plan_for(node_slots(None, 13, 13), [26])
    assert {c.grid for c in candidates if c.num_idle == 0} == {"1x13", "13x1"}
    assert choice.candidate.num_workers == 13


def test_a_grid_that_fits_on_one_node_uses_intra_node_links_only():
    candidates, _ = plan_for(node_slots(None, 4, 7), [64])
    one_row = next(c for c in candidates if c.grid == "1x4")  # only the full node has a row
    intra_only = replace(ABCI, inter=ABCI.intra)
    assert one_row.allreduce_s["ring"] == pytest.approx(ring_cost(RESNET50_FP16, 4).time(intra_only))
    spanning = next(c for c in candidates if c.grid == "7x1")
    assert spanning.allreduce_s["ring"] == pytest.approx(ring_cost(RESNET50_FP16, 7).time(ABCI))


def test_uneven_split_is_reported():
    candidates, _ = plan_for(node_slots(2, 4, None), [30])
    two_by_four = next(c for c in candidates if c.grid == "2x4")
    assert two_by_four.per_worker_batch[30] == (3, 4)
    assert two_by_four.even_split[30] is False


@given(st.dictionaries(st.integers(0, 20), st.integers(1, 9), min_size=1, max_size=8),
       st.integers(1, 5000))
def test_candidates_keep_rows_on_one_node(slots, batch):
    total = sum(slots.values())
    candidates, choice = plan_for(slots, [batch])
    largest_node = max(slots.values())
    for candidate in candidates:
        assert candidate.cols <= largest_node  # rows never exceed a node
        assert candidate.rows == sum(n // candidate.cols for n in slots.values())
        assert candidate.num_workers + candidate.num_idle == total
        low, high = candidate.per_worker_batch[batch]
        assert high - low <= 1
        assert candidate.even_split[batch] == (batch % candidate.num_workers == 0)
        assert all(t > 0 for t in candidate.allreduce_s.values()) or candidate.num_workers == 1
    # The candidate list includes the policy's own choice.
    policy = propose_grid(slots, preferred_cols=largest_node)
    assert str(policy.grid) in {c.grid for c in candidates}
    assert choice.candidate in candidates


@given(st.integers(1, 64), st.integers(1, 8))
def test_full_nodes_always_offer_every_divisor_row_length_without_idle(num_nodes, per_node):
    grids = dict(candidate_grids(node_slots(num_nodes, per_node, None)))
    for cols in range(1, per_node + 1):
        if per_node % cols == 0:
            assert grids[next(g for g in grids if g.cols == cols)] == 0


@pytest.mark.parametrize("nodes, gpus, workers", [(None, 4, None), (2, 4, 8), (0, 4, None),
                                                  (None, 4, 0), (2, 0, None)])
def test_bad_cluster_shapes_are_refused(nodes, gpus, workers):
    with pytest.raises(PlanError):
        node_slots(nodes, gpus, workers)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashtrain.plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "--global-batch", "64"], "--nodes 0"),
    (["--nodes", "2", "--workers", "8", "--global-batch", "64"], "not both"),
    (["--nodes", "2", "--params", "1e6"], "--global-batch"),
    (["--nodes", "2", "--params", "1e6", "--global-batch", "0"], "--global-batch 0"),
    (["--nodes", "2", "--params", "1e6", "--global-batch", "8", "--inter-gbps", "0"], "--inter-gbps"),
    (["--nodes", "2", "--config", "jobs/missing.yaml"], "does not exist"),
])
def test_cli_bad_input_exits_2_with_one_message(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_unknown_model_and_flag_exit_2():
    assert run_cli("--nodes", "2", "--model", "nosuch", "--global-batch", "8").returncode == 2
    assert run_cli("--nodes", "2", "--bogus").returncode == 2


def test_cli_reads_the_paper_config_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("--nodes", "544", "--gpus-per-node", "4", "--config", "jobs/paper-abci.yaml",
                     "--params", "25.6e6", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "recommendation: grid 544x4" in result.stdout
    data = json.loads(out.read_text())
    assert data["job"]["global_batches"] == [34816, 69632]
    assert data["job"]["comm_dtype"] == "fp16"
    assert data["recommendation"]["grid"] == "544x4"
    assert {c["grid"] for c in data["candidates"]} >= {"544x4", "1088x2", "2176x1"}


def test_step_time_is_the_costmodels_overlap_model():
    """The planner's exposed all-reduce is the costmodel's prediction for the same step;
    without overlap it is the whole all-reduce."""
    slots = node_slots(544, 4, None)
    batch = 69632  # 32 per GPU
    chosen = next(c for c in evaluate(slots, RESNET50_FP16, [batch], ABCI,
                                      DEFAULT_WORKER_IMAGES_PER_SEC, bucket_mb=64)
                  if c.grid == "544x4")
    comm = lambda size: allreduce_time("torus", size, 4, 544, ABCI)  # noqa: E731
    expected = predict_step(32, comm, load_profile(),
                            StepModel(compute_s=32 / DEFAULT_WORKER_IMAGES_PER_SEC, batch=32,
                                      bucket_bytes=64 * 2**20), num_params=RESNET50_PARAMS)
    assert chosen.exposed_s[batch] == pytest.approx(expected["exposed_s"])
    assert chosen.step_s[batch] == pytest.approx(expected["step_s"])
    serial = next(c for c in evaluate(slots, RESNET50_FP16, [batch], ABCI,
                                      DEFAULT_WORKER_IMAGES_PER_SEC, overlap=False)
                  if c.grid == "544x4")
    assert serial.exposed_s[batch] == pytest.approx(serial.allreduce_s["torus"])
