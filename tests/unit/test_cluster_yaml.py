"""Every cluster YAML passes Ray's own schema check, offline (``ray up`` has no dry run),
and sets its nodes up the project's way."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))


def test_the_cluster_folder_has_the_ray_up_files():
    assert {path.name for path in YAMLS} >= {"abci.yaml", "local.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda path: path.name)
def test_cluster_yaml_is_valid_for_ray_up(path):
    raw = yaml.safe_load(path.read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert config["provider"]["type"] == "local"
    # The on-prem provider starts exactly the listed workers.
    assert len(raw["provider"]["worker_ips"]) == raw["max_workers"] == raw["min_workers"]


@pytest.mark.parametrize("path", YAMLS, ids=lambda path: path.name)
def test_nodes_are_set_up_with_the_project_install_and_run_ray_from_its_venv(path):
    config = yaml.safe_load(path.read_text())
    setup = " && ".join(config.get("setup_commands", []) + config.get("head_setup_commands", []))
    assert "make install" in setup
    commands = [c for key, value in config.items() if key.endswith("_commands") for c in value]
    assert not any("module load cuda" in command for command in commands), \
        "a CUDA module competes with the CUDA runtime the torch wheel brings"
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for command in (c for c in starts if " start " in c):
        assert ".venv/bin/ray start" in command, command  # the job's python is the venv's
        assert "RAY_AUTH_MODE=token" in command, command


def test_abci_nodes_offer_eight_gpus():
    config = yaml.safe_load((CLUSTER / "abci.yaml").read_text())
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if " start " in c]
    assert len(starts) == 2 and all("--num-gpus=8" in command for command in starts)


def test_a_broken_yaml_is_rejected():
    raw = yaml.safe_load((CLUSTER / "abci.yaml").read_text())
    raw["max_worker"] = 1  # a typo: not a field of Ray's cluster schema
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))
