"""Injected failures for demos and tests (the ``faults`` config section).

Each fault fires once, just before its global step is dispatched. Worker faults act on
the last rank of the grid: they are armed (a confirmed call) before the step is sent and
go off inside the victim's step, whoever relays the step to it. Node faults need to own
the nodes: they work when the job runs on an emulated multi-node cluster on this machine
(``runtime.local_nodes``), where "remove a node" stops the Ray node that hosts the last
rank and "add a node" starts a fresh one.
"""

from __future__ import annotations

from flashtrain.config import FaultsConfig

ARM_TIMEOUT_S = 30.0  # arming a fault is one attribute set on the victim


class FaultInjector:
    """Fires the configured faults at their steps."""

    def __init__(self, faults: FaultsConfig, cluster, metrics, group, say=print,
                 stall_s: float = 0.0):
        self._faults = faults
        self._group = group  # the WorkerGroup the victims are reached through
        self._cluster = cluster
        self._metrics = metrics
        self._say = say
        self._stall_s = stall_s
        self._fired: set[tuple[str, int]] = set()

    def _due(self, kind: str, steps: tuple[int, ...], step: int) -> bool:
        if step not in steps or (kind, step) in self._fired:
            return False
        self._fired.add((kind, step))
        return True

    def before_step(self, step: int, members: list) -> None:
        victim = members[-1]
        if self._due("kill", self._faults.kill_worker_at_steps, step):
            where = self._faults.kill_during
            self._note("kill_worker", step, f"rank {len(members) - 1} will die in its {where}")
            # The commit after step s is tagged s + 1 (the clock position it saves).
            # Armed before the step is sent: with relays the step's call reaches the
            # victim from another member, in no fixed order with the driver's calls.
            self._group.call(victim, "arm_exit", where,
                             step if where == "allreduce" else step + 1, timeout=ARM_TIMEOUT_S)
        if self._due("stall", self._faults.stall_worker_at_steps, step):
            seconds = self._stall_s
            self._note("stall_worker", step, f"stalling rank {len(members) - 1} for {seconds:.0f}s")
            self._group.call(victim, "arm_stall", step, seconds, timeout=ARM_TIMEOUT_S)
        if self._due("perturb", self._faults.perturb_replica_at_steps, step):
            name = self._group.call(victim, "arm_perturb", step + 1, timeout=ARM_TIMEOUT_S)
            self._note("perturb_replica", step, f"rank {len(members) - 1} will change one "
                       f"element of {name} before its next commit")
        if self._due("remove", self._faults.remove_node_at_steps, step):
            self._remove_node(victim.node, step)
        if self._due("add", self._faults.add_node_at_steps, step):
            self._add_node(step)

    def _note(self, fault: str, step: int, what: str) -> None:
        self._say(f"fault injection at step {step}: {what}")
        self._metrics.event("fault", fault=fault, step=step)

    def _remove_node(self, node_id: str, step: int) -> None:
        if self._cluster is None:
            raise RuntimeError("faults.remove_node_at_steps needs runtime.local_nodes > 0")
        for node in self._cluster.list_all_nodes():
            if node.node_id == node_id and node is not self._cluster.head_node:
                self._note("remove_node", step, f"removing node {node_id[:8]}")
                self._cluster.remove_node(node)
                return
        self._say(f"fault injection at step {step}: node {node_id[:8]} is the head node "
                  "or gone; nothing removed")

    def _add_node(self, step: int) -> None:
        if self._cluster is None:
            raise RuntimeError("faults.add_node_at_steps needs runtime.local_nodes > 0")
        self._note("add_node", step, "adding a node")
        self._cluster.add_node(**self._cluster.flashtrain_node_args)
