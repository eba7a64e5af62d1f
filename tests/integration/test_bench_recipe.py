"""Smoke test of ``bench recipe`` at its smallest size, run as a user runs it (a
subprocess: it starts and stops its own Ray): batch-size control with label smoothing,
one seed, two epochs (the least in which batch-size control can switch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def run_recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashtrain.bench.recipe", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=420)


def step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "step"]


def test_recipe_runs_batch_size_control_with_label_smoothing(tmp_path):
    # The variant with the most in it: the batch switches between epochs, and the labels
    # are smoothed. (Every variant's configuration, and the table over seeds, are checked
    # in tests/unit/test_recipe_variants.py.)
    out, runs = tmp_path / "recipe.json", tmp_path / "runs"
    result = run_recipe("--variants", "control+ls", "--seeds", "1", "--epochs", "2",
                        "--switch-epoch", "1", "--small-batch", "32", "--large-batch", "128",
                        "--runs-dir", str(runs), "--plot", str(tmp_path / "recipe.png"),
                        "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["variants"]
    assert row["variant"] == "control+ls" and 0 < row["top1_mean"] <= 1 and row["seeds"] == 1
    assert (tmp_path / "recipe.png").stat().st_size > 0
    (run,) = data["runs"]
    run_dir = Path(run["run_dir"])
    # From the run's own metrics: the small batch in epoch 0, the large one in epoch 1,
    # and two whole epochs of the digits trained.
    steps = step_records(run_dir)
    assert {r["global_batch"] for r in steps if r["epoch"] == 0} == {32}
    assert {r["global_batch"] for r in steps if r["epoch"] == 1} == {128}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run["samples"] == 2 * summary["dataset_train_size"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["schedule"]["label_smoothing"] == 0.1
    assert "control+ls" in result.stdout and "top-1 mean" in result.stdout


def test_recipe_refuses_a_control_run_without_a_switch(tmp_path):
    result = run_recipe("--variants", "control", "--epochs", "1", "--json", str(tmp_path / "x.json"))
    assert result.returncode == 2
    assert "--switch-epoch" in result.stderr and "Traceback" not in result.stderr
