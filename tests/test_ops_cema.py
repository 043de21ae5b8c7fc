"""megalodon_lite.ops.cema: the CEMA Triton kernels against chapter 04's float64 reference.

On a CPU the kernels run under the Triton interpreter (the root conftest sets TRITON_INTERPRET=1
when there is no GPU) at tiny sizes, in float32: there ``tl.dot`` is a float32 matrix product,
so every output is float32 arithmetic on sums of at most a few hundred O(1) terms, and a relative
error (norm of the difference over norm of the reference) of 2e-5 leaves a wide margin over the
~1e-6 such sums reach. The tiles shrink with the sizes (blocks of 16, 4 streams per program,
segments of 32 tokens), so a few dozen tokens cross blocks, segments, stream groups and channel
tiles. Every kernel output starts as NaN (``poisoned_outputs``): an element no program wrote
shows up as a non-finite result.

The tests marked ``gpu`` run on CUDA only: bf16 and fp32 at the benchmark shapes, a million-token
sequence, and the streaming oracle (their log: kernels/results/cema_gpu_tests_h200_v4.txt).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from megalodon_lite.cema import CEMA, cema_chunked, cema_powers, cema_recurrence
from megalodon_lite.ops import cema as ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Tiny tiles under the interpreter; on a GPU the same shapes with tiles tl.dot accepts (>= 16).
TINY = dict(chunk=16, chunk_grad=16, block_d=8, streams=16, num_warps=4) if HAS_CUDA else \
    dict(chunk=16, chunk_grad=16, block_d=4, streams=4, num_warps=1)
RTOL_FP32 = 2e-5
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# (id, B, L, D, N, segment tokens (0: the automatic plan), chunk, with h0)
CASES = [
    ("L1-decode-step", 2, 1, 5, 3, 0, 16, True),
    ("L-below-one-block", 2, 7, 5, 3, 0, 16, False),
    ("exactly-one-block", 1, 16, 6, 4, 0, 16, True),
    ("odd-L-many-blocks", 2, 83, 5, 4, 0, 16, True),
    ("segments-groups-straddle-rows", 2, 90, 10, 3, 32, 16, True),
    ("segments-without-h0", 3, 70, 6, 2, 32, 16, False),
    ("chunk32-D-not-pow2", 1, 100, 12, 4, 64, 32, True),
    ("N9-padded-to-16", 1, 40, 3, 9, 0, 16, True),
    ("prefetch-next-block", 2, 90, 6, 3, 32, 16, True),
    ("prefetch-3-blocks-past-segment-ends", 2, 90, 6, 3, 32, 16, True),
]
PREFETCH = {"prefetch-next-block": 1, "prefetch-3-blocks-past-segment-ends": 3}   # blocks loaded ahead


def config(segment: int = 0, chunk: int = 16, prefetch: int = 0) -> ops.CemaKernelConfig:
    return ops.CemaKernelConfig(**{**TINY, "chunk": chunk}, segment=segment, prefetch=prefetch)


def random_problem(batch: int, length: int, d_model: int, n_states: int, with_h0: bool, seed: int = 0):
    """A float64 layer away from its initialisation (gamma with imaginary parts), x, h0, dy, dh."""
    torch.manual_seed(seed)
    layer = CEMA(d_model, n_states).double().to(DEVICE)
    with torch.no_grad():
        for parameter in (layer.alpha, layer.delta, layer.theta, layer.gamma):
            parameter.add_(0.5 * torch.randn_like(parameter))
    x = torch.randn(batch, length, d_model, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(batch, d_model, n_states, dtype=torch.complex128, device=DEVICE) if with_h0 else None
    dy = torch.randn(batch, length, d_model, dtype=torch.float64, device=DEVICE)
    dh = torch.randn(batch, d_model, n_states, dtype=torch.complex128, device=DEVICE)
    return layer, x, h0, dy, dh


def run(form, layer, x, h0, dy, dh, *, through_parameters: bool) -> dict[str, torch.Tensor]:
    """y, h_last and the gradients of <y, dy> + <h_last, dh>: to x, h0 and either the
    coefficients p, q, gamma, omega or the layer's raw parameters (through cema_coefficients)."""
    x = x.detach().clone().requires_grad_(True)
    h0 = None if h0 is None else h0.detach().clone().requires_grad_(True)
    if through_parameters:
        p, q, gamma = layer.coefficients()
        leaves = {"alpha": layer.alpha, "delta": layer.delta, "theta": layer.theta, "gamma": layer.gamma}
    else:
        p, q, gamma = (t.detach().clone().requires_grad_(True) for t in layer.coefficients())
        leaves = {"p": p, "q": q, "gamma": gamma}
    leaves = {"x": x, "omega": layer.omega, **leaves, **({} if h0 is None else {"h0": h0})}
    y, h_last = form(x, p, q, gamma, layer.omega, h0)
    loss = (y.double() * dy).sum() + (torch.view_as_real(h_last).double() * torch.view_as_real(dh)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out = {"y": y, "h_last": torch.view_as_real(h_last)}
    out.update({f"d_{name}": torch.view_as_real(g) if g.is_complex() else g for name, g in zip(leaves, grads)})
    return out


def relative_errors(got: dict, want: dict) -> dict[str, float]:
    assert got.keys() == want.keys()
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{name}: non-finite values (an element no kernel wrote?)"
    return {name: ((got[name].double() - want[name]).norm() / want[name].norm()).item() for name in want}


def kernel_form(cfg: ops.CemaKernelConfig):
    def form(x, p, q, gamma, omega, h0):
        return ops.cema_triton(x, p, q, gamma, omega, h0, config=cfg)
    return form


def float32_copy(layer: CEMA) -> CEMA:
    return copy.deepcopy(layer).float()


def check_case(case, through_parameters: bool, cfg: ops.CemaKernelConfig | None = None) -> None:
    _, batch, length, d_model, n_states, segment, chunk, with_h0 = case
    cfg = cfg or config(segment, chunk, prefetch=PREFETCH.get(case[0], 0))
    layer, x, h0, dy, dh = random_problem(batch, length, d_model, n_states, with_h0)
    want = run(cema_recurrence, layer, x, h0, dy, dh, through_parameters=through_parameters)
    layer32 = float32_copy(layer)
    with ops.poisoned_outputs():
        got = run(kernel_form(cfg), layer32, x.float(),
                  None if h0 is None else h0.to(torch.complex64), dy, dh, through_parameters=through_parameters)
    errors = relative_errors(got, want)
    assert max(errors.values()) < RTOL_FP32, errors


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_every_gradient_match_float64_reference(case):
    """y, h_last and the gradients to x, h0, p, q, gamma, omega."""
    check_case(case, through_parameters=False)


def test_int64_offsets_match_too(monkeypatch):
    """Tensors of 2^31 elements or more take int64 offsets (WIDE): the same results, forced small."""
    monkeypatch.setattr(ops, "INT32_OFFSETS_BELOW", 0)
    assert ops._tile_flags(torch.empty(1, 1, 4), ops.DEFAULT_CONFIG, 4)["WIDE"]
    check_case(CASES[8], through_parameters=False)      # segments, h0, prefetch past the segment end


def test_each_kernel_with_its_own_channel_tile():
    """Kernel 1 (segment ends) and kernel 3 (parameter sums) may tile the channels unlike kernel 2."""
    block_d = TINY["block_d"]
    cfg = ops.CemaKernelConfig(**TINY, segment=32, prefetch=2, block_d_ends=2 * block_d, num_warps_ends=TINY["num_warps"],
                               block_d_grad=block_d // 2 if not HAS_CUDA else block_d, num_warps_grad=1 if not HAS_CUDA else 2)
    assert cfg.tile("ends") == (2 * block_d, TINY["num_warps"]) and cfg.tile("scan") == (block_d, TINY["num_warps"])
    check_case(CASES[4], through_parameters=False, cfg=cfg)      # segments, groups straddling rows, h0


# kernel 2 writing y (and dx) to (B, L, D) directly or through the channel-major scratch and the
# transpose kernel: the tests above run the default (y_scratch=True); here the other path on odd L,
# D not a multiple of the channel tile, several rows, one token, segments, a longer block, and both
# paths with int64 offsets. (case, int64 offsets, y_scratch)
STORE_CASES = [(CASES[i], False, False) for i in (0, 3, 4, 5, 6)] + [(CASES[4], True, False), (CASES[4], True, True)]


@pytest.mark.parametrize("case, wide, y_scratch", STORE_CASES,
                         ids=[c[0] + ("-int64-offsets" if wide else "") + ("-y-scratch" if scratch else "-y-direct")
                              for c, wide, scratch in STORE_CASES])
def test_both_ways_of_storing_y_match_too(case, wide, y_scratch, monkeypatch):
    """y_scratch off and on: the same forward and gradients; every output (the scratch too)
    starts as NaN, and with the scratch both scans (y forward, dx backward) go through the transpose."""
    if wide:
        monkeypatch.setattr(ops, "INT32_OFFSETS_BELOW", 0)
    transposes = []
    launch = ops.launch_transpose
    monkeypatch.setattr(ops, "launch_transpose", lambda *a, **k: transposes.append(k["reverse"]) or launch(*a, **k))
    _, _, _, _, _, segment, chunk, _ = case
    cfg = ops.CemaKernelConfig(**{**TINY, "chunk": chunk}, segment=segment, prefetch=2, y_scratch=y_scratch,
                               transpose_tokens=16, transpose_channels=4 if not HAS_CUDA else 16)
    check_case(case, through_parameters=False, cfg=cfg)
    assert transposes == ([False, True] if y_scratch else [])


@pytest.mark.parametrize("case", [CASES[3], CASES[4]], ids=[CASES[3][0], CASES[4][0]])
def test_gradients_reach_the_layer_parameters(case):
    """The same through cema_coefficients: alpha, delta, theta, gamma, omega."""
    check_case(case, through_parameters=True)


def test_pieces_with_carried_state_equal_one_call():
    layer, x, h0, _, _ = random_problem(2, 75, 6, 4, with_h0=True, seed=1)
    layer32, cfg = float32_copy(layer), config(segment=32)
    x32, h = x.float(), h0.to(torch.complex64)
    with torch.no_grad(), ops.poisoned_outputs():
        p, q, gamma = layer32.coefficients()
        y_whole, h_whole = ops.cema_triton(x32, p, q, gamma, layer32.omega, h, config=cfg)
        pieces = []
        for a, b in [(0, 1), (1, 33), (33, 70), (70, 75)]:
            y_piece, h = ops.cema_triton(x32[:, a:b], p, q, gamma, layer32.omega, h, config=cfg)
            pieces.append(y_piece)
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(h, h_whole, rtol=0, atol=1e-5)


def test_torch_compile_calls_the_custom_ops_as_opaque_nodes():
    layer, x, h0, _, _ = random_problem(1, 40, 4, 3, with_h0=True, seed=2)
    layer32, cfg = float32_copy(layer), config()

    def block(x, h0):
        p, q, gamma = layer32.coefficients()
        y, h_last = ops.cema_triton(torch.tanh(x), p, q, gamma, layer32.omega, h0, config=cfg)
        return (y * y).sum() + h_last.abs().sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x32 = x.float().requires_grad_(True)
    h = h0.to(torch.complex64)
    loss = compiled(x32, h)
    (grad_compiled,) = torch.autograd.grad(loss, x32)
    x_eager = x32.detach().clone().requires_grad_(True)
    loss_eager = block(x_eager, h)
    (grad_eager,) = torch.autograd.grad(loss_eager, x_eager)
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(grad_compiled, grad_eager)
    assert hasattr(torch.ops.megalodon_lite, "cema_fwd") and hasattr(torch.ops.megalodon_lite, "cema_bwd")


def test_compiled_graphs_hold_the_custom_ops_and_eager_calls_skip_the_dispatcher(monkeypatch):
    """Under torch.compile the forward and backward graphs call megalodon_lite::cema_fwd / cema_bwd;
    eagerly the autograd function calls the functions they wrap, never the ops."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    layer, x, h0, _, _ = random_problem(1, 24, 4, 3, with_h0=True, seed=5)
    layer32, cfg = float32_copy(layer), config()
    p, q, gamma = (t.detach() for t in layer32.coefficients())
    targets: list[str] = []

    def record(graph_module, _inputs):
        targets.extend(str(node.target) for node in graph_module.graph.nodes)
        return make_boxed_func(graph_module.forward)

    def block(x):
        return ops.cema_triton(x, p, q, gamma, layer32.omega, h0.to(torch.complex64), config=cfg)[0].sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    x32 = x.float().requires_grad_(True)
    (grad_compiled,) = torch.autograd.grad(compiled(x32), x32)
    assert "megalodon_lite.cema_fwd.default" in targets and "megalodon_lite.cema_bwd.default" in targets, targets

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")
    monkeypatch.setattr(ops, "cema_fwd_op", refuse)
    monkeypatch.setattr(ops, "cema_bwd_op", refuse)
    x_eager = x32.detach().clone().requires_grad_(True)
    (grad_eager,) = torch.autograd.grad(block(x_eager), x_eager)
    torch.testing.assert_close(grad_eager, grad_compiled)


def test_fake_tensor_shapes_match_the_kernels():
    layer, x, h0, _, _ = random_problem(2, 50, 5, 3, with_h0=True, seed=3)
    layer32, cfg = float32_copy(layer), config(segment=32)
    p, q, gamma = (t.detach() for t in layer32.coefficients())
    args = (x.float(), p, torch.view_as_real(q), torch.view_as_real(gamma), layer32.omega.detach(),
            torch.view_as_real(h0.to(torch.complex64)), True, *ops._config_args(cfg))
    torch.library.opcheck(torch.ops.megalodon_lite.cema_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("adjoint", [False, True], ids=["forward", "adjoint"])
def test_tables_match_cema_powers(adjoint):
    """The tables kernel against chapter 04's cema_powers and the definitions in CemaTables."""
    layer, _, _, _, _ = random_problem(1, 1, 5, 3, with_h0=False)
    p, q, gamma = (t.detach() for t in float32_copy(layer).coefficients())
    chunk, length, seg_len = 16, 1000, 64
    tables = ops.build_tables(ops._log_q(torch.view_as_real(q)), torch.view_as_real(q), p, torch.view_as_real(gamma),
                              chunk, length, seg_len, adjoint=adjoint)
    n = q.shape[1]
    powers = cema_powers(q, chunk + 1)
    beta, c, v0 = (q * gamma, p.to(q.dtype), 0) if adjoint else (p.to(q.dtype), gamma, 1)
    last_len = length - (length - 1) // chunk * chunk
    at = lambda t: cema_powers(q, 1, start=t)[..., 0]  # noqa: E731
    expected = {
        "powers": torch.view_as_real(powers[..., :chunk].transpose(1, 2)),
        "kern": ((p * gamma)[..., None] * powers[..., :chunk]).real.sum(1),
        "u": torch.view_as_real((beta[..., None] * powers[..., :chunk].flip(-1)).transpose(1, 2)),
        "v": torch.stack([(c[..., None] * powers[..., v0:v0 + chunk]).real,
                          -(c[..., None] * powers[..., v0:v0 + chunk]).imag], dim=2),
        "step": torch.view_as_real(torch.stack([at(chunk), at(last_len - 1), at(last_len), at(seg_len), beta, q,
                                                at(length - 1)], dim=1)),
    }
    got = {"powers": tables.powers[:, :, :n], "kern": tables.kern, "u": tables.u[:, :, :n], "v": tables.v[:, :n],
           "step": tables.step[:, :7, :n]}
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want.float(), rtol=1e-5, atol=1e-6, msg=name)
    assert (tables.powers[:, :, n:] == 0).all() and (tables.u[:, :, n:] == 0).all()   # padded states stay zero


def test_plan_segments_covers_every_token():
    cfg = ops.CemaKernelConfig()
    for batch, length in [(32, 2048), (4, 16384), (1, 65536), (1, 1), (3, 1000)]:
        plan = ops.plan_segments(batch, length, 1024, cfg)
        assert plan.seg_len % cfg.chunk == 0 and plan.seg_len % cfg.chunk_grad == 0
        assert (plan.n_seg - 1) * plan.seg_len < length <= plan.n_seg * plan.seg_len
        assert plan.groups * cfg.streams >= batch * plan.n_seg
    assert ops.plan_segments(1, 65536, 1024, cfg).n_seg > 1            # one long row is cut for parallelism


def test_bad_inputs_are_refused_with_the_argument_named(monkeypatch):
    layer, x, _, _, _ = random_problem(1, 8, 4, 2, with_h0=False)
    p, q, gamma = layer.coefficients()
    with pytest.raises(TypeError, match="cema_chunked"):          # float64 is not the kernels' job
        ops.cema_triton(x, p, q, gamma, layer.omega)
    layer32 = float32_copy(layer)
    p, q, gamma = layer32.coefficients()
    with pytest.raises(ValueError, match="omega"):
        ops.cema_triton(x.float(), p, q, gamma, layer32.omega[:3])
    with pytest.raises(ValueError, match="h0"):
        ops.cema_triton(x.float(), p, q, gamma, layer32.omega, torch.zeros(2, 4, 2, dtype=torch.complex64, device=DEVICE))
    if not HAS_CUDA:
        monkeypatch.setattr(ops, "interpreter_enabled", lambda: False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            ops.cema_triton(x.float(), p, q, gamma, layer32.omega)


# ----------------------------------------------------------------------------------------- GPU
# Bounds, as relative errors against float64 on the same (rounded) inputs:
# * bf16 input (and bf16 dL/dy, as autograd delivers it): y and dx are stored in bf16 (unit
#   roundoff 2^-8, an RMS relative error near 2^-8 / sqrt(3)); the tf32 products round tables and
#   states to 2^-11; bound 2^-8. The float32 outputs (h_last, parameter gradients, dh0) carry
#   only the tf32 rounding: bound 2^-9.
# * float32 input: tf32x3 products keep float32 accuracy; what remains is float32 rounding in
#   sums over up to 64K tokens: bound 1e-5.
GPU_BOUNDS = {torch.bfloat16: (2**-8, 2**-9), torch.float32: (1e-5, 1e-5)}
BENCH_SHAPES = [(32, 2048), (4, 16384), (1, 65536)]


def reference_chunked(x, p, q, gamma, omega, h0):
    return cema_chunked(x, p, q, gamma, omega, h0, chunk_size=256)


@gpu
@pytest.mark.parametrize("y_scratch", [False, True], ids=["y-direct", "y-scratch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", BENCH_SHAPES, ids=[f"{b}x{l}" for b, l in BENCH_SHAPES])
def test_gpu_benchmark_shapes_against_float64(shape, dtype, y_scratch):
    batch, length = shape
    layer, x, h0, dy, dh = random_problem(batch, length, 1024, 16, with_h0=True, seed=4)
    x_low = x.to(dtype)              # both sides see the same rounded input, and the same rounded
    dy = dy.to(dtype).double()       # dL/dy (the kernel receives it in y's dtype)
    want = run(reference_chunked, layer, x_low.double(), h0, dy, dh, through_parameters=False)
    form = kernel_form(dataclasses.replace(ops.DEFAULT_CONFIG, y_scratch=y_scratch))
    with ops.poisoned_outputs():
        got = run(form, float32_copy(layer), x_low, h0.to(torch.complex64), dy, dh, through_parameters=False)
    errors = relative_errors(got, want)
    low_bound, fp32_bound = GPU_BOUNDS[dtype]
    print(f"\n{batch}x{length} {dtype} y_scratch={y_scratch}: " + "  ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    for name, err in errors.items():
        bound = low_bound if name in ("y", "d_x") else fp32_bound
        assert err < bound, (name, err, bound)


@gpu
def test_gpu_million_token_state_stays_accurate():
    layer, x, h0, _, _ = random_problem(1, 2**20, 64, 16, with_h0=True, seed=5)
    with torch.no_grad():
        p, q, gamma = layer.coefficients()
        y_ref, h_ref = cema_chunked(x, p, q, gamma, layer.omega, h0, chunk_size=1024)
        layer32 = float32_copy(layer)
        p, q, gamma = layer32.coefficients()
        y, h_last = ops.cema_triton(x.float(), p, q, gamma, layer32.omega, h0.to(torch.complex64))
    err_y = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    err_tail = ((y[:, -4096:].double() - y_ref[:, -4096:]).norm() / y_ref[:, -4096:].norm()).item()
    err_h = ((h_last.to(torch.complex128) - h_ref).abs().max() / h_ref.abs().max()).item()
    print(f"\nL = 2^20, fp32: y {err_y:.2e}, last 4096 tokens {err_tail:.2e}, final state {err_h:.2e}")
    assert err_y < 1e-5 and err_tail < 1e-5 and err_h < 1e-5


@gpu
def test_gpu_streaming_pieces_bf16():
    layer, x, h0, _, _ = random_problem(2, 20_000, 256, 16, with_h0=True, seed=6)
    layer32 = float32_copy(layer)
    x16, h = x.to(torch.bfloat16), h0.to(torch.complex64)
    with torch.no_grad():
        p, q, gamma = layer32.coefficients()
        y_whole, h_whole = ops.cema_triton(x16, p, q, gamma, layer32.omega, h)
        pieces = []
        for a, b in [(0, 1), (1, 4097), (4097, 19_999), (19_999, 20_000)]:
            y_piece, h = ops.cema_triton(x16[:, a:b], p, q, gamma, layer32.omega, h)
            pieces.append(y_piece)
    y_pieces = torch.cat(pieces, dim=1).float()
    err = ((y_pieces - y_whole.float()).norm() / y_whole.float().norm()).item()
    print(f"\nstreaming in 4 pieces, bf16: relative difference {err:.2e}")
    assert err < 2**-8 and ((h - h_whole).abs().max() / h_whole.abs().max()) < 2**-9
