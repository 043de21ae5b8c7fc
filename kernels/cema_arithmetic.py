"""Why CEMA misses its 2x-floor target: the tensor-core work of each kernel against its measured time.

    python kernels/cema_arithmetic.py     # reads kernels/results/cema_tuning_h200_v4.json (committed)
    python kernels/cema_arithmetic.py --tuning FILE --variant NAME --out kernels/results/cema_arithmetic_X.json

No GPU: it counts, from the kernels' ``tl.dot`` shapes at a tuning file's configuration, the
multiply-adds per token and channel of every CEMA kernel (chapter 08 §1.6-1.7), and divides them by
the per-kernel GPU times that ``kernels/tune_cema.py`` recorded with ``torch.profiler`` (forward and
forward+backward, per shape). Per block of C tokens of SB streams and per channel, with NP = N
padded to a power of two:

- a product X (SB, C) @ M (C, NP), or H (SB, NP) @ M (NP, C), costs SB * C * NP multiply-adds,
  i.e. NP per token; a complex table is two of them (2 NP);
- the Toeplitz product X (SB, C) @ T (C, C) costs C per token, and so does the lag correlation
  X^T (C, SB) @ G (SB, C) of the parameter-sum kernel.

So per token and channel: segment ends 2 NP (and 2 NP more for the q-derivatives the forward saves),
the scan C + 4 NP (Toeplitz, state out, state in), the parameter sums C + 8 NP (four complex
tables). The transposes move (B, L, D) through memory twice and multiply nothing.

The JSON records, per shape, every kernel's multiply-adds, time and achieved TFLOP/s (2 flops per
multiply-add), the whole op's tensor-core work, and what the 2x target would allow at the best rate
any kernel reached: ``target_macs_per_token_channel``, against the ``macs_per_token_channel`` the
design needs. The header names the tuning file it derives from (device, versions, date, command)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels.bench import D_MODEL, TARGET_X_FLOOR  # noqa: E402
from kernels.header import results_header  # noqa: E402
from megalodon_lite.ops.cema import _padded_states  # noqa: E402  (the kernels' NP)
from megalodon_lite.ops.floors import BWD_OVER_FWD_SCAN  # noqa: E402

DEFAULT_TUNING = ROOT / "kernels" / "results" / "cema_tuning_h200_v4.json"


def macs_per_token_channel(config: dict, n_states: int) -> dict[str, dict[str, int]]:
    """Multiply-adds per token and channel of each kernel call, forward and backward, at this config."""
    c, c_grad, np_ = config["chunk"], config["chunk_grad"], _padded_states(n_states)
    return {
        "forward": {"_cema_segment_end_kernel": 4 * np_,          # e and E = q de/dq (saved for kernel 3)
                    "_cema_scan_kernel": c + 4 * np_},
        "backward": {"_cema_segment_end_kernel": 2 * np_,         # the adjoint's segment ends, no derivative
                     "_cema_scan_kernel": c + 4 * np_,            # dx: the same scan backwards in time
                     "_cema_grad_sums_kernel": c_grad + 8 * np_},
    }


def analyse(tuning: dict, variant: str, n_states: int) -> dict:
    record = next((v for v in tuning["variants"] if v["variant"] == variant), None)
    if record is None:
        raise SystemExit(f"variant {variant!r} not in the tuning file (has {[v['variant'] for v in tuning['variants']]})")
    macs = macs_per_token_channel(record["config"], n_states)
    target = TARGET_X_FLOOR["cema"]
    shapes = []
    for row in record["rows"]:
        token_channels = row["B"] * row["L"] * D_MODEL

        def tflops(macs_per_tc: int, ms: float) -> float | None:   # 2 flops per multiply-add
            return 2 * macs_per_tc * token_channels / (ms * 1e-3) / 1e12 if ms else None

        def kernel(label: str, macs_per_tc: int, ms: float) -> dict:
            return {"kernel": label, "macs_per_token_channel": macs_per_tc, "gpu_ms": ms,
                    "TFLOPs": tflops(macs_per_tc, ms)}

        both = [kernel(name, macs["forward"].get(name, 0) + macs["backward"].get(name, 0),
                       row["gpu_fwdbwd_kernels_ms"].get(name, 0.0))
                for name in sorted(set(macs["forward"]) | set(macs["backward"]))]
        forward = [kernel(name + " (forward call)", macs["forward"][name], row["gpu_fwd_kernels_ms"].get(name, 0.0))
                   for name in ("_cema_segment_end_kernel", "_cema_scan_kernel")]
        total_macs = sum(sum(m.values()) for m in macs.values())
        dot_ms = sum(k["gpu_ms"] for k in both)
        best = max(k["TFLOPs"] for k in both + forward if k["TFLOPs"])
        floor_fwdbwd = BWD_OVER_FWD_SCAN * row["floor_fwd_ms"]
        shapes.append({
            "B": row["B"], "L": row["L"],
            "gpu_fwdbwd_ms": row["gpu_fwdbwd_ms"], "dot_kernels_ms": dot_ms,
            "floor_fwdbwd_ms": floor_fwdbwd, "target_ms": target * floor_fwdbwd,
            "macs_per_token_channel": total_macs,
            "dot_TFLOPs_overall": tflops(total_macs, dot_ms),
            "best_kernel_TFLOPs": best,
            "dots_alone_at_best_rate_ms": 2 * total_macs * token_channels / (best * 1e12) * 1e3,
            "target_macs_per_token_channel": target * floor_fwdbwd * 1e-3 * best * 1e12 / (2 * token_channels),
            "kernels": both + forward,
        })
    return {"variant": variant, "config": record["config"], "n_states": n_states, "shapes": shapes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tuning", type=Path, default=DEFAULT_TUNING, help="a kernels/tune_cema.py results file")
    parser.add_argument("--variant", default="scratch", help="the variant of that file to read (its adopted one)")
    parser.add_argument("--n-states", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results" / "cema_arithmetic_h200_v4.json")
    args = parser.parse_args(argv)
    tuning = json.loads(args.tuning.read_text())
    source = args.tuning.resolve()
    result = results_header(
        "cpu (arithmetic from the recorded GPU times below)", versions=(),
        argv=None if argv is None else [__file__, *argv],
        source={"file": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(args.tuning),
                **{k: tuning[k] for k in ("device", "torch", "triton", "date", "command")}},
        **analyse(tuning, args.variant, args.n_states))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"{result['source']['device']}, variant {args.variant}: multiply-adds per token and channel "
          f"{result['shapes'][0]['macs_per_token_channel']} (fwd+bwd)")
    for shape in result["shapes"]:
        print(f"  B={shape['B']:<3} L={shape['L']:<6} GPU {shape['gpu_fwdbwd_ms']:.3f} ms (target {shape['target_ms']:.3f}); "
              f"dot kernels {shape['dot_kernels_ms']:.3f} ms at {shape['dot_TFLOPs_overall']:.0f} TFLOP/s; "
              f"best kernel {shape['best_kernel_TFLOPs']:.0f} TFLOP/s -> dots alone {shape['dots_alone_at_best_rate_ms']:.3f} ms; "
              f"the target allows {shape['target_macs_per_token_channel']:.0f} multiply-adds per token-channel")
        for k in shape["kernels"]:
            rate = f"{k['TFLOPs']:6.1f}" if k["TFLOPs"] else "     -"
            print(f"      {k['kernel']:<42} {k['macs_per_token_channel']:>4} MAC/tc {k['gpu_ms']:.3f} ms {rate} TFLOP/s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
