"""``python -m flashtrain.bench allreduce``: time flat / torus / hierarchical all-reduce.

Starts a local Ray instance with one actor per grid cell, joins the flashtrain gloo
groups (and, as the peer to beat, Ray's built-in gloo over the world group: row
``ray_gloo``), and prints per algorithm and size the median time over ``--iters``,
algbw = S/t and busbw = algbw * 2(n-1)/n (the nccl-tests definitions) and the time
ratio against ``flat``. ``--check`` verifies every result against an independent
float64 sum and exits 1 on a mismatch.

Given several sizes, it also names for each algorithm the smallest size whose busbw is
within ``--knee`` of the best it reached: the bucket size to choose (a smaller bucket
starts its all-reduce earlier in the backward; below the knee the per-call latency
dominates). ``collective.bucket_mb``'s default comes from this sweep (README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flashtrain.topology import Grid

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PEER = "ray_gloo"
UNPIPELINED = "torus_unpipelined"  # the torus's three phases one after the other
_PEER_GROUP = "bench-ray-gloo"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.bench allreduce",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Grid.parse, default=Grid(2, 2), help="RxC, e.g. 2x2")
    parser.add_argument("--elements", default="1000000",
                        help="comma-separated element counts, e.g. 1000000,25000000")
    parser.add_argument("--algos", default="flat,torus,hierarchical",
                        help=f"comma-separated algorithms; add {PEER} for Ray's built-in gloo, "
                        f"{UNPIPELINED} for the torus without its chunk pipeline")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per cell")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--no-peer", action="store_true", help=f"skip the {PEER} row")
    parser.add_argument("--check", action="store_true",
                        help="verify results against a float64 sum; exit 1 on mismatch")
    parser.add_argument("--knee", type=float, default=0.9,
                        help="bucket choice: smallest size within this fraction of the best busbw")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    args.elements = [int(n) for n in args.elements.split(",") if n]
    args.algos = [a for a in args.algos.split(",") if a]
    if not args.no_peer and PEER not in args.algos:
        args.algos.append(PEER)
    return args


def seeded_input(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(12345 + rank)
    return torch.randn(numel, generator=generator).to(dtype)


def _make_actor_class():
    import ray

    @ray.remote(num_cpus=0.25)
    class BenchWorker:
        """One grid cell: times all-reduces of its own buffer."""

        def __init__(self, grid: Grid, rank: int, timeout_s: float):
            torch.set_num_threads(1)
            from flashtrain.collective import register

            register()
            self.grid, self.rank, self.timeout_s = grid, rank, timeout_s

        def join(self, with_peer: bool) -> bool:
            import ray.util.collective as col

            from flashtrain.collective import join_grid

            self.comm = join_grid(self.grid, self.rank, 0, timeout_s=self.timeout_s,
                                  prefix="bench-")
            if with_peer:
                col.init_collective_group(self.grid.num_workers, self.rank, backend="gloo",
                                          group_name=_PEER_GROUP)
            return True

        def time(self, algo: str, numel: int, dtype_name: str, iters: int, warmup: int):
            source = seeded_input(self.rank, numel, DTYPES[dtype_name])
            buffer = source.clone()
            times = []
            for step in range(warmup + iters):
                buffer.copy_(source)  # refill outside the clock: sums would overflow
                self._reduce(algo, torch.zeros(1))  # line up the ranks before the clock
                start = time.perf_counter()
                self._reduce(algo, buffer)
                if step >= warmup:
                    times.append(time.perf_counter() - start)
            return times

        def check(self, algo: str, numel: int, dtype_name: str) -> dict:
            dtype = DTYPES[dtype_name]
            buffer = seeded_input(self.rank, numel, dtype)
            self._reduce(algo, buffer)
            inputs = [seeded_input(r, numel, dtype).double() for r in range(self.grid.num_workers)]
            expected = sum(inputs)
            bound = len(inputs) * torch.finfo(dtype).eps * sum(x.abs() for x in inputs) + 1e-6
            error = (buffer.double() - expected).abs()
            return {"ok": bool((error <= bound).all()), "max_error": float(error.max())}

        def _reduce(self, algo: str, buffer: torch.Tensor) -> None:
            if algo == PEER:
                import ray.util.collective as col

                col.allreduce(buffer, group_name=_PEER_GROUP)
            else:
                from flashtrain.collective import allreduce_

                if algo == UNPIPELINED:
                    allreduce_(buffer, self.comm, "torus", pipeline_chunks=1)
                else:
                    allreduce_(buffer, self.comm, algo)

    return BenchWorker


def measure(workers, args) -> list[dict]:
    """Time every (size, algorithm); one record per cell (slowest rank per iteration)."""
    import ray

    records = []
    n = args.grid.num_workers
    for numel in args.elements:
        for algo in args.algos:
            per_rank = ray.get([w.time.remote(algo, numel, args.dtype, args.iters, args.warmup)
                                for w in workers])
            per_iter = [max(ts) for ts in zip(*per_rank, strict=True)]
            seconds = statistics.median(per_iter)
            nbytes = numel * torch.finfo(DTYPES[args.dtype]).bits // 8
            algbw = nbytes / seconds / 1e9
            record = {"algo": algo, "elements": numel, "bytes": nbytes, "median_s": seconds,
                      "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (n - 1) / n if n > 1 else 0.0,
                      "times_s": per_iter}
            if args.check:
                checks = ray.get([w.check.remote(algo, numel, args.dtype) for w in workers])
                record["check_ok"] = all(c["ok"] for c in checks)
                record["max_error"] = max(c["max_error"] for c in checks)
            records.append(record)
    _add_ratios(records)
    return records


def _add_ratios(records: list[dict]) -> None:
    flat = {r["elements"]: r["median_s"] for r in records if r["algo"] == "flat"}
    for record in records:
        base = flat.get(record["elements"])
        record["vs_flat"] = record["median_s"] / base if base else None


def bucket_choice(records: list[dict], knee: float) -> dict[str, dict]:
    """Per algorithm (over at least two sizes): the smallest size whose busbw is at least
    ``knee`` times the best busbw of that algorithm."""
    choices = {}
    for algo in dict.fromkeys(r["algo"] for r in records):
        rows = sorted((r for r in records if r["algo"] == algo), key=lambda r: r["bytes"])
        if len(rows) < 2:
            continue
        best = max(r["busbw_GBps"] for r in rows)
        chosen = next(r for r in rows if r["busbw_GBps"] >= knee * best)
        choices[algo] = {"bytes": chosen["bytes"], "MiB": chosen["bytes"] / 2**20,
                         "busbw_GBps": chosen["busbw_GBps"], "best_busbw_GBps": best}
    return choices


def format_table(records: list[dict], args) -> str:
    header = (f"all-reduce on grid {args.grid} ({args.grid.num_workers} CPU actors), "
              f"{args.dtype}, median of {args.iters}")
    lines = [header, f"{'algo':<13}{'elements':>12}{'MB':>9}{'time ms':>10}"
                     f"{'algbw GB/s':>12}{'busbw GB/s':>12}{'vs flat':>9}{'check':>7}"]
    for r in records:
        ratio = f"{r['vs_flat']:.2f}x" if r["vs_flat"] else "-"
        check = {True: "ok", False: "FAIL"}.get(r.get("check_ok"), "-")
        lines.append(f"{r['algo']:<13}{r['elements']:>12}{r['bytes'] / 1e6:>9.1f}"
                     f"{r['median_s'] * 1e3:>10.2f}{r['algbw_GBps']:>12.3f}"
                     f"{r['busbw_GBps']:>12.3f}{ratio:>9}{check:>7}")
    for algo, choice in bucket_choice(records, args.knee).items():
        lines.append(f"{algo}: smallest size within {args.knee:.0%} of its best busbw "
                     f"({choice['best_busbw_GBps']:.3f} GB/s): {choice['MiB']:.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import os

    import ray

    args = parse_args(argv)
    n = args.grid.num_workers
    # address="local": always a fresh instance, never a cluster someone else started.
    ray.init(address="local", num_cpus=max(2, n), include_dashboard=False, log_to_driver=False)
    try:
        worker_cls = _make_actor_class()
        workers = [worker_cls.remote(args.grid, rank, args.timeout_s) for rank in range(n)]
        ray.get([w.join.remote(PEER in args.algos) for w in workers])
        records = measure(workers, args)
    finally:
        ray.shutdown()
    print(format_table(records, args))
    if args.json:
        meta = {"grid": str(args.grid), "dtype": args.dtype, "iters": args.iters,
                "cpu_count": os.cpu_count(), "num_workers": n}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "results": records,
                       "bucket_choice": bucket_choice(records, args.knee)}, handle, indent=2)
    failed = [r for r in records if r.get("check_ok") is False]
    return 1 if failed else 0
