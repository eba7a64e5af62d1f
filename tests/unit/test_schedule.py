import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtrain.config import PhaseConfig, ScheduleConfig
from flashtrain.schedule import (
    batch_scale,
    global_batch_at,
    learning_rate,
    loss_weights,
    phase_at,
    split_batch,
)


def two_phase(ramp=0.5, decay="cosine"):
    return ScheduleConfig(
        epochs=10,
        phases=(PhaseConfig(start_epoch=0, global_batch=256),
                PhaseConfig(start_epoch=4, global_batch=1024, grid="2x4")),
        base_lr=0.1, base_batch=256, warmup_epochs=1, warmup_start_factor=0.1,
        batch_ramp_epochs=ramp, decay=decay,
    )


def test_batch_follows_phases():
    schedule = two_phase()
    assert [global_batch_at(schedule, e) for e in range(10)] == [256] * 4 + [1024] * 6
    assert phase_at(schedule, 5).grid == "2x4"


def test_warmup_starts_low_and_reaches_linear_scaled_peak():
    schedule = two_phase(decay="none")
    assert learning_rate(schedule, 0.0) == pytest.approx(0.01)
    assert learning_rate(schedule, 0.5) == pytest.approx(0.055)
    assert learning_rate(schedule, 2.0) == pytest.approx(0.1)
    # After the ramp, linear scaling: 4x the batch, 4x the LR.
    assert learning_rate(schedule, 6.0) == pytest.approx(0.4)


@pytest.mark.parametrize("decay", ["poly", "cosine", "none"])
@given(eps=st.floats(1e-9, 1e-6))
def test_lr_is_continuous_across_phase_boundary(decay, eps):
    schedule = two_phase(decay=decay)
    before, after = learning_rate(schedule, 4 - eps), learning_rate(schedule, 4 + eps)
    assert after == pytest.approx(before, rel=1e-4)


def test_zero_ramp_jumps():
    schedule = two_phase(ramp=0)
    assert batch_scale(schedule, 4.0) == 4.0
    assert batch_scale(schedule, 3.999) == 1.0


@given(st.floats(0, 10))
def test_lr_is_positive_and_bounded(position):
    schedule = two_phase(decay="poly")
    lr = learning_rate(schedule, position)
    assert 0 <= lr <= 0.4 + 1e-12


def test_cosine_ends_at_zero_and_step_decays():
    assert learning_rate(two_phase(), 10.0) == pytest.approx(0.0, abs=1e-12)
    step = ScheduleConfig(epochs=9, phases=(PhaseConfig(start_epoch=0, global_batch=256),),
                          warmup_epochs=0, decay="step", step_milestones=(3, 6), step_gamma=0.1)
    assert [round(learning_rate(step, e), 6) for e in (0, 3, 6)] == [0.1, 0.01, 0.001]


@given(st.integers(0, 5000), st.integers(1, 64))
def test_split_batch_covers_and_is_balanced(batch, workers):
    shares = split_batch(batch, workers)
    assert len(shares) == workers and sum(shares) == batch
    assert max(shares) - min(shares) <= 1


@given(st.integers(1, 5000), st.integers(1, 64))
def test_loss_weights_sum_to_one(batch, workers):
    weights = loss_weights(batch, workers)
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
    assert all(w >= 0 for w in weights)


def test_weighted_local_means_equal_the_global_mean():
    # Per-sample "losses" 0..9 over 3 workers (shares 4, 3, 3).
    losses = list(range(10))
    shares = split_batch(10, 3)
    local_means, start = [], 0
    for share in shares:
        chunk = losses[start:start + share]
        local_means.append(sum(chunk) / len(chunk))
        start += share
    weighted = sum(w * m for w, m in zip(loss_weights(10, 3), local_means, strict=True))
    assert weighted == pytest.approx(sum(losses) / 10)
    # The naive average of local means differs when shares are uneven.
    assert sum(local_means) / 3 != pytest.approx(sum(losses) / 10)
