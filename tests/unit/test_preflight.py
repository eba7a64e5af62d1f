"""The checks made before a job starts (flashtrain.preflight, flashtrain.connect's address
choice): on temporary folders and local sockets, no Ray."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from flashtrain.config import DataConfig, RuntimeConfig, load_config
from flashtrain.connect import choose_address, host_and_port, why_unreachable
from flashtrain.preflight import (
    PreflightError,
    capacity_shortfall,
    check_data,
    check_image_folders,
    check_model,
    initial_num_workers,
)


def make_tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """``layout``: split -> class -> number of (empty, never decoded) .JPEG files."""
    for split, classes in layout.items():
        for name, num_files in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(num_files):
                (folder / f"{name}_{index}.JPEG").write_bytes(b"")
    return root


GOOD = {"train": {"cat": 2, "dog": 1}, "val": {"cat": 1, "dog": 1}}


def test_a_complete_tree_passes(tmp_path):
    check_image_folders(make_tree(tmp_path / "data", GOOD))
    check_data(DataConfig(source="imagefolder", root=str(tmp_path / "data")))


def test_images_in_nested_folders_count_as_torchvision_finds_them(tmp_path):
    root = make_tree(tmp_path / "data", {"train": {"cat": 0}, "val": {"cat": 1}})
    (root / "train" / "cat" / "2018").mkdir()
    (root / "train" / "cat" / "2018" / "a.png").write_bytes(b"")
    check_image_folders(root)


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(PreflightError, match=rf"data.root {tmp_path / 'nope'} does not exist"):
        check_image_folders(tmp_path / "nope")


def test_a_file_as_root_is_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match="is not a folder"):
        check_image_folders(tmp_path / "file")


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_folder(tmp_path, missing):
    layout = {split: classes for split, classes in GOOD.items() if split != missing}
    root = make_tree(tmp_path / "data", layout)
    with pytest.raises(PreflightError, match=rf"has no {missing}/ folder"):
        check_image_folders(root)


def test_a_split_without_class_folders(tmp_path):
    root = make_tree(tmp_path / "data", {"val": {"cat": 1}})
    (root / "train").mkdir()
    (root / "train" / "loose.JPEG").write_bytes(b"")
    with pytest.raises(PreflightError, match=r"train holds no class folders"):
        check_image_folders(root)


def test_an_empty_class_folder_is_named(tmp_path):
    root = make_tree(tmp_path / "data", {"train": {"cat": 1, "dog": 0}, "val": {"cat": 1, "dog": 1}})
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(PreflightError) as caught:
        check_image_folders(root)
    message = str(caught.value)
    assert f"class folder {root / 'train' / 'dog'} holds no image files" in message
    assert "add images to it, or remove it" in message


def test_a_class_mismatch_names_both_sides(tmp_path):
    root = make_tree(tmp_path / "data", {"train": {"cat": 1, "dog": 1}, "val": {"cat": 1, "eel": 1}})
    with pytest.raises(PreflightError) as caught:
        check_image_folders(root)
    assert "only in train: ['dog'], only in val: ['eel']" in str(caught.value)


def test_digits_and_synthetic_need_no_files(tmp_path):
    check_data(DataConfig(source="digits", root=str(tmp_path / "not-yet")))
    check_data(DataConfig(source="synthetic"))


def test_known_models_pass():
    for name in ("resnet50", "tiny_cnn", "vit_b_16"):
        check_model(name)


def test_unknown_model_lists_the_known_names():
    with pytest.raises(PreflightError) as caught:
        check_model("resnet5000")
    message = str(caught.value)
    assert message.startswith("model.name='resnet5000' is not a known model (did you mean 'resnet50'")
    assert "tiny_cnn" in message and "resnet18" in message and "vit_b_16" in message
    with pytest.raises(PreflightError, match="is not a known model"):
        check_model("fasterrcnn_resnet50_fpn")  # torchvision's, but not a classifier


def test_shortfall_of_gpus_says_asked_and_present():
    message = capacity_shortfall({"CPU": 0.5, "GPU": 1.0}, 4, [{"CPU": 2.0}])
    assert "4 worker(s) of 0.5 CPU, 1 GPU each (2 CPU and 4 GPU in all)" in message
    assert "1 node(s) have 2 CPU and 0 GPU, room for 0" in message
    assert "set grid.use_gpu=false" in message


def test_shortfall_counts_per_node_room():
    assert capacity_shortfall({"CPU": 0.5}, 4, [{"CPU": 2.0}]) is None
    assert capacity_shortfall({"CPU": 0.1}, 3, [{"CPU": 0.3}]) is None  # no float rounding loss
    assert capacity_shortfall({"CPU": 1.0}, 4, [{"CPU": 2.0}, {"CPU": 2.0}]) is None
    spans = capacity_shortfall({"CPU": 3.0}, 2, [{"CPU": 2.0}] * 3)
    assert "room for 0" in spans and "one worker cannot span nodes" in spans
    few = capacity_shortfall({"CPU": 1.0}, 8, [{"CPU": 2.0}, {"CPU": 3.0}])
    assert "room for 5" in few and "at most 5 worker(s)" in few


def test_initial_workers_follow_the_first_grid():
    assert initial_num_workers(load_config()) == 4
    assert initial_num_workers(load_config(None, ["grid.shape=auto"])) == 1
    first_phase = ["schedule.phases=[{start_epoch: 0, global_batch: 64, grid: 3x1}]"]
    assert initial_num_workers(load_config(None, first_phase)) == 3


# ------------------------------------------------------------------------- addresses


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_host_and_port_forms():
    assert host_and_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert host_and_port("ray://head:10001") == ("head", 10001)
    assert host_and_port("[::1]:6379") == ("::1", 6379)
    with pytest.raises(PreflightError, match="is not HOST:PORT"):
        host_and_port("head")


def test_probe_tells_a_listener_from_nothing():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert why_unreachable(f"127.0.0.1:{server.getsockname()[1]}", 2.0) is None
    assert "refused" in why_unreachable(f"127.0.0.1:{free_port()}", 2.0)


def test_an_explicit_address_that_does_not_answer_stops():
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(PreflightError) as caught:
        choose_address(RuntimeConfig(ray_address=address), env_address=None)
    assert str(caught.value).startswith(f"nothing answers at {address} (connection refused): "
                                        "is the head running?")
    assert "fix runtime.ray_address" in str(caught.value)
    with pytest.raises(PreflightError, match="fix the RAY_ADDRESS environment variable"):
        choose_address(RuntimeConfig(), env_address=address)


def test_local_needs_no_probe():
    assert choose_address(RuntimeConfig(ray_address="local"), env_address="127.0.0.1:1") == "local"


# ------------------------------------------------------------------ GPU (on this CPU host)


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_present(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("backend", ["flashtrain", "ray_nccl"])
def test_a_worker_without_cuda_is_told_the_fix(backend):
    from flashtrain.preflight import check_gpu_collectives

    with pytest.raises(PreflightError) as err:
        check_gpu_collectives(backend)
    message = str(err.value)
    assert "no CUDA device" in message and "grid.use_gpu=false" in message
    assert "Backend NCCL not registered" not in message


def test_ray_nccl_without_cupy_names_the_matching_build():
    import importlib.util

    import torch

    from flashtrain.preflight import ray_nccl_problem, torch_cuda_major

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed here")
    message = ray_nccl_problem("torch (test)")
    assert f"cupy-cuda{torch_cuda_major()}x" in message
    assert "flashtrain[gpu]" in message and "collective.gpu_backend=flashtrain" in message
    assert torch_cuda_major() == int(torch.version.cuda.split(".")[0])


def test_the_driver_checks_the_gpu_install_before_starting():
    import importlib.util

    from flashtrain.preflight import check_before_start

    gpu = ["grid.use_gpu=true", "model.name=tiny_cnn", "data.source=synthetic"]
    check_before_start(load_config(None, gpu))  # a CUDA build of torch has NCCL
    if importlib.util.find_spec("cupy") is None:
        with pytest.raises(PreflightError, match="cupy"):
            check_before_start(load_config(None, [*gpu, "collective.gpu_backend=ray_nccl"]))


def test_the_gpu_backend_is_checked_by_the_config():
    from flashtrain.config import ConfigError

    assert load_config(None, []).collective.gpu_backend == "flashtrain"
    with pytest.raises(ConfigError, match="gpu_backend"):
        load_config(None, ["collective.gpu_backend=cupy"])
