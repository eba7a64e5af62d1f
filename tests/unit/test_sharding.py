from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashtrain.sharding import epoch_permutation, shard_indices, step_batch, steps_in_epoch


def run_epoch(num_samples, batch, worker_counts, min_tail, epoch=0, seed=7):
    """Drive one epoch, switching the worker count at each step from ``worker_counts``
    (cycled), and return every index trained on."""
    seen, cursor, step = [], 0, 0
    while cursor < num_samples:
        workers = worker_counts[step % len(worker_counts)]
        size = step_batch(cursor, num_samples, batch, min_tail)
        for rank in range(workers):
            seen.extend(shard_indices(epoch=epoch, cursor=cursor, batch=size,
                                      num_workers=workers, rank=rank,
                                      num_samples=num_samples, seed=seed).tolist())
        cursor += size
        step += 1
    return seen


@settings(max_examples=200)
@given(num_samples=st.integers(1, 700), batch=st.integers(1, 130),
       worker_counts=st.lists(st.integers(1, 9), min_size=1, max_size=6),
       min_tail=st.integers(1, 20))
def test_every_sample_exactly_once_across_resizes(num_samples, batch, worker_counts, min_tail):
    seen = run_epoch(num_samples, batch, worker_counts, min_tail)
    assert Counter(seen) == Counter(range(num_samples))


def test_ranks_in_a_step_are_disjoint():
    parts = [set(shard_indices(epoch=1, cursor=10, batch=11, num_workers=4, rank=r,
                               num_samples=100, seed=0).tolist()) for r in range(4)]
    assert sum(len(p) for p in parts) == 11
    assert len(set().union(*parts)) == 11


def test_permutation_is_seeded_per_epoch():
    a, b = epoch_permutation(0, 50, seed=1), epoch_permutation(1, 50, seed=1)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, epoch_permutation(0, 50, seed=1))
    assert sorted(a.tolist()) == list(range(50))


def test_tail_is_folded_into_the_last_step():
    # 100 samples, batch 32, min tail 8: 32, 32, 36 (the 4 left would be a runt step).
    sizes, cursor = [], 0
    while cursor < 100:
        sizes.append(step_batch(cursor, 100, 32, 8))
        cursor += sizes[-1]
    assert sizes == [32, 32, 36]
    assert steps_in_epoch(100, 32, 8) == 3
    assert steps_in_epoch(100, 25, 8) == 4


def test_bad_positions_are_rejected():
    with pytest.raises(ValueError):
        step_batch(100, 100, 10, 1)
    with pytest.raises(ValueError):
        shard_indices(epoch=0, cursor=95, batch=10, num_workers=2, rank=0, num_samples=100, seed=0)
