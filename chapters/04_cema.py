# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Complex EMA (CEMA)
#
# Chapter 02 built MEGA's damped EMA: every channel $j$ of the input is spread over $N$ hidden
# dimensions, each a leaky integrator
#
# $$h_t = \alpha \odot \beta x_t + (1 - \alpha \odot \delta) \odot h_{t-1}, \qquad y_t = \eta^\top h_t$$
#
# (MEGA §3.1, eq. (5); Megalodon eq. (1)), whose response to a single spike is a sum of $N$ decaying exponentials
# $\sum_n \eta_n \alpha_n \beta_n \varphi_n^t$ with $\varphi_n = 1 - \alpha_n\delta_n \in (0, 1)$.
# Each term keeps one sign for ever, and a sum of $N$ of them changes sign at most $N-1$ times:
# a few wiggles near the start, then one sign for good. What such a kernel cannot do is sustain an
# oscillation at a chosen frequency for as long as its memory lasts: "a period of 7 tokens", or a
# sharp band-pass around some frequency, is out of reach.
#
# Megalodon (§3.1, eq. (2)) makes the decay factor complex. Multiplying $\varphi$ by a rotation
# $e^{i\theta}$ turns each term into a damped oscillation,
#
# $$\mathrm{Re}\big(c\,(\varphi e^{i\theta})^t\big) = |c|\,\varphi^t \cos(\theta t + \arg c),$$
#
# so with $N$ states at different frequencies the kernel can approximate a much richer family of
# causal filters, and it is still a *diagonal linear state-space model*: $h_t = q \odot h_{t-1} +
# p \odot x_t$, one complex number per state, $|q| < 1$ so nothing blows up.
#
# This chapter writes that layer three times — as the recurrence (the definition), as an FFT
# convolution, and in a *chunked* form that later chapters turn into a Triton kernel — proves the
# three agree with a float64 reference, and ends with a widget to play with $|q|$ and $\theta$.

# %%
import copy
import math

import matplotlib.pyplot as plt
import torch

from megalodon_lite.notebook import (describe_run, pick, pick_device, require_cuda, save_figure, seed_everything,
                                     time_call)

seed_everything(0)
device = pick_device()
describe_run(device)
B = 2
L = pick(smoke=300, full=16_384)   # not a multiple of the chunk size on purpose
D = pick(smoke=8, full=256)
N = 16
print(f"B={B}  L={L}  D={D}  N={N}")

# %% [markdown]
# ## The parameterisation the official code uses
#
# Per channel $d$ and state $n = 1..N$ (official [`MultiHeadComplexEMA._calc_coeffs`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/complex_exponential_moving_average.py#L100-L117)):
#
# $$p = \sigma(\texttt{alpha}), \qquad
#   \theta_n = n \cdot \tfrac{2\pi}{N}\,\sigma(\texttt{theta}), \qquad
#   q = \big(1 - \sigma(\texttt{alpha})\,\sigma(\texttt{delta})\big)\, e^{i\theta_n}, \qquad
#   \gamma = (\texttt{gamma}_{re} + i\,\texttt{gamma}_{im}) / \sqrt{N},$$
#
# $$h_t = q \odot h_{t-1} + p \odot x_t, \qquad
#   y_t = \mathrm{Re}\Big(\sum_n \gamma_n h_{t,n}\Big) + \omega \odot x_t .$$
#
# * `alpha`, `delta` are per state ($D\times N$), `theta` is one number per channel: the channel
#   owns a base frequency and its $N$ states sit at the harmonics $1, 2, \dots, N$ of it, spread
#   over at most one full turn.
# * $|q| = 1 - \sigma\sigma \in (0, 1)$ by construction, whatever the optimiser does.
# * $\omega$ is MEGA's skip weight: the raw input leaks straight to the output.
#
# **Paper vs code.** The paper writes (Megalodon eq. (2))
# $h_t = \alpha e^{i\theta} \odot \beta x_t + (1-\alpha\delta) e^{i\theta} \odot h_{t-1}$,
# $y_t = \mathrm{Re}(\eta^\top h_t)$: the rotation multiplies the input term as well, and there is
# an expansion vector $\beta$. Unrolling the paper's recurrence gives
# $h_t = \sum_s \alpha\beta e^{i\theta}\, q^{t-s} x_s$, i.e. the code's state times the constant
# $\beta e^{i\theta}$; since $\gamma$ is a free complex vector, $\eta \beta e^{i\theta}$ is just another
# $\gamma$. The code drops both and keeps the $\omega$ skip ([its forward](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/complex_exponential_moving_average.py#L127-L147)). (The
# paper's eq. (3) calls the base frequency $\omega$; in the code `omega` is the skip weight.) Section 6 checks the equivalence
# numerically.
#
# The coefficients are computed in float32 whatever the parameters' dtype (float64 only when the
# parameters themselves are float64, which the tests use as a reference). Each public function
# of this chapter starts with one call into `megalodon_lite/validate.py`, the hand-written module
# that holds the package's argument checks, so a wrong shape or dtype fails with an error naming
# the argument instead of broadcasting into a wrong answer.

# %% tags=["export:cema"]
"""Complex exponential moving average (CEMA): Megalodon §3.1, eqs. (2)-(3), parameterised as the official
``MultiHeadComplexEMA`` (https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/complex_exponential_moving_average.py#L42-L150).

Per channel d and state n (n = 1..N)::

    p = sigmoid(alpha)                                     (D, N) real
    q = (1 - sigmoid(alpha) * sigmoid(delta)) * exp(i * theta_n),
        theta_n = n * (2 pi / N) * sigmoid(theta)           (D, N) complex, |q| < 1
    gamma = (gamma_re + i gamma_im) / sqrt(N)              (D, N) complex
    h_t = q * h_{t-1} + p * x_t                            (B, D, N) complex state
    y_t = Re(sum_n gamma_n h_{t,n}) + omega * x_t          (B, L, D)

Three equal computations: :func:`cema_recurrence` (the definition, O(L) sequential steps),
:func:`cema_fft` (causal convolution with the kernel k[t] = Re sum_n p_n gamma_n q_n^t) and
:func:`cema_chunked` (a C x C Toeplitz matmul inside blocks of C tokens, the N complex states
carried across blocks). All of them take an initial state h0 and return the final state, compute
in float32/complex64 (float64/complex128 when the coefficients are float64) even under autocast,
and return y in x's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megalodon_lite import validate
from megalodon_lite.backend import check_backend, requested_backend, use_triton
from megalodon_lite.ema import fft_causal_conv

METHODS = ("auto", "recurrence", "fft", "chunked")
DEFAULT_CHUNK_SIZE = 64
RECURRENCE_MAX_LENGTH = 8  # "auto" steps token by token up to this length (streaming decode)


def _compute_dtypes(reference: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(real, complex) dtypes to compute in: float64 only for float64 input, else float32."""
    if reference.dtype in (torch.float64, torch.complex128):
        return torch.float64, torch.complex128
    return torch.float32, torch.complex64


def cema_coefficients(alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CEMA coefficients from the raw parameters (official parameterisation, Megalodon eqs. (2)-(3)).

    Args:
        alpha, delta: (D, N, 1) raw parameters; p = sigmoid(alpha), |q| = 1 - sigmoid(alpha) sigmoid(delta).
        theta: (D, 1, 1) raw base frequency; theta_n = n (2 pi / N) sigmoid(theta), n = 1..N.
        gamma: (D, N, 2) real and imaginary parts of the output weights (scaled by 1/sqrt(N)).

    Returns:
        p (D, N) real, q (D, N) complex, gamma (D, N) complex, in float32/complex64
        (float64/complex128 when alpha is float64).
    """
    validate.cema_parameters(alpha, delta, theta, gamma)
    model_dim, cema_ndim, _ = alpha.shape
    real, _ = _compute_dtypes(alpha)
    with torch.autocast(device_type=alpha.device.type, enabled=False):
        p = torch.sigmoid(alpha.to(real)).squeeze(-1)
        magnitude = 1.0 - p * torch.sigmoid(delta.to(real)).squeeze(-1)
        harmonics = torch.arange(1, cema_ndim + 1, dtype=real, device=alpha.device)
        phase = torch.sigmoid(theta.to(real)).view(model_dim, 1) * (2 * math.pi / cema_ndim) * harmonics
        q = torch.polar(magnitude, phase)
        gamma_c = torch.view_as_complex(gamma.to(real).contiguous()) / math.sqrt(cema_ndim)
    return p, q, gamma_c


# %% [markdown]
# **Initialisation** (official [`_reset_parameters`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/complex_exponential_moving_average.py#L18-L39)): `alpha`, `delta` $\sim \mathcal N(0, 0.2^2)$;
# `theta` $= \mathrm{logit}(D^{-m/D})$ for a random permutation $m$ of $1..D$, so base frequencies
# are spread log-uniformly over channels; `gamma_re` $\sim \mathcal N(0,1)$, `gamma_im` $= 0$;
# `omega` $\sim$ TruncNormal$(0, 0.25, [-1, 1])$. As in the official code it is a function of the
# five parameter tensors, so this chapter can draw them before it has a module to hold them.

# %% tags=["export:cema"]
def cema_reset_parameters(alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor, omega: Tensor) -> None:
    """Official initialisation, in place: alpha, delta ~ N(0, 0.2); theta = logit(D^{-m/D}) for a
    random permutation m of 1..D; gamma_re ~ N(0, 1), gamma_im = 0; omega ~ TruncNormal(0, 0.25, [-1, 1]).

    Shapes: alpha, delta (D, N, 1); theta (D, 1, 1); gamma (D, N, 2); omega (D,).
    """
    validate.cema_parameters(alpha, delta, theta, gamma)
    model_dim = alpha.shape[0]
    validate.shape("omega", omega, (model_dim,))
    with torch.no_grad():
        nn.init.normal_(alpha, mean=0.0, std=0.2)
        nn.init.normal_(delta, mean=0.0, std=0.2)
        m = torch.randperm(model_dim, device=theta.device).to(torch.float64) + 1
        base_frequency = model_dim ** (-m / model_dim)   # in [1/D, 1); D = 1 gives 1, clamped by eps
        theta.copy_(torch.logit(base_frequency, eps=1e-6).view(model_dim, 1, 1))
        nn.init.normal_(gamma, mean=0.0, std=1.0)
        gamma[:, :, 1] = 0.0
        nn.init.trunc_normal_(omega, mean=0.0, std=0.25, a=-1.0, b=1.0)


# %% [markdown]
# Parameters at their official initialisation: the decay $|q|$ sits around $1 - \sigma(0)^2$, the
# base frequencies are spread over channels, and $\gamma$ starts real.

# %%
params = {"alpha": torch.empty(D, N, 1), "delta": torch.empty(D, N, 1), "theta": torch.empty(D, 1, 1),
          "gamma": torch.empty(D, N, 2), "omega": torch.empty(D)}
cema_reset_parameters(**params)
params = {name: value.to(device) for name, value in params.items()}
omega = params["omega"]
p, q, gamma = cema_coefficients(params["alpha"], params["delta"], params["theta"], params["gamma"])
print(p.dtype, q.dtype, gamma.dtype, tuple(q.shape))
print(f"|q| over all states: min {q.abs().min():.3f}  median {q.abs().median():.3f}  max {q.abs().max():.3f}")
base = torch.sigmoid(params["theta"].view(-1)) * 2 * math.pi / N
print(f"base frequency theta_1 over channels: min {base.min():.4f}  max {base.max():.4f} rad/token")
assert (q.abs() < 1).all() and (q.abs() > 0).all()
assert torch.equal(params["gamma"][..., 1], torch.zeros_like(params["gamma"][..., 1]))
assert omega.abs().max() <= 1.0

# %% [markdown]
# ### The powers $q^t$
#
# Everything below is built from the powers $q^t$: the convolution kernel
# $k[t] = \mathrm{Re}\sum_n p_n\gamma_n q_n^t$, the effect of an initial state, the state a block
# hands to the next. Two details matter in float32:
#
# * the powers are built as $q^t = |q|^t e^{i\theta t}$ from the log-magnitude and the phase, each
#   on its own — never as a running product $q \cdot q \cdots q$ (sequential, and its rounding
#   errors pile up with $t$). The exponents $t\log|q|$ and $t\theta$ are formed in float64, the
#   phase reduced modulo $2\pi$, and magnitude and phase each rounded once to float32 before
#   `torch.polar` joins them, so the $(D, N, L)$ work is real and nothing of that size is ever
#   complex128; forming $t \log q$ in float32 instead loses about $t\,\epsilon\,\theta$ of
#   relative accuracy, as the cell after the code measures;
# * everything runs in float32/complex64 with autocast disabled, and only the output is cast
#   back to the input's dtype.

# %% tags=["export:cema"]
def cema_powers(q: Tensor, length: int, start: int = 0) -> Tensor:
    """Powers q^t for t = start .. start + length - 1, shape (D, N, length), in q's dtype.

    Built as |q|^t e^{i theta t} from the log-magnitude and the phase, each power on its own (no
    running product). The exponents t log|q| and t theta are formed in float64 and the phase
    reduced modulo 2 pi; magnitude and phase are then rounded once to q's real dtype and joined
    as magnitude * (cos, sin), so at any t each power is within a few roundings of the exact power
    of the stored q (float32 arithmetic on t theta alone would lose ~t eps theta). Only (D, N)
    values are ever complex128: the (D, N, length) work is real float64, then the output dtype.
    (Not ``torch.polar``: its backward is NaN where a short memory's |q|^t underflows to 0.)
    """
    validate.cema_powers_args(q, length)
    real = torch.float64 if q.dtype == torch.complex128 else torch.float32
    log_q = torch.log(q.to(torch.complex128)).unsqueeze(-1)              # (D, N, 1): exact log of the stored q
    exponents = torch.arange(start, start + length, dtype=torch.float64, device=q.device)
    magnitude = (log_q.real * exponents).exp_().to(real)                 # |q|^t
    phase = (log_q.imag * exponents).remainder_(2 * math.pi).to(real)    # t theta mod 2 pi
    return torch.complex(magnitude * phase.cos(), magnitude * phase.sin())


def cema_kernel(p: Tensor, q: Tensor, gamma: Tensor, length: int) -> Tensor:
    """The real convolution kernel k[t] = Re sum_n p_n gamma_n q_n^t, shape (D, length)."""
    return torch.einsum("dn,dnt->dt", p * gamma, cema_powers(q, length)).real


# %% [markdown]
# A long memory ($|q| = 1 - \sigma(-3)\sigma(-4) \approx 0.999$, so $q^t$ stays representable for
# thousands of steps), powers against float64:

# %%
slow_decay = torch.full((8, N, 1), -3.0, device=device)   # 8 channels are enough to measure
q_slow = cema_coefficients(slow_decay, slow_decay - 1.0, params["theta"][:8], params["gamma"][:8])[1]
t_far = torch.arange(pick(smoke=4096, full=65_536), device=device)
exact = torch.exp(torch.log(q_slow.to(torch.complex128))[..., None] * t_far.double())
naive = torch.exp(torch.log(q_slow)[..., None] * t_far.float())            # t log q in float32
ours = cema_powers(q_slow, t_far.numel())
rel = lambda z: ((z.to(torch.complex128) - exact).abs() / exact.abs()).max().item()
print(f"powers up to t = {t_far.numel() - 1}: max relative error, t·log q in float32 {rel(naive):.1e}, "
      f"cema_powers {rel(ours):.1e}")
assert rel(ours) < 1e-6

# %% [markdown]
# What the rotation buys: the next figure shows the kernel of one channel with its $N$ states at the
# official initialisation (left: each state's term $\mathrm{Re}(p\gamma_n q_n^t)$; right: their sum)
# against the same channel with $\theta = 0$, which is MEGA's real damped EMA with the same decays.

# %%
def kernel_terms(p: torch.Tensor, q: torch.Tensor, gamma: torch.Tensor, length: int) -> torch.Tensor:
    """Per-state terms Re(p_n gamma_n q_n^t), shape (D, N, length)."""
    return ((p * gamma)[..., None] * cema_powers(q, length)).real


horizon = 32
channel = int(torch.argmax(base))  # the fastest-rotating channel shows the oscillation best
terms = kernel_terms(p, q, gamma, horizon)[channel].cpu()
terms_real = kernel_terms(p, q.abs().to(q.dtype), gamma, horizon)[channel].cpu()
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(terms.T.detach(), lw=0.8)
axes[0].set(title=f"channel {channel}: the {N} terms Re(p γ_n q_n^t)", xlabel="t")
axes[1].plot(terms.sum(0).detach(), label="CEMA kernel k[t]")
axes[1].plot(terms_real.sum(0).detach(), "--", label="same |q|, θ = 0 (real EMA)")
axes[1].set(title="their sum", xlabel="t")
axes[1].legend()
fig.tight_layout()
save_figure(fig, "04_cema_kernel_terms")
plt.show()
assert torch.allclose(terms.sum(0), cema_kernel(p, q, gamma, horizon)[channel].cpu(), atol=1e-6)

# %% [markdown]
# ## 1 · The recurrence, and a float64 reference
#
# `cema_recurrence` is the definition, one token at a time. Run on float64 coefficients (computed
# from float64 copies of the same parameters) it is our reference; the float32 run must match it
# to float32 accuracy: the state is a sum of at most $1/(1-|q|)$ effective terms of size $O(1)$,
# each rounded to a relative $2^{-24}$, so we allow an absolute $10^{-5}$ on outputs of size $O(1)$.

# %% tags=["export:cema"]
def cema_recurrence(x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor,
                    h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CEMA by its definition, one time step after the other (the reference; O(L) Python steps).

    Args:
        x: (B, L, D) input, any float dtype.
        p, q, gamma: (D, N) coefficients from :func:`cema_coefficients`.
        omega: (D,) skip weight.
        h0: (B, D, N) complex initial state, or None for zeros.

    Returns:
        y (B, L, D) in x's dtype and the final state h_L (B, D, N) complex.
    """
    validate.cema_inputs(x, p, q, gamma, omega, h0)
    real, complex_ = _compute_dtypes(p)
    batch, length, model_dim = x.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_c = x.to(real)
        h = x_c.new_zeros(batch, model_dim, p.shape[1], dtype=complex_) if h0 is None else h0
        outputs = []
        for t in range(length):
            h = q * h + p * x_c[:, t, :, None]
            outputs.append((gamma * h).real.sum(-1))
        y = torch.stack(outputs, dim=1) + omega.to(real) * x_c
    return y.to(x.dtype), h


# %%
x = torch.randn(B, L, D, device=device)
params64 = {name: value.double() for name, value in params.items()}
p64, q64, gamma64 = cema_coefficients(params64["alpha"], params64["delta"], params64["theta"], params64["gamma"])
y_ref, h_ref = cema_recurrence(x.double(), p64, q64, gamma64, params64["omega"])

y_rec, h_rec = cema_recurrence(x, p, q, gamma, omega)
scale = y_ref.abs().max().item()
err_rec = (y_rec.double() - y_ref).abs().max().item()
print(f"max |y| = {scale:.3f};  recurrence float32 vs float64: max error {err_rec:.2e}, "
      f"state error {(h_rec.to(torch.complex128) - h_ref).abs().max().item():.2e}")
assert err_rec < 1e-5 * max(1.0, scale)

# %% [markdown]
# ## 2 · The convolution view and the FFT
#
# Unrolling $h_t = q h_{t-1} + p x_t$ from a state $h_0$ before the first token gives
# $h_t = \sum_{s\le t} p\,q^{t-s} x_s + q^{t+1} h_0$, hence
#
# $$y_t = \sum_{s \le t} k[t-s]\, x_s \;+\; b[t] \;+\; \omega x_t,\qquad
#   k[t] = \mathrm{Re}\sum_n p_n\gamma_n q_n^t,\qquad b[t] = \mathrm{Re}\sum_n \gamma_n q_n^{t+1} h_{0,n},$$
#
# and the state after the last token is $h_L = \sum_t p\,q^{L-1-t} x_t + q^L h_0$.
# The kernel is *real*, so the convolution is chapter 01's zero-padded real FFT convolution
# (`fft_causal_conv`), $O(L \log L)$ per channel, with the powers built as above.
#
# The official CUDA path computes the same three quantities ([`ema_parameters`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/complex_exponential_moving_average.py#L139) for $k$
# and $b$, [`fftconv`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/complex_exponential_moving_average.py#L140), [`ema_hidden`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/complex_exponential_moving_average.py#L144) for $h_L$), with its powers as $\exp(t \log q)$ in float32 (its fast
# kernels also multiply running products of $q^{\text{block}}$). We test ours with a non-zero $h_0$.

# %% tags=["export:cema"]
def cema_fft(x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor,
             h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CEMA as a causal FFT convolution, plus the closed forms for the initial/final state.

    y[t] = sum_{s<=t} k[t-s] x[s] + b[t] + omega x[t], with k[t] = Re sum_n p_n gamma_n q_n^t and
    b[t] = Re sum_n gamma_n q_n^{t+1} h0_n; h_L = sum_t p q^{L-1-t} x_t + q^L h0.
    Memory O(D N L) for the powers. Same arguments and returns as :func:`cema_recurrence`.
    """
    validate.cema_inputs(x, p, q, gamma, omega, h0)
    real, complex_ = _compute_dtypes(p)
    length = x.shape[1]
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_c = x.to(real)
        powers = cema_powers(q, length + 1)                               # q^0 .. q^L
        kernel = torch.einsum("dn,dnt->dt", p * gamma, powers[..., :length]).real
        y = fft_causal_conv(x_c, kernel) + omega.to(real) * x_c
        h_last = p * torch.einsum("btd,dnt->bdn", x_c.to(complex_), powers[..., :length].flip(-1))
        if h0 is not None:
            y = y + torch.einsum("bdn,dnt->btd", gamma * h0, powers[..., 1:]).real
            h_last = h_last + powers[..., length] * h0
    return y.to(x.dtype), h_last


# %%
h0 = torch.randn(B, D, N, dtype=torch.complex64, device=device)
y_ref0, h_ref0 = cema_recurrence(x.double(), p64, q64, gamma64, params64["omega"], h0.to(torch.complex128))
y_fft, h_fft = cema_fft(x, p, q, gamma, omega, h0)
err_fft = (y_fft.double() - y_ref0).abs().max().item()
err_fft_h = (h_fft.to(torch.complex128) - h_ref0).abs().max().item()
print(f"FFT vs float64 recurrence (with h0): output error {err_fft:.2e}, final-state error {err_fft_h:.2e}")
assert err_fft < 1e-5 * max(1.0, y_ref0.abs().max().item())
assert err_fft_h < 1e-5 * max(1.0, h_ref0.abs().max().item())

# %% [markdown]
# ## 3 · The chunked form
#
# The FFT touches $O(L\log L)$ numbers and needs the whole sequence at once. The convolution has
# more structure than a general one: its kernel has *rank* $2N$ (it is a sum of $N$ complex
# exponentials), so a block of $C$ tokens talks to everything after it only through $N$ complex
# numbers, the state. Cut the sequence into blocks of $C$ tokens; for block $m$ with state $H_m$
# at its start,
#
# $$y_{mC+i} = \underbrace{\sum_{j \le i} k[i-j]\, x_{mC+j}}_{C\times C \text{ Toeplitz matmul}}
#   + \underbrace{\mathrm{Re}\sum_n \gamma_n q_n^{i+1} H_{m,n}}_{\text{from the carried state}}
#   + \omega x_{mC+i},\qquad
#   H_{m+1} = q^C H_m + \sum_{j<C} p\, q^{C-1-j} x_{mC+j}.$$
#
# All of it is real matmuls of size $C$ (complex numbers as real/imaginary pairs, i.e. $2N$ real
# rows) plus a scan over $L/C$ blocks. $H_0 = h_0$ gives the initial-state term $b[t]$ for free and
# the last $H$ is the final state. This is the form the Triton chapter fuses: fused, it reads $x$
# once and writes $y$ once, whatever the length.

# %% tags=["export:cema"]
def _as_real_pairs(z: Tensor, dim: int) -> Tensor:
    """Concatenate real and imaginary parts along dim (a complex N becomes a real 2N)."""
    return torch.cat([z.real, z.imag], dim=dim)


def cema_chunked(x: Tensor, p: Tensor, q: Tensor, gamma: Tensor, omega: Tensor,
                 h0: Tensor | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """CEMA in blocks of C = chunk_size tokens: Toeplitz matmul inside, complex state across.

    For block m with start state H_m (H_0 = h0), tokens i, j = 0..C-1 of the block:
        y[i]    = sum_{j<=i} k[i-j] x[j] + Re sum_n gamma_n q_n^{i+1} H_m,n + omega x[i]
        H_{m+1} = q^C H_m + sum_j p q^{C-1-j} x[j]
    All matmuls are real (complex numbers as real/imaginary pairs); only the scan over blocks is
    sequential. A length that is not a multiple of C ends with one shorter block.
    Same arguments and returns as :func:`cema_recurrence`.
    """
    validate.positive_int("chunk_size", chunk_size)
    validate.cema_inputs(x, p, q, gamma, omega, h0)
    real, complex_ = _compute_dtypes(p)
    batch, length, model_dim = x.shape
    cema_ndim = p.shape[1]
    tail = length % chunk_size
    if tail and length > tail:  # whole blocks first, then the tail as one shorter block
        y_head, h_head = cema_chunked(x[:, :length - tail], p, q, gamma, omega, h0, chunk_size=chunk_size)
        y_tail, h_last = cema_chunked(x[:, length - tail:], p, q, gamma, omega, h_head, chunk_size=tail)
        return torch.cat([y_head, y_tail], dim=1), h_last
    chunk_size = min(chunk_size, length)
    n_chunks = length // chunk_size
    with torch.autocast(device_type=x.device.type, enabled=False):
        x_c = x.to(real)
        blocks = x_c.reshape(batch, n_chunks, chunk_size, model_dim)
        powers = cema_powers(q, chunk_size + 1)                           # q^0 .. q^C
        # inside a block: lower-triangular Toeplitz T[d, i, j] = k[d, i - j]
        kernel = torch.einsum("dn,dnt->dt", p * gamma, powers[..., :chunk_size]).real
        offsets = torch.arange(chunk_size, device=x.device)
        lag = offsets[:, None] - offsets[None, :]
        toeplitz = kernel[:, lag.clamp(min=0)] * (lag >= 0)
        y = torch.einsum("dij,bmjd->bmid", toeplitz, blocks)
        # what each block adds to the state (from zero): sum_j p q^{C-1-j} x[j]
        to_state = _as_real_pairs(p[..., None] * powers[..., :chunk_size].flip(-1), dim=1)   # (D, 2N, C)
        local = torch.einsum("bmjd,dkj->bmdk", blocks, to_state)
        local = torch.complex(local[..., :cema_ndim], local[..., cema_ndim:])
        # carry the state across blocks (sequential, n_chunks steps)
        step = powers[..., chunk_size]
        h = x_c.new_zeros(batch, model_dim, cema_ndim, dtype=complex_) if h0 is None else h0
        starts = []
        for m in range(n_chunks):
            starts.append(h)
            h = step * h + local[:, m]
        starts = _as_real_pairs(torch.stack(starts, dim=1), dim=-1)      # (B, M, D, 2N)
        # what the carried state adds to each token: Re sum_n gamma_n q_n^{i+1} H_n
        from_state = gamma[..., None] * powers[..., 1:]
        from_state = torch.cat([from_state.real, -from_state.imag], dim=1)  # (D, 2N, C)
        y = y + torch.einsum("bmdk,dki->bmid", starts, from_state)
        y = y.reshape(batch, length, model_dim) + omega.to(real) * x_c
    return y.to(x.dtype), h


# %%
y_chk, h_chk = cema_chunked(x, p, q, gamma, omega, h0, chunk_size=64)
err_chk = (y_chk.double() - y_ref0).abs().max().item()
err_chk_h = (h_chk.to(torch.complex128) - h_ref0).abs().max().item()
print(f"chunked (C=64, L={L}) vs float64 recurrence: output error {err_chk:.2e}, final-state error {err_chk_h:.2e}")
assert err_chk < 1e-5 * max(1.0, y_ref0.abs().max().item())
assert err_chk_h < 1e-5 * max(1.0, h_ref0.abs().max().item())
for chunk in (1, 7, 128):
    y_c, _ = cema_chunked(x, p, q, gamma, omega, h0, chunk_size=chunk)
    assert (y_c.double() - y_ref0).abs().max() < 1e-5 * max(1.0, y_ref0.abs().max().item()), chunk

# %% [markdown]
# ## 4 · The module
#
# `CEMA` holds the five parameters in the official shapes ($\omega$ is stored as a vector of $D$,
# [the official code's `omega`](https://github.com/XuezheMax/megalodon/blob/cff8ba5f607a2176bbd0166afc09842984433f93/megalodon/modules/complex_exponential_moving_average.py#L66) is $D \times 1$), draws them with `cema_reset_parameters`, and its
# `forward(x, h0)` computes the coefficients and runs one of the three forms: `method="auto"` picks
# the recurrence for very short pieces (one-token decoding) and the chunked form otherwise — or, on a
# GPU, chapter 08's Triton kernel, the chunked form written as one fused pass (`backend`, or the
# environment variable `MEGALODON_BACKEND`, forces either path). We load the parameters drawn
# above, so the module must reproduce the functions exactly.

# %% tags=["export:cema"]
class CEMA(nn.Module):
    """Multi-dimensional damped complex EMA of Megalodon (§3.1), as in the official code.

    Parameters: alpha, delta (D, N, 1); theta (D, 1, 1); gamma (D, N, 2) (real, imaginary);
    omega (D,) skip weight. ``forward(x, h0)`` maps (B, L, D) to (B, L, D) and returns the final
    complex state (B, D, N), so that feeding a sequence in pieces equals one call.

    Args:
        model_dim: D, the number of channels.
        cema_ndim: N, complex EMA states per channel (16 in every official configuration).
        backend: "auto" (chapter 08's Triton kernel on CUDA, PyTorch elsewhere), "triton" or "torch"
            (:mod:`megalodon_lite.backend`).
    """

    def __init__(self, model_dim: int, cema_ndim: int = 16, backend: str = "auto") -> None:
        super().__init__()
        validate.positive_ints(model_dim=model_dim, cema_ndim=cema_ndim)
        self.model_dim = model_dim
        self.cema_ndim = cema_ndim
        self.backend = check_backend(backend)
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.alpha = nn.Parameter(torch.empty(model_dim, cema_ndim, 1))
        self.delta = nn.Parameter(torch.empty(model_dim, cema_ndim, 1))
        self.theta = nn.Parameter(torch.empty(model_dim, 1, 1))
        self.gamma = nn.Parameter(torch.empty(model_dim, cema_ndim, 2))
        self.omega = nn.Parameter(torch.empty(model_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (:func:`cema_reset_parameters`)."""
        cema_reset_parameters(self.alpha, self.delta, self.theta, self.gamma, self.omega)

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """p (D, N) float32, q (D, N) complex64, gamma (D, N) complex64 (64-bit for float64 parameters)."""
        return cema_coefficients(self.alpha, self.delta, self.theta, self.gamma)

    def forward(self, x: Tensor, h0: Tensor | None = None, *, method: str = "auto") -> tuple[Tensor, Tensor]:
        """Apply CEMA to x (B, L, D) from state h0 (B, D, N) complex64 or None (zeros).

        method: "recurrence", "fft", "chunked", or "auto": chapter 08's kernel when the backend
        says so (on CUDA, for pieces longer than RECURRENCE_MAX_LENGTH tokens — a decoding step
        costs less as the recurrence — and for any piece under an explicit "triton"), else the
        recurrence up to RECURRENCE_MAX_LENGTH tokens and the chunked form beyond.
        Returns y (B, L, D) in x's dtype and the final state h_L (B, D, N) complex64.
        """
        validate.one_of("method", method, METHODS)
        validate.sequence("x", x, channels=self.model_dim)
        p, q, gamma = self.coefficients()
        if method == "auto" and self._use_kernel(x):
            from megalodon_lite.ops.cema import cema_triton  # chapter 08; imports triton
            return cema_triton(x, p, q, gamma, self.omega, h0)
        if method == "auto":
            method = "recurrence" if x.shape[1] <= RECURRENCE_MAX_LENGTH else "chunked"
        if method == "recurrence":
            return cema_recurrence(x, p, q, gamma, self.omega, h0)
        if method == "fft":
            return cema_fft(x, p, q, gamma, self.omega, h0)
        return cema_chunked(x, p, q, gamma, self.omega, h0, chunk_size=self.chunk_size)

    def _use_kernel(self, x: Tensor) -> bool:
        """Whether ``method="auto"`` runs chapter 08's kernel (float32 coefficients, x not float64)."""
        if x.shape[1] <= RECURRENCE_MAX_LENGTH and requested_backend(self.backend) != "triton":
            return False
        supported = x.dtype != torch.float64 and self.alpha.dtype != torch.float64
        return use_triton(self.backend, x.device, supported=supported,
                          why_not="the CEMA kernel takes float16/bfloat16/float32 x and float32 parameters")

    def extra_repr(self) -> str:
        return f"model_dim={self.model_dim}, cema_ndim={self.cema_ndim}, backend={self.backend}"


# %%
layer = CEMA(D, N).to(device)
layer.load_state_dict(params)
with torch.no_grad():
    for method in ("recurrence", "fft", "chunked"):
        y_mod, _ = layer(x, h0, method=method)
        assert (y_mod.double() - y_ref0).abs().max() < 1e-5 * max(1.0, y_ref0.abs().max().item()), method
print(layer)

# %% [markdown]
# Gradients flow through all three forms by autograd; they agree with each other (the tests
# compare every form's gradients with a float64 reference for $x$ and every parameter).

# %%
def grads(method: str) -> list[torch.Tensor]:
    xg = x[:, : min(L, 200)].clone().requires_grad_(True)
    layer.zero_grad()
    y, h = layer(xg, h0, method=method)
    (y.square().mean() + h.abs().square().mean()).backward()
    return [xg.grad] + [param.grad.clone() for param in layer.parameters()]


g_rec, g_fft, g_chk = grads("recurrence"), grads("fft"), grads("chunked")
for a, b_, c in zip(g_rec, g_fft, g_chk):
    tol = 1e-4 * max(1.0, a.abs().max().item())
    assert (a - b_).abs().max() < tol and (a - c).abs().max() < tol
print("gradients of x and", [name for name, _ in layer.named_parameters()], "agree across the three forms")

# %% [markdown]
# ## 5 · State in, state out: streaming
#
# Because every form takes $h_0$ and returns $h_L$, a long sequence can be fed in pieces of any
# size — the basis of Megalodon's unlimited-context inference.

# %%
cuts = sorted(torch.randperm(L - 1)[:5].add(1).tolist())
pieces, h = [], None
for a, b_ in zip([0] + cuts, cuts + [L]):
    y_piece, h = layer(x[:, a:b_], h)
    pieces.append(y_piece)
y_stream = torch.cat(pieces, dim=1)
y_whole, h_whole = layer(x)
err_stream = (y_stream - y_whole).abs().max().item()
print(f"pieces {[b_ - a for a, b_ in zip([0] + cuts, cuts + [L])]}: max difference to one call {err_stream:.2e}")
assert err_stream < 1e-5 * max(1.0, y_whole.abs().max().item())
assert (h - h_whole).abs().max() < 1e-5 * max(1.0, h_whole.abs().max().item())

# %% [markdown]
# ## 6 · The paper's form is the code's form with a different $\gamma$
#
# The paper puts the rotation on the input term as well and has an input expansion $\beta$:
# $h_t = \alpha e^{i\theta}\beta x_t + (1-\alpha\delta)e^{i\theta} h_{t-1}$, $y_t = \mathrm{Re}(\eta^\top h_t)$.
# Its state is the code's state times $\beta e^{i\theta}$, so the code with
# $\gamma = \eta\,\beta\,e^{i\theta}$ must give the same outputs. Checked in float64:

# %%
xs = x[:, :50].double()
beta = torch.randn(D, N, dtype=torch.float64, device=device)
eta = torch.randn(D, N, dtype=torch.complex128, device=device)
rotation = torch.polar(torch.ones_like(q64.abs()), q64.angle())
h_paper = torch.zeros(B, D, N, dtype=torch.complex128, device=device)
y_paper = []
for t in range(xs.shape[1]):
    h_paper = p64 * rotation * beta * xs[:, t, :, None] + q64 * h_paper
    y_paper.append((eta * h_paper).real.sum(-1))
y_paper = torch.stack(y_paper, dim=1)
y_code, _ = cema_recurrence(xs, p64, q64, eta * beta * rotation, torch.zeros(D, dtype=torch.float64, device=device))
print(f"paper form vs code form with gamma = eta·beta·e^(iθ): max difference {(y_paper - y_code).abs().max().item():.1e}")
assert torch.allclose(y_paper, y_code, atol=1e-12)

# %% [markdown]
# ## 7 · Low precision
#
# Under bf16 the state and the powers must stay in float32: $|q|^t$ for $t$ in the thousands and
# sums of thousands of terms are exactly what bf16's 8-bit mantissa cannot hold. The forms cast
# $x$ to float32, disable autocast inside, and round only the output. So a bf16 input gives the
# float32 result on the same (rounded) input, rounded once to bf16: a relative error of at most
# bf16's unit roundoff $2^{-8}$ (8 significant bits) of each output.

# %%
x_bf16 = x.to(torch.bfloat16)
y_bf16, h_bf16 = layer(x_bf16)
y_fp32, h_fp32 = layer(x_bf16.float())
rel = ((y_bf16.float() - y_fp32).abs() / y_fp32.abs().clamp_min(1e-6)).max().item()
print(f"bf16 in -> {y_bf16.dtype} out, state {h_bf16.dtype}; max relative difference to float32: {rel:.2e} "
      f"(bound 2^-8 = {2**-8:.2e})")
assert y_bf16.dtype == torch.bfloat16 and h_bf16.dtype == torch.complex64
assert rel <= 2**-8 and torch.equal(h_bf16, h_fp32)
with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
    y_auto, _ = layer(x)
assert y_auto.dtype == torch.float32 and torch.allclose(y_auto, layer(x)[0], atol=1e-6)

# %% [markdown]
# ## 8 · The CEMA decay widget
#
# One channel with $N$ states, steered by the two numbers that shape its kernel:
#
# * $|q|$, the **magnitude** of every state's decay factor: a state keeps $|q|^t$ of an input
#   $t$ tokens old, so its memory has a half-life of $\ln 2 / (-\ln|q|)$ tokens;
# * $\theta_1$, the channel's **base frequency** in radians per token: state $n$ turns by
#   $\theta_n = n\,\theta_1$ per token, an oscillation with a period of $2\pi/\theta_n$ tokens.
#
# The widget turns them into the layer's own parameters and runs the layer: $\sigma(\texttt{theta})
# = \theta_1 N / 2\pi$ (so $\theta_1 < 2\pi/N$); the input weight $p = \sigma(\texttt{alpha})$ is held
# at $\tfrac12$, its value at initialisation, so that $\sigma(\texttt{delta}) = 2(1 - |q|)$ (so
# $|q| > \tfrac12$) and moving $|q|$ changes only how long the states remember. The state selector
# shows one state $n$ or all of them. Panels: (1) the kernel $k[t]$ (its per-state terms); (2) the
# path of $q_n^t$ in the complex plane, a spiral inside the unit circle; (3) the impulse response
# of the whole channel, computed by running the layer on a spike (so it includes the $\omega$ skip
# at $t = 0$); (4) its magnitude frequency response
# $|H(e^{i\nu})| = |\omega + \tfrac12\sum_n (\frac{p\gamma_n}{1-q_n e^{-i\nu}} + \frac{\overline{p\gamma_n}}{1-\bar q_n e^{-i\nu}})|$
# (curve), with the FFT of the computed impulse response (dots) on top. The readout under the
# sliders gives the half-life and the selected state's frequency and period.
#
# A slider is only fun when the picture follows the hand, so the figure is built once and a redraw
# only swaps the data of its artists; the cell that builds the widget times one redraw.

# %%
import io

import ipywidgets as widgets
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def frequency_response(p: torch.Tensor, q: torch.Tensor, gamma: torch.Tensor, nu: torch.Tensor) -> torch.Tensor:
    """Per-state transfer functions of the real terms Re(p gamma_n q_n^t) at frequencies nu, shape (len(nu), N).

    Re(c q^t) = (c q^t + conj(c) conj(q)^t) / 2 and sum_t q^t z^t = 1 / (1 - q z) with z = e^{-i nu}.
    """
    z = torch.exp(-1j * nu.to(torch.float64))[:, None]
    c, q = (p * gamma).to(torch.complex128), q.to(torch.complex128)
    return 0.5 * (c / (1 - q * z) + c.conj() / (1 - q.conj() * z))


# %% [markdown]
# The closed form for panel (4), checked against the FFT of an impulse response computed by the
# layer (long enough, 4096 steps, that the truncated tail is below float32 resolution at these
# decays):

# %%
spike = torch.zeros(1, 4096, D, device=device)
spike[0, 0] = 1.0
with torch.no_grad():
    response = layer(spike)[0][0].T.double().cpu()                  # (D, 4096)
    nu_check = torch.linspace(0, math.pi, 4096 // 2 + 1)
    closed = torch.stack([frequency_response(p[d].cpu(), q[d].cpu(), gamma[d].cpu(), nu_check).sum(1)
                          for d in range(D)]) + layer.omega.detach().cpu().double()[:, None]
err_h = (torch.fft.rfft(response).abs() - closed.abs()).abs().max().item()
print(f"closed-form |H| vs FFT of the impulse response: max difference {err_h:.1e} (max |H| {closed.abs().max():.2f})")
assert err_h < 1e-4 * closed.abs().max().item()


# %%
WIDGET_INPUT_WEIGHT = 0.5   # p = σ(alpha), held fixed: |q| = 1 − p σ(delta) then sets σ(delta) alone


def build_cema_widget(cema_ndim: int = 16, horizon: int = 96, seed: int = 0) -> widgets.VBox:
    """Sliders for |q| and the base frequency θ₁ (rad/token), a state selector, four redrawn panels.

    The sliders set the layer's parameters: sigmoid(theta) = θ₁ N / 2π, sigmoid(alpha) = p = 1/2 and
    sigmoid(delta) = (1 − |q|) / p. The figure's artists are made once and only their data change
    on a redraw (re-laying out a matplotlib figure costs far more than drawing it). The returned
    box also holds ``redraw()``, ``cell`` (the one-channel CEMA it runs) and ``figure``.
    """
    torch.manual_seed(seed)
    cell = CEMA(1, cema_ndim)                                 # one channel, official init of gamma, omega
    p_fixed = WIDGET_INPUT_WEIGHT
    theta_max = math.floor((2 * math.pi / cema_ndim - 1e-3) * 200) / 200   # below 2π/N, on the 0.005 grid
    style = dict(style={"description_width": "32px"}, layout=widgets.Layout(width="360px"))
    magnitude = widgets.FloatSlider(value=0.91, min=round(1 - p_fixed + 0.01, 3), max=0.995, step=0.005,
                                    readout_format=".3f", description="|q|",
                                    tooltip="decay of every state per token: it keeps |q|^t of an input t tokens old",
                                    **style)
    theta = widgets.FloatSlider(value=0.1, min=0.005, max=theta_max, step=0.005, readout_format=".3f",
                                description="θ₁", tooltip="base frequency, rad/token: state n turns by n·θ₁ per token",
                                **style)
    state = widgets.Dropdown(options=[("all", 0)] + [(f"n = {n}", n) for n in range(1, cema_ndim + 1)],
                             value=1, description="state", layout=widgets.Layout(width="200px"))
    for control, css in ((magnitude, "cema-magnitude"), (theta, "cema-theta"), (state, "cema-state")):
        control.add_class(css)
    note = widgets.HTML(f"|q|: how fast every state forgets · θ₁: the base frequency in rad/token "
                        f"(state n turns by n·θ₁) · p = σ(alpha) held at {p_fixed}")
    readout = widgets.HTML().add_class("cema-readout")
    plot = widgets.Image(format="png").add_class("cema-plot")

    t = torch.arange(horizon)
    fft_length = 512                                         # impulse length used for the FFT dots
    nu = torch.linspace(0, math.pi, fft_length // 2 + 1)     # the rfft bins of a length-512 signal
    spike = torch.zeros(1, fft_length, 1)
    spike[0, 0, 0] = 1.0
    circle = torch.exp(1j * torch.linspace(0, 2 * math.pi, 200))

    fig = Figure(figsize=(10, 6.4), dpi=72)
    canvas = FigureCanvasAgg(fig)
    ax_kernel, ax_plane, ax_impulse, ax_freq = fig.subplots(2, 2).ravel()
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.08, top=0.95, hspace=0.35, wspace=0.2)
    term_lines = [ax_kernel.plot([], [], lw=0.8)[0] for _ in range(cema_ndim)]
    envelope_lines = [ax_kernel.plot([], [], "k:", lw=0.8)[0] for _ in range(2)]
    (sum_line,) = ax_kernel.plot([], [], "k", lw=1.5, label=r"$k[t]$ = sum of terms")
    ax_kernel.set_xlabel(r"$t$")
    paths = [ax_plane.plot([], [], ".-", ms=2, lw=0.6)[0] for _ in range(cema_ndim)]
    ax_plane.plot(circle.real, circle.imag, "k", lw=0.5)
    ax_plane.set(title=r"(2) $q_n^t$ in the complex plane", aspect="equal", xlim=(-1.1, 1.1), ylim=(-1.1, 1.1))
    stems = ax_impulse.stem(t, torch.zeros(horizon), basefmt=" ", markerfmt=".")
    ax_impulse.set(title=r"(3) impulse response of the channel (all states + $\omega$ skip)", xlabel=r"$t$")
    (channel_line,) = ax_freq.plot([], [], "k", label="channel (closed form)")
    (fft_dots,) = ax_freq.plot([], [], "o", ms=3, label="FFT of the impulse response")
    (state_line,) = ax_freq.plot([], [], "--", label="selected state")
    ax_freq.set(title=r"(4) magnitude frequency response $|H(e^{i\nu})|$", xlabel=r"$\nu$ (rad/token)",
                yscale="log")

    def redraw(*_) -> None:
        with torch.no_grad():
            cell.alpha.fill_(math.log(p_fixed / (1 - p_fixed)))                 # logits of the σ values
            damping = (1 - magnitude.value) / p_fixed
            cell.delta.fill_(math.log(damping / (1 - damping)))
            fraction = theta.value * cema_ndim / (2 * math.pi)
            cell.theta.fill_(math.log(fraction / (1 - fraction)))
            p, q, gamma = (c[0] for c in cell.coefficients())                    # (N,) each
            powers = cema_powers(q[None], horizon)[0]                             # (N, horizon)
            terms = ((p * gamma)[:, None] * powers).real
            impulse = cell(spike, method="chunked")[0][0, :, 0]
            H = frequency_response(p, q, gamma, nu)
            H_channel = H.sum(1) + cell.omega[0].double()
        single = state.value != 0
        shown = [state.value - 1] if single else list(range(cema_ndim))
        for n in range(cema_ndim):
            visible = n in shown
            term_lines[n].set_visible(visible)
            paths[n].set_visible(visible)
            if visible:
                term_lines[n].set_data(t, terms[n])
                paths[n].set_data(powers[n].real, powers[n].imag)
                paths[n].set_linestyle("-" if single else "none")   # 16 spirals: dots only
        envelope = (p * gamma)[shown[0]].abs() * q[shown[0]].abs() ** t
        for sign, line in zip((1, -1), envelope_lines):
            line.set_data(t, sign * envelope)
            line.set_visible(single)
        sum_line.set_data(t, terms.sum(0))
        sum_line.set_visible(not single)
        ax_kernel.set_title(rf"(1) kernel term $\mathrm{{Re}}(p\,\gamma_n q_n^t)$, $n = {state.value}$" if single
                            else r"(1) kernel $k[t]$ and its $N$ terms")
        ax_kernel.relim(visible_only=True)
        ax_kernel.autoscale_view()
        stems.markerline.set_ydata(impulse[:horizon])
        stems.stemlines.set_segments([[(i, 0.0), (i, v)] for i, v in enumerate(impulse[:horizon].tolist())])
        ax_impulse.set_ylim(min(0.0, impulse.min().item()) * 1.1 - 1e-3, max(0.0, impulse.max().item()) * 1.1 + 1e-3)
        channel_line.set_data(nu, H_channel.abs())
        fft_dots.set_data(nu[::8], torch.fft.rfft(impulse).abs()[::8])
        state_line.set_data(nu, H[:, shown[0]].abs())
        state_line.set_visible(single)
        ax_freq.legend(handles=[channel_line, fft_dots] + ([state_line] if single else []),
                       loc="upper right", fontsize=8)
        ax_freq.relim(visible_only=True)
        ax_freq.autoscale_view()
        buffer = io.BytesIO()
        canvas.print_png(buffer)
        plot.value = buffer.getvalue()
        half_life = math.log(2) / -math.log(q.abs()[0].item())
        if single:
            n = state.value
            turn = q[n - 1].angle().abs().item()                # n θ₁ folded into [0, π]: what the kernel shows
            folded = "" if abs(turn - n * theta.value) < 1e-4 else f" ≡ {turn:.3f} (mod 2π)"
            about = (f"state n = {n}: θ_{n} = {n * theta.value:.3f} rad/token{folded}, "
                     f"a period of {2 * math.pi / turn:.1f} tokens")
        else:
            about = (f"the {cema_ndim} states turn by θ_n = n·θ₁ rad/token; "
                     f"state 1 with a period of {2 * math.pi / theta.value:.1f} tokens")
        readout.value = f"half-life {half_life:.2f} tokens &nbsp;·&nbsp; {about}"

    for control in (magnitude, theta, state):
        control.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.VBox([note, magnitude, theta, state, readout]), plot]).add_class("cema-widget")
    box.redraw, box.cell, box.figure = redraw, cell, fig
    return box


cema_widget = build_cema_widget()
# One redraw: the layer's coefficients, the impulse response through the chunked form, the
# frequency response and the PNG render. Best of 5, since other work on the machine only adds time.
redraw_seconds = time_call(cema_widget.redraw, repeats=5, warmup=1, device="cpu", reduce="min")
print(f"one redraw on this CPU: {1e3 * redraw_seconds:.0f} ms")
cema_widget

# %% [markdown]
# Things to try: push $|q|$ up towards 1 and watch the half-life grow and the spiral stay close to
# the unit circle for many more turns; raise $\theta_1$ and the states spread around the circle,
# each contributing a band around its frequency $\theta_n$ to panel (4).
#
# **Summary.** `megalodon_lite.cema` exports `CEMA` (parameters and official initialisation),
# `cema_coefficients`, `cema_reset_parameters`, `cema_powers`, `cema_kernel` and the three equal computations
# `cema_recurrence`, `cema_fft`, `cema_chunked`, each with a state in and a state out. Chapter 07
# builds the Megalodon layer on `CEMA`; the Triton chapter fuses `cema_chunked`.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the package's own on random inputs and prints a pass, "not yet implemented", or
# what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then try it in the widget.** Set $|q| = 0.95$: what half-life will the readout show?
# Then set $\theta_1 = 0.2$ rad/token: what are the periods of states $n = 1$ and $n = 5$, and how much
# of a turn does state 1's spiral in panel (2) make before its radius has halved?
#
# ### BEGIN SOLUTION
# Half-life $\ln 2 / (-\ln 0.95) = 13.5$ tokens. State 1 turns by $\theta_1 = 0.2$ rad per token, a
# period of $2\pi/0.2 = 31.4$ tokens; state 5 by $\theta_5 = 5\theta_1 = 1.0$ rad per token, a period
# of $6.3$ tokens. In one half-life state 1 turns by $13.5 \cdot 0.2 = 2.7$ rad, $0.43$ of a turn: a
# slow state forgets before it oscillates, so to oscillate for many periods a state needs $|q|$ close
# to 1 or a high harmonic $n$.
# ### END SOLUTION

# %% [markdown]
# **2. Derive.** Write $\gamma = |\gamma| e^{i\phi}$ and $q = |q| e^{i\theta}$. Show that one state's
# kernel term is a damped cosine, $\mathrm{Re}(p\,\gamma\, q^t) = p\,|\gamma|\,|q|^t \cos(\theta t + \phi)$.
# Which parameter sets its envelope, which its frequency, and which its phase? What does it become when
# $\theta = 0$?
#
# ### BEGIN SOLUTION
# $p\gamma q^t = p|\gamma||q|^t e^{i(\theta t + \phi)}$ since the moduli multiply and the angles add;
# its real part is $p|\gamma||q|^t\cos(\theta t + \phi)$. The envelope $p|\gamma||q|^t$ decays at the
# rate $|q|$ (set by `alpha` and `delta`) from the height $p|\gamma|$; the frequency is $\theta$ (set
# by `theta` and the harmonic $n$); the phase is $\arg\gamma$ (the learned output weight). With
# $\theta = 0$ it is $p\,|\gamma|\cos\phi\,|q|^t$: a single real exponential, one term of MEGA's
# damped EMA (chapter 02).
# ### END SOLUTION

# %% [markdown]
# **3. Write the kernel.** `my_cema_kernel(p, q, gamma, length)` returns the real kernel
# $k[t] = \mathrm{Re}\sum_n p_n \gamma_n q_n^t$ of shape (D, L), for `p` (D, N) real and `q`, `gamma`
# (D, N) complex. The check compares it with `megalodon_lite.cema.cema_kernel`.

# %%
import math

import torch

from megalodon_lite.cema import cema_kernel, cema_recurrence
from megalodon_lite.exercises import check


def my_cema_kernel(p: torch.Tensor, q: torch.Tensor, gamma: torch.Tensor, length: int) -> torch.Tensor:
    """p (D, N) real, q and gamma (D, N) complex -> (D, length) real kernel Re sum_n p gamma q^t."""
    ### BEGIN SOLUTION
    steps = torch.arange(length, dtype=p.dtype, device=p.device)
    powers = torch.polar(q.abs()[..., None] ** steps, q.angle()[..., None] * steps)   # q^t, (D, N, L)
    return ((p * gamma)[..., None] * powers).sum(dim=1).real
    ### END SOLUTION


# %% tags=["check"]
def coefficients(generator: torch.Generator, channels: int, ndim: int) -> tuple[torch.Tensor, ...]:
    """p in (0, 1); q with |q| in (0.5, 0.99) at any angle; gamma complex: (D, N) each, 64-bit."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(channels, ndim, generator=generator, dtype=torch.float64)

    p = uniform(0.01, 0.99)
    q = torch.polar(uniform(0.5, 0.99), uniform(-math.pi, math.pi))
    gamma = torch.complex(*(torch.randn(channels, ndim, generator=generator, dtype=torch.float64) for _ in range(2)))
    return p, q, gamma


def kernel_inputs(generator: torch.Generator) -> tuple:
    channels, ndim, length = (int(n) for n in torch.randint(1, 17, (3,), generator=generator))
    return (*coefficients(generator, channels, ndim), 4 * length)


check(my_cema_kernel, reference=cema_kernel, make_inputs=kernel_inputs,
      hint="powers q[..., None] ** t for t = 0..L-1 as a (D, N, L) tensor; multiply by (p * gamma)[..., None], "
           "sum over N, then take the real part")

# %% [markdown]
# **4. Write one streaming step.** `my_cema_step(x_t, h, p, q, gamma, omega)` takes one token's input
# $x_t$ (B, D) and the complex state $h$ (B, D, N), and returns the output
# $y_t = \mathrm{Re}\sum_n \gamma_n h'_n + \omega x_t$ (B, D) and the next state
# $h' = q h + p x_t$: what `CEMA` does for each token when a model generates text. The check
# compares it with `cema_recurrence` on a one-token sequence from the same state.

# %%
def my_cema_step(x_t: torch.Tensor, h: torch.Tensor, p: torch.Tensor, q: torch.Tensor, gamma: torch.Tensor,
                 omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t (B, D) real, h (B, D, N) complex -> y_t (B, D) real and the next state (B, D, N) complex."""
    ### BEGIN SOLUTION
    h = q * h + p * x_t[..., None]
    return (gamma * h).real.sum(-1) + omega * x_t, h
    ### END SOLUTION


# %% tags=["check"]
def one_step_of_the_recurrence(x_t, h, p, q, gamma, omega):
    y, h_next = cema_recurrence(x_t[:, None], p, q, gamma, omega, h)
    return y[:, 0], h_next


def step_inputs(generator: torch.Generator) -> tuple:
    batch, channels, ndim = (int(n) for n in torch.randint(1, 9, (3,), generator=generator))
    p, q, gamma = coefficients(generator, channels, ndim)
    x_t = torch.randn(batch, channels, generator=generator, dtype=torch.float64)
    h = torch.complex(*(torch.randn(batch, channels, ndim, generator=generator, dtype=torch.float64) for _ in range(2)))
    return x_t, h, p, q, gamma, torch.randn(channels, generator=generator, dtype=torch.float64)


check(my_cema_step, reference=one_step_of_the_recurrence, make_inputs=step_inputs,
      hint="update the state first (h' = q h + p x_t, with x_t[..., None] over N), then read it out with gamma")

# %% [markdown]
# **5. Write the state a block hands on.** The chunked form (section 3) carries the state across
# blocks: a block of $C$ tokens that starts in state $H$ ends in
# $H' = q^C H + \sum_{j<C} p\, q^{C-1-j} x_j$. Write `my_block_end_state(x, p, q, h0)` for a block
# `x` (B, C, D) starting in `h0` (B, D, N), without a loop over the tokens (powers of $q$ and one
# `einsum`). The check compares it with the final state of `cema_recurrence`. (Chapter 11 sends
# exactly this between GPUs.)

# %%
def my_block_end_state(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """x (B, C, D) real, p (D, N), q (D, N) complex, h0 (B, D, N) complex -> the state after the block."""
    ### BEGIN SOLUTION
    length = x.shape[1]
    back = torch.arange(length - 1, -1, -1, dtype=p.dtype, device=p.device)           # C-1-j for j = 0..C-1
    into_end = p[..., None] * torch.polar(q.abs()[..., None] ** back, q.angle()[..., None] * back)
    q_block = torch.polar(q.abs() ** length, q.angle() * length)                      # q^C
    return q_block * h0 + torch.einsum("bjd,dnj->bdn", x.to(q.dtype), into_end)
    ### END SOLUTION


# %% tags=["check"]
def recurrence_end_state(x, p, q, h0):
    zeros = torch.zeros(x.shape[-1], dtype=x.dtype)
    return cema_recurrence(x, p, q, torch.zeros_like(q), zeros, h0)[1]   # the output weights play no part


def block_inputs(generator: torch.Generator) -> tuple:
    batch, length, channels, ndim = (int(n) for n in torch.randint(1, 17, (4,), generator=generator))
    p, q, _ = coefficients(generator, channels, ndim)
    x = torch.randn(batch, length, channels, generator=generator, dtype=torch.float64)
    h0 = torch.complex(*(torch.randn(batch, channels, ndim, generator=generator, dtype=torch.float64) for _ in range(2)))
    return x, p, q, h0


check(my_block_end_state, reference=recurrence_end_state, make_inputs=block_inputs,
      hint="the weight of token j is p q^(C-1-j): the last token is multiplied by p alone, the first by p q^(C-1)")


# %% [markdown]
# ## On a GPU
#
# *The cells below need a CUDA GPU: the tests and the book build skip them on a machine without one.*
#
# Timing the FFT and chunked forms is only meaningful on a GPU at full size. The numbers printed
# are for that GPU only.

# %% tags=["gpu"]
cuda = require_cuda()
x_gpu = torch.randn(B, L, D, device=cuda, dtype=torch.bfloat16)
layer_gpu = CEMA(D, N).to(cuda)
for method in ("fft", "chunked"):
    with torch.no_grad():
        forward_ms = 1e3 * time_call(lambda: layer_gpu(x_gpu, method=method), device=cuda)
    x_grad = x_gpu.clone().requires_grad_(True)
    both_ms = 1e3 * time_call(lambda: layer_gpu(x_grad, method=method)[0].float().sum().backward(), device=cuda)
    print(f"{method:8s} B={B} L={L} D={D} N={N}, bf16 input: forward {forward_ms:.2f} ms, forward+backward {both_ms:.2f} ms")
