"""The product's :class:`~flashtrain.elastic.worker_group.WorkerGroup`: Ray actors in
placement-group bundles, the schedule actor on the driver's node, wall time.

Every ``ray`` call of the control plane lives here (and in :mod:`.membership`, which
starts and pools the actors); the controller and the driver loop reach Ray only
through this object.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flashtrain.collective.errors import CollectiveError
from flashtrain.elastic.membership import SparePool, alive, reserve_by_node, start_worker
from flashtrain.elastic.worker_group import Clock, Gathered, Member, WorkerGroup
from flashtrain.train.clock import ScheduleActor
from flashtrain.train.relay import WindowRelay, children_of, subtree_of, wait_batch


def is_collective_failure(err: BaseException) -> bool:
    """A failure that means "the grid could not finish", as opposed to a bug or bad input
    in worker code: the worker died (Ray knows), a call timed out, or a collective gave
    up because a peer died, hung or was aborted."""
    if isinstance(err, RayActorError | GetTimeoutError | CollectiveError):
        return True  # (a relay's own window raises the collective's error itself)
    if isinstance(err, RayTaskError):
        return isinstance(err.as_instanceof_cause(), CollectiveError)
    return False


class RayClock(Clock):
    """The schedule actor, pinned to the driver's node: it must outlive any worker node
    (a zero-CPU actor could otherwise land on a node that later leaves)."""

    def __init__(self, schedule, clock_state: dict, timeout: float):
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = ScheduleActor.options(scheduling_strategy=here).remote(schedule, clock_state)
        self._timeout = timeout

    def state(self) -> dict:
        return ray.get(self.actor.state.remote(), timeout=self._timeout)

    def advance_window(self, plans: list) -> dict:
        return ray.get(self.actor.advance_window.remote(plans), timeout=self._timeout)

    def commit(self) -> dict:
        return ray.get(self.actor.commit.remote(), timeout=self._timeout)

    def rollback(self) -> dict:
        return ray.get(self.actor.rollback.remote(), timeout=self._timeout)

    def close(self) -> None:
        ray.kill(self.actor, no_restart=True)


class RayWorkerGroup(WorkerGroup):
    """Workers as Ray actors (see :mod:`flashtrain.elastic.membership`)."""

    failures = (RayActorError, RayTaskError, GetTimeoutError)

    def __init__(self, config, task):
        """``task``: what every worker trains (a :class:`flashtrain.Task`)."""
        self._config = config
        self._task = task
        self.spares = SparePool(config, self._task)

    # -- time ------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    # -- failures --------------------------------------------------------------------

    def is_membership_loss(self, err: BaseException) -> bool:
        return is_collective_failure(err)

    def is_death(self, err: BaseException) -> bool:
        return isinstance(err, RayActorError)

    def timeout_error(self, message: str) -> BaseException:
        return GetTimeoutError(message)

    # -- members ---------------------------------------------------------------------

    def cluster_slots(self) -> dict[str, int]:
        grid = self._config.grid
        resource = "GPU" if grid.use_gpu else "CPU"
        per_worker = 1.0 if grid.use_gpu else grid.cpus_per_worker
        return {node["NodeID"]: int(node["Resources"].get(resource, 0) // per_worker)
                for node in ray.nodes() if node["Alive"]}

    def start_grid(self, num_workers: int, timeout: float) -> list[Member]:
        slots = reserve_by_node(self._config.grid, num_workers, timeout, name="flashtrain")
        self.spares.reservations += list({id(r.group): r for r, _ in slots}.values())
        members = []
        for reservation, bundle in slots:
            member = start_worker(self._config.grid, reservation, bundle, self._config,
                                  self._task)
            member.node = reservation.bundle_nodes[bundle]
            members.append(member)
        return members

    def submit(self, members: list[Member], method: str, *args) -> list:
        return [getattr(m.actor, method).remote(*args) for m in members]

    def gather(self, pending: list, timeout: float) -> Gathered:
        index_of = {ref: index for index, ref in enumerate(pending)}
        results: list = [None] * len(pending)
        left = list(pending)
        deadline = time.monotonic() + timeout
        while left:
            ready, left = wait_batch(left, max(deadline - time.monotonic(), 0))
            if not ready:
                return Gathered(results, timed_out=True, unsettled=left)
            for ref in ready:
                try:
                    results[index_of[ref]] = ray.get(ref, timeout=0)
                except self.failures as err:
                    return Gathered(results, failed=index_of[ref], error=err, unsettled=left)
        return Gathered(results)

    def settle(self, pending: list, timeout: float) -> None:
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=timeout)

    def outcome(self, call) -> tuple[bool, object]:
        ready, _ = ray.wait([call], timeout=0)
        if not ready:
            return False, None
        try:
            return True, ray.get(call, timeout=0)
        except Exception as err:  # noqa: BLE001 - the caller reads the error
            return False, err

    def call(self, member: Member, method: str, *args, timeout: float):
        return ray.get(getattr(member.actor, method).remote(*args), timeout=timeout)

    def abort(self, members: list[Member], generation: int, reason: str) -> None:
        for member in members:  # a dead member's call just fails
            member.actor.abort_collectives.remote(generation, reason)

    def ping(self, members: list[Member], timeout: float) -> list[bool]:
        return alive(members, timeout)

    def kill(self, member: Member) -> None:
        ray.kill(member.actor, no_restart=True)

    def num_classes(self, member: Member, timeout: float) -> int:
        return ray.get(member.actor.__ray_call__.remote(lambda w: w.num_classes), timeout=timeout)

    def load_state(self, members: list[Member], state: dict, timeout: float) -> None:
        ref = ray.put(state)
        ray.get([m.actor.load_state.remote(ref) for m in members], timeout=timeout)

    def hand_over(self, source: Member, newcomers: list[Member], step: int,
                  timeout: float) -> None:
        # Through the object store: the state never passes through the driver.
        state_ref = source.actor.committed_state.remote(step)
        ray.get([m.actor.load_state.remote(state_ref) for m in newcomers], timeout=timeout)
        ray.get([m.actor.commit.remote(step) for m in newcomers], timeout=timeout)

    def plant_relays(self, members: list[Member], generation: int, fanout: int) -> list:
        actors, size = [m.actor for m in members], len(members)
        refs = []
        for rank, actor in enumerate(actors):
            kids = children_of(rank, size, fanout)
            relay = WindowRelay(generation, rank, [actors[k] for k in kids], kids,
                                [actors[r] for r in subtree_of(rank, size, fanout)])
            refs.append(actor.set_relay.remote(relay))
        return refs

    # -- the clock -------------------------------------------------------------------

    def start_clock(self, schedule, clock_state: dict, timeout: float) -> Clock:
        return RayClock(schedule, clock_state, timeout)
