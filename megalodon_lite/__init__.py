"""megalodon-lite: Megalodon (Ma et al. 2024, arXiv 2404.08801) built chapter by chapter.

The main pieces are importable from the package itself::

    from megalodon_lite import MegalodonLM, preset, save_checkpoint, load_checkpoint
    model = MegalodonLM(preset("tiny"))
    logits, state = model(tokens)            # (B, L) int64 -> (B, L, V) float32, streaming state

Most modules here are generated from the chapters in ``chapters/`` (their first line says which);
edit the chapter and run ``python -m megalodon_lite.export``. Hand-written modules: ``export``
(the generator), ``book`` and ``book_html`` (build the executed, offline book), ``chapters`` (finds
the chapters, in a checkout or installed, and copies them out), ``student`` and ``exercises`` (the
student edition and the exercises' checks), ``checkpoint`` (atomic, verified save and load),
``validate`` (the argument checks every public boundary calls), ``official`` (state dicts and
configs of the official code, both ways), ``backend`` (Triton or PyTorch), ``cli`` with ``commands`` (the
``megalodon-lite`` command), ``parallel_train`` (the ``train`` command's trainer over several
processes under torchrun), ``decoding`` (the decoding step on fixed-size buffers, replayed as a
CUDA graph) and ``notebook`` (what every chapter uses: smoke mode, device, seeding,
timing, figure saving).

Names are imported lazily (PEP 562), so ``import megalodon_lite`` is cheap and the exporter keeps
working while a generated module is being rewritten.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (the chapter that builds it in brackets)
_EXPORTS = {
    # chapter 01
    "ema_recurrence": "ema", "ema_convolution": "ema", "ema_fft": "ema", "ema_kernel": "ema",
    "fft_causal_conv": "ema",
    # chapters 02-03
    "DampedEMA": "mega_ema", "MovingAverageGatedAttention": "mega", "MegaBlock": "mega", "MegaLM": "mega",
    # chapter 04
    "CEMA": "cema",
    # chapter 05
    "TimestepNorm": "timestep_norm", "TimestepNormState": "timestep_norm",
    # chapter 06
    "RMSNorm": "attention", "RotaryEmbedding": "attention", "ChunkAttention": "attention",
    "ChunkKVCache": "attention",
    # chapter 07
    "MegalodonConfig": "config", "PRESETS": "config", "preset": "config",
    "MegalodonLayer": "model", "MegalodonBlock": "model", "MegalodonLM": "model", "MegalodonState": "model",
    "LayerState": "model",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "CheckpointError": "checkpoint",
    # chapter 10
    "load_corpus": "data", "mqar_batch": "data", "passkey_batch": "data",
    "LlamaConfig": "baseline", "LlamaLM": "baseline", "matched_llama_config": "baseline",
    "TrainConfig": "train", "Trainer": "train",
    # chapter 11
    "ChunkParallelLM": "parallel", "init_chunk_parallel": "parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megalodon_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"megalodon_lite.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
