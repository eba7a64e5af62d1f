import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashtrain.topology import Grid, col_group_name, layout_grid, row_group_name

grids = st.builds(Grid, st.integers(1, 12), st.integers(1, 12))


@given(grids, st.data())
def test_rank_coords_round_trip(grid, data):
    rank = data.draw(st.integers(0, grid.num_workers - 1))
    row, col = grid.coords(rank)
    assert 0 <= row < grid.rows and 0 <= col < grid.cols
    assert grid.rank(row, col) == rank


@given(grids)
def test_rows_and_cols_partition_the_ranks(grid):
    everyone = set(range(grid.num_workers))
    rows = [grid.row_members(r) for r in range(grid.rows)]
    cols = [grid.col_members(c) for c in range(grid.cols)]
    for groups, size in ((rows, grid.cols), (cols, grid.rows)):
        assert all(len(g) == size for g in groups)
        assert sorted(r for g in groups for r in g) == sorted(everyone)
    # A row and a column meet in exactly one cell.
    for row in rows:
        for col in cols:
            assert len(set(row) & set(col)) == 1


def test_row_members_are_consecutive_ranks():
    grid = Grid(2, 4)
    assert grid.row_members(1) == [4, 5, 6, 7]
    assert grid.col_members(2) == [2, 6]


def test_parse_and_str():
    assert Grid.parse("3x4") == Grid(3, 4)
    assert str(Grid(3, 4)) == "3x4"
    for bad in ("3", "x4", "0x2", "3*4", ""):
        with pytest.raises(ValueError):
            Grid.parse(bad)


def test_group_names_carry_generation():
    assert row_group_name(1, 3) == "row1@g3"
    assert col_group_name(0, 3) != col_group_name(0, 4)


def test_layout_keeps_rows_on_one_node():
    # Two nodes, slots interleaved in the bundle order Ray might report.
    nodes = ["a", "b", "a", "b", "a", "b", "a", "b"]
    layout = layout_grid(nodes, Grid(2, 4))
    assert layout.split_rows == 0
    for row in range(2):
        members = [layout.slot_of_rank[r] for r in Grid(2, 4).row_members(row)]
        assert len({nodes[s] for s in members}) == 1


@given(st.lists(st.sampled_from("abcde"), min_size=1, max_size=24), st.data())
def test_layout_uses_each_slot_at_most_once(nodes, data):
    cols = data.draw(st.integers(1, len(nodes)))
    rows = data.draw(st.integers(1, len(nodes) // cols))
    grid = Grid(rows, cols)
    layout = layout_grid(nodes, grid)
    assert len(layout.slot_of_rank) == grid.num_workers
    assert len(set(layout.slot_of_rank)) == grid.num_workers
    # Rows that could be whole on a node are: split rows only come from leftovers.
    whole_possible = sum(nodes.count(n) // cols for n in set(nodes))
    assert layout.split_rows <= max(rows - whole_possible, 0)


def test_layout_rejects_too_few_slots():
    with pytest.raises(ValueError, match="needs 4 workers"):
        layout_grid(["a", "a", "a"], Grid(2, 2))
