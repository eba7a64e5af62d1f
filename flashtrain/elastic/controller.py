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

import enum
import logging
from dataclasses import dataclass, field

from flashtrain.algorithm import choose_algorithm
from flashtrain.config import FlashtrainConfig
from flashtrain.elastic.errors import (
    ElasticAbort,
    GridLost,
    ReplicasDiverged,
    StepFailed,
    WorkerError,
)
from flashtrain.elastic.faults import FaultInjector
from flashtrain.elastic.worker_group import Clock, Member, WorkerGroup
from flashtrain.policy import Abort, Keep, Reform, Wait, decide, propose_grid
from flashtrain.topology import Grid, layout_grid
from flashtrain.train.clock import StepPlan, StepResult
from flashtrain.train.metrics import MetricsWriter
from flashtrain.train.replicas import divergence, reference_rank
from flashtrain.train.window import HOP_S, classify, merge_replicas, reached_by

log = logging.getLogger(__name__)

_PING_TIMEOUT_S = 5.0
# See "Replacements join in bounded time" above. A config field would be the better home
# (elastic.join_grace_s / join_wait_s); the controller takes both as arguments.
JOIN_GRACE_S = 10.0
JOIN_WAIT_S = 60.0
PLACEMENT_POLL_S = 0.5  # how often, at most, starting spares are looked up
WAIT_POLL_S = 0.2  # how often a grid too small to train looks at its spares again


@dataclass
class GridState:
    """The grid in force: its shape, generation and the member of each rank."""

    grid: Grid
    generation: int
    members: list[Member] = field(default_factory=list)

    @property
    def actors(self) -> list:
        return [m.actor for m in self.members]


class Phase(enum.Enum):
    """What the controller is doing. Transitions (:meth:`ElasticController._enter`):
    NEW -> FORMING -> TRAINING; TRAINING -> RECOVERING (a member lost) | GROWING (spares
    ready at a commit) | JOIN_WAIT (replacements overdue) | RESHAPING (a schedule phase
    names a smaller grid) -> FORMING -> TRAINING; RECOVERING -> RESTARTING (every member
    lost) -> FORMING; any -> STOPPED."""

    NEW = "new"
    FORMING = "forming"
    TRAINING = "training"
    RECOVERING = "recovering"
    RESTARTING = "restarting"
    GROWING = "growing"
    JOIN_WAIT = "join_wait"
    RESHAPING = "reshaping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Handover:
    """A re-form as data: the grid to form over ``members`` (``newcomers`` among them
    load the committed state of ``resume_step`` from ``source``), why, and the record's
    numbers."""

    grid: Grid
    members: list[Member]
    newcomers: list[Member]
    reason: str
    cause: str
    failed_step: int
    resume_step: int


class ElasticController:
    """Owns the workers (through a :class:`WorkerGroup`) and the grid they form."""

    def __init__(self, config: FlashtrainConfig, group: WorkerGroup, metrics: MetricsWriter,
                 say=print, cluster=None, join_grace_s: float = JOIN_GRACE_S,
                 join_wait_s: float = JOIN_WAIT_S):
        self.config = config
        self.group = group
        self.metrics = metrics
        self.say = say
        self.timeout = config.runtime.remote_timeout_s
        self.join_grace_s = join_grace_s
        self.join_wait_s = join_wait_s
        self.reforms: list[dict] = []
        self.committed_step = 0
        self.num_classes = 0
        self.spares = group.spares
        self.faults = FaultInjector(config.faults, cluster, metrics, group, say,
                                    stall_s=2 * config.collective.timeout_s)
        self.phase = Phase.NEW
        # No grid until start(): an empty one of the configured shape's size 0.
        self.state = GridState(Grid(1, 1), 0, [])
        self.target: Grid = self.state.grid
        self._pending_recovery: tuple[dict, float] | None = None
        self._placement_checked = float("-inf")
        self._relays_of: GridState | None = None  # the grid whose members hold a relay tree
        # (step, StepResult.replicas) of the last window that committed, for the check
        self._window_replicas: tuple[int, tuple] | None = None

    def _enter(self, phase: Phase) -> None:
        log.debug("controller %s -> %s", self.phase.value, phase.value)
        self.phase = phase

    # -- forming -------------------------------------------------------------------------

    def start(self) -> GridState:
        """Reserve the workers of the configured grid, start them and form the groups."""
        self._enter(Phase.FORMING)
        grid = self._initial_grid()
        self.target = grid
        started = self.group.start_grid(grid.num_workers, self.timeout)
        nodes = [m.node for m in started]
        layout = layout_grid(nodes, grid)
        members = [started[slot] for slot in layout.slot_of_rank]
        self.state = GridState(grid, 0, members)
        if self.config.elastic.warm_spares:
            # The warm spares start with the grid's workers (their start-ups overlap), so
            # they are ready from the first step.
            self._request_replacements()
        self.num_classes = self.group.num_classes(members[0], self.timeout)
        self._form(self.state)
        if self.config.elastic.warm_spares:
            # Only those with room: a spare that waits for a node must not hold up the start.
            with_room = self.spares.with_room(_PING_TIMEOUT_S)
            ready = self.spares.wait_ready(self.timeout, members=with_room) if with_room else []
            self.say(f"{len(ready)} warm spare(s) ready")
        split = f", {layout.split_rows} row(s) span nodes" if layout.split_rows else ""
        self.say(f"grid {grid} formed on {len(set(nodes))} node(s){split}")
        self._enter(Phase.TRAINING)
        return self.state

    def adopt(self, grid: Grid, members: list[Member]) -> None:
        """Take ``members`` (already started and formed elsewhere) as the grid in force,
        at its target (the control benchmark's stub workers)."""
        self.state = GridState(grid, 0, list(members))
        self.target = grid
        self._enter(Phase.TRAINING)

    def _initial_grid(self) -> Grid:
        first_phase = self.config.schedule.phases[0].grid
        if first_phase:
            return Grid.parse(first_phase)
        if self.config.grid.shape != "auto":
            return Grid.parse(self.config.grid.shape)
        per_node = self.group.cluster_slots()
        proposal = propose_grid(per_node, preferred_cols=max(per_node.values(), default=1),
                                max_workers=self.config.grid.max_workers)
        if proposal is None:
            raise ElasticAbort("grid.shape=auto found no room for a single worker in the cluster")
        self.say(f"grid auto: {proposal.reason}")
        return proposal.grid

    def _form(self, state: GridState) -> None:
        """Every member joins its row, column and world groups of this generation."""
        # All constructors first (model built, data indexed), so the rendezvous below
        # waits only for the group formation itself.
        self.group.call_each(state.members, "ping", timeout=self.timeout)
        algorithm = self._algorithm_for(state)
        pending = [self.group.submit([m], "join", state.grid, rank, state.generation,
                                     algorithm)[0]
                   for rank, m in enumerate(state.members)]
        # Fail fast here too: a member that died on the way makes the others give up
        # their rendezvous at once instead of waiting out its timeout.
        pids = self._gather(state, "join", pending, step=self.committed_step)
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

    def commit(self, clock: Clock) -> None:
        """In-memory commit on every member, then on the clock (the clock's commit is
        the one everybody returns to, so it moves only once all members hold it)."""
        step = clock.state()["global_step"]
        self.run_on_grid("commit", step, step=step)
        self.members_committed(clock)

    def members_committed(self, clock: Clock) -> None:
        """Every member holds a commit of the clock's position (it committed at the end of
        its step window): check that they hold the same model, commit the clock, then
        grow if spares are ready."""
        checked = self.group.now()
        if self.config.elastic.check_replicas:
            self._check_replicas(clock.state()["global_step"])
        self._window_replicas = None
        checked = self.group.now() - checked
        self.committed_step = clock.commit()["global_step"]
        self.metrics.event("commit", global_step=self.committed_step,
                           replica_check_s=round(checked, 6))
        self._grow_if_ready(clock)

    def _check_replicas(self, step: int) -> None:
        """Every member's digest of its commit of ``step`` is the same; else
        :class:`ReplicasDiverged`, with the tensors that differ. A window that committed
        brought the digests with its answer (no call more, relayed or not); a commit on
        its own asks every member. The per-tensor lists (a few KB each) are asked for
        only from the ranks that differ and the one they are compared with."""
        held = self._window_replicas
        if held is None or held[0] != step:
            digests = self.run_on_grid("replica_digest", step, step=step)
            replicas = merge_replicas([((d, (r,)),) for r, d in enumerate(digests)])
        else:
            replicas = held[1]
        if len(replicas) <= 1:
            return  # they agree (or the workers keep no digests: stubs)
        totals = {rank: digest for digest, ranks in replicas for rank in ranks}
        order = sorted(totals)
        ref = order[reference_rank([totals[r] for r in order])]
        ranks = [ref] + [r for r in order if totals[r] != totals[ref]]
        members = [self.state.members[r] for r in ranks]
        detail = self.group.call_each(members, "replica_digest", step, True,
                                      timeout=self.timeout)
        message = divergence(step, dict(zip(ranks, detail, strict=True)), reference=ref) or (
            f"replicas diverged at the commit of step {step}: digests {replicas}")
        self.metrics.event("replicas_diverged", global_step=step, message=message)
        raise ReplicasDiverged(step, message)

    def load_state(self, payload: dict, members: list[Member] | None = None) -> None:
        """Load a checkpoint payload's model/optimizer/scaler into ``members`` (default:
        every member)."""
        state = {"model": payload["model"], "optimizer": payload["optimizer"],
                 "scaler": payload.get("scaler")}
        members = self.state.members if members is None else members
        self.group.load_state(members, state, self.timeout)

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
        pending = self.group.submit(state.members, method, *args)
        return self._gather(state, method, pending, step=step, plan=plan, timeout=timeout)

    def run_window(self, plans: list[StepPlan], commit: bool, timeout: float
                   ) -> list[list[StepResult]]:
        """Every member trains the window ``plans`` (and commits after it with
        ``commit``); per step, the members' results. With more members than
        ``runtime.relay_fanout`` the window goes down the relay tree
        (:mod:`flashtrain.train.relay`): one call from here, and per step one result
        merged over the grid. Fails like :meth:`run_on_grid`; a window's failure says how
        far each member got (``StepFailed.reached``) on both paths."""
        state, fanout = self.state, self.config.runtime.relay_fanout
        if not fanout or len(state.members) <= fanout:
            pending = self.group.submit(state.members, "train_window", plans, commit)
            try:
                per_rank = self._gather(state, "train_window", pending, plan=plans[0],
                                        step=plans[0].global_step, timeout=timeout)
            except StepFailed as failure:
                raise self._window_lost(failure, plans) from failure.cause
            steps = [list(step) for step in zip(*per_rank, strict=True)]
            if commit:
                self._window_replicas = (plans[-1].global_step + 1,
                                         merge_replicas([r.replicas for r in steps[-1]]))
            return steps
        self._plant_relays(state, fanout, plans[0])
        try:
            answer = self.group.call(state.members[0], "relay_window", state.generation, plans,
                                     commit, timeout, timeout=timeout + HOP_S)
        except self.group.failures as err:  # rank 0 died, or the tree missed its deadline
            self.group.abort(state.members, state.generation,
                             f"rank 0 failed in relay_window: {type(err).__name__}")
            if not self.group.is_membership_loss(err):
                raise WorkerError(0, "relay_window", err) from err
            raise StepFailed(plans[0], err, step=plans[0].global_step, reached=[]) from err
        if not answer.errors:
            if commit:
                self._window_replicas = (plans[-1].global_step + 1, answer.steps[-1].replicas)
            return [[merged] for merged in answer.steps]
        # The relays aborted their subtrees; a dead relay's orphans are reached from here.
        self.group.abort(state.members, state.generation,
                         f"rank {answer.errors[0][0]} failed in a step window")
        verdict = classify(answer.errors, self.group.is_membership_loss, self.group.is_death)
        if verdict.bug:
            raise WorkerError(verdict.rank, "train_window", verdict.cause) from verdict.cause
        raise StepFailed(plans[0], verdict.cause, step=plans[0].global_step,
                         reached=answer.reached) from verdict.cause

    def _window_lost(self, failure: StepFailed, plans: list[StepPlan]) -> StepFailed:
        """A direct window's failure with how far each member got: the survivors return
        at once (their collectives were aborted); those that finished the window reached
        the position after it, the others the step their error names."""
        self.group.settle(failure.pending, self.config.collective.timeout_s)
        outcomes = [self.group.outcome(call) for call in failure.pending]
        reached = reached_by(outcomes, plans[-1].global_step + 1)
        return StepFailed(plans[0], failure.cause, failure.pending, step=plans[0].global_step,
                          reached=reached)

    def _plant_relays(self, state: GridState, fanout: int, plan: StepPlan) -> None:
        """Give every member of ``state`` its place in the relay tree (once per grid)."""
        if self._relays_of is state:
            return
        pending = self.group.plant_relays(state.members, state.generation, fanout)
        try:
            self._gather(state, "set_relay", pending, step=plan.global_step, plan=plan)
        except StepFailed as err:  # nobody trained: the window fails at its first step
            raise StepFailed(plan, err.cause, step=plan.global_step, reached=[]) from err.cause
        self._relays_of = state

    def _gather(self, state: GridState, method: str, pending: list, *, step: int | None,
                plan=None, timeout: float | None = None) -> list:
        """The results of ``pending`` (one call of ``method`` per member of ``state``, in
        rank order), failing fast as :meth:`run_on_grid` describes."""
        timeout = self.timeout if timeout is None else timeout
        got = self.group.gather(pending, timeout)
        if got.ok:
            return got.results
        if got.timed_out:
            err = self.group.timeout_error(
                f"{method} did not finish on {len(got.unsettled)} member(s) within "
                f"{timeout:g}s (runtime.remote_timeout_s={self.timeout:g}s per step)")
            self.group.abort(state.members, state.generation, f"{method} timed out")
            raise StepFailed(plan, err, pending, step=step) from None
        rank, err = got.failed, got.error
        self.group.abort(state.members, state.generation,
                         f"rank {rank} failed in {method}: {type(err).__name__}")
        if not self.group.is_membership_loss(err):
            self.group.settle(got.unsettled, _PING_TIMEOUT_S)
            raise WorkerError(rank, method, err) from err
        raise StepFailed(plan, err, pending, step=step) from err

    # -- hooks around a step -------------------------------------------------------------

    def before_step(self, plan: StepPlan, clock: Clock) -> None:
        """Planned resizes at phase boundaries, then injected faults."""
        if plan.phase_grid and Grid.parse(plan.phase_grid) != self.target:
            self._retarget(Grid.parse(plan.phase_grid), plan.epoch, clock)
        self.faults.before_step(plan.global_step, self.state.members)

    def after_step(self, plan: StepPlan, finished_at: float | None = None) -> None:
        """Close the recovery clock of the last re-form at the first completed step (it
        ended at ``finished_at``, wall time; default now); note which starting spares
        have room by now (the start of their join clock)."""
        self._note_placement()
        if self._pending_recovery is None:
            return
        record, began = self._pending_recovery
        ended = self.group.wall() if finished_at is None else finished_at
        record["recovery_seconds"] = max(ended - began, 0.0)
        self.metrics.reform(**record)
        self.say(f"re-formed {record['old_grid']} -> {record['new_grid']} in "
                 f"{record['recovery_seconds']:.2f}s to the next step "
                 f"({record['steps_rolled_back']} step(s) rolled back): {record['reason']}")
        self._pending_recovery = None

    # -- re-forming ----------------------------------------------------------------------

    def recover(self, failure: StepFailed, clock: Clock) -> None:
        """Re-form over the survivors after a failed step or commit, from the last commit."""
        began = self.group.now()
        if not self.config.elastic.enabled:
            raise ElasticAbort(f"{failure} and elastic.enabled is false") from failure.cause
        if len(self.reforms) >= self.config.elastic.max_reforms:
            raise ElasticAbort(f"{failure}: elastic.max_reforms={self.config.elastic.max_reforms} "
                               "re-forms already") from failure.cause
        self._enter(Phase.RECOVERING)
        self.group.settle(failure.pending, self.config.collective.timeout_s + _PING_TIMEOUT_S)
        old = self.state
        answers = self.group.ping(old.members, _PING_TIMEOUT_S)
        survivors = [m for m, ok in zip(old.members, answers, strict=True) if ok]
        for member, ok in zip(old.members, answers, strict=True):
            if not ok:
                self.group.kill(member)
                self.spares.give_back(member)  # once, even on a retry
        where = f"step {failure.step}" if failure.plan else f"the commit at step {failure.step}"
        self.say(f"{where} failed ({type(failure.cause).__name__}); "
                 f"{len(survivors)} of {len(old.members)} workers answer")
        if not survivors:
            self.state = GridState(old.grid, old.generation, [])
            raise GridLost(failure)
        self.group.call_each(survivors, "leave", timeout=self.timeout)
        resume_step = clock.rollback()["global_step"]
        self.state = GridState(old.grid, old.generation, survivors)
        self._request_replacements()
        decision = self._decide_with_wait(lost=True)
        grid, members, newcomers = self._choose(decision.grid, survivors)
        self.group.call_each([m for m in members if m not in newcomers], "rollback", resume_step,
                             timeout=self.timeout)
        self._carry_out(Handover(grid, members, newcomers, decision.reason,
                                 type(failure.cause).__name__, failure.step, resume_step),
                        old.grid, survivors[0], began)

    def restart(self, payload: dict, failure: StepFailed, source: str) -> None:
        """Every member was lost (:class:`GridLost`): form a fresh grid from spares,
        waiting for them at most ``elastic.wait_for_resources_s``, and load ``payload``
        (the newest durable checkpoint, whose clock the caller has already restored)."""
        began = self.group.now()
        self._enter(Phase.RESTARTING)
        old = self.state
        self.state = GridState(old.grid, old.generation, [])
        self._request_replacements()
        decision = self._decide_with_wait(lost=True)
        grid, members, _ = self._choose(decision.grid, [])
        step = payload["clock"]["global_step"]
        # Members first, so a failure from here on is an ordinary loss of these members.
        self.state = GridState(old.grid, old.generation, members)
        self.load_state(payload, members)
        self.group.call_each(members, "commit", step, timeout=self.timeout)
        self.committed_step = step
        reason = (f"every worker was lost: restarted from the durable checkpoint {source} "
                  f"(step {step}) on {decision.reason}")
        self._carry_out(Handover(grid, members, [], reason, "restart", failure.step, step),
                        old.grid, None, began)

    def _grow_if_ready(self, clock: Clock) -> None:
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
        began = self.group.now()
        self._enter(Phase.GROWING)
        old = self.state
        self.group.call_each(old.members, "leave", timeout=self.timeout)
        grid, members, newcomers = self._choose(decision.grid, old.members)
        step = self.committed_step
        self._carry_out(Handover(grid, members, newcomers, decision.reason, "grow", step, step),
                        old.grid, old.members[0], began)

    def _wait_for_overdue_spares(self) -> None:
        """Pause here (a commit boundary) for replacements that have had room for
        ``join_grace_s`` without getting ready, at most ``join_wait_s``, once each: with
        training paused, the cores are theirs."""
        self.spares.note_placement()
        missing = self.target.num_workers - self.state.grid.num_workers - len(self.spares.poll())
        overdue = self.spares.overdue(self.join_grace_s, self.group.wall())[:max(missing, 0)]
        if not overdue:
            return
        self._enter(Phase.JOIN_WAIT)
        began = self.group.now()
        for member in overdue:
            member.waited_for = True
        self.say(f"grid {self.state.grid} is below target {self.target}: waiting up to "
                 f"{self.join_wait_s:g}s for {len(overdue)} replacement(s) it has been short "
                 f"of, with room, for {self.join_grace_s:g}s or more")
        ready = self.spares.wait_ready(self.join_wait_s, members=overdue)
        self.metrics.event("join_wait", seconds=round(self.group.now() - began, 3),
                           replacements=len(overdue),
                           ready=sum(any(m is r for r in ready) for m in overdue))
        self._enter(Phase.TRAINING)

    def _retarget(self, target: Grid, epoch: int, clock: Clock) -> None:
        """A schedule phase names a new grid: shrink now, or start workers to grow."""
        self.say(f"schedule phase asks for grid {target} (was {self.target})")
        self.target = target
        if target.num_workers >= self.state.grid.num_workers:
            self._request_replacements()
            return
        self.commit(clock)
        began = self.group.now()
        self._enter(Phase.RESHAPING)
        old = self.state
        self.group.call_each(old.members, "leave", timeout=self.timeout)
        grid, members, _ = self._choose(target, old.members)
        self._release_unneeded_spares(epoch)
        step = self.committed_step
        self._carry_out(Handover(grid, members, [], f"schedule phase: {old.grid} -> {grid}",
                                 "phase", step, step), old.grid, None, began)

    def _release_unneeded_spares(self, epoch: int) -> None:
        """Workers left out by a planned shrink stay warm only if a later phase will want
        them back; otherwise they are stopped and their resources given back."""
        later = [Grid.parse(p.grid).num_workers for p in self.config.schedule.phases
                 if p.grid and p.start_epoch > epoch]
        keep = max(later, default=0) - self.target.num_workers
        surplus = self.spares.ready[max(keep, 0):]
        for member in surplus:
            self.group.kill(member)
        self.spares.take(surplus)

    def _request_replacements(self) -> None:
        wanted = self.target.num_workers + self.config.elastic.warm_spares
        missing = wanted - len(self.state.members) - self.spares.count
        if missing > 0:
            self.spares.request(missing)
        self._mark_needed()

    def _note_placement(self) -> None:
        """Look starting spares up, at most every PLACEMENT_POLL_S."""
        if any(m.placed_at is None for m in self.spares.starting) and \
                self.group.now() - self._placement_checked > PLACEMENT_POLL_S:
            self._placement_checked = self.group.now()
            self.spares.note_placement()

    def _mark_needed(self) -> None:
        self.spares.mark_needed(self.state.grid.num_workers < self.target.num_workers,
                                self.group.wall())

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
        started = self.group.now()
        while True:
            waited = self.group.now() - started
            decision = self._decide(self.state.members + self.spares.poll(), lost, waited)
            if isinstance(decision, Abort):
                self._enter(Phase.STOPPED)
                raise ElasticAbort(decision.reason)
            if not isinstance(decision, Wait):
                return decision
            self._note_placement()
            self.group.sleep(WAIT_POLL_S)  # polling the spares' start-up, bounded by Abort

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

    def _carry_out(self, plan: Handover, old_grid: Grid, source: Member | None,
                   began: float) -> None:
        """Newcomers load the committed state, the grid forms under a new generation, and
        the re-form is recorded (its recovery clock closes at the first step after)."""
        if plan.newcomers:
            self.group.hand_over(source, plan.newcomers, plan.resume_step, self.timeout)
        self._enter(Phase.FORMING)
        self.state = GridState(plan.grid, self.state.generation + 1, plan.members)
        self._form(self.state)
        joined_at = self.group.wall()
        newcomers = []
        for member in plan.members:
            if member.joined_at is None and member.requested_at is not None:
                member.joined_at = joined_at
                newcomers.append(member.join_record(joined_at, self.metrics.start_time))
        self._mark_needed()
        record = {"time": self.metrics.elapsed(), "reason": plan.reason, "cause": plan.cause,
                  "old_grid": str(old_grid), "new_grid": str(plan.grid),
                  "failed_step": plan.failed_step, "resume_step": plan.resume_step,
                  "steps_rolled_back": plan.failed_step - plan.resume_step,
                  "generation": self.state.generation, "recovery_seconds": None,
                  "newcomers": newcomers}
        self.reforms.append(record)
        # ``began`` is a monotonic reading; the first step's end comes back as wall time.
        self._pending_recovery = (record, self.group.wall() - (self.group.now() - began))
        self._enter(Phase.TRAINING)

    def shutdown(self) -> None:
        self._enter(Phase.STOPPED)
        self.group.shutdown(self.state.members)
