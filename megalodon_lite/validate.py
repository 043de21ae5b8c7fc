"""Argument checks at the package's public boundaries (hand-written, out of the book's reading path).

Every public function and module of ``megalodon_lite`` calls one function here, once, before it
computes anything, so the chapters can show the idea and a caller still gets an error that names
the argument and says what was expected: ``TypeError`` for a wrong type or dtype, ``ValueError``
for a wrong shape or value. Nothing is silently broadcast, truncated or cast.

The first block holds the primitives; the blocks after it hold one checker per boundary, named
after what they guard (``cema_inputs`` for the three CEMA forms, ``timestep_norm_inputs`` for the
two TimestepNorm forms, ``chunk_attention_inputs`` for ``ChunkAttention.forward``, ...).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import Tensor

from megalodon_lite.backend import check_backend

# --------------------------------------------------------------------------------------------
# primitives


def _describe(value: object) -> str:
    """What a wrong value is, for an error message: a tensor's dtype, else its type's name."""
    return str(value.dtype) if isinstance(value, Tensor) else type(value).__name__


def tensor(name: str, value: object) -> Tensor:
    """TypeError unless ``value`` is a torch.Tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def float_tensor(name: str, value: object) -> Tensor:
    """TypeError unless ``value`` is a tensor of a real floating dtype (float16/bfloat16/32/64)."""
    if not tensor(name, value).is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


def complex_tensor(name: str, value: object) -> Tensor:
    """TypeError unless ``value`` is a tensor of a complex dtype."""
    if not isinstance(value, Tensor) or not value.is_complex():
        raise TypeError(f"{name} must be a complex tensor, got {_describe(value)}")
    return value


def exact_dtype(name: str, value: object, dtype: torch.dtype, what: str = "") -> Tensor:
    """TypeError unless ``value`` is a tensor of exactly ``dtype`` (``what`` adds the expected shape)."""
    if not isinstance(value, Tensor) or value.dtype != dtype:
        raise TypeError(f"{name} must be a {dtype} tensor{' ' + what if what else ''}, got {_describe(value)}")
    return value


def shape(name: str, value: Tensor, expected: tuple[int, ...], what: str = "") -> None:
    """ValueError unless ``value.shape == expected``; ``what`` names the dims, e.g. ``"(B, D, N) = "``."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what}{tuple(expected)}, got {tuple(value.shape)}")


def same_device(name: str, value: Tensor, other_name: str, other: Tensor) -> None:
    """ValueError unless two tensors live on the same device."""
    if value.device != other.device:
        raise ValueError(f"{name} is on {value.device}, {other_name} on {other.device}")


def positive_int(name: str, value: object) -> int:
    """ValueError unless ``value`` is an int >= 1 (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_ints(**values: object) -> None:
    """:func:`positive_int` for each keyword, e.g. ``positive_ints(model_dim=model_dim, cema_ndim=n)``."""
    for name, value in values.items():
        positive_int(name, value)


def positive_number(name: str, value: object) -> float:
    """ValueError unless ``value`` is a number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def divides(name: str, value: int, other_name: str, other: int) -> None:
    """ValueError unless the positive int ``value`` divides ``other``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or other % value:
        raise ValueError(f"{name} must be a positive int dividing {other_name}={other}, got {value!r}")


def one_of(name: str, value: Any, choices: tuple) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def channels(name: str, x: object, size_name: str, size: int) -> None:
    """ValueError when a (B, L, D) tensor has D != size (other problems are left to the full check)."""
    if isinstance(x, Tensor) and x.dim() == 3 and x.shape[-1] != size:
        raise ValueError(f"{name} must have {size_name}={size} channels in its last dim, got {tuple(x.shape)}")


def sequence(name: str, x: object, channels: int | None = None) -> Tensor:
    """A (B, L, D) floating tensor with at least one step; D = ``channels`` when given."""
    float_tensor(name, x)
    if x.dim() != 3 or (channels is not None and x.shape[-1] != channels):
        expected = "(B, L, D)" if channels is None else f"(B, L, D={channels})"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one time step (L >= 1), got shape {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------
# chapters 01-03: the EMA, MEGA's damped EMA, MEGA


def ema_sequence(x: object) -> Tensor:
    """``x`` must be a real floating tensor of shape (B, L, D) with L >= 1."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, L, D), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a real floating dtype, got {x.dtype}")
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, L, D), got {x.ndim} dims with shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"x must hold at least one time step (L >= 1), got shape {tuple(x.shape)}")
    return x


def ema_alpha(alpha: object, channels: int | None = None, device: torch.device | None = None) -> None:
    """``alpha`` must be a real floating (D,) tensor strictly inside (0, 1).

    The range check reduces on ``alpha``'s device and reads one bool back, so on CUDA it waits for
    the GPU (a host sync). It catches a saturated sigmoid (alpha rounded to 0 or 1) at the call.
    """
    if not isinstance(alpha, Tensor):
        raise TypeError(f"alpha must be a torch.Tensor of shape (D,), got {type(alpha).__name__}")
    if not alpha.is_floating_point():
        raise TypeError(f"alpha must have a real floating dtype, got {alpha.dtype}")
    if alpha.ndim != 1 or (channels is not None and alpha.shape[0] != channels):
        expected = "(D,)" if channels is None else f"(D,) = ({channels},), matching x's last dim"
        raise ValueError(f"alpha must have shape {expected}, got {tuple(alpha.shape)}")
    if device is not None and alpha.device != device:
        raise ValueError(f"alpha must be on x's device {device}, got {alpha.device}")
    if not bool(((alpha > 0) & (alpha < 1)).all()):
        raise ValueError("alpha must lie strictly inside (0, 1) (0 would ignore the input, 1 the past); "
                         f"got values in [{alpha.min().item():.6g}, {alpha.max().item():.6g}]")


def ema_inputs(x: object, alpha: object) -> None:
    """The arguments of ``ema_recurrence``, ``ema_convolution`` and ``ema_fft``."""
    ema_sequence(x)
    ema_alpha(alpha, channels=x.shape[2], device=x.device)


def kernel_length(length: object) -> int:
    """An int (or anything with ``__index__``) >= 1."""
    try:
        length = operator.index(length)
    except TypeError:
        raise TypeError(f"length must be an int, got {type(length).__name__}") from None
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    return length


def causal_conv_inputs(x: object, kernel: object) -> None:
    """x (B, L, D) real floating with L >= 1; kernel (D, L) real floating on x's device."""
    ema_sequence(x)
    _, length, channels = x.shape
    if not isinstance(kernel, Tensor):
        raise TypeError(f"kernel must be a torch.Tensor of shape (D, L), got {type(kernel).__name__}")
    if not kernel.is_floating_point():
        raise TypeError(f"kernel must have a real floating dtype, got {kernel.dtype}")
    if tuple(kernel.shape) != (channels, length):
        raise ValueError(f"kernel must have shape (D, L) = ({channels}, {length}) to match x of shape "
                         f"(B, L, D) = {tuple(x.shape)}, got {tuple(kernel.shape)}")
    if kernel.device != x.device:
        raise ValueError(f"kernel must be on x's device {x.device}, got {kernel.device}")


def damped_ema_coefficients(alpha: object, delta: object, beta: object, eta: object) -> None:
    """The (D, N) coefficient tensors of MEGA's damped EMA, all the same shape and floating."""
    for name, value in (("alpha", alpha), ("delta", delta), ("beta", beta), ("eta", eta)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 2:
            raise ValueError(f"{name} must have shape (D, N), got {tuple(value.shape)}")
        if value.shape != alpha.shape:
            raise ValueError(f"{name} must have the same shape (D, N) as alpha {tuple(alpha.shape)}, "
                             f"got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def positive_int_or_none(name: str, value: object) -> None:
    """None, or an int >= 1 (bools are refused)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def damped_ema_input(x: object, model_dim: int, ndim: int | None = None, h0: object = None) -> None:
    """x (B, L, D) real floating with L >= 1 and D = model_dim, and the optional state h0 (B, D, N)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != model_dim or x.shape[1] < 1:
        raise ValueError(f"x must have shape (B, L, D) with L >= 1 and D = {model_dim}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if h0 is not None:
        if not isinstance(h0, Tensor):
            raise TypeError(f"h0 must be a torch.Tensor or None, got {type(h0).__name__}")
        if not h0.is_floating_point():
            raise TypeError(f"h0 must be a floating-point tensor, got {h0.dtype}")
        expected = (x.shape[0], model_dim, ndim)
        if tuple(h0.shape) != expected:
            raise ValueError(f"h0 must have shape (B, D, N) = {expected}, got {tuple(h0.shape)}")


# --------------------------------------------------------------------------------------------
# chapter 04: CEMA


def cema_parameters(alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor) -> None:
    """The raw CEMA parameters: alpha, delta (D, N, 1), theta (D, 1, 1), gamma (D, N, 2), all float."""
    for name, value in (("alpha", alpha), ("delta", delta), ("theta", theta), ("gamma", gamma)):
        float_tensor(name, value)
    if alpha.dim() != 3 or alpha.shape[-1] != 1:
        raise ValueError(f"alpha must have shape (D, N, 1), got {tuple(alpha.shape)}")
    model_dim, cema_ndim, _ = alpha.shape
    shape("delta", delta, (model_dim, cema_ndim, 1))
    shape("theta", theta, (model_dim, 1, 1))
    shape("gamma", gamma, (model_dim, cema_ndim, 2))


def cema_powers_args(q: object, length: object) -> None:
    """q a complex (D, N) tensor, length an int >= 0."""
    complex_tensor("q", q)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")


def cema_inputs(x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor, h0: Tensor | None) -> None:
    """The arguments shared by ``cema_recurrence``, ``cema_fft`` and ``cema_chunked``.

    x (B, L, D) floating with L >= 1; p (D, N) float32 or float64; q, gamma (D, N) of the matching
    complex dtype (complex64 for float32 p, complex128 for float64 p); omega (D,) floating; h0
    None or (B, D, N) of that complex dtype.
    """
    sequence("x", x)
    batch, _, model_dim = x.shape
    float_tensor("p", p)
    if p.dim() != 2 or p.shape[0] != model_dim:
        raise ValueError(f"p must have shape (D={model_dim}, N), got {tuple(p.shape)} (x has D={model_dim})")
    if p.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"p must be float32 or float64, got {p.dtype}")
    cema_ndim = p.shape[1]
    complex_ = torch.complex128 if p.dtype == torch.float64 else torch.complex64
    for name, value in (("q", q), ("gamma", gamma)):
        complex_tensor(name, value)
        if value.dtype != complex_:
            raise TypeError(f"{name} must be {complex_} (p is {p.dtype}), got {value.dtype}")
        shape(name, value, (model_dim, cema_ndim))
    float_tensor("omega", omega)
    shape("omega", omega, (model_dim,))
    if h0 is not None:
        exact_dtype("h0", h0, complex_, "(B, D, N)")
        shape("h0", h0, (batch, model_dim, cema_ndim), "(B, D, N) = ")


# --------------------------------------------------------------------------------------------
# chapter 05: TimestepNorm


def timestep_norm_inputs(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int,
                         state: Any, padding_mask: Tensor | None) -> None:
    """The arguments of ``timestep_norm`` and ``timestep_norm_reference``.

    x (B, L, D) floating with B, L >= 1; num_groups a positive int dividing D; weight, bias (D,)
    floating; padding_mask None or (B, L) bool on x's device; state None or a (count, mean, var)
    triple: count (B,) int64, mean and var (B, G) floating, all on x's device. On the CPU the
    state's values are checked too (count >= 0, a finite mean, a finite variance >= 0); on an
    accelerator reading them back would wait for every queued kernel, at every decoding step.
    """
    float_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, L, D), got {tuple(x.shape)}")
    batch, length, channels = x.shape
    if length == 0 or batch == 0:
        raise ValueError(f"x must have at least one batch row and one step, got shape {tuple(x.shape)}")
    divides("num_groups", num_groups, "D", channels)
    for name, value in (("weight", weight), ("bias", bias)):
        float_tensor(name, value)
        shape(name, value, (channels,), "(D,) = ")
    if padding_mask is not None:
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            raise TypeError(f"padding_mask must be a bool tensor (True = padding), got {_describe(padding_mask)}")
        shape("padding_mask", padding_mask, (batch, length), "(B, L) = ")
        same_device("padding_mask", padding_mask, "x", x)
    if state is None:
        return
    if not (isinstance(state, tuple) and len(state) == 3):
        raise TypeError(f"state must be a TimestepNormState (count, mean, var), got {type(state).__name__}")
    count, mean, var = state
    if not isinstance(count, Tensor) or count.dtype != torch.int64:
        raise TypeError(f"state.count must be an int64 tensor, got {_describe(count)}")
    shape("state.count", count, (batch,), "(B,) = ")
    for name, value in (("state.mean", mean), ("state.var", var)):
        float_tensor(name, value)
        shape(name, value, (batch, num_groups), "(B, G) = ")
    for name, value in (("state.count", count), ("state.mean", mean), ("state.var", var)):
        same_device(name, value, "x", x)
    if x.device.type == "cpu":
        if (count < 0).any():
            raise ValueError(f"state.count must be >= 0, got a minimum of {count.min().item()}")
        if not torch.isfinite(mean).all():
            raise ValueError("state.mean must be finite")
        if not (torch.isfinite(var) & (var >= 0)).all():
            raise ValueError("state.var must be finite and >= 0")


# --------------------------------------------------------------------------------------------
# chapter 06: RMSNorm, RoPE, chunk attention


def last_dim(name: str, x: object, size: int) -> Tensor:
    """A floating tensor (..., size)."""
    float_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(f"{name} must have last dimension {size}, got shape {tuple(x.shape)}")
    return x


def rotary_shape(dim: object, base: object) -> None:
    """RotaryEmbedding's constructor: an even number of channels (rotated in pairs), a base > 1."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be a positive even int (channels are rotated in pairs), got {dim!r}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
        raise ValueError(f"base must be greater than 1, got {base!r}")


def rotary_inputs(x: Tensor, positions: Tensor, dim: int) -> None:
    """x a floating (..., L, dim) tensor; positions integer (L,)."""
    float_tensor("x", x)
    if x.dim() < 2 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (..., L, {dim}), got {tuple(x.shape)}")
    if not isinstance(positions, Tensor) or positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"positions must be an integer tensor, got {_describe(positions)}")
    if positions.dim() != 1 or positions.shape[0] != x.shape[-2]:
        raise ValueError(f"positions must have shape ({x.shape[-2]},) to match x's length, "
                         f"got {tuple(positions.shape)}")


def chunk_attention_shapes(z_dim: int, value_dim: int, num_heads: int, chunk_size: int,
                           attention_dropout: float) -> None:
    """ChunkAttention's constructor: positive sizes, heads dividing both widths, even z head."""
    positive_ints(z_dim=z_dim, value_dim=value_dim, num_heads=num_heads, chunk_size=chunk_size)
    if z_dim % num_heads or value_dim % num_heads:
        raise ValueError(f"z_dim ({z_dim}) and value_dim ({value_dim}) must be divisible by num_heads ({num_heads})")
    if (z_dim // num_heads) % 2:
        raise ValueError(f"z_dim / num_heads must be even (RoPE rotates channel pairs), got "
                         f"{z_dim} / {num_heads} = {z_dim // num_heads}")
    if not 0.0 <= attention_dropout < 1.0:
        raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout!r}")


def chunk_attention_inputs(z: Tensor, v: Tensor, cache: Any, cache_type: type, *, z_dim: int, value_dim: int,
                           num_heads: int, chunk_size: int) -> None:
    """``ChunkAttention.forward``: z (B, L, z_dim) and v (B, L, value_dim) floating, same dtype and
    device; cache None or a ``cache_type`` (the ChunkKVCache class) holding k (B, H, n, z_dim/H) and
    v (B, H, n, value_dim/H) with n < chunk_size, in z's dtype and on z's device."""
    float_tensor("z", z)
    float_tensor("v", v)
    if z.dim() != 3 or z.shape[-1] != z_dim:
        raise ValueError(f"z must have shape (B, L, {z_dim}), got {tuple(z.shape)}")
    if v.dim() != 3 or v.shape[-1] != value_dim:
        raise ValueError(f"v must have shape (B, L, {value_dim}), got {tuple(v.shape)}")
    if v.shape[:2] != z.shape[:2]:
        raise ValueError(f"z and v must have the same batch and length, got {tuple(z.shape[:2])} "
                         f"and {tuple(v.shape[:2])}")
    if v.dtype != z.dtype or v.device != z.device:
        raise TypeError(f"z and v must share dtype and device, got {z.dtype} on {z.device} "
                        f"and {v.dtype} on {v.device}")
    if cache is None:
        return
    if not isinstance(cache, cache_type):
        raise TypeError(f"cache must be a {cache_type.__name__} or None, got {type(cache).__name__}")
    float_tensor("cache.k", cache.k)
    float_tensor("cache.v", cache.v)
    batch, z_head_dim, v_head_dim = z.shape[0], z_dim // num_heads, value_dim // num_heads
    n = cache.k.shape[2] if cache.k.dim() == 4 else -1
    if cache.k.shape != (batch, num_heads, n, z_head_dim) or cache.v.shape != (batch, num_heads, n, v_head_dim):
        raise ValueError(f"cache must hold k (B={batch}, H={num_heads}, n, dz={z_head_dim}) and v "
                         f"(B, H, n, dv={v_head_dim}), got {tuple(cache.k.shape)} and {tuple(cache.v.shape)}")
    if n >= chunk_size:
        raise ValueError(f"cache must hold fewer than chunk_size={chunk_size} tokens, got {n}")
    if (cache.k.dtype != z.dtype or cache.v.dtype != z.dtype or cache.k.device != z.device
            or cache.v.device != z.device):
        raise TypeError(f"cache must have z's dtype and device ({z.dtype} on {z.device}), "
                        f"got {cache.k.dtype}/{cache.v.dtype} on {cache.k.device}/{cache.v.device}")


# --------------------------------------------------------------------------------------------
# chapter 07: the configuration and the language model

_CONFIG_POSITIVE_INTS = ("vocab_size", "num_layers", "model_dim", "z_dim", "value_dim", "num_heads",
                         "ffn_hidden_dim", "chunk_size", "norm_num_groups", "cema_ndim")
_CONFIG_BOOLS = ("swiglu", "rescale_nffn", "scale_emb", "share_emb")
_CONFIG_RATES = ("dropout", "attention_dropout", "hidden_dropout")
_CONFIG_POSITIVE_NUMBERS = ("norm_eps", "rope_base")


def megalodon_config(config: Any, init_modes: tuple[str, ...]) -> None:
    """Every field of a MegalodonConfig, then the shapes that must fit together: heads dividing
    z_dim and value_dim, an even z head (RoPE), norm_num_groups dividing model_dim."""
    for name in _CONFIG_POSITIVE_INTS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"MegalodonConfig.{name} must be a positive int, got {value!r}")
    for name in _CONFIG_BOOLS:
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"MegalodonConfig.{name} must be a bool, got {getattr(config, name)!r}")
    for name in _CONFIG_RATES:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"MegalodonConfig.{name} must be a probability in [0, 1), got {value!r}")
    for name in _CONFIG_POSITIVE_NUMBERS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"MegalodonConfig.{name} must be a positive number, got {value!r}")
    if config.init_mode not in init_modes:
        raise ValueError(f"MegalodonConfig.init_mode must be one of {init_modes}, got {config.init_mode!r}")
    check_backend(config.backend, "MegalodonConfig.backend")
    for name in ("z_dim", "value_dim"):
        if getattr(config, name) % config.num_heads:
            raise ValueError(f"MegalodonConfig.{name}={getattr(config, name)} must be divisible by "
                             f"num_heads={config.num_heads}")
    if (config.z_dim // config.num_heads) % 2:
        raise ValueError(f"MegalodonConfig.z_dim / num_heads = {config.z_dim // config.num_heads} must be even "
                         "(rotary embedding rotates pairs of channels)")
    if config.model_dim % config.norm_num_groups:
        raise ValueError(f"MegalodonConfig.norm_num_groups={config.norm_num_groups} must divide "
                         f"model_dim={config.model_dim}")


def dataclass_fields(cls: type, values: object) -> None:
    """``values`` is a dict naming every required field of the dataclass ``cls`` and no unknown one."""
    if not isinstance(values, dict):
        raise TypeError(f"config values must be a dict, got {type(values).__name__}")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(values) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(values))
    if missing:
        raise ValueError(f"missing {cls.__name__} field(s): {', '.join(missing)}")


def instance(name: str, value: object, cls: type, what: str = "") -> None:
    """TypeError unless ``value`` is an instance of ``cls``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}{what}, got {type(value).__name__}")


def non_negative_int(name: str, value: object) -> int:
    """ValueError unless ``value`` is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def tokens(value: object, vocab_size: int, name: str = "tokens") -> Tensor:
    """A non-empty (B, L) int64/int32 tensor of ids in [0, vocab_size)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(value).__name__}")
    if value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (torch.int64 or torch.int32), got {value.dtype}")
    if value.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, length), got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(value.shape)}")
    # both ends in one reduction and one copy to the host: on a GPU, one synchronisation per forward
    low, high = torch.stack(torch.aminmax(value)).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (vocab_size), got ids from {low} to {high}")
    return value


def sampling(temperature: object, top_k: object, vocab_size: int) -> None:
    """A temperature >= 0 and a top_k that is None or an int in [1, vocab_size]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be None or an int in [1, {vocab_size}], got {top_k!r}")


def megalodon_state(state: object, state_type: type, config: Any, batch_size: int, *,
                    dtype: torch.dtype, device: torch.device) -> None:
    """A streaming state that ``MegalodonLM.forward`` returned for a model of this shape and batch size.

    Checked at the model boundary, so that a state from a differently shaped model (or for another
    batch, precision or device) is refused with the model-level difference (``model_dim``,
    ``cema_ndim``, ``norm_num_groups``, ...) instead of failing deep inside a layer. ``config`` is
    the model's ``MegalodonConfig``; ``dtype`` and ``device`` are its parameters' (the CEMA state is
    complex128 in a float64 model, complex64 otherwise).
    """
    instance("state", state, state_type, " (what forward returned) or None")
    if len(state.layers) != config.num_layers:
        raise ValueError(f"state has {len(state.layers)} layers, the model {config.num_layers}")
    if state.batch_size != batch_size:
        raise ValueError(f"state is for batch size {state.batch_size}, tokens have batch size {batch_size}")
    groups, heads = config.norm_num_groups, config.num_heads
    cema_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64

    def fits(what: str, value: object, dims: tuple[tuple[str, int | None], ...]) -> None:
        if not isinstance(value, Tensor) or value.dim() != len(dims):
            raise ValueError(f"state does not fit this model: {what} must be a tensor of shape "
                             f"({', '.join(name for name, _ in dims)}), got {_describe(value)} "
                             f"{tuple(getattr(value, 'shape', ()))}")
        wrong = [f"{name} {got} (this model: {size})" for (name, size), got in zip(dims, value.shape)
                 if size is not None and got != size]
        if wrong:
            raise ValueError(f"state does not fit this model: in {what}, {', '.join(wrong)}; a state only "
                             "continues the stream of a model of the same shape")
        if value.device != device:
            raise ValueError(f"state does not fit this model: {what} is on {value.device}, the model on {device}")

    batch = ("batch", batch_size)

    def norm_fits(where: str, norm: Any) -> None:
        fits(f"{where} count", norm.count, (batch,))
        for field in ("mean", "var"):
            fits(f"{where} {field}", getattr(norm, field), (batch, ("norm_num_groups", groups)))

    for i, layer in enumerate(state.layers):
        fits(f"layer {i}'s CEMA state", layer.cema, (batch, ("model_dim", config.model_dim),
                                                      ("cema_ndim", config.cema_ndim)))
        if layer.cema.dtype != cema_dtype:
            raise TypeError(f"state does not fit this model: layer {i}'s CEMA state is {layer.cema.dtype}, a "
                            f"{dtype} model keeps {cema_dtype} (convert the model, or start a new stream)")
        norm_fits(f"layer {i}'s norm", layer.norm)
        cached = layer.attention.k.shape[2] if isinstance(layer.attention.k, Tensor) else None
        fits(f"layer {i}'s attention keys", layer.attention.k,
             (batch, ("num_heads", heads), ("cached tokens", cached), ("z_dim / num_heads", config.z_dim // heads)))
        fits(f"layer {i}'s attention values", layer.attention.v,
             (batch, ("num_heads", heads), ("cached tokens", cached),
              ("value_dim / num_heads", config.value_dim // heads)))
        if cached >= config.chunk_size:
            raise ValueError(f"state does not fit this model: layer {i} caches {cached} tokens of an unfinished "
                             f"chunk, this model's chunk_size is {config.chunk_size}")
    norm_fits("the final norm", state.final_norm)


# --------------------------------------------------------------------------------------------
# floors of the benchmarks (ops.floors, ops.attention_floor)


def floor_inputs(ceilings: Any, ceilings_type: type, rate: str, **sizes: object) -> None:
    """``scan_floor_ms`` and ``attention_floor_ms``: positive int sizes, and a ``Ceilings`` whose
    ``rate`` (``copy_TBps`` or ``matmul_TFLOPs``) is a positive number."""
    positive_ints(**sizes)
    instance("ceilings", ceilings, ceilings_type)
    positive_number(f"ceilings.{rate}", getattr(ceilings, rate))
