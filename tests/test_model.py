"""The Megalodon language model (chapter 07): block vs float64 reference, streaming, generation,
gradients, bf16, bad input, configuration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.config import PRESETS, MegalodonConfig, preset
from megalodon_lite.model import (
    MegalodonBlock,
    MegalodonLM,
    MegalodonState,
    megalodon_block_reference,
    sample_next_token,
)


def tiny(**changes) -> MegalodonConfig:
    """A small, fast configuration (chunks of 8 so that short inputs cross several chunks)."""
    return preset("tiny", model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=48, num_heads=2,
                  norm_num_groups=4, chunk_size=8, **changes)


def perturb_zero_initialised(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm scales/shifts, q/k affine and biases start at 0; move them so that they are tested."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "attention.gamma", "attention.beta", ".bias")):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


@pytest.mark.parametrize("changes", [{}, {"swiglu": True, "rescale_nffn": True}])
@given(batch=st.integers(1, 2), length=st.integers(1, 30), seed=st.integers(0, 2**16))
@settings(max_examples=6, deadline=None)
def test_block_matches_float64_reference_forward_and_gradients(changes, batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = tiny(**changes)
    block = MegalodonBlock(cfg, layer_index=1)
    perturb_zero_initialised(block, generator)
    x = torch.randn(batch, length, cfg.model_dim, generator=generator)

    # float32 fast path vs float64 reference: float32 unit roundoff is 6e-8 and an output passes
    # through a few hundred roundings, so 2e-5 of the output scale leaves a wide margin.
    with torch.no_grad():
        expected = megalodon_block_reference(block, x)
        out, _ = block(x)
    scale = expected.abs().max().item()
    assert (out.double() - expected).abs().max().item() <= 2e-5 * scale

    # float64 fast path vs reference, forward and every gradient: only summation order differs,
    # 1e-9 relative is ~10^7 float64 roundoffs.
    block64 = block.double()
    x64 = x.double().requires_grad_()
    weight = torch.randn(batch, length, cfg.model_dim, generator=generator, dtype=torch.float64)
    grads = []
    for forward in (lambda: block64(x64)[0], lambda: megalodon_block_reference(block64, x64)):
        block64.zero_grad(set_to_none=True)
        x64.grad = None
        (forward() * weight).sum().backward()
        grads.append({"x": x64.grad.clone(), **{n: p.grad.clone() for n, p in block64.named_parameters()}})
    for name, fast in grads[0].items():
        ref = grads[1][name]
        assert torch.allclose(fast, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item()), name


@given(data=st.data())
@settings(max_examples=8, deadline=None)
def test_streaming_in_random_pieces_equals_one_call(data):
    cfg = tiny(num_layers=2)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    model = MegalodonLM(cfg).double().eval()
    perturb_zero_initialised(model, torch.Generator().manual_seed(seed))
    # piece sizes: single tokens, exactly a chunk, one off a chunk either way, or anything up to
    # three chunks, so that pieces start and end inside chunks, on boundaries and across several
    c = cfg.chunk_size
    sizes = data.draw(st.lists(st.one_of(st.just(1), st.sampled_from([c - 1, c, c + 1]), st.integers(1, 3 * c)),
                               min_size=1, max_size=8), label="piece sizes")
    length = sum(sizes)
    tokens = torch.randint(0, cfg.vocab_size, (2, length))
    boundaries = [0, *itertools.accumulate(sizes)]
    with torch.no_grad():
        full, full_state = model(tokens)
        pieces, state = [], None
        for start, stop in zip(boundaries[:-1], boundaries[1:]):
            logits, state = model(tokens[:, start:stop], state)
            pieces.append(logits)
    # float64 throughout: pieces and one call differ only in summation order (~1e-16 relative).
    assert torch.allclose(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)
    assert torch.equal(state.num_tokens, full_state.num_tokens)
    for a, b in zip(state.tensors(), full_state.tensors()):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-10)


def test_single_token_steps_across_chunk_boundaries_float32():
    cfg = tiny()
    torch.manual_seed(0)
    model = MegalodonLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 3 * cfg.chunk_size + 3))
    with torch.no_grad():
        full, _ = model(tokens)
        state, steps = None, []
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t:t + 1], state)
            steps.append(logits)
    # float32: one token at a time changes the summation order of the norms and the CEMA
    # (recurrence vs chunked form); logits are O(1), 1e-4 is ~1000 float32 roundoffs.
    assert torch.allclose(torch.cat(steps, 1), full, rtol=0, atol=1e-4)


def test_every_norm_uses_the_configured_epsilon():
    model = MegalodonLM(tiny(norm_eps=1e-3))
    norms = [m for m in model.modules() if hasattr(m, "eps")]
    # per block: timestep norm, RMS norm, q/k RMS norm, FFN layer norm; plus the final norm
    assert len(norms) == 4 * model.config.num_layers + 1
    assert all(m.eps == 1e-3 for m in norms), [(type(m).__name__, m.eps) for m in norms]


def test_state_size_does_not_grow_with_the_stream():
    cfg = tiny(num_layers=1)
    model = MegalodonLM(cfg).eval()
    sizes = []
    state = None
    with torch.no_grad():
        for _ in range(6):
            _, state = model(torch.randint(0, cfg.vocab_size, (1, 2 * cfg.chunk_size + 3)), state)
            sizes.append(state.nbytes)
    # every call ends 3, 6, 9 mod 8 ... tokens into a chunk: at most chunk_size-1 cached tokens
    bound = sizes[0] + 2 * cfg.num_layers * cfg.chunk_size * (cfg.z_dim + cfg.value_dim) * 4
    assert max(sizes) <= bound
    assert all(layer.attention.k.shape[2] < cfg.chunk_size for layer in state.layers)
    assert int(state.num_tokens[0]) == 6 * (2 * cfg.chunk_size + 3)


def test_gradients_reach_every_parameter():
    cfg = tiny(num_layers=2)
    torch.manual_seed(1)
    model = MegalodonLM(cfg)
    perturb_zero_initialised(model, torch.Generator().manual_seed(1))
    tokens = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk_size + 2))
    logits, _ = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:]).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name


def test_generation_is_deterministic_and_greedy_matches_teacher_forcing():
    cfg = tiny()
    torch.manual_seed(2)
    model = MegalodonLM(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    a = model.generate(prompt, 20, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 20, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 20) and a.dtype == torch.int64 and torch.equal(a, b)
    assert model.training  # generate restores the mode it found

    greedy = model.generate(prompt, 2 * cfg.chunk_size, temperature=0)
    model.eval()
    with torch.no_grad():
        logits, _ = model(torch.cat([prompt, greedy], 1))
    assert torch.equal(greedy, logits[:, prompt.shape[1] - 1:-1].argmax(-1))
    assert model.generate(prompt, 0).shape == (2, 0)

    # a prompt of several chunks is read chunk by chunk: the same first token as one full call
    long_prompt = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk_size + 2))
    with torch.no_grad():
        expected = model(long_prompt)[0][:, -1].argmax(-1)
    calls = []
    real_forward = model.forward
    model.forward = lambda tokens, state=None: calls.append(tokens.shape[1]) or real_forward(tokens, state)
    assert torch.equal(model.generate(long_prompt, 3, temperature=0)[:, 0], expected)
    assert calls == [cfg.chunk_size] * 3 + [2, 1, 1]  # never more than a chunk per call


def test_top_k_sampling_only_draws_from_the_top_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top = torch.topk(logits, 3).indices
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        token = sample_next_token(logits, temperature=2.0, top_k=3, generator=generator)
        assert (top == token[:, None]).any(-1).all()
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))


def test_bf16_weights_over_64k_tokens_stay_finite():
    # bf16 *weights* (model.to(torch.bfloat16)), as the official mixed-precision training computes:
    # every activation is bf16; CEMA and the norms keep their statistics in float32 internally.
    cfg = preset("tiny", num_layers=1, model_dim=16, z_dim=8, value_dim=16, ffn_hidden_dim=16, num_heads=1,
                 norm_num_groups=2, chunk_size=256)
    torch.manual_seed(3)
    model = MegalodonLM(cfg).to(torch.bfloat16).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 65_536))
    with torch.no_grad():
        logits, state = model(tokens)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(t).all() for t in state.tensors() if t.is_floating_point() or t.is_complex())


def test_logits_are_float32_under_autocast():
    cfg = tiny()
    model = MegalodonLM(cfg).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randint(0, cfg.vocab_size, (1, 20)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("bad, error, words", [
    (torch.zeros(1, 4), TypeError, "integer"),
    ([[1, 2, 3]], TypeError, "torch.Tensor"),
    (torch.tensor([1, 2, 3]), ValueError, "(batch, length)"),
    (torch.zeros(1, 0, dtype=torch.int64), ValueError, "non-empty"),
    (torch.tensor([[1, 256]]), ValueError, "vocab_size"),
    (torch.tensor([[-1, 2]]), ValueError, "vocab_size"),
])
def test_bad_tokens_are_refused(bad, error, words):
    model = MegalodonLM(tiny(num_layers=1))
    with pytest.raises(error, match="tokens") as info:
        model(bad)
    assert words in str(info.value)


def test_bad_state_and_generation_arguments_are_refused():
    cfg = tiny(num_layers=1)
    model = MegalodonLM(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 5))
    _, state = model(tokens)
    with pytest.raises(ValueError, match="batch size"):
        model(tokens[:1], state)
    with pytest.raises(TypeError, match="MegalodonState"):
        model(tokens, state=(1, 2))
    with pytest.raises(ValueError, match="layers"):
        MegalodonLM(tiny(num_layers=2))(tokens, state)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(tokens, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(tokens, 3, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(tokens, -1)


@pytest.mark.parametrize("changes, field", [
    ({"num_heads": 3}, "z_dim"),
    ({"norm_num_groups": 7}, "norm_num_groups"),
    ({"dropout": 1.0}, "dropout"),
    ({"model_dim": 0}, "model_dim"),
    ({"vocab_size": 2.5}, "vocab_size"),
    ({"init_mode": "orthogonal"}, "init_mode"),
    ({"swiglu": 1}, "swiglu"),
    ({"z_dim": 6, "num_heads": 2}, "z_dim"),
])
def test_config_validation_names_the_field(changes, field):
    with pytest.raises((ValueError, TypeError), match=field):
        preset("tiny", **changes)


def test_config_dict_round_trip_and_unknown_fields():
    cfg = preset("mega1.3B_pg19")
    assert MegalodonConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="colour"):
        MegalodonConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    values = cfg.to_dict()
    del values["chunk_size"]
    with pytest.raises(ValueError, match="chunk_size"):
        MegalodonConfig.from_dict(values)
    with pytest.raises(ValueError, match="mega8B"):
        preset("mega8B")
    # The paper's 7B (Megalodon §4.1): the repository's SwiGLU 7B shape, with the paper's chunk
    # size and RoPE base.
    assert preset("mega7B").differences(preset("mega7.3B")) == ["chunk_size", "rope_base"]
    assert preset("mega7B").chunk_size == 4096 and preset("mega7B").rope_base == 100_000
    with pytest.raises(TypeError, match="MegalodonConfig"):
        MegalodonLM(cfg.to_dict())


def expected_parameter_count(cfg: MegalodonConfig) -> int:
    """Count from the shapes of the official modules (Megalodon §3), independently of ours."""
    D, z, v, f, N = cfg.model_dim, cfg.z_dim, cfg.value_dim, cfg.ffn_hidden_dim, cfg.cema_ndim
    layer = (2 * D                      # timestep norm weight, bias
             + D * (4 * N + 2)          # CEMA alpha, delta (N), gamma (2N), theta, omega
             + D                        # RMS norm weight
             + (D * z + z) + 2 * (D * v + v) + (D * D + D) + v * D   # W_z, W_v, W_r, W_h1 (+ biases), W_h2
             + 2 * 2 * z                # q/k gamma and beta
             + 2 * D + (3 if cfg.swiglu else 2) * D * f + (D if cfg.rescale_nffn else 0))  # FFN
    embeddings = cfg.vocab_size * D * (1 if cfg.share_emb else 2)
    return cfg.num_layers * layer + 2 * D + embeddings


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_the_equations(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = MegalodonLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(cfg)


def test_initialisation_follows_the_official_code():
    cfg = preset("tiny", model_dim=256, value_dim=512, z_dim=64, ffn_hidden_dim=512, vocab_size=4096)
    torch.manual_seed(4)
    model = MegalodonLM(cfg)
    D = cfg.model_dim
    # TruncNormal(0, 1/sqrt(D)) cut at 3 sigma for embedding and head
    for weight in (model.embed.weight, model.head.weight):
        assert weight.abs().max() <= 3 / math.sqrt(D) + 1e-7
        assert abs(weight.std().item() * math.sqrt(D) - 0.986) < 0.02  # std of a N(0,1) cut at ±3σ
    # kaiming_normal(a=sqrt(5)): std = sqrt(2 / (1 + 5)) / sqrt(fan_in) = 1 / sqrt(3 fan_in)
    block = model.blocks[0]
    for linear in (block.mega.wv, block.mega.wr, block.ffn.fc1, block.ffn.fc2, block.mega.wh2):
        fan_in = linear.weight.shape[1]
        assert abs(linear.weight.std().item() * math.sqrt(3 * fan_in) - 1) < 0.03
    for name, param in model.named_parameters():
        if name.endswith(("norm.weight", "norm.bias", ".bias", "attention.gamma", "attention.beta")):
            assert torch.count_nonzero(param) == 0, name
    tied = MegalodonLM(preset("tiny", share_emb=True))
    assert tied.head.weight is tied.embed.weight

    # reset_parameters re-draws a trained-looking model back to the same kind of initialisation
    perturb_zero_initialised(model, torch.Generator().manual_seed(5))
    model.reset_parameters()
    for name, param in model.named_parameters():
        if name.endswith(("norm.weight", "norm.bias", ".bias", "attention.gamma", "attention.beta")):
            assert torch.count_nonzero(param) == 0, name
    assert model.embed.weight.abs().max() <= 3 / math.sqrt(D) + 1e-7


@pytest.mark.parametrize("rate", ["dropout", "hidden_dropout", "attention_dropout"])
def test_each_dropout_rate_is_wired_and_only_active_in_training(rate):
    cfg = tiny(**{rate: 0.2})  # one rate at a time: a rate that reaches no layer leaves training deterministic
    model = MegalodonLM(cfg)
    assert model.blocks[0].mega.attention.attention_dropout == cfg.attention_dropout
    tokens = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        torch.manual_seed(0)
        train_a, _ = model(tokens)
        torch.manual_seed(1)
        train_b, _ = model(tokens)
        model.eval()
        eval_a, _ = model(tokens)
        eval_b, _ = model(tokens)
    assert not torch.equal(train_a, train_b)
    assert torch.equal(eval_a, eval_b)


def test_state_detach_owns_its_memory():
    cfg = tiny(num_layers=1)
    model = MegalodonLM(cfg).eval()
    _, state = model(torch.randint(0, cfg.vocab_size, (1, 10 * cfg.chunk_size + 3)))
    assert isinstance(state, MegalodonState)
    expected = sum(t.numel() * t.element_size() for t in state.tensors())
    assert state.nbytes == expected
    assert not any(t.requires_grad for t in state.tensors())


def test_state_prints_in_one_line_and_nbytes_is_a_property_like_tensor_nbytes():
    cfg = tiny(num_layers=2)
    _, state = MegalodonLM(cfg).eval()(torch.randint(0, cfg.vocab_size, (3, 2 * cfg.chunk_size + 5)))
    assert isinstance(state.nbytes, int) and state.nbytes == sum(layer.nbytes for layer in state.layers) + sum(
        t.untyped_storage().nbytes() for t in state.final_norm)
    text = repr(state)
    assert text == f"MegalodonState(2 layers, batch 3, {2 * cfg.chunk_size + 5} tokens seen, {state.nbytes:,} bytes)"
    assert repr(state.layers[0]) == (f"LayerState(batch 3, {2 * cfg.chunk_size + 5} tokens seen, 5 in the unfinished "
                                     f"chunk, {state.layers[0].nbytes:,} bytes)")
    assert "\n" not in str(state) and "tensor" not in str(state)


@pytest.mark.parametrize("changes, words", [
    ({"model_dim": 64, "norm_num_groups": 4}, "in layer 0's CEMA state, model_dim 32 (this model: 64)"),
    ({"cema_ndim": 8}, "in layer 0's CEMA state, cema_ndim 16 (this model: 8)"),
    ({"norm_num_groups": 8}, "in layer 0's norm mean, norm_num_groups 4 (this model: 8)"),
    ({"num_heads": 1}, "in layer 0's attention keys, num_heads 2 (this model: 1), z_dim / num_heads 8 (this model: 16)"),
    ({"value_dim": 64}, "in layer 0's attention values, value_dim / num_heads 16 (this model: 32)"),
    ({"chunk_size": 4}, "caches 5 tokens of an unfinished chunk, this model's chunk_size is 4"),
])
def test_a_state_from_a_differently_shaped_model_is_refused_at_the_model(changes, words):
    """Not deep inside CEMA or the attention: the error names the model-level difference."""
    cfg = tiny(num_layers=1)
    _, state = MegalodonLM(cfg)(torch.randint(0, cfg.vocab_size, (1, cfg.chunk_size + 5)))
    other = MegalodonLM(cfg.replace(**changes))
    with pytest.raises(ValueError, match="state does not fit this model") as info:
        other(torch.randint(0, cfg.vocab_size, (1, 3)), state)
    assert words in str(info.value)


def test_a_state_of_another_precision_is_refused_at_the_model():
    cfg = tiny(num_layers=1)
    _, state = MegalodonLM(cfg)(torch.randint(0, cfg.vocab_size, (1, 5)))
    with pytest.raises(TypeError, match="CEMA state is torch.complex64, a torch.float64 model keeps torch.complex128"):
        MegalodonLM(cfg).double()(torch.randint(0, cfg.vocab_size, (1, 3)), state)


@settings(max_examples=12, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), out_dim=st.integers(1, 5),
       with_multiplier=st.booleans(), seed=st.integers(0, 2**16))
def test_gated_projection_equals_the_formula_and_saves_its_inputs_only(shape, out_dim, with_multiplier, seed):
    """The memory-lean gated projection: the value and every gradient of (SiLU(a) [* x]) @ W.T in float64
    (rounding only: ~1e-16), and only a, W (and x) kept for the backward: not SiLU(a), nor the product."""
    from megalodon_lite.model import gated_projection

    gen = torch.Generator().manual_seed(seed)
    a, x = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(out_dim, shape[-1], generator=gen, dtype=torch.float64)
    grad = torch.randn(*shape[:-1], out_dim, generator=gen, dtype=torch.float64)
    inputs = (a, weight, x) if with_multiplier else (a, weight)
    saved = []
    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gated_projection(*leaves)
    got = torch.autograd.grad(out, leaves, grad)
    plain = [t.clone().requires_grad_() for t in inputs]
    gated = torch.nn.functional.silu(plain[0]) * (plain[2] if with_multiplier else 1)
    ref = gated @ plain[1].T
    want = torch.autograd.grad(ref, plain, grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    kept = {t.data_ptr() for t in saved if t is not None}
    assert kept == {t.data_ptr() for t in leaves}


@pytest.mark.parametrize("with_multiplier", [True, False])
def test_gated_projection_under_autocast_matches_the_autocast_formula(with_multiplier):
    """Under bf16 autocast (CPU) the value and gradients equal those of the plain formula under the
    same autocast bit for bit: the backward recomputes the forward's bf16 product and runs the same
    bf16 products and SiLU backward as autograd does for autocast's linear."""
    from megalodon_lite.model import gated_projection

    F = torch.nn.functional
    gen = torch.Generator().manual_seed(3)
    a, x = (torch.randn(2, 7, 16, generator=gen).bfloat16() for _ in range(2))
    weight = torch.randn(5, 16, generator=gen)
    grad = torch.randn(2, 7, 5, generator=gen).bfloat16()
    inputs = (a, weight, x) if with_multiplier else (a, weight)

    def plain(a, w, x=None):
        return F.linear(F.silu(a) if x is None else F.silu(a) * x, w)

    results = []
    for fn in (gated_projection, plain):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_recomputed_on_backward_gives_the_same_gradients_without_keeping_v():
    """A tensor saved inside the context in v's memory (v itself or a strided view) is rebuilt from the
    source in the backward: gradients bit-identical to keeping it, fn really ran, and nothing keeps the
    source alive after the backward (the hooks hold it weakly: no reference cycle with the graph)."""
    import gc
    import weakref

    from megalodon_lite.model import recomputed_on_backward

    gen = torch.Generator().manual_seed(3)
    x, w, grad = (torch.randn(4, 6, 8, generator=gen) for _ in range(3))
    calls = []

    def silu(t):
        calls.append(1)
        return torch.nn.functional.silu(t)

    def run(recompute: bool):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        v_pre = 2 * xs
        v = torch.nn.functional.silu(v_pre)
        source = weakref.ref(v_pre)
        context = recomputed_on_backward(v, v_pre, silu) if recompute else torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t)
        with context:
            out = v.transpose(1, 2)[:, 1:] * ws.transpose(1, 2)[:, 1:]   # saves strided views of v and w
            state = v[:, :1].exp()                                          # a branch no backward runs
        del v_pre, v
        grads = torch.autograd.grad(out, (xs, ws), grad.transpose(1, 2)[:, 1:])
        del out, state
        return grads, source

    gc.disable()
    try:
        plain, _ = run(False)
        assert not calls
        recomputed, source = run(True)
        assert calls, "fn never ran: v was kept"
        assert source() is None, "the source outlived its graph"
    finally:
        gc.enable()
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="contiguous"):
        recomputed_on_backward(x.transpose(0, 1), x, silu)


def test_training_steps_through_the_kernels_leave_nothing_alive():
    """The layer's saved-tensor hooks around the Triton attention (interpreted on a CPU) leave no
    reference cycle: with the garbage collector off, a second step leaves as many live tensors as
    the one before (after a first step that fills the kernels' caches), and the gradients equal the
    PyTorch attention path's."""
    import gc

    torch.manual_seed(0)
    model = MegalodonLM(tiny(backend="triton"))
    reference = MegalodonLM(tiny(backend="torch"))
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (1, 20))

    def step(m):
        m.zero_grad(set_to_none=True)
        logits, _ = m(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()

    def live() -> int:
        return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.Tensor))

    step(model)   # fills the caches of the launchers (tables, layouts)
    gc.collect()
    gc.disable()
    try:
        step(model)
        after_one = live()
        step(model)
        assert live() == after_one
    finally:
        gc.enable()
    step(reference)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("swiglu", [False, True])
def test_layer_recomputation_in_the_backward_changes_no_gradient(swiglu):
    """The layer's saved v and gate input rebuilt in the backward (``recompute_values``) and the
    memory-lean gated projections give bit-identical gradients to keeping everything (float32)."""
    gen = torch.Generator().manual_seed(7)
    model = MegalodonLM(tiny(swiglu=swiglu))
    perturb_zero_initialised(model, gen)
    tokens = torch.randint(0, model.config.vocab_size, (2, 21), generator=gen)
    weights = torch.randn(2, 21, model.config.vocab_size, generator=gen)
    grads = []
    for recompute in (True, False):
        for block in model.blocks:
            block.mega.recompute_values = recompute
        model.zero_grad()
        (model(tokens)[0] * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_written_out_dropout_path_computes_what_the_lean_path_does():
    """With hidden dropout in training, the layer and the FFN write the gated products out plainly
    (dropout needs its mask); with a rate of 1e-9 (no element dropped, values scaled by 1 + 1e-9)
    that path must give the lean path's output and gradients to 1e-7 (float64)."""
    gen = torch.Generator().manual_seed(11)
    model = MegalodonLM(tiny(swiglu=True, hidden_dropout=1e-9)).double().train()
    perturb_zero_initialised(model, gen)
    tokens = torch.randint(0, model.config.vocab_size, (2, 19), generator=gen)
    weights = torch.randn(2, 19, model.config.vocab_size, generator=gen, dtype=torch.float64)
    results = []
    for rate in (1e-9, 0.0):  # written out, then lean
        for module in model.modules():
            if hasattr(module, "hidden_dropout"):
                module.hidden_dropout = rate
        model.zero_grad()
        logits = model(tokens)[0]
        (logits * weights).sum().backward()
        results.append([logits.detach()] + [p.grad.clone() for p in model.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7 * want.abs().max().item())
