"""Simulated members behind the real seam, on virtual time.

:class:`SimWorkerGroup` implements :class:`~flashtrain.elastic.worker_group.WorkerGroup`
in one process: a call computes its outcome at once (what the member does, when its
answer arrives, which error it raises) and the group's clock moves only when the
driver waits (a gather, a settle, a ping, a sleep). Collective calls are simulated for
the grid together: a step's all-reduce completes when every member reaches it; a
member that dies or stalls leaves its peers blocked in that step until an abort (the
controller's fail-fast fan-out, or a relay's) or the collective timeout frees them.
Faults come from a :class:`~flashtrain.sim.faults.FaultPlan`; every event goes to a
trace, one line each, so the same seed gives the same trace byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashtrain.elastic.worker_group import Clock, Gathered, Member, WorkerGroup
from flashtrain.sim.costs import SimCosts
from flashtrain.sim.faults import FaultPlan
from flashtrain.sim.members import SimMember, StepMemo
from flashtrain.sim.spares import SimSpares
from flashtrain.sim.window import WindowSim
from flashtrain.train.clock import ScheduleKeeper
from flashtrain.train.replicas import digest_of, divergence

WALL_ORIGIN = 1_800_000_000.0  # virtual wall time = this + virtual monotonic time


class MemberDied(RuntimeError):
    """The member's process is gone (Ray: RayActorError)."""


class CallTimedOut(TimeoutError):
    """A call missed its deadline (Ray: GetTimeoutError)."""


class SimCollectiveError(RuntimeError):
    """A collective gave up: a peer died or stalled, or the grid was aborted."""

    def __init__(self, message: str, window_step: int | None = None):
        super().__init__(message)
        self.window_step = window_step


class DriverKilled(BaseException):
    """The driver process was killed (a SIGKILL: nothing of it runs on, so nothing in it
    catches this); the members it owned die with it."""


class SimHung(RuntimeError):
    """Virtual time passed the run's horizon: something waits forever."""


@dataclass(eq=False)
class SimCall:
    """A pending call: it ends at ``done_at`` with ``ok``/``value``; a blocked one
    (``done_at`` None) ends when its generation is aborted or at ``timeout_at``."""

    member: Member
    method: str
    done_at: float | None
    ok: bool = True
    value: object = None
    generation: int = -1
    timeout_at: float = float("inf")
    blocked_step: int | None = None

    def release(self, at: float, why: str) -> None:
        self.done_at, self.ok = at, False
        self.value = SimCollectiveError(f"{self.method}: {why}", window_step=self.blocked_step)


class SimWorkerGroup(WorkerGroup):
    failures = (MemberDied, CallTimedOut, SimCollectiveError)

    def __init__(self, config, costs: SimCosts, plan: FaultPlan, *, nodes: int, slots: int,
                 horizon_s: float, trace: bool = True):
        self.config = config
        self.costs = costs
        self.plan = plan
        self.t = 0.0
        self.horizon_s = horizon_s
        self.lines: list[str] | None = [] if trace else None
        self.violations: list[str] = []
        self.memo = StepMemo()
        self.calls: list[SimCall] = []
        self.form_members: dict[int, list] = {}  # generation -> [(member, call)]
        self.grid_members: list[Member] = []  # the members of the last grid formed
        self.commits_seen: list[tuple[int, str]] = []  # (step, digest) at clock commits
        self.clock: SimClock | None = None
        self.relays_of: tuple[int, list[Member], int] | None = None
        self.form_death_armed = False
        self.num_started = 0
        self.spares = SimSpares(self, nodes, slots)
        self.window = WindowSim(self)
        self.driver_dies_at: float | None = None  # a "driver" fault armed for this moment

    # -- time and trace ----------------------------------------------------------------

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL_ORIGIN + self.t

    def sleep(self, seconds: float) -> None:
        self.advance(self.t + seconds)

    def advance(self, to: float) -> None:
        if self.driver_dies_at is not None and to >= self.driver_dies_at:
            self.t, self.driver_dies_at = max(self.t, self.driver_dies_at), None
            self.log("driver killed")
            raise DriverKilled(f"the driver was killed at {self.t:.6f}s")
        if to > self.horizon_s:
            raise SimHung(f"virtual time would pass the horizon {self.horizon_s:g}s")
        self.t = max(self.t, to)
        self.spares.catch_up()

    def log(self, message: str) -> None:
        if self.lines is not None:
            self.lines.append(f"{self.t:14.6f} {message}")

    def restarted(self, after_s: float) -> SimWorkerGroup:
        """The group of a driver resumed ``after_s`` after this one's was killed: the
        same cluster (nodes that left stay gone, those due to return still return), the
        same fault plan, trace and virtual time; every member of this one died with
        the driver."""
        for member in self.grid_members:
            member.actor.alive = False
        new = SimWorkerGroup(self.config, self.costs, self.plan, nodes=0,
                             slots=self.spares.slots_per_node, horizon_s=self.horizon_s,
                             trace=False)
        new.spares.capacity = dict(self.spares.capacity)
        new.spares.used = dict.fromkeys(new.spares.capacity, 0)
        new.spares.returns = list(self.spares.returns)
        new.t, new.lines, new.violations = self.t, self.lines, self.violations
        new.memo, new.commits_seen, new.num_started = self.memo, self.commits_seen, \
            self.num_started
        new.window.cpu_s = self.window.cpu_s
        new.advance(self.t + after_s)
        new.log(f"driver resumed ({after_s:g}s after it was killed)")
        return new

    # -- failures --------------------------------------------------------------------

    def is_membership_loss(self, err: BaseException) -> bool:
        return isinstance(err, self.failures)

    def is_death(self, err: BaseException) -> bool:
        return isinstance(err, MemberDied)

    def timeout_error(self, message: str) -> BaseException:
        return CallTimedOut(message)

    # -- members ---------------------------------------------------------------------

    def new_member(self, node: str, ready_at: float) -> Member:
        self.num_started += 1
        sim = SimMember(f"m{self.num_started:05d}", node, ready_at=ready_at)
        return Member(sim, node, None, 0, name=sim.name)

    def cluster_slots(self) -> dict[str, int]:
        return self.spares.free_slots()

    def start_grid(self, num_workers: int, timeout: float) -> list[Member]:
        members = self.spares.place_initial(num_workers, self.t + self.costs.process_start_s)
        self.log(f"start {num_workers} members on {len({m.node for m in members})} node(s)")
        return members

    def die(self, member: Member, at: float, why: str) -> None:
        sim = member.actor
        if sim.alive:
            sim.alive = False
            self.spares.free(member)
            self.log(f"death {sim.name} (rank {sim.rank}, node {sim.node}) at "
                     f"{at:.6f}: {why}")

    def submit(self, members: list[Member], method: str, *args) -> list:
        start = self.t + self.costs.call_latency_s
        if method == "train_window":
            return self.window.direct(members, *args, start=start)
        if method == "join":
            return [self._join(members[0], *args, start=start)]
        calls = [self._single(m, method, args, start) for m in members]
        moment = {"validate": "validate", "average_buffers": "checkpoint"}.get(method)
        if moment is not None and len(members) == len(self.grid_members):
            # A fault at a validation or checkpoint fires once per grid-wide call.
            for fault in self.plan.at(moment, self.t):
                victim = self._pick(fault.pick, members)
                if victim is None:
                    continue
                self.log(f"fault {fault.describe()} -> {victim.actor.name}")
                cost = self.costs.validate_s if method == "validate" else self.costs.checkpoint_s
                self._kill_during(victim, start + cost * fault.where, method)
        return calls

    def _single(self, member: Member, method: str, args: tuple, start: float) -> SimCall:
        sim = member.actor
        call = SimCall(member, method, start, generation=sim.generation)
        self.calls.append(call)
        if not sim.alive:
            call.ok, call.value = False, MemberDied(f"{sim.name} is dead ({method})")
            return call
        begin = max(start, sim.busy_until, sim.ready_at)
        cost = {"validate": self.costs.validate_s, "average_buffers": self.costs.checkpoint_s,
                "commit": self.costs.commit_s, "load_state": self.costs.handover_s,
                }.get(method, 0.0)
        call.done_at = begin + cost
        call.value = self._effect(sim, method, args)
        return call

    def _kill_during(self, victim: Member, at: float, method: str) -> None:
        """``victim`` dies at ``at`` inside a grid-wide ``method``: its call fails, and
        a collective one leaves its peers blocked until an abort or the timeout."""
        self.die(victim, at, f"in {method}")
        for call in self.calls:
            if call.member is victim and call.method == method and call.done_at is not None \
                    and call.done_at >= at:
                call.done_at, call.ok = at + self.costs.detect_s, False
                call.value = MemberDied(f"{victim.actor.name} died in {method}")
            elif method == "average_buffers" and call.method == method and call.ok and \
                    call.done_at is not None and call.done_at >= at:
                call.done_at, call.blocked_step = None, None
                call.timeout_at = at + self.config.collective.timeout_s

    def _effect(self, sim: SimMember, method: str, args: tuple):
        if method in ("ping", "leave", "set_relay", "abort_collectives", "arm_exit",
                      "arm_stall"):
            if method == "leave":
                sim.grid, sim.rank = None, -1
            return True if method == "ping" else None
        if method == "commit":
            sim.commit(args[0])
            return 0
        if method == "replica_digest":  # a simulated model is one "tensor": its chain
            link = sim.commits.get(args[0])
            digest = link.digest if link is not None else f"no commit of step {args[0]}"
            return {"model": digest} if len(args) > 1 and args[1] else digest_of({"model": digest})
        if method == "rollback":
            sim.rollback(args[0])
            return None
        if method == "committed_state":
            return {"model": sim.commits[args[0]], "optimizer": None, "scaler": None}
        if method == "state":
            return {"model": sim.model, "optimizer": None, "scaler": None}
        if method == "load_state":
            sim.model = args[0]["model"]
            return None
        if method == "validate":
            return {"count": 1, "metrics": {"top1": 0.0, "top5": 0.0}, "loss_sum": 0.0,
                    "skipped": 0}
        if method == "average_buffers":
            return None
        raise NotImplementedError(f"the simulator has no member method {method!r}")

    def _join(self, member: Member, grid, rank: int, generation: int, algorithm: str = "torus",
              *, start: float) -> SimCall:
        # The algorithm (collective.algorithm=auto's choice) changes only the all-reduce's
        # cost, which the simulation takes from its own cost inputs.
        sim = member.actor
        call = SimCall(member, "join", None, generation=generation)
        self.calls.append(call)
        if not sim.alive:
            call.done_at, call.ok = start, False
            call.value = MemberDied(f"{sim.name} is dead (join)")
            return call
        sim.grid, sim.rank, sim.generation = grid, rank, generation
        joined = self.form_members.setdefault(generation, [])
        joined.append((member, call))
        # The rendezvous gives up after max(4 x the collective timeout, 30 s).
        call.timeout_at = start + max(4 * self.config.collective.timeout_s, 30.0)
        if len(joined) == grid.num_workers:
            self._form(generation, grid, joined, start)
        return call

    def _form(self, generation: int, grid, joined: list, start: float) -> None:
        began = max([start] + [m.actor.ready_at for m, _ in joined])
        done = began + self.costs.form_s(grid.num_workers)
        deaths = []
        if generation > 0:
            deaths = [self._pick(f.pick, [m for m, _ in joined])
                      for f in self.plan.at("reform", self.t)]
            deaths = [d for d in deaths if d is not None]
            if self.form_death_armed:
                self.form_death_armed = False
                deaths.append(joined[len(joined) // 2][0])
        if not deaths:
            for _, call in joined:
                call.done_at, call.value = done, 4242
            self.grid_members = [m for m, _ in joined]
            self.log(f"formed {grid} generation {generation} ({len(joined)} members)")
            return
        for victim in deaths:
            self.die(victim, began + (done - began) / 2, f"while {grid} forms")
        for member, call in joined:
            if not member.actor.alive:
                call.done_at, call.ok = began + (done - began) / 2 + self.costs.detect_s, False
                call.value = MemberDied(f"{member.actor.name} died while the grid formed")

    def _pick(self, fraction: float, members: list[Member] | None = None) -> Member | None:
        """The live member at ``fraction`` of ``members`` (None: nobody is left)."""
        members = [m for m in (self.grid_members if members is None else members)
                   if m.actor.alive]
        if not members:
            return None
        return members[min(int(fraction * len(members)), len(members) - 1)]

    # -- waiting ---------------------------------------------------------------------

    def _end_of(self, call: SimCall) -> float:
        return call.done_at if call.done_at is not None else call.timeout_at

    def _finish(self, call: SimCall) -> None:
        """A blocked call whose time has come ends with its timeout."""
        if call.done_at is None and call.timeout_at <= self.t:
            call.release(call.timeout_at, "the collective timed out")

    def gather(self, pending: list, timeout: float) -> Gathered:
        deadline = self.t + timeout
        results: list = [None] * len(pending)
        left = list(range(len(pending)))
        while left:
            wake = min(self._end_of(pending[i]) for i in left)
            if wake > deadline:
                self.advance(deadline)
                return Gathered(results, timed_out=True, unsettled=[pending[i] for i in left])
            self.advance(wake)
            for i in left:
                self._finish(pending[i])
            ended = sorted((i for i in left if pending[i].done_at is not None
                            and pending[i].done_at <= self.t),
                           key=lambda i: (pending[i].done_at, i))
            left = [i for i in left if i not in set(ended)]
            for i in ended:
                call = pending[i]
                if not call.ok:
                    self.log(f"gather: {call.method} on {call.member.actor.name} failed: "
                             f"{type(call.value).__name__}")
                    return Gathered(results, failed=i, error=call.value,
                                    unsettled=[pending[j] for j in left])
                results[i] = call.value
        return Gathered(results)

    def settle(self, pending: list, timeout: float) -> None:
        if not pending:
            return
        end = max(self._end_of(c) for c in pending)
        self.advance(min(end, self.t + timeout))
        for call in pending:
            self._finish(call)

    def outcome(self, call) -> tuple[bool, object]:
        if call.done_at is None or call.done_at > self.t:
            return False, None
        return call.ok, call.value

    def call(self, member: Member, method: str, *args, timeout: float):
        if method == "relay_window":
            call = self.window.relayed(member, *args, start=self.t + self.costs.call_latency_s)
        else:
            call = self.submit([member], method, *args)[0]
        got = self.gather([call], timeout)
        if got.timed_out:
            raise CallTimedOut(f"{method} on {member.actor.name} missed {timeout:g}s")
        if got.error is not None:
            raise got.error
        return got.results[0]

    def abort(self, members: list[Member], generation: int, reason: str) -> None:
        at = self.t + self.costs.call_latency_s
        released = 0
        for call in self.calls:
            if call.done_at is None and call.generation == generation and \
                    call.member.actor.alive:
                call.release(at, f"aborted: {reason}")
                released += 1
        self.calls = [c for c in self.calls if c.done_at is None]  # only these can block
        self.log(f"abort generation {generation} ({released} blocked call(s)): {reason}")

    def ping(self, members: list[Member], timeout: float) -> list[bool]:
        answers = [m.actor.alive and m.actor.busy_until <= self.t + timeout for m in members]
        busy = any(m.actor.alive and not ok for m, ok in zip(members, answers, strict=True))
        self.advance(self.t + (timeout if busy else self.costs.call_latency_s))
        self.log(f"ping: {sum(answers)} of {len(members)} answer")
        return answers

    def kill(self, member: Member) -> None:
        self.die(member, self.t, "killed by the controller")

    def num_classes(self, member: Member, timeout: float) -> int:
        return 10

    def load_state(self, members: list[Member], state: dict, timeout: float) -> None:
        self.call_each(members, "load_state", state, timeout=timeout)

    def hand_over(self, source: Member, newcomers: list[Member], step: int,
                  timeout: float) -> None:
        state = self.call(source, "committed_state", step, timeout=timeout)
        self.call_each(newcomers, "load_state", state, timeout=timeout)
        self.call_each(newcomers, "commit", step, timeout=timeout)

    def plant_relays(self, members: list[Member], generation: int, fanout: int) -> list:
        self.relays_of = (generation, list(members), fanout)
        return self.submit(members, "set_relay", generation)

    def start_clock(self, schedule, clock_state: dict, timeout: float) -> Clock:
        self.clock = SimClock(self, schedule, clock_state)
        return self.clock

    def shutdown(self, members: list[Member]) -> None:
        self.log("shutdown")

    # -- invariants at a commit -----------------------------------------------------

    def check_commit(self, step: int) -> None:
        """Every member of the grid holds a commit of ``step``, the same model, with
        exactly ``step`` steps applied (the clock and the members agree)."""
        live = [m for m in self.grid_members if m.actor.alive]
        held = [m.actor.commits.get(step) for m in live]
        models = [{"model": h.digest if h is not None else "none"} for h in held]
        message = divergence(step, models)
        if message is not None or models[0]["model"] == "none":
            self.violations.append(message or f"no member holds a commit of step {step}")
            return
        link = held[0]
        if link.depth != step:
            self.violations.append(f"the clock commits step {step} but the members hold "
                                   f"{link.depth} steps")
        self.commits_seen.append((step, link.digest))
        self.log(f"commit step {step} digest {link.digest}")


class SimClock(Clock):
    """The real schedule keeper, in this process, checking the replicas at commits."""

    def __init__(self, group: SimWorkerGroup, schedule, clock_state: dict):
        self._group = group
        self._keeper = ScheduleKeeper(schedule, clock_state)

    def state(self) -> dict:
        return self._keeper.state()

    def advance_window(self, plans: list) -> dict:
        return self._keeper.advance_window(plans)

    def commit(self) -> dict:
        state = self._keeper.commit()
        self._group.check_commit(state["global_step"])
        return state

    def rollback(self) -> dict:
        state = self._keeper.rollback()
        self._group.log(f"clock rolled back to step {state['global_step']}")
        return state

    def close(self) -> None:
        pass

