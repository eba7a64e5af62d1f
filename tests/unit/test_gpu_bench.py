"""``python -m flashtrain.bench throughput --gpu`` on a machine without CUDA: one clear
message and a non-zero exit, before Ray or a model is started."""

from __future__ import annotations

import pytest
import torch

from flashtrain.bench import gpu_throughput


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2(capsys):
    from flashtrain.bench.throughput import main

    assert main(["--gpu", "--steps", "2"]) == gpu_throughput.EXIT_NO_GPU
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "leave out --gpu" in err


def test_the_worker_side_is_the_issue_s_configuration():
    from flashtrain.config import load_config

    args = gpu_throughput.parse_args(["--gpu", "--batch", "64", "--steps", "5", "--warmup", "2"])
    config = load_config(None, gpu_throughput.worker_overrides(args))
    assert (config.grid.shape, config.grid.use_gpu) == ("1x1", True)
    assert (config.model.name, config.model.precision, config.model.channels_last) == \
        ("resnet50", "fp16", True)
    assert config.data.image_size == 224 and config.data.synthetic_classes == 1000
    assert config.data.synthetic_samples > 64 * 7  # the timed steps never reach an epoch end
