"""collective.algorithm=auto in a real run (local Ray, 2x2 CPU workers, each fed by its
persistent loader process): the controller says the choice at forming, records it in
metrics.jsonl and the grid trains with it."""

from __future__ import annotations

import json

from flashtrain.algorithm import choose_algorithm
from flashtrain.config import load_config
from flashtrain.driver.trainer import Trainer
from flashtrain.topology import Grid

RUN = ["model.name=tiny_cnn", "data.source=synthetic", "data.synthetic_samples=64",
       "data.image_size=16", "grid.shape=2x2", "grid.cpus_per_worker=0.25",
       "schedule.epochs=1", "schedule.phases=[{start_epoch: 0, global_batch: 16}]",
       "schedule.warmup_epochs=0.5", "runtime.max_steps=3", "runtime.progress=false",
       "collective.algorithm=auto",
       "data.loader_workers=1"]  # the worker's persistent loader process, in an actor


def test_auto_is_said_recorded_and_used(ray_session, tmp_path):
    config = load_config(None, RUN)
    said: list[str] = []
    trainer = Trainer(config, tmp_path / "run", tmp_path / "cache", resume=False, say=said.append)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["global_steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    (event,) = [r for r in records if r["kind"] == "event" and r.get("name") == "algorithm"]
    expected = choose_algorithm("auto", Grid(2, 2), ["one"] * 4, False,
                                config.collective.bucket_mb * 2**20)
    assert event["grid"] == "2x2" and event["algorithm"] == expected.algorithm
    assert event["reason"] == expected.reason and "1 node(s)" in event["reason"]
    assert any(f"all-reduce for grid 2x2: {expected.algorithm}" in line for line in said)
