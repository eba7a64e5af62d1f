"""Forming one flashtrain gloo group: rank 0 hosts a TCPStore and publishes it through
Ray's internal KV under a fresh nonce; the others find it with a deadline, connect and
check the nonce; then every member counts in at the store and polls until all have, so
that gloo's own (uninterruptible) mesh set-up starts only once everybody is there. An
abort of a grid generation's forming (:func:`abort_forming`) ends every poll at once.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
import uuid

import torch.distributed as dist

from flashtrain.collective.errors import CollectiveAbortedError, CollectiveTimeoutError

KV_NAMESPACE = "flashtrain_collective"
POLL_INTERVAL_S = 0.02

# Groups being formed cannot be reached through a group object yet: an abort of their
# forming is recorded here by name suffix (the grid generation, e.g. "@g3"), and the
# rendezvous of any group whose name ends with it gives up at its next poll.
_forming_aborts_lock = threading.Lock()
_forming_aborts: dict[str, str] = {}


def abort_forming(name_suffix: str, reason: str) -> None:
    """Make every rendezvous of a group whose name ends with ``name_suffix``, in this
    process, now or later, fail with :class:`CollectiveAbortedError` (thread-safe)."""
    with _forming_aborts_lock:
        _forming_aborts[name_suffix] = reason or "aborted"


def _forming_aborted(group_name: str) -> str | None:
    with _forming_aborts_lock:
        return next((reason for suffix, reason in _forming_aborts.items()
                     if group_name.endswith(suffix)), None)


def _rendezvous_key(group_name: str) -> str:
    return f"rendezvous/{group_name}"


def td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


class Rendezvous:
    """Host or find the group's TCPStore through Ray's internal KV, with a deadline."""

    def __init__(self, group_name: str, rank: int, world_size: int, timeout_s: float):
        self.group_name = group_name
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def check_aborted(self) -> None:
        reason = _forming_aborted(self.group_name)
        if reason is not None:
            raise CollectiveAbortedError(self.group_name, self.rank, "rendezvous", reason)

    def wait_for_everyone(self, store: dist.Store) -> None:
        """Count in at the store, then poll until every member has (abortable).

        gloo's own mesh set-up blocks in C++ until the last member arrives or its
        timeout passes, and nothing can interrupt it: so it starts only once every
        member is known to be here, and a member that died on the way is waited for
        here, where an abort ends the wait.
        """
        store.add("arrived", 1)
        while store.add("arrived", 0) < self.world_size:
            self.check_aborted()
            if time.monotonic() > self.deadline:
                raise CollectiveTimeoutError(
                    self.group_name, self.rank, "rendezvous", self.timeout_s,
                    f"only {store.add('arrived', 0)} of {self.world_size} members arrived")
            time.sleep(POLL_INTERVAL_S)

    def host(self) -> tuple[dist.Store, str]:
        """Start the store (rank 0) and publish where it is."""
        import ray
        import ray.experimental.internal_kv as kv

        host = ray.util.get_node_ip_address()
        store = dist.TCPStore(
            host, 0, None, True, timeout=td(self.timeout_s), wait_for_workers=False
        )
        nonce = uuid.uuid4().hex
        store.set("nonce", nonce)
        record = json.dumps({"host": host, "port": store.port, "nonce": nonce})
        kv._internal_kv_put(
            _rendezvous_key(self.group_name), record, overwrite=True, namespace=KV_NAMESPACE
        )
        return store, nonce

    def join(self) -> tuple[dist.Store, str]:
        """Find rank 0's store and connect; retry on a stale record until the deadline."""
        last_error: Exception | None = None
        while time.monotonic() < self.deadline:
            self.check_aborted()
            record = self._lookup()
            if record is None:
                time.sleep(POLL_INTERVAL_S)
                continue
            try:
                return self._connect(record)
            except (RuntimeError, ValueError) as exc:  # stale record: store gone or reused
                last_error = exc
                time.sleep(POLL_INTERVAL_S)
        raise CollectiveTimeoutError(
            self.group_name, self.rank, "rendezvous", self.timeout_s,
            "rank 0 never published a reachable store",
        ) from last_error

    def _lookup(self) -> dict | None:
        import ray.experimental.internal_kv as kv

        raw = kv._internal_kv_get(_rendezvous_key(self.group_name), namespace=KV_NAMESPACE)
        return json.loads(raw) if raw else None

    def _connect(self, record: dict) -> tuple[dist.Store, str]:
        # Short connect timeout: a stale record points at a store that is gone.
        connect_s = min(2.0, max(self.deadline - time.monotonic(), 0.05))
        store = dist.TCPStore(
            record["host"], int(record["port"]), None, False, timeout=td(connect_s)
        )
        if store.get("nonce").decode() != record["nonce"]:
            raise ValueError("store at the published address belongs to another group")
        store.set_timeout(td(self.deadline - time.monotonic()))
        return store, record["nonce"]

    def withdraw(self) -> None:
        """Delete the published record (rank 0, once every member is connected)."""
        import ray.experimental.internal_kv as kv

        with contextlib.suppress(Exception):
            kv._internal_kv_del(_rendezvous_key(self.group_name), namespace=KV_NAMESPACE)
