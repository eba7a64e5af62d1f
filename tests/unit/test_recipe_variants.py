"""``bench recipe``'s variants as job configurations (flashtrain/bench/recipe.py), read
back by the job's own config loader; the real smoke of a batch-size-control run is
tests/integration/test_bench_recipe.py."""

from __future__ import annotations

import pytest

from flashtrain.bench.recipe import aggregate, overrides, parse_args
from flashtrain.config import load_config


@pytest.fixture
def args():
    return parse_args(["--epochs", "4", "--switch-epoch", "2", "--small-batch", "32",
                       "--large-batch", "128", "--seeds", "2"])


def test_each_variant_is_its_batch_schedule_and_smoothing(args):
    variants = {v.name: v for v in args.variant_list}
    assert sorted(variants) == ["control", "control+ls", "large", "large+ls", "small", "small+ls"]

    def schedule(name: str):
        config = load_config(None, overrides(variants[name], 1, args))
        return ([(p.start_epoch, p.global_batch) for p in config.schedule.phases],
                config.schedule.label_smoothing, config.runtime.seed, config.schedule.epochs)

    assert schedule("small") == ([(0, 32)], 0.0, 1, 4)
    assert schedule("large+ls") == ([(0, 128)], 0.1, 1, 4)
    assert schedule("control+ls") == ([(0, 32), (2, 128)], 0.1, 1, 4)


def test_the_table_is_the_mean_and_spread_over_seeds(args):
    control = next(v for v in args.variant_list if v.name == "control")
    runs = [{"variant": "control", "top1": top1, "wall_s": 10.0, "global_steps": 40,
             "global_batches": [32, 128]} for top1 in (0.8, 0.9)]
    (row,) = aggregate(runs, [control])
    assert row["seeds"] == 2 and row["top1_mean"] == pytest.approx(0.85)
    assert (row["top1_min"], row["top1_max"]) == (0.8, 0.9)
    assert row["top1_std"] == pytest.approx(0.0707, abs=1e-4)
