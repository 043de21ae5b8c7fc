"""megalodon_lite.cema: the three CEMA forms against an independent float64 recurrence.

The reference below recomputes the coefficients from the raw parameters itself (it does not call
cema_coefficients) and steps the complex recurrence in float64/complex128, so autograd through it
gives reference gradients for x, h0 and every parameter.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.cema import CEMA, cema_chunked, cema_coefficients, cema_fft, cema_powers, cema_recurrence

FORMS = ("recurrence", "fft", "chunked")
F32_EPS = 2.0**-24  # float32 unit roundoff
BF16_EPS = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)


def reference_cema(x, alpha, delta, theta, gamma, omega, h0=None):
    """y_t = Re(sum_n gamma_n h_t,n) + omega x_t, h_t = q h_{t-1} + p x_t, all in float64/complex128."""
    x, alpha, delta, theta, gamma, omega = (t.double() for t in (x, alpha, delta, theta, gamma, omega))
    model_dim, cema_ndim = alpha.shape[:2]
    p = torch.sigmoid(alpha[..., 0])
    angle = torch.sigmoid(theta[:, 0]) * (2 * math.pi / cema_ndim) * torch.arange(1, cema_ndim + 1, dtype=torch.float64)
    q = (1 - p * torch.sigmoid(delta[..., 0])) * (torch.cos(angle) + 1j * torch.sin(angle))
    g = (gamma[..., 0] + 1j * gamma[..., 1]) / math.sqrt(cema_ndim)
    h = torch.zeros(x.shape[0], model_dim, cema_ndim, dtype=torch.complex128) if h0 is None else h0.to(torch.complex128)
    ys = []
    for t in range(x.shape[1]):
        h = q * h + p * x[:, t, :, None]
        ys.append((g * h).real.sum(-1) + omega * x[:, t])
    return torch.stack(ys, dim=1), h


def random_layer(model_dim: int, cema_ndim: int, generator: torch.Generator, slow: bool = False) -> CEMA:
    """A layer with every parameter random and non-zero (gamma_im too, which the official init zeroes).

    slow=True pushes |q| close to 1 (sigma(alpha) sigma(delta) around 1e-3): long memory.
    """
    layer = CEMA(model_dim, cema_ndim)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
        if slow:
            layer.alpha.copy_(-3.0 + 0.3 * torch.randn(layer.alpha.shape, generator=generator))
            layer.delta.copy_(-4.0 + 0.3 * torch.randn(layer.delta.shape, generator=generator))
    return layer


def loss_and_grads(layer: CEMA, x: torch.Tensor, h0: torch.Tensor | None, run) -> tuple[torch.Tensor, ...]:
    """Outputs and gradients of a random linear functional of (y, h_last) wrt x, h0 and every parameter."""
    x = x.detach().clone().requires_grad_(True)
    h0 = None if h0 is None else h0.detach().clone().requires_grad_(True)
    y, h_last = run(layer, x, h0)
    generator = torch.Generator().manual_seed(1)
    w_y = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    w_h = torch.randn(h_last.shape, generator=generator, dtype=torch.complex128)
    loss = (y.double() * w_y).sum() + (h_last.to(torch.complex128) * w_h.conj()).real.sum()
    inputs = [x] + ([] if h0 is None else [h0]) + list(layer.parameters())
    return (y.detach(), h_last.detach()) + torch.autograd.grad(loss, inputs)


def run_reference(layer, x, h0):
    return reference_cema(x, layer.alpha, layer.delta, layer.theta, layer.gamma, layer.omega, h0)


def assert_close_to_reference(actual, expected, rel: float, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    err = (actual.to(expected.dtype) - expected).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.1e} x scale {scale:.2f}"


SHAPES = dict(batch=st.integers(1, 3), length=st.integers(1, 130), model_dim=st.integers(1, 5),
              cema_ndim=st.integers(1, 9), chunk_size=st.integers(1, 40), with_h0=st.booleans(),
              seed=st.integers(0, 2**31 - 1))


def _forms_and_reference(method, batch, length, model_dim, cema_ndim, chunk_size, with_h0, seed, dtype):
    """(names, got, want, float32-recurrence-or-None) for one random case, computed in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    layer = random_layer(model_dim, cema_ndim, generator).to(dtype)
    layer.chunk_size = chunk_size
    x = torch.randn(batch, length, model_dim, generator=generator).to(dtype)
    complex_ = torch.complex128 if dtype == torch.float64 else torch.complex64
    h0 = torch.randn(batch, model_dim, cema_ndim, dtype=complex_, generator=generator) if with_h0 else None
    got = loss_and_grads(layer, x, h0, lambda m, x_, h_: m(x_, h_, method=method))
    want = loss_and_grads(layer, x, h0, run_reference)
    names = ["y", "h_last", "grad x"] + (["grad h0"] if with_h0 else []) + [f"grad {n}" for n, _ in layer.named_parameters()]
    return names, got, want, layer, x, h0


@pytest.mark.parametrize("method", FORMS)
@settings(max_examples=6, deadline=None)
@given(**SHAPES)
def test_each_form_matches_float64_reference_forward_and_backward(method, **case):
    """Every form, run in float64, equals the independent reference: outputs, final state, and the
    gradients of x, h0 and every raw parameter. float64 isolates the algorithm from float32's
    conditioning (d/d theta sums terms ~ N t |q|^t that cancel; see the float32 test below)."""
    names, got, want, *_ = _forms_and_reference(method, **case, dtype=torch.float64)
    # sums of at most a few thousand terms of size <= 1e3 (t |q|^t), each rounded to 2^-53 ~ 1e-16
    for name, a, b in zip(names, got, want, strict=True):
        assert_close_to_reference(a, b, 1e-9, f"{method} float64 {name}")


@pytest.mark.parametrize("method", ("fft", "chunked"))
@settings(max_examples=6, deadline=None)
@given(**SHAPES)
def test_float32_forms_are_as_accurate_as_the_float32_recurrence(method, **case):
    """In float32 the fast forms lose no more accuracy than the definition stepped in float32.

    The tolerance is relative to the float32 recurrence's own error against float64, because that
    error is set by the conditioning of each quantity (a theta gradient near |q| = 1 sums terms of
    size N/(1-|q|)^2 that cancel), not by the algorithm; an algorithmic error would be O(1).
    """
    names, got, want, *_ = _forms_and_reference(method, **case, dtype=torch.float32)
    _, base, *_ = _forms_and_reference("recurrence", **case, dtype=torch.float32)
    for name, a, b, r in zip(names, got, want, base, strict=True):
        scale = max(1.0, b.abs().max().item())
        base_err = (r.to(b.dtype) - b).abs().max().item()
        err = (a.to(b.dtype) - b).abs().max().item()
        # 16x the recurrence's error (FFT round-off grows like log L; 300 random cases reached 6x),
        # plus 2e-6 of the scale for the cases where the recurrence happens to be nearly exact
        assert err <= 16 * base_err + 2e-6 * scale, f"{method} float32 {name}: {err:.2e} vs recurrence {base_err:.2e}"


def float64_of_float32_coefficients(layer: CEMA) -> tuple[torch.Tensor, ...]:
    """The layer's float32 coefficients, exactly, in float64 (isolates the algorithms' round-off).

    With |q| near 1 the output is ill-conditioned in q (d h / d q ~ memory^1.5), so comparing with
    coefficients recomputed in float64 would mostly measure the rounding of q itself, not the forms.
    """
    p, q, gamma = layer.coefficients()
    return p.detach().double(), q.detach().to(torch.complex128), gamma.detach().to(torch.complex128), \
        layer.omega.detach().double()


def test_forms_agree_on_a_longer_sequence_with_state():
    generator = torch.Generator().manual_seed(0)
    layer = random_layer(6, 16, generator, slow=True)
    x = torch.randn(2, 1000, 6, generator=generator)
    h0 = torch.randn(2, 6, 16, dtype=torch.complex64, generator=generator)
    y_ref, h_ref = cema_recurrence(x.double(), *float64_of_float32_coefficients(layer), h0.to(torch.complex128))
    with torch.no_grad():
        for method in FORMS:
            y, h = layer(x, h0, method=method)
            assert y.dtype == torch.float32 and h.dtype == torch.complex64
            # long memory (|q| ~ 0.999): sums of ~1e3 O(1) terms in float32, hence 1e-4 of the scale
            assert_close_to_reference(y, y_ref, 1e-4, f"{method} y")
            assert_close_to_reference(h, h_ref, 1e-4, f"{method} h_last")


def test_functional_forms_take_coefficients_and_return_states():
    generator = torch.Generator().manual_seed(3)
    layer = random_layer(3, 4, generator)
    p, q, gamma = layer.coefficients()
    assert p.dtype == torch.float32 and q.dtype == torch.complex64 and gamma.dtype == torch.complex64
    assert p.shape == q.shape == gamma.shape == (3, 4)
    x = torch.randn(2, 37, 3, generator=generator)
    outputs = [form(x, p, q, gamma, layer.omega) for form in (cema_recurrence, cema_fft, cema_chunked)]
    for y, h in outputs[1:]:
        torch.testing.assert_close(y, outputs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, outputs[0][1], rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_streaming_in_random_pieces_equals_one_call(data, seed):
    generator = torch.Generator().manual_seed(seed)
    length = data.draw(st.integers(2, 200), label="length")
    cuts = sorted(data.draw(st.sets(st.integers(1, length - 1), max_size=6), label="cuts"))
    method = data.draw(st.sampled_from(("auto",) + FORMS), label="method")
    layer = random_layer(3, 5, generator)
    layer.chunk_size = data.draw(st.integers(1, 32), label="chunk_size")
    x = torch.randn(2, length, 3, generator=generator)
    with torch.no_grad():
        y_whole, h_whole = layer(x, method=method)
        pieces, h = [], None
        for start, stop in zip([0] + cuts, cuts + [length]):
            y, h = layer(x[:, start:stop], h, method=method)
            pieces.append(y)
    # float32 round-off of two differently ordered computations of the same sums
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", FORMS)
def test_causal_output_at_t_ignores_later_inputs(method):
    generator = torch.Generator().manual_seed(5)
    layer = random_layer(4, 6, generator)
    layer.chunk_size = 16
    x = torch.randn(2, 90, 4, generator=generator)
    t0 = 41  # inside a chunk, so the Toeplitz block's upper triangle is exercised
    x_changed = x.clone()
    x_changed[:, t0:] += 10 * torch.randn(x[:, t0:].shape, generator=generator)
    with torch.no_grad():
        y, _ = layer(x, method=method)
        y_changed, _ = layer(x_changed, method=method)
    if method == "fft":
        # the FFT mixes every position and then cancels: round-off of ~eps log2(n) x the largest |y|
        # (up to ~30 here) lands everywhere, so earlier outputs move by rounding, not by more
        torch.testing.assert_close(y_changed[:, :t0], y[:, :t0], rtol=0, atol=1e-5)
    else:
        # the recurrence and the Toeplitz blocks never read a later input (the upper triangle
        # multiplies it by an exact 0): earlier outputs are bit for bit the same
        assert torch.equal(y_changed[:, :t0], y[:, :t0])
    assert (y_changed[:, t0] - y[:, t0]).abs().max() > 1e-2  # the change is visible where it starts


def test_powers_stay_accurate_at_large_t():
    generator = torch.Generator().manual_seed(7)
    layer = random_layer(4, 16, generator, slow=True)
    _, q, _ = layer.coefficients()
    length = 20_000
    got = cema_powers(q, length)
    assert got.dtype == torch.complex64 and got.shape == (4, 16, length)
    exact = torch.exp(torch.log(q.to(torch.complex128))[..., None] * torch.arange(length, dtype=torch.float64))
    # the exact powers of the stored float32 q: the exponent is formed in float64, so what is left is
    # rounding magnitude and phase to float32 and the float32 polar, a few eps relative at every t
    # (a float32 exponent t log q would be off by ~t eps |theta|, i.e. ~1e-2 here)
    relative = (got.to(torch.complex128) - exact).abs() / exact.abs()
    assert relative.max() < 8 * F32_EPS
    assert (got.abs() <= 1).all()


def test_powers_never_hold_a_complex128_tensor_of_length_l():
    """cema_powers of complex64 q forms only (D, N) complex128 values; the (D, N, L) work is real."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest_complex128 = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.complex128:
                    self.largest_complex128 = max(self.largest_complex128, t.numel())
            return out

    generator = torch.Generator().manual_seed(8)
    _, q, _ = random_layer(3, 5, generator).coefficients()
    with Record() as record:
        powers = cema_powers(q, 64)
    assert powers.dtype == torch.complex64 and powers.shape == (3, 5, 64)
    assert 0 < record.largest_complex128 <= q.numel()


@pytest.mark.parametrize("method", ("auto", "fft"))
def test_bf16_at_16k_tokens_is_finite_and_matches_float32(method):
    generator = torch.Generator().manual_seed(11)
    layer = random_layer(4, 16, generator, slow=True)  # |q| close to 1: the state remembers ~1e3 tokens
    x = torch.randn(1, 16_384, 4, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        y_bf16, h_bf16 = layer(x, method=method)
        y_fp32, h_fp32 = layer(x.float(), method=method)
        y_f64, _ = cema_fft(x.double(), *float64_of_float32_coefficients(layer))
    assert y_bf16.dtype == torch.bfloat16 and h_bf16.dtype == torch.complex64
    assert torch.isfinite(y_bf16.float()).all() and torch.isfinite(torch.view_as_real(h_bf16)).all()
    # Everything inside runs in float32 on the (already bf16) input, so the bf16 output is the float32
    # output rounded once: relative error <= 2^-8 (values near zero: bf16's absolute spacing there).
    err = (y_bf16.float() - y_fp32).abs()
    assert (err <= BF16_EPS * y_fp32.abs() + 1e-30).all()
    assert torch.equal(h_bf16, h_fp32)
    # and the float32 result over 16K tokens stays close to float64 (no drift in the carried state):
    # FFT round-off is ~eps log2(n) sum|k| max|x| with a kernel summing ~1e3 taps here (observed
    # ~5e-5 of the output scale for the FFT, ~2e-5 for the chunked form); a drifting state would be O(1).
    assert_close_to_reference(y_fp32, y_f64, 2e-4, f"{method} float32 vs float64 at 16K")


def test_autocast_does_not_lower_the_internal_precision():
    generator = torch.Generator().manual_seed(13)
    layer = random_layer(4, 8, generator, slow=True)
    x = torch.randn(2, 300, 4, generator=generator)
    with torch.no_grad():
        y, h = layer(x, method="chunked")
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            y_auto, h_auto = layer(x, method="chunked")
            y_fft_auto, _ = layer(x, method="fft")
        y_fft, _ = layer(x, method="fft")
    assert y_auto.dtype == torch.float32 and h_auto.dtype == torch.complex64
    # the same float32 computation with or without autocast (bf16 matmuls would be ~1e-2 off)
    torch.testing.assert_close(y_auto, y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_fft_auto, y_fft, rtol=1e-6, atol=1e-6)


def test_bf16_parameters_still_compute_in_float32():
    generator = torch.Generator().manual_seed(17)
    layer = random_layer(3, 4, generator).to(torch.bfloat16)
    p, q, gamma = layer.coefficients()
    assert p.dtype == torch.float32 and q.dtype == torch.complex64 and gamma.dtype == torch.complex64
    y, h = layer(torch.randn(1, 20, 3, generator=generator).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and h.dtype == torch.complex64 and torch.isfinite(y.float()).all()


def test_official_initialisation():
    torch.manual_seed(0)
    model_dim, cema_ndim = 512, 16
    layer = CEMA(model_dim, cema_ndim)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"alpha": (512, 16, 1), "delta": (512, 16, 1), "theta": (512, 1, 1), "gamma": (512, 16, 2),
                      "omega": (512,)}
    # theta = logit(D^{-m/D}) for a permutation m of 1..D
    base = torch.sigmoid(layer.theta.detach().double().view(-1))
    m = torch.arange(1, model_dim + 1, dtype=torch.float64)
    torch.testing.assert_close(base.sort().values, (model_dim ** (-m / model_dim)).sort().values, rtol=1e-5, atol=0)
    assert not torch.equal(base, base.sort().values) and not torch.equal(base, base.sort(descending=True).values)
    for name in ("alpha", "delta"):
        values = getattr(layer, name).detach()
        assert abs(values.mean().item()) < 0.02 and abs(values.std().item() - 0.2) < 0.01, name  # 8192 samples
    gamma = layer.gamma.detach()
    assert torch.equal(gamma[..., 1], torch.zeros_like(gamma[..., 1]))
    assert abs(gamma[..., 0].std().item() - 1.0) < 0.03
    omega = layer.omega.detach()
    assert omega.abs().max() <= 1.0 and 0.2 < omega.std().item() < 0.26  # TruncNormal(0, 0.25, [-1, 1])
    assert torch.isfinite(CEMA(1, 4).theta).all()  # D = 1 would give logit(1) = inf without the clamp


def test_auto_uses_the_recurrence_for_single_token_steps():
    generator = torch.Generator().manual_seed(19)
    layer = random_layer(3, 4, generator)
    x = torch.randn(2, 1, 3, generator=generator)
    h0 = torch.randn(2, 3, 4, dtype=torch.complex64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, h0), layer(x, h0, method="recurrence"), rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    layer = CEMA(4, 3)
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(10, 4))
    with pytest.raises(ValueError, match="D=4"):
        layer(torch.randn(2, 10, 5))
    with pytest.raises(ValueError, match="method"):
        layer(x, method="scan")
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, D, N\)"):
        layer(x, torch.zeros(2, 4, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"h0 must have shape"):
        layer(x, torch.zeros(1, 4, 3, dtype=torch.complex64))
    for wrong in (torch.zeros(2, 4, 3), torch.zeros(2, 4, 3, dtype=torch.complex128)):
        with pytest.raises(TypeError, match="h0 must be a torch.complex64"):
            layer(x, wrong)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 10, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one time step"):
        layer(torch.randn(2, 0, 4))
    p, q, gamma = layer.coefficients()
    with pytest.raises(ValueError, match="chunk_size"):
        cema_chunked(x, p, q, gamma, layer.omega, chunk_size=0)
    with pytest.raises(ValueError, match="omega"):
        cema_fft(x, p, q, gamma, layer.omega[:3])
    with pytest.raises(ValueError, match="gamma"):
        cema_recurrence(x, p, q, gamma[:, :2], layer.omega)
    with pytest.raises(ValueError, match="delta"):
        cema_coefficients(layer.alpha, layer.delta[:, :2], layer.theta, layer.gamma)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="model_dim"):
            CEMA(bad)


def test_wrong_types_and_dtypes_raise_type_error():
    """A non-tensor or a tensor of the wrong dtype is a TypeError naming the argument."""
    layer = CEMA(4, 3)
    x = torch.randn(2, 10, 4)
    p, q, gamma = layer.coefficients()
    omega = layer.omega.detach()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer(x.tolist())
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(x.to(torch.complex64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        cema_fft(x.numpy(), p, q, gamma, omega)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        cema_chunked(x.int(), p, q, gamma, omega)
    with pytest.raises(TypeError, match="p must be a floating-point tensor"):
        cema_recurrence(x, p.to(torch.complex64), q, gamma, omega)
    with pytest.raises(TypeError, match="q must be a complex tensor"):
        cema_recurrence(x, p, q.real, gamma, omega)
    with pytest.raises(TypeError, match="q must be torch.complex64"):
        cema_recurrence(x, p, q.to(torch.complex128), gamma, omega)
    with pytest.raises(TypeError, match="gamma must be torch.complex64"):
        cema_fft(x, p, q, gamma.to(torch.complex128), omega)
    with pytest.raises(TypeError, match="omega must be a torch.Tensor"):
        cema_fft(x, p, q, gamma, [0.0] * 4)
    with pytest.raises(TypeError, match="omega must be a floating-point tensor"):
        cema_chunked(x, p, q, gamma, omega.long())
    with pytest.raises(TypeError, match="h0 must be a torch.complex64"):
        layer(x, torch.zeros(2, 4, 3, dtype=torch.complex64).tolist())
    with pytest.raises(TypeError, match="alpha must be a floating-point tensor"):
        cema_coefficients(layer.alpha.long(), layer.delta, layer.theta, layer.gamma)
    with pytest.raises(TypeError, match="gamma must be a torch.Tensor"):
        cema_coefficients(layer.alpha, layer.delta, layer.theta, None)
    with pytest.raises(TypeError, match="q must be a complex tensor"):
        cema_powers(q.abs(), 5)
    with pytest.raises(ValueError, match="length"):
        cema_powers(q, -1)


def test_gradients_stay_finite_where_short_memory_powers_underflow():
    """A short memory's powers |q|^t underflow to 0 in float32 within a few dozen steps; their
    gradient must be 0, not NaN (torch.polar's backward gave NaN there; hypothesis found it at
    L=70, N=5 with |q| = 0.28)."""
    generator = torch.Generator().manual_seed(3503707)
    layer = random_layer(2, 5, generator)
    with torch.no_grad():
        layer.alpha[1, 4] = 2.5   # p = 0.92 and |q| = 1 - p sigma(delta) = 0.19 with delta = 2:
        layer.delta[1, 4] = 2.0   # |q|^70 ~ e^-118 is 0 in float32
    assert layer.coefficients()[1].abs().min() < 0.2
    x = torch.randn(1, 70, 2, generator=generator)
    for method in FORMS:
        layer.zero_grad()
        y, h = layer(x, None, method=method)
        (y.square().sum() + h.abs().square().sum()).backward()
        for name, param in layer.named_parameters():
            assert torch.isfinite(param.grad).all(), f"{method}: grad {name} is not finite"
