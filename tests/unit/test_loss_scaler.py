"""The fp16 loss scale (flashtrain.train.amp.LossScaler) in one process, no Ray: the
update is the textbook one on unscaled gradients, an overflow skips the step and halves
the scale, good steps grow it, and its state is GradScaler's."""

from __future__ import annotations

import pytest
import torch

from flashtrain.train.amp import LossScaler


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def loss_of(model) -> torch.Tensor:
    torch.manual_seed(1)
    return model(torch.randn(8, 4)).square().mean()


def test_a_scaled_step_equals_the_unscaled_reference():
    model, optimizer = model_and_optimizer()
    reference, ref_optimizer = model_and_optimizer()
    scaler = LossScaler(enabled=True, init_scale=2.0**10)
    scaler.scale(loss_of(model)).backward()
    assert scaler.step(optimizer)
    loss_of(reference).backward()
    ref_optimizer.step()
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)
    assert scaler.state_dict()["_growth_tracker"] == 1


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_an_overflow_skips_the_step_and_halves_the_scale(bad):
    model, optimizer = model_and_optimizer()
    scaler = LossScaler(enabled=True, init_scale=256.0)
    scaler.scale(loss_of(model)).backward()
    model.weight.grad[0, 0] = bad
    before = [p.detach().clone() for p in model.parameters()]
    assert not scaler.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.scale_value == 128.0 and scaler.skipped_steps == 1
    assert not optimizer.state  # not even momentum buffers: the step never happened


def test_an_armed_step_reports_an_overflow_with_finite_gradients():
    model, optimizer = model_and_optimizer()
    scaler = LossScaler(enabled=True, init_scale=64.0)
    scaler.arm_nonfinite(3)
    scaler.scale(loss_of(model)).backward()
    assert scaler.step(optimizer, global_step=2)
    optimizer.zero_grad()
    scaler.scale(loss_of(model)).backward()
    assert not scaler.step(optimizer, global_step=3)
    assert scaler.scale_value == 32.0


def test_the_scale_grows_after_a_run_of_good_steps():
    model, optimizer = model_and_optimizer()
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=3)
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale(loss_of(model)).backward()
        assert scaler.step(optimizer)
    assert scaler.scale_value == 16.0 and scaler.growth_tracker == 0


def test_zero_gradients_step_without_a_scale_call():
    """A rank whose share is empty never called scale(): it steps like the others
    (GradScaler.step raises "No inf checks were recorded" here)."""
    model, optimizer = model_and_optimizer()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    scaler = LossScaler(enabled=True)
    assert scaler.step(optimizer)
    assert scaler.growth_tracker == 1


def test_state_is_gradscalers_and_round_trips():
    scaler = LossScaler(enabled=True, init_scale=512.0, growth_interval=7)
    scaler.growth_tracker = 5
    fresh = LossScaler(enabled=True)
    fresh.load_state_dict(scaler.state_dict())
    assert fresh.state_dict() == scaler.state_dict()
    assert set(scaler.state_dict()) == set(torch.amp.GradScaler("cpu").state_dict())
    from_torch = LossScaler(enabled=True)
    from_torch.load_state_dict(torch.amp.GradScaler("cpu", init_scale=4.0).state_dict())
    assert from_torch.scale_value == 4.0


def test_disabled_is_a_plain_step():
    model, optimizer = model_and_optimizer()
    scaler = LossScaler(enabled=False)
    loss = loss_of(model)
    assert scaler.scale(loss) is loss
    loss.backward()
    assert scaler.step(optimizer) and scaler.state_dict() == {}
