import subprocess
import sys

import pydantic
import pytest

from flashtrain.config import ConfigError, FlashtrainConfig, dump_config, load_config


def test_embedded_default_is_valid_and_round_trips(tmp_path):
    default = FlashtrainConfig()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(default))
    assert load_config(path) == default


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grid:\n  shape: 1x2\nschedule:\n  epochs: 3\n")
    config = load_config(path, ["schedule.epochs=5", "faults.kill_worker_at_steps=[20, 30]"])
    assert config.grid.shape == "1x2"
    assert config.schedule.epochs == 5
    assert config.faults.kill_worker_at_steps == (20, 30)


def test_config_is_frozen():
    config = FlashtrainConfig()
    with pytest.raises(pydantic.ValidationError):
        config.grid.shape = "4x4"  # type: ignore[misc]


@pytest.mark.parametrize("override, fragment", [
    ("grid.shape=2by2", "grid.shape: '2by2' is not a grid"),
    ("grid.shapes=2x2", "grid.shapes: unknown field"),
    ("schedule.epochs=0", "schedule.epochs"),
    ("schedule.phases=[{start_epoch: 1, global_batch: 64}]", "first phase must start at epoch 0"),
    ("schedule.phases=[{start_epoch: 0, global_batch: 64}, {start_epoch: 99, global_batch: 9}]",
     "raise schedule.epochs"),
    ("schedule.phases=[{start_epoch: 0, global_batch: 4}]", "at least 8"),
    ("data.source=imagefolder", "needs data.root"),
])
def test_bad_values_name_field_and_fix(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


@pytest.mark.parametrize("item", ["grid.shape", "shape=2x2", "grid.shape=[unclosed"])
def test_malformed_overrides(item):
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [item])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(scalar)


def test_presets_in_jobs_are_valid():
    from pathlib import Path
    presets = sorted(Path(__file__).resolve().parents[2].joinpath("jobs").glob("*.yaml"))
    assert presets, "jobs/ holds the presets"
    for preset in presets:
        load_config(preset)


def test_default_preset_spells_out_every_field_of_the_embedded_default():
    """jobs/default.yaml is the documentation of every field: it must name each one,
    with the embedded default's value (a new field added to config.py without it fails)."""
    from pathlib import Path

    import yaml

    preset = Path(__file__).resolve().parents[2] / "jobs" / "default.yaml"
    assert yaml.safe_load(preset.read_text()) == yaml.safe_load(dump_config(FlashtrainConfig()))


def test_cli_bad_config_exits_nonzero_with_one_message_before_importing_torch(tmp_path):
    # A mistyped --set answers at once: the job resolves and checks its configuration
    # before it imports torch (seconds of CPU) for the task. `-X importtime` lists every
    # module the command imported, on stderr, beside the message.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flashtrain.jobs.imagenet",
         "--set", "grid.shape=banana", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    said = "\n".join(line for line in lines if not line.startswith("import time:"))
    assert result.returncode == 2
    assert "grid.shape" in said and "Traceback" not in said
    assert not (tmp_path / "run").exists()
    assert "flashtrain.config" in imported and "torch" not in imported
