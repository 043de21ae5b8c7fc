"""Compile the CEMA kernels for an H100/H200 (sm_90) on a machine without a GPU, and count what
their block loops cost: registers, spill bytes, PTX instructions per loop step.

    git show 7bc20a4:megalodon_lite/ops/cema.py > /tmp/cema_v2.py     # optional: v2's kernels too
    python kernels/compile_cema_sm90.py --v2-source /tmp/cema_v2.py --out kernels/results

Triton compiles to PTX and runs the ptxas it ships for sm_90; ``cuobjdump`` (also shipped) reads
registers and stack (spill) bytes from the cubin. Arguments are specialised as a launch on a GPU
specialises them (pointers and D divisible by 16: loads along the channels vectorise). The loop
counts are PTX instructions between a loop header and its back-edge, taking the loop with the most
``mma`` instructions, and spill loads/stores (``LDL``/``STL``) inside the SASS loops. The Triton
version here need not be the GPU's (the header records it): counts move a little between versions,
the comparisons between variants are what this is for. Writes ``cema_sm90_ptxas_cpu.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the GPU's Triton fuses multiply-adds by default
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels.bench import load_ops_copy  # noqa: E402
from kernels.header import results_header  # noqa: E402

CUOBJDUMP = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
TARGET = GPUTarget("cuda", 90, 32)
BF16_POINTERS = {"x_ptr", "y_ptr", "g_ptr"}   # the benchmark's bf16 tensors; the rest are float32


def compile_for_sm90(kernel, constants: dict, num_warps: int, arg_types: dict[str, str], divisible: tuple[str, ...],
                     sass: bool = False, **options) -> tuple[object, dict, str]:
    """``triton.compile`` of ``kernel`` for sm_90 as a launch would specialise it: ``constants`` as
    constexprs, argument types from ``arg_types`` (otherwise pointers ``*fp32``, the rest ``i32``), every
    pointer and the arguments named in ``divisible`` marked divisible by 16. Returns the compiled kernel,
    its registers and spilled bytes (``cuobjdump -res-usage``), and its SASS if ``sass`` (else "")."""
    names = list(inspect.signature(kernel.fn).parameters)
    constants = {k: v for k, v in constants.items() if k in names}
    signature = {n: "constexpr" if n in constants else arg_types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
                 for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n in divisible}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()}, attrs=attrs)
    compiled = triton.compile(source, target=TARGET, options=dict(num_warps=num_warps, **options))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    listing = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True).stdout if sass else ""
    os.unlink(f.name)
    return compiled, {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
                      "spill_bytes": int(re.search(r"STACK:(\d+)", usage).group(1))}, listing


def compile_sm90(kernel, constants: dict, num_warps: int) -> dict:
    """A CEMA kernel's registers and spills, and the PTX of its main loop per step."""
    compiled, usage, sass = compile_for_sm90(kernel, constants, num_warps, {n: "*bf16" for n in BF16_POINTERS},
                                             ("D", "y_pitch"), sass=True, num_stages=2)   # y_pitch: a multiple of 16
    loops = ptx_loops(compiled.asm["ptx"])
    main = max(loops, key=lambda loop: loop["mma"]) if loops else {}
    return {**usage, "loop_ptx_per_step": main.get("instructions"), "loop_mma_per_step": main.get("mma"),
            "loop_bar_sync_per_step": main.get("bar_sync"), "spill_ops_in_loops": sass_loop_spills(sass)}


def ptx_loops(ptx: str) -> list[dict]:
    lines = ptx.split("\n")
    heads = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):.*Loop Header", line))}
    found = []
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in heads and heads[m.group(1)] < i:
            body = lines[heads[m.group(1)] + 1:i + 1]
            ops = [b for b in body if re.match(r"\s*(?:@%?!?\w+\s+)?[a-z]", b)]
            found.append({"instructions": len(ops), "mma": sum("mma.sync" in b for b in ops),
                          "bar_sync": sum("bar.sync" in b for b in ops)})
    return found


def sass_loops(sass: str) -> tuple[list[tuple[int, str]], list[list[str]]]:
    """A ``cuobjdump -sass`` listing as (address, instruction) pairs, and the instructions of every
    loop body: from a backward branch's target to the branch itself."""
    code = [(int(m.group(1), 16), m.group(2)) for line in sass.split("\n")
            if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line))]
    bodies = []
    for address, instruction in code:
        target = re.search(r"BRA.*?0x([0-9a-f]+)", instruction)
        if target and int(target.group(1), 16) < address:
            lo = int(target.group(1), 16)
            bodies.append([i for a, i in code if lo <= a <= address])
    return code, bodies


def sass_loop_spills(sass: str) -> int:
    """Spill loads and stores (LDL / STL) inside the loops of a SASS listing."""
    return sum(("LDL" in i or "STL" in i) for body in sass_loops(sass)[1] for i in body)


def variants(v3, v2=None) -> list[tuple[str, object, dict, int]]:
    """(name, kernel, constexprs, warps): every kernel of the forward+backward at the benchmark's N = 16."""
    from dataclasses import replace
    base = dict(C=16, NP=16, SB=16, PRECISION="tf32", HAS_Z=False, SEGMENTED=True, EVEN_D=True, WIDE=False)
    jobs = []
    if v2 is not None:
        old = dict(base, BD=4, PREFETCH=True)
        jobs += [("v2 scan (forward)", v2._cema_scan_kernel, dict(old, REVERSE=False), 4),
                 ("v2 segment ends (backward)", v2._cema_segment_end_kernel, dict(old, REVERSE=True, DERIV=False), 4),
                 ("v2 segment ends + dq (forward)", v2._cema_segment_end_kernel, dict(old, REVERSE=False, DERIV=True), 4),
                 ("v2 parameter sums", v2._cema_grad_sums_kernel, old, 4)]
    cfg = v3.DEFAULT_CONFIG
    for label, c in [("v3", replace(cfg, y_scratch=False)),
                     ("v3 scan16 (tune_cema variant)", triton_config(v3, block_d=16, num_warps=16, prefetch=1,
                                                                     y_scratch=False)),
                     ("v4 scan, y to the scratch", triton_config(v3, y_scratch=True))]:
        new = dict(base, PREFETCH=c.prefetch, Y_SCRATCH=c.y_scratch)
        (bd, w), (bd_e, w_e), (bd_g, w_g) = c.tile("scan"), c.tile("ends"), c.tile("grad")
        jobs += [(f"{label} scan (forward)", v3._cema_scan_kernel, dict(new, BD=bd, REVERSE=False), w)]
        if label == "v3":
            jobs += [(f"{label} segment ends (backward)", v3._cema_segment_end_kernel,
                      dict(new, BD=bd_e, REVERSE=True, DERIV=False), w_e),
                     (f"{label} segment ends + dq (forward)", v3._cema_segment_end_kernel,
                      dict(new, BD=bd_e, REVERSE=False, DERIV=True), w_e),
                     (f"{label} parameter sums", v3._cema_grad_sums_kernel, dict(new, BD=bd_g), w_g)]
    return jobs


def triton_config(v3, **changes):
    from dataclasses import replace
    return replace(v3.DEFAULT_CONFIG, **changes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--v2-source", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    args = parser.parse_args()
    from megalodon_lite.ops import cema as v3

    v2 = load_ops_copy(args.v2_source, "cema_v2") if args.v2_source else None
    rows = []
    for name, kernel, constants, warps in variants(v3, v2):
        row = {"kernel": name, "warps": warps, "BD": constants["BD"], **compile_sm90(kernel, constants, warps)}
        rows.append(row)
        print(f"{name:36} BD {row['BD']:>2} / {warps:>2} warps: {row['registers']:3} registers, "
              f"{row['spill_bytes']:4} spill bytes, loop {row['loop_ptx_per_step']} PTX instructions per step "
              f"({row['loop_mma_per_step']} mma, {row['loop_bar_sync_per_step']} bar.sync), "
              f"{row['spill_ops_in_loops']} spill loads/stores in loops", flush=True)
    result = results_header("none (ptxas for sm_90 on the CPU)", versions=("triton",),
                            v3_config=repr(v3.DEFAULT_CONFIG), rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "cema_sm90_ptxas_cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
