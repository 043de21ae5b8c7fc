"""Train the `small` preset on one long sequence per step, on one GPU and split over two (chapter 11).

    torchrun --standalone --nproc-per-node 2 kernels/sequence_parallel_bench.py --out kernels/results
    torchrun --standalone --nproc-per-node 2 kernels/sequence_parallel_bench.py --cpu-smoke --out /tmp/sp

For each context (64K and 128K tokens) it measures training steps (forward, backward, gradient
sum, AdamW step; bf16 autocast; batch of one sequence of random tokens):

- on one GPU: rank 0 trains the plain MegalodonLM on the whole sequence while the other ranks wait;
- on all GPUs, for each scheme ("chain", "allgather"): the sequence split with ``split_sequence``,
  each rank a ChunkParallelLM over its segment.

Each configuration runs ``--warmup`` untimed steps and ``--steps`` timed ones (CUDA-synchronised;
the median is reported); tokens/s counts the tokens of the whole sequence per step. The peak
memory of every GPU (``torch.cuda.max_memory_allocated``) is recorded per configuration. Rank 0
writes ``<out>/sequence_parallel_<device>.json`` (device, GPU count, torch/triton/NCCL/Python
versions, date, command, rows) and prints a table.

``--cpu-smoke`` runs the same code with gloo on the CPU at tiny sizes (contexts of 4 and 8 chunks of
the `tiny` preset) and writes ``sequence_parallel_cpu_smoke.json``: it proves the script runs, not
how fast anything is.

NVLink multicast (NVLS) stays off: this script sets NCCL_NVLS_ENABLE=0 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 in its own environment before NCCL starts.
"""

from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"                     # before torch.distributed starts NCCL
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernels.header import results_header  # noqa: E402
from megalodon_lite.config import preset  # noqa: E402
from megalodon_lite.model import MegalodonLM  # noqa: E402
from megalodon_lite.parallel import (  # noqa: E402
    SCHEMES,
    ChunkParallelLM,
    chunk_parallel_cross_entropy,
    init_chunk_parallel,
    split_sequence,
    sum_gradients,
)

GiB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else 0.0


def train_steps(step, device: torch.device, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds of each timed step, and every step's loss."""
    seconds, losses = [], []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        losses.append(step())
        synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds, losses


def make_step(model: torch.nn.Module, forward, tokens: torch.Tensor, targets: torch.Tensor, device: torch.device,
              group=None):
    """One training step: forward, loss, backward, (gradient sum over ``group``), AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.1)

    def step() -> float:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(tokens)
        if group is None:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            mean_loss = loss
        else:
            loss, mean_loss = chunk_parallel_cross_entropy(logits.float(), targets, group)
        loss.backward()
        if group is not None:
            sum_gradients(model, group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return mean_loss.item()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "kernels" / "results")
    parser.add_argument("--cpu-smoke", action="store_true", help="gloo on the CPU, tiny sizes")
    parser.add_argument("--contexts", type=int, nargs="*", default=None, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--timeout-min", type=float, default=20.0, help="process group timeout (minutes)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("sequence_parallel_bench.py needs CUDA GPUs (or --cpu-smoke)", file=sys.stderr)
        return 2
    config = preset("tiny", num_layers=2, chunk_size=32) if smoke else preset("small")
    contexts = args.contexts or ([4 * config.chunk_size, 8 * config.chunk_size] if smoke else [65_536, 131_072])
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    steps = args.steps if args.steps is not None else (2 if smoke else 5)

    groups = init_chunk_parallel(int(os.environ.get("WORLD_SIZE", "1")), backend="gloo" if smoke else None,
                                 timeout=datetime.timedelta(minutes=args.timeout_min))
    rank, world = groups.sequence_rank, groups.sequence_size
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    if smoke:
        torch.set_num_threads(1)
    device_name = "cpu (gloo smoke run)" if smoke else torch.cuda.get_device_name(device)
    barrier_devices = {} if smoke else {"device_ids": [device.index]}
    rows = []
    for context in contexts:
        generator = torch.Generator().manual_seed(context)
        sequence = torch.randint(0, config.vocab_size, (1, context + 1), generator=generator).to(device)
        inputs, targets = sequence[:, :-1], sequence[:, 1:]

        # one GPU: rank 0 alone, the others wait at the barrier
        if rank == 0:
            torch.manual_seed(0)
            model = MegalodonLM(config).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step = make_step(model, lambda t: model(t)[0], inputs, targets, device)
            try:
                seconds, losses = train_steps(step, device, warmup, steps)
                rows.append({"context": context, "gpus": 1, "scheme": "single", "step_s": statistics.median(seconds),
                             "tokens_per_s": context / statistics.median(seconds),
                             "peak_memory_GiB": [peak_memory(device)], "losses": losses})
                print(f"context {context}: 1 device {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
            except torch.cuda.OutOfMemoryError as err:  # one device alone may not hold the longest context
                rows.append({"context": context, "gpus": 1, "scheme": "single", "out_of_memory": str(err)[:300]})
                print(f"context {context}: 1 device ran out of memory", flush=True)
            del model, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier(group=groups.sequence, **barrier_devices)

        lengths = split_sequence(context, world, config.chunk_size)
        start = sum(lengths[:rank])
        segment = slice(start, start + lengths[rank])
        for scheme in SCHEMES:
            torch.manual_seed(0)
            model = MegalodonLM(config).to(device)
            wrapped = ChunkParallelLM(model, groups.sequence, scheme)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            step = make_step(model, wrapped, inputs[:, segment], targets[:, segment], device, group=groups.sequence)
            seconds, losses = train_steps(step, device, warmup, steps)
            slowest = torch.tensor([statistics.median(seconds), peak_memory(device)], dtype=torch.float64, device=device)
            every = [torch.empty_like(slowest) for _ in range(world)]
            dist.all_gather(every, slowest, group=groups.sequence)
            step_s = max(t[0].item() for t in every)
            rows.append({"context": context, "gpus": world, "scheme": scheme, "step_s": step_s,
                         "tokens_per_s": context / step_s, "peak_memory_GiB": [t[1].item() for t in every],
                         "segment_lengths": lengths, "losses": losses})
            if rank == 0:
                print(f"context {context}: {world} devices, {scheme}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
            wrapped.remove_hooks()
            del model, wrapped, step

    if rank == 0:
        nccl = {"nccl": ".".join(map(str, torch.cuda.nccl.version()))} if torch.cuda.is_available() else {}
        record = results_header(
            device_name, versions=("torch", "triton", "python"),
            launcher=("torchrun", "--standalone", "--nproc-per-node", str(world)), gpus=world, **nccl,
            config="tiny (num_layers=2, chunk_size=32)" if smoke else "small",
            setup=(f"batch 1 sequence of random tokens, bf16 autocast on CUDA, AdamW; {warmup} warm-up and "
                   f"{steps} timed steps, median; tokens_per_s = context / step time of the slowest rank"),
            environment={k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
            rows=rows)
        name = "cpu_smoke" if smoke else re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"sequence_parallel_{name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(path)
        print(f"{'context':>8} {'GPUs':>4} {'scheme':>10} {'step s':>8} {'tokens/s':>10} {'peak GiB per GPU':>20} "
              f"{'losses (first, last)':>22}")
        for row in rows:  # same seed and data: a split run's losses must follow the single device's
            if "out_of_memory" in row:
                print(f"{row['context']:8d} {row['gpus']:4d} {row['scheme']:>10}   out of memory")
                continue
            memory = ", ".join(f"{m:.1f}" for m in row["peak_memory_GiB"])
            print(f"{row['context']:8d} {row['gpus']:4d} {row['scheme']:>10} {row['step_s']:8.3f} "
                  f"{row['tokens_per_s']:10.0f} {memory:>20} {row['losses'][0]:10.4f} {row['losses'][-1]:10.4f}")
        print(f"wrote {path}")
    dist.barrier(**barrier_devices)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
