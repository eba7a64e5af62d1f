"""``python -m flashtrain.bench costmodel``: the cost model of :mod:`flashtrain.costmodel`
predicting ResNet-50 on ABCI next to the paper's figures, with and without overlap of the
all-reduce and the backward pass.

Two bases for the V100's compute per step are printed: the effective step time that
the paper's own 224 s implies (calibrated; the 2,176-GPU time then equals 224 s by
construction, and the 1,088-GPU efficiency is the prediction), and a public V100
benchmark rate (both are named assumptions with sources, listed first).

``--fit FILE`` (repeatable) fits this machine's constants from ``bench allreduce --json``
(alpha/beta of its link) and ``bench throughput --json`` (compute seconds per image) and,
given both, checks the model against the throughput run's measured gradient sync.
``--profile-backward`` measures the backward profile on this CPU and writes the table the
model reads (``flashtrain/costmodel_profile.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from flashtrain.costmodel import (
    ABCI,
    ASSUMPTIONS,
    PAPER,
    PROFILE_PATH,
    Cluster,
    Link,
    StepModel,
    allreduce_time,
    calibrate_compute,
    fit_compute_from_throughput_json,
    fit_from_bench_json,
    load_profile,
    predict_abci,
    read_bench_json,
    throughput_grid_runs,
)
from flashtrain.topology import Grid

GPU_COUNTS = (1088, 2176, 3456)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench costmodel",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="append", default=[], metavar="FILE",
                        help="bench allreduce or bench throughput --json file (repeatable)")
    parser.add_argument("--bucket-mb", type=float, default=ASSUMPTIONS["bucket_mb"].value,
                        help="gradient bucket size in MiB of fp32 gradients (default %(default)g)")
    parser.add_argument("--profile", default=str(PROFILE_PATH), help="backward profile JSON")
    parser.add_argument("--profile-backward", action="store_true",
                        help="measure the backward profile on this CPU and write --profile")
    parser.add_argument("--profile-batch", type=int, default=8)
    parser.add_argument("--profile-iters", type=int, default=3)
    parser.add_argument("--json", help="write predictions, assumptions and fits here")
    args = parser.parse_args(argv)
    if args.bucket_mb <= 0:
        parser.error(f"--bucket-mb {args.bucket_mb:g}: must be > 0")
    for path in args.fit:
        try:
            read_bench_json(path)
        except ValueError as err:
            parser.error(f"--fit {err}")
    return args


def format_assumptions() -> str:
    lines = ["assumptions (not measurable here; see flashtrain/costmodel.py):"]
    for a in ASSUMPTIONS.values():
        lines.append(f"  {a.name} = {a.value:.4g} {a.unit}: {a.source}")
    return "\n".join(lines)


def format_predictions(title: str, predictions: list[dict]) -> str:
    lines = [title,
             f"{'GPUs':>6}{'grid':>7}{'bkts':>5}{'torus ms':>9}{'exposed':>8}"
             f"{'eff torus':>10}{'(no ovl)':>9}{'eff ring':>9}{'eff hier':>9}"
             f"{'90 ep s':>8}{'(no ovl)':>9}  paper"]
    for p in predictions:
        a = p["algorithms"]
        t = a["torus"]
        paper = ", ".join(f"{k}={v}" for k, v in p["paper"].items()) or "-"
        lines.append(f"{p['gpus']:>6}{p['grid']:>7}{t['num_buckets']:>5}{t['allreduce_s'] * 1e3:>9.1f}"
                     f"{t['exposed_s'] * 1e3:>8.1f}{t['efficiency']:>10.1%}"
                     f"{t['efficiency_no_overlap']:>9.1%}{a['ring']['efficiency']:>9.1%}"
                     f"{a['hierarchical']['efficiency']:>9.1%}"
                     f"{p['train_seconds_torus']['overlap']:>8.0f}"
                     f"{p['train_seconds_torus']['no_overlap']:>9.0f}  {paper}")
    return "\n".join(lines)


def abci_report(profile, model: StepModel) -> dict:
    """Predictions under both compute bases."""
    calibrated = calibrate_compute(ABCI, profile, model)
    bases = {"paper_calibrated": replace(model, compute_s=calibrated), "v100_benchmark": model}
    return {name: {"step_compute_s": m.compute_s,
                   "predictions": [predict_abci(g, ABCI, profile, m) for g in GPU_COUNTS]}
            for name, m in bases.items()}


def sensitivity(profile, model: StepModel) -> list[dict]:
    """The 1,088-GPU torus efficiency when one input changes (compute recalibrated to the
    paper's 224 s each time, except where the compute basis is what changes): which
    inputs carry the result."""
    def efficiency(cluster: Cluster, step: StepModel, calibrate: bool = True) -> dict:
        if calibrate:
            step = replace(step, compute_s=calibrate_compute(cluster, profile, step))
        torus = predict_abci(1088, cluster, profile, step)["algorithms"]["torus"]
        return {"efficiency_1088": torus["efficiency"], "step_compute_s": step.compute_s}

    no_plateau = replace(ABCI, intra=Link(ABCI.intra.alpha / 1.9, ABCI.intra.beta),
                         inter=Link(ABCI.inter.alpha / 1.9, ABCI.inter.beta))
    slow_ib = replace(ABCI, inter=Link(ABCI.inter.alpha, ABCI.inter.beta * 2))
    cases = [("shipped: calibrated compute, NCCL latencies, 64 MiB buckets", ABCI, model, True),
             ("compute from the V100 benchmark instead of the paper's 224 s", ABCI, model, False),
             ("NCCL latencies without the 1.9 plateau factor", no_plateau, model, True),
             ("inter-node bandwidth halved (5 GB/s per flow)", slow_ib, model, True),
             ("25 MiB buckets (the default config's)", ABCI,
              replace(model, bucket_bytes=25 * 2**20), True),
             ("one bucket (no overlap possible)", ABCI, replace(model, bucket_bytes=2**40), True)]
    return [{"case": name, **efficiency(cluster, step, calibrate)}
            for name, cluster, step, calibrate in cases]


def local_check(link, compute: dict, throughput_path: str) -> list[dict]:
    """The model with this machine's fitted constants against the sync time each grid run
    of the throughput file measured (every link is the same loopback: intra = inter)."""
    from flashtrain.plan import count_parameters

    with open(throughput_path) as handle:
        data = json.load(handle)
    params = count_parameters(data["meta"]["model"], 10)  # bench throughput's 10 classes
    names = {"flat": "ring", "torus": "torus", "hierarchical": "hierarchical"}
    rows = []
    for r in throughput_grid_runs(data):
        if r["algo"] not in names:
            continue
        grid = Grid.parse(r["grid"])
        cluster = Cluster(intra=link, inter=link, workers_per_node=grid.cols,
                          inter_links_per_node=grid.cols)
        predicted = allreduce_time(names[r["algo"]], params * 4, grid.cols, grid.rows, cluster)
        rows.append({"algo": r["algo"], "grid": r["grid"], "repeat": r.get("repeat"),
                     "measured_sync_s": r["sync_s"], "predicted_sync_s": predicted,
                     "measured_compute_s": r["compute_s"],
                     "predicted_compute_s": compute["seconds_per_image"]
                     * r["global_batch"] / grid.num_workers})
    return rows


def run_fits(paths: list[str]) -> dict:
    fits: dict = {}
    for path in paths:
        kind = read_bench_json(path)
        if kind == "allreduce":
            link, n = fit_from_bench_json(path)
            fits["link"] = {"file": path, "num_workers": n, **asdict(link)}
            print(f"fitted from {path} ({n} workers, flat ring): alpha = {link.alpha * 1e6:.1f} us, "
                  f"beta = {link.beta * 1e9:.3f} s/GB ({1 / link.beta / 1e9:.2f} GB/s)")
        else:
            fits["compute"] = {"file": path, **fit_compute_from_throughput_json(path)}
            c = fits["compute"]
            print(f"fitted from {path} ({c['model']}, {c['num_workers']} workers): compute "
                  f"{c['seconds_per_image'] * 1e3:.2f} ms per image per worker")
    if "link" in fits and "compute" in fits:
        link = Link(fits["link"]["alpha"], fits["link"]["beta"])
        fits["check"] = local_check(link, fits["compute"], fits["compute"]["file"])
        print("this machine, fitted constants vs the throughput run (no overlap):")
        for row in fits["check"]:
            print(f"  {row['algo']:>13} {row['grid']} round {row['repeat']}: sync predicted {row['predicted_sync_s'] * 1e3:.0f} ms, "
                  f"measured {row['measured_sync_s'] * 1e3:.0f} ms")
    return fits


def profile_backward(args: argparse.Namespace) -> int:
    from flashtrain.bench.backward_profile import measure, write

    profile = measure(batch=args.profile_batch, iters=args.profile_iters)
    write(profile, Path(args.profile))
    print(f"backward profile of {profile['model']} ({profile['measured_on']}): forward "
          f"{profile['forward_s']:.2f} s, backward {profile['backward_s']:.2f} s; wrote {args.profile}")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.profile_backward:
        return profile_backward(args)
    try:
        profile = load_profile(args.profile)
    except FileNotFoundError as err:
        print(f"python -m flashtrain.bench costmodel: error: {err}", file=sys.stderr)
        return 2
    output: dict = {"assumptions": {k: asdict(a) for k, a in ASSUMPTIONS.items()},
                    "profile": {"source": profile.source, "backward_share": profile.backward_share}}
    print(format_assumptions())
    print(f"backward profile: {profile.source}; backward = {profile.backward_share:.0%} of "
          "forward + backward")
    if args.fit:
        output["fit"] = run_fits(args.fit)
    model = StepModel(bucket_bytes=args.bucket_mb * 2**20)
    output["abci"] = abci_report(profile, model)
    for name, title in (("paper_calibrated", "the effective V100 step time the paper's 224 s "
                         "implies; its 2,176-GPU time is 224 s by construction"),
                        ("v100_benchmark", "V100 benchmark compute rate")):
        base = output["abci"][name]
        print()
        print(format_predictions(
            f"ResNet-50 fp16, {args.bucket_mb:g} MiB buckets, 32 images per GPU; compute "
            f"{base['step_compute_s'] * 1e3:.1f} ms per step ({title}):", base["predictions"]))
    output["sensitivity"] = sensitivity(profile, model)
    print("\nwhich inputs carry the 1,088-GPU efficiency (torus, overlap; compute per step "
          "of 32 images,\nrecalibrated to 224 s unless the compute basis is what changes):")
    for row in output["sensitivity"]:
        print(f"  {row['efficiency_1088']:>7.2%}  compute {row['step_compute_s'] * 1e3:6.1f} ms  "
              f"{row['case']}")
    calibrated = output["abci"]["paper_calibrated"]["predictions"][0]["algorithms"]["torus"]
    print(f"\npaper: {PAPER[1088]['scaling_efficiency']:.2%} at 1,088 GPUs; model (calibrated "
          f"compute, torus, overlap): {calibrated['efficiency']:.2%} "
          f"(no overlap: {calibrated['efficiency_no_overlap']:.2%}). Top-1 (75.03%) is not "
          "something this model predicts.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(output, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
