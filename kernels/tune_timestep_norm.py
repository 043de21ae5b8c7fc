"""Time the TimestepNorm kernels' tile shapes on a GPU, then run the benchmark with the fastest.

One command, one GPU run (chapter 08 Part 2; notes in kernels/NOTES_timestep_norm.md)::

    python kernels/tune_timestep_norm.py --out kernels/results

For each launch configuration (steps per tile, channels per program, warps, tiles per chunk) it
times the kernels forward and forward+backward at the benchmark shapes (bf16, D=1024, G=32,
B x L in {32 x 2K, 4 x 16K, 1 x 64K}), eagerly and replayed from a CUDA graph (the GPU's time
without Python's launch cost), and prints a table against the memory floor. Every configuration is
profiled per kernel at 4 x 16K; the fastest (by the worst CUDA-graph fwd+bwd over the shapes) also
at 1 x 64K, checked against float64 and for bit-identical parameter gradients across calls, and
finally ``kernels/bench.py --ops timestep_norm`` runs with it installed as the default.
``--baseline FILE`` times another version of the ops module the same way in the same run (e.g.
the previous one, ``git show <commit>:megalodon_lite/ops/timestep_norm.py``), as an A/B.
Writes ``<out>/tune_timestep_norm.json`` and the benchmark's ``<out>/<device>.json``.
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
from kernels.header import results_header  # noqa: E402
from megalodon_lite.ops import timestep_norm as ops  # noqa: E402

# (steps per tile, channels per program, warps, tiles per chunk). Runs 1-2 (v2) found 8 steps x 256
# channels on one warp fastest: Triton lays a [T, BG, 32] bf16 tile out with 4 threads x 8 channels
# along a group and 8 threads along groups, so with BLOCK_G = 8 and one warp each thread holds all T
# steps of its channels (the step-axis scans stay in registers). Run 4 (v2.5a, every kernel walking
# chunks; NOTES) ruled out walking tiles in the kernels that write y and dx, and prefetching. v2.5
# walks only in the summary kernels; sm_90 registers on the CPU box at 8 steps: normalise 168,
# grad summary 255 (no spill), dx 219; at 4 steps 95, 161, 128. Run 5 chose 4 steps in chunks of 32.
# v2.6 (fewer instructions per tile), runs 6-7 (NOTES): chunks of 16 and 64 tie with 32 or lose a
# little; capping backward pass 1 at 128 registers, prefetching the summaries' next tile and y/dx
# programs walking 2-4 tiles (code on commits f0616fd, f6e7d00) tie or lose, and are not in the package.
VARIANTS = [(4, 256, 1, 32), (4, 256, 1, 16), (4, 256, 1, 64)]


def config_for(steps: int, channels: int, warps: int, tiles: int):
    """A launch_config replacement that returns this configuration for D=1024, G=32."""
    def choose(d_model: int, num_groups: int) -> ops.LaunchConfig:
        group_size = d_model // num_groups
        return ops.LaunchConfig(block_t=steps, block_g=max(1, channels // group_size), num_warps=warps,
                                tiles_per_program=tiles)
    return choose


def time_variant(batch: int, length: int, ceilings: bench.Ceilings, module=ops) -> tuple[float, float]:
    """fwd and fwd+bwd milliseconds of timestep_norm_triton (bf16 x, fp32 weight and bias)."""
    from triton.testing import do_bench

    x = torch.randn(batch, length, bench.D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.zeros(bench.D_MODEL, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            module.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)

    def forward_backward():
        torch.autograd.grad(module.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy)

    return (do_bench(forward, warmup=5, rep=40, return_mode="median"),
            do_bench(forward_backward, warmup=5, rep=40, return_mode="median"))


def time_kernels_only(batch: int, length: int, module=ops) -> float:
    """fwd+bwd milliseconds replayed from a CUDA graph: the GPU's time without Python's launches."""
    from triton.testing import do_bench_cudagraph

    x = torch.randn(batch, length, bench.D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.zeros(bench.D_MODEL, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn_like(x)
    return do_bench_cudagraph(lambda: torch.autograd.grad(
        module.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy), rep=40)


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
    again = torch.autograd.grad(ops.timestep_norm_triton(*leaves, bench.N_GROUPS)[0], leaves, dy)
    errors["dweight, dbias bit-identical on a second call"] = float(
        torch.equal(again[1], grads[1]) and torch.equal(again[2], grads[2]))
    return errors


def profile_kernels(batch: int, length: int, module=ops) -> list[tuple[str, float]]:
    """CUDA microseconds per kernel of one forward+backward (mean over 5 profiled runs)."""
    x = torch.randn(batch, length, bench.D_MODEL, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight, bias = (torch.zeros(bench.D_MODEL, device="cuda", requires_grad=True) for _ in range(2))
    dy = torch.randn_like(x)
    for _ in range(3):
        torch.autograd.grad(module.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias), dy)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(module.timestep_norm_triton(x, weight, bias, bench.N_GROUPS)[0], (x, weight, bias),
                                dy)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / e.count) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    parser.add_argument("--baseline", type=Path, default=None, help="another ops module file to time as an A/B")
    args = parser.parse_args(argv)
    import triton

    ceilings = bench.measure_ceilings()
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
          f"copy {ceilings.copy_TBps:.2f} TB/s", flush=True)
    candidates = [(f"T={t} C={c} W={w} tiles={n}", ops, config_for(t, c, w, n)) for t, c, w, n in VARIANTS]
    baseline = bench.load_ops_copy(args.baseline, "baseline") if args.baseline else None
    if baseline is not None:
        candidates.insert(0, ("baseline (" + args.baseline.name + ")", baseline, baseline.launch_config))
    results, profiles = [], {}
    for name, module, choose in candidates:
        module.launch_config = choose
        try:   # per kernel at 4 x 16K for every variant: which kernel a change moved
            profiles[f"{name} 4x16384"] = kernels = profile_kernels(4, 16_384, module)[:9]
            print(f"{name}, 4x16384, us per kernel: "
                  + ", ".join(f"{k.strip('_').split('<')[0][:24]} {us:.1f}" for k, us in kernels), flush=True)
        except Exception as err:  # the profiler is a help, not the result
            print(f"profiler failed: {err!r}", flush=True)
        for batch, length in bench.SHAPES:
            floor = bench.scan_floor_ms(batch, length, bench.D_MODEL, ceilings)
            try:
                fwd_ms, fwdbwd_ms = time_variant(batch, length, ceilings, module)
                graph_ms = time_kernels_only(batch, length, module)
            except Exception as err:  # a configuration that fails to compile is reported, not fatal
                print(f"{name} {batch}x{length}: FAILED {err!r}", flush=True)
                continue
            results.append(dict(variant=name, B=batch, L=length, fwd_ms=fwd_ms, fwdbwd_ms=fwdbwd_ms,
                                graph_fwdbwd_ms=graph_ms, fwd_x_floor=fwd_ms / floor,
                                fwdbwd_x_floor=fwdbwd_ms / (bench.BWD_OVER_FWD_SCAN * floor),
                                graph_fwdbwd_x_floor=graph_ms / (bench.BWD_OVER_FWD_SCAN * floor)))
            print(f"{name:>34}  {batch:>2}x{length:<6} fwd {fwd_ms:6.3f} ms ({fwd_ms / floor:4.2f}x)  "
                  f"fwd+bwd {fwdbwd_ms:6.3f} ms ({results[-1]['fwdbwd_x_floor']:4.2f}x)  "
                  f"graph fwd+bwd {graph_ms:6.3f} ms ({results[-1]['graph_fwdbwd_x_floor']:4.2f}x floor)", flush=True)
    worst = {}
    for r in results:
        worst.setdefault(r["variant"], []).append(r["graph_fwdbwd_x_floor"])
    complete = {k: max(v) for k, v in worst.items() if len(v) == len(bench.SHAPES) and not k.startswith("baseline")}
    best_name = min(complete, key=complete.get)
    best = VARIANTS[[name for name, _, _ in candidates if not name.startswith("baseline")].index(best_name)]
    print(f"fastest (worst CUDA-graph fwd+bwd x floor over the shapes): {best_name} -> {complete[best_name]:.2f}x",
          flush=True)
    ops.launch_config = config_for(*best)
    checks = {}
    for batch, length in bench.SHAPES:
        try:
            checks[f"{batch}x{length}"] = errors = check_against_float64(batch, length)
            print(f"best vs float64, bf16, {batch}x{length}: " + " ".join(f"{k} {v:.1e}" for k, v in errors.items()),
                  flush=True)
        except Exception as err:  # reported; the pytest run checks correctness too
            print(f"float64 check failed: {err!r}", flush=True)
    for label, module in (("best", ops), ("baseline", baseline)):
        if module is None:
            continue
        for batch, length in ((4, 16_384), (1, 65_536)):
            try:
                kernels = profile_kernels(batch, length, module)
            except Exception as err:  # the profiler is a help, not the result
                print(f"profiler failed: {err!r}")
                kernels = []
            profiles[f"{label} {batch}x{length}"] = kernels[:12]
            print(f"GPU time per kernel, {label}, {batch}x{length}, one fwd+bwd:")
            for name, us in kernels[:12]:
                print(f"  {us:9.1f} us  {name[:90]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_timestep_norm.json").write_text(json.dumps(results_header(
        device, copy_TBps=ceilings.copy_TBps, variants=results,
        best=dict(zip(("steps", "channels", "warps", "tiles_per_program"), best)),
        best_vs_float64_bf16=checks,
        best_fwdbwd_cuda_graph_ms={f"{r['B']}x{r['L']}": r["graph_fwdbwd_ms"] for r in results
                                   if r["variant"] == best_name},
        profiles_us=profiles), indent=1) + "\n")
    return bench.main(["--ops", "timestep_norm", "--out", str(args.out)])


if __name__ == "__main__":
    raise SystemExit(main())
