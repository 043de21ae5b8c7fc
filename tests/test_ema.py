"""megalodon_lite.ema: the three EMA forms and the shared FFT causal convolution.

Every fast path is compared, forward and backward, with a float64 loop written here from the
definition y_t = alpha * x_t + (1 - alpha) * y_{t-1} (independent of the module's code).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.ema import (
    _next_fast_length,
    ema_convolution,
    ema_fft,
    ema_kernel,
    ema_recurrence,
    fft_causal_conv,
)

FORMS = {"recurrence": ema_recurrence, "convolution": ema_convolution, "fft": ema_fft}
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7


def reference_ema(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """float64 EMA, one time step at a time, straight from the definition. x (B, L, D), alpha (D,)."""
    x, alpha = x.double(), alpha.double()
    y = torch.zeros_like(x[:, 0])
    out = []
    for t in range(x.shape[1]):
        y = alpha * x[:, t] + (1 - alpha) * y
        out.append(y)
    return torch.stack(out, dim=1)


def reference_alpha_derivative(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """float64 dy_t/dalpha per (b, t, d), by differentiating the recurrence:
    s_t = (x_t - y_{t-1}) + (1 - alpha) s_{t-1}, s_{-1} = 0 (each channel sees only its own alpha)."""
    x, alpha = x.double(), alpha.double()
    y = torch.zeros_like(x[:, 0])
    s = torch.zeros_like(x[:, 0])
    out = []
    for t in range(x.shape[1]):
        s = (x[:, t] - y) + (1 - alpha) * s
        y = alpha * x[:, t] + (1 - alpha) * y
        out.append(s)
    return torch.stack(out, dim=1)


def reference_causal_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """float64 y[b, t, d] = sum_{j <= t} kernel[d, j] x[b, t - j, d] by direct summation."""
    x, kernel = x.double(), kernel.double()
    y = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(t + 1):
            y[:, t] += kernel[:, j] * x[:, t - j]
    return y


def random_problem(seed: int, batch: int, length: int, channels: int, dtype=torch.float32):
    """Random x ~ N(0, 1) (never zeros), alpha ~ U(0.02, 0.98), upstream gradient ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen, dtype=torch.float64)
    alpha = torch.rand(channels, generator=gen, dtype=torch.float64) * 0.96 + 0.02
    upstream = torch.randn(batch, length, channels, generator=gen, dtype=torch.float64)
    return x.to(dtype), alpha.to(dtype), upstream.to(dtype)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 70), st.integers(1, 5), st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("form", FORMS)
@settings(max_examples=12, deadline=None)
@given(shape=shapes)
def test_float32_forward_and_gradients_match_float64_reference(form: str, shape) -> None:
    batch, length, channels, seed = shape
    x, alpha, upstream = random_problem(seed, batch, length, channels)
    x.requires_grad_()
    alpha.requires_grad_()
    y = FORMS[form](x, alpha)
    grad_x, grad_alpha = torch.autograd.grad((y * upstream).sum(), (x, alpha))
    assert y.dtype == grad_x.dtype == grad_alpha.dtype == torch.float32

    x64 = x.detach().double().requires_grad_()
    alpha64 = alpha.detach().double().requires_grad_()
    y_ref = reference_ema(x64, alpha64)
    ref_grad_x, ref_grad_alpha = torch.autograd.grad((y_ref * upstream.double()).sum(), (x64, alpha64))

    # Output: y_t is a weighted sum of x with non-negative weights summing to <= 1, so |y| <= max|x|.
    # The recurrence commits ~2 float32 roundings per step, damped by (1 - alpha) afterwards; the
    # Toeplitz sum and the FFT (n <= 160, error ~ log2(n) * eps * ||x||) stay below L * eps * max|x|.
    # Allow 4 * L * eps32 * max|x| (<= 3.4e-5 * max|x| at L = 70).
    tol_y = 4 * length * EPS32 * x.detach().abs().max().item()
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=0, atol=tol_y)
    # grad wrt x is the same EMA run backwards in time on the upstream gradient: same bound.
    tol_gx = 4 * length * EPS32 * upstream.abs().max().item()
    torch.testing.assert_close(grad_x.double(), ref_grad_x, rtol=0, atol=tol_gx)
    # grad wrt alpha_d = sum over (b, t) of upstream * dy/dalpha_d: float32 rounding is relative to
    # the sum of the terms' magnitudes, which we compute in float64 from the differentiated recurrence.
    dy_dalpha = reference_alpha_derivative(x.detach(), alpha.detach())
    torch.testing.assert_close((upstream.double() * dy_dalpha).sum(dim=(0, 1)), ref_grad_alpha)  # helper is right
    magnitude = (upstream.double() * dy_dalpha).abs().sum(dim=(0, 1))          # (D,)
    tol_ga = 8 * length * EPS32 * magnitude + 1e-12
    assert ((grad_alpha.double() - ref_grad_alpha).abs() <= tol_ga).all(), (grad_alpha, ref_grad_alpha, tol_ga)


@settings(max_examples=15, deadline=None)
@given(shape=shapes)
def test_three_forms_agree_in_float64(shape) -> None:
    batch, length, channels, seed = shape
    x, alpha, _ = random_problem(seed, batch, length, channels, dtype=torch.float64)
    expected = reference_ema(x, alpha)
    for name, form in FORMS.items():
        got = form(x, alpha)
        assert got.dtype == torch.float64
        # float64 (eps 2.2e-16), |y| <= max|x| <= ~5, at most 70 terms: 1e-12 leaves a wide margin.
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("length", [1, 5, 12])
def test_gradients_match_finite_differences(form: str, length: int) -> None:
    x, alpha, _ = random_problem(length, 2, length, 3, dtype=torch.float64)
    x.requires_grad_()
    alpha.requires_grad_()
    assert torch.autograd.gradcheck(FORMS[form], (x, alpha))


def test_step_response_is_the_geometric_series() -> None:
    alpha = torch.tensor([0.03, 0.3, 0.9], dtype=torch.float64)
    length = 37
    t = torch.arange(length, dtype=torch.float64)[:, None]
    expected = 1 - (1 - alpha) ** (t + 1)                       # (L, D), by summing alpha * (1 - alpha)^j
    for name, form in FORMS.items():
        got = form(torch.ones(1, length, 3, dtype=torch.float64), alpha)[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-14, msg=name)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    x, alpha, _ = random_problem(7, 2, 300, 4)
    x_bf16 = x.bfloat16()
    expected = reference_ema(x_bf16, alpha)
    for name, form in FORMS.items():
        got = form(x_bf16, alpha)
        assert got.dtype == torch.bfloat16, name
        # Only the final rounding to bfloat16 (relative 2^-8) plus float32 noise; a bfloat16 loop
        # would accumulate ~L roundings of 2^-8 instead.
        err = (got.double() - expected).abs()
        assert (err <= 2**-8 * expected.abs() + 1e-4).all(), (name, err.max())


def test_kernel_matches_powers() -> None:
    alpha = torch.tensor([1e-6, 0.01, 0.5, 0.999], dtype=torch.float64)
    length = 50
    kernel = ema_kernel(alpha, length)
    assert kernel.shape == (4, length) and kernel.dtype == torch.float64
    expected = torch.stack([a * (1 - a) ** torch.arange(length, dtype=torch.float64) for a in alpha])
    torch.testing.assert_close(kernel, expected, rtol=1e-13, atol=0)
    # A float32 alpha gives a float32 kernel; a bfloat16 one is promoted to float32.
    assert ema_kernel(alpha.float(), 3).dtype == torch.float32
    assert ema_kernel(alpha[1:3].bfloat16(), 3).dtype == torch.float32


@settings(max_examples=10, deadline=None)
@given(shape=shapes)
def test_fft_causal_conv_matches_direct_sum_for_any_kernel(shape) -> None:
    batch, length, channels, seed = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen)
    kernel = torch.randn(channels, length, generator=gen, dtype=torch.float64)   # not an EMA kernel
    upstream = torch.randn(batch, length, channels, generator=gen)
    x.requires_grad_()
    kernel.requires_grad_()
    y = fft_causal_conv(x, kernel)
    assert y.dtype == torch.float32                     # x's dtype, although computed in float64
    x64 = x.detach().double().requires_grad_()
    k64 = kernel.detach().clone().requires_grad_()
    y_ref = reference_causal_conv(x64, k64)
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=0,
                               atol=2 * EPS32 * (x.abs().sum(1).max() * kernel.abs().max()).item())
    grads = torch.autograd.grad((y * upstream).sum(), (x, kernel))
    ref_grads = torch.autograd.grad((y_ref * upstream.double()).sum(), (x64, k64))
    # Computed in float64 throughout (kernel is float64), so only the float32 inputs' values matter.
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)


def test_next_fast_length_is_the_smallest_5_smooth_length() -> None:
    def is_5_smooth(n: int) -> bool:
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for n in range(1, 3000):
        m = _next_fast_length(n)
        assert m >= n and is_5_smooth(m)
        assert not any(is_5_smooth(k) for k in range(n, m)), n
    assert _next_fast_length(2 * 65_536) == 131_072
    assert _next_fast_length(2 * 4099) == 8_640       # 2^6 * 3^3 * 5, below the power of two 16_384


def fft_error_bound(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A priori bound on |fft_causal_conv(x, kernel) - exact| for every output of channel (b, d), (B, D).

    An FFT of length n computed in floating point with unit roundoff u has a relative error of at
    most log2(n) * eta in the 2-norm, eta = mu + gamma_4 (sqrt(2) + mu) ~ 6.7 u with accurate
    twiddles (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 24.2). Two
    forward transforms, a pointwise product (|X K| <= |X| * ||k||_1) and one inverse transform
    (1/n) give ||y_hat - y||_2 <= ~(3 * 6.7 log2(n) + 3) u ||x||_2 ||k||_1; we take 20 log2(n) u.
    The 2-norm of a channel's error bounds each of its entries.
    """
    u = torch.finfo(torch.promote_types(torch.promote_types(x.dtype, kernel.dtype), torch.float32)).eps / 2
    n = _next_fast_length(2 * x.shape[1])
    return 20 * math.log2(n) * u * x.double().norm(dim=1) * kernel.double().abs().sum(dim=1)


def perturb_future(x: torch.Tensor, cut: int, generator: torch.Generator) -> torch.Tensor:
    """x with every step from ``cut`` on replaced by new random values of a larger scale."""
    changed = x.clone()
    changed[:, cut:] = 10 * torch.randn(changed[:, cut:].shape, generator=generator, dtype=x.dtype)
    return changed


@settings(max_examples=10, deadline=None)
@given(shape=shapes, dtype=st.sampled_from([torch.float32, torch.float64]), data=st.data())
def test_outputs_are_causal(shape, dtype, data) -> None:
    batch, length, channels, seed = shape
    if length < 2:
        return
    cut = data.draw(st.integers(1, length - 1))
    x, alpha, _ = random_problem(seed, batch, length, channels, dtype=dtype)
    changed = perturb_future(x, cut, torch.Generator().manual_seed(seed + 1))
    # The loop and the Toeplitz product never read the future: the past is identical, bit for bit.
    for name in ("recurrence", "convolution"):
        y, y_changed = FORMS[name](x, alpha), FORMS[name](changed, alpha)
        assert torch.equal(y[:, :cut], y_changed[:, :cut]), name
        assert (y[:, cut:] - y_changed[:, cut:]).abs().max() > 1e-3, name
    # The FFT mixes all n frequencies, so every output carries rounding from every input: the past
    # may move, but by no more than the two calls' rounding errors, each within fft_error_bound.
    # An arbitrary kernel (not a decaying EMA one, whose far taps are tiny) makes any wrap-around
    # of the circular convolution move the past by O(1), far above that bound (~1e-13 in float64).
    gen = torch.Generator().manual_seed(seed + 2)
    kernel = torch.randn(channels, length, generator=gen, dtype=torch.float64).to(dtype)
    for name, fn, k in (("fft_causal_conv", lambda x_: fft_causal_conv(x_, kernel), kernel),
                        ("ema_fft", lambda x_: ema_fft(x_, alpha), ema_kernel(alpha, length))):
        y, y_changed = fn(x), fn(changed)
        leak = (y[:, :cut] - y_changed[:, :cut]).abs().amax(dim=1)                # (B, D)
        bound = fft_error_bound(x, k) + fft_error_bound(changed, k)
        assert (leak <= bound).all(), (name, leak.max().item(), bound.min().item())
        assert (y[:, cut:] - y_changed[:, cut:]).abs().max() > 1e-3, name


def test_padding_to_less_than_2L_minus_1_would_leak() -> None:
    """The causality test's bound can fail: a circular FFT of length 2L - 2 wraps one tap around."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 2, generator=gen, dtype=torch.float64)
    kernel = torch.randn(2, 20, generator=gen, dtype=torch.float64)
    changed = perturb_future(x, 10, gen)
    n = 2 * 20 - 2

    def short_fft(x_: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(x_, n=n, dim=1) * torch.fft.rfft(kernel, n=n, dim=1).T
        return torch.fft.irfft(spectrum, n=n, dim=1)[:, :20]

    leak = (short_fft(x) - short_fft(changed))[:, :10].abs().amax(dim=1)
    assert (leak > 1e3 * (fft_error_bound(x, kernel) + fft_error_bound(changed, kernel))).any()


# ---- bad input ---------------------------------------------------------------------------------

X = torch.randn(2, 6, 3)
ALPHA = torch.tensor([0.2, 0.5, 0.7])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad_alpha", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_alpha_outside_open_unit_interval_is_refused(form: str, bad_alpha: float) -> None:
    alpha = ALPHA.clone()
    alpha[1] = bad_alpha
    with pytest.raises(ValueError, match=r"alpha must lie strictly inside \(0, 1\)"):
        FORMS[form](X, alpha)
    with pytest.raises(ValueError, match=r"alpha must lie strictly inside \(0, 1\)"):
        ema_kernel(alpha, 4)


@pytest.mark.parametrize("form", FORMS)
def test_bad_shapes_and_dtypes_are_refused(form: str) -> None:
    fn = FORMS[form]
    with pytest.raises(ValueError, match=r"alpha must have shape \(D,\) = \(3,\)"):
        fn(X, torch.tensor([0.2, 0.5]))                       # one channel short: no broadcasting
    with pytest.raises(ValueError, match=r"alpha must have shape \(D,\) = \(3,\)"):
        fn(X, ALPHA[None])                                    # (1, D)
    with pytest.raises(ValueError, match=r"alpha must have shape"):
        fn(X[..., :1], torch.tensor(0.5))                     # 0-dim alpha is not (1,)
    with pytest.raises(TypeError, match="alpha must have a real floating dtype"):
        fn(X, torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match="x must have a real floating dtype, got torch.int64"):
        fn(torch.ones(2, 6, 3, dtype=torch.int64), ALPHA)
    with pytest.raises(TypeError, match="x must have a real floating dtype, got torch.complex64"):
        fn(torch.ones(2, 6, 3, dtype=torch.complex64), ALPHA)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, D\), got 2 dims"):
        fn(X[0], ALPHA)
    with pytest.raises(ValueError, match=r"x must hold at least one time step"):
        fn(X[:, :0], ALPHA)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fn(X.tolist(), ALPHA)
    with pytest.raises(TypeError, match="alpha must be a torch.Tensor"):
        fn(X, [0.2, 0.5, 0.7])


def test_bad_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match=r"kernel must have shape \(D, L\) = \(3, 6\)"):
        fft_causal_conv(X, torch.rand(3, 5))                  # one tap short: no silent padding
    with pytest.raises(ValueError, match=r"kernel must have shape \(D, L\) = \(3, 6\)"):
        fft_causal_conv(X, torch.rand(3, 7))                  # one tap long: no silent truncation
    with pytest.raises(ValueError, match=r"kernel must have shape \(D, L\) = \(3, 6\)"):
        fft_causal_conv(X, torch.rand(6, 3))                  # transposed
    with pytest.raises(TypeError, match="kernel must have a real floating dtype"):
        fft_causal_conv(X, torch.ones(3, 6, dtype=torch.int32))
    with pytest.raises(TypeError, match="kernel must have a real floating dtype"):
        fft_causal_conv(X, torch.ones(3, 6, dtype=torch.complex64))


def test_bad_kernel_length_argument_is_refused() -> None:
    with pytest.raises(ValueError, match="length must be >= 1, got 0"):
        ema_kernel(ALPHA, 0)
    with pytest.raises(TypeError, match="length must be an int, got float"):
        ema_kernel(ALPHA, 4.0)


# ---- CUDA (skipped on machines without one) ----------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", FORMS)
def test_cuda_matches_float64_reference(form: str) -> None:
    x, alpha, upstream = random_problem(11, 2, 333, 4)
    expected = reference_ema(x, alpha)
    alpha_cuda = alpha.cuda().requires_grad_()
    x_cuda = x.cuda().requires_grad_()
    y = FORMS[form](x_cuda, alpha_cuda)
    assert y.device.type == "cuda" and y.dtype == torch.float32
    # Same bound as the CPU test: 4 * L * eps32 * max|x|.
    torch.testing.assert_close(y.double().cpu(), expected, rtol=0, atol=4 * 333 * EPS32 * x.abs().max().item())
    grad_x, = torch.autograd.grad((y * upstream.cuda()).sum(), x_cuda)
    x64 = x.double().requires_grad_()
    ref_grad_x, = torch.autograd.grad((reference_ema(x64, alpha) * upstream.double()).sum(), x64)
    torch.testing.assert_close(grad_x.double().cpu(), ref_grad_x, rtol=0,
                               atol=4 * 333 * EPS32 * upstream.abs().max().item())
    # bfloat16 input: computed in float32, so only the final rounding (relative 2^-8) remains.
    x_bf16 = x.bfloat16()
    got = FORMS[form](x_bf16.cuda(), alpha.cuda())
    assert got.dtype == torch.bfloat16
    expected_bf16 = reference_ema(x_bf16, alpha)
    assert ((got.double().cpu() - expected_bf16).abs() <= 2**-8 * expected_bf16.abs() + 1e-4).all()
    with pytest.raises(ValueError, match="alpha must be on x's device"):
        FORMS[form](x.cuda(), alpha)
