"""``python -m flashtrain.bench elastic`` end to end at the smallest useful size, on its
peer's side: Ray Train v2's elastic ``TorchTrainer`` with two workers, one epoch of the
1,438 training digits in steps of 256, the last rank killed inside DDP's all-reduce of
step 3, restarted from step 0.

flashtrain's side of the benchmark is the same kill (``faults.kill_during=allreduce`` at a
step) that ``test_elastic.py`` makes inside a relay tree's all-reduce, so this smoke runs
only the peer (``--systems raytrain``): the one part of the benchmark no other test runs
(measured alone, minutes apart: Ray Train's side 108 s of CPU, flashtrain's 42 s). The
table and the common measures over both systems' rows are checked on known timelines in
``tests/unit/test_elastic_table.py``.

It runs as a user would, in a subprocess: the benchmark starts (and shuts down) its own
local Ray, with the dashboard Ray Train needs, so it must not share this process's Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KILL_AT_STEP = 3


# Marked slow: about 80 s alone on 2 cores, 115 to 170 s in `make test`. Ray Train starts
# its worker group twice (with its controller and helper actors) and paces reports to its
# 2 s poll of the workers.
@pytest.mark.slow
def test_ray_train_recovers_and_the_json_says_how(tmp_path):
    out = tmp_path / "elastic.json"
    command = [sys.executable, "-m", "flashtrain.bench", "elastic", "--systems", "raytrain",
               "--workers", "2", "--epochs", "1", "--global-batch", "256",
               "--kill-at-step", str(KILL_AT_STEP), "--commit-every", "2",
               "--data-cache", str(tmp_path / "digits"), "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "raytrain" in result.stdout and "recovery s" in result.stdout

    (row,) = json.loads(out.read_text())["results"]
    assert row["system"] == "raytrain" and row["error"] is None
    assert isinstance(row["recovery_seconds"], float) and row["recovery_seconds"] > 0
    assert row["kill_time_source"] == "gcs_actor_end_time"
    assert row["last_step_before_kill"] == KILL_AT_STEP - 1
    # No epoch ended before the kill, so Ray Train had no checkpoint: back to step 0.
    assert row["resume_step"] == 0 and row["steps_redone"] == KILL_AT_STEP
    # Every step of the epoch was trained: five of 256 samples and the 158 left.
    assert row["total_steps"] == 6
    # The victim's clock before os._exit comes before Ray's record of its death.
    assert row["recovery_seconds_conservative"] >= row["recovery_seconds"]
    restart = row["own_record"]["restart"]
    assert restart["step"] == 0 and restart["world"] == row["after_kill_workers"] >= 1
