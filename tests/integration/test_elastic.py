"""Elasticity in real processes: windows down a relay tree while a leaf dies inside
gloo's all-reduce and the tree's root is killed by a SIGKILL from outside.

The run must finish, train every sample of every epoch exactly once (summary.json's
samples_per_epoch), record each re-form, keep the loss curve going, and grow back each
time. What else only real processes show of elasticity is tested elsewhere: nodes
removed and added from outside, a stall past the collective timeout (SIGSTOP), workers
and the driver SIGKILLed at seeded moments, every worker killed at once
(``test_chaos.py``: a storm of every kind on an emulated multi-node cluster); a node
removed and one added, timed phase by phase (``test_bench_tools.py``, ``bench
rehearsal``); SIGKILLs at seeded moments within the recovery bound
(``test_external_kills.py``). The scenarios decided by the control plane alone (a node
leaving and joining, repeated churn, a death inside a commit, planned resizes, a warm
spare, too few workers left, elasticity off) run on the simulator, in
``tests/unit/test_sim_scenarios.py``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from accounting import assert_exactly_once

from flashtrain.bench.killer import alive_actor_pids, completed_steps
from flashtrain.config import load_config
from flashtrain.driver.trainer import Trainer

# A 2x2 grid of one-CPU workers on the module's local Ray; 6 epochs of 45 steps, long
# enough after each fault for a replacement to start and the grid to grow back.
BASE = [
    "model.name=tiny_cnn", "grid.shape=2x2", "grid.cpus_per_worker=1",
    "schedule.epochs=6", "schedule.phases=[{start_epoch: 0, global_batch: 32}]",
    "schedule.base_lr=0.8", "schedule.warmup_epochs=0.2", "runtime.progress=false",
    "collective.bucket_mb=1", "collective.timeout_s=4", "elastic.commit_every_steps=3",
    "checkpoint.every_steps=1000", "runtime.remote_timeout_s=120",
]


def assert_exactly_once_and_learning(summary: dict, records: list[dict]) -> None:
    assert_exactly_once(summary, records)
    steps = [r for r in records if r["kind"] == "step"]
    first, last = steps[0]["loss"], [r["loss"] for r in steps][-5:]
    assert max(last) < first, "the loss curve did not continue downwards"
    assert summary["final_top1"] > 0.3  # chance is 0.1


def test_relayed_windows_survive_a_leaf_and_the_root_dying(ray_session, tmp_path):
    """Windows down a relay tree (fan-out 2: rank 0 -> 1, 2; 1 -> 3). First the leaf rank
    3 dies inside its all-reduce at step 8: its relay, rank 1, must report it up at once.
    Then the member the driver calls (rank 0, the tree's root) dies from the operating
    system's SIGKILL in the middle of a window after step 40: the driver learns it from
    Ray at once and aborts every member. The grid re-forms, and grows back, each time."""
    config = load_config(None, BASE + ["runtime.relay_fanout=2", "faults.kill_worker_at_steps=[8]"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(config, run_dir, tmp_path / "cache", say=print)
    killed = []

    def kill_root_at_step(step: int) -> None:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = completed_steps(metrics)
            if done and done[-1][0] >= step:
                root = trainer.controller.state.members[0]
                pid = alive_actor_pids("Worker", {root.actor_id}).get(root.actor_id)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_root_at_step, args=(40,), daemon=True)
    killer.start()
    try:
        summary = trainer.train()
    finally:
        trainer.close()
        killer.join(timeout=5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert killed, "rank 0 was not killed"
    assert_exactly_once_and_learning(summary, records)
    leaf, root = [r for r in summary["reforms"] if r["cause"] != "grow"]
    assert leaf["failed_step"] == 8 and leaf["steps_rolled_back"] == 2  # commit at 6
    assert root["failed_step"] >= 40 and root["cause"] in ("RayActorError", "ActorDiedError")
    # Neither waited out the 4 s collective timeout: a relay reported the leaf, Ray the root.
    assert leaf["recovery_seconds"] < 4 and root["recovery_seconds"] < 4
    assert summary["final_grid"] == "2x2"
