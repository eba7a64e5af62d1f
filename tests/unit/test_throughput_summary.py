"""``bench throughput``'s summary of interleaved rounds (flashtrain/bench/throughput.py
``summarize``), on run records of known speeds; the real smoke of one round of each
system is tests/integration/test_bench_tools.py."""

from __future__ import annotations

import pytest

from flashtrain.bench.throughput import PEER, summarize


def run(system: str, repeat: int, images_per_sec: float, **split) -> dict:
    return {"system": system, "workers": 2, "repeat": repeat, "grid": "1x2",
            "images_per_sec": images_per_sec, "step_s": 16 / images_per_sec, **split}


def test_rounds_give_median_min_max_and_the_ratio_of_each_round():
    # A B A B A B, as the benchmark interleaves them; the peer slows in round 1.
    runs = []
    for repeat, (mine, peer) in enumerate([(80.0, 70.0), (60.0, 50.0), (75.0, 80.0)]):
        runs.append(run("flashtrain_torus", repeat, mine, compute_s=0.1 * (repeat + 1),
                        comm_exposed_s=0.01, comm_exposed_share=0.05, data_wait_s=0.0))
        runs.append(run(PEER, repeat, peer))
    rows = {row["system"]: row for row in summarize(runs)}
    torus, peer = rows["flashtrain_torus"], rows[PEER]
    assert (torus["repeats"], torus["images_per_sec"], torus["images_per_sec_min"],
            torus["images_per_sec_max"]) == (3, 75.0, 60.0, 80.0)
    assert (peer["images_per_sec"], peer["images_per_sec_min"], peer["images_per_sec_max"]) == \
        (70.0, 50.0, 80.0)
    assert torus["step_s"] == pytest.approx(16 / 75.0) and torus["compute_s"] == pytest.approx(0.2)
    # The ratio of the medians, and each round's own ratio (the pairs that shared a load).
    assert torus["vs_peer"] == pytest.approx(75.0 / 70.0) and peer["vs_peer"] == 1.0
    assert torus["vs_peer_rounds"] == pytest.approx([80 / 70, 60 / 50, 75 / 80])
    assert "compute_s" not in peer  # the peer's loop has no split to report


def test_without_a_peer_there_is_no_ratio():
    rows = summarize([run("flashtrain_torus", 0, 50.0), run("flashtrain_flat", 0, 40.0)])
    assert [row["vs_peer"] for row in rows] == [None, None]
