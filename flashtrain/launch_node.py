"""``python -m flashtrain.launch_node``: one node of a batch job's Ray cluster.

:mod:`flashtrain.launch` runs this on every allocated host through the remote-exec
command (ssh, srun, or plain local execution in the dry run). It starts ``ray start
--block`` for its host, as the head or as a worker, and stops exactly that node when
asked. Why an agent rather than ``ray start`` alone:

- ``ray stop`` stops every Ray of the user on the host (on a shared machine, other
  people's clusters too). The agent stops the node it started: SIGTERM to its ``ray
  start --block`` (which drains the node and ends its processes), then SIGKILL to that
  process's session for anything left after a grace period.
- The stop request travels as a file in the job's shared directory, so stopping needs no
  second remote exec, works the same over ssh, srun and locally, and reaches a node whose
  remote-exec connection has gone.
- The head's address is the one ``ray start`` itself records (``ray_current_cluster`` in
  its temp dir); the agent copies it to the shared directory, where the workers and the
  launcher read it.

The shared directory (:class:`SharedDir`) also holds the job's Ray auth token: Ray 2.60
runs with token authentication, and every node and the driver read the token from there
(``RAY_AUTH_TOKEN_PATH``), so no one's ``~/.ray/auth_token`` is touched.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.5  # how often a wait looks at the shared directory again
EXIT_NO_HEAD = 3  # a worker found no head address in time


@dataclass(frozen=True)
class SharedDir:
    """The files of one launch in a directory every host of the job can read."""

    root: Path

    @property
    def token(self) -> Path:
        return self.root / "auth_token"

    @property
    def head_address(self) -> Path:
        return self.root / "head_address"

    @property
    def alive_nodes(self) -> Path:
        return self.root / "alive_nodes"

    @property
    def watch_log(self) -> Path:
        return self.root / "watch.log"

    def log(self, host: str) -> Path:
        return self.root / "nodes" / f"{host}.log"

    def stop_request(self, host: str) -> Path:
        return self.root / "nodes" / f"{host}.stop"

    def create(self) -> None:
        """Make the directory and a fresh auth token readable by the user only; clear what
        an earlier launch with the same directory left (its head address, stop requests)."""
        (self.root / "nodes").mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for stale in [self.head_address, self.alive_nodes, *self.root.glob("nodes/*.stop")]:
            stale.unlink(missing_ok=True)
        descriptor = os.open(self.token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as token:
            token.write(secrets.token_hex(32))

    def ray_env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with Ray's token auth pointed at this launch's token."""
        env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token)}
        env.pop("RAY_AUTH_TOKEN", None)  # would win over the path
        env.pop("RAY_ADDRESS", None)
        return env

    def read_head_address(self) -> str | None:
        try:
            return self.head_address.read_text().strip() or None
        except OSError:
            return None

    def read_alive_nodes(self) -> set[str]:
        """The node names the watcher last saw alive in the cluster."""
        try:
            return set(self.alive_nodes.read_text().split())
        except OSError:
            return set()


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (bound together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def private_port_args(head: bool) -> list[str]:
    """Every port a Ray node opens, chosen free, so several nodes share one machine
    (the dry run) without meeting each other or other Ray instances there."""
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]
    if head:
        names += ["port", "ray-client-server-port"]
    ports = free_ports(len(names))
    # Worker processes take ports from the OS instead of the shared 10002-19999 range.
    return [f"--{name}={port}" for name, port in zip(names, ports, strict=True)] + [
        "--min-worker-port=0", "--max-worker-port=0"]


def ray_start_command(args: argparse.Namespace, head_address: str | None) -> list[str]:
    """``ray start --block`` for this host, from the venv this agent runs in."""
    command = [str(Path(sys.executable).parent / "ray"), "start", "--block",
               "--disable-usage-stats", f"--node-name={args.host}", f"--temp-dir={args.temp_dir}"]
    if head_address is None:
        command.append("--head")
        if not args.dashboard:
            command.append("--include-dashboard=false")
    else:
        command.append(f"--address={head_address}")
    if args.private_ports:
        command += private_port_args(head=head_address is None)
    elif head_address is None:
        command.append(f"--port={args.port}")
    if args.num_gpus is not None:
        command.append(f"--num-gpus={args.num_gpus}")
    if args.num_cpus is not None:
        command.append(f"--num-cpus={args.num_cpus}")
    return command + shlex.split(args.ray_args)


class NodeAgent:
    """Starts this host's Ray node, publishes the head's address, stops the node on request."""

    def __init__(self, args: argparse.Namespace, stopping: threading.Event):
        self.args = args
        self.share = SharedDir(Path(args.share_dir))
        self.stopping = stopping
        self.log = self.share.log(args.host).open("ab", buffering=0)

    def say(self, message: str) -> None:
        self.log.write(f"flashtrain.launch_node {self.args.host}: {message}\n".encode())

    def stop_asked(self) -> bool:
        return self.stopping.is_set() or self.share.stop_request(self.args.host).exists()

    def wait_for_head(self, deadline: float) -> str | None:
        """The head's address once the head has published it; None on a stop or timeout."""
        while time.monotonic() < deadline and not self.stop_asked():
            address = self.share.read_head_address()
            if address:
                return address
            self.stopping.wait(POLL_S)
        return None

    def publish_head_address(self, ray_start: subprocess.Popen) -> None:
        """Copy the address ``ray start --head`` recorded to the shared directory."""
        recorded = Path(self.args.temp_dir) / "ray_current_cluster"
        while ray_start.poll() is None and not self.stop_asked():
            try:
                address = recorded.read_text().strip()
            except OSError:
                address = ""
            if address:
                write_atomically(self.share.head_address, address)
                self.say(f"head address {address}")
                return
            self.stopping.wait(POLL_S)

    def run(self) -> int:
        """Run the node until a stop is asked (status 0). A ``ray start`` that ends on its
        own before ``--start-timeout-s`` has passed is started again: on a loaded machine
        Ray gives up after a fixed 30 s when its raylet registers late, and a worker that
        read the address of a head that has since restarted must read it again."""
        deadline = time.monotonic() + self.args.start_timeout_s
        for attempt in itertools.count(1):
            code = self.run_node(deadline)
            if code == 0 or self.stop_asked() or time.monotonic() >= deadline:
                return code
            self.say(f"attempt {attempt} ended with status {code}; starting Ray again "
                     f"(for up to {self.args.start_timeout_s:g}s after the first start)")
        raise AssertionError("unreachable")

    def run_node(self, deadline: float) -> int:
        """One ``ray start --block``: 0 once stopped on request, else its exit status."""
        head_address = None
        if self.args.head:
            self.share.head_address.unlink(missing_ok=True)  # a retry has a new address
        else:
            head_address = self.wait_for_head(deadline)
            if head_address is None:
                self.say("no head address appeared in the shared directory; not starting Ray")
                return 0 if self.stop_asked() else EXIT_NO_HEAD
        command = ray_start_command(self.args, head_address)
        Path(self.args.temp_dir, "ray_current_cluster").unlink(missing_ok=True)
        self.say("starting: " + shlex.join(command))
        ray_start = subprocess.Popen(command, env=self.share.ray_env(dict(os.environ)),
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            if self.args.head:
                self.publish_head_address(ray_start)
            while ray_start.poll() is None and not self.stop_asked():
                self.stopping.wait(POLL_S)
            if ray_start.returncode is not None:
                self.say(f"ray start exited on its own with status {ray_start.returncode}")
                return ray_start.returncode or 1
            return 0
        finally:
            self.stop(ray_start)

    def stop(self, ray_start: subprocess.Popen) -> None:
        """SIGTERM to ``ray start`` (it drains the node and ends its processes), then
        SIGKILL to its whole session for whatever outlived the grace period."""
        if ray_start.poll() is None:
            ray_start.send_signal(signal.SIGTERM)
            try:
                ray_start.wait(timeout=self.args.stop_grace_s)
            except subprocess.TimeoutExpired:
                self.say(f"ray start still running {self.args.stop_grace_s:g}s after SIGTERM")
        try:
            os.killpg(ray_start.pid, signal.SIGKILL)  # its session: raylet, workers, GCS
        except ProcessLookupError:
            pass
        ray_start.wait()
        self.say("stopped")


def watch_nodes(share: SharedDir, stopping: threading.Event) -> int:
    """Write the names of the cluster's alive nodes (``ray.nodes()``) to the shared
    directory every POLL_S until stopped. A process of its own, so the launcher never
    becomes a Ray driver: ``ray.init`` takes over the SIGTERM handling of its process, and
    the launcher needs that for stopping the nodes when the scheduler ends the job."""
    import logging

    import ray

    ray.init(address=share.read_head_address(), log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        while not stopping.is_set():
            alive = sorted(node["NodeName"] for node in ray.nodes() if node["Alive"])
            write_atomically(share.alive_nodes, "\n".join(alive) + "\n")
            stopping.wait(POLL_S)
    finally:
        ray.shutdown()
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flashtrain.launch_node",
        description="One node of a flashtrain batch job's Ray cluster (started by "
                    "python -m flashtrain.launch on every host).")
    parser.add_argument("--share-dir", required=True, help="the launch's shared directory")
    parser.add_argument("--watch-nodes", action="store_true",
                        help="instead of starting a node: keep writing the cluster's alive "
                             "nodes to the shared directory (the launcher's join check)")
    parser.add_argument("--host", help="this host's name in the host list")
    parser.add_argument("--head", action="store_true", help="start the head node")
    parser.add_argument("--port", type=int, default=6379, help="the head's GCS port")
    parser.add_argument("--temp-dir", help="Ray's temp dir on this host")
    parser.add_argument("--num-gpus", type=int, default=None)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--dashboard", action="store_true", help="run Ray's dashboard (head)")
    parser.add_argument("--private-ports", action="store_true",
                        help="choose every port free (several nodes on one machine)")
    parser.add_argument("--ray-args", default="", help="more `ray start` options")
    parser.add_argument("--start-timeout-s", type=float, default=300.0,
                        help="how long a worker waits for the head's address, and until "
                             "when a `ray start` that fails is started again")
    parser.add_argument("--stop-grace-s", type=float, default=20.0,
                        help="how long `ray start` has to end after SIGTERM")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stopping.set())
    if args.watch_nodes:
        return watch_nodes(SharedDir(Path(args.share_dir)), stopping)
    if not (args.host and args.temp_dir):
        print("flashtrain.launch_node: --host and --temp-dir are required to start a node",
              file=sys.stderr)
        return 2
    return NodeAgent(args, stopping).run()


if __name__ == "__main__":
    sys.exit(main())
