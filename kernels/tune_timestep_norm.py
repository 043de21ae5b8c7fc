"""Time the TimestepNorm kernels' launch configurations on a GPU, then run the benchmark with the fastest.

One command, one GPU run (chapter 08 Part 2; notes in kernels/NOTES_timestep_norm.md)::

    python kernels/tune_timestep_norm.py --out kernels/results

For each launch configuration (steps per tile, groups per program, warps, look-back window,
resident backward programs per SM) it first checks the kernels against float64 at one small
shape (a configuration that fails is reported and skipped), then times them forward and
forward+backward at the benchmark shapes (bf16, D=1024, G=32, B x L in {32 x 2K, 4 x 16K,
1 x 64K}) eagerly (as ``kernels/bench.py`` does) and replayed from a CUDA graph (the GPU's time
without Python's launch cost), and prints a table against the memory floor. The fastest by the
eager forward+backward at its worst shape is then checked against float64 at every benchmark
shape and profiled (CUDA time per kernel), and ``kernels/bench.py --ops timestep_norm`` runs with
it installed as the default. Writes ``<out>/tune_timestep_norm.json`` (after every configuration,
so a run cut short keeps what it measured) and the benchmark's ``<out>/<device>.json``.
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

# v3 (one launch each way, decoupled look-back; kernels/NOTES_timestep_norm.md). Registers per
# thread compiled for sm_90 on a CPU box (triton 3.9), forward / backward: 8 steps x 8 groups on one
# warp 137 (window 16) or 167 (window 32) / 255 with 80-96 spilled bytes; 8 x 4 groups 91 / 204;
# 16 x 8 on two warps 142 / 255; 32 x 8 on four warps 128 / 255 (16 bytes spilled).
VARIANTS = {
    "T8 G4 w1 win32 pps8": ops.LaunchConfig(8, 4, 1, window=32, programs_per_sm=8),
    "T8 G4 w1 win32 pps10": ops.LaunchConfig(8, 4, 1, window=32, programs_per_sm=10),
    "T8 G4 w1 win16 pps10": ops.LaunchConfig(8, 4, 1, window=16, programs_per_sm=10),
    "T8 G8 w1 win16 pps8": ops.LaunchConfig(8, 8, 1, window=16, programs_per_sm=8),
    "T8 G8 w1 win32 pps8": ops.LaunchConfig(8, 8, 1, window=32, programs_per_sm=8),
    "T16 G8 w2 win32 pps4": ops.LaunchConfig(16, 8, 2, window=32, programs_per_sm=4),
    "T32 G8 w4 win64 pps2": ops.LaunchConfig(32, 8, 4, window=64, programs_per_sm=2),
}


def install(config: ops.LaunchConfig) -> None:
    """Make ``config`` what ``timestep_norm_triton`` launches with (it asks ops.launch_config)."""
    ops.launch_config = lambda channels, num_groups: config


def bench_inputs(batch: int, length: int):
    x = torch.randn(batch, length, bench.D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.zeros(bench.D_MODEL, device="cuda", requires_grad=True) for _ in range(2))
    return x, weight, bias, torch.randn_like(x)


def time_variant(batch: int, length: int) -> dict[str, float]:
    """Milliseconds of timestep_norm_triton (bf16 x, fp32 weight and bias): eager forward and
    forward+backward (median, as kernels/bench.py), and both replayed from a CUDA graph."""
    from triton.testing import do_bench, do_bench_cudagraph

    x, weight, bias, dy = bench_inputs(batch, length)

    def forward():
        with torch.no_grad():
            ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)

    def forward_backward():
        torch.autograd.grad(ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy)

    times = {"fwd_ms": do_bench(forward, warmup=25, rep=200, return_mode="median"),
             "fwdbwd_ms": do_bench(forward_backward, warmup=25, rep=200, return_mode="median")}
    try:
        times["graph_fwd_ms"] = do_bench_cudagraph(forward, rep=50)
        times["graph_fwdbwd_ms"] = do_bench_cudagraph(forward_backward, rep=50)
    except Exception as err:  # graph capture is a help, not the result
        print(f"  CUDA graph timing failed: {err!r}", flush=True)
    return times


def check_against_float64(batch: int, length: int) -> dict[str, float]:
    """max |error| / max |reference| of y and the gradients, bf16 kernel vs float64 on the same values."""
    from megalodon_lite.timestep_norm import timestep_norm

    x = (torch.randn(batch, length, bench.D_MODEL, device="cuda") * 2 + 3).bfloat16()
    dy = torch.randn_like(x)
    weight, bias = torch.randn(2, bench.D_MODEL, device="cuda") * 0.2
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = ops.timestep_norm_triton(*leaves, bench.N_GROUPS)[0]
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.double().requires_grad_() for t in (x, weight, bias)]
    y64 = timestep_norm(*leaves64, bench.N_GROUPS)[0]
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    return {name: ((mine.double() - ref).abs().max() / ref.abs().max()).item()
            for name, mine, ref in zip(("y", "dx", "dweight", "dbias"), (y, *grads), (y64, *grads64))}


def passes_check(errors: dict[str, float]) -> bool:
    """bf16 outputs within 2^-8 of the largest value, float32 parameter gradients within 1e-5."""
    return errors["y"] <= 2**-8 and errors["dx"] <= 2**-8 and errors["dweight"] <= 1e-5 and errors["dbias"] <= 1e-5


def profile_kernels(batch: int, length: int) -> list[tuple[str, float]]:
    """CUDA microseconds per kernel of one forward+backward (mean over 5 profiled runs)."""
    x, weight, bias, dy = bench_inputs(batch, length)
    for _ in range(3):
        torch.autograd.grad(ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(ops.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)}")
    args = parser.parse_args(argv)
    import triton

    ceilings = bench.measure_ceilings()
    device = torch.cuda.get_device_name()
    report = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
                  copy_TBps=ceilings.copy_TBps, variants=[])
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "tune_timestep_norm.json").write_text(json.dumps(report, indent=1) + "\n")

    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, {report['date']}; "
          f"copy {ceilings.copy_TBps:.2f} TB/s", flush=True)
    worst = {}
    for name in args.variants or VARIANTS:
        config = VARIANTS[name]
        install(config)
        try:
            errors = check_against_float64(2, 4096)
        except Exception as err:  # a configuration that fails to compile or run is reported, not fatal
            print(f"{name}: FAILED {err!r}", flush=True)
            continue
        ok = passes_check(errors)
        print(f"{name}: vs float64 at 2x4096 " + " ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + ("" if ok else "  -> WRONG, skipped"), flush=True)
        if not ok:
            report["variants"].append(dict(name=name, config=config._asdict(), check_2x4096=errors, wrong=True))
            save()
            continue
        ratios = []
        for batch, length in bench.SHAPES:
            times = time_variant(batch, length)
            floor = bench.scan_floor_ms(batch, length, bench.D_MODEL, ceilings)
            floor_fb = bench.BWD_OVER_FWD_SCAN * floor
            ratios.append(times["fwdbwd_ms"] / floor_fb)
            report["variants"].append(dict(name=name, config=config._asdict(), B=batch, L=length, **times,
                                           floor_fwd_ms=floor, floor_fwdbwd_ms=floor_fb, check_2x4096=errors))
            save()
            graph = (f"  graph fwd {times.get('graph_fwd_ms', float('nan')):.4f} fwd+bwd "
                     f"{times.get('graph_fwdbwd_ms', float('nan')):.4f} "
                     f"({times.get('graph_fwdbwd_ms', float('nan')) / floor_fb:4.2f}x)")
            print(f"{name:>22} {batch:>2}x{length:<6} fwd {times['fwd_ms']:.4f} ({times['fwd_ms'] / floor:4.2f}x) "
                  f"fwd+bwd {times['fwdbwd_ms']:.4f} ({times['fwdbwd_ms'] / floor_fb:4.2f}x floor)" + graph, flush=True)
        worst[name] = max(ratios)
    if not worst:
        print("no configuration passed its check: nothing to benchmark", flush=True)
        return 1
    best = min(worst, key=worst.get)
    report["best"] = dict(name=best, config=VARIANTS[best]._asdict(), worst_fwdbwd_x_floor=worst[best])
    print(f"fastest (worst eager fwd+bwd x floor over the shapes): {best} -> {worst[best]:.2f}x", flush=True)
    install(VARIANTS[best])
    report["best_vs_float64_bf16"] = {}
    for batch, length in bench.SHAPES:
        report["best_vs_float64_bf16"][f"{batch}x{length}"] = errors = check_against_float64(batch, length)
        print(f"best vs float64, bf16, {batch}x{length}: " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()),
              flush=True)
    save()
    for batch, length in ((4, 16_384), (1, 65_536)):
        try:
            kernels = profile_kernels(batch, length)
        except Exception as err:  # the profiler is a help, not the result
            print(f"profiler failed: {err!r}")
            kernels = []
        print(f"CUDA time per kernel, one fwd+bwd at {batch}x{length}:")
        for kernel_name, us in kernels[:8]:
            print(f"  {us:9.1f} us  {kernel_name[:90]}")
        report[f"profile_{batch}x{length}_us"] = kernels[:8]
    save()
    return bench.main(["--ops", "timestep_norm", "--out", str(args.out)])


if __name__ == "__main__":
    raise SystemExit(main())
