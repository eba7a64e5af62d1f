"""The replica invariant, in words both the real system and the simulator use.

Data-parallel replicas apply the same averaged update, so at every commit they must
hold the same model. Each member summarises its commit as a *replica digest*: one
checksum per named tensor (``{"layer1.0.conv1.weight": 123, "optimizer state of
layer1.0.conv1.weight (momentum_buffer)": 456, ...}``, see
:func:`flashtrain.train.digest.replica_checksums`), and a short digest over all of them
(:func:`digest_of`) that is what crosses the network at every commit. Only when those
differ does the driver ask for the per-tensor checksums, to name what differs
(:func:`divergence`). The simulator's members have one "tensor", ``model`` (the digest
of the chain of steps they applied), and are judged by the same function.

Pure: no torch, no Ray.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

NAMES_SHOWN = 4  # differing tensors named per rank; the rest are counted


def digest_of(checksums: Mapping[str, object]) -> str:
    """One short digest over a member's per-tensor checksums (names included, in sorted
    order, so two members agree exactly when every tensor's checksum does)."""
    text = "\n".join(f"{name}={checksums[name]}" for name in sorted(checksums))
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def reference_rank(totals: list[str]) -> int:
    """The rank the others are compared with: the lowest rank of the digest most ranks
    hold (with two replicas, or a tie, the lowest rank of all: rank 0)."""
    counts: dict[str, int] = {}
    for total in totals:
        counts[total] = counts.get(total, 0) + 1
    best = max(counts.values())
    return next(rank for rank, total in enumerate(totals) if counts[total] == best)


def divergence(step: int, checksums: list[Mapping[str, object]] | Mapping[int, Mapping],
               reference: int | None = None) -> str | None:
    """None when every rank's checksums are equal (``checksums``: per rank, a list in
    rank order or a dict of some ranks); else one message naming each rank that differs
    from the reference rank (``reference``, default :func:`reference_rank`'s) and the
    tensors in which it does, e.g.
    ``replicas diverged at the commit of step 40: rank 2 differs from rank 0 in
    layer1.0.conv1.weight, optimizer state of layer1.0.conv1.weight (momentum_buffer)``."""
    by_rank = checksums if isinstance(checksums, Mapping) else dict(enumerate(checksums))
    ranks = sorted(by_rank)
    totals = {rank: digest_of(by_rank[rank]) for rank in ranks}
    if len(set(totals.values())) <= 1:
        return None
    ref = reference if reference is not None else ranks[reference_rank([totals[r] for r in ranks])]
    base = by_rank[ref]
    parts = []
    for rank in ranks:
        mine = by_rank[rank]
        if totals[rank] == totals[ref]:
            continue
        names = sorted(n for n in set(base) | set(mine) if base.get(n) != mine.get(n))
        shown = ", ".join(names[:NAMES_SHOWN])
        more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
        parts.append(f"rank {rank} differs from rank {ref} in {shown}{more}")
    return f"replicas diverged at the commit of step {step}: " + "; ".join(parts)
