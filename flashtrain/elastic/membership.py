"""Who is in the grid, who is warming up to join it, and who is alive.

A :class:`Member` is a worker actor with the node it runs on and the placement-group
bundle it holds. A :class:`SparePool` starts replacement or additional workers in the
background; a spare is *ready* once its constructor has finished (model built, data
indexed), so joining it at a commit boundary costs no process start on the critical path.

Each spare carries the moments of its way into the grid (wall-clock seconds, so the
worker's own "constructor done" reading compares with the driver's): *requested* (the
controller asked for it), *placed* (its bundle had a node: from then on only its start
stands between it and the grid), *ready* (constructor done) and *joined* (first grid
formed with it). The re-form records report them (see
:meth:`flashtrain.elastic.controller.ElasticController`).

Every placement group here lives on one node (:func:`reserve_by_node`; spares hold
one-bundle groups), so a node that leaves takes whole groups with it, and those are
removed at once (:meth:`SparePool.give_back`): Ray 2.60's GCS retries a group that lost
a bundle with its node with no backoff while there is no room for it, which kept a
core of this 2-core machine busy (measured: 1.0 core, ``gcs_server``) and starved the
very replacements that would have filled the grid again (ray-project/ray#65007).
"""

from __future__ import annotations

import time
from collections import Counter

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group

from flashtrain.config import GridConfig
from flashtrain.elastic.worker_group import Member
from flashtrain.train.placement import (
    PlacementTimeoutError,
    Reservation,
    bundle_node_ids,
    bundle_resources,
    in_bundle,
    reserve,
    reserve_async,
)
from flashtrain.train.relay import RELAY_GROUP
from flashtrain.train.worker import CONTROL_GROUP, Worker

WorkerActor = ray.remote(max_restarts=0, max_task_retries=0,
                         concurrency_groups={CONTROL_GROUP: 1, RELAY_GROUP: 1})(Worker)
_DEAD = (RayActorError, RayTaskError, GetTimeoutError)
PLACEMENT_POLL_S = 0.5  # how often, at most, starting spares are looked up in the GCS


def start_worker(grid_cfg: GridConfig, reservation: Reservation, bundle: int, config,
                 task) -> Member:
    """Start a worker actor in ``bundle`` of ``reservation`` (its node is learnt later),
    training ``task`` (see :class:`~flashtrain.train.worker.Worker`)."""
    actor = WorkerActor.options(
        num_cpus=grid_cfg.cpus_per_worker, num_gpus=1 if grid_cfg.use_gpu else 0,
        scheduling_strategy=in_bundle(reservation.group, bundle),
    ).remote(config, task)
    return Member(actor, None, reservation, bundle, name=actor._actor_id.hex())


def reserve_by_node(grid_cfg: GridConfig, num_workers: int, timeout_s: float,
                    name: str) -> list[tuple[Reservation, int]]:
    """``num_workers`` bundles packed as Ray packs one group (rows want a node), but held
    as one STRICT_PACK group per node (placed there through Ray's experimental
    ``_soft_target_node_id`` hint): ``[(reservation, bundle index)]``, grouped by node.
    Raises like :func:`flashtrain.train.placement.reserve`."""
    packed = reserve(grid_cfg, num_workers, timeout_s, name=name)
    per_node = Counter(packed.bundle_nodes)
    packed.release()  # its resources go straight to the per-node groups below
    groups = {node: placement_group([bundle_resources(grid_cfg)] * count, strategy="STRICT_PACK",
                                    name=f"{name}-{index}", _soft_target_node_id=node)
              for index, (node, count) in enumerate(per_node.items())}
    ready, _ = ray.wait([g.ready() for g in groups.values()], num_returns=len(groups),
                        timeout=timeout_s)
    if len(ready) < len(groups):
        for group in groups.values():
            ray.util.remove_placement_group(group)
        raise PlacementTimeoutError(f"the {num_workers} workers' per-node placement groups were "
                                    f"not placed within {timeout_s:.0f}s")
    slots = []
    for node, group in groups.items():
        reservation = Reservation(group, bundle_node_ids(group, per_node[node]))
        slots += [(reservation, bundle) for bundle in range(per_node[node])]
    return slots


def _bundle_placed(reservation: Reservation, bundle: int) -> bool:
    table = ray.util.placement_group_table(reservation.group)
    return bool(table.get("bundles_to_node_id", {}).get(bundle))


def alive(members: list[Member], timeout_s: float) -> list[bool]:
    """Which members answer a ping within ``timeout_s`` (a busy or dead one does not)."""
    refs = [m.actor.ping.remote() for m in members]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    ready_set = set(ready)
    answers = []
    for ref in refs:
        if ref not in ready_set:
            answers.append(False)
            continue
        try:
            answers.append(bool(ray.get(ref, timeout=0)))
        except _DEAD:
            answers.append(False)
    return answers


def _actor_pid(actor_id: str) -> int:
    """The actor's process id in Ray's GCS actor table (0 while it has no process)."""
    from ray._private import state  # the actor table; no dashboard needed

    try:
        return int((state.actors(actor_id=actor_id) or {}).get("Pid") or 0)
    except Exception:  # noqa: BLE001 - not registered yet, or the GCS is busy: ask again later
        return 0


def _ready_info(worker: Worker) -> tuple[str, float]:
    """Runs in a spare once its constructor is done: its node and the moment (its clock)."""
    return worker.node_id(), time.time()


class SparePool:
    """Workers started in the background, to join the grid when they are ready.

    Replacements reuse the bundle a dead member held (on a node loss Ray re-places
    that bundle when capacity returns); growth beyond the reserved bundles reserves a
    new one-bundle placement group, which waits for a node to join.
    """

    def __init__(self, config, task):
        self._config = config
        self._task = task
        self._starting: list[tuple[Member, object]] = []  # (member, ready ref)
        self.ready: list[Member] = []
        self.free_bundles: list[tuple[Reservation, int]] = []
        self.reservations: list[Reservation] = []  # every group of the run, released at the end
        self._released: set[int] = set()  # id() of the groups removed already
        self._given_back: set[int] = set()  # id() of the dead members handled already

    @property
    def count(self) -> int:
        return len(self._starting) + len(self.ready)

    @property
    def starting(self) -> list[Member]:
        """Spares whose constructor has not finished (or not been seen to finish)."""
        return [member for member, _ in self._starting]

    def request(self, num_workers: int) -> None:
        """Start ``num_workers`` more workers in the background."""
        for _ in range(num_workers):
            if self.free_bundles:
                reservation, bundle = self.free_bundles.pop(0)
            else:
                # Group names are unique in a namespace: number them.
                reservation = reserve_async(self._config.grid, 1,
                                            name=f"flashtrain-spare-{len(self.reservations)}")
                self.reservations.append(reservation)
                bundle = 0
            member = start_worker(self._config.grid, reservation, bundle, self._config,
                                  self._task)
            member.requested_at = time.time()
            self._starting.append((member, member.actor.__ray_call__.remote(_ready_info)))

    def note_placement(self) -> None:
        """Record when each starting spare is first seen with a process (its pid in Ray's
        GCS actor table: Ray found it room and its constructor runs; a spare that waits
        for room has none). One GCS query per spare not seen placed yet."""
        now = time.time()
        for member in self.starting:
            if member.placed_at is None and _actor_pid(member.actor_id):
                member.placed_at = now

    def with_room(self, timeout_s: float) -> list[Member]:
        """The starting spares whose placement group has room, waiting for their groups
        at most ``timeout_s`` (a new group is placed within moments when there is room)."""
        deadline = time.monotonic() + timeout_s
        ready = {}
        for member in self.starting:
            group = member.reservation.group
            if id(group) not in ready:
                ready[id(group)] = group.wait(timeout_seconds=max(deadline - time.monotonic(), 0))
        return [m for m in self.starting if ready[id(m.reservation.group)]]

    def poll(self) -> list[Member]:
        """Move spares whose start has finished into :attr:`ready`; returns them all."""
        if self._starting:
            refs = [ref for _, ref in self._starting]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            still = []
            for member, ref in self._starting:
                if ref not in done:
                    still.append((member, ref))
                    continue
                try:
                    member.node, member.ready_at = ray.get(ref, timeout=0)
                    self.ready.append(member)
                except _DEAD:
                    self.give_back(member)
            self._starting = still
        return self.ready

    def overdue(self, grace_s: float, now: float) -> list[Member]:
        """Starting spares the grid has been short of, with room, for ``grace_s`` or more,
        that nobody has paused for yet."""
        return [m for m in self.starting if not m.waited_for
                and (since := m.short_since()) is not None and now - since >= grace_s]

    def mark_needed(self, short: bool, now: float) -> None:
        """The grid is below its target (``short``) or back at it: start or clear the
        "needed" clock of every spare not yet in a grid."""
        for member in self.starting + self.ready:
            if member.joined_at is not None:
                continue
            if not short:
                member.needed_at = None
            elif member.needed_at is None:
                member.needed_at = now

    def wait_ready(self, timeout_s: float, members: list[Member] | None = None) -> list[Member]:
        """Block until every starting spare (or each of ``members``) is ready, or
        ``timeout_s`` passes; returns the ready ones. Notes placements meanwhile."""
        wanted = {id(m) for m in members} if members is not None else None
        deadline = time.monotonic() + timeout_s
        while True:
            self.note_placement()
            refs = [ref for member, ref in self._starting
                    if wanted is None or id(member) in wanted]
            left = deadline - time.monotonic()
            if not refs or left <= 0:
                return self.poll()
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=min(left, PLACEMENT_POLL_S))
            if len(done) == len(refs):
                return self.poll()

    def give_back(self, member: Member) -> None:
        """A dead member's bundle (once per member): kept for the next replacement while
        Ray still has it on a live node; otherwise its node is gone, with every bundle of
        its group, and the group is removed (see the module docstring)."""
        if id(member) in self._given_back or id(member.reservation.group) in self._released:
            return
        self._given_back.add(id(member))
        if _bundle_placed(member.reservation, member.bundle):
            self.free_bundles.append((member.reservation, member.bundle))
            return
        group = member.reservation.group
        self._released.add(id(group))
        self.free_bundles = [(r, b) for r, b in self.free_bundles if r.group is not group]
        member.reservation.release()

    def take(self, members: list[Member]) -> None:
        """Remove ``members`` from the ready list (they joined the grid)."""
        taken = {id(m) for m in members}
        self.ready = [m for m in self.ready if id(m) not in taken]

    def shutdown(self) -> None:
        for member, _ in self._starting:
            ray.kill(member.actor, no_restart=True)
        for member in self.ready:
            ray.kill(member.actor, no_restart=True)
        self._starting, self.ready = [], []
        for reservation in self.reservations:
            if id(reservation.group) not in self._released:
                self._released.add(id(reservation.group))
                reservation.release()
