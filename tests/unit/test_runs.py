"""Where runs go and what a resume may change (flashtrain.runs), without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashtrain.config import load_config
from flashtrain.runs import (
    HOME_RUNS,
    RUNS_ROOT_ENV,
    choose_runs_root,
    find_run,
    in_ray_working_dir_copy,
    refusal_message,
    refused_changes,
    resumable,
    run_finished,
    run_path,
)
from flashtrain.train.metrics import MetricsWriter
from flashtrain.train.segments import (
    KILLED,
    Segment,
    append_segment,
    begin_segment,
    read_segments,
    whole_run_summary,
)

RAY_COPY = Path("/tmp/ray/session_2026-12-06_14-00-00_1_42/runtime_resources/"
                "working_dir_files/_ray_pkg_0123abcd")


def test_ray_working_dir_copy_is_recognised():
    assert in_ray_working_dir_copy(RAY_COPY)
    assert in_ray_working_dir_copy(RAY_COPY / "sub")
    assert in_ray_working_dir_copy("/scratch/t/ray/session_x/runtime_resources/"
                                   "working_dir_files/s3_bucket_abc")
    assert not in_ray_working_dir_copy("/home/u/flashtrain")
    assert not in_ray_working_dir_copy("/home/u/runtime_resources/mine")


def test_root_comes_from_config_then_env_then_ray_copy_default():
    env = {RUNS_ROOT_ENV: "/shared/runs"}
    assert choose_runs_root("/cfg", env, RAY_COPY).path == Path("/cfg")
    assert choose_runs_root(None, env, RAY_COPY).path == Path("/shared/runs")
    in_copy = choose_runs_root(None, {}, RAY_COPY)
    assert in_copy.path == Path(HOME_RUNS).expanduser() and "temporary copy" in in_copy.reason
    assert choose_runs_root(None, {}, "/home/u/flashtrain").path is None
    assert choose_runs_root("~/r", {}, "/x").path == Path("~/r").expanduser()


def test_run_paths_resolve_against_the_root():
    cwd = Path("/home/u/flashtrain")
    none = choose_runs_root(None, {}, cwd)
    root = choose_runs_root("/shared/runs", {}, cwd)
    # Without a root: as before, relative to the current directory, new runs in ./runs.
    assert run_path(none, "runs/a", "p", cwd) == cwd / "runs/a"
    assert run_path(none, None, "cpu-smoke", cwd, now=0).parent == cwd / "runs"
    assert run_path(root, "a", "p", cwd) == Path("/shared/runs/a")
    new = run_path(root, None, "cpu-smoke", cwd, now=0)
    assert new.parent == Path("/shared/runs") and new.name.startswith("cpu-smoke-")
    # An absolute --run-dir is used unchanged, with or without a root; ".." is folded.
    assert run_path(root, "/data/mine", "p", cwd) == Path("/data/mine")
    assert run_path(root, "x/../y", "p", cwd) == Path("/shared/runs/y")
    # In Ray's temporary copy nothing resolves inside it.
    in_copy = choose_runs_root(None, {}, RAY_COPY)
    for name in (None, "runs/a"):
        assert RAY_COPY not in run_path(in_copy, name, "p", RAY_COPY).parents


@pytest.mark.parametrize("field,ok", [
    ("runtime.progress", True), ("runtime.max_steps", True), ("grid.shape", True),
    ("collective.timeout_s", True), ("checkpoint.every_steps", True), ("data.root", True),
    ("data.loader_workers", True), ("faults.kill_worker_at_steps", True),
    ("runtime.seed", False), ("model.name", False), ("schedule.epochs", False),
    ("optimizer.momentum", False), ("data.seed", False), ("data.source", False),
    ("data.image_size", False),
])
def test_resumable_fields(field, ok):
    assert resumable(field) is ok


def test_refused_changes_name_each_field_that_makes_another_run(tmp_path):
    saved = load_config("jobs/cpu-smoke.yaml").model_dump(mode="json")
    allowed = load_config("jobs/cpu-smoke.yaml", ["runtime.progress=true", "grid.shape=1x2",
                                                  "runtime.max_steps=5"])
    assert refused_changes(saved, allowed.model_dump(mode="json")) == []
    other = load_config("jobs/cpu-smoke.yaml", ["model.name=resnet18", "runtime.progress=true",
                                                "schedule.epochs=3"])
    changes = refused_changes(saved, other.model_dump(mode="json"))
    assert changes == [("model.name", "tiny_cnn", "resnet18"), ("schedule.epochs", 2, 3)]
    message = refusal_message(changes, tmp_path)
    assert "model.name ('tiny_cnn' in the run, 'resnet18' asked)" in message
    assert "\n" not in message and str(tmp_path) in message


def test_run_finished_by_epochs_or_step_cap():
    assert not run_finished(None, 2, None)
    assert run_finished({"epochs": 2.0, "global_steps": 35}, 2, None)
    assert not run_finished({"epochs": 0.7, "global_steps": 12}, 2, None)
    assert run_finished({"epochs": 0.7, "global_steps": 12}, 2, 12)
    assert not run_finished({"epochs": 0.7, "global_steps": 12}, 2, 20)


def test_segments_add_up_to_the_whole_run(tmp_path):
    first = Segment("2026-12-06T10:00:00+00:00", "2026-12-06T10:01:00+00:00", 0, 41,
                    "interrupted", 60.0, 4200, 30.0)
    second = Segment("2026-12-06T11:00:00+00:00", "2026-12-06T11:00:40+00:00", 40, 99,
                     "finished", 40.0, 6000, 20.0)
    append_segment(tmp_path, first)
    segments = append_segment(tmp_path, second)
    assert read_segments(tmp_path) == segments and len(segments) == 2
    summary = whole_run_summary({"final_top1": 0.9, "wall_seconds": 40.0,
                                 "images_per_sec": 300.0}, segments)
    assert summary["wall_seconds"] == 100.0
    assert summary["images_per_sec"] == pytest.approx(10200 / 50.0)
    assert [s["ended"] for s in summary["segments"]] == ["interrupted", "finished"]
    assert summary["final_top1"] == 0.9
    (tmp_path / "segments.json").write_text("{cut")
    assert read_segments(tmp_path) == []


def test_a_resume_finds_a_run_by_the_name_it_was_given(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    checkout = tmp_path / "checkout"
    submitted = tmp_path / "home" / "flashtrain-runs" / "cpu-smoke-1"
    submitted.mkdir(parents=True)
    (submitted / "config.yaml").write_text("{}")
    none = choose_runs_root(None, {}, checkout)
    # Submitted with --working-dir (so under ~/flashtrain-runs), resumed from the checkout.
    assert find_run(none, "cpu-smoke-1", checkout) == submitted
    local = checkout / "runs" / "cpu-smoke-1"
    local.mkdir(parents=True)
    (local / "config.yaml").write_text("{}")
    assert find_run(none, "runs/cpu-smoke-1", checkout) == local
    assert find_run(none, "missing", checkout) == checkout / "missing"
    shared = choose_runs_root(str(tmp_path / "shared"), {}, checkout)
    assert find_run(shared, "cpu-smoke-1", checkout) == tmp_path / "shared" / "cpu-smoke-1"


def test_the_job_resolves_runs_and_resumes_by_the_rule(tmp_path, monkeypatch):
    from flashtrain.config import ConfigError, dump_config
    from flashtrain.jobs.imagenet import parse_args, resolve_run

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    copy = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_9"
    config, root, path = resolve_run(parse_args(["--config", "jobs/cpu-smoke.yaml"]), cwd=copy,
                                     env={})
    assert path.parent == tmp_path / "home" / "flashtrain-runs"
    assert path.name.startswith("cpu-smoke-") and config.model.name == "tiny_cnn"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_config(config))
    # The run's own config, not the embedded default, under the --set that may change.
    args = parse_args(["--resume", "--run-dir", path.name, "--set", "runtime.progress=true"])
    resumed, _, found = resolve_run(args, cwd=copy, env={})
    assert found == path and resumed.model.name == "tiny_cnn" and resumed.runtime.progress
    with pytest.raises(ConfigError, match="model.name"):
        resolve_run(parse_args(["--resume", "--run-dir", path.name, "--set",
                                "model.name=resnet18"]), cwd=copy, env={})
    with pytest.raises(ConfigError, match="already exists"):
        resolve_run(parse_args(["--run-dir", str(path)]), cwd=copy, env={})


def test_a_killed_segment_is_completed_from_its_metrics_when_the_next_begins(tmp_path):
    begin_segment(tmp_path, "2026-12-06T10:00:00+00:00", 0)
    assert [s["ended"] for s in read_segments(tmp_path)] == ["running"]
    with MetricsWriter(tmp_path) as writer:  # the killed job's records
        writer.event("start", global_step=20)
        for step in (20, 21, 22):
            writer.step(step=step, samples=64, step_seconds=0.5, time=3.0 + step)
    offset = (tmp_path / "metrics.jsonl").stat().st_size
    begin_segment(tmp_path, "2026-12-06T11:00:00+00:00", offset)  # the job resumed
    killed, running = read_segments(tmp_path)
    assert killed["ended"] == KILLED and (killed["first_step"], killed["last_step"]) == (20, 22)
    assert killed["trained_samples"] == 192 and killed["train_seconds"] == 1.5
    assert killed["wall_seconds"] == 25.0 and running["ended"] == "running"
    done = append_segment(tmp_path, Segment("2026-12-06T11:00:00+00:00", "2026-12-06T11:01:00+00:00",
                                            20, 40, "finished", 60.0, 1280, 10.0, offset))
    assert [s["ended"] for s in done] == [KILLED, "finished"]
