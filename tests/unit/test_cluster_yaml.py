"""The cluster YAML passes Ray's own schema check, offline (``ray up`` has no dry run)."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_abci_yaml_is_valid_for_ray_up():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "abci.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == config["max_workers"]


def test_a_broken_yaml_is_rejected():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "abci.yaml").read_text())
    import jsonschema

    raw["max_worker"] = 3  # a typo: not a field of Ray's cluster schema
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))
