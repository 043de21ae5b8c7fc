"""The Llama-style baseline (chapter 10): attention, the KV cache, generation, the parameter match."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.baseline import (KVCache, LlamaConfig, LlamaLM, causal_attention, config_parameter_count,
                                     matched_llama_config, parameter_count)
from megalodon_lite.checkpoint import CheckpointError, load_checkpoint, load_config, save_checkpoint
from megalodon_lite.config import preset
from megalodon_lite.model import MegalodonLM


def small_llama(seed: int = 0, **changes) -> LlamaLM:
    torch.manual_seed(seed)
    values = dict(vocab_size=257, num_layers=2, model_dim=32, num_heads=4, ffn_hidden_dim=40)
    return LlamaLM(LlamaConfig(**{**values, **changes}))


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + bottom-right causal mask) v, written out in float64."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    visible = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
    scores = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, -math.inf)
    return torch.softmax(scores, -1) @ v.double()


@settings(max_examples=15, deadline=None)
@given(n_q=st.integers(1, 12), extra=st.integers(0, 9), heads=st.integers(1, 3), dim=st.sampled_from([2, 8, 16]),
       seed=st.integers(0, 2**16))
def test_causal_attention_matches_the_explicit_softmax(n_q, extra, heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, dim, generator=g) for n in (n_q, n_q + extra, n_q + extra))
    out = causal_attention(q, k, v)
    # float32 inputs: relative error a few unit roundoffs (6e-8) times the sum length
    assert torch.allclose(out.double(), reference_attention(q, k, v), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("n_q, n_k", [(6, 6), (3, 8), (1, 5)])
def test_causal_attention_gradients(n_q, n_k):
    g = torch.Generator().manual_seed(n_q * 10 + n_k)
    q, k, v = (torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for n in (n_q, n_k, n_k))
    assert torch.autograd.gradcheck(causal_attention, (q, k, v), fast_mode=True)


def test_config_is_validated_and_round_trips():
    config = LlamaConfig(vocab_size=257, num_layers=2, model_dim=64, num_heads=2, ffn_hidden_dim=100)
    assert LlamaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config and config.head_dim == 32
    with pytest.raises(ValueError, match="num_heads"):
        config.replace(num_heads=3)
    with pytest.raises(ValueError, match="num_layers"):
        config.replace(num_layers=0)
    with pytest.raises(ValueError, match="unknown"):
        LlamaConfig.from_dict({**config.to_dict(), "n_heads": 2})


def test_pieces_through_the_cache_equal_one_call():
    model = small_llama().double().eval()
    tokens = torch.randint(0, 257, (3, 45))
    with torch.no_grad():
        whole, whole_cache = model(tokens)
        for cuts in ([0, 1, 2, 45], [0, 20, 21, 30, 45], [0, 44, 45]):
            cache, pieces = KVCache.empty(), []  # no reserved room: the buffers grow as needed
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                logits, cache = model(tokens[:, lo:hi], cache)
                pieces.append(logits)
            # float64: only the order of summation differs
            assert torch.allclose(torch.cat(pieces, 1), whole, atol=1e-10, rtol=0)
            assert cache.length == 45 and cache.keys[0].shape[2] >= 45
            assert torch.allclose(cache.keys[1][:, :, :45], whole_cache.keys[1], atol=1e-10, rtol=0)
    assert whole_cache.used_nbytes == 2 * 2 * 3 * 45 * 32 * 8  # layers x (k, v) x B x L x D x float64


def test_causality_and_gradients():
    model = small_llama()
    tokens = torch.randint(0, 257, (2, 30))
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 257
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    assert torch.equal(a[:, :20], b[:, :20]) and not torch.equal(a[:, 20:], b[:, 20:])
    logits, _ = model(tokens)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_generate_is_greedy_teacher_forcing_and_reproducible():
    model = small_llama().eval()
    prompt = torch.randint(0, 257, (2, 9))
    greedy = model.generate(prompt, 15, temperature=0)
    with torch.no_grad():
        teacher = model(torch.cat([prompt, greedy], 1))[0][:, 8:-1].argmax(-1)
    assert torch.equal(greedy, teacher)
    first = model.generate(prompt, 10, top_k=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, model.generate(prompt, 10, top_k=20, generator=torch.Generator().manual_seed(1)))
    assert model.generate(prompt, 0).shape == (2, 0) and model.training is False


def test_bad_input_is_refused():
    model = small_llama()
    with pytest.raises(ValueError, match=r"\[0, 257\)"):
        model(torch.tensor([[257]]))
    _, cache = model(torch.randint(0, 257, (2, 4)))
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.randint(0, 257, (3, 1)), cache)
    with pytest.raises(TypeError, match="KVCache"):
        model(torch.randint(0, 257, (2, 1)), object())
    with pytest.raises(TypeError, match="LlamaConfig"):
        LlamaLM(preset("tiny"))


def test_parameter_count_on_meta_equals_the_real_model():
    model = small_llama(share_emb=True)
    assert config_parameter_count(model.config) == parameter_count(model)
    assert model.head.weight is model.embed.weight
    assert config_parameter_count(preset("tiny")) == parameter_count(MegalodonLM(preset("tiny")))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_matched_baseline_is_within_five_percent(name):
    mega = preset(name, vocab_size=257)
    llama = matched_llama_config(mega)
    target, got = config_parameter_count(mega), config_parameter_count(llama)
    assert abs(got - target) <= 0.05 * target
    assert (llama.vocab_size, llama.model_dim, llama.num_layers) == (257, mega.model_dim, mega.num_layers)
    assert llama.ffn_hidden_dim % 8 == 0 and llama.head_dim == min(64, mega.model_dim)
    # the closest width: one step of 8 either way is no closer
    for step in (-8, 8):
        other = config_parameter_count(llama.replace(ffn_hidden_dim=llama.ffn_hidden_dim + step))
        assert abs(other - target) >= abs(got - target)


def test_match_that_cannot_be_met_is_an_error():
    with pytest.raises(ValueError, match="no Llama-style config"):
        matched_llama_config(preset("tiny", vocab_size=257), tolerance=1e-9)


def test_checkpoint_records_the_model_kind(tmp_path):
    model = small_llama(share_emb=True)
    folder = save_checkpoint(model, tmp_path / "llama")
    assert json.loads((folder / "config.json").read_text())["model"] == "llama"
    assert load_config(folder) == model.config
    restored = load_checkpoint(folder)
    assert isinstance(restored, LlamaLM) and restored.head.weight is restored.embed.weight
    tokens = torch.randint(0, 257, (1, 12))
    with torch.no_grad():
        assert torch.equal(restored(tokens)[0], model(tokens)[0])
    with pytest.raises(CheckpointError, match="holds a llama model, not a MegalodonLM"):
        load_checkpoint(folder, MegalodonLM(preset("tiny")))
    # a file written before the baseline existed has no "model" field: it is a Megalodon checkpoint
    mega_folder = save_checkpoint(MegalodonLM(preset("tiny", num_layers=1)), tmp_path / "old")
    manifest = json.loads((mega_folder / "config.json").read_text())
    del manifest["model"]
    (mega_folder / "config.json").write_text(json.dumps(manifest))
    assert isinstance(load_checkpoint(mega_folder), MegalodonLM)
    manifest["model"] = "gpt"
    (mega_folder / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'model' must be one of"):
        load_checkpoint(mega_folder)
