"""A step window's shape down the relay tree and its outcome, for the direct and the
relayed path alike (pure: no Ray).

* the tree: rank r's children are ranks ``r*B + 1 .. r*B + B`` (:func:`children_of`);
* the merge of step records: sums, and the slowest rank's times (:func:`merge_results`);
* how far each member got: the step its error names (``window_step``, set by
  :meth:`flashtrain.train.worker.Worker.train_window`), or the position after the
  window when it finished it (:func:`reached_by`);
* the answer of a subtree (:class:`WindowAnswer`) and the verdict on a failed window
  (:func:`classify`: a membership loss the grid re-forms after, or a worker bug that
  stops the run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from flashtrain.train.clock import StepResult

HOP_S = 2.0  # each level of the tree waits this much less than the one above it


def children_of(rank: int, num_workers: int, fanout: int) -> list[int]:
    """The ranks ``rank`` relays a window to in a ``fanout``-ary tree over the grid."""
    first = rank * fanout + 1
    return list(range(first, min(first + fanout, num_workers)))


def subtree_of(rank: int, num_workers: int, fanout: int) -> list[int]:
    """``rank`` and every rank below it in the tree, in rank order."""
    ranks, level = [], [rank]
    while level:
        ranks += level
        level = [child for r in level for child in children_of(r, num_workers, fanout)]
    return sorted(ranks)


def tree_depth(num_workers: int, fanout: int) -> int:
    """Levels of relays below the driver (1: rank 0 alone)."""
    depth, reach, width = 1, 1, 1
    while reach < num_workers:
        width *= fanout
        reach += width
        depth += 1
    return depth


def merge_results(results: list[StepResult]) -> StepResult:
    """Several ranks' results of one step as one: samples, loss and correct add up, the
    seconds, sync and end time are the slowest rank's, the compute / exposed / data-wait
    split is that of the rank whose step took longest (as the driver reports it), the
    skipped samples are all of them. The merged result carries that rank's number."""
    slowest = max(results, key=lambda r: r.compute_s + r.comm_exposed_s + r.data_wait_s)
    return dataclasses.replace(
        slowest,
        samples=sum(r.samples for r in results),
        loss_sum=sum(r.loss_sum for r in results),
        correct=sum(r.correct for r in results),
        sync_s=max(r.sync_s for r in results),
        skipped=tuple(s for r in results for s in r.skipped),
        seconds=max((r.seconds for r in results if r.seconds is not None), default=None),
        finished_at=max((r.finished_at for r in results if r.finished_at is not None),
                        default=None),
        replicas=merge_replicas([r.replicas for r in results]))


def merge_replicas(parts: list[tuple[tuple[str, tuple[int, ...]], ...]]
                   ) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Several ranks' ``StepResult.replicas`` as one: each digest with all its ranks."""
    ranks: dict[str, list[int]] = {}
    for part in parts:
        for digest, held in part:
            ranks.setdefault(digest, []).extend(held)
    return tuple(sorted((d, tuple(sorted(r))) for d, r in ranks.items()))


@dataclass
class WindowAnswer:
    """A subtree's answer to a window: per step, its results merged; the failures with
    the rank they happened on; how far each settled member got (the step its error
    names, or the position after the window when it finished)."""

    steps: list[StepResult] | None = None  # None until a member answered
    ranks: int = 0  # members whose results are in ``steps``
    errors: list[tuple[int, BaseException]] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)

    def add_results(self, results: list[StepResult], ranks: int = 1) -> None:
        if self.steps is None:
            self.steps = list(results)
        else:
            self.steps = [merge_results([a, b]) for a, b in zip(self.steps, results, strict=True)]
        self.ranks += ranks

    def add(self, other: WindowAnswer) -> None:
        if other.steps is not None:
            self.add_results(other.steps, other.ranks)
        self.errors += other.errors
        self.reached += other.reached


def window_step_of(err: BaseException) -> int | None:
    """The global step a member's window ended in, if its error says (see
    :meth:`flashtrain.train.worker.Worker.train_window`): on the exception itself (a
    relay's own window) or on the one a RayTaskError carries."""
    for candidate in (getattr(err, "cause", None), err):
        step = getattr(candidate, "window_step", None)
        if step is not None:
            return step
    return None




def reached_by(outcomes: list[tuple[bool, object]], end: int) -> list[int]:
    """How far each settled call of a failed window got, from ``(ok, result or error)``
    per call: a member that finished the whole window (the failure was a member dying
    after the window's last collective, in its optimizer step or its commit) reached
    ``end``, the position after the window; one that failed, the step its error names."""
    reached = []
    for ok, value in outcomes:
        if ok:
            reached.append(end)
        elif value is not None and (step := window_step_of(value)) is not None:
            reached.append(step)
    return reached


@dataclass(frozen=True)
class Verdict:
    """What a failed window or call means: ``bug`` (worker code raised: re-forming
    cannot help) at ``rank``, else a membership loss whose representative error is
    ``cause`` (a death, when one is among the errors)."""

    bug: bool
    rank: int
    cause: BaseException


def classify(errors: list[tuple[int, BaseException]],
             is_membership_loss: Callable[[BaseException], bool],
             is_death: Callable[[BaseException], bool]) -> Verdict:
    """The verdict on ``errors`` (rank, error), in the order they were seen."""
    bugs = [(r, e) for r, e in errors if not is_membership_loss(e)]
    if bugs:
        return Verdict(True, bugs[0][0], bugs[0][1])
    died = [(r, e) for r, e in errors if is_death(e)]
    rank, cause = died[0] if died else errors[0]
    return Verdict(False, rank, cause)
