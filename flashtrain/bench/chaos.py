"""``python -m flashtrain.bench chaos``: the training job under a seeded storm of faults
injected from outside, the driver's death included.

The benchmark process owns an emulated multi-node cluster (``ray.cluster_utils.Cluster``)
and runs the real job as a subprocess (``python -m flashtrain.jobs.imagenet
--set runtime.ray_address=...``), the way a user would. It watches the job through
``metrics.jsonl`` (:mod:`flashtrain.bench.chaos_watch`) and fires at least ten faults
drawn from ``--seed`` (:mod:`flashtrain.bench.chaos_faults`): worker processes SIGKILLed
(found in Ray's GCS actor table), a worker SIGSTOPped past the collective timeout and
SIGCONTed, nodes removed and added, every worker killed at once, and the driver
SIGKILLed and the job started again with ``--resume --run-dir``. Each fault fires a
seeded number of steps after the previous one recovered, plus a seeded fraction of a
second, so it lands wherever the job happens to be.

Definitions (per fault):

- **recovery s**: from the fault to the first step completed by a grid formed after it
  (a new generation, or a new driver); for a stall, by the first step completed after
  the SIGCONT. Node additions need no recovery.
- **promised step**: what the job had promised to keep when the fault hit. For faults a
  surviving worker can answer for (a worker killed or stalled, a node removed) it is
  the last in-memory commit (the job's ``commit`` event: every member and the clock
  hold it). When nothing in memory survives (the driver killed, or every worker lost,
  whatever the cause) it is the newest durable checkpoint whose checksum verified when
  the fault hit (for a driver kill: on disk once the driver is dead).
- **committed steps lost** = max(0, promised step - resume step), where the resume
  step is the global step of the first step completed after the recovery. Steps after
  the promise that are trained again (**redone** = last step completed before the fault
  + 1 - resume step) are the price of the commit and checkpoint intervals, not a loss
  (seen from outside, a step that ends in the very instant of a fault may count on
  either side; the exact step accounting is checked on the finished run).
- **join times** of each worker that joined a grid after the start (from the job's
  re-form records): from its request to a placed bundle (room), from room to its
  constructor done (start), and **short s**: how long the grid was below its target
  while this replacement had room. The job bounds the last (it pauses at a commit
  boundary for a replacement that is overdue); this benchmark fails a run where one
  exceeds ``--join-bound-s``.

Checks (the exit status is 1 if any fails): every planned fault was injected and
recovered from, 0 committed steps lost, the job exited 0, ``summary.json``'s
``samples_per_epoch`` equals ``dataset_train_size`` for every epoch, every global step
completed and the steps done twice equal the rolled-back ones, every join within the
bound, and the final checkpoint loads into a plain torchvision model of the run's
architecture (``tiny_cnn``, not a torchvision model, loads into flashtrain's builder)
that scores the run's final top-1 on the validation set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flashtrain.bench import chaos_faults as faults
from flashtrain.bench.chaos_watch import MetricsTail, is_step

NODE_CPUS = 2  # logical CPUs per emulated node: two 1-CPU workers, rows of two
DRIVER_START_LIMIT_S = 300.0
_NEEDS_PIDS = ("kill_worker", "kill_all_workers", "stall_worker")


@dataclass
class Outcome:
    """One injected fault and what followed it."""

    index: int
    kind: str
    time: float  # seconds since the benchmark started
    victim: str
    instance: int  # the driver instance it hit
    grid_before: str
    last_step_before: int | None
    promise: str  # "commit" (in memory) or "checkpoint" (durable)
    promised_step: int | None
    durable_step: int | None  # the newest durable checkpoint when it hit
    generation: int = -1  # of the grid it hit
    fired_at: float = 0.0  # time.time() of the fault
    settles_at: float = 0.0  # recovery counts from steps after this (a stall: its SIGCONT)
    recovery_s: float | None = None
    resume_step: int | None = None
    grid_after: str = "-"
    restarted: bool = False  # the job continued from a durable checkpoint
    recovered: bool = False

    @property
    def lost(self) -> int:
        if self.resume_step is None or self.promised_step is None:
            return 0
        return max(0, self.promised_step - self.resume_step)

    @property
    def redone(self) -> int | None:
        if self.resume_step is None or self.last_step_before is None:
            return None
        return self.last_step_before + 1 - self.resume_step


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench chaos",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="draws the faults and their moments")
    parser.add_argument("--faults", type=int, default=12, help="how many faults (at least 6)")
    parser.add_argument("--model", default="shufflenet_v2_x0_5",
                        help="torchvision model name, or tiny_cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--nodes", type=int, default=3, help="emulated worker nodes at the start "
                        f"({NODE_CPUS} one-CPU workers each; the grid is 2x2 plus a warm spare)")
    parser.add_argument("--collective-timeout", type=float, default=3.0,
                        help="collective.timeout_s; a stall lasts this + 1.5 s")
    parser.add_argument("--join-bound-s", type=float, default=60.0,
                        help="fail when the grid is short of a replacement with room longer")
    parser.add_argument("--recovery-limit-s", type=float, default=240.0,
                        help="give up when a fault is not recovered from within this")
    parser.add_argument("--data-cache", default=os.path.expanduser("~/.cache/flashtrain/digits"))
    parser.add_argument("--workdir", help="where the run directory and driver logs go "
                        "(default: a new temporary folder)")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def job_overrides(args: argparse.Namespace, address: str) -> list[str]:
    """The job's configuration: 2x2 CPU grid with one warm spare, commits every 3 steps,
    a durable checkpoint every 6, every step recorded."""
    return [f"runtime.ray_address={address}", f"model.name={args.model}", "grid.shape=2x2",
            "grid.cpus_per_worker=1", f"schedule.epochs={args.epochs}",
            f"schedule.phases=[{{start_epoch: 0, global_batch: {args.global_batch}}}]",
            "schedule.base_lr=0.4", "schedule.warmup_epochs=0.5", "runtime.progress=false",
            f"collective.timeout_s={args.collective_timeout}", "collective.bucket_mb=1",
            "elastic.commit_every_steps=3", "elastic.warm_spares=1", "elastic.max_reforms=1000",
            "elastic.wait_for_resources_s=120", "checkpoint.every_steps=6", "checkpoint.keep=3",
            "runtime.remote_timeout_s=60", "runtime.log_every_steps=1"]


class ChaosRun:
    """One seeded run: cluster, driver subprocess, faults, then the checks."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.run_dir = workdir / "run"
        self.tail = MetricsTail(self.run_dir / "metrics.jsonl")
        self.plan = faults.fault_plan(args.seed, args.faults, args.nodes)
        self.outcomes: list[Outcome] = []
        self.problems: list[str] = []
        self.driver: subprocess.Popen | None = None
        self.driver_exits: list[int] = []
        self.began = time.time()

    # -- the cluster and the driver ------------------------------------------------------

    def run(self) -> dict:
        import ray
        from ray.cluster_utils import Cluster

        # No dashboard: a dozen processes less on the machine; the GCS answers for actors.
        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": 0, "include_dashboard": False})
        try:
            for _ in range(self.args.nodes):
                self.cluster.add_node(num_cpus=NODE_CPUS)
            ray.init(address=self.cluster.address, log_to_driver=False)
            self._start_driver(resume=False)
            self._inject_all()
            self._wait_for_the_end()
        finally:
            if self.driver is not None and self.driver.poll() is None:
                self.driver.kill()
                self.driver.wait()
            ray.shutdown()
            self.cluster.shutdown()
        return self._result()

    def _start_driver(self, resume: bool) -> None:
        command = [sys.executable, "-m", "flashtrain.jobs.imagenet", "--run-dir",
                   str(self.run_dir), "--data-cache", self.args.data_cache]
        command += [f"--set={item}" for item in job_overrides(self.args, self.cluster.address)]
        if resume:
            command.append("--resume")
        log = open(self.workdir / f"driver-{self.tail.instance}.log", "wb")
        self.driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        log.close()

    def _driver_alive(self) -> bool:
        return self.driver is not None and self.driver.poll() is None

    def _wait_for_the_end(self) -> None:
        try:
            code = self.driver.wait(timeout=self.args.recovery_limit_s + 300)
        except subprocess.TimeoutExpired:
            self.problems.append("the job did not finish in time after the last fault")
            self.driver.kill()
            code = self.driver.wait()
        self.driver_exits.append(code)
        self.tail.poll()
        if code != 0:
            self.problems.append(f"the job exited {code} (see {self._log()})")

    def _log(self) -> Path:
        return self.workdir / f"driver-{self.tail.instance}.log"

    # -- faults --------------------------------------------------------------------------

    def _inject_all(self) -> None:
        mark = 0  # index of the record after which the next gap is counted
        for index, fault in enumerate(self.plan):
            found = self.tail.wait_for(is_step, DRIVER_START_LIMIT_S, self._driver_alive, mark)
            if found is None or not self._wait_steps(fault.gap_steps, mark):
                why = ("the run ended before fault" if self.driver.poll() == 0 else
                       "the job stopped or stalled before fault")
                self.problems.append(f"{why} {index + 1} of {len(self.plan)} ({fault.kind}): "
                                     f"see {self._log()} (more --epochs make room for faults)")
                return
            time.sleep(fault.jitter_s)
            outcome = self._fire(index, fault)
            self.outcomes.append(outcome)
            if not self._await_recovery(outcome):
                return
            mark = len(self.tail.records)

    def _wait_steps(self, count: int, mark: int) -> bool:
        seen = []

        def counted(record: dict) -> bool:
            if is_step(record):
                seen.append(record)
            return len(seen) >= count

        return self.tail.wait_for(counted, self.args.recovery_limit_s, self._driver_alive,
                                  mark) is not None

    def _fire(self, index: int, fault: faults.PlannedFault) -> Outcome:
        from flashtrain.train.checkpoint import latest_checkpoint

        self.tail.poll()
        grid = self.tail.grid() or {}
        pids = self._member_pids(grid) if fault.kind in _NEEDS_PIDS else {}
        durable = _step_of(latest_checkpoint(self.run_dir / "checkpoints"))
        self.tail.poll()  # what the job has done, as close to the fault as can be
        last = self.tail.last_step()
        commit = self.tail.last("event", "commit", instance=self.tail.instance)
        outcome = Outcome(index=index, kind=fault.kind, time=0.0, victim="-",
                          instance=self.tail.instance, grid_before=grid.get("grid", "-"),
                          last_step_before=last["step"] if last else None,
                          promise="commit", promised_step=commit["global_step"] if commit else None,
                          durable_step=durable, generation=grid.get("generation", -1))
        getattr(self, f"_fire_{fault.kind}")(fault, grid, pids, outcome)
        outcome.time = outcome.fired_at - self.began
        outcome.settles_at = max(outcome.settles_at, outcome.fired_at)
        return outcome

    def _member_pids(self, grid: dict) -> dict[str, int]:
        """``{actor id: pid}`` of the grid's members alive in Ray's GCS actor table."""
        from flashtrain.bench.killer import alive_actor_pids

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = alive_actor_pids("Worker", set(grid.get("actors", [])))
            if pids:
                return pids
            time.sleep(0.1)
            grid = self.tail.grid() or grid
        return {}

    def _fire_kill_worker(self, fault, grid, pids, outcome: Outcome) -> None:
        actor = faults.choose(list(pids), fault.pick) if pids else None
        outcome.fired_at = time.time()
        if actor is not None:
            faults.send(pids[actor], signal.SIGKILL)
        outcome.victim = f"pid {pids[actor]}" if actor else "no live member"

    def _fire_kill_all_workers(self, fault, grid, pids, outcome: Outcome) -> None:
        from flashtrain.bench.killer import alive_actor_pids

        # Every worker process of the job, read at the moment of the kill: the grid last
        # seen in metrics.jsonl can be a generation behind (a replacement that joined at
        # the last commit holds that commit before the job records its new grid), and a
        # survivor would turn "every worker lost" into an ordinary re-form.
        everyone = {**pids, **alive_actor_pids("Worker")}
        outcome.fired_at = time.time()
        for pid in everyone.values():
            faults.send(pid, signal.SIGKILL)
        outcome.victim = f"{len(everyone)} pids"

    def _fire_stall_worker(self, fault, grid, pids, outcome: Outcome) -> None:
        actor = faults.choose(list(pids), fault.pick) if pids else None
        seconds = self.args.collective_timeout + 1.5
        outcome.fired_at = time.time()
        if actor is not None:
            faults.stall(pids[actor], seconds)
        outcome.settles_at = outcome.fired_at + seconds
        outcome.victim = f"pid {pids[actor]} for {seconds:g}s" if actor else "no live member"

    def _fire_remove_node(self, fault, grid, pids, outcome: Outcome) -> None:
        outcome.fired_at = time.time()
        node = faults.remove_node(self.cluster, grid.get("nodes", []), fault.pick)
        outcome.victim = f"node {node[:8]}" if node else "no worker node"

    def _fire_add_node(self, fault, grid, pids, outcome: Outcome) -> None:
        outcome.fired_at = time.time()
        outcome.victim = f"node {self.cluster.add_node(num_cpus=NODE_CPUS).node_id[:8]}"

    def _fire_kill_driver(self, fault, grid, pids, outcome: Outcome) -> None:
        outcome.fired_at = time.time()
        pid = self.driver.pid
        faults.send(pid, signal.SIGKILL)
        self.driver_exits.append(self.driver.wait())
        self.tail.poll()  # the dead driver's last records are its instance's
        last = self.tail.last("step", instance=outcome.instance)
        outcome.last_step_before = last["step"] if last else None
        self.tail.instance += 1
        self._start_driver(resume=True)
        outcome.victim = f"pid {pid}"

    def _await_recovery(self, outcome: Outcome) -> bool:
        """Wait for the first step that shows the job recovered; fill in the outcome."""
        from flashtrain.train.checkpoint import latest_checkpoint

        if outcome.kind == "add_node":
            outcome.recovered = True
            return True
        if outcome.kind == "kill_driver":
            # Nothing writes any more: the promise is what is durable on disk now.
            outcome.durable_step = _step_of(latest_checkpoint(self.run_dir / "checkpoints"))
        start = next((i for i, r in enumerate(self.tail.records) if r["_seen"] >= outcome.fired_at),
                     len(self.tail.records))
        instance, generation = outcome.instance, outcome.generation

        def recovered(record: dict) -> bool:
            if not is_step(record) or record["_seen"] < outcome.settles_at:
                return False
            if outcome.kind == "stall_worker":
                return True
            return record["_instance"] > instance or record.get("generation", -1) > generation

        record = self.tail.wait_for(recovered, self.args.recovery_limit_s, self._driver_alive,
                                    start)
        if record is None and self.driver.poll() == 0:
            # It hit the final validation or checkpoint, and the job still finished cleanly
            # (the checks of the finished run say whether anything went missing).
            outcome.recovered, outcome.grid_after = True, "done"
            return True
        if record is None:
            self.problems.append(f"fault {outcome.index + 1} ({outcome.kind}) was not recovered "
                                 f"from within {self.args.recovery_limit_s:g}s: see {self._log()}")
            return False
        between = self.tail.records[start:self.tail.records.index(record)]
        outcome.restarted = outcome.kind == "kill_driver" or any(
            r.get("name") == "restart" for r in between)
        if outcome.restarted:
            outcome.promise, outcome.promised_step = "checkpoint", outcome.durable_step
        outcome.recovered = True
        outcome.recovery_s = record["_seen"] - outcome.fired_at
        outcome.resume_step = record["step"]
        outcome.grid_after = record.get("grid", "-")
        return True

    # -- results -------------------------------------------------------------------------

    def _result(self) -> dict:
        from flashtrain.bench.chaos_checks import check_run

        records = self.tail.records
        summary_path = self.run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        problems = list(self.problems)
        if len(self.outcomes) < len(self.plan):
            problems.append(f"only {len(self.outcomes)} of {len(self.plan)} planned faults were "
                            "injected")
        checks = check_run(summary, records, self.outcomes, self.run_dir, self.args)
        problems += checks.pop("problems")
        return {"seed": self.args.seed, "model": self.args.model,
                "plan": [asdict(f) for f in self.plan],
                "outcomes": [{**asdict(o), "lost": o.lost, "redone": o.redone}
                             for o in self.outcomes],
                "driver_exits": self.driver_exits, "run_dir": str(self.run_dir),
                "wall_seconds": time.time() - self.began, **checks, "problems": problems}


def _step_of(path: Path | None) -> int | None:
    return int(path.name.split("-")[1].split(".")[0]) if path is not None else None


def main(argv: list[str]) -> int:
    from flashtrain.bench.chaos_checks import format_report

    args = parse_args(argv)
    # A checkpoint seen while the job writes it has no checksum yet: expected here.
    logging.getLogger("flashtrain.train.checkpoint").setLevel(logging.ERROR)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flashtrain-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = ChaosRun(args, workdir).run()
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 1 if result["problems"] else 0
