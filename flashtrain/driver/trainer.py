"""The driver's training loop: place the grid, train, validate, checkpoint, report.

``Trainer.train()`` reads like the run: start (or resume) -> loop over steps -> at
epoch ends validate -> checkpoint -> summary and plots. Membership changes are handed
to the elastic controller (:mod:`flashtrain.elastic.controller`), which re-forms the
grid and returns; the loop itself never special-cases a resize. Workers, the schedule
clock and time are reached only through a
:class:`~flashtrain.elastic.worker_group.WorkerGroup` (Ray actors in the product,
simulated members in :mod:`flashtrain.sim`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flashtrain.config import FlashtrainConfig
from flashtrain.driver.progress import Progress
from flashtrain.elastic.controller import ElasticController
from flashtrain.elastic.errors import ElasticAbort, GridLost, StepFailed
from flashtrain.elastic.worker_group import Clock, Member, WorkerGroup
from flashtrain.schedule import global_batch_at
from flashtrain.sharding import steps_in_epoch
from flashtrain.task import Task
from flashtrain.tasks.images import model_name, resolve_task
from flashtrain.topology import Grid
from flashtrain.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from flashtrain.train.clock import StepPlan, TrainingClock, plan_window
from flashtrain.train.data import task_datasets
from flashtrain.train.metrics import (
    MetricsWriter,
    describe_metrics,
    read_metrics,
    task_name,
    write_summary,
)
from flashtrain.train.plots import write_plots

log = logging.getLogger(__name__)

SKIPPED_FILES_LISTED = 100  # summary.json names at most this many skipped files (counts stay exact)


@dataclass
class RunTotals:
    """Running totals for the summary."""

    samples: int = 0  # samples trained on (skipped ones excluded)
    train_seconds: float = 0.0
    last_eval: dict = field(default_factory=dict)
    epochs_done: int = 0
    # Per epoch, the samples skipped because their image would not decode, by name. Sets:
    # a step redone after a rollback skips the same files again and must count them once.
    skipped: dict[int, set[str]] = field(default_factory=dict)

    def add_skipped(self, epoch: int, name: str) -> bool:
        """Record ``name`` as skipped in ``epoch``; True the first time for that epoch."""
        names = self.skipped.setdefault(epoch, set())
        if name in names:
            return False
        names.add(name)
        return True

    def skipped_names(self) -> set[str]:
        """Every file skipped in any epoch."""
        return set().union(*self.skipped.values())

    def skipped_per_epoch(self, num_epochs: int) -> list[int]:
        return [len(self.skipped.get(epoch, ())) for epoch in range(num_epochs)]

    def restore_skipped(self, records: list[dict]) -> None:
        """Rebuild ``skipped`` from a run's metrics records, for a run continued with
        ``--resume`` (the steps before its checkpoint were trained by an earlier process).
        Each ``start`` event at global step S forgets the skips logged at steps >= S:
        the resumed process redoes those steps and logs their skips again."""
        first_step: dict[tuple[int, str], int] = {}
        for record in records:
            if record.get("kind") != "event":
                continue
            if record.get("name") == "start":
                resumed_at = record.get("global_step", 0)
                first_step = {key: step for key, step in first_step.items() if step < resumed_at}
            elif record.get("name") == "skipped_sample":
                first_step.setdefault((record["epoch"], record["file"]), record["step"])
        self.skipped = {}
        for epoch, name in first_step:
            self.add_skipped(epoch, name)


def max_grid_workers(config: FlashtrainConfig, initial_workers: int) -> int:
    """The most workers the run can ever have (it sizes the epoch-tail folding)."""
    sizes = [initial_workers]
    sizes += [int(r) * int(c) for p in config.schedule.phases if p.grid
              for r, c in [p.grid.split("x")]]
    if config.grid.max_workers:
        sizes.append(config.grid.max_workers)
    return max(sizes)


def _step_split(results: list) -> dict:
    """compute / exposed communication / data wait seconds of the step's slowest rank."""
    slowest = max(results, key=lambda r: r.compute_s + r.comm_exposed_s + r.data_wait_s)
    return {"compute_seconds": slowest.compute_s,
            "comm_exposed_seconds": slowest.comm_exposed_s,
            "data_wait_seconds": slowest.data_wait_s}


def _train_accuracy(results: list, samples: int) -> dict:
    """``train_acc`` of a step, where the task counts right answers (Task.num_correct)."""
    if any(r.correct is None for r in results):
        return {}
    return {"train_acc": sum(r.correct for r in results) / max(samples, 1)}


def _as_failure(err: BaseException, step: int) -> StepFailed:
    """A failure of the grid at clock position ``step`` (a StepFailed stays as it is)."""
    return err if isinstance(err, StepFailed) else StepFailed(None, err, step=step)


def _finished_at(results: list) -> float:
    """When a step ended on every rank (unix time)."""
    return max(r.finished_at for r in results)


class Trainer:
    """Owns one run: the clock actor, the grid (through the controller), the run dir."""

    def __init__(self, config: FlashtrainConfig, run_dir: Path, task: Task | Path | None,
                 resume: bool = False, say=print, cluster=None, group: WorkerGroup | None = None):
        """``task``: what to train (:class:`flashtrain.Task`); a path or None stands for
        the config's image classifier with that digits cache (callers older than tasks)."""
        self.config = config
        self.run_dir = run_dir
        self.task = resolve_task(task, config)
        self.resume = resume
        self.say = say
        self.checkpoint_dir = run_dir / "checkpoints"
        self.totals = RunTotals()
        self.timeout = config.runtime.remote_timeout_s
        self.cluster = cluster  # an emulated multi-node cluster, for node faults
        # How the driver reaches the workers, the clock and time (default: Ray actors).
        self.group = group if group is not None else self._ray_group()
        self.metrics = MetricsWriter(run_dir, clock=self.group.wall,
                                     tensorboard=config.runtime.tensorboard)
        # Everything a member's call may raise when the grid could not finish.
        self.member_failures = (StepFailed, *self.group.failures)
        self.controller: ElasticController | None = None
        self.clock: Clock | None = None
        # What the driver is doing now (step, commit, validate, checkpoint, reform): read
        # by benchmarks that kill workers from outside, to report where each kill landed.
        self.activity = "start"
        # Set (from any thread) to end the run cleanly before this global step.
        self.stop_at_step: int | None = None

    def _ray_group(self) -> WorkerGroup:
        from flashtrain.elastic.ray_group import RayWorkerGroup  # the product's workers

        return RayWorkerGroup(self.config, self.task)

    # -- the run -------------------------------------------------------------------------

    def train(self) -> dict:
        started = self.group.now()
        datasets = self._datasets()
        num_samples = len(datasets.train)
        self.controller = ElasticController(self.config, self.group, self.metrics, self.say,
                                            cluster=self.cluster)
        state = self.controller.start()
        min_tail = self.config.data.min_samples_per_worker * max_grid_workers(
            self.config, state.grid.num_workers)
        clock_state, payload = self._initial_state(num_samples, min_tail)
        self._start_clock(clock_state)
        if payload is not None:
            self.controller.load_state(payload)
        self._take_start(durable=payload is None)
        self.metrics.event("start", grid=str(state.grid), dataset_train_size=num_samples,
                           skipped_files=datasets.skipped_files, resumed=payload is not None,
                           global_step=clock_state["global_step"])
        progress = Progress(self._total_steps(num_samples, min_tail), clock_state["global_step"],
                            enabled=self.config.runtime.progress)
        try:
            final = self._train_to_the_end(progress)
        except ElasticAbort:
            self._checkpoint_last_commit()
            raise
        finally:
            progress.close()
        summary = self._summary(datasets, num_samples, self.group.now() - started, final)
        self._write_outputs(summary)
        return summary

    # -- the step loop alone, over a grid formed elsewhere (benchmarks of the driver) --

    def adopt_grid(self, grid: Grid, members: list[Member], clock_state: dict) -> None:
        """Take ``members`` (already started and formed, e.g. the control benchmark's
        stub workers) as the grid in force, and start the clock at ``clock_state``:
        what :meth:`train_steps` needs, without forming, a start commit or checkpoints."""
        self.controller = ElasticController(self.config, self.group, self.metrics, self.say,
                                            cluster=self.cluster)
        self.controller.adopt(grid, members)
        self._start_clock(clock_state)
        self.clock.state()  # the clock's process has started

    def train_steps(self, progress: Progress | None = None) -> None:
        """The step loop alone (windows, commits, the validations and checkpoints at
        their boundaries), from the clock's position to the end of the schedule, after
        :meth:`adopt_grid`."""
        steps = self.config.runtime.max_steps or 0
        self._loop(progress or Progress(steps, self.clock.state()["global_step"],
                                        enabled=False))

    def _take_start(self, durable: bool) -> None:
        """Commit the starting state on every member and, for a fresh run, write it
        durably (if every worker is lost before the first periodic checkpoint, the run
        restarts from here). A member lost meanwhile re-forms the grid like a failed
        step, and the start is taken again, as often as ``elastic.max_reforms`` allows
        (simulation seeds 8 on 2x2 and 1364 on 3x2: a death in the first checkpoint
        crashed the run, then three in a row ended it)."""
        while True:
            try:
                self.controller.commit(self.clock)
                if durable:
                    self._checkpoint()
                return
            except self.member_failures as err:
                self._recover(_as_failure(err, step=self.clock.state()["global_step"]))

    def _datasets(self):
        """The run's datasets (only their sizes and skipped files are used here)."""
        return task_datasets(self.task)

    def _write_outputs(self, summary: dict) -> None:
        write_summary(self.run_dir, summary)
        write_plots(self.run_dir)
        self.metrics.close()

    def _start_clock(self, clock_state: dict) -> None:
        """(Re)start the schedule clock at ``clock_state`` (its committed position too)."""
        if self.clock is not None:
            self.clock.close()
        self.clock = self.group.start_clock(self.config.schedule, clock_state, self.timeout)

    def _train_to_the_end(self, progress: Progress) -> dict:
        """The step loop, then the final validation and checkpoint. A member lost in those
        re-forms the grid like a failed step and goes back to the loop (the rollback may
        have left steps to redo)."""
        while True:
            self._loop(progress)
            try:
                self.activity = "validate"
                final = self._validate(final=True)
                self.activity = "checkpoint"
                self._checkpoint()
                return final
            except self.member_failures as err:
                position = self.clock.state()["global_step"]
                self._recover(_as_failure(err, step=position))

    def close(self) -> None:
        if self.controller is not None:
            self.controller.shutdown()
        if self.clock is not None:
            self.clock.close()

    def _loop(self, progress: Progress) -> None:
        """Train window by window (see :meth:`_next_window`) until the schedule, the step
        cap or a stop request ends training; commit, validate and checkpoint at the
        boundaries the windows end on."""
        cfg = self.config
        while plans := self._next_window():
            first, last = plans[0], plans[-1]
            step_done = last.global_step + 1
            commit = step_done % cfg.elastic.commit_every_steps == 0 or last.end_of_epoch
            try:
                self.activity = "step"
                self.controller.before_step(first, self.clock)
                results = self._train_window(plans, commit)
            except self.member_failures as err:
                self._recover(self._window_failure(err, plans))
                continue
            try:
                self.clock.advance_window(plans)
                self.controller.after_step(first, finished_at=_finished_at(results[0]))
                for plan, step_results in zip(plans, results, strict=True):
                    self._record_step(plan, step_results, progress)
                if commit:  # every member committed at the end of its window
                    self.activity = "commit"
                    self.controller.members_committed(self.clock)  # may grow the grid
            except self.member_failures as err:
                # The window is trained and recorded: a member lost from here on (forming
                # a bigger grid at the commit) fails at the clock's position after it.
                self._recover(_as_failure(err, step=step_done))
                continue
            self._at_boundary(last, step_done)

    def _at_boundary(self, last: StepPlan, step_done: int) -> None:
        """Validate at an epoch's end and checkpoint at the cadence. A member lost in
        either re-forms the grid like a failed step; when the clock is still at this
        boundary after it (training state is committed at every epoch end), the part
        not done is done again on the new grid. (A checkpoint lost to a death used to be
        skipped until the next one: a driver killed before that redid twice the
        checkpoint interval, simulation seed 41 on 2x2.)"""
        todo = (["validate"] if last.end_of_epoch else []) + \
            (["checkpoint"] if step_done % self.config.checkpoint.every_steps == 0 else [])
        while todo:
            try:
                self.activity = todo[0]
                if todo[0] == "validate":
                    self._validate(epoch=last.epoch)
                else:
                    self._checkpoint()
                todo.pop(0)
            except self.member_failures as err:
                self._recover(_as_failure(err, step=step_done))
                if self.clock.state()["global_step"] != step_done:
                    return  # rolled back before the boundary: the window comes again

    def _next_window(self) -> list[StepPlan]:
        """The steps the workers train next in one call each: from the clock's position up
        to the next commit, checkpoint or epoch boundary (``runtime.step_windows``; else
        one step), ending before a step that has a fault to inject. Empty when training is
        over, at ``runtime.max_steps`` or at a requested stop."""
        cfg = self.config
        state = self.clock.state()
        stop = self.stop_at_step
        caps = [c for c in (cfg.runtime.max_steps, stop) if c is not None]
        plans = plan_window(state, cfg.schedule, ends_after=self._window_ends_after,
                            starts_apart=self._driver_acts_before,
                            max_steps=min(caps) if caps else None)
        if not plans and stop is not None and state["global_step"] >= stop \
                and state["epoch"] < cfg.schedule.epochs:
            self.say(f"stopping before step {state['global_step']}, as asked")
        return plans

    def _window_ends_after(self, plan: StepPlan) -> bool:
        if not self.config.runtime.step_windows:
            return True
        done = plan.global_step + 1
        return (plan.end_of_epoch or done % self.config.elastic.commit_every_steps == 0
                or done % self.config.checkpoint.every_steps == 0)

    def _driver_acts_before(self, plan: StepPlan) -> bool:
        """A step with an injected fault starts a window: the driver fires it before."""
        faults = self.config.faults
        return any(plan.global_step in steps for steps in (
            faults.kill_worker_at_steps, faults.stall_worker_at_steps,
            faults.perturb_replica_at_steps, faults.remove_node_at_steps,
            faults.add_node_at_steps))

    def _window_failure(self, err: BaseException, plans: list[StepPlan]) -> StepFailed:
        """The failure of a window, placed at the step it ended in: the furthest any
        member got (the controller reads it from the members' answers, see
        :meth:`ElasticController.run_window`). Records the steps trained and lost."""
        failure = _as_failure(err, step=plans[0].global_step)
        reached = failure.reached or []
        step = max(reached, default=plans[0].global_step)
        self.metrics.event("window_lost", first_step=plans[0].global_step, failed_step=step,
                           last_step=plans[-1].global_step,
                           generation=self.controller.state.generation)
        return StepFailed(plans[0], failure.cause, failure.pending, step=step, reached=reached)

    def _recover(self, failure: StepFailed, attempts: int = 3) -> None:
        """Re-form after ``failure``; a member lost while re-forming starts another round.
        When every worker is lost, the grid restarts from the newest durable checkpoint."""
        self.activity = "reform"
        for attempt in range(attempts):
            try:
                try:
                    self.controller.recover(failure, self.clock)
                except GridLost:
                    self._restart_from_checkpoint(failure)
                return
            except StepFailed as err:  # a member lost while forming the new grid
                self.say(f"re-forming failed ({type(err.cause).__name__}), attempt "
                         f"{attempt + 1} of {attempts}")
                failure = StepFailed(None, err.cause, err.pending, step=failure.step)
            except self.group.failures as err:
                self.say(f"re-forming failed ({type(err).__name__}), attempt {attempt + 1} "
                         f"of {attempts}")
                failure = StepFailed(None, err, step=failure.step)
        raise ElasticAbort(f"could not re-form the grid in {attempts} attempts") from failure.cause

    def _restart_from_checkpoint(self, failure: StepFailed) -> None:
        """Every worker was lost: the clock and a fresh grid continue from the newest
        durable checkpoint (waiting, bounded, for workers to start)."""
        path = self._latest_checkpoint()
        if path is None:
            raise ElasticAbort(f"{failure}: every worker was lost and {self.checkpoint_dir} "
                               "holds no valid checkpoint to restart from") from failure.cause
        payload = self._load_checkpoint(path)
        clock = payload["clock"]
        self.say(f"every worker was lost ({failure}); restarting the grid from {path.name} "
                 f"(global step {clock['global_step']})")
        self._start_clock(clock)
        self.controller.restart(payload, failure, source=path.name)
        self.metrics.event("restart", checkpoint=str(path), global_step=clock["global_step"],
                           failed_step=failure.step)

    def _train_window(self, plans: list[StepPlan], commit: bool) -> list[list]:
        """One call per member for the whole window (and the commit after it), or one call
        down the relay tree; per step, the ranks' results (merged per subtree with relays)."""
        return self.controller.run_window(plans, commit,
                                          timeout=self.timeout * (len(plans) + commit))

    # -- records -------------------------------------------------------------------------

    def _record_step(self, plan: StepPlan, results: list, progress: Progress) -> None:
        for result in results:
            for sample in result.skipped:
                rank = result.rank if sample.rank is None else sample.rank
                known = sample.name in self.totals.skipped_names()
                if not self.totals.add_skipped(plan.epoch, sample.name):
                    continue  # a step redone after a rollback
                self.metrics.event("skipped_sample", file=sample.name, reason=sample.reason,
                                   epoch=plan.epoch, step=plan.global_step, rank=rank)
                if not known:
                    self.say(f"skipping {sample.name} (step {plan.global_step}, rank "
                             f"{rank}): it cannot be decoded ({sample.reason}); it "
                             f"will be skipped in every epoch")
        seconds = max(r.seconds for r in results)  # the step's time on its slowest rank
        samples = sum(r.samples for r in results)
        loss = sum(r.loss_sum for r in results) / max(samples, 1)
        self.totals.samples += samples
        self.totals.train_seconds += seconds
        grid = str(self.controller.state.grid)
        record = dict(step=plan.global_step, epoch=plan.epoch, loss=loss, lr=plan.lr,
                      global_batch=plan.global_batch, samples=samples,
                      images_per_sec=samples / seconds if seconds > 0 else 0.0, grid=grid,
                      generation=self.controller.state.generation, step_seconds=seconds,
                      sync_seconds=max(r.sync_s for r in results),
                      # The split of the rank whose step took longest (see StepResult);
                      # the other ranks' exposed wait also holds their wait for it.
                      **_step_split(results),
                      **_train_accuracy(results, samples))
        if plan.global_step % self.config.runtime.log_every_steps == 0 or plan.end_of_epoch:
            # Stamped when the step ended on its last rank, not when the window's results
            # reached the driver.
            self.metrics.step(**record, time=round(_finished_at(results) - self.metrics.start_time, 6))
        progress.update(epoch=plan.epoch, loss=loss, ips=record["images_per_sec"],
                        batch=plan.global_batch, lr=plan.lr, grid=grid)

    def _validate(self, epoch: int | None = None, final: bool = False) -> dict:
        counts = self.controller.run_on_grid("validate", step=self.controller.committed_step)
        total = sum(c["count"] for c in counts) or 1
        # The task's metrics are per-batch sums (Task.metrics): summed over the ranks,
        # then divided by the samples, they are per-sample means of the whole set.
        names = sorted({name for c in counts for name in c["metrics"]})
        result = {name: sum(c["metrics"].get(name, 0.0) for c in counts) / total
                  for name in names}
        result.update(val_loss=sum(c["loss_sum"] for c in counts) / total,
                      val_skipped=sum(c.get("skipped", 0) for c in counts))
        clock = self.clock.state()
        if not final:
            self.metrics.epoch(epoch=epoch, samples=clock["samples_per_epoch"][epoch], **result)
            self.say(f"epoch {epoch}: {describe_metrics(result)}  "
                     f"val loss {result['val_loss']:.4f}  grid {self.controller.state.grid}")
        self.totals.last_eval = result
        return result

    def _checkpoint(self) -> Path:
        clock = self.clock.state()
        members = self.controller.state.members
        self.controller.run_on_grid("average_buffers", step=clock["global_step"])
        state = self.group.call(members[0], "state", timeout=self.timeout)
        path = self._save_checkpoint(clock["global_step"], self._payload(state, clock))
        self.metrics.event("checkpoint", path=str(path), global_step=clock["global_step"])
        return path

    # Durable checkpoints (the simulator keeps them in memory).

    def _save_checkpoint(self, step: int, payload: dict) -> Path:
        path = save_checkpoint(self.checkpoint_dir, step, payload)
        prune_checkpoints(self.checkpoint_dir, self.config.checkpoint.keep)
        return path

    def _latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_dir)

    def _load_checkpoint(self, path: Path) -> dict:
        return load_checkpoint(path)

    def _payload(self, state: dict, clock: dict) -> dict:
        """A checkpoint: a worker's model/optimizer/scaler state, the clock, the config."""
        return {"format": 1, "model": state["model"], "optimizer": state["optimizer"],
                "scaler": state.get("scaler"), "clock": clock,
                "config": self.config.model_dump(mode="json"),
                "model_name": model_name(self.task, self.config),
                "num_classes": self.controller.num_classes}

    def _checkpoint_last_commit(self) -> None:
        """Before giving up: write the last in-memory commit durably, from any member
        that still holds it, so ``--resume`` loses nothing that was committed."""
        clock = self.clock.rollback()
        for member in self.controller.state.members:
            try:
                state = self.group.call(member, "committed_state", clock["global_step"],
                                        timeout=self.timeout)
            except self.group.failures:
                continue
            path = self._save_checkpoint(clock["global_step"], self._payload(state, clock))
            self.say(f"wrote the last commit (step {clock['global_step']}) to {path}")
            return
        self.say("no worker holds the last commit any more; the newest checkpoint on disk stands")

    def _initial_state(self, num_samples: int, min_tail: int) -> tuple[dict, dict | None]:
        fresh = TrainingClock(num_samples=num_samples, seed=self.config.data.seed,
                              min_tail=min_tail).state_dict()
        if not self.resume:
            return fresh, None
        path = self._latest_checkpoint()
        if path is None:
            self.say(f"--resume: no valid checkpoint in {self.checkpoint_dir}, starting fresh")
            return fresh, None
        payload = self._load_checkpoint(path)
        clock = payload["clock"]
        if clock["num_samples"] != num_samples:
            raise ValueError(f"checkpoint {path} was trained on {clock['num_samples']} samples "
                             f"but the dataset now has {num_samples}: resume with the same data")
        self.say(f"resuming from {path} at global step {clock['global_step']}, "
                 f"epoch {clock['epoch']}, cursor {clock['cursor']}")
        return clock, payload

    def _total_steps(self, num_samples: int, min_tail: int) -> int:
        steps = sum(steps_in_epoch(num_samples, global_batch_at(self.config.schedule, e), min_tail)
                    for e in range(self.config.schedule.epochs))
        cap = self.config.runtime.max_steps
        return min(steps, cap) if cap else steps

    def _summary(self, datasets, num_samples: int, wall: float, final: dict) -> dict:
        clock = self.clock.state()
        ips = self.totals.samples / self.totals.train_seconds if self.totals.train_seconds else 0.0
        if self.resume:
            self.totals.restore_skipped(read_metrics(self.metrics.path))
        # samples_per_epoch counts the samples each step covered (the clock's view);
        # the skipped ones were covered but not trained on.
        covered = clock["samples_per_epoch"]
        skipped = self.totals.skipped_per_epoch(len(covered))
        skipped_names = sorted(self.totals.skipped_names())
        return {
            **{f"final_{name}": value for name, value in final.items()
               if name not in ("val_loss", "val_skipped")},
            "final_val_loss": final["val_loss"],
            "epochs": clock["epoch"] + (clock["cursor"] / num_samples),
            "global_steps": clock["global_step"],
            "images_per_sec": ips,
            "wall_seconds": wall,
            "dataset_train_size": num_samples,
            "dataset_val_size": len(datasets.val),
            "samples_per_epoch": clock["samples_per_epoch"],
            "skipped_files": datasets.skipped_files,
            "skipped_samples": sum(skipped),
            "skipped_samples_per_epoch": skipped,
            "trained_samples_per_epoch": [n - k for n, k in zip(covered, skipped, strict=True)],
            "num_skipped_sample_files": len(skipped_names),
            "skipped_sample_files": skipped_names[:SKIPPED_FILES_LISTED],
            "val_skipped": final.get("val_skipped", 0),
            "reforms": self.controller.reforms,
            "final_grid": str(self.controller.state.grid),
            "model": model_name(self.task, self.config),
            "task": task_name(self.task),
        }
