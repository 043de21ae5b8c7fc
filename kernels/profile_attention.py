"""Where one forward+backward of chunk attention spends its time, beyond the kernels (chapter 09).

    python kernels/profile_attention.py --out DIR    # CUDA: DIR/profile_attention_<device>.json

At the benchmark's shape (B=1, L=65,536, official head dims, bfloat16) it times three ways to run
the same kernels, each with ``triton.testing.do_bench`` (median, L2 flushed between repeats):

- ``launchers``: ``chunk_attention_forward`` then ``chunk_attention_backward``, no autograd;
- ``autograd_direct``: an autograd.Function that calls the launchers (defined here, not in the
  package: how much the custom ops cost);
- ``chunk_attention``: the package's public function (custom ops inside an autograd.Function),
  as ``kernels/bench.py`` measures it.

Then it records one call of the public function under ``torch.profiler`` and lists the idle gaps
of the GPU between consecutive kernels (longest first, with the kernels on both sides), the sum of
the kernels' times, and the CPU time each path takes to enqueue its work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.header import results_header  # noqa: E402
from megalodon_lite.ops import chunk_attention as ops  # noqa: E402


class DirectFunction(torch.autograd.Function):
    """The launchers under autograd, without the custom ops."""

    @staticmethod
    def forward(ctx, z, v, gamma, beta):
        o, q, k, lse = ops.chunk_attention_forward(z, v, gamma, beta, 1, 2048)
        ctx.save_for_backward(z, q, k, v, lse, gamma)
        return o

    @staticmethod
    def backward(ctx, grad_out):
        z, q, k, v, lse, gamma = ctx.saved_tensors
        return ops.chunk_attention_backward(grad_out, z, q, k, v, lse, gamma, 1, 2048)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (2 * torch.randn(1, 65_536, 256, device="cuda", generator=gen) + 0.5).bfloat16().requires_grad_()
    v = torch.randn(1, 65_536, 2048, device="cuda", generator=gen).bfloat16().requires_grad_()
    gamma = (0.5 * torch.randn(2, 1, 256, device="cuda", generator=gen)).requires_grad_()
    beta = (0.5 * torch.randn(2, 1, 256, device="cuda", generator=gen)).requires_grad_()
    grad = torch.randn(1, 65_536, 2048, device="cuda", generator=gen).bfloat16()
    leaves = (z, v, gamma, beta)

    def launchers():
        o, q, k, lse = ops.chunk_attention_forward(z, v, gamma, beta, 1, 2048)
        return ops.chunk_attention_backward(grad, z, q, k, v, lse, gamma, 1, 2048)

    paths = {
        "launchers": launchers,
        "autograd_direct": lambda: torch.autograd.grad(DirectFunction.apply(*leaves), leaves, grad),
        "chunk_attention": lambda: torch.autograd.grad(ops.chunk_attention(*leaves, 1, 2048), leaves, grad),
    }
    result = results_header(shape="B=1, L=65536, H=1, z=256, v=2048, c=2048, bfloat16", paths={})
    for name, fn in paths.items():
        ms = float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        cpu = []
        for _ in range(20):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            cpu.append((time.perf_counter() - start) * 1e3)
            torch.cuda.synchronize()
        cpu.sort()
        result["paths"][name] = {"fwdbwd_ms": ms, "cpu_enqueue_ms_median": cpu[len(cpu) // 2]}
        print(f"{name:>16}: {ms:.3f} ms on the GPU clock, {cpu[len(cpu) // 2]:.3f} ms of CPU to enqueue", flush=True)

    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        paths["chunk_attention"]()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    busy = sum(e.time_range.end - e.time_range.start for e in kernels) / 1e3
    span = (kernels[-1].time_range.end - kernels[0].time_range.start) / 1e3
    gaps = sorted(((b.time_range.start - a.time_range.end) / 1e3, a.name[:60], b.name[:60])
                  for a, b in zip(kernels, kernels[1:]))[::-1]
    result["profile"] = {"kernels": len(kernels), "kernel_ms": busy, "first_to_last_ms": span,
                         "gaps_ms": [{"ms": g, "after": a, "before": b} for g, a, b in gaps[:12]],
                         "kernel_ms_by_name": {}}
    for e in kernels:
        table = result["profile"]["kernel_ms_by_name"]
        table[e.name[:60]] = table.get(e.name[:60], 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    print(f"profiled call: {len(kernels)} kernels, {busy:.3f} ms busy, {span:.3f} ms first to last")
    for g, a, b in gaps[:12]:
        print(f"  gap {g:.3f} ms after {a} before {b}")
    for name, ms in sorted(result["profile"]["kernel_ms_by_name"].items(), key=lambda x: -x[1]):
        print(f"  {ms:7.3f} ms {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_attention_{result['device'].lower().replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
