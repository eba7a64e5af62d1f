"""Atomic, checksummed checkpoints of flashtrain.train.checkpoint."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch
import torchvision

from flashtrain.train.checkpoint import (
    CheckpointError,
    checkpoint_path,
    export_weights,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def _payload(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # so the optimizer state holds momentum buffers
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "clock": {"step": step, "epoch": 1, "cursor": 64}, "config": {"grid": {"shape": "2x2"}},
            "format": 1}


def test_round_trip(tmp_path: Path) -> None:
    payload = _payload(7)
    path = save_checkpoint(tmp_path / "ckpt", 7, payload)
    assert path == checkpoint_path(tmp_path / "ckpt", 7) and path.name == "ckpt-00000007.pt"
    sidecar = path.with_name(path.name + ".sha256").read_text().split()
    assert sidecar == [hashlib.sha256(path.read_bytes()).hexdigest(), path.name]  # sha256sum -c
    loaded = load_checkpoint(path)
    assert loaded["clock"] == payload["clock"] and loaded["config"] == payload["config"]
    for key, tensor in payload["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    restored = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(loaded["optimizer"])
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]


def test_latest_skips_corrupt_and_unfinished(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, _payload(step))
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 40)

    newest = checkpoint_path(tmp_path, 40)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    flipped = checkpoint_path(tmp_path, 30)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    flipped.write_bytes(bytes(data))
    checkpoint_path(tmp_path, 20).with_name("ckpt-00000020.pt.sha256").unlink()  # crash before sidecar
    checkpoint_path(tmp_path, 50).write_bytes(b"partial")  # no sidecar either

    with caplog.at_level(logging.WARNING, logger="flashtrain.train.checkpoint"):
        assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    assert "ckpt-00000040.pt is corrupt" in caplog.text and "no checksum file" in caplog.text
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(newest)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(flipped)
    with pytest.raises(CheckpointError, match="no checksum file"):
        load_checkpoint(checkpoint_path(tmp_path, 20))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(checkpoint_path(tmp_path, 99))
    assert load_checkpoint(checkpoint_path(tmp_path, 10))["clock"]["step"] == 10


def test_latest_of_empty_or_missing_directory(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, _payload(5))
    save_checkpoint(tmp_path, 5, {**_payload(5), "clock": {"step": 5, "epoch": 2}})
    assert load_checkpoint(latest_checkpoint(tmp_path))["clock"]["epoch"] == 2


def test_prune_keeps_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 100, 1000):
        save_checkpoint(tmp_path, step, _payload(step))
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["ckpt-00000001.pt", "ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000100.pt", "ckpt-00001000.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000100.pt", "ckpt-00000100.pt.sha256", "ckpt-00001000.pt", "ckpt-00001000.pt.sha256"]
    assert prune_checkpoints(tmp_path, keep=5) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep=0)


def test_exported_weights_load_into_plain_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = torchvision.models.resnet18(num_classes=10)
    path = save_checkpoint(tmp_path, 3, {"model": trained.state_dict(), "clock": {}, "format": 1})

    out = export_weights(path, tmp_path / "export" / "resnet18.pt")
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(torch.load(out))  # strict: every key, no extras
    assert torch.equal(fresh.fc.weight, trained.fc.weight)

    wrapped = {"model": {f"module.{k}": v for k, v in trained.state_dict().items()}}
    torchvision.models.resnet18(num_classes=10).load_state_dict(
        torch.load(export_weights(wrapped, tmp_path / "from_payload.pt")))


def test_save_rejects_payload_without_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model"):
        save_checkpoint(tmp_path, 1, {"clock": {}})
    assert list(tmp_path.iterdir()) == []


def test_resnet50_weights_load_into_a_plain_torchvision_model(tmp_path):
    """What the trainer saves (the worker's model state, no wrapper prefixes) loads into
    ``torchvision.models.resnet50()`` as it is."""
    from flashtrain.train.models import build_model

    model = build_model("resnet50", 10, seed=3, zero_init_residual=True)
    path = save_checkpoint(tmp_path, 7, {"format": 1, "model": model.state_dict(), "clock": {}})
    plain = torchvision.models.resnet50(num_classes=10)
    plain.load_state_dict(load_checkpoint(path)["model"])  # strict: every key matches
    for name, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name


def test_a_checkpoint_of_another_model_is_refused_in_one_message(tmp_path: Path) -> None:
    from flashtrain.train.checkpoint import CheckpointError, check_fits
    from flashtrain.train.models import build_model

    tiny = build_model("tiny_cnn", 10, 0).state_dict()
    payload = {"model": tiny, "model_name": "tiny_cnn"}
    check_fits(payload, build_model("tiny_cnn", 10, 1).state_dict(), tmp_path / "c.pt", "tiny_cnn")
    with pytest.raises(CheckpointError) as err:
        check_fits(payload, build_model("resnet18", 10, 0).state_dict(), tmp_path / "c.pt",
                   "resnet18")
    message = str(err.value)
    assert "holds tiny_cnn" in message and "resnet18" in message and "missing" in message
    assert "\n" not in message and len(message) < 400
    with pytest.raises(CheckpointError, match="of another shape"):
        check_fits(payload, build_model("tiny_cnn", 7, 0).state_dict(), tmp_path / "c.pt",
                   "tiny_cnn")
