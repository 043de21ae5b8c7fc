"""megalodon_lite.attention against float64 references written straight from the equations.

The references never cut anything into chunks: they compute the full L x L attention with the
block-diagonal causal mask, so "chunked == full with a block-diagonal mask" is what every
comparison below checks. float64 comparisons use 1e-10 (rounding only, values and gradients of
order 1); low-precision tolerances are given where they are used.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.attention import (
    NORM_EPS,
    ChunkAttention,
    ChunkKVCache,
    RMSNorm,
    RotaryEmbedding,
    causal_attention,
)

F64 = torch.float64
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


# ---------------------------------------------------------------- references (float64)

def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float = NORM_EPS) -> torch.Tensor:
    x = x.to(F64)
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * (weight.to(F64) + 1)


def rope_ref(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Adjacent pairs as complex numbers times exp(i * p * base**(-2i/d)); x (..., L, d)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=F64) / d)
    turn = torch.polar(torch.ones_like(theta), positions.to(F64)[:, None] * theta)
    pairs = torch.view_as_complex(x.to(F64).reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2)


def chunk_attention_ref(z, v, gamma, beta, heads: int, chunk: int, base: float = 10000.0) -> torch.Tensor:
    """Full L x L attention, block-diagonal causal mask, RoPE at t mod chunk; (B, L, value_dim)."""
    b, length, _ = z.shape
    zh = z.to(F64).view(b, length, heads, -1).transpose(1, 2)  # (B, H, L, dz)
    dz = zh.shape[-1]
    unit = zh / torch.sqrt((zh * zh).mean(-1, keepdim=True) + NORM_EPS) / math.sqrt(dz)
    q = unit * (gamma[0].to(F64)[:, None] + 1) + beta[0].to(F64)[:, None]
    k = unit * (gamma[1].to(F64)[:, None] + 1) + beta[1].to(F64)[:, None]
    t = torch.arange(length)
    q, k = rope_ref(q, t % chunk, base), rope_ref(k, t % chunk, base)
    allowed = (t[:, None] // chunk == t[None, :] // chunk) & (t[None, :] <= t[:, None])
    probs = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf")).softmax(-1)
    vh = v.to(F64).view(b, length, heads, -1).transpose(1, 2)
    return (probs @ vh).transpose(1, 2).reshape(b, length, -1)


def make(batch, heads, dz, dv, chunk, length, dtype=F64, seed=0, base=10000.0):
    """A module with non-zero gamma/beta, and random non-zero z, v."""
    g = torch.Generator().manual_seed(seed)
    attn = ChunkAttention(heads * dz, heads * dv, heads, chunk, rope_base=base).to(dtype)
    with torch.no_grad():
        attn.gamma.copy_(0.5 * torch.randn(attn.gamma.shape, generator=g))
        attn.beta.copy_(0.5 * torch.randn(attn.beta.shape, generator=g))
    z = (2 * torch.randn(batch, length, heads * dz, generator=g) + 0.3).to(dtype)
    v = torch.randn(batch, length, heads * dv, generator=g).to(dtype)
    return attn, z, v


shapes = st.fixed_dictionaries({
    "batch": st.integers(1, 3), "heads": st.integers(1, 3), "dz": st.sampled_from([2, 4, 8]),
    "dv": st.integers(1, 6), "chunk": st.integers(1, 9), "length": st.integers(1, 30),
    "seed": st.integers(0, 2**16),
})


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 16), (2, 1, 4, 33)])
def test_rmsnorm_forward_and_grads_match_float64(shape, affine):
    torch.manual_seed(len(shape))
    norm = RMSNorm(shape[-1], affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.normal_(0, 0.7)
    x = (3 * torch.randn(shape, dtype=F64) - 1).requires_grad_()
    out, ref = norm(x), rmsnorm_ref(x, norm.weight)
    params = [x] + ([norm.weight] if affine else [])
    gout = torch.randn(shape, dtype=F64)
    for g, r in zip(torch.autograd.grad(out, params, gout), torch.autograd.grad(ref, params, gout)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_rmsnorm_low_precision_uses_float32_statistics():
    torch.manual_seed(0)
    norm = RMSNorm(1024)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x = (torch.randn(4, 1024) * 5 + 2).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    ref = rmsnorm_ref(x, norm.weight)  # from the same bfloat16 inputs
    # float32 statistics and one rounding to bfloat16 at the end: within bfloat16's unit roundoff
    # (2^-8 relative, 8 significant bits) plus float32 noise.
    assert ((out.to(F64) - ref).abs() <= ref.abs() * (2**-8 + 1e-6) + 1e-6).all()


@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_under_autocast_returns_the_autocast_dtype_and_keeps_x_and_one_float_per_row(affine):
    """Under bf16 autocast (CPU) the norm of a float32 x is the float32 result rounded once to bf16 (what a
    following linear layer would cast it to); its gradients equal float64 autograd of the formula to float32
    rounding (the backward runs in float32 on the bf16 incoming gradient); for the backward it keeps x, one
    float per row and the (dim,) scale only."""
    torch.manual_seed(1)
    norm = RMSNorm(64, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(0, 0.5)
    x = (torch.randn(3, 9, 64) * 2 + 0.5).requires_grad_()
    saved = {}  # storage pointer -> bytes, each storage once

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, norm(x).bfloat16())
    assert sum(saved.values()) == x.numel() * 4 + 3 * 9 * 4 + (64 * 4 if affine else 0)
    dy = torch.randn(out.shape).bfloat16()
    params = [x] + ([norm.weight] if affine else [])
    got = torch.autograd.grad(out, params, dy)
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_() if affine else None
    want = torch.autograd.grad(rmsnorm_ref(x64, w64), [x64] + ([w64] if affine else []), dy.double())
    for g, w in zip(got, want):  # float32 arithmetic on float32 x and bf16-exact dy: ~1e-6 relative
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def test_rmsnorm_plus_one_convention_and_official_eps():
    norm = RMSNorm(12)
    assert norm.eps == 1e-5 == NORM_EPS
    assert torch.equal(norm.weight, torch.zeros(12)) and torch.equal(norm.state_dict()["weight"], torch.zeros(12))
    x = torch.randn(5, 12, dtype=F64) + 0.5
    torch.testing.assert_close(norm.double()(x), rmsnorm_ref(x, None), rtol=1e-12, atol=1e-12)
    w = torch.randn(12, dtype=F64)
    with torch.no_grad():
        norm.weight.copy_(w)
    rms = torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), x / rms * (w + 1), rtol=1e-12, atol=1e-12)
    assert RMSNorm(12, affine=False).weight is None


def test_rmsnorm_bad_input():
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(4, eps=0.0)
    with pytest.raises(ValueError, match="last dimension 4"):
        RMSNorm(4)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating"):
        RMSNorm(4)(torch.ones(2, 4, dtype=torch.int64))


# ---------------------------------------------------------------- RoPE

def test_rope_matches_complex_reference_and_is_relative():
    torch.manual_seed(1)
    rope = RotaryEmbedding(16, base=500.0)
    x = torch.randn(2, 3, 11, 16, dtype=F64)
    pos = torch.randint(0, 3000, (11,))
    torch.testing.assert_close(rope(x, pos), rope_ref(x, pos, 500.0), rtol=1e-12, atol=1e-12)
    # float32: a few ulps of O(1) values
    torch.testing.assert_close(rope(x.float(), pos).to(F64), rope_ref(x, pos, 500.0), rtol=0, atol=1e-5)
    q, k = torch.randn(2, 11, 16, dtype=F64).unbind(0)
    s0 = rope(q, pos) @ rope(k, pos).T
    s1 = rope(q, pos + 777) @ rope(k, pos + 777).T
    torch.testing.assert_close(s0, s1, rtol=1e-9, atol=1e-9)
    # position 0 is the identity, and the rotation keeps norms
    torch.testing.assert_close(rope(x, torch.zeros(11, dtype=torch.long)), x, rtol=0, atol=0)
    torch.testing.assert_close(rope(x, pos).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)


def test_rope_bad_input():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(5)
    rope = RotaryEmbedding(4)
    with pytest.raises(TypeError, match="integer"):
        rope(torch.randn(3, 4), torch.arange(3.0))
    with pytest.raises(ValueError, match=r"positions must have shape \(3,\)"):
        rope(torch.randn(3, 4), torch.arange(4))
    with pytest.raises(ValueError, match=r"\(\.\.\., L, 4\)"):
        rope(torch.randn(3, 6), torch.arange(3))


# ---------------------------------------------------------------- chunk attention

@SETTINGS
@given(shape=shapes, use_sdpa=st.booleans())
def test_forward_and_grads_match_full_attention_with_block_diagonal_mask(shape, use_sdpa):
    attn, z, v = make(**shape)
    attn.use_sdpa = use_sdpa
    z.requires_grad_()
    v.requires_grad_()
    out, cache = attn(z, v)
    ref = chunk_attention_ref(z, v, attn.gamma, attn.beta, shape["heads"], shape["chunk"])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert cache.length == shape["length"] % shape["chunk"]
    leaves = (z, v, attn.gamma, attn.beta)
    gout = torch.randn(out.shape, dtype=F64)
    for g, r in zip(torch.autograd.grad(out, leaves, gout), torch.autograd.grad(ref, leaves, gout)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_chunk_at_least_the_length_is_plain_causal_attention():
    attn, z, v = make(2, 2, 4, 3, chunk=50, length=23, base=100.0)
    out, cache = attn(z, v)
    torch.testing.assert_close(out, chunk_attention_ref(z, v, attn.gamma, attn.beta, 2, 23, 100.0),
                               rtol=1e-10, atol=1e-10)
    assert cache.length == 23


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_causal_attention_with_earlier_keys(use_sdpa):
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 3, 5, 4, dtype=F64), torch.randn(2, 3, 9, 4, dtype=F64), torch.randn(2, 3, 9, 6, dtype=F64)
    out = causal_attention(q, k, v, use_sdpa=use_sdpa)
    allowed = torch.arange(9)[None, :] <= torch.arange(5)[:, None] + 4  # query i sits at key position 4 + i
    ref = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(shape=shapes, cuts=st.lists(st.integers(0, 30), max_size=8), single_steps=st.integers(0, 6),
       use_sdpa=st.booleans())
def test_streaming_in_pieces_equals_one_call(shape, cuts, single_steps, use_sdpa):
    """Random cut points (inside chunks, on boundaries, several chunks apart) plus a run of
    one-token steps; outputs and gradients equal one call, the cache stays below c tokens."""
    attn, z, v = make(**shape)
    attn.use_sdpa = use_sdpa
    length, chunk = shape["length"], shape["chunk"]
    z.requires_grad_()
    v.requires_grad_()
    whole, _ = attn(z, v)
    bounds = sorted({0, length, *[c for c in cuts if c < length], *range(1, min(single_steps, length))})
    cache, pieces = None, []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        piece, cache = attn(z[:, start:stop], v[:, start:stop], cache)
        pieces.append(piece)
        assert cache.length == stop % chunk < chunk
        assert cache.k.shape == (shape["batch"], shape["heads"], stop % chunk, shape["dz"])
        assert cache.v.shape == (shape["batch"], shape["heads"], stop % chunk, shape["dv"])
    streamed = torch.cat(pieces, dim=1)
    torch.testing.assert_close(streamed, whole, rtol=1e-10, atol=1e-10)
    gout = torch.randn(whole.shape, dtype=F64)
    # the cache keeps its autograd history, so a later piece's loss reaches earlier tokens
    for g, r in zip(torch.autograd.grad(streamed, (z, v), gout), torch.autograd.grad(whole, (z, v), gout)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_cache_memory_is_bounded_by_the_chunk():
    attn, z, v = make(1, 2, 8, 8, chunk=16, length=1000)
    _, cache = attn(z, v)
    assert cache.length == 1000 % 16
    for t in (cache.k, cache.v):  # its own storage, not a view into the whole sequence's keys
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert not cache.detach().k.requires_grad
    empty = ChunkKVCache.empty(1, 2, 8, 8, dtype=F64)
    out, same = attn(z[:, :0], v[:, :0], empty)
    assert out.shape == (1, 0, 16) and same is empty


def test_causal_and_chunk_local():
    attn, z, v = make(2, 2, 4, 4, chunk=6, length=20)
    out, _ = attn(z, v)
    z2, v2 = z.clone(), v.clone()
    z2[:, 13:] += torch.randn_like(z2[:, 13:])
    v2[:, 13:] += torch.randn_like(v2[:, 13:])
    out2, _ = attn(z2, v2)
    torch.testing.assert_close(out2[:, :13], out[:, :13], rtol=0, atol=0)  # nothing from the future
    assert (out2[:, 13:] - out[:, 13:]).abs().amax(-1).min() > 1e-6  # every changed step responds
    z3 = z.clone()
    z3[:, :12] += torch.randn_like(z3[:, :12])  # change the first two chunks only
    out3, _ = attn(z3, v)
    torch.testing.assert_close(out3[:, 12:], out[:, 12:], rtol=0, atol=0)  # attention stays in its chunk


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_bfloat16_against_float64(use_sdpa):
    attn, z, v = make(2, 2, 16, 16, chunk=32, length=80)
    ref = chunk_attention_ref(z.bfloat16(), v.bfloat16(), attn.gamma, attn.beta, 2, 32)
    attn = attn.bfloat16()
    attn.use_sdpa = use_sdpa
    out, cache = attn(z.bfloat16(), v.bfloat16())
    assert out.dtype == cache.k.dtype == torch.bfloat16
    # q, k are rounded to bfloat16 (unit roundoff 2^-8 relative) before the scores, which are of size up to
    # |gamma + 1| (a few units): logit errors of ~1e-2, and an average of unit values: 3e-2.
    assert (out.to(F64) - ref).abs().max() < 3e-2


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_bfloat16_at_16k_tokens_is_finite_and_close_to_float32(use_sdpa):
    """Numerical stability at length: 16K tokens, chunks of 256, bfloat16 against the same module in
    float32 on the same bfloat16 inputs (a float64 L x L reference would need 2 GB)."""
    length, chunk = 16_384, 256
    attn, z, v = make(1, 2, 16, 8, chunk=chunk, length=length, dtype=torch.float32)
    z, v = z.bfloat16(), v.bfloat16()
    attn.use_sdpa = use_sdpa
    with torch.no_grad():
        out32, _ = attn(z.float(), v.float())
        out16, cache = attn.bfloat16()(z, v)
    assert out16.dtype == torch.bfloat16 and cache.length == length % chunk
    assert torch.isfinite(out16.float()).all()
    err = (out16.float() - out32).abs()
    # as in the short bfloat16 test: q, k rounded to bfloat16 shift the logits by ~1e-2, the output (an
    # average of unit values) by a few 1e-2 at worst. Positions restart in every chunk, so nothing
    # grows with the length: the last chunk is no worse than the first.
    assert err.max() < 3e-2
    first, last = err[:, :chunk].max(), err[:, -chunk:].max()
    assert last < 2 * first + 1e-2, (first.item(), last.item())


def test_attention_dropout_only_in_training():
    attn, z, v = make(1, 1, 4, 8, chunk=8, length=16)
    attn.attention_dropout = 0.5
    attn.eval()
    ref = chunk_attention_ref(z, v, attn.gamma, attn.beta, 1, 8)
    torch.testing.assert_close(attn(z, v)[0], ref, rtol=1e-10, atol=1e-10)
    attn.train()
    torch.manual_seed(3)
    assert (attn(z, v)[0] - ref).abs().max() > 1e-3


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ChunkAttention(10, 8, 4, 16)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ChunkAttention(8, 10, 4, 16)
    with pytest.raises(ValueError, match="even"):
        ChunkAttention(9, 9, 3, 16)  # dz = 3 cannot be rotated in pairs
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkAttention(8, 8, 1, 0)
    with pytest.raises(ValueError, match="attention_dropout"):
        ChunkAttention(8, 8, 1, 4, attention_dropout=1.0)


def test_forward_errors():
    attn = ChunkAttention(8, 6, 2, 4)
    z, v = torch.randn(2, 5, 8), torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"z must have shape \(B, L, 8\)"):
        attn(torch.randn(2, 5, 7), v)
    with pytest.raises(ValueError, match=r"z must have shape"):
        attn(torch.randn(5, 8), v)
    with pytest.raises(ValueError, match=r"v must have shape \(B, L, 6\)"):
        attn(z, torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="same batch and length"):
        attn(z, torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="same batch and length"):
        attn(z, torch.randn(1, 5, 6))
    with pytest.raises(TypeError, match="share dtype"):
        attn(z, v.double())
    with pytest.raises(TypeError, match="floating"):
        attn(z.long(), v)
    with pytest.raises(TypeError, match="torch.Tensor"):
        attn(z.numpy(), v)
    with pytest.raises(TypeError, match="ChunkKVCache"):
        attn(z, v, (torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 3)))
    for k, val in [((1, 2, 1, 4), (1, 2, 1, 3)),   # wrong batch
                   ((2, 1, 1, 4), (2, 1, 1, 3)),   # wrong heads
                   ((2, 2, 1, 3), (2, 2, 1, 3)),   # wrong dz
                   ((2, 2, 1, 4), (2, 2, 2, 3)),   # k and v disagree on n
                   ((2, 2, 4), (2, 2, 3))]:        # not 4-d
        with pytest.raises(ValueError, match="cache must hold k"):
            attn(z, v, ChunkKVCache(torch.zeros(k), torch.zeros(val)))
    with pytest.raises(ValueError, match="fewer than chunk_size=4"):
        attn(z, v, ChunkKVCache(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 3)))
    with pytest.raises(TypeError, match="cache must have z's dtype"):
        attn(z, v, ChunkKVCache.empty(2, 2, 4, 3, dtype=F64))
    with pytest.raises(TypeError, match="cache.k must be a torch.Tensor"):
        attn(z, v, ChunkKVCache(None, torch.zeros(2, 2, 1, 3)))
    with pytest.raises(TypeError, match="cache.v must be a floating-point"):
        attn(z, v, ChunkKVCache(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 3, dtype=torch.int64)))
    with pytest.raises(TypeError, match="cache must have z's dtype"):
        attn(z, v, ChunkKVCache(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 3, dtype=F64)))


def test_non_contiguous_inputs():
    attn, z, v = make(3, 2, 4, 5, chunk=4, length=9)
    out, _ = attn(z, v)
    z_t = z.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-minor strides
    v_t = torch.cat([v, v], dim=-1)[..., : v.shape[-1]]   # a slice of a wider tensor
    assert not z_t.is_contiguous() and not v_t.is_contiguous()
    torch.testing.assert_close(attn(z_t, v_t)[0], out, rtol=0, atol=0)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_low_precision_softmax_is_accumulated_in_float32(use_sdpa):
    """Against float64 on the same bfloat16-rounded q, k, v: what is left is the rounding of the
    probabilities (explicit path) and of the output, each at most 2^-8 relative of a weighted mean
    of v, so below 2^-7 max|v|. Scores rounded to bfloat16 (|q.k| up to ~15 here) would miss it."""
    torch.manual_seed(4)
    q, k = torch.randn(2, 2, 300, 16).bfloat16(), torch.randn(2, 2, 300, 16).bfloat16()
    v = torch.randn(2, 2, 300, 32).bfloat16()
    allowed = torch.ones(300, 300, dtype=torch.bool).tril()
    ref = (q.to(F64) @ k.to(F64).transpose(-1, -2)).masked_fill(~allowed, float("-inf")).softmax(-1) @ v.to(F64)
    out = causal_attention(q, k, v, use_sdpa=use_sdpa)
    assert out.dtype == torch.bfloat16
    assert (out.to(F64) - ref).abs().max() < 2**-7 * v.abs().max().item()
