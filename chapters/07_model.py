# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · The Megalodon model: two-hop residual block, language model, unlimited-context streaming
#
# Chapters 04–06 built the three new parts of a Megalodon layer: the complex EMA (CEMA), the
# timestep normalisation and the chunked, normalised attention. This chapter assembles them
# into the full language model of Megalodon §3 and checks the promise in the paper's title:
# a context of *unlimited* length, read through a state whose size does not depend on how much
# has been read.
#
# What we build, in the order the data flows:
#
# ```
# tokens (B, L) ──embed──▶ x ──▶ [ block 1 ] ──▶ … ──▶ [ block n ]
#                ──▶ TimestepNorm ──▶ head ──▶ logits (B, L, V) float32
#
# one block (input x):
#   X  = TimestepNorm(x)                    causal group norm              (§3.2, eq. 4)
#   mx = RMSNorm(CEMA(X))                   complex EMA, then a norm       (§3.1, eqs. 2-3)
#   z  = mx W_z + b_z  → q, k               normalised attention inputs    (§3.3, eqs. 5-8)
#   v  = SiLU(X W_v + b_v)                  values from the *normed input*, not from mx
#   r  = SiLU(mx W_r + b_r)                 reset gate
#   O  = ChunkAttention(z, v)               softmax attention inside chunks of c tokens
#   y  = mx W_h1 + b_h + (O ⊙ r) W_h2 + x   first residual
#   out = FFN(LayerNorm(y)) + x             second residual skips *two* hops (§3.4, eq. 11)
# ```
#
# Two modules come out of this chapter: `megalodon_lite.config` (the shapes, with the official
# presets) and `megalodon_lite.model` (block, language model, streaming state, generation). Its
# last section shows how to save and load a model with the hand-written `megalodon_lite.checkpoint`.

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from megalodon_lite.notebook import describe_run, pick, pick_device, save_figure, seed_everything

seed_everything(0)
device = pick_device()
describe_run(device)
# Every model run on the CPU in this chapter is tiny: its matrices gain nothing from a second
# thread, and on a busy machine threads waiting for each other make every small call slower.
torch.set_num_threads(1)

# %% [markdown]
# ## 1. The configuration
#
# Every shape of the model lives in one frozen dataclass. The field names follow the official
# [`ModelConf`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/config.py#L40-L80) so that its presets can be copied number for number from
# [`ModelStore`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py#L272-L288): `model_dim` is $D$, `z_dim` the width of the shared query/key
# projection, `value_dim` the width of the values (and of the gate $r$), `ffn_hidden_dim` the
# feed-forward width, `cema_ndim` the $N$ EMA states per channel, `norm_num_groups` the $G$
# groups of the timestep norm, `chunk_size` the attention chunk $c$.
#
# Where the official code differs from what one might guess from the paper, the config follows the
# code: each head pairs a narrow query/key (`z_dim / num_heads` channels) with a much wider value
# (`value_dim / num_heads`), the RMS norm after the CEMA uses `norm_eps` like every other norm,
# and there is an optional SwiGLU, a layer scale on the FFN (`rescale_nffn`: $0.1 \cdot 0.5^{\ell}$
# at layer $\ell$), an embedding scale $\sqrt{D}$ (`scale_emb`) and a tied output head
# (`share_emb`). The config checks its fields when it is built (one call into
# `megalodon_lite/validate.py`), so a shape that cannot work fails there, naming the field.

# %% tags=["export:config"]
"""The shape of a Megalodon language model: one dataclass, the official presets, validation.

Field names follow the official ``ModelConf`` so that presets can be compared number for number:
https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/config.py#L40-L80
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megalodon_lite import validate

INIT_MODES = ("he", "bert", "xavier")
"""Weight initialisations of the linear layers, as ``megalodon/utils.py::get_init_fn`` names them."""


@dataclass(frozen=True)
class MegalodonConfig:
    """Shapes and options of a Megalodon language model (validated on construction).

    Field names and defaults follow the official ``ModelConf``; the comments give each field's
    symbol in the paper, where it has one.
    """

    vocab_size: int              # V: token ids (embedding rows and logits)
    num_layers: int              # Megalodon blocks
    model_dim: int               # D: width of the residual stream
    z_dim: int                   # width of the shared query/key representation z, split over the heads
    value_dim: int               # width of the values v and of the reset gate r, split over the heads
    num_heads: int               # H: each head has z_dim/H query/key and value_dim/H value channels
    ffn_hidden_dim: int          # hidden width of the feed-forward network
    chunk_size: int              # c: attention sees only the keys of its own chunk of c tokens
    norm_num_groups: int         # G: groups of the timestep norms (divides model_dim)
    cema_ndim: int = 16          # N: complex EMA states per channel
    norm_eps: float = 1e-5       # epsilon of every norm (timestep, RMS, layer norm)
    rope_base: float = 10000.0   # base of the rotary position embedding
    swiglu: bool = False         # FFN = W2 (SiLU(W1 u) ⊙ W3 u) instead of W2 SiLU(W1 u)
    rescale_nffn: bool = False   # scale the FFN output of layer l by a learned vector, initially 0.1·0.5^l
    scale_emb: bool = False      # multiply the embeddings by sqrt(D)
    share_emb: bool = False      # tie the output head to the embedding
    init_mode: str = "he"        # init of the block's linear layers ("he": kaiming-normal with a=√5)
    dropout: float = 0.0         # on the embeddings and on each sub-layer's output
    attention_dropout: float = 0.0  # on the attention probabilities
    hidden_dropout: float = 0.0  # on mx, on the gated attention output and on the FFN hidden layer
    backend: str = "auto"        # kernels of chapters 08-09 ("triton"), plain PyTorch ("torch"), or by device

    def __post_init__(self) -> None:
        validate.megalodon_config(self, INIT_MODES)

    @property
    def z_head_dim(self) -> int:
        """Query/key channels per head."""
        return self.z_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        """Value channels per head."""
        return self.value_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MegalodonConfig:
        """Build a config from :meth:`to_dict` output; unknown or missing fields are named in the error."""
        validate.dataclass_fields(cls, values)
        return cls(**values)

    def replace(self, **changes: Any) -> MegalodonConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: MegalodonConfig) -> list[str]:
        """Names of the fields whose values differ from ``other``'s, in declaration order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


# %% [markdown]
# **Presets.** The official repository registers `mega200M`, `mega1.3B`, `mega1.3B_pg19` (SwiGLU,
# scaled and tied embeddings) and two 7B shapes, `mega7.1B` (SiLU FFN) and `mega7.3B` (SwiGLU FFN).
# Our `mega7B` names the paper's Megalodon-7B as §4.1 ("Architectural Details") describes it: 32
# blocks of width 4096, 4 heads, a SwiGLU FFN, attention chunks of $c = 4096$ and a RoPE base of
# 100,000 (every configuration in the repository uses 2048 and the default base 10,000). That is
# the repository's SwiGLU shape `mega7.3B` with those two numbers changed; the paper does not give
# the FFN width, so it is the repository's. The repository leaves `vocab_size` to
# the tokenizer; the paper trains with LLaMA-2's, so our presets set its 32,000 tokens. We add
# `small` (four layers of the 200M model, for the GPU training run of chapter 10) and `tiny`
# (a byte-level model for the CPU). Each preset is a frozen config; `preset(name, **changes)`
# returns a validated copy with some fields changed.

# %% tags=["export:config"]
_LLAMA2_VOCAB = 32_000

PRESETS: dict[str, MegalodonConfig] = {
    # The official shapes (ModelStore, megalodon/model/mega.py#L272-L288); the LLaMA-2 tokenizer's vocabulary.
    "mega200M": MegalodonConfig(vocab_size=_LLAMA2_VOCAB, num_layers=12, model_dim=1024, num_heads=1, z_dim=256,
                                value_dim=2048, ffn_hidden_dim=2560, chunk_size=2048, norm_num_groups=32),
    "mega1.3B": MegalodonConfig(vocab_size=_LLAMA2_VOCAB, num_layers=24, model_dim=2048, num_heads=2, z_dim=512,
                                value_dim=4096, ffn_hidden_dim=4864, chunk_size=2048, norm_num_groups=64),
    "mega1.3B_pg19": MegalodonConfig(vocab_size=_LLAMA2_VOCAB, num_layers=24, model_dim=2048, num_heads=2,
                                     z_dim=512, value_dim=4096, ffn_hidden_dim=3584, chunk_size=2048,
                                     norm_num_groups=64, swiglu=True, scale_emb=True, share_emb=True),
    "mega7.1B": MegalodonConfig(vocab_size=_LLAMA2_VOCAB, num_layers=32, model_dim=4096, num_heads=4, z_dim=1024,
                                value_dim=8192, ffn_hidden_dim=11264, chunk_size=2048, norm_num_groups=64),
    "mega7.3B": MegalodonConfig(vocab_size=_LLAMA2_VOCAB, num_layers=32, model_dim=4096, num_heads=4, z_dim=1024,
                                value_dim=8192, ffn_hidden_dim=8192, chunk_size=2048, norm_num_groups=64,
                                swiglu=True),
    # The paper's Megalodon-7B (Megalodon §4.1): mega7.3B's SwiGLU shape with the paper's chunk size
    # and RoPE base (the repository uses 2048 and 10,000).
    "mega7B": MegalodonConfig(vocab_size=_LLAMA2_VOCAB, num_layers=32, model_dim=4096, num_heads=4, z_dim=1024,
                              value_dim=8192, ffn_hidden_dim=8192, chunk_size=4096, norm_num_groups=64,
                              swiglu=True, rope_base=100_000.0),
    # Four layers of mega200M: the GPU training run of chapter 10.
    "small": MegalodonConfig(vocab_size=_LLAMA2_VOCAB, num_layers=4, model_dim=1024, num_heads=1, z_dim=256,
                             value_dim=2048, ffn_hidden_dim=2560, chunk_size=2048, norm_num_groups=32),
    # A byte-level model that runs anywhere: for the CPU chapters and the tests.
    "tiny": MegalodonConfig(vocab_size=256, num_layers=2, model_dim=64, num_heads=2, z_dim=32, value_dim=128,
                            ffn_hidden_dim=128, chunk_size=64, norm_num_groups=8),
}


def preset(name: str, **overrides: Any) -> MegalodonConfig:
    """A named configuration from :data:`PRESETS`, optionally with some fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

# %% [markdown]
# Validation happens when a config is built, and the error names the field:

# %%
from megalodon_lite.config import PRESETS, MegalodonConfig, preset

for bad in (dict(num_heads=3), dict(norm_num_groups=7), dict(dropout=1.0), dict(model_dim=0)):
    try:
        preset("tiny", **bad)
    except ValueError as err:
        print(f"{bad} -> ValueError: {err}")
    else:
        raise AssertionError(f"{bad} was accepted")

# %% [markdown]
# ## 2. Initialisation, and the feed-forward network with its own norm
#
# The official code initialises ([`get_init_fn`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/utils.py#L67-L86)):
#
# * the embedding and the output head from a normal truncated at ±3σ with σ = $1/\sqrt{D}$
#   ([`'gaussian'`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/utils.py#L76-L80), used for the [embedding](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py#L174-L175) and the [head](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py#L97-L101));
# * every linear layer of a block, by default (`init_mode="he"`), with `kaiming_normal_(a=√5)`:
#   a normal with σ = $1/\sqrt{3\,d_\text{in}}$ (the variance of PyTorch's default uniform init,
#   drawn from a normal);
# * every bias with 0, and every norm scale with 0, applied as $(1 + w)$ ([`FusedLayerNorm`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/layer_norm.py#L14-L38),
#   [`FusedRMSNorm`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/layer_norm.py#L44-L66), [`TimestepNorm`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/timestep_norm.py#L102-L104)): a norm starts as the
#   plain normalisation, and weight decay on $w$ pulls its scale towards 1, not towards 0.
#
# (The CEMA and the attention draw their own parameters, chapters 04 and 06.)

# %% tags=["export:model"]
"""The Megalodon language model (Ma et al. 2024, arXiv 2404.08801, §3), with streaming state.

Built from the earlier chapters' modules: :class:`~megalodon_lite.timestep_norm.TimestepNorm`,
:class:`~megalodon_lite.cema.CEMA`, :class:`~megalodon_lite.attention.RMSNorm` and
:class:`~megalodon_lite.attention.ChunkAttention`. Follows the official code
where it differs from the paper (commit cff8ba5 of github.com/XuezheMax/megalodon):

- ``Mega``, ``MegaBlock``, ``MegaOutputLayer``: https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py
- ``MovingAverageGatedAttention``: https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py
- ``NormalizedFeedForwardNetwork``: https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/normalized_feedforward_network.py
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_lite import validate
from megalodon_lite.attention import ChunkAttention, ChunkKVCache, RMSNorm, activation_dtype
from megalodon_lite.cema import CEMA
from megalodon_lite.config import INIT_MODES, MegalodonConfig
from megalodon_lite.timestep_norm import TimestepNorm, TimestepNormState


def linear_init(mode: str) -> Callable[[Tensor], Tensor]:
    """The official initialisation of a block's linear weight (``get_init_fn``, megalodon/utils.py#L67-L86)."""
    if mode == "he":
        return lambda w: nn.init.kaiming_normal_(w, a=math.sqrt(5.0))
    if mode == "bert":
        return lambda w: nn.init.normal_(w, mean=0.0, std=0.02)
    if mode == "xavier":
        return nn.init.xavier_uniform_
    raise ValueError(f"init mode must be one of {INIT_MODES}, got {mode!r}")


def embedding_init_(weight: Tensor) -> Tensor:
    """TruncNormal(0, σ=1/√D, cut at ±3σ) for an embedding or output matrix of shape (V, D)."""
    std = 1.0 / math.sqrt(weight.shape[-1])
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

# %% [markdown]
# The feed-forward network ([`NormalizedFeedForwardNetwork`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/normalized_feedforward_network.py#L15-L94)) carries its
# own LayerNorm (with the same "+1" scale) and has no biases:
# $\mathrm{FFN}(y) = W_2\,\mathrm{SiLU}(W_1\,\mathrm{LN}(y))$, or with SwiGLU
# $W_2\,(\mathrm{SiLU}(W_1\,\mathrm{LN}(y)) \odot W_3\,\mathrm{LN}(y))$. Its `forward` takes the
# residual as a second argument: that is how the [official code](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py#L86-L87) wires the two-hop residual, and it
# lets us build the ordinary pre-norm block from the same parts in section 5.

# %% [markdown]
# Written as PyTorch operations, $\mathrm{SiLU}(u W_1)\,W_2$ keeps two wide tensors for the
# backward: the SiLU's input and its output, which the matrix product reads (with SwiGLU four:
# also $u W_3$ and the product $\mathrm{SiLU}(u W_1) \odot u W_3$). The backward needs only the
# SiLU's input (and $u W_3$): the rest is one SiLU and one multiplication away. `gated_projection`
# keeps those and recomputes the rest in the backward: the same numbers, half the memory of that
# line. The layer of section 3 ends with the same shape of term, its attention output gated by
# $\mathrm{SiLU}(mx\,W_r + b_r)$ before $W_{h2}$, and uses the same function. (With hidden dropout
# before the last matrix product, which none of the presets uses, the line is written out plainly:
# dropout's mask would have to be kept too.)

# %% tags=["export:model"]
class _GatedProjection(torch.autograd.Function):
    """(SiLU(gate_pre) [* x]) @ weight.T, keeping gate_pre (and x) only: the gate and the product are
    recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate_pre: Tensor, weight: Tensor, x: Tensor | None) -> Tensor:
        ctx.save_for_backward(gate_pre, weight, x)
        gated = F.silu(gate_pre) if x is None else x * F.silu(gate_pre)
        return F.linear(gated, weight)  # under autocast, in the autocast dtype

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        gate_pre, weight, x = ctx.saved_tensors
        gate = F.silu(gate_pre)
        gated = (gate if x is None else x * gate).to(grad.dtype)  # the forward's product, bit for bit
        d_weight = grad.reshape(-1, grad.shape[-1]).T @ gated.reshape(-1, gated.shape[-1])
        d_gated = grad @ weight.to(grad.dtype)
        # SiLU's own backward, d silu(a)/da = sigma(a) (1 + a (1 - sigma(a))), in float32 inside, as autograd runs it
        d_gate_pre = torch.ops.aten.silu_backward(d_gated if x is None else d_gated * x, gate_pre)
        return d_gate_pre, d_weight.to(weight.dtype), None if x is None else d_gated * gate


def gated_projection(gate_pre: Tensor, weight: Tensor, x: Tensor | None = None) -> Tensor:
    """``(SiLU(gate_pre) * x) @ weight.T``, or ``SiLU(gate_pre) @ weight.T`` without x.

    gate_pre, x (..., v), weight (D, v) -> (..., D). For the backward it keeps gate_pre and x, not
    SiLU(gate_pre) nor the product the matrix product reads.
    """
    return _GatedProjection.apply(gate_pre, weight, x)


# %% tags=["export:model"]
class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with the scale stored as 0 and applied as (1 + weight).

    (B, L, D) -> (B, L, D). Same function as ``nn.LayerNorm``; the storage follows the official
    ``FusedLayerNorm`` (weight decay on the stored value pulls the scale towards 1, not 0).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D) in :func:`~megalodon_lite.attention.activation_dtype` (x's dtype
        outside autocast: under autocast one cast copy then serves both of the FFN's products)."""
        return F.layer_norm(x, (self.dim,), self.weight + 1.0, self.bias, self.eps).to(activation_dtype(x))

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class NormalizedFFN(nn.Module):
    """Feed-forward network with its own LayerNorm and an explicit residual (Megalodon §3.4).

    ``forward(y, residual) = scale ⊙ W2 act(W1 LN(y)) + residual`` with act = SiLU, or SwiGLU
    ``SiLU(W1 u) ⊙ W3 u``; no biases. In a Megalodon block ``residual`` is the block input x
    (the two-hop residual); passing ``residual=y`` gives the usual pre-norm sub-layer.
    """

    def __init__(self, model_dim: int, ffn_hidden_dim: int, *, swiglu: bool = False, eps: float = 1e-5,
                 dropout: float = 0.0, hidden_dropout: float = 0.0, layer_scale: float | None = None,
                 init_mode: str = "he") -> None:
        super().__init__()
        self.init_mode = init_mode
        self.norm = LayerNorm(model_dim, eps)
        self.fc1 = nn.Linear(model_dim, ffn_hidden_dim, bias=False)
        self.fc2 = nn.Linear(ffn_hidden_dim, model_dim, bias=False)
        self.fc3 = nn.Linear(model_dim, ffn_hidden_dim, bias=False) if swiglu else None
        self.dropout, self.hidden_dropout = dropout, hidden_dropout
        self.layer_scale_init = layer_scale
        self.alpha = None if layer_scale is None else nn.Parameter(torch.empty(model_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: weights by ``init_mode``, norm stored as 0 (scale 1, shift 0), layer scale its value."""
        init = linear_init(self.init_mode)
        for linear in (self.fc1, self.fc2, self.fc3):
            if linear is not None:
                init(linear.weight)
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if self.alpha is not None:
            nn.init.constant_(self.alpha, self.layer_scale_init)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        """y, residual: (B, L, D) -> (B, L, D)."""
        u = self.norm(y)
        multiplier = None if self.fc3 is None else self.fc3(u)
        if self.hidden_dropout and self.training:  # dropout before fc2: written out
            hidden = F.silu(self.fc1(u))
            hidden = hidden if multiplier is None else hidden * multiplier
            out = self.fc2(F.dropout(hidden, self.hidden_dropout, True))
        else:
            out = gated_projection(self.fc1(u), self.fc2.weight, multiplier)  # keeps fc1's and fc3's outputs only
        out = F.dropout(out, self.dropout, self.training)
        if self.alpha is not None:
            out = out * self.alpha
        return out + residual

# %% [markdown]
# ## 3. One Megalodon layer and the two-hop block
#
# The layer follows the official [`MovingAverageGatedAttention.forward`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L275-L348) line
# by line. Things worth noticing, all from the code rather than the paper (§3 and Figure 3(a)):
#
# * the CEMA output goes through an affine **RMSNorm** (the paper has no norm there), then
#   dropout (`hidden_dropout`); there is **no SiLU** on the CEMA output and none on $z$ (MEGA had
#   both);
# * the values $v$ are computed from the timestep-normed input $X$, not from the EMA output;
# * $z$ is per-head RMS-normalised and gets a learned affine per query/key
#   ($\hat z\,(\gamma+1)/\sqrt{d_h} + \beta$) — this is the "normalized attention" of §3.3, eqs. (6)-(8), and
#   the attention softmax then uses scale 1 (all inside `ChunkAttention`, chapter 06);
# * $h = mx\,W_{h1} + b + (O \odot r)\,W_{h2}$ has no activation (MEGA had a SiLU and an
#   update gate), and the layer adds its input back: $y = h + x$.
#
# Dropout sits where the official code puts it: `hidden_dropout` on $mx$, on $O \odot r$ and on
# the FFN's hidden layer; `dropout` on $h$, on the FFN output and on the embeddings;
# `attention_dropout` on the attention probabilities.
#
# **Streaming state.** Three things in a layer look back in time, and each has a small summary of
# the past (the official layer's [`cache`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L285-L287), and what §3.5 says chunk-parallel ranks exchange): the timestep
# norm its running (count, mean, variance) per group, the CEMA its
# complex hidden state $h \in \mathbb{C}^{D\times N}$, and the attention the keys and values of the
# current, unfinished chunk (fewer than $c$ tokens; a finished chunk is never looked at again).
# `LayerState` holds these three; the model's state adds the statistics of the final norm.

# %% tags=["export:model"]
@dataclass
class LayerState:
    """What one Megalodon layer carries from one call to the next.

    Attributes:
        norm: the timestep norm's running statistics: ``count`` (B,) int64, ``mean`` and ``var``
            (B, G) float32 (float64 in a float64 model), over every token seen so far.
        cema: the complex EMA hidden state after the last token, (B, D, N) complex64
            (complex128 in a float64 model).
        attention: keys (post-RoPE) and values of the unfinished chunk: ``k`` (B, H, n, z_dim/H),
            ``v`` (B, H, n, value_dim/H) in the model's dtype, with 0 <= n < chunk_size (n is also
            the position inside its chunk of the next token; emptied at every chunk boundary).
    """

    norm: TimestepNormState
    cema: Tensor
    attention: ChunkKVCache

    def tensors(self) -> list[Tensor]:
        """Every tensor held by the state."""
        return [*self.norm, self.cema, self.attention.k, self.attention.v]

    @property
    def nbytes(self) -> int:
        """Bytes of memory the state keeps alive (distinct storages, counted once), as ``Tensor.nbytes``."""
        return _storage_bytes(self.tensors())

    def __repr__(self) -> str:
        return (f"LayerState(batch {self.cema.shape[0]}, {_tokens_seen(self.norm.count)} tokens seen, "
                f"{self.attention.length} in the unfinished chunk, {self.nbytes:,} bytes)")


def _storage_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by several counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _tokens_seen(count: Tensor) -> str:
    """'1,000' when every sequence of the batch has seen as many tokens, else '990 to 1,000'."""
    low, high = int(count.min()), int(count.max())
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


# %% tags=["export:model"]
@dataclass
class MegalodonState:
    """The whole model's memory of the stream (the official ``cache``: one (attention, norm, CEMA)
    triple per layer plus the output norm's statistics, megalodon/model/mega.py#L192-L193).

    Attributes:
        layers: one :class:`LayerState` per block, in order.
        final_norm: the final timestep norm's ``count`` (B,), ``mean`` and ``var`` (B, G).

    Its size depends on the batch, the shapes and the position inside the current chunk, never
    on how many tokens came before.
    """

    layers: list[LayerState]
    final_norm: TimestepNormState

    @property
    def batch_size(self) -> int:
        return int(self.final_norm.count.shape[0])

    @property
    def num_tokens(self) -> Tensor:
        """Tokens read so far, per sequence: (B,) int64."""
        return self.final_norm.count

    def tensors(self) -> list[Tensor]:
        """Every tensor held by the state."""
        out = list(self.final_norm)
        for layer in self.layers:
            out += layer.tensors()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of memory the state keeps alive (distinct storages, counted once), as ``Tensor.nbytes``."""
        return _storage_bytes(self.tensors())

    def __repr__(self) -> str:
        return (f"MegalodonState({len(self.layers)} layers, batch {self.batch_size}, "
                f"{_tokens_seen(self.num_tokens)} tokens seen, {self.nbytes:,} bytes)")

    def detach(self) -> MegalodonState:
        """A copy cut from the autograd graph, each tensor owning no more memory than it shows
        (a slice of a long key tensor would otherwise keep the whole tensor alive)."""

        def own(t: Tensor) -> Tensor:
            t = t.detach()
            return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t

        def own_norm(s: TimestepNormState) -> TimestepNormState:
            return TimestepNormState(*(own(t) for t in s))

        layers = [LayerState(own_norm(s.norm), own(s.cema), ChunkKVCache(own(s.attention.k), own(s.attention.v)))
                  for s in self.layers]
        return MegalodonState(layers, own_norm(self.final_norm))


# %% [markdown]
# The layer's last term, $(O \odot \mathrm{SiLU}(mx\,W_r + b_r))\,W_{h2}$, is section 2's
# `gated_projection` with $O$ as the multiplier. The values $v = \mathrm{SiLU}(X W_v + b_v)$ are the
# same story one step further: the SiLU keeps its input for its own backward, and the attention
# keeps $v$ for its backward ($dP = dO\,V^\top$),
# two tensors of $v$ values per token where one determines the other. `recomputed_on_backward` is
# a context for the attention call: a tensor that autograd would save inside it and that lives in
# $v$'s memory is stored as a recipe instead — a weak reference to the SiLU's input, which the
# SiLU keeps anyway until after the attention's backward, and the view to take — and recomputed
# when the backward unpacks it. It works for either attention path, PyTorch's or the Triton
# kernel's, because it sits in autograd's own saved-tensor hooks
# (`torch.autograd.graph.saved_tensors_hooks`). Every other tensor saved inside the context is
# kept as its data alone (`detach`), and the SiLU's input by a weak reference: an operation that
# saves its own output (the norm's `rsqrt` does) would otherwise hold that output with its
# `grad_fn`, a reference cycle, and the operations that build the streaming cache, which no
# backward ever runs, would never let go of it. Hooks do not nest (the innermost ones apply), so a
# layer whose blocks are checkpointed (chapter 10's activation checkpointing) turns this off with
# `recompute_values = False`, leaving the attention's tensors to the checkpoint. Under
# `torch.compile` the layer leaves the hooks out too: the compiler chooses itself what to keep and
# what to recompute for the backward, and hooks that look at storage addresses would make it
# recompile at every step.
#
# The same context serves the gate once more: `gated_projection` keeps the gate's input
# $r_{pre} = mx\,W_r + b_r$, $v$ values per token, while $mx$, $D$ values per token, is kept anyway
# (by $W_r$'s own backward, for its weight gradient). Around the gated projection the layer stores
# $r_{pre}$ as the recipe "$mx\,W_r + b_r$ again": one more matrix product in the backward for
# $v$ values per token less.

# %% tags=["export:model"]
class recomputed_on_backward(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 - used as a context
    """Inside ``with recomputed_on_backward(v, source, fn):`` a tensor saved for the backward that lives in
    ``v``'s memory is not kept: the backward gets ``fn(source)`` (equal to ``v``, contiguous) viewed as the
    saved tensor was. ``source`` must stay alive until then (autograd keeps it when ``fn`` saves its input,
    as SiLU does); only a weak reference to it is held."""

    def __init__(self, v: Tensor, source: Tensor, fn: Callable[[Tensor], Tensor]) -> None:
        if not v.is_contiguous():
            raise ValueError("recomputed_on_backward needs a contiguous tensor")
        pointer, start, source_ref = v.untyped_storage().data_ptr(), v.storage_offset(), weakref.ref(source)

        def pack(t: Tensor):
            if t.untyped_storage().data_ptr() != pointer:
                return t.detach()  # the data only: a saved output kept with its grad_fn would be a cycle
            return source_ref, fn, t.size(), t.stride(), t.storage_offset() - start

        def unpack(saved):
            if isinstance(saved, Tensor):
                return saved
            ref, make, size, stride, offset = saved
            if ref() is None:
                raise RuntimeError("recomputed_on_backward: the source tensor was freed before the backward")
            with torch.no_grad():
                return make(ref()).as_strided(size, stride, offset)

        super().__init__(pack, unpack)


# %% [markdown]
# The layer itself, in the order of the list above: each line of `forward` is one line of the
# official forward. One line more concerns memory under bf16 autocast (chapter 10 trains that way):
# the residual stream stays float32, so the timestep norm's output $X$ is float32, and the CEMA and
# $W_v$ would each keep their own copy of it for the backward (float32 for the CEMA, a bf16 cast
# for the matrix product). The layer casts $X$ once to the autocast dtype
# (`activation_dtype`, chapter 06) and both read that copy; the CEMA accumulates in float32 anyway.

# %% tags=["export:model"]
class MegalodonLayer(nn.Module):
    """The moving-average gated attention layer of Megalodon (official name
    ``MovingAverageGatedAttention``), residual included.

    ``forward(x, state)``: x (B, L, D) -> (x + h (B, L, D), new LayerState), with

        X  = TimestepNorm(x);     mx = RMSNorm(CEMA(X))
        z  = mx W_z + b_z;        v = SiLU(X W_v + b_v);     r = SiLU(mx W_r + b_r)
        O  = ChunkAttention(z, v)        (per-head normalised q, k; RoPE; softmax inside chunks)
        h  = mx W_h1 + b_h + (O ⊙ r) W_h2
    """

    def __init__(self, config: MegalodonConfig) -> None:
        super().__init__()
        cfg = config
        self.init_mode = cfg.init_mode
        self.dropout, self.hidden_dropout = cfg.dropout, cfg.hidden_dropout
        self.timenorm = TimestepNorm(cfg.model_dim, cfg.norm_num_groups, eps=cfg.norm_eps, backend=cfg.backend)
        self.cema = CEMA(cfg.model_dim, cfg.cema_ndim, backend=cfg.backend)
        self.rmsnorm = RMSNorm(cfg.model_dim, eps=cfg.norm_eps)
        self.wz = nn.Linear(cfg.model_dim, cfg.z_dim)
        self.wv = nn.Linear(cfg.model_dim, cfg.value_dim)
        self.wr = nn.Linear(cfg.model_dim, cfg.value_dim)
        self.wh1 = nn.Linear(cfg.model_dim, cfg.model_dim)
        self.wh2 = nn.Linear(cfg.value_dim, cfg.model_dim, bias=False)
        self.attention = ChunkAttention(cfg.z_dim, cfg.value_dim, cfg.num_heads, cfg.chunk_size,
                                        rope_base=cfg.rope_base, attention_dropout=cfg.attention_dropout,
                                        backend=cfg.backend)
        self.attention.z_norm.eps = cfg.norm_eps  # the official znorm uses norm_eps like every other norm
        self.recompute_values = True  # the saved v and gate input rebuilt in the backward (below)
        self._init_projections()  # the sub-modules initialised themselves when built

    def _init_projections(self) -> None:
        init = linear_init(self.init_mode)
        for linear in (self.wz, self.wv, self.wr, self.wh1, self.wh2):
            init(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def reset_parameters(self) -> None:
        """Official init: projection weights by ``init_mode``, biases 0, the CEMA its own init, and
        every norm scale/shift (timestep norm, RMS norm, q/k affine) 0."""
        self._init_projections()
        self.cema.reset_parameters()
        for param in (self.timenorm.weight, self.timenorm.bias, self.rmsnorm.weight,
                      self.attention.gamma, self.attention.beta):
            nn.init.zeros_(param)

    def forward(self, x: Tensor, state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        """x: (B, L, D); state: what the previous call returned, or None at the start of a stream."""
        norm_state, h0, kv = (None, None, None) if state is None else (state.norm, state.cema, state.attention)
        X, norm_state = self.timenorm(x, norm_state)
        X = X.to(activation_dtype(X))  # under autocast one bf16 copy, read by the CEMA and by W_v
        ema, h_last = self.cema(X, h0)
        mx = F.dropout(self.rmsnorm(ema), self.hidden_dropout, self.training)
        v_pre = self.wv(X)
        v = F.silu(v_pre)
        recompute = self.recompute_values and not torch.compiler.is_compiling()  # compiled: the compiler decides
        hooks = recomputed_on_backward(v, v_pre, F.silu) if recompute else contextlib.nullcontext()
        with hooks:  # keep v_pre (SiLU does anyway), not v
            attn, kv = self.attention(self.wz(mx), v, kv)
        r_pre = self.wr(mx)
        if self.hidden_dropout and self.training:  # dropout between the gate and W_h2: written out
            gated = self.wh2(F.dropout(attn * F.silu(r_pre), self.hidden_dropout, True))
        else:
            hooks = recomputed_on_backward(r_pre, mx, self._gate_input) if recompute else contextlib.nullcontext()
            with hooks:  # keep mx (W_r's own backward does anyway), not r_pre
                gated = gated_projection(r_pre, self.wh2.weight, attn)  # (attn * SiLU(r)) W_h2
        h = F.dropout(self.wh1(mx) + gated, self.dropout, self.training)
        return h + x, LayerState(norm_state, h_last, kv)

    def _gate_input(self, mx: Tensor) -> Tensor:
        """mx W_r + b_r in mx's dtype: the forward's r_pre again, also under autocast (whose bf16 product it is)."""
        return F.linear(mx, self.wr.weight.to(mx.dtype), self.wr.bias.to(mx.dtype))


# %% [markdown]
# The block adds the normalised FFN with the two-hop residual (Megalodon §3.4): the FFN's
# residual is the block's input $x$, not the layer's output $y$ (section 5 shows why it matters).

# %% tags=["export:model"]
class MegalodonBlock(nn.Module):
    """Megalodon layer plus normalised FFN with the two-hop residual (Megalodon §3.4):

        y = MegalodonLayer(x)            (= x + h)
        out = FFN(LayerNorm(y)) + x      (the FFN's residual is the block input x, not y)

    x: (B, L, D) -> (B, L, D).
    """

    def __init__(self, config: MegalodonConfig, layer_index: int) -> None:
        super().__init__()
        self.mega = MegalodonLayer(config)
        layer_scale = 0.1 * 0.5 ** layer_index if config.rescale_nffn else None
        self.ffn = NormalizedFFN(config.model_dim, config.ffn_hidden_dim, swiglu=config.swiglu, eps=config.norm_eps,
                                 dropout=config.dropout, hidden_dropout=config.hidden_dropout,
                                 layer_scale=layer_scale, init_mode=config.init_mode)

    def reset_parameters(self) -> None:
        """Official init of the layer and the FFN."""
        self.mega.reset_parameters()
        self.ffn.reset_parameters()

    def forward(self, x: Tensor, state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        y, state = self.mega(x, state)
        return self.ffn(y, residual=x), state

# %% [markdown]
# ### Checking the block against the equations
#
# The block is only a few lines because the hard parts live in chapters 04–06. To make sure the
# wiring is right — which tensor feeds which projection, where the residuals go — we write the
# block once more, slowly and in float64, straight from the equations: the timestep norm from
# cumulative sums, the CEMA as an explicit complex recurrence, RoPE and the chunk mask spelled out
# over the whole $L \times L$ score matrix. It shares nothing with the fast path but the
# parameter values, and it is exported too, so that the tests can use it (with gradients).

# %% tags=["export:model"]
def megalodon_block_reference(block: MegalodonBlock, x: Tensor) -> Tensor:
    """One Megalodon block in float64, written from the equations (Megalodon §3 as the official code
    implements it); slow, for checking.

    x: (B, L, D) -> (B, L, D) float64, from a fresh stream. Shares nothing with the fast path but
    the parameter values (cast to float64 with gradients kept, so it also checks gradients):
    cumulative-sum timestep norm, explicit complex CEMA recurrence, RoPE and the same-chunk causal
    mask written out over the full L x L score matrix, the two-hop residual.
    """
    P = {name: param.double() for name, param in block.named_parameters()}
    mega = block.mega
    x = x.double()
    B, L, D = x.shape
    G, eps = mega.timenorm.num_groups, mega.timenorm.eps
    N, H, dz, c = mega.cema.cema_ndim, mega.attention.num_heads, mega.attention.z_head_dim, mega.attention.chunk_size
    # X = TimestepNorm(x): mean and variance of group g over all steps <= t
    xg = x.view(B, L, G, D // G)
    steps = torch.arange(1, L + 1, dtype=torch.float64, device=x.device).view(1, L, 1)
    mean = xg.mean(-1).cumsum(1) / steps
    var = (xg ** 2).mean(-1).cumsum(1) / steps - mean ** 2
    X = ((xg - mean[..., None]) / torch.sqrt(var[..., None] + eps)).reshape(B, L, D)
    X = X * (1 + P["mega.timenorm.weight"]) + P["mega.timenorm.bias"]
    # CEMA: h_t = q h_{t-1} + p X_t,  y_t = Re(sum_n gamma_n h_{t,n}) + omega X_t
    p = torch.sigmoid(P["mega.cema.alpha"])[..., 0]
    radius = 1 - p * torch.sigmoid(P["mega.cema.delta"])[..., 0]
    harmonics = torch.arange(1, N + 1, dtype=torch.float64, device=x.device)
    angle = harmonics * (2 * math.pi / N) * torch.sigmoid(P["mega.cema.theta"]).view(D, 1)
    q = torch.polar(radius, angle)
    gamma = torch.complex(P["mega.cema.gamma"][..., 0], P["mega.cema.gamma"][..., 1]) / math.sqrt(N)
    h, ema = torch.zeros(B, D, N, dtype=torch.complex128, device=x.device), []
    for step in range(L):
        h = q * h + p * X[:, step, :, None]
        ema.append((gamma * h).real.sum(-1))
    ema = torch.stack(ema, 1) + P["mega.cema.omega"] * X
    mx = ema / torch.sqrt(ema.pow(2).mean(-1, keepdim=True) + mega.rmsnorm.eps) * (1 + P["mega.rmsnorm.weight"])
    # normalised q, k per head; RoPE at the position inside the chunk; softmax (scale 1) inside chunks
    z = (mx @ P["mega.wz.weight"].T + P["mega.wz.bias"]).view(B, L, H, dz)
    z = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + mega.attention.z_norm.eps)
    t = torch.arange(L, device=x.device)
    freq = mega.attention.rope.base ** (-torch.arange(0, dz, 2, dtype=torch.float64, device=x.device) / dz)
    rotation = torch.polar(torch.ones(L, dz // 2, dtype=torch.float64, device=x.device), (t % c)[:, None] * freq)
    q_k = []
    for i in (0, 1):  # row 0 of gamma/beta for queries, row 1 for keys
        u = z * (P["mega.attention.gamma"][i] + 1) / math.sqrt(dz) + P["mega.attention.beta"][i]
        u = torch.view_as_complex(u.reshape(B, L, H, dz // 2, 2).contiguous()) * rotation[:, None]
        q_k.append(torch.view_as_real(u).reshape(B, L, H, dz))
    v = F.silu(X @ P["mega.wv.weight"].T + P["mega.wv.bias"]).view(B, L, H, -1)
    visible = (t[:, None] // c == t[None] // c) & (t[:, None] >= t[None])
    scores = torch.einsum("bthd,bshd->bhts", *q_k).masked_fill(~visible, float("-inf"))
    O = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), v).reshape(B, L, -1)
    r = F.silu(mx @ P["mega.wr.weight"].T + P["mega.wr.bias"])
    y = mx @ P["mega.wh1.weight"].T + P["mega.wh1.bias"] + (O * r) @ P["mega.wh2.weight"].T + x
    # two-hop residual: out = FFN(LayerNorm(y)) + x
    u = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + block.ffn.norm.eps)
    u = u * (1 + P["ffn.norm.weight"]) + P["ffn.norm.bias"]
    hidden = F.silu(u @ P["ffn.fc1.weight"].T)
    if "ffn.fc3.weight" in P:
        hidden = hidden * (u @ P["ffn.fc3.weight"].T)
    out = hidden @ P["ffn.fc2.weight"].T
    return (out * P["ffn.alpha"] if "ffn.alpha" in P else out) + x


# %%
from megalodon_lite.model import MegalodonBlock, megalodon_block_reference

check_cfg = preset("tiny", chunk_size=16)
block = MegalodonBlock(check_cfg, layer_index=0)
with torch.no_grad():  # move the zero-initialised norm and q/k parameters off zero so they are tested too
    for name, param in block.named_parameters():
        if name.endswith(("timenorm.weight", "timenorm.bias", "rmsnorm.weight", "attention.gamma",
                          "attention.beta", "ffn.norm.weight", "ffn.norm.bias", "wz.bias", "wv.bias")):
            param.normal_(0.0, 0.3)
x = torch.randn(2, 3 * check_cfg.chunk_size + 7, check_cfg.model_dim)  # three chunks and a partial one
out, _ = block(x)
with torch.no_grad():
    expected = megalodon_block_reference(block, x)
err = (out.double() - expected).abs().max().item() / expected.abs().max().item()
print(f"block (float32) vs float64 reference: max error {err:.2e} of the largest output")
assert err < 1e-5, err  # float32 has a 6e-8 unit roundoff; a few hundred roundings per output stay far below 1e-5

# %% [markdown]
# ## 4. The language model, and where its parameters are
#
# The language model wraps the blocks: embedding (scaled by $\sqrt D$ if `scale_emb`, then
# dropout), the blocks, a final **timestep** norm (the official [`MegaOutputLayer`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py#L91-L153) uses a
# TimestepNorm here, not a LayerNorm, so it too carries statistics in the stream), and a linear
# head without bias, optionally tied to the embedding. Logits come back in float32 even under
# bf16 autocast, as in the [official code](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py#L242).
#
# `forward(tokens, state)` always returns the new state, detached from the autograd graph, as the
# official code detaches its cache at every call ([the layer's](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L303-L305), [the output norm's](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py#L143-L144)): a
# stream is read by calling the model again with that state, for as long as one likes, and no
# gradient flows from one call into an earlier one (the modules of chapters 04-06 keep the history
# for a caller who wants it). Malformed input
# is refused with an error that names the argument.
#
# Generation needs one more piece first: drawing the next token from the logits of the last
# position, greedily (`temperature=0`) or from the softmax at a temperature, optionally among the
# `top_k` most likely tokens only.

# %% tags=["export:model"]
def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from logits (B, V) -> (B,) int64.

    ``temperature == 0`` picks the argmax; otherwise softmax(logits / temperature), restricted to the
    ``top_k`` largest logits when given (ties at the k-th value are kept). ``generator`` (on the
    logits' device) makes the draw reproducible.
    """
    validate.sampling(temperature, top_k, logits.shape[-1])
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# %% [markdown]
# The model: embedding, blocks, final norm and head, and `generate`, which reads a prompt through
# the state and samples one token at a time with the function above. (On a GPU, one token's step
# is a few hundred tiny kernels, and launching them from Python takes longer than running them;
# there `generate` replays the step as a CUDA graph, from `megalodon_lite.decoding`, which chapter
# 10 measures. The loop below is what it computes.)

# %% tags=["export:model"]
class MegalodonLM(nn.Module):
    """Megalodon language model: embedding -> blocks -> final TimestepNorm -> head.

    ``forward(tokens (B, L) int, state=None) -> (logits (B, L, V) float32, state)``. Feeding a
    sequence in pieces, each call taking the previous call's state, gives the logits of one call
    over the whole sequence; the state stays the same size however long the stream.
    """

    def __init__(self, config: MegalodonConfig) -> None:
        super().__init__()
        validate.instance("config", config, MegalodonConfig)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.model_dim)
        self.blocks = nn.ModuleList(MegalodonBlock(config, i) for i in range(config.num_layers))
        self.final_norm = TimestepNorm(config.model_dim, config.norm_num_groups, eps=config.norm_eps,
                                       backend=config.backend)
        self.head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        if config.share_emb:
            self.head.weight = self.embed.weight
        embedding_init_(self.embed.weight)
        if not config.share_emb:
            embedding_init_(self.head.weight)

    def reset_parameters(self) -> None:
        """Re-draw every parameter with the official initialisation."""
        embedding_init_(self.embed.weight)
        if not self.config.share_emb:
            embedding_init_(self.head.weight)
        for block in self.blocks:
            block.reset_parameters()
        nn.init.zeros_(self.final_norm.weight)
        nn.init.zeros_(self.final_norm.bias)

    def forward(self, tokens: Tensor, state: MegalodonState | None = None) -> tuple[Tensor, MegalodonState]:
        """tokens: (B, L) int64/int32 ids; state: None to start a stream, else the previous call's.

        Returns logits (B, L, V) in float32 (float64 for a float64 model) and the state after the
        last token (detached).
        """
        validate.tokens(tokens, self.config.vocab_size)
        if state is not None:
            validate.megalodon_state(state, MegalodonState, self.config, tokens.shape[0],
                                     dtype=self.embed.weight.dtype, device=self.embed.weight.device)
        x = self.embed(tokens)
        if self.config.scale_emb:
            x = x * math.sqrt(self.config.model_dim)
        x = F.dropout(x, self.config.dropout, self.training)
        layer_states = []
        for i, block in enumerate(self.blocks):
            x, layer_state = block(x, None if state is None else state.layers[i])
            layer_states.append(layer_state)
        x, final_state = self.final_norm(x, None if state is None else state.final_norm)
        logits = self.head(x)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return logits, MegalodonState(layer_states, final_state).detach()

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool | None = None) -> Tensor:
        """Continue ``prompt`` (B, P) by ``max_new_tokens`` sampled tokens -> (B, max_new_tokens) int64.

        The prompt is read one chunk (``chunk_size`` tokens) per call, then each sampled token is
        fed back alone, always through the streaming state: memory does not grow with the length
        of the prompt or of the continuation. Runs in eval mode (no dropout) and restores the
        previous mode. See :func:`sample_next_token` for the sampling options. On a CUDA device
        (``cuda_graph`` None or True) each step is one replayed CUDA graph over the same state in
        fixed-size buffers (:mod:`megalodon_lite.decoding`); ``cuda_graph=False`` runs the loop below.
        """
        validate.tokens(prompt, self.config.vocab_size, name="prompt")
        validate.non_negative_int("max_new_tokens", max_new_tokens)
        validate.sampling(temperature, top_k, self.config.vocab_size)
        from megalodon_lite.decoding import static_generate, use_cuda_graph  # imports this module
        if use_cuda_graph(cuda_graph, self.embed.weight.device):
            return static_generate(self, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                   generator=generator)
        was_training = self.training
        self.eval()
        try:
            new_tokens, state, piece = [], None, self.config.chunk_size
            for start in range(0, prompt.shape[1], piece):
                logits, state = self(prompt[:, start:start + piece], state)
            for step in range(max_new_tokens):
                token = sample_next_token(logits[:, -1], temperature, top_k, generator)
                new_tokens.append(token)
                if step + 1 < max_new_tokens:
                    logits, state = self(token[:, None], state)
        finally:
            self.train(was_training)
        if not new_tokens:
            return prompt.new_zeros((prompt.shape[0], 0), dtype=torch.int64)
        return torch.stack(new_tokens, dim=1)

# %%
from megalodon_lite.model import MegalodonLM  # the package's class, which the checkpoint module checks for

tiny = MegalodonLM(preset("tiny"))
print(tiny)

# %% [markdown]
# Every count below is computed from the module; the large presets are built on PyTorch's
# `meta` device, which records shapes without allocating memory, so a 7B model costs nothing to
# inspect.

# %%
def parameter_groups(model: MegalodonLM) -> dict[str, int]:
    """Parameters per component, summed over the layers (a tied head counts once, as the embedding)."""
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():  # named_parameters lists a shared tensor once
        parts = name.split(".")
        key = ".".join(parts[2:4]) if parts[0] == "blocks" else parts[0]
        key = {"mega.attention": "mega.attention (q/k affine)"}.get(key, key)
        groups[key] = groups.get(key, 0) + param.numel()
    return groups


rows, groups_of = {}, {}
for name, cfg in PRESETS.items():
    with torch.device("meta"):
        model = MegalodonLM(cfg)
    groups_of[name] = groups = parameter_groups(model)
    total = sum(groups.values())
    assert total == sum(p.numel() for p in model.parameters())
    embedding = groups["embed"] + groups.get("head", 0)
    rows[name] = (cfg, total, total - embedding)
print(f"{'preset':>14} {'layers':>6} {'D':>5} {'heads':>5} {'z':>5} {'v':>5} {'ffn':>6} {'V':>6} "
      f"{'total':>14} {'non-embedding':>14}")
for name, (cfg, total, body) in rows.items():
    print(f"{name:>14} {cfg.num_layers:>6} {cfg.model_dim:>5} {cfg.num_heads:>5} {cfg.z_dim:>5} {cfg.value_dim:>5} "
          f"{cfg.ffn_hidden_dim:>6} {cfg.vocab_size:>6} {total:>14,} {body:>14,}")

# %% [markdown]
# The same count for `mega200M`, by component. A layer's parameters sit almost all in matrices:
# the three that touch the values ($W_v$ and $W_r$, $D \times$ `value_dim`, and $W_{h2}$,
# `value_dim` $\times D$; the value width is twice $D$ in every official preset), the FFN's two
# ($D \times$ `ffn_hidden_dim` each), $W_{h1}$ ($D \times D$) and the narrow $W_z$
# ($D \times$ `z_dim`). The CEMA, for all its role, holds $D(4N + 2)$ numbers per layer
# ($\alpha, \delta$: $N$ each, $\gamma$: $2N$, $\theta$ and $\omega$: one each per channel), and every
# norm only $D$ or $2D$.

# %%
groups = groups_of["mega200M"]
total = sum(groups.values())
num_layers = PRESETS["mega200M"].num_layers
print(f"{'component':>28} {'per layer':>12} {'all layers':>14} {'share':>7}")
for key, count in groups.items():
    per_layer = f"{count // num_layers:,}" if key.startswith(("mega.", "ffn.")) else ""
    print(f"{key:>28} {per_layer:>12} {count:>14,} {count / total:>7.1%}")
print(f"{'total':>28} {'':>12} {total:>14,}")
share = {name: sum(groups[k] for k in keys) / total for name, keys in {
    "value matrices W_v, W_r, W_h2": ("mega.wv", "mega.wr", "mega.wh2"),
    "FFN": ("ffn.fc1", "ffn.fc2"),
    "embedding and head": ("embed", "head"),
    "CEMA": ("mega.cema",),
}.items()}
print("; ".join(f"{name}: {fraction:.1%}" for name, fraction in share.items()))

# %% [markdown]
# ## 5. Why a two-hop residual
#
# A pre-norm Transformer block adds both of its sub-layers to the residual stream:
# $y = x + \mathrm{Attn}(\mathrm{N}(x))$, $\;\text{out} = y + \mathrm{FFN}(\mathrm{N}(y))$.
# Every sub-layer output is added to the stream un-normalised, so the stream grows with depth.
# Megalodon §3.4 (eq. (10) is the pre-norm block, eq. (11) the new one) keeps the pre-normalisation but rewires the second residual to skip back to
# the block input: $\text{out} = x + \mathrm{FFN}(\mathrm{LN}(y))$, motivated by training
# stability as the model grows. The output of the attention layer still shapes the block's
# output, but only through the normalised FFN input, never added to the stream as is; the stream
# gains one term per block instead of two.
#
# Because `NormalizedFFN.forward` takes the residual as an argument, the pre-norm variant uses the
# very same parameters: `ffn(y, residual=y)` instead of `ffn(y, residual=x)`. The next cell
# follows the RMS of the residual stream at initialisation, block after block, for a deep narrow
# model fed random tokens, with both wirings.

# %%
depth_cfg = preset("tiny", num_layers=pick(smoke=12, full=32), chunk_size=64)
deep = MegalodonLM(depth_cfg).eval()
tokens = torch.randint(0, depth_cfg.vocab_size, (1, pick(smoke=128, full=2048)))


@torch.no_grad()
def stream_rms(model: MegalodonLM, tokens: torch.Tensor, two_hop: bool) -> list[float]:
    """RMS of the residual stream after the embedding and after each block."""
    x = model.embed(tokens)
    rms = [x.pow(2).mean().sqrt().item()]
    for block in model.blocks:
        y, _ = block.mega(x)
        x = block.ffn(y, residual=x if two_hop else y)
        rms.append(x.pow(2).mean().sqrt().item())
    return rms


rms_two_hop = stream_rms(deep, tokens, two_hop=True)
rms_pre_norm = stream_rms(deep, tokens, two_hop=False)
print(f"RMS of the stream after {depth_cfg.num_layers} blocks: two-hop {rms_two_hop[-1]:.3f}, "
      f"pre-norm {rms_pre_norm[-1]:.3f} (embedding {rms_two_hop[0]:.3f}); "
      f"ratio {rms_pre_norm[-1] / rms_two_hop[-1]:.1f}")
assert rms_pre_norm[-1] > rms_two_hop[-1]

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(rms_two_hop, "o-", label="two-hop: out = x + FFN(LN(y))")
ax.plot(rms_pre_norm, "s-", label="pre-norm: out = y + FFN(LN(y))")
ax.set_xlabel("block")
ax.set_ylabel("RMS of the residual stream")
ax.set_title("Residual stream at initialisation")
ax.legend()
fig.tight_layout()
save_figure(fig, "07_two_hop_residual")
plt.show()

# %% [markdown]
# Both streams grow with depth, as each block adds a term of similar size to it. The pre-norm
# stream grows faster, since every block adds the attention layer's output $h$ on top of the
# FFN's. This is a picture of the mechanism at one random initialisation, not a measurement of
# training stability, which the paper's argument is about.

# %% [markdown]
# ## 6. Streaming: unlimited context with a constant-size state
#
# **Pieces equal the whole.** Each of the model's look-back mechanisms hands its summary to the
# next call, so feeding a sequence in pieces of any sizes must give the logits of one call over
# the concatenation. We check it in float64, where the only differences are the roundings of
# different summation orders, at split points chosen at random: inside chunks, on chunk
# boundaries, single tokens.

# %%
stream_cfg = preset("tiny", chunk_size=16)
model64 = MegalodonLM(stream_cfg).double().eval()
tokens = torch.randint(0, stream_cfg.vocab_size, (2, pick(smoke=150, full=600)))
with torch.no_grad():
    full_logits, full_state = model64(tokens)
    generator = torch.Generator().manual_seed(1)
    cuts = sorted(set(torch.randint(1, tokens.shape[1], (12,), generator=generator).tolist())
                  | {16, 32, 33, 34})  # a boundary, two single tokens after it
    pieces, state = [], None
    for start, stop in zip([0, *cuts], [*cuts, tokens.shape[1]]):
        logits, state = model64(tokens[:, start:stop], state)
        pieces.append(logits)
streamed = torch.cat(pieces, dim=1)
err = (streamed - full_logits).abs().max().item()
print(f"{len(pieces)} pieces of sizes {[p.shape[1] for p in pieces]}")
print(f"max |streamed - full| = {err:.2e} (float64)")
assert err < 1e-10, err  # float64 roundoff 1e-16 times a few thousand operations per logit
assert torch.equal(state.num_tokens, full_state.num_tokens)

# %% [markdown]
# **A long stream.** Now the promise itself: read a long input, piece after piece, and watch
# what the model holds. A small byte-level model (its shape is printed) reads random bytes in
# pieces of many chunks; after each piece we record the bytes held by the state
# (`MegalodonState.nbytes`, every tensor it keeps alive), the memory of the whole Python process
# (resident set size; on a GPU, the device memory allocated) and the time per token. The stream
# is longer than a million tokens in smoke mode too: the model is small enough for a CPU.

# %%
import os

from tqdm.auto import tqdm


def process_rss_bytes() -> int | None:
    """Resident memory of this process: psutil if installed, else /proc (Linux), else None."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


long_cfg = preset("tiny", model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=32, num_heads=1,
                  norm_num_groups=4, chunk_size=128)
long_model = MegalodonLM(long_cfg).to(device).eval()
piece = 64 * long_cfg.chunk_size
n_tokens = 2 ** 20
print(f"{long_cfg.num_layers} layers, D={long_cfg.model_dim}, chunks of {long_cfg.chunk_size}, "
      f"{sum(p.numel() for p in long_model.parameters()):,} parameters; pieces of {piece:,} tokens")
generator = torch.Generator().manual_seed(2)
state, positions, state_bytes, rss_bytes, seconds_per_token = None, [], [], [], []
start_all = time.perf_counter()
with torch.inference_mode():
    for start in tqdm(range(0, n_tokens, piece), desc="streaming", unit="piece", mininterval=1.0):
        chunk_tokens = torch.randint(0, long_cfg.vocab_size, (1, piece), generator=generator).to(device)
        t0 = time.perf_counter()
        logits, state = long_model(chunk_tokens, state)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds_per_token.append((time.perf_counter() - t0) / piece)
        positions.append(start + piece)
        state_bytes.append(state.nbytes)
        rss_bytes.append(torch.cuda.memory_allocated() if device.type == "cuda" else process_rss_bytes())
elapsed = time.perf_counter() - start_all
assert int(state.num_tokens[0]) == n_tokens and torch.isfinite(logits).all()
print(f"read {n_tokens:,} tokens in {elapsed:.1f} s ({n_tokens / elapsed:,.0f} tokens/s on {device})")
print(f"state: {min(state_bytes):,} to {max(state_bytes):,} bytes over the whole stream")
if rss_bytes[0] is not None:
    print(f"{'GPU memory allocated' if device.type == 'cuda' else 'process memory (RSS)'}: between "
          f"{min(rss_bytes) / 2**20:.1f} and {max(rss_bytes) / 2**20:.1f} MiB over the whole stream")
quarter = len(seconds_per_token) // 4
first, last = np.mean(seconds_per_token[:quarter]), np.mean(seconds_per_token[-quarter:])
print(f"time per token: {first * 1e6:.2f} µs in the first quarter of the stream, {last * 1e6:.2f} µs in the last")
assert max(state_bytes) == min(state_bytes)  # pieces are whole chunks: the same state shapes every time
if rss_bytes[0] is not None:  # a leak of one piece's logits would add 8 MiB per piece
    assert max(rss_bytes[1:]) - rss_bytes[1] < 64 * 2**20, "memory grew along the stream"

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
axes[0].plot(positions, np.array(state_bytes) / 1024)
axes[0].set_ylabel("state (KiB)")
axes[0].set_ylim(0, 1.2 * max(state_bytes) / 1024)
if rss_bytes[0] is not None:
    axes[1].plot(positions, np.array(rss_bytes, dtype=float) / 2**20)
    axes[1].set_ylim(0, 1.2 * max(rss_bytes) / 2**20)
axes[1].set_ylabel("GPU memory allocated (MiB)" if device.type == "cuda" else "process RSS (MiB)")
axes[2].plot(positions, np.array(seconds_per_token) * 1e6)
axes[2].set_ylim(0, 1.5 * max(seconds_per_token) * 1e6)
axes[2].set_ylabel("time per token (µs)")
for ax in axes:
    ax.set_xlabel("tokens read")
fig.suptitle(f"Streaming {n_tokens:,} tokens through a Megalodon model")
fig.tight_layout()
save_figure(fig, "07_streaming_memory")
plt.show()

# %% [markdown]
# Flat lines: the state is exactly the same size after a million tokens as after the first piece,
# the process memory only wobbles as the allocator reuses blocks, and a token costs no more at
# the end of the stream than at the start (spikes, if any, are other work on the machine). For
# a large model the state is larger — per sequence and layer the CEMA state of $D \times N$
# complex numbers, $2G$ statistics and at most one chunk of keys and values — but it grows with
# the model and the chunk, never with the stream.
#
# (The official evaluation code, past [eight chunks](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/inference.py#L17), [*replaces* the norm statistics by ones recomputed over the last six chunks](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/inference.py#L50-L54)
# ([`truncate_cache`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/utils.py#L202-L211)); the paper does not mention it. This package keeps the
# statistics of the whole history, which is what "feeding in pieces equals one call" requires.)

# %% [markdown]
# **Generating text.** `generate` reads the prompt through the state one chunk per call, then
# feeds each sampled token back alone, so neither a long prompt nor a long continuation makes
# memory grow. The model below is the small demo checkpoint that chapter 10's GPU run trained on
# the Python standard library (`checkpoints/demo`, 3.4M parameters, byte-level; an untrained
# `tiny` model stands in where the chapters were copied out without it). Two things are checked:
# the same seed gives the same text, and greedy decoding through the state picks exactly the tokens
# a single full forward pass over prompt and continuation would pick (teacher forcing).

# %%
from megalodon_lite.checkpoint import load_checkpoint
from megalodon_lite.export import repo_root

demo_checkpoint = repo_root() / "checkpoints" / "demo"
if (demo_checkpoint / "config.json").exists():
    text_model = load_checkpoint(demo_checkpoint).eval()
    print(f"loaded {demo_checkpoint.name}: {sum(p.numel() for p in text_model.parameters()):,} parameters")
else:
    text_model = MegalodonLM(preset("tiny")).eval()
    print("no checkpoints/demo here: an untrained tiny model (its text is noise)")
prompt = torch.tensor([list("def read_config(path):\n    ".encode())])
sampled = text_model.generate(prompt, 64, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(3))
again = text_model.generate(prompt, 64, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(3))
assert torch.equal(sampled, again)
print("sampled:", repr(bytes(sampled[0].tolist()).decode("utf-8", errors="replace")))

greedy = text_model.generate(prompt, 48, temperature=0)
with torch.no_grad():
    logits, _ = text_model(torch.cat([prompt, greedy], dim=1))
teacher_forced = logits[:, prompt.shape[1] - 1:-1].argmax(-1)
assert torch.equal(greedy, teacher_forced)
print("greedy: ", repr(bytes(greedy[0].tolist()).decode("utf-8", errors="replace")))

# %% [markdown]
# ## 7. Saving and loading
#
# A checkpoint is a folder with two files: `config.json` (the config, a format version, the name
# of the weights file and its SHA-256) and the weights in safetensors, a format that holds only
# tensors — loading it never runs code, unlike a pickle. Saving is atomic (each file is written
# under a temporary name and moved into place with `os.replace`; `config.json` is replaced last,
# so a save that fails leaves the old checkpoint whole), and loading checks the format, the
# config, the hash and every tensor's name and shape before it touches the model. This is
# infrastructure, not architecture, so it lives in a hand-written module,
# `megalodon_lite/checkpoint.py`. A round trip is bit-exact, and a damaged or mismatched
# checkpoint is refused with a message that says what is wrong:

# %%
import tempfile
from pathlib import Path

from megalodon_lite.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

with tempfile.TemporaryDirectory() as tmp:
    folder = save_checkpoint(text_model, Path(tmp) / "tiny")
    print("checkpoint files:", sorted(p.name for p in folder.iterdir()))
    restored = load_checkpoint(folder)                    # a new model, in eval mode
    assert not restored.training
    with torch.no_grad():
        assert torch.equal(restored(prompt)[0], text_model(prompt)[0])
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), text_model.state_dict().values()))
    try:
        load_checkpoint(folder, MegalodonLM(preset("tiny", num_layers=3)))
    except CheckpointError as err:
        print("mismatched model ->", err)
    weights = next(folder.glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    try:
        load_checkpoint(folder)
    except CheckpointError as err:
        print("truncated weights ->", err.args[0].replace(str(folder), "<folder>"))

# %% [markdown]
# ## Summary
#
# * A Megalodon block is `TimestepNorm → CEMA → RMSNorm → (z, r)`, values from the normed input,
#   chunked normalised attention, a gated output projection plus the input, then a normalised FFN
#   whose residual skips back to the block input (two hops).
# * The language model adds an embedding, a final timestep norm and a head; presets reproduce
#   the official shapes, and their parameter counts are computed, not quoted.
# * The streaming state — per layer the norm statistics, the complex EMA state and the keys and
#   values of the unfinished chunk — makes pieces equal the whole and keeps memory flat over a
#   stream of a million tokens.
# * Checkpoints are safetensors plus JSON, written atomically and verified by hash on load.
#
# Later chapters write GPU kernels for its three costly ops (08, 09), train the `small` preset
# against a Llama-style transformer (10) and spread the chunks of one long sequence over several
# processes (11).

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the package's own on random inputs and prints a pass, "not yet implemented", or
# what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then run.** The `tiny` preset (2 layers, $D = 64$, $N = 16$, $G = 8$ groups, 2 heads
# with `z_dim` 32 and `value_dim` 128, chunks of $c = 64$) reads 1,000 tokens of one sequence, then
# 24 more. How many bytes does its state hold after 1,000 tokens, and after 1,024: more, or fewer?
# Predict from the parts of `LayerState` (float32 statistics, complex64 CEMA state, float32 keys and
# values, an int64 count), then run the next cell, which prints both states.
#
# ### BEGIN SOLUTION
# Per layer: the norm's count (8 bytes) and $G$ means and variances ($2 \cdot 8 \cdot 4 = 64$ bytes),
# the CEMA state $D \cdot N$ complex64 numbers ($64 \cdot 16 \cdot 8 = 8{,}192$ bytes), and the keys and
# values of the unfinished chunk, $n$ tokens of $32 + 128$ numbers ($640\,n$ bytes). The final norm adds
# another 72 bytes. After 1,000 tokens the current chunk holds $n = 1000 \bmod 64 = 40$ tokens:
# $2 \cdot (8{,}264 + 25{,}600) + 72 = 67{,}800$ bytes. After 1,024 tokens a chunk has just finished,
# $n = 0$: $2 \cdot 8{,}264 + 72 = 16{,}600$ bytes, *fewer*. The state's size depends on where the stream
# is inside its chunk, never on how many tokens came before.
# ### END SOLUTION

# %%
import torch

from megalodon_lite.config import MegalodonConfig, preset
from megalodon_lite.exercises import check
from megalodon_lite.model import MegalodonBlock, MegalodonLM

reader = MegalodonLM(preset("tiny")).eval()
stream = torch.randint(0, 256, (1, 1024), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    _, after_1000 = reader(stream[:, :1000])
    _, after_1024 = reader(stream[:, 1000:], after_1000)
print(after_1000)
print(after_1024)

# %% [markdown]
# **2. Derive.** Count the parameters of one Megalodon block (layer and FFN) in terms of $D$, $N$,
# `z_dim` $z$, `value_dim` $v$ and `ffn_hidden_dim` $f$, going through section 3's list: the timestep
# norm, the CEMA, the RMSNorm, the five projections (which have a bias?), the attention's
# $\gamma, \beta$ and the FFN with its LayerNorm. What do SwiGLU and `rescale_nffn` add?
#
# ### BEGIN SOLUTION
# Timestep norm $2D$ (weight and bias); CEMA $D(4N + 2)$ (`alpha`, `delta`: $DN$ each, `gamma`:
# $2DN$, `theta` and `omega`: $D$ each); RMSNorm $D$; $W_z$: $Dz + z$; $W_v$ and $W_r$: $Dv + v$ each;
# $W_{h1}$: $D^2 + D$; $W_{h2}$: $vD$, no bias; the attention's $\gamma$ and $\beta$, each
# $(2, H, z/H)$: $4z$; the FFN's LayerNorm $2D$ and its two matrices $2Df$, no biases. In all
# $D^2 + D(z + 3v + 2f + 4N + 8) + 5z + 2v$. SwiGLU adds a third FFN matrix, $Df$; `rescale_nffn`
# the layer scale, $D$. The model adds the embedding $VD$, the head $VD$ (none when `share_emb`
# ties it to the embedding) and the final norm $2D$.
# ### END SOLUTION

# %% [markdown]
# **3. Count a model's parameters by hand.** `count_parameters(config)` returns the number of
# parameters of `MegalodonLM(config)` from the fields of the config alone, with the formula of
# exercise 2. The check builds the package's model for random configs on the `meta` device (shapes,
# no memory) and counts its parameters.

# %%
def count_parameters(config: MegalodonConfig) -> int:
    """Parameters of MegalodonLM(config), from the config's fields alone."""
    ### BEGIN SOLUTION
    d, n, z, v, f = config.model_dim, config.cema_ndim, config.z_dim, config.value_dim, config.ffn_hidden_dim
    block = d * d + d * (z + 3 * v + 2 * f + 4 * n + 8) + 5 * z + 2 * v
    block += d * f * config.swiglu + d * config.rescale_nffn
    embeddings = config.vocab_size * d * (1 if config.share_emb else 2)
    return embeddings + 2 * d + config.num_layers * block
    ### END SOLUTION


# %% tags=["check"]
def parameters_of_the_model(config: MegalodonConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MegalodonLM(config).parameters())


def random_config(generator: torch.Generator) -> tuple[MegalodonConfig]:
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=generator))

    heads, groups = draw(1, 4), draw(1, 8)
    flags = {name: bool(draw(0, 1)) for name in ("swiglu", "rescale_nffn", "share_emb")}
    return (MegalodonConfig(vocab_size=draw(2, 500), num_layers=draw(1, 6), model_dim=groups * draw(1, 32),
                            z_dim=2 * heads * draw(1, 16), value_dim=heads * draw(1, 64), num_heads=heads,
                            ffn_hidden_dim=draw(1, 256), chunk_size=draw(1, 128), norm_num_groups=groups,
                            cema_ndim=draw(1, 16), **flags),)


check(count_parameters, reference=parameters_of_the_model, make_inputs=random_config,
      hint="go through one block's modules in section 3 (which projections have a bias?), then the embedding, "
           "the head (tied or not) and the final norm")

# %% [markdown]
# **4. Wire the two-hop block.** `my_block(block, x)` computes a `MegalodonBlock`'s output from its
# two parts, `block.mega` (the layer, which returns $y = x + h$ and its state) and `block.ffn` (the
# normalised FFN, called as `ffn(y, residual=...)`), for an input `x` (B, L, D) from a fresh stream.
# The check compares it with the block itself.

# %%
def my_block(block: MegalodonBlock, x: torch.Tensor) -> torch.Tensor:
    """The output (B, L, D) of a Megalodon block on x (B, L, D), from block.mega and block.ffn."""
    ### BEGIN SOLUTION
    y, _ = block.mega(x)
    return block.ffn(y, residual=x)
    ### END SOLUTION


# %% tags=["check"]
def block_output(block: MegalodonBlock, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return block(x)[0]


def block_inputs(generator: torch.Generator) -> tuple[MegalodonBlock, torch.Tensor]:
    config = preset("tiny", model_dim=16, z_dim=8, value_dim=16, ffn_hidden_dim=24, num_heads=2, norm_num_groups=4,
                    chunk_size=8)
    with torch.random.fork_rng():                                 # the block's own initialisation, reproducibly
        torch.manual_seed(int(torch.randint(2**31, (), generator=generator)))
        block = MegalodonBlock(config, layer_index=0).double().eval()
    batch, length = int(torch.randint(1, 4, (), generator=generator)), int(torch.randint(1, 30, (), generator=generator))
    return block, torch.randn(batch, length, config.model_dim, generator=generator, dtype=torch.float64)


check(my_block, reference=block_output, make_inputs=block_inputs,
      hint="the FFN's residual is the block's input x, not the layer's output y")
