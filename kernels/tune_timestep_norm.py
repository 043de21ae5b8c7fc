"""Time the TimestepNorm kernels' tile shapes on a GPU, then run the benchmark with the fastest.

One command, one GPU run (chapter 08 Part 2; notes in kernels/NOTES_timestep_norm.md)::

    python kernels/tune_timestep_norm.py --out kernels/results

For each tile shape (steps per tile, channels per program, warps) it times the kernels forward and
forward+backward at the benchmark shapes (bf16, D=1024, G=32, B x L in {32 x 2K, 4 x 16K,
1 x 64K}), prints a table against the memory floor, profiles the fastest shape's kernels at
4 x 16K (CUDA time per kernel), checks it against float64 and times it from a CUDA graph (the
GPU's time without Python's launch cost), and finally runs ``kernels/bench.py --ops timestep_norm`` with
the fastest shape installed as the default. Writes ``<out>/tune_timestep_norm.json`` and the
benchmark's ``<out>/<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels import bench  # noqa: E402
from megalodon_lite.ops import timestep_norm as ops  # noqa: E402

# (steps per tile, channels per program, warps). The first run (2026-11-30) timed (32, 256, 4),
# (32, 256, 8), (16, 256, 4), (64, 128, 4) and (16, 512, 8): fewer elements per thread was slower,
# which points at cross-warp work (the step-axis scans and sums). Triton lays a [T, BG, 32] bf16 tile
# out with 4 threads x 8 channels along a group and 8 threads along groups, then puts the warps on the
# next axis that has room: the groups when BLOCK_G >= 8 x warps (T then stays inside each thread),
# else the steps. These shapes keep the steps inside a thread, but the first and the last.
VARIANTS = [(32, 256, 4), (8, 256, 1), (8, 512, 2), (8, 1024, 4), (16, 256, 2)]


def config_for(steps: int, channels: int, warps: int):
    """A launch_config replacement that returns this tile shape for D=1024, G=32."""
    def choose(d_model: int, num_groups: int) -> ops.LaunchConfig:
        group_size = d_model // num_groups
        return ops.LaunchConfig(block_t=steps, block_g=max(1, channels // group_size), num_warps=warps)
    return choose


def time_variant(batch: int, length: int, ceilings: bench.Ceilings) -> tuple[float, float]:
    """fwd and fwd+bwd milliseconds of timestep_norm_triton (bf16 x, fp32 weight and bias)."""
    from triton.testing import do_bench

    x = torch.randn(batch, length, bench.D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.zeros(bench.D_MODEL, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)

    def forward_backward():
        torch.autograd.grad(ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy)

    return (do_bench(forward, warmup=5, rep=40, return_mode="median"),
            do_bench(forward_backward, warmup=5, rep=40, return_mode="median"))


def time_kernels_only(batch: int, length: int) -> float:
    """fwd+bwd milliseconds replayed from a CUDA graph: the GPU's time without Python's launches."""
    from triton.testing import do_bench_cudagraph

    x = torch.randn(batch, length, bench.D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.zeros(bench.D_MODEL, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn_like(x)
    return do_bench_cudagraph(lambda: torch.autograd.grad(
        ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy), rep=40)


def check_against_float64(batch: int, length: int) -> dict[str, float]:
    """max |error| / max |reference| of y and the gradients, bf16 kernel vs float64 on the same values."""
    from megalodon_lite.timestep_norm import timestep_norm

    x = (torch.randn(batch, length, bench.D_MODEL, device="cuda") * 2 + 3).bfloat16()
    dy = torch.randn_like(x)
    weight, bias = torch.randn(2, bench.D_MODEL, device="cuda") * 0.2
    errors = {}
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = ops.timestep_norm_triton(*leaves, bench.N_GROUPS)[0]
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.double().requires_grad_() for t in (x, weight, bias)]
    y64 = timestep_norm(*leaves64, bench.N_GROUPS)[0]
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    for name, mine, ref in zip(("y", "dx", "dweight", "dbias"), (y, *grads), (y64, *grads64)):
        errors[name] = ((mine.double() - ref).abs().max() / ref.abs().max()).item()
    return errors


def profile_kernels(batch: int, length: int) -> list[tuple[str, float]]:
    """CUDA microseconds per kernel of one forward+backward (median over 5 profiled runs)."""
    x = torch.randn(batch, length, bench.D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.zeros(bench.D_MODEL, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn_like(x)
    for _ in range(3):
        torch.autograd.grad(ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / e.count) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    args = parser.parse_args(argv)
    import triton

    ceilings = bench.measure_ceilings()
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
          f"copy {ceilings.copy_TBps:.2f} TB/s", flush=True)
    results = []
    for steps, channels, warps in VARIANTS:
        ops.launch_config = config_for(steps, channels, warps)
        for batch, length in bench.SHAPES:
            try:
                fwd_ms, fwdbwd_ms = time_variant(batch, length, ceilings)
            except Exception as err:  # a shape that fails to compile is reported, not fatal
                print(f"T={steps} C={channels} W={warps} {batch}x{length}: FAILED {err!r}", flush=True)
                continue
            floor = bench.scan_floor_ms(batch, length, bench.D_MODEL, ceilings)
            results.append(dict(steps=steps, channels=channels, warps=warps, B=batch, L=length, fwd_ms=fwd_ms,
                                fwdbwd_ms=fwdbwd_ms, fwd_x_floor=fwd_ms / floor,
                                fwdbwd_x_floor=fwdbwd_ms / (bench.BWD_OVER_FWD_SCAN * floor)))
            print(f"T={steps:>3} C={channels:>4} W={warps}  {batch:>2}x{length:<6} fwd {fwd_ms:7.4f} ms "
                  f"({fwd_ms / floor:4.2f}x)  fwd+bwd {fwdbwd_ms:7.4f} ms "
                  f"({fwdbwd_ms / (bench.BWD_OVER_FWD_SCAN * floor):4.2f}x floor)", flush=True)
    totals = {}
    for r in results:
        key = (r["steps"], r["channels"], r["warps"])
        totals.setdefault(key, []).append(r["fwdbwd_x_floor"])
    complete = {k: max(v) for k, v in totals.items() if len(v) == len(bench.SHAPES)}
    best = min(complete, key=complete.get)
    print(f"fastest tile shape (worst fwd+bwd x floor over the shapes): T={best[0]} C={best[1]} W={best[2]} "
          f"-> {complete[best]:.2f}x", flush=True)
    ops.launch_config = config_for(*best)
    checks, graph_ms = {}, {}
    for batch, length in bench.SHAPES:
        try:
            checks[f"{batch}x{length}"] = errors = check_against_float64(batch, length)
            print(f"best shape vs float64, bf16, {batch}x{length}: "
                  + " ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
        except Exception as err:  # reported; the pytest run checks correctness too
            print(f"float64 check failed: {err!r}", flush=True)
        try:
            graph_ms[f"{batch}x{length}"] = ms = time_kernels_only(batch, length)
            floor = bench.scan_floor_ms(batch, length, bench.D_MODEL, ceilings)
            print(f"  fwd+bwd from a CUDA graph (no Python launch cost): {ms:.4f} ms "
                  f"({ms / (bench.BWD_OVER_FWD_SCAN * floor):.2f}x floor)", flush=True)
        except Exception as err:  # graph capture is a help, not the result
            print(f"  CUDA graph timing failed: {err!r}", flush=True)
    try:
        kernels = profile_kernels(4, 16_384)
    except Exception as err:  # the profiler is a help, not the result
        print(f"profiler failed: {err!r}")
        kernels = []
    for name, us in kernels[:12]:
        print(f"  {us:9.1f} us  {name[:90]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_timestep_norm.json").write_text(json.dumps(dict(
        device=device, torch=torch.__version__, triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        copy_TBps=ceilings.copy_TBps, variants=results, best=dict(steps=best[0], channels=best[1], warps=best[2]),
        best_vs_float64_bf16=checks, best_fwdbwd_cuda_graph_ms=graph_ms, profile_4x16K_us=kernels[:12]),
        indent=1) + "\n")
    return bench.main(["--ops", "timestep_norm", "--out", str(args.out)])


if __name__ == "__main__":
    raise SystemExit(main())
