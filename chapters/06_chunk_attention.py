# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Normalized attention, chunk by chunk
#
# Megalodon keeps softmax attention, but changes three things about it (Megalodon §3.3,
# eqs. (5)-(9), and MEGA's chunk-wise variant "Mega-chunk", MEGA §3.4; official code
# [`MovingAverageGatedAttention`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L145-L353)):
#
# 1. **Normalized attention.** Queries and keys come from one shared representation $z$ that is
#    normalised per head before a learned per-channel scale and offset. The dot products are
#    then bounded at initialisation, and the softmax uses scale 1 instead of $1/\sqrt{d_h}$.
# 2. **Rotary positions that restart in every chunk.**
# 3. **Chunk-wise attention.** A token attends only to the earlier tokens of its own chunk of $c$
#    tokens. The CEMA of chapter 04 carries information across chunks, so attention only has to
#    be local, and the cost is linear in the length $L$ for a fixed $c$.
#
# Streaming inference needs only the keys and values of the current, unfinished chunk, so the
# attention's memory is bounded by $c$ however long the stream is.
#
# This chapter builds `megalodon_lite/attention.py`: `RMSNorm`, `RotaryEmbedding`,
# `ChunkKVCache` and `ChunkAttention`, which maps $z$ and $v$ to the attention output $O$ (before
# the gate $r$ of the next chapter).

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from megalodon_lite.notebook import (describe_run, pick, pick_device, require_cuda, save_figure, seed_everything,
                                     time_call)

seed_everything(0)
device = pick_device()
describe_run(device)

# %% [markdown]
# ## 1. RMSNorm, stored as 0 and applied as +1
#
# RMSNorm divides a vector by its root mean square and multiplies by a learned scale:
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac1d \sum_i x_i^2 + \varepsilon}} \odot (w + 1).$$
#
# As everywhere in the official code (the "plus 1 reparameterization" of Megalodon Appendix B.2,
# eq. (23)), the scale is *stored* as $w = 0$ and *applied* as $w + 1$,
# so weight decay pulls it towards 1 (the identity) rather than towards 0. The official
# [`FusedRMSNorm`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/layer_norm.py#L44-L66) uses $\varepsilon = 10^{-5}$ ([`ModelConf.norm_eps`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/config.py#L58)), for the
# [affine norm after CEMA and for the per-head norm of $z$ without affine](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L192-L193), and so do we. As in the official code,
# the statistics are taken in float32 even for bfloat16 inputs (bfloat16 keeps 8 significant bits)
# and only the result is rounded back.
#
# **What the backward keeps.** Written as PyTorch operations, the formula makes autograd keep
# float32 copies of both $x$ and the result for the backward: 8 bytes per channel and token, for
# every norm of the model. Under bf16 autocast the matrix products that read the result each cast
# it to bf16 again and keep their own copy. Yet the gradient needs only $x$ and one number per
# row, $\rho = (\tfrac1d\sum_i x_i^2 + \varepsilon)^{-1/2}$. With $\hat x = \rho x$,
# $y = \hat x \odot (w+1)$ and the incoming gradient $g = \partial\ell/\partial y \odot (w + 1)$:
#
# $$\frac{\partial \ell}{\partial x} = \rho\,\big(g - \hat x \cdot \tfrac1d \textstyle\sum_i g_i \hat x_i\big),
# \qquad \frac{\partial \ell}{\partial w} = \sum_{\text{rows}} \frac{\partial\ell}{\partial y} \odot \hat x .$$
#
# (Differentiate $\hat x_i = x_i \rho$: $\partial \hat x_i / \partial x_j = \rho\,\delta_{ij} - \rho\,\hat x_i \hat x_j / d$.)
# So `rms_norm` below is a `torch.autograd.Function` that keeps $x$ as it came and $\rho$ in
# float32, and recomputes $\hat x$ in the backward. Under autocast it returns the autocast dtype
# directly, the dtype the matrix products would cast to anyway, so one copy serves all of them.

# %% tags=["export:attention"]
"""Normalized chunk-wise attention: RMSNorm, rotary embeddings, and the chunk KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_lite import validate
from megalodon_lite.backend import check_backend, requested_backend, use_triton

NORM_EPS = 1e-5
"""The official code's normalisation epsilon (``ModelConf.norm_eps``)."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input's own dtype otherwise (float32, float64)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def activation_dtype(x: Tensor) -> torch.dtype:
    """The dtype a norm returns for ``x``: the autocast dtype when autocast is on for x's device and
    x is not float64 (what the matrix products reading the norm would cast to), else x's dtype."""
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _RMSNorm(torch.autograd.Function):
    """``x * rho * scale``, rho = (mean(x**2) + eps)**-0.5 per row; keeps x and rho for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
        xc = x.to(_compute_dtype(x.dtype))
        rho = torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)
        y = xc * rho if scale is None else xc * rho * scale.to(xc.dtype)
        ctx.save_for_backward(x, rho, scale)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, rho, scale = ctx.saved_tensors
        x_hat = x.to(rho.dtype) * rho
        g = dy.to(rho.dtype)
        d_scale = None
        if scale is not None:
            if ctx.needs_input_grad[1]:
                d_scale = (g * x_hat).reshape(-1, x.shape[-1]).sum(0).to(scale.dtype)
            g = g * scale.to(g.dtype)
        dx = rho * (g - x_hat * (g * x_hat).mean(dim=-1, keepdim=True))
        return dx.to(x.dtype), d_scale, None, None


def rms_norm(x: Tensor, scale: Tensor | None, eps: float = NORM_EPS) -> Tensor:
    """``x / sqrt(mean(x**2) + eps) * scale`` over the last dimension, with a hand-written backward.

    x (..., d); scale (d,) or None. Statistics in float32 for half-precision x; the result in
    :func:`activation_dtype` (x). For the backward it keeps x and one float per row, not float32
    copies of x and y: ``dx = rho (g - x_hat mean(g x_hat))`` with ``g = dy * scale``.
    """
    return _RMSNorm.apply(x, scale, eps, activation_dtype(x))


# %% tags=["export:attention"]
class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension.

    ``y = x / sqrt(mean(x**2) + eps) * (weight + 1)``; ``weight`` (dim,) is stored as 0 and applied
    as ``weight + 1`` (the official convention for every norm scale). Statistics are computed in
    float32 for float16/bfloat16 inputs (float64 stays float64); the output has the input's dtype,
    or the autocast dtype under autocast (:func:`activation_dtype`). The backward keeps only x and
    one float per row (:func:`rms_norm`).

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square; the official code uses 1e-5.
        affine: learn the per-channel scale; False gives the plain normalisation.
    """

    def __init__(self, dim: int, eps: float = NORM_EPS, affine: bool = True) -> None:
        super().__init__()
        validate.positive_int("dim", dim)
        validate.positive_number("eps", eps)
        self.dim = dim
        self.eps = float(eps)
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., dim) -> (..., dim) in :func:`activation_dtype` (x's dtype outside autocast)."""
        validate.last_dim("x", x, self.dim)
        return rms_norm(x, None if self.weight is None else self.weight + 1.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.affine}"


# %% [markdown]
# The check: a float64 reference written straight from the formula, on inputs that are not zero
# and a weight that is not zero. In float32 the two agree to a few units of float32 rounding
# ($2^{-24} \approx 6\cdot10^{-8}$ relative, on values of a few units); bfloat16 inputs,
# normalised in float32 and rounded once at the end, agree to one bfloat16 rounding ($2^{-8}$
# relative, 8 significant bits) plus float32 noise.

# %%
def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * (weight.double() + 1)


norm = RMSNorm(48).to(device)
with torch.no_grad():
    norm.weight.normal_(0, 0.5)
x = 3 * torch.randn(4, 10, 48, device=device) + 1
ref = rmsnorm_reference(x, norm.weight, norm.eps)
err32 = (norm(x).double() - ref).abs().max().item()
err16 = ((norm(x.bfloat16()).double() - rmsnorm_reference(x.bfloat16(), norm.weight, norm.eps)).abs()
         / ref.abs().clamp_min(1e-3)).max().item()
print(f"float32 max abs error {err32:.1e}; bfloat16 max relative error {err16:.1e}")
assert err32 < 1e-5 and err16 <= 2**-8 + 1e-5

# the +1 convention: a freshly built norm has weight 0 and is the plain normalisation
fresh = RMSNorm(48).to(device)
assert torch.equal(fresh.weight, torch.zeros(48, device=device))
assert torch.allclose(fresh(x), RMSNorm(48, affine=False).to(device)(x))

# %% [markdown]
# The hand-written backward against autograd of the float64 reference, for $x$ and the weight,
# and what each keeps for the backward (every tensor saved, counted once per storage): for a
# bfloat16 input the formula keeps 8 bytes per channel and token, `rms_norm` 2 plus one float per row.

# %%
def saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of fn(*args)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


x64 = x.double().requires_grad_()
norm64 = RMSNorm(48).double().to(device)
norm64.load_state_dict(norm.state_dict())
dy = torch.randn_like(x64)
grads = torch.autograd.grad(norm64(x64), (x64, norm64.weight), dy)
ref_grads = torch.autograd.grad(rmsnorm_reference(x64, norm64.weight, norm64.eps), (x64, norm64.weight), dy)
grad_err = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads))
print(f"float64 gradient max abs error {grad_err:.1e}")
assert grad_err < 1e-12

xb = x.bfloat16().requires_grad_()
formula = saved_bytes(lambda t: (t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + 1e-5)
                                 * (norm.weight + 1)).bfloat16(), xb)
ours = saved_bytes(norm, xb)
print(f"saved for the backward, {x.numel()} bf16 values: formula {formula} bytes, rms_norm {ours} bytes")
assert ours < formula / 3

# %% [markdown]
# ## 2. Normalized attention: why no $1/\sqrt{d_h}$
#
# Megalodon computes one shared representation $z = m W_z + b_z$ ($m$ is the normalised CEMA
# output of chapter 07), splits it into $H$ heads of $d_h$ channels, and derives both queries and
# keys from it. The paper (Megalodon §3.3, "normalized attention", eqs. (6)-(8)) writes
#
# $$z' = \frac{z}{\lVert z \rVert}, \qquad q = \kappa_q \odot z' + \mu_q, \qquad
#   k = \kappa_k \odot z' + \mu_k .$$
#
# The [official code](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L319-L328) writes the same thing with an RMSNorm without affine and the "+1"
# convention:
#
# $$\hat z = \frac{z}{\sqrt{\tfrac{1}{d_h}\lVert z\rVert^2 + \varepsilon}}, \qquad
#   q = \hat z \odot \frac{\gamma_q + 1}{\sqrt{d_h}} + \beta_q, \qquad
#   k = \hat z \odot \frac{\gamma_k + 1}{\sqrt{d_h}} + \beta_k .$$
#
# Since $\sqrt{\tfrac{1}{d_h}\lVert z\rVert^2} = \lVert z\rVert / \sqrt{d_h}$, we get
# $\hat z / \sqrt{d_h} = z / \lVert z \rVert$ up to $\varepsilon$: the two are the same with
# $\kappa = \gamma + 1$ and $\mu = \beta$. With $\gamma = \beta = 0$ at initialisation, $q$ and
# $k$ are unit vectors and every score $q_t \cdot k_s$ is a cosine, in $[-1, 1]$ whatever $d_h$.
# The $1/\sqrt{d_h}$ of ordinary attention exists to stop dot products of un-normalised vectors
# from growing like $\sqrt{d_h}$; here there is nothing to stop, so the softmax runs with scale
# 1.0 and the learned $\kappa$ plays the role of a per-channel temperature.

# %% tags=["export:attention"]
def normalized_qk(z_hat: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Queries and keys of normalized attention from the RMS-normalised shared representation.

    ``q = z_hat * (gamma[0] + 1) / sqrt(dz) + beta[0]`` and likewise ``k`` with index 1: with
    ``z_hat = RMSNorm(z)`` this is ``z / |z|`` scaled by ``gamma + 1`` and shifted by ``beta``
    (Megalodon §3.3, eqs. (6)-(8)). The parameters are cast to ``z_hat``'s dtype.

    Args:
        z_hat: (B, L, H, dz) per-head RMS-normalised z.
        gamma, beta: (2, H, dz), row 0 for queries and row 1 for keys, stored as 0.

    Returns:
        q, k: (B, L, H, dz) each.
    """
    scale = (gamma.to(z_hat.dtype) + 1.0) / math.sqrt(z_hat.shape[-1])
    qk = z_hat.unsqueeze(-3) * scale + beta.to(z_hat.dtype)  # (B, L, 2, H, dz)
    return qk[..., 0, :, :], qk[..., 1, :, :]


# %% [markdown]
# Check: at initialisation $q = k = z / \lVert z \rVert$, up to the $\varepsilon$ inside the root
# (relative size $\varepsilon / (2\,\overline{z^2})$, about $10^{-5}$ here), so every score lies in
# $[-1, 1]$; the raw dot products $z_t \cdot z_s$ grow like $\sqrt{d_h}$.

# %%
heads, z_head = 2, 64
z = torch.randn(3, 20, heads, z_head, device=device, dtype=torch.float64)
gamma0 = torch.zeros(2, heads, z_head, device=device, dtype=torch.float64)
q0, k0 = normalized_qk(RMSNorm(z_head, affine=False)(z), gamma0, gamma0)
unit = z / z.norm(dim=-1, keepdim=True)
print(f"max |q - z/|z|| = {(q0 - unit).abs().max().item():.1e}")
assert torch.allclose(q0, unit, rtol=1e-4, atol=0) and torch.equal(q0, k0)
scores = torch.einsum("blhd,bshd->bhls", q0, k0)
raw = torch.einsum("blhd,bshd->bhls", z, torch.randn_like(z))  # dot products of independent z's
print(f"normalized scores in [{scores.min().item():.3f}, {scores.max().item():.3f}]; "
      f"raw dot products have std {raw.std().item():.1f} (sqrt(d_h) = {math.sqrt(z_head):.0f})")
assert scores.abs().max() <= 1 + 1e-9

# %% [markdown]
# ## 3. Rotary positions, restarting in every chunk
#
# RoPE (Su et al. 2021) treats each pair of channels $(x_{2i}, x_{2i+1})$ as a complex number and
# turns it by an angle proportional to the position $p$:
#
# $$x_{2i} + \mathrm{i}\,x_{2i+1} \;\mapsto\; (x_{2i} + \mathrm{i}\,x_{2i+1})\, e^{\mathrm{i}\, p\, \theta_i},
#   \qquad \theta_i = \text{base}^{-2i/d}.$$
#
# A rotation preserves dot products up to the difference of the angles, so
# $\langle R_p q, R_s k\rangle$ depends on $p - s$ only: scores see relative positions. The
# official code [pairs *adjacent* channels](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/rotary_positional_embedding.py#L71-L72) (the complex form of the original LLaMA code), not
# the two halves of the vector, so we do the same, and we compute the rotation in float32 (float64
# for float64 inputs). Since attention never crosses a chunk boundary, the code gives token $t$
# the position $t \bmod c$ ([angles for positions below $c$ only](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/model/mega.py#L229-L230), [applied after the chunk split](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L112-L114)). Because scores depend on $p - s$ only, and $p$ and $s$ always share a
# chunk, restarting does not change the exact result (section 4 checks this); what it buys is
# that every angle a model ever sees is below $c\,\theta_i$, at training time and at any stream
# length (a float32 angle $p\,\theta_0$ at $p$ in the millions keeps few correct digits), and
# that the cached keys of a stream, rotated at their in-chunk positions, never need re-rotating.
# Positions are passed explicitly.

# %% tags=["export:attention"]
class RotaryEmbedding(nn.Module):
    """Rotary position embedding on adjacent channel pairs, at explicit integer positions.

    Pair ``(x[2i], x[2i+1])`` at position ``p`` is rotated by the angle ``p * base**(-2i/dim)``.
    No parameters or buffers: the angles are computed in float64 at each call and the rotation in
    float32 (float64 for float64 inputs).

    Args:
        dim: size of the rotated (last) dimension, even.
        base: the wavelength base, 10000 by default.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        validate.rotary_shape(dim, base)
        self.dim = dim
        self.base = float(base)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (..., L, dim) and integer positions (L,) -> rotated x (..., L, dim), same dtype."""
        validate.rotary_inputs(x, positions, self.dim)
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float64, device=x.device) / self.dim
        angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * self.base ** -exponents
        dtype = _compute_dtype(x.dtype)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (L, dim/2)
        xc = x.to(dtype)
        even, odd = xc[..., 0::2], xc[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"


# %% [markdown]
# Check against a float64 reference that uses complex numbers exactly as the formula does, then
# the property that matters: shifting both positions by the same amount leaves every score
# unchanged.

# %%
def rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    turn = torch.polar(torch.ones_like(theta), positions.double()[:, None] * theta)  # (L, d/2)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


rope = RotaryEmbedding(z_head)
x = torch.randn(2, 3, 40, z_head, device=device)
positions = torch.randint(0, 4096, (40,), device=device)
err = (rope(x, positions).double() - rope_reference(x, positions)).abs().max().item()
print(f"RoPE float32 vs float64 reference: max abs error {err:.1e}")
assert err < 1e-5  # float32 rotation of O(1) values: a few ulps

qr, kr = torch.randn(2, 30, z_head, device=device, dtype=torch.float64).unbind(0)
p = torch.arange(30, device=device)
s0 = rope(qr, p) @ rope(kr, p).T
s1 = rope(qr, p + 1234) @ rope(kr, p + 1234).T
print(f"scores after shifting every position by 1234 differ by {(s0 - s1).abs().max().item():.1e}")
assert torch.allclose(s0, s1, atol=1e-9)

# %% [markdown]
# ## 4. Attention inside chunks
#
# Cut the sequence into chunks of $c$ tokens. Token $t$ attends to tokens $s \le t$ of its own
# chunk, with scale 1:
#
# $$O_t = \sum_{s:\ \lfloor s/c\rfloor = \lfloor t/c\rfloor,\ s \le t}
#   \frac{\exp(q_t \cdot k_s)}{\sum_{s'} \exp(q_t \cdot k_{s'})}\, v_s .$$
#
# That is full attention with a **block-diagonal causal mask**: $M_{ts} = 0$ when $s$ and $t$ share
# a chunk and $s \le t$, $-\infty$ otherwise. Computed chunk by chunk, it costs $L/c$ products of
# size $c \times c$, that is $L c$: linear in $L$ for a fixed $c$. The last chunk may be partial
# (when $c$ does not divide $L$), which is exactly the situation of a stream that stops mid-chunk.
#
# **Streaming.** When a stream arrives in pieces, a piece can start in the middle of a chunk. Its
# first tokens then need the keys and values of the earlier tokens of that chunk: the
# `ChunkKVCache` holds them (after RoPE). The piece's first $c - n$ tokens finish the cached chunk
# of $n$ tokens, attending to the cache; the rest start fresh chunks at position 0. After the
# call, the cache holds the tokens of the last unfinished chunk, and is emptied whenever a chunk
# is complete, so it never holds $c$ tokens or more.
#
# The fast path is PyTorch's `scaled_dot_product_attention` with `scale=1.0`: on a GPU a fused
# kernel that need not write the $c \times c$ probabilities to memory; for bfloat16 inputs it
# accumulates the softmax in float32 (`tests/test_attention.py` checks the error it leaves).
# Beside it, `causal_attention(..., use_sdpa=False)` is the explicit product
# $\mathrm{softmax}(q k^\top + M)\, v$ with scores and softmax in float32 (the official code's
# [non-fused path](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L116-L129) takes the scores in the input dtype and only the softmax in float32).
#
# **Attention dropout.** During training with `attention_dropout` $= p > 0$, both of our paths drop
# attention *probabilities* after the softmax and scale the kept ones by $1/(1-p)$ (SDPA's
# `dropout_p`, and `F.dropout` in the explicit path), as the official code's default path does
# ([softmax, then `memory_efficient_dropout`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L125-L126), which [divides by $1-p$](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/fused_ops/memory_efficient_dropout.py#L58)). The
# official fused kernels (Megalodon Appendix B.1; [`efficient_attn`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L130-L136) set to `"swift"` or `"fused"`) do something else,
# DropKey: [a dropped key's score becomes $-\infty$ *before* the softmax](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/csrc/softmax.cuh#L133-L167)
# ([used whenever dropout > 0](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/csrc/ops/attention_kernel.cu#L94-L115)), so the softmax renormalises over the keys that remain and
# nothing is rescaled. Without dropout (evaluation, and every preset here) the two are the same
# function; with dropout they train differently.

# %% tags=["export:attention"]
def causal_attention(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0,
                     use_sdpa: bool = True) -> Tensor:
    """Causal softmax attention with scale 1, where the queries are the last ``Lq`` of ``Lk`` positions.

    Query ``i`` sits at key position ``Lk - Lq + i`` and sees keys up to and including it, so
    ``Lk == Lq`` is ordinary causal attention and ``Lk > Lq`` lets the queries also see
    ``Lk - Lq`` earlier (cached) keys.

    Args:
        q: (N, H, Lq, dz) queries.
        k: (N, H, Lk, dz) keys, ``Lk >= Lq``.
        v: (N, H, Lk, dv) values.
        dropout_p: dropout on the attention probabilities.
        use_sdpa: ``torch.nn.functional.scaled_dot_product_attention`` (fast path); False gives
            the explicit ``softmax(q k^T + mask) v`` with scores and softmax in float32.

    Returns:
        (N, H, Lq, dv).
    """
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    offset = n_keys - n_queries
    mask = None if offset == 0 else torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).tril(offset)
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=mask is None, scale=1.0)
    if mask is None:
        mask = torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).tril()
    dtype = _compute_dtype(q.dtype)  # scores and softmax in float32 for half-precision inputs
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def _chunks_from_start(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, **kwargs) -> Tensor:
    """Causal attention inside chunks of ``chunk_size``, the first token at position 0 of a chunk.

    q, k (B, H, R, dz), v (B, H, R, dv) -> (B, H, R, dv). Whole chunks are folded into the head
    dimension for one batched call; a partial last chunk is attended separately (no padding).
    """
    batch, heads, length, _ = q.shape
    n_chunks = length // chunk_size
    full = n_chunks * chunk_size
    out = []
    if n_chunks:
        def fold(x: Tensor) -> Tensor:  # (B, H, full, d) -> (B, H * n_chunks, c, d)
            return x[:, :, :full].reshape(batch, heads * n_chunks, chunk_size, x.shape[-1])
        o = causal_attention(fold(q), fold(k), fold(v), **kwargs)
        out.append(o.reshape(batch, heads, full, v.shape[-1]))
    if full < length:
        out.append(causal_attention(q[:, :, full:], k[:, :, full:], v[:, :, full:], **kwargs))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


# %% [markdown]
# The cache holds only what the definition needs: the post-RoPE keys and values of the tokens
# of the current chunk seen so far. Its length *is* the position inside the chunk.
#
# The cache that `ChunkAttention` returns keeps its autograd history: the module on its own can be
# fed in pieces *and* trained through them, a loss on a later piece reaching the keys and values
# of an earlier one (the tests check that the gradients equal those of one call); `detach()` cuts
# it. The language model of chapter 07 does cut it: `MegalodonLM.forward` returns its whole
# streaming state detached, as the official code detaches its cache at every call
# ([keys and values](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L99-L100), [norm statistics and CEMA state](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L303-L305)), so through the
# model a stream is read for inference, or trained one call at a time (truncated backpropagation).

# %% tags=["export:attention"]
@dataclass
class ChunkKVCache:
    """Keys and values of the current, unfinished chunk (streaming state of `ChunkAttention`).

    Attributes:
        k: (B, H, n, dz) post-RoPE keys of the chunk's first ``n`` tokens, ``0 <= n < chunk_size``.
        v: (B, H, n, dv) their values.

    ``n = k.shape[2]`` is also the position inside the chunk of the next token.
    """

    k: Tensor
    v: Tensor

    @property
    def length(self) -> int:
        """Tokens held, n."""
        return self.k.shape[2]

    def detach(self) -> ChunkKVCache:
        """The same cache cut from the autograd graph."""
        return ChunkKVCache(self.k.detach(), self.v.detach())

    @classmethod
    def empty(cls, batch: int, num_heads: int, z_head_dim: int, v_head_dim: int, *,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ChunkKVCache:
        """A cache with no tokens (the start of a sequence)."""
        return cls(torch.zeros(batch, num_heads, 0, z_head_dim, dtype=dtype, device=device),
                   torch.zeros(batch, num_heads, 0, v_head_dim, dtype=dtype, device=device))


# %% [markdown]
# With the cache, attention over a piece of a stream is two calls at most: the tokens that finish
# the cached chunk attend to the cache and to each other, and the rest start fresh chunks. The
# new cache is whatever is left after the last chunk boundary.

# %% tags=["export:attention"]
def chunk_causal_attention(q: Tensor, k: Tensor, v: Tensor, cache: ChunkKVCache, chunk_size: int,
                           **kwargs) -> tuple[Tensor, ChunkKVCache]:
    """Causal attention inside chunks of ``chunk_size`` for tokens that continue a cached chunk.

    Args:
        q, k: (B, H, L, dz) post-RoPE queries and keys of the new tokens, L >= 1.
        v: (B, H, L, dv) their values.
        cache: the n < chunk_size tokens of the current chunk seen so far (n = 0: a fresh chunk).
        kwargs: ``dropout_p`` and ``use_sdpa``, passed to :func:`causal_attention`.

    Returns:
        O (B, H, L, dv), and the cache after these tokens (n' = (n + L) mod chunk_size tokens).
    """
    length, n_cached = q.shape[2], cache.length
    out = []
    head = min(length, chunk_size - n_cached) if n_cached else 0  # tokens that finish the cached chunk
    if head:
        k_head = torch.cat([cache.k, k[:, :, :head]], dim=2)
        v_head = torch.cat([cache.v, v[:, :, :head]], dim=2)
        out.append(causal_attention(q[:, :, :head], k_head, v_head, **kwargs))
    if head < length:
        out.append(_chunks_from_start(q[:, :, head:], k[:, :, head:], v[:, :, head:], chunk_size, **kwargs))
    o = out[0] if len(out) == 1 else torch.cat(out, dim=2)

    if n_cached + length < chunk_size:  # the chunk is still unfinished: keep all of it
        new_cache = ChunkKVCache(k_head, v_head) if head else ChunkKVCache(k.contiguous(), v.contiguous())
    elif (n_cached + length) % chunk_size == 0:  # ends on a boundary: empty, not tied to k and v in autograd
        new_cache = ChunkKVCache(k.new_zeros(*k.shape[:2], 0, k.shape[3]), v.new_zeros(*v.shape[:2], 0, v.shape[3]))
    else:  # keep the tokens after the last boundary (copied, so the rest can be freed)
        tail = (n_cached + length) % chunk_size
        new_cache = ChunkKVCache(k[:, :, length - tail:].clone(memory_format=torch.contiguous_format),
                                 v[:, :, length - tail:].clone(memory_format=torch.contiguous_format))
    return o, new_cache


# %% [markdown]
# The module puts the pieces of this chapter together: per-head RMSNorm of $z$, the learned
# affine that makes $q$ and $k$, RoPE at the position inside the chunk (which the cache length
# gives), and the chunked attention with its cache. On a GPU the whole chunks of a call run in
# chapter 09's Triton kernels instead (the same function, with the norm, affine and RoPE fused);
# the few tokens that finish a chunk begun in an earlier call stay on this path, as do attention
# dropout and float64. `backend` (or `MEGALODON_BACKEND`) forces either path.

# %% tags=["export:attention"]
class ChunkAttention(nn.Module):
    """Megalodon's normalized attention inside chunks, with a KV cache for streaming.

    Per head: ``z_hat = RMSNorm(z_h)`` (no affine, eps 1e-5); ``q = z_hat (gamma_q + 1)/sqrt(dz)
    + beta_q``, ``k`` likewise (Megalodon §3.3); RoPE at position ``t mod chunk_size``; causal
    softmax attention with scale 1 inside each chunk of ``chunk_size`` tokens (official
    ``MovingAverageGatedAttention``: https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/moving_average_gated_attention.py#L145-L353).

    Args:
        z_dim: size of the shared representation z, split into ``num_heads`` heads of dz.
        value_dim: size of the values v, split into ``num_heads`` heads of dv.
        num_heads: H.
        chunk_size: c, tokens per attention chunk.
        rope_base: RoPE wavelength base.
        attention_dropout: dropout on the attention probabilities (training only).
        backend: "auto" (chapter 09's Triton kernels on CUDA, PyTorch elsewhere), "triton" or
            "torch" (:mod:`megalodon_lite.backend`). The kernels take every whole chunk that starts
            at a chunk boundary; tokens that finish a chunk begun in an earlier call (streaming),
            attention dropout and float64 run this module's PyTorch path.

    Attributes:
        gamma, beta: (2, H, dz), zeros: row 0 scales/shifts queries, row 1 keys.
        use_sdpa: True (default) for PyTorch's fused attention, False for explicit matmuls.
    """

    def __init__(self, z_dim: int, value_dim: int, num_heads: int, chunk_size: int,
                 rope_base: float = 10000.0, attention_dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        validate.chunk_attention_shapes(z_dim, value_dim, num_heads, chunk_size, attention_dropout)
        self.z_dim, self.value_dim, self.num_heads, self.chunk_size = z_dim, value_dim, num_heads, chunk_size
        self.z_head_dim, self.v_head_dim = z_dim // num_heads, value_dim // num_heads
        self.attention_dropout = attention_dropout
        self.backend = check_backend(backend)
        self.use_sdpa = True
        self.z_norm = RMSNorm(self.z_head_dim, eps=NORM_EPS, affine=False)
        self.rope = RotaryEmbedding(self.z_head_dim, base=rope_base)
        self.gamma = nn.Parameter(torch.zeros(2, num_heads, self.z_head_dim))
        self.beta = nn.Parameter(torch.zeros(2, num_heads, self.z_head_dim))

    def forward(self, z: Tensor, v: Tensor, cache: ChunkKVCache | None = None) -> tuple[Tensor, ChunkKVCache]:
        """Attention output and the cache for the next call.

        Args:
            z: (B, L, z_dim) shared representation.
            v: (B, L, value_dim) values.
            cache: the chunk so far (None: the sequence starts at position 0 of a chunk). L need not
                be a multiple of chunk_size; with a cache of n tokens the first ``chunk_size - n``
                new tokens finish that chunk.

        Returns:
            O: (B, L, value_dim) attention output (before any gate), z's dtype.
            cache: the unfinished chunk after these tokens (n' = (n + L) mod chunk_size tokens).
        """
        validate.chunk_attention_inputs(z, v, cache, ChunkKVCache, z_dim=self.z_dim, value_dim=self.value_dim,
                                        num_heads=self.num_heads, chunk_size=self.chunk_size)
        batch, length, _ = z.shape
        if cache is None:
            cache = ChunkKVCache.empty(batch, self.num_heads, self.z_head_dim, self.v_head_dim,
                                       dtype=z.dtype, device=z.device)
        if length == 0:
            return v.new_zeros(batch, 0, self.value_dim), cache
        dropout_p = self.attention_dropout if self.training else 0.0
        head = min(length, self.chunk_size - cache.length) if cache.length else 0  # finish the cached chunk
        if head < length and kernels_cover(self, z, dropout_p):
            o_rest, new_cache = kernel_forward(self, z[:, head:], v[:, head:])
            if not head:
                return o_rest, new_cache
            o_head, _ = self._forward_torch(z[:, :head], v[:, :head], cache, dropout_p)  # its cache ends empty
            return torch.cat([o_head, o_rest], dim=1), new_cache
        return self._forward_torch(z, v, cache, dropout_p)

    def _forward_torch(self, z: Tensor, v: Tensor, cache: ChunkKVCache, dropout_p: float) -> tuple[Tensor, ChunkKVCache]:
        """This chapter's path: normalised q, k, RoPE at the position inside the chunk, chunked attention."""
        batch, length, _ = z.shape
        heads = self.num_heads
        q, k = normalized_qk(self.z_norm(z.unflatten(-1, (heads, self.z_head_dim))), self.gamma, self.beta)
        positions = (cache.length + torch.arange(length, device=z.device)) % self.chunk_size
        q = self.rope(q.transpose(1, 2), positions)  # (B, H, L, dz)
        k = self.rope(k.transpose(1, 2), positions)
        v = v.unflatten(-1, (heads, self.v_head_dim)).transpose(1, 2)  # (B, H, L, dv)
        o, cache = chunk_causal_attention(q, k, v, cache, self.chunk_size, use_sdpa=self.use_sdpa, dropout_p=dropout_p)
        return o.transpose(1, 2).reshape(batch, length, self.value_dim), cache

    def extra_repr(self) -> str:
        return (f"z_dim={self.z_dim}, value_dim={self.value_dim}, heads={self.num_heads}, chunk={self.chunk_size}, "
                f"dropout={self.attention_dropout}, backend={self.backend}")


# %% [markdown]
# On a GPU, `forward` hands every piece that starts at a chunk boundary to chapter 09's Triton
# kernels, which compute the same function with the norm, the affine and RoPE fused into one pass;
# the two functions below are the glue. The kernels return only $O$, so the keys and values of an
# unfinished last chunk (the next call's cache) are recomputed here from that chunk's $z$ and $v$:
# at most $c - 1$ tokens.

# %% tags=["export:attention"]
def kernels_cover(module: ChunkAttention, z: Tensor, dropout_p: float) -> bool:
    """Whether chapter 09's kernels run this call of ``module`` (a piece starting at a chunk boundary)."""
    choice = requested_backend(module.backend)
    if choice == "torch" or (choice == "auto" and z.device.type != "cuda"):
        return False  # decided without importing triton
    from megalodon_lite.ops.chunk_attention import unsupported_reason  # chapter 09; imports triton
    why_not = unsupported_reason(z, module.num_heads, dropout_p=dropout_p)
    return use_triton(module.backend, z.device, supported=not why_not, why_not=why_not)


def kernel_forward(module: ChunkAttention, z: Tensor, v: Tensor) -> tuple[Tensor, ChunkKVCache]:
    """O (B, L, value_dim) from chapter 09's kernels, for a piece starting at a chunk boundary, and the
    cache: post-RoPE keys and values of the unfinished last chunk."""
    from megalodon_lite.ops.chunk_attention import chunk_attention
    o = chunk_attention(z, v, module.gamma, module.beta, module.num_heads, module.chunk_size, module.z_norm.eps,
                        module.rope.base)
    (batch, length, _), heads = z.shape, module.num_heads
    tail = length % module.chunk_size
    if not tail:  # ends on a chunk boundary: an empty cache, not tied to z and v in the autograd graph
        return o, ChunkKVCache.empty(batch, heads, module.z_head_dim, module.v_head_dim, dtype=z.dtype, device=z.device)
    z_tail = z[:, length - tail:].unflatten(-1, (heads, module.z_head_dim))
    _, k_tail = normalized_qk(module.z_norm(z_tail), module.gamma, module.beta)
    k_tail = module.rope(k_tail.transpose(1, 2), torch.arange(tail, device=z.device))
    v_tail = v[:, length - tail:].unflatten(-1, (heads, module.v_head_dim)).transpose(1, 2)
    return o, ChunkKVCache(k_tail.contiguous(), v_tail.contiguous())


# %% [markdown]
# ### Check: chunked attention equals full attention with a block-diagonal causal mask
#
# The reference in the next cell never cuts anything into chunks: it builds $q, k$ for the whole sequence in
# float64 (RoPE from the complex reference, positions $t \bmod c$), computes the full
# $L \times L$ score matrix, and masks it with $M_{ts}$. The module must match it in float64, both
# the output and the gradients with respect to $z$, $v$, $\gamma$ and $\beta$, on a length that is
# not a multiple of $c$. Both the SDPA path and the explicit path are checked.

# %%
def chunk_attention_reference(z, v, gamma, beta, num_heads, chunk_size, eps=1e-5, restart=True):
    """Float64, full L x L attention with the block-diagonal causal mask (RoPE at t mod c, or t)."""
    batch, length, _ = z.shape
    z = z.double().view(batch, length, num_heads, -1)
    dz = z.shape[-1]
    z_hat = z / torch.sqrt((z * z).mean(-1, keepdim=True) + eps)
    q = z_hat * (gamma[0].double() + 1) / math.sqrt(dz) + beta[0].double()
    k = z_hat * (gamma[1].double() + 1) / math.sqrt(dz) + beta[1].double()
    t = torch.arange(length, device=z.device)
    positions = t % chunk_size if restart else t
    q = rope_reference(q.transpose(1, 2), positions)  # (B, H, L, dz)
    k = rope_reference(k.transpose(1, 2), positions)
    allowed = (t[:, None] // chunk_size == t[None, :] // chunk_size) & (t[None, :] <= t[:, None])
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    v = v.double().view(batch, length, num_heads, -1).transpose(1, 2)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)


B, H, z_dim, value_dim = 2, 2, 32, 48
c = pick(smoke=16, full=1024)
L = pick(smoke=75, full=3 * 1024 + 333)
attn = ChunkAttention(z_dim, value_dim, H, c).to(device=device, dtype=torch.float64)
with torch.no_grad():  # move gamma, beta away from their zero init, so the check sees them
    attn.gamma.normal_(0, 0.5)
    attn.beta.normal_(0, 0.5)
z = (2 * torch.randn(B, L, z_dim, device=device, dtype=torch.float64) + 0.5).requires_grad_()
v = torch.randn(B, L, value_dim, device=device, dtype=torch.float64).requires_grad_()
grad_out = torch.randn(B, L, value_dim, device=device, dtype=torch.float64)

ref = chunk_attention_reference(z, v, attn.gamma, attn.beta, H, c)
ref_grads = torch.autograd.grad(ref, (z, v, attn.gamma, attn.beta), grad_out)
for use_sdpa in (True, False):
    attn.use_sdpa = use_sdpa
    out, cache = attn(z, v)
    grads = torch.autograd.grad(out, (z, v, attn.gamma, attn.beta), grad_out)
    err = (out - ref).abs().max().item()
    gerr = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads))
    print(f"use_sdpa={use_sdpa}: L={L}, c={c}: output max error {err:.1e}, "
          f"gradient max relative error {gerr:.1e}, cache holds {cache.length} = L mod c tokens")
    assert err < 1e-10 and gerr < 1e-10  # float64 throughout: rounding only
    assert cache.length == L % c
attn.use_sdpa = True

# restarting RoPE in every chunk changes no score, only the size of the angles
no_restart = chunk_attention_reference(z, v, attn.gamma, attn.beta, H, c, restart=False)
print(f"RoPE at t mod c vs at t: max difference {(no_restart - ref).abs().max().item():.1e}")
assert torch.allclose(no_restart, ref, atol=1e-10)

# %% [markdown]
# In float32, the fused and the explicit paths agree to float32 rounding of sums over a chunk:

# %%
attn32 = ChunkAttention(z_dim, value_dim, H, c).to(device)
z32, v32 = torch.randn(B, L, z_dim, device=device), torch.randn(B, L, value_dim, device=device)
fast, _ = attn32(z32, v32)
attn32.use_sdpa = False
slow, _ = attn32(z32, v32)
print(f"float32 SDPA vs explicit: max abs difference {(fast - slow).abs().max().item():.1e}")
assert torch.allclose(fast, slow, atol=1e-5)

# %% [markdown]
# What the attention looks like: the probabilities of one head on a short sequence that ends with
# a partial chunk. Each chunk is a lower triangle on the diagonal, and nothing outside.

# %%
small = ChunkAttention(z_dim=16, value_dim=40, num_heads=1, chunk_size=12).double()
zs = torch.randn(1, 40, 16, dtype=torch.float64)
eye = torch.eye(40, dtype=torch.float64)[None]  # v = identity: O_t is row t of the probabilities
with torch.no_grad():
    probs, _ = small(zs, eye)
fig, ax = plt.subplots(figsize=(4.2, 4))
ax.imshow(probs[0].numpy(), cmap="viridis")
ax.set(title="chunk attention probabilities (c = 12, L = 40)", xlabel="key s", ylabel="query t")
save_figure(fig, "06_chunk_attention_probabilities")
plt.show()
assert torch.allclose(probs.sum(-1), torch.ones(1, 40, dtype=torch.float64))

# %% [markdown]
# ## 5. Streaming: pieces of any size equal one call
#
# Feed the same sequence in random pieces, including single tokens and pieces that stop inside a
# chunk or jump over several boundaries, carrying the cache. The outputs must equal one call over
# the whole, and the cache must never hold $c$ tokens or more.

# %%
generator = torch.Generator().manual_seed(1)
with torch.no_grad():
    whole, _ = attn(z, v)
    cache, pieces, start, lengths = None, [], 0, []
    while start < L:
        size = int(torch.randint(1, 2 * c + 3, (1,), generator=generator)) if len(lengths) % 3 else 1
        piece, cache = attn(z[:, start:start + size], v[:, start:start + size], cache)
        pieces.append(piece)
        start += piece.shape[1]
        lengths.append(cache.length)
        assert cache.length < c and cache.length == start % c
streamed = torch.cat(pieces, dim=1)
err = (streamed - whole).abs().max().item()
print(f"{len(pieces)} pieces; cache lengths after each: {lengths[:12]}{' ...' if len(lengths) > 12 else ''}")
print(f"streamed vs one call: max abs difference {err:.1e} (float64)")
assert err < 1e-12

# %% [markdown]
# ## 6. Cost: linear in $L$ at fixed $c$
#
# Time one forward call as the length grows, for chunk attention (fixed $c$) and for full causal
# attention (the same module with $c = L$: one chunk). On a log-log plot a cost $\propto L^a$ is a
# line of slope $a$: about 1 for chunk attention, about 2 for full attention once the quadratic
# term dominates. Fixed per-call overheads flatten both curves at the short end, so the slopes are
# fitted over the three longest lengths. Each point is the fastest of several calls
# (`notebook.time_call`, which synchronises CUDA): other work on the machine only ever adds time.
# The slopes printed are what this machine measured; at smoke sizes on a CPU (calls of a few
# milliseconds, cores shared with other work) they are less clean than on a GPU. They are shown,
# not asserted: `tests/test_chapter_timings.py` times the same module at lengths where the
# quadratic term dominates and checks the ordering with a margin, and counts its floating-point
# operations, which are exactly linear and quadratic in $L$ on any machine.

# %%
chunk = pick(smoke=64, full=2048)
lengths = [2**p for p in pick(smoke=range(8, 14), full=range(12, 18))]
dim = pick(smoke=32, full=128)
batch = pick(smoke=1, full=8)  # enough work per call on a GPU to leave the launch-overhead regime
repeats = pick(smoke=9, full=10)
threads = torch.get_num_threads()
if device.type == "cpu":
    torch.set_num_threads(1)  # a CPU shared with other work times far more steadily on one thread
calls = {}  # (name, L) -> a forward call without autograd
for length in lengths:
    zt = torch.randn(batch, length, dim, device=device)
    vt = torch.randn(batch, length, dim, device=device)
    for name, chunk_size in (("chunk attention", chunk), ("full causal attention", length)):
        module = ChunkAttention(dim, dim, 1, chunk_size).to(device)
        calls[name, length] = lambda module=module, zt=zt, vt=vt: module(zt, vt)
# Rounds over all calls, not all repeats of one call after another: a burst of other work on the
# machine then slows one call of every length, not every call of one length. Round 0 warms up.
samples = {key: [] for key in calls}
with torch.no_grad():
    for round_ in range(repeats + 1):
        for key, call in calls.items():
            seconds = time_call(call, repeats=1, warmup=0, device=device)
            if round_:
                samples[key].append(seconds)
timed = {name: [min(samples[name, length]) for length in lengths]
         for name in ("chunk attention", "full causal attention")}
torch.set_num_threads(threads)

fig, ax = plt.subplots(figsize=(5, 3.5))
slopes = {}
for name, seconds in timed.items():
    slopes[name] = np.polyfit(np.log(lengths[-3:]), np.log(seconds[-3:]), 1)[0]  # the long end
    print(f"{name}: slope over the 3 longest lengths {slopes[name]:.2f}; ms per call: "
          + ", ".join(f"{1e3 * s:.2f}" for s in seconds))
    ax.plot(lengths, [1e3 * s for s in seconds], "o-", label=f"{name} (slope {slopes[name]:.2f})")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set(xlabel="sequence length L", ylabel="ms per forward call",
       title=f"B = {batch}, c = {chunk}, d = {dim}, {device.type}")
ax.legend()
save_figure(fig, "06_chunk_attention_scaling")
plt.show()

# %% [markdown]
# ## Summary
#
# - `RMSNorm(dim, eps=1e-5, affine=True)`: statistics in float32, scale stored as 0, applied as +1.
# - Normalized attention: $q, k$ are $z/\lVert z\rVert$ with learned per-channel scale and offset,
#   so the softmax runs with scale 1.
# - `RotaryEmbedding`: adjacent-pair rotation at explicit positions; positions restart every chunk.
# - `ChunkAttention(z, v, cache) -> (O, cache)`: causal attention inside chunks of $c$, checked
#   against full attention with a block-diagonal mask in float64 (forward and gradients), with a
#   cache of at most $c - 1$ tokens that makes streaming in pieces equal to one call.
#
# Chapter 07 wraps this in the Megalodon layer: CEMA and RMSNorm produce $m$, linear maps produce
# $z$, $v$ and the gate $r$, and the output $O \odot r$ joins the residual stream.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the package's own on random inputs and prints a pass, "not yet implemented", or
# what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then run.** A `ChunkAttention` with chunks of $c = 16$ reads a stream of 100 tokens
# in pieces of 30, 30, 30 and 10, carrying its cache. How many tokens does the cache hold after each
# piece? Predict, then run the next cell.
#
# ### BEGIN SOLUTION
# The cache holds the tokens of the unfinished chunk, $n = (\text{tokens so far}) \bmod c$: after 30,
# 60, 90 and 100 tokens, $14, 12, 10$ and $4$. It never reaches $c$: a finished chunk is never looked
# at again, which is why the attention's memory of a stream is bounded by the chunk, however long the
# stream.
# ### END SOLUTION

# %%
import torch

from megalodon_lite.attention import ChunkAttention, RotaryEmbedding
from megalodon_lite.exercises import check

streaming = ChunkAttention(z_dim=8, value_dim=8, num_heads=1, chunk_size=16).double()
z_stream, v_stream = torch.randn(2, 1, 100, 8, dtype=torch.float64)
kv_cache, held = None, []
with torch.no_grad():
    for start, stop in ((0, 30), (30, 60), (60, 90), (90, 100)):
        _, kv_cache = streaming(z_stream[:, start:stop], v_stream[:, start:stop], kv_cache)
        held.append(kv_cache.length)
print("tokens in the cache after each piece:", held)

# %% [markdown]
# **2. Derive.** Take one pair of channels of a query and a key as complex numbers $q$ and $k$; RoPE
# turns them into $q e^{ip\theta}$ and $k e^{is\theta}$ at positions $p$ and $s$. Show that their
# contribution to the score, $\mathrm{Re}\big(q e^{ip\theta}\,\overline{k e^{is\theta}}\big)$, depends
# on $p - s$ only. Why does that make restarting the positions in every chunk harmless?
#
# ### BEGIN SOLUTION
# For real vectors, the dot product of two pairs is $\mathrm{Re}(a\bar b)$ when each pair is read as
# $a = a_0 + i a_1$. Here $q e^{ip\theta}\,\overline{k e^{is\theta}} = q\bar k\, e^{i(p-s)\theta}$,
# since $|e^{is\theta}| = 1$ and the conjugate flips the sign of the angle: only $p - s$ is left.
# Inside a chunk, restarting subtracts the same multiple of $c$ from $p$ and from $s$ (both lie in
# the same chunk), so $p - s$, and with it every score, is unchanged; attention never pairs tokens of
# two chunks, where the difference would change.
# ### END SOLUTION

# %% [markdown]
# **3. Write RoPE on adjacent pairs.** `my_rope(x, positions)` rotates each pair of channels
# $(x_{2i}, x_{2i+1})$ of `x` (..., L, d) at position $p$ (`positions`, L integers) by the angle
# $p\,\theta_i$, $\theta_i = 10000^{-2i/d}$, as the official code does (adjacent pairs, not the two
# halves of the vector). The check compares it with `RotaryEmbedding(d)`.

# %%
def my_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (..., L, d) with d even, integer positions (L,) -> x with pair i turned by positions * 10000^(-2i/d)."""
    ### BEGIN SOLUTION
    dim = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
    angles = positions.to(torch.float64)[:, None] * theta                  # (L, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    ### END SOLUTION


# %% tags=["check"]
def package_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return RotaryEmbedding(x.shape[-1])(x, positions)


def rope_inputs(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, length, pairs = (int(n) for n in torch.randint(1, 9, (4,), generator=generator))
    x = torch.randn(batch, heads, length, 2 * pairs, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 4096, (length,), generator=generator)


check(my_rope, reference=package_rope, make_inputs=rope_inputs,
      hint="pair i is (x[..., 2i], x[..., 2i+1]) (x[..., 0::2] and x[..., 1::2]); rotate it as a complex number "
           "by the angle position * 10000^(-2i/d), then interleave the pairs back")

# %% [markdown]
# **4. Write the chunk-causal mask.** `my_chunk_causal_mask(length, chunk_size)` returns the
# $(L, L)$ boolean matrix that is True where query $t$ may attend to key $s$: same chunk and
# $s \le t$. The check compares it with where the package's `ChunkAttention` actually puts weight
# (with the values set to the identity matrix, row $t$ of its output is query $t$'s probabilities).

# %%
def my_chunk_causal_mask(length: int, chunk_size: int) -> torch.Tensor:
    """(length, length) bool: True where key s is visible to query t (same chunk of chunk_size tokens, s <= t)."""
    ### BEGIN SOLUTION
    t = torch.arange(length)
    return (t[:, None] // chunk_size == t[None, :] // chunk_size) & (t[None, :] <= t[:, None])
    ### END SOLUTION


# %% tags=["check"]
def where_chunk_attention_looks(length: int, chunk_size: int) -> torch.Tensor:
    attention = ChunkAttention(z_dim=2, value_dim=length, num_heads=1, chunk_size=chunk_size).double()
    with torch.no_grad():
        probabilities, _ = attention(torch.ones(1, length, 2, dtype=torch.float64),
                                     torch.eye(length, dtype=torch.float64)[None])
    return probabilities[0] > 0


def mask_sizes(generator: torch.Generator) -> tuple[int, int]:
    return int(torch.randint(1, 60, (), generator=generator)), int(torch.randint(1, 20, (), generator=generator))


check(my_chunk_causal_mask, reference=where_chunk_attention_looks, make_inputs=mask_sizes,
      hint="two conditions, both as (L, L) comparisons of t[:, None] with t[None, :]: the same chunk index "
           "t // chunk_size, and key <= query")


# %% [markdown]
# ## On a GPU
#
# *The cells below need a CUDA GPU: the tests and the book build skip them on a machine without one.*
#
# The same module in bfloat16 against the float64 reference. bfloat16 keeps 8
# significant bits, so q, k, v each carry a relative rounding error of up to $2^{-8}$ (the unit
# roundoff); scores of size up to
# $\lVert\kappa\rVert$ and an average of values of size 1 then agree to a few $10^{-2}$.

# %% tags=["gpu"]
cuda = require_cuda()
attn_bf16 = ChunkAttention(z_dim, value_dim, H, c).to(cuda)
with torch.no_grad():
    attn_bf16.gamma.copy_(attn.gamma)
    attn_bf16.beta.copy_(attn.beta)
zb, vb = z.detach().to(cuda, torch.bfloat16), v.detach().to(cuda, torch.bfloat16)
with torch.no_grad():
    out_bf16, _ = attn_bf16.bfloat16()(zb, vb)
    ref_bf16 = chunk_attention_reference(zb, vb, attn.gamma.to(cuda), attn.beta.to(cuda), H, c)
err = (out_bf16.double() - ref_bf16).abs().max().item()
print(f"bfloat16 on {torch.cuda.get_device_name()}: max abs error vs float64 reference {err:.1e}")
assert err < 5e-2
