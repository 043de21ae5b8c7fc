"""The decoding step replayed as CUDA graphs against the same step run eagerly (GPU only).

A graph replays the kernels its capture recorded, on the same buffers, so graphed and eager runs
of the static step agree to float32 rounding (different cuBLAS kernels may be picked inside and
outside a capture, hence a tolerance and not equality). Against the models' own streaming forward
(Triton kernels, flash or memory-efficient attention) the bounds follow the dtype: in float32 the
attention kernel's tensor-core products run in tf32 (unit roundoff 2^-11 = 4.9e-4; Megalodon's
first token of each chunk goes through it), so logits of size ~1-10 agree to ~1e-3 (bound 5e-3);
under bf16 autocast each path rounds matmul inputs to bf16 (unit roundoff 2^-8) on its own
schedule, so logits differ by ~1e-2 of their scale (bound 5e-2 of the largest logit). A wrong slot,
position or buffer moves logits by O(1).
"""

from __future__ import annotations

import pytest
import torch

from megalodon_lite.baseline import KVCache, LlamaConfig, LlamaLM
from megalodon_lite.config import preset
from megalodon_lite.decoding import MegalodonDecoder, attention_span, make_decoder, static_generate
from megalodon_lite.model import MegalodonLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def models(seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    mega = MegalodonLM(preset("tiny", chunk_size=16))
    base = LlamaLM(LlamaConfig(vocab_size=256, num_layers=2, model_dim=64, num_heads=2, ffn_hidden_dim=128))
    out = []
    g = torch.Generator().manual_seed(seed)
    for model in (mega, base):
        with torch.no_grad():  # norms, q/k affine and biases away from their zero init
            for name, param in model.named_parameters():
                if name.endswith(("norm.weight", "norm.bias", "attention.gamma", "attention.beta", ".bias")):
                    param.copy_(0.3 * torch.randn(param.shape, generator=g))
        out.append(model.cuda().eval())
    return out


def run(model, prompt, tokens, *, cuda_graph: bool, autocast: bool) -> tuple[list[torch.Tensor], object]:
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        decoder = make_decoder(model, prompt.shape[0], prompt.shape[1] + tokens.shape[1], cuda_graph=cuda_graph)
        logits = [decoder.prefill(prompt).clone()]
        logits += [decoder.step(tokens[:, t]).clone() for t in range(tokens.shape[1])]
    return logits, decoder


def streaming(model, prompt, tokens, *, autocast: bool) -> list[torch.Tensor]:
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, memory = model(prompt, KVCache.empty() if isinstance(model, LlamaLM) else None)
        out = [logits[:, -1].float()]
        for t in range(tokens.shape[1]):
            logits, memory = model(tokens[:, t:t + 1], memory)
            out.append(logits[:, 0].float())
    return out


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_graphs_replay_the_eager_step_across_chunks_and_spans(autocast):
    for model in models():
        prompt = torch.randint(0, 256, (2, 10), device="cuda")
        tokens = torch.randint(0, 256, (2, 45), device="cuda")  # Megalodon: 3 chunk boundaries; baseline: 8 spans
        graphed, decoder = run(model, prompt, tokens, cuda_graph=True, autocast=autocast)
        eager, _ = run(model, prompt, tokens, cuda_graph=False, autocast=autocast)
        expected = streaming(model, prompt, tokens, autocast=autocast)
        spans = {attention_span(n + 1, 55) for n in range(10, 55)}  # 16, 20, ..., 48, then capped at 55
        assert len(decoder.graphs) == (1 if isinstance(decoder, MegalodonDecoder) else len(spans))
        for t, (a, b, c) in enumerate(zip(graphed, eager, expected)):
            assert torch.isfinite(a).all()
            if autocast:
                assert (a - b).abs().max() <= 1e-2 * b.abs().max(), f"{type(model).__name__} step {t}"
                assert (a - c).abs().max() <= 5e-2 * c.abs().max(), f"{type(model).__name__} step {t}"
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(a, c, rtol=5e-3, atol=5e-3)


def test_generate_uses_graphs_on_cuda_and_matches_the_eager_step():
    """Greedy tokens of the graphs equal those of the same step run eagerly (the chapters' loop
    computes in another order, tf32 included, and may break a near-tie of a random model otherwise)."""
    for model in models(1):
        prompt = torch.randint(0, 256, (1, 21), device="cuda")
        graphed = model.generate(prompt, 40, temperature=0)  # cuda_graph=None: graphs on CUDA
        assert torch.equal(graphed, model.generate(prompt, 40, temperature=0, cuda_graph=True))
        assert torch.equal(graphed, static_generate(model, prompt, 40, temperature=0, cuda_graph=False))
        sampled = model.generate(prompt, 40, temperature=1.0, generator=torch.Generator("cuda").manual_seed(0))
        assert sampled.shape == (1, 40) and sampled.max() < 256


def test_decoder_memory_megalodon_constant_baseline_growing():
    mega, base = models(2)
    sizes = {}
    for length in (20, 200):
        prompt = torch.randint(0, 256, (1, length), device="cuda")
        for model in (mega, base):
            _, decoder = run(model, prompt, prompt[:, :3], cuda_graph=True, autocast=True)
            sizes[type(decoder).__name__, length] = decoder.state_nbytes
    assert sizes["MegalodonDecoder", 20] == sizes["MegalodonDecoder", 200]
    assert sizes["LlamaDecoder", 200] > 5 * sizes["LlamaDecoder", 20]
