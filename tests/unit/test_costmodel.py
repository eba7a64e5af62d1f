"""The alpha-beta model of ring, torus and hierarchical all-reduce (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtrain.costmodel import (
    ABCI,
    Cluster,
    Link,
    fit_alpha_beta,
    hierarchical_cost,
    predict_abci,
    ring_cost,
    torus_cost,
)

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
        prediction = predict_abci(gpus, ABCI)
        times = prediction["allreduce_s"]
        assert times["torus"] < times["ring"]
        assert all(0 < e < 1 for e in prediction["scaling_efficiency"].values())
    assert predict_abci(1088)["paper"] == {"scaling_efficiency": 0.9162}
