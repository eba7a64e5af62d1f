"""``--resume`` as a user types it: interrupt a cpu-smoke run, try to change what it is,
continue it, and resume it once more after it finished."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOB = [sys.executable, "-m", "flashtrain.jobs.imagenet"]


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FLASHTRAIN_RUNS_ROOT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_job(args: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(JOB + args, cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=timeout_s)


def files_of(run_dir: Path) -> dict[str, str]:
    """Every file of the run directory and its sha256."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    steps = [json.loads(line)["step"] for line in lines
             if line.endswith("}") and '"kind": "step"' in line]
    return max(steps, default=-1)


def interrupt_after(args: list[str], run_dir: Path, step: int, deadline_s: float = 300) -> int:
    """Start the job, SIGINT it (a user's Ctrl-C) once it recorded ``step``; its exit code."""
    # As at a terminal: SIGINT not ignored, even where pytest runs in the background of a
    # non-interactive shell (which ignores SIGINT, and the job would inherit that)
    job = subprocess.Popen(JOB + args, cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + deadline_s
    try:
        while last_step(run_dir) < step and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # polling the job's own records, bounded by the deadline
        assert job.poll() is None, f"the job ended before step {step}: {job.stderr.read()[-2000:]}"
        job.send_signal(signal.SIGINT)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=30)
    assert "interrupted; resume with --resume --run-dir" in err, \
        f"exit status {job.returncode}, last step {last_step(run_dir)}: {err[-2000:]}"
    return job.returncode


def step_losses(run_dir: Path) -> tuple[dict[int, float], int]:
    """Each step's loss, checking that a step trained twice (before the interruption and
    again after the resume, from the checkpoint) had the same loss both times; and how
    many steps were trained twice."""
    losses: dict[int, float] = {}
    twice = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            if record["step"] in losses:
                twice += 1
                assert losses[record["step"]] == record["loss"], record
            losses[record["step"]] = record["loss"]
    return losses, twice


def test_interrupt_refuse_resume_and_resume_a_finished_run(tmp_path, ray_address):
    run_dir = tmp_path / "smoke"  # absolute: used exactly as given
    common = ["--data-cache", str(tmp_path / "cache")]
    # Two epochs of 23 steps: the interruption lands far from the run's end (with one
    # epoch a fresh-clone CI run's job had finished its last 10 steps before the signal
    # arrived, and printed nothing).
    # A 1x2 grid: what is resumed does not depend on the grid's shape. The jobs join this
    # pytest process's Ray, as jobs join the cluster of `ray start` (the resume too: the
    # address is part of the recorded configuration).
    first = ["--config", "jobs/cpu-smoke.yaml", "--set", "schedule.epochs=2", "--set",
             "schedule.phases=[{start_epoch: 0, global_batch: 64}]", "--set", "grid.shape=1x2",
             "--set", f"runtime.ray_address={ray_address}", "--run-dir", str(run_dir),
             *common]
    # cpu-smoke checkpoints every 10 steps: interrupted past 12, it resumes from step 10.
    assert interrupt_after(first, run_dir, step=12) == 130
    before = files_of(run_dir)
    assert "summary.json" not in before and "segments.json" in before

    other = run_job(["--resume", "--run-dir", str(run_dir), "--set", "model.name=resnet18", *common])
    assert other.returncode == 2
    lines = [line for line in other.stderr.splitlines() if line.startswith("flashtrain:")]
    assert len(lines) == 1 and "model.name" in lines[0] and "Traceback" not in other.stderr
    assert files_of(run_dir) == before

    resumed = run_job(["--resume", "--run-dir", str(run_dir), "--set", "runtime.progress=false",
                       *common])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"run directory {run_dir} (as given by --run-dir)" in resumed.stdout
    assert "ckpt-00000010.pt" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == "tiny_cnn"
    segments = summary["segments"]
    assert [s["ended"] for s in segments] == ["interrupted", "finished"]
    assert segments[0]["first_step"] == 0 and segments[0]["last_step"] >= 12
    assert segments[1]["first_step"] == 10 and segments[1]["last_step"] == summary["global_steps"] - 1
    assert summary["wall_seconds"] == sum(s["wall_seconds"] for s in segments)
    assert summary["images_per_sec"] == (sum(s["trained_samples"] for s in segments)
                                         / sum(s["train_seconds"] for s in segments))
    losses, twice = step_losses(run_dir)
    assert sorted(losses) == list(range(summary["global_steps"])) and twice >= 3
    assert "Segments" in (run_dir / "report.html").read_text()

    finished = files_of(run_dir)
    again = run_job(["--resume", "--run-dir", str(run_dir), *common], timeout_s=120)
    assert again.returncode == 0
    assert "is finished" in again.stdout and f"{summary['final_top1']:.4f}" in again.stdout
    assert files_of(run_dir) == finished
