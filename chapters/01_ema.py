# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The exponential moving average
#
# Megalodon mixes information along the sequence in two ways: a moving average that every token
# sees from the very beginning of the stream, and attention inside chunks. The moving average it
# uses (CEMA, chapter 04) is a complex, multi-state descendant of the plainest smoother there is,
# the **exponential moving average** (EMA). This chapter builds that ancestor three ways:
#
# 1. as a **recurrence**, one step per token;
# 2. as a **causal convolution** with an explicit, exponentially decaying kernel;
# 3. as the same convolution computed with the **FFT**, in $O(L \log L)$.
#
# All three compute the same numbers, and the notebook proves it. The FFT path becomes
# `fft_causal_conv`, the building block that chapters 02 (MEGA's damped EMA) and 04 (CEMA) reuse.

# %%
import io

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

from megalodon_lite.notebook import describe_run, pick, pick_device, save_figure, seed_everything, time_call

seed_everything(0)
device = pick_device()
describe_run(device)
B, L, D = 2, pick(smoke=257, full=4099), 8   # L deliberately not a power of two
print(f"(B, L, D) = ({B}, {L}, {D})")

# %% [markdown]
# ## 1. The recurrence
#
# For a sequence $x_0, x_1, \dots$ of $D$-dimensional vectors and a per-channel smoothing factor
# $\alpha \in (0, 1)^D$, the EMA is (MEGA, Ma et al. 2023, §2.2, eq. (2))
#
# $$y_t = \alpha \odot x_t + (1 - \alpha) \odot y_{t-1}, \qquad y_{-1} = 0.$$
#
# Each channel is an independent scalar filter: a large $\alpha_d$ follows the input closely, a
# small one remembers a long past. The state is one number per channel, so a stream of any length
# costs $O(D)$ memory: this is what lets Megalodon claim an unlimited context. The price is that
# step $t$ needs step $t-1$: written as a loop, the work is sequential in $L$.
#
# The package keeps tensors as `(B, L, D)` (batch, length, channels) at every public interface, and
# all three forms start with the same one-line check (`validate.ema_inputs`, from the hand-written
# `megalodon_lite/validate.py` that holds the package's argument checks), so a wrong shape or an
# $\alpha$ outside $(0, 1)$ is refused the same way everywhere, with an error naming the argument.

# %% tags=["export:ema"]
"""The classic exponential moving average (EMA), in three forms that compute the same numbers.

    y_t = alpha * x_t + (1 - alpha) * y_{t-1},   y_{-1} = 0          (MEGA, Ma et al. 2023, §2.2, eq. (2))

with one smoothing factor ``alpha_d`` in (0, 1) per channel. Unrolled, the EMA is a causal
convolution with the kernel ``k_j = alpha * (1 - alpha)**j``:

- :func:`ema_recurrence`: the loop, O(L) sequential steps;
- :func:`ema_convolution`: the explicit lower-triangular Toeplitz matrix, O(L^2) work and memory;
- :func:`ema_fft`: the same convolution through :func:`fft_causal_conv`, O(L log L).

:func:`fft_causal_conv` is the shared causal FFT convolution that the damped EMA (chapter 02) and
CEMA (chapter 04) reuse with their own kernels. Tensors are ``(B, L, D)``; arithmetic runs in at
least float32 (float64 stays float64) and results come back in ``x.dtype``. Every function checks
its inputs and raises TypeError/ValueError naming the argument; the check that alpha lies in (0, 1)
reads one bool back from alpha's device (on CUDA, a host sync).
"""

import torch
from torch import Tensor

from megalodon_lite import validate

__all__ = ["ema_kernel", "ema_recurrence", "ema_convolution", "ema_fft", "fft_causal_conv"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the arithmetic runs in: the inputs' common dtype, but never below float32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype

# %% tags=["export:ema"]
def ema_recurrence(x: Tensor, alpha: Tensor) -> Tensor:
    """EMA by its recurrence ``y_t = alpha * x_t + (1 - alpha) * y_{t-1}``, ``y_{-1} = 0`` (MEGA eq. (2)).

    One vectorised step per time step: O(B L D) work, but L sequential steps. The reference the
    other forms are checked against; differentiable through autograd.

    Args:
        x: (B, L, D) real floating input.
        alpha: (D,) smoothing factors, each strictly inside (0, 1).

    Returns:
        (B, L, D) in ``x.dtype`` (computed in at least float32).
    """
    validate.ema_inputs(x, alpha)
    dtype = _compute_dtype(x, alpha)
    a = alpha.to(dtype)
    decay = 1 - a
    weighted_input = a * x.to(dtype)          # alpha * x_t for every t at once, (B, L, D)
    y = weighted_input[:, 0]
    outputs = [y]
    for t in range(1, x.shape[1]):
        y = weighted_input[:, t] + decay * y
        outputs.append(y)
    return torch.stack(outputs, dim=1).to(x.dtype)

# %% [markdown]
# A first check with an answer we know by hand: for a unit step ($x_t = 1$ for all $t$) the
# recurrence sums a geometric series, $y_t = \alpha \sum_{j=0}^{t} (1-\alpha)^j = 1 - (1-\alpha)^{t+1}$.
# The output starts at $\alpha$, not at 1: an EMA started from $y_{-1}=0$ is biased towards zero
# for its first $\sim 1/\alpha$ steps (the bias that Adam's "bias correction" divides away).

# %%
alpha = torch.rand(D, dtype=torch.float64) * 0.9 + 0.05            # random, away from the ends
step = torch.ones(1, L, D, dtype=torch.float64)
t = torch.arange(L, dtype=torch.float64)[:, None]
closed_form = 1 - (1 - alpha) ** (t + 1)                           # (L, D)
error = (ema_recurrence(step, alpha)[0] - closed_form).abs().max().item()
print(f"step response vs 1 - (1 - alpha)^(t+1): max |error| = {error:.2e}")
assert error < 1e-12   # float64, L <= 4099 additions of numbers <= 1: rounding stays ~L * 1e-16

# %% [markdown]
# ## 2. The convolution and its kernel
#
# Unroll the recurrence: $y_t = \alpha x_t + (1-\alpha)\alpha x_{t-1} + (1-\alpha)^2 \alpha x_{t-2} + \dots$, so
#
# $$y_t = \sum_{j=0}^{t} k_j \odot x_{t-j}, \qquad k_j = \alpha \odot (1-\alpha)^j .$$
#
# The EMA is a **causal convolution** (output $t$ sees inputs $\le t$ only) with a kernel that
# decays geometrically. Its weights sum to $1 - (1-\alpha)^{t+1} \le 1$, so $y_t$ is a weighted
# average of the past that forgets at rate $1-\alpha$: the weight halves every
# $\ln 2 / (-\ln(1-\alpha))$ steps.
#
# As a matrix acting on the time axis, the convolution is lower triangular and **Toeplitz**
# (constant along each diagonal): $y = T x$ with $T_{ts} = k_{t-s}$ for $s \le t$. Building $T$
# costs $O(L^2)$ memory per channel: fine as a reference, hopeless at 64K tokens. (Chapter 08's
# kernels use exactly this matrix, but only in small blocks.)
#
# The kernel is computed as $k_j = \alpha \exp\!\big(j \cdot \operatorname{log1p}(-\alpha)\big)$
# rather than by a cumulative product of $(1-\alpha)$: every entry is computed independently
# (no sequential dependency, no rounding error carried from $j-1$ to $j$), and `log1p` keeps
# $\ln(1-\alpha)$ accurate when $\alpha$ is tiny.

# %% tags=["export:ema"]
def _ema_kernel(alpha: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """Unchecked ``k[d, j] = alpha_d * (1 - alpha_d)**j`` as ``alpha * exp(j * log1p(-alpha))``, (D, length)."""
    a = alpha.to(dtype)
    lags = torch.arange(length, device=alpha.device, dtype=dtype)
    return a[:, None] * torch.exp(lags * torch.log1p(-a)[:, None])


def ema_kernel(alpha: Tensor, length: int) -> Tensor:
    """The EMA's convolution kernel ``k[d, j] = alpha_d * (1 - alpha_d)**j`` for ``j < length``.

    Computed elementwise as ``alpha * exp(j * log1p(-alpha))`` (no cumulative product), so each
    entry carries only its own rounding error.

    Args:
        alpha: (D,) smoothing factors, each strictly inside (0, 1).
        length: number of taps L >= 1.

    Returns:
        (D, L) kernel in ``alpha``'s dtype promoted to at least float32.
    """
    validate.ema_alpha(alpha)
    length = validate.kernel_length(length)
    return _ema_kernel(alpha, length, _compute_dtype(alpha))


def ema_convolution(x: Tensor, alpha: Tensor) -> Tensor:
    """EMA as an explicit causal convolution ``y_t = sum_{j<=t} k_j * x_{t-j}``, ``k_j = alpha (1-alpha)^j``.

    Materialises the lower-triangular Toeplitz matrix ``T[d, t, s] = k[d, t - s]`` (s <= t) and
    multiplies: O(D L^2) memory and O(B D L^2) work. A readable reference, not a fast path.

    Args:
        x: (B, L, D) real floating input.
        alpha: (D,) smoothing factors, each strictly inside (0, 1).

    Returns:
        (B, L, D) in ``x.dtype`` (computed in at least float32).
    """
    validate.ema_inputs(x, alpha)
    dtype = _compute_dtype(x, alpha)
    length = x.shape[1]
    kernel = _ema_kernel(alpha, length, dtype)                          # (D, L)
    positions = torch.arange(length, device=x.device)
    lag = positions[:, None] - positions[None, :]                       # (L, L): t - s
    toeplitz = torch.where(lag >= 0, kernel[:, lag.clamp(min=0)], 0.0)  # (D, L, L)
    return torch.einsum("dts,bsd->btd", toeplitz, x.to(dtype)).to(x.dtype)

# %% [markdown]
# Checks: the kernel equals the cumulative product it replaces, and the convolution equals the
# recurrence, both in float64 on random inputs. The one-liner after them shows why `log1p`:
# in float32, $1 - 10^{-8}$ rounds to exactly 1, so $\ln(1-\alpha)$ comes out as 0 (a kernel that
# never decays) while `log1p` keeps it.

# %%
x = torch.randn(B, L, D, dtype=torch.float64)
kernel = ema_kernel(alpha, L)
kernel_by_cumprod = alpha[:, None] * torch.cat(
    [torch.ones(D, 1, dtype=torch.float64), torch.cumprod((1 - alpha)[:, None].expand(D, L - 1), dim=1)], dim=1)
normal = kernel_by_cumprod > 1e-250           # relative error is meaningless once (1-a)^j underflows
kernel_error = ((kernel - kernel_by_cumprod).abs() / kernel_by_cumprod)[normal].max().item()
conv_error = (ema_convolution(x, alpha) - ema_recurrence(x, alpha)).abs().max().item()
print(f"kernel vs cumulative product: max relative error {kernel_error:.2e}")
print(f"convolution vs recurrence:    max |error|       {conv_error:.2e}")
# float64 (eps 1.1e-16): exp(j*log1p(-a)) is off by ~|j*log1p(-a)|*eps <= 576*eps where k > 1e-250,
# the cumulative product by up to j*eps: both far below 1e-11 for L <= 4099.
assert kernel_error < 1e-11
assert conv_error < 1e-12     # float64 sums of <= L terms of size <= max|x|

tiny = torch.tensor(1e-8, dtype=torch.float32)
print(f"float32, alpha=1e-8:  log(1 - alpha) = {torch.log(1 - tiny).item():.3e}   "
      f"log1p(-alpha) = {torch.log1p(-tiny).item():.3e}")

# %% [markdown]
# The kernel for a few values of $\alpha$. On a logarithmic y-axis each kernel is a straight line of
# slope $\ln(1-\alpha)$, starting at height $\alpha$: a large $\alpha$ trusts the present and
# forgets fast, a small one averages over a long window. Next to it, the Toeplitz matrix $T$ for
# one $\alpha$: the whole EMA is this lower-triangular picture applied to each channel.

# %%
alphas_to_show = torch.tensor([0.5, 0.2, 0.05, 0.01], dtype=torch.float64)
lags_to_show = 200
kernels = ema_kernel(alphas_to_show, lags_to_show)
fig, (ax_kernel, ax_matrix) = plt.subplots(1, 2, figsize=(11, 4))
for a, k in zip(alphas_to_show.tolist(), kernels):
    half_life = np.log(2) / -np.log1p(-a)
    ax_kernel.semilogy(k.numpy(), label=f"α = {a}  (half-life {half_life:.1f} steps)")
ax_kernel.set(xlabel="lag j", ylabel="k_j = α(1-α)^j", ylim=(1e-6, 1), title="EMA kernels")
ax_kernel.legend()
matrix_size = 48
lag = torch.arange(matrix_size)[:, None] - torch.arange(matrix_size)[None, :]
k_matrix = ema_kernel(torch.tensor([0.15]), matrix_size)[0]
toeplitz = torch.where(lag >= 0, k_matrix[lag.clamp(min=0)], 0.0)
ax_matrix.imshow(toeplitz.numpy(), cmap="magma")
ax_matrix.set(xlabel="input position s", ylabel="output position t",
              title="Toeplitz matrix T[t, s] = k[t-s], α = 0.15")
fig.tight_layout()
save_figure(fig, "01_ema_kernels")
plt.show()

# %% [markdown]
# ## 3. The convolution through the FFT
#
# The convolution theorem turns convolution into pointwise multiplication: with the discrete
# Fourier transform $\mathcal{F}$ of length $n$,
# $\;\mathcal{F}^{-1}\!\big(\mathcal{F}(x)\cdot\mathcal{F}(k)\big)_t = \sum_j k_j\, x_{(t-j) \bmod n}$.
# That is a **circular** convolution: with $n = L$, the terms with $j > t$ wrap around and pull in
# inputs from the *end* of the sequence, i.e. from the future. Zero-padding both signals to
# $n \ge 2L-1$ pushes every wrapped-around index into the zeros, and the first $L$ outputs are then
# exactly the causal convolution. We pad to at least $2L$ (as the official code does), rounded up
# to the next "fast" length whose only prime factors are 2, 3 and 5, where FFT libraries are
# quickest. The cost is $O(L \log L)$ per channel, with no sequential loop.
#
# `fft_causal_conv` takes any real kernel of shape `(D, L)`: chapters 02 and 04 hand it the
# kernels of the damped and the complex EMA. It computes in at least float32, because half-precision
# FFTs lose too many digits (and are not supported at all on the CPU).

# %% tags=["export:ema"]
def _next_fast_length(n: int) -> int:
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (fast for pocketfft and cuFFT)."""
    best = 1 << max(n - 1, 0).bit_length()     # the next power of two always qualifies
    power_of_5 = 1
    while power_of_5 < best:
        odd_part = power_of_5
        while odd_part < best:                 # odd_part = 3^b * 5^c
            candidate = odd_part
            while candidate < n:
                candidate *= 2
            best = min(best, candidate)
            odd_part *= 3
        power_of_5 *= 5
    return best


def fft_causal_conv(x: Tensor, kernel: Tensor) -> Tensor:
    """Causal convolution along time, ``y[b, t, d] = sum_{j<=t} kernel[d, j] * x[b, t-j, d]``, by FFT.

    Both signals are zero-padded to ``n >= 2L`` (the next length with prime factors 2, 3, 5), so
    the circular convolution the FFT computes equals the linear one on the first L outputs.
    O(B D n log n) work; differentiable through ``torch.fft``.

    Args:
        x: (B, L, D) real floating input.
        kernel: (D, L) real floating kernel, one per channel, as long as ``x``.

    Returns:
        (B, L, D) in ``x.dtype``; computed in the inputs' common dtype, at least float32.
    """
    validate.causal_conv_inputs(x, kernel)
    length = x.shape[1]
    dtype = _compute_dtype(x, kernel)
    n = _next_fast_length(2 * length)
    x_freq = torch.fft.rfft(x.to(dtype), n=n, dim=1)             # (B, n//2 + 1, D)
    kernel_freq = torch.fft.rfft(kernel.to(dtype), n=n, dim=1)   # (D, n//2 + 1)
    y = torch.fft.irfft(x_freq * kernel_freq.T, n=n, dim=1)     # (B, n, D): circular conv of padded signals
    return y[:, :length].to(x.dtype)


def ema_fft(x: Tensor, alpha: Tensor) -> Tensor:
    """EMA as the causal convolution with ``k_j = alpha (1 - alpha)^j``, computed by FFT in O(L log L).

    Args:
        x: (B, L, D) real floating input.
        alpha: (D,) smoothing factors, each strictly inside (0, 1).

    Returns:
        (B, L, D) in ``x.dtype`` (computed in at least float32).
    """
    validate.ema_inputs(x, alpha)
    return fft_causal_conv(x, _ema_kernel(alpha, x.shape[1], _compute_dtype(x, alpha)))

# %% [markdown]
# First, the trap the padding avoids: an FFT of length exactly $L$ computes the circular
# convolution, which is wrong (it leaks the future into the past). Then the claim of the chapter:
# the three forms agree in float64, for random $\alpha$ and random lengths, most of them not powers
# of two, including $L = 1$; and so do their gradients with respect to both $x$ and $\alpha$.

# %%
x_freq = torch.fft.rfft(x, n=L, dim=1)
circular = torch.fft.irfft(x_freq * torch.fft.rfft(kernel, n=L, dim=1).T, n=L, dim=1)
causal = ema_fft(x, alpha)
leak = (circular - causal).abs().max().item()
print(f"FFT without padding (circular) vs causal: max |difference| = {leak:.2e}  (wrong, as expected)")
assert leak > 1e-3

lengths = [1, 2, 3, 7, 100, 127, 129, 256, 300, L]
forms = {"recurrence": ema_recurrence, "convolution": ema_convolution, "fft": ema_fft}
worst_output = worst_gradient = 0.0
for length in lengths:
    a = (torch.rand(D, dtype=torch.float64) * 0.98 + 0.01).requires_grad_()
    xs = torch.randn(B, length, D, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(B, length, D, dtype=torch.float64)       # a random loss direction
    results = {}
    for name, form in forms.items():
        y = form(xs, a)
        grad_x, grad_alpha = torch.autograd.grad((y * upstream).sum(), (xs, a))
        results[name] = (y, grad_x, grad_alpha)
    ref_y, ref_gx, ref_ga = results["recurrence"]
    for name in ("convolution", "fft"):
        y, gx, ga = results[name]
        worst_output = max(worst_output, (y - ref_y).abs().max().item())
        worst_gradient = max(worst_gradient, (gx - ref_gx).abs().max().item(),
                             ((ga - ref_ga).abs() / ref_ga.abs().clamp(min=1)).max().item())
print(f"lengths {lengths}")
print(f"max |difference| vs the recurrence: outputs {worst_output:.2e}, gradients {worst_gradient:.2e}")
assert worst_output < 1e-11 and worst_gradient < 1e-9   # float64 (eps 2e-16); FFT error grows ~ log n

# %% [markdown]
# What each form costs, measured here (median of a few calls, forward only, float32, on this
# notebook's device). The loop pays one step per token; the Toeplitz matrix grows as $L^2$ and is
# only measured while it stays small; the FFT does a fixed number of passes over the data.

# %%
timing_channels = pick(smoke=16, full=64)
alpha_timing = torch.rand(timing_channels, device=device) * 0.9 + 0.05
print(f"{'L':>7} {'recurrence':>12} {'convolution':>12} {'fft':>12}   (milliseconds, B=1, D={timing_channels})")
for length in pick(smoke=[128, 512], full=[256, 1024, 4096, 16384]):
    x_timing = torch.randn(1, length, timing_channels, device=device)
    forms_to_time = [ema_recurrence, ema_convolution if length <= 2048 else None, ema_fft]
    row = [time_call(lambda: form(x_timing, alpha_timing), repeats=3, device=device) if form else float("nan")
           for form in forms_to_time]
    print(f"{length:>7} " + " ".join(f"{1e3 * s:>12.3f}" if np.isfinite(s) else f"{'(skipped)':>12}" for s in row))

# %% [markdown]
# ## 4. Play with it
#
# Move $\alpha$ and change the input: the left panel redraws the kernel, the right one the input
# (grey) and its EMA computed by `ema_fft` (blue). Small $\alpha$ smooths heavily and lags behind
# the input; large $\alpha$ follows the noise. (In the rendered HTML book, without a kernel, the
# widget shows its first state and does not respond.)

# %%
def build_ema_widget(signal_length: int = 300, seed: int = 0) -> widgets.VBox:
    """A slider for α and a choice of input over two panels: the kernel, and the input with its EMA
    computed by ``ema_fft``. The figure is built once; a redraw swaps the data of its lines. The
    returned box also holds ``redraw()``."""
    rng = np.random.default_rng(seed)
    time_axis = np.arange(signal_length)
    signals = {
        "step": (time_axis >= 60).astype(np.float64),
        "noisy sine": np.sin(2 * np.pi * time_axis / 80) + 0.4 * rng.standard_normal(signal_length),
        "spikes": (rng.random(signal_length) < 0.03) * 5.0,
        "random walk": np.cumsum(rng.standard_normal(signal_length)),
    }
    fig, (ax_k, ax_s) = plt.subplots(1, 2, figsize=(11, 3.5))
    plt.close(fig)                             # drawn into the widget only, not as a cell output
    kernel_line, = ax_k.plot([], [], color="C0")
    ax_k.set(xlabel=r"lag $j$", ylabel=r"$k_j$", title=r"kernel $\alpha(1-\alpha)^j$", xlim=(0, 60))
    input_line, = ax_s.plot(time_axis, np.zeros(signal_length), color="0.6", label="input")
    ema_line, = ax_s.plot(time_axis, np.zeros(signal_length), color="C0", label="EMA")
    ax_s.set(xlabel=r"$t$", title="input and its EMA")
    ax_s.legend(loc="upper left")
    image = widgets.Image(format="png")
    alpha_slider = widgets.FloatLogSlider(value=0.1, base=10, min=-2.5, max=-0.01, step=0.01,
                                          description="α", readout_format=".3f")
    signal_choice = widgets.SelectionSlider(options=list(signals), value="noisy sine", description="input")

    def redraw(_change=None) -> None:
        a = torch.tensor([alpha_slider.value], dtype=torch.float64)
        signal = torch.from_numpy(signals[signal_choice.value])
        smoothed = ema_fft(signal.view(1, -1, 1), a).view(-1)
        kernel_line.set_data(np.arange(61), ema_kernel(a, 61)[0].numpy())
        ax_k.set_ylim(0, 1.05 * alpha_slider.value)
        input_line.set_ydata(signal.numpy())
        ema_line.set_ydata(smoothed.numpy())
        ax_s.relim()
        ax_s.autoscale_view()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        image.value = buffer.getvalue()

    alpha_slider.observe(redraw, names="value")
    signal_choice.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([alpha_slider, signal_choice]), image])
    box.redraw = redraw
    return box


display(build_ema_widget())

# %% [markdown]
# ## What we built
#
# `megalodon_lite.ema` holds the three forms and the shared FFT convolution:
#
# | function | computes | cost |
# |---|---|---|
# | `ema_recurrence(x, alpha)` | $y_t = \alpha x_t + (1-\alpha) y_{t-1}$ | $L$ sequential steps |
# | `ema_kernel(alpha, L)` | $k_j = \alpha(1-\alpha)^j$, shape `(D, L)` | elementwise |
# | `ema_convolution(x, alpha)` | $y = T x$, Toeplitz $T$ | $O(L^2)$ memory |
# | `ema_fft(x, alpha)` / `fft_causal_conv(x, kernel)` | the same convolution by FFT | $O(L \log L)$ |
#
# A single decay per channel is a blunt instrument: the kernel can only be a falling exponential.
# Chapter 02 gives each channel several decays (MEGA's damped, multi-dimensional EMA), and chapter
# 04 lets them rotate in the complex plane (CEMA), so the kernel can oscillate. Both reuse
# `fft_causal_conv`, and both keep the property shown here: a recurrence with a fixed-size state,
# and hence a stream of unlimited length at constant memory.

# %% [markdown]
# ## Exercises
#
# Predict before you run, derive on paper, then write code: the cell after each function you write
# checks it against the package's own on random inputs and prints a pass, "not yet implemented", or
# what differs with a hint. The section imports what it uses, so it also runs on its own.

# %% [markdown]
# **1. Predict, then try it in the widget.** Choose the *step* input and $\alpha = 0.1$. At which
# step $t$ does the EMA first exceed 0.9? And with $\alpha = 0.01$? Predict from the step response
# $y_t = 1 - (1-\alpha)^{t+1}$, then move the slider, and run the next cell.
#
# ### BEGIN SOLUTION
# $y_t > 0.9$ when $(1-\alpha)^{t+1} < 0.1$, that is $t + 1 > \ln 10 / (-\ln(1-\alpha))$: for
# $\alpha = 0.1$, $t + 1 > 21.9$, so $t = 21$; for $\alpha = 0.01$, $t + 1 > 229.1$, so $t = 229$.
# Ten times less input weight costs about ten times the delay ($\ln 10 / \alpha$ for small $\alpha$).
# ### END SOLUTION

# %%
import torch

from megalodon_lite.ema import ema_kernel, ema_recurrence, fft_causal_conv
from megalodon_lite.exercises import check

step_input = torch.ones(1, 400, 2, dtype=torch.float64)
step_response = ema_recurrence(step_input, torch.tensor([0.1, 0.01], dtype=torch.float64))[0]
print("first t with y_t > 0.9, for alpha = 0.1 and 0.01:",
      [int((step_response[:, d] > 0.9).nonzero()[0]) for d in range(2)])

# %% [markdown]
# **2. Derive.** Show that the kernel's weights up to lag $t$ sum to $1 - (1-\alpha)^{t+1}$, and
# that its mean lag $\sum_{j \ge 0} j\, k_j$ is $(1-\alpha)/\alpha$. What are the mean lag and the
# half-life $\ln 2 / (-\ln(1-\alpha))$ for $\alpha = 0.05$?
#
# ### BEGIN SOLUTION
# A geometric sum: $\sum_{j=0}^{t} \alpha r^j = \alpha \frac{1 - r^{t+1}}{1 - r}$ with $r = 1 - \alpha$,
# and $1 - r = \alpha$, so the sum is $1 - (1-\alpha)^{t+1}$. Differentiating
# $\sum_j r^j = \frac{1}{1-r}$ gives $\sum_j j r^{j} = \frac{r}{(1-r)^2}$, so
# $\sum_j j\, \alpha r^j = \frac{\alpha (1-\alpha)}{\alpha^2} = \frac{1-\alpha}{\alpha}$. For
# $\alpha = 0.05$: a mean lag of 19 steps, and a half-life of $0.693 / 0.0513 = 13.5$ steps (the
# mean lies past the half-life: the long tail pulls it out).
# ### END SOLUTION

# %% [markdown]
# **3. Write the kernel.** `my_ema_kernel(alpha, length)` returns $k_j = \alpha(1-\alpha)^j$ for
# $j = 0, \dots, L-1$: shape (D, L) for `alpha` of shape (D,), in `alpha`'s dtype. The check compares
# it with `megalodon_lite.ema.ema_kernel`.

# %%
def my_ema_kernel(alpha: torch.Tensor, length: int) -> torch.Tensor:
    """(D,) smoothing factors in (0, 1) -> (D, length) kernel k[d, j] = alpha_d (1 - alpha_d)^j."""
    ### BEGIN SOLUTION
    lags = torch.arange(length, dtype=alpha.dtype, device=alpha.device)
    return alpha[:, None] * torch.exp(lags * torch.log1p(-alpha)[:, None])
    ### END SOLUTION


# %% tags=["check"]
def kernel_inputs(generator: torch.Generator) -> tuple[torch.Tensor, int]:
    channels, length = int(torch.randint(1, 9, (), generator=generator)), int(torch.randint(1, 300, (), generator=generator))
    return torch.rand(channels, generator=generator, dtype=torch.float64) * 0.98 + 0.01, length


check(my_ema_kernel, reference=ema_kernel, make_inputs=kernel_inputs,
      hint="alpha[:, None] * (1 - alpha[:, None]) ** j, with j = torch.arange(length) as a row")

# %% [markdown]
# **4. Write the FFT convolution.** `my_fft_causal_conv(x, kernel)` computes
# $y_{b,t,d} = \sum_{j \le t} k_{d,j}\, x_{b,t-j,d}$ for `x` of shape (B, L, D) and `kernel` of shape
# (D, L) with `torch.fft.rfft` / `irfft`, in $O(L \log L)$. The check compares it with
# `megalodon_lite.ema.fft_causal_conv` (which also rounds the FFT length up to a fast size; any
# $n \ge 2L - 1$ gives the same numbers up to rounding).

# %%
def my_fft_causal_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, L, D) input and (D, L) kernel -> (B, L, D) causal convolution along the length."""
    ### BEGIN SOLUTION
    length = x.shape[1]
    n = 2 * length                                     # zero-padding: no wrap-around into the past
    x_freq = torch.fft.rfft(x, n=n, dim=1)             # (B, n // 2 + 1, D)
    kernel_freq = torch.fft.rfft(kernel, n=n, dim=1)   # (D, n // 2 + 1)
    return torch.fft.irfft(x_freq * kernel_freq.T, n=n, dim=1)[:, :length]
    ### END SOLUTION


# %% tags=["check"]
def convolution_inputs(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, channels = (int(n) for n in torch.randint(1, 40, (3,), generator=generator))
    x = torch.randn(batch, length, channels, generator=generator, dtype=torch.float64)
    return x, torch.randn(channels, length, generator=generator, dtype=torch.float64)


check(my_fft_causal_conv, reference=fft_causal_conv, make_inputs=convolution_inputs,
      hint="pad both signals to n >= 2L - 1 (rfft(..., n=n)); with n = L the convolution is circular and the "
           "future leaks into the past")
