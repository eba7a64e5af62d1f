"""Batch-size control, learning rate and the split of a global batch over workers.

Pure code: no Ray, no torch. Training positions are measured in epochs as a float
(``epoch + samples_done_in_epoch / dataset_size``), so every function here is
independent of how many workers there are: a resize changes who computes a step, never
what the step is.

The learning rate at a position is::

    lr = base_lr * batch_scale(pos) * warmup(pos) * decay(pos)

``batch_scale`` is the linear-scaling rule (Goyal et al.): the global batch of the
current phase over ``base_batch``. When a phase raises the batch, the scale moves
linearly from the old to the new value over ``batch_ramp_epochs`` (a short re-warm-up
for the bigger batch), which keeps the learning rate continuous across the boundary.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from flashtrain.config import ScheduleConfig


@dataclass(frozen=True)
class PhaseInfo:
    """The batch-size phase in force at a position."""

    index: int
    start_epoch: int
    global_batch: int
    grid: str | None


def phase_at(schedule: ScheduleConfig, epoch: int) -> PhaseInfo:
    """The phase that governs (whole) epoch ``epoch``."""
    starts = [p.start_epoch for p in schedule.phases]
    index = max(bisect.bisect_right(starts, epoch) - 1, 0)
    phase = schedule.phases[index]
    return PhaseInfo(index, phase.start_epoch, phase.global_batch, phase.grid)


def global_batch_at(schedule: ScheduleConfig, epoch: int) -> int:
    """Global batch size of epoch ``epoch`` (batch size changes only at epoch starts)."""
    return phase_at(schedule, epoch).global_batch


def batch_scale(schedule: ScheduleConfig, position: float) -> float:
    """Linear-scaling factor ``global_batch / base_batch`` at ``position``, ramped
    across phase boundaries over ``batch_ramp_epochs``."""
    phase = phase_at(schedule, math.floor(position))
    scale = phase.global_batch / schedule.base_batch
    ramp = schedule.batch_ramp_epochs
    into_phase = position - phase.start_epoch
    if phase.index == 0 or ramp <= 0 or into_phase >= ramp:
        return scale
    previous = schedule.phases[phase.index - 1].global_batch / schedule.base_batch
    return previous + (scale - previous) * (into_phase / ramp)


def warmup_factor(schedule: ScheduleConfig, position: float) -> float:
    """Linear warm-up from ``warmup_start_factor`` to 1 over ``warmup_epochs``."""
    if schedule.warmup_epochs <= 0 or position >= schedule.warmup_epochs:
        return 1.0
    start = schedule.warmup_start_factor
    return start + (1.0 - start) * position / schedule.warmup_epochs


def decay_factor(schedule: ScheduleConfig, position: float) -> float:
    """Decay over the whole run: ``poly`` (power ``poly_power``), ``cosine``, ``step``
    (times ``step_gamma`` at each of ``step_milestones``) or ``none``."""
    progress = min(max(position / schedule.epochs, 0.0), 1.0)
    if schedule.decay == "poly":
        return (1.0 - progress) ** schedule.poly_power
    if schedule.decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule.decay == "step":
        passed = bisect.bisect_right(sorted(schedule.step_milestones), position)
        return schedule.step_gamma**passed
    return 1.0


def learning_rate(schedule: ScheduleConfig, position: float) -> float:
    """Learning rate at training position ``position`` (in epochs)."""
    return (
        schedule.base_lr
        * batch_scale(schedule, position)
        * warmup_factor(schedule, position)
        * decay_factor(schedule, position)
    )


def split_batch(batch: int, num_workers: int) -> list[int]:
    """Per-worker shares of ``batch`` samples over ``num_workers`` workers.

    The first ``batch % num_workers`` workers take one sample more. Shares may be zero
    only when ``batch < num_workers``.
    """
    if num_workers < 1:
        raise ValueError("num_workers must be >= 1")
    if batch < 0:
        raise ValueError("batch must be >= 0")
    base, extra = divmod(batch, num_workers)
    return [base + (1 if rank < extra else 0) for rank in range(num_workers)]


def loss_weights(batch: int, num_workers: int) -> list[float]:
    """Weight of each worker's *mean* local loss so that the **sum** of the weighted
    gradients over workers equals the gradient of the mean loss over the whole batch.

    Worker ``r`` with ``b_r`` samples gets ``b_r / batch``; the weights sum to one.
    (An average all-reduce of unweighted local means would give every worker the same
    say, which is wrong as soon as the shares differ.)
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    return [share / batch for share in split_batch(batch, num_workers)]
