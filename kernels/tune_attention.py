"""Time the chunk-attention kernels' tile candidates, and the three forward designs, on one GPU.

    python kernels/tune_attention.py --out DIR      # CUDA: writes DIR/tune_attention_<device>.json
                                                    #   and DIR/best_overrides.json (for MEGALODON_ATTENTION_TILES)
    TRITON_INTERPRET=1 python kernels/tune_attention.py --check     # CPU: every code path once, tiny sizes
    TRITON_INTERPRET=1 python kernels/tune_attention.py --dry-run   # CPU: the whole GPU flow, tiny sizes (minutes)

Shape: the official c=2048, z=256, v=2048, one head, bfloat16, 65,536 tokens as B=1 x L=65,536 (the
same work as 32 x 2K or 4 x 16K: 32 chunk programs of 2048 tokens). Each kernel is timed alone on
real inputs for each candidate of its tiles (every candidate is first compiled in parallel worker
processes, so the timing loop only loads the cache); then the forward designs of chapter 09
(a: value tiles with online softmax, b: log-sum-exp first then value tiles, c: P written once, then
a triangular matmul) and the whole forward and forward+backward with the best tiles of each kernel.
TFLOP/s are the FLOPs each kernel executes (recomputations included) per second.

kernels/results/tune_attention_nvidia_h200_v1.json came from this script at commit 99c8e3f (the first
version of the kernels and its candidates), tune_attention_nvidia_h200_v2.json at commit b51d741 (the
second); kernels/NOTES_attention.md compares the versions.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.header import results_header  # noqa: E402
from megalodon_lite.ops import chunk_attention as ops  # noqa: E402

FULL = {"B": 1, "L": 65_536, "H": 1, "dz": 256, "dv": 2048, "c": 2048}
TINY = {"B": 1, "L": 300, "H": 2, "dz": 32, "dv": 96, "c": 128}
BASE = ops.GPU_TILES

# Per kernel: candidate tiles (fields of AttentionTiles replaced on BASE).
CANDIDATES = {
    "prologue": [dict(prologue_tokens=t, prologue_warps=w) for t, w in ((8, 4), (16, 4), (16, 2), (32, 4), (32, 2), (64, 4))],
    "epilogue": [dict(prologue_tokens=t, prologue_warps=w) for t, w in ((8, 4), (16, 4), (16, 2), (32, 4), (32, 2), (64, 4))],
    "softmax": [dict(softmax_m=m, softmax_n=n, softmax_warps=w, softmax_stages=s)
                for m, n, w, s in ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 4), (128, 32, 4, 3))],
    "pv": [dict(mm_m=m, mm_n=n, mm_k=k, mm_warps=w, mm_stages=s)
           for m, n, k, w, s in ((128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 4), (256, 128, 64, 8, 3),
                                 (128, 128, 64, 4, 3), (256, 128, 32, 8, 6))],
    "grad": [dict(grad_m=m, grad_n=n, grad_v=e, grad_d=d, grad_warps=w, grad_stages=s)
             for m, n, e, d, w, s in ((128, 128, 64, 64, 8, 3), (128, 128, 64, 64, 8, 4), (128, 64, 64, 64, 4, 3),
                                      (128, 64, 64, 64, 8, 3), (64, 128, 64, 64, 4, 3), (128, 128, 32, 64, 8, 4),
                                      (64, 64, 64, 64, 4, 3), (128, 128, 64, 64, 8, 5), (128, 128, 128, 64, 8, 3))],
    "zgrad": [dict(zmm_m=m, zmm_n=n, zmm_k=k, zmm_warps=w, zmm_stages=s)
              for m, n, k, w, s in ((128, 256, 64, 8, 3), (128, 256, 32, 8, 4), (128, 128, 64, 8, 3), (64, 256, 64, 4, 3),
                                    (256, 128, 64, 8, 3), (256, 128, 32, 8, 4), (128, 128, 64, 4, 3))],
}
CANDIDATES["pv_t"] = CANDIDATES["pv"]  # dV = P^T dO: the same kernel through transposed pointers
# designs (a) and (b) at their best tiles of the first tuning run (kernels/results/tune_attention_nvidia_h200_v1.json)
FLASH = [dict(m=128, n=64, bv=256, warps=8, stages=2, lse=lse) for lse in (False, True)]


@triton.jit
def _flash_vtile_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, length, chunk_size, n_chunks, span, n_v_tiles,
                        H: tl.constexpr, DZ: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, USE_LSE: tl.constexpr):
    """Designs (a) and (b) of chapter 09, forward only: one program per (chunk, value tile, query block)
    recomputes the scores of its rows; (a) online softmax, (b) with the row log-sum-exp given."""
    g = tl.program_id(0) // n_v_tiles
    e0 = (tl.program_id(0) % n_v_tiles) * BLOCK_V
    row0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    h, tok, chunk_len = ops._chunk_of(g, length, chunk_size, n_chunks, H)
    if row0 < chunk_len:
        rows = row0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        e = e0 + tl.arange(0, BLOCK_V)
        q = tl.load(q_ptr + ((tok + rows) * H + h)[:, None] * DZ + d[None, :], mask=(rows < chunk_len)[:, None], other=0.0)
        if USE_LSE:
            lse = tl.load(lse_ptr + g.to(tl.int64) * span + rows)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for col0 in range(0, tl.minimum(row0 + BLOCK_M, chunk_len), BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            kt = tl.load(k_ptr + ((tok + cols) * H + h)[None, :] * DZ + d[:, None], mask=(cols < chunk_len)[None, :],
                         other=0.0)
            s = tl.dot(q, kt)
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < chunk_len)[None, :], s, float("-inf"))
            if USE_LSE:
                p = tl.exp(s - lse[:, None])
            else:
                m_new = tl.maximum(m, tl.max(s, 1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                row_sum = row_sum * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                m = m_new
            vv = tl.load(v_ptr + ((tok + cols) * H + h)[:, None] * DV + e[None, :], mask=(cols < chunk_len)[:, None],
                         other=0.0)
            acc = tl.dot(p.to(vv.dtype), vv, acc)
        if not USE_LSE:
            acc = acc / row_sum[:, None]
        tl.store(o_ptr + ((tok + rows) * H + h)[:, None] * DV + e[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=(rows < chunk_len)[:, None])


def make_state(shape: dict, device: str, dtype: torch.dtype) -> dict:
    """Inputs and every intermediate at ``shape``, from one real forward and backward."""
    gen = torch.Generator().manual_seed(0)
    b, length, h, dz, dv = shape["B"], shape["L"], shape["H"], shape["dz"], shape["dv"]
    st = {"z": (2 * torch.randn(b, length, h * dz, generator=gen) + 0.5), "v": torch.randn(b, length, h * dv, generator=gen),
          "gamma": 0.5 * torch.randn(2, h, dz, generator=gen), "beta": 0.5 * torch.randn(2, h, dz, generator=gen),
          "do": torch.randn(b, length, h * dv, generator=gen)}
    st = {k: t.to(device, dtype if k in ("z", "v", "do") else torch.float32) for k, t in st.items()}
    tiles = ops.default_tiles(st["z"].device, dtype) if device == "cpu" else BASE
    st["o"], st["q"], st["k"], st["lse"] = ops.chunk_attention_forward(st["z"], st["v"], st["gamma"], st["beta"], h,
                                                                        shape["c"], tiles=tiles)
    _, st["G"], st["span"], _ = ops._layout(st["z"], h, shape["c"], tiles)
    st["p"] = torch.empty(st["G"], st["span"], st["span"], device=device, dtype=dtype)
    st["t"] = torch.empty_like(st["p"])
    row_sums = torch.empty(st["G"], st["span"] // tiles.grad_n, st["span"], device=device)
    ops._launch_score_grad(st["q"], st["k"], st["v"], st["do"], st["lse"], st["p"], st["t"], row_sums, h,
                           shape["c"], tiles)
    st["delta"] = row_sums.sum(1)
    st["dq"], st["dk"] = torch.randn(2, *st["z"].shape, device=device).to(dtype).unbind(0)  # as the z-wide matmuls store them
    st["tables"] = ops._rope_tables(st["span"], dz, 10000.0, st["z"].device)
    st["shape"], st["dtype"] = shape, dtype
    return st


def kernel_call(st: dict, kind: str, cand: dict):
    """A zero-argument callable running one kernel with one candidate, and the FLOPs it executes."""
    shape, h, c = st["shape"], st["shape"]["H"], st["shape"]["c"]
    pairs = shape["B"] * h * sum(min(c, shape["L"] - s) * (min(c, shape["L"] - s) + 1) // 2 for s in range(0, shape["L"], c))
    dz, dv = shape["dz"], shape["dv"]
    if kind == "flash":
        bv = min(cand["bv"], dv)
        n_v_tiles = triton.cdiv(dv, bv)
        out = torch.empty_like(st["v"])

        def run():
            _flash_vtile_kernel[(st["G"] * n_v_tiles, triton.cdiv(st["span"], cand["m"]))](
                st["q"], st["k"], st["v"], out, st["lse"], shape["L"], c, triton.cdiv(shape["L"], c), st["span"],
                n_v_tiles, H=h, DZ=dz, DV=dv, BLOCK_D=dz, BLOCK_M=cand["m"], BLOCK_N=cand["n"], BLOCK_V=bv,
                USE_LSE=cand["lse"], num_warps=cand["warps"], num_stages=cand["stages"])
            return out
        return run, 2 * pairs * (n_v_tiles * dz + dv)
    tiles = dataclasses.replace(BASE if st["z"].is_cuda else ops.INTERPRETER_TILES, **cand)
    if kind == "softmax":
        return (lambda: ops._launch_softmax(st["q"], st["k"], st["p"], st["lse"], h, c, tiles)), 4 * pairs * dz
    if kind in ("pv", "pv_t"):
        x = st["v"] if kind == "pv" else st["do"]
        out = torch.empty_like(x)
        return (lambda: ops._launch_tri_matmul(st["p"], x, out, h, c, kind == "pv_t", tiles)), 2 * pairs * dv
    if kind == "zgrad":
        out = torch.empty_like(st["q"])
        return (lambda: ops._launch_tri_matmul(st["t"], st["k"], out, h, c, False, tiles,
                                               (st["p"], st["delta"]))), 2 * pairs * dz
    if kind == "grad":
        p, t = torch.empty_like(st["p"]), torch.empty_like(st["t"])
        row_sums = torch.empty(st["G"], st["span"] // tiles.grad_n, st["span"], device=st["p"].device)
        return (lambda: ops._launch_score_grad(st["q"], st["k"], st["v"], st["do"], st["lse"], p, t, row_sums, h,
                                               c, tiles)), 2 * pairs * (dz + dv)
    n_tok = shape["B"] * shape["L"]
    if kind == "prologue":
        q, k = torch.empty_like(st["q"]), torch.empty_like(st["k"])
        return (lambda: ops._launch_prologue(st["z"], st["gamma"], st["beta"], st["tables"], q, k, h, c, 1e-5,
                                             tiles)), 0
    if kind == "epilogue":
        parts = torch.empty(triton.cdiv(n_tok, tiles.prologue_tokens), 2, 2, h, dz, device=st["z"].device)
        dzz = torch.empty_like(st["z"])
        return (lambda: ops._launch_epilogue(st["z"], st["gamma"], st["tables"], st["dq"], st["dk"], dzz, parts, h, c,
                                             1e-5, tiles)), 0
    raise ValueError(kind)


def all_candidates() -> list[tuple[str, dict]]:
    return [(kind, cand) for kind, cands in CANDIDATES.items() for cand in cands] + [("flash", f) for f in FLASH]


def _compile_worker(items: list[tuple[str, dict]]) -> list[str]:
    """Run each candidate once in a fresh process: fills Triton's on-disk cache for the timing loop."""
    st = make_state(FULL, "cuda", torch.bfloat16)
    errors = []
    for kind, cand in items:
        try:
            kernel_call(st, kind, cand)[0]()
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - a candidate that does not fit is a result, not a failure
            errors.append(f"{kind} {cand}: {type(err).__name__}: {str(err)[:200]}")
    return errors


def precompile(workers: int) -> list[str]:
    items = all_candidates()
    chunks = [items[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return [e for errs in pool.map(_compile_worker, chunks) for e in errs]


def bench(fn) -> float:
    if not torch.cuda.is_available():  # --dry-run on a CPU: one call, wall clock
        import time

        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def best_tiles(timings: list[dict]) -> ops.AttentionTiles:
    fields = {}
    pro = [t for t in timings if t["kernel"] in ("prologue", "epilogue") and t["ms"] is not None]
    if pro:  # one setting for both kernels: the least sum
        settings = {json.dumps(t["tiles"], sort_keys=True) for t in pro}
        fields.update(json.loads(min(settings, key=lambda key: sum(t["ms"] for t in pro
                                                                   if json.dumps(t["tiles"], sort_keys=True) == key))))
    for kind in ("softmax", "pv", "grad", "zgrad"):
        ok = [t for t in timings if t["kernel"] == kind and t["ms"] is not None]
        if kind == "pv":  # O = P V and dV = P^T dO share the mm_* tiles: minimise their sum
            sums = [(t["ms"] + next(u["ms"] for u in timings if u["kernel"] == "pv_t" and u["tiles"] == t["tiles"]
                                    and u["ms"] is not None), t) for t in ok
                    if any(u["kernel"] == "pv_t" and u["tiles"] == t["tiles"] and u["ms"] is not None for u in timings)]
            fields.update(min(sums, key=lambda x: x[0])[1]["tiles"])
        else:
            fields.update(min(ok, key=lambda t: t["ms"])["tiles"])
    return dataclasses.replace(BASE, **fields)


def pipeline(st: dict, tiles: ops.AttentionTiles) -> tuple[float, float]:
    shape = st["shape"]
    args = (st["z"], st["v"], st["gamma"], st["beta"], shape["H"], shape["c"])

    def fwd():
        return ops.chunk_attention_forward(*args, tiles=tiles)

    def fwd_bwd():
        o, q, k, lse = fwd()
        return ops.chunk_attention_backward(st["do"], st["z"], q, k, st["v"], lse, st["gamma"], shape["H"], shape["c"],
                                            tiles=tiles)
    return bench(fwd), bench(fwd_bwd)


def check_on_cpu() -> None:
    """Every code path at tiny size under the interpreter; the flash designs against design (c)."""
    st = make_state(TINY, "cpu", torch.float32)
    for kind, cands in CANDIDATES.items():
        kernel_call(st, kind, {k: min(v, 32) if k.endswith(("_m", "_n", "_k", "_v", "_d")) else v
                               for k, v in cands[0].items()})[0]()
    for cand in FLASH[:1] + FLASH[-1:]:
        out = kernel_call(st, "flash", {**cand, "m": 32, "n": 32, "bv": 32})[0]()
        err = (out - st["o"]).abs().max().item()
        print(f"flash design lse={cand['lse']}: max abs difference to design (c) {err:.1e}")
        assert err < 1e-5
    print("every code path ran")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    parser.add_argument("--check", action="store_true", help="CPU: run every code path at tiny size")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--dry-run", action="store_true", help="CPU: the whole GPU flow at tiny size, no precompile")
    args = parser.parse_args(argv)
    if args.check:
        check_on_cpu()
        return 0
    global FULL, BASE
    if args.dry_run:
        FULL, BASE = {**TINY, "dz": 32, "dv": 64, "L": 128 + 77, "c": 128}, ops.INTERPRETER_TILES
        for cands in list(CANDIDATES.values()) + [FLASH]:
            for cand in cands:
                cand.update({k: min(v, 32) for k, v in cand.items() if k in ("m", "n", "bv") or k.endswith(
                    ("_m", "_n", "_k", "_v", "_d"))})
    device = torch.cuda.get_device_name() if not args.dry_run else "cpu dry run"
    errors = precompile(args.workers) if not args.dry_run else []
    st = make_state(FULL, "cuda" if not args.dry_run else "cpu", torch.bfloat16 if not args.dry_run else torch.float32)
    timings = []
    for kind, cand in all_candidates():
        try:
            fn, flops = kernel_call(st, kind, cand)
            ms = bench(fn)
        except Exception as err:  # noqa: BLE001
            ms, flops = None, 0
            errors.append(f"{kind} {cand}: {type(err).__name__}: {str(err)[:200]}")
        timings.append({"kernel": kind, "tiles": cand, "ms": ms, "tflops": flops / (ms * 1e9) if ms and flops else None})
        print(f"{kind:>8} {json.dumps(cand):<90} " + (f"{ms:8.3f} ms {flops / (ms * 1e9):6.0f} TFLOP/s" if ms else "failed"),
              flush=True)
    best = best_tiles(timings)
    best_of = {k: min((t for t in timings if t["kernel"] == k and t["ms"]), key=lambda t: t["ms"]) for k in CANDIDATES}
    overrides = {k: v for k, v in dataclasses.asdict(best).items() if getattr(BASE, k) != v}
    useful = kernel_call(st, "pv", CANDIDATES["pv"][0])[1] * (FULL["dz"] + FULL["dv"]) // FULL["dv"]  # causal-pair FLOPs
    prologue_ms = bench(lambda: ops.chunk_attention_forward(st["z"][:, :16], st["v"][:, :16], st["gamma"], st["beta"],
                                                            FULL["H"], FULL["c"], tiles=best))  # launch overhead
    designs = []
    for lse in (False, True):
        rows = [t for t in timings if t["kernel"] == "flash" and t["tiles"]["lse"] == lse and t["ms"]]
        if rows:
            r = min(rows, key=lambda t: t["ms"])
            extra = best_of["softmax"]["ms"] / 2 if lse else 0.0  # (b) needs pass 1 of the softmax kernel too
            name = f"({'b' if lse else 'a'}) {'lse first' if lse else 'online softmax'}, v tiles of {r['tiles']['bv']}"
            designs.append({"design": name, "ms": r["ms"] + extra, "tflops": useful / ((r["ms"] + extra) * 1e9)})
    fwd_ms, fwdbwd_ms = pipeline(st, best)
    c_ms = best_of["softmax"]["ms"] + best_of["pv"]["ms"]
    designs.append({"design": "(c) P written once, then P V (softmax + matmul kernels)", "ms": c_ms,
                    "tflops": useful / (c_ms * 1e9)})
    default_fwd, default_fwdbwd = pipeline(st, BASE)
    n = FULL["c"]
    pm = torch.randn(32, n, n, device=st["z"].device, dtype=st["dtype"])
    vm = torch.randn(32, n, n, device=st["z"].device, dtype=st["dtype"])
    bmm_ms = bench(lambda: torch.bmm(pm, vm))
    for d in designs:
        print(f"design {d['design']:<60} {d['ms']:.3f} ms ({d['tflops']:.0f} TFLOP/s useful)")
    print(f"cuBLAS bmm of the full square P V (32 x {n}^3): {bmm_ms:.3f} ms = {2 * 32 * n**3 / (bmm_ms * 1e9):.0f} TFLOP/s")
    print(f"best tiles {best}")
    print(f"whole op, best tiles: fwd {fwd_ms:.3f} ms, fwd+bwd {fwdbwd_ms:.3f} ms; default tiles: fwd {default_fwd:.3f} ms, "
          f"fwd+bwd {default_fwdbwd:.3f} ms; a 16-token call (launch overhead) {prologue_ms:.3f} ms")
    result = results_header(
        device, shape={**FULL, "dtype": "bfloat16"}, useful_fwd_flops=useful,
        kernels=timings, designs=designs, errors=errors,
        best_tiles=dataclasses.asdict(best), overrides_of_defaults=overrides, cublas_bmm_full_square_ms=bmm_ms,
        whole={"best": {"fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms},
               "default": {"fwd_ms": default_fwd, "fwdbwd_ms": default_fwdbwd}, "tiny_call_ms": prologue_ms},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "best_overrides.json").write_text(json.dumps(overrides) + "\n")  # for MEGALODON_ATTENTION_TILES
    print(f"overrides of the package defaults: {json.dumps(overrides)}")
    path = args.out / f"tune_attention_{device.lower().replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}; {len(errors)} candidates failed")
    for e in errors:
        print("  " + e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
