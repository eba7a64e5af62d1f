"""``python -m flashtrain.bench data`` end to end at a tiny size: real JPEGs, both loaders,
the JSON it writes; ``--decode gpu`` without CUDA says so with status 2."""

from __future__ import annotations

import json

import pytest
import torch

from flashtrain.bench import data as bench_data

TINY = ["--batch", "4", "--loader-workers", "0", "--epochs", "1", "--repeats", "1",
        "--image-size", "32"]


def test_both_loaders_deliver_every_image_of_an_existing_folder(tmp_path, capsys):
    root = bench_data.make_jpegs(tmp_path / "imagenet", 10, 2)
    assert len(list((root / "train").rglob("*.JPEG"))) == 10
    out = tmp_path / "data.json"
    assert bench_data.main([*TINY, "--root", str(root), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["images"] == 10
    names = [row["loader"] for row in report["results"]]
    assert names == ["flashtrain", "plain", "ratio flashtrain/plain"]
    for row in report["results"][:2]:
        assert row["images_per_sec"] > 0 and row["per_core_min"] <= row["per_core_median"]
    assert "ratio flashtrain/plain" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU machine")
def test_gpu_decode_without_a_gpu_says_so(capsys):
    assert bench_data.main([*TINY, "--decode", "gpu"]) == bench_data.EXIT_NO_GPU
    assert "no GPU" in capsys.readouterr().err
