"""The elastic controller: forms the grid, and re-forms it when members are lost.

The controller carries out decisions; it does not make them. :func:`flashtrain.policy.decide`
picks the grid, and the controller: finds the dead, kills them, has the survivors leave
their groups and roll back to the last in-memory commit, rolls the schedule clock back
to the same commit, lays the new grid over the survivors and forms its groups under a
new generation. Every re-form is recorded (metrics.jsonl and summary.json).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from flashtrain.config import FlashtrainConfig
from flashtrain.policy import Abort, Keep, Reform, Wait, decide, propose_grid
from flashtrain.topology import Grid, layout_grid
from flashtrain.train.clock import StepPlan
from flashtrain.train.metrics import MetricsWriter
from flashtrain.train.placement import Reservation, in_bundle, reserve
from flashtrain.train.worker import Worker

log = logging.getLogger(__name__)

WorkerActor = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
_PING_TIMEOUT_S = 5.0


class StepFailed(RuntimeError):
    """A step did not complete on every member (a death, a timeout, a task error)."""

    def __init__(self, plan: StepPlan, cause: BaseException, pending: list | None = None):
        super().__init__(f"step {plan.global_step} failed: {type(cause).__name__}: {cause}")
        self.plan = plan
        self.cause = cause
        self.pending = pending or []  # the step's object refs, some may still be running


class ElasticAbort(RuntimeError):
    """The run cannot continue (too few workers for too long, too many re-forms)."""


@dataclass
class GridState:
    """The grid in force: its shape, generation and the actor of each rank."""

    grid: Grid
    generation: int
    members: list = field(default_factory=list)
    member_nodes: list[str] = field(default_factory=list)


class ElasticController:
    """Owns the worker actors and the grid they form."""

    def __init__(self, config: FlashtrainConfig, data_cache, metrics: MetricsWriter, say=print):
        self.config = config
        self.data_cache = str(data_cache)
        self.metrics = metrics
        self.say = say
        self.timeout = config.runtime.remote_timeout_s
        self.reforms: list[dict] = []
        self.committed_step = 0
        self.num_classes = 0
        self._reservations: list[Reservation] = []
        self._pending_recovery: tuple[dict, float] | None = None
        self._faults_fired: set[tuple[str, int]] = set()

    # -- forming -------------------------------------------------------------------------

    def start(self) -> GridState:
        """Reserve the workers of the configured grid, start them and form the groups."""
        grid = self._initial_grid()
        reservation = reserve(self.config.grid, grid.num_workers, self.timeout, name="flashtrain")
        self._reservations.append(reservation)
        layout = layout_grid(reservation.bundle_nodes, grid)
        actors = [self._new_actor(reservation, slot) for slot in layout.slot_of_rank]
        nodes = [reservation.bundle_nodes[slot] for slot in layout.slot_of_rank]
        self.num_classes = ray.get(actors[0].__ray_call__.remote(lambda w: w.num_classes),
                                   timeout=self.timeout)
        self.state = GridState(grid, 0, actors, nodes)
        self._form(self.state)
        split = f", {layout.split_rows} row(s) span nodes" if layout.split_rows else ""
        self.say(f"grid {grid} formed on {len(set(nodes))} node(s){split}")
        return self.state

    def _initial_grid(self) -> Grid:
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

    def _new_actor(self, reservation: Reservation, slot: int):
        grid_cfg = self.config.grid
        return WorkerActor.options(
            num_cpus=grid_cfg.cpus_per_worker, num_gpus=1 if grid_cfg.use_gpu else 0,
            scheduling_strategy=in_bundle(reservation.group, slot),
        ).remote(self.config, self.data_cache)

    def _form(self, state: GridState) -> None:
        """Every member joins its row, column and world groups of this generation."""
        refs = [member.join.remote(state.grid, rank, state.generation)
                for rank, member in enumerate(state.members)]
        ray.get(refs, timeout=self.timeout)

    # -- state ---------------------------------------------------------------------------

    def commit(self, clock) -> None:
        """In-memory commit on every member and on the clock, at the same step."""
        ray.get([m.commit.remote() for m in self.state.members], timeout=self.timeout)
        self.committed_step = ray.get(clock.commit.remote(), timeout=self.timeout)["global_step"]

    def load_state(self, payload: dict) -> None:
        state = {"model": payload["model"], "optimizer": payload["optimizer"],
                 "scaler": payload.get("scaler")}
        ref = ray.put(state)
        ray.get([m.load_state.remote(ref) for m in self.state.members], timeout=self.timeout)

    # -- hooks around a step -------------------------------------------------------------

    def before_step(self, plan: StepPlan, clock) -> None:
        """Inject configured faults at this step (each fires once)."""
        faults = self.config.faults
        step = plan.global_step
        victim = self.state.members[-1]
        if step in faults.kill_worker_at_steps and self._fire("kill", step):
            self.say(f"fault injection: killing rank {len(self.state.members) - 1} at step {step}")
            self.metrics.event("fault", fault="kill_worker", step=step)
            ray.kill(victim, no_restart=True)
        if step in faults.stall_worker_at_steps and self._fire("stall", step):
            seconds = self.config.collective.timeout_s * 2
            self.say(f"fault injection: stalling rank {len(self.state.members) - 1} for "
                     f"{seconds:.0f}s at step {step}")
            self.metrics.event("fault", fault="stall_worker", step=step, seconds=seconds)
            victim.stall.remote(seconds)

    def _fire(self, kind: str, step: int) -> bool:
        if (kind, step) in self._faults_fired:
            return False
        self._faults_fired.add((kind, step))
        return True

    def after_step(self, plan: StepPlan) -> None:
        """Close the recovery clock of the last re-form at the first completed step."""
        if self._pending_recovery is not None:
            record, began = self._pending_recovery
            record["recovery_seconds"] = time.monotonic() - began
            self.metrics.reform(**record)
            self.say(f"re-formed {record['old_grid']} -> {record['new_grid']} in "
                     f"{record['recovery_seconds']:.2f}s ({record['steps_rolled_back']} step(s) "
                     "rolled back)")
            self._pending_recovery = None

    # -- recovering ------------------------------------------------------------------------

    def recover(self, failure: StepFailed, clock) -> None:
        """Shrink to the survivors after a failed step, from the last commit."""
        began = time.monotonic()
        if not self.config.elastic.enabled:
            raise ElasticAbort(f"{failure} and elastic.enabled is false") from failure.cause
        if len(self.reforms) >= self.config.elastic.max_reforms:
            raise ElasticAbort(f"{failure}: elastic.max_reforms={self.config.elastic.max_reforms} "
                               "re-forms already") from failure.cause
        old = self.state
        # Survivors blocked in a collective with a dead peer are released by the
        # collective timeout; wait for that (bounded) before asking who is alive.
        ray.wait(failure.pending, num_returns=len(failure.pending),
                 timeout=self.config.collective.timeout_s + _PING_TIMEOUT_S)
        alive = self._alive(old.members)
        for member, ok in zip(old.members, alive):
            if not ok:
                ray.kill(member, no_restart=True)
        survivors = [m for m, ok in zip(old.members, alive) if ok]
        nodes = [n for n, ok in zip(old.member_nodes, alive) if ok]
        self.say(f"step {failure.plan.global_step} failed ({type(failure.cause).__name__}); "
                 f"{len(survivors)} of {len(old.members)} workers alive")
        ray.get([m.leave.remote() for m in survivors], timeout=self.timeout)
        decision = self._decide(old.grid, nodes)
        if isinstance(decision, (Abort, Wait)):
            raise ElasticAbort(decision.reason) from failure.cause
        grid = decision.grid
        layout = layout_grid(nodes, grid)
        members = [survivors[slot] for slot in layout.slot_of_rank]
        for spare in set(range(len(survivors))) - set(layout.slot_of_rank):
            ray.kill(survivors[spare], no_restart=True)  # no spares kept yet in this version
        ray.get([m.rollback.remote() for m in members], timeout=self.timeout)
        clock_state = ray.get(clock.rollback.remote(), timeout=self.timeout)
        self.state = GridState(grid, old.generation + 1, members,
                               [nodes[slot] for slot in layout.slot_of_rank])
        self._form(self.state)
        record = {"time": self.metrics.elapsed(), "reason": decision.reason,
                  "cause": f"{type(failure.cause).__name__}", "old_grid": str(old.grid),
                  "new_grid": str(grid), "failed_step": failure.plan.global_step,
                  "resume_step": clock_state["global_step"],
                  "steps_rolled_back": failure.plan.global_step - clock_state["global_step"],
                  "recovery_seconds": None}
        self.reforms.append(record)
        self._pending_recovery = (record, began)

    def _decide(self, current: Grid, nodes: list[str]) -> Reform | Keep | Wait | Abort:
        per_node: dict[str, int] = {}
        for node in nodes:
            per_node[node] = per_node.get(node, 0) + 1
        return decide(current, per_node, preferred_cols=current.cols,
                      min_workers=self.config.elastic.min_workers,
                      max_workers=self.config.grid.max_workers, lost_members=True)

    def _alive(self, members: list) -> list[bool]:
        refs = [m.ping.remote() for m in members]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_PING_TIMEOUT_S)
        alive = []
        for ref in refs:
            if ref not in ready:
                alive.append(False)  # busy past the deadline (stalled) counts as lost
                continue
            try:
                alive.append(bool(ray.get(ref, timeout=0)))
            except (RayActorError, RayTaskError, GetTimeoutError):
                alive.append(False)
        return alive

    def shutdown(self) -> None:
        for member in getattr(self, "state", GridState(Grid(1, 1), 0)).members:
            ray.kill(member, no_restart=True)
        for reservation in self._reservations:
            reservation.release()
