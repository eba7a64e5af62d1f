"""Reserving workers on the cluster and laying the grid out over them.

One placement group holds a bundle per worker; the driver reads which node each bundle
landed on and hands :func:`flashtrain.topology.layout_grid` that list, so each row of
the grid sits on one node wherever the bundles allow it.

A placement group the cluster can never hold (GPU workers on a cluster without GPUs,
more workers than its nodes have room for) would wait forever: :func:`check_capacity`
compares the bundles with the nodes' total resources first and fails at once, unless
``grid.placement_timeout_s`` gives nodes that are still joining a bounded time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flashtrain.config import GridConfig
from flashtrain.preflight import capacity_shortfall


class PlacementTimeoutError(TimeoutError):
    """The cluster could not provide the requested workers in time."""


class PlacementInfeasibleError(PlacementTimeoutError):
    """The cluster's nodes cannot hold the requested workers at all (not merely busy), so
    waiting would not help; the message says what was asked and what the cluster has."""


@dataclass
class Reservation:
    """A ready placement group and the node id of each of its bundles."""

    group: PlacementGroup
    bundle_nodes: list[str]

    def release(self) -> None:
        remove_placement_group(self.group)


def bundle_resources(grid_cfg: GridConfig) -> dict[str, float]:
    """Resources of one worker's bundle."""
    if grid_cfg.use_gpu:
        return {"CPU": grid_cfg.cpus_per_worker, "GPU": 1.0}
    return {"CPU": grid_cfg.cpus_per_worker}


def live_node_resources() -> list[dict[str, float]]:
    """Total resources (not what is free now) of each live node of the cluster."""
    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def check_capacity(grid_cfg: GridConfig, num_workers: int) -> str | None:
    """None when the cluster's nodes can hold ``num_workers`` bundles (perhaps once other
    jobs free them). Otherwise raise :class:`PlacementInfeasibleError`, or, when
    ``grid.placement_timeout_s`` lets nodes join, return the shortfall so the caller can
    say what it waits for."""
    shortfall = capacity_shortfall(bundle_resources(grid_cfg), num_workers, live_node_resources())
    if shortfall and not grid_cfg.placement_timeout_s:
        raise PlacementInfeasibleError(
            f"{shortfall} (if nodes are still joining, let the job wait for them with "
            "grid.placement_timeout_s=SECONDS)")
    return shortfall


def reserve(grid_cfg: GridConfig, num_workers: int, timeout_s: float,
            name: str | None = None) -> Reservation:
    """Reserve ``num_workers`` bundles (PACK: rows want to share a node) and wait until
    they are placed, at most ``timeout_s``. A reservation the cluster's nodes cannot hold
    fails at once (:func:`check_capacity`) or, with ``grid.placement_timeout_s``, after
    waiting that long for nodes to join."""
    shortfall = check_capacity(grid_cfg, num_workers)
    wait_s = grid_cfg.placement_timeout_s if shortfall else timeout_s
    group = reserve_async(grid_cfg, num_workers, name).group
    ready, _ = ray.wait([group.ready()], timeout=wait_s)
    if ready:
        return Reservation(group, bundle_node_ids(group, num_workers))
    remove_placement_group(group)
    shortfall = capacity_shortfall(bundle_resources(grid_cfg), num_workers, live_node_resources())
    if shortfall:
        raise PlacementInfeasibleError(f"{shortfall} (waited {wait_s:g}s for nodes to join: "
                                       "grid.placement_timeout_s)")
    available = ray.available_resources()
    raise PlacementTimeoutError(
        f"could not place {num_workers} workers of {bundle_resources(grid_cfg)} within {wait_s:.0f}s "
        f"(cluster has {available.get('CPU', 0):.1f} CPU, {available.get('GPU', 0):.0f} GPU "
        "free): lower grid.shape or grid.cpus_per_worker, or add nodes")


def reserve_async(grid_cfg: GridConfig, num_workers: int, name: str | None = None) -> Reservation:
    """Ask for ``num_workers`` bundles without waiting: actors scheduled into them start
    once Ray places the group (for example when a node joins)."""
    bundles = [bundle_resources(grid_cfg) for _ in range(num_workers)]
    return Reservation(placement_group(bundles, strategy="PACK", name=name or ""), [])


def bundle_node_ids(group: PlacementGroup, num_bundles: int, timeout_s: float = 30.0) -> list[str]:
    """Node id of each bundle of a ready placement group."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = ray.util.placement_group_table(group)
        nodes = table.get("bundles_to_node_id", {})
        if len(nodes) >= num_bundles:
            return [nodes[i] for i in range(num_bundles)]
        if time.monotonic() > deadline:
            raise PlacementTimeoutError("placement group is ready but Ray reports no node for "
                                        f"some bundles after {timeout_s:.0f}s")
        time.sleep(0.05)


def in_bundle(group: PlacementGroup, bundle_index: int) -> PlacementGroupSchedulingStrategy:
    """Scheduling strategy that puts an actor into one bundle."""
    return PlacementGroupSchedulingStrategy(placement_group=group,
                                            placement_group_bundle_index=bundle_index)
