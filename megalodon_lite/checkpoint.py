"""Save and load a :class:`~megalodon_lite.model.MegalodonLM`: safetensors weights, JSON config, atomic.

A checkpoint is a folder::

    config.json                    {"format", "version", "config", "weights", "weights_sha256", "tied"}
    model-<sha256[:16]>.safetensors

``config.json`` is the entry point and the commit point: a save writes the new weights file
beside the old one, then replaces ``config.json`` atomically (temporary file + ``os.replace``),
then deletes weights files no longer named. Loading verifies the SHA-256 of the weights and never
unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megalodon_lite.config import MegalodonConfig
from megalodon_lite.model import MegalodonLM

FORMAT = "megalodon-lite"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_GLOB = "model-*.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted, or does not fit the model."""


def _finish_file(path: Path) -> None:
    """Give a written temporary file the permissions of any new file (mkstemp makes it
    owner-only; the umask decides, as for ``open``) and flush it to disk before it is moved."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temp_path(directory: Path, kind: str) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=f".{kind}")
    os.close(fd)
    return Path(name)


def _weights_and_ties(model: MegalodonLM) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as contiguous CPU tensors, each shared tensor once; ``ties`` maps a dropped
    name to the name that was kept."""
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {name}: it is on the meta device (no data)")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.shape == tensors[seen[key]].shape:
            ties[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, ties


def _current_weights_name(directory: Path) -> str | None:
    try:
        return json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")).get("weights")
    except (OSError, ValueError, AttributeError):
        return None


def save_checkpoint(model: MegalodonLM, directory: str | os.PathLike) -> Path:
    """Write ``model``'s config and weights into ``directory`` (created if needed); return its path.

    Atomic: until the final ``os.replace`` of ``config.json`` the previous checkpoint in
    ``directory`` is untouched and loadable; temporary files are removed when the save fails.
    """
    if not isinstance(model, MegalodonLM):
        raise TypeError(f"model must be a MegalodonLM, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, ties = _weights_and_ties(model)
    previous = _current_weights_name(directory)
    weights_tmp = config_tmp = placed = None
    try:
        weights_tmp = _temp_path(directory, "safetensors")
        save_file(tensors, str(weights_tmp), metadata={"format": FORMAT})
        _finish_file(weights_tmp)
        digest = _sha256(weights_tmp)
        weights_name = f"model-{digest[:16]}.safetensors"
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(),
                    "weights": weights_name, "weights_sha256": digest, "tied": ties}
        config_tmp = _temp_path(directory, "json")
        config_tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _finish_file(config_tmp)
        placed = directory / weights_name
        os.replace(weights_tmp, placed)
        weights_tmp = None
        os.replace(config_tmp, directory / CONFIG_FILE)  # the commit point
        config_tmp = None
    except BaseException:
        for tmp in (weights_tmp, config_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if placed is not None and placed.name != previous and _current_weights_name(directory) != placed.name:
            placed.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    for stale in directory.glob(WEIGHTS_GLOB):
        if stale.name != weights_name:
            stale.unlink(missing_ok=True)
    return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    """The parsed and checked ``config.json`` of a checkpoint folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {Path(directory)}: {CONFIG_FILE} not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupted?): {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (its 'format' field is missing or wrong)")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('version')!r}; "
                              f"this code reads version {FORMAT_VERSION}")
    for field, kind in (("config", dict), ("weights", str), ("weights_sha256", str), ("tied", dict)):
        if not isinstance(manifest.get(field), kind):
            raise CheckpointError(f"{path}: field {field!r} is missing or not a {kind.__name__}")
    if Path(manifest["weights"]).name != manifest["weights"]:
        raise CheckpointError(f"{path}: 'weights' must be a file name inside the folder, got {manifest['weights']!r}")
    return manifest


def load_config(directory: str | os.PathLike) -> MegalodonConfig:
    """The :class:`MegalodonConfig` stored in a checkpoint folder."""
    manifest = read_manifest(directory)
    try:
        return MegalodonConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: bad config: {err}") from None


def load_checkpoint(directory: str | os.PathLike, model: MegalodonLM | None = None, *,
                    device: str | torch.device = "cpu", verify: bool = True) -> MegalodonLM:
    """Load a checkpoint into ``model`` (its config must be equal) or into a new model on ``device``.

    A new model takes the dtype the weights were saved in (e.g. bfloat16) and comes back in eval mode
    (dropout off, ready for inference; call ``.train()`` to train it); an existing model keeps its own
    dtype, device and mode, the weights being cast on copy (as ``load_state_dict`` does). ``verify``
    checks the weights' SHA-256 first (reads the file twice; turn off only for speed with a trusted
    file). Raises :class:`CheckpointError` (a ValueError) naming the problem.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = load_config(directory)
    new_model = model is None
    if new_model:
        model = MegalodonLM(config).to(device)
    elif not isinstance(model, MegalodonLM):
        raise TypeError(f"model must be a MegalodonLM or None, got {type(model).__name__}")
    else:
        differ = config.differences(model.config)
        if differ:
            details = ", ".join(f"{name} (checkpoint {getattr(config, name)!r}, model {getattr(model.config, name)!r})"
                                for name in differ)
            raise CheckpointError(f"checkpoint config does not match the model's: {details}")
    weights_path = directory / manifest["weights"]
    if not weights_path.is_file():
        raise CheckpointError(f"weights file {weights_path} named in {CONFIG_FILE} is missing")
    if verify and _sha256(weights_path) != manifest["weights_sha256"]:
        raise CheckpointError(f"weights file {weights_path} does not have the SHA-256 recorded in "
                              f"{CONFIG_FILE}: it is truncated or corrupted")
    target_device = next(model.parameters()).device
    try:
        tensors = load_file(str(weights_path), device=str(target_device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read weights file {weights_path}: {err}") from None
    saved_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if new_model and len(saved_dtypes) == 1:
        model = model.to(saved_dtypes.pop())
    expected = model.state_dict()
    tied = manifest["tied"]
    missing = sorted(set(expected) - set(tensors) - set(tied))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"weight {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                                  f"{tuple(expected[name].shape)} in the model")
    for name, kept in tied.items():
        if name not in expected or kept not in tensors:
            raise CheckpointError(f"tied weight {name} -> {kept} does not fit the model")
        tensors[name] = tensors[kept]
    model.load_state_dict(tensors, strict=True)
    return model.eval() if new_model else model
