"""``python -m flashtrain.bench costmodel``: the cost model of
:mod:`flashtrain.costmodel` (alpha-beta, intra- and inter-node links) predicting ring,
2D-torus and hierarchical all-reduce for ResNet-50 on ABCI next to the paper's reported
figures; ``--fit`` fits alpha/beta from a ``bench allreduce --json`` file first.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from flashtrain.costmodel import ABCI, STEP_COMPUTE_S, fit_from_bench_json, predict_abci


def format_predictions(predictions: list[dict]) -> str:
    lines = ["ResNet-50 fp16 gradients (51.2 MB) on ABCI (model assumptions in flashtrain/costmodel.py)",
             f"{'GPUs':>6}{'grid':>8}{'ring ms':>9}{'torus ms':>10}{'hier ms':>9}"
             f"{'eff ring':>10}{'eff torus':>10}{'eff hier':>10}{'90ep s':>8}  paper"]
    for p in predictions:
        t, e = p["allreduce_s"], p["scaling_efficiency"]
        paper = ", ".join(f"{k}={v}" for k, v in p["paper"].items()) or "-"
        lines.append(f"{p['gpus']:>6}{p['grid']:>8}{t['ring'] * 1e3:>9.1f}"
                     f"{t['torus'] * 1e3:>10.1f}{t['hierarchical'] * 1e3:>9.1f}"
                     f"{e['ring']:>10.1%}{e['torus']:>10.1%}{e['hierarchical']:>10.1%}"
                     f"{p['train_seconds_torus']:>8.0f}  {paper}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench costmodel")
    parser.add_argument("--fit", help="bench allreduce --json file to fit alpha/beta from")
    parser.add_argument("--json", help="write predictions (and the fit) to this file")
    args = parser.parse_args(argv)
    output: dict = {"assumptions": {"cluster": asdict(ABCI), "step_compute_s": STEP_COMPUTE_S}}
    if args.fit:
        link, n = fit_from_bench_json(args.fit)
        output["fit"] = {"num_workers": n, **asdict(link)}
        print(f"fitted from {args.fit} ({n} workers, flat ring): alpha = {link.alpha * 1e6:.1f} us,"
              f" beta = {link.beta * 1e9:.3f} s/GB ({1 / link.beta / 1e9:.2f} GB/s)")
    output["predictions"] = [predict_abci(g) for g in (1088, 2176, 3456)]
    print(format_predictions(output["predictions"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(output, handle, indent=2)
    return 0
