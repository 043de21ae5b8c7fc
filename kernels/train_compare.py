"""Megalodon-lite against its Llama-style baseline on one GPU: chapter 10's measured comparison.

Both models are matched in parameters (the ``small`` preset, 4 layers of the official 200M shape, and
the baseline from ``matched_llama_config``), see the same tokens in the same order, and use the same
optimizer and schedule (``megalodon_lite.train``). Parts, each selectable with ``--parts``:

    throughput  training tokens/s and peak memory at context 4K, 16K, 32K (32K tokens per step), and a
                profile of one Megalodon step at 32K (where the time goes)
    throughput-compiled
                the same steps with the training forward and loss compiled (``TrainConfig.compile``:
                ``torch.compile``, Inductor unless ``$MEGALODON_COMPILE_BACKEND`` says otherwise, static
                shapes, graph breaks allowed), each next to an eager row measured in the same call.
                Contexts in the order 4K, 32K, 16K (the targets' first), each both models, baseline
                first. A compiled row records ``compile_seconds`` (its first steps, until one compiles
                nothing new: tracing, code generation, autotuning; ``compile_steps`` of them) and
                ``warmup_seconds`` (one more unmeasured step) apart from its timed steps, the graphs and
                graph breaks torch.compile reported, and peak memory (of the timed steps).
                It is skipped (``skipped``: why) when the time left cannot hold a compile as long as the
                longest so far (90 s before the first); a row that fails records ``error`` and the
                others go on. A part of its own, so that one call can measure it and ``--merge`` can add
                it to a results file beside the eager part
    decode      decoding tokens/s and memory per sequence at context 1K, 8K, 32K, 128K (batch 1), each
                model run eagerly, as the fixed-buffer step of megalodon_lite.decoding, and as
                that step replayed in CUDA graphs
    curves      validation bits per byte while both train on the standard library at context 4K
    positions   (after curves, same call) loss per position at 32K on long validation documents
    recall      MQAR and passkey accuracy after training both on those tasks for the same budget
    demo        a small Megalodon (3.4M parameters, 13 MiB in float32) trained on the standard library,
                saved as a checkpoint for chapter 07's generation demo and the README's `sample` example

The training parts share the time left after the measuring parts, by weight; each measures its
models' step time first and fixes its step count (the schedule's length) so that both models
train the same number of steps within the share. Results go to ``OUT/train_compare.json``
(rewritten after every part; device, versions, date and the exact command in its header), the
demo checkpoint to ``OUT/demo-checkpoint/``. Two calls of at most 10 minutes each, then one file:

    python kernels/train_compare.py --out OUT1 --parts throughput,decode,recall,demo --minutes 9
    python kernels/train_compare.py --out OUT2 --parts curves,positions --minutes 9
    python kernels/train_compare.py --merge OUT1/train_compare.json OUT2/train_compare.json \
        --into kernels/results/train_compare_<gpu>.json

One part again (here decode, about a minute on an H200), folded into the committed file:

    python kernels/train_compare.py --out OUT3 --parts decode --minutes 5
    python kernels/train_compare.py --merge kernels/results/train_compare_<gpu>.json OUT3/train_compare.json \
        --into kernels/results/train_compare_<gpu>.json

The compiled comparison (one call of at most 8 minutes; Inductor takes 30-90 s per model and context):

    python kernels/train_compare.py --out OUT4 --parts throughput-compiled --minutes 7.5

``--quick`` runs every part at toy sizes (the tiny preset, short contexts) on any device, to check
the script end to end; chapter 10 reads and plots the results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.header import results_header  # noqa: E402
from megalodon_lite.baseline import KVCache  # noqa: E402
from megalodon_lite.checkpoint import save_checkpoint  # noqa: E402
from megalodon_lite.data import (IGNORE_INDEX, ProbeBatch, document_windows, evaluation_windows,  # noqa: E402
                                 load_corpus, mqar_batch, passkey_batch)
from megalodon_lite.model import MegalodonLM  # noqa: E402
from megalodon_lite.train import (Trainer, TrainConfig, autocast_for, evaluate, model_config,  # noqa: E402
                                  probe_accuracy)

PARTS = ("throughput", "throughput-compiled", "decode", "curves", "positions", "recall", "demo")
TRAINING_WEIGHTS = {"curves": 5.0, "recall": 3.0, "demo": 1.5}   # shares of the training time
KINDS = ("megalodon", "llama")
DEMO_SHAPE = {"model_dim": 256, "z_dim": 64, "value_dim": 512, "ffn_hidden_dim": 640, "num_layers": 4,
              "chunk_size": 512, "norm_num_groups": 32}
# The recall part's shape (3.4M parameters): small enough that the GPU takes thousands of steps in its
# share, and a chunk (512) half the recall context (1,024), so that half of the MQAR queries and of the
# passkeys sit in a later chunk than what they ask for: Megalodon must carry it in its recurrent state.
# The first run (the small preset at context 4,096, 64 pairs, 1,287 steps) left both models at chance.
RECALL_SHAPE = DEMO_SHAPE


def sizes(quick: bool) -> dict:
    """Every size the parts use: full (GPU) or quick (toy, any device)."""
    if quick:
        return {"preset": "tiny", "train_contexts": (128, 256, 512), "tokens_per_step": 1024, "timed_steps": 2,
                "compile_guess_seconds": 5.0, "compile_row_seconds": 1.0, "compile_reserve_seconds": 2.0,
                "decode_contexts": (64, 256, 1024), "decode_tokens": 8, "decode_warmup": 2, "curves_context": 256, "curves_batch": 4,
                "eval_windows": 4, "positions_context": 1024, "positions_windows": 4, "recall_preset": "tiny",
                "recall_shape": None, "recall_context": 256, "recall_pairs": 8, "recall_batch": 4, "recall_lr": 3e-3,
                "recall_eval": 16, "demo_shape": {"num_layers": 1},
                "demo_preset": "tiny", "demo_context": 256, "demo_batch": 4}
    return {"preset": "small", "train_contexts": (4096, 16384, 32768), "tokens_per_step": 32768, "timed_steps": 5,
            "compile_guess_seconds": 90.0, "compile_row_seconds": 10.0, "compile_reserve_seconds": 20.0,
            "decode_contexts": (1024, 8192, 32768, 131072), "decode_tokens": 64, "decode_warmup": 8, "curves_context": 4096,
            "curves_batch": 8, "eval_windows": 16, "positions_context": 32768, "positions_windows": 16,
            "recall_preset": "small", "recall_shape": RECALL_SHAPE, "recall_context": 1024, "recall_pairs": 8,
            "recall_batch": 32, "recall_lr": 2e-3, "recall_eval": 128,
            "demo_shape": DEMO_SHAPE, "demo_preset": "small", "demo_context": 2048, "demo_batch": 16}


class Budget:
    """Wall-clock seconds of the whole call, and the share each training part may use."""

    def __init__(self, minutes: float, parts: list[str]) -> None:
        self.start, self.total, self.parts = time.perf_counter(), 60.0 * minutes, parts

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def share(self, part: str) -> float:
        """Seconds for training ``part``: what is left (less a reserve for positions and saving),
        split by weight among the training parts not run yet."""
        remaining = [p for p in self.parts[self.parts.index(part):] if p in TRAINING_WEIGHTS]
        reserve = 45.0 if "positions" in self.parts[self.parts.index(part):] else 0.0
        weight = TRAINING_WEIGHTS[part] / sum(TRAINING_WEIGHTS[p] for p in remaining)
        return max(0.0, (self.left() - reserve - 15.0) * weight)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


# --------------------------------------------------------------------------------------------- parts

def compile_counters() -> dict:
    """torch.compile's running totals: graphs compiled and graph breaks met (for differences)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": int(sum(counters["graph_break"].values()))}


MAX_COMPILE_STEPS = 12


def measure_steps(trainer: Trainer, timed_steps: int, row: dict) -> None:
    """Into ``row``: unmeasured steps, then the mean of ``timed_steps`` more, tokens/s and their peak memory.

    Compiled: steps until one compiles no new graph (``compile_steps``, at most MAX_COMPILE_STEPS; both
    models settle after 2 on an H200), their wall seconds as ``compile_seconds``, then one more as
    ``warmup_seconds``. Eager: two steps (allocator, kernel selection, Triton autotuning), ``warmup_seconds``."""
    sync()
    start = time.perf_counter()
    if trainer.config.compile:
        row["compile_steps"] = 0
        while row["compile_steps"] < MAX_COMPILE_STEPS:
            graphs = compile_counters()["graphs"]
            trainer.train_step()
            row["compile_steps"] += 1
            if compile_counters()["graphs"] == graphs:
                break
        sync()
        row["compile_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
    else:
        trainer.train_step()
    trainer.train_step()
    sync()
    row["warmup_seconds"] = time.perf_counter() - start
    reset_peak()
    sync()
    start = time.perf_counter()
    losses = [trainer.train_step().loss for _ in range(timed_steps)]
    sync()
    seconds = (time.perf_counter() - start) / timed_steps
    row.update(seconds_per_step=seconds, tokens_per_s=row["tokens_per_step"] / seconds,
               peak_memory_bytes=peak_bytes(), finite=all(math.isfinite(x) for x in losses))


def part_throughput(s: dict, device: torch.device, corpus, budget: Budget) -> dict:
    """Training tokens/s and peak memory per context; one profiled Megalodon step at the longest."""
    rows = []
    for context in s["train_contexts"]:
        batch = max(1, s["tokens_per_step"] // context)
        for kind in KINDS:
            config = TrainConfig(model=kind, preset=s["preset"], context=context, batch_size=batch, steps=10_000)
            row = {"model": kind, "context": context, "batch": batch, "tokens_per_step": batch * context}
            try:
                trainer = Trainer(config, device=device, corpus=corpus)
                row["parameters"] = sum(p.numel() for p in trainer.model.parameters())
                measure_steps(trainer, s["timed_steps"], row)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_oom(err):
                    raise
                row["error"] = "out of memory"
            rows.append(row)
            print(f"  throughput {kind:>9} context {context:>6}: "
                  + (f"{row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_memory_bytes'] or 0:,} bytes"
                     if "tokens_per_s" in row else row["error"]), flush=True)
            trainer = None
            reset_peak()
    out = {"rows": rows}
    if device.type == "cuda":
        out["profile_megalodon"] = profile_step(s, device, corpus, s["train_contexts"][-1])
    return out


def part_throughput_compiled(s: dict, device: torch.device, corpus, budget: Budget) -> dict:
    """Training tokens/s and peak memory with the forward and loss compiled, beside eager in the same call."""
    import torch._dynamo

    from megalodon_lite.train import COMPILE_BACKEND_ENV

    first, *rest = s["train_contexts"]
    contexts = [first, *rest[::-1]]  # 4K, 32K, 16K: the targets' contexts first
    backend = os.environ.get(COMPILE_BACKEND_ENV, "").strip() or "inductor"
    reserve = s["compile_reserve_seconds"]  # for writing the results; parts after this one (best: none) get the rest
    compile_times: list[float] = []
    rows = []
    for context in contexts:
        batch = max(1, s["tokens_per_step"] // context)
        for kind in ("llama", "megalodon"):
            for compiled in (False, True):
                row = {"model": kind, "context": context, "batch": batch, "tokens_per_step": batch * context,
                       "mode": "compiled" if compiled else "eager"}
                rows.append(row)
                longest = max(compile_times, default=s["compile_guess_seconds"])
                needed = (1.3 * longest if compiled else 0.0) + s["compile_row_seconds"] + reserve
                if budget.left() < needed:
                    basis = (f"a compile took up to {longest:.0f} s so far" if compile_times
                             else f"a compile is guessed at {longest:.0f} s")
                    row["skipped"] = (f"time budget: {budget.left():.0f} s left, a row needs about {needed:.0f} s "
                                      f"({basis})")
                    print(f"  throughput-compiled {kind:>9} {row['mode']:>8} context {context:>6}: skipped", flush=True)
                    continue
                trainer = None
                try:
                    torch._dynamo.reset()  # each compiled row compiles from nothing: its own compile time
                    before = compile_counters()
                    config = TrainConfig(model=kind, preset=s["preset"], context=context, batch_size=batch,
                                         steps=10_000, compile=compiled)
                    trainer = Trainer(config, device=device, corpus=corpus)
                    row["parameters"] = sum(p.numel() for p in trainer.model.parameters())
                    measure_steps(trainer, s["timed_steps"], row)
                    if compiled:
                        after = compile_counters()
                        row.update(backend=backend, graphs=after["graphs"] - before["graphs"],
                                   graph_breaks=after["graph_breaks"] - before["graph_breaks"])
                        compile_times.append(row["compile_seconds"])
                except Exception as err:  # record and go on: one failure must not lose the other rows
                    row["error"] = "out of memory" if is_oom(err) else f"{type(err).__name__}: {str(err)[:500]}"
                    traceback.print_exc()
                print(f"  throughput-compiled {kind:>9} {row['mode']:>8} context {context:>6}: "
                      + (f"{row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_memory_bytes'] or 0:,} bytes"
                         + (f", compiled in {row['compile_seconds']:.1f} s ({row['compile_steps']} steps, "
                            f"{row['graphs']} graphs, {row['graph_breaks']} breaks)" if compiled else "")
                         if "tokens_per_s" in row else row["error"]),
                      flush=True)
                trainer = None
                reset_peak()
    torch._dynamo.reset()
    return {"rows": rows, "backend": backend, "dynamic": False, "mode": "default", "contexts_order": contexts,
            "timed_steps": s["timed_steps"]}


def profile_step(s: dict, device: torch.device, corpus, context: int) -> dict:
    """The CUDA kernels of one Megalodon training step, by total time (the 20 largest)."""
    from torch.profiler import ProfilerActivity, profile

    batch = max(1, s["tokens_per_step"] // context)
    trainer = Trainer(TrainConfig(model="megalodon", preset=s["preset"], context=context, batch_size=batch,
                                  steps=10_000), device=device, corpus=corpus)
    trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train_step()
        sync()
    events = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "self_cuda_time_total", 0)
        events.append({"name": e.key, "calls": e.count, "self_device_ms": device_us / 1e3,
                       "self_cpu_ms": e.self_cpu_time_total / 1e3})
    events.sort(key=lambda e: -e["self_device_ms"])
    total = sum(e["self_device_ms"] for e in events)
    return {"context": context, "batch": batch, "device_ms_total": total, "top": events[:20]}


DECODE_MODES = ("eager", "static", "graph")


@torch.no_grad()
def part_decode(s: dict, device: torch.device) -> dict:
    """Tokens/s and memory per sequence while decoding one sequence after a prompt of each context.

    Three ways to run the same step, for both models: ``eager`` (``model(token, state)``, the
    chapters' streaming forward), ``static`` (the fixed-buffer step of ``megalodon_lite.decoding``,
    run eagerly) and ``graph`` (that step replayed as a CUDA graph; CUDA only). Each row: warm-up
    steps (graph captures happen there, all of them: ``prepare``), then ``decode_tokens`` timed steps
    between CUDA syncs, greedy. Memory: ``state_bytes`` (the state or cache a stream keeps: for
    ``eager`` what is filled, for the fixed buffers all of them), the peak allocated over the
    weights while reading the prompt and while decoding, and the decoders' bf16 copies of the linear
    weights (``weight_copies_bytes``, counted in the decoding peak).
    """
    from megalodon_lite.decoding import _FP32_SCORES_FROM_HALF, make_decoder

    rows = []
    torch.manual_seed(0)
    models = {kind: Trainer(TrainConfig(model=kind, preset=s["preset"], steps=10), device=device,
                            batches=lambda first, rows: None).model.eval() for kind in KINDS}
    modes = [m for m in DECODE_MODES if m != "graph" or device.type == "cuda"]
    warmup, timed = s["decode_warmup"], s["decode_tokens"]
    for context in s["decode_contexts"]:
        prompt = torch.randint(0, 256, (1, context), device=device)
        for kind, model in models.items():
            for mode in modes:
                row = {"model": kind, "context": context, "mode": mode}
                decoder = memory = logits = None
                try:
                    reset_peak()
                    weights = torch.cuda.memory_allocated() if device.type == "cuda" else None
                    with autocast_for(device):
                        if mode == "eager":
                            if isinstance(model, MegalodonLM):
                                piece = 16 * model.config.chunk_size
                                for lo in range(0, context, piece):
                                    logits, memory = model(prompt[:, lo:lo + piece], memory)
                            else:
                                logits, memory = model(prompt, KVCache.empty(context + warmup + timed + 8))
                            logits = logits[:, -1]
                        else:
                            decoder = make_decoder(model, 1, context + warmup + timed + 8,
                                                   cuda_graph=mode == "graph")
                            if isinstance(model, MegalodonLM):
                                decoder.prefill_piece = 16 * model.config.chunk_size
                            logits = decoder.prefill(prompt)
                        prefill_peak = peak_bytes()
                        if decoder is not None:
                            decoder.prepare(warmup + timed)  # every capture now, none while timing

                        def advance(token: torch.Tensor) -> torch.Tensor:
                            nonlocal memory
                            if decoder is not None:
                                return decoder.step(token)
                            out, memory = model(token[:, None], memory)
                            return out[:, -1]

                        token = logits.argmax(-1)
                        for _ in range(warmup):
                            token = advance(token).argmax(-1)
                        sync()
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        first = []
                        start = time.perf_counter()
                        for _ in range(timed):
                            token = advance(token).argmax(-1)
                            if len(first) < 8:
                                first.append(token)
                        sync()
                    seconds = (time.perf_counter() - start) / timed
                    if decoder is None:
                        state = memory.nbytes if isinstance(model, MegalodonLM) else memory.used_nbytes
                    else:
                        state = decoder.state_nbytes
                        row.update(weight_copies_bytes=decoder.extra_weight_bytes, graphs=len(decoder.graphs))
                    row.update(tokens_per_s=1.0 / seconds, seconds_per_token=seconds, state_bytes=state,
                               peak_prefill_over_weights_bytes=None if weights is None else prefill_peak - weights,
                               peak_decode_over_weights_bytes=None if weights is None else peak_bytes() - weights,
                               first_tokens=[int(t) for t in first])
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not is_oom(err):
                        raise
                    row["error"] = "out of memory"
                decoder = memory = logits = None
                rows.append(row)
                print(f"  decode {kind:>9} {mode:>6} context {context:>7}: "
                      + (f"{row['tokens_per_s']:,.1f} tokens/s, state {row['state_bytes']:,} bytes"
                         if "tokens_per_s" in row else row["error"]), flush=True)
    scores = {str(d): v for d, v in _FP32_SCORES_FROM_HALF.items()}
    return {"rows": rows, "batch": 1, "modes": modes, "warmup_tokens": warmup, "timed_tokens": timed,
            "bf16_scores_in_float32_by_bmm": scores}


def calibrated_steps(make_trainer, budget_seconds: float, evals: int, eval_seconds_guess: float = 0.0) -> dict:
    """Seconds per step of each model (after 2 warm-up steps, 3 timed) and the step count that fits
    both, with a margin, in ``budget_seconds``."""
    per_step = {}
    for kind in KINDS:
        trainer = make_trainer(kind, 10_000)
        for _ in range(2):
            trainer.train_step()
        sync()
        start = time.perf_counter()
        for _ in range(3):
            trainer.train_step()
        sync()
        per_step[kind] = (time.perf_counter() - start) / 3
        trainer = None
        reset_peak()
    # 85%: a margin for step times that vary (the call must end before the device tool's limit)
    steps = int(0.85 * (budget_seconds - evals * eval_seconds_guess) / sum(per_step.values()))
    return {"seconds_per_step": per_step, "steps": max(steps, 2)}


def part_curves(s: dict, device: torch.device, corpus, budget: Budget, results: dict) -> dict:
    """Both models trained on the same windows with the same schedule; validation bits/byte as they go."""
    seconds = budget.share("curves")

    def make(kind: str, steps: int) -> Trainer:
        config = TrainConfig(model=kind, preset=s["preset"], context=s["curves_context"],
                             batch_size=s["curves_batch"], steps=steps)
        return Trainer(config, device=device, corpus=corpus)

    start = time.perf_counter()
    plan = calibrated_steps(make, seconds - (time.perf_counter() - start) - 20.0, evals=12, eval_seconds_guess=1.0)
    steps = plan["steps"]
    out = {"budget_seconds": seconds, "calibration": plan, "steps": steps, "models": {}}
    eval_every = max(1, steps // 12)
    for kind in KINDS:
        trainer = make(kind, steps)
        record = {"parameters": sum(p.numel() for p in trainer.model.parameters()), "step": [], "train_loss": [],
                  "eval_step": [], "eval_tokens": [], "val_bits_per_byte": [], "config": trainer.config.to_dict()}
        began = time.perf_counter()
        trainer.run(steps, eval_every=eval_every, eval_windows=s["eval_windows"],
                    on_step=lambda r, rec=record, t=trainer: (rec["step"].append(t.step), rec["train_loss"].append(r.loss)),
                    on_eval=lambda r, rec=record, t=trainer: (rec["eval_step"].append(t.step),
                                                             rec["eval_tokens"].append(t.step * t.tokens_per_step),
                                                             rec["val_bits_per_byte"].append(r.bits_per_byte)))
        sync()
        record["seconds"] = time.perf_counter() - began
        record["tokens"] = steps * trainer.tokens_per_step
        record["epochs"] = record["tokens"] / len(corpus[0])
        out["models"][kind] = record
        results.setdefault("_trained", {})[kind] = trainer.model
        print(f"  curves {kind:>9}: {steps} steps, {record['tokens']:,} tokens in {record['seconds']:.0f} s, "
              f"validation {record['val_bits_per_byte'][-1]:.3f} bits/byte", flush=True)
        trainer = None
    return out


def part_positions(s: dict, device: torch.device, corpus, results: dict) -> dict:
    """Loss per position of the models trained by ``curves``, on windows longer than their training context."""
    models = results.get("_trained")
    if not models:
        return {"skipped": "needs the curves part in the same call (it evaluates the models curves trained)"}
    length = s["positions_context"]
    windows = document_windows(corpus[1], length, s["positions_windows"])
    source = "validation documents at least as long as the window, from their first byte"
    if windows.shape[0] < 2:
        windows = evaluation_windows(corpus[1], length, s["positions_windows"])
        source = "consecutive windows of the validation stream (too few documents are this long)"
    out = {"context": length, "windows": int(windows.shape[0]), "source": source, "models": {}}
    for kind, model in models.items():
        try:
            result = evaluate(model, windows, batch_size=1)
            out["models"][kind] = {"bits_per_byte": result.bits_per_byte,
                                   "loss_per_position": [round(x, 5) for x in result.loss_per_position.tolist()]}
            print(f"  positions {kind:>9}: {result.bits_per_byte:.3f} bits/byte over {length:,} positions", flush=True)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            out["models"][kind] = {"error": "out of memory"}
        reset_peak()
    return out


def recall_batches(s: dict, offset: int):
    """Half MQAR, half passkey rows, a deterministic function of the first row (seeds from ``offset``)."""
    def batches(first: int, rows: int) -> ProbeBatch:
        a = mqar_batch(rows // 2, s["recall_context"], s["recall_pairs"], seed=offset + 2 * first)
        b = passkey_batch(rows - rows // 2, s["recall_context"], seed=offset + 2 * first + 1)
        return ProbeBatch(torch.cat([a.inputs, b.inputs]), torch.cat([a.targets, b.targets]))
    return batches


def part_recall(s: dict, device: torch.device, budget: Budget) -> dict:
    """Both models trained on MQAR + passkey for the same steps, then scored on unseen sequences."""
    seconds = budget.share("recall")
    train_batches = recall_batches(s, offset=0)

    def make(kind: str, steps: int) -> Trainer:
        config = TrainConfig(model=kind, preset=s["recall_preset"], overrides=s["recall_shape"],
                             context=s["recall_context"], batch_size=s["recall_batch"], lr=s["recall_lr"], steps=steps)
        return Trainer(config, device=device, batches=train_batches)

    plan = calibrated_steps(make, seconds - 25.0, evals=0)
    steps = plan["steps"]
    n = s["recall_eval"]
    mqar = mqar_batch(n, s["recall_context"], s["recall_pairs"], seed=10**9)
    passkey = passkey_batch(n, s["recall_context"], seed=10**9 + 1)
    longer = passkey_batch(max(4, n // 4), 4 * s["recall_context"], seed=10**9 + 2)
    digits = int((passkey.targets != IGNORE_INDEX).sum(1)[0])
    out = {"budget_seconds": seconds, "calibration": plan, "steps": steps, "context": s["recall_context"],
           "mqar_pairs": s["recall_pairs"], "eval_sequences": n, "batch_rows": s["recall_batch"],
           "train_mix": "each batch: half MQAR rows, half passkey rows; loss only on the answers",
           # What guessing scores: MQAR a value uniformly from the 128 value ids, or from the pairs in the
           # sequence (a model that has only learnt the format); passkey a digit, or the whole number.
           "chance": {"mqar_any_value": 1 / 128, "mqar_value_in_sequence": 1 / s["recall_pairs"],
                      "passkey_digit": 0.1, "passkey_number": 1 / (9 * 10 ** (digits - 1))},
           "models": {}}
    for kind in KINDS:
        trainer = make(kind, steps)
        losses = []
        began = time.perf_counter()
        trainer.run(steps, on_step=lambda r, losses=losses: losses.append(r.loss))
        record = {"seconds": time.perf_counter() - began, "final_train_loss": losses[-1],
                  "parameters": sum(p.numel() for p in trainer.model.parameters()),
                  "config": trainer.config.to_dict(),
                  "mqar_accuracy": probe_accuracy(trainer.model, mqar, batch_size=s["recall_batch"]),
                  "passkey_accuracy": probe_accuracy(trainer.model, passkey, batch_size=s["recall_batch"],
                                                     whole_rows=True),
                  "passkey_digit_accuracy": probe_accuracy(trainer.model, passkey, batch_size=s["recall_batch"])}
        try:
            record["passkey_accuracy_4x_context"] = probe_accuracy(trainer.model, longer, batch_size=1,
                                                                   whole_rows=True)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            record["passkey_accuracy_4x_context"] = None
        out["models"][kind] = record
        print(f"  recall {kind:>9}: MQAR {record['mqar_accuracy']:.3f}, passkey {record['passkey_accuracy']:.3f} "
              f"(digits {record['passkey_digit_accuracy']:.3f}; {steps} steps)", flush=True)
        trainer = None
        reset_peak()
    return out


def part_demo(s: dict, device: torch.device, corpus, budget: Budget, out_dir: Path) -> dict:
    """A small Megalodon trained on the standard library, saved (float32) for CPU demos."""
    seconds = budget.share("demo")

    def make(kind: str, steps: int) -> Trainer:
        config = TrainConfig(model="megalodon", preset=s["demo_preset"], overrides=s["demo_shape"],
                             context=s["demo_context"], batch_size=s["demo_batch"], steps=steps)
        return Trainer(config, device=device, corpus=corpus)

    trainer = make("megalodon", 10_000)
    for _ in range(2):
        trainer.train_step()
    sync()
    start = time.perf_counter()
    for _ in range(3):
        trainer.train_step()
    sync()
    steps = max(2, int(0.85 * (seconds - 20.0) / ((time.perf_counter() - start) / 3)))
    trainer = make("megalodon", steps)
    began = time.perf_counter()
    trainer.run(steps)
    result = trainer.evaluate(s["eval_windows"])
    folder = save_checkpoint(trainer.model, out_dir / "demo-checkpoint")
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"  demo: {steps} steps in {time.perf_counter() - began:.0f} s, validation {result.bits_per_byte:.3f} "
          f"bits/byte, checkpoint {size:,} bytes in {folder}", flush=True)
    return {"steps": steps, "config": trainer.config.to_dict(), "tokens": steps * trainer.tokens_per_step,
            "val_bits_per_byte": result.bits_per_byte, "checkpoint_bytes": size,
            "parameters": sum(p.numel() for p in trainer.model.parameters()), "folder": folder.name}


# --------------------------------------------------------------------------------------------- main

def header(args: argparse.Namespace, device: torch.device, corpus) -> dict:
    return results_header(
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        versions=("torch", "triton", "python"), argv=[__file__, *args.argv],
        megalodon_backend=os.environ.get("MEGALODON_BACKEND", "auto"),
        triton_ops_present=(ROOT / "megalodon_lite" / "ops").is_dir(), quick=args.quick, minutes=args.minutes,
        corpus={"name": corpus[0].name, "train_tokens": len(corpus[0]), "validation_tokens": len(corpus[1]),
                "train_files": len(corpus[0].documents), "validation_files": len(corpus[1].documents)})


def write_json(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=1) + "\n")
    os.replace(tmp, path)


def merge(paths: list[str], into: str) -> dict:
    """One results file from several calls: every part with the index of the call that measured it
    (``calls`` keeps each call's header: command, date, versions); a part measured twice keeps the later.
    A merged file may be merged again (to replace one part by a new call's)."""
    calls, parts = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "calls" in data:  # an earlier merge: its calls, and its parts with their own call indices
            offset = len(calls)
            calls += data["calls"]
            for name, value in data["parts"].items():
                parts[name] = {**value, "call": value["call"] + offset}
            continue
        calls.append(data["header"])
        for name, value in data["parts"].items():
            parts[name] = {**value, "call": len(calls) - 1}
    merged = {"header": {k: calls[-1][k] for k in ("device", "torch", "triton", "python", "corpus")},
              "calls": calls, "parts": parts}
    Path(into).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(into), merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv is None and "--merge" in sys.argv[1:2] or argv is not None and argv[:1] == ["--merge"]:
        args = (argv if argv is not None else sys.argv[1:])[1:]
        if len(args) < 3 or "--into" not in args[-2:-1]:
            parser.error("usage: train_compare.py --merge RESULTS.json [RESULTS.json ...] --into MERGED.json")
        merged = merge(args[:-2], args[-1])
        print(f"merged {len(args) - 2} file(s), parts {sorted(merged['parts'])}, into {args[-1]}")
        return 0
    parser.add_argument("--out", required=True, help="folder for train_compare.json and demo-checkpoint/")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this call")
    parser.add_argument("--quick", action="store_true", help="toy sizes, any device: checks the script end to end")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; expected some of {PARTS}")
    parts = [p for p in PARTS if p in parts]  # run in the fixed order
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.quick:
        parser.error("the full-size comparison needs a CUDA GPU; use --quick to check the script on a CPU")
    if device.type == "cpu":
        torch.set_num_threads(1)  # toy sizes: a second thread only waits, and on a busy machine thrashes
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast
    s = sizes(args.quick)
    budget = Budget(args.minutes, parts)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    results = {"header": header(args, device, corpus), "sizes": {k: v for k, v in s.items()}, "parts": {}}
    path = out_dir / "train_compare.json"
    print(f"{results['header']['device']}, torch {torch.__version__}; parts {parts}; budget {args.minutes} min; "
          f"corpus {corpus[0].name}: {len(corpus[0]):,} training tokens", flush=True)
    for part in parts:
        began = time.perf_counter()
        print(f"[{part}] {budget.left():.0f} s left", flush=True)
        try:
            if part == "throughput":
                value = part_throughput(s, device, corpus, budget)
            elif part == "throughput-compiled":
                value = part_throughput_compiled(s, device, corpus, budget)
            elif part == "decode":
                value = part_decode(s, device)
            elif part == "curves":
                value = part_curves(s, device, corpus, budget, results)
            elif part == "positions":
                value = part_positions(s, device, corpus, results)
            elif part == "recall":
                value = part_recall(s, device, budget)
            else:
                value = part_demo(s, device, corpus, budget, out_dir)
        except Exception as err:  # record and go on: the other parts are still worth having
            traceback.print_exc()
            value = {"error": f"{type(err).__name__}: {err}"}
        value["wall_seconds"] = time.perf_counter() - began
        value["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results["parts"][part] = value
        write_json(path, results)
        reset_peak()
    print(f"wrote {path} ({time.perf_counter() - budget.start:.0f} s)")
    return 1 if any("error" in v for v in results["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
