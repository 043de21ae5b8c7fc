"""The Triton/PyTorch switch: the modules dispatch to the kernels of chapters 08-09 as
``megalodon_lite.backend`` says, and the two paths compute the same function.

On this CPU the kernels run under the Triton interpreter (the root conftest sets TRITON_INTERPRET=1
without a GPU), so the shapes are tiny. fp32 throughout: the kernels accumulate in fp32 but sum in
other orders and (chunk attention) run their dots in tf32-free fp32 under the interpreter, so
outputs agree to ~1e-5 relative, far below any real error (a wrong index or a missing term is O(1)).
"""

from __future__ import annotations

import pytest
import torch

from megalodon_lite import backend
from megalodon_lite.attention import ChunkAttention
from megalodon_lite.cema import CEMA
from megalodon_lite.config import preset
from megalodon_lite.model import MegalodonLM
from megalodon_lite.timestep_norm import TimestepNorm

TOL = dict(rtol=1e-4, atol=1e-5)  # fp32 sums in different orders (see the module docstring)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the Triton interpreter
if DEVICE.type == "cuda":  # tf32 inside the CUDA kernels' fp32 products (chapters 08-09 state their bounds)
    TOL = dict(rtol=2e-3, atol=2e-3)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of each op's public kernel function (the modules import them at call time)."""
    import megalodon_lite.ops.cema as cema_ops
    import megalodon_lite.ops.chunk_attention as attention_ops
    import megalodon_lite.ops.timestep_norm as norm_ops

    calls = {"cema": 0, "timestep_norm": 0, "chunk_attention": 0}

    def spy(module, name, key):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    spy(cema_ops, "cema_triton", "cema")
    spy(norm_ops, "timestep_norm_triton", "timestep_norm")
    spy(attention_ops, "chunk_attention", "chunk_attention")
    return calls


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.use_triton("auto", cuda) and not backend.use_triton("auto", cpu)
    assert not backend.use_triton("torch", cuda)
    assert not backend.use_triton("auto", cuda, supported=False, why_not="float64")
    with pytest.raises(ValueError, match="does not cover this call: float64"):
        backend.use_triton("triton", cuda, supported=False, why_not="float64")
    monkeypatch.setenv(backend.ENV_VAR, "torch")          # the environment decides for "auto" ...
    assert not backend.use_triton("auto", cuda)
    assert backend.use_triton("triton", cuda)            # ... an explicit module setting wins
    monkeypatch.setenv(backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MEGALODON_BACKEND must be one of"):
        backend.use_triton("auto", cuda)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA device or the Triton interpreter"):
        backend.use_triton("auto", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        TimestepNorm(8, 2, backend="cuda")
    with pytest.raises(ValueError, match="MegalodonConfig.backend must be one of"):
        preset("tiny", backend="gpu")


def _norm_pair(backend_name: str) -> TimestepNorm:
    torch.manual_seed(0)
    norm = TimestepNorm(12, 3, backend=backend_name).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def test_timestep_norm_module_dispatch_matches_pytorch(kernel_calls: dict[str, int]) -> None:
    x = torch.randn(2, 37, 12, device=DEVICE) + 3.0
    results = {}
    for name in ("triton", "torch"):
        norm = _norm_pair(name)
        xi = x.clone().requires_grad_()
        y, state = norm(xi)
        y.square().sum().backward()
        results[name] = (y, *state[1:], xi.grad, norm.weight.grad, norm.bias.grad)
        assert kernel_calls["timestep_norm"] == 1  # the "triton" module ran the kernel, "torch" did not
    for a, b in zip(*results.values(), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # float64: "auto" falls back to PyTorch, "triton" refuses by name
    torch.testing.assert_close(_norm_pair("auto")(x.double())[0], _norm_pair("torch")(x.double())[0])
    with pytest.raises(ValueError, match="TimestepNorm kernel takes"):
        _norm_pair("triton")(x.double())


def _attention(backend_name: str) -> ChunkAttention:
    torch.manual_seed(1)
    module = ChunkAttention(16, 24, 2, 8, backend=backend_name).to(DEVICE)
    with torch.no_grad():
        module.gamma.normal_(0, 0.5)
        module.beta.normal_(0, 0.5)
    return module


@pytest.mark.parametrize("pieces", [(29,), (5, 24), (3, 1, 13, 12)], ids=["one-call", "cache-then-chunks", "decode-steps"])
def test_chunk_attention_dispatch_and_streaming_match_pytorch(pieces: tuple[int, ...],
                                                             kernel_calls: dict[str, int]) -> None:
    """Whole chunks go to the kernel; tokens that finish a cached chunk stay on chapter 06's path.
    Any split of the sequence, on either path, gives the one-call PyTorch output and final cache."""
    z, v = torch.randn(1, sum(pieces), 16, device=DEVICE), torch.randn(1, sum(pieces), 24, device=DEVICE)
    reference = _attention("torch")
    want, want_cache = reference(z, v)
    module = _attention("triton")
    outs, cache, start, expected_calls = [], None, 0, 0
    for size in pieces:
        finishing = min(size, 8 - cache.length) if cache is not None and cache.length else 0
        expected_calls += finishing < size  # some of the piece starts at a chunk boundary
        o, cache = module(z[:, start:start + size], v[:, start:start + size], cache)
        outs.append(o)
        start += size
    assert kernel_calls["chunk_attention"] == expected_calls
    torch.testing.assert_close(torch.cat(outs, dim=1), want, **TOL)
    torch.testing.assert_close(cache.k, want_cache.k, **TOL)
    torch.testing.assert_close(cache.v, want_cache.v, **TOL)


def test_chunk_attention_gradients_through_the_kernel_match_pytorch(kernel_calls: dict[str, int]) -> None:
    z, v = torch.randn(2, 21, 16, device=DEVICE), torch.randn(2, 21, 24, device=DEVICE)
    grads = {}
    for name in ("triton", "torch"):
        module = _attention(name)
        zi, vi = z.clone().requires_grad_(), v.clone().requires_grad_()
        module(zi, vi)[0].square().sum().backward()
        grads[name] = (zi.grad, vi.grad, module.gamma.grad, module.beta.grad)
        assert kernel_calls["chunk_attention"] == 1
    for a, b in zip(*grads.values(), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_model_config_backend_reaches_every_module_and_both_paths_agree(kernel_calls: dict[str, int]) -> None:
    config = preset("tiny", num_layers=1, model_dim=16, z_dim=8, value_dim=16, num_heads=1, ffn_hidden_dim=16,
                    chunk_size=8, norm_num_groups=2, cema_ndim=2)
    tokens = torch.randint(0, config.vocab_size, (1, 19), device=DEVICE)
    logits = {}
    for name in ("triton", "torch"):
        torch.manual_seed(2)
        model = MegalodonLM(config.replace(backend=name)).to(DEVICE)
        assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {name}
        logits[name] = model(tokens)[0]
        assert kernel_calls == {"cema": 1, "timestep_norm": 2, "chunk_attention": 1}  # + the final norm
    torch.testing.assert_close(logits["triton"], logits["torch"], **TOL)


def test_cema_module_dispatch_matches_pytorch(kernel_calls: dict[str, int]) -> None:
    """Pieces longer than RECURRENCE_MAX_LENGTH run the kernel under "auto" on CUDA and always under
    "triton"; a short decoding piece stays on the recurrence unless "triton" is explicit."""
    torch.manual_seed(3)
    reference = CEMA(10, 3, backend="torch").to(DEVICE)
    x, h0 = torch.randn(2, 29, 10, device=DEVICE), torch.randn(2, 10, 3, dtype=torch.complex64, device=DEVICE)
    results = {}
    for name in ("triton", "torch"):
        layer = CEMA(10, 3, backend=name).to(DEVICE)
        layer.load_state_dict(reference.state_dict())
        xi = x.clone().requires_grad_()
        y, h = layer(xi, h0)
        (y.square().sum() + h.abs().square().sum()).backward()
        results[name] = (y, h, xi.grad, *(p.grad for p in layer.parameters()))
        assert kernel_calls["cema"] == 1
    for a, b in zip(*results.values(), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    layer = CEMA(10, 3, backend="triton").to(DEVICE)
    layer(x[:, :1])          # an explicit "triton" takes a one-token step too
    assert kernel_calls["cema"] == 2
    with pytest.raises(ValueError, match="CEMA kernel takes"):
        layer.double()(x.double())
