# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · MEGA: moving-average gated attention
#
# Chapter 02 built a layer that mixes each channel with its past through a learned sum of decaying
# exponentials: cheap, causal, and biased toward recent tokens. Attention is the opposite: any token
# can look at any other, at a cost quadratic in the length. MEGA (Ma et al., ICLR 2023,
# arXiv 2209.10655, §3.2) puts the EMA *in front of* a single-head gated attention, so the attention
# works on tokens that already summarise their neighbourhood. For an input $X \in \mathbb{R}^{L\times d}$:
#
# $$\begin{aligned}
# X' &= \mathrm{EMA}(X) && \text{chapter 02, with MEGA's skip and SiLU}\\
# Z &= \mathrm{SiLU}(X' W_z + b_z) && \text{one shared representation, } L\times z\\
# Q &= \kappa_q \odot Z + \mu_q, \quad K = \kappa_k \odot Z + \mu_k && \text{per-dimension affine maps of } Z\\
# V &= \mathrm{SiLU}(X W_v + b_v) && \text{from the input, not from } X'\\
# O &= f\!\left(Q K^\top / \tau + b_{\mathrm{rel}}\right) V && \text{causal attention, } f \in \{\text{softmax}, \text{Laplace}\}\\
# \gamma &= \mathrm{SiLU}(X' W_\gamma + b_\gamma) && \text{reset gate}\\
# \varphi &= \sigma(X' W_\varphi + b_\varphi) && \text{update gate}\\
# \hat H &= \mathrm{SiLU}\!\left(X' W_h + (\gamma \odot O) U_h + b_h\right)\\
# Y &= \varphi \odot \hat H + (1 - \varphi) \odot X && \text{gated residual.}
# \end{aligned}$$
#
# It reads like a GRU whose "hidden state" is the attention output: the reset gate $\gamma$ decides how
# much of the attention reaches the candidate $\hat H$, and the update gate $\varphi$ interpolates
# between the candidate and the untouched input. **MEGA-chunk** splits the sequence into chunks
# of $c$ tokens and lets attention see only its own chunk, which makes the cost linear in $L$; the
# EMA still runs over the whole sequence and is then the only path from one chunk to the next.
#
# We build it in the order of the official code (`fairseq/modules/moving_average_gated_attention.py`
# in facebookresearch/mega): the Laplace attention function, the relative positional bias, chunked
# causal attention, the layer, the block (layer + feed-forward), and a small language model that we
# train on a task that can only be solved by carrying information across chunks.

# %%
import copy
import math
import time
from unittest import mock

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from megalodon_lite import mega_ema                             # chapter 02
from megalodon_lite.mega_ema import damped_ema_recurrence
from megalodon_lite.notebook import describe_run, pick, pick_device, save_figure, seed_everything, time_call

seed_everything(0)
device = pick_device()
describe_run(device)
if device.type == "cpu":
    # Every model here is tiny: its matrices gain nothing from a second thread, and on a busy
    # machine threads waiting for each other make each small call several times slower.
    torch.set_num_threads(1)
print(f"threads={torch.get_num_threads()}")

# %% [markdown]
# ## The Laplace attention function
#
# Softmax makes each query's weights compete: they are positive and sum to one. MEGA also offers
# element-wise attention functions that score each (query, key) pair on its own. The squared ReLU
# $\mathrm{relu}^2(x) = \max(x, 0)^2$ is one such function, but it is unbounded; MEGA proposes a bounded
# function that behaves like it where it matters, the *Laplace function*, a Gaussian CDF:
#
# $$f_{\mathrm{laplace}}(x; \mu, \sigma) = \tfrac12\left[1 + \mathrm{erf}\!\left(\frac{x-\mu}{\sigma\sqrt2}\right)\right],
#   \qquad \mu = \sqrt{1/2},\ \sigma = \sqrt{1/(4\pi)}.$$
#
# The two constants make it touch $\mathrm{relu}^2$ where $\mathrm{relu}^2 = \tfrac12$:
#
# - **same value:** $f(\mu) = \tfrac12$ for any $\sigma$, and $\mathrm{relu}^2(\mu) = \mu^2 = \tfrac12$ gives $\mu = \sqrt{1/2}$;
# - **same slope:** $f'(\mu) = \frac{1}{\sigma\sqrt{2\pi}}$ (the peak of the Gaussian density) and
#   $(\mathrm{relu}^2)'(\mu) = 2\mu = \sqrt2$, so $\sigma = \frac{1}{\sqrt2\,\sqrt{2\pi}} = \sqrt{1/(4\pi)}$.
#
# Around that point the two agree to first order; below it the Laplace function stays near 0 like
# $\mathrm{relu}^2$, above it it saturates at 1 instead of growing without bound.

# %% tags=["export:mega"]
"""MEGA: moving-average gated attention (Ma et al. 2023, arXiv 2209.10655, §3), following the
official code (facebookresearch/mega, ``fairseq/modules/moving_average_gated_attention.py``).

- :func:`laplace_attention`: the Laplace attention function, a bounded stand-in for relu².
- :class:`SimpleRelativePositionalBias`: one learned scalar per offset j − i.
- :func:`split_chunks`, :func:`attention_weights`, :func:`chunked_attention`: causal single-head
  attention inside chunks of c tokens (MEGA-chunk), softmax or Laplace.
- :class:`MovingAverageGatedAttention`: the MEGA layer (damped EMA + gated attention + gated residual).
- :class:`MegaBlock`: the layer followed by a pre-norm feed-forward network.
- :class:`MegaLM`: embedding, blocks, final norm and a linear head; a causal language model.

Tensors are (B, L, D) at every public interface.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_lite import validate
from megalodon_lite.mega_ema import DampedEMA

LAPLACE_MU = math.sqrt(0.5)
"""μ of the Laplace function: relu²(μ) = 1/2."""
LAPLACE_SIGMA = math.sqrt(1.0 / (4.0 * math.pi))
"""σ of the Laplace function: its slope at μ, 1/(σ√(2π)), equals relu²'(μ) = √2."""

ATTENTION_FUNCTIONS = ("softmax", "laplace")


def laplace_attention(scores: Tensor) -> Tensor:
    """The Laplace attention function f(x) = ½[1 + erf((x − μ)/(σ√2))], μ = √½, σ = √(1/(4π)) (MEGA §3.2, eq. (16)).

    Element-wise, values in (0, 1); equals relu²(x) in value and slope at x = μ.

    Args:
        scores: attention scores of any shape.

    Returns:
        Weights of the same shape and dtype.
    """
    return 0.5 * (1.0 + torch.erf((scores - LAPLACE_MU) / (LAPLACE_SIGMA * math.sqrt(2.0))))


# %% [markdown]
# Check the matching with autograd, then look at the two functions.

# %%
point = torch.tensor(LAPLACE_MU, dtype=torch.float64, requires_grad=True)
f_value = laplace_attention(point)
(f_slope,) = torch.autograd.grad(f_value, point)
relu2_value, relu2_slope = LAPLACE_MU**2, 2 * LAPLACE_MU
print(f"at x = μ = {LAPLACE_MU:.6f}: laplace {f_value.item():.6f} vs relu² {relu2_value:.6f}; "
      f"slopes {f_slope.item():.6f} vs {relu2_slope:.6f}")
assert abs(f_value.item() - relu2_value) < 1e-12 and abs(f_slope.item() - relu2_slope) < 1e-12

xs = torch.linspace(-1.0, 2.0, 400, dtype=torch.float64)
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(xs, F.relu(xs) ** 2, label="relu²(x)")
ax.plot(xs, laplace_attention(xs), label="Laplace f(x)")
ax.plot([LAPLACE_MU], [0.5], "ko")
ax.annotate("same value and slope\nat x = √½", (LAPLACE_MU, 0.5), (LAPLACE_MU + 0.25, 0.2),
            arrowprops={"arrowstyle": "->"})
ax.set(ylim=(-0.1, 1.6), xlabel="score x", ylabel="weight", title="Laplace attention function vs relu²")
ax.legend()
fig.tight_layout()
save_figure(fig, "03_laplace_vs_relu2")
plt.show()

# %% [markdown]
# ## Relative positional bias
#
# Attention by itself does not know where tokens are. MEGA adds to every score a learned scalar that
# depends only on the offset between key and query, $b_{\mathrm{rel}}[i, j] = w_{j-i}$; MEGA's
# "simple" relative bias holds one parameter per offset $-(P-1), \dots, P-1$ for sequences (or chunks)
# of at most $P$ tokens, initialised $\mathcal N(0, 0.02^2)$. Causal attention only ever uses the
# offsets $j - i \le 0$, but we keep the full table as the official code does.

# %% tags=["export:mega"]
class SimpleRelativePositionalBias(nn.Module):
    """MEGA's learned relative positional bias: b[i, j] = w[j − i] for |j − i| < max_positions.

    Args:
        max_positions: the longest sequence (or chunk) the bias will be asked for.
    """

    def __init__(self, max_positions: int) -> None:
        super().__init__()
        validate.positive_int("max_positions", max_positions)
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(2 * max_positions - 1))   # offsets −(P−1) .. P−1
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, length: int) -> Tensor:
        """The (length, length) bias matrix b[i, j] = w[j − i]."""
        if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= self.max_positions:
            raise ValueError(f"length must be an int in [1, max_positions={self.max_positions}], got {length!r}")
        positions = torch.arange(length, device=self.weight.device)
        offsets = positions[None, :] - positions[:, None]                  # j − i, (length, length)
        return self.weight[offsets + self.max_positions - 1]

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}"


# %% [markdown]
# ## Causal attention inside chunks
#
# For a chunk of $C$ tokens, with scores $S = QK^\top$ ($C \times C$) and the causal mask $j \le i$:
#
# - **softmax:** $A = \mathrm{softmax}_j\!\left(S / \sqrt{z} + b_{\mathrm{rel}}\right)$ over the visible keys;
# - **Laplace:** $A_{ij} = f_{\mathrm{laplace}}\!\left(S_{ij} / n_i + b_{\mathrm{rel}}[i, j]\right)$ for
#   visible keys and 0 otherwise, where $n_i = i + 1$ is the number of keys query $i$ can see. The
#   paper writes the scale as $\tau(X) = n$, the sequence length; the official code divides by the
#   number of *visible* keys, which under a causal mask differs from row to row. Unlike softmax
#   weights, a row of Laplace weights need not sum to one.
#
# Then $O = A V$. MEGA-chunk reshapes $(B, L, \cdot)$ into $(B, L/c, c, \cdot)$ and applies the same
# thing to every chunk at once; positions (for the mask, $n_i$ and $b_{\mathrm{rel}}$) restart at 0 in
# each chunk. A sequence shorter than $c$ is one chunk. A longer one must be a whole number of
# chunks: `split_chunks` raises rather than silently padding (the language model below pads its
# input itself, at the end, where causality makes the padding invisible to real tokens).

# %% tags=["export:mega"]
def split_chunks(x: Tensor, chunk_size: int | None) -> Tensor:
    """Reshape (B, L, E) into chunks (B, K, C, E) of C = chunk_size tokens (MEGA-chunk).

    ``chunk_size=None`` or L <= chunk_size gives one chunk of the whole sequence.

    Raises:
        ValueError: L > chunk_size and L is not a multiple of chunk_size.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, L, E), got {tuple(x.shape)}")
    batch, length, features = x.shape
    if chunk_size is None or length <= chunk_size:
        return x.unsqueeze(1)
    if length % chunk_size != 0:
        raise ValueError(f"sequence length {length} must be at most chunk_size={chunk_size} or a multiple "
                         f"of it; pad the sequence to {math.ceil(length / chunk_size) * chunk_size}")
    return x.reshape(batch, length // chunk_size, chunk_size, features)


def attention_weights(q: Tensor, k: Tensor, bias: Tensor, attention: str = "softmax") -> Tensor:
    """Causal single-head attention weights inside each chunk (MEGA eq. (11), per chunk as in Mega-chunk, §3.4).

    softmax: softmax_j(q_i·k_j / √z + b[i, j]) over j <= i.
    laplace: f_laplace(q_i·k_j / (i + 1) + b[i, j]) for j <= i, else 0.

    Args:
        q, k: (B, K, C, z) queries and keys, chunked.
        bias: (C, C) relative positional bias.
        attention: "softmax" or "laplace".

    Returns:
        Weights (B, K, C, C); softmax ones in float32 or wider, Laplace ones in q's dtype.
    """
    if attention not in ATTENTION_FUNCTIONS:
        raise ValueError(f"attention must be one of {ATTENTION_FUNCTIONS}, got {attention!r}")
    chunk = q.shape[-2]
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape (B, K, C, z), got {tuple(q.shape)} and {tuple(k.shape)}")
    if bias.shape != (chunk, chunk):
        raise ValueError(f"bias must have shape (C, C) = ({chunk}, {chunk}), got {tuple(bias.shape)}")
    visible = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-1, -2)                                           # (B, K, C, C)
    if attention == "softmax":
        scores = scores / math.sqrt(q.shape[-1]) + bias
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    n_visible = torch.arange(1, chunk + 1, device=q.device, dtype=scores.dtype)[:, None]
    return laplace_attention(scores / n_visible + bias) * visible


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, chunk_size: int | None,
                      attention: str = "softmax") -> tuple[Tensor, Tensor]:
    """O = A V with causal attention restricted to chunks of chunk_size tokens (MEGA-chunk).

    Args:
        q, k: (B, L, z); v: (B, L, E).
        bias: (C, C) relative bias for the chunk length C = min(L, chunk_size) (L if chunk_size is None).
        chunk_size: tokens per chunk, or None for attention over the whole sequence.
        attention: "softmax" or "laplace".

    Returns:
        The output (B, L, E) in v's dtype, and the weights (B, K, C, C).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[:2] != q.shape[:2]:
            raise ValueError(f"{name} must have shape (B, L, ·) with (B, L) = {tuple(q.shape[:2])}, got {tuple(t.shape)}")
    weights = attention_weights(split_chunks(q, chunk_size), split_chunks(k, chunk_size), bias, attention)
    out = weights.to(v.dtype) @ split_chunks(v, chunk_size)                     # (B, K, C, E)
    return out.reshape(v.shape), weights


# %% [markdown]
# ### Check: chunked attention is full attention with a block-diagonal causal mask
#
# The reference computes every query on its own in float64: it loops over positions $i$, finds the
# chunk's first position $s$, and attends to keys $s, \dots, i$ with the bias $w_{j-i}$ and (for
# Laplace) $n_i = i - s + 1$. No reshapes, no masks.

# %%
def reference_attention(q, k, v, bias_weight, max_positions, chunk_size, attention):
    """Float64, one query at a time: attention to keys start..i of the query's own chunk."""
    q, k, v, bias_weight = (t.double() for t in (q, k, v, bias_weight))
    length = q.shape[1]
    chunk = length if chunk_size is None else min(chunk_size, length)
    out = torch.zeros(v.shape, dtype=torch.float64, device=v.device)
    for i in range(length):
        start = (i // chunk) * chunk
        keys = torch.arange(start, i + 1, device=q.device)
        rel = bias_weight[keys - i + max_positions - 1]                          # w[j - i]
        dots = torch.einsum("bz,bjz->bj", q[:, i], k[:, keys])
        if attention == "softmax":
            w = torch.softmax(dots / math.sqrt(q.shape[-1]) + rel, dim=-1)
        else:
            w = laplace_attention(dots / (i - start + 1) + rel)
        out[:, i] = torch.einsum("bj,bje->be", w, v[:, keys])
    return out


B_att, L_att, z_att, e_att, c_att = 2, pick(smoke=64, full=512), 16, 24, pick(smoke=16, full=128)
q, k = torch.randn(2, B_att, L_att, z_att, device=device)
v = torch.randn(B_att, L_att, e_att, device=device)
for chunk_size in (None, c_att):
    positions = L_att if chunk_size is None else chunk_size
    rel_bias = SimpleRelativePositionalBias(positions).to(device)
    with torch.no_grad():
        rel_bias.weight.normal_()                                     # a bias large enough to matter
        for attention in ("softmax", "laplace"):
            out, _ = chunked_attention(q, k, v, rel_bias(min(L_att, positions)), chunk_size, attention)
            ref = reference_attention(q, k, v, rel_bias.weight, positions, chunk_size, attention)
            err = (out.double() - ref).abs().max().item()
            print(f"chunk={chunk_size}, {attention:8s}: max |chunked float32 - reference float64| = {err:.1e}")
            # float32 scores of size ~sqrt(z) and sums over <= L keys: relative error ~1e-6.
            assert err < 1e-4

# %% [markdown]
# The weights of one sequence as a heat map, row = query, column = key (random $q$, $k$ and bias,
# softmax). Without chunks each query sees its whole past; with chunks of $c$ the matrix is
# block-diagonal and every block is its own small causal attention.

# %%
def weights_as_matrix(weights: torch.Tensor) -> torch.Tensor:
    """(K, C, C) chunk weights of one sequence -> the (K*C, K*C) block-diagonal matrix."""
    return torch.block_diag(*weights.float().cpu())


L_map = 64
rel_full, rel_chunk = SimpleRelativePositionalBias(L_map), SimpleRelativePositionalBias(16)
with torch.no_grad():
    _, w_full = chunked_attention(q[:1, :L_map].cpu(), k[:1, :L_map].cpu(), v[:1, :L_map].cpu(), rel_full(L_map), None)
    _, w_chunk = chunked_attention(q[:1, :L_map].cpu(), k[:1, :L_map].cpu(), v[:1, :L_map].cpu(), rel_chunk(16), 16)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
for ax, w, title in zip(axes, (w_full[0], w_chunk[0]), ("full causal attention", "MEGA-chunk, c = 16")):
    image = ax.imshow(weights_as_matrix(w) ** 0.5, cmap="magma")
    ax.set(title=title, xlabel="key position", ylabel="query position")
fig.colorbar(image, ax=axes, shrink=0.8, label="√weight")
save_figure(fig, "03_attention_chunks")
plt.show()

# %% [markdown]
# ## The MEGA layer
#
# The layer follows the official code step by step (the comments say which symbol of the equations at
# the top each line computes). Details that are in the code and not in the equations:
#
# - **Pre-norm.** A LayerNorm is applied to the input first; $X$ in the equations is the normalised
#   input, while the gated residual $Y = \varphi\odot\hat H + (1-\varphi)\odot X$ uses the
#   *un-normalised* one.
# - **One projection of $X'$** produces the update gate, $Z$, the reset gate and $X' W_h$ together
#   ($d + z + v + d$ columns); $\kappa$ is initialised $\mathcal N(0, 0.02^2)$ and $\mu$ at 0; every
#   linear layer $\mathcal N(0, 0.02^2)$ with zero bias.
# - **The chunk decides the bias table.** With chunks, the relative bias only needs offsets inside
#   one chunk; without, it needs `max_positions`.
# - **No dropout.** The official layer has four dropouts; this book's models are small and leave
#   them out.

# %% tags=["export:mega"]
class MovingAverageGatedAttention(nn.Module):
    """The MEGA layer: damped EMA, single-head gated attention and a gated residual (MEGA §3.2, eqs. (6)-(15)).

    Args:
        model_dim: model width D.
        z_dim: width z of the shared query/key representation Z.
        value_dim: width of the values V (and of the reset gate).
        ndim: EMA hidden dimensions N per channel.
        chunk_size: attention only inside chunks of this many tokens (MEGA-chunk); None for full
            causal attention.
        attention: "softmax" or "laplace".
        max_positions: longest sequence for full attention (sets the relative bias table).
    """

    def __init__(self, model_dim: int, z_dim: int, value_dim: int, ndim: int = 16, chunk_size: int | None = None,
                 attention: str = "softmax", max_positions: int = 1024) -> None:
        super().__init__()
        for name, value in (("model_dim", model_dim), ("z_dim", z_dim), ("value_dim", value_dim), ("max_positions", max_positions)):
            validate.positive_int(name, value)
        validate.positive_int_or_none("chunk_size", chunk_size)
        if attention not in ATTENTION_FUNCTIONS:
            raise ValueError(f"attention must be one of {ATTENTION_FUNCTIONS}, got {attention!r}")
        self.model_dim, self.z_dim, self.value_dim = model_dim, z_dim, value_dim
        self.chunk_size, self.attention = chunk_size, attention
        self.norm = nn.LayerNorm(model_dim)
        self.ema = DampedEMA(model_dim, ndim)
        self.v_proj = nn.Linear(model_dim, value_dim)                                 # W_v, b_v
        self.mx_proj = nn.Linear(model_dim, 2 * model_dim + z_dim + value_dim)          # W_φ | W_z | W_γ | W_h
        self.h_proj = nn.Linear(value_dim, model_dim)                                 # U_h
        self.qk_weight = nn.Parameter(torch.empty(2, z_dim))                    # κ_q, κ_k
        self.qk_bias = nn.Parameter(torch.empty(2, z_dim))                      # μ_q, μ_k
        self.rel_pos_bias = SimpleRelativePositionalBias(chunk_size if chunk_size is not None else max_positions)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MEGA's initialisation: linear weights and κ ~ N(0, 0.02²), biases and μ zero."""
        for linear in (self.v_proj, self.mx_proj, self.h_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            nn.init.zeros_(linear.bias)
        nn.init.normal_(self.qk_weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.qk_bias)

    def _gates_and_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Everything up to the attention weights: (update gate, reset gate, X'W_h + b, O, weights)."""
        validate.damped_ema_input(x, self.model_dim)
        length = x.shape[1]
        if self.chunk_size is None and length > self.rel_pos_bias.max_positions:
            raise ValueError(f"sequence length {length} exceeds max_positions={self.rel_pos_bias.max_positions}; "
                             "use a larger max_positions or a chunk_size")
        x_norm = self.norm(x)                                                   # X (pre-norm)
        v = F.silu(self.v_proj(x_norm))                                         # V
        mx, _ = self.ema(x_norm)                                                # X'
        update, z, reset, hx = torch.split(self.mx_proj(mx), [self.model_dim, self.z_dim, self.value_dim, self.model_dim],
                                           dim=-1)
        update = torch.sigmoid(update)                                          # φ
        z, reset = F.silu(z), F.silu(reset)                                     # Z, γ
        q = z * self.qk_weight[0] + self.qk_bias[0]                             # Q = κ_q ⊙ Z + μ_q
        k = z * self.qk_weight[1] + self.qk_bias[1]                             # K = κ_k ⊙ Z + μ_k
        chunk = length if self.chunk_size is None else min(self.chunk_size, length)
        out, weights = chunked_attention(q, k, v, self.rel_pos_bias(chunk), self.chunk_size, self.attention)
        return update, reset, hx, out, weights

    def forward(self, x: Tensor) -> Tensor:
        """Y = φ ⊙ Ĥ + (1 − φ) ⊙ x for x (B, L, D); returns (B, L, D).

        With a chunk_size, L must be at most chunk_size or a multiple of it.
        """
        update, reset, hx, out, _ = self._gates_and_attention(x)
        candidate = F.silu(hx + self.h_proj(out * reset))                       # Ĥ
        return x + update * (candidate - x)                                     # φ ⊙ Ĥ + (1 − φ) ⊙ x

    def attention_map(self, x: Tensor) -> Tensor:
        """The attention weights (B, K, C, C) the layer uses on x (B, L, D), for inspection."""
        return self._gates_and_attention(x)[-1]

    def extra_repr(self) -> str:
        return (f"model_dim={self.model_dim}, z_dim={self.z_dim}, value_dim={self.value_dim}, "
                f"chunk_size={self.chunk_size}, attention={self.attention!r}")


# %% [markdown]
# ### Check: the layer against a float64 reference, and causality
#
# The reference recomputes the layer in float64 from its parameters with chapter 02's *recurrence*
# (not the FFT) and the one-query-at-a-time attention above: two independent routes to the same
# numbers. Then causality: change the second half of the input, and the first half of the output
# must not move. We check it in float64 twice. With the EMA computed by the FFT, the past moves by
# rounding only: the FFT mixes every input into every output numerically (chapter 01), at the level
# of $10^{-16}$ of the values involved, while a real leak would move it by the size of the change.
# With chapter 02's recurrence swapped in for the FFT, nothing in the layer reads the future at
# all (masked attention weights are exact zeros), and the past is identical bit for bit.

# %%
def reference_layer(layer, x):
    """MEGA layer in float64: LayerNorm, recurrent EMA, gates, per-query attention, gated residual."""
    p = {name: t.detach().double() for name, t in layer.named_parameters()}
    x = x.double()
    d, z_dim, value_dim = layer.model_dim, layer.z_dim, layer.value_dim
    xn = F.layer_norm(x, (d,), p["norm.weight"], p["norm.bias"], eps=layer.norm.eps)
    v = F.silu(xn @ p["v_proj.weight"].T + p["v_proj.bias"])
    ndim = p["ema.alpha"].shape[1]
    ema, _ = damped_ema_recurrence(xn, torch.sigmoid(p["ema.alpha"]), torch.sigmoid(p["ema.delta"]),
                                   p["ema.beta"], p["ema.eta"] / math.sqrt(ndim))
    mx = F.silu(ema + p["ema.omega"] * xn)
    base = mx @ p["mx_proj.weight"].T + p["mx_proj.bias"]
    update = torch.sigmoid(base[..., :d])
    zz = F.silu(base[..., d:d + z_dim])
    reset = F.silu(base[..., d + z_dim:d + z_dim + value_dim])
    hx = base[..., d + z_dim + value_dim:]
    q = zz * p["qk_weight"][0] + p["qk_bias"][0]
    k = zz * p["qk_weight"][1] + p["qk_bias"][1]
    o = reference_attention(q, k, v, p["rel_pos_bias.weight"], layer.rel_pos_bias.max_positions,
                            layer.chunk_size, layer.attention)
    h = F.silu(hx + (o * reset) @ p["h_proj.weight"].T + p["h_proj.bias"])
    return update * h + (1 - update) * x


d_layer, L_layer = pick(smoke=16, full=64), pick(smoke=64, full=512)
x_layer = torch.randn(2, L_layer, d_layer, device=device)
for chunk_size, attention in ((None, "softmax"), (L_layer // 4, "softmax"), (L_layer // 4, "laplace")):
    layer = MovingAverageGatedAttention(d_layer, z_dim=8, value_dim=32, chunk_size=chunk_size, attention=attention,
                                        max_positions=L_layer).to(device)
    with torch.no_grad():
        for param in layer.parameters():            # MEGA's small init makes most terms ~0.02: make them matter
            param.add_(0.3 * torch.randn_like(param))
        y = layer(x_layer)
        err = (y.double() - reference_layer(layer, x_layer)).abs().max().item()
    # Causality, in float64: change the second half of the input.
    layer64, x64 = copy.deepcopy(layer).double(), x_layer.double()
    x64_changed = x64.clone()
    x64_changed[:, L_layer // 2:] += torch.randn_like(x64_changed[:, L_layer // 2:])
    with torch.no_grad():
        y64, y64_changed = layer64(x64), layer64(x64_changed)
        with mock.patch.object(mega_ema, "damped_ema_fft", damped_ema_recurrence):   # the EMA as a loop
            y_loop, y_loop_changed = layer64(x64), layer64(x64_changed)
    past, future = slice(0, L_layer // 2), slice(L_layer // 2, None)
    leak = (y64_changed[:, past] - y64[:, past]).abs().max().item()
    moved = (y64_changed[:, future] - y64[:, future]).abs().max().item()
    print(f"chunk={chunk_size}, {attention:8s}: |float32 layer - float64 reference| = {err:.1e}; "
          f"after changing the future: past moved {leak:.1e} (FFT EMA), "
          f"{(y_loop_changed[:, past] - y_loop[:, past]).abs().max().item():.0e} (recurrent EMA); "
          f"future moved {moved:.1e}")
    # float32 throughout: rounding is ~1e-7 of the output scale per operation, a few dozen operations deep.
    scale = max(1.0, y.abs().max().item())
    assert err < 1e-5 * scale
    # float64: the FFT's rounding is ~1e-16 relative, times log n and the sizes of x and the kernel.
    assert leak < 1e-12 * scale and moved > 1e-2
    assert torch.equal(y_loop_changed[:, past], y_loop[:, past])

# %% [markdown]
# ## The block and the language model
#
# A MEGA block is the layer followed by a feed-forward network with its own pre-norm and residual,
# $x + W_2\,\mathrm{SiLU}(W_1\,\mathrm{LayerNorm}(x))$ (the official `NormalizedFeedForwardNetwork`).
# The language model embeds tokens (scaled by $\sqrt d$, initialised $\mathcal N(0, 1/d)$ as in the
# official `mega_lm`), runs the blocks, applies a final LayerNorm and a linear head. The official
# code can put its norms before or after each sub-layer (`--normalize-before`); we use the pre-norm
# arrangement throughout. With chunked
# attention it pads the sequence at the end to a whole number of chunks and drops the padding
# afterwards; every part is causal, so the padding never reaches a real token.

# %% tags=["export:mega"]
class MegaBlock(nn.Module):
    """MEGA layer followed by a pre-norm feed-forward network: y = h + W₂ SiLU(W₁ LN(h)), h = MEGA(x).

    Args:
        model_dim, z_dim, value_dim, ndim, chunk_size, attention, max_positions: as for
            :class:`MovingAverageGatedAttention`.
        ffn_hidden_dim: hidden width of the feed-forward network.
    """

    def __init__(self, model_dim: int, z_dim: int, value_dim: int, ffn_hidden_dim: int, ndim: int = 16,
                 chunk_size: int | None = None, attention: str = "softmax", max_positions: int = 1024) -> None:
        super().__init__()
        validate.positive_int("ffn_hidden_dim", ffn_hidden_dim)
        self.mega = MovingAverageGatedAttention(model_dim, z_dim, value_dim, ndim, chunk_size, attention, max_positions)
        self.ffn_norm = nn.LayerNorm(model_dim)
        self.fc1 = nn.Linear(model_dim, ffn_hidden_dim)
        self.fc2 = nn.Linear(ffn_hidden_dim, model_dim)
        for linear in (self.fc1, self.fc2):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        h = self.mega(x)
        return h + self.fc2(F.silu(self.fc1(self.ffn_norm(h))))


class MegaLM(nn.Module):
    """A causal MEGA language model: scaled embedding, MEGA blocks, final LayerNorm, linear head.

    Args:
        vocab_size: number of token ids.
        model_dim, z_dim, value_dim, ffn_hidden_dim, ndim, chunk_size, attention, max_positions: as for
            :class:`MegaBlock`.
        num_layers: number of blocks.
    """

    def __init__(self, vocab_size: int, model_dim: int, num_layers: int, z_dim: int, value_dim: int, ffn_hidden_dim: int,
                 ndim: int = 16, chunk_size: int | None = None, attention: str = "softmax",
                 max_positions: int = 1024) -> None:
        super().__init__()
        validate.positive_int("vocab_size", vocab_size)
        validate.positive_int("num_layers", num_layers)
        self.vocab_size, self.model_dim, self.chunk_size = vocab_size, model_dim, chunk_size
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.ModuleList(
            MegaBlock(model_dim, z_dim, value_dim, ffn_hidden_dim, ndim, chunk_size, attention, max_positions)
            for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(model_dim)
        self.head = nn.Linear(model_dim, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, mean=0.0, std=model_dim**-0.5)
        nn.init.normal_(self.head.weight, mean=0.0, std=model_dim**-0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits (B, L, vocab_size) in float32 for token ids (B, L)."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError("tokens must be an integer tensor of shape (B, L), got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        if tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must have shape (B, L) with B, L >= 1, got {tuple(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"tokens must be ids in [0, {self.vocab_size}), got values in "
                             f"[{tokens.min().item()}, {tokens.max().item()}]")
        length = tokens.shape[1]
        x = self.embed(tokens) * math.sqrt(self.model_dim)
        if self.chunk_size is not None and length > self.chunk_size and length % self.chunk_size:
            x = F.pad(x, (0, 0, 0, self.chunk_size - length % self.chunk_size))   # causal: invisible to real tokens
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x[:, :length])).float()


# %%
torch.manual_seed(0)
lm = MegaLM(vocab_size=32, model_dim=16, num_layers=2, z_dim=8, value_dim=32, ffn_hidden_dim=32, chunk_size=8).to(device)
tokens = torch.randint(0, 32, (2, 29), device=device)           # 29 is not a multiple of 8: the model pads
changed = tokens.clone()
changed[:, 17:] = torch.randint(0, 32, (2, 12), device=device)
with torch.no_grad():
    logits, logits_changed = lm(tokens), lm(changed)
    logits_longer = lm(torch.cat([tokens, tokens[:, :3]], dim=1))  # 32 = 4 whole chunks, no padding
print(f"logits {tuple(logits.shape)} {logits.dtype}; past moved by {(logits_changed - logits)[:, :17].abs().max():.1e} "
      f"when the future changed; padded vs unpadded call differ by {(logits_longer[:, :29] - logits).abs().max():.1e}")
assert (logits_changed - logits)[:, :17].abs().max() < 1e-5
assert (logits_longer[:, :29] - logits).abs().max() < 1e-5

# %% [markdown]
# ## Cost: full against chunked attention
#
# Full causal attention computes an $L \times L$ score matrix; chunked attention computes $L/c$
# matrices of $c \times c$, i.e. $L c$ scores. The cell times `chunked_attention` alone (forward) for
# growing $L$ at a fixed chunk; the numbers are whatever this machine measures.

# %%
chunk_cost = pick(smoke=64, full=1024)
lengths = pick(smoke=[128, 256, 512, 1024], full=[2048, 4096, 8192, 16_384])
z_cost, v_cost = pick(smoke=16, full=128), pick(smoke=32, full=256)
timings = {"full": [], "chunked": []}
print(f"{'L':>7} {'full ms':>9} {'chunked ms':>11}")
for length in lengths:
    qc, kc = torch.randn(2, 1, length, z_cost, device=device)
    vc = torch.randn(1, length, v_cost, device=device)
    with torch.no_grad():
        bias_full = torch.zeros(length, length, device=device)
        bias_chunk = torch.zeros(chunk_cost, chunk_cost, device=device)
        t_full = time_call(lambda: chunked_attention(qc, kc, vc, bias_full, None), repeats=3, device=device,
                           reduce="min")
        t_chunk = time_call(lambda: chunked_attention(qc, kc, vc, bias_chunk, chunk_cost), repeats=3, device=device,
                            reduce="min")
    timings["full"].append(t_full)
    timings["chunked"].append(t_chunk)
    print(f"{length:>7} {1e3 * t_full:>9.2f} {1e3 * t_chunk:>11.2f}")

fig, ax = plt.subplots(figsize=(5.5, 3.4))
for name, values in timings.items():
    ax.loglog(lengths, [1e3 * t for t in values], "o-", label=name if name == "full" else f"chunks of {chunk_cost}")
ax.set(xlabel="sequence length L", ylabel="forward time (ms)", title=f"attention cost on {device.type}")
ax.legend()
fig.tight_layout()
save_figure(fig, "03_attention_cost")
plt.show()

# %% [markdown]
# ## Training a tiny MEGA on recall across chunks
#
# A task that attention inside one chunk cannot solve: multi-query associative recall (MQAR). The
# first chunk lists $K$ key–value pairs `k₁ v₁ … k_K v_K` (keys from the lower half of the vocabulary,
# values from the upper half, the rest of the chunk filler); every later chunk asks for keys again,
# `k v k v …`, and the loss is the prediction of the value after each query key. The first time a key
# is asked in a chunk, its value was only ever seen in an earlier chunk, so the only route to it is
# the EMA that runs across chunks.
#
# In smoke mode the model trains for a few seconds: the loss falls (it learns at least which tokens
# can follow a key), and we assert only that. The full run trains longer and reports recall accuracy
# on first-in-chunk queries, which chance would put at one over the number of values.

# %%
def mqar_batch(batch: int, n_pairs: int, chunk: int, n_chunks: int, vocab: int, generator: torch.Generator):
    """Tokens (B, L), targets (B, L) and loss mask (B, L) for recall across chunks; L = chunk * n_chunks."""
    half = vocab // 2
    keys = torch.stack([torch.randperm(half - 1, generator=generator)[:n_pairs] + 1 for _ in range(batch)])
    values = torch.randint(half, vocab, (batch, n_pairs), generator=generator)
    context = torch.stack([keys, values], dim=-1).reshape(batch, 2 * n_pairs)
    context = F.pad(context, (0, chunk - 2 * n_pairs))                      # filler token 0
    n_queries = (n_chunks - 1) * chunk // 2
    pick_idx = torch.randint(0, n_pairs, (batch, n_queries), generator=generator)
    queries = torch.stack([keys.gather(1, pick_idx), values.gather(1, pick_idx)], dim=-1).reshape(batch, -1)
    tokens = torch.cat([context, queries], dim=1)
    targets = torch.roll(tokens, -1, dims=1)
    is_query = torch.zeros_like(tokens, dtype=torch.bool)
    is_query[:, chunk::2] = True                                            # every query key after chunk 0
    # first time this key is asked in its chunk: the answer is not inside the chunk
    chunk_of = torch.arange(tokens.shape[1]) // chunk
    same_key = tokens[:, :, None] == tokens[:, None, :]
    earlier_in_chunk = (chunk_of[:, None] == chunk_of[None, :]) & (torch.arange(tokens.shape[1])[None, :] <
                                                                     torch.arange(tokens.shape[1])[:, None])
    first = is_query & ~(same_key & earlier_in_chunk & is_query[:, None, :]).any(-1)
    return tokens, targets, is_query, first


config = pick(
    smoke=dict(vocab=32, n_pairs=4, chunk=16, n_chunks=3, model_dim=32, num_layers=2, z_dim=16, value_dim=64, ffn_hidden_dim=64,
               batch=16, steps=60, lr=3e-3),
    full=dict(vocab=64, n_pairs=8, chunk=64, n_chunks=4, model_dim=128, num_layers=2, z_dim=64, value_dim=256,
              ffn_hidden_dim=256, batch=64, steps=2000, lr=2e-3),
)
seed_everything(0)
gen = torch.Generator().manual_seed(0)
model = MegaLM(config["vocab"], config["model_dim"], config["num_layers"], config["z_dim"], config["value_dim"],
               config["ffn_hidden_dim"], chunk_size=config["chunk"]).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=(0.9, 0.98), weight_decay=0.01)
losses, start = [], time.perf_counter()
for step in range(config["steps"]):
    tokens, targets, is_query, _ = mqar_batch(config["batch"], config["n_pairs"], config["chunk"],
                                              config["n_chunks"], config["vocab"], gen)
    logits = model(tokens.to(device))
    loss = F.cross_entropy(logits[is_query.to(device)], targets.to(device)[is_query.to(device)])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    losses.append(loss.item())
print(f"{config['steps']} steps in {time.perf_counter() - start:.1f} s; "
      f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform guess: {math.log(config['vocab']):.3f})")

window = max(5, config["steps"] // 10)
first_mean, last_mean = sum(losses[:window]) / window, sum(losses[-window:]) / window
print(f"mean loss of the first {window} steps {first_mean:.3f}, of the last {window} steps {last_mean:.3f}")
assert last_mean < 0.9 * first_mean, "the loss did not fall"

fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(losses, lw=0.8)
ax.axhline(math.log(config["vocab"] // 2), ls="--", color="grey", label="knows only which tokens are values")
ax.set(xlabel="step", ylabel="loss at query positions", title="tiny MEGA-chunk LM on recall across chunks")
ax.legend()
fig.tight_layout()
save_figure(fig, "03_mqar_loss")
plt.show()

# %% [markdown]
# Recall accuracy on a fresh batch, split by whether the answer was visible to attention inside
# the query's chunk (a repeated key) or only through the EMA (the first query of that key in its
# chunk). Chance is one over the number of values.

# %%
model.eval()
with torch.no_grad():
    tokens, targets, is_query, first = mqar_batch(256, config["n_pairs"], config["chunk"], config["n_chunks"],
                                                  config["vocab"], gen)
    predictions = model(tokens.to(device)).argmax(-1).cpu()
correct = predictions == targets
repeat = is_query & ~first
print(f"accuracy, first query of a key in its chunk (needs the EMA): {correct[first].float().mean():.3f}")
print(f"accuracy, repeated key inside the chunk (attention can copy): {correct[repeat].float().mean():.3f}")
print(f"chance: {1 / (config['vocab'] - config['vocab'] // 2):.3f}")

# %% [markdown]
# Where the trained first layer looks: its attention weights on one sequence. Inside the first chunk
# the queries see the key–value list; in later chunks a query key can only find earlier queries of
# its own chunk, and everything older reaches it through the EMA.

# %%
with torch.no_grad():
    first_layer_input = model.embed(tokens[:1].to(device)) * math.sqrt(config["model_dim"])
    trained_map = model.blocks[0].mega.attention_map(first_layer_input)[0]       # (K, C, C)
fig, ax = plt.subplots(figsize=(4.6, 4.2))
image = ax.imshow(weights_as_matrix(trained_map) ** 0.5, cmap="magma")
ax.set(title="trained layer 1, MEGA-chunk", xlabel="key position", ylabel="query position")
fig.colorbar(image, ax=ax, shrink=0.8, label="√weight")
save_figure(fig, "03_trained_attention")
plt.show()

# %% [markdown]
# ## What we have
#
# `megalodon_lite.mega` exports the Laplace attention function, MEGA's simple relative positional
# bias, chunked causal attention (`split_chunks`, `attention_weights`, `chunked_attention`), the layer
# `MovingAverageGatedAttention`, `MegaBlock` and `MegaLM`. Megalodon keeps this skeleton and changes
# its parts: a complex EMA (chapter 04), timestep normalisation instead of LayerNorm (chapter 05),
# normalised attention with rotary positions inside chunks (chapter 06), and a two-hop residual.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the package's own on random inputs and prints a pass, "not yet implemented", or
# what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then run.** What weight does the Laplace function give a score of exactly 0? And a
# row of softmax weights sums to 1: what is the most a row of Laplace weights can sum to, for the
# query at position $i$ (from 0) of its chunk? Predict, then run the next cell.
#
# ### BEGIN SOLUTION
# $f(0) = \tfrac12\big[1 + \mathrm{erf}(-\mu/(\sigma\sqrt2))\big]$ with $\sigma\sqrt2 = \sqrt{1/(2\pi)}$,
# so $\mu/(\sigma\sqrt2) = \sqrt{1/2}\,\sqrt{2\pi} = \sqrt{\pi} \approx 1.77$ and
# $f(0) = \tfrac12(1 - \mathrm{erf}(1.77)) \approx 0.006$: a score of 0 is nearly ignored. Each weight
# lies in $(0, 1)$ and query $i$ sees $i + 1$ keys, so its row sums to less than $i + 1$, not to 1:
# the Laplace weights do not compete with each other.
# ### END SOLUTION

# %%
import math

import torch

from megalodon_lite.exercises import check
from megalodon_lite.mega import attention_weights, laplace_attention

print(f"f(0) = {laplace_attention(torch.tensor(0.0, dtype=torch.float64)).item():.4f}")
large = torch.full((1, 1, 6, 4), 3.0, dtype=torch.float64)        # large scores: every weight near 1
rows = attention_weights(large, large, torch.zeros(6, 6, dtype=torch.float64), "laplace").sum(-1)[0, 0]
print("row sums of Laplace weights for large scores, queries 0..5:", [round(s, 3) for s in rows.tolist()])

# %% [markdown]
# **2. Derive.** Count the attention weights (one per visible query–key pair) that causal
# attention computes over $L$ tokens, and that MEGA-chunk computes with chunks of $c$ tokens
# ($c$ dividing $L$). What is the ratio for $L = 4096$ and $c = 128$?
#
# ### BEGIN SOLUTION
# Full causal attention: query $i$ sees $i + 1$ keys, so $\sum_{i<L} (i+1) = L(L+1)/2$ weights.
# MEGA-chunk: $L/c$ chunks, each a causal attention over $c$ tokens, so $\frac{L}{c}\cdot\frac{c(c+1)}{2}
# = L(c+1)/2$. The ratio is $(L+1)/(c+1)$: for $L = 4096$, $c = 128$, $8{,}390{,}656$ against
# $264{,}192$ weights, 31.8 times fewer. It grows linearly with $L$.
# ### END SOLUTION

# %% [markdown]
# **3. Write the Laplace function.** `my_laplace(scores)` returns
# $f(x) = \tfrac12\big[1 + \mathrm{erf}\big(\frac{x - \mu}{\sigma\sqrt2}\big)\big]$ with
# $\mu = \sqrt{1/2}$ and $\sigma = \sqrt{1/(4\pi)}$, elementwise. The check compares it with
# `megalodon_lite.mega.laplace_attention`.

# %%
def my_laplace(scores: torch.Tensor) -> torch.Tensor:
    """The Laplace attention function, elementwise, same shape and dtype as ``scores``."""
    ### BEGIN SOLUTION
    mu, sigma = math.sqrt(0.5), math.sqrt(1.0 / (4.0 * math.pi))
    return 0.5 * (1.0 + torch.erf((scores - mu) / (sigma * math.sqrt(2.0))))
    ### END SOLUTION


# %% tags=["check"]
def score_inputs(generator: torch.Generator) -> tuple[torch.Tensor]:
    shape = [int(n) for n in torch.randint(1, 9, (3,), generator=generator)]
    return (2 * torch.randn(*shape, generator=generator, dtype=torch.float64),)


check(my_laplace, reference=laplace_attention, make_inputs=score_inputs,
      hint="torch.erf((x - mu) / (sigma * sqrt(2))), with mu = sqrt(1/2) and sigma = sqrt(1/(4 pi))")

# %% [markdown]
# **4. Write MEGA-chunk's Laplace weights.** `my_laplace_weights(q, k, bias)` takes chunked queries
# and keys (B, K, C, z) and the (C, C) relative bias, and returns the weights (B, K, C, C):
# $f\big(q_i \cdot k_j / n_i + b_{ij}\big)$ for the keys $j \le i$ of the same chunk, where
# $n_i = i + 1$ is the number of keys query $i$ sees, and 0 for the keys after it. The check
# compares it with `attention_weights(q, k, bias, "laplace")`.

# %%
def my_laplace_weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, K, C, z) queries and keys, (C, C) bias -> (B, K, C, C) causal Laplace weights per chunk."""
    ### BEGIN SOLUTION
    chunk = q.shape[-2]
    visible = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    n_visible = torch.arange(1, chunk + 1, dtype=q.dtype, device=q.device)[:, None]
    return laplace_attention(q @ k.transpose(-1, -2) / n_visible + bias) * visible
    ### END SOLUTION


# %% tags=["check"]
def laplace_reference(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return attention_weights(q, k, bias, "laplace")


def chunked_inputs(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, chunks, chunk, z = (int(n) for n in torch.randint(1, 9, (4,), generator=generator))
    q, k = (torch.randn(batch, chunks, chunk, z, generator=generator, dtype=torch.float64) for _ in range(2))
    return q, k, 0.5 * torch.randn(chunk, chunk, generator=generator, dtype=torch.float64)


check(my_laplace_weights, reference=laplace_reference, make_inputs=chunked_inputs,
      hint="scores q @ k^T divided row by row by n_i = i + 1 (not by sqrt(z)), plus the bias, then f, then "
           "zero above the diagonal")
