"""report.html built from run directories in every state a person may point it at:
finished, cut short (no summary.json, a torn last line), failed, empty, or not a run."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from flashtrain.jobs.imagenet import write_run_report
from flashtrain.report import main, read_run, write_report
from flashtrain.train.figures import grid_timeline, last_per_step, reform_label
from flashtrain.train.metrics import MetricsWriter, write_summary
from flashtrain.train.segments import Segment, append_segment

IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
REFORM = dict(cause="ActorDiedError", reason="2x2 -> 3x1: 3 workers on 1 node(s)",
              old_grid="2x2", new_grid="3x1", failed_step=8, resume_step=6,
              steps_rolled_back=2, recovery_seconds=0.944)


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def write_partial_run(run_dir: Path, time_split: bool = False) -> None:
    """A run stopped in its second epoch: config, 12 steps (a re-form at step 8, steps 6
    and 7 trained twice), one validated epoch, no summary.json, a torn last line."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("runtime:\n  preset: <partial & run>\n")
    clock = FakeClock()
    with MetricsWriter(run_dir, clock=clock) as writer:
        writer.event("grid", generation=0, grid="2x2")
        for step in [*range(8), 6, 7, 8, 9, 10, 11]:
            clock.now += 0.5
            split = dict(compute_seconds=0.3, comm_exposed_seconds=0.1,
                         data_wait_seconds=0.05) if time_split else {}
            writer.step(step=step, epoch=step // 10, loss=2.3 - 0.1 * step, lr=0.1,
                        global_batch=64 if step < 10 else 128, grid="2x2" if clock.now < 5004
                        else "3x1", step_seconds=0.5, sync_seconds=0.1, **split)
            if clock.now == 5004.0:
                writer.event("grid", generation=1, grid="3x1")
                writer.reform(time=writer.elapsed(), **REFORM)
            if step == 9:
                writer.epoch(epoch=0, top1=0.25, top5=0.75, val_loss=2.0)
    with open(run_dir / "metrics.jsonl", "a") as file:
        file.write('{"kind": "step", "time": 7.0, "st')  # the writer died mid-line


def embedded_images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in IMG.findall(page)]


def inked_fraction(image: Image.Image) -> float:
    """The share of pixels that are not (near) white: a drawn plot has lines and text."""
    gray = image.convert("L")
    return sum(1 for value in gray.getdata() if value < 200) / (gray.width * gray.height)


def test_report_of_a_run_without_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_partial_run(run_dir)
    path = write_report(run_dir)
    page = path.read_text()
    assert path == run_dir / "report.html"
    assert "incomplete" in page and "summary.json" in page and "missing" in page
    # The config is shown, escaped.
    assert "preset: &lt;partial &amp; run&gt;" in page
    # Figures from the records so far: last step 11, the epoch's 25 % top-1, one re-form.
    assert re.search(r"last recorded step</td><td>11<", page)
    assert "25.00 %" in page
    assert "ActorDiedError" in page and "0.944" in page and "2x2 -&gt; 3x1" in page
    images = embedded_images(page)
    assert len(images) == 5
    for image in images:
        assert image.width > 400 and image.height > 200
        assert inked_fraction(image) > 0.01
    # Self-contained: nothing fetched, no script.
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)


def test_report_of_a_finished_run_uses_its_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_partial_run(run_dir)
    write_summary(run_dir, {"final_top1": 0.4735, "final_top5": 0.8607, "epochs": 2,
                            "global_steps": 12, "reforms": [REFORM]})
    page = write_report(run_dir).read_text()
    assert "finished" in page and "47.35 %" in page and "86.07 %" in page
    assert re.search(r"global steps</td><td>12<", page)


def test_report_of_a_resumed_run_shows_both_configs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_partial_run(run_dir)
    (run_dir / "config.resumed.yaml").write_text("runtime:\n  preset: resumed-later\n")
    page = write_report(run_dir).read_text()
    assert "preset: &lt;partial &amp; run&gt;" in page and "preset: resumed-later" in page


def test_report_of_a_resumed_run_lists_its_segments(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_partial_run(run_dir)
    append_segment(run_dir, Segment("2026-12-06T10:00:00+00:00", "2026-12-06T10:01:00+00:00",
                                    0, 7, "interrupted", 60.0, 512, 4.0))
    page = write_report(run_dir).read_text()  # no summary yet: segments.json
    assert "Segments" in page and "<td>interrupted</td>" in page and "<td>128</td>" in page
    segments = append_segment(run_dir, Segment("2026-12-06T11:00:00+00:00",
                                               "2026-12-06T11:00:30+00:00", 6, 11,
                                               "finished", 30.0, 384, 2.0))
    write_summary(run_dir, {"final_top1": 0.5, "final_top5": 0.9, "wall_seconds": 90.0,
                            "segments": segments})
    page = write_report(run_dir).read_text()
    assert page.count("<td>interrupted</td>") == 1 and page.count("<td>finished</td>") == 1
    assert re.search(r"wall seconds</td><td>90", page) and "2026-12-06T11:00:00" in page


def test_report_of_a_failed_run_shows_the_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_partial_run(run_dir)
    (run_dir / "error.log").write_text("Traceback (most recent call last):\n"
                                       "ElasticAbort: worker died and elastic.enabled is false\n")
    page = write_report(run_dir).read_text()
    assert "failed" in page and "ElasticAbort: worker died" in page


def test_report_of_a_run_with_only_a_config(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("grid:\n  shape: 2x2\n")
    run = read_run(tmp_path)
    assert run.notes == {"metrics.jsonl": "missing",
                         "summary.json": "missing: the run failed, was stopped or is still running"}
    page = write_report(tmp_path).read_text()
    assert len(embedded_images(page)) == 5 and "never re-formed" in page


def test_an_unreadable_summary_is_shown_not_raised(tmp_path: Path) -> None:
    write_partial_run(tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text('{"final_top1": 0.4')
    run = read_run(tmp_path / "run")
    assert run.summary is None and run.notes["summary.json"].startswith("unreadable")
    assert "unreadable" in write_report(tmp_path / "run").read_text()


def test_step_time_plot_uses_the_split_when_recorded(tmp_path: Path) -> None:
    write_partial_run(tmp_path / "with", time_split=True)
    write_partial_run(tmp_path / "without")
    with_split = write_report(tmp_path / "with").read_text()
    without = write_report(tmp_path / "without").read_text()
    assert "compute, exposed (not overlapped) communication and data wait" in with_split
    assert "carry no compute / exposed communication / data-wait split" in without


def test_series_helpers() -> None:
    records = [{"kind": "step", "step": 6, "loss": 1.0}, {"kind": "step", "step": 7, "loss": 0.9},
               {"kind": "step", "step": 6, "loss": 0.8}]
    assert [r["loss"] for r in last_per_step(records)] == [0.8, 0.9]
    timeline = [{"kind": "event", "name": "grid", "grid": "2x2", "time": 1.0},
                {"kind": "step", "grid": "2x2", "time": 2.0},
                {"kind": "event", "name": "grid", "grid": "3x1", "time": 4.0},
                {"kind": "event", "name": "grid", "grid": "auto", "time": 5.0}]
    assert grid_timeline(timeline) == ([1.0, 4.0], [4, 3], ["2x2", "3x1"])
    # Without grid events, the steps tell when a grid came into force.
    assert grid_timeline(timeline[1:2]) == ([2.0], [4], ["2x2"])
    assert reform_label(REFORM) == "2x2->3x1 ActorDiedError, 0.94 s"
    assert reform_label({"old_grid": "2x2", "new_grid": "2x1"}) == \
        "2x2->2x1 re-form, recovery not measured"


def test_cli_writes_the_report_and_rejects_a_bad_run_dir(tmp_path: Path, capsys) -> None:
    write_partial_run(tmp_path / "run")
    assert main([str(tmp_path / "run"), "--output", str(tmp_path / "out.html")]) == 0
    assert (tmp_path / "out.html").is_file() and not (tmp_path / "run" / "report.html").exists()
    capsys.readouterr()
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a flashtrain run directory" in err and "config.yaml" in err


def test_a_report_that_cannot_be_written_is_said_not_raised(tmp_path: Path, capsys) -> None:
    write_partial_run(tmp_path / "run")
    (tmp_path / "run" / "report.html").mkdir()  # os.replace onto a folder fails
    write_run_report(tmp_path / "run")
    err = capsys.readouterr().err
    assert "could not write the report" in err and "python -m flashtrain.report" in err
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    # A run directory the job removed (the run never began): nothing to do, nothing said.
    write_run_report(tmp_path / "gone")
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("line", ['{"kind": "step", "time": 1, "step": 0, "loss": null}\n'])
def test_a_diverged_loss_leaves_a_gap_not_an_error(tmp_path: Path, line: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(line + json.dumps(
        {"kind": "step", "time": 2, "step": 1, "loss": 1.5}) + "\n")
    assert len(embedded_images(write_report(tmp_path).read_text())) == 5
