"""The batch-scheduler launcher end to end on this machine (``--dry-run``): two Ray nodes
started by the node agents, the training job on both, then the scheduler's SIGTERM in the
middle of training: the job stopped, Ray stopped on both, status 143; a host that never
joins: a bounded wait, a message naming it, a non-zero exit, Ray stopped. (A launch whose
job runs to its end is not run here: ``launch`` stops the nodes in the same ``finally``.)

Every Ray process of a launch inherits ``RAY_AUTH_TOKEN_PATH=<shared dir>/auth_token``
from its node agent, which tells this launch's processes apart from other Ray instances on
the machine: the tests look for leftovers by it, and stop them even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NEVER_JOINS = "node-never"
# A remote exec where one host hangs like an ssh to a dead node; the others run locally.
HANGING_HOST_EXEC = (f"bash -c 'if [ \"$1\" = {NEVER_JOINS} ]; then exec sleep 987; fi; "
                     "exec bash -c \"$2\"' remote-exec {host} {command}")


def launch_processes(share_dir: Path) -> list[int]:
    """Pids of live processes that belong to the launch whose shared dir is ``share_dir``."""
    marker = f"RAY_AUTH_TOKEN_PATH={share_dir / 'auth_token'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def wait_until_gone(share_dir: Path, deadline_s: float) -> list[int]:
    deadline = time.monotonic() + deadline_s
    while (left := launch_processes(share_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)  # processes that are exiting; bounded by the deadline
    return left


@pytest.fixture
def share_dir(tmp_path):
    """The launch's shared directory; afterwards, whatever happened, its nodes are stopped."""
    share = tmp_path / "launch"
    yield share
    for host in ("node-0", "node-1", NEVER_JOINS):
        if (share / "nodes").is_dir():
            (share / "nodes" / f"{host}.stop").touch()
    for pid in wait_until_gone(share, deadline_s=30):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_launcher(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return subprocess.run([sys.executable, "-m", "flashtrain.launch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def test_a_host_that_never_joins_stops_the_launch(share_dir, tmp_path):
    result = run_launcher(
        ["--dry-run", "--hosts", f"node-0,{NEVER_JOINS}", "--remote-exec", HANGING_HOST_EXEC,
         "--share-dir", str(share_dir), "--join-timeout", "20", "--stop-timeout", "8", "--",
         "--config", "jobs/cpu-smoke.yaml", "--run-dir", str(tmp_path / "run")],
        timeout_s=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "did not join" in result.stderr or "did not start" in result.stderr, result.stderr
    missing_line = next(line for line in result.stderr.splitlines() if "within 20s" in line)
    assert NEVER_JOINS in missing_line
    # node-0's agent stopped its Ray; the hung remote exec of node-never had to be killed
    assert f"no stop confirmed by {NEVER_JOINS} " in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run").exists(), "the job must not run on a partial cluster"
    assert not launch_processes(share_dir), "Ray processes of the launch are still running"
    hung = subprocess.run(["pgrep", "-f", "sleep 987"], capture_output=True, text=True)
    assert hung.stdout == "", "the hung remote exec was not ended"


def wait_for_training(run_dir: Path, launcher: subprocess.Popen, deadline_s: float) -> None:
    """Until the job has recorded a training step (or the launcher has ended)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and launcher.poll() is None:
        if metrics.exists() and '"kind": "step"' in metrics.read_text():
            return
        time.sleep(1)  # the job is starting; bounded by the deadline
    raise AssertionError(f"no training step recorded in {metrics} within {deadline_s:g}s")


def test_training_on_two_launched_nodes_stops_everything_on_sigterm(share_dir, tmp_path):
    # The launch a batch job makes, end to end: two nodes started by their agents, the job
    # on both (a 1x2 grid of one-CPU workers on nodes of one CPU each), then the scheduler's
    # SIGTERM (what qdel, scancel or the time limit send) in the middle of training: the
    # job stopped through its own exit path, Ray stopped on every host, status 143.
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flashtrain.launch", "--dry-run", "--share-dir", str(share_dir),
         "--cpus-per-node", "1", "--join-timeout", "240", "--stop-timeout", "60", "--",
         "--config", "jobs/cpu-smoke.yaml", "--run-dir", str(run_dir),
         "--data-cache", str(tmp_path / "cache"), "--set", "grid.shape=1x2",
         "--set", "grid.cpus_per_worker=1",
         "--set", "collective.timeout_s=120", "--set", "schedule.epochs=50"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_training(run_dir, launcher, deadline_s=400)
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert "all 2 node(s) joined the cluster" in err, err[-3000:]
    grids = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"name": "grid"' in line]
    assert len(set(grids[0]["nodes"])) == 2, "the grid did not use both launched nodes"
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: stopping" in err and "Ray stopped on every host" in err, err[-3000:]
    assert "interrupted; resume with --resume" in err, err[-3000:]  # the job's own exit path
    segments = json.loads((run_dir / "segments.json").read_text())
    assert [s["ended"] for s in segments] == ["interrupted"], segments
    assert not launch_processes(share_dir), "Ray processes of the launch are still running"
    assert oct((share_dir / "auth_token").stat().st_mode & 0o777) == "0o600"


def test_a_node_command_that_fails_is_named_at_once(share_dir, tmp_path):
    # Like an ssh that cannot reach its host: the remote exec itself fails, no Ray starts.
    result = run_launcher(
        ["--dry-run", "--hosts", "node-0", "--remote-exec", "bash -c 'echo unreachable; exit 7' "
         "{command}", "--share-dir", str(share_dir), "--join-timeout", "600", "--",
         "--run-dir", str(tmp_path / "run")],
        timeout_s=120)
    assert result.returncode == 3, result.stderr
    assert "the node command for host node-0 exited with status 7" in result.stderr
    assert "unreachable" in result.stderr  # the end of the host's log
    assert not (tmp_path / "run").exists()
