"""megalodon_lite.timestep_norm: the fast form against a float64 sequential reference.

The reference itself is checked against the definition (statistics of every number of steps <= t
in a group, by slicing). Everything else compares with the reference: forward, gradients (x,
weight, bias and the incoming state), streaming in pieces, padding, causality, bfloat16 at length
and the errors raised on bad input.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.timestep_norm import (
    TimestepNorm,
    TimestepNormState,
    cumulative_moments,
    group_moments,
    initial_timestep_norm_state,
    timestep_norm,
    timestep_norm_reference,
)

EPS = 1e-5
# float64 against float64: both forms do O(L) operations on unit-scale numbers; 1e-10 leaves
# several orders of magnitude over the ~1e-14 they reach.
TOL64 = 1e-10
# float32 against float64: unit-scale inputs, group sizes >= 4, at most 40 steps, running
# variance S >= 0.2 in these cases, so rsqrt(S) amplifies float32 rounding (6e-8 relative) by a
# few units per operation; the errors measured are ~1e-6 for outputs and gradients alike.
TOL32_Y = 1e-5
TOL32_GRAD = 2e-5


def random_case(seed: int, dtype: torch.dtype = torch.float64, *, min_group: int = 1, with_state: bool = True,
                with_padding: bool = True):
    """Random shapes and values (never zeros): x (B, L, D), weight, bias, state, padding mask."""
    gen = torch.Generator().manual_seed(seed)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))  # noqa: E731
    batch, length, groups = randint(1, 3), randint(1, 40), randint(1, 4)
    group_size = randint(min_group, 6)
    channels = groups * group_size
    x = torch.randn(batch, length, channels, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    weight = torch.randn(channels, generator=gen, dtype=torch.float64) * 0.3
    bias = torch.randn(channels, generator=gen, dtype=torch.float64) * 0.3
    state = None
    if with_state:
        state = TimestepNormState(
            count=torch.randint(0, 6, (batch,), generator=gen),
            mean=torch.randn(batch, groups, generator=gen, dtype=torch.float64),
            var=torch.rand(batch, groups, generator=gen, dtype=torch.float64) + 0.5,
        )
    mask = torch.rand(batch, length, generator=gen) < 0.3 if with_padding else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    if state is not None:
        state = TimestepNormState(state.count, cast(state.mean), cast(state.var))
    return cast(x), cast(weight), cast(bias), groups, state, mask


def stats_by_definition(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_t, sigma^2_t (B, L, G): mean and population variance of all numbers of steps <= t in a group."""
    batch, length, channels = x.shape
    grouped = x.reshape(batch, length, groups, channels // groups)
    means, variances = [], []
    for t in range(length):
        seen = grouped[:, : t + 1].transpose(1, 2).reshape(batch, groups, -1)
        means.append(seen.mean(-1))
        variances.append(seen.var(-1, unbiased=False))
    return torch.stack(means, 1), torch.stack(variances, 1)


# --------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("seed", range(4))
def test_reference_equals_definition(seed: int) -> None:
    x, weight, bias, groups, _, _ = random_case(seed, with_state=False, with_padding=False)
    mu, var = stats_by_definition(x, groups)
    batch, length, channels = x.shape
    expected = ((x.reshape(batch, length, groups, -1) - mu[..., None]) / torch.sqrt(var[..., None] + EPS))
    expected = expected.reshape(batch, length, channels) * (weight + 1) + bias
    y, state = timestep_norm_reference(x, weight, bias, groups)
    torch.testing.assert_close(y, expected, rtol=0, atol=TOL64)
    torch.testing.assert_close(state.mean, mu[:, -1], rtol=0, atol=TOL64)
    torch.testing.assert_close(state.var, var[:, -1], rtol=0, atol=TOL64)
    assert state.count.tolist() == [length] * batch


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_reference(seed: int, dtype: torch.dtype) -> None:
    x, weight, bias, groups, state, mask = random_case(seed, min_group=4)
    y_ref, state_ref = timestep_norm_reference(x, weight, bias, groups, state, mask)
    xd, wd, bd, _, state_d, _ = random_case(seed, dtype, min_group=4)
    y, state_out = timestep_norm(xd, wd, bd, groups, state_d, mask)
    tol = TOL64 if dtype == torch.float64 else TOL32_Y
    assert y.dtype == dtype and state_out.mean.dtype == dtype and state_out.count.dtype == torch.int64
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    assert torch.equal(state_out.count, state_ref.count)
    torch.testing.assert_close(state_out.mean.double(), state_ref.mean, rtol=tol, atol=tol)
    torch.testing.assert_close(state_out.var.double(), state_ref.var, rtol=tol, atol=tol)


def test_cumulative_moments_every_step_matches_reference_steps() -> None:
    x, _, _, groups, state, mask = random_case(11)
    m, v = group_moments(x, groups)
    mean, var, _ = cumulative_moments(m, v, state, ~mask)
    running = state
    for t in range(x.shape[1]):  # the reference, fed one step per call
        zeros = torch.zeros(x.shape[-1], dtype=x.dtype)
        _, running = timestep_norm_reference(x[:, t : t + 1], zeros, zeros, groups, running, mask[:, t : t + 1])
        torch.testing.assert_close(mean[:, t], running.mean, rtol=0, atol=TOL64)
        torch.testing.assert_close(var[:, t], running.var, rtol=0, atol=TOL64)


# --------------------------------------------------------------------------------------------
# gradients


def _grads(fn, x, weight, bias, groups, state, mask, upstream):
    """Gradients of <y, upstream> + sum(final mean) + sum(final var) wrt x, weight, bias, state mean/var."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias, state.mean, state.var)]
    x_, w_, b_, mean_, var_ = leaves
    y, final = fn(x_, w_, b_, groups, TimestepNormState(state.count, mean_, var_), mask)
    loss = (y * upstream.to(y.dtype)).sum() + (final.mean * 0.7).sum() + (final.var * 1.3).sum()
    loss.backward()
    return [t.grad.double() for t in leaves]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_reference(seed: int, dtype: torch.dtype) -> None:
    x, weight, bias, groups, state, mask = random_case(100 + seed, min_group=4)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = _grads(timestep_norm_reference, x, weight, bias, groups, state, mask, upstream)
    xd, wd, bd, _, state_d, _ = random_case(100 + seed, dtype, min_group=4)
    got = _grads(timestep_norm, xd, wd, bd, groups, state_d, mask, upstream)
    tol = TOL64 if dtype == torch.float64 else TOL32_GRAD
    for name, g, e in zip(("x", "weight", "bias", "state.mean", "state.var"), got, expected):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, msg=lambda m, name=name: f"grad {name}: {m}")
    assert (got[0][mask] == 0).all(), "padded steps must get no gradient"


def test_gradcheck_fast_form() -> None:
    """Finite differences, independent of the reference, through state, padding and affine."""
    x, weight, bias, groups, state, mask = random_case(7)
    x, state = x[:, :8], TimestepNormState(state.count, state.mean, state.var)
    mask = mask[:, :8]
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, weight, bias, state.mean, state.var))

    def fn(x_, w_, b_, mean_, var_):
        y, final = timestep_norm(x_, w_, b_, groups, TimestepNormState(state.count, mean_, var_), mask)
        return y, final.mean, final.var

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# streaming, causality, padding


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 39), min_size=1, max_size=5),
       use_float32=st.booleans())
def test_streaming_in_pieces_equals_one_call(seed: int, cuts: list[int], use_float32: bool) -> None:
    dtype = torch.float32 if use_float32 else torch.float64
    x, weight, bias, groups, state, mask = random_case(seed, dtype, min_group=4 if use_float32 else 1)
    length = x.shape[1]
    bounds = sorted({0, length, *[c for c in cuts if c < length]})
    y_whole, state_whole = timestep_norm(x, weight, bias, groups, state, mask)
    running, pieces = state, []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        y_piece, running = timestep_norm(x[:, start:stop], weight, bias, groups, running, mask[:, start:stop])
        pieces.append(y_piece)
    tol = TOL64 if dtype == torch.float64 else TOL32_Y
    torch.testing.assert_close(torch.cat(pieces, 1), y_whole, rtol=tol, atol=tol)
    assert torch.equal(running.count, state_whole.count)
    torch.testing.assert_close(running.mean, state_whole.mean, rtol=tol, atol=tol)
    torch.testing.assert_close(running.var, state_whole.var, rtol=tol, atol=tol)


@pytest.mark.parametrize("seed", range(3))
def test_causality(seed: int) -> None:
    x, weight, bias, groups, state, mask = random_case(200 + seed, torch.float32)
    length = x.shape[1]
    if length < 2:
        x, mask = torch.cat([x, x], 1), torch.cat([mask, mask], 1)
        length *= 2
    t0 = int(torch.randint(1, length, (), generator=torch.Generator().manual_seed(seed)))
    changed = x.clone()
    changed[:, t0:] = torch.randn_like(changed[:, t0:]) * 5 + 3
    y, _ = timestep_norm(x, weight, bias, groups, state, mask)
    y_changed, _ = timestep_norm(changed, weight, bias, groups, state, mask)
    assert torch.equal(y[:, :t0], y_changed[:, :t0]), "an output moved when only later steps changed"
    # and the gradient of an early output has no component on later inputs
    x_ = x.clone().requires_grad_(True)
    y_, _ = timestep_norm(x_, weight, bias, groups, state, mask)
    y_[:, :t0].sum().backward()
    assert (x_.grad[:, t0:] == 0).all()


def test_padding_in_the_middle_and_at_the_end() -> None:
    x, weight, bias, groups, state, _ = random_case(300, with_padding=False)
    while x.shape[1] < 12:
        x = torch.cat([x, x + 1], 1)
    batch, length, _ = x.shape
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, length // 3 : length // 2] = True     # a hole in the middle
    mask[-1, -length // 4 :] = True               # right padding
    y, final = timestep_norm(x, weight, bias, groups, state, mask)
    y_ref, final_ref = timestep_norm_reference(x, weight, bias, groups, state, mask)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=TOL64)
    assert (y[mask] == 0).all() and (y_ref[mask] == 0).all()
    for row in range(batch):
        keep = ~mask[row]
        row_state = TimestepNormState(state.count[row : row + 1], state.mean[row : row + 1], state.var[row : row + 1])
        y_row, final_row = timestep_norm(x[row : row + 1, keep], weight, bias, groups, row_state)
        torch.testing.assert_close(y[row, keep], y_row[0], rtol=0, atol=TOL64)
        assert final.count[row] == final_row.count[0] == state.count[row] + keep.sum()
        torch.testing.assert_close(final.mean[row], final_row.mean[0], rtol=0, atol=TOL64)
        torch.testing.assert_close(final.var[row], final_row.var[0], rtol=0, atol=TOL64)
    # padded steps leave the state exactly as it was: a call of padding alone changes nothing
    _, after_padding = timestep_norm(x[:, :5], weight, bias, groups, final, torch.ones(batch, 5, dtype=torch.bool))
    for got, was in zip(after_padding, final):
        assert torch.equal(got, was)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 3e38])
@pytest.mark.parametrize("form", [timestep_norm, timestep_norm_reference])
def test_values_in_padding_never_matter(garbage: float, form) -> None:
    """Padded steps are skipped whatever they hold: NaN, inf, or a float32 value whose square overflows."""
    x, weight, bias, groups, state, mask = random_case(302, torch.float32, min_group=4)
    mask[:, 0] = True  # at least one padded step per row
    y, final = form(x, weight, bias, groups, state, mask)
    dirty = x.masked_fill(mask.unsqueeze(-1), garbage).requires_grad_(True)
    y_dirty, final_dirty = form(dirty, weight, bias, groups, state, mask)
    assert torch.equal(y_dirty, y) and all(torch.equal(a, b) for a, b in zip(final_dirty, final))
    (y_dirty.square().sum() + final_dirty.var.sum()).backward()
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[mask] == 0).all()


def test_all_padding_row_from_initial_state() -> None:
    x, weight, bias, groups, _, _ = random_case(301, with_state=False, with_padding=False)
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[0] = True
    y, final = timestep_norm(x, weight, bias, groups, padding_mask=mask)
    initial = initial_timestep_norm_state(x.shape[0], groups, dtype=x.dtype)
    assert (y[0] == 0).all() and torch.isfinite(y).all()
    assert final.count[0] == 0
    assert torch.equal(final.mean[0], initial.mean[0]) and torch.equal(final.var[0], initial.var[0])


# --------------------------------------------------------------------------------------------
# numerical stability at length


def _naive_running_var(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The cancelling formula mean(v + m^2) - mean(m)^2, to show the offset below has teeth."""
    steps = torch.arange(1, m.shape[1] + 1, dtype=m.dtype)[None, :, None]
    return (v + m.square()).cumsum(1) / steps - (m.cumsum(1) / steps).square()


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_bfloat16_long_sequence(offset: float) -> None:
    batch, length, channels, groups = 1, 16_384, 8, 2
    gen = torch.Generator().manual_seed(int(offset))
    x = (torch.randn(batch, length, channels, generator=gen) + offset).to(torch.bfloat16)
    weight, bias = torch.randn(channels, generator=gen) * 0.1, torch.randn(channels, generator=gen) * 0.1
    y_bf16, state_bf16 = timestep_norm(x.requires_grad_(True), weight, bias, groups)
    assert y_bf16.dtype == torch.bfloat16 and state_bf16.mean.dtype == torch.float32
    assert torch.isfinite(y_bf16).all()
    y_bf16.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    # The same bfloat16 values in float32: statistics are float32 in both, so the outputs differ
    # only by rounding to bfloat16 (8 significant bits: at most 2^-8 relative).
    y_f32, _ = timestep_norm(x.detach().float(), weight, bias, groups)
    assert ((y_bf16.float() - y_f32).abs() <= 2**-8 * y_f32.abs()).all()
    # And float32 against float64 on those values: |y| <= ~10, float32 means near the offset are
    # rounded by |offset|·2^-24, amplified by rsqrt(S) ~ 1: 1e-3 covers both with margin.
    y_f64, state_f64 = timestep_norm(x.detach().double(), weight.double(), bias.double(), groups)
    torch.testing.assert_close(y_f32.double(), y_f64, rtol=0, atol=1e-3)
    torch.testing.assert_close(state_bf16.var.double(), state_f64.var, rtol=1e-4, atol=0)
    if offset:
        m, v = group_moments(x.detach().float(), groups)
        naive_error = (_naive_running_var(m, v).double()[:, -1] - state_f64.var).abs().max()
        assert naive_error > 100 * (state_bf16.var.double() - state_f64.var).abs().max()


def test_float32_large_offset_matches_float64() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2048, 16, generator=gen) * 0.5 + 1000.0
    zeros = torch.zeros(16)
    y32, state32 = timestep_norm(x, zeros, zeros, 4)
    y64, state64 = timestep_norm(x.double(), zeros.double(), zeros.double(), 4)
    # means near 1000 carry float32 rounding 1000·2^-24 ≈ 6e-5, divided by the spread 0.5
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=1e-3)
    torch.testing.assert_close(state32.var.double(), state64.var, rtol=1e-3, atol=0)


# --------------------------------------------------------------------------------------------
# module contract


def test_module_contract() -> None:
    norm = TimestepNorm(12, 3)
    assert norm.weight.shape == norm.bias.shape == (12,)
    assert (norm.weight == 0).all() and (norm.bias == 0).all()
    init = norm.initial_state(4)
    assert init.count.shape == (4,) and init.count.dtype == torch.int64 and (init.count == 0).all()
    assert init.mean.shape == init.var.shape == (4, 3)
    assert init.mean.dtype == init.var.dtype == torch.float32
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(4, 9, 12, dtype=torch.bfloat16)
    mask = torch.rand(4, 9) < 0.2
    y, state = norm(x, init, mask)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert isinstance(state, TimestepNormState) and state.mean.dtype == torch.float32
    y_fn, state_fn = timestep_norm(x, norm.weight, norm.bias, 3, init, mask)
    assert torch.equal(y, y_fn) and all(torch.equal(a, b) for a, b in zip(state, state_fn))
    assert "num_groups=3" in repr(norm)


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        TimestepNorm(10, 3)
    with pytest.raises(ValueError, match="model_dim"):
        TimestepNorm(0, 1)
    norm = TimestepNorm(8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="model_dim=8"):
        norm(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, D\)"):
        norm(torch.randn(5, 8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        norm(torch.ones(2, 5, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one"):
        norm(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="num_groups"):
        timestep_norm(x, torch.zeros(8), torch.zeros(8), 3)
    with pytest.raises(ValueError, match="weight"):
        timestep_norm(x, torch.zeros(4), torch.zeros(8), 2)
    with pytest.raises(TypeError, match="padding_mask must be a bool"):
        norm(x, padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(B, L\)"):
        norm(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    good = norm.initial_state(2)
    with pytest.raises(ValueError, match="state.count"):
        norm(x, good._replace(count=torch.zeros(3, dtype=torch.int64)))
    with pytest.raises(TypeError, match="state.count must be an int64"):
        norm(x, good._replace(count=torch.zeros(2, dtype=torch.int32)))
    with pytest.raises(ValueError, match="state.mean"):
        norm(x, good._replace(mean=torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="state.var"):
        norm(x, good._replace(var=torch.zeros(2)))
    with pytest.raises(TypeError, match="state must be"):
        norm(x, (good.count, good.mean))
    with pytest.raises(ValueError, match="batch_size"):
        norm.initial_state(0)


def test_wrong_types_and_dtypes_raise_type_error() -> None:
    norm = TimestepNorm(8, 2)
    x = torch.randn(2, 5, 8)
    good = norm.initial_state(2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        norm(x.tolist())
    with pytest.raises(TypeError, match="x must be a floating-point"):
        norm(x.to(torch.complex64))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        timestep_norm(x, [0.0] * 8, torch.zeros(8), 2)
    with pytest.raises(TypeError, match="bias must be a floating-point"):
        timestep_norm(x, torch.zeros(8), torch.zeros(8, dtype=torch.int64), 2)
    for count in (torch.zeros(2, dtype=torch.int32), torch.zeros(2), [0, 0]):
        with pytest.raises(TypeError, match="state.count must be an int64"):
            norm(x, good._replace(count=count))
    with pytest.raises(TypeError, match="state.mean must be a floating-point"):
        norm(x, good._replace(mean=torch.zeros(2, 2, dtype=torch.int64)))
    with pytest.raises(TypeError, match="state.var must be a torch.Tensor"):
        norm(x, good._replace(var=good.var.numpy()))


def test_state_values_are_checked_on_cpu() -> None:
    """Negative counts, a non-finite mean, a negative or non-finite variance: ValueError (checked on
    the CPU only, where reading values back costs no device synchronisation)."""
    norm = TimestepNorm(8, 2)
    x = torch.randn(2, 5, 8)
    _, state = norm(x)
    with pytest.raises(ValueError, match="state.count must be >= 0"):
        norm(x, state._replace(count=torch.tensor([3, -1])))
    with pytest.raises(ValueError, match="state.mean must be finite"):
        norm(x, state._replace(mean=state.mean.clone().index_fill_(1, torch.tensor([1]), float("nan"))))
    for bad in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="state.var must be finite and >= 0"):
            norm(x, state._replace(var=state.var.clone().index_fill_(1, torch.tensor([0]), bad)))
    norm(x, state._replace(var=torch.zeros_like(state.var)))  # zero variance (constant input) is valid
