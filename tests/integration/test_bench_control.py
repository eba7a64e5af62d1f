"""`python -m flashtrain.bench control`: the driver's real step loop against stub Ray
workers. What a user relies on is not a speed (benchmarks report those) but the protocol:
with step windows the driver makes one call per worker per window, commit included,
instead of one per step; relayed, one call a window. Here at the smallest grid with a
relay tree (3 workers, fan-out 2) over real actors; the same protocol at 7 workers (a
tree of depth 3) is checked on the simulator (tests/unit/test_sim_scenarios.py)."""

import json
import subprocess
import sys


def test_windows_and_relays_cut_the_drivers_calls(tmp_path):
    out = tmp_path / "control.json"
    size, steps, commit_every, fanout = 3, 6, 3, 2
    result = subprocess.run(
        [sys.executable, "-m", "flashtrain.bench", "control", "--workers", str(size),
         "--steps", str(steps), "--commit-every", str(commit_every), "--nodes", "2",
         "--fanout", str(fanout), "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["workers"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(size, m) for m in ("per-step", "windowed", "relayed")}
    windows = steps // commit_every
    driver_calls = {m: round(rows[(size, m)]["driver_calls_per_step"] * steps)
                    for m in ("per-step", "windowed", "relayed")}
    assert driver_calls == {"per-step": size * steps, "windowed": size * windows,
                            "relayed": windows}
    # ... and every worker still trained every window, in one call each.
    for mode in ("windowed", "relayed"):
        assert [round(c * steps) for c in rows[(size, mode)]["worker_calls_per_step"]] \
            == [windows] * size, mode
    assert rows[(size, "relayed")]["tree_depth"] == 2
    assert "ms/step" in result.stdout and "2,176" in result.stdout
