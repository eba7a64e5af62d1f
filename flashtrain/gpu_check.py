"""``make gpu-check`` (``python -m flashtrain.gpu_check``): everything a person holding a
GPU machine for ten minutes should run, from a fresh clone, in one command.

Parts, each in a process of its own under a timeout (the sum stays under ten minutes):

1. the environment: driver, CUDA, NCCL, GPUs, compute modes, /dev/shm, and what the GPU
   stack's preflight (:mod:`flashtrain.preflight`) says of them;
2. the GPU tier: flashtrain's NCCL backend with its multi-rank cases (tests/gpu);
3. AMP and channels-last on the GPU, one and two ranks (tests/gpu/test_amp_gpu.py);
4. ``bench throughput --gpu``, shortened;
5. ``bench data --decode gpu``, shortened.

It ends with one table and exits non-zero when a part failed, timed out, or skipped a
test for a reason other than "no GPU". On a machine without a GPU every GPU part says
"no GPU" and the exit status is 0: the command itself is checked on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path

NO_GPU = "no GPU"
NO_GPU_SIGN = "needs a CUDA GPU"  # the GPU tier's skip reason where CUDA is absent (conftest)
BENCH_NO_GPU_EXIT = 2  # both GPU benchmarks exit with it where CUDA is absent
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PartResult:
    """One row of the closing table: ``status`` is ok, failed, timeout or no GPU."""

    part: str
    status: str
    seconds: float
    detail: str

    @property
    def bad(self) -> bool:
        return self.status not in ("ok", NO_GPU)


def judge_junit(xml_text: str, returncode: int) -> tuple[str, str]:
    """(status, detail) of a pytest run from its JUnit XML: failed on any failure or error,
    or on a skip whose reason is not "no GPU"; no GPU when every test skipped for that."""
    root = ElementTree.fromstring(xml_text)
    passed = failed = no_gpu = 0
    other_skips: list[str] = []
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif (skip := case.find("skipped")) is not None:
            reason = skip.get("message", "")
            if NO_GPU_SIGN in reason:
                no_gpu += 1
            else:
                other_skips.append(f"{name}: {reason[:160]}")
        else:
            passed += 1
    counts = f"{passed} passed, {failed} failed, {len(other_skips)} skipped, {no_gpu} no GPU"
    if failed or other_skips or (returncode not in (0, 5) and not passed + no_gpu):
        return "failed", "; ".join([counts, *other_skips[:3]])
    if no_gpu and not passed:
        return NO_GPU, counts
    return "ok", counts


def judge_bench(returncode: int, output: str) -> tuple[str, str]:
    """(status, detail) of a GPU benchmark: its last line; no GPU where it said so."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    last = lines[-1][:200] if lines else ""
    text = output.lower()
    if returncode == BENCH_NO_GPU_EXIT and ("no gpu" in text or NO_GPU_SIGN.lower() in text):
        return NO_GPU, last
    return ("ok" if returncode == 0 else "failed"), last


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _run(command: list[str], timeout_s: float, log: Path) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, output, seconds); the output also goes to ``log``."""
    began = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        output = "".join(part.decode() if isinstance(part, bytes) else (part or "")
                         for part in (exc.stdout, exc.stderr))
    log.write_text(output)
    return code, output, time.monotonic() - began


def environment_part() -> PartResult:
    began = time.monotonic()
    import torch

    from flashtrain.preflight import gpu_stack_problems, probe_gpu_stack

    stack = probe_gpu_stack()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
    shm = "?" if stack.shm_free_bytes is None else f"{stack.shm_free_bytes / 2**30:.1f} GiB"
    report = (f"driver {stack.driver_version or 'none'}, torch {torch.__version__} (CUDA "
              f"{torch.version.cuda}), NCCL {nccl}, GPUs {list(stack.gpu_names) or 'none'}, "
              f"compute modes {list(stack.compute_modes) or '-'}, /dev/shm free {shm}")
    print(f"environment: {report}")
    problems = gpu_stack_problems(stack, torch.version.cuda, torch.__version__, 2, 0)
    if problems:
        return PartResult("environment", "failed", time.monotonic() - began,
                          "; ".join(problems))
    status = "ok" if torch.cuda.is_available() else NO_GPU
    return PartResult("environment", status, time.monotonic() - began, report)


def pytest_part(name: str, paths: list[str], timeout_s: float, logs: Path) -> PartResult:
    log, junit = logs / f"{_slug(name)}.log", logs / f"{_slug(name)}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *paths]
    code, _output, seconds = _run(command, timeout_s, log)
    if code is None:
        return PartResult(name, "timeout", seconds, f"over {timeout_s:g} s; log {log}")
    if not junit.exists():
        return PartResult(name, "failed", seconds, f"pytest exited {code}; log {log}")
    status, detail = judge_junit(junit.read_text(), code)
    return PartResult(name, status, seconds, detail)


def bench_part(name: str, args: list[str], timeout_s: float, logs: Path) -> PartResult:
    command = [sys.executable, "-m", "flashtrain.bench", *args]
    log = logs / f"{_slug(name)}.log"
    code, output, seconds = _run(command, timeout_s, log)
    if code is None:
        return PartResult(name, "timeout", seconds, f"over {timeout_s:g} s; log {log}")
    status, detail = judge_bench(code, output)
    return PartResult(name, status, seconds, detail)


def format_table(results: list[PartResult]) -> str:
    lines = [f"{'part':<25}{'status':<9}{'seconds':>8}  detail"]
    lines += [f"{r.part:<25}{r.status:<9}{r.seconds:>8.1f}  {r.detail}" for r in results]
    bad = [r.part for r in results if r.bad]
    lines.append(f"gpu-check: {'FAILED: ' + ', '.join(bad) if bad else 'passed'} "
                 f"({sum(r.status == NO_GPU for r in results)} part(s) not reached: no GPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashtrain.gpu_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", help="folder for each part's log (default: a new temp one)")
    parser.add_argument("--json", help="write the table to this file")
    args = parser.parse_args(argv)
    logs = Path(args.logs or tempfile.mkdtemp(prefix="flashtrain-gpu-check-"))
    logs.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONPATH", str(REPO))
    results = [environment_part()]
    steps = [
        lambda: pytest_part("gpu tier (NCCL)", ["tests/gpu/test_nccl_backend.py",
                                                "tests/gpu/test_throughput_gpu.py"], 210, logs),
        lambda: pytest_part("AMP on GPU", ["tests/gpu/test_amp_gpu.py"], 120, logs),
        lambda: bench_part("bench throughput --gpu", ["throughput", "--gpu", "--batch", "64",
                                                      "--steps", "8", "--warmup", "3"], 110, logs),
        lambda: bench_part("bench data --decode gpu", ["data", "--decode", "gpu", "--images",
                                                       "256", "--epochs", "1", "--repeats", "1",
                                                       "--loader-workers", "4"], 80, logs),
    ]
    for step in steps:
        results.append(step())
        print(f"{results[-1].part}: {results[-1].status}", flush=True)
    print(format_table(results))
    print(f"logs: {logs}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 1 if any(r.bad for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
