"""Mixed precision that every worker agrees on: a dynamic loss scale for fp16.

fp16 gradients overflow; the usual cure (``torch.amp.GradScaler``) multiplies the loss by
a large scale, unscales the gradients before the update, skips the update and halves the
scale when any gradient is inf or NaN, and doubles the scale after a run of good steps.
On a grid that decision must be the same on every worker, or the replicas drift apart
for good. A summed all-reduce of the gradients usually spreads an inf to every rank, but
"usually" is not a guarantee the optimizer can rest on, so :meth:`LossScaler.step` makes
it explicit: after the gradient sync each rank checks its (reduced, unscaled) gradients
and the grid sums the overflow flag; every rank then skips or steps, and moves its scale,
the same way.

Why not ``GradScaler`` itself: its ``step`` refuses an optimizer for which ``scale()`` was
never called in the iteration (a rank whose share of a tiny tail step is empty, or a
replacement fresh from a commit), its ``update`` refuses a scale it has not lazily
created yet, and its skip decision is local. :class:`LossScaler` keeps the same state
(its :meth:`~LossScaler.state_dict` has ``GradScaler``'s keys, so commits and
checkpoints carry it, and older checkpoints load) with no lazy parts.

bf16 has fp32's exponent range: it needs no scale, and the scaler is disabled for it.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from flashtrain import collective


class LossScaler:
    """Dynamic fp16 loss scale with a grid-wide skip decision (module docstring)."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval >= 1):
            raise ValueError("need growth_factor > 1, 0 < backoff_factor < 1 and "
                             "growth_interval >= 1")
        self.enabled = enabled
        self.scale_value = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.growth_tracker = 0  # good steps in a row since the scale last moved
        self.skipped_steps = 0
        self._armed_nonfinite: set[int] = set()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current scale (``loss`` itself when disabled)."""
        return loss * self.scale_value if self.enabled else loss

    def step(self, optimizer: torch.optim.Optimizer, comm: collective.GridComm | None = None,
             global_step: int | None = None) -> bool:
        """Unscale the gradients of ``optimizer``, agree over ``comm``'s grid whether any
        rank saw an inf or NaN, then step (or skip) and update the scale. Returns whether
        the optimizer stepped. Every rank of the grid must call it, in the same step."""
        if not self.enabled:
            optimizer.step()
            return True
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        found_inf = self._unscale(grads)
        if global_step in self._armed_nonfinite:
            found_inf.fill_(1.0)  # fault injection: this rank alone saw an overflow
        if comm is not None and comm.grid.num_workers > 1:
            collective.allreduce_(found_inf, comm, algorithm="flat", op="sum")
        overflow = bool(found_inf.item() > 0)
        if not overflow:
            optimizer.step()
        self._update(overflow)
        return not overflow

    def _unscale(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Divide ``grads`` by the scale in place; the flag (1 element, on the gradients'
        device) is non-zero when any of them holds an inf or NaN."""
        device = grads[0].device if grads else torch.device("cpu")
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for grad in grads:
            by_kind[(grad.device, grad.dtype)].append(grad)
        for (grad_device, _), group in by_kind.items():
            inv_scale = torch.full((1,), 1.0 / self.scale_value, dtype=torch.float32,
                                   device=grad_device)
            flag = torch.zeros(1, dtype=torch.float32, device=grad_device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv_scale)
            found_inf += flag.to(device)
        return found_inf

    def _update(self, overflow: bool) -> None:
        if overflow:
            self.scale_value *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped_steps += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale_value *= self.growth_factor
            self.growth_tracker = 0

    def arm_nonfinite(self, global_step: int) -> None:
        """Fault injection for tests: at ``global_step`` this rank reports an overflow,
        after the gradient sync (so only the explicit agreement can spread it)."""
        self._armed_nonfinite.add(global_step)

    def state_dict(self) -> dict:
        """``GradScaler``'s keys (empty when disabled, as ``GradScaler`` does)."""
        if not self.enabled:
            return {}
        return {"scale": self.scale_value, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.scale_value = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.growth_tracker = int(state["_growth_tracker"])
