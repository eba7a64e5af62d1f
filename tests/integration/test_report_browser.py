"""report.html of real runs of the job CLI, opened in a real headless Chromium (Debian's
``chromium`` package, which ``make test`` installs when it is missing).

One short run (tiny CNN, synthetic images, a 1x2 grid, one worker killed so the grid
re-forms, TensorBoard on, ``collective.algorithm=auto``) is shared by the tests: its
report must show every plot in the browser, its TensorBoard events must hold the numbers
of its metrics.jsonl, and the algorithm the cost model chose for each grid must be said,
recorded and used. The report of a run that fails is checked with the replica check's
failing run (tests/integration/test_replica_digest.py).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageChops

from flashtrain.algorithm import choose_algorithm
from flashtrain.topology import Grid
from flashtrain.train.metrics import read_metrics

RUN = ["model.name=tiny_cnn", "data.source=synthetic", "data.synthetic_samples=192",
       "data.image_size=16", "grid.shape=1x2", "grid.cpus_per_worker=0.25",
       "schedule.epochs=2", "schedule.warmup_epochs=0.25",
       "schedule.phases=[{start_epoch: 0, global_batch: 32}, {start_epoch: 1, global_batch: 64}]",
       "elastic.commit_every_steps=2", "checkpoint.every_steps=5", "runtime.progress=false",
       "collective.timeout_s=20",
       "collective.algorithm=auto"]  # the cost model's choice, said and recorded per grid
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--force-device-scale-factor=1"]
# Added to a copy of the report (the report itself has no script): once the page has
# loaded, write down for every image whether the browser decoded it and where it drew it.
PROBE = """<script>
addEventListener("load", () => {
  const images = [...document.images].map(img => {
    const box = img.getBoundingClientRect();
    return {complete: img.complete, naturalWidth: img.naturalWidth,
            naturalHeight: img.naturalHeight, left: box.left + scrollX + img.clientLeft,
            top: box.top + scrollY + img.clientTop, width: img.clientWidth,
            height: img.clientHeight};
  });
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images, pageHeight: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def run_job(run_dir: Path, ray_address: str, *overrides: str) -> subprocess.CompletedProcess:
    """The job, joined to this pytest process's Ray (tests/integration/conftest.py)."""
    args = [sys.executable, "-m", "flashtrain.jobs.imagenet", "--run-dir", str(run_dir)]
    for item in [*RUN, f"runtime.ray_address={ray_address}", *overrides]:
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(args, capture_output=True, text=True, timeout=400, env=env)


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, ray_address) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    result = run_job(run_dir, ray_address, "faults.kill_worker_at_steps=[4]",
                     "runtime.tensorboard=true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"report {run_dir / 'report.html'}" in result.stdout
    return run_dir, result


@pytest.fixture(scope="module")
def finished_run(finished_job) -> Path:
    return finished_job[0]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium on PATH: `make test` installs Debian's chromium package "
                    "(apt-get install chromium) when /usr/bin/chromium is missing")
    return found


def browse(page: Path, profile: Path, *what: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *what,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


def probe(page: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of ``page`` with the probe script, and what the probe found in Chromium."""
    copy = tmp_path / "probed.html"
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = browse(copy, tmp_path / "profile-dom", "--window-size=1200,900", "--dump-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, f"the probe did not run; Chromium printed: {dom[-2000:]}"
    return copy, json.loads(found.group(1).replace("&quot;", '"'))


def gray_difference(left: Image.Image, right: Image.Image) -> float:
    """Mean absolute difference of two images in gray levels (0-255)."""
    diff = ImageChops.difference(left.convert("L"), right.convert("L"))
    return sum(diff.getdata()) / (diff.width * diff.height)


def test_report_plots_are_visible_in_chromium(finished_run: Path, tmp_path: Path) -> None:
    page = finished_run / "report.html"
    text = page.read_text()
    first_reform = next(r for r in read_metrics(finished_run) if r["kind"] == "reform")
    assert "finished" in text and "1x2 -&gt; 1x1" in text
    assert f"<td>{first_reform['cause']}</td>" in text
    embedded = [Image.open(io.BytesIO(base64.b64decode(d))) for d in IMG.findall(text)]
    assert len(embedded) == 5

    copy, found = probe(page, tmp_path)
    images = found["images"]
    assert len(images) == 5
    for image in images:  # decoded by the browser, and drawn at a size a person can read
        assert image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0
        assert image["width"] >= 400 and image["height"] >= 150

    shot = tmp_path / "page.png"
    height = int(found["pageHeight"]) + 10
    browse(copy, tmp_path / "profile-shot", f"--window-size=1200,{height}",
           f"--screenshot={shot}")
    screen = Image.open(shot).convert("RGB")
    assert screen.height >= height - 10
    for image, picture in zip(images, embedded, strict=True):
        box = tuple(round(v) for v in (image["left"], image["top"],
                                       image["left"] + image["width"],
                                       image["top"] + image["height"]))
        drawn = screen.crop(box)
        # What the screen shows there is the plot (scaled to the box), not a blank or
        # a broken-image icon: close to the PNG, and far from a white box.
        expected = picture.convert("RGB").resize(drawn.size)
        blank = Image.new("RGB", drawn.size, "white")
        assert gray_difference(drawn, expected) < 6, box
        assert gray_difference(drawn, blank) > 3 * gray_difference(drawn, expected), box


def assert_same_points(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    """Equal steps, and values equal to float32 precision (what TensorBoard stores)."""
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [value for _, value in got] == pytest.approx([value for _, value in want], rel=1e-6)


def test_tensorboard_events_hold_the_runs_metrics(finished_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(finished_run / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    records = read_metrics(finished_run)
    steps = [r for r in records if r["kind"] == "step"]
    # A step redone after the rollback is recorded twice: TensorBoard holds both points.
    loss = sorted((e.step, e.value) for e in accumulator.Scalars("step/loss"))
    assert_same_points(loss, sorted((r["step"], r["loss"]) for r in steps))
    top1 = [(e.step, e.value) for e in accumulator.Scalars("epoch/top1")]
    assert_same_points(top1, [(r["epoch"], r["top1"]) for r in records if r["kind"] == "epoch"])
    # At least the kill's re-form (a loaded machine may add one: a replacement joining,
    # or a collective timeout), each at the step training resumed from.
    reforms = [r for r in records if r["kind"] == "reform"]
    assert reforms and reforms[0]["failed_step"] == 4
    recovery = sorted((e.step, e.value) for e in accumulator.Scalars("reform/recovery_seconds"))
    assert_same_points(recovery, sorted((r["resume_step"], r["recovery_seconds"]) for r in reforms))


def test_auto_algorithm_is_said_recorded_and_used_for_each_grid(finished_job) -> None:
    run_dir, result = finished_job
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    bucket_bytes = config["collective"]["bucket_mb"] * 2**20
    events = [r for r in read_metrics(run_dir) if r["kind"] == "event" and r.get("name") == "algorithm"]
    assert [e["grid"] for e in events][:2] == ["1x2", "1x1"]  # formed, then re-formed after the kill
    for event in events:
        grid = Grid.parse(event["grid"])
        expected = choose_algorithm("auto", grid, ["one"] * grid.num_workers, False, bucket_bytes)
        assert event["algorithm"] == expected.algorithm and event["reason"] == expected.reason
        if grid.num_workers > 1:  # (one worker: nothing to reduce)
            assert "1 node(s)" in event["reason"]
        assert f"all-reduce for grid {grid}: {expected.algorithm}" in result.stdout
