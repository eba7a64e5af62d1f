"""The replica check in a real run: one rank's model is changed by a rounding error's
worth just before a commit (the ``faults.perturb_replica_at_steps`` hook), and the job
stops at that commit, naming the rank and the tensor, with a non-zero exit and the
checkpoints of the replicas that were checked equal on disk. The run's report is written
all the same, says that it failed and why, and keeps its plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from flashtrain.train.checkpoint import list_checkpoints, load_checkpoint
from flashtrain.train.models import build_model

REPO = Path(__file__).resolve().parents[2]


def test_a_diverged_replica_stops_the_run_naming_rank_and_tensor(tmp_path, ray_address):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FLASHTRAIN_RUNS_ROOT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    # cpu-smoke commits every 3 steps: the perturbation armed at step 4 lands in the
    # commit tagged 6 (the clock position after step 5), on the last rank (1 of 1x2).
    args = ["--config", "jobs/cpu-smoke.yaml", "--set", f"runtime.ray_address={ray_address}",
            "--set", "grid.shape=1x2",
            "--set", "faults.perturb_replica_at_steps=[4]", "--run-dir", str(run_dir),
            "--data-cache", str(tmp_path / "cache")]
    job = subprocess.run([sys.executable, "-m", "flashtrain.jobs.imagenet", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=240)
    assert job.returncode != 0, job.stdout[-2000:]
    first = next(name for name, _ in build_model("tiny_cnn", 10, 0).named_parameters())
    assert ("ReplicasDiverged: replicas diverged at the commit of step 6: rank 1 differs "
            f"from rank 0 in {first} (") in job.stderr, job.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["kind"] == "step") == 5  # stopped at that commit
    assert [r["global_step"] for r in records if r.get("name") == "replicas_diverged"] == [6]
    # The checkpoints hold the start and the last commit checked equal (step 3), loadable.
    saved = list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in saved] == ["ckpt-00000000.pt", "ckpt-00000003.pt"]
    model = build_model("tiny_cnn", 10, 0)
    model.load_state_dict(load_checkpoint(saved[-1])["model"])
    assert any(not torch.equal(p, q) for p, q in zip(
        model.state_dict().values(), build_model("tiny_cnn", 10, 0).state_dict().values(),
        strict=True))  # trained: the steps before the divergence are kept
    assert (run_dir / "config.yaml").is_file() and (run_dir / "error.log").is_file()
    # The report of the failed run: written, saying that it failed and why, with its plots.
    assert "run failed" in job.stderr
    assert f"report {run_dir / 'report.html'}" in job.stdout + job.stderr
    page = (run_dir / "report.html").read_text()
    assert "failed (see the error" in page and "replicas diverged at the commit of step 6" in page
    assert page.count('<img src="data:image/png;base64,') == 5
