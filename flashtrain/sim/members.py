"""A simulated member: a model state that makes the invariants checkable.

A member's model is the chain of steps it has applied (:class:`Applied`): each link is
one global step with the sample ids the grid's all-reduce combined, and a digest over
the whole chain. Two replicas are identical exactly when their digests are; a member's
commit is a link it keeps; a rollback or a hand-over moves it to a kept link; the
chain of the final model lists every sample trained on, in order, so exactly-once
accounting and "no committed step lost" are read off it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from flashtrain.sharding import epoch_permutation, shard_indices
from flashtrain.topology import Grid


@dataclass(frozen=True, eq=False)
class Applied:
    """One step applied to a model (``parent`` is the model before it)."""

    step: int
    epoch: int
    ids: np.ndarray  # the dataset indices the step's all-reduce combined, sorted
    parent: Applied | None
    digest: str
    depth: int  # steps applied since the initial model

    def chain(self) -> list[Applied]:
        """Every link from the first step to this one."""
        links, node = [], self
        while node is not None and node.parent is not None:
            links.append(node)
            node = node.parent
        return links[::-1]


INITIAL = Applied(step=-1, epoch=-1, ids=np.zeros(0, dtype=np.int64), parent=None,
                  digest="init", depth=0)


class StepMemo:
    """Links shared by every replica that applied the same step to the same model
    (2,176 members apply one link, not 2,176 copies), and the epochs' permutations."""

    def __init__(self):
        self._links: dict[tuple[str, int, bytes], Applied] = {}
        self._perms: dict[tuple[int, int, int], np.ndarray] = {}

    def permutation(self, epoch: int, num_samples: int, seed: int) -> np.ndarray:
        key = (epoch, num_samples, seed)
        if key not in self._perms:
            self._perms[key] = epoch_permutation(epoch, num_samples, seed)
        return self._perms[key]

    def apply(self, parent: Applied, step: int, epoch: int, ids: np.ndarray) -> Applied:
        raw = ids.tobytes()
        key = (parent.digest, step, hashlib.blake2b(raw, digest_size=8).hexdigest().encode())
        link = self._links.get(key)
        if link is None:
            digest = hashlib.blake2b(parent.digest.encode() + f"|{step}|".encode() + raw,
                                     digest_size=10).hexdigest()
            link = Applied(step, epoch, ids, parent, digest, parent.depth + 1)
            self._links[key] = link
        return link


def combined_ids(plan, members: list, memo: StepMemo) -> np.ndarray:
    """The sample ids the step's all-reduce combines: every participating member's
    shard, as its own grid and rank say (a member that thinks it is in another grid
    takes other samples, which the exactly-once check then finds)."""
    members = [m.actor for m in members]
    perm = memo.permutation(plan.epoch, plan.num_samples, plan.seed)
    sizes = {m.grid.num_workers for m in members}
    ranks = sorted(m.rank for m in members)
    if len(sizes) == 1 and ranks == list(range(len(members))) and sizes == {len(members)}:
        return np.sort(perm[plan.cursor:plan.cursor + plan.batch])
    parts = [shard_indices(epoch=plan.epoch, cursor=plan.cursor, batch=plan.batch,
                           num_workers=m.grid.num_workers, rank=m.rank,
                           num_samples=plan.num_samples, seed=plan.seed, permutation=perm)
             for m in members]
    return np.sort(np.concatenate(parts))


@dataclass(eq=False)
class SimMember:
    """A worker process: where it runs, whether it lives, its model and commits."""

    name: str
    node: str
    alive: bool = True
    ready_at: float = 0.0  # virtual time its constructor is done
    busy_until: float = 0.0  # a stalled member answers nothing before this
    model: Applied = INITIAL
    commits: dict[int, Applied] = field(default_factory=dict)
    grid: Grid | None = None
    rank: int = -1
    generation: int = -1

    def commit(self, step: int) -> None:
        """Keep the model as the commit of ``step`` (and the one before it, as the real
        worker does: a death during a commit leaves the previous one to return to)."""
        self.commits[step] = self.model
        for old in sorted(self.commits)[:-2]:
            del self.commits[old]

    def rollback(self, step: int) -> None:
        if step not in self.commits:
            raise KeyError(f"{self.name} holds commits {sorted(self.commits)}, not step {step}")
        self.model = self.commits[step]
