"""``bench elastic``'s common measures and its table, on known timelines: both systems'
rows are measured by the same rule, from one list of completed steps."""

from __future__ import annotations

import argparse

from flashtrain.bench.elastic import format_table, grid_for, measure_recovery


def test_recovery_counts_from_the_kill_to_the_first_step_after_it():
    # Steps 0-2 completed, the kill at t=10.0 inside step 3, the run resumed from step 2.
    steps = [(0, 1.0), (1, 2.0), (2, 3.0), (2, 14.5), (3, 15.0), (4, 16.0)]
    assert measure_recovery(10.0, 3, steps) == {
        "recovery_seconds": 4.5, "resume_step": 2, "steps_redone": 1, "last_step_before_kill": 2}


def test_a_run_with_no_step_after_the_kill_has_no_recovery():
    assert measure_recovery(10.0, 3, [(0, 1.0), (1, 2.0)]) == {
        "recovery_seconds": None, "resume_step": None, "steps_redone": None,
        "last_step_before_kill": 1}


def test_the_squarest_grid():
    assert [grid_for(n) for n in (1, 2, 4, 6, 8, 9)] == ["1x1", "1x2", "2x2", "2x3", "2x4", "3x3"]


def args() -> argparse.Namespace:
    return argparse.Namespace(workers=2, model="tiny_cnn", global_batch=256, epochs=1,
                              kill_at_step=3)


def row(system: str, recovery: float | None, resume: int | None) -> dict:
    return {"system": system, "recovery_seconds": recovery, "recovery_seconds_conservative":
            None if recovery is None else recovery + 0.5, "resume_step": resume,
            "steps_redone": None if resume is None else 3 - resume, "after_kill_workers": 2,
            "wall_seconds": 30.0}


def test_the_table_compares_the_systems_when_both_recovered():
    text = format_table([row("flashtrain", 2.0, 2), row("raytrain", 16.0, 0)], args())
    lines = text.splitlines()
    assert lines[0].startswith("elastic recovery: 2 CPU workers, tiny_cnn, global batch 256")
    assert lines[2].split() == ["flashtrain", "2.00", "2.50", "2", "1", "2", "30.0"]
    assert lines[3].split() == ["raytrain", "16.00", "16.50", "0", "3", "2", "30.0"]
    assert "flashtrain / Ray Train recovery: 0.125 (8.0x faster)" in text


def test_the_table_has_no_ratio_for_one_system_or_a_failed_one():
    alone = format_table([row("raytrain", 16.0, 0)], args())
    failed = format_table([row("flashtrain", 2.0, 2), row("raytrain", None, None)], args())
    for text in (alone, failed):
        assert "faster" not in text
    assert failed.splitlines()[3].split() == ["raytrain", "-", "-", "-", "-", "2", "30.0"]
