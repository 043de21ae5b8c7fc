"""megalodon_lite.mega: MEGA's gated attention layer, block and LM against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.mega import (
    LAPLACE_MU,
    LAPLACE_SIGMA,
    MegaBlock,
    MegaLM,
    MovingAverageGatedAttention,
    SimpleRelativePositionalBias,
    attention_weights,
    chunked_attention,
    laplace_attention,
    split_chunks,
)
from megalodon_lite import mega_ema
from megalodon_lite.mega_ema import damped_ema_recurrence

EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- float64 references

def reference_attention(q, k, v, bias_weight, max_positions, chunk_size, attention):
    """One query at a time, float64: attend to keys start..i of the query's own chunk."""
    q, k, v, bias_weight = (t.double() for t in (q, k, v, bias_weight))
    length = q.shape[1]
    chunk = length if chunk_size is None else min(chunk_size, length)
    rows = []
    for i in range(length):
        start = (i // chunk) * chunk
        keys = torch.arange(start, i + 1)
        rel = bias_weight[keys - i + max_positions - 1]
        dots = torch.einsum("bz,bjz->bj", q[:, i], k[:, keys])
        if attention == "softmax":
            w = torch.softmax(dots / math.sqrt(q.shape[-1]) + rel, dim=-1)
        else:
            w = torch.special.ndtr((dots / (i - start + 1) + rel - LAPLACE_MU) / LAPLACE_SIGMA)
        rows.append(torch.einsum("bj,bje->be", w, v[:, keys]))
    return torch.stack(rows, dim=1)


def reference_layer(layer, x, params=None):
    """The MEGA layer in float64 from its parameters: recurrent EMA, per-query attention."""
    p = params if params is not None else {n: t.detach().double() for n, t in layer.named_parameters()}
    x = x.double()
    d, z_dim, value_dim = layer.model_dim, layer.z_dim, layer.value_dim
    xn = F.layer_norm(x, (d,), p["norm.weight"], p["norm.bias"], eps=layer.norm.eps)
    v = F.silu(xn @ p["v_proj.weight"].T + p["v_proj.bias"])
    ndim = p["ema.alpha"].shape[1]
    ema, _ = damped_ema_recurrence(xn, torch.sigmoid(p["ema.alpha"]), torch.sigmoid(p["ema.delta"]),
                                   p["ema.beta"], p["ema.eta"] / math.sqrt(ndim))
    mx = F.silu(ema + p["ema.omega"] * xn)
    base = mx @ p["mx_proj.weight"].T + p["mx_proj.bias"]
    update, zz, reset, hx = torch.split(base, [d, z_dim, value_dim, d], dim=-1)
    update, zz, reset = torch.sigmoid(update), F.silu(zz), F.silu(reset)
    q = zz * p["qk_weight"][0] + p["qk_bias"][0]
    k = zz * p["qk_weight"][1] + p["qk_bias"][1]
    o = reference_attention(q, k, v, p["rel_pos_bias.weight"], layer.rel_pos_bias.max_positions,
                            layer.chunk_size, layer.attention)
    h = F.silu(hx + (o * reset) @ p["h_proj.weight"].T + p["h_proj.bias"])
    return update * h + (1 - update) * x


def perturb_parameters(module, generator, scale=0.3):
    """MEGA's N(0, 0.02²) init makes most terms tiny; move every parameter so all of them matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


# ---------------------------------------------------------------- Laplace function

def test_laplace_is_a_gaussian_cdf_matching_relu2_at_mu():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1000, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = laplace_attention(x)
    # Independent reference: the normal CDF Φ((x − μ)/σ) and its derivative φ(·)/σ, float64.
    torch.testing.assert_close(y, torch.special.ndtr((x - LAPLACE_MU) / LAPLACE_SIGMA), rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(y.sum(), x)
    density = torch.exp(-0.5 * ((x - LAPLACE_MU) / LAPLACE_SIGMA) ** 2) / (LAPLACE_SIGMA * math.sqrt(2 * math.pi))
    torch.testing.assert_close(grad, density.detach(), rtol=1e-10, atol=1e-14)
    # The constants: value 1/2 = μ² and slope √2 = 2μ at μ.
    mu = torch.tensor(LAPLACE_MU, dtype=torch.float64, requires_grad=True)
    value = laplace_attention(mu)
    (slope,) = torch.autograd.grad(value, mu)
    assert value.item() == pytest.approx(LAPLACE_MU**2, abs=1e-12)
    assert slope.item() == pytest.approx(2 * LAPLACE_MU, abs=1e-12)


# ---------------------------------------------------------------- relative bias

@settings(max_examples=8, deadline=None)
@given(max_positions=st.integers(1, 20), data=st.data())
def test_relative_bias_matches_megas_tiling_construction(max_positions, data):
    length = data.draw(st.integers(1, max_positions))
    bias = SimpleRelativePositionalBias(max_positions)
    w = bias.weight.detach()
    # The official code's construction, re-derived: pad the 2L-1 window with L zeros, tile it L
    # times, drop the last L entries, view as (L, 3L-2) and keep the middle L columns.
    window = w[max_positions - length:max_positions + length - 1]
    tiled = torch.tile(F.pad(window, (0, length)), (length,))[:-length].view(length, 3 * length - 2)
    expected = tiled[:, length - 1:2 * length - 1] if length > 1 else tiled
    assert torch.equal(bias(length), expected)


def test_relative_bias_rejects_bad_lengths():
    bias = SimpleRelativePositionalBias(8)
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match=r"length must be an int in \[1, max_positions=8\]"):
            bias(bad)


# ---------------------------------------------------------------- chunked attention

LENGTH_AND_CHUNK = st.sampled_from([(5, None), (12, None), (7, 8), (12, 4), (16, 8), (18, 3), (8, 8)])


@settings(max_examples=12, deadline=None)
@given(length_chunk=LENGTH_AND_CHUNK, b=st.integers(1, 2), z=st.integers(1, 6), e=st.integers(1, 5),
       attention=st.sampled_from(["softmax", "laplace"]), seed=st.integers(0, 2**31 - 1))
def test_chunked_attention_forward_and_gradients_match_float64(length_chunk, b, z, e, attention, seed):
    length, chunk_size = length_chunk
    g = torch.Generator().manual_seed(seed)
    positions = length if chunk_size is None else chunk_size
    q64, k64 = (torch.randn(b, length, z, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v64 = torch.randn(b, length, e, generator=g, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(2 * positions - 1, generator=g, dtype=torch.float64, requires_grad=True)
    leaves32 = [t.detach().float().requires_grad_() for t in (q64, k64, v64, w64)]
    q, k, v, w = leaves32

    bias_module = SimpleRelativePositionalBias(positions)
    with torch.no_grad():
        bias_module.weight.copy_(w)
    chunk = length if chunk_size is None else min(chunk_size, length)
    out, weights = chunked_attention(q, k, v, bias_module(chunk), chunk_size, attention)
    ref = reference_attention(q64, k64, v64, w64, positions, chunk_size, attention)
    assert out.shape == (b, length, e) and weights.shape[-2:] == (chunk, chunk)
    # float32 scores ~ sqrt(z) and sums over <= 18 keys: relative error ~1e-6; 1e-4 is generous.
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)

    cotangent = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((ref * cotangent).sum(), [q64, k64, v64, w64])
    grads = torch.autograd.grad((out * cotangent.float()).sum(), [q, k, v, bias_module.weight])
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("attention", ["softmax", "laplace"])
def test_chunked_attention_equals_full_attention_with_block_diagonal_causal_mask(attention):
    g = torch.Generator().manual_seed(1)
    b, length, chunk, z, e = 2, 24, 6, 5, 4
    q, k = (torch.randn(b, length, z, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, length, e, generator=g, dtype=torch.float64)
    bias = SimpleRelativePositionalBias(chunk).double()
    with torch.no_grad():
        bias.weight.normal_(generator=g)
        chunked, _ = chunked_attention(q, k, v, bias(chunk), chunk, attention)
    # One L x L attention; positions restart in each chunk, so the offset j - i and the count of
    # visible keys are those inside the chunk. The mask keeps j <= i within the same chunk.
    pos = torch.arange(length)
    same_chunk = (pos[:, None] // chunk) == (pos[None, :] // chunk)
    mask = same_chunk & (pos[None, :] <= pos[:, None])
    offsets = (pos[None, :] - pos[:, None]).clamp(-(chunk - 1), chunk - 1)
    full_bias = bias.weight.detach()[offsets + chunk - 1]
    scores = q @ k.transpose(1, 2)
    if attention == "softmax":
        weights = torch.softmax((scores / math.sqrt(z) + full_bias).masked_fill(~mask, float("-inf")), dim=-1)
    else:
        n_visible = (pos % chunk + 1).double()[:, None]
        weights = laplace_attention(scores / n_visible + full_bias) * mask
    # float64 both ways: only summation order differs.
    torch.testing.assert_close(chunked, weights @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("attention", ["softmax", "laplace"])
def test_attention_is_causal_bit_for_bit(chunk_size, attention):
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 16, 4, generator=g) for _ in range(2))
    v = torch.randn(1, 16, 3, generator=g)
    chunk = 16 if chunk_size is None else chunk_size
    bias = SimpleRelativePositionalBias(chunk)(chunk).detach()
    out, _ = chunked_attention(q, k, v, bias, chunk_size, attention)
    for cut in (1, 6, 8, 9, 15):                  # inside a chunk and on a chunk boundary
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[:, cut:] = 10 * torch.randn(t[:, cut:].shape, generator=g)
        out2, _ = chunked_attention(q2, k2, v2, bias, chunk_size, attention)
        # Masked keys get weight exactly 0 (exp(-inf), or a multiplication by 0) and future queries
        # are separate rows of the same matmuls: the past is identical, bit for bit.
        assert torch.equal(out[:, :cut], out2[:, :cut]), cut
        assert (out[:, cut:] - out2[:, cut:]).abs().max() > 1e-3, cut


# ---------------------------------------------------------------- the layer, block and LM

LAYER_CASES = [(None, "softmax"), (4, "softmax"), (4, "laplace"), (16, "laplace")]


def reference_block(block, x, params):
    """MegaBlock in float64: the reference layer, then x + W2 SiLU(W1 LN(x)) with the block's parameters."""
    h = reference_layer(block.mega, x, {n[len("mega."):]: t for n, t in params.items() if n.startswith("mega.")})
    hn = F.layer_norm(h, h.shape[-1:], params["ffn_norm.weight"], params["ffn_norm.bias"], eps=block.ffn_norm.eps)
    return h + F.silu(hn @ params["fc1.weight"].T + params["fc1.bias"]) @ params["fc2.weight"].T + params["fc2.bias"]


def reference_lm(lm, tokens, params):
    """MegaLM in float64 without any padding: the reference attention handles a last, partial chunk."""
    x = params["embed.weight"][tokens] * math.sqrt(lm.model_dim)
    for i, block in enumerate(lm.blocks):
        prefix = f"blocks.{i}."
        x = reference_block(block, x, {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)})
    x = F.layer_norm(x, x.shape[-1:], params["final_norm.weight"], params["final_norm.bias"], eps=lm.final_norm.eps)
    return x @ params["head.weight"].T


def random_size(chunk_size, g):
    """(B, L, D) with L allowed for the chunk: at most 16 without chunks, else <= chunk or a multiple."""
    b, d = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (3, 8))
    if chunk_size is None:
        return b, int(torch.randint(1, 17, (1,), generator=g)), d
    choices = list(range(1, chunk_size + 1)) + [chunk_size * m for m in (2, 3) if chunk_size * m <= 16]
    return b, choices[int(torch.randint(len(choices), (1,), generator=g))], d


def assert_gradients_close(module, inputs, output, inputs64, params64, output_ref, g):
    """Gradients of <output, random cotangent> w.r.t. inputs and every parameter, float32 vs float64."""
    cotangent = torch.randn(output_ref.shape, generator=g, dtype=torch.float64)
    names = list(params64)
    module_params = dict(module.named_parameters())
    grads = torch.autograd.grad((output * cotangent.float()).sum(), [*inputs, *(module_params[n] for n in names)])
    grads_ref = torch.autograd.grad((output_ref * cotangent).sum(), [*inputs64, *params64.values()])
    labels = [f"input {i}" for i in range(len(inputs))] + names
    for name, got, want in zip(labels, grads, grads_ref):
        # float32 backward through ~20 ops; sums over B*L terms: relative 1e-3 of the largest entry.
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4 * max(1.0, want.abs().max().item()),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk_size,attention", LAYER_CASES)
def test_block_matches_float64_reference_forward_and_gradients(chunk_size, attention, seed):
    g = torch.Generator().manual_seed(3 + 10 * seed)
    torch.manual_seed(3 + 10 * seed)
    b, length, d = random_size(chunk_size, g)
    block = MegaBlock(d, z_dim=4, value_dim=5, ffn_hidden_dim=7, ndim=3, chunk_size=chunk_size, attention=attention,
                      max_positions=16)
    perturb_parameters(block, g)
    x = torch.randn(b, length, d, generator=g, requires_grad=True)
    y = block(x)
    params64 = {n: t.detach().double().requires_grad_() for n, t in block.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    y_ref = reference_block(block, x64, params64)
    # float32 forward through ~10 ops on values of order one: 1e-4 is ~100x the rounding.
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    assert_gradients_close(block, [x], y, [x64], params64, y_ref, g)


@pytest.mark.parametrize("chunk_size,attention", LAYER_CASES)
def test_lm_matches_float64_reference_forward_and_gradients(chunk_size, attention):
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    b, _, d = random_size(chunk_size, g)
    length = 11 if chunk_size == 4 else int(torch.randint(1, 17, (1,), generator=g))   # 11: the LM pads to 12
    lm = MegaLM(13, d, 2, z_dim=4, value_dim=5, ffn_hidden_dim=7, ndim=3, chunk_size=chunk_size, attention=attention,
                max_positions=16)
    perturb_parameters(lm, g)
    tokens = torch.randint(0, 13, (b, length), generator=g)
    logits = lm(tokens)
    params64 = {n: t.detach().double().requires_grad_() for n, t in lm.named_parameters()}
    logits_ref = reference_lm(lm, tokens, params64)
    assert logits.dtype == torch.float32 and logits.shape == (b, length, 13)
    # Two float32 blocks, a norm and the head: relative 1e-4 of the logits' size.
    scale = max(1.0, logits_ref.abs().max().item())
    torch.testing.assert_close(logits.double(), logits_ref, rtol=1e-4, atol=1e-4 * scale)
    assert_gradients_close(lm, [], logits, [], params64, logits_ref, g)


@pytest.fixture
def recurrent_ema(monkeypatch):
    """DampedEMA through its recurrence instead of the FFT (same signature and results).

    The FFT mixes all positions numerically, so a layer built on it is causal only up to rounding
    (tests/test_mega_ema.py bounds that leak). With the recurrence every remaining operation reads
    the past only, and causality can be checked bit for bit.
    """
    monkeypatch.setattr(mega_ema, "damped_ema_fft", mega_ema.damped_ema_recurrence)


@pytest.mark.parametrize("chunk_size,attention", LAYER_CASES)
def test_layer_block_and_lm_are_causal_bit_for_bit(chunk_size, attention, recurrent_ema):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    length = 16
    block = MegaBlock(6, 4, 5, 7, ndim=3, chunk_size=chunk_size, attention=attention, max_positions=16).double()
    lm = MegaLM(11, 6, 2, 4, 5, 7, ndim=3, chunk_size=chunk_size, attention=attention, max_positions=16).double()
    perturb_parameters(block, g)
    perturb_parameters(lm, g)
    x = torch.randn(2, length, 6, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 11, (2, length), generator=g)
    for cut in (3, 8, 9):                         # inside the first chunk, on a boundary, just after one
        x2 = x.clone()
        x2[:, cut:] = 10 * torch.randn(2, length - cut, 6, generator=g, dtype=torch.float64)
        tokens2 = tokens.clone()
        tokens2[:, cut:] = (tokens[:, cut:] + 1) % 11
        with torch.no_grad():
            pairs = [(module(x), module(x2)) for module in (block.mega, block)] + [(lm(tokens), lm(tokens2))]
        for y, y2 in pairs:
            assert torch.equal(y[:, :cut], y2[:, :cut]), cut
            assert (y[:, cut:] - y2[:, cut:]).abs().max() > 1e-3, cut


@pytest.mark.parametrize("chunk_size,attention", LAYER_CASES)
def test_layer_block_and_lm_are_causal_with_the_fft_ema(chunk_size, attention):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    length, cut = 16, 9
    block = MegaBlock(6, 4, 5, 7, ndim=3, chunk_size=chunk_size, attention=attention, max_positions=16).double()
    perturb_parameters(block, g)
    x = torch.randn(2, length, 6, generator=g, dtype=torch.float64)
    x2 = x.clone()
    x2[:, cut:] = torch.randn(2, length - cut, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for module in (block.mega, block):
            y, y2 = module(x), module(x2)
            # The EMA's FFT moves the past by its rounding only: in float64, ~1e-15 of the sizes
            # involved (test_mega_ema bounds it); the per-token layers after it, with weights of
            # order one, scale that by a small factor. A leak would move the past by O(1).
            torch.testing.assert_close(y2[:, :cut], y[:, :cut], rtol=0, atol=1e-12)
            assert (y2[:, cut:] - y[:, cut:]).abs().max() > 1e-3

    lm = MegaLM(11, 6, 2, 4, 5, 7, ndim=3, chunk_size=chunk_size, attention=attention, max_positions=16).double()
    perturb_parameters(lm, g)
    tokens = torch.randint(0, 11, (2, length), generator=g)
    tokens2 = tokens.clone()
    tokens2[:, cut:] = (tokens[:, cut:] + 1) % 11
    with torch.no_grad():
        logits, logits2 = lm(tokens), lm(tokens2)
    assert logits.dtype == torch.float32 and logits.shape == (2, length, 11)
    # float64 inside, float32 logits: a 1e-15 move can flip the last bit of a rounded logit.
    torch.testing.assert_close(logits2[:, :cut], logits[:, :cut], rtol=2 * EPS32, atol=0)
    assert (logits2[:, cut:] - logits[:, cut:]).abs().max() > 1e-3


def test_lm_pads_to_whole_chunks_without_changing_real_tokens():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    lm = MegaLM(13, 8, 2, 4, 6, 8, ndim=4, chunk_size=4).double()
    perturb_parameters(lm, g)
    tokens = torch.randint(0, 13, (3, 15), generator=g)       # 15 = 3 chunks + 3 tokens
    longer = torch.cat([tokens, torch.randint(0, 13, (3, 1), generator=g)], dim=1)   # 16 = 4 chunks
    with torch.no_grad():
        torch.testing.assert_close(lm(tokens), lm(longer)[:, :15], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sequence length 15 must be at most chunk_size=4 or a multiple"):
        lm.blocks[0](torch.randn(3, 15, 8, dtype=torch.float64))


def test_attention_map_is_block_diagonal_and_causal():
    torch.manual_seed(6)
    layer = MovingAverageGatedAttention(8, 4, 6, ndim=2, chunk_size=4)
    with torch.no_grad():
        weights = layer.attention_map(torch.randn(2, 12, 8))
    assert weights.shape == (2, 3, 4, 4)
    assert torch.all(weights.triu(1) == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 4))   # softmax rows sum to one


def test_bad_inputs_raise_clear_errors():
    layer = MovingAverageGatedAttention(8, 4, 6, chunk_size=4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, D\) with L >= 1 and D = 8"):
        layer(torch.randn(2, 8, 7))
    with pytest.raises(ValueError, match="sequence length 10 must be at most chunk_size=4 or a multiple"):
        layer(torch.randn(2, 10, 8))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        layer(torch.ones(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_positions=8"):
        MovingAverageGatedAttention(8, 4, 6, max_positions=8)(torch.randn(1, 9, 8))
    with pytest.raises(ValueError, match="attention must be one of"):
        MovingAverageGatedAttention(8, 4, 6, attention="relu")
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
        MovingAverageGatedAttention(8, 4, 6, chunk_size=0)
    with pytest.raises(ValueError, match="bias must have shape"):
        attention_weights(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="v must have shape"):
        chunked_attention(torch.randn(1, 4, 2), torch.randn(1, 4, 2), torch.randn(1, 5, 3), torch.zeros(4, 4), None)
    with pytest.raises(ValueError, match="x must have shape"):
        split_chunks(torch.randn(4, 2), 2)
    lm = MegaLM(10, 8, 1, 4, 6, 8, chunk_size=4)
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 10\)"):
        lm(torch.tensor([[1, 2, 10]]))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        lm(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, L\) with B, L >= 1"):
        lm(torch.zeros(1, 0, dtype=torch.long))
