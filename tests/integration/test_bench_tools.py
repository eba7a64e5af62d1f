"""Smoke tests of ``bench throughput`` and ``bench rehearsal`` at their smallest sizes,
run as a user runs them (a subprocess each: both start and stop their own Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_bench(name: str, *args: str) -> subprocess.CompletedProcess:
    # The module itself, so the test does not depend on the dispatcher's list.
    return subprocess.run([sys.executable, "-m", f"flashtrain.bench.{name}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_throughput_reports_every_algorithm_and_the_peer(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_bench("throughput", "--grid", "1x2", "--model", "tiny_cnn", "--algos",
                       "flat,torus", "--steps", "3", "--warmup", "1", "--global-batch", "16",
                       "--image-size", "16", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["grid"] == "1x2" and data["meta"]["num_workers"] == 2
    rows = {row["algo"]: row for row in data["results"]}
    assert set(rows) == {"flat", "torus", "single_process"}
    for row in rows.values():
        assert row["step_s"] > 0 and row["images_per_sec"] > 0 and row["compute_s"] >= 0
    assert rows["flat"]["steps"] == 3 and rows["flat"]["global_batch"] == 16
    assert rows["flat"]["speedup_vs_flat"] == 1.0
    assert rows["torus"]["scaling_efficiency"] > 0
    assert rows["single_process"]["global_batch"] == 8  # one worker's share
    assert "torus" in result.stdout and "scaling eff" in result.stdout


def test_rehearsal_removes_and_adds_a_node(tmp_path):
    out = tmp_path / "rehearsal.json"
    result = run_bench("rehearsal", "--nodes", "2", "--workers-per-node", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    (size,) = json.loads(out.read_text())["results"]
    assert size["size"] == "2x1" and size["num_workers"] == 2
    steps = {t["transition"]: t for t in size["transitions"]}
    assert [t["transition"] for t in size["transitions"]] == ["form", "remove_node", "add_node"]
    assert (steps["form"]["new_grid"], steps["remove_node"]["new_grid"],
            steps["add_node"]["new_grid"]) == ("2x1", "1x1", "2x1")
    assert {"placement", "actor_start", "group_formation"} <= set(steps["form"]["phases_s"])
    assert {"detect", "leave", "state", "group_formation"} <= set(steps["remove_node"]["phases_s"])
    assert {"node", "placement", "actor_start", "state"} <= set(steps["add_node"]["phases_s"])
    for transition in steps.values():
        assert transition["reform_s"] > 0
        assert all(seconds >= 0 for seconds in transition["phases_s"].values())
        assert transition["phases_s"]["group_formation"] > 0
    assert size["peak_worker_pss_gb"] > 0


def test_rehearsal_refuses_a_single_node():
    result = run_bench("rehearsal", "--sizes", "1x2")
    assert result.returncode == 2 and "at least 2 nodes" in result.stderr
