"""The faults of ``bench chaos``: a plan drawn from a seed, and the hands that inject them
from outside the training job.

Nothing here runs inside the job: the benchmark process owns the emulated cluster
(``ray.cluster_utils.Cluster``) and the driver's process, and finds worker processes in
Ray's GCS actor table (:func:`flashtrain.bench.killer.alive_actor_pids`), restricted to
the members of the grid in force (the job's ``grid`` events in metrics.jsonl name them).

Kinds:

- ``kill_worker``: ``SIGKILL`` one grid member's process;
- ``stall_worker``: ``SIGSTOP`` one member for longer than ``collective.timeout_s``,
  then ``SIGCONT``;
- ``remove_node``: stop a Ray node that hosts members (its workers die with it);
- ``add_node``: start a fresh Ray node (room for replacements and growth);
- ``kill_all_workers``: ``SIGKILL`` every member at once (nothing in memory survives);
- ``kill_driver``: ``SIGKILL`` the training driver; the benchmark starts the job again
  with ``--resume``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from dataclasses import dataclass

KINDS = ("kill_worker", "stall_worker", "remove_node", "add_node", "kill_all_workers",
         "kill_driver")
# Every plan holds each kind at least once; the rest are drawn with these weights.
_REQUIRED = KINDS
_WEIGHTS = {"kill_worker": 4, "stall_worker": 1, "remove_node": 2, "add_node": 2}


@dataclass(frozen=True)
class PlannedFault:
    """One fault: fired once ``gap_steps`` more steps have completed after the previous
    fault's recovery, plus ``jitter_s`` (so it lands anywhere: compute, all-reduce,
    commit, validation, checkpoint, a re-form). ``pick`` in [0, 1) chooses the victim
    among those present at that moment."""

    kind: str
    gap_steps: int
    jitter_s: float
    pick: float


def fault_plan(seed: int, num_faults: int, initial_nodes: int, min_nodes: int = 1,
               max_nodes: int = 4, gap_steps: tuple[int, int] = (2, 5),
               max_jitter_s: float = 0.4) -> list[PlannedFault]:
    """``num_faults`` faults drawn from ``seed``: every kind at least once, the driver
    kill in the middle third, never fewer than ``min_nodes`` worker nodes nor more than
    ``max_nodes``. Raises ValueError if ``num_faults`` cannot hold every kind."""
    if num_faults < len(_REQUIRED):
        raise ValueError(f"a chaos plan needs at least {len(_REQUIRED)} faults (one per kind)")
    rng = random.Random(seed)
    for _ in range(10_000):
        kinds = list(_REQUIRED) + rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()),
                                              k=num_faults - len(_REQUIRED))
        rng.shuffle(kinds)
        if _feasible(kinds, initial_nodes, min_nodes, max_nodes):
            return [PlannedFault(kind, rng.randint(*gap_steps), round(rng.uniform(0, max_jitter_s), 3),
                                 rng.random()) for kind in kinds]
    raise ValueError(f"no feasible plan for seed {seed} with {initial_nodes} initial node(s)")


def _feasible(kinds: list[str], nodes: int, min_nodes: int, max_nodes: int) -> bool:
    third = len(kinds) // 3
    if not third <= kinds.index("kill_driver") < len(kinds) - third:
        return False
    if kinds[0] in ("kill_all_workers", "kill_driver"):
        return False
    for kind in kinds:
        # The restarted job reserves its whole configured grid (2x2: two nodes) at once.
        if kind == "kill_driver" and nodes < 2:
            return False
        nodes += {"remove_node": -1, "add_node": 1}.get(kind, 0)
        if not min_nodes <= nodes <= max_nodes:
            return False
    return True


def choose(items: list, pick: float):
    """The item ``pick`` (in [0, 1)) points at in ``items`` (sorted, so the choice
    depends only on the seed and what is there)."""
    ordered = sorted(items, key=str)
    return ordered[min(int(pick * len(ordered)), len(ordered) - 1)]


def send(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid``; False when the process is already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def stall(pid: int, seconds: float) -> threading.Timer | None:
    """``SIGSTOP`` ``pid`` now and ``SIGCONT`` it after ``seconds`` (a timer thread);
    None when the process is already gone."""
    if not send(pid, signal.SIGSTOP):
        return None
    timer = threading.Timer(seconds, send, args=(pid, signal.SIGCONT))
    timer.daemon = True
    timer.start()
    return timer


def remove_node(cluster, node_ids: list[str], pick: float) -> str | None:
    """Remove one of the cluster's worker nodes among ``node_ids`` (the members' nodes;
    any worker node when none of them is left); returns its id, None if there is none."""
    workers = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
    hosting = [n for n in workers if n.node_id in set(node_ids)] or workers
    if not hosting:
        return None
    by_id = {n.node_id: n for n in hosting}
    node_id = choose(list(by_id), pick)
    cluster.remove_node(by_id[node_id])
    return node_id


def worker_node_count(cluster) -> int:
    return sum(1 for n in cluster.list_all_nodes() if n is not cluster.head_node)
