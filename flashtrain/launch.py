"""``python -m flashtrain.launch``: a Ray cluster over a batch job's hosts, one training job
on it, and every node stopped at the end.

The batch scripts (``cluster/abci/job.sh`` for ABCI's ``qsub``, ``cluster/slurm/job.sh``
for ``sbatch``) only turn the scheduler's host list into ``--hosts`` and name the
remote-exec command; everything else happens here, the same for both:

1. A shared directory on the job's filesystem gets a fresh Ray auth token (Ray 2.60 runs
   with token authentication; the token never goes to anyone's ``~/.ray``).
2. The first host starts the Ray head, every other host a worker: the agent of
   :mod:`flashtrain.launch_node`, run on each host through the remote-exec template
   (``ssh {host} {command}``, ``srun ... -w {host} bash -c {command}``) from the project's
   venv, with the GPUs per node. The head publishes its address in the shared directory.
3. The launcher waits, bounded by ``--join-timeout``, until ``ray.nodes()`` shows every
   host alive; otherwise it stops with a message naming the hosts that are missing (and
   the log of any host whose node command already ended).
4. It runs ``python -m flashtrain.jobs.imagenet`` with the user's arguments against that
   cluster and returns the job's exit status. The job's relative run directories go to
   the folder of the shared directory (``$FLASHTRAIN_RUNS_ROOT``, unless already set):
   the job writes them on the head's host, and every host and the user reach that folder.
5. Whatever happened (job failed, SIGTERM from the scheduler, Ctrl-C), it stops Ray on
   every host, workers first and the head last, each bounded by ``--stop-timeout``.

``--dry-run`` runs the same launcher on this machine: two "hosts" that are two Ray nodes
on this machine with their own temp dirs and ports, the remote exec a plain local
``bash -c``. That is how CI runs the batch path end to end on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flashtrain.launch_node import POLL_S, SharedDir
from flashtrain.runs import RUNS_ROOT_ENV

EXIT_USAGE = 2
EXIT_NODES = 3  # the cluster did not come up: a host never joined or its node failed
DRY_RUN_HOSTS = ("node-0", "node-1")
LOCAL_EXEC = "bash -c {command}"
SSH_EXEC = "ssh -o BatchMode=yes {host} {command}"
LOG_TAIL_LINES = 15


class LaunchError(Exception):
    """The launch cannot go on; the message names what is wrong and how to fix it."""


class ClusterNotFormed(LaunchError):
    """Ray did not come up on every host in time (or a host's node command failed)."""


class Interrupted(BaseException):
    """The launcher received a stop signal (the scheduler's SIGTERM, Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LaunchPlan:
    """Everything one launch needs, checked once."""

    hosts: tuple[str, ...]
    remote_exec: str
    share_dir: Path
    workdir: Path
    venv: Path
    setup: str
    gpus_per_node: int | None
    cpus_per_node: int | None
    head_port: int
    dry_run: bool
    ray_args: str
    join_timeout_s: float
    stop_timeout_s: float
    job_args: tuple[str, ...]
    task: str | None = None  # MODULE:TASK for python -m flashtrain.run; None: the ImageNet job

    @property
    def job_command(self) -> list[str]:
        """The job's ``python -m`` module and arguments."""
        if self.task is None:
            return ["flashtrain.jobs.imagenet", *self.job_args]
        return ["flashtrain.run", self.task, *self.job_args]

    @property
    def head(self) -> str:
        return self.hosts[0]

    def temp_dir(self, index: int) -> str:
        """Ray's temp dir on host ``index``: short (Ray's socket paths must stay under the
        Unix limit of 107 bytes), on the host's local disk, and one per launch and node."""
        digest = hashlib.sha1(str(self.share_dir).encode()).hexdigest()[:8]
        return f"/tmp/ft-{digest}-{index}"


def parse_hosts(text: str) -> tuple[str, ...]:
    """Host names separated by commas or whitespace (a ``$PBS_NODEFILE``, the output of
    ``scontrol show hostnames``), each once, in their first order."""
    names = text.replace(",", " ").split()
    return tuple(dict.fromkeys(names))


def expand_template(template: str, host: str, command: str) -> list[str]:
    """The argv that runs the shell ``command`` on ``host``: the template's words, with
    ``{host}`` replaced inside any word and the word ``{command}`` replaced by the whole
    command as one argument (ssh, ``bash -c`` and ``srun ... bash -c`` all take it so)."""
    words = shlex.split(template)
    if "{command}" not in words:
        raise LaunchError(f"--remote-exec {template!r} has no {{command}} word: write e.g. "
                          f"{SSH_EXEC!r} or 'srun --nodes=1 --ntasks=1 -w {{host}} bash -c "
                          "{command}'")
    return [command if word == "{command}" else word.replace("{host}", host) for word in words]


def node_command(plan: LaunchPlan, index: int) -> str:
    """The shell command run on host ``index``: the user's setup, the venv, the agent."""
    agent = [
        "python", "-m", "flashtrain.launch_node", "--share-dir", str(plan.share_dir),
        "--host", plan.hosts[index], "--temp-dir", plan.temp_dir(index),
        "--start-timeout-s", f"{plan.join_timeout_s:g}",
        "--stop-grace-s", f"{max(plan.stop_timeout_s / 2, 1):g}",
    ]
    if index == 0:
        agent += ["--head", "--port", str(plan.head_port)]
        if not plan.dry_run:
            agent.append("--dashboard")
    if plan.dry_run:
        agent.append("--private-ports")
    if plan.gpus_per_node is not None:
        agent += ["--num-gpus", str(plan.gpus_per_node)]
    if plan.cpus_per_node is not None:
        agent += ["--num-cpus", str(plan.cpus_per_node)]
    if plan.ray_args:
        agent += ["--ray-args", plan.ray_args]
    steps = [f"cd {shlex.quote(str(plan.workdir))}"]
    if plan.setup:
        steps.append(plan.setup)
    steps += [f". {shlex.quote(str(plan.venv / 'bin' / 'activate'))}", "exec " + shlex.join(agent)]
    return " && ".join(steps)


def runs_root_of(plan: LaunchPlan) -> Path:
    """Where the job's runs go unless $FLASHTRAIN_RUNS_ROOT says otherwise: the folder
    holding the shared directory (WORKDIR/runs by default), which every host and the
    user already reach, and the same for every launch, so ``--resume --run-dir NAME``
    in a later batch job finds a run by its name."""
    return plan.share_dir.parent


def current_venv() -> Path | None:
    return Path(sys.prefix) if sys.prefix != sys.base_prefix else None


def make_plan(args: argparse.Namespace) -> LaunchPlan:
    """Check the command line and build the plan; :class:`LaunchError` says what to fix."""
    if args.hosts and args.hostfile:
        raise LaunchError("give the hosts either with --hosts or with --hostfile, not both")
    if args.hostfile:
        try:
            hosts = parse_hosts(Path(args.hostfile).read_text())
        except OSError as err:
            raise LaunchError(f"--hostfile {args.hostfile}: {err.strerror}") from err
    elif args.hosts:
        hosts = parse_hosts(args.hosts)
    elif args.dry_run:
        hosts = DRY_RUN_HOSTS
    else:
        raise LaunchError("no hosts: pass --hosts h1,h2,... or --hostfile FILE (e.g. "
                          "$PBS_NODEFILE), or --dry-run to try the launcher on this machine")
    if not hosts:
        raise LaunchError("the host list is empty: check --hosts / --hostfile")
    venv = Path(args.venv).resolve() if args.venv else current_venv()
    if venv is None or not (venv / "bin" / "activate").is_file():
        raise LaunchError(f"{venv or sys.prefix} is not a virtual environment: run the launcher "
                          "with the project's venv (.venv/bin/python -m flashtrain.launch) or "
                          "pass --venv PATH")
    job_args = tuple(args.job_args[1:] if args.job_args[:1] == ["--"] else args.job_args)
    workdir = Path(args.workdir).resolve()
    job_id = args.job_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    share_dir = Path(args.share_dir or workdir / "runs" / f"launch-{job_id}").resolve()
    remote_exec = args.remote_exec or (LOCAL_EXEC if args.dry_run else SSH_EXEC)
    expand_template(remote_exec, hosts[0], "true")  # fails early on a template without {command}
    return LaunchPlan(
        hosts=hosts, remote_exec=remote_exec, share_dir=share_dir, workdir=workdir, venv=venv,
        setup=args.setup, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
        head_port=args.port, dry_run=args.dry_run, ray_args=args.ray_args,
        join_timeout_s=args.join_timeout, stop_timeout_s=args.stop_timeout, job_args=job_args,
        task=args.task)


# --------------------------------------------------------------------------- the launch


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join(f"    {line}" for line in text)


class Launch:
    """One launch: starts the nodes, waits for them, runs the job, stops the nodes."""

    def __init__(self, plan: LaunchPlan, say: Callable[[str], None]):
        self.plan = plan
        self.say = say
        self.share = SharedDir(plan.share_dir)
        self.nodes: dict[str, subprocess.Popen] = {}

    def start_nodes(self) -> None:
        self.share.create()
        self.say(f"shared directory {self.plan.share_dir} (auth token, head address, node logs)")
        for index, host in enumerate(self.plan.hosts):
            argv = expand_template(self.plan.remote_exec, host, node_command(self.plan, index))
            with self.share.log(host).open("ab") as log:
                self.nodes[host] = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)  # Ctrl-C reaches the launcher, which stops them
        self.say(f"starting Ray on {len(self.plan.hosts)} host(s), head {self.plan.head}")

    def check_node_commands(self, joined: set[str]) -> None:
        """Fail at once when a host's node command ended before its node joined."""
        for host, process in self.nodes.items():
            code = process.poll()
            if code is not None and host not in joined:
                raise ClusterNotFormed(
                    f"the node command for host {host} exited with status {code} before its "
                    f"Ray node joined; the end of {self.share.log(host)}:\n"
                    f"{log_tail(self.share.log(host))}")

    def wait_for_head(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            self.check_node_commands(joined=set())
            address = self.share.read_head_address()
            if address:
                return address
            time.sleep(POLL_S)  # the head's agent writes the file; bounded by the deadline
        raise ClusterNotFormed(
            f"the Ray head on {self.plan.head} did not start within {self.plan.join_timeout_s:g}s "
            f"(--join-timeout); missing hosts: {', '.join(self.plan.hosts)}; its log "
            f"{self.share.log(self.plan.head)}:\n{log_tail(self.share.log(self.plan.head))}")

    def wait_for_nodes(self) -> str:
        """The head's address once ``ray.nodes()`` shows every host alive."""
        deadline = time.monotonic() + self.plan.join_timeout_s
        address = self.wait_for_head(deadline)
        watcher = self.start_watcher()
        try:
            while True:
                joined = self.share.read_alive_nodes()
                missing = [host for host in self.plan.hosts if host not in joined]
                if not missing:
                    self.say(f"all {len(self.plan.hosts)} node(s) joined the cluster at {address}")
                    return address
                self.check_node_commands(joined)
                if watcher.poll() is not None:  # e.g. the head restarted at a new address
                    if time.monotonic() >= deadline:
                        raise ClusterNotFormed(
                            f"could not read the node table of the Ray head at {address} (run "
                            f"the launcher on the first host, {self.plan.head}); the end of "
                            f"{self.share.watch_log}:\n{log_tail(self.share.watch_log)}")
                    address = self.wait_for_head(deadline)
                    watcher = self.start_watcher()
                if time.monotonic() >= deadline:
                    raise ClusterNotFormed(
                        f"{len(missing)} of {len(self.plan.hosts)} host(s) did not join the Ray "
                        f"cluster within {self.plan.join_timeout_s:g}s (--join-timeout): "
                        f"{', '.join(missing)}; their logs are in {self.share.root / 'nodes'}")
                time.sleep(POLL_S)  # the watcher rewrites the file; bounded by the deadline
        finally:
            end_process(watcher, grace_s=self.plan.stop_timeout_s)

    def start_watcher(self) -> subprocess.Popen:
        """The process that reads ``ray.nodes()`` for the launcher (see
        :func:`flashtrain.launch_node.watch_nodes` for why it is a process of its own)."""
        command = [sys.executable, "-m", "flashtrain.launch_node", "--watch-nodes",
                   "--share-dir", str(self.plan.share_dir)]
        with self.share.watch_log.open("ab") as log:
            return subprocess.Popen(command, cwd=self.plan.workdir,
                                    env=self.share.ray_env(dict(os.environ)), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def run_job(self, address: str) -> int:
        """``python -m flashtrain.jobs.imagenet`` (or ``flashtrain.run --task``'s task) on
        the cluster, from the work directory; its exit status. A stop signal reaches it as
        SIGINT (it saves what it has and says how to resume)."""
        command = [sys.executable, "-m", *self.plan.job_command]
        self.say("running " + shlex.join(command[1:]))
        env = {**self.share.ray_env(dict(os.environ)), "RAY_ADDRESS": address}
        env.setdefault(RUNS_ROOT_ENV, str(runs_root_of(self.plan)))
        job = subprocess.Popen(command, cwd=self.plan.workdir, env=env, start_new_session=True)
        try:
            return job.wait()
        except Interrupted:
            self.stop_job(job)
            raise

    def stop_job(self, job: subprocess.Popen) -> None:
        """SIGINT, then SIGKILL after ``--stop-timeout`` or at a second stop signal."""
        job.send_signal(signal.SIGINT)
        try:
            job.wait(timeout=self.plan.stop_timeout_s)
        except (subprocess.TimeoutExpired, Interrupted):
            self.say("the job did not stop in time; killing it")
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    def stop_nodes(self) -> None:
        """Stop the workers, then the head (a worker stops fast only while the head's GCS
        answers), each group bounded by ``--stop-timeout``; end any node command left."""
        workers = [host for host in self.nodes if host != self.plan.head]
        unconfirmed = []
        for group in (workers, [self.plan.head]):
            group = [host for host in group if host in self.nodes]
            for host in group:
                self.share.stop_request(host).touch()
            unconfirmed += self._wait_for_exit(group)
        if unconfirmed:
            self.say(f"no stop confirmed by {', '.join(unconfirmed)} within "
                     f"{self.plan.stop_timeout_s:g}s (--stop-timeout): their node commands were "
                     "killed, which ends a local or srun node but not always one behind ssh; "
                     f"Ray stopped on the other {len(self.nodes) - len(unconfirmed)} host(s)")
        else:
            self.say("Ray stopped on every host")

    def _wait_for_exit(self, hosts: Sequence[str]) -> list[str]:
        """Wait for the node commands of ``hosts`` to end; kill those still running at
        the deadline and return their hosts."""
        deadline = time.monotonic() + self.plan.stop_timeout_s
        killed = []
        for host in hosts:
            process = self.nodes[host]
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                killed.append(host)
        return killed


def end_process(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL to its session after ``grace_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def raise_on_signals(signum: int, _frame) -> None:
    raise Interrupted(signum)


def launch(plan: LaunchPlan, say: Callable[[str], None]) -> int:
    """Start, wait, run, stop; the job's exit status (or EXIT_NODES, or 128 + signal)."""
    run = Launch(plan, say)
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for signum in stop_signals:
        signal.signal(signum, raise_on_signals)
    try:
        run.start_nodes()
        address = run.wait_for_nodes()
        code = run.run_job(address)
        say(f"the job exited with status {code}")
        return code
    except ClusterNotFormed as err:
        say(str(err))
        return EXIT_NODES
    except Interrupted as err:
        say(f"{err}: stopping")
        return 128 + err.signum
    finally:
        for signum in stop_signals:  # the stop is bounded; let it finish
            signal.signal(signum, signal.SIG_IGN)
        run.stop_nodes()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flashtrain.launch",
        description="Start Ray on a batch job's hosts, run python -m flashtrain.jobs.imagenet "
                    "on them, stop Ray everywhere. Arguments after -- go to the job.",
        epilog="example: python -m flashtrain.launch --dry-run -- --config jobs/cpu-smoke.yaml")
    hosts = parser.add_argument_group("hosts")
    hosts.add_argument("--hosts", help="host names, comma- or space-separated; the first is the head")
    hosts.add_argument("--hostfile", help="a file of host names (e.g. $PBS_NODEFILE); repeats count once")
    hosts.add_argument("--dry-run", action="store_true",
                       help="run on this machine: two local Ray nodes (--hosts names them), "
                            "remote exec = local bash -c, private ports and temp dirs")
    hosts.add_argument("--remote-exec", default=None,
                       help=f"how to run a command on a host, with {{host}} and {{command}} "
                            f"(default {SSH_EXEC!r}; dry run {LOCAL_EXEC!r})")
    nodes = parser.add_argument_group("nodes")
    nodes.add_argument("--gpus-per-node", type=int, default=None, help="GPUs Ray offers per node "
                       "(default: what Ray detects)")
    nodes.add_argument("--cpus-per-node", type=int, default=None, help="CPUs Ray offers per node")
    nodes.add_argument("--port", type=int, default=6379, help="the head's GCS port (not in a dry run)")
    nodes.add_argument("--ray-args", default="", help="more `ray start` options for every node")
    nodes.add_argument("--venv", default=None, help="the project's venv on every host "
                       "(default: the one running the launcher)")
    nodes.add_argument("--setup", default="", help="shell command run on each host before the "
                       "venv is activated, e.g. 'module load python/3.12/3.12.9'")
    nodes.add_argument("--workdir", default=".", help="the project's checkout (default: here)")
    parser.add_argument("--share-dir", default=None, help="a directory every host sees "
                        "(default WORKDIR/runs/launch-JOB_ID)")
    parser.add_argument("--job-id", default=None, help="names the shared directory "
                        "(the scripts pass $PBS_JOBID / $SLURM_JOB_ID)")
    parser.add_argument("--join-timeout", type=float, default=300.0,
                        help="seconds until every host must have joined (default 300)")
    parser.add_argument("--stop-timeout", type=float, default=60.0,
                        help="seconds each stop (job, workers, head) may take (default 60)")
    parser.add_argument("--task", default=None, metavar="MODULE:TASK",
                        help="train this flashtrain.Task (python -m flashtrain.run MODULE:TASK, "
                             "its module found in --workdir) instead of the ImageNet job")
    parser.add_argument("job_args", nargs=argparse.REMAINDER,
                        help="-- then the arguments of python -m flashtrain.jobs.imagenet")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    def say(message: str) -> None:
        print(f"flashtrain.launch: {message}", file=sys.stderr, flush=True)

    try:
        plan = make_plan(parse_args(argv))
    except LaunchError as err:
        say(str(err))
        return EXIT_USAGE
    return launch(plan, say)


if __name__ == "__main__":
    sys.exit(main())
