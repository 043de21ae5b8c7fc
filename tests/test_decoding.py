"""The decoding step on fixed-size buffers (megalodon_lite.decoding), run eagerly on the CPU.

The step is the one a CUDA graph replays (tests/test_decoding_gpu.py checks the replay against this
eager run): here it is compared, token by token, with each model's own streaming forward,
``model(token, state)`` and ``generate``.

Tolerances: float32 on the CPU, both paths compute the same function from the same weights, in a
different order (a softmax over a masked buffer against one over the exact cache; the one-step
timestep-norm update against the cumulative form). Each operation then rounds differently by a few
units of float32's 2^-24, over a handful of layers: logits of size ~1-10 agree to ~1e-6 (measured),
and 2e-5 leaves a margin that still catches any wrong slot, position or missing term (those move
logits by 1e-2 or more).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.baseline import KVCache, LlamaConfig, LlamaLM
from megalodon_lite.config import preset
from megalodon_lite.decoding import (FIRST_SPAN, LlamaDecoder, MegalodonDecoder, attention_span, decode_stream,
                                     make_decoder, static_generate, use_cuda_graph)
from megalodon_lite.model import MegalodonLM

TOLERANCE = dict(rtol=2e-5, atol=2e-5)  # float32, see the module docstring


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm scales/shifts, q/k affine and biases start at 0; move them so that the step must use them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "attention.gamma", "attention.beta", ".bias", "alpha")):
                param.copy_(0.3 * torch.randn(param.shape, generator=g, dtype=param.dtype))
    return model.eval()


def megalodon(seed: int, chunk_size: int = 8, heads: int = 2, **changes) -> MegalodonLM:
    torch.manual_seed(seed)
    config = preset("tiny", model_dim=32, z_dim=8 * heads, value_dim=16 * heads, ffn_hidden_dim=48,
                    num_heads=heads, norm_num_groups=4, chunk_size=chunk_size, **changes)
    return perturb(MegalodonLM(config), seed)


def llama(seed: int, heads: int = 2, **changes) -> LlamaLM:
    torch.manual_seed(seed)
    values = dict(vocab_size=256, num_layers=2, model_dim=8 * heads, num_heads=heads, ffn_hidden_dim=40)
    return perturb(LlamaLM(LlamaConfig(**{**values, **changes})), seed)


def streaming_logits(model, prompt: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits after the prompt and after each token, through the model's own streaming forward."""
    memory = KVCache.empty() if isinstance(model, LlamaLM) else None
    logits, memory = model(prompt, memory)
    out = [logits[:, -1]]
    for t in range(tokens.shape[1]):
        logits, memory = model(tokens[:, t:t + 1], memory)
        out.append(logits[:, 0])
    return out


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["megalodon", "llama"]), batch=st.integers(1, 3), chunk_size=st.integers(2, 9),
       heads=st.integers(1, 2), prompt_length=st.integers(1, 20), steps=st.integers(1, 30), seed=st.integers(0, 2**16),
       swiglu=st.booleans())
def test_the_static_step_gives_the_streaming_logits(kind, batch, chunk_size, heads, prompt_length, steps, seed, swiglu):
    """Token by token, across chunk boundaries (Megalodon) and attention spans (the baseline), with
    prompts shorter and longer than a chunk."""
    with torch.no_grad():
        if kind == "megalodon":
            model = megalodon(seed, chunk_size, heads, swiglu=swiglu, rescale_nffn=swiglu, scale_emb=swiglu)
        else:
            model = llama(seed, heads)
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 256, (batch, prompt_length), generator=g)
        tokens = torch.randint(0, 256, (batch, steps), generator=g)
        expected = streaming_logits(model, prompt, tokens)
        decoder = make_decoder(model, batch, prompt_length + steps)
        got = [decoder.prefill(prompt).clone()]
        got += [decoder.step(tokens[:, t]).clone() for t in range(steps)]
    for t, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"after {prompt_length} + {t} tokens: {m}")


def test_megalodon_state_after_decoding_equals_the_streaming_state():
    """Statistics, CEMA state and the unfinished chunk's keys and values, after crossing 3 boundaries."""
    model = megalodon(3, chunk_size=5)
    prompt, tokens = torch.randint(0, 256, (2, 7)), torch.randint(0, 256, (2, 14))
    with torch.no_grad():
        _, state = model(torch.cat([prompt, tokens], 1))
        decoder = MegalodonDecoder(model, 2)
        decoder.prefill(prompt)
        for t in range(tokens.shape[1]):
            decoder.step(tokens[:, t])
    got = decoder.state()
    assert decoder.position == 21 % 5 == got.layers[0].attention.length
    for a, b in zip(got.tensors(), state.tensors()):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **TOLERANCE)
    # the state continues the stream in the model's own forward
    more = torch.randint(0, 256, (2, 3))
    torch.testing.assert_close(model(more, got)[0], model(more, state)[0], **TOLERANCE)


def test_float64_models_decode_in_float64():
    model = megalodon(5).double()
    prompt, tokens = torch.randint(0, 256, (1, 11)), torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        expected = streaming_logits(model, prompt, tokens)
        decoder = MegalodonDecoder(model, 1)
        got = [decoder.prefill(prompt).clone()] + [decoder.step(tokens[:, t]).clone() for t in range(12)]
    assert all(g.dtype == torch.float64 for g in got)
    for a, b in zip(got, expected):  # float64: the two orders of operations agree to ~1e-15
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kind", ["megalodon", "llama"])
def test_greedy_and_sampled_tokens_equal_generate(kind):
    model = megalodon(7) if kind == "megalodon" else llama(7)
    prompt = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, 25, temperature=0)
    assert torch.equal(static_generate(model, prompt, 25, temperature=0, cuda_graph=False), expected)
    sampled = model.generate(prompt, 25, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(static_generate(model, prompt, 25, temperature=0.9, top_k=20, cuda_graph=False,
                                       generator=torch.Generator().manual_seed(2)), sampled)
    assert static_generate(model, prompt, 0, cuda_graph=False).shape == (2, 0)


def test_slots_not_yet_written_never_reach_the_output():
    """Garbage in every slot the step must mask (Megalodon: after the position in the chunk; the
    baseline: after the stream) leaves the logits as they were."""
    for model in (megalodon(9, chunk_size=8), llama(9)):
        prompt, tokens = torch.randint(0, 256, (1, 11)), torch.randint(0, 256, (1, 6))
        logits = []
        for poison in (False, True):
            with torch.no_grad():
                decoder = make_decoder(model, 1, 40)
                decoder.prefill(prompt)
                if isinstance(decoder, MegalodonDecoder):
                    buffers = [b for layer in decoder.layers for b in (layer.attention.k, layer.attention.v)]
                    start = decoder.position
                else:
                    buffers, start = decoder.cache.keys + decoder.cache.values, 11
                    assert all(not b[:, :, start:].any() for b in buffers)  # prefill sets them to 0
                if poison:
                    for b in buffers:
                        b[:, :, start:] = 1e4 * torch.randn(b[:, :, start:].shape)
                logits.append([decoder.step(tokens[:, t]).clone() for t in range(tokens.shape[1])])
        for a, b in zip(*logits):
            assert torch.equal(a, b)


def test_attention_spans_grow_by_quarter_octaves_and_are_capped():
    spans = [attention_span(n, 10**9) for n in range(1, 5000)]
    assert spans[0] == FIRST_SPAN and sorted(spans) == spans
    assert sorted(set(spans))[:9] == [16, 20, 24, 28, 32, 40, 48, 56, 64]
    for n, span in enumerate(spans, start=1):
        assert n <= span <= max(FIRST_SPAN, 1.25 * n)
    assert attention_span(100, 90) == 90 and attention_span(3, 90) == FIRST_SPAN


def test_the_baseline_decoder_crosses_spans_and_refuses_to_overflow():
    model = llama(11)
    decoder = LlamaDecoder(model, 1, max_length=30)
    decoder.prefill(torch.randint(0, 256, (1, 14)))
    seen = set()
    for _ in range(16):
        seen.add(decoder._graph_key())
        decoder.step(torch.randint(0, 256, (1,)))
    assert seen == {16, 20, 24, 28, 30}
    with pytest.raises(ValueError, match="cache is full: it holds max_length=30"):
        decoder.step(torch.randint(0, 256, (1,)))
    assert decoder.state_nbytes == 2 * 2 * 30 * 16 * 4 + 8  # keys and values, 2 layers, 30 x 16 float32, pos


def test_megalodon_memory_does_not_depend_on_the_stream():
    model = megalodon(13, chunk_size=8)
    sizes = []
    for length in (3, 8, 50):
        decoder = MegalodonDecoder(model, 1)
        decoder.prefill(torch.randint(0, 256, (1, length)))
        sizes.append(decoder.state_nbytes)
    assert len(set(sizes)) == 1


def test_bad_uses_are_refused_clearly():
    model = megalodon(0)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        llama(0).generate(torch.zeros(1, 3, dtype=torch.long), 2, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be True, False or None"):
        use_cuda_graph("yes", torch.device("cpu"))
    assert use_cuda_graph(None, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="call model.eval"):
        MegalodonDecoder(megalodon(0).train(), 1)
    decoder = MegalodonDecoder(model, 2)
    with pytest.raises(RuntimeError, match="call prefill"):
        decoder.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 1, the decoder 2"):
        decoder.prefill(torch.zeros(1, 3, dtype=torch.long))
    decoder.prefill(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token must hold 2 ids"):
        decoder.step(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length=4"):
        LlamaDecoder(llama(0), 1, 4).prefill(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="MegalodonLM or a LlamaLM"):
        make_decoder(torch.nn.Linear(2, 2), 1, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(decode_stream(model, torch.zeros(1, 3, dtype=torch.long), -1))
