"""``python -m flashtrain.bench chaos``: training under a seeded storm of faults.

Runs the real trainer on an emulated multi-node cluster (``ray.cluster_utils.Cluster``)
with worker kills (inside the all-reduce and inside commits), stalls, node removals and
node additions drawn from a seed, then checks the invariants a user relies on: the run
finishes, every sample of every epoch is trained on exactly once, redone steps equal
the rolled-back ones. Prints the re-forms and recovery-time statistics; exits non-zero
if an invariant breaks.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path


def fault_plan(seed: int, num_steps: int, num_faults: int) -> dict[str, list[int]]:
    """Fault kind -> global steps, spread over the run (at least 6 steps apart)."""
    rng = random.Random(seed)
    kinds = ["kill_worker_at_steps", "stall_worker_at_steps", "remove_node_at_steps",
             "add_node_at_steps"]
    slots = list(range(5, max(num_steps - 5, 6), 6))
    steps = sorted(rng.sample(slots, min(num_faults, len(slots))))
    plan: dict[str, list[int]] = {kind: [] for kind in kinds}
    for step in steps:
        plan[rng.choice(kinds)].append(step)
    return plan


def check_invariants(summary: dict, records: list[dict]) -> list[str]:
    """The broken invariants, as messages (empty when all hold)."""
    problems = []
    size = summary["dataset_train_size"]
    if any(count != size for count in summary["samples_per_epoch"]):
        problems.append(f"samples_per_epoch {summary['samples_per_epoch']} != {size} each")
    steps = [r for r in records if r["kind"] == "step"]
    done = {r["step"] for r in steps}
    if sorted(done) != list(range(summary["global_steps"])):
        problems.append("some global step never completed")
    rolled_back = sum(r["steps_rolled_back"] for r in summary["reforms"])
    if len(steps) - len(done) != rolled_back:
        problems.append(f"{len(steps) - len(done)} steps redone but {rolled_back} rolled back")
    return problems


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from flashtrain.config import load_config
    from flashtrain.train.trainer import Trainer

    plan = fault_plan(args.seed, args.steps_hint, args.faults)
    overrides = [
        "model.name=tiny_cnn", "grid.shape=2x2", "grid.cpus_per_worker=1",
        f"schedule.epochs={args.epochs}", "schedule.phases=[{start_epoch: 0, global_batch: 32}]",
        "schedule.base_lr=0.8", "runtime.progress=false", "collective.timeout_s=4",
        "elastic.commit_every_steps=3", f"runtime.local_nodes={args.nodes}",
        "checkpoint.every_steps=100000",
    ] + [f"faults.{kind}={steps}" for kind, steps in plan.items()]
    config = load_config(None, overrides)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.flashtrain_node_args = {"num_cpus": 2}
    for _ in range(args.nodes):
        cluster.add_node(**cluster.flashtrain_node_args)
    ray.init(address=cluster.address, log_to_driver=False)
    workdir = Path(tempfile.mkdtemp(prefix="flashtrain-chaos-"))
    run_dir = workdir / "run"
    run_dir.mkdir()
    trainer = Trainer(config, run_dir, workdir / "cache", say=print, cluster=cluster)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
        ray.shutdown()
        cluster.shutdown()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recoveries = [r["recovery_seconds"] for r in summary["reforms"]
                  if r["recovery_seconds"] is not None and r["cause"] not in ("grow", "phase")]
    return {"seed": args.seed, "faults": plan, "reforms": summary["reforms"],
            "recovery_seconds_median": statistics.median(recoveries) if recoveries else None,
            "recovery_seconds_max": max(recoveries) if recoveries else None,
            "final_top1": summary["final_top1"], "global_steps": summary["global_steps"],
            "samples_per_epoch": summary["samples_per_epoch"],
            "problems": check_invariants(summary, records), "run_dir": str(run_dir)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench chaos",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=6, help="how many faults to inject")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes of 2 workers")
    parser.add_argument("--steps-hint", type=int, default=150,
                        help="spread the faults over this many global steps")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"\n{'step':>6} {'cause':<36} {'grid':<12} {'rolled back':>11} {'recovery s':>10}")
    for reform in result["reforms"]:
        recovery = reform["recovery_seconds"]
        print(f"{reform['failed_step']:>6} {reform['cause'][:36]:<36} "
              f"{reform['old_grid'] + '>' + reform['new_grid']:<12} "
              f"{reform['steps_rolled_back']:>11} "
              f"{'-' if recovery is None else f'{recovery:.2f}':>10}")
    print(f"\nfaults: {result['faults']}")
    print(f"recovery median {result['recovery_seconds_median']}, max "
          f"{result['recovery_seconds_max']} s; final top-1 {result['final_top1']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if result["problems"]:
        print("INVARIANTS BROKEN:\n  " + "\n  ".join(result["problems"]))
        return 1
    print("invariants hold: every sample of every epoch exactly once")
    return 0
