"""``python -m flashtrain.sim.scale``: what one failure costs as the grid grows, by
simulation, and the goodput it implies at a given failure rate.

For each size (4 .. 2,176 members, rows of 4 as on the paper's nodes) one run with one
member dying inside the all-reduce of a step: the virtual recovery time (from the
controller's first act to the end of the first step after), the steps rolled back, the
grid it re-formed into and that grid's step time, and the driver's own CPU per window
(the real driver loop and controller, with the simulated members' work left out).

Goodput at one failure per ``MTBF`` seconds, from those numbers (first order in
cost / MTBF): each failure costs the detection, the recovery less the window it ends
with, the steps redone, and the slower steps of the shrunk grid until the replacement
has started and joined at a commit boundary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flashtrain.sim.costs import PAPER, SimCosts
from flashtrain.sim.faults import Fault, FaultPlan
from flashtrain.sim.run import run_seed
from flashtrain.topology import Grid

SIZES = (4, 16, 64, 256, 1088, 2176)
MTBFS = (("one per 60 s", 60.0), ("one per 15 s", 15.0), ("one per 3 h", 3 * 3600.0))


def one_failure(grid: Grid, costs: SimCosts) -> dict:
    """One run on ``grid`` with a member dying mid-window in the all-reduce."""
    fault = Fault("collective", nth=3, pick=0.5, where=0.5)
    record = run_seed(0, grid, 0, costs, keep_trace=False,
                      plan=FaultPlan([fault]))
    loss = next(r for r in record.recoveries if r["cause"] not in ("grow", "phase"))
    shrunk = Grid.parse(loss["new_grid"])
    step = costs.step_compute_s + costs.allreduce_s(grid)
    shrunk_step = costs.step_compute_s + costs.allreduce_s(shrunk)
    return {"workers": grid.num_workers, "grid": str(grid), "ok": record.ok,
            "violations": record.violations, "recovery_s": loss["recovery_seconds"],
            "steps_redone": loss["failed_step"] - loss["resume_step"],
            "reformed_to": str(shrunk), "step_s": step, "shrunk_step_s": shrunk_step,
            "driver_cpu_ms_per_window": 1000 * record.driver_cpu_per_window_s,
            "grew_back": record.final_grid == str(grid)}


def cost_per_failure(row: dict, costs: SimCosts, commit_every: int = 5) -> float:
    """Seconds of full-rate training one failure costs (see the module docstring)."""
    window = commit_every * row["step_s"]
    detect = costs.detect_s + window / 2  # on average half a window is lost in flight
    recovery = max(row["recovery_s"] - window, 0.0)
    redone = row["steps_redone"] * row["step_s"]
    # The shrunk grid trains the same global batch per step at its own step time until
    # a replacement has started and joined at the next commit boundary.
    degraded = (costs.process_start_s + window) * (1 - row["step_s"] / row["shrunk_step_s"])
    return detect + recovery + redone + max(degraded, 0.0)


def goodput(cost_s: float, mtbf_s: float) -> float:
    """Fraction of the no-failure rate: failures every ``mtbf_s`` each costing ``cost_s``."""
    return max(0.0, 1.0 - cost_s / mtbf_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.sim.scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="member counts, multiples of 4 (rows of 4)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sizes = [int(n) for n in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: give comma-separated multiples of 4")
    if any(n < 4 or n % 4 for n in sizes):
        parser.error(f"--sizes {args.sizes!r}: every size must be a multiple of 4")
    rows = []
    print(f"{'members':>8} {'grid':>7} {'recovery s':>10} {'redone':>6} {'re-formed':>9} "
          f"{'step ms':>8} {'shrunk ms':>9} {'driver CPU ms/window':>20} "
          + " ".join(f"{name:>13}" for name, _ in MTBFS))
    for size in sizes:
        row = one_failure(Grid(size // 4, 4), PAPER)
        row["cost_per_failure_s"] = cost_per_failure(row, PAPER)
        row["goodput"] = {name: goodput(row["cost_per_failure_s"], mtbf) for name, mtbf in MTBFS}
        rows.append(row)
        print(f"{size:>8} {row['grid']:>7} {row['recovery_s']:>10.2f} {row['steps_redone']:>6} "
              f"{row['reformed_to']:>9} {1000 * row['step_s']:>8.1f} "
              f"{1000 * row['shrunk_step_s']:>9.1f} {row['driver_cpu_ms_per_window']:>20.2f} "
              + " ".join(f"{100 * row['goodput'][name]:>12.1f}%" for name, _ in MTBFS),
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
