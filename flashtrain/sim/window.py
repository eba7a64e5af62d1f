"""A step window on simulated members, direct (one call per member) or down the relay
tree (one call to rank 0, answered with the real :class:`~flashtrain.train.window.WindowAnswer`
built over the real tree shape and merge).

Per step every live member computes, then the grid's all-reduce combines the members'
shards; the model of each member moves by one link (:mod:`flashtrain.sim.members`).
A fault in the window ends it at its step: the victim's call fails when its death is
detected; its peers block in that step's collective until an abort frees them (the
controller's fan-out on the direct path, the relays' on the relayed one) or the
collective timeout passes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from flashtrain.schedule import split_batch
from flashtrain.sim.members import combined_ids
from flashtrain.train.clock import StepResult
from flashtrain.train.replicas import digest_of
from flashtrain.train.window import WindowAnswer, children_of, tree_depth

_PHASES = ("start", "compute", "collective", "commit")


@dataclass
class _Hit:
    index: int  # the window's step it lands in
    phase: str
    victims: list
    kind: str
    returns_after_s: float | None = None


class WindowSim:
    def __init__(self, group):
        self.g = group
        self.cpu_s = 0.0  # CPU spent simulating members (not the driver's own)

    def direct(self, members: list, plans: list, commit: bool = False, *, start: float) -> list:
        from flashtrain.sim.group import SimCall

        began = time.process_time()
        calls = [SimCall(m, "train_window", start, generation=m.actor.generation)
                 for m in members]
        self.g.calls.extend(calls)
        self._run(members, plans, commit, start, fanout=0, calls=calls)
        self.cpu_s += time.process_time() - began
        return calls

    def relayed(self, root, generation: int, plans: list, commit: bool, timeout: float, *,
                start: float):
        from flashtrain.sim.group import MemberDied, SimCall

        began = time.process_time()
        _, members, fanout = self.g.relays_of
        calls = [SimCall(m, "train_window", start, generation=generation) for m in members]
        self._run(members, plans, commit, start, fanout=fanout, calls=calls)
        # The relays abort their subtrees at the first failure they see; the answer
        # climbs one hop per level.
        depth = tree_depth(len(members), fanout)
        failures = [c.done_at for c in calls if c.done_at is not None and not c.ok]
        blocked = [c for c in calls if c.done_at is None]
        if blocked:
            first = min(failures, default=min(c.timeout_at for c in blocked))
            for call in blocked:
                call.release(min(first, call.timeout_at), "aborted by a relay")
        answered = max(c.done_at for c in calls) + depth * self.g.costs.call_latency_s
        end = plans[-1].global_step + 1
        call = SimCall(root, "relay_window", answered, generation=generation)
        if not root.actor.alive:
            call.ok = False
            call.value = MemberDied(f"{root.actor.name} (rank 0) died relaying")
        else:
            call.value = self._answer(0, members, calls, fanout, end)
        self.g.calls.append(call)
        self.cpu_s += time.process_time() - began
        return call

    def _answer(self, rank: int, members: list, calls: list, fanout: int, end: int):
        from flashtrain.sim.group import MemberDied

        answer, own = WindowAnswer(), calls[rank]
        if own.ok:
            answer.add_results(own.value)
            answer.reached.append(end)
        else:
            answer.errors.append((rank, own.value))
            step = getattr(own.value, "window_step", None)
            if step is not None:
                answer.reached.append(step)
        for child in children_of(rank, len(members), fanout):
            if not members[child].actor.alive:
                answer.errors.append((child, MemberDied(f"rank {child} died")))
            else:
                answer.add(self._answer(child, members, calls, fanout, end))
        return answer

    # -- the window's timeline -------------------------------------------------------

    def _hits(self, members: list, plans: list, commit: bool, fanout: int) -> _Hit | None:
        g = self.g
        faults = g.plan.at("window", g.t) + (g.plan.at("commit_window", g.t) if commit else [])
        due = g.plan.in_steps([p.global_step for p in plans], g.t)
        pinned = {id(f): index for index, f in due}
        faults += [f for _, f in due]
        hits = []
        for fault in faults:
            if fault.kind == "driver":
                self._arm_driver_death(fault, pinned.get(id(fault)), plans, members)
                continue
            index = pinned.get(id(fault), min(int(fault.where * len(plans)), len(plans) - 1))
            victim = g._pick(fault.pick, members)
            if victim is None:
                continue
            phase = {"compute": "compute", "stall": "compute", "commit": "commit",
                     "relaying": "start"}.get(fault.kind, "collective")
            victims = [victim]
            if fault.kind == "relaying":
                relays = [m for r, m in enumerate(members)
                          if fanout and children_of(r, len(members), fanout) and m.actor.alive]
                index, victims = 0, [relays[min(int(fault.pick * len(relays)),
                                                len(relays) - 1)]] if relays else [victim]
            if fault.kind in ("node", "lost_node"):
                victims = [m for m in members if m.actor.alive and m.node == victim.node]
            if fault.kind == "second":
                g.form_death_armed = True
            g.log(f"fault {fault.describe()} -> {[v.actor.name for v in victims]}")
            hits.append(_Hit(index, phase, victims, fault.kind, fault.returns_after_s))
        return min(hits, key=lambda h: (h.index, _PHASES.index(h.phase)), default=None)

    def _arm_driver_death(self, fault, index: int | None, plans: list, members: list) -> None:
        """The driver dies ``where`` into the span of two windows from now (a pinned
        fault: ``where`` into its step), whatever it is doing by then."""
        g = self.g
        live = [m for m in members if m.actor.alive]
        step_s = g.costs.step_compute_s + (g.costs.allreduce_s(live[0].actor.grid)
                                           if live else 0.0)
        steps = index + fault.where if index is not None else 2 * fault.where * len(plans)
        g.driver_dies_at = g.t + g.costs.call_latency_s + steps * step_s
        g.log(f"fault {fault.describe()} -> the driver, at {g.driver_dies_at:.6f}")

    def _run(self, members: list, plans: list, commit: bool, start: float, *, fanout: int,
             calls: list) -> None:
        from flashtrain.sim.group import MemberDied, SimCollectiveError

        g, costs = self.g, self.g.costs
        call_of = {id(m): c for m, c in zip(members, calls, strict=True)}
        live = [m for m in members if m.actor.alive]
        for member in members:
            if not member.actor.alive:
                call = call_of[id(member)]
                call.ok, call.value = False, MemberDied(f"{member.actor.name} is dead")
        hit = self._hits(live, plans, commit, fanout)
        allreduce = costs.allreduce_s(live[0].actor.grid) if live else 0.0
        timeout = g.config.collective.timeout_s
        results = {id(m): [] for m in live}
        t = start + max([0.0] + [m.actor.ready_at - start for m in live])
        for index, plan in enumerate(plans):
            computed = t + costs.step_compute_s
            if hit is not None and hit.index == index and hit.phase != "commit":
                died = {"start": t, "compute": t + costs.step_compute_s / 2,
                        "collective": computed + allreduce / 2}[hit.phase]
                for victim in hit.victims:
                    call = call_of[id(victim)]
                    if hit.kind == "stall":
                        victim.actor.busy_until = died + 2 * timeout
                        call.done_at, call.ok = victim.actor.busy_until, False
                        call.value = SimCollectiveError("stalled past the collective timeout",
                                                        window_step=plan.global_step)
                        continue
                    g.die(victim, died, f"in the {hit.phase} of step {plan.global_step}")
                    call.done_at, call.ok = died + costs.detect_s, False
                    call.value = MemberDied(f"{victim.actor.name} died in step {plan.global_step}")
                if hit.kind in ("node", "lost_node"):
                    g.spares.lose_node(hit.victims[0].node,
                                       hit.returns_after_s if hit.kind == "node" else None)
                for member in live:
                    if member not in hit.victims:
                        call = call_of[id(member)]
                        call.done_at, call.blocked_step = None, plan.global_step
                        call.timeout_at = computed + timeout
                return
            ids = combined_ids(plan, live, g.memo)
            shares = split_batch(plan.batch, live[0].actor.grid.num_workers)
            ended = computed + allreduce
            moved = {}  # one link per distinct model before the step
            for member in live:
                sim = member.actor
                if id(sim.model) not in moved:
                    moved[id(sim.model)] = g.memo.apply(sim.model, plan.global_step,
                                                        plan.epoch, ids)
                sim.model = moved[id(sim.model)]
                share = shares[sim.rank] if 0 <= sim.rank < len(shares) else 0
                results[id(member)].append(StepResult(
                    plan.global_step, sim.rank, share, 0.0, 0, costs.step_compute_s, allreduce,
                    seconds=ended - t, finished_at=g.wall() + (ended - g.t)))
            t = ended
        victims = hit.victims if hit is not None and hit.phase == "commit" else []
        done = t + (costs.commit_s if commit else 0.0)
        for member in live:
            call = call_of[id(member)]
            if member in victims:
                g.die(member, t + costs.commit_s / 2, "in the commit")
                call.done_at, call.ok = t + costs.commit_s / 2 + costs.detect_s, False
                call.value = MemberDied(f"{member.actor.name} died in its commit")
                continue
            if commit:
                member.actor.commit(plans[-1].global_step + 1)
                if g.config.elastic.check_replicas:  # as the real worker's answer carries it
                    digest = digest_of({"model": member.actor.model.digest})
                    results[id(member)][-1] = dataclasses.replace(
                        results[id(member)][-1], replicas=((digest, (member.actor.rank,)),))
            call.done_at, call.value = done, results[id(member)]
