"""megalodon_lite.mega_ema: MEGA's damped multi-dimensional EMA against its float64 recurrence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.mega_ema import DampedEMA, damped_ema_fft, damped_ema_kernel, damped_ema_recurrence
from test_ema import fft_error_bound  # tests/ is on sys.path under pytest's default import mode

SHAPES = st.tuples(st.integers(1, 3), st.integers(1, 48), st.integers(1, 5), st.integers(1, 6))  # B, L, D, N


def random_coefficients(d: int, n: int, generator: torch.Generator, dtype=torch.float64) -> list[torch.Tensor]:
    """α, δ in (0, 1), β and η of both signs, each (D, N)."""
    alpha = torch.sigmoid(torch.randn(d, n, generator=generator, dtype=dtype))
    delta = torch.sigmoid(torch.randn(d, n, generator=generator, dtype=dtype))
    beta = torch.randn(d, n, generator=generator, dtype=dtype)
    eta = torch.randn(d, n, generator=generator, dtype=dtype) / math.sqrt(n)
    return [alpha, delta, beta, eta]


def closed_form_kernel(alpha, delta, beta, eta, length):
    """k[d, t] = Σ_n η α β (1 − αδ)^t by explicit integer powers, float64."""
    t = torch.arange(length, dtype=torch.float64)
    return ((eta * alpha * beta)[..., None] * (1 - alpha * delta)[..., None] ** t).sum(1)


@settings(max_examples=10, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1))
def test_kernel_equals_closed_form_and_impulse_response(shape, seed):
    _, length, d, n = shape
    g = torch.Generator().manual_seed(seed)
    coeffs = random_coefficients(d, n, g)
    kernel = damped_ema_kernel(*coeffs, length)
    impulse = torch.zeros(1, length, d, dtype=torch.float64)
    impulse[:, 0] = 1.0
    response, _ = damped_ema_recurrence(impulse, *coeffs)
    # float64 throughout: the three sum the same N terms, differences are rounding (~1e-16 each).
    torch.testing.assert_close(kernel, closed_form_kernel(*coeffs, length), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel, response[0].T, rtol=1e-12, atol=1e-12)
    # Gradients with respect to all four coefficients, against the closed form's (float64).
    leaves = [c.clone().requires_grad_() for c in coeffs]
    cotangent = torch.randn(kernel.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((damped_ema_kernel(*leaves, length) * cotangent).sum(), leaves)
    grads_ref = torch.autograd.grad((closed_form_kernel(*leaves, length) * cotangent).sum(), leaves)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1), with_state=st.booleans())
def test_fft_float32_matches_float64_recurrence_forward_and_gradients(shape, seed, with_state):
    b, length, d, n = shape
    g = torch.Generator().manual_seed(seed)
    coeffs64 = [c.requires_grad_() for c in random_coefficients(d, n, g)]
    x64 = torch.randn(b, length, d, generator=g, dtype=torch.float64, requires_grad=True)
    h064 = torch.randn(b, d, n, generator=g, dtype=torch.float64, requires_grad=True) if with_state else None
    leaves64 = [x64, *coeffs64] + ([h064] if with_state else [])
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    x32, coeffs32, h032 = leaves32[0], leaves32[1:5], (leaves32[5] if with_state else None)

    y_ref, h_ref = damped_ema_recurrence(x64, *coeffs64, h0=h064)
    y, h = damped_ema_fft(x32, *coeffs32, h0=h032)
    assert y.dtype == torch.float32 and y.shape == (b, length, d) and h.shape == (b, d, n)
    # float32 FFT over <= 2*48 points: relative error ~ 1e-7 * log2(96) of the signal; 1e-4 leaves room.
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)

    # Random cotangents on both outputs, so every gradient path is exercised.
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), leaves64)
    grads = torch.autograd.grad((y * gy.float()).sum() + (h * gh.float()).sum(), leaves32)
    for got, want in zip(grads, grads_ref):
        # gradients of coefficients sum over B*L*N terms: scale the tolerance with their size.
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * max(1.0, want.abs().max().item()))


@settings(max_examples=10, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_pieces_equal_whole(shape, seed, data):
    b, length, d, n = shape
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = DampedEMA(d, n).double()
    x = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, d, n, generator=g, dtype=torch.float64)
    cuts = sorted(data.draw(st.sets(st.integers(1, length - 1), max_size=4)) if length > 1 else [])
    with torch.no_grad():
        y_whole, h_whole = layer(x, h0)
        pieces, state = [], h0
        for start, end in zip([0, *cuts], [*cuts, length]):
            y_piece, state = layer(x[:, start:end], state)
            pieces.append(y_piece)
    # float64 FFTs of different lengths round differently at ~1e-16 * magnitude * log L.
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, h_whole, rtol=1e-10, atol=1e-10)


def test_layer_matches_float64_reference_forward_and_gradients():
    torch.manual_seed(0)
    b, length, d, n = 2, 37, 6, 16
    layer = DampedEMA(d, n)
    x = torch.randn(b, length, d, requires_grad=True)
    h0 = torch.randn(b, d, n, requires_grad=True)
    y, h = layer(x, h0)

    # The reference: MEGA's parameterisation written out, float64 recurrence, skip, SiLU.
    params64 = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    x64, h064 = x.detach().double().requires_grad_(), h0.detach().double().requires_grad_()
    alpha, delta = torch.sigmoid(params64["alpha"]), torch.sigmoid(params64["delta"])
    eta = params64["eta"] / math.sqrt(n)
    ema, h_ref = damped_ema_recurrence(x64, alpha, delta, params64["beta"], eta, h0=h064)
    y_ref = F.silu(ema + params64["omega"] * x64)
    # float32 layer: outputs of order one, 1e-4 is ~100x the float32 FFT rounding.
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)

    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    names = list(params64)
    grads = torch.autograd.grad((y * gy.float()).sum() + (h * gh.float()).sum(),
                                [x, h0, *(dict(layer.named_parameters())[k] for k in names)])
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), [x64, h064, *params64.values()])
    for name, got, want in zip(["x", "h0", *names], grads, grads_ref):
        assert got.abs().max() > 0, name
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * max(1.0, want.abs().max().item()),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@settings(max_examples=10, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]),
       data=st.data())
def test_causality(shape, seed, dtype, data):
    b, length, d, n = shape
    if length < 2:
        return
    cut = data.draw(st.integers(1, length - 1))
    g = torch.Generator().manual_seed(seed)
    coeffs = [c.to(dtype) for c in random_coefficients(d, n, g)]
    x = torch.randn(b, length, d, generator=g, dtype=torch.float64).to(dtype)
    h0 = torch.randn(b, d, n, generator=g, dtype=torch.float64).to(dtype)
    x_changed = x.clone()
    x_changed[:, cut:] = 10 * torch.randn(b, length - cut, d, generator=g, dtype=torch.float64).to(dtype)

    # The recurrence never reads the future: the past outputs are identical, bit for bit.
    y_rec, _ = damped_ema_recurrence(x, *coeffs, h0=h0)
    y_rec_changed, _ = damped_ema_recurrence(x_changed, *coeffs, h0=h0)
    assert torch.equal(y_rec[:, :cut], y_rec_changed[:, :cut])
    assert (y_rec[:, cut:] - y_rec_changed[:, cut:]).abs().max() > 1e-3

    # The FFT form is chapter 01's fft_causal_conv with the kernel below, plus the initial state's
    # term, computed per position without an FFT. Its past may move only by the FFT's rounding,
    # bounded a priori by fft_error_bound for each of the two calls (tests/test_ema.py derives it).
    # Each later per-position operation (adding the state's term; in the layer also ω ⊙ x and the
    # SiLU, whose slope is at most 1.1) may round the two calls' values to neighbouring floats:
    # allow 4 more roundings of the output's size.
    u = torch.finfo(torch.promote_types(dtype, torch.float32)).eps / 2

    def assert_past_moved_by_rounding_only(y, y_changed, kernel, slope=1.0):
        leak = (y[:, :cut] - y_changed[:, :cut]).abs().amax(dim=1)               # (B, D)
        rounding = 4 * u * torch.maximum(y.abs(), y_changed.abs()).amax(dim=1).double()
        bound = slope * (fft_error_bound(x, kernel) + fft_error_bound(x_changed, kernel)) + rounding
        assert (leak <= bound).all(), (leak.max().item(), bound.min().item())
        assert (y[:, cut:] - y_changed[:, cut:]).abs().max() > 1e-3

    y, _ = damped_ema_fft(x, *coeffs, h0=h0)
    y_changed, _ = damped_ema_fft(x_changed, *coeffs, h0=h0)
    assert_past_moved_by_rounding_only(y, y_changed, damped_ema_kernel(*coeffs, length))

    torch.manual_seed(seed)
    layer = DampedEMA(d, n).to(dtype)
    with torch.no_grad():
        (y, _), (y_changed, _) = layer(x, h0), layer(x_changed, h0)
        assert_past_moved_by_rounding_only(y, y_changed, layer.kernel(length), slope=1.1)


def test_low_precision_input_is_computed_in_float32():
    torch.manual_seed(2)
    layer = DampedEMA(4, 4)
    x = torch.randn(2, 64, 4)
    y_bf16, h_bf16 = layer(x.bfloat16())
    y_ref, h_ref = layer(x.bfloat16().float())
    assert y_bf16.dtype == torch.bfloat16 and h_bf16.dtype == torch.float32
    # Only the final cast of y to bfloat16 differs (8 mantissa bits: relative step 2^-8).
    torch.testing.assert_close(y_bf16.float(), y_ref, rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(h_bf16, h_ref)
    # The recurrence follows the same dtype rules, so either form can stand in for the other.
    coeffs = [c.detach() for c in layer.coefficients()]
    (y_fft, h_fft), (y_rec, h_rec) = (form(x.bfloat16(), *coeffs) for form in (damped_ema_fft, damped_ema_recurrence))
    assert y_rec.dtype == y_fft.dtype == torch.bfloat16 and h_rec.dtype == h_fft.dtype == torch.float32
    torch.testing.assert_close(y_rec.float(), y_fft.float(), rtol=2**-7, atol=2**-7)   # bf16 rounding
    torch.testing.assert_close(h_rec, h_fft, rtol=1e-4, atol=1e-4)                     # float32 inside


def test_initialisation_follows_mega():
    torch.manual_seed(3)
    layer = DampedEMA(256, 16)
    beta = layer.beta.detach()
    # β ~ (+1, -1, +1, ...) + N(0, 0.02²): every entry within 0.1 of its sign.
    signs = torch.tensor([1.0, -1.0] * 8)
    assert (beta - signs).abs().max() < 0.1
    # α, δ logits ~ N(0, 0.2²): sample std within 10% of 0.2 over 4096 draws.
    for p in (layer.alpha, layer.delta):
        assert abs(p.std().item() - 0.2) < 0.02 and abs(p.mean().item()) < 0.02
    assert abs(layer.eta.std().item() - 1.0) < 0.1


def test_bad_inputs_raise_clear_errors():
    layer = DampedEMA(4, 3)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(5, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 0, 4))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(2, 5, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([[1.0]])
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, D, N\) = \(2, 4, 3\)"):
        layer(torch.randn(2, 5, 4), torch.randn(2, 4, 4))
    with pytest.raises(TypeError, match="h0 must be a floating-point tensor"):
        layer(torch.randn(2, 5, 4), torch.ones(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="model_dim must be a positive int"):
        DampedEMA(True, 3)
    coeffs = [torch.rand(4, 3) for _ in range(4)]
    with pytest.raises(ValueError, match="eta must have the same shape"):
        damped_ema_fft(torch.randn(1, 5, 4), *coeffs[:3], torch.rand(4, 2))
    with pytest.raises(ValueError, match="alpha must have shape"):
        damped_ema_kernel(torch.rand(4), *coeffs[1:], 5)
    with pytest.raises(ValueError, match="length must be a positive int"):
        damped_ema_kernel(*coeffs, 0)
    with pytest.raises(ValueError, match="ndim must be a positive int"):
        DampedEMA(4, 0)
