"""Measure what chapter 11's cost model needs: the time of one hop of the chain and of each
collective of the all-gather scheme, for 2 to 8 processes joined by gloo on this machine.

    PYTHONPATH=$PWD python kernels/chunk_parallel_costs.py            # writes kernels/results/chunk_parallel_costs_cpu.json
    PYTHONPATH=$PWD python kernels/chunk_parallel_costs.py --max-ranks 4 --repeats 50 --out /tmp/costs.json

Messages have the sizes of the `small` preset with one sequence per step (float32): a layer's
chain message [mean, var, h] of 2G + 2DN numbers, the norm summary (2G) and the CEMA end state
(2DN) that the all-gather scheme gathers, and the P-times larger tensors its backward all-reduces.
For each number of ranks P, every rank runs (after a warm-up, each repetition after a barrier):

- hop: the chain message relayed around a ring 0 -> 1 -> ... -> P-1 -> 0, timed on rank 0 and
  divided by the P hops;
- allgather_norm / allgather_cema: one all_gather of the norm summary / the CEMA end state;
- allreduce_norm / allreduce_cema: one all_reduce of P summaries / P end states.

Each value is the median over the repetitions, seconds, as rank 0 sees it. This machine's cores
are shared by all P processes: past its core count, a hop or a collective also waits for the
operating system to run the next process, and other jobs on the machine slow it too (the JSON
records the one-minute load average before and after). The JSON records the CPU, the core count,
the versions, the date and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels.header import results_header  # noqa: E402
from megalodon_lite.config import preset  # noqa: E402
from megalodon_lite.launch import spawn_local  # noqa: E402


def message_sizes(preset_name: str = "small", batch: int = 1) -> dict[str, int]:
    """Numbers per message for one step of ``batch`` sequences of the given preset."""
    cfg = preset(preset_name)
    norm = batch * 2 * cfg.norm_num_groups
    cema = batch * 2 * cfg.model_dim * cfg.cema_ndim
    return {"norm": norm, "cema": cema, "layer": norm + cema}


def measure(rank: int, world_size: int, sizes: dict[str, int], repeats: int, timeout_s: float) -> dict[str, float]:
    """Run in every spawned process: median seconds of each operation, as rank 0 sees it."""
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    after, before = (rank + 1) % world_size, (rank - 1) % world_size
    layer = torch.randn(sizes["layer"])
    received = torch.empty_like(layer)

    def relay() -> None:  # the chain message once around the ring: world_size hops
        if rank == 0:
            dist.send(layer, after)
            dist.recv(received, before)
        else:
            dist.recv(received, before)
            dist.send(received, after)

    def gather(name: str):
        tensor = torch.randn(sizes[name])
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        return lambda: dist.all_gather(parts, tensor)

    def reduce(name: str):
        tensor = torch.randn(world_size * sizes[name])
        return lambda: dist.all_reduce(tensor)

    operations = {"hop_s": (relay, world_size), "allgather_norm_s": (gather("norm"), 1),
                  "allgather_cema_s": (gather("cema"), 1), "allreduce_norm_s": (reduce("norm"), 1),
                  "allreduce_cema_s": (reduce("cema"), 1)}
    medians = {}
    for name, (operation, per) in operations.items():
        for _ in range(5):
            operation()
        seconds = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            operation()
            seconds.append(time.perf_counter() - start)
        medians[name] = statistics.median(seconds) / per
    return medians


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-ranks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results" / "chunk_parallel_costs_cpu.json")
    args = parser.parse_args(argv)
    if args.max_ranks < 2 or args.repeats < 1:
        parser.error("--max-ranks must be >= 2 and --repeats >= 1")
    sizes = message_sizes()
    load_before = os.getloadavg()
    rows = []
    for ranks in range(2, args.max_ranks + 1):
        outcomes = spawn_local(measure, ranks, sizes, args.repeats, 60.0, timeout=600.0)
        failed = [o for o in outcomes if o.error]
        if failed:
            print(f"rank {failed[0].rank} of {ranks} failed:\n{failed[0].error}", file=sys.stderr)
            return 1
        row = {"ranks": ranks, **outcomes[0].value}
        rows.append(row)
        print(f"P={ranks}: " + "  ".join(f"{k[:-2]} {v * 1e6:8.1f} us" for k, v in row.items() if k != "ranks"),
              flush=True)
    record = results_header(
        f"CPU: {cpu_name()}, {os.cpu_count()} cores", versions=("torch", "python"),
        backend="gloo (TCP over loopback)",
        message_floats={**sizes, "preset": "small", "batch": 1, "dtype": "float32"},
        repeats=args.repeats,
        load_average_1min={"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        method=("median seconds as rank 0 sees it, each repetition after a barrier; hop = one ring relay "
                "of the layer message / P; allreduce sizes are P x the gathered message"),
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
