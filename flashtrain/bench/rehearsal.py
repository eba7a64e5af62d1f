"""``python -m flashtrain.bench rehearsal``: the scale rehearsal of a grid re-form.

For each size ``NODESxWORKERS`` (``--sizes 2x4,4x8``, or ``--nodes --workers-per-node``)
an emulated cluster (``ray.cluster_utils.Cluster``: a head with no worker CPUs, NODES
Ray nodes of WORKERS logical CPUs and WORKERS logical GPUs each) runs ``tiny_cnn`` on
synthetic data through flashtrain's own building blocks, timing each phase:

1. **form** the ``NODES x WORKERS`` grid (one row per node): placement (one placement
   group, :func:`flashtrain.train.placement.reserve`), actor start (constructors done),
   group formation (row, column and world groups joined), the first step, a commit.
2. **remove** the node of the last rank, between steps (so detection is a ping, not a
   collective timeout as when a node dies mid-step): detect, leave the old groups, state (survivors return to the last commit), group formation of the smaller
   grid (:func:`flashtrain.policy.propose_grid`), first step.
3. **add** a node back: node start, placement (Ray re-places the lost bundles of the
   placement group on the new node), actor start, state hand-off (the committed state
   through the object store, as :class:`flashtrain.elastic.controller.ElasticController`
   does), leave, group formation of the full grid, first step.

``reform_s`` is the critical path of a re-form without the node's own start or
stop: placement + actor start + detect + leave + state + group formation. The actors
hold CPU resources only: the logical GPUs show the cluster's shape to Ray, but a worker
that asked for one would try to use CUDA, which this machine does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flashtrain.topology import Grid

PHASES = ("node", "placement", "actor_start", "detect", "leave", "state", "group_formation",
          "first_step", "commit")
CRITICAL_PATH = ("placement", "actor_start", "detect", "leave", "state", "group_formation")
# Memory of one tiny_cnn worker process (torch + torchvision imported; PSS, so torch's
# shared libraries count once over all workers), measured on this machine: 0.45 GB.
WORKER_MEMORY_GB = 0.5
OBJECT_STORE_BYTES = 100 * 2**20


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench rehearsal",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="comma-separated NODESxWORKERS_PER_NODE (default 2x4,4x8)")
    parser.add_argument("--nodes", type=int, help="one size: this many nodes ...")
    parser.add_argument("--workers-per-node", type=int, help="... of this many workers")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="deadline of every wait")
    parser.add_argument("--force", action="store_true", help="skip the free-memory check")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if (args.nodes is None) != (args.workers_per_node is None):
        parser.error("give --nodes and --workers-per-node together")
    if args.nodes is not None and args.sizes:
        parser.error("give --sizes or --nodes/--workers-per-node, not both")
    text = f"{args.nodes}x{args.workers_per_node}" if args.nodes is not None else (args.sizes or "2x4,4x8")
    try:
        args.sizes = [Grid.parse(item) for item in text.split(",") if item.strip()]
    except ValueError as err:
        parser.error(f"--sizes: {err}")
    if not args.sizes:
        parser.error("--sizes is empty")
    if min(size.rows for size in args.sizes) < 2:
        parser.error("every size needs at least 2 nodes: the grid re-forms over the nodes "
                     "left after one is removed")
    return args


def available_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def pss_gb(pids: list[int]) -> float:
    """Proportional set size of the worker processes (they run on this machine): their
    private memory plus their share of pages they share (torch's libraries), so the sum
    is what the workers cost together."""
    total_kb = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in rollup.splitlines()
                          if line.startswith("Pss:")), 0)
    return total_kb / 2**20


def job_config(size: Grid):
    from flashtrain.config import load_config

    batch = 4 * size.num_workers
    return load_config(None, [
        "model.name=tiny_cnn", "data.source=synthetic", "data.image_size=16",
        f"data.synthetic_samples={batch * 50}", f"grid.shape={size}", "grid.cpus_per_worker=1",
        f"schedule.phases=[{{start_epoch: 0, global_batch: {batch}}}]", "runtime.progress=false",
        "collective.bucket_mb=1", "collective.timeout_s=120",
    ])


@dataclass
class Timer:
    """Seconds per phase of one transition."""

    phases: dict[str, float] = field(default_factory=dict)

    def run(self, phase: str, action: Callable):
        began = time.perf_counter()
        result = action()
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - began
        return result


class Rehearsal:
    """One emulated cluster, its worker grid and the driver-side clock."""

    def __init__(self, size: Grid, timeout_s: float):
        from flashtrain.train.clock import TrainingClock

        self.size = size
        self.timeout = timeout_s
        self.config = job_config(size)
        self.node_args = {"num_cpus": size.cols, "num_gpus": size.cols,
                          "object_store_memory": OBJECT_STORE_BYTES}
        self.clock = TrainingClock(num_samples=self.config.data.synthetic_samples, seed=0,
                                   min_tail=self.config.data.min_samples_per_worker * size.num_workers)
        self.cluster = None
        self.reservation = None
        self.members: list = []
        self.generation = 0
        self.committed_step = 0
        self.pids: dict[int, int] = {}  # id(member) -> worker pid
        self.peak_pss_gb = 0.0

    # -- cluster ----------------------------------------------------------------------

    def start_cluster(self) -> float:
        import ray
        from ray.cluster_utils import Cluster

        began = time.perf_counter()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False})
        for _ in range(self.size.rows):
            self.cluster.add_node(**self.node_args)
        ray.init(address=self.cluster.address, log_to_driver=False)
        return time.perf_counter() - began

    def shutdown(self) -> None:
        import ray

        for member in self.members:
            ray.kill(member.actor, no_restart=True)
        if self.reservation is not None:
            self.reservation.release()
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()

    # -- building blocks ----------------------------------------------------------------

    def start_members(self, bundles: list[int]) -> list:
        import ray

        from flashtrain.elastic.membership import start_worker
        from flashtrain.tasks.images import ImageClassification

        task = ImageClassification.from_config(self.config, tempfile.gettempdir())
        members = [start_worker(self.config.grid, self.reservation, bundle, self.config, task)
                   for bundle in bundles]
        nodes = ray.get([m.actor.node_id.remote() for m in members], timeout=self.timeout)
        for member, node in zip(members, nodes, strict=True):
            member.node = node
        return members

    def form(self, timer: Timer, grid: Grid, members: list) -> None:
        """Lay ``grid`` over ``members`` (rows on one node), join its groups, train one
        step and commit it."""
        import ray

        from flashtrain.topology import layout_grid

        layout = layout_grid([m.node for m in members], grid)
        self.members = [members[slot] for slot in layout.slot_of_rank]
        self.generation += 1
        pids = timer.run("group_formation", lambda: ray.get(
            [m.actor.join.remote(grid, rank, self.generation) for rank, m in enumerate(self.members)],
            timeout=self.timeout))
        self.pids = {id(m): pid for m, pid in zip(self.members, pids, strict=True)}
        self.peak_pss_gb = max(self.peak_pss_gb, pss_gb(list(self.pids.values())))
        plan = self.clock.plan(self.config.schedule)
        timer.run("first_step", lambda: ray.get(
            [m.actor.train_step.remote(plan) for m in self.members], timeout=self.timeout))
        self.clock.advance(plan)
        step = self.clock.global_step
        timer.run("commit", lambda: ray.get([m.actor.commit.remote(step) for m in self.members],
                                            timeout=self.timeout))
        self.committed_step = step
        self.grid = grid

    # -- the three transitions ----------------------------------------------------------

    def initial(self) -> Timer:
        from flashtrain.train.placement import reserve

        timer = Timer()
        self.reservation = timer.run("placement", lambda: reserve(
            self.config.grid, self.size.num_workers, self.timeout, name="flashtrain-rehearsal"))
        members = timer.run("actor_start", lambda: self.start_members(list(range(self.size.num_workers))))
        self.form(timer, self.size, members)
        return timer

    def remove_node(self) -> tuple[Timer, list[int]]:
        """Stop the node of the last rank; re-form over the survivors."""
        import ray

        from flashtrain.elastic.membership import alive
        from flashtrain.policy import propose_grid

        timer = Timer()
        victim = self.members[-1].node
        node = next(n for n in self.cluster.list_all_nodes() if n.node_id == victim)
        timer.run("node", lambda: self.cluster.remove_node(node))
        answers = timer.run("detect", lambda: alive(self.members, 30.0))
        survivors = [m for m, ok in zip(self.members, answers, strict=True) if ok]
        lost = [m for m, ok in zip(self.members, answers, strict=True) if not ok]
        for member in lost:
            ray.kill(member.actor, no_restart=True)
        timer.run("leave", lambda: ray.get([m.actor.leave.remote() for m in survivors],
                                           timeout=self.timeout))
        step = self.committed_step
        timer.run("state", lambda: ray.get([m.actor.rollback.remote(step) for m in survivors],
                                           timeout=self.timeout))
        per_node: dict[str, int] = {}
        for member in survivors:
            per_node[member.node] = per_node.get(member.node, 0) + 1
        proposal = propose_grid(per_node, preferred_cols=self.size.cols)
        self.members = survivors
        self.form(timer, proposal.grid, survivors)
        return timer, [m.bundle for m in lost]

    def add_node(self, free_bundles: list[int]) -> Timer:
        """Start a node; newcomers take the lost bundles, load the committed state and
        the grid re-forms at full size."""
        import ray

        timer = Timer()
        timer.run("node", lambda: self.cluster.add_node(**self.node_args))
        timer.run("placement", lambda: self.wait_for_bundles(free_bundles))
        newcomers = timer.run("actor_start", lambda: self.start_members(free_bundles))
        step, source = self.committed_step, self.members[0]

        def hand_over() -> None:
            state_ref = source.actor.committed_state.remote(step)
            ray.get([m.actor.load_state.remote(state_ref) for m in newcomers], timeout=self.timeout)
            ray.get([m.actor.commit.remote(step) for m in newcomers], timeout=self.timeout)

        timer.run("state", hand_over)
        timer.run("leave", lambda: ray.get([m.actor.leave.remote() for m in self.members],
                                           timeout=self.timeout))
        self.form(timer, self.size, self.members + newcomers)
        return timer

    def wait_for_bundles(self, bundles: list[int]) -> None:
        """Until Ray has re-placed ``bundles`` of the placement group on a live node."""
        import ray

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            live = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            placed = ray.util.placement_group_table(self.reservation.group).get("bundles_to_node_id", {})
            if all(placed.get(b) in live for b in bundles):
                return
            time.sleep(0.05)  # polling Ray's table, bounded by the deadline
        raise TimeoutError(f"bundles {bundles} were not re-placed within {self.timeout:.0f}s")


def rehearse(size: Grid, timeout_s: float, say=print) -> dict:
    """Form, remove a node, add it back; the seconds of every phase."""
    rehearsal = Rehearsal(size, timeout_s)
    transitions = []

    def record(name: str, old: Grid | None, timer: Timer) -> None:
        reform_s = sum(timer.phases.get(p, 0.0) for p in CRITICAL_PATH)
        transitions.append({"transition": name, "old_grid": str(old) if old else None,
                            "new_grid": str(rehearsal.grid), "phases_s": timer.phases,
                            "reform_s": reform_s})
        say(f"{size}: {name} -> grid {rehearsal.grid} in {reform_s:.2f}s")

    try:
        cluster_s = rehearsal.start_cluster()
        say(f"{size}: cluster of {size.rows} node(s) x {size.cols} started in {cluster_s:.1f}s")
        record("form", None, rehearsal.initial())
        old = rehearsal.grid
        timer, free_bundles = rehearsal.remove_node()
        record("remove_node", old, timer)
        old = rehearsal.grid
        record("add_node", old, rehearsal.add_node(free_bundles))
    finally:
        rehearsal.shutdown()
    return {"size": str(size), "nodes": size.rows, "workers_per_node": size.cols,
            "num_workers": size.num_workers, "cluster_start_s": cluster_s,
            "peak_worker_pss_gb": rehearsal.peak_pss_gb, "transitions": transitions}


def format_table(results: list[dict]) -> str:
    header = f"{'size':>6}{'workers':>8}{'transition':>13}{'grid':>12}"
    header += "".join(f"{p:>{max(len(p), 6) + 1}}" for p in PHASES) + f"{'reform_s':>10}"
    lines = ["seconds per phase (reform_s = " + " + ".join(CRITICAL_PATH) + ")", header]
    for result in results:
        for t in result["transitions"]:
            grid = f"{t['old_grid'] or '-'}>{t['new_grid']}"
            cells = "".join(f"{t['phases_s'][p]:>{max(len(p), 6) + 1}.2f}" if p in t["phases_s"]
                            else f"{'-':>{max(len(p), 6) + 1}}" for p in PHASES)
            lines.append(f"{result['size']:>6}{result['num_workers']:>8}{t['transition']:>13}"
                         f"{grid:>12}{cells}{t['reform_s']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    largest = max(size.num_workers for size in args.sizes)
    free = available_memory_gb()
    need = largest * WORKER_MEMORY_GB + 2.0  # + Ray's own processes
    if not args.force and free is not None and free < need:
        print(f"rehearsal: {largest} workers need about {need:.0f} GB free, {free:.1f} GB is "
              "available: use smaller --sizes, or --force", flush=True)
        return 2
    results = [rehearse(size, args.timeout_s) for size in args.sizes]
    print(format_table(results))
    for result in results:
        print(f"{result['size']}: cluster start {result['cluster_start_s']:.1f}s, workers' memory "
              f"(PSS, after forming) {result['peak_worker_pss_gb']:.1f} GB")
    if args.json:
        meta = {"model": "tiny_cnn", "cpu_count": os.cpu_count(), "phases": list(PHASES),
                "critical_path": list(CRITICAL_PATH)}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
