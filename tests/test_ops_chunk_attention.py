"""megalodon_lite.ops.chunk_attention (chapter 09) against chapter 06's ChunkAttention in float64.

Without CUDA the kernels run under the Triton interpreter (the root conftest sets
``TRITON_INTERPRET=1``) at tiny sizes, in float32 only (the interpreter's bfloat16 arithmetic is not
the GPU's). With CUDA the same tests run on the GPU, and the official shapes (c=2048, dz=256,
dv=2048) are added in bfloat16, float16 and float32. Every launcher call in these tests poisons its
outputs and scratch buffers with NaN first, so a result without NaN proves every element read was
written.

Tolerances (relative to the reference's norm): float32 1e-5 -- float32 rounding (6e-8 per operation)
accumulated over sums of a chunk (the GPU multiplies float32 as three TF32 products, error ~2^-21
per product); 3e-5 on the gradients at the official shapes on the GPU, where sums of c = 2048 such
products grow that error like a random walk to 2^-21 sqrt(2048) = 2e-5 (dbeta, a sum of every
token's dq or dk whose terms largely cancel, measured 1.4e-5; dv, 5e-6); bfloat16 / float16 1e-2 on
O and 2e-2 on the gradients -- q, k, P, T (= P dP) and dq, dk are each rounded once to 8 (bfloat16)
or 11 (float16) significant bits, i.e. a unit roundoff of 2^-8 or 2^-11 per rounding, and a few such
roundings compound through the softmax and the backward.
"""

from __future__ import annotations

import pytest
import torch

from megalodon_lite.ops.chunk_attention import (
    MAX_Z_HEAD_DIM,
    chunk_attention,
    chunk_attention_backward,
    chunk_attention_forward,
    chunk_attention_reference,
    unsupported_reason,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="official shapes need a CUDA GPU")

# (B, L, H, dz, dv, c): tiny, every one with its own way to go wrong
CASES = [
    pytest.param(1, 16, 1, 8, 16, 16, id="one-chunk"),
    pytest.param(2, 21, 1, 8, 16, 16, id="partial-chunk"),
    pytest.param(1, 24, 3, 8, 16, 16, id="several-heads"),
    pytest.param(1, 16, 2, 16, 16, 16, id="z-eq-v"),
    pytest.param(2, 11, 2, 8, 24, 32, id="L-lt-c"),
    pytest.param(1, 48, 1, 8, 16, 16, id="several-chunks"),
    pytest.param(1, 37, 2, 8, 40, 32, id="odd-L"),
]


def make_inputs(batch, length, heads, dz, dv, dtype=torch.float32, seed=0):
    """Random z (offset, not zero-mean), v, and gamma, beta away from their zero init."""
    gen = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(batch, length, heads * dz, generator=gen) + 0.5
    v = torch.randn(batch, length, heads * dv, generator=gen)
    gamma = 0.5 * torch.randn(2, heads, dz, generator=gen)
    beta = 0.5 * torch.randn(2, heads, dz, generator=gen)
    grad_out = torch.randn(batch, length, heads * dv, generator=gen)
    return [t.to(DEVICE, dtype) for t in (z, v, gamma, beta, grad_out)]


def reference(z, v, gamma, beta, grad_out, heads, chunk):
    """Chapter 06 in float64: O and the gradients to z, v, gamma, beta."""
    leaves = [t.detach().double().requires_grad_() for t in (z, v, gamma, beta)]
    out = chunk_attention_reference(*leaves, heads, chunk)
    return out, torch.autograd.grad(out, leaves, grad_out.double())


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def assert_matches(out, grads, ref_out, ref_grads, bound_out, bound_grads):
    errors = {"O": rel(out, ref_out)}
    errors |= {f"d{n}": rel(g, r) for n, g, r in zip(("z", "v", "gamma", "beta"), grads, ref_grads)}
    assert errors["O"] < bound_out and max(errors.values()) < bound_grads, errors


@pytest.mark.parametrize(("batch", "length", "heads", "dz", "dv", "chunk"), CASES)
def test_launchers_match_chapter_06_with_poisoned_buffers(batch, length, heads, dz, dv, chunk):
    z, v, gamma, beta, grad_out = make_inputs(batch, length, heads, dz, dv)
    o, q, k, lse = chunk_attention_forward(z, v, gamma, beta, heads, chunk, poison=True)
    grads = chunk_attention_backward(grad_out, z, q, k, v, lse, gamma, heads, chunk, poison=True)
    for name, t in zip(("O", "q", "k", "dz", "dv", "dgamma", "dbeta"), (o, q, k, *grads)):
        assert t.isfinite().all(), f"{name} has elements the kernels never wrote"
    assert_matches(o, grads, *reference(z, v, gamma, beta, grad_out, heads, chunk), 1e-5, 1e-5)


def test_autograd_function_matches_chapter_06():
    z, v, gamma, beta, grad_out = make_inputs(2, 21, 2, 8, 24)
    leaves = [t.clone().requires_grad_() for t in (z, v, gamma, beta)]
    out = chunk_attention(*leaves, 2, 16)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert out.dtype == z.dtype and out.shape == v.shape
    assert_matches(out, grads, *reference(z, v, gamma, beta, grad_out, 2, 16), 1e-5, 1e-5)


def test_non_contiguous_inputs_give_the_same_result():
    z, v, gamma, beta, _ = make_inputs(2, 20, 1, 8, 16)
    z_t = z.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    v_t = v.transpose(0, 1).contiguous().transpose(0, 1)
    assert not z_t.is_contiguous()
    torch.testing.assert_close(chunk_attention(z_t, v_t, gamma, beta, 1, 16), chunk_attention(z, v, gamma, beta, 1, 16),
                               rtol=0, atol=0)


def test_empty_sequence():
    z, v, gamma, beta, _ = make_inputs(2, 0, 1, 8, 16)
    assert chunk_attention(z, v, gamma, beta, 1, 16).shape == (2, 0, 16)


def test_torch_compile_treats_the_op_as_opaque():
    """fullgraph: no graph break around the custom op; aot_eager runs on a CPU without a compiler."""
    z, v, gamma, beta, _ = make_inputs(1, 20, 1, 8, 16)

    def loss(z, v, gamma, beta):
        return (chunk_attention(z, v, gamma, beta, 1, 16) ** 2).sum()

    leaves = [t.clone().requires_grad_() for t in (z, v, gamma, beta)]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and dispatch of both ops, as torch.library checks them."""
    z, v, gamma, beta, grad_out = make_inputs(1, 20, 1, 8, 16)
    args = (1, 16, 1e-5, 10000.0)
    o, q, k, lse = torch.ops.megalodon_lite.chunk_attention_fwd(z, v, gamma, beta, *args)
    for op, inputs in ((torch.ops.megalodon_lite.chunk_attention_fwd.default, (z, v, gamma, beta, *args)),
                       (torch.ops.megalodon_lite.chunk_attention_bwd.default, (grad_out, z, q, k, v, lse, gamma, *args))):
        torch.library.opcheck(op, inputs, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_fallback_rule():
    z = torch.zeros(1, 4, 16)
    assert unsupported_reason(z, 2) == ""
    assert "float64" in unsupported_reason(z.double(), 2)
    assert "dropout" in unsupported_reason(z, 2, dropout_p=0.1)
    assert "cached" in unsupported_reason(z, 2, cached_tokens=3)
    assert "head dim" in unsupported_reason(torch.zeros(1, 4, 2 * MAX_Z_HEAD_DIM), 1)


def test_bad_input_is_named():
    z, v, gamma, beta, _ = make_inputs(1, 8, 2, 8, 16)
    with pytest.raises(TypeError, match="z must be bfloat16, float16 or float32"):
        chunk_attention(z.double(), v.double(), gamma, beta, 2, 16)
    with pytest.raises(TypeError, match="v"):
        chunk_attention(z, v.half(), gamma, beta, 2, 16)
    with pytest.raises(TypeError, match="gamma must be a floating-point tensor"):
        chunk_attention(z, v, gamma.long(), beta, 2, 16)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        chunk_attention(z, v, gamma, beta, 0, 16)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunk_attention(z, v, gamma, beta, 2, 16.0)
    with pytest.raises(ValueError, match="num_heads=3 must divide"):
        chunk_attention(z, v, gamma, beta, 3, 16)
    with pytest.raises(ValueError, match=r"z and v must be \(B, L, z_dim\)"):
        chunk_attention(z, v[:, :5], gamma, beta, 2, 16)
    with pytest.raises(ValueError, match=r"gamma and beta must be \(2, 2, 8\)"):
        chunk_attention(z, v, gamma[:1], beta, 2, 16)
    with pytest.raises(ValueError, match="eps must be positive"):
        chunk_attention(z, v, gamma, beta, 2, 16, eps=0.0)
    with pytest.raises(ValueError, match="z head dim must be at most"):
        chunk_attention(torch.zeros(1, 4, 2 * MAX_Z_HEAD_DIM, device=DEVICE), v[:, :4, :8], torch.zeros(2, 1, 2 * MAX_Z_HEAD_DIM, device=DEVICE),
                        torch.zeros(2, 1, 2 * MAX_Z_HEAD_DIM, device=DEVICE), 1, 16)
    with pytest.raises(ValueError, match="lse must be"):
        o, q, k, lse = chunk_attention_forward(z, v, gamma, beta, 2, 16)
        chunk_attention_backward(o, z, q, k, v, lse[:, :3], gamma, 2, 16)


# ---------------------------------------------------------------- GPU: official shapes

OFFICIAL = [
    pytest.param(torch.bfloat16, 1e-2, 2e-2, id="bf16"),
    pytest.param(torch.float16, 1e-2, 2e-2, id="fp16"),
    pytest.param(torch.float32, 1e-5, 3e-5, id="fp32"),
]


@needs_cuda
@pytest.mark.parametrize(("dtype", "bound_out", "bound_grads"), OFFICIAL)
def test_official_shapes_against_float64(dtype, bound_out, bound_grads):
    """c=2048, dz=256, dv=2048, one head; two full chunks and a partial one."""
    z, v, gamma, beta, grad_out = make_inputs(1, 2 * 2048 + 333, 1, 256, 2048, dtype=torch.float32)
    z, v, grad_out = z.to(dtype), v.to(dtype), grad_out.to(dtype)  # gamma, beta stay float32 parameters
    o, q, k, lse = chunk_attention_forward(z, v, gamma, beta, 1, 2048, poison=True)
    grads = chunk_attention_backward(grad_out, z, q, k, v, lse, gamma, 1, 2048, poison=True)
    assert_matches(o, grads, *reference(z, v, gamma, beta, grad_out, 1, 2048), bound_out, bound_grads)


@needs_cuda
def test_several_heads_on_the_gpu():
    z, v, gamma, beta, grad_out = make_inputs(2, 1500, 4, 64, 256, dtype=torch.float32)
    z, v, grad_out = z.bfloat16(), v.bfloat16(), grad_out.bfloat16()
    leaves = [t.clone().requires_grad_() for t in (z, v, gamma, beta)]
    out = chunk_attention(*leaves, 4, 512)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert_matches(out, grads, *reference(z, v, gamma, beta, grad_out, 4, 512), 1e-2, 2e-2)
