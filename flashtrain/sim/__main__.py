"""``python -m flashtrain.sim``: the real driver loop and elastic controller against
simulated members on virtual time, through seeded fault schedules, with the invariants
checked after every run. A failing seed prints its event trace and the one command
that replays it.

    python -m flashtrain.sim --grid 2x2 --seeds 0-999 --faults-per-run 2
    python -m flashtrain.sim --grid 544x4 --seeds 0-4 --json sim.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from flashtrain.sim.costs import PRESETS
from flashtrain.sim.faults import KINDS
from flashtrain.sim.run import STEPS_PER_EPOCH, SimRecord, recovery_bound_s, run_seed, sim_config
from flashtrain.topology import Grid


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.sim",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True, help="the grid, RxC (e.g. 2x2, 544x4)")
    parser.add_argument("--seeds", required=True, help="seed range A-B (inclusive), or one seed")
    parser.add_argument("--faults-per-run", type=int, default=2,
                        help=f"faults drawn per seed from: {', '.join(KINDS)} (default 2)")
    parser.add_argument("--costs", choices=sorted(PRESETS), default="paper",
                        help="time model: 'paper' (ABCI, 83 ms steps) or 'cpu' (this "
                             "project's 2-core machine, the 2x2 default)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH,
                        help=f"steps per epoch (default {STEPS_PER_EPOCH})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as for the job (e.g. runtime.relay_fanout=4)")
    parser.add_argument("--json", type=Path, help="write one record per seed here")
    parser.add_argument("--trace", type=Path, help="write every seed's event trace here")
    args = parser.parse_args(argv)
    try:
        args.grid_parsed = Grid.parse(args.grid)
    except ValueError as err:
        parser.error(f"--grid {args.grid!r}: {err}")
    try:
        first, _, last = args.seeds.partition("-")
        args.seed_range = range(int(first), int(last or first) + 1)
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give A-B, e.g. 0-999, or one seed")
    if not args.seed_range or args.faults_per_run < 0 or args.epochs < 1 \
            or args.steps_per_epoch < 1:
        parser.error("--seeds must be A-B with A <= B; --faults-per-run >= 0; "
                     "--epochs and --steps-per-epoch >= 1")
    return args


def replay_command(args: argparse.Namespace, seed: int) -> str:
    sets = "".join(f" --set {s}" for s in args.set)
    return (f"python -m flashtrain.sim --grid {args.grid} --seeds {seed} --faults-per-run "
            f"{args.faults_per_run} --costs {args.costs} --epochs {args.epochs} "
            f"--steps-per-epoch {args.steps_per_epoch}{sets} --trace seed{seed}.trace")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-len(ordered) * pct // 100) - 1))]


def summarize(records: list[SimRecord], bound: float) -> str:
    recoveries = [r["recovery_seconds"] for rec in records for r in rec.recoveries
                  if r["recovery_seconds"] is not None]
    redone = [r["failed_step"] - r["resume_step"] for rec in records for r in rec.recoveries
              if r["cause"] not in ("grow", "phase")]
    held = sum(rec.ok for rec in records)
    lines = [f"{len(records)} seed(s): every invariant held in {held}, "
             f"{len(records) - held} with a violation"]
    names = sorted({k for rec in records for k in rec.invariants})
    for name in names:
        checked = [rec.invariants[name] for rec in records if name in rec.invariants]
        lines.append(f"  {name:<32} held {sum(checked)}/{len(checked)}")
    if recoveries:
        lines.append(f"  re-forms {len(recoveries)}: recovery (virtual s) median "
                     f"{statistics.median(recoveries):.2f}, p90 {percentile(recoveries, 90):.2f}, max "
                     f"{max(recoveries):.2f} (bound {bound:.1f})")
    if redone:
        lines.append(f"  steps rolled back per loss: mean {statistics.mean(redone):.2f}, "
                     f"max {max(redone)}")
    ends = {}
    for rec in records:
        ends[rec.outcome.split(":")[0]] = ends.get(rec.outcome.split(":")[0], 0) + 1
    lines.append(f"  ends: {ends}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    costs = PRESETS[args.costs]
    grid = args.grid_parsed
    records, traces = [], []
    for seed in args.seed_range:
        record = run_seed(seed, grid, args.faults_per_run, costs, overrides=tuple(args.set),
                          epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
                          keep_trace=True)
        records.append(record)
        if args.trace:
            traces.append("\n".join(record.trace))
        if not record.ok:
            print("\n".join(record.trace[-60:]))
            print(f"seed {seed}: VIOLATED {'; '.join(record.violations)}")
            print(f"replay: {replay_command(args, seed)}")
        record.trace = []
    config, _ = sim_config(grid, tuple(args.set), args.epochs, args.steps_per_epoch)
    print(summarize(records, recovery_bound_s(config, costs, grid)))
    if args.trace:
        args.trace.write_text("\n".join(traces) + "\n")
    if args.json:
        args.json.write_text(json.dumps([r.as_json() for r in records], indent=1))
    return 0 if all(r.ok for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
