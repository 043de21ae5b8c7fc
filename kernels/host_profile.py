"""Where the host's time goes when Python issues one forward+backward of a Triton op.

    python kernels/host_profile.py --out kernels/results

For CEMA and TimestepNorm (chapter 08) at the benchmark's D=1024, bf16, B x L = 4 x 16K it measures
in one process: the GPU's time of a forward+backward replayed from a CUDA graph; the host's time to
issue one forward+backward (wall time of 20 back-to-back calls, no synchronisation inside: the GPU
queue absorbs them); the eager time (``triton.testing.do_bench``, what ``kernels/bench.py`` reports);
the host's time per launch of a bare three-argument Triton kernel and of each op's own kernels; and a
``cProfile`` of the 20 calls (the functions with the most own time). Writes
``<out>/host_profile_<device>.json`` and ``<out>/host_profile_<device>.txt`` (the profiles).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels.bench import D_MODEL, N_GROUPS, N_STATES, bench_ms, device_slug, graph_ms  # noqa: E402
from kernels.header import results_header  # noqa: E402

BATCH, LENGTH, CALLS = 4, 16384, 20


@triton.jit
def _bare_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


def host_ms(fn, calls: int = CALLS) -> float:
    """Host milliseconds per call of ``fn()``: wall time of back-to-back calls, no synchronisation inside."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def host_us_per_launch(launch, calls: int = 200) -> float:
    """Microseconds of host time per call of ``launch()`` (tiny GPU work), after ten warm-up calls."""
    for _ in range(10):
        launch()
    return host_ms(launch, calls) * 1e3


def problems() -> dict:
    """name -> (fwd+bwd callable returning the gradients, forward callable under no_grad, the pieces:
    forward with autograd returning (y, leaves, dy), and the launchers without autograd, forward and
    backward)."""
    from megalodon_lite.cema import CEMA
    from megalodon_lite.ops.cema import cema_triton
    from megalodon_lite.ops.timestep_norm import timestep_norm_triton

    torch.manual_seed(0)
    layer = CEMA(D_MODEL, N_STATES).cuda()
    coefficients = [t.detach().requires_grad_(True) for t in (*layer.coefficients(), layer.omega)]
    x = torch.randn(BATCH, LENGTH, D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    weight, bias = (torch.randn(D_MODEL, device="cuda", requires_grad=True) for _ in range(2))

    def cema_fb():
        return torch.autograd.grad(cema_triton(x, *coefficients)[0], (x, *coefficients), dy)

    def cema_f():
        with torch.no_grad():
            return cema_triton(x, *coefficients)

    def tsn_fb():
        return torch.autograd.grad(timestep_norm_triton(x, weight, bias, N_GROUPS)[0], (x, weight, bias), dy)

    def tsn_f():
        with torch.no_grad():
            return timestep_norm_triton(x, weight, bias, N_GROUPS)

    from megalodon_lite.ops import cema as cema_ops
    from megalodon_lite.ops import timestep_norm as tsn_ops
    from megalodon_lite.timestep_norm import initial_timestep_norm_state

    pairs = [c.detach() for c in coefficients]
    pairs[1], pairs[2] = torch.view_as_real(pairs[1]), torch.view_as_real(pairs[2])
    xd = x.detach()

    def cema_launch_fwd():
        return cema_ops.cema_triton_fwd(xd, *pairs, None, True)

    _, h_last, ends, ends_dq = cema_launch_fwd()

    def cema_launch_bwd():
        return cema_ops.cema_triton_bwd(dy, torch.zeros_like(h_last), xd, *pairs, None, ends, ends_dq, True)

    state = initial_timestep_norm_state(BATCH, N_GROUPS, device=x.device)
    w, b = weight.detach(), bias.detach()
    zeros = torch.zeros(BATCH, N_GROUPS, device=x.device)

    def tsn_launch_fwd():
        return tsn_ops.timestep_norm_fwd(xd, w, b, state.count, state.mean.float(), state.var.float(), None,
                                         N_GROUPS, 1e-5)

    forward = tsn_launch_fwd()

    def tsn_launch_bwd():
        return tsn_ops.timestep_norm_bwd(dy, zeros, zeros, xd, w, None, *forward[4:], N_GROUPS, 1e-5)

    return {"cema": (cema_fb, cema_f, lambda: (cema_triton(x, *coefficients)[0], (x, *coefficients), dy),
                     cema_launch_fwd, cema_launch_bwd),
            "timestep_norm": (tsn_fb, tsn_f, lambda: (timestep_norm_triton(x, weight, bias, N_GROUPS)[0],
                                                      (x, weight, bias), dy), tsn_launch_fwd, tsn_launch_bwd)}


def split(name: str, graph_with_grad, launch_fwd, launch_bwd) -> dict:
    """The host's time by piece: the launchers alone (no autograd), forward with autograd, and the
    backward alone (CALLS graphs built first, then their backward calls timed); and how many
    synchronising CUDA calls one forward+backward makes (torch.cuda.set_sync_debug_mode)."""
    import warnings

    row = {"launchers_fwd_host_ms": host_ms(launch_fwd), "launchers_bwd_host_ms": host_ms(launch_bwd)}
    row["autograd_fwd_host_ms"] = host_ms(graph_with_grad)
    graphs = [graph_with_grad() for _ in range(CALLS)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for y, leaves, dy in graphs:
        torch.autograd.grad(y, leaves, dy)
    row["autograd_bwd_host_ms"] = (time.perf_counter() - start) / CALLS * 1e3
    torch.cuda.synchronize()
    del graphs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            y, leaves, dy = graph_with_grad()
            torch.autograd.grad(y, leaves, dy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    row["synchronising_calls"] = [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]
    print(name, json.dumps(row), flush=True)
    return row


def measure(name: str, fb, f, report: io.StringIO) -> dict:
    row = {"op": name, "B": BATCH, "L": LENGTH}
    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    row["graph_fwdbwd_ms"], row["graph_fwd_ms"] = graph_ms(fb), graph_ms(f)        # what bench.py records
    row["eager_fwdbwd_ms"], row["eager_fwd_ms"] = bench_ms(fb), bench_ms(f)
    row["host_fwdbwd_ms"], row["host_fwd_ms"] = host_ms(fb), host_ms(f)
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(CALLS):
        fb()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler, stream=report)
    report.write(f"\n==== {name}: cProfile of {CALLS} forward+backward calls at {BATCH} x {LENGTH} ====\n")
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    # host time per Triton launch inside the op: JITFunction.run's cumulative time per call
    calls, seconds = 0, 0.0
    for (path, _, function), (_, n_calls, _, cumulative, _) in stats.stats.items():
        if function == "run" and "triton" in path and "jit" in path:
            calls, seconds = calls + n_calls, seconds + cumulative
    row["triton_run_calls_per_fwdbwd"] = calls / CALLS
    row["triton_run_us_per_call"] = seconds / max(1, calls) * 1e6
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels/host_profile.py needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    buffer = torch.zeros(1024, device="cuda")
    bare_us = host_us_per_launch(lambda: _bare_kernel[(1,)](buffer, buffer.numel(), BLOCK=1024))
    empty_us = host_us_per_launch(lambda: torch.empty(BATCH, LENGTH, D_MODEL, device="cuda", dtype=torch.bfloat16))
    add_us = host_us_per_launch(lambda: buffer.add_(1.0))
    print(f"host per launch: bare Triton kernel {bare_us:.1f} us, torch.empty {empty_us:.1f} us, "
          f"torch add_ {add_us:.1f} us", flush=True)
    report = io.StringIO()
    rows = []
    for name, (fb, f, graph_with_grad, launch_fwd, launch_bwd) in problems().items():
        rows.append({**measure(name, fb, f, report), **split(name, graph_with_grad, launch_fwd, launch_bwd)})
    header = results_header(
        device, versions=("torch", "triton", "python"),
        shape={"B": BATCH, "L": LENGTH, "D": D_MODEL, "N": N_STATES, "G": N_GROUPS, "dtype": "bfloat16"},
        host_us_per_launch={"bare_triton_kernel": bare_us, "torch_empty": empty_us, "torch_add_": add_us},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    (args.out / f"host_profile_{slug}.json").write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
    (args.out / f"host_profile_{slug}.txt").write_text(
        "\n".join(f"{k}: {v}" for k, v in header.items()) + "\n" + report.getvalue())
    print(f"wrote {args.out}/host_profile_{slug}.{{json,txt}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
