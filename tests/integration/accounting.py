"""Exactly-once accounting of a finished run, as the integration tests check it."""

from __future__ import annotations


def assert_exactly_once(summary: dict, records: list[dict]) -> None:
    """Every epoch trained every sample once (summary.json's ``samples_per_epoch``);
    every global step completed at least once, and the steps trained twice are exactly
    the rolled-back ones: those recorded and then redone, and those a failure ended
    inside a step window (trained, never reported: its ``window_lost`` event counts
    them)."""
    size = summary["dataset_train_size"]
    assert summary["samples_per_epoch"] == [size] * round(summary["epochs"])
    steps = [r for r in records if r["kind"] == "step"]
    done = sorted({r["step"] for r in steps})
    assert done == list(range(summary["global_steps"]))
    redone = len(steps) - len(done)
    lost_in_windows = sum(r["failed_step"] - r["first_step"] for r in records
                          if r.get("name") == "window_lost")
    assert redone + lost_in_windows == sum(r["steps_rolled_back"] for r in summary["reforms"])
