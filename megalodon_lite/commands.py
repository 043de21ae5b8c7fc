"""The ``train``, ``sample`` and ``eval`` subcommands of ``megalodon-lite`` (hand-written glue).

Arguments, progress bar, messages and exit codes live here; the work is done by
:mod:`megalodon_lite.train` (chapter 10). Exit codes: 0 done, 1 an error explained in one line
(missing data, damaged checkpoint, out of memory, ...), 2 bad arguments, 130 interrupted by Ctrl-C
after saving a checkpoint.

``megalodon-lite train`` with no arguments trains the ``tiny`` Megalodon preset on the Python
standard library for a few minutes on a laptop CPU, then prints a sample. Under ``torchrun`` it trains
over all the processes (:mod:`megalodon_lite.parallel_train`): ``--sequence-parallel N`` splits each
sequence over N of them (chapter 11), the rest read different rows (data parallelism).
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_RUNS = Path("runs")
LOG_FILE = "log.jsonl"

# The no-argument run: the tiny preset for about three minutes on a 2-core CPU (README).
TRAIN_DEFAULTS = {"model": "megalodon", "preset": "tiny", "context": 512, "batch_size": 8, "accumulate": 1,
                  "steps": 1200, "lr": 1e-3, "warmup": None, "weight_decay": 0.1, "clip": 1.0, "seed": 0,
                  "data": None, "val_percent": 5}
# TrainConfig field -> the option that sets it
OPTION_OF = {name: "--" + name.replace("_", "-") for name in TRAIN_DEFAULTS}


class CommandError(Exception):
    """A problem to report in one line, with an exit code. Under torchrun only global rank 0 reports
    one that every rank meets alike (bad options, data, checkpoint); a ``rank_specific`` one (out of
    memory) is reported by the rank that met it."""

    def __init__(self, message: str, code: int = EXIT_ERROR, rank_specific: bool = False) -> None:
        super().__init__(message)
        self.code, self.rank_specific = code, rank_specific


def _int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{what}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device: not a device name: {text!r} (expected e.g. cpu, cuda, cuda:1)",
                           EXIT_USAGE) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA GPU is available here (use --device cpu)", EXIT_USAGE)
    return device


def _set_cpu_threads(model: torch.nn.Module, device: torch.device, threads: int | None) -> str:
    """On the CPU: ``threads``, or 1 for a model under 5M parameters (its matrices are too small to share
    out, and on a busy machine threads that wait for each other make every call slower). Returns a note."""
    if device.type != "cpu":
        return ""
    if threads is None and sum(p.numel() for p in model.parameters()) < 5_000_000:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    count = torch.get_num_threads()
    return f" ({count} thread{'s' if count > 1 else ''})"


def _fail(command: str, err: BaseException, code: int = EXIT_ERROR) -> int:
    print(f"megalodon-lite {command}: error: {err}", file=sys.stderr)
    return code


def _out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _memory_message(what: str, device: torch.device) -> str:
    return (f"out of memory on {device}: {what} does not fit. Try a smaller --batch-size (with --accumulate to keep "
            "the tokens per step), a shorter --context, or --activation-checkpointing")


# --------------------------------------------------------------------------------------------- train

def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train a byte-level language model (Megalodon, or the matched Llama-style baseline). "
                          "With no arguments: the tiny Megalodon preset on the Python standard library, a few "
                          "minutes on a laptop CPU, then a sample.")
    model = parser.add_argument_group("model and data (recorded in the checkpoint; a resumed run keeps them)")
    model.add_argument("--model", choices=("megalodon", "llama"), help="model kind [megalodon]")
    model.add_argument("--preset", help="a preset of megalodon_lite.config.PRESETS; llama: the baseline matched "
                                        "to it in parameters [tiny]")
    model.add_argument("--context", type=_int_at_least(2, " tokens (an input and its target)"),
                       help="tokens per training window [512]")
    model.add_argument("--data", help="a text file or a folder of text files [the standard library's .py sources]")
    model.add_argument("--val-percent", type=_int_at_least(1), help="share of the files held out for validation [5]")
    model.add_argument("--seed", type=int, help="initialisation and data order [0]")
    optim = parser.add_argument_group("optimization (official recipe scaled down; recorded in the checkpoint)")
    optim.add_argument("--batch-size", type=_int_at_least(1), help="windows per micro-batch [8]")
    optim.add_argument("--accumulate", type=_int_at_least(1), help="micro-batches per optimizer step [1]")
    optim.add_argument("--steps", type=_int_at_least(1), help="optimizer steps of the whole run [1200]")
    optim.add_argument("--lr", type=_positive_float, help="peak learning rate [1e-3]")
    optim.add_argument("--warmup", type=_int_at_least(0), help="warmup steps [5%% of --steps]")
    optim.add_argument("--weight-decay", type=_fraction, help="AdamW weight decay, on every parameter [0.1]")
    optim.add_argument("--clip", type=_positive_float, help="maximum gradient norm [1.0]")
    run = parser.add_argument_group("this run")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--out", help="folder for the checkpoint and log.jsonl (must not hold a checkpoint) "
                                     "[runs/<model>-<preset>, numbered if taken]")
    where.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR, bit-exactly, writing there")
    run.add_argument("--stop-after", type=_int_at_least(1), metavar="N",
                     help="stop after N steps of this run and save (the schedule still plans for --steps)")
    run.add_argument("--eval-every", type=_int_at_least(0), default=200,
                     help="steps between evaluations and checkpoints; 0: only at the end [200]")
    run.add_argument("--eval-windows", type=_int_at_least(1), default=32, help="validation windows per evaluation [32]")
    run.add_argument("--log-every", type=_int_at_least(1), default=10, help="steps between training records in the log [10]")
    run.add_argument("--activation-checkpointing", action="store_true",
                     help="recompute activations in the backward pass (less memory, more time)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="run the training forward and loss through torch.compile (a slow first step, faster "
                          "later ones; recorded in the checkpoint, and a resumed run may switch it) "
                          "[off; a resumed run: as saved]")
    run.add_argument("--device", help="cpu, cuda, cuda:1, ... [cuda if available]")
    run.add_argument("--threads", type=_int_at_least(1), help="CPU threads [1 for models under 5M parameters, "
                                                               "else PyTorch's default]")
    run.add_argument("--sample-tokens", type=_int_at_least(0), default=300, help="bytes to sample at the end [300]")
    parallel = parser.add_argument_group(
        "several processes (launch with torchrun --standalone --nproc-per-node P -m megalodon_lite train ...)",
        "Each sequence is split over --sequence-parallel N processes (Megalodon only, chapter 11); the P / N "
        "groups of them read different rows (data parallelism), --batch-size rows each. The losses equal one "
        "process's with a batch P / N times larger, to float rounding.")
    parallel.add_argument("--sequence-parallel", type=_int_at_least(1), default=1, metavar="N",
                          help="processes that share each sequence, each holding a run of whole chunks [1]")
    parallel.add_argument("--sequence-parallel-scheme", choices=("chain", "allgather"), default="allgather",
                          help="how the boundary states cross: rank to rank, or one all-gather per layer [allgather]")


def _free_run_folder(model: str, preset: str) -> Path:
    base = DEFAULT_RUNS / f"{model}-{preset}"
    folder, n = base, 1
    while (folder / "config.json").exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def _explicit_settings(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in TRAIN_DEFAULTS if getattr(args, name) is not None}


def _resumed_config(folder: Path, explicit: dict):
    """The TrainConfig saved in ``folder``, after checking no explicit option contradicts it."""
    from megalodon_lite.checkpoint import read_manifest
    from megalodon_lite.train import TrainConfig

    manifest = read_manifest(folder)
    if "training" not in manifest:
        raise CommandError(f"--resume {folder}: it holds a model but no training state (not saved by `train`)")
    try:
        saved = TrainConfig.from_dict(manifest["training"]["state"]["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CommandError(f"--resume {folder}: bad training config in config.json: {err}") from None
    changed = [name for name, value in explicit.items() if getattr(saved, name) != value]
    if changed:
        asked = ", ".join(f"{OPTION_OF[n]} {explicit[n]} (the run used {getattr(saved, n)})" for n in changed)
        what = "a different model" if {"model", "preset"} & set(changed) else "different settings"
        raise CommandError(f"--resume {folder}: resuming with {what}: {asked}. Leave these options out to continue "
                           "the run as it was, or start a new run with --out")
    return saved


class _Log:
    """log.jsonl of a run: one JSON record per line. A resumed run first drops the records written
    after its checkpoint (by the part of the run that was lost)."""

    def __init__(self, path: Path, resumed_step: int | None) -> None:
        self.path, self.resumed_step = path, resumed_step

    @staticmethod
    def _step(line: str) -> int | None:
        """The step of a record, None for a line that is not one (e.g. cut short by a crash)."""
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    def write(self, record: dict) -> None:
        if self.resumed_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if self._step(line) is not None and self._step(line) <= self.resumed_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self.resumed_step = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def run_train(args: argparse.Namespace) -> int:
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit without saving)",
                  file=sys.stderr, flush=True)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    job = None
    try:
        job = _join(args)
        return _train(args, stop, job)
    except CommandError as err:
        rank = os.environ.get("RANK")
        if rank is not None and err.rank_specific:
            return _fail("train", CommandError(f"rank {rank}: {err}"), err.code)
        if rank not in (None, "0"):
            return err.code  # every rank met the same problem: rank 0 says it
        return _fail("train", err, err.code)
    except KeyboardInterrupt:
        print("interrupted twice: stopped without saving (the last checkpoint, if any, is intact)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if job is not None:
            job.close()


def _train_config(args: argparse.Namespace):
    """The run's TrainConfig (new, or saved in --resume's folder) and its folder."""
    from megalodon_lite.checkpoint import CheckpointError
    from megalodon_lite.train import TrainConfig

    explicit = _explicit_settings(args)
    if args.resume is not None:
        folder = Path(args.resume)
        try:
            return _resumed_config(folder, explicit), folder
        except CheckpointError as err:
            raise CommandError(f"--resume {folder}: {err}") from None
    try:
        config = TrainConfig(**{**TRAIN_DEFAULTS, **explicit}, compile=bool(args.compile))
    except ValueError as err:
        raise CommandError(str(err), EXIT_USAGE) from None
    folder = Path(args.out) if args.out is not None else _free_run_folder(config.model, config.preset)
    if (folder / "config.json").exists():
        raise CommandError(f"--out {folder} already holds a checkpoint: continue it with --resume {folder}, "
                           "or choose another --out")
    return config, folder


def _join(args: argparse.Namespace):
    """Join the torchrun job this process belongs to (None for a lone process), after checking that
    --sequence-parallel fits the model, the context and the number of processes."""
    from megalodon_lite.parallel import ChunkParallelError, split_sequence
    from megalodon_lite.parallel_train import join_job
    from megalodon_lite.train import model_config

    n = args.sequence_parallel
    world = os.environ.get("WORLD_SIZE")
    if n == 1 and world in (None, "1"):
        return None
    config, _ = _train_config(args)
    if n > 1:
        if config.model != "megalodon":
            raise CommandError(f"--sequence-parallel {n}: chunk parallelism splits a Megalodon sequence at its "
                               "attention chunks; the Llama-style baseline attends over the whole context and cannot "
                               "be split (use --sequence-parallel 1: torchrun's processes then train data-parallel)",
                               EXIT_USAGE)
        chunk = model_config(config).chunk_size
        try:
            split_sequence(config.context, n, chunk)
        except ValueError as err:
            raise CommandError(f"--context {config.context} with --sequence-parallel {n}: {err}; use a context of "
                               f"at least {(n - 1) * chunk + 1} tokens or fewer processes per sequence",
                               EXIT_USAGE) from None
        if args.activation_checkpointing:
            raise CommandError(f"--activation-checkpointing with --sequence-parallel {n}: a block recomputed in the "
                               "backward pass would miss the other ranks' boundary states; use one or the other",
                               EXIT_USAGE)
        if world is None:
            raise CommandError(f"--sequence-parallel {n} splits each sequence over {n} processes, which torchrun "
                               f"starts: torchrun --standalone --nproc-per-node {n} -m megalodon_lite train "
                               f"--sequence-parallel {n} ...", EXIT_USAGE)
    if int(world) % n:
        raise CommandError(f"--sequence-parallel {n} must divide the number of processes torchrun started ({world}): "
                           f"use --nproc-per-node {n}, or a multiple of {n} to train data-parallel over the rest",
                           EXIT_USAGE)
    if args.device not in (None, "cpu", "cuda"):
        raise CommandError(f"--device {args.device}: under torchrun each process takes GPU LOCAL_RANK; give "
                           "--device cuda or --device cpu", EXIT_USAGE)
    try:
        return join_job(n, device_type=_device(args.device).type)
    except (ChunkParallelError, ValueError) as err:
        raise CommandError(str(err)) from None


def _split(sequence_parallel: int, scheme: str | None) -> str:
    return f"each sequence split over {sequence_parallel} ({scheme})" if sequence_parallel > 1 else "whole sequences"


def _build_trainer(args: argparse.Namespace, config, folder: Path, device: torch.device, job, say: Callable):
    """A new trainer, or the one saved in --resume's folder; for this rank of the job if there is one."""
    from megalodon_lite.checkpoint import CheckpointError, read_manifest
    from megalodon_lite.data import DataError
    from megalodon_lite.parallel_train import ChunkParallelTrainer, check_data_parallel, saved_layout
    from megalodon_lite.train import CompileError, Trainer

    kwargs = {"device": device, "activation_checkpointing": args.activation_checkpointing}
    trainer_class = Trainer
    if job is not None:
        trainer_class = ChunkParallelTrainer
        kwargs.update(groups=job.groups, scheme=args.sequence_parallel_scheme)
    try:
        if args.resume is None:
            return trainer_class(config, **kwargs)
        state = read_manifest(folder)["training"]["state"]
        if job is None:
            check_data_parallel(state, 1, folder)
        saved = saved_layout(state)
        before = _split(saved["sequence_parallel"], saved["scheme"])
        now = _split(args.sequence_parallel, args.sequence_parallel_scheme)
        if before != now:
            say(f"note: {folder} was trained on {before}, this run on {now}: it adds its sums in another order, "
                "so it continues the run to float rounding, not bit for bit")
        if args.compile is not None and args.compile != config.compile:
            say(f"note: {folder} was trained {'with' if config.compile else 'without'} --compile, this run "
                f"{'with' if args.compile else 'without'}: a compiled step adds its sums in another order, so it "
                "continues the run to float rounding, not bit for bit")
        return trainer_class.resume(folder, compile=args.compile, **kwargs)
    except (DataError, CheckpointError, CompileError) as err:
        raise CommandError(str(err)) from None


def _train(args: argparse.Namespace, stop: dict, job) -> int:
    from megalodon_lite.train import CompileError

    device = _device(args.device) if job is None else job.device
    main = job is None or job.is_main
    say = print if main else (lambda *a, **k: None)
    config, folder = _train_config(args)
    trainer = _build_trainer(args, config, folder, device, job, say)
    if stop["asked"] if job is None else job.any(stop["asked"]):
        say("interrupted before training started: nothing saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    until = config.steps if args.stop_after is None else min(config.steps, trainer.step + args.stop_after)
    if trainer.step >= until:
        say(f"{folder} is already at step {trainer.step} of {config.steps}: nothing to do")
        return EXIT_OK
    parameters = sum(p.numel() for p in trainer.model.parameters())
    where = f"{device}{_set_cpu_threads(trainer.model, device, args.threads)}"
    if job is not None:
        data = job.groups.data_size
        each = "one GPU each, cuda:LOCAL_RANK" if device.type == "cuda" else f"{where} each"
        where = (f"{job.world_size} processes ({each}): "
                 f"{_split(job.groups.sequence_size, args.sequence_parallel_scheme)}, {data} data-parallel "
                 f"rank{'s' if data > 1 else ''}")
    say(f"{'resuming' if args.resume else 'training'} {config.model} ({config.preset} preset, {parameters:,} "
        f"parameters) on {trainer.train_corpus.name}: {len(trainer.train_corpus):,} training and "
        f"{len(trainer.val_corpus):,} validation tokens")
    rows = "" if job is None or job.groups.data_size == 1 else f" x {job.groups.data_size} data ranks"
    say(f"steps {trainer.step + 1}-{until} of {config.steps}, {trainer.tokens_per_step:,} tokens per step "
        f"(batch {config.batch_size} x {config.accumulate}{rows} x context {config.context}) on {where}; "
        f"checkpoint and log in {folder}", flush=True)
    first_step, began = trainer.step, time.perf_counter()
    should_stop = (lambda: stop["asked"]) if job is None else (lambda: job.any(stop["asked"]))
    if trainer.config.compile:
        say("compiling the training step with torch.compile: the first step takes longer", flush=True)
    try:
        finished = _train_loop(trainer, args, folder, until, should_stop, main)
    except CompileError as err:
        raise CommandError(f"{err} (nothing was saved at this step)") from None
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        what = f"a step of batch {config.batch_size} x context {config.context}"
        raise CommandError(_memory_message(what, device) + " (nothing was saved at this step)",
                           rank_specific=True) from None
    if not finished:
        trainer.save(folder)
        say(f"saved {folder} at step {trainer.step}; continue with: megalodon-lite train --resume {folder}",
            file=sys.stderr)
        return EXIT_INTERRUPTED
    say(f"trained steps {first_step + 1}-{trainer.step} in {(time.perf_counter() - began) / 60:.1f} min; "
        f"checkpoint: {folder}")
    if trainer.step < config.steps:
        say(f"stopped at step {trainer.step} of {config.steps} (--stop-after); continue with: "
            f"megalodon-lite train --resume {folder}")
    if args.sample_tokens and main:
        print(f"\na sample ({args.sample_tokens} bytes, temperature 0.8, top-k 40, from the start of a file):\n")
        _print_sample(trainer.model, "", args.sample_tokens, 0.8, 40, seed=0)
        print(f"\n\nmore: megalodon-lite sample {folder} --prompt 'def '")
    return EXIT_OK


def _train_loop(trainer, args: argparse.Namespace, folder: Path, until: int, should_stop: Callable[[], bool],
                main: bool) -> bool:
    """Train up to ``until``; only ``main`` (global rank 0) shows the bar and writes the log."""
    from tqdm.auto import tqdm

    log = _Log(folder / LOG_FILE, trainer.step if args.resume else None)
    config, start = trainer.config, time.perf_counter()
    stats = {"loss_sum": 0.0, "count": 0, "smooth": None, "tokens_per_s": None}
    bar = tqdm(total=config.steps, initial=trainer.step, unit="step", dynamic_ncols=True, leave=False,
               disable=None if main else True)  # no bar when stderr is not a terminal (logs, pipes)

    def on_step(result) -> None:
        rate = trainer.tokens_per_step / result.seconds
        stats["tokens_per_s"] = rate if stats["tokens_per_s"] is None else 0.9 * stats["tokens_per_s"] + 0.1 * rate
        stats["smooth"] = result.loss if stats["smooth"] is None else 0.95 * stats["smooth"] + 0.05 * result.loss
        stats["loss_sum"] += result.loss
        stats["count"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats['smooth']:.3f}", tok_s=f"{stats['tokens_per_s']:,.0f}")
        if main and trainer.step % args.log_every == 0:
            log.write({"event": "train", "step": trainer.step, "loss": result.loss, "lr": result.lr,
                       "grad_norm": result.grad_norm, "tokens_per_s": rate})

    def on_eval(result) -> None:
        train_loss = stats["loss_sum"] / max(stats["count"], 1)
        stats["loss_sum"], stats["count"] = 0.0, 0
        if main:
            log.write({"event": "eval", "step": trainer.step, "tokens": trainer.step * trainer.tokens_per_step,
                       "train_loss": train_loss, "val_loss": result.loss, "val_bits_per_byte": result.bits_per_byte,
                       "tokens_per_s": stats["tokens_per_s"], "elapsed_s": time.perf_counter() - start})
            bar.write(f"step {trainer.step:>6}: validation {result.bits_per_byte:.3f} bits/byte "
                      f"(loss {result.loss:.3f}); training loss {train_loss:.3f}; "
                      f"{stats['tokens_per_s']:,.0f} tokens/s")
        trainer.save(folder)  # collective under torchrun: rank 0 writes, every rank returns once it is committed

    try:
        return trainer.run(until, eval_every=args.eval_every, eval_windows=args.eval_windows, on_step=on_step,
                           on_eval=on_eval, should_stop=should_stop)
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------- sample

def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder (written by `train` or save_checkpoint)")
    parser.add_argument("--prompt", default="", help="text to continue (empty: the start of a new file)")
    parser.add_argument("--tokens", type=_int_at_least(1), default=300, help="bytes to generate [300]")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 picks the most likely byte [0.8]")
    parser.add_argument("--top-k", type=_int_at_least(1), default=40, help="sample among the k most likely bytes [40]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling [0]")
    parser.add_argument("--device", help="cpu, cuda, ... [cuda if available]")
    parser.add_argument("--threads", type=_int_at_least(1), help="CPU threads [1 for models under 5M parameters]")
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                        help="on CUDA, launch each decoding step's kernels one by one instead of replaying a "
                             "CUDA graph (slower; no effect on a CPU)")


def _print_sample(model, prompt: str, tokens: int, temperature: float, top_k: int | None, seed: int,
                  cuda_graph: bool = True) -> None:
    from megalodon_lite.data import EOD, encode
    from megalodon_lite.train import stream_generate

    device = next(model.parameters()).device
    ids = encode(prompt) if prompt else torch.tensor([EOD])
    generator = torch.Generator(device=device).manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(prompt)
    on_cuda_graphs = None if cuda_graph else False  # None: graphs where the model is on CUDA
    for token in stream_generate(model, ids, tokens, temperature=temperature, top_k=top_k, generator=generator,
                                 cuda_graph=on_cuda_graphs):
        sys.stdout.write(decoder.decode(b"", final=True) + "\n<|eod|>\n" if token == EOD else decoder.decode(bytes([token])))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True))
    sys.stdout.flush()


def _load_model(command: str, folder: str, device: torch.device):
    from megalodon_lite.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(folder, device=device).float().eval()
    except CheckpointError as err:
        raise CommandError(str(err)) from None


def run_sample(args: argparse.Namespace) -> int:
    try:
        if args.temperature < 0 or not math.isfinite(args.temperature):
            raise CommandError(f"--temperature must be a number >= 0, got {args.temperature}", EXIT_USAGE)
        device = _device(args.device)
        model = _load_model("sample", args.checkpoint, device)
        _set_cpu_threads(model, device, args.threads)
        if args.top_k > model.config.vocab_size:
            raise CommandError(f"--top-k must be at most the vocabulary size {model.config.vocab_size}", EXIT_USAGE)
        _print_sample(model, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, args.cuda_graph)
        print()
        return EXIT_OK
    except CommandError as err:
        return _fail("sample", err, err.code)


# --------------------------------------------------------------------------------------------- eval

def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder")
    parser.add_argument("--data", help="text file or folder [the data the checkpoint was trained on, else the "
                                       "standard library]")
    parser.add_argument("--context", type=_int_at_least(2), help="window length [the training context, else 1024]")
    parser.add_argument("--windows", type=_int_at_least(1), default=64, help="validation windows [64]")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=8, help="windows per forward pass [8]")
    parser.add_argument("--device", help="cpu, cuda, ... [cuda if available]")
    parser.add_argument("--threads", type=_int_at_least(1), help="CPU threads [1 for models under 5M parameters]")
    parser.add_argument("--json", metavar="PATH", help="also write the results, loss per position included, here")


def run_eval(args: argparse.Namespace) -> int:
    try:
        return _eval(args)
    except CommandError as err:
        return _fail("eval", err, err.code)


def _eval(args: argparse.Namespace) -> int:
    from megalodon_lite.checkpoint import CheckpointError, read_manifest
    from megalodon_lite.data import DataError, evaluation_windows, load_corpus
    from megalodon_lite.train import evaluate

    device = _device(args.device)
    try:
        manifest = read_manifest(args.checkpoint)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    trained = manifest.get("training", {}).get("state", {}).get("config", {})
    data = args.data if args.data is not None else trained.get("data")
    context = args.context or trained.get("context", 1024)
    model = _load_model("eval", args.checkpoint, device)
    _set_cpu_threads(model, device, args.threads)
    try:
        _, validation = load_corpus(data, trained.get("val_percent", 5))
        windows = evaluation_windows(validation, context, args.windows)
        result = evaluate(model, windows, batch_size=args.batch_size)
    except DataError as err:
        raise CommandError(str(err)) from None
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        raise CommandError(_memory_message(f"a batch of {args.batch_size} x {context} tokens", device)) from None
    print(f"{manifest['model']} checkpoint {args.checkpoint} on the validation text of {validation.name}: "
          f"{windows.shape[0]} windows of {context:,} tokens")
    print(f"loss {result.loss:.4f} nats per byte, {result.bits_per_byte:.4f} bits per byte")
    print("loss by position (bits per byte, mean over the windows):")
    position = result.loss_per_position / math.log(2)
    lo = 0
    while lo < len(position):
        hi = min(len(position), 2 * lo + 1)
        print(f"  after {lo + 1:>7,} to {hi:>7,} bytes of context: {float(position[lo:hi].mean()):.3f}")
        lo = hi
    if args.json:
        Path(args.json).write_text(json.dumps({
            "checkpoint": str(args.checkpoint), "model": manifest["model"], "data": validation.name,
            "context": context, "windows": windows.shape[0], "loss": result.loss,
            "bits_per_byte": result.bits_per_byte, "loss_per_position": result.loss_per_position.tolist()}) + "\n")
    return EXIT_OK
