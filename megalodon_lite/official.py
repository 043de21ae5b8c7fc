"""Convert between the official Megalodon code's state dicts and :class:`~megalodon_lite.model.MegalodonLM`.

The official code (github.com/XuezheMax/megalodon, checked against commit ``cff8ba5``) saves a
consolidated checkpoint as the ``state_dict()`` of its ``Mega`` module. Its names and shapes differ
from ours in a few places, all of them layout only:

=====================================================  ==========================================
official (``Mega``)                                     ours (``MegalodonLM``)
=====================================================  ==========================================
``embed.weight`` (V, D)                                 ``embed.weight``
``layers.{i}.mega.timenorm.{weight,bias}`` (D,)         ``blocks.{i}.mega.timenorm.{weight,bias}``
``layers.{i}.mega.timenorm.prior_count`` () int64,      none: our TimestepNorm always starts from
``prior_mean``, ``prior_logv`` (G,) buffers              count 0, mean 0, variance 1 (the official
                                                        defaults, which a checkpoint must hold)
``layers.{i}.mega.cema.{alpha,delta}`` (D, N, 1),       ``blocks.{i}.mega.cema.*`` (same shapes)
``theta`` (D, 1, 1), ``gamma`` (D, N, 2)
``layers.{i}.mega.cema.omega`` (D, 1)                   ``blocks.{i}.mega.cema.omega`` (D,)
``layers.{i}.mega.rmsnorm.weight`` (D,)                 ``blocks.{i}.mega.rmsnorm.weight``
``layers.{i}.mega.{wz,wv,wr,wh1}.{weight,bias}``,       ``blocks.{i}.mega.{wz,wv,wr,wh1,wh2}.*``
``layers.{i}.mega.wh2.weight``
``layers.{i}.mega.{gamma,beta}`` (2, z_dim)             ``blocks.{i}.mega.attention.{gamma,beta}``
                                                        (2, H, z_dim / H)
``layers.{i}.nffn.norm.{weight,bias}`` (D,)             ``blocks.{i}.ffn.norm.{weight,bias}``
``layers.{i}.nffn.{fc1,fc2,fc3}.weight``,               ``blocks.{i}.ffn.{fc1,fc2,fc3}.weight``,
``layers.{i}.nffn.alpha`` (D,)                          ``blocks.{i}.ffn.alpha``
``rope.freqs`` (z_dim / H / 2,) buffer                  none: computed from ``rope_base``
``output.final_norm.{weight,bias}`` and its prior       ``final_norm.{weight,bias}``
``output.output.weight`` (V, D)                         ``head.weight``
=====================================================  ==========================================

(``fc3`` exists with ``swiglu``, ``alpha`` with ``rescale_nffn``; with ``share_emb`` the output
weight is the embedding, and both names hold the same values.) Only unsharded checkpoints are
understood: ``model_parallel_size`` 1, one ``consolidated.pth``. The config maps field for field
(:func:`config_from_official`, :func:`config_to_official`): the official ``ModelConf`` names are
ours.

    from megalodon_lite.official import config_from_official, load_official
    model = load_official(torch.load("consolidated.pth"), config_from_official(model_conf_dict))

Every refusal is an :class:`OfficialFormatError` naming the key and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from megalodon_lite.config import MegalodonConfig
from megalodon_lite.model import MegalodonLM

OFFICIAL_COMMIT = "cff8ba5f607a2176bbd0166afc09842984433f93"
"""The commit of github.com/XuezheMax/megalodon whose names and shapes this module follows."""

# The official ModelConf and its defaults (megalodon/config.py#L40-L70 at OFFICIAL_COMMIT): a saved
# config may leave any of them out.
_MODELCONF_DEFAULTS: dict[str, Any] = {
    "num_layers": 8, "model_dim": 1024, "z_dim": 256, "value_dim": 2048, "num_heads": 1, "ffn_hidden_dim": 2048,
    "cema_ndim": 16, "chunk_size": 2048, "efficient_attn": None, "init_mode": "he", "vocab_size": -1,
    "output_size": -1, "norm_num_groups": 32, "norm_affine": True, "norm_eps": 1e-5, "rope_base": None,
    "dropout": 0.0, "hidden_dropout": 0.0, "attention_dropout": 0.0, "swiglu": False, "rescale_nffn": False,
    "scale_emb": False, "share_emb": False, "layerwise_ckpt": False,
}
# Fields that choose how the official code runs (fused attention, activation checkpointing), not
# what it computes; dropped.
_RUNTIME_FIELDS = ("efficient_attn", "layerwise_ckpt")


class OfficialFormatError(ValueError):
    """A state dict or config does not have the official names, shapes or values we understand."""


# --------------------------------------------------------------------------------------------
# configuration


def config_from_official(values: Mapping[str, Any]) -> MegalodonConfig:
    """A :class:`MegalodonConfig` from the fields of the official ``ModelConf`` (a dict).

    Fields left out take the official defaults. ``vocab_size`` must be set (the official default -1
    means "from the tokenizer"); ``rope_base=None`` is the official default base 10000;
    ``efficient_attn`` and ``layerwise_ckpt`` choose how the official code runs and are dropped
    (its fused attention drops keys, not probabilities, under attention dropout: chapter 06).
    Unknown fields are refused.
    """
    if not isinstance(values, Mapping):
        raise OfficialFormatError(f"the official config must be a mapping of ModelConf fields, got "
                                  f"{type(values).__name__}")
    unknown = sorted(set(values) - set(_MODELCONF_DEFAULTS))
    if unknown:
        raise OfficialFormatError(f"unknown official ModelConf field(s): {', '.join(unknown)}")
    fields = {**_MODELCONF_DEFAULTS, **values}
    if fields["vocab_size"] in (-1, None):
        raise OfficialFormatError("ModelConf.vocab_size must be set (the official default -1 defers it to "
                                  "the tokenizer; LLaMA-2's is 32000)")
    if fields.pop("output_size") not in (-1, fields["vocab_size"]):
        raise OfficialFormatError(f"ModelConf.output_size={values['output_size']!r} is not supported "
                                  "(only -1: one logit per token id)")
    if fields.pop("norm_affine") is not True:
        raise OfficialFormatError("ModelConf.norm_affine=False is not supported (every norm here has its scale)")
    for name in _RUNTIME_FIELDS:
        fields.pop(name)
    if fields["rope_base"] is None:
        fields["rope_base"] = 10000.0
    return MegalodonConfig(**fields)


def config_to_official(config: MegalodonConfig) -> dict[str, Any]:
    """Every official ``ModelConf`` field for ``config`` (ours have the same names; the others take
    the official defaults)."""
    if not isinstance(config, MegalodonConfig):
        raise TypeError(f"config must be a MegalodonConfig, got {type(config).__name__}")
    values = {name: getattr(config, name) for name in _MODELCONF_DEFAULTS if hasattr(config, name)}
    return {**_MODELCONF_DEFAULTS, **values}


# --------------------------------------------------------------------------------------------
# the name map


def _rope_freqs(config: MegalodonConfig) -> Tensor:
    """The official ``rope.freqs`` buffer: 1 / base^(j / dz) for j = 0, 2, ..., float32."""
    dz = config.z_head_dim
    return 1.0 / torch.tensor([config.rope_base ** (j / dz) for j in range(0, dz, 2)], dtype=torch.float32)


def _name_map(config: MegalodonConfig) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
    """(official name, our name, official shape, our shape) for every parameter."""
    D, V, Z, E, F = config.model_dim, config.vocab_size, config.z_dim, config.value_dim, config.ffn_hidden_dim
    N, H = config.cema_ndim, config.num_heads
    rows = [("embed.weight", "embed.weight", (V, D), (V, D))]
    for i in range(config.num_layers):
        o, u = f"layers.{i}.", f"blocks.{i}."
        rows += [
            (o + "mega.timenorm.weight", u + "mega.timenorm.weight", (D,), (D,)),
            (o + "mega.timenorm.bias", u + "mega.timenorm.bias", (D,), (D,)),
            (o + "mega.cema.alpha", u + "mega.cema.alpha", (D, N, 1), (D, N, 1)),
            (o + "mega.cema.delta", u + "mega.cema.delta", (D, N, 1), (D, N, 1)),
            (o + "mega.cema.theta", u + "mega.cema.theta", (D, 1, 1), (D, 1, 1)),
            (o + "mega.cema.gamma", u + "mega.cema.gamma", (D, N, 2), (D, N, 2)),
            (o + "mega.cema.omega", u + "mega.cema.omega", (D, 1), (D,)),
            (o + "mega.rmsnorm.weight", u + "mega.rmsnorm.weight", (D,), (D,)),
        ]
        for name, (rows_, cols) in {"wz": (Z, D), "wv": (E, D), "wr": (E, D), "wh1": (D, D)}.items():
            rows += [(o + f"mega.{name}.weight", u + f"mega.{name}.weight", (rows_, cols), (rows_, cols)),
                     (o + f"mega.{name}.bias", u + f"mega.{name}.bias", (rows_,), (rows_,))]
        rows += [
            (o + "mega.wh2.weight", u + "mega.wh2.weight", (D, E), (D, E)),
            (o + "mega.gamma", u + "mega.attention.gamma", (2, Z), (2, H, Z // H)),
            (o + "mega.beta", u + "mega.attention.beta", (2, Z), (2, H, Z // H)),
            (o + "nffn.norm.weight", u + "ffn.norm.weight", (D,), (D,)),
            (o + "nffn.norm.bias", u + "ffn.norm.bias", (D,), (D,)),
            (o + "nffn.fc1.weight", u + "ffn.fc1.weight", (F, D), (F, D)),
            (o + "nffn.fc2.weight", u + "ffn.fc2.weight", (D, F), (D, F)),
        ]
        if config.swiglu:
            rows.append((o + "nffn.fc3.weight", u + "ffn.fc3.weight", (F, D), (F, D)))
        if config.rescale_nffn:
            rows.append((o + "nffn.alpha", u + "ffn.alpha", (D,), (D,)))
    rows += [
        ("output.final_norm.weight", "final_norm.weight", (D,), (D,)),
        ("output.final_norm.bias", "final_norm.bias", (D,), (D,)),
        ("output.output.weight", "head.weight", (V, D), (V, D)),
    ]
    return rows


def _norm_prefixes(config: MegalodonConfig) -> list[str]:
    """The official TimestepNorm modules, whose prior buffers a checkpoint also holds."""
    return [f"layers.{i}.mega.timenorm." for i in range(config.num_layers)] + ["output.final_norm."]


def official_shapes(config: MegalodonConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official ``Mega(config).state_dict()`` and its shape, buffers included."""
    shapes = {official: shape for official, _, shape, _ in _name_map(config)}
    for prefix in _norm_prefixes(config):
        shapes.update({prefix + "prior_count": (), prefix + "prior_mean": (config.norm_num_groups,),
                       prefix + "prior_logv": (config.norm_num_groups,)})
    shapes["rope.freqs"] = (config.z_head_dim // 2,)
    return shapes


# --------------------------------------------------------------------------------------------
# conversion


def _check_official(state_dict: Mapping[str, Tensor], config: MegalodonConfig) -> None:
    """Names, shapes and the values we cannot represent (priors, RoPE base, tied weights)."""
    if not isinstance(state_dict, Mapping):
        raise OfficialFormatError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    shapes = official_shapes(config)
    missing = [name for name in shapes if name not in state_dict]
    unexpected = [name for name in state_dict if name not in shapes]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): "
                         f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise OfficialFormatError("not an official Megalodon state dict for this config (num_layers="
                                  f"{config.num_layers}, swiglu={config.swiglu}, rescale_nffn={config.rescale_nffn}): "
                                  + "; ".join(parts))
    for name, shape in shapes.items():
        value = state_dict[name]
        if not isinstance(value, Tensor):
            raise OfficialFormatError(f"{name} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise OfficialFormatError(f"{name} must have shape {shape} for this config, got {tuple(value.shape)}")
    for prefix in _norm_prefixes(config):
        count, mean, logv = (state_dict[prefix + p] for p in ("prior_count", "prior_mean", "prior_logv"))
        if int(count) != 0 or bool(mean.any()) or bool(logv.any()):
            raise OfficialFormatError(f"{prefix}prior_* must be the official defaults (count 0, mean 0, log-variance "
                                      "0): this package's TimestepNorm has no learned prior")
    freqs = state_dict["rope.freqs"]
    expected = _rope_freqs(config).to(freqs.dtype)
    if not torch.allclose(freqs.float(), expected.float(), rtol=2 * torch.finfo(freqs.dtype).eps, atol=0):
        implied = float(freqs[1].double() ** (-config.z_head_dim / 2)) if freqs.numel() > 1 else float("nan")
        raise OfficialFormatError(f"rope.freqs do not match rope_base={config.rope_base} (they imply a base of "
                                  f"about {implied:.6g}); set rope_base in the config")
    if config.share_emb and not torch.equal(state_dict["output.output.weight"], state_dict["embed.weight"]):
        raise OfficialFormatError("share_emb=True, but output.output.weight differs from embed.weight")


def from_official(state_dict: Mapping[str, Tensor], config: MegalodonConfig) -> dict[str, Tensor]:
    """Our ``MegalodonLM`` state dict from an official one (values unchanged, only names and layouts).

    Args:
        state_dict: ``Mega.state_dict()`` of the official code, unsharded.
        config: the model's shape (e.g. :func:`config_from_official` of its ``ModelConf``).

    Returns:
        A dict that ``MegalodonLM(config).load_state_dict`` takes with ``strict=True``.
    """
    if not isinstance(config, MegalodonConfig):
        raise TypeError(f"config must be a MegalodonConfig, got {type(config).__name__}")
    _check_official(state_dict, config)
    return {ours: state_dict[official].reshape(shape) for official, ours, _, shape in _name_map(config)}


def to_official(model: MegalodonLM) -> dict[str, Tensor]:
    """The official ``Mega.state_dict()`` for our model: parameters renamed and reshaped, plus the
    official buffers (TimestepNorm priors at their defaults, ``rope.freqs``) in the parameters' dtype,
    as a consolidated official checkpoint holds them."""
    if not isinstance(model, MegalodonLM):
        raise TypeError(f"model must be a MegalodonLM, got {type(model).__name__}")
    config, ours = model.config, model.state_dict()
    out = {official: ours[name].reshape(shape) for official, name, shape, _ in _name_map(config)}
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    for prefix in _norm_prefixes(config):
        out[prefix + "prior_count"] = torch.zeros((), dtype=torch.int64, device=device)
        out[prefix + "prior_mean"] = torch.zeros(config.norm_num_groups, dtype=dtype, device=device)
        out[prefix + "prior_logv"] = torch.zeros(config.norm_num_groups, dtype=dtype, device=device)
    out["rope.freqs"] = _rope_freqs(config).to(dtype=dtype, device=device)
    return {name: out[name] for name in official_shapes(config)}  # in the official module order


def load_official(state_dict: Mapping[str, Tensor], config: MegalodonConfig) -> MegalodonLM:
    """A ``MegalodonLM(config)`` holding the official state dict's values (in float32 parameters)."""
    model = MegalodonLM(config)
    model.load_state_dict(from_official(state_dict, config), strict=True)
    return model
