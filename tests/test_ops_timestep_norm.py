"""megalodon_lite.ops.timestep_norm: the Triton kernels against chapter 05's float64 reference.

On a machine without CUDA the kernels run in the Triton interpreter (the root conftest sets
TRITON_INTERPRET=1 before triton is imported): tiny shapes in float32, small tile shapes so that
every path of the kernels runs, outputs poisoned with NaN before the kernels write them. With
CUDA the same cases run compiled, and the tests marked ``gpu`` check bf16 and fp32 at the
benchmark shapes (B x L in {32 x 2K, 4 x 16K, 1 x 64K}, D=1024, G=32) against float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from megalodon_lite import backend
from megalodon_lite.ops import timestep_norm as ops
from megalodon_lite.ops.timestep_norm import (
    LaunchConfig,
    TimestepNormFunction,
    timestep_norm_bwd,
    timestep_norm_fwd,
    timestep_norm_triton,
)
from megalodon_lite.timestep_norm import TimestepNormState, timestep_norm, timestep_norm_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
pytestmark = pytest.mark.skipif(not HAS_CUDA and not backend.interpreter_enabled(),
                                reason="the kernels need CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
EPS = 1e-5
GRADIENT_NAMES = ("x", "weight", "bias", "incoming mean", "incoming var")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN (integers: their smallest value)."""
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)


@dataclass(frozen=True)
class Case:
    length: int
    groups: int = 3
    group_size: int = 8
    batch: int = 2
    tiles: LaunchConfig = LaunchConfig(block_t=4, block_g=2, prefix_block_n=2, prefix_block_g=2)
    counts: tuple[int, ...] | None = (0, 6)      # incoming state's counts (None: no state)
    padding: str = "none"                        # none | holes | start | all (see make_case)
    offset: float = 0.0


CASES = {
    "odd_L": Case(length=13),
    "L_below_one_tile": Case(length=3, tiles=LaunchConfig(block_t=8, block_g=4)),
    "L_one_tile": Case(length=8, tiles=LaunchConfig(block_t=8, block_g=4)),
    "many_tiles_prefix_loop": Case(length=23, groups=2, batch=1, counts=(3,),
                                   tiles=LaunchConfig(block_t=2, block_g=2, prefix_block_n=4)),
    "D24_G3_half_empty_group_block": Case(length=10, groups=3, group_size=8),
    "group_size_6_not_pow2": Case(length=9, groups=2, group_size=6),
    "one_group": Case(length=7, groups=1, group_size=12, tiles=LaunchConfig(block_t=4, block_g=1)),
    "no_state": Case(length=11, counts=None),
    "padding_holes": Case(length=12, padding="holes"),
    "padding_at_start": Case(length=12, padding="start"),
    "row_all_padding": Case(length=9, batch=3, counts=(0, 5, 0), padding="all"),
    "offset_100": Case(length=14, offset=100.0),
    "offset_1e4_200_steps": Case(length=200, groups=2, group_size=4, batch=1, counts=(5,), offset=1e4,
                                 tiles=LaunchConfig(block_t=32, block_g=2)),
    "decode_L1": Case(length=1, counts=(4, 9)),
    # the two-level prefix: 15 steps in tiles of 2 = 8 tiles, the last ragged, in chunks of 3 (3 + 3 + 2:
    # the row's tile count is no multiple of the chunk), the prefix over chunks looping 2 at a time
    "chunks_of_3_tiles_ragged": Case(length=15, padding="holes", counts=(3, 0),
                                     tiles=LaunchConfig(block_t=2, block_g=2, prefix_block_n=2, tiles_per_program=3)),
    "chunks_of_3_offset_100": Case(length=15, offset=100.0,
                                   tiles=LaunchConfig(block_t=2, block_g=2, prefix_block_n=2, tiles_per_program=3)),
    "chunks_row_all_padding": Case(length=9, batch=3, counts=(0, 5, 0), padding="all",
                                   tiles=LaunchConfig(block_t=2, block_g=2, tiles_per_program=4)),
    "one_chunk_longer_than_the_row": Case(length=11, groups=2, group_size=6,
                                          tiles=LaunchConfig(block_t=4, block_g=1, tiles_per_program=8)),
    # EVEN: no ragged tile (4 | 16), group (8 channels) or group block (2 | 4): the kernels drop
    # every bounds mask; with an offset (x - K in the backward), and with padding (masks stay)
    "even_offset_100": Case(length=16, groups=4, offset=100.0,
                            tiles=LaunchConfig(block_t=4, block_g=2, prefix_block_n=2, tiles_per_program=2)),
    "even_padding_holes": Case(length=16, groups=4, padding="holes",
                               tiles=LaunchConfig(block_t=4, block_g=2, tiles_per_program=3)),
}


def make_case(case: Case, seed: int = 0):
    """float32 inputs on DEVICE (the reference sees the same numbers in float64)."""
    gen = torch.Generator().manual_seed(seed)
    channels = case.groups * case.group_size
    x = torch.randn(case.batch, case.length, channels, generator=gen) * 1.5 + case.offset
    weight = torch.randn(channels, generator=gen) * 0.3
    bias = torch.randn(channels, generator=gen) * 0.3
    state = None
    if case.counts is not None:
        state = TimestepNormState(torch.tensor(case.counts),
                                  torch.randn(case.batch, case.groups, generator=gen) + case.offset,
                                  torch.rand(case.batch, case.groups, generator=gen) + 0.5)
        state = TimestepNormState(*(t.to(DEVICE) for t in state))
    pad = None
    if case.padding != "none":
        pad = torch.rand(case.batch, case.length, generator=gen) < 0.3
        if case.padding == "start":
            pad[:, :4] = True
        if case.padding == "all":
            pad[0], pad[1] = True, True           # one row without history, one with
        x = x.masked_fill(pad.unsqueeze(-1), float("nan"))   # the padding holds garbage
        pad = pad.to(DEVICE)
    return x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE), state, pad


def reference(x, weight, bias, groups, state, pad, dy, dmean, dvar):
    """y, final state and d/d(x, weight, bias, incoming mean, incoming var) by autograd, float64."""
    if state is None:
        state = TimestepNormState(torch.zeros(x.shape[0], dtype=torch.int64, device=x.device),
                                  torch.zeros(x.shape[0], groups, device=x.device),
                                  torch.ones(x.shape[0], groups, device=x.device))
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias, state.mean, state.var)]
    y, final = timestep_norm_reference(*leaves[:3], groups, TimestepNormState(state.count, *leaves[3:]), pad)
    grads = torch.autograd.grad((y, final.mean, final.var), leaves, (dy.double(), dmean.double(), dvar.double()))
    return y.detach(), final, grads


def kernel(x, weight, bias, groups, state, pad, dy, dmean, dvar):
    """The same through timestep_norm_triton and autograd (float32)."""
    if state is None:
        state = TimestepNormState(torch.zeros(x.shape[0], dtype=torch.int64, device=x.device),
                                  torch.zeros(x.shape[0], groups, device=x.device),
                                  torch.ones(x.shape[0], groups, device=x.device))
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, state.mean, state.var)]
    y, final = timestep_norm_triton(*leaves[:3], groups, TimestepNormState(state.count, *leaves[3:]), pad)
    return y.detach(), final, torch.autograd.grad((y, final.mean, final.var), leaves, (dy, dmean, dvar))


@pytest.mark.parametrize("name", list(CASES))
def test_forward_state_and_every_gradient_match_float64(name, monkeypatch):
    case = CASES[name]
    monkeypatch.setattr(ops, "launch_config", lambda channels, num_groups: case.tiles)
    x, weight, bias, state, pad = make_case(case)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE)
    dmean, dvar = torch.randn(2, case.batch, case.groups, generator=gen).to(DEVICE)
    y_k, state_k, grads_k = kernel(x, weight, bias, case.groups, state, pad, dy, dmean, dvar)
    y_r, state_r, grads_r = reference(x, weight, bias, case.groups, state, pad, dy, dmean, dvar)
    # float32 against float64 on the same inputs: unit-scale data, so statistics carry a few float32
    # ulps (~1e-7 relative). At an offset a, float32 numbers near a are spaced 2^-24 a: M_t and every
    # deviation x - M_t inherit a few of those spacings (chapter 05's bound for its float32 form),
    # against a spread of 1.5. Raw sums of x and x^2 would lose the variance entirely at a = 1e4.
    offset_ulps = 4 * 2**-24 * case.offset
    assert torch.isfinite(y_k).all() and (y_k - y_r).abs().max() <= 1e-5 + offset_ulps
    if pad is not None:
        assert (y_k[pad] == 0).all()
    assert torch.equal(state_k.count, state_r.count)
    assert (state_k.mean - state_r.mean).abs().max() <= 1e-5 + offset_ulps
    assert ((state_k.var - state_r.var).abs() / state_r.var).max() <= 1e-5 + offset_ulps
    for grad_name, mine, ref in zip(GRADIENT_NAMES, grads_k, grads_r):
        assert torch.isfinite(mine).all(), grad_name
        scale = ref.abs().max().clamp_min(1e-6)
        # relative to the largest gradient: the offset case loses 2^-24 a / (spread ~1.5) in x - K
        assert (mine - ref).abs().max() / scale <= 2e-5 + 2 * offset_ulps, grad_name
    if pad is not None:
        assert (grads_k[0][pad] == 0).all()


def test_parameter_shares_summed_over_several_row_blocks(monkeypatch):
    """The shares of dweight and dbias (6 of them here: 2 rows x 3 chunks, D = 24) summed 2 rows
    and 16 channels at a time, so that the sum loops and the last column block is ragged."""
    monkeypatch.setattr(ops, "SHARE_ROWS", 2)
    monkeypatch.setattr(ops, "SHARE_COLUMNS", 16)
    case = CASES["chunks_of_3_tiles_ragged"]
    monkeypatch.setattr(ops, "launch_config", lambda channels, num_groups: case.tiles)
    x, weight, bias, state, pad = make_case(case)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dmean, dvar = torch.zeros(2, case.batch, case.groups, device=DEVICE)
    grads_k = kernel(x, weight, bias, case.groups, state, pad, dy, dmean, dvar)[2]
    grads_r = reference(x, weight, bias, case.groups, state, pad, dy, dmean, dvar)[2]
    for name, mine, ref in list(zip(GRADIENT_NAMES, grads_k, grads_r))[1:3]:
        # float32 sums of <= 15 unit-scale terms against float64: a few ulps of the largest
        assert (mine - ref).abs().max() / ref.abs().max() <= 2e-5, name


@pytest.mark.parametrize("tiles", [LaunchConfig(block_t=4, block_g=2),
                                   LaunchConfig(block_t=2, block_g=2, tiles_per_program=2)],
                         ids=["one_tile_per_program", "chunks_of_2_tiles"])
def test_every_buffer_of_the_launchers_is_written(tiles):
    """With poisoned buffers: the forward's saved per-tile state (written by two kernels when a
    program walks a chunk) and every backward output are finite."""
    case = Case(length=10, padding="holes", tiles=tiles)
    x, weight, bias, state, pad = make_case(case)
    outs = timestep_norm_fwd(x, weight, bias, *state, pad, case.groups, EPS, config=case.tiles)
    y, count, mean, var, prefix_count, prefix_mean, prefix_var = outs
    n_tiles = -(-case.length // tiles.block_t)
    assert prefix_count.shape == (case.batch, n_tiles + 1) and prefix_mean.shape == (case.batch, n_tiles + 1, case.groups)
    assert (prefix_count >= 0).all() and (count >= 0).all()
    assert all(torch.isfinite(t).all() for t in (y, mean, var, prefix_mean, prefix_var))
    grads = timestep_norm_bwd(torch.randn_like(y), torch.randn_like(mean), torch.randn_like(var), x, weight, pad,
                              prefix_count, prefix_mean, prefix_var, case.groups, EPS, config=case.tiles)
    assert all(torch.isfinite(t).all() for t in grads)


def test_pieces_with_carried_state_equal_one_call():
    case = Case(length=30, padding="holes", tiles=LaunchConfig(block_t=4, block_g=4))
    x, weight, bias, state, pad = make_case(case)
    y_whole, state_whole = timestep_norm_triton(x, weight, bias, case.groups, state, pad)
    pieces, carried = [], state
    for start, stop in ((0, 1), (1, 9), (9, 10), (10, 30)):
        y, carried = timestep_norm_triton(x[:, start:stop], weight, bias, case.groups, carried, pad[:, start:stop])
        pieces.append(y)
    # unit-scale float32: pieces and one call round the running statistics differently (~1e-7)
    assert (torch.cat(pieces, 1) - y_whole).abs().max() < 1e-5
    assert torch.equal(carried.count, state_whole.count)
    assert torch.allclose(carried.var, state_whole.var, rtol=1e-5, atol=0)


def test_torch_compile_treats_the_kernel_as_one_opaque_op():
    """aot_eager traces the autograd Function and the fake implementations (Inductor works too but
    needs ~25 s of C++ compilation on a CPU), with no graph break inside."""
    x, weight, bias, state, _ = make_case(Case(length=9, counts=(2, 0)))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]

    def step(x, weight, bias):
        y, count, mean, var = TimestepNormFunction.apply(torch.tanh(x) * 2, weight, bias, state.count, state.mean,
                                                         state.var, None, 3, EPS)
        return (y.sin() * 3).sum() + var.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager = [t.clone().requires_grad_() for t in (x, weight, bias)]
    loss_eager = step(*eager)
    assert torch.allclose(loss, loss_eager, rtol=1e-6, atol=0)
    for mine, ref in zip(grads, torch.autograd.grad(loss_eager, eager)):
        assert torch.allclose(mine, ref, rtol=1e-5, atol=1e-6)
    assert hasattr(torch.ops.megalodon_lite, "timestep_norm_fwd")
    assert hasattr(torch.ops.megalodon_lite, "timestep_norm_bwd")


def test_compiled_graphs_hold_the_custom_ops_and_eager_calls_skip_the_dispatcher(monkeypatch):
    """Under torch.compile the AOT forward and backward graphs call megalodon_lite::timestep_norm_fwd
    and _bwd; eagerly the autograd function calls the launchers, never the ops."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    x, weight, bias, _, _ = make_case(Case(length=7, counts=(1, 0)))
    targets: list[str] = []

    def record(graph_module, _inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return make_boxed_func(graph_module.forward)

    def step(x):
        return (timestep_norm_triton(x, weight, bias, 3)[0] ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    leaf = x.clone().requires_grad_()
    (grad_compiled,) = torch.autograd.grad(compiled(leaf), leaf)
    assert "megalodon_lite.timestep_norm_fwd.default" in targets, targets
    assert "megalodon_lite.timestep_norm_bwd.default" in targets, targets

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")
    monkeypatch.setattr(ops, "_timestep_norm_fwd_op", refuse)
    monkeypatch.setattr(ops, "_timestep_norm_bwd_op", refuse)
    eager = x.clone().requires_grad_()
    (grad_eager,) = torch.autograd.grad(step(eager), eager)
    assert torch.allclose(grad_eager, grad_compiled, rtol=1e-5, atol=1e-6)


def test_float64_is_refused_and_auto_falls_back():
    x = torch.randn(1, 4, 6, dtype=torch.float64, device=DEVICE)
    zeros = torch.zeros(6, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        timestep_norm_triton(x, zeros, zeros, 2)
    why = "x is float64"
    assert backend.use_triton("auto", DEVICE, supported=False, why_not=why) is False
    with pytest.raises(ValueError, match=why):
        backend.use_triton("triton", DEVICE, supported=False, why_not=why)


def test_bad_input_is_named():
    x, weight, bias, state, _ = make_case(Case(length=5))
    with pytest.raises(ValueError, match="weight must have shape"):
        timestep_norm_triton(x, weight[:-1], bias, 3)
    with pytest.raises(ValueError, match="num_groups"):
        timestep_norm_triton(x, weight, bias, 5)
    with pytest.raises(ValueError, match="state: int64, float32, float32"):
        timestep_norm_fwd(x, weight, bias, state.count, state.mean.double(), state.var, None, 3, EPS)


# ---- GPU: the benchmark shapes, bf16 and fp32, against float64 ----------------------------------

BENCH_SHAPES = {"32x2K": (32, 2048), "4x16K": (4, 16_384), "1x64K": (1, 65_536)}


@pytest.fixture(scope="module")
def bench_references():
    """Per shape: bf16-representable inputs and the float64 reference (chapter 05's cumulative-sum
    form, equal to the sequential one to ~1e-15) of y, the final state and every gradient."""
    cache = {}

    def get(shape_name):
        if shape_name not in cache:
            batch, length = BENCH_SHAPES[shape_name]
            gen = torch.Generator(device="cuda").manual_seed(0)
            x = (torch.randn(batch, length, 1024, device="cuda", generator=gen) * 2 + 3).bfloat16()
            dy = torch.randn(batch, length, 1024, device="cuda", generator=gen).bfloat16()
            weight, bias = torch.randn(2, 1024, device="cuda", generator=gen) * 0.2
            state = TimestepNormState(torch.full((batch,), 1000, device="cuda"),
                                      torch.randn(batch, 32, device="cuda", generator=gen) + 3,
                                      torch.rand(batch, 32, device="cuda", generator=gen) + 3)
            dmean, dvar = torch.randn(2, batch, 32, device="cuda", generator=gen)
            leaves = [t.double().requires_grad_() for t in (x, weight, bias, state.mean, state.var)]
            y, final = timestep_norm(*leaves[:3], 32, TimestepNormState(state.count, *leaves[3:]))
            grads = torch.autograd.grad((y, final.mean, final.var), leaves,
                                        (dy.double(), dmean.double(), dvar.double()))
            cache.clear()   # one shape's tensors at a time
            cache[shape_name] = ((x, weight, bias, state, dy, dmean, dvar),
                                 (y.detach(), final.mean.detach(), final.var.detach(), grads))
        return cache[shape_name]

    return get


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape_name", list(BENCH_SHAPES))
def test_gpu_benchmark_shapes_against_float64(shape_name, dtype, bench_references, monkeypatch):
    monkeypatch.setattr(ops, "POISON_OUTPUTS", False)   # large: the small cases check every write
    (x, weight, bias, state, dy, dmean, dvar), (y_r, mean_r, var_r, grads_r) = bench_references(shape_name)
    leaves = [t.clone().requires_grad_() for t in (x.to(dtype), weight, bias, state.mean, state.var)]
    y, final = timestep_norm_triton(*leaves[:3], 32, TimestepNormState(state.count, *leaves[3:]))
    grads = torch.autograd.grad((y, final.mean, final.var), leaves, (dy.to(dtype), dmean, dvar))
    # Errors are max |error| / max |reference| per tensor. The statistics are float32 in both
    # dtypes, summed in tiles of a few steps and then over <= 8,192 tiles: a few float32 ulps
    # (6e-8) each, so float32 outputs and every float32 gradient (weight, bias, incoming state,
    # and dx in fp32) must be within 1e-5 (the H200 run recorded <= 2.4e-7). A bfloat16 output
    # (y, and dx in bf16) is rounded to 8 significant bits: half a spacing, at most 2^-8 of the
    # largest value (about 2^-9 typically), on top of that; the bound is 2^-8.
    float32_bound = 1e-5
    output_bound = 2**-8 if dtype == torch.bfloat16 else float32_bound
    rel = lambda mine, ref: ((mine.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    errors = {"y": rel(y, y_r), "final mean": rel(final.mean, mean_r), "final var": rel(final.var, var_r)}
    errors.update({f"d{name}": rel(g, r) for name, g, r in zip(GRADIENT_NAMES, grads, grads_r)})
    print(shape_name, dtype, " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    bounds = {"y": output_bound, "dx": output_bound}
    for name, error in errors.items():
        assert error <= bounds.get(name, float32_bound), (name, error)


@gpu
def test_gpu_compiled_kernels_on_odd_shapes_match_the_interpreter_cases():
    """The parametrized cases above ran compiled on CUDA too; here the default tile shape on a
    length that is no multiple of it, with padding, in bf16 (cast both ways for the reference)."""
    case = Case(length=1000, groups=32, group_size=32, batch=3, padding="holes", counts=(0, 7, 100))
    x, weight, bias, state, pad = make_case(case)
    y, final = timestep_norm_triton(x.bfloat16(), weight, bias, 32, state, pad)
    y_r, final_r = timestep_norm(x.bfloat16().double(), weight.double(), bias.double(), 32,
                                 TimestepNormState(state.count, state.mean.double(), state.var.double()), pad)
    assert ((y.double() - y_r).abs() <= 2**-8 * y_r.abs() + 1e-5).all()   # bf16 rounding of y
    assert torch.equal(final.count, final_r.count)
    assert ((final.var.double() - final_r.var).abs() / final_r.var).max() < 1e-5   # float32 statistics

