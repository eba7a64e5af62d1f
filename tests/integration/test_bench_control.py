"""`python -m flashtrain.bench control`: the driver's real step loop against stub workers.
What a user relies on is not a speed (benchmarks report those) but the protocol: with step
windows the driver makes one call per worker per window, commit included, instead of one
per step."""

import json
import subprocess
import sys


def test_windows_make_one_call_per_worker_per_window(tmp_path):
    out = tmp_path / "control.json"
    steps, commit_every = 20, 5
    result = subprocess.run(
        [sys.executable, "-m", "flashtrain.bench", "control", "--workers", "2,3",
         "--steps", str(steps), "--commit-every", str(commit_every), "--nodes", "2",
         "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["workers"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(2, "per-step"), (2, "windowed"), (3, "per-step"), (3, "windowed")}
    validate = 1  # the end-of-epoch validation, one call per worker
    for size in (2, 3):
        per_step = rows[(size, "per-step")]["calls_per_worker_per_step"] * steps
        windowed = rows[(size, "windowed")]["calls_per_worker_per_step"] * steps
        assert round(per_step) == steps + validate
        assert round(windowed) == steps // commit_every + validate
    assert "ms/step" in result.stdout and "2,176" in result.stdout
