"""The GPU stack's preflight (flashtrain.preflight), judged on values recorded from real
nodes: nvidia-smi's CSV, driver branches against torch's CUDA, compute modes, /dev/shm."""

from __future__ import annotations

import pytest

from flashtrain.config import load_config
from flashtrain.preflight import (
    GpuStack,
    PreflightError,
    check_gpu_stack,
    compute_mode_problem,
    driver_problem,
    gpu_stack_problems,
    loader_shm_bytes,
    loader_shm_bytes_for,
    parse_nvidia_smi,
    probe_gpu_stack,
    shm_problem,
)

H100_NODE = ("580.65.06, NVIDIA H100 80GB HBM3, Default\n"
             "580.65.06, NVIDIA H100 80GB HBM3, Exclusive_Process\n")
OLD_DRIVER = "550.54.15, NVIDIA A100-SXM4-80GB, Default\n"


def test_nvidia_smi_csv_is_read_per_gpu():
    assert parse_nvidia_smi(H100_NODE) == (
        "580.65.06", ("NVIDIA H100 80GB HBM3",) * 2, ("Default", "Exclusive_Process"))
    assert parse_nvidia_smi("") == (None, (), ())


@pytest.mark.parametrize(("driver", "cuda", "ok"), [
    ("580.65.06", "13.0", True), ("590.1", "13.0", True), ("575.57.08", "13.0", False),
    ("550.54.15", "13.0", False), ("550.54.15", "12.8", True), ("470.1", "12.4", False),
])
def test_the_driver_branch_must_support_torchs_cuda(driver, cuda, ok):
    problem = driver_problem(driver, cuda, "2.14.1+cu130")
    assert (problem is None) == ok
    if not ok:
        assert driver in problem and "upgrade the driver" in problem


def test_unknown_versions_are_not_a_problem():
    assert driver_problem(None, "13.0", "2.14.1") is None  # no nvidia-smi: nothing to say
    assert driver_problem("550.1", None, "2.14.1+cpu") is None  # a CPU build of torch


def test_an_exclusive_gpu_refuses_a_second_rank_with_the_fix():
    modes = ("Default", "Exclusive_Process")
    assert compute_mode_problem(modes, 1) is None
    problem = compute_mode_problem(modes, 2)
    assert "GPU 1" in problem and "nvidia-smi -i 1 -c DEFAULT" in problem
    assert "Prohibited" in compute_mode_problem(("Prohibited",), 1)


def test_shared_memory_for_the_loaders_in_flight_batches():
    # 256 float32 images of 224 px, 8 loader processes, 8 GPUs: 2 batches in flight each
    need = loader_shm_bytes(256, 3 * 224 * 224 * 4, 8, 8)
    assert need == 256 * 602112 * 16 * 8
    docker_default = 64 * 2**20
    problem = shm_problem(docker_default, need)
    assert "/dev/shm has 64 MiB free" in problem and "--shm-size" in problem
    assert shm_problem(need, need) is None and shm_problem(None, need) is None
    assert loader_shm_bytes(256, 10, 0, 8) == 0  # no loader processes: no shared memory


def test_a_config_asks_for_its_largest_batch():
    config = load_config(None, ["grid.shape=1x2", "data.image_size=224", "data.loader_workers=4",
                                "schedule.phases=[{start_epoch: 0, global_batch: 64}, "
                                "{start_epoch: 1, global_batch: 512}]"])
    assert loader_shm_bytes_for(config) == 256 * 3 * 224 * 224 * 4 * 4 * 2


def test_one_message_names_every_problem():
    stack = GpuStack("550.54.15", ("A100",), ("Exclusive_Process",), 64 * 2**20)
    problems = gpu_stack_problems(stack, "13.0", "2.14.1+cu130", 2, 2**30)
    assert len(problems) == 3
    with pytest.raises(PreflightError) as err:
        check_gpu_stack(GpuStack(None, (), (), 64 * 2**20), 1, 2**30)
    assert str(err.value).startswith("the GPU stack cannot run this job: /dev/shm")


def test_the_probe_answers_on_a_machine_without_a_driver(tmp_path):
    stack = probe_gpu_stack(str(tmp_path))
    assert stack.shm_free_bytes is not None and stack.shm_free_bytes > 0
    assert probe_gpu_stack(str(tmp_path / "absent")).shm_free_bytes is None
