"""The job as a cluster user runs it: ``ray start --head`` then ``ray job submit
--working-dir .``, as the README says, here for a task in the user's own folder. Its run
must land outside Ray's temporary copy of that folder and outlive the cluster.

The head runs with ``--block`` in its own process group, on free ports, so the test
stops exactly the cluster it started (``ray stop`` would stop every Ray on the machine).
Its HOME is a folder of the test, so the job's default runs root (~/flashtrain-runs)
lands there, never in the user's home; its auth token is a file of the test.
"""

from __future__ import annotations

import json
import os
import re
import secrets
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
    """``(url, env, stop, home)``: a head of this test's own; ``stop()`` stops exactly it.
    (One head per test: a second job on a head that ran one before was refused by its
    auth token on Ray 2.60 here, so the heads are not shared.)"""
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics = free_ports(6)
    home = tmp_path / "home"
    home.mkdir()
    # A token of this cluster's own, as the batch launcher makes one (with another HOME,
    # `ray start` would look for ~/.ray/auth_token in vain).
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    for name in ("RAY_ADDRESS", "FLASHTRAIN_RUNS_ROOT", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"

    def stop() -> None:
        # SIGTERM to `ray start` alone: it stops its raylet, GCS and dashboard in order
        # (2 s here). The same signal to the whole group at once took 33 s, each process
        # waiting out others that were already going. What it leaves in the group (the
        # dashboard's module processes) is killed after it.
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is empty
            pass
        head.wait(timeout=30)

    try:
        wait_for_dashboard(url, head, deadline_s=120)
        yield url, env, stop, home
    finally:
        stop()


def submit(url: str, env: dict, args: list[str], timeout_s: float, cwd: Path = REPO,
           module: str = "flashtrain.jobs.imagenet") -> subprocess.CompletedProcess:
    """``ray job submit --working-dir .`` from ``cwd`` (default the checkout; .git left
    out of the upload), running ``python -m module``."""
    # Ray 2.60 turns token auth on at the first `ray start`; the job CLI must say so.
    env = {**env, "RAY_AUTH_MODE": "token"}
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
             "--runtime-env-json", json.dumps({"excludes": [".git", "runs"]}), "--", "python",
             "-m", module, *args],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
        # The job agent can come up a little after the dashboard answers.
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(1)


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


USER_TASK = """
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import flashtrain


class Regression(flashtrain.Task):
    def build_model(self, seed):
        return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def datasets(self):
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(96, 3, generator=generator)
        y = x @ torch.tensor([2.0, -1.0, 0.5])
        return TensorDataset(x[:80], y[:80]), TensorDataset(x[80:], y[80:])

    def loss(self, outputs, targets, label_smoothing):
        return F.mse_loss(outputs.squeeze(1), targets)

    def metrics(self, outputs, targets):
        return {"mse": ((outputs.squeeze(1) - targets) ** 2).sum()}
"""


def test_a_users_task_submitted_with_working_dir_keeps_its_run_after_the_cluster_stops(
        ray_head, tmp_path):
    # The user's project: one file, outside flashtrain, shipped as the working directory.
    # (The image job goes through the same job code: flashtrain.jobs.job.run_job.)
    project = tmp_path / "project"
    project.mkdir()
    (project / "mytask.py").write_text(USER_TASK)
    url, env, stop, home = ray_head
    result = submit(url, env, ["mytask:Regression", "--set", "grid.shape=1x2",
                               "--set", "schedule.epochs=2", "--set", "schedule.warmup_epochs=0.5",
                               "--set", "schedule.phases=[{start_epoch: 0, global_batch: 16}]",
                               "--set", "runtime.progress=false"],
                    timeout_s=300, cwd=project, module="flashtrain.run")
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in out, out[-3000:]
    # Where the job said its run goes, and why: not in Ray's temporary copy.
    said = re.search(r"flashtrain: run directory (\S+) \((.*)\)", out)
    assert said, out[-3000:]
    run_dir = Path(said.group(1))
    assert run_dir.parent == home / "flashtrain-runs"
    assert "Ray's temporary copy" in said.group(2)
    printed = re.findall(r"(?:results in|report) (\S+)", out)
    assert len(printed) == 2 and all(p.startswith(str(run_dir)) for p in printed), printed
    for line in out.splitlines():  # no path the job prints is in Ray's session folder
        assert not ("flashtrain" in line and "runtime_resources" in line), line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "mytask:Regression"
    assert summary["samples_per_epoch"] == [80, 80] and summary["final_mse"] >= 0
    assert [s["ended"] for s in summary["segments"]] == ["finished"]

    stop()  # this test's head only: Ray removes its session folder and the job's copy
    before = files_of(run_dir)
    assert {"summary.json", "config.yaml", "metrics.jsonl", "report.html"} <= before.keys()
    # From the user's folder, by its name: the same rule finds it (~/flashtrain-runs),
    # and a finished run is left exactly as it was.
    job_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    job_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(project), str(REPO), env.get("PYTHONPATH")) if p)
    again = subprocess.run([sys.executable, "-m", "flashtrain.run", "mytask:Regression",
                            "--resume", "--run-dir", run_dir.name], cwd=project, env=job_env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{run_dir} is finished" in again.stdout
    assert files_of(run_dir) == before
