"""Workbench: time CEMA kernel variants (tile sizes, pipelining, dot precision) at the benchmark shapes.

    python kernels/tune_cema.py --out kernels/results          # on a GPU: writes cema_tuning_<device>.json

Every variant is a ``CemaKernelConfig``. The kernels are compiled for all variants first, in
parallel worker processes (Triton caches them on disk), so that the timing loop only times. Each
variant is timed forward and forward+backward at B x L in {32 x 2K, 4 x 16K, 1 x 64K}, D = 1024,
N = 16, bf16, gradients to x and the parameters (what kernels/bench.py times), and its outputs
and gradients are compared with the first variant's (a variant that computes something else is
reported, not ranked). The record (kernels/NOTES_cema.md says what each version predicted and
what it measured) is this script's JSON: device, versions, date, command, per-variant rows, with
each variant's full config (the two committed sessions, kernels/results/cema_tuning_h200*.json,
ran earlier variant lists, relative to the defaults of their day).

``--interpret`` runs the same script at toy sizes under the Triton interpreter, to check it on a CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels.header import results_header  # noqa: E402

VARIANTS = {   # over the module's defaults; the first is the reference the others are compared with
    "default": {},                                    # v3: C 16, 3 blocks ahead, kernel 1 on BD 8 / 8 warps
    "ahead1": dict(prefetch=1),                       # v3 session 2: the depth hardly mattered
    "ends4": dict(block_d_ends=4, num_warps_ends=4),  # kernel 1 on 8-byte pieces, as in v2
    # Not yet timed (kernels/NOTES_cema.md, v3: the tiled-copy probe): kernel 2 on whole 32-byte
    # sectors, 16 channels on 16 warps (128 registers, no spill inside the loop at 1 block ahead),
    # with fewer programs (one CTA per SM) so that rows keep <= 64 segments.
    "scan16": dict(block_d=16, num_warps=16, prefetch=1, block_d_grad=4, num_warps_grad=4, min_programs=132),
    "scan16-ends16": dict(block_d=16, num_warps=16, prefetch=1, block_d_grad=4, num_warps_grad=4,
                          min_programs=132, block_d_ends=16, num_warps_ends=16),
    "scan8": dict(block_d=8, num_warps=8, prefetch=1, block_d_grad=4, num_warps_grad=4, min_programs=264),
    # v4 (chapter 08 §1.6, kernels/NOTES_cema.md): kernel 2 keeps BD 4 but writes y (and dx) channel-major
    # into a scratch, in whole 32-byte sectors, and a transpose kernel writes (B, L, D) in whole lines
    "scratch": dict(y_scratch=True, transpose_tokens=64, transpose_channels=64),
    "scratch-t32x128": dict(y_scratch=True, transpose_tokens=32, transpose_channels=128),
    "direct": dict(y_scratch=False),                  # the v3 stores, whatever the default is
    # v5 (kernels/NOTES_cema.md, "v5"): every kernel runs its small products at about 40 TFLOP/s
    # (kernels/cema_arithmetic.py). More warps per channel split each product's M across warps and
    # halve the registers per thread (ptxas for sm_90 on the CPU: parameter sums 255 -> 158 at 8
    # warps); 32 streams per program double every product's M.
    "w8": dict(num_warps=8),                                   # scan and parameter sums on BD 4 / 8 warps
    "grad-w8": dict(num_warps_grad=8),
    "w8-ends16": dict(num_warps=8, num_warps_ends=16),
    "sb32-w8": dict(streams=32, num_warps=8, num_warps_ends=16),
    "sb32-w16": dict(streams=32, num_warps=16, num_warps_ends=16),
    "w16": dict(num_warps=16),
    "w8-cg32": dict(num_warps=8, chunk_grad=32),               # the parameter sums on blocks of 32 (K = 32)
}


def _problem(batch: int, length: int, d_model: int, n_states: int, device: str, seed: int = 0):
    """x, dy and the coefficients p, q, gamma, omega as leaves (what kernels/bench.py times)."""
    import torch

    from megalodon_lite.cema import CEMA

    torch.manual_seed(seed)
    layer = CEMA(d_model, n_states).to(device)
    coefficients = [t.detach().requires_grad_(True) for t in (*layer.coefficients(), layer.omega)]
    x = torch.randn(batch, length, d_model, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    return coefficients, x, torch.randn_like(x)


def _fwd_bwd(coefficients, x, dy, cfg):
    """y, and the gradients to x and the coefficients, of <y, dy>."""
    import torch

    from megalodon_lite.ops.cema import cema_triton

    x = x.detach().clone().requires_grad_(True)
    y, _ = cema_triton(x, *coefficients, config=cfg)
    grads = torch.autograd.grad((y.float() * dy.float()).sum(), [x, *coefficients])
    return [y.detach(), *grads]


def warm_up(name: str, interpret: bool) -> str:
    """Compile one variant's kernels (segmented rows, as at every benchmark shape) in this process."""
    from megalodon_lite.ops.cema import CemaKernelConfig

    cfg = CemaKernelConfig(**VARIANTS[name])
    device, d_model = ("cpu", 8) if interpret else ("cuda", 1024)
    unit = max(cfg.chunk, cfg.chunk_grad)
    coefficients, x, dy = _problem(1, 6 * unit + 3, d_model, 16, device)
    start = time.perf_counter()
    cfg = replace(cfg, segment=2 * unit)
    _fwd_bwd(coefficients, x, dy, cfg)
    with __import__("torch").no_grad():                      # the inference forward: no q-derivatives
        __import__("megalodon_lite.ops.cema", fromlist=["cema_triton"]).cema_triton(x, *coefficients, config=cfg)
    return f"{name}: compiled in {time.perf_counter() - start:.1f} s"


def adopt(best: dict) -> None:
    """Workbench step: set DEFAULT_CONFIG of this checkout's generated module to the best variant,
    so that the GPU tests and kernels/bench.py that follow in the same session run it. The chapter
    stays the source: its CemaKernelConfig defaults are then edited to match, by hand."""
    from megalodon_lite.ops.cema import CemaKernelConfig

    module = ROOT / "megalodon_lite" / "ops" / "cema.py"
    default = asdict(CemaKernelConfig())
    changed = {k: v for k, v in best["config"].items() if default[k] != v}
    text = module.read_text()
    line = "DEFAULT_CONFIG = CemaKernelConfig()"
    assert text.count(line) == 1, f"{module}: expected one line {line!r}"
    args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
    module.write_text(text.replace(line, f"DEFAULT_CONFIG = CemaKernelConfig({args})"))
    print(f"adopted {best['variant']}: DEFAULT_CONFIG = CemaKernelConfig({args})")


def profile(cfg, out: Path) -> None:
    """torch.profiler of forward+backward at 1 x 64K and 32 x 2K: GPU time per kernel and the
    call's wall time (a gap between them is time the GPU waited for the host)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from megalodon_lite.ops.cema import cema_triton

    lines = [f"config: {cfg}"]
    for batch, length in [(1, 65536), (32, 2048)]:
        coefficients, x, dy = _problem(batch, length, 1024, 16, "cuda")
        x = x.requires_grad_(True)

        def step():
            cema_triton(x, *coefficients, config=cfg)[0].backward(dy)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / 5
        lines.append(f"\n{batch} x {length}: wall {1e3 * wall:.3f} ms per forward+backward")
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=48))
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "cema_profile.txt").write_text(text + "\n")


def gpu_time_ms(fn, steps: int = 5) -> tuple[float, dict[str, float]]:
    """GPU time of one call of fn, summed over its kernels (torch.profiler), and per kernel: the
    time without the gaps in which the GPU waits for the host, which the eager do_bench includes."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = {event.key: event.self_device_time_total / steps / 1e3 for event in prof.key_averages()
               if event.device_type.name == "CUDA" and event.self_device_time_total > 0}
    return sum(kernels.values()), kernels


def kernel_resources() -> dict[str, list]:
    """Registers and spills of every compiled kernel, where this Triton version exposes them."""
    from megalodon_lite.ops import cema as ops

    found = {}
    for name in ("_cema_segment_end_kernel", "_cema_scan_kernel", "_cema_grad_sums_kernel", "_cema_transpose_kernel"):
        kernel, entries = getattr(ops, name), []
        try:
            for cache in kernel.device_caches.values():
                for compiled in cache[0].values():
                    entries.append({"regs": compiled.n_regs, "spills": compiled.n_spills,
                                    "constants": {str(k): str(v) for k, v in compiled.src.constants.items()
                                                  if not str(k).startswith("(")} if hasattr(compiled, "src") else {}})
        except Exception as err:  # the attribute names move between Triton versions
            entries.append({"unavailable": repr(err)})
        found[name] = entries
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--interpret", action="store_true", help="toy sizes under the Triton interpreter (CPU check)")
    parser.add_argument("--adopt", action="store_true", help="make the best variant this checkout's default (see adopt)")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU times of the best variant (torch.profiler)")
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    from megalodon_lite.ops.cema import CemaKernelConfig, plan_segments

    if not args.interpret and not torch.cuda.is_available():
        print("kernels/tune_cema.py needs a CUDA device (or --interpret)", file=sys.stderr)
        return 2
    device = "cpu" if args.interpret else "cuda"
    t0 = time.perf_counter()
    names = [n for n in args.variants if n in VARIANTS]
    if args.interpret:
        for name in names:
            print(warm_up(name, True), flush=True)
    else:
        ctx = __import__("multiprocessing").get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            for future in [pool.submit(warm_up, name, False) for name in names]:
                try:
                    print(future.result(), flush=True)
                except Exception:
                    print(traceback.format_exc(), flush=True)
    print(f"compiled {len(names)} variants in {time.perf_counter() - t0:.0f} s", flush=True)

    if args.interpret:
        shapes, d_model, n_states = [(2, 40), (1, 70)], 8, 4
        def time_ms(fn, grad_to_none=None):
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        copy_tbps = float("nan")
    else:
        from triton.testing import do_bench

        from kernels.bench import SHAPES, measure_ceilings
        shapes, d_model, n_states = SHAPES, 1024, 16

        def time_ms(fn, grad_to_none=None):
            return float(do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none, return_mode="median"))
        copy_tbps = measure_ceilings().copy_TBps
    baseline: dict[tuple, list] = {}
    records = []
    for name in names:
        cfg = CemaKernelConfig(**VARIANTS[name])
        record = {"variant": name, "config": asdict(cfg), "rows": []}
        try:
            for batch, length in shapes:
                coefficients, x, dy = _problem(batch, length, d_model, n_states, device)
                outputs = _fwd_bwd(coefficients, x, dy, cfg)
                if (batch, length) not in baseline:
                    baseline[(batch, length)] = outputs
                diff = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                           for a, b in zip(outputs, baseline[(batch, length)]))
                x_grad = x.clone().requires_grad_(True)
                from megalodon_lite.ops.cema import cema_triton

                def forward():
                    with torch.no_grad():
                        return cema_triton(x, *coefficients, config=cfg)

                def forward_backward():
                    cema_triton(x_grad, *coefficients, config=cfg)[0].backward(dy)

                floor = 2 * batch * length * d_model * 2 / (copy_tbps * 1e12) * 1e3
                fwd = time_ms(forward)
                both = time_ms(forward_backward, grad_to_none=[x_grad, *coefficients])
                plan = plan_segments(batch, length, d_model, cfg)
                row = {"B": batch, "L": length, "fwd_ms": fwd, "fwdbwd_ms": both, "floor_fwd_ms": floor,
                       "x_floor_fwd": fwd / floor, "x_floor_fwdbwd": both / (2.5 * floor),
                       "segments": plan.n_seg, "programs": plan.groups * triton.cdiv(d_model, cfg.block_d),
                       "max_rel_diff_to_default": diff}
                gpu = ""
                if not args.interpret:
                    row["gpu_fwd_ms"], row["gpu_fwd_kernels_ms"] = gpu_time_ms(forward)
                    row["gpu_fwdbwd_ms"], row["gpu_fwdbwd_kernels_ms"] = gpu_time_ms(forward_backward)
                    gpu = f"  GPU time fwd {row['gpu_fwd_ms']:6.3f} / fwd+bwd {row['gpu_fwdbwd_ms']:6.3f} ms"
                record["rows"].append(row)
                print(f"{name:>16} B={batch:<3} L={length:<6} segs={plan.n_seg:<4} fwd {fwd:7.3f} ms "
                      f"({fwd / floor:5.2f}x)  fwd+bwd {both:7.3f} ms ({both / (2.5 * floor):5.2f}x)  "
                      f"diff {diff:.1e}{gpu}", flush=True)
                del coefficients, x, dy, x_grad, outputs
                torch.cuda.empty_cache() if device == "cuda" else None
            record["worst_x_floor_fwdbwd"] = max(r["x_floor_fwdbwd"] for r in record["rows"])
            record["ok"] = all(r["max_rel_diff_to_default"] < 1e-2 for r in record["rows"])
        except Exception:
            record["error"] = traceback.format_exc()
            print(record["error"], flush=True)
        records.append(record)
    ranked = sorted((r for r in records if r.get("ok")), key=lambda r: r["worst_x_floor_fwdbwd"])
    reference = records[0] if records and records[0].get("ok") else None

    def faster_everywhere(r: dict) -> bool:
        """Adopted only if no shape gets slower, forward or fwd+bwd: in GPU time where it was measured
        (the eager time of a ~2 ms call moves by up to 20% with the host, kernels/NOTES_cema.md v3)."""
        keys = ("gpu_fwd_ms", "gpu_fwdbwd_ms") if all("gpu_fwd_ms" in a for a in r["rows"]) else ("fwd_ms", "fwdbwd_ms")
        return reference is not None and all(a[k] <= b[k] for a, b in zip(r["rows"], reference["rows"]) for k in keys)
    adoptable = [r for r in ranked if not r["config"]["precision"] and faster_everywhere(r)]
    if all("gpu_fwdbwd_ms" in row for r in adoptable for row in r["rows"]):   # the least GPU time first
        adoptable.sort(key=lambda r: sum(row["gpu_fwdbwd_ms"] for row in r["rows"]))
    print("\nvariant            worst fwd+bwd x floor   (sum of fwd+bwd ms; GPU time)   faster everywhere than the first")
    for r in ranked:
        gpu = sum(x.get("gpu_fwdbwd_ms", float("nan")) for x in r["rows"])
        print(f"{r['variant']:>16}  {r['worst_x_floor_fwdbwd']:8.2f}   ({sum(x['fwdbwd_ms'] for x in r['rows']):.3f}; "
              f"{gpu:.3f})   {faster_everywhere(r)}")
    result = results_header("cpu (interpreter)" if args.interpret else None, copy_TBps=copy_tbps,
                            best=ranked[0]["variant"] if ranked else None, kernels=kernel_resources(), variants=records)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "interpreter" if args.interpret else "".join(c if c.isalnum() else "_" for c in result["device"].lower()).strip("_")
    path = args.out / f"cema_tuning_{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    if args.adopt and adoptable:
        adopt(adoptable[0])
    if args.profile and not args.interpret:
        profile(CemaKernelConfig(**(adoptable[0]["config"] if adoptable else {})), out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
