"""The GPU tier may skip for two reasons only: no CUDA device (its conftest) and Ray
unable to place the ranks (``members.placed``). Read from its source, so a CPU machine
catches a test that would turn a bug into a skip on a GPU one (as the 2-rank probe and
the AMP join once did: any exception became "NCCL did not accept several ranks")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GPU_TIER = Path(__file__).resolve().parents[1] / "gpu"


def _skip_calls(tree: ast.AST) -> list[tuple[str, int]]:
    """(enclosing function, line) of each ``pytest.skip(...)`` call (the conftest's
    ``pytest.mark.skip`` for "no GPU" is a marker, not such a call)."""
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "skip" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "pytest"):
                found.append((func.name, node.lineno))
    return found


@pytest.mark.parametrize("path", sorted(GPU_TIER.glob("*.py")), ids=lambda p: p.name)
def test_the_gpu_tier_skips_only_where_ranks_cannot_be_placed(path):
    calls = _skip_calls(ast.parse(path.read_text()))
    allowed = {"placed"} if path.name == "members.py" else set()
    assert [c for c in calls if c[0] not in allowed] == [], (
        f"{path.name}: a skip outside members.placed turns a failure into a skip")
