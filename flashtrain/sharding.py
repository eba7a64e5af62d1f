"""Which samples each worker trains on: exactly once per epoch, across any resizes.

Pure code: no Ray, no torch. The idea: an epoch is one seeded permutation of the
dataset, and the training clock keeps a *cursor*, the number of samples of this epoch
already trained on. A step takes the next ``step_batch(...)`` samples of the
permutation from the cursor and splits them over the W workers of the current grid.
The worker count only decides how the step's slice is cut, never which samples the
step covers, so a resize between any two steps keeps every sample exactly once.
"""

from __future__ import annotations

import numpy as np

from flashtrain.schedule import split_batch


def epoch_permutation(epoch: int, num_samples: int, seed: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``num_samples`` dataset indices."""
    if num_samples < 1:
        raise ValueError("the dataset is empty: nothing to train on")
    rng = np.random.default_rng([int(seed), int(epoch)])
    return rng.permutation(num_samples)


def step_batch(cursor: int, num_samples: int, global_batch: int, min_tail: int) -> int:
    """How many samples the step starting at ``cursor`` trains on.

    Normally ``global_batch``; the last step of an epoch takes what is left. When what
    would be left after a full step is smaller than ``min_tail`` (for example fewer
    samples than workers, or a batch too small for BatchNorm), that remainder is folded
    into this step instead of making a runt step of its own.
    """
    if not 0 <= cursor < num_samples:
        raise ValueError(f"cursor {cursor} is outside the epoch (0..{num_samples - 1})")
    remaining = num_samples - cursor
    if remaining - global_batch < max(min_tail, 1):
        return remaining
    return global_batch


def steps_in_epoch(num_samples: int, global_batch: int, min_tail: int) -> int:
    """Number of steps an epoch of ``num_samples`` takes at a fixed global batch."""
    cursor, steps = 0, 0
    while cursor < num_samples:
        cursor += step_batch(cursor, num_samples, global_batch, min_tail)
        steps += 1
    return steps


def shard_indices(
    *,
    epoch: int,
    cursor: int,
    batch: int,
    num_workers: int,
    rank: int,
    num_samples: int,
    seed: int,
    permutation: np.ndarray | None = None,
) -> np.ndarray:
    """Dataset indices rank ``rank`` of ``num_workers`` trains on in the step that covers
    samples ``[cursor, cursor + batch)`` of epoch ``epoch``'s permutation.

    Ranks get contiguous pieces of the step's slice, sized by :func:`split_batch`.
    Pass ``permutation`` to reuse an already computed :func:`epoch_permutation`.
    """
    if not 0 <= rank < num_workers:
        raise ValueError(f"rank {rank} is outside 0..{num_workers - 1}")
    if cursor + batch > num_samples:
        raise ValueError(f"step [{cursor}, {cursor + batch}) runs past the epoch of {num_samples}")
    perm = epoch_permutation(epoch, num_samples, seed) if permutation is None else permutation
    sizes = split_batch(batch, num_workers)
    start = cursor + sum(sizes[:rank])
    return perm[start : start + sizes[rank]]
