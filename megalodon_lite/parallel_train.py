"""Training over several processes (hand-written glue): chapter 10's :class:`~megalodon_lite.train.Trainer`
with chapter 11's chunk parallelism, for ``megalodon-lite train --sequence-parallel N`` under ``torchrun``.

A job of W processes is a data x sequence grid (:func:`~megalodon_lite.parallel.init_chunk_parallel`):
each of the W / N *sequence groups* reads its own rows, and its N ranks each hold one segment of
those rows (whole chunks; the last may end inside one). Step ``s`` of a job with D = W / N data
ranks reads windows ``s * D * R .. (s + 1) * D * R - 1`` of the one seeded window order
(R = batch_size x accumulate), data rank ``d`` the d-th run of R of them: the job trains on the
same windows, in the same order, as one process with a batch D times larger.

Every rank's loss is its share of the mean over *all* ranks' tokens
(:func:`~megalodon_lite.parallel.chunk_parallel_cross_entropy` over the whole job), so one
all-reduce (:func:`~megalodon_lite.parallel.sum_gradients`) per optimizer step, after gradient
accumulation, sums the segments' parts and averages the rows' in one go: the gradient of the
job's mean loss, identical on every rank. (``DistributedDataParallel`` over the data group, as in
chapter 11 §8, computes the same with one all-reduce per micro-batch.)

Use (the ``train`` command does this; run under ``torchrun``)::

    job = join_job(sequence_parallel=2)
    trainer = ChunkParallelTrainer(config, groups=job.groups, scheme="allgather", device=job.device)
    trainer.run(config.steps, eval_every=200, on_eval=lambda result: trainer.save("runs/x"))
    job.close()
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_lite.checkpoint import CheckpointError, load_training_state, read_manifest, save_checkpoint
from megalodon_lite.data import DataError, ProbeBatch
from megalodon_lite.parallel import (SCHEMES, ChunkParallelLM, ParallelGroups, chunk_parallel_cross_entropy,
                                     init_chunk_parallel, segment_slice, sum_gradients)
from megalodon_lite.train import (EvalResult, Trainer, TrainConfig, autocast_for, model_config, rng_state,
                                  set_rng_state, training_state)


@dataclass(frozen=True)
class Job:
    """This process's place in a job started by ``torchrun``: its groups, global rank and device."""

    groups: ParallelGroups
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that prints, logs and writes checkpoints."""
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (an all-reduce: every rank must call it)."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def join_job(sequence_parallel: int, *, device_type: str = "cuda" if torch.cuda.is_available() else "cpu",
             timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> Job:
    """Join the job ``torchrun`` started (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* variables).

    device_type "cuda": NCCL, and this process uses GPU LOCAL_RANK; "cpu": gloo. Every process group
    gets ``timeout``. Raises ValueError when ``sequence_parallel`` does not divide the world size.
    """
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    on_gpu = device_type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    groups = init_chunk_parallel(sequence_parallel, timeout=timeout, backend="nccl" if on_gpu else "gloo")
    return Job(groups, dist.get_rank(), dist.get_world_size(), device)


def saved_layout(state: dict) -> dict[str, Any]:
    """The process layout a training state was saved with (a single process when it records none)."""
    return state.get("parallel") or {"sequence_parallel": 1, "data_parallel": 1, "scheme": None}


def check_data_parallel(state: dict, data_parallel: int, where: str | Path) -> None:
    """CheckpointError unless the run saved in ``state`` read its rows over ``data_parallel`` data ranks
    (another count would change the batch of every step)."""
    saved = saved_layout(state)["data_parallel"]
    if saved != data_parallel:
        raise CheckpointError(
            f"{where} was trained with {saved} data-parallel rank(s) (processes / sequence parallel), this job has "
            f"{data_parallel}: the rows of every step would change. Launch it as it was launched")


class ChunkParallelTrainer(Trainer):
    """A :class:`~megalodon_lite.train.Trainer` for one rank of a data x sequence job.

    Every rank of the job constructs one, with the same ``config``; ``groups`` from
    :func:`join_job` (or :func:`~megalodon_lite.parallel.init_chunk_parallel`). With
    ``groups.sequence_size`` > 1 the model (Megalodon only) is wrapped in a
    :class:`~megalodon_lite.parallel.ChunkParallelLM` and this rank reads
    ``segment_slice(config.context, ...)`` of its rows; ``evaluate``, ``save`` and ``should_stop``-style
    agreement are collective (every rank calls them), and only global rank 0 writes a checkpoint.
    Other keyword arguments as for :class:`~megalodon_lite.train.Trainer` (no ``batches``,
    ``loss_fn`` or ``reduce_gradients``: this class provides them).
    """

    def __init__(self, config: TrainConfig, *, groups: ParallelGroups, scheme: str = "allgather",
                 **kwargs: Any) -> None:
        if not isinstance(groups, ParallelGroups):
            raise TypeError(f"groups must be a ParallelGroups (from join_job), got {type(groups).__name__}")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        taken = sorted(name for name in ("batches", "loss_fn", "reduce_gradients") if kwargs.get(name) is not None)
        if taken:
            raise ValueError(f"ChunkParallelTrainer provides {', '.join(taken)} itself: leave them out")
        split = groups.sequence_size > 1
        if split and config.model != "megalodon":
            raise ValueError(f"only a Megalodon model can be split over the sequence (got model={config.model!r})")
        if split and kwargs.get("activation_checkpointing"):
            raise ValueError("activation checkpointing recomputes blocks outside the chunk-parallel forward, without "
                             "the other ranks' boundary states: it cannot be combined with sequence parallelism")
        self.groups, self.scheme = groups, scheme
        self.segment = (segment_slice(config.context, groups.sequence_rank, groups.sequence_size,
                                      model_config(config).chunk_size) if split else slice(0, config.context))
        super().__init__(config, loss_fn=self._segment_loss, reduce_gradients=self._sum_gradients, **kwargs)
        if self.sampler.num_windows < self.rows_per_step * groups.data_size:
            raise DataError(f"the training text holds {self.sampler.num_windows:,} windows of {config.context + 1:,} "
                            f"tokens; one step needs batch_size x accumulate x data ranks = "
                            f"{self.rows_per_step * groups.data_size:,}")
        self.world = dist.group.WORLD
        with torch.no_grad():  # one model everywhere: global rank 0's (sequence groups also do it per group)
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(tensor, src=0)
        self.lm = ChunkParallelLM(self.model, groups.sequence, scheme) if split else None

    def logits(self, tokens: Tensor) -> Tensor:
        """(R, L_r) tokens of this rank's segment -> (R, L_r, V) float32 logits."""
        return self.lm(tokens) if self.lm is not None else self.model(tokens)[0]

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step of the whole job."""
        return self.rows_per_step * self.groups.data_size * self.config.context

    def global_batch(self, step: int) -> ProbeBatch:
        """This rank's part of optimizer step ``step``: its data rank's rows, its segment of each:
        inputs and targets (R, L_r), on the CPU."""
        first = (step * self.groups.data_size + self.groups.data_rank) * self.rows_per_step
        windows = self.sampler.batch(first, self.rows_per_step)[:, self.segment.start:self.segment.stop + 1]
        return ProbeBatch(windows[:, :-1], windows[:, 1:])

    def _segment_loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """The job's mean token loss as its value; the gradient of this rank's share of it."""
        share, mean_loss = chunk_parallel_cross_entropy(self.logits(inputs), targets, self.world)
        return share - share.detach() + mean_loss  # value exactly mean_loss: 0 + mean_loss rounds to itself

    def _sum_gradients(self, model: nn.Module) -> None:
        sum_gradients(model, self.world)

    @torch.no_grad()
    def evaluate(self, max_windows: int = 16) -> EvalResult:
        """Loss on the first ``max_windows`` validation windows, as :func:`~megalodon_lite.train.evaluate`
        computes it on one process: each data rank takes every D-th window, each sequence rank its segment,
        and one all-reduce adds the per-position sums. Every rank must call it."""
        if self.val_corpus is None:
            raise ValueError("this trainer has no validation text")
        windows = self.validation_windows(max_windows)
        rows = windows[self.groups.data_rank::self.groups.data_size, self.segment.start:self.segment.stop + 1]
        per_position = torch.zeros(windows.shape[1] - 1, dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for lo in range(0, rows.shape[0], self.config.batch_size):
                part = rows[lo:lo + self.config.batch_size].to(self.device)
                with autocast_for(self.device):
                    logits = self.logits(part[:, :-1])
                losses = F.cross_entropy(logits.transpose(1, 2), part[:, 1:], reduction="none")  # (b, L_r)
                per_position[self.segment] += losses.double().sum(0)
        finally:
            self.model.train(was_training)
        dist.all_reduce(per_position, group=self.world)
        per_position = (per_position / windows.shape[0]).cpu()
        loss = float(per_position.mean())
        return EvalResult(loss, loss / math.log(2), per_position, per_position.numel() * windows.shape[0])

    def save(self, directory: str | Path) -> Path:
        """Write the checkpoint from global rank 0, atomically, with every rank's RNG state; every rank
        returns once it is committed (or raises if rank 0 could not write it)."""
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
        failure: BaseException | None = None
        outcome: list[str | None] = [None]
        if dist.get_rank() == 0:
            try:
                state, tensors = training_state(self)
                state["windows_consumed"] = self.step * self.rows_per_step * self.groups.data_size
                state["parallel"] = {"sequence_parallel": self.groups.sequence_size,
                                     "data_parallel": self.groups.data_size, "scheme": self.scheme,
                                     "rng": {str(rank): states[rank][0] for rank in range(1, len(states))}}
                for rank in range(1, len(states)):  # rank 0's is the trainer's own "rng" entry
                    tensors.update({f"rng/rank{rank}/{name[len('rng/'):]}": t for name, t in states[rank][1].items()})
                save_checkpoint(self.model, directory, training=state, training_tensors=tensors)
            except Exception as err:  # noqa: BLE001  (told to every rank, then raised here)
                failure, outcome = err, [f"{type(err).__name__}: {err}"]
        dist.broadcast_object_list(outcome, src=0)
        if failure is not None:
            raise failure
        if outcome[0] is not None:
            raise RuntimeError(f"rank 0 could not save the checkpoint in {directory}: {outcome[0]}")
        return Path(directory)

    @classmethod
    def resume(cls, directory: str | Path, *, expected: TrainConfig | None = None, groups: ParallelGroups,
               **kwargs: Any) -> ChunkParallelTrainer:
        """The trainer saved in ``directory``, for this rank of a job with the same number of data ranks
        (the number of sequence ranks and the scheme may differ: they change only the order of sums).
        Every rank gets back the RNG state it saved when the job has as many processes as the saved one."""
        directory = Path(directory)
        state = read_manifest(directory).get("training", {}).get("state", {})
        check_data_parallel(state, groups.data_size, directory)
        trainer = super().resume(directory, expected=expected, groups=groups, **kwargs)
        saved_rng, rank = saved_layout(state).get("rng") or {}, dist.get_rank()
        if len(saved_rng) + 1 == dist.get_world_size() and str(rank) in saved_rng:  # rank 0's came with the rest
            _, tensors = load_training_state(directory)
            prefix = f"rng/rank{rank}/"
            set_rng_state(saved_rng[str(rank)], {"rng/" + name[len(prefix):]: tensor
                                                 for name, tensor in tensors.items() if name.startswith(prefix)})
        return trainer
