"""The GPU benchmark (``python -m flashtrain.bench throughput --gpu``) runs end to end on a
GPU: a smoke run with a small batch (the README's figures come from the default sizes)."""

from __future__ import annotations


def test_the_gpu_benchmark_runs(tmp_path):
    import json

    from flashtrain.bench import gpu_throughput

    out = tmp_path / "bench.json"
    assert gpu_throughput.main(["--gpu", "--batch", "32", "--steps", "3", "--warmup", "2",
                                "--loader-workers", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["images_per_sec"] > 0 for r in rows] == [True, True]
