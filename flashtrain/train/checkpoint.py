"""Durable checkpoints: atomic, checksummed, resumable after a crash of anything.

A checkpoint is ``ckpt-<step:08d>.pt`` (``torch.save`` of one payload dict) plus a
sidecar ``ckpt-<step:08d>.pt.sha256`` in ``sha256sum`` format (so ``sha256sum -c``
checks it by hand). The ``.pt`` file is written to a temporary name in the same folder,
fsynced and renamed into place; only then is the sidecar written (the same way). A
crash at any point leaves either no checkpoint of that step or one without a sidecar,
which :func:`latest_checkpoint` skips: a checkpoint counts only once its sidecar exists
and matches.

Payload convention (the trainer fills it)::

    {"model": state_dict,          # plain torchvision keys, no "module." prefix
     "optimizer": state_dict, "clock": {...}, "config": {...}, "format": 1}

Payloads must hold only tensors and plain Python containers and scalars: they are
loaded with ``torch.load(weights_only=True)``, which never runs pickled code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from flashtrain.errors import CheckpointError

log = logging.getLogger(__name__)

PAYLOAD_FORMAT = 1
_NAME_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
_HASH_CHUNK = 1 << 20


def checkpoint_path(directory: Path | str, step: int) -> Path:
    """Where the checkpoint of global step ``step`` lives."""
    return Path(directory) / f"ckpt-{step:08d}.pt"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _step_of(path: Path) -> int | None:
    match = _NAME_RE.match(path.name)
    return int(match.group(1)) if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; without it a power loss can forget the new name.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(target: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file next to ``target``, fsync, rename over it."""
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        _unlink_if_present(Path(temp_name))
        raise
    _fsync_dir(target.parent)


def _unlink_if_present(path: Path) -> None:
    """Remove ``path`` if it exists, ignoring a concurrent removal."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def save_checkpoint(directory: Path | str, step: int, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as the checkpoint of global step ``step`` in ``directory``
    (created if needed); returns the ``.pt`` path. Atomic: see the module docstring."""
    if "model" not in payload:
        raise ValueError("a checkpoint payload needs a 'model' state_dict (see the payload "
                         "convention in flashtrain.train.checkpoint)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    sidecar = _sidecar(path)
    # Re-saving a step: drop the old sidecar first so no moment pairs it with new bytes.
    _unlink_if_present(sidecar)
    _write_atomically(path, lambda file: torch.save(payload, file))
    line = f"{_sha256(path)}  {path.name}\n".encode()
    _write_atomically(sidecar, lambda file: file.write(line))
    return path


def _expected_digest(path: Path) -> str:
    sidecar = _sidecar(path)
    try:
        text = sidecar.read_text().split()
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no checksum file {sidecar.name}: it was not "
                              "finished (a crash while saving); use an older checkpoint") from None
    if not text or len(text[0]) != 64:
        raise CheckpointError(f"{sidecar} is not a sha256 checksum file")
    return text[0]


def verify_checkpoint(path: Path | str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` matches its sha256 sidecar."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    expected = _expected_digest(path)
    actual = _sha256(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: sha256 {actual[:12]}... does not "
                              f"match {expected[:12]}... in {_sidecar(path).name}; use an older one")


def list_checkpoints(directory: Path | str) -> list[Path]:
    """Every ``ckpt-*.pt`` in ``directory``, oldest step first (verified or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(step, path) for path in directory.iterdir() if (step := _step_of(path)) is not None]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: Path | str) -> Path | None:
    """The newest checkpoint in ``directory`` whose checksum verifies, or ``None``.
    Corrupt or unfinished ones are skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            log.warning("skipping checkpoint: %s", err)
            continue
        return path
    return None


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of the checkpoint at ``path``, after checking its sha256."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {err} (payloads must hold "
                              "only tensors and plain Python values)") from err
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path} is not a flashtrain checkpoint (no 'model' entry)")
    if payload.get("format", PAYLOAD_FORMAT) != PAYLOAD_FORMAT:
        raise CheckpointError(f"{path} has payload format {payload.get('format')}, this version "
                              f"reads format {PAYLOAD_FORMAT}")
    return payload


def prune_checkpoints(directory: Path | str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (by step) with their sidecars;
    returns the deleted ``.pt`` paths."""
    if keep < 1:
        raise ValueError("keep must be >= 1: pruning would delete every checkpoint")
    doomed = list_checkpoints(directory)[:-keep]
    for path in doomed:
        _unlink_if_present(_sidecar(path))  # sidecar first: a half-pruned one is skipped
        _unlink_if_present(path)
    return doomed


def _strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    # DistributedDataParallel-style wrappers prefix every key; plain torchvision has none.
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key.removeprefix("module."): value for key, value in state_dict.items()}
    return dict(state_dict)


def export_weights(path_or_payload: Path | str | dict[str, Any], out_path: Path | str) -> Path:
    """Write only the model's state_dict, so that
    ``torchvision.models.resnet50().load_state_dict(torch.load(out_path))`` works."""
    if isinstance(path_or_payload, dict):
        payload = path_or_payload
    else:
        payload = load_checkpoint(path_or_payload)
    if "model" not in payload:
        raise CheckpointError("the payload has no 'model' state_dict to export")
    state_dict = _strip_module_prefix(payload["model"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out_path, lambda file: torch.save(state_dict, file))
    return out_path


def check_fits(payload: dict[str, Any], expected: dict[str, Any], path: Path | str,
               model_name: str) -> None:
    """Raise :class:`CheckpointError` with one message unless the checkpoint's model
    ``state_dict`` has exactly the keys and shapes of ``expected`` (a freshly built
    model's), so a resume never dies inside ``load_state_dict`` with a list of keys."""
    state = _strip_module_prefix(payload["model"])
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & state.keys()
                      if tuple(getattr(state[key], "shape", ())) != tuple(expected[key].shape))
    if not (missing or unexpected or reshaped):
        return
    saved_name = payload.get("model_name", "an unnamed model")
    problems = [f"{len(found)} {what} (e.g. {found[0]})" for what, found in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
                if found]
    raise CheckpointError(f"checkpoint {path} holds {saved_name}, which does not fit the "
                          f"{model_name} this run builds: {', '.join(problems)} parameter(s); "
                          "resume with the model the run was trained with")
