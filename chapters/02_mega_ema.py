# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · MEGA's damped multi-dimensional EMA
#
# Chapter 01 smoothed every channel with one number: $y_t = \alpha x_t + (1-\alpha) y_{t-1}$.
# The same $\alpha$ decides two things at once, how much of the new input enters ($\alpha$) and how
# long the past is remembered ($1-\alpha$). A channel that should remember for a long time must
# therefore take in almost nothing of each new token.
#
# MEGA (Ma et al., ICLR 2023, arXiv 2209.10655, §3.1) loosens this in two steps.
#
# **Damping.** A second factor $\delta \in (0, 1)$ scales the decay alone:
#
# $$y_t = \alpha \odot x_t + (1 - \alpha \odot \delta) \odot y_{t-1}.$$
#
# With $\delta = 1$ this is chapter 01's EMA; with small $\delta$ the memory $1-\alpha\delta$ is long
# even when the input weight $\alpha$ is large.
#
# **Many dimensions.** Each channel $j$ is first expanded into $N$ hidden dimensions by a vector
# $\beta_j \in \mathbb{R}^N$, each hidden dimension runs its own damped EMA, and a vector
# $\eta_j \in \mathbb{R}^N$ projects them back to one number:
#
# $$u_t^{(j)} = \beta_j\, x_{t,j}, \qquad
#   h_t^{(j)} = \alpha_j \odot u_t^{(j)} + (1 - \alpha_j \odot \delta_j) \odot h_{t-1}^{(j)}, \qquad
#   y_{t,j} = \eta_j^\top h_t^{(j)}.$$
#
# Here $\alpha_j, \delta_j \in (0,1)^N$ (sigmoids of free parameters) and the state $h^{(j)}_t$ has
# $N$ numbers per channel: for a $(B, L, D)$ input the state is $(B, D, N)$.
#
# This chapter writes the recurrence, turns it into one long convolution computed with the FFT
# (exactly as chapter 01 did), adds an initial state in and a final state out so a sequence can be
# fed in pieces, and packages it as MEGA's `MultiHeadEMA` layer.

# %%
import math

import matplotlib.pyplot as plt
import torch

from megalodon_lite.notebook import describe_run, pick, pick_device, save_figure, seed_everything, time_call

seed_everything(0)
device = pick_device()
describe_run(device)
B = pick(smoke=2, full=4)
L = pick(smoke=256, full=16_384)
D = pick(smoke=8, full=256)
N = 16
print(f"B={B} L={L} D={D} N={N}")

# %% [markdown]
# ## The recurrence
#
# The recurrence is the definition, so it is also our reference: one Python step per token,
# $O(L)$ sequential work. It takes the constrained coefficients $\alpha, \delta \in (0,1)^{D\times N}$
# and $\beta, \eta \in \mathbb{R}^{D \times N}$, and optionally an initial state $h_0$ of shape
# $(B, D, N)$; it returns the outputs and the last state $h_L$.
#
# The functions check their inputs first, with one call each into the package's shared
# validators (`megalodon_lite/validate.py`), so every form below refuses bad input the same way.

# %% tags=["export:mega_ema"]
"""MEGA's damped multi-dimensional EMA (Ma et al. 2023, arXiv 2209.10655, §3.1, eqs. (3)-(5)).

Per channel j with N hidden dimensions (all vectors of length N):

    u_t = β_j x_{t,j};   h_t = α_j ⊙ u_t + (1 − α_j ⊙ δ_j) ⊙ h_{t−1};   y_{t,j} = η_jᵀ h_t.

Three forms that agree: the recurrence (the definition, O(L) steps), the convolution kernel
k_j[t] = Σ_n η_n α_n β_n φ_n^t with φ = 1 − α ⊙ δ, and its FFT convolution over the whole
sequence. An initial state h_0 adds Σ_n η_n φ_n^{t+1} h_{0,n} to y_t; the final state is
h_L = Σ_t α β φ^{L−1−t} x_t + φ^L h_0, so a sequence can be processed in pieces.

`DampedEMA` is MEGA's unidirectional `MultiHeadEMA` layer: sigmoid-parameterised α and δ, η scaled
by 1/√N, a skip ω ⊙ x and a SiLU on the sum, with MEGA's initialisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_lite import validate
from megalodon_lite.ema import _compute_dtype, fft_causal_conv


def damped_ema_recurrence(x: Tensor, alpha: Tensor, delta: Tensor, beta: Tensor, eta: Tensor,
                          h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The damped multi-dimensional EMA as its definition: one step per token (MEGA §3.1).

    Args:
        x: input (B, L, D).
        alpha, delta: (D, N), values in (0, 1): input weight and damping.
        beta, eta: (D, N): expansion and projection vectors.
        h0: optional initial state (B, D, N); zeros when None.

    Returns:
        y (B, L, D) with y_t = Σ_n η_n h_{t,n}, in x's dtype, and the last state h_L (B, D, N) in the
        working dtype: the inputs' common dtype, at least float32 (as :func:`damped_ema_fft`).
    """
    validate.damped_ema_coefficients(alpha, delta, beta, eta)
    model_dim, ndim = alpha.shape
    validate.damped_ema_input(x, model_dim, ndim, h0)
    work = _compute_dtype(x, alpha, delta, beta, eta)
    alpha, delta, beta, eta = (c.to(work) for c in (alpha, delta, beta, eta))
    decay = 1.0 - alpha * delta                                     # φ (D, N)
    input_weight = alpha * beta                                     # α β (D, N)
    xw = x.to(work)
    h = xw.new_zeros(x.shape[0], model_dim, ndim) if h0 is None else h0.to(work)
    outputs = []
    for t in range(x.shape[1]):
        h = input_weight * xw[:, t, :, None] + decay * h            # (B, D, N)
        outputs.append(torch.einsum("bdn,dn->bd", h, eta))
    return torch.stack(outputs, dim=1).to(x.dtype), h


# %% [markdown]
# ## The kernel: a sum of N exponentials
#
# Unrolling the recurrence from $h_0 = 0$ gives
# $h_t = \sum_{s \le t} \alpha \odot \beta\, \varphi^{t-s} x_s$ with $\varphi = 1 - \alpha\odot\delta$, so
# the output is a causal convolution $y_{t,j} = \sum_{s \le t} k_j[t-s]\, x_{s,j}$ with the kernel
#
# $$k_j[t] = \sum_{n=1}^{N} \eta_{j,n}\, \alpha_{j,n}\, \beta_{j,n}\, \varphi_{j,n}^{\,t}.$$
#
# It is a (D, N) × (N, L) product of the coefficients with a Vandermonde matrix of powers
# $\varphi^t$. We build the powers as $\exp(t \log \varphi)$, which every $t$ computes independently,
# rather than by a cumulative product, which is sequential and whose rounding error grows with $t$.
# The check after the code compares the kernel with the recurrence's impulse response.

# %% tags=["export:mega_ema"]
def damped_ema_kernel(alpha: Tensor, delta: Tensor, beta: Tensor, eta: Tensor, length: int) -> Tensor:
    """The convolution kernel k_j[t] = Σ_n η_n α_n β_n φ_n^t, φ = 1 − α ⊙ δ (MEGA §3.1).

    Powers are exp(t · log φ), not cumulative products.

    Args:
        alpha, delta: (D, N), values in (0, 1).
        beta, eta: (D, N).
        length: number of taps L >= 1.

    Returns:
        The kernel (D, L), in the coefficients' dtype.
    """
    validate.damped_ema_coefficients(alpha, delta, beta, eta)
    validate.positive_int("length", length)
    log_decay = torch.log1p(-alpha * delta)                                  # log φ (D, N)
    steps = torch.arange(length, device=alpha.device, dtype=alpha.dtype)
    powers = torch.exp(log_decay[..., None] * steps)                         # φ^t (D, N, L)
    return torch.einsum("dn,dnl->dl", eta * alpha * beta, powers)


# %%
def random_coefficients(d: int, n: int, dtype=torch.float64, device=device):
    """α, δ in (0, 1); β, η of both signs; (D, N) each."""
    alpha = torch.sigmoid(torch.randn(d, n, dtype=dtype, device=device))
    delta = torch.sigmoid(torch.randn(d, n, dtype=dtype, device=device))
    beta = torch.randn(d, n, dtype=dtype, device=device)
    eta = torch.randn(d, n, dtype=dtype, device=device) / math.sqrt(n)
    return alpha, delta, beta, eta


coeffs64 = random_coefficients(D, N)
taps = 64
impulse = torch.zeros(1, taps, D, dtype=torch.float64, device=device)
impulse[:, 0] = 1.0
impulse_response, _ = damped_ema_recurrence(impulse, *coeffs64)              # (1, taps, D)
kernel = damped_ema_kernel(*coeffs64, taps)                                  # (D, taps)
err = (impulse_response[0].T - kernel).abs().max().item()
print(f"kernel vs impulse response of the recurrence, float64: max |diff| = {err:.2e}")
assert err < 1e-12  # float64: both sum the same N terms; rounding stays near 1e-16 per term

# %% [markdown]
# Why not a cumulative product? Both give $\varphi^t$, but in float32 they accumulate rounding
# differently. The cell measures each against float64 powers (printed, not claimed).

# %%
alpha32, delta32 = (c.float() for c in coeffs64[:2])
phi32 = 1 - alpha32 * delta32
steps = pick(smoke=4096, full=65_536)
exact = torch.exp(torch.arange(steps, dtype=torch.float64, device=device)
                  * torch.log1p(-coeffs64[0] * coeffs64[1])[..., None])
by_exp = torch.exp(torch.arange(steps, dtype=torch.float32, device=device) * torch.log1p(-alpha32 * delta32)[..., None])
by_cumprod = torch.cumprod(phi32[..., None].expand(-1, -1, steps), dim=-1) / phi32[..., None]
scale = exact.abs().amax(dim=-1, keepdim=True)
print(f"float32 powers over {steps} steps, max error relative to each row's largest power:")
print(f"  exp(t log φ): {((by_exp - exact).abs() / scale).max().item():.2e}")
print(f"  cumprod     : {((by_cumprod - exact).abs() / scale).max().item():.2e}")

# %% [markdown]
# ## What damping buys
#
# Take one hidden dimension ($N = 1$, $\beta = \eta = 1$), so the kernel is $\alpha(1-\alpha\delta)^t$.
# Fix $\alpha = 0.5$ and lower $\delta$ (left): at $\delta = 1$ it is chapter 01's kernel, which forgets
# within a few steps; smaller $\delta$ keeps the same first tap $\alpha$ but stretches the memory.
# Chapter 01 could only stretch the memory by shrinking $\alpha$, and with it the weight of every tap:
# the dotted line is chapter 01's kernel with the same memory as $\delta = 0.1$ ($\varphi = 0.95$),
# which needs $\alpha = 0.05$ and so takes in a tenth as much of each new token.
#
# With several hidden dimensions the kernel is a *sum* of exponentials with signed weights $\eta\beta$.
# A fast and a slow exponential of opposite signs make a kernel that starts at zero, rises and then
# decays (right): it responds most to the input a few steps back, something no single exponential can.
# MEGA's code initialises $\beta$ with alternating signs ($+1, -1, +1, \dots$; its comment says this
# "seems more stable"), so a fresh layer already mixes exponentials of both signs.

# %%
t = torch.arange(pick(smoke=60, full=200), dtype=torch.float64)
fig, (ax_left, ax_right) = plt.subplots(1, 2, figsize=(11, 3.6))
for delta_value in (1.0, 0.5, 0.1, 0.02):
    one = torch.ones(1, 1, dtype=torch.float64)
    k = damped_ema_kernel(0.5 * one, delta_value * one, one, one, len(t))[0]
    ax_left.plot(t, k, label=f"δ = {delta_value}")
# Chapter 01's kernel with the same memory as δ = 0.1 (φ = 0.95) needs α = 0.05: ten times smaller taps.
k01 = damped_ema_kernel(0.05 * one, one, one, one, len(t))[0]
ax_left.plot(t, k01, "k:", label="α = 0.05, δ = 1 (chapter 01)")
ax_left.set(title="one hidden dimension, α = 0.5", xlabel="lag t", ylabel="k[t]")
ax_left.legend()

alpha2 = torch.tensor([[0.6, 0.6]], dtype=torch.float64)
delta2 = torch.tensor([[0.9, 0.1]], dtype=torch.float64)           # a fast and a slow decay
beta2 = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)           # opposite signs
eta2 = torch.ones(1, 2, dtype=torch.float64)
band = damped_ema_kernel(alpha2, delta2, beta2, eta2, len(t))[0]
for n in range(2):
    part = damped_ema_kernel(alpha2[:, n:n + 1], delta2[:, n:n + 1], beta2[:, n:n + 1], eta2[:, n:n + 1], len(t))[0]
    ax_right.plot(t, part, "--", alpha=0.6, label=f"dimension {n + 1}: φ = {1 - 0.6 * delta2[0, n].item():.2f}")
ax_right.plot(t, band, "k", label="their sum")
ax_right.set(title="two hidden dimensions of opposite sign", xlabel="lag t")
ax_right.legend()
fig.tight_layout()
save_figure(fig, "02_damped_kernels")
plt.show()
peak = int(band.argmax())
print(f"the two-dimension kernel peaks at lag {peak}, not at lag 0")
assert band[0].abs() < band[peak] and peak > 0

# %% [markdown]
# ## The FFT form, with a state in and a state out
#
# A convolution of length $L$ with an $L$-tap kernel is a product of spectra once both are
# zero-padded to at least $2L$; chapter 01's `fft_causal_conv` does exactly that in
# $O(L \log L)$. Two more terms make the FFT form a drop-in for the recurrence on a *piece* of a
# longer sequence.
#
# - **Initial state in.** Starting from $h_0$ instead of zero adds the free decay of $h_0$:
#   $h_t \mathrel{+}= \varphi^{t+1} \odot h_0$ (for $t = 0, \dots, L-1$), so
#   $y_t \mathrel{+}= \sum_n \eta_n \varphi_n^{t+1} h_{0,n}$.
# - **Final state out.** $h_L = \sum_{s<L} \alpha\odot\beta\,\varphi^{L-1-s} x_s + \varphi^L \odot h_0$:
#   the kernel's terms before the sum over $n$, run backwards over the piece.
#
# Everything is computed in at least float32, whatever the input dtype. Like MEGA's code, this form
# materialises the powers $\varphi^t$ as a $(D, N, L)$ tensor: $D \cdot N \cdot L$ numbers, which at
# $D = 1024$, $N = 16$, $L = 65\,536$ is $2^{30}$ floats (4 GiB in float32) per call.

# %% tags=["export:mega_ema"]
def damped_ema_fft(x: Tensor, alpha: Tensor, delta: Tensor, beta: Tensor, eta: Tensor,
                   h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The damped multi-dimensional EMA as one FFT convolution, O(L log L) (MEGA §3.1).

    Equals :func:`damped_ema_recurrence`. Work is done in at least float32.

    Args:
        x: input (B, L, D).
        alpha, delta: (D, N), values in (0, 1).
        beta, eta: (D, N).
        h0: optional initial state (B, D, N); zeros when None.

    Returns:
        y (B, L, D) in x's dtype, and the last state h_L (B, D, N) in the working dtype.
    """
    validate.damped_ema_coefficients(alpha, delta, beta, eta)
    model_dim, ndim = alpha.shape
    validate.damped_ema_input(x, model_dim, ndim, h0)
    work = _compute_dtype(x, alpha, delta, beta, eta)
    alpha, delta, beta, eta = (c.to(work) for c in (alpha, delta, beta, eta))
    length = x.shape[1]
    xw = x.to(work)

    log_decay = torch.log1p(-alpha * delta)                                   # log φ (D, N)
    steps = torch.arange(length + 1, device=x.device, dtype=work)
    powers = torch.exp(log_decay[..., None] * steps)                          # φ^0..φ^L (D, N, L+1)
    weighted = (alpha * beta)[..., None] * powers[..., :length]               # α β φ^t (D, N, L)
    kernel = torch.einsum("dn,dnl->dl", eta, weighted)                        # (D, L)

    y = fft_causal_conv(xw, kernel)                                           # (B, L, D)
    h_last = torch.einsum("bld,dnl->bdn", xw, weighted.flip(-1))              # Σ_s αβ φ^{L-1-s} x_s
    if h0 is not None:
        h0 = h0.to(work)
        y = y + torch.einsum("bdn,dnl->bld", h0, eta[..., None] * powers[..., 1:])
        h_last = h_last + powers[..., length] * h0
    return y.to(x.dtype), h_last


# %% [markdown]
# ### Check: recurrence = FFT, and pieces = whole
#
# In float64 both forms should agree to rounding. Then the state test: cut the sequence at random
# points, run each piece with the previous piece's final state, and compare with one call over the
# whole sequence. The FFT rounds differently from the sequential sum, with errors of order
# $10^{-16}$ times the size of the terms and the $\log L$ depth of the transform; we allow $10^{-10}$.

# %%
x64 = torch.randn(B, L, D, dtype=torch.float64, device=device)
h0 = torch.randn(B, D, N, dtype=torch.float64, device=device)
y_rec, h_rec = damped_ema_recurrence(x64, *coeffs64, h0=h0)
y_fft, h_fft = damped_ema_fft(x64, *coeffs64, h0=h0)
err_y = (y_rec - y_fft).abs().max().item()
err_h = (h_rec - h_fft).abs().max().item()
print(f"recurrence vs FFT, float64: outputs {err_y:.2e}, final state {err_h:.2e}")
assert err_y < 1e-10 and err_h < 1e-10

cuts = sorted(torch.randperm(L - 1)[:4].add(1).tolist())
pieces, state, start = [], h0, 0
for end in cuts + [L]:
    y_piece, state = damped_ema_fft(x64[:, start:end], *coeffs64, h0=state)
    pieces.append(y_piece)
    start = end
err_pieces = (torch.cat(pieces, dim=1) - y_fft).abs().max().item()
err_state = (state - h_fft).abs().max().item()
print(f"pieces of lengths {[b - a for a, b in zip([0] + cuts, cuts + [L])]} vs one call: "
      f"outputs {err_pieces:.2e}, final state {err_state:.2e}")
assert err_pieces < 1e-10 and err_state < 1e-10

# %% [markdown]
# ## MEGA's layer
#
# The official MEGA code (`fairseq/modules/exponential_moving_average.py`, class `MultiHeadEMA`) wraps
# the EMA as follows, and we follow it:
#
# - **Parameters.** Free tensors `alpha`, `delta`, `beta`, `eta` of shape (D, N) and `omega` of shape
#   (D,); the coefficients are $\alpha = \sigma(\texttt{alpha})$, $\delta = \sigma(\texttt{delta})$,
#   $\beta = \texttt{beta}$ and $\eta = \texttt{eta}/\sqrt N$. (MEGA's code calls $\eta$ `gamma`.)
# - **Output.** $\mathrm{SiLU}(\mathrm{EMA}(x) + \omega \odot x)$: a learned skip of the raw input,
#   then a SiLU. The paper's equations have neither; they live in the code.
# - **Initialisation.** `alpha`, `delta` $\sim \mathcal N(0, 0.2^2)$, so $\alpha, \delta$ start near
#   $\tfrac12$; `beta` $\sim \mathcal N(0, 0.02^2) + (1, -1, 1, -1, \dots)$; `eta`, `omega`
#   $\sim \mathcal N(0, 1)$.
#
# The state passed in and out is the $(B, D, N)$ hidden state $h$, before the projection $\eta$,
# the skip and the SiLU, which are all applied per token and need no memory.

# %% tags=["export:mega_ema"]
class DampedEMA(nn.Module):
    """MEGA's damped multi-dimensional EMA layer (``MultiHeadEMA``, unidirectional).

    y = SiLU(EMA(x) + ω ⊙ x), where EMA is :func:`damped_ema_fft` with α = σ(alpha),
    δ = σ(delta), β = beta and η = eta / √N.

    Args:
        model_dim: channels D.
        ndim: hidden dimensions N per channel (MEGA uses 16).
    """

    def __init__(self, model_dim: int, ndim: int = 16) -> None:
        super().__init__()
        validate.positive_int("model_dim", model_dim)
        validate.positive_int("ndim", ndim)
        self.model_dim = model_dim
        self.ndim = ndim
        self.alpha = nn.Parameter(torch.empty(model_dim, ndim))
        self.delta = nn.Parameter(torch.empty(model_dim, ndim))
        self.beta = nn.Parameter(torch.empty(model_dim, ndim))
        self.eta = nn.Parameter(torch.empty(model_dim, ndim))
        self.omega = nn.Parameter(torch.empty(model_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MEGA's initialisation: α, δ logits ~ N(0, 0.2²); β ~ ±1 alternating + N(0, 0.02²); η, ω ~ N(0, 1)."""
        nn.init.normal_(self.alpha, mean=0.0, std=0.2)
        nn.init.normal_(self.delta, mean=0.0, std=0.2)
        signs = torch.ones(self.ndim)
        signs[1::2] = -1.0
        self.beta.normal_(mean=0.0, std=0.02).add_(signs)
        nn.init.normal_(self.eta, mean=0.0, std=1.0)
        nn.init.normal_(self.omega, mean=0.0, std=1.0)

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The constrained (α, δ, β, η), each (D, N)."""
        return (torch.sigmoid(self.alpha), torch.sigmoid(self.delta), self.beta,
                self.eta / math.sqrt(self.ndim))

    def kernel(self, length: int) -> Tensor:
        """The layer's convolution kernel (D, length)."""
        return damped_ema_kernel(*self.coefficients(), length)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Apply the layer to x (B, L, D), starting from state h0 (B, D, N) or zeros.

        Returns:
            y (B, L, D) = SiLU(EMA(x) + ω ⊙ x) in x's dtype, and the last hidden state (B, D, N)
            in at least float32, which is the h0 for the sequence's next piece.
        """
        ema, h_last = damped_ema_fft(x, *self.coefficients(), h0=h0)
        return F.silu(ema + self.omega * x).to(x.dtype), h_last

    def extra_repr(self) -> str:
        return f"model_dim={self.model_dim}, ndim={self.ndim}"


# %% [markdown]
# ### Check: the layer in float32 against the float64 recurrence
#
# The layer computes in float32. Its reference is the recurrence in float64 on the same parameters,
# followed by the same skip and SiLU. The float32 FFT of an $L$-point sequence carries relative
# errors of about $10^{-7} \log_2 L$ of the signal's size; we allow $10^{-4}$ absolute on outputs
# of order one.

# %%
layer = DampedEMA(D, N).to(device)
x32 = torch.randn(B, L, D, device=device)
h0_32 = torch.randn(B, D, N, device=device)
y32, h32 = layer(x32, h0_32)

coeffs_layer64 = [c.double() for c in layer.coefficients()]
ema64, h64 = damped_ema_recurrence(x32.double(), *coeffs_layer64, h0=h0_32.double())
y64 = torch.nn.functional.silu(ema64 + layer.omega.double() * x32.double())
err_y, err_h = (y32.double() - y64).abs().max().item(), (h32.double() - h64).abs().max().item()
print(f"float32 layer vs float64 recurrence: outputs {err_y:.2e}, state {err_h:.2e} "
      f"(output scale {y64.abs().max().item():.1f})")
assert err_y < 1e-4 * max(1.0, y64.abs().max().item()) and err_h < 1e-4 * max(1.0, h64.abs().max().item())

# %% [markdown]
# What the initialisation looks like: kernels of a few channels of a freshly initialised layer.
# With $\alpha, \delta$ near $\tfrac12$ the decays $\varphi = 1 - \alpha\delta$ start near $0.75$,
# a short memory that training lengthens where the data needs it; the alternating signs of $\beta$
# and random $\eta$ give each channel its own mix of the $N$ exponentials.

# %%
with torch.no_grad():
    init_kernels = layer.kernel(32).cpu()
fig, ax = plt.subplots(figsize=(6, 3.2))
for j in range(min(4, D)):
    ax.plot(init_kernels[j], marker=".", label=f"channel {j}")
ax.axhline(0, color="grey", lw=0.5)
ax.set(title="kernels of a freshly initialised DampedEMA", xlabel="lag t", ylabel="k[t]")
ax.legend()
fig.tight_layout()
save_figure(fig, "02_init_kernels")
plt.show()
decay_init = 1 - torch.sigmoid(layer.alpha) * torch.sigmoid(layer.delta)
print(f"initial decays φ: min {decay_init.min().item():.3f}, mean {decay_init.mean().item():.3f}, "
      f"max {decay_init.max().item():.3f}")

# %% [markdown]
# ## Cost: recurrence against FFT
#
# The recurrence takes $L$ sequential steps; the FFT form takes a few transforms of length $2L$.
# The cell times both on this machine with `time_call` (one call of the slow recurrence, the best of
# three for the FFT); the numbers are whatever it prints.

# %%
coeffs32 = [c.float() for c in coeffs64]
print(f"{'L':>7} {'recurrence ms':>14} {'FFT ms':>8}")
for length in pick(smoke=[64, 256, 1024], full=[1024, 4096, 16_384]):
    xs = torch.randn(B, length, D, device=device)
    with torch.no_grad():
        t_rec = time_call(lambda: damped_ema_recurrence(xs, *coeffs32), repeats=1, warmup=0, device=device)
        t_fft = time_call(lambda: damped_ema_fft(xs, *coeffs32), repeats=3, device=device, reduce="min")
    print(f"{length:>7} {1e3 * t_rec:>14.2f} {1e3 * t_fft:>8.2f}")

# %% [markdown]
# ## What we have
#
# `megalodon_lite.mega_ema` exports `damped_ema_recurrence` (the reference), `damped_ema_kernel`,
# `damped_ema_fft` (with state in and out) and the layer `DampedEMA`. Chapter 03 builds MEGA's gated
# attention around it. Megalodon (chapter 04) replaces the real decays $\varphi$ with complex ones,
# $\varphi\, e^{i\theta}$, whose kernels oscillate as they decay.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the package's own on random inputs and prints a pass, "not yet implemented", or
# what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then run.** One hidden dimension with $\alpha = 0.5$, $\delta = 0.02$ and
# $\beta = \eta = 1$. What is its kernel at lag 0, and after how many steps has it halved? Which
# $\alpha$ would chapter 01's EMA need for the same half-life, and how large would its first tap be?
# Predict, then run the next cell.
#
# ### BEGIN SOLUTION
# At lag 0 the kernel is $\eta\alpha\beta = 0.5$, whatever $\delta$. It decays by
# $\varphi = 1 - \alpha\delta = 0.99$ per step, so it halves after $\ln 2 / (-\ln 0.99) = 69.0$
# steps (the first lag at or below half is 69). Chapter 01's EMA decays by $1 - \alpha$, so it needs
# $\alpha = 0.01$ for the same memory, and its first tap is then 0.01: fifty times smaller. Damping
# lets a layer remember long *and* take in much of each new token.
# ### END SOLUTION

# %%
import math

import torch

from megalodon_lite.exercises import check
from megalodon_lite.mega_ema import damped_ema_kernel, damped_ema_recurrence

one = torch.ones(1, 1, dtype=torch.float64)
damped = damped_ema_kernel(0.5 * one, 0.02 * one, one, one, 200)[0]
plain = damped_ema_kernel(0.01 * one, one, one, one, 200)[0]                 # δ = 1: chapter 01's EMA
print(f"damped: first tap {damped[0]:.3f}, halved at lag {int((damped <= damped[0] / 2).nonzero()[0])}; "
      f"chapter 01 with the same decay: first tap {plain[0]:.3f}, halved at lag "
      f"{int((plain <= plain[0] / 2).nonzero()[0])}")

# %% [markdown]
# **2. Derive.** Start the recurrence from a state $h_0$ instead of zero. Show that the output gains
# $\sum_n \eta_n \varphi_n^{t+1} h_{0,n}$ at step $t$, and that after $L$ steps the state is
# $h_L = \sum_{s<L} \alpha\beta\,\varphi^{L-1-s} x_s + \varphi^L h_0$. Why is this what lets a
# sequence be fed in pieces?
#
# ### BEGIN SOLUTION
# The recurrence is linear: $h_t = \varphi h_{t-1} + \alpha\beta x_t$. Unrolled from $h_{-1} = h_0$,
# $h_t = \sum_{s \le t} \alpha\beta\varphi^{t-s} x_s + \varphi^{t+1} h_0$: the zero-start state plus
# the free decay of $h_0$, $t + 1$ steps of it. Projecting with $\eta$ gives the extra term
# $\sum_n \eta_n\varphi_n^{t+1}h_{0,n}$, and $t = L - 1$ gives $h_L$. A piece therefore needs nothing
# of the earlier pieces but their last state, $N$ numbers per channel: feeding the pieces one after
# the other, each with the state the previous one returned, computes exactly the whole.
# ### END SOLUTION

# %% [markdown]
# **3. Write the kernel.** `my_damped_ema_kernel(alpha, delta, beta, eta, length)` returns
# $k[t] = \sum_n \eta_n \alpha_n \beta_n \varphi_n^t$, $\varphi = 1 - \alpha\delta$, of shape (D, L)
# for coefficients of shape (D, N): a product of the (D, N) weights with the Vandermonde matrix of the
# powers $\varphi^t$. The check compares it with `megalodon_lite.mega_ema.damped_ema_kernel`.

# %%
def my_damped_ema_kernel(alpha: torch.Tensor, delta: torch.Tensor, beta: torch.Tensor, eta: torch.Tensor,
                         length: int) -> torch.Tensor:
    """(D, N) coefficients -> (D, length) kernel k[d, t] = sum_n eta alpha beta phi^t, phi = 1 - alpha delta."""
    ### BEGIN SOLUTION
    steps = torch.arange(length, dtype=alpha.dtype, device=alpha.device)
    powers = torch.exp(torch.log1p(-alpha * delta)[..., None] * steps)          # phi^t, (D, N, L)
    return torch.einsum("dn,dnt->dt", eta * alpha * beta, powers)
    ### END SOLUTION


# %% tags=["check"]
def coefficients(generator: torch.Generator, channels: int, ndim: int) -> list[torch.Tensor]:
    """alpha, delta in (0, 1); beta, eta of both signs; (D, N) each, float64."""
    alpha, delta = (torch.sigmoid(torch.randn(channels, ndim, generator=generator, dtype=torch.float64))
                    for _ in range(2))
    beta, eta = (torch.randn(channels, ndim, generator=generator, dtype=torch.float64) for _ in range(2))
    return [alpha, delta, beta, eta]


def kernel_inputs(generator: torch.Generator) -> tuple:
    channels, ndim, length = (int(n) for n in torch.randint(1, 17, (3,), generator=generator))
    return (*coefficients(generator, channels, ndim), 8 * length)


check(my_damped_ema_kernel, reference=damped_ema_kernel, make_inputs=kernel_inputs,
      hint="powers phi^t as a (D, N, L) tensor (phi[..., None] ** t), weighted by eta * alpha * beta and summed over N")

# %% [markdown]
# **4. Write one streaming step.** `my_damped_ema_step(x_t, h, alpha, delta, beta, eta)` takes one
# token's input $x_t$ (B, D) and the state $h$ (B, D, N), and returns the output $y_t$ (B, D) and the
# next state: what a streaming decoder does for every new token. The check compares it with
# `damped_ema_recurrence` run on a one-token sequence from the same state.

# %%
def my_damped_ema_step(x_t: torch.Tensor, h: torch.Tensor, alpha: torch.Tensor, delta: torch.Tensor,
                       beta: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t (B, D), h (B, D, N) -> y_t (B, D) and the next state (B, D, N)."""
    ### BEGIN SOLUTION
    h = alpha * beta * x_t[..., None] + (1 - alpha * delta) * h
    return (eta * h).sum(-1), h
    ### END SOLUTION


# %% tags=["check"]
def one_step_of_the_recurrence(x_t, h, alpha, delta, beta, eta):
    y, h_next = damped_ema_recurrence(x_t[:, None], alpha, delta, beta, eta, h0=h)
    return y[:, 0], h_next


def step_inputs(generator: torch.Generator) -> tuple:
    batch, channels, ndim = (int(n) for n in torch.randint(1, 9, (3,), generator=generator))
    x_t = torch.randn(batch, channels, generator=generator, dtype=torch.float64)
    h = torch.randn(batch, channels, ndim, generator=generator, dtype=torch.float64)
    return (x_t, h, *coefficients(generator, channels, ndim))


check(my_damped_ema_step, reference=one_step_of_the_recurrence, make_inputs=step_inputs,
      hint="h' = alpha * beta * x_t + (1 - alpha * delta) * h, with x_t[..., None] broadcast over N; y_t = sum_n eta h'")
