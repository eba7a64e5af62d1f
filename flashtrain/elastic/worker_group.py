"""The seam between the control plane and the workers.

The driver loop (:mod:`flashtrain.driver.trainer`) and the elastic controller
(:mod:`flashtrain.elastic.controller`) reach the workers, the schedule clock and time
only through a :class:`WorkerGroup`. :class:`flashtrain.elastic.ray_group.RayWorkerGroup`
is the product (Ray actors, placement groups, the schedule actor, wall time);
:class:`flashtrain.sim.group.SimWorkerGroup` runs simulated members in one process on
virtual time, so the real decision code can be run through thousands of seeded fault
schedules (Ray Train v2 tests its controller the same way, through its ``WorkerGroup``
and a dummy one).

Pure: no Ray here. A *pending call* is whatever the group hands back from
:meth:`WorkerGroup.submit` (Ray: an object ref); the control plane only passes it back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Member:
    """A worker, where it runs and which slot it holds (identity equality: two members
    are the same only if they are the same object). ``actor`` is the group's handle."""

    actor: Any
    node: str | None
    reservation: Any  # the group's placement (Ray: a Reservation); None for stubs
    bundle: int
    # The way of a spare into the grid (the group's wall-clock readings; None for the
    # first grid's workers). "needed": the grid has been below its target since then.
    requested_at: float | None = None
    placed_at: float | None = None
    ready_at: float | None = None
    needed_at: float | None = None
    joined_at: float | None = None
    waited_for: bool = False  # the controller already paused once for this one
    name: str = ""  # the group's id of this worker (Ray: the actor id in hex)

    @property
    def actor_id(self) -> str:
        return self.name

    def short_since(self) -> float | None:
        """Since when the grid has been short of this spare while it had room (None if
        it has no room yet or the grid is at its target)."""
        if self.needed_at is None or self.placed_at is None:
            return None
        return max(self.needed_at, self.placed_at)

    def join_record(self, joined_at: float, run_started: float) -> dict:
        """How this newcomer got into the grid, in seconds: ``wait_for_room_s`` (request
        to a placed bundle), ``start_s`` (placed to constructor done), ``short_s`` (how
        long the grid was below target while this spare had room: the figure the
        controller bounds) and ``request_to_join_s``."""
        requested = self.requested_at if self.requested_at is not None else joined_at
        ready = self.ready_at if self.ready_at is not None else joined_at
        # Seen placed only at a poll after it was ready (or never polled): room by then.
        placed = max(min(self.placed_at if self.placed_at is not None else ready, ready),
                     requested)
        short = max(self.needed_at, placed) if self.needed_at is not None else joined_at
        return {"actor_id": self.actor_id, "requested_time": round(requested - run_started, 3),
                "wait_for_room_s": round(placed - requested, 3),
                "start_s": round(max(ready - placed, 0.0), 3),
                "short_s": round(max(joined_at - short, 0.0), 3),
                "request_to_join_s": round(joined_at - requested, 3)}


@dataclass
class Gathered:
    """A fail-fast gather's outcome: every result in call order, or where it stopped:
    the first call that failed (its index and error), or the deadline (``timed_out``)."""

    results: list
    failed: int | None = None
    error: BaseException | None = None
    timed_out: bool = False
    unsettled: list = field(default_factory=list)  # pending calls not yet finished

    @property
    def ok(self) -> bool:
        return self.failed is None and not self.timed_out


class Clock(ABC):
    """The schedule clock's authority (Ray: the schedule actor on the driver's node):
    the live position and the last committed one. Every method answers within the
    group's remote timeout or raises."""

    @abstractmethod
    def state(self) -> dict: ...

    @abstractmethod
    def advance_window(self, plans: list) -> dict: ...

    @abstractmethod
    def commit(self) -> dict: ...

    @abstractmethod
    def rollback(self) -> dict: ...

    @abstractmethod
    def close(self) -> None: ...


class WorkerGroup(ABC):
    """Start members in placement slots, call methods on them with deadlines, abort a
    generation's collectives, ping, learn of deaths, and tell the time.

    ``failures``: the exceptions a call on a member raises when it could not finish (the
    member died, the call raised, the deadline passed). The control plane catches these
    and nothing else from a member."""

    failures: tuple[type[BaseException], ...] = ()
    spares: Any  # the pool of starting / ready spares (see membership.SparePool)

    # -- time ------------------------------------------------------------------------

    @abstractmethod
    def now(self) -> float:
        """Monotonic seconds (durations, deadlines)."""

    @abstractmethod
    def wall(self) -> float:
        """Wall-clock seconds (unix time: what workers stamp their results with)."""

    @abstractmethod
    def sleep(self, seconds: float) -> None: ...

    # -- failures --------------------------------------------------------------------

    @abstractmethod
    def is_membership_loss(self, err: BaseException) -> bool:
        """A failure meaning "the grid could not finish" (a member died, a call timed
        out, a collective gave up because a peer died, hung or was aborted), as opposed
        to a bug or bad input in worker code."""

    @abstractmethod
    def is_death(self, err: BaseException) -> bool:
        """The member itself is gone (not only its call)."""

    @abstractmethod
    def timeout_error(self, message: str) -> BaseException:
        """The error of a call that missed its deadline."""

    # -- members ---------------------------------------------------------------------

    @abstractmethod
    def cluster_slots(self) -> dict[str, int]:
        """Free worker slots per node (for ``grid.shape=auto``)."""

    @abstractmethod
    def start_grid(self, num_workers: int, timeout: float) -> list[Member]:
        """Reserve ``num_workers`` slots and start a worker in each; the members in slot
        order, each with its node."""

    @abstractmethod
    def submit(self, members: list[Member], method: str, *args) -> list:
        """Call ``method(*args)`` on every member; the pending calls, in member order."""

    @abstractmethod
    def gather(self, pending: list, timeout: float) -> Gathered:
        """Wait for ``pending`` within ``timeout``, stopping at the first failure."""

    @abstractmethod
    def settle(self, pending: list, timeout: float) -> None:
        """Wait (bounded) until every pending call has finished, however."""

    @abstractmethod
    def outcome(self, call) -> tuple[bool, Any]:
        """A finished call's ``(ok, result or error)``; ``(False, None)`` if unfinished."""

    @abstractmethod
    def call(self, member: Member, method: str, *args, timeout: float):
        """One call, blocking up to ``timeout``; raises one of :attr:`failures`."""

    def call_each(self, members: list[Member], method: str, *args, timeout: float) -> list:
        """The same call on every member; every result, or the first failure raised."""
        got = self.gather(self.submit(members, method, *args), timeout)
        if got.timed_out:
            raise self.timeout_error(f"{method} did not finish on every member within "
                                     f"{timeout:g}s")
        if got.error is not None:
            raise got.error
        return got.results

    @abstractmethod
    def abort(self, members: list[Member], generation: int, reason: str) -> None:
        """Fire and forget: every member aborts its collectives of ``generation``."""

    @abstractmethod
    def ping(self, members: list[Member], timeout: float) -> list[bool]:
        """Which members answer within ``timeout``."""

    @abstractmethod
    def kill(self, member: Member) -> None: ...

    @abstractmethod
    def num_classes(self, member: Member, timeout: float) -> int: ...

    @abstractmethod
    def load_state(self, members: list[Member], state: dict, timeout: float) -> None:
        """Load a model/optimizer/scaler state into ``members``."""

    @abstractmethod
    def hand_over(self, source: Member, newcomers: list[Member], step: int,
                  timeout: float) -> None:
        """``newcomers`` load ``source``'s committed state of ``step`` and commit it."""

    @abstractmethod
    def plant_relays(self, members: list[Member], generation: int, fanout: int) -> list:
        """Give each member its place in the relay tree; the pending calls."""

    # -- the clock -------------------------------------------------------------------

    @abstractmethod
    def start_clock(self, schedule, clock_state: dict, timeout: float) -> Clock: ...

    def shutdown(self, members: list[Member]) -> None:
        for member in members:
            self.kill(member)
        self.spares.shutdown()
