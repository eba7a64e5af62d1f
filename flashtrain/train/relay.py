"""A step window handed down a tree of the grid's own members, so that the driver makes
one call per window whatever the grid's size.

With ``runtime.relay_fanout = B`` and more than B members, the members form a B-ary tree
over their ranks (rank r's children are ranks ``r*B + 1 .. r*B + B``, :func:`children_of`).
The driver calls ``relay_window`` on rank 0 only. Each member, in its relay concurrency
group, calls ``relay_window`` on each child, trains the window itself on a thread of its
own, waits for both, and answers with one :class:`WindowAnswer`: per step, its subtree's
results merged into one (:func:`merge_results`: sums, and the slowest rank's times), and
every failure with its rank. The driver's work per window is then one call and B merges per step, independent
of the grid's size; the fan-out costs each member at most B calls.

Failures keep the fail-fast guarantee of the direct path: the first failure a relay sees
(a child died, its call raised, its own window failed, the deadline passed) makes it
abort the collectives of its whole subtree at once (through the control concurrency
group, beside a blocked step), so the subtree settles in milliseconds and the answer
climbs; each relay above does the same for its own subtree, so the abort reaches every
member. Each level waits
:data:`HOP_S` less than its parent, so an answer always arrives before the parent's
deadline. A member that dies takes its subtree's answers with it: its parent reports it
as failed, the orphans' calls end with their aborted collectives, and the controller's
recovery pings every member as on the direct path.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from flashtrain.train.clock import StepPlan
from flashtrain.train.window import (  # noqa: F401 - the tree's pure parts, re-exported
    HOP_S,
    WindowAnswer,
    children_of,
    merge_results,
    subtree_of,
    tree_depth,
    window_step_of,
)

RELAY_GROUP = "relay"
_FAILURES = (RayActorError, RayTaskError, GetTimeoutError)


def wait_batch(pending: list, timeout: float) -> tuple[list, list]:
    """``(ready, pending)``: wait up to ``timeout`` for the first of ``pending`` to finish,
    then take whatever else has finished too (a fail-fast gather's wake-up handles a
    batch, not one call). ``ready`` is empty when the timeout passed."""
    ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
    if ready and pending:
        more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        ready += more
    return ready, pending


class WindowRelay:
    """A member's place in the relay tree of one grid generation."""

    def __init__(self, generation: int, rank: int, children: list, child_ranks: list[int],
                 subtree: list):
        self.generation = generation
        self.rank = rank
        self.children = children  # actor handles, one per child rank
        self.child_ranks = child_ranks
        self.subtree = subtree  # actor handles of this rank and everything below it

    def run(self, start_own: Callable[[], Future], plans: list[StepPlan], commit: bool,
            timeout: float) -> WindowAnswer:
        """Relay the window to the children, train it here (``start_own`` starts this
        member's own ``train_window`` on its window thread and returns the future), and
        answer for the subtree within ``timeout`` seconds.

        The own window runs in this process, not through a call to this actor: on the
        2-core test machine that call alone doubled a window's round trip. A failure of
        the own window aborts the subtree from the window thread as it happens; a failure
        below is acted on as its answer arrives."""
        deadline = time.monotonic() + timeout
        who = {}
        for child, rank in zip(self.children, self.child_ranks, strict=True):
            ref = child.relay_window.remote(self.generation, plans, commit,
                                            max(timeout - HOP_S, HOP_S))
            who[ref] = rank
        own = start_own()
        own.add_done_callback(self._abort_if_failed)
        answer, pending, aborted = WindowAnswer(), list(who), False
        while pending:
            ready, pending = wait_batch(pending, max(deadline - time.monotonic(), 0))
            if not ready:
                break
            for ref in ready:
                try:
                    answer.add(ray.get(ref, timeout=0))
                except _FAILURES as err:  # the child died, or its relay_window raised
                    answer.errors.append((who[ref], err))
            if answer.errors and not aborted:
                self.abort(f"rank {answer.errors[0][0]} failed in a step window")
                aborted = True
        wait_futures([own], timeout=max(deadline - time.monotonic(), 0))
        if own.done():
            self._settle_own(own, answer, plans[-1].global_step + 1)
        late = [who[ref] for ref in pending] + ([] if own.done() else [self.rank])
        if late:  # the deadline passed: what has not answered counts as timed out
            answer.errors += [(rank, GetTimeoutError(
                f"train_window did not finish on rank {rank}"
                f"{' or below it' if rank != self.rank else ''} within {timeout:g}s"))
                for rank in late]
            self.abort(f"rank {late[0]} timed out in a step window")
        return answer

    def _abort_if_failed(self, own: Future) -> None:
        """On the window thread, as the own window ends: if it failed, abort the subtree
        at once (the relay thread may be waiting for a child that the failure blocks)."""
        if not own.cancelled() and own.exception() is not None:
            self.abort(f"rank {self.rank} failed in a step window")

    def _settle_own(self, own: Future, answer: WindowAnswer, end: int) -> None:
        try:
            results = own.result()
        except Exception as err:  # noqa: BLE001 - classified by the driver
            # Raised here, not in a Ray call: keep the traceback for the driver's message.
            err.traceback_text = "".join(traceback.format_exception(err))
            answer.errors.append((self.rank, err))
            step = getattr(err, "window_step", None)
            if step is not None:
                answer.reached.append(step)
        else:
            answer.add_results(results)
            answer.reached.append(end)

    def abort(self, reason: str) -> None:
        """Abort the collectives of this generation on every member of the subtree (fire
        and forget: a dead member's call just fails)."""
        for actor in self.subtree:
            actor.abort_collectives.remote(self.generation, reason)
