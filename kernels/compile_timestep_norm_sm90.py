"""Compile the TimestepNorm kernels for an H100/H200 (sm_90) on a machine without a GPU and read
their registers, spill bytes and SASS instructions (the occupancy and issue questions of
kernels/NOTES_timestep_norm.md).

    python kernels/compile_timestep_norm_sm90.py --out kernels/results

Triton compiles to PTX and runs the ptxas it ships for sm_90; ``cuobjdump`` (also shipped) reads
registers and stack (spill) bytes from the cubin, and its SASS, counted whole and inside loops (a
tile kernel's count is what every tile issues; a walking kernel's loop count is per tile).
Arguments are specialised as a launch on a GPU specialises them at D=1024, G=32 (pointers, D, G
and H divisible by 16; EVEN, as no tile is ragged there); x, y, dy and dx are bf16.
The Triton version here need not be the GPU's (the output records it). Writes
``timestep_norm_sm90_ptxas_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels.compile_cema_sm90 import compile_for_sm90, sass_loops  # noqa: E402  (sets the GPU's FP fusion before triton loads)
from kernels.header import results_header  # noqa: E402
from megalodon_lite.ops import timestep_norm as ops  # noqa: E402

POINTER_TYPES = {"x_ptr": "*bf16", "dy_ptr": "*bf16", "y_ptr": "*bf16", "dx_ptr": "*bf16", "mask_ptr": "*bf16",
                 "count_ptr": "*i64", "count0_ptr": "*i64", "final_count_ptr": "*i64", "tile_count_ptr": "*i32",
                 "chunk_count_ptr": "*i32"}   # every other pointer: float32
TILE_KERNELS = ("_chunk_summary_kernel", "_normalize_kernel", "_grad_summary_kernel", "_backward_kernel")
# (steps per tile, groups per program, warps, tiles per chunk, register cap of backward pass 1): run 5's
# configurations in v2.6's code, and run 6's variant capping pass 1 at 128 registers (not kept)
CONFIGS = [(8, 8, 1, 8, None), (4, 8, 1, 32, None), (4, 16, 2, 16, None), (4, 8, 1, 32, 128)]


def compile_sm90(kernel, constants: dict, num_warps: int, **options) -> dict:
    """A TimestepNorm kernel's registers and spilled bytes, and its SASS instructions in all and
    in loops (eps is a float argument)."""
    _, usage, sass = compile_for_sm90(kernel, constants, num_warps, {**POINTER_TYPES, "eps": "fp32"},
                                      ("D", "G", "H"), sass=True, **options)
    return {**usage, **sass_counts(sass)}


def sass_counts(sass: str) -> dict:
    """SASS instructions of the kernel, and of its loop bodies (header to back-edge) summed."""
    code, bodies = sass_loops(sass)
    return {"sass_instructions": len(code), "sass_in_loops": sum(len(body) for body in bodies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    args = parser.parse_args(argv)
    rows = []
    for steps, groups, warps, tiles, cap in CONFIGS:
        flags = dict(HAS_MASK=False, BLOCK_T=steps, BLOCK_G=groups, BLOCK_H=32, TILES=tiles, EVEN=True)
        row = {"steps": steps, "groups_per_program": groups, "warps": warps, "tiles_per_chunk": tiles,
               "grad_summary_registers": cap}
        for name in TILE_KERNELS:
            options = dict(maxnreg=cap) if cap is not None and name == "_grad_summary_kernel" else {}
            row[name] = compile_sm90(getattr(ops, name), flags, warps, **options)
        print(f"T={steps} groups={groups} warps={warps} chunks of {tiles} cap {cap}: "
              + ", ".join(f"{k.strip('_')} {v['registers']} regs / {v['spill_bytes']} B spilled / "
                          f"{v['sass_instructions']} SASS ({v['sass_in_loops']} in loops)"
                          for k, v in row.items() if isinstance(v, dict)), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "timestep_norm_sm90_ptxas_cpu.json"
    result = results_header("sm_90 (compiled on a CPU machine)", device_key="target", versions=("triton",), rows=rows)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
