"""`python -m flashtrain.bench control`: the driver's real step loop against stub workers.
What a user relies on is not a speed (benchmarks report those) but the protocol: with step
windows the driver makes one call per worker per window, commit included, instead of one
per step."""

import json
import subprocess
import sys


def test_windows_and_relays_cut_the_drivers_calls(tmp_path):
    out = tmp_path / "control.json"
    steps, commit_every, fanout = 20, 5, 2
    result = subprocess.run(
        [sys.executable, "-m", "flashtrain.bench", "control", "--workers", "2,7",
         "--steps", str(steps), "--commit-every", str(commit_every), "--nodes", "2",
         "--fanout", str(fanout), "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["workers"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(n, m) for n in (2, 7) for m in ("per-step", "windowed", "relayed")}
    windows = steps // commit_every
    for size in (2, 7):
        driver_calls = {m: round(rows[(size, m)]["driver_calls_per_step"] * steps)
                        for m in ("per-step", "windowed", "relayed")}
        assert driver_calls["per-step"] == size * steps
        assert driver_calls["windowed"] == size * windows
        # Relayed: one call a window from the driver once the grid is larger than the
        # fan-out (7 workers: a tree of depth 3); a grid within it is called directly.
        assert driver_calls["relayed"] == (windows if size > fanout else size * windows)
        # ... and every worker still trained every window, in one call each.
        for mode, calls in (("windowed", windows), ("relayed", windows)):
            assert [round(c * steps) for c in rows[(size, mode)]["worker_calls_per_step"]] \
                == [calls] * size, (size, mode)
    assert rows[(7, "relayed")]["tree_depth"] == 3
    assert "ms/step" in result.stdout and "2,176" in result.stdout
