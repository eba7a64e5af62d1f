"""Who is in the grid, who is warming up to join it, and who is alive.

A :class:`Member` is a worker actor with the node it runs on and the placement-group
bundle it holds. A :class:`SparePool` starts replacement or additional workers in the
background; a spare is *ready* once its constructor has finished (model built, data
indexed), so joining it at a commit boundary costs no process start on the critical path.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from flashtrain.config import GridConfig
from flashtrain.train.placement import Reservation, in_bundle, reserve_async
from flashtrain.train.worker import CONTROL_GROUP, Worker

WorkerActor = ray.remote(max_restarts=0, max_task_retries=0,
                         concurrency_groups={CONTROL_GROUP: 1})(Worker)
_DEAD = (RayActorError, RayTaskError, GetTimeoutError)


@dataclass
class Member:
    """A worker actor, where it runs and which bundle it holds."""

    actor: object
    node: str | None
    reservation: Reservation
    bundle: int


def start_worker(grid_cfg: GridConfig, reservation: Reservation, bundle: int, config,
                 data_cache: str) -> Member:
    """Start a worker actor in ``bundle`` of ``reservation`` (its node is learnt later)."""
    actor = WorkerActor.options(
        num_cpus=grid_cfg.cpus_per_worker, num_gpus=1 if grid_cfg.use_gpu else 0,
        scheduling_strategy=in_bundle(reservation.group, bundle),
    ).remote(config, data_cache)
    return Member(actor, None, reservation, bundle)


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


class SparePool:
    """Workers started in the background, to join the grid when they are ready.

    Replacements reuse the bundle a dead member held (on a node loss Ray re-places
    that bundle when capacity returns); growth beyond the reserved bundles reserves a
    new one-bundle placement group, which waits for a node to join.
    """

    def __init__(self, config, data_cache: str):
        self._config = config
        self._data_cache = data_cache
        self._starting: list[tuple[Member, object]] = []  # (member, ready ref)
        self.ready: list[Member] = []
        self.free_bundles: list[tuple[Reservation, int]] = []
        self.reservations: list[Reservation] = []

    @property
    def count(self) -> int:
        return len(self._starting) + len(self.ready)

    def request(self, num_workers: int) -> None:
        """Start ``num_workers`` more workers in the background."""
        for _ in range(num_workers):
            if self.free_bundles:
                reservation, bundle = self.free_bundles.pop(0)
            else:
                reservation = reserve_async(self._config.grid, 1, name="flashtrain-spare")
                self.reservations.append(reservation)
                bundle = 0
            member = start_worker(self._config.grid, reservation, bundle, self._config,
                                  self._data_cache)
            self._starting.append((member, member.actor.node_id.remote()))

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
                    member.node = ray.get(ref, timeout=0)
                    self.ready.append(member)
                except _DEAD:
                    self.free_bundles.append((member.reservation, member.bundle))
            self._starting = still
        return self.ready

    def wait_ready(self, timeout_s: float) -> list[Member]:
        """Block until every starting spare is ready (or ``timeout_s`` passes)."""
        ray.wait([ref for _, ref in self._starting], num_returns=len(self._starting),
                 timeout=timeout_s)
        return self.poll()

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
            reservation.release()
