"""The training clock: epoch, step, data cursor, global batch, learning rate and the
samples consumed per epoch.

:class:`TrainingClock` is pure (no Ray); :class:`ScheduleActor` is the one Ray actor
that owns it during a run, the single authority the driver and workers take the
current global batch and learning rate from. Because every position is expressed in
samples of the epoch's permutation, the clock does not care how many workers there
are: a resize or a rollback only moves the clock back to a committed state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import ray

from flashtrain.config import ScheduleConfig
from flashtrain.schedule import global_batch_at, learning_rate, phase_at
from flashtrain.sharding import step_batch

if TYPE_CHECKING:
    from flashtrain.train.decode import SkippedSample


@dataclass(frozen=True)
class StepPlan:
    """Everything a worker needs to run one global step the same way as its peers."""

    global_step: int
    epoch: int
    cursor: int
    batch: int  # samples in this step (the epoch's last step may fold in the tail)
    global_batch: int  # the schedule's global batch for this epoch
    lr: float
    num_samples: int
    seed: int
    min_tail: int
    phase_grid: str | None

    @property
    def end_of_epoch(self) -> bool:
        return self.cursor + self.batch >= self.num_samples


@dataclass(frozen=True)
class StepResult:
    """What one worker reports for one step (sums, so the driver can add them up). It
    lives beside :class:`StepPlan` (no torch here): the driver and light test workers
    exchange both."""

    global_step: int
    rank: int
    samples: int  # samples trained on: this rank's share less the skipped ones
    loss_sum: float
    correct: int
    compute_s: float
    sync_s: float
    skipped: tuple[SkippedSample, ...] = ()  # this rank's samples whose image would not decode
    # The step's split: waiting for this rank's batch; waiting after the backward for the
    # gradient all-reduce (what overlapping with the backward did not hide). ``compute_s``
    # is forward, backward and optimizer; ``sync_s`` the collectives' own time.
    data_wait_s: float = 0.0
    comm_exposed_s: float = 0.0
    # Set by train_window: the step's seconds on this worker and when it ended (unix time).
    seconds: float | None = None
    finished_at: float | None = None
    # Set on a window's last step when the window committed (elastic.check_replicas): the
    # digest of each distinct replica and the ranks that hold it (one entry when they agree).
    replicas: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass
class TrainingClock:
    """Position of the run. ``samples_per_epoch[e]`` counts the samples trained on in
    epoch ``e``; with exactly-once sharding it ends equal to the dataset size."""

    num_samples: int
    seed: int
    min_tail: int
    epoch: int = 0
    cursor: int = 0
    global_step: int = 0
    samples_per_epoch: list[int] = field(default_factory=list)

    def position(self) -> float:
        """Training position in epochs (float)."""
        return self.epoch + self.cursor / self.num_samples

    def plan(self, schedule: ScheduleConfig) -> StepPlan:
        """The next step, from the schedule at the current position."""
        nominal = global_batch_at(schedule, self.epoch)
        batch = step_batch(self.cursor, self.num_samples, nominal, self.min_tail)
        return StepPlan(
            global_step=self.global_step,
            epoch=self.epoch,
            cursor=self.cursor,
            batch=batch,
            global_batch=nominal,
            lr=learning_rate(schedule, self.position()),
            num_samples=self.num_samples,
            seed=self.seed,
            min_tail=self.min_tail,
            phase_grid=phase_at(schedule, self.epoch).grid,
        )

    def advance(self, plan: StepPlan) -> None:
        """Record that ``plan`` was trained on by every worker."""
        if (plan.global_step, plan.epoch, plan.cursor) != (self.global_step, self.epoch, self.cursor):
            raise ValueError(f"step {plan.global_step} does not start at the clock's position "
                             f"(step {self.global_step}, epoch {self.epoch}, cursor {self.cursor})")
        while len(self.samples_per_epoch) <= self.epoch:
            self.samples_per_epoch.append(0)
        self.samples_per_epoch[self.epoch] += plan.batch
        self.global_step += 1
        self.cursor += plan.batch
        if self.cursor >= self.num_samples:
            self.epoch += 1
            self.cursor = 0

    def state_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

    def load_state_dict(self, state: dict) -> None:
        for key, value in copy.deepcopy(state).items():
            setattr(self, key, value)


def plan_window(clock_state: dict, schedule: ScheduleConfig, ends_after: Callable[[StepPlan], bool],
                starts_apart: Callable[[StepPlan], bool] = lambda plan: False,
                max_steps: int | None = None) -> list[StepPlan]:
    """The plans of the steps from ``clock_state`` up to the next boundary: the run the
    workers can train on their own, in one call, without the driver in between.

    Pure: it advances a copy of the clock. The window ends after the first plan for which
    ``ends_after(plan)`` holds (a commit, checkpoint or epoch boundary), before the first
    later plan for which ``starts_apart(plan)`` holds (a step the driver must act before,
    such as an injected fault), at the end of training, or before global step
    ``max_steps``. The first plan is always included (unless training is over), so a
    window makes progress. Applying :meth:`TrainingClock.advance` to the returned plans in
    order reproduces the per-step loop exactly.
    """
    clock = TrainingClock(**copy.deepcopy(clock_state))
    plans: list[StepPlan] = []
    while clock.epoch < schedule.epochs:
        plan = clock.plan(schedule)
        if max_steps is not None and plan.global_step >= max_steps:
            break
        if plans and starts_apart(plan):
            break
        plans.append(plan)
        clock.advance(plan)
        if ends_after(plan):
            break
    return plans


class ScheduleKeeper:
    """The single authority on the training clock during a run (as a Ray actor:
    :data:`ScheduleActor`; the simulator keeps it in its own process).

    It keeps the live clock and the last committed copy, so the elastic controller can
    roll the clock back to the same commit the workers roll back to.
    """

    def __init__(self, schedule: ScheduleConfig, clock_state: dict):
        self._schedule = schedule
        self._clock = TrainingClock(**clock_state)
        self._committed = self._clock.state_dict()

    def advance_window(self, plans: list[StepPlan]) -> dict:
        """Record a whole window of steps trained by every worker (one call per window).
        All or nothing: a plan out of place leaves the clock where it was."""
        before = self._clock.state_dict()
        try:
            for plan in plans:
                self._clock.advance(plan)
        except ValueError:
            self._clock.load_state_dict(before)
            raise
        return self._clock.state_dict()

    def commit(self) -> dict:
        self._committed = self._clock.state_dict()
        return self._committed

    def rollback(self) -> dict:
        self._clock.load_state_dict(self._committed)
        return self._clock.state_dict()

    def state(self) -> dict:
        return self._clock.state_dict()


ScheduleActor = ray.remote(num_cpus=0, max_restarts=0)(ScheduleKeeper)
