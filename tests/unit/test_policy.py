from hypothesis import given
from hypothesis import strategies as st

from flashtrain.policy import Abort, Keep, Reform, Wait, decide, propose_grid
from flashtrain.topology import Grid


def test_full_nodes_make_full_rows():
    proposal = propose_grid({"a": 4, "b": 4}, preferred_cols=4)
    assert proposal.grid == Grid(2, 4) and proposal.num_idle == 0


def test_losing_a_node_shrinks_rows():
    assert propose_grid({"a": 2}, preferred_cols=2).grid == Grid(1, 2)


def test_prime_count_uses_every_worker_in_single_rows():
    # 7 workers on nodes of 4 and 3: 1x4 idles 3, 2x3 idles 1, 7x1 idles none.
    proposal = propose_grid({"a": 4, "b": 3}, preferred_cols=4)
    assert proposal.grid == Grid(7, 1)
    assert proposal.num_idle == 0


def test_uneven_nodes_leave_spares_and_say_why():
    # nodes of 4, 4 and 1 with max_workers 8: 2x4 and one spare.
    proposal = propose_grid({"a": 4, "b": 4, "c": 1}, preferred_cols=4, max_workers=8)
    assert proposal.grid == Grid(2, 4)
    assert proposal.num_idle == 1 and "idle" in proposal.reason


@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=2), st.integers(0, 9), max_size=6),
       st.integers(1, 8))
def test_proposal_fits_the_nodes(node_slots, preferred):
    proposal = propose_grid(node_slots, preferred)
    total = sum(node_slots.values())
    if total == 0:
        assert proposal is None
        return
    grid = proposal.grid
    assert grid.cols <= preferred
    # Every row fits whole on one node.
    assert grid.rows <= sum(n // grid.cols for n in node_slots.values())
    assert proposal.num_idle == total - grid.num_workers >= 0
    # No other row length <= preferred would use more workers.
    best = max(c * sum(n // c for n in node_slots.values()) for c in range(1, preferred + 1))
    assert grid.num_workers == best


def test_decide_keeps_a_healthy_grid():
    decision = decide(Grid(2, 2), {"a": 2, "b": 2}, preferred_cols=2, min_workers=1)
    assert isinstance(decision, Keep)


def test_decide_reforms_after_a_loss_even_if_shape_is_unchanged():
    decision = decide(Grid(2, 2), {"a": 2, "b": 2}, preferred_cols=2, min_workers=1,
                      lost_members=True)
    assert isinstance(decision, Reform) and decision.grid == Grid(2, 2)


def test_decide_shrinks_then_waits_then_aborts():
    shrink = decide(Grid(2, 2), {"a": 2}, preferred_cols=2, min_workers=2, lost_members=True)
    assert isinstance(shrink, Reform) and shrink.grid == Grid(1, 2)
    wait = decide(Grid(1, 2), {"a": 1}, preferred_cols=2, min_workers=2, waited_s=1,
                  wait_limit_s=10)
    assert isinstance(wait, Wait) and "min_workers=2" in wait.reason
    abort = decide(Grid(1, 2), {"a": 1}, preferred_cols=2, min_workers=2, waited_s=10,
                   wait_limit_s=10)
    assert isinstance(abort, Abort)
