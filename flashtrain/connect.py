"""Choosing the Ray cluster a job joins, with no unbounded wait.

``ray.init`` retries an address where nothing answers for minutes, printing only
warnings. With no address it joins the cluster that ``ray start`` recorded in Ray's temp
folder (``ray_current_cluster``), even when that head has died since. So before
``ray.init`` the job decides the address itself, in Ray's own order (``runtime.ray_address``,
then the ``RAY_ADDRESS`` environment variable, then the recorded cluster, else a local
Ray), and knocks once at it: a TCP connect to the head's GCS port, bounded by
``runtime.connect_timeout_s``. Nothing answering is a :class:`PreflightError` that says
where the address came from and how to fix it; a dead recorded cluster is either
replaced by a local Ray (with a notice) or a stop, as ``runtime.on_stale_cluster`` says.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from flashtrain.config import RuntimeConfig
from flashtrain.preflight import PreflightError

LOCAL = "local"  # ray.init's address for "start a new local instance"


def ray_address_file() -> Path:
    """Where ``ray start`` records its cluster's address: ``ray_current_cluster`` in Ray's
    temp folder (``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else ``/tmp/ray``)."""
    from ray._common.utils import get_ray_address_file  # Ray's own lookup, so both agree

    return Path(get_ray_address_file(None))


def recorded_address(address_file: Path) -> str | None:
    """The address in ``address_file``, or None when there is none."""
    try:
        return address_file.read_text().strip() or None
    except OSError:
        return None


def host_and_port(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``, ``ray://HOST:PORT`` or ``[IPv6]:PORT``."""
    bare = address.split("://", 1)[-1].rstrip("/")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379 or "
                             "ray://10.0.0.1:10001): fix runtime.ray_address or RAY_ADDRESS")
    return host.strip("[]"), int(port)


def why_unreachable(address: str, timeout_s: float) -> str | None:
    """None when something accepts a TCP connection at ``address`` within ``timeout_s``,
    otherwise why not (refused, timed out, unknown host)."""
    host, port = host_and_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror as err:
        return f"unknown host {host!r}: {err.strerror}"
    except TimeoutError:
        return f"no answer within {timeout_s:g}s (runtime.connect_timeout_s)"
    except OSError as err:
        return (err.strerror or type(err).__name__).lower()


def _require_answer(address: str, source: str, timeout_s: float) -> str:
    reason = why_unreachable(address, timeout_s)
    if reason is not None:
        raise PreflightError(f"nothing answers at {address} ({reason}): is the head running? "
                             f"start it with `ray start --head` or fix {source}")
    return address


def _recorded_cluster(runtime: RuntimeConfig, say: Callable[[str], None]) -> str:
    """The cluster ``ray start`` recorded if it answers; otherwise a local Ray or a stop."""
    address_file = ray_address_file()
    recorded = recorded_address(address_file)
    if recorded is None:
        return runtime.ray_address or LOCAL  # "auto" with nothing recorded: Ray looks further
    reason = why_unreachable(recorded, runtime.connect_timeout_s)
    if reason is None:
        return recorded
    stale = (f"Ray's temp folder names a cluster at {recorded} ({address_file}) but nothing "
             f"answers there ({reason}): its head has stopped")
    if runtime.ray_address == "auto" or runtime.on_stale_cluster == "stop":
        raise PreflightError(f"{stale}. Start the head again with `ray start --head`, remove "
                             f"{address_file} to run on a local Ray, or set "
                             "runtime.on_stale_cluster=local")
    say(f"{stale}; starting a local Ray for this job instead (runtime.on_stale_cluster=stop "
        f"stops instead; removing {address_file} silences this notice)")
    return LOCAL


def choose_address(runtime: RuntimeConfig, env_address: str | None,
                   say: Callable[[str], None] = print) -> str:
    """The address to give ``ray.init``: a cluster that answers, or ``"local"``.

    ``env_address`` is the ``RAY_ADDRESS`` environment variable (read by the caller), which
    Ray consults only when ``runtime.ray_address`` is unset or ``auto``. Raises
    :class:`PreflightError` when the address chosen does not answer.
    """
    configured = runtime.ray_address
    if configured == LOCAL:
        return LOCAL
    if configured and configured != "auto":
        return _require_answer(configured, "runtime.ray_address", runtime.connect_timeout_s)
    if env_address:
        return _require_answer(env_address, "the RAY_ADDRESS environment variable",
                               runtime.connect_timeout_s)
    return _recorded_cluster(runtime, say)
