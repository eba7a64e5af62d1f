"""Elasticity on a real multi-node Ray (``ray.cluster_utils.Cluster`` on this machine).

Every run must finish, train every sample of every epoch exactly once (summary.json's
samples_per_epoch), record each re-form, and keep the loss curve going. These are the
scenarios only real processes show: a node removed from the cluster and one added, a
worker dying inside gloo's all-reduce and its relay reporting it, the tree's root killed
by a SIGKILL from outside. Those decided by the control plane alone (repeated churn, a
death inside a commit, planned resizes, a warm spare, too few workers left, elasticity
off) run on the simulator, in ``tests/unit/test_sim_scenarios.py``. A stall past the
collective timeout (SIGSTOP from outside) is one of the faults of every chaos storm
(``tests/integration/test_chaos.py``).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from accounting import assert_exactly_once
from ray.cluster_utils import Cluster

from flashtrain.bench.killer import alive_actor_pids, completed_steps
from flashtrain.config import load_config
from flashtrain.driver.trainer import Trainer

# Two worker nodes of two workers each: a 2x2 grid whose rows sit one per node.
BASE = [
    "model.name=tiny_cnn", "grid.shape=2x2", "grid.cpus_per_worker=1",
    "schedule.epochs=2", "schedule.phases=[{start_epoch: 0, global_batch: 64}]",
    "schedule.base_lr=0.8", "schedule.warmup_epochs=0.2", "runtime.progress=false",
    "collective.bucket_mb=1", "collective.timeout_s=4", "elastic.commit_every_steps=3",
    "checkpoint.every_steps=1000", "runtime.remote_timeout_s=120",
]


LONG = ["schedule.epochs=6", "schedule.phases=[{start_epoch: 0, global_batch: 32}]"]


@pytest.fixture(scope="module")
def shared_cluster():
    """A head with no worker CPUs and two worker nodes of two (logical) CPUs each, for
    the whole module (a cluster's start is 10-14 s of this machine's two cores)."""
    if ray.is_initialized():  # another module's local Ray (conftest.py's ray_session)
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.flashtrain_node_args = {"num_cpus": 2}
    for _ in range(2):
        cluster.add_node(**cluster.flashtrain_node_args)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def cluster(shared_cluster):
    """The shared cluster as each test needs it: two worker nodes, all four CPUs free
    (a test that removed a node added one back; a run's workers and placement groups
    are gone once its trainer closed, which Ray settles within seconds)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
        if len(nodes) == 2 and ray.available_resources().get("CPU", 0) == 4:
            break
        time.sleep(0.5)  # a previous run's actors are still being torn down
    else:
        pytest.fail(f"the shared cluster did not settle: {len(nodes)} worker node(s), "
                    f"{ray.available_resources().get('CPU', 0)} CPU free")
    return shared_cluster


def train(cluster, tmp_path: Path, extra: list[str]) -> tuple[dict, list[dict]]:
    config = load_config(None, BASE + extra)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(config, run_dir, tmp_path / "cache", say=print, cluster=cluster)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def assert_exactly_once_and_learning(summary: dict, records: list[dict]) -> None:
    assert_exactly_once(summary, records)
    steps = [r for r in records if r["kind"] == "step"]
    first, last = steps[0]["loss"], [r["loss"] for r in steps][-5:]
    assert max(last) < first, "the loss curve did not continue downwards"
    assert summary["final_top1"] > 0.3  # chance is 0.1


def test_node_leaves_mid_epoch_then_a_node_joins(cluster, tmp_path):
    summary, records = train(cluster, tmp_path, ["faults.remove_node_at_steps=[7]",
                                                 "faults.add_node_at_steps=[30]",
                                                 "runtime.local_nodes=2"] + LONG)
    assert_exactly_once_and_learning(summary, records)
    reforms = summary["reforms"]
    assert reforms[0]["old_grid"] == "2x2" and reforms[0]["new_grid"] in ("1x2", "2x1")
    assert reforms[0]["steps_rolled_back"] <= 3  # at most one commit interval
    assert reforms[-1]["new_grid"] == "2x2" and reforms[-1]["cause"] == "grow"
    assert summary["final_grid"] == "2x2"
    for reform in reforms:
        assert reform["recovery_seconds"] is not None and reform["recovery_seconds"] > 0
    on_disk = [r for r in records if r["kind"] == "reform"]
    assert [r["new_grid"] for r in on_disk] == [r["new_grid"] for r in reforms]


def test_relayed_windows_survive_a_leaf_and_the_root_dying(cluster, tmp_path):
    """Windows down a relay tree (fan-out 2: rank 0 -> 1, 2; 1 -> 3). First the leaf rank
    3 dies inside its all-reduce at step 8: its relay, rank 1, must report it up at once.
    Then the member the driver calls (rank 0, the tree's root) dies from the operating
    system's SIGKILL in the middle of a window after step 40: the driver learns it from
    Ray at once and aborts every member. The grid re-forms, and grows back, each time."""
    config = load_config(None, BASE + LONG + ["runtime.relay_fanout=2",
                                              "faults.kill_worker_at_steps=[8]"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = Trainer(config, run_dir, tmp_path / "cache", say=print, cluster=cluster)
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
