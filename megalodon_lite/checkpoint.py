"""Save and load a model — :class:`~megalodon_lite.model.MegalodonLM` or the baseline
:class:`~megalodon_lite.baseline.LlamaLM` — and optionally the state of its training run:
safetensors tensors, JSON everything else, written atomically.

A checkpoint is a folder::

    config.json                       {"format", "version", "model", "config", "weights",
                                       "weights_sha256", "tied", ["training"]}
    model-<sha256[:16]>.safetensors   the weights
    training-<sha256[:16]>.safetensors  only in a training checkpoint: optimizer state, RNG states

``model`` names the kind (``"megalodon"`` or ``"llama"``; a file without it, written before the
baseline existed, holds a Megalodon model). ``training`` is ``{"state": <JSON>, "tensors": <file>,
"tensors_sha256": <hex>}``: what a trainer needs to continue (see ``megalodon_lite.train``).

``config.json`` is the entry point and the commit point: a save writes the new tensor files beside
the old ones, then replaces ``config.json`` atomically (temporary file + ``os.replace``), then
deletes the tensor files no longer named. Loading verifies SHA-256 hashes and never unpickles
anything.
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

from megalodon_lite.baseline import LlamaConfig, LlamaLM
from megalodon_lite.config import MegalodonConfig
from megalodon_lite.model import MegalodonLM

FORMAT = "megalodon-lite"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_GLOB = "model-*.safetensors"
TRAINING_GLOB = "training-*.safetensors"
MODEL_KINDS: dict[str, tuple[type, type]] = {"megalodon": (MegalodonLM, MegalodonConfig), "llama": (LlamaLM, LlamaConfig)}
"""Model kind -> (model class, config class)."""


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


def model_kind(model: object) -> str:
    """``"megalodon"`` or ``"llama"``; TypeError for anything else."""
    for kind, (model_class, _) in MODEL_KINDS.items():
        if isinstance(model, model_class):
            return kind
    raise TypeError(f"model must be a MegalodonLM or a LlamaLM, got {type(model).__name__}")


def _weights_and_ties(model: MegalodonLM | LlamaLM) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _named_files(directory: Path) -> set[str]:
    """The tensor files the current ``config.json`` names (empty if there is none or it is unreadable)."""
    try:
        manifest = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        names = {manifest.get("weights")}
        training = manifest.get("training")
        if isinstance(training, dict):
            names.add(training.get("tensors"))
        return {n for n in names if isinstance(n, str)}
    except (OSError, ValueError, AttributeError):
        return set()


def _write_tensors(directory: Path, tensors: dict[str, torch.Tensor], prefix: str) -> tuple[Path, str]:
    """Write ``tensors`` to a temporary safetensors file in ``directory``: (its path, its SHA-256)."""
    tmp = _temp_path(directory, "safetensors")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "content": prefix})
        _finish_file(tmp)
        return tmp, _sha256(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(model: MegalodonLM | LlamaLM, directory: str | os.PathLike, *,
                    training: dict | None = None, training_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s kind, config and weights into ``directory`` (created if needed); return its path.

    ``training`` (JSON-ready dict) and ``training_tensors`` (name -> tensor) make it a training
    checkpoint: both are stored, the tensors in their own safetensors file, and come back from
    :func:`load_training_state`. A save without them leaves a plain model checkpoint.

    Atomic: until the final ``os.replace`` of ``config.json`` the previous checkpoint in
    ``directory`` is untouched and loadable; temporary files are removed when the save fails.
    """
    kind = model_kind(model)
    if training_tensors is not None and training is None:
        raise ValueError("training_tensors need a training state dict to go with them")
    if training is not None:
        json.dumps(training)  # refuse what JSON cannot hold before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, ties = _weights_and_ties(model)
    previous = _named_files(directory)
    temporary: list[Path] = []
    placed: list[Path] = []
    try:
        weights_tmp, digest = _write_tensors(directory, tensors, "weights")
        temporary.append(weights_tmp)
        files = {f"model-{digest[:16]}.safetensors": weights_tmp}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "model": kind, "config": model.config.to_dict(),
                    "weights": f"model-{digest[:16]}.safetensors", "weights_sha256": digest, "tied": ties}
        if training is not None:
            extra = {name: t.detach().to("cpu").contiguous() for name, t in (training_tensors or {}).items()}
            training_tmp, training_digest = _write_tensors(directory, extra, "training")
            temporary.append(training_tmp)
            files[f"training-{training_digest[:16]}.safetensors"] = training_tmp
            manifest["training"] = {"state": training, "tensors": f"training-{training_digest[:16]}.safetensors",
                                    "tensors_sha256": training_digest}
        config_tmp = _temp_path(directory, "json")
        temporary.append(config_tmp)
        config_tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _finish_file(config_tmp)
        for name, tmp in files.items():
            os.replace(tmp, directory / name)
            temporary.remove(tmp)
            placed.append(directory / name)
        os.replace(config_tmp, directory / CONFIG_FILE)  # the commit point
        temporary.remove(config_tmp)
    except BaseException:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
        named = _named_files(directory)
        for path in placed:
            if path.name not in previous and path.name not in named:
                path.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    keep = set(files)
    for stale in [*directory.glob(WEIGHTS_GLOB), *directory.glob(TRAINING_GLOB)]:
        if stale.name not in keep:
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
    manifest.setdefault("model", "megalodon")  # written before the baseline existed
    if manifest["model"] not in MODEL_KINDS:
        raise CheckpointError(f"{path}: 'model' must be one of {sorted(MODEL_KINDS)}, got {manifest['model']!r}")
    training = manifest.get("training")
    if training is not None:
        if not (isinstance(training, dict) and isinstance(training.get("state"), dict)
                and isinstance(training.get("tensors"), str) and isinstance(training.get("tensors_sha256"), str)):
            raise CheckpointError(f"{path}: 'training' must hold a 'state' dict and the 'tensors' file and its hash")
        if Path(training["tensors"]).name != training["tensors"]:
            raise CheckpointError(f"{path}: training 'tensors' must be a file name inside the folder")
    return manifest


def load_config(directory: str | os.PathLike) -> MegalodonConfig | LlamaConfig:
    """The model config stored in a checkpoint folder (its class says the model kind)."""
    manifest = read_manifest(directory)
    config_class = MODEL_KINDS[manifest["model"]][1]
    try:
        return config_class.from_dict(manifest["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: bad config: {err}") from None


def _load_tensors(path: Path, digest: str, device: str, verify: bool, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file named in the manifest, its hash checked first when ``verify``."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} named in {CONFIG_FILE} is missing")
    if verify and _sha256(path) != digest:
        raise CheckpointError(f"{what} {path} does not have the SHA-256 recorded in {CONFIG_FILE}: "
                              "it is truncated or corrupted")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {what} {path}: {err}") from None


def load_training_state(directory: str | os.PathLike, *, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """The training state saved with a checkpoint: (JSON state, tensors on the CPU).

    Raises :class:`CheckpointError` when the folder holds no training state or its file is damaged.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    training = manifest.get("training")
    if training is None:
        raise CheckpointError(f"{directory} holds a model but no training state (it was not saved by a trainer)")
    tensors = _load_tensors(directory / training["tensors"], training["tensors_sha256"], "cpu", verify,
                            "training state file")
    return training["state"], tensors


def load_checkpoint(directory: str | os.PathLike, model: MegalodonLM | LlamaLM | None = None, *,
                    device: str | torch.device = "cpu", verify: bool = True) -> MegalodonLM | LlamaLM:
    """Load a checkpoint into ``model`` (same kind, equal config) or into a new model on ``device``.

    A new model takes the dtype the weights were saved in (e.g. bfloat16) and comes back in eval mode
    (dropout off, ready for inference; call ``.train()`` to train it); an existing model keeps its own
    dtype, device and mode, the weights being cast on copy (as ``load_state_dict`` does). ``verify``
    checks the weights' SHA-256 first (reads the file twice; turn off only for speed with a trusted
    file). Raises :class:`CheckpointError` (a ValueError) naming the problem.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = load_config(directory)
    model_class = MODEL_KINDS[manifest["model"]][0]
    new_model = model is None
    if new_model:
        model = model_class(config).to(device)
    elif model_kind(model) != manifest["model"]:
        raise CheckpointError(f"checkpoint {directory} holds a {manifest['model']} model, "
                              f"not a {type(model).__name__}")
    else:
        differ = [name for name in config.differences(model.config) if name != "backend"]  # code, not weights
        if differ:
            details = ", ".join(f"{name} (checkpoint {getattr(config, name)!r}, model {getattr(model.config, name)!r})"
                                for name in differ)
            raise CheckpointError(f"checkpoint config does not match the model's: {details}")
    target_device = next(model.parameters()).device
    tensors = _load_tensors(directory / manifest["weights"], manifest["weights_sha256"], str(target_device), verify,
                            "weights file")
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
