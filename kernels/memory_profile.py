"""Where the peak memory of one training step goes, for Megalodon-lite and its matched baseline (chapter 10).

    python kernels/memory_profile.py --out DIR           # CUDA: DIR/memory_profile_<device>.json
    python kernels/memory_profile.py --quick --out DIR   # any device: tiny preset, to check the script

For each model (the `small` preset and its parameter-matched Llama-style baseline, context 32K,
batch 1, bf16 autocast, as ``kernels/train_compare.py``'s throughput part) it runs two warm-up
steps, then one step with

- every tensor that autograd saves for the backward recorded once per storage
  (``torch.autograd.graph.saved_tensors_hooks``), attributed to the innermost module running when
  it was saved (forward hooks on every module), summed by module class and by module path;
- the memory allocated before the step, at the end of the model's forward, and the step's peak;
- the memory allocated after each of three more steps (it must not grow: a leak would).

Saved-tensor hooks do not nest: inside a model's own hooks (chapter 07's ``recomputed_on_backward``
around the attention and the gated projection) only the model's apply, so what is saved there is not
counted in the by-module sums. The memory marks count everything.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.header import results_header  # noqa: E402
from megalodon_lite.data import load_corpus  # noqa: E402
from megalodon_lite.train import Trainer, TrainConfig  # noqa: E402


def profile_model(kind: str, preset: str, context: int, device: torch.device, corpus) -> dict:
    trainer = Trainer(TrainConfig(model=kind, preset=preset, context=context, batch_size=1, steps=10_000),
                      device=device, corpus=corpus)
    for _ in range(2):
        trainer.train_step()
    cuda = device.type == "cuda"
    stack: list[str] = []
    saved: dict[int, tuple[str, str, int]] = {}  # storage pointer -> (module path, module class, bytes)
    classes = {name: type(module).__name__ for name, module in trainer.model.named_modules()}
    marks = {}

    def enter(name):
        return lambda module, args: stack.append(name)

    def leave(name):
        def hook(module, args, output):
            stack.pop()
            if name == "" and cuda:
                marks["after_forward"] = torch.cuda.memory_allocated(device)
        return hook

    handles = []
    for name, module in trainer.model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave(name)))

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in saved and tensor.device.type == device.type:
            where = stack[-1] if stack else "(outside the model)"
            saved[storage.data_ptr()] = (where, classes.get(where, "loss and head"), storage.nbytes())
        return tensor

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        marks["before_step"] = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize(device)
        marks["peak"] = torch.cuda.max_memory_allocated(device)
    for handle in handles:
        handle.remove()
    # A leak (say a reference cycle that keeps a step's graph alive) shows as growth from step to step.
    after_steps = []
    for _ in range(3 if cuda else 0):
        trainer.train_step()
        torch.cuda.synchronize(device)
        after_steps.append(torch.cuda.memory_allocated(device))
    marks["after_each_of_3_more_steps"] = after_steps
    by_class, by_path = defaultdict(int), defaultdict(int)
    for where, cls, nbytes in saved.values():
        by_class[cls] += nbytes
        by_path[where] += nbytes
    top = lambda d, n: dict(sorted(d.items(), key=lambda kv: -kv[1])[:n])  # noqa: E731
    return {"model": kind, "preset": preset, "context": context, "batch": 1,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "memory_bytes": marks, "saved_bytes_total": sum(v[2] for v in saved.values()),
            "saved_bytes_by_module_class": top(by_class, 25), "saved_bytes_by_module_path": top(by_path, 25)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny preset, short context, any device")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.quick and device.type != "cuda":
        parser.error("the full-size profile needs a CUDA GPU; use --quick to check the script on a CPU")
    preset, context = ("tiny", 256) if args.quick else ("small", 32_768)
    corpus = load_corpus()
    rows = [profile_model(kind, preset, context, device, corpus) for kind in ("megalodon", "llama")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = results_header(name, rows=rows)
    for row in rows:
        marks = {k: (f"{v / 2**30:.3f} GiB" if isinstance(v, int) else [f"{x / 2**30:.3f}" for x in v])
                 for k, v in row["memory_bytes"].items()}
        print(f"{row['model']}: {marks}; saved for the backward {row['saved_bytes_total'] / 2**30:.2f} GiB")
        for cls, nbytes in row["saved_bytes_by_module_class"].items():
            print(f"  {nbytes / 2**20:9.1f} MiB  {cls}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory_profile_{name.lower().replace(' ', '_')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
