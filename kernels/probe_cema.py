"""Probe: where does a CEMA kernel's time go? Two measurements in one GPU run.

    git show 7bc20a4:megalodon_lite/ops/cema.py > /tmp/cema_v2.py     # the v2 kernels, for the A/B
    python kernels/probe_cema.py --v2-source /tmp/cema_v2.py --out /tmp/probe
    python kernels/probe_cema.py --out /tmp/probe                     # parts 2 and 3 only

1. **A/B of v2 and this checkout's kernels in one process**, at the benchmark shapes (D=1024, N=16,
   bf16, 65,536 tokens per call): the eager forward and forward+backward time as kernels/bench.py
   takes it (do_bench median), three rounds alternating v2 and v3 so that drift shows, and the GPU
   time of one forward+backward summed over its kernels (torch.profiler), which leaves out the time
   the GPU waits for the host. v2's module is imported from ``--v2-source`` with its custom ops
   renamed (``cema_v2::...``) so both register.
2. **The access pattern alone**: a Triton copy with the kernels' tiling (BD channels x 16 streams
   x 16 tokens per step, one program walking its segment's blocks, 1,024 programs for 64M elements)
   and nothing else, for BD = 4 ... 32: reading x and writing y, and reading only. If BD = 4
   (8-byte pieces of 32-byte sectors) is slow by itself, the kernels' loops are bound by their
   memory access pattern, not by their arithmetic.
3. **Whole sectors through a scratch** (v4, chapter 08 §1.6): the same BD = 4 copy writing into
   the channel-major scratch (D, L) of kernel 2's ``y_scratch`` path (a stream's 16 tokens of one
   channel: one 32-byte sector), the package's transpose kernel from that scratch to (B, L, D) for
   a few tile shapes (and, for scale, PyTorch's own permuted copy), and the two together; the
   round trip is checked to give x back exactly.

4. **Kernel 2's two store paths in one process** (``--parts configs``): as part 1, for the
   package's kernels with ``y_scratch`` off and on, and with the host time of each call (calls
   issued while the GPU is held busy, so that none waits): eager time is about the larger of
   host time and GPU time.

Part 1 runs only with ``--v2-source``; ``--parts`` picks among 2-4 (default: 2 and 3; one
process, so ratios are same-run).
Writes ``probe_cema_<device>.json`` (device, versions, date, command, rows) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels.bench import load_ops_copy  # noqa: E402
from kernels.header import results_header  # noqa: E402

SHAPES = [(32, 2048), (4, 16384), (1, 65536)]
D_MODEL, N_STATES = 1024, 16


def host_ms(fn, calls: int = 20) -> tuple[float, bool]:
    """Host time of one call of fn: calls issued while the GPU is held busy (torch.cuda._sleep), so
    that none waits for the GPU; and whether the GPU was indeed still busy when the last was issued."""
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)                       # ~0.2 s of GPU clock cycles
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return 1e3 * elapsed / calls, busy


def ab_rows(forms: dict, rounds: int) -> list[dict]:
    """forms: name -> cema_triton-like function (x, p, q, gamma, omega) -> (y, h_last)."""
    from triton.testing import do_bench
    from torch.profiler import ProfilerActivity, profile

    from megalodon_lite.cema import CEMA

    torch.manual_seed(0)
    layer = CEMA(D_MODEL, N_STATES).cuda()
    coefficients = [t.detach().requires_grad_(True) for t in (*layer.coefficients(), layer.omega)]
    rows = []
    for batch, length in SHAPES:
        x = torch.randn(batch, length, D_MODEL, device="cuda", dtype=torch.bfloat16)
        x_grad, dy = x.clone().requires_grad_(True), torch.randn_like(x)
        for rnd in range(rounds):
            for name, form in forms.items():
                def forward(form=form):
                    with torch.no_grad():
                        return form(x, *coefficients)

                def forward_backward(form=form):
                    form(x_grad, *coefficients)[0].backward(dy)

                fwd = float(do_bench(forward, warmup=25, rep=200, return_mode="median"))
                both = float(do_bench(forward_backward, warmup=25, rep=200, grad_to_none=[x_grad, *coefficients],
                                      return_mode="median"))
                (host_fwd, busy_fwd), (host_both, busy_both) = host_ms(forward), host_ms(forward_backward)
                row = {"version": name, "B": batch, "L": length, "round": rnd, "fwd_ms": fwd, "fwdbwd_ms": both,
                       "host_fwd_ms": host_fwd, "host_fwdbwd_ms": host_both, "gpu_busy_throughout": busy_fwd and busy_both}
                if rnd == 0:   # GPU time of the kernels of one forward+backward, without host gaps
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            forward_backward()
                        torch.cuda.synchronize()
                    kernels = {}
                    for event in prof.key_averages():
                        if event.device_type.name == "CUDA" and "cema" in event.key:
                            kernels[event.key] = event.self_device_time_total / 5 / 1e3
                    row["gpu_kernels_ms"] = kernels
                    row["gpu_fwdbwd_ms"] = sum(kernels.values())
                rows.append(row)
                print(f"{name:>12} B={batch:<3} L={length:<6} round {rnd}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms, "
                      f"host {host_fwd:.3f} / {host_both:.3f} ms"
                      + (f", kernels {row['gpu_fwdbwd_ms']:.3f} ms" if "gpu_fwdbwd_ms" in row else ""), flush=True)
        x_grad.grad = None
        for c in coefficients:
            c.grad = None
    return rows


@triton.jit
def _tiled_copy_kernel(x_ptr, y_ptr, L, D, seg_len, n_seg, BD: tl.constexpr, SB: tl.constexpr, C: tl.constexpr,
                       STORE: tl.constexpr, SCRATCH: tl.constexpr = False):
    """The CEMA loops' access pattern and nothing else: (BD, SB, C) tiles of SB segments, block by block.
    SCRATCH: y is the channel-major (D, L) scratch of kernel 2's y_scratch path (one row: B = 1)."""
    d = tl.program_id(0) * BD + tl.arange(0, BD)
    stream = tl.program_id(1) * SB + tl.arange(0, SB)
    row, seg = stream // n_seg, stream % n_seg
    offs = ((row * L + seg * seg_len) * D)[None, :, None] + tl.arange(0, C)[None, None, :] * D + d[:, None, None]
    if SCRATCH:
        y_offs = d[:, None, None] * L + (row * L + seg * seg_len)[None, :, None] + tl.arange(0, C)[None, None, :]
        y_step = C
    else:
        y_offs, y_step = offs, C * D
    acc = tl.zeros((BD, SB, C), tl.float32)
    for blk in range(0, seg_len // C):
        x = tl.load(x_ptr + offs + blk * C * D)
        if STORE:
            tl.store(y_ptr + y_offs + blk * y_step, x)
        else:
            acc += x.to(tl.float32)
    if not STORE:
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty))


def copy_rows() -> list[dict]:
    from triton.testing import do_bench

    x = torch.randn(1, 65536, D_MODEL, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    rows = []
    for block_d in (4, 8, 16, 32):
        for store in (True, False):
            n_seg = 64 * block_d // 4          # 1,024 programs whatever BD: 256 * 4 at BD = 4
            seg_len = 65536 // n_seg
            grid = (D_MODEL // block_d, n_seg // 16)

            def run():
                _tiled_copy_kernel[grid](x, y, 65536, D_MODEL, seg_len, n_seg, BD=block_d, SB=16, C=16, STORE=store,
                                         num_warps=4)
            ms = float(do_bench(run, warmup=25, rep=200, return_mode="median"))
            moved = x.numel() * 2 * (2 if store else 1)
            rows.append({"probe": "tiled copy" if store else "tiled read", "BD": block_d, "segments": n_seg,
                         "blocks_per_program": seg_len // 16, "ms": ms, "TBps": moved / ms / 1e9})
            print(f"{rows[-1]['probe']:>10} BD={block_d:<3} {ms:.3f} ms  {rows[-1]['TBps']:.2f} TB/s", flush=True)
    return rows


TRANSPOSE_TILES = [(64, 64), (32, 128), (128, 32), (64, 128)]   # tokens x channels per program


def scratch_rows(length: int = 65536, d_model: int = D_MODEL, device: str = "cuda", bench=None) -> list[dict]:
    """Part 3: the BD = 4 copy into the channel-major scratch, the transpose back, and both.
    (length, d_model, device, bench: smaller and on the CPU under the interpreter, to check it.)"""
    from dataclasses import replace

    from megalodon_lite.ops import cema

    if bench is None:
        from triton.testing import do_bench as bench
    x = torch.randn(1, length, d_model, device=device).to(torch.bfloat16)
    scratch = torch.full((d_model, 1, length), float("nan"), device=device, dtype=torch.bfloat16)
    y = torch.full_like(x, float("nan"))
    n_seg, block_d = 64, 4                               # as the BD = 4 rows of part 2: 1,024 programs
    seg_len, grid = length // n_seg, (d_model // block_d, n_seg // 16)
    moved = x.numel() * 2 * 2

    def copy_to_scratch():
        _tiled_copy_kernel[grid](x, scratch, length, d_model, seg_len, n_seg, BD=block_d, SB=16, C=16, STORE=True,
                                 SCRATCH=True, num_warps=4)

    rows = []

    def timed(name: str, fn, passes: int = 1, **extra) -> None:
        ms = float(bench(fn, warmup=25, rep=200, return_mode="median"))
        rows.append({"probe": name, "ms": ms, "TBps": passes * moved / ms / 1e9, **extra})
        print(f"{name:>44} {ms:.3f} ms  {rows[-1]['TBps']:.2f} TB/s", flush=True)

    timed("tiled copy to scratch (BD 4)", copy_to_scratch, BD=block_d)
    copy_to_scratch()
    assert torch.equal(scratch[:, 0].t(), x[0]), "the scratch copy lost elements"
    for tokens, channels in TRANSPOSE_TILES:
        cfg = replace(cema.DEFAULT_CONFIG, transpose_tokens=tokens, transpose_channels=channels)
        for reverse in (False, True):
            y.fill_(float("nan"))
            cema.launch_transpose(scratch, y, cfg, reverse=reverse)
            assert torch.equal(y, x.flip(1) if reverse else x), f"transpose {tokens} x {channels} is wrong"
        timed(f"transpose scratch -> (B, L, D), {tokens} x {channels}",
              lambda cfg=cfg: cema.launch_transpose(scratch, y, cfg, reverse=False), tokens=tokens, channels=channels)
    timed("torch permuted copy (D, L) -> (L, D)", lambda: y.copy_(scratch.permute(1, 2, 0)))
    cfg = cema.DEFAULT_CONFIG

    def both():
        copy_to_scratch()
        cema.launch_transpose(scratch, y, cfg, reverse=False)
    y.fill_(float("nan"))
    both()
    assert torch.equal(y, x), "copy to scratch + transpose is not a copy"
    timed(f"tiled copy to scratch (BD 4) + transpose {cfg.transpose_tokens} x {cfg.transpose_channels}", both,
          passes=2, BD=block_d, tokens=cfg.transpose_tokens, channels=cfg.transpose_channels)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--v2-source", type=Path, default=None, help="v2's module source: run part 1 too")
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", default="copy,scratch", help="comma-separated: copy (2), scratch (3), configs (4)")
    args = parser.parse_args()
    from megalodon_lite.ops import cema as v3

    result = results_header(v3_config=repr(v3.DEFAULT_CONFIG))
    parts = args.parts.split(",")
    if "copy" in parts:
        result["copy"] = copy_rows()
    if "scratch" in parts:
        result["scratch"] = scratch_rows()
    if "configs" in parts:        # part 4: kernel 2's two store paths, alternating, in one process
        from dataclasses import replace
        result["ab_configs"] = ab_rows({
            f"y_scratch={flag}": partial(v3.cema_triton, config=replace(v3.DEFAULT_CONFIG, y_scratch=flag))
            for flag in (False, True)}, args.rounds)
    if args.v2_source is not None:
        v2 = load_ops_copy(args.v2_source, "cema_v2")
        result["ab"] = ab_rows({"v2": v2.cema_triton, "v3": v3.cema_triton}, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in result["device"].lower()).strip("_")
    path = args.out / f"probe_cema_{slug}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
