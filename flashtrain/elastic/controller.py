"""The elastic controller: forms the grid and re-forms it when members come and go.

The controller carries out decisions; :func:`flashtrain.policy.decide` makes them.

* **Loss** (a step or commit fails): wait for the failed step's calls to settle (a
  worker whose collective failed tears its groups down, so its peers fail fast too),
  find the dead, roll the survivors and the schedule clock back to the last in-memory
  commit, re-form over the survivors (and any ready spares) under a new generation and
  continue at once. Replacements start in the background.
* **Growth** (spares ready, a node joined): at a commit boundary, newcomers load the
  committed state through the object store and the grid re-forms, bigger.
* **Planned resize**: a schedule phase that names a grid moves the target; the grid
  shrinks at the phase boundary, or grows as the requested workers become ready.
* **Replacements join in bounded time**: a spare the grid has been short of, with room
  (a process of its own), for :data:`JOIN_GRACE_S` makes the driver wait for it at the
  next commit boundary, at most :data:`JOIN_WAIT_S`, once: with training paused, the
  cores are the starting process's (its imports are seconds of CPU). Measured on this
  project's 2-core machine (shufflenet_v2_x0_5, 2x2, one worker SIGKILLed, quiet
  machine): a replacement was ready 7.6-10.3 s after it had room, paused or not (the
  survivors trained 25 steps meanwhile with a 5 s grace, 37-40 without), so the grace
  is above a normal start and the pause only bounds the abnormal ones (a machine
  oversubscribed by other work; the GCS busy-spin that the per-node placement groups
  of :mod:`flashtrain.elastic.membership` avoid, which had replacements take 116-132 s).
  Every re-form records, per newcomer, the seconds from its request to room, from room
  to ready, and how long the grid was short of it with room (``short_s``).
* **Every worker lost**: nothing in memory is left to continue from; :class:`GridLost`
  tells the trainer, which loads the newest durable checkpoint into the clock and
  :meth:`ElasticController.restart` forms a fresh grid from spares (waiting for them
  at most ``elastic.wait_for_resources_s``) and loads it into every member.

Every re-form is recorded in metrics.jsonl and summary.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from flashtrain.algorithm import choose_algorithm
from flashtrain.collective.errors import CollectiveError
from flashtrain.config import FlashtrainConfig
from flashtrain.elastic.faults import FaultInjector
from flashtrain.elastic.membership import (
    PLACEMENT_POLL_S,
    Member,
    SparePool,
    alive,
    reserve_by_node,
    start_worker,
)
from flashtrain.policy import Abort, Keep, Reform, Wait, decide, propose_grid
from flashtrain.topology import Grid, layout_grid
from flashtrain.train.clock import StepPlan, StepResult
from flashtrain.train.metrics import MetricsWriter
from flashtrain.train.relay import HOP_S, WindowRelay, children_of, subtree_of, wait_batch

log = logging.getLogger(__name__)

_PING_TIMEOUT_S = 5.0
# See "Replacements join in bounded time" above. A config field would be the better home
# (elastic.join_grace_s / join_wait_s); the controller takes both as arguments.
JOIN_GRACE_S = 10.0
JOIN_WAIT_S = 60.0
_FAILURES = (RayActorError, RayTaskError, GetTimeoutError)


def is_collective_failure(err: BaseException) -> bool:
    """A failure that means "the grid could not finish", as opposed to a bug or bad input
    in worker code: the worker died (Ray knows), a call timed out, or a collective gave
    up because a peer died, hung or was aborted."""
    if isinstance(err, RayActorError | GetTimeoutError | CollectiveError):
        return True  # (a relay's own window raises the collective's error itself)
    if isinstance(err, RayTaskError):
        return isinstance(err.as_instanceof_cause(), CollectiveError)
    return False


class StepFailed(RuntimeError):
    """A step or commit did not complete on every member."""

    def __init__(self, plan: StepPlan | None, cause: BaseException, pending: list | None = None,
                 step: int | None = None, reached: list[int] | None = None):
        # The clock position lost: the plan's step, unless ``step`` says where a window of
        # steps that began at ``plan`` ended.
        self.step = step if step is not None else plan.global_step if plan is not None else None
        where = f"step {self.step}" if plan is not None else f"the commit at step {self.step}"
        super().__init__(f"{where} failed: {type(cause).__name__}: {cause}")
        self.plan = plan
        self.cause = cause
        self.pending = pending or []  # the calls' object refs, some may still be running
        # How far each settled member of a failed window got, when a relay tree collected
        # it (else the trainer reads it from ``pending``).
        self.reached = reached


class ElasticAbort(RuntimeError):
    """The run cannot continue (too few workers for too long, too many re-forms)."""


class GridLost(ElasticAbort):
    """Every member of the grid was lost: no in-memory commit survives. The trainer
    continues from the newest durable checkpoint (see :meth:`ElasticController.restart`);
    anyone else sees an abort."""

    def __init__(self, failure: StepFailed):
        self.failure = failure
        super().__init__(f"{failure}: every worker was lost, nothing in memory to continue "
                         "from (resume from the newest checkpoint with --resume)")


class WorkerError(ElasticAbort):
    """Worker code raised (a bug, bad input): not a membership change, so re-forming
    cannot help; the run stops with that worker's error."""

    def __init__(self, rank: int, method: str, cause: BaseException):
        self.rank = rank
        self.method = method
        self.cause = cause
        # A RayTaskError carries the worker's exception; a relay reports its own window's
        # exception itself, with the traceback as text (``traceback_text``).
        inner = getattr(cause, "cause", None) if isinstance(cause, RayTaskError) else cause
        detail = (f"{type(inner).__name__}: {inner}" if inner is not None
                  else str(cause).strip().splitlines()[-1])
        step = getattr(inner, "window_step", None)  # train_window names the step
        where = f"{method} at step {step}" if step is not None else method
        trace = getattr(inner, "traceback_text", None)
        super().__init__(f"worker rank {rank} raised in {where}: {detail}"
                         + (f"\n{trace}" if trace else ""))


@dataclass
class GridState:
    """The grid in force: its shape, generation and the member of each rank."""

    grid: Grid
    generation: int
    members: list[Member] = field(default_factory=list)

    @property
    def actors(self) -> list:
        return [m.actor for m in self.members]


class ElasticController:
    """Owns the worker actors and the grid they form."""

    def __init__(self, config: FlashtrainConfig, data_cache, metrics: MetricsWriter, say=print,
                 cluster=None, join_grace_s: float = JOIN_GRACE_S,
                 join_wait_s: float = JOIN_WAIT_S):
        self.config = config
        self.data_cache = str(data_cache)
        self.metrics = metrics
        self.say = say
        self.timeout = config.runtime.remote_timeout_s
        self.join_grace_s = join_grace_s
        self.join_wait_s = join_wait_s
        self.reforms: list[dict] = []
        self.committed_step = 0
        self.num_classes = 0
        self.spares = SparePool(config, self.data_cache)
        self.faults = FaultInjector(config.faults, cluster, metrics, say,
                                    stall_s=2 * config.collective.timeout_s)
        self._pending_recovery: tuple[dict, float] | None = None
        self._placement_checked = 0.0
        self._relays_of: GridState | None = None  # the grid whose members hold a relay tree

    # -- forming -------------------------------------------------------------------------

    def start(self) -> GridState:
        """Reserve the workers of the configured grid, start them and form the groups."""
        grid = self._initial_grid()
        self.target = grid
        slots = reserve_by_node(self.config.grid, grid.num_workers, self.timeout,
                                name="flashtrain")
        self.spares.reservations += list({id(r.group): r for r, _ in slots}.values())
        nodes = [reservation.bundle_nodes[bundle] for reservation, bundle in slots]
        layout = layout_grid(nodes, grid)
        members = []
        for slot in layout.slot_of_rank:
            reservation, bundle = slots[slot]
            member = start_worker(self.config.grid, reservation, bundle, self.config,
                                  self.data_cache)
            member.node = nodes[slot]
            members.append(member)
        self.state = GridState(grid, 0, members)
        if self.config.elastic.warm_spares:
            # The warm spares start with the grid's workers (their start-ups overlap), so
            # they are ready from the first step.
            self._request_replacements()
        self.num_classes = ray.get(members[0].actor.__ray_call__.remote(lambda w: w.num_classes),
                                   timeout=self.timeout)
        self._form(self.state)
        if self.config.elastic.warm_spares:
            # Only those with room: a spare that waits for a node must not hold up the start.
            with_room = self.spares.with_room(_PING_TIMEOUT_S)
            ready = self.spares.wait_ready(self.timeout, members=with_room) if with_room else []
            self.say(f"{len(ready)} warm spare(s) ready")
        split = f", {layout.split_rows} row(s) span nodes" if layout.split_rows else ""
        self.say(f"grid {grid} formed on {len(set(nodes))} node(s){split}")
        return self.state

    def _initial_grid(self) -> Grid:
        first_phase = self.config.schedule.phases[0].grid
        if first_phase:
            return Grid.parse(first_phase)
        if self.config.grid.shape != "auto":
            return Grid.parse(self.config.grid.shape)
        per_node = self._cluster_slots()
        proposal = propose_grid(per_node, preferred_cols=max(per_node.values(), default=1),
                                max_workers=self.config.grid.max_workers)
        if proposal is None:
            raise ElasticAbort("grid.shape=auto found no room for a single worker in the cluster")
        self.say(f"grid auto: {proposal.reason}")
        return proposal.grid

    def _cluster_slots(self) -> dict[str, int]:
        resource = "GPU" if self.config.grid.use_gpu else "CPU"
        per_worker = 1.0 if self.config.grid.use_gpu else self.config.grid.cpus_per_worker
        return {node["NodeID"]: int(node["Resources"].get(resource, 0) // per_worker)
                for node in ray.nodes() if node["Alive"]}

    def _form(self, state: GridState) -> None:
        """Every member joins its row, column and world groups of this generation."""
        # All constructors first (model built, data indexed), so the rendezvous below
        # waits only for the group formation itself.
        ray.get([m.actor.ping.remote() for m in state.members], timeout=self.timeout)
        algorithm = self._algorithm_for(state)
        refs = [m.actor.join.remote(state.grid, rank, state.generation, algorithm)
                for rank, m in enumerate(state.members)]
        # Fail fast here too: a member that died on the way makes the others give up
        # their rendezvous at once instead of waiting out its timeout.
        pids = self._gather(state, "join", refs, step=self.committed_step)
        # Who is in which grid, for the record and for benchmarks that kill members from
        # outside (they find each actor's process in Ray's GCS actor table).
        self.metrics.event("grid", generation=state.generation, grid=str(state.grid),
                           actors=[m.actor_id for m in state.members],
                           nodes=[m.node for m in state.members], pids=pids)

    def _algorithm_for(self, state: GridState) -> str:
        """The grid's all-reduce (flashtrain/algorithm.py), said and recorded."""
        c = self.config.collective
        choice = choose_algorithm(c.algorithm, state.grid, [m.node for m in state.members],
                                  self.config.grid.use_gpu, c.bucket_mb * 2**20)
        if c.algorithm == "auto":
            self.say(f"all-reduce for grid {state.grid}: {choice.algorithm} ({choice.reason})")
        self.metrics.event("algorithm", generation=state.generation, grid=str(state.grid),
                           algorithm=choice.algorithm, reason=choice.reason,
                           predicted_s=choice.predicted_s)
        return choice.algorithm

    # -- state ---------------------------------------------------------------------------

    def commit(self, clock) -> None:
        """In-memory commit on every member, then on the clock (the clock's commit is
        the one everybody returns to, so it moves only once all members hold it)."""
        step = ray.get(clock.state.remote(), timeout=self.timeout)["global_step"]
        self.run_on_grid("commit", step, step=step)
        self.members_committed(clock)

    def members_committed(self, clock) -> None:
        """Every member holds a commit of the clock's position (it committed at the end of
        its step window): commit the clock, then grow if spares are ready."""
        self.committed_step = ray.get(clock.commit.remote(), timeout=self.timeout)["global_step"]
        self.metrics.event("commit", global_step=self.committed_step)
        self._grow_if_ready(clock)

    def load_state(self, payload: dict, actors: list | None = None) -> None:
        """Load a checkpoint payload's model/optimizer/scaler into ``actors`` (default:
        every member)."""
        state = {"model": payload["model"], "optimizer": payload["optimizer"],
                 "scaler": payload.get("scaler")}
        ref = ray.put(state)
        actors = self.state.actors if actors is None else actors
        ray.get([a.load_state.remote(ref) for a in actors], timeout=self.timeout)

    # -- calls on every member ---------------------------------------------------------

    def run_on_grid(self, method: str, *args, step: int | None = None, plan=None,
                    timeout: float | None = None) -> list:
        """Call ``method`` on every member and return the results in rank order, all within
        ``timeout`` (default ``runtime.remote_timeout_s``).

        Fails fast: the first member whose call fails (died, timed out, collective gave
        up) makes every other member abort its collectives of this generation through the
        control concurrency group (which does not queue behind the blocked call), so the
        survivors return within milliseconds instead of waiting out the collective
        timeout; then :class:`StepFailed` is raised. Worker code that raised anything
        else is not a membership change: :class:`WorkerError` stops the run.
        """
        state = self.state
        refs = [getattr(actor, method).remote(*args) for actor in state.actors]
        return self._gather(state, method, refs, step=step, plan=plan, timeout=timeout)

    def run_window(self, plans: list[StepPlan], commit: bool, timeout: float
                   ) -> list[list[StepResult]]:
        """Every member trains the window ``plans`` (and commits after it with
        ``commit``); per step, the members' results. With more members than
        ``runtime.relay_fanout`` the window goes down the relay tree
        (:mod:`flashtrain.train.relay`): one call from here, and per step one result
        merged over the grid. Fails like :meth:`run_on_grid`."""
        state, fanout = self.state, self.config.runtime.relay_fanout
        if not fanout or len(state.actors) <= fanout:
            per_rank = self.run_on_grid("train_window", plans, commit, plan=plans[0],
                                        timeout=timeout)
            return [list(step) for step in zip(*per_rank, strict=True)]
        self._plant_relays(state, fanout, plans[0])
        ref = state.actors[0].relay_window.remote(state.generation, plans, commit, timeout)
        try:
            answer = ray.get(ref, timeout=timeout + HOP_S)
        except _FAILURES as err:  # rank 0 died, or the whole tree missed its deadline
            self._abort_grid(state, f"rank 0 failed in relay_window: {type(err).__name__}")
            if not is_collective_failure(err):
                raise WorkerError(0, "relay_window", err) from err
            raise StepFailed(plans[0], err, step=plans[0].global_step, reached=[]) from err
        if not answer.errors:
            return [[merged] for merged in answer.steps]
        # The relays aborted their subtrees; a dead relay's orphans are reached from here.
        self._abort_grid(state, f"rank {answer.errors[0][0]} failed in a step window")
        bugs = [(r, e) for r, e in answer.errors if not is_collective_failure(e)]
        if bugs:
            raise WorkerError(bugs[0][0], "train_window", bugs[0][1]) from bugs[0][1]
        died = [e for _, e in answer.errors if isinstance(e, RayActorError)]
        cause = died[0] if died else answer.errors[0][1]
        raise StepFailed(plans[0], cause, step=plans[0].global_step,
                         reached=answer.reached) from cause

    def _plant_relays(self, state: GridState, fanout: int, plan: StepPlan) -> None:
        """Give every member of ``state`` its place in the relay tree (once per grid)."""
        if self._relays_of is state:
            return
        actors, size = state.actors, len(state.actors)
        refs = []
        for rank, actor in enumerate(actors):
            kids = children_of(rank, size, fanout)
            relay = WindowRelay(state.generation, rank, [actors[k] for k in kids], kids,
                                [actors[r] for r in subtree_of(rank, size, fanout)])
            refs.append(actor.set_relay.remote(relay))
        try:
            self._gather(state, "set_relay", refs, step=plan.global_step, plan=plan)
        except StepFailed as err:  # nobody trained: the window fails at its first step
            raise StepFailed(plan, err.cause, step=plan.global_step, reached=[]) from err.cause
        self._relays_of = state

    def _gather(self, state: GridState, method: str, refs: list, *, step: int | None,
                plan=None, timeout: float | None = None) -> list:
        """The results of ``refs`` (one call of ``method`` per member of ``state``, in rank
        order), failing fast as :meth:`run_on_grid` describes."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while pending:
            ready, pending = wait_batch(pending, max(deadline - time.monotonic(), 0))
            if not ready:
                err = GetTimeoutError(f"{method} did not finish on {len(pending)} member(s) "
                                      f"within {timeout:g}s (runtime.remote_timeout_s="
                                      f"{self.timeout:g}s per step)")
                self._abort_grid(state, f"{method} timed out")
                raise StepFailed(plan, err, refs, step=step) from None
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref, timeout=0)
                except _FAILURES as err:
                    rank = rank_of[ref]
                    self._abort_grid(state, f"rank {rank} failed in {method}: "
                                            f"{type(err).__name__}")
                    if not is_collective_failure(err):
                        ray.wait(pending, num_returns=len(pending), timeout=_PING_TIMEOUT_S)
                        raise WorkerError(rank, method, err) from err
                    raise StepFailed(plan, err, refs, step=step) from err
        return results

    def _abort_grid(self, state: GridState, reason: str) -> None:
        """Tell every member to abort its collectives of ``state``'s generation (fire and
        forget: a dead member's call just fails)."""
        for actor in state.actors:
            actor.abort_collectives.remote(state.generation, reason)

    # -- hooks around a step -------------------------------------------------------------

    def before_step(self, plan: StepPlan, clock) -> None:
        """Planned resizes at phase boundaries, then injected faults."""
        if plan.phase_grid and Grid.parse(plan.phase_grid) != self.target:
            self._retarget(Grid.parse(plan.phase_grid), plan.epoch, clock)
        self.faults.before_step(plan.global_step, self.state.members)

    def after_step(self, plan: StepPlan, finished_at: float | None = None) -> None:
        """Close the recovery clock of the last re-form at the first completed step (it
        ended at ``finished_at``, unix time; default now); note which starting spares
        have room by now (the start of their join clock)."""
        self._note_placement()
        if self._pending_recovery is None:
            return
        record, began = self._pending_recovery
        ended = time.time() if finished_at is None else finished_at
        record["recovery_seconds"] = max(ended - began, 0.0)
        self.metrics.reform(**record)
        self.say(f"re-formed {record['old_grid']} -> {record['new_grid']} in "
                 f"{record['recovery_seconds']:.2f}s to the next step "
                 f"({record['steps_rolled_back']} step(s) rolled back): {record['reason']}")
        self._pending_recovery = None

    # -- re-forming ----------------------------------------------------------------------

    def recover(self, failure: StepFailed, clock) -> None:
        """Re-form over the survivors after a failed step or commit, from the last commit."""
        began = time.monotonic()
        if not self.config.elastic.enabled:
            raise ElasticAbort(f"{failure} and elastic.enabled is false") from failure.cause
        if len(self.reforms) >= self.config.elastic.max_reforms:
            raise ElasticAbort(f"{failure}: elastic.max_reforms={self.config.elastic.max_reforms} "
                               "re-forms already") from failure.cause
        if failure.pending:
            ray.wait(failure.pending, num_returns=len(failure.pending),
                     timeout=self.config.collective.timeout_s + _PING_TIMEOUT_S)
        old = self.state
        answers = alive(old.members, _PING_TIMEOUT_S)
        survivors = [m for m, ok in zip(old.members, answers, strict=True) if ok]
        for member, ok in zip(old.members, answers, strict=True):
            if not ok:
                ray.kill(member.actor, no_restart=True)
                self.spares.give_back(member)  # once, even on a retry
        where = f"step {failure.step}" if failure.plan else f"the commit at step {failure.step}"
        self.say(f"{where} failed ({type(failure.cause).__name__}); "
                 f"{len(survivors)} of {len(old.members)} workers answer")
        if not survivors:
            self.state = GridState(old.grid, old.generation, [])
            raise GridLost(failure)
        ray.get([m.actor.leave.remote() for m in survivors], timeout=self.timeout)
        resume_step = ray.get(clock.rollback.remote(), timeout=self.timeout)["global_step"]
        self.state = GridState(old.grid, old.generation, survivors)
        self._request_replacements()
        decision = self._decide_with_wait(lost=True)
        grid, members, newcomers = self._choose(decision.grid, survivors)
        ray.get([m.actor.rollback.remote(resume_step) for m in members if m not in newcomers],
                timeout=self.timeout)
        self._hand_over(newcomers, survivors[0], resume_step)
        self._reform_to(grid, members, old.grid, decision.reason, began,
                        failed_step=failure.step,
                        resume_step=resume_step, cause=type(failure.cause).__name__)

    def restart(self, payload: dict, failure: StepFailed, source: str) -> None:
        """Every member was lost (:class:`GridLost`): form a fresh grid from spares,
        waiting for them at most ``elastic.wait_for_resources_s``, and load ``payload``
        (the newest durable checkpoint, whose clock the caller has already restored)."""
        began = time.monotonic()
        old = self.state
        self.state = GridState(old.grid, old.generation, [])
        self._request_replacements()
        decision = self._decide_with_wait(lost=True)
        grid, members, _ = self._choose(decision.grid, [])
        step = payload["clock"]["global_step"]
        # Members first, so a failure from here on is an ordinary loss of these members.
        self.state = GridState(old.grid, old.generation, members)
        self.load_state(payload, [m.actor for m in members])
        ray.get([m.actor.commit.remote(step) for m in members], timeout=self.timeout)
        self.committed_step = step
        self._reform_to(grid, members, old.grid,
                        f"every worker was lost: restarted from the durable checkpoint "
                        f"{source} (step {step}) on {decision.reason}", began,
                        failed_step=failure.step, resume_step=step, cause="restart")

    def _grow_if_ready(self, clock) -> None:
        """At a commit boundary: re-form bigger when spares are ready (below target,
        first wait, bounded, for replacements that are overdue)."""
        if self.state.grid.num_workers < self.target.num_workers:
            self._wait_for_overdue_spares()
        ready = self.spares.poll()
        if not ready or self.state.grid.num_workers >= self.target.num_workers:
            return
        decision = self._decide(self.state.members + ready, lost=False)
        if not isinstance(decision, Reform) or \
                decision.grid.num_workers <= self.state.grid.num_workers:
            return
        began = time.monotonic()
        old = self.state
        ray.get([m.actor.leave.remote() for m in old.members], timeout=self.timeout)
        grid, members, newcomers = self._choose(decision.grid, old.members)
        self._hand_over(newcomers, old.members[0], self.committed_step)
        self._reform_to(grid, members, old.grid, decision.reason, began,
                        failed_step=self.committed_step, resume_step=self.committed_step,
                        cause="grow")

    def _wait_for_overdue_spares(self) -> None:
        """Pause here (a commit boundary) for replacements that have had room for
        ``join_grace_s`` without getting ready, at most ``join_wait_s``, once each: with
        training paused, the cores are theirs."""
        self.spares.note_placement()
        missing = self.target.num_workers - self.state.grid.num_workers - len(self.spares.poll())
        overdue = self.spares.overdue(self.join_grace_s, time.time())[:max(missing, 0)]
        if not overdue:
            return
        began = time.monotonic()
        for member in overdue:
            member.waited_for = True
        self.say(f"grid {self.state.grid} is below target {self.target}: waiting up to "
                 f"{self.join_wait_s:g}s for {len(overdue)} replacement(s) it has been short "
                 f"of, with room, for {self.join_grace_s:g}s or more")
        ready = self.spares.wait_ready(self.join_wait_s, members=overdue)
        self.metrics.event("join_wait", seconds=round(time.monotonic() - began, 3),
                           replacements=len(overdue),
                           ready=sum(any(m is r for r in ready) for m in overdue))

    def _retarget(self, target: Grid, epoch: int, clock) -> None:
        """A schedule phase names a new grid: shrink now, or start workers to grow."""
        self.say(f"schedule phase asks for grid {target} (was {self.target})")
        self.target = target
        if target.num_workers < self.state.grid.num_workers:
            self.commit(clock)
            began = time.monotonic()
            old = self.state
            ray.get([m.actor.leave.remote() for m in old.members], timeout=self.timeout)
            grid, members, _ = self._choose(target, old.members)
            self._release_unneeded_spares(epoch)
            self._reform_to(grid, members, old.grid, f"schedule phase: {old.grid} -> {grid}",
                            began, failed_step=self.committed_step,
                            resume_step=self.committed_step, cause="phase")
        else:
            self._request_replacements()

    def _release_unneeded_spares(self, epoch: int) -> None:
        """Workers left out by a planned shrink stay warm only if a later phase will want
        them back; otherwise they are stopped and their resources given back."""
        later = [Grid.parse(p.grid).num_workers for p in self.config.schedule.phases
                 if p.grid and p.start_epoch > epoch]
        keep = max(later, default=0) - self.target.num_workers
        surplus = self.spares.ready[max(keep, 0):]
        for member in surplus:
            ray.kill(member.actor, no_restart=True)
        self.spares.take(surplus)

    def _request_replacements(self) -> None:
        wanted = self.target.num_workers + self.config.elastic.warm_spares
        missing = wanted - len(self.state.members) - self.spares.count
        if missing > 0:
            self.spares.request(missing)
        self._mark_needed()

    def _note_placement(self) -> None:
        """Look starting spares up in the GCS, at most every PLACEMENT_POLL_S."""
        if any(m.placed_at is None for m in self.spares.starting) and \
                time.monotonic() - self._placement_checked > PLACEMENT_POLL_S:
            self._placement_checked = time.monotonic()
            self.spares.note_placement()

    def _mark_needed(self) -> None:
        self.spares.mark_needed(self.state.grid.num_workers < self.target.num_workers,
                                time.time())

    def _decide(self, candidates: list[Member], lost: bool, waited_s: float = 0.0):
        per_node: dict[str, int] = {}
        for member in candidates:
            per_node[member.node] = per_node.get(member.node, 0) + 1
        return decide(self.state.grid, per_node, preferred_cols=self.target.cols,
                      min_workers=self.config.elastic.min_workers,
                      max_workers=self.target.num_workers, lost_members=lost,
                      waited_s=waited_s, wait_limit_s=self.config.elastic.wait_for_resources_s)

    def _decide_with_wait(self, lost: bool) -> Reform | Keep:
        """Decide over survivors and ready spares; below ``min_workers`` wait (bounded)
        for spares, then abort."""
        started = time.monotonic()
        while True:
            waited = time.monotonic() - started
            decision = self._decide(self.state.members + self.spares.poll(), lost, waited)
            if isinstance(decision, Abort):
                raise ElasticAbort(decision.reason)
            if not isinstance(decision, Wait):
                return decision
            self._note_placement()
            time.sleep(0.2)  # polling the spares' start-up, bounded by the Abort above

    def _choose(self, grid: Grid, current: list[Member]) -> tuple[Grid, list[Member], list[Member]]:
        """Lay ``grid`` over the current members first, then ready spares."""
        candidates = current + [m for m in self.spares.ready if m not in current]
        layout = layout_grid([m.node for m in candidates], grid)
        members = [candidates[slot] for slot in layout.slot_of_rank]
        newcomers = [m for m in members if m not in current]
        self.spares.take(newcomers)
        for member in current:
            if member not in members:
                self.spares.ready.append(member)  # kept warm for the next growth
        return grid, members, newcomers

    def _hand_over(self, newcomers: list[Member], source: Member, step: int) -> None:
        """Newcomers load the committed state of ``step`` through the object store."""
        if not newcomers:
            return
        state_ref = source.actor.committed_state.remote(step)
        ray.get([m.actor.load_state.remote(state_ref) for m in newcomers], timeout=self.timeout)
        ray.get([m.actor.commit.remote(step) for m in newcomers], timeout=self.timeout)

    def _reform_to(self, grid: Grid, members: list[Member], old_grid: Grid, reason: str,
                   began: float, *, failed_step: int, resume_step: int, cause: str) -> None:
        self.state = GridState(grid, self.state.generation + 1, members)
        self._form(self.state)
        joined_at = time.time()
        newcomers = []
        for member in members:
            if member.joined_at is None and member.requested_at is not None:
                member.joined_at = joined_at
                newcomers.append(member.join_record(joined_at, self.metrics.start_time))
        self._mark_needed()
        record = {"time": self.metrics.elapsed(), "reason": reason, "cause": cause,
                  "old_grid": str(old_grid), "new_grid": str(grid), "failed_step": failed_step,
                  "resume_step": resume_step, "steps_rolled_back": failed_step - resume_step,
                  "generation": self.state.generation, "recovery_seconds": None,
                  "newcomers": newcomers}
        self.reforms.append(record)
        # ``began`` is a monotonic reading; the first step's end comes back as unix time.
        self._pending_recovery = (record, time.time() - (time.monotonic() - began))

    def shutdown(self) -> None:
        for member in getattr(self, "state", GridState(Grid(1, 1), 0)).members:
            ray.kill(member.actor, no_restart=True)
        self.spares.shutdown()
