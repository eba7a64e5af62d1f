"""Smoke tests of ``bench throughput`` and ``bench rehearsal`` at their smallest sizes,
run as a user runs them (a subprocess each: both start and stop their own Ray)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_bench(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # The module itself, so the test does not depend on the dispatcher's list.
    return subprocess.run([sys.executable, "-m", f"flashtrain.bench.{name}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_throughput_interleaves_flashtrain_and_the_plain_ddp_loop(tmp_path):
    """torus and the plain Ray Train v2 + DDP loop at 2 workers, one round of each (the
    summary over several interleaved rounds is checked on known records in
    tests/unit/test_throughput_summary.py); the per-step split lands in the kept run
    directory, and the cost model fits this machine's compute from the JSON."""
    out, runs = tmp_path / "throughput.json", tmp_path / "runs"
    result = run_bench("throughput", "--workers", "2", "--model", "tiny_cnn", "--algos",
                       "torus", "--steps", "3", "--warmup", "1", "--per-worker-batch", "8",
                       "--image-size", "16", "--repeats", "1", "--json", str(out),
                       "--keep-runs", str(runs), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["workers"] == [2] and data["meta"]["repeats"] == 1
    assert [(r["system"], r["repeat"]) for r in data["runs"]] == [
        ("flashtrain_torus", 0), ("raytrain_ddp", 0)]
    for run in data["runs"]:
        assert run["workers"] == 2 and run["steps"] == 3 and run["global_batch"] == 16
        assert run["step_s"] > 0 and run["images_per_sec"] > 0
    rows = {row["system"]: row for row in data["summary"]}
    assert set(rows) == {"flashtrain_torus", "raytrain_ddp"}
    for name, row in rows.items():
        speeds = [r["images_per_sec"] for r in data["runs"] if r["system"] == name]
        assert row["repeats"] == 1 and row["images_per_sec_min"] == min(speeds)
        assert row["images_per_sec_max"] == max(speeds)
    assert rows["raytrain_ddp"]["vs_peer"] == 1.0
    assert rows["flashtrain_torus"]["vs_peer"] == pytest.approx(
        rows["flashtrain_torus"]["images_per_sec"] / rows["raytrain_ddp"]["images_per_sec"])
    speed = {(r["system"], r["repeat"]): r["images_per_sec"] for r in data["runs"]}
    assert rows["flashtrain_torus"]["vs_peer_rounds"] == pytest.approx(
        [speed[("flashtrain_torus", 0)] / speed[("raytrain_ddp", 0)]])
    for run in data["runs"]:
        if run["system"] != "flashtrain_torus":
            continue
        assert run["overlap"] is True and run["grid"] == "1x2"
        assert run["compute_s"] > 0 and run["comm_exposed_s"] >= 0 and run["data_wait_s"] >= 0
        run_dir = Path(run["run_dir"])
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("kind") == "step"]
        assert steps and all(0 < step["compute_seconds"] <= step["step_seconds"]
                             and 0 <= step["comm_exposed_seconds"] <= step["step_seconds"]
                             and 0 <= step["data_wait_seconds"] <= step["step_seconds"]
                             for step in steps)
        assert (run_dir / "step_split.png").stat().st_size > 0
    assert "raytrain_ddp" in result.stdout and "vs peer" in result.stdout
    # The cost model fits this machine's compute from exactly this file.
    fit = run_bench("costmodel", "--fit", str(out), "--json", str(tmp_path / "cost.json"))
    assert fit.returncode == 0, fit.stderr[-3000:]
    compute = json.loads((tmp_path / "cost.json").read_text())["fit"]["compute"]
    assert compute["seconds_per_image"] == pytest.approx(statistics.median(
        run["compute_s"] / 8 for run in data["runs"] if run["system"] == "flashtrain_torus"))


def test_throughput_refuses_an_odd_worker_count():
    result = run_bench("throughput", "--workers", "3")
    assert result.returncode == 2 and "must be 1 or even" in result.stderr


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
