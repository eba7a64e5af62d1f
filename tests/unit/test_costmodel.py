"""The alpha-beta model of ring, torus and hierarchical all-reduce, and its overlap with
the backward pass (pure), plus the fits and the command line."""

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
    Cluster,
    Link,
    ReadyBucket,
    StepModel,
    allreduce_time,
    calibrate_compute,
    fit_alpha_beta,
    fit_compute_from_throughput_json,
    fit_from_bench_json,
    hierarchical_cost,
    load_profile,
    overlap,
    predict_abci,
    predict_step,
    read_bench_json,
    ready_buckets,
    ring_cost,
    torus_cost,
)

REPO = Path(__file__).resolve().parents[2]

axis = st.integers(min_value=1, max_value=64)
size = st.floats(min_value=1.0, max_value=1e10)


@given(x=axis, y=axis)
def test_torus_latency_terms_vs_ring(x, y):
    assert torus_cost(1e6, x, y).steps == 2 * (x - 1) + 2 * (y - 1)
    assert ring_cost(1e6, x * y).steps == 2 * (x * y - 1)


@given(x=axis, y=axis, s=size)
def test_torus_sends_the_same_bytes_as_ring(x, y, s):
    assert torus_cost(s, x, y).bytes == pytest.approx(ring_cost(s, x * y).bytes, rel=1e-9)


@given(x=axis, y=st.integers(min_value=2, max_value=64), s=size)
def test_hierarchical_inter_node_volume_is_x_times_torus_column(x, y, s):
    torus_column = torus_cost(s, x, y).bytes_inter
    assert hierarchical_cost(s, x, y).bytes_inter == pytest.approx(x * torus_column, rel=1e-9)


def test_fit_recovers_known_alpha_beta():
    truth = Link(alpha=250e-6, beta=1 / 0.8e9)
    points = []
    for n in (2, 4, 9):
        for s in (4e3, 4e6, 1e8):
            t = ring_cost(s, n).time(Cluster(truth, truth, workers_per_node=1))
            points.append((n, s, t))
    fitted = fit_alpha_beta(points)
    assert fitted.alpha == pytest.approx(truth.alpha, rel=1e-6)
    assert fitted.beta == pytest.approx(truth.beta, rel=1e-6)


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two or more"):
        fit_alpha_beta([(4, 1e6, 0.01)])


def test_abci_prediction_torus_beats_ring_and_efficiency_in_range():
    for gpus in (1088, 2176, 3456):
        algorithms = predict_abci(gpus, ABCI)["algorithms"]
        assert algorithms["torus"]["allreduce_s"] < algorithms["ring"]["allreduce_s"]
        for step in algorithms.values():
            assert 0 < step["efficiency"] < 1 and 0 < step["efficiency_no_overlap"] < 1
    assert predict_abci(1088)["paper"] == {"scaling_efficiency": 0.9162}


# --- overlap of the all-reduce with the backward pass ----------------------------------

ready = st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(1e3, 1e8)), min_size=1, max_size=12)


def per_byte(seconds_per_byte: float, latency: float = 1e-4):
    return lambda nbytes: latency + nbytes * seconds_per_byte


@given(buckets=ready, backward=st.floats(1e-3, 1.0), beta=st.floats(1e-12, 1e-8))
def test_overlap_never_exposes_more_than_the_same_buckets_after_the_backward(buckets, backward, beta):
    comm = per_byte(beta)
    during = [ReadyBucket(size, fraction * backward) for fraction, size in sorted(buckets)]
    after = [ReadyBucket(b.wire_bytes, backward) for b in during]
    overlapped = overlap(during, comm, backward)
    serial = overlap(after, comm, backward)
    assert serial.exposed_s == pytest.approx(sum(comm(b.wire_bytes) for b in during))
    assert overlapped.exposed_s <= serial.exposed_s + 1e-12
    # One link: every bucket starts after it is ready and after the one before it.
    for index, bucket in enumerate(during):
        assert overlapped.starts[index] >= bucket.ready_s
        if index:
            assert overlapped.starts[index] >= overlapped.finishes[index - 1]


@given(short=st.floats(1e-3, 0.5), longer_by=st.floats(1.0, 10.0), bucket_mb=st.sampled_from([1, 25, 64]))
def test_exposed_time_falls_as_the_backward_gets_longer(short, longer_by, bucket_mb):
    profile = load_profile()
    model = StepModel(bucket_bytes=bucket_mb * 2**20)

    def exposed(compute_s: float) -> float:
        comm = lambda size: allreduce_time("torus", size, 4, 272, ABCI)  # noqa: E731
        return predict_step(32, comm, profile, replace(model, compute_s=compute_s))["exposed_s"]

    assert exposed(short * longer_by) <= exposed(short) + 1e-12


def test_buckets_follow_the_fusion_rule_in_reverse_parameter_order():
    """The model's buckets are the workers' buckets: plan_buckets over ResNet-50's
    parameters in the order backward produces them."""
    import torch
    import torchvision

    from flashtrain.collective.fusion import plan_buckets

    with torch.device("meta"):
        params = list(torchvision.models.resnet50().parameters())
    profile = load_profile()
    assert profile.numels == tuple(p.numel() for p in params)
    for bucket_mb in (1, 25, 64):
        workers = plan_buckets(params[::-1], bucket_mb * 2**20)
        model = ready_buckets(profile, 1.0, bucket_mb * 2**20, grad_bytes=4, wire_bytes=4)
        assert sorted(b.wire_bytes for b in model) == sorted(b.buffer.numel() * 4 for b in workers)
        # The first bucket ready holds the classifier (the last layer computes first).
        assert model[0].ready_s < model[-1].ready_s <= 1.0


def test_the_profile_is_a_measured_backward_order():
    profile = load_profile()
    fractions = profile.ready_fractions
    assert all(0.0 <= f <= 1.0 for f in fractions)
    # Backward runs from the classifier to the stem: fc is ready early, conv1 last.
    assert fractions[-1] < 0.2 and fractions[0] > 0.8
    assert 0.3 < profile.backward_share < 0.9


def test_efficiency_at_1088_within_5_points_of_the_paper_with_the_shipped_assumptions():
    profile = load_profile()
    compute = calibrate_compute(ABCI, profile)
    prediction = predict_abci(1088, ABCI, profile, StepModel(compute_s=compute))
    efficiency = prediction["algorithms"]["torus"]["efficiency"]
    assert abs(efficiency - 0.9162) <= 0.05, efficiency
    # The calibration reproduces its own input: 224 s for 90 epochs on 2,176 GPUs.
    at_2176 = predict_abci(2176, ABCI, profile, StepModel(compute_s=compute))
    assert at_2176["train_seconds_torus"]["overlap"] == pytest.approx(224.0, rel=1e-3)
    # The torus beats the flat ring at this scale, overlapped or not.
    algorithms = prediction["algorithms"]
    assert algorithms["torus"]["efficiency"] > algorithms["ring"]["efficiency"]
    assert algorithms["torus"]["efficiency_no_overlap"] > algorithms["ring"]["efficiency_no_overlap"]


def write_allreduce_json(path, truth: Link, n: int) -> None:
    cluster = Cluster(truth, truth, workers_per_node=1)
    rows = [{"algo": "flat", "elements": s // 4, "bytes": s, "median_s": ring_cost(s, n).time(cluster)}
            for s in (4_000, 4_000_000, 100_000_000)]
    rows.append({"algo": "torus", "elements": 1000, "bytes": 4000, "median_s": 1.0})  # ignored
    path.write_text(json.dumps({"meta": {"num_workers": n, "grid": "2x2"}, "results": rows}))


def write_throughput_json(path, seconds_per_image: float, n: int, batch: int) -> None:
    """A document of the shape ``bench throughput --json`` writes (checked against the real
    bench in tests/integration/test_bench_tools.py): grid runs of three algorithms and the
    plain peer, which the fit must leave out."""
    share = batch / n
    runs = [{"system": f"flashtrain_{algo}", "workers": n, "repeat": 0, "grid": "2x2",
             "global_batch": batch, "compute_s": seconds_per_image * share, "sync_s": sync,
             "step_s": seconds_per_image * share + sync}
            for algo, sync in (("flat", 0.3), ("torus", 0.4), ("hierarchical", 0.5))]
    runs.append({"system": "raytrain_ddp", "workers": n, "repeat": 0, "grid": None,
                 "global_batch": batch, "step_s": 9.0})
    runs.append({"system": "flashtrain_torus", "workers": 1, "repeat": 0, "grid": "1x1",
                 "global_batch": share, "compute_s": 9.0, "sync_s": 0.0, "step_s": 9.0})
    path.write_text(json.dumps({"meta": {"workers": [1, n], "model": "tiny_cnn"},
                                "summary": [], "runs": runs}))


def test_fit_recovers_known_constants_from_bench_json(tmp_path):
    truth = Link(alpha=180e-6, beta=1 / 1.3e9)
    write_allreduce_json(tmp_path / "allreduce.json", truth, 4)
    write_throughput_json(tmp_path / "throughput.json", 0.0123, 4, 64)
    assert read_bench_json(str(tmp_path / "allreduce.json")) == "allreduce"
    assert read_bench_json(str(tmp_path / "throughput.json")) == "throughput"
    link, n = fit_from_bench_json(str(tmp_path / "allreduce.json"))
    assert n == 4
    assert link.alpha == pytest.approx(truth.alpha, rel=1e-6)
    assert link.beta == pytest.approx(truth.beta, rel=1e-6)
    compute = fit_compute_from_throughput_json(str(tmp_path / "throughput.json"))
    assert compute["seconds_per_image"] == pytest.approx(0.0123)


def test_a_file_from_another_tool_is_refused(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": [{"variant": "small"}]}))
    with pytest.raises(ValueError, match="neither"):
        read_bench_json(str(other))


def test_cli_fits_both_files_and_prints_old_and_new_predictions(tmp_path):
    write_allreduce_json(tmp_path / "allreduce.json", Link(200e-6, 1 / 1e9), 4)
    write_throughput_json(tmp_path / "throughput.json", 0.01, 4, 64)
    out = tmp_path / "cost.json"
    result = subprocess.run([sys.executable, "-m", "flashtrain.bench", "costmodel",
                             "--fit", str(tmp_path / "allreduce.json"),
                             "--fit", str(tmp_path / "throughput.json"), "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["fit"]["link"]["alpha"] == pytest.approx(200e-6, rel=1e-6)
    assert data["fit"]["compute"]["seconds_per_image"] == pytest.approx(0.01)
    assert {row["algo"] for row in data["fit"]["check"]} == {"flat", "torus", "hierarchical"}
    assert "(no ovl)" in result.stdout and "91.62%" in result.stdout
    assert "inter_alpha" in result.stdout and "tuning.cc" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "flashtrain.bench", "costmodel", "--fit",
                          str(tmp_path / "missing.json")], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "missing.json" in bad.stderr and "Traceback" not in bad.stderr


def test_fit_never_returns_a_negative_term():
    # Time growing faster than the size (a loaded machine) pulls the unconstrained
    # intercept below zero; the fit keeps it at zero and fits the slope alone.
    points = [(4, 4e6, 0.010), (4, 16e6, 0.062), (4, 100e6, 0.443)]
    link = fit_alpha_beta(points)
    assert link.alpha == 0.0 and link.beta > 0
    slope_terms = [(2 * 3 / 4 * s, t) for _, s, t in points]
    assert link.beta == pytest.approx(sum(b * t for b, t in slope_terms) / sum(b * b for b, _ in slope_terms))
