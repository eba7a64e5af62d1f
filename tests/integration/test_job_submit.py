"""The job as a cluster user runs it: ``ray start --head`` then ``ray job submit``.

The head runs with ``--block`` in its own process group, on free ports, so the test
stops exactly the cluster it started (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def wait_for_dashboard(url: str, head: subprocess.Popen, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # answering (401 without the auth token): it is up
        except OSError:
            time.sleep(0.5)  # polling a server that is starting, bounded by the deadline
    raise TimeoutError(f"dashboard at {url} did not answer within {deadline_s:.0f}s")


@pytest.fixture
def ray_head(tmp_path):
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, head, deadline_s=120)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def submit(url: str, env: dict, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    # Ray 2.60 turns token auth on at the first `ray start`; the job CLI must say so.
    env = {**env, "RAY_AUTH_MODE": "token"}
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--", "python", "-m",
             "flashtrain.jobs.imagenet", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        # The job agent can come up a little after the dashboard answers.
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(1)


def test_job_submit_runs_the_preset_on_the_cluster(ray_head, tmp_path):
    url, env = ray_head
    run_dir = tmp_path / "run"
    result = submit(url, env, ["--config", "jobs/cpu-smoke.yaml", "--run-dir", str(run_dir),
                               "--data-cache", str(tmp_path / "cache")], timeout_s=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    size = summary["dataset_train_size"]
    assert summary["samples_per_epoch"] == [size, size]
    assert summary["final_top1"] > 0.3
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()
