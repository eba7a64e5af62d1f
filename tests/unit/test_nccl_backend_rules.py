"""The NCCL backend's rules that need no GPU: the torch settings :func:`register` leaves
for the process groups it builds later, the watchdog timeout, and how a failed
operation's error is classified (NCCL's and gloo's own messages, as their libraries
print them)."""

from __future__ import annotations

import pytest

from flashtrain.collective import nccl_backend
from flashtrain.collective.nccl_backend import (
    TORCH_NCCL_ENV,
    WATCHDOG_MARGIN_S,
    failure_kind,
    watchdog_timeout_s,
)


def test_register_turns_off_torchs_heartbeat_monitor_before_any_group(monkeypatch):
    for name in TORCH_NCCL_ENV:
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the environment as it was
        monkeypatch.delenv(name)
    nccl_backend.register()
    import os

    assert os.environ["TORCH_NCCL_ENABLE_MONITORING"] == "0"
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"


def test_register_keeps_what_the_user_set(monkeypatch):
    for name in TORCH_NCCL_ENV:
        monkeypatch.setenv(name, "")  # recorded, so the test leaves the environment as it was
        monkeypatch.delenv(name)
    monkeypatch.setenv("TORCH_NCCL_ENABLE_MONITORING", "1")
    nccl_backend.register()
    import os

    assert os.environ["TORCH_NCCL_ENABLE_MONITORING"] == "1"


def test_the_watchdog_decides_only_after_every_deadline_of_the_group():
    assert watchdog_timeout_s(5.0, 120.0) == 120.0 + WATCHDOG_MARGIN_S
    assert watchdog_timeout_s(300.0, 60.0) == 300.0 + WATCHDOG_MARGIN_S


@pytest.mark.parametrize(("text", "aborted", "kind"), [
    # NCCL (ncclRemoteError, as libnccl and torch's ProcessGroupNCCL word it)
    ("NCCL error in: ProcessGroupNCCL.cpp:2000, remote process exited or there was a "
     "network error, NCCL version 2.30.7", False, "peer_lost"),
    ("NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details)", False,
     "peer_lost"),
    # gloo's TCP pairs
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
     "[10.0.0.2]:41234", False, "peer_lost"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [10.0.0.2]:4123: "
     "Connection reset by peer", False, "peer_lost"),
    # timeouts
    ("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=3, OpType=ALLREDUCE) "
     "ran for 60000 milliseconds before timing out.", False, "timeout"),
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
     "1800000ms for recv operation to complete", False, "timeout"),
    # the controller's abort came first: whatever the transport said next
    ("remote process exited or there was a network error", True, "aborted"),
    ("NCCL communicator was aborted on rank 1.", False, "failed"),
])
def test_a_failed_operation_is_classified_by_what_failed(text, aborted, kind):
    assert failure_kind(text, aborted) == kind
