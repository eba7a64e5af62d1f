"""Smoke test of ``bench recipe`` at its smallest size, run as a user runs it (a
subprocess: it starts and stops its own Ray): two variants, one seed, two epochs (the
least in which batch-size control can switch)."""

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


def test_recipe_runs_small_and_batch_size_control(tmp_path):
    out, runs = tmp_path / "recipe.json", tmp_path / "runs"
    result = run_recipe("--variants", "small,control+ls", "--seeds", "1", "--epochs", "2",
                        "--switch-epoch", "1", "--small-batch", "32", "--large-batch", "128",
                        "--runs-dir", str(runs), "--plot", str(tmp_path / "recipe.png"),
                        "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    variants = {row["variant"]: row for row in data["variants"]}
    assert set(variants) == {"small", "control+ls"}
    for row in variants.values():
        assert 0 < row["top1_mean"] <= 1 and row["seeds"] == 1
    assert (tmp_path / "recipe.png").stat().st_size > 0
    # Same sample budget: every run trained two full epochs of the same data.
    assert len({run["samples"] for run in data["runs"]}) == 1
    by_variant = {run["variant"]: Path(run["run_dir"]) for run in data["runs"]}
    # From the runs' own metrics: control used the small batch in epoch 0 and the large
    # one in epoch 1; the fixed schedule used one batch throughout.
    control = step_records(by_variant["control+ls"])
    assert {r["global_batch"] for r in control if r["epoch"] == 0} == {32}
    assert {r["global_batch"] for r in control if r["epoch"] == 1} == {128}
    assert {r["global_batch"] for r in step_records(by_variant["small"])} == {32}
    smoothing = {name: yaml.safe_load((path / "config.yaml").read_text())["schedule"]["label_smoothing"]
                 for name, path in by_variant.items()}
    assert smoothing == {"small": 0.0, "control+ls": 0.1}
    assert "control+ls" in result.stdout and "top-1 mean" in result.stdout


def test_recipe_refuses_a_control_run_without_a_switch(tmp_path):
    result = run_recipe("--variants", "control", "--epochs", "1", "--json", str(tmp_path / "x.json"))
    assert result.returncode == 2
    assert "--switch-epoch" in result.stderr and "Traceback" not in result.stderr
