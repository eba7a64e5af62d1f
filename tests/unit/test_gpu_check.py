"""How ``make gpu-check`` judges its parts (flashtrain.gpu_check): pytest's JUnit XML
and the benchmarks' exit, as they come out on a machine with and without a GPU."""

from __future__ import annotations

from flashtrain.gpu_check import NO_GPU, PartResult, format_table, judge_bench, judge_junit


def junit(*cases: str) -> str:
    return f"<testsuites><testsuite>{''.join(cases)}</testsuite></testsuites>"


PASSED = '<testcase name="test_a"/>'
FAILED = '<testcase name="test_b"><failure message="assert 1 == 2"/></testcase>'
NO_CUDA = ('<testcase name="test_c"><skipped message="needs a CUDA GPU: '
           'torch.cuda.device_count() is 0 here"/></testcase>')
UNPLACED = ('<testcase name="test_d"><skipped message="cannot place 2 ranks: Ray did not '
            'start them"/></testcase>')


def test_a_tier_without_cuda_is_no_gpu_not_a_failure():
    assert judge_junit(junit(NO_CUDA, NO_CUDA), 0)[0] == NO_GPU


def test_a_failure_or_a_skip_for_another_reason_fails_the_part():
    assert judge_junit(junit(PASSED, FAILED), 1)[0] == "failed"
    status, detail = judge_junit(junit(PASSED, UNPLACED), 0)
    assert status == "failed" and "cannot place 2 ranks" in detail
    assert judge_junit(junit(PASSED, PASSED), 0) == ("ok", "2 passed, 0 failed, 0 skipped, 0 no GPU")


def test_a_benchmark_without_cuda_is_no_gpu_and_any_other_exit_fails():
    said = "flashtrain.bench: throughput --gpu needs a CUDA GPU, and this machine has none"
    assert judge_bench(2, said)[0] == NO_GPU
    assert judge_bench(2, "usage: error: unrecognized arguments")[0] == "failed"
    assert judge_bench(1, "Traceback ...")[0] == "failed"
    assert judge_bench(0, "ratio 1.1")[0] == "ok"


def test_the_table_fails_only_on_bad_parts():
    rows = [PartResult("environment", NO_GPU, 1.0, "driver none"),
            PartResult("AMP on GPU", "timeout", 120.0, "over 120 s")]
    table = format_table(rows)
    assert table.splitlines()[-1].startswith("gpu-check: FAILED: AMP on GPU")
    assert format_table(rows[:1]).splitlines()[-1].startswith("gpu-check: passed")
