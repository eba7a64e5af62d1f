"""What ``bench chaos`` checks after the run, and the report it prints.

The definitions (recovery, promised step, committed steps lost, redone, join times) are
in :mod:`flashtrain.bench.chaos`'s docstring.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path


def check_run(summary: dict | None, records: list[dict], outcomes: list, run_dir: Path,
              args) -> dict:
    """Every check of a finished run; ``problems`` lists the broken ones."""
    problems: list[str] = []
    reforms = [r for r in records if r.get("kind") == "reform"]
    joins = [{**n, "cause": r["cause"], "new_grid": r["new_grid"], "instance": r["_instance"]}
             for r in reforms for n in r.get("newcomers", [])]
    lost = sum(o.lost for o in outcomes)
    if lost:
        problems.append(f"{lost} committed step(s) lost: " + ", ".join(
            f"fault {o.index + 1} ({o.kind}) promised {o.promised_step}, resumed at "
            f"{o.resume_step}" for o in outcomes if o.lost))
    slow = [j for j in joins if j["short_s"] > args.join_bound_s]
    if slow:
        problems.append(f"{len(slow)} replacement(s) joined more than {args.join_bound_s:g}s "
                        "after the grid was short of them with room: "
                        + ", ".join(f"{j['short_s']:.1f}s" for j in slow))
    result = {"reforms": reforms, "joins": joins, "lost": lost,
              "faults_by_kind": dict(Counter(o.kind for o in outcomes)),
              "survived": sum(o.recovered for o in outcomes)}
    if summary is None:
        problems.append("no summary.json: the job did not finish")
        return {**result, "problems": problems}
    size = summary["dataset_train_size"]
    result["samples_per_epoch"] = summary["samples_per_epoch"]
    result["dataset_train_size"] = size
    result["final_top1"] = summary["final_top1"]
    if summary["samples_per_epoch"] != [size] * args.epochs:
        problems.append(f"samples_per_epoch {summary['samples_per_epoch']} != {size} for each "
                        f"of {args.epochs} epochs")
    problems += _check_steps(summary, records, reforms, outcomes)
    try:
        result["checkpoint"] = check_final_checkpoint(run_dir, summary, args.data_cache)
    except Exception as err:  # noqa: BLE001 - a failed load is a finding, not a crash
        problems.append(f"the final checkpoint does not load: {type(err).__name__}: {err}")
    else:
        if result["checkpoint"]["global_step"] != summary["global_steps"]:
            problems.append("the newest checkpoint is not the final one")
        if abs(result["checkpoint"]["top1"] - summary["final_top1"]) > 1.5 / result["checkpoint"]["count"]:
            problems.append(f"the final checkpoint scores top-1 {result['checkpoint']['top1']:.4f}, "
                            f"the run reported {summary['final_top1']:.4f}")
    return {**result, "problems": problems}


def _check_steps(summary: dict, records: list[dict], reforms: list[dict], outcomes: list) -> list[str]:
    steps = [r["step"] for r in records if r.get("kind") == "step"]
    done = set(steps)
    if done != set(range(summary["global_steps"])):
        missing = sorted(set(range(summary["global_steps"])) - done)[:10]
        return [f"some global steps never completed: {missing}"]
    rolled_back = sum(r["steps_rolled_back"] for r in reforms)
    restarted = sum(o.redone or 0 for o in outcomes if o.kind == "kill_driver")
    # Steps a failure ended inside a step window were trained and rolled back but never
    # recorded: their window_lost events count them.
    lost_in_windows = sum(r["failed_step"] - r["first_step"] for r in records
                          if r.get("name") == "window_lost")
    if len(steps) - len(done) + lost_in_windows != rolled_back + restarted:
        return [f"{len(steps) - len(done)} steps done twice and {lost_in_windows} lost inside "
                f"failed step windows, but re-forms rolled back {rolled_back} and driver "
                f"restarts redid {restarted}"]
    return []


def check_final_checkpoint(run_dir: Path, summary: dict, data_cache: str) -> dict:
    """Load the newest checkpoint's weights into a plain model of the run's architecture
    (torchvision's own class; flashtrain's builder for ``tiny_cnn``) and score it on the
    validation set, one process, no Ray."""
    import torch
    import torchvision

    from flashtrain.config import FlashtrainConfig
    from flashtrain.train.checkpoint import latest_checkpoint, load_checkpoint
    from flashtrain.train.data import build_datasets, make_val_loader
    from flashtrain.train.models import build_model

    path = latest_checkpoint(run_dir / "checkpoints")
    payload = load_checkpoint(path)
    name, num_classes = payload["model_name"], payload["num_classes"]
    if name == "tiny_cnn":
        model = build_model(name, num_classes, seed=0)
        loader = "flashtrain.train.models.build_model('tiny_cnn') (not a torchvision model)"
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        loader = f"torchvision.models.{name}(num_classes={num_classes})"
    model.load_state_dict(payload["model"])  # strict: every key, every shape
    model.eval()
    config = FlashtrainConfig.model_validate(payload["config"])
    val = build_datasets(config.data, Path(data_cache)).val
    correct = count = 0
    with torch.no_grad():
        for images, labels, _ in make_val_loader(val, 0, 1, 256):
            if len(labels):
                correct += int((model(images).argmax(1) == labels).sum())
                count += len(labels)
    return {"path": str(path), "global_step": payload["clock"]["global_step"], "loader": loader,
            "top1": correct / max(count, 1), "count": count}


# -- the report ------------------------------------------------------------------------------


def _num(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_report(result: dict) -> str:
    lines = [f"chaos: seed {result['seed']}, {result['model']}, {len(result['outcomes'])} faults "
             f"injected from outside, run dir {result['run_dir']}", "",
             f"{'#':>3} {'fault':<17}{'at s':>7}  {'victim':<22}{'grid':<10}{'recovery s':>11}"
             f"  {'promised':<15}{'resumed':>8}{'lost':>5}{'redone':>7}"]
    for o in result["outcomes"]:
        promised = f"{o['promise']} {_num(o['promised_step'], 'd')}" if o["kind"] != "add_node" else "-"
        grid = f"{o['grid_before']}>{o['grid_after']}" if o["grid_after"] != "-" else o["grid_before"]
        note = "  (restarted from checkpoint)" if o["restarted"] and o["kind"] != "kill_driver" else ""
        lines.append(f"{o['index'] + 1:>3} {o['kind']:<17}{o['time']:>7.1f}  {o['victim'][:21]:<22}"
                     f"{grid:<10}{_num(o['recovery_s']):>11}  {promised:<15}"
                     f"{_num(o['resume_step'], 'd'):>8}{o['lost']:>5}{_num(o['redone'], 'd'):>7}{note}")
    lines += ["", _joins_table(result["joins"]), ""]
    lines += _summary_lines(result)
    if result["problems"]:
        lines.append("PROBLEMS:\n  " + "\n  ".join(result["problems"]))
    else:
        lines.append("all checks hold")
    return "\n".join(lines)


def _joins_table(joins: list[dict]) -> str:
    if not joins:
        return "no worker joined a grid after the start"
    rows = [f"replacements and spares that joined a grid ({len(joins)}): seconds",
            f"{'driver':>6} {'requested at':>13}{'room after':>11}{'start':>7}{'short':>7}"
            f"{'request>join':>13}  joined"]
    for j in joins:
        rows.append(f"{j['instance']:>6} {j['requested_time']:>13.1f}{j['wait_for_room_s']:>11.1f}"
                    f"{j['start_s']:>7.1f}{j['short_s']:>7.1f}{j['request_to_join_s']:>13.1f}"
                    f"  {j['cause']} > {j['new_grid']}")
    return "\n".join(rows)


def _summary_lines(result: dict) -> list[str]:
    outcomes = result["outcomes"]
    by_kind = ", ".join(f"{k} {n}" for k, n in sorted(result["faults_by_kind"].items()))
    causes = Counter(r["cause"] for r in result["reforms"])
    recoveries = [o["recovery_s"] for o in outcomes if o["recovery_s"] is not None]
    shorts = [j["short_s"] for j in result["joins"]]
    lines = [f"faults injected: {len(outcomes)} ({by_kind}); survived "
             f"{result['survived']} of {len(outcomes)}",
             f"re-forms: {len(result['reforms'])} ("
             + ", ".join(f"{c} {n}" for c, n in sorted(causes.items())) + ")",
             f"committed steps lost: {result['lost']}"]
    if recoveries:
        lines.append(f"recovery s: median {statistics.median(recoveries):.2f}, max "
                     f"{max(recoveries):.2f} over {len(recoveries)} faults")
    for o in outcomes:
        if o["restarted"]:
            why = "driver killed" if o["kind"] == "kill_driver" else "every worker lost"
            lines.append(f"continued from durable checkpoint step {o['promised_step']} "
                         f"({why}, fault {o['index'] + 1}): resumed at step {o['resume_step']}, "
                         f"{o['redone']} step(s) redone, {o['recovery_s']:.1f}s")
    if shorts:
        lines.append(f"replacement joins: {len(shorts)}; grid short of one with room: median "
                     f"{statistics.median(shorts):.1f}s, max {max(shorts):.1f}s")
    if "samples_per_epoch" in result:
        exact = result["samples_per_epoch"] == [result["dataset_train_size"]] * len(
            result["samples_per_epoch"])
        lines.append(f"samples per epoch: {result['samples_per_epoch']} "
                     f"({'exactly' if exact else 'NOT'} {result['dataset_train_size']} each)")
    if "checkpoint" in result:
        ckpt = result["checkpoint"]
        lines.append(f"final checkpoint (step {ckpt['global_step']}) loads into {ckpt['loader']}: "
                     f"top-1 {ckpt['top1']:.4f} on {ckpt['count']} images (run reported "
                     f"{result['final_top1']:.4f})")
    return lines
