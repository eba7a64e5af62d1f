"""Simulated capacity and spares: nodes with worker slots, replacements that wait for a
slot and then take ``process_start_s`` to start.

:class:`SimSpares` is the real :class:`~flashtrain.elastic.membership.SparePool` (its
bookkeeping: ``overdue``, ``mark_needed``, ``take``, the join clock) with the parts that
ask Ray replaced by the simulated cluster: a dead process frees its slot at once (Ray
re-places its bundle), a dead node takes its slots with it until its capacity returns,
if it does.
"""

from __future__ import annotations

from flashtrain.elastic.membership import SparePool
from flashtrain.elastic.worker_group import Member


class PlacementInfeasible(RuntimeError):
    """The cluster cannot hold the grid (Ray: PlacementInfeasibleError)."""


class SimSpares(SparePool):
    def __init__(self, group, nodes: int, slots: int):
        super().__init__(group.config, "")
        self._group = group
        self.slots_per_node = slots
        self.capacity = {f"node{n:04d}": slots for n in range(nodes)}
        self.used = dict.fromkeys(self.capacity, 0)
        self.returns: list[tuple[float, int]] = []  # (virtual time, slots) of nodes to come
        self._holding: set[int] = set()  # id() of the members that hold a slot
        self._doomed: dict[int, float] = {}  # id() of a starting spare -> when it dies
        self._slow: dict[int, float] = {}  # id() of a slow spare -> its start's factor

    # -- the cluster -----------------------------------------------------------------

    def free_slots(self) -> dict[str, int]:
        return {node: self.capacity[node] - self.used[node] for node in self.capacity}

    def place_initial(self, num_workers: int, ready_at: float) -> list[Member]:
        room = sum(self.free_slots().values())
        if room < num_workers:  # the real reservation's check_capacity fails at once too
            raise PlacementInfeasible(f"the cluster cannot hold {num_workers} workers "
                                      f"(room for {room})")
        members = []
        for node in sorted(self.capacity):
            while len(members) < num_workers and self.used[node] < self.capacity[node]:
                members.append(self._hold(self._group.new_member(node, ready_at), node))
        if len(members) < num_workers:
            raise RuntimeError(f"the simulated cluster has room for {len(members)} of "
                               f"{num_workers} workers")
        return members

    def _hold(self, member: Member, node: str) -> Member:
        self.used[node] += 1
        self._holding.add(id(member))
        member.node = member.actor.node = node
        return member

    def free(self, member: Member) -> None:
        if id(member) in self._holding:
            self._holding.discard(id(member))
            if member.node in self.used:
                self.used[member.node] -= 1

    def lose_node(self, node: str, returns_after_s: float | None) -> None:
        """``node`` leaves with its slots; a node like it joins ``returns_after_s`` later."""
        if node not in self.capacity:
            return
        for member, _ in self._starting:
            if member.node == node:
                self._group.die(member, self._group.t, f"node {node} left")
        del self.capacity[node], self.used[node]
        if returns_after_s is not None:
            self.returns.append((self._group.t + returns_after_s, self.slots_per_node))
        self._group.log(f"node {node} left" + ("" if returns_after_s is None
                                               else f"; capacity returns in {returns_after_s:g}s"))

    def catch_up(self) -> None:
        """Nodes that joined by now; spares placed on free slots; spares that died."""
        now = self._group.t
        for at, slots in sorted(r for r in self.returns if r[0] <= now):
            self.returns.remove((at, slots))
            node = f"node{len(self.capacity) + 1000 + len(self._holding):04d}-{at:.0f}"
            self.capacity[node], self.used[node] = slots, 0
            self._group.log(f"node {node} joined with {slots} slot(s)")
        for member, _ in self._starting:
            if member.placed_at is None:
                self._place(member)
            doom = self._doomed.get(id(member))
            if doom is not None and doom <= now:
                self._group.die(member, doom, "died while starting")

    def _place(self, member: Member) -> None:
        free = [n for n in sorted(self.capacity) if self.used[n] < self.capacity[n]]
        if not free:
            return
        self._hold(member, free[0])
        member.placed_at = self._group.wall()
        member.actor.ready_at = self._group.t + self._start_s(member)

    def _start_s(self, member: Member) -> float:
        return self._group.costs.process_start_s * self._slow.get(id(member), 1.0)

    # -- the pool (what SparePool asks Ray) -------------------------------------------

    def request(self, num_workers: int) -> None:
        for _ in range(num_workers):
            member = self._group.new_member(None, float("inf"))
            member.requested_at = self._group.wall()
            self._starting.append((member, None))
            self._place(member)
            for fault in self._group.plan.at("spare_start", self._group.t):
                self._group.log(f"fault {fault.describe()} -> {member.actor.name}")
                if fault.kind == "slow_start":
                    self._slow[id(member)] = 5 + 10 * fault.where
                    if member.placed_at is not None:
                        member.actor.ready_at = self._group.t + self._start_s(member)
                    continue
                self._doomed[id(member)] = self._group.t + \
                    self._group.costs.process_start_s * fault.where
        self._group.log(f"requested {num_workers} spare(s)")

    def note_placement(self) -> None:
        self.catch_up()

    def with_room(self, timeout_s: float) -> list[Member]:
        self.catch_up()
        return [m for m in self.starting if m.placed_at is not None]

    def poll(self) -> list[Member]:
        self.catch_up()
        now, still = self._group.t, []
        for member, ref in self._starting:
            sim = member.actor
            if not sim.alive:
                self.give_back(member)
            elif member.placed_at is not None and sim.ready_at <= now:
                member.ready_at = self._group.wall() - (now - sim.ready_at)
                self.ready.append(member)
            else:
                still.append((member, ref))
        self._starting = still
        self.ready = [m for m in self.ready if m.actor.alive]
        return self.ready

    def wait_ready(self, timeout_s: float, members: list[Member] | None = None) -> list[Member]:
        group = self._group
        deadline = group.t + timeout_s
        wanted = None if members is None else {id(m) for m in members}
        if members is not None and group.grid_members:
            for fault in group.plan.at("join_wait", group.t):
                if fault.kind == "wait_kill":  # a member of the grid, not the spare
                    victim = group._pick(fault.pick)
                    if victim is None:
                        continue
                    group.log(f"fault {fault.describe()} -> {victim.actor.name}")
                    group.die(victim, group.t, "while the driver waits for a replacement")
                    continue
                victim = members[min(int(fault.pick * len(members)), len(members) - 1)]
                group.log(f"fault {fault.describe()} -> {victim.actor.name}")
                self._doomed[id(victim)] = group.t + timeout_s * fault.where
        while True:
            # poll first: a spare ready at this very moment is ready, not one to wait for
            # (seen as a warm spare that started with the grid and held the start for
            # the whole timeout)
            self.poll()
            waiting = [m for m, _ in self._starting if wanted is None or id(m) in wanted]
            times = [m.actor.ready_at for m in waiting if m.placed_at is not None]
            times += [self._doomed[id(m)] for m in waiting if id(m) in self._doomed]
            if any(m.placed_at is None for m in waiting):
                times += [at for at, _ in self.returns]
            times = [t for t in times if t > group.t]
            if not waiting or not times or min(times) > deadline:
                if waiting:
                    group.advance(deadline)
                return self.poll()
            group.advance(min(times))
            self.poll()

    def give_back(self, member: Member) -> None:
        if id(member) in self._given_back:
            return
        self._given_back.add(id(member))
        self.free(member)

    def shutdown(self) -> None:
        self._starting, self.ready = [], []
