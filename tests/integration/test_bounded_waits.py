"""A job that cannot run stops at once, says why, and writes no run directory.

Each case runs ``python -m flashtrain.jobs.imagenet`` as a user would, in a subprocess
with its own Ray temp folder (``RAY_TMPDIR``), so a fake ``ray_current_cluster`` never
touches the machine's ``/tmp/ray`` and a Ray the job starts is its own. Before these
checks existed, each case below either left a run directory suggesting ``--resume`` or
waited for minutes (a placement group no node can hold, a dead GCS address).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flashtrain.config import dump_config, load_config

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 90  # a hang is a failure of the test, not of the whole suite
BOUND_S = 60  # what the job promises: a clear stop within a minute


@pytest.fixture
def ray_tmpdir():
    """A private Ray temp folder; short, because Ray puts Unix sockets inside it."""
    folder = Path(tempfile.mkdtemp(prefix="ft-bw-", dir="/tmp"))
    try:
        yield folder
    finally:
        wait_until_no_process_mentions(str(folder), deadline_s=15)
        shutil.rmtree(folder, ignore_errors=True)


def wait_until_no_process_mentions(text: str, deadline_s: float) -> None:
    """Wait until no process has ``text`` in its command line (a job's Ray is gone)."""
    deadline = time.monotonic() + deadline_s
    while True:
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if text.encode() in cmdline.read_bytes():
                    alive.append(cmdline.parent.name)
            except OSError:
                continue  # ended while we looked
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes of the job's Ray left behind: {alive}"
        time.sleep(0.2)


def run_job(args: list[str], ray_tmpdir: Path):
    """Run the job CLI (no RAY_ADDRESS); returns (completed process, seconds it took)."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir)}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "flashtrain.jobs.imagenet", *args], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the job and any Ray it started
        process.communicate()
        pytest.fail(f"the job did not stop within {JOB_TIMEOUT_S}s: {args}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return result, time.monotonic() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_stopped(result, run_dir: Path, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not run_dir.exists()
    assert "--resume" not in result.stderr and "Traceback" not in result.stderr


def test_a_missing_data_root_stops_before_ray(tmp_path, ray_tmpdir):
    run_dir = tmp_path / "run"
    result, _ = run_job(["--set", "data.source=imagefolder", "--set", "data.root=/nonexistent",
                         "--run-dir", str(run_dir)], ray_tmpdir)
    assert_stopped(result, run_dir, "flashtrain: data.root /nonexistent does not exist: set "
                   "data.root to a folder with train/<class>/<images> and val/<class>/<images>")
    assert not (ray_tmpdir / "ray").exists()  # Ray never started


def test_an_unknown_model_stops_before_ray(tmp_path, ray_tmpdir):
    run_dir = tmp_path / "run"
    result, _ = run_job(["--set", "model.name=resnet5000", "--run-dir", str(run_dir)], ray_tmpdir)
    assert_stopped(result, run_dir, "flashtrain: model.name='resnet5000' is not a known model "
                   "(did you mean 'resnet50'")
    assert "resnet18" in result.stderr and "tiny_cnn" in result.stderr


def test_resume_with_bad_data_changes_nothing_in_the_run(tmp_path, ray_tmpdir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bad = load_config(None, ["data.source=imagefolder", f"data.root={tmp_path / 'gone'}"])
    (run_dir / "config.yaml").write_text(dump_config(bad))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result, _ = run_job(["--resume", "--run-dir", str(run_dir)], ray_tmpdir)
    assert result.returncode == 2 and f"data.root {tmp_path / 'gone'} does not exist" in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_an_address_where_nothing_answers_stops_at_once(tmp_path, ray_tmpdir):
    run_dir, address = tmp_path / "run", f"127.0.0.1:{free_port()}"
    result, seconds = run_job(["--set", f"runtime.ray_address={address}", "--run-dir", str(run_dir)],
                              ray_tmpdir)
    assert_stopped(result, run_dir, f"flashtrain: nothing answers at {address} (connection "
                   "refused): is the head running? start it with `ray start --head` or fix "
                   "runtime.ray_address")
    assert seconds < BOUND_S


def write_stale_address(ray_tmpdir: Path) -> tuple[str, Path]:
    """A ``ray_current_cluster`` naming a port where nothing listens (a dead head)."""
    address, address_file = f"127.0.0.1:{free_port()}", ray_tmpdir / "ray" / "ray_current_cluster"
    address_file.parent.mkdir()
    address_file.write_text(address)
    return address, address_file


def test_a_stale_recorded_cluster_stops_when_told_to(tmp_path, ray_tmpdir):
    address, address_file = write_stale_address(ray_tmpdir)
    run_dir = tmp_path / "run"
    result, seconds = run_job(["--set", "runtime.on_stale_cluster=stop", "--run-dir", str(run_dir)],
                              ray_tmpdir)
    assert_stopped(result, run_dir, f"flashtrain: Ray's temp folder names a cluster at {address} "
                   f"({address_file}) but nothing answers there (connection refused): its head "
                   "has stopped. Start the head again with `ray start --head`")
    assert "runtime.on_stale_cluster=local" in result.stderr
    assert seconds < BOUND_S


def test_a_stale_recorded_cluster_is_replaced_by_a_local_ray(tmp_path, ray_tmpdir):
    # The default (on_stale_cluster=local) starts a local Ray, which a grid of GPU workers
    # then finds without GPUs: the notice, the local Ray, and a stop within a minute that
    # says what the grid needs and what the cluster has, in one run.
    address, address_file = write_stale_address(ray_tmpdir)
    run_dir = tmp_path / "run"
    result, seconds = run_job(["--set", "grid.use_gpu=true", "--run-dir", str(run_dir)], ray_tmpdir)
    assert (f"flashtrain: Ray's temp folder names a cluster at {address} ({address_file}) but "
            "nothing answers there (connection refused): its head has stopped; starting a local "
            "Ray for this job instead") in result.stdout
    assert_stopped(result, run_dir, "the grid needs 4 worker(s) of 0.5 CPU, 1 GPU each "
                   "(2 CPU and 4 GPU in all), but the cluster's 1 node(s) have")
    assert "0 GPU, room for 0 such worker(s): set grid.use_gpu=false" in result.stderr
    assert "grid.placement_timeout_s" in result.stderr
    assert any((ray_tmpdir / "ray").glob("session_*"))  # the local Ray did start, in our folder
    assert seconds < BOUND_S


def test_reserve_fails_fast_on_a_grid_no_node_can_hold(ray_session):
    from flashtrain.config import GridConfig
    from flashtrain.train.placement import PlacementInfeasibleError, reserve

    started = time.monotonic()
    with pytest.raises(PlacementInfeasibleError, match=r"4 GPU in all.*0 GPU, room for 0"):
        reserve(GridConfig(use_gpu=True), 4, timeout_s=300.0)
    assert time.monotonic() - started < 5
    waiting = GridConfig(use_gpu=True, placement_timeout_s=1.0)
    with pytest.raises(PlacementInfeasibleError, match=r"waited 1s for nodes to join"):
        reserve(waiting, 2, timeout_s=300.0)
    assert time.monotonic() - started < 15
