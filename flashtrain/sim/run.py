"""One simulated run: the real driver loop and controller over simulated members, and
the invariants checked after it.

:class:`SimTrainer` is the product's :class:`~flashtrain.driver.trainer.Trainer` (its
loop, windows, recovery, validation and checkpoint cadence, records) with three things
swapped: the worker group (:class:`~flashtrain.sim.group.SimWorkerGroup`), the dataset
(only its size matters here) and the durable checkpoint store (kept in memory).
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from flashtrain.config import FlashtrainConfig, load_config
from flashtrain.driver.trainer import Trainer
from flashtrain.elastic.errors import ElasticAbort, ReplicasDiverged
from flashtrain.sim.costs import PAPER, SimCosts
from flashtrain.sim.faults import FaultPlan, schedule_for
from flashtrain.sim.group import DriverKilled, SimHung, SimWorkerGroup
from flashtrain.sim.spares import PlacementInfeasible
from flashtrain.topology import Grid

PING_S = 5.0  # the controller's ping timeout (elastic.controller._PING_TIMEOUT_S)
STEPS_PER_EPOCH = 12
PER_WORKER_BATCH = 2


class SimTrainer(Trainer):
    """The real trainer with simulated data and an in-memory checkpoint store."""

    def __init__(self, config: FlashtrainConfig, run_dir: Path, group: SimWorkerGroup,
                 num_samples: int, saved: dict[int, dict] | None = None):
        self.num_samples = num_samples
        # The durable checkpoints: a resumed driver (``saved`` given) finds those of the
        # one that was killed, and nothing else of it.
        self.saved: dict[int, dict] = {} if saved is None else saved
        self.window_cpu_s, self.windows = 0.0, 0
        super().__init__(config, run_dir, run_dir, say=group.log, group=group,
                         resume=saved is not None)

    def _train_window(self, plans, commit):
        """The real window call, with the driver's own CPU for it counted (the
        simulated members' work left out)."""
        began, members = time.process_time(), self.group.window.cpu_s
        try:
            return super()._train_window(plans, commit)
        finally:
            self.window_cpu_s += (time.process_time() - began) - (self.group.window.cpu_s - members)
            self.windows += 1

    def _datasets(self):
        return SimpleNamespace(train=range(self.num_samples), val=range(16), skipped_files=0)

    def _write_outputs(self, summary: dict) -> None:
        self.metrics.close()

    def _save_checkpoint(self, step: int, payload: dict) -> Path:
        self.saved[step] = payload
        for old in sorted(self.saved)[:-self.config.checkpoint.keep]:
            del self.saved[old]
        return Path(f"sim-checkpoint-{step}")

    def _latest_checkpoint(self) -> Path | None:
        return Path(f"sim-checkpoint-{max(self.saved)}") if self.saved else None

    def _load_checkpoint(self, path: Path) -> dict:
        return self.saved[int(path.name.rsplit("-", 1)[1])]


@lru_cache(maxsize=64)
def sim_config(grid: Grid, overrides: tuple[str, ...] = (), epochs: int = 2,
               steps_per_epoch: int = STEPS_PER_EPOCH) -> tuple[FlashtrainConfig, int]:
    """The config of a simulated run on ``grid`` and its dataset size: ``epochs`` of
    ``steps_per_epoch`` steps and a tail, the project's commit cadence, checkpoints
    every 10 steps."""
    workers = grid.num_workers
    batch = workers * PER_WORKER_BATCH
    num_samples = batch * steps_per_epoch + workers * 3 + 1
    config = load_config(None, [
        f"grid.shape={grid}", "runtime.progress=false", "runtime.log_every_steps=1000000",
        f"schedule.epochs={epochs}", "schedule.warmup_epochs=0", "data.source=synthetic",
        f"data.synthetic_samples={num_samples}", "checkpoint.every_steps=10",
        f"schedule.phases=[{{start_epoch: 0, global_batch: {batch}}}]", *overrides])
    return config, num_samples


def recovery_bound_s(config: FlashtrainConfig, costs: SimCosts, grid: Grid) -> float:
    """The virtual time a recovery may take, from the controller's first act to the end
    of the first step after: the failed window's calls settle (at most the collective
    timeout and a ping), the survivors are pinged, the grid waits (bounded) for
    resources when too few are left, newcomers load the commit, the grid forms, and a
    window runs."""
    window = config.elastic.commit_every_steps * (costs.step_compute_s + costs.allreduce_s(grid))
    return (config.collective.timeout_s + 2 * PING_S + config.elastic.wait_for_resources_s
            + costs.process_start_s + 3 * costs.handover_s + costs.form_s(grid.num_workers)
            + window + costs.commit_s + 1.0)


@dataclass
class SimRecord:
    """What one seed did and which invariants held."""

    seed: int
    grid: str
    faults: list[str]
    invariants: dict[str, bool] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    recoveries: list[dict] = field(default_factory=list)
    outcome: str = ""
    virtual_s: float = 0.0
    steps: int = 0
    final_grid: str = ""
    driver_cpu_s: float = 0.0  # the driver loop's and controller's own (members' left out)
    driver_cpu_per_window_s: float = 0.0
    # Per driver kill: when, the clock's live and committed steps then, the checkpoint
    # the run resumed from, and the steps it redid (committed ones among them).
    driver_kills: list[dict] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "trace"}


def run_seed(seed: int, grid: Grid, faults_per_run: int = 2, costs: SimCosts = PAPER,
             overrides: tuple[str, ...] = (), horizon_s: float = 7200.0,
             keep_trace: bool = True, epochs: int = 2,
             steps_per_epoch: int = STEPS_PER_EPOCH, plan: FaultPlan | None = None) -> SimRecord:
    """Simulate seed ``seed`` on ``grid`` and check the invariants (``plan``: these
    faults instead of the seed's)."""
    config, num_samples = sim_config(grid, tuple(overrides), epochs, steps_per_epoch)
    plan = plan if plan is not None else FaultPlan(schedule_for(seed, faults_per_run))
    return run_config(config, num_samples, grid, costs, plan, seed=seed, horizon_s=horizon_s,
                      keep_trace=keep_trace)


def run_config(config: FlashtrainConfig, num_samples: int, grid: Grid, costs: SimCosts,
               plan: FaultPlan, *, seed: int = 0, horizon_s: float = 7200.0,
               keep_trace: bool = True, nodes: int | None = None) -> SimRecord:
    """Simulate a run of ``config`` over ``num_samples`` samples with ``plan``'s faults
    and check the invariants. The cluster has ``nodes`` nodes (default: one per row of
    ``grid``) of ``grid.cols`` worker slots each."""
    record = SimRecord(seed, str(grid), [f.describe() for f in plan.faults])
    group = SimWorkerGroup(config, costs, plan, nodes=nodes or grid.rows, slots=grid.cols,
                           horizon_s=horizon_s, trace=keep_trace)
    group.log(f"seed {seed} grid {grid} faults {record.faults}")
    cpu = time.process_time()
    with tempfile.TemporaryDirectory(prefix="flashtrain-sim-") as run_dir:
        trainer = SimTrainer(config, Path(run_dir), group, num_samples)
        try:
            while True:
                try:
                    trainer.train()
                    break
                except DriverKilled:
                    trainer, group = _resume(trainer, group, record, config, costs, num_samples)
                except PlacementInfeasible:
                    if not record.driver_kills or not group.spares.returns:
                        raise
                    # The resumed driver found too few nodes: its user resumes once the
                    # capacity on its way is back.
                    group.advance(max(at for at, _ in group.spares.returns))
                    trainer = SimTrainer(config, trainer.run_dir, group, num_samples,
                                         saved=trainer.saved)
            record.outcome = "finished"
        except ReplicasDiverged as err:  # the real check found what check_commit looks for
            record.outcome = f"aborted: {err}".splitlines()[0]
            group.violations.append(str(err))
        except (ElasticAbort, PlacementInfeasible) as err:
            record.outcome = f"aborted: {err}".splitlines()[0]
        except SimHung as err:
            record.outcome = f"hung: {err}"
        except Exception as err:  # noqa: BLE001 - any other end is a finding
            record.outcome = f"crashed: {type(err).__name__}: {err}".splitlines()[0]
            group.log(record.outcome)
            if group.lines is not None:
                group.lines += traceback.format_exc().splitlines()
        finally:
            trainer.metrics.close()
    record.driver_cpu_s = time.process_time() - cpu - group.window.cpu_s
    record.driver_cpu_per_window_s = trainer.window_cpu_s / max(trainer.windows, 1)
    record.virtual_s = group.t
    record.recoveries = [{k: r[k] for k in ("cause", "old_grid", "new_grid", "failed_step",
                                            "resume_step", "recovery_seconds", "time")}
                         for r in trainer.controller.reforms] if trainer.controller else []
    record.final_grid = str(trainer.controller.state.grid) if trainer.controller else ""
    check(record, trainer, group, config, costs, grid, num_samples)
    record.trace = group.lines or []
    return record


def _resume(trainer: SimTrainer, group: SimWorkerGroup, record: SimRecord, config,
            costs: SimCosts, num_samples: int) -> tuple[SimTrainer, SimWorkerGroup]:
    """The driver was killed: note where it was, and start a new one with ``--resume``
    a process start later, over the same run directory's checkpoints."""
    live = trainer.clock.state()["global_step"] if trainer.clock is not None else 0
    committed = trainer.controller.committed_step if trainer.controller is not None else 0
    resumed = max(trainer.saved, default=0)
    record.driver_kills.append({"time": group.t, "step": live, "committed_step": committed,
                                "resumed_from": resumed, "steps_redone": live - resumed,
                                "committed_steps_redone": committed - resumed})
    trainer.metrics.close()
    group = group.restarted(costs.process_start_s)
    resumed = SimTrainer(config, trainer.run_dir, group, num_samples, saved=trainer.saved)
    resumed.window_cpu_s, resumed.windows = trainer.window_cpu_s, trainer.windows
    return resumed, group


def check(record: SimRecord, trainer: SimTrainer, group: SimWorkerGroup,
          config: FlashtrainConfig, costs: SimCosts, grid: Grid, num_samples: int) -> None:
    """The invariants of a run; each failed one adds a violation naming it."""
    inv, bad = record.invariants, record.violations
    clock = trainer.clock.state() if trainer.clock is not None else None
    members = [m for m in (trainer.controller.state.members if trainer.controller else [])
               if m.actor.alive]
    record.steps = clock["global_step"] if clock else 0
    ended = record.outcome == "finished" or (record.outcome.startswith("aborted")
                                             and _abort_allowed(record.outcome, group, config, grid))
    inv["run_ends"] = ended
    if not ended:
        bad.append(f"run_ends: {record.outcome}")
    if record.outcome.startswith("aborted") and members:
        # A run that gives up with a member alive leaves its last commit on disk, to
        # resume from.
        committed = trainer.controller.committed_step
        inv["last_commit_saved"] = max(trainer.saved, default=None) == committed
        if not inv["last_commit_saved"]:
            bad.append(f"last_commit_saved: the newest checkpoint is step "
                       f"{max(trainer.saved, default=None)}, the last commit step {committed}")
    inv["replicas_identical_at_commits"] = not group.violations
    bad += [f"replicas_identical_at_commits: {v}" for v in group.violations]
    if record.outcome != "finished" or not members:
        return
    model = members[0].actor.model
    chain = model.chain()
    inv["clock_agrees"] = model.depth == clock["global_step"] and \
        [link.step for link in chain] == list(range(len(chain)))
    if not inv["clock_agrees"]:
        bad.append(f"clock_agrees: clock at step {clock['global_step']}, the model holds "
                   f"{model.depth} steps")
    per_epoch: dict[int, list[np.ndarray]] = {}
    for link in chain:
        per_epoch.setdefault(link.epoch, []).append(link.ids)
    once = True
    for epoch in range(clock["epoch"]):
        ids = np.sort(np.concatenate(per_epoch.get(epoch, [np.zeros(0, dtype=np.int64)])))
        if len(ids) != num_samples or not np.array_equal(ids, np.arange(num_samples)):
            once = False
            bad.append(f"exactly_once: epoch {epoch} trained {len(ids)} samples, "
                       f"{len(np.unique(ids))} distinct, of {num_samples}")
    inv["exactly_once"] = once
    digests = {link.depth: link.digest for link in chain}
    lost = [(s, d) for s, d in group.commits_seen if digests.get(s, d) != d or s > model.depth]
    inv["no_committed_step_lost"] = not lost
    if lost:
        bad.append(f"no_committed_step_lost: commits {lost[:3]} are not in the final model")
    # A driver kill loses what was committed after the newest durable checkpoint (it is
    # redone, not lost); checkpoints come every checkpoint.every_steps steps.
    redo = [k["committed_steps_redone"] for k in record.driver_kills]
    inv["driver_kill_redoes_at_most_a_checkpoint_interval"] = all(
        0 <= r <= config.checkpoint.every_steps for r in redo)
    if not inv["driver_kill_redoes_at_most_a_checkpoint_interval"]:
        bad.append(f"driver_kill_redoes_at_most_a_checkpoint_interval: {redo} committed "
                   f"step(s) redone, checkpoints every {config.checkpoint.every_steps}")
    bound = recovery_bound_s(config, costs, grid)
    slow = [r for r in record.recoveries
            if r["recovery_seconds"] is not None and r["recovery_seconds"] > bound]
    inv["recovery_bounded"] = not slow
    if slow:
        bad.append(f"recovery_bounded: {[round(r['recovery_seconds'], 1) for r in slow]} s "
                   f"> {bound:.1f} s")
    grew = record.final_grid == str(grid) or group.plan.capacity_lost_for_good or \
        _too_late_to_grow(record, config, costs, grid, group.t)
    inv["grows_back"] = grew
    if not grew:
        bad.append(f"grows_back: the run ended on {record.final_grid}, below {grid}, with "
                   "capacity back")


def _abort_allowed(outcome: str, group: SimWorkerGroup, config: FlashtrainConfig,
                   grid: Grid) -> bool:
    """An abort is a correct end only for too few workers after a node left (its
    capacity never returned, or not within ``elastic.wait_for_resources_s`` and a
    process start: the controller waited as configured and said why), for any loss
    where the configuration allows none (``elastic.enabled`` false, or
    ``elastic.min_workers`` the whole grid), or for a death in each of the trainer's
    attempts at re-forming."""
    fired = [f for _, f in group.plan.fired]
    nodes_left = any(f.kind in ("node", "lost_node") for f in fired)
    if group.plan.capacity_lost_for_good and "the cluster cannot hold" in outcome:
        return True  # a driver resumed after a node left for good: the grid cannot start
    if nodes_left and "min_workers" in outcome and "waited" in outcome:
        return True
    if fired and not config.elastic.enabled and "elastic.enabled is false" in outcome:
        return True
    whole_grid = f"elastic.min_workers={grid.num_workers}"
    if fired and config.elastic.min_workers == grid.num_workers and whole_grid in outcome:
        return True
    # The trainer gives a re-form 3 attempts: a death in each of them ends the run.
    in_recovery = sum(f.kind in ("forming", "second") for _, f in group.plan.fired)
    in_recovery += sum(f.kind == "second" for _, f in group.plan.fired)
    return "could not re-form the grid in 3 attempts" in outcome and in_recovery >= 3


def _too_late_to_grow(record: SimRecord, config, costs: SimCosts, grid: Grid,
                      end: float) -> bool:
    """The last shrink came too close to the run's end for a replacement to start and
    join at a commit boundary."""
    shrinks = [r for r in record.recoveries if r["new_grid"] != str(grid)]
    if not shrinks:
        return False
    window = config.elastic.commit_every_steps * (costs.step_compute_s + costs.allreduce_s(grid))
    slack = costs.process_start_s + 60.0 + config.collective.timeout_s + 2 * window + 30.0
    return shrinks[-1]["time"] + slack > end
