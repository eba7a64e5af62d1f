"""``python -m flashtrain.sim.validate --run-dir DIR``: the simulator against a real run.

Reads a real run directory (``config.yaml``, ``summary.json``, ``metrics.jsonl``) of a
job with injected kills (``faults.kill_worker_at_steps``), takes the costs the run
measured (its median step time; its newcomers' process start; what it cannot measure
stays at the ``cpu`` preset), simulates the same config with the same deaths at the same
steps, and prints the re-forms side by side: recovery seconds, steps rolled back, the grid
re-formed into, and the training time in all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import yaml

from flashtrain.config import FlashtrainConfig
from flashtrain.sim.costs import CPU_2X2, SimCosts
from flashtrain.sim.faults import Fault, FaultPlan
from flashtrain.sim.run import run_config
from flashtrain.topology import Grid


def measured_costs(records: list[dict], reforms: list[dict]) -> SimCosts:
    """The cpu preset with what the run measured: step time, process start."""
    steps = [r["step_seconds"] for r in records if r.get("kind") == "step"]
    starts = [n["start_s"] for r in reforms for n in r.get("newcomers", [])]
    return dataclasses.replace(
        CPU_2X2, step_compute_s=statistics.median(steps), fixed_allreduce_s=0.0,
        process_start_s=statistics.median(starts) if starts else CPU_2X2.process_start_s)


def compare(run_dir: Path) -> dict:
    config = FlashtrainConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    costs = measured_costs(records, summary["reforms"])
    where = "collective" if config.faults.kill_during == "allreduce" else "commit"
    # The injector kills the last rank; pick=1.0 is the last live member.
    plan = FaultPlan([Fault(where, 0, 1.0, 0.5, at_step=step)
                      for step in config.faults.kill_worker_at_steps])
    grid = Grid.parse(config.grid.shape)
    sim = run_config(config, summary["dataset_train_size"], grid, costs, plan)
    real_rows = [r for r in summary["reforms"] if r["cause"] not in ("grow", "phase")]
    sim_rows = [r for r in sim.recoveries if r["cause"] not in ("grow", "phase")]
    return {"costs": dataclasses.asdict(costs), "real": real_rows, "sim": sim_rows,
            "sim_ok": sim.ok, "sim_violations": sim.violations,
            "real_train_s": sum(r["step_seconds"] for r in records if r.get("kind") == "step"),
            "real_wall_s": summary["wall_seconds"], "sim_virtual_s": sim.virtual_s,
            "real_steps": summary["global_steps"], "sim_steps": sim.steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.sim.validate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="a finished real run with faults.kill_worker_at_steps")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.run_dir / "summary.json").is_file():
        parser.error(f"--run-dir {args.run_dir}: no summary.json; give a finished run's directory")
    result = compare(args.run_dir)
    print(f"costs: step {result['costs']['step_compute_s']:.3f}s, process start "
          f"{result['costs']['process_start_s']:.2f}s (the rest: the cpu preset)")
    print(f"{'loss':>4} {'real recovery s':>15} {'sim recovery s':>14} {'real redone':>11} "
          f"{'sim redone':>10} {'real grid':>9} {'sim grid':>8}")
    for index in range(max(len(result["real"]), len(result["sim"]))):
        real = result["real"][index] if index < len(result["real"]) else {}
        sim = result["sim"][index] if index < len(result["sim"]) else {}
        print(f"{index + 1:>4} {real.get('recovery_seconds') or 0:>15.2f} "
              f"{sim.get('recovery_seconds') or 0:>14.2f} {real.get('steps_rolled_back', '-'):>11} "
              f"{sim.get('failed_step', 0) - sim.get('resume_step', 0):>10} "
              f"{real.get('new_grid', '-'):>9} {sim.get('new_grid', '-'):>8}")
    print(f"steps: real {result['real_steps']}, sim {result['sim_steps']}; real wall "
          f"{result['real_wall_s']:.1f}s, sim virtual {result['sim_virtual_s']:.1f}s; sim "
          f"invariants {'held' if result['sim_ok'] else result['sim_violations']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
