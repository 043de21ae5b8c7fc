"""Chunk parallelism (chapter 11): the boundary-state algebra, and the loss and every gradient of a
sequence split over 2 and 4 gloo processes against one process reading it whole; data x sequence
with DistributedDataParallel; ranks that never join, die or hang.

The multi-process tests spawn their processes (megalodon_lite.launch.spawn_local) once per world
size and check several splits inside, because starting a process that imports torch costs seconds
on the 2-core CI machine. Everything is float64: the parallel and the single-process computations
differ only in the order of their sums, so 1e-10 relative is ~10^6 float64 roundings of margin and
any real error (a missing term of the state, a lost gradient path) is many orders larger.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lite.cema import CEMA
from megalodon_lite.config import preset
from megalodon_lite.launch import spawn_local
from megalodon_lite.model import MegalodonLM
from megalodon_lite.parallel import (
    ChunkParallelError,
    ChunkParallelLM,
    cema_end_state,
    check_segments,
    chunk_parallel_cross_entropy,
    init_chunk_parallel,
    merge_moments,
    prefix_cema_state,
    prefix_moments,
    segment_moments,
    segment_slice,
    split_sequence,
    sum_gradients,
)
from megalodon_lite.timestep_norm import timestep_norm

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 8
TOLERANCE = 1e-10  # float64; see the module docstring


def tiny(**changes):
    return preset("tiny", model_dim=16, z_dim=8, value_dim=16, ffn_hidden_dim=24, num_heads=2, norm_num_groups=4,
                  chunk_size=CHUNK, num_layers=2, vocab_size=32, **changes)


def make_model(seed: int = 0, **changes) -> MegalodonLM:
    """A float64 tiny model whose zero-initialised parameters (norm scales, q/k affine, biases) are moved."""
    torch.manual_seed(seed)
    model = MegalodonLM(tiny(**changes)).double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "attention.gamma", "attention.beta", ".bias")):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def reference(model: MegalodonLM, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, dict]:
    """One process, whole sequences: mean token loss and every parameter's gradient."""
    model.zero_grad()
    logits, _ = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.item(), {name: param.grad.numpy().copy() for name, param in model.named_parameters()}


def assert_same(result: dict, expected_loss: float, expected_grads: dict, what: str) -> None:
    assert abs(result["loss"] - expected_loss) <= TOLERANCE * abs(expected_loss), what
    assert result["grads"].keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        error = np.abs(result["grads"][name] - grad).max() / np.abs(grad).max()
        assert error <= TOLERANCE, f"{what}: gradient of {name} off by {error:.1e} (relative)"


def check_outcomes(outcomes) -> None:
    for outcome in outcomes:
        assert outcome.error is None, f"rank {outcome.rank}:\n{outcome.error}"


# ---------------------------------------------------------------- layout and state algebra (one process)

@given(length=st.integers(1, 400), world=st.integers(1, 9), chunk=st.integers(1, 64))
@settings(max_examples=60, deadline=None)
def test_split_sequence_gives_whole_chunks_as_even_as_possible(length, world, chunk):
    if -(-length // chunk) < world:
        with pytest.raises(ValueError, match="too few"):
            split_sequence(length, world, chunk)
        return
    lengths = split_sequence(length, world, chunk)
    assert len(lengths) == world and sum(lengths) == length
    check_segments(lengths, chunk)
    chunks = [-(-n // chunk) for n in lengths]
    assert max(chunks) - min(chunks) <= 1
    slices = [segment_slice(length, rank, world, chunk) for rank in range(world)]
    assert [s.stop - s.start for s in slices] == lengths and slices[0].start == 0 and slices[-1].stop == length


def test_bad_layouts_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="chunk boundary"):
        check_segments([CHUNK + 3, 2 * CHUNK], CHUNK)
    with pytest.raises(ValueError, match="needs one"):
        check_segments([CHUNK, 0], CHUNK)
    with pytest.raises(ValueError, match="world_size"):
        split_sequence(10, 0, CHUNK)
    with pytest.raises(ValueError, match="rank"):
        segment_slice(64, 2, 2, CHUNK)


@given(lengths=st.lists(st.integers(1, 40), min_size=2, max_size=5), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_merged_segment_moments_equal_the_norm_state_after_the_concatenation(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    pieces = [5.0 + (1 + j) * torch.randn(2, n, 12, generator=generator, dtype=torch.float64)
              for j, n in enumerate(lengths)]
    zeros = torch.zeros(12, dtype=torch.float64)
    summaries = [segment_moments(x, 3) for x in pieces]
    running = summaries[0]
    for rank in range(1, len(pieces)):
        _, truth = timestep_norm(torch.cat(pieces[:rank], dim=1), zeros, zeros, 3)
        prefix = prefix_moments(torch.stack([s.mean for s in summaries]), torch.stack([s.var for s in summaries]),
                                lengths, rank)
        for state in (running, prefix):
            assert torch.equal(state.count, truth.count)
            torch.testing.assert_close(state.mean, truth.mean, rtol=0, atol=1e-12)
            torch.testing.assert_close(state.var, truth.var, rtol=1e-12, atol=1e-12)
        running = merge_moments(running, summaries[rank])
    first = prefix_moments(torch.stack([s.mean for s in summaries]), torch.stack([s.var for s in summaries]),
                           lengths, 0)
    assert first.count.eq(0).all() and torch.isfinite(first.var).all()


@given(lengths=st.lists(st.integers(1, 100), min_size=2, max_size=4), seed=st.integers(0, 2**16))
@settings(max_examples=8, deadline=None)
def test_cema_end_states_combine_into_the_state_after_the_concatenation(lengths, seed):
    torch.manual_seed(seed)
    cema = CEMA(6, 4).double()
    p, q, _ = cema.coefficients()
    pieces = [torch.randn(2, n, 6, dtype=torch.float64) for n in lengths]
    for x in pieces:
        _, h_from_zero = cema(x, method="recurrence")
        torch.testing.assert_close(cema_end_state(x, p, q, block_size=16), h_from_zero, rtol=1e-12, atol=1e-12)
    ends = torch.stack([cema_end_state(x, p, q) for x in pieces])
    assert prefix_cema_state(ends, lengths, 0, q).abs().max() == 0
    for rank in range(1, len(pieces)):
        _, truth = cema(torch.cat(pieces[:rank], dim=1), method="recurrence")
        torch.testing.assert_close(prefix_cema_state(ends, lengths, rank, q), truth, rtol=1e-12, atol=1e-12)


def test_wrapper_refuses_what_it_cannot_use():
    with pytest.raises(TypeError, match="MegalodonLM"):
        ChunkParallelLM(torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="ProcessGroup"):
        ChunkParallelLM(make_model(), None)
    with pytest.raises(ValueError, match="sequence_parallel"):
        init_chunk_parallel(0)
    with pytest.raises(ValueError, match="targets"):  # checked before any communication
        chunk_parallel_cross_entropy(torch.zeros(1, 4, 8), torch.zeros(1, 5, dtype=torch.long), None)
    with pytest.raises(ValueError, match="world_size"):
        spawn_local(print, 0)


# ---------------------------------------------------------------- 2 and 4 processes against one

def _equivalence_worker(rank, world_size, weights, changes, cases):
    """Each case: (scheme, lengths, sequence_parallel, data rows, inputs, targets). Returns per case
    {"loss", "grads"} or {"error": message}."""
    torch.manual_seed(100 + rank)  # different on every rank: the wrapper must broadcast rank 0's weights
    results = []
    for scheme, lengths, sequence_parallel, inputs, targets in cases:
        groups = init_chunk_parallel(sequence_parallel, timeout=datetime.timedelta(seconds=60))
        model = MegalodonLM(tiny(**changes)).double()
        if rank == 0:
            model.load_state_dict(weights)
        wrapped = ChunkParallelLM(model, groups.sequence, scheme)
        lm = wrapped
        if groups.data_size > 1:
            lm = torch.nn.parallel.DistributedDataParallel(wrapped, process_group=groups.data)
            rows = slice(groups.data_rank * inputs.shape[0] // groups.data_size,
                         (groups.data_rank + 1) * inputs.shape[0] // groups.data_size)
            inputs, targets = inputs[rows], targets[rows]
        start = sum(lengths[: groups.sequence_rank])
        segment = slice(start, start + lengths[groups.sequence_rank])
        try:
            logits = lm(inputs[:, segment])
        except ValueError as err:
            results.append({"error": str(err)})
            continue
        share, mean_loss = chunk_parallel_cross_entropy(logits, targets[:, segment], groups.sequence)
        share.backward()
        sum_gradients(model, groups.sequence)
        loss = torch.tensor(mean_loss.item(), dtype=torch.float64)
        dist.all_reduce(loss, group=groups.data)  # the data ranks' mean losses, averaged
        result = {"loss": loss.item() / groups.data_size,
                  "grads": {name: param.grad.numpy().copy() for name, param in model.named_parameters()}}
        with torch.no_grad():  # outside the wrapper's forward its hooks do nothing
            alone, _ = model(inputs[:, :CHUNK])
            wrapped.remove_hooks()
            assert torch.equal(alone, model(inputs[:, :CHUNK])[0])
        results.append(result)
    return results


def _batch(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 32, (batch, length + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def test_two_processes_equal_one_for_both_schemes_and_uneven_segments():
    model = make_model(0)
    layouts = [[3 * CHUNK, 2 * CHUNK + 5],   # uneven, the last segment ends inside a chunk
               [CHUNK, 4 * CHUNK],           # uneven, whole chunks
               [2 * CHUNK, 2 * CHUNK]]       # even
    cases, expected = [], []
    for i, lengths in enumerate(layouts):
        inputs, targets = _batch(2, sum(lengths), seed=i)
        expected.append(reference(model, inputs, targets))
        cases += [(scheme, lengths, 2, inputs, targets) for scheme in ("chain", "allgather")]
    inputs, targets = _batch(2, 3 * CHUNK, seed=9)
    cases.append(("allgather", [CHUNK + 3, 2 * CHUNK - 3], 2, inputs, targets))  # cuts a chunk: refused
    outcomes = spawn_local(_equivalence_worker, 2, model.state_dict(), {}, cases, timeout=240)
    check_outcomes(outcomes)
    for outcome in outcomes:
        for k, (scheme, lengths, *_rest) in enumerate(cases[:-1]):
            assert_same(outcome.value[k], *expected[k // 2], what=f"rank {outcome.rank}, {scheme}, {lengths}")
        assert "chunk boundary" in outcome.value[-1]["error"]  # the same error on every rank, no hang


def test_four_processes_and_a_two_by_two_data_by_sequence_layout_equal_one():
    changes = {"share_emb": True, "scale_emb": True, "swiglu": True}  # tied head: its gradient adds two paths
    model = make_model(1, **changes)
    lengths4 = [CHUNK, 3 * CHUNK, 2 * CHUNK, CHUNK + 5]
    inputs4, targets4 = _batch(2, sum(lengths4), seed=11)
    lengths2 = [2 * CHUNK, CHUNK + 6]
    inputs22, targets22 = _batch(4, sum(lengths2), seed=12)  # 2 sequences per data rank, 2 data ranks
    cases = [(scheme, lengths4, 4, inputs4, targets4) for scheme in ("chain", "allgather")]
    cases += [(scheme, lengths2, 2, inputs22, targets22) for scheme in ("chain", "allgather")]
    expected4 = reference(model, inputs4, targets4)
    expected22 = reference(model, inputs22, targets22)
    outcomes = spawn_local(_equivalence_worker, 4, model.state_dict(), changes, cases, timeout=300)
    check_outcomes(outcomes)
    for outcome in outcomes:
        for k, (scheme, lengths, sequence_parallel, *_rest) in enumerate(cases):
            expected = expected4 if sequence_parallel == 4 else expected22
            assert_same(outcome.value[k], *expected, what=f"rank {outcome.rank}, {scheme}, sp={sequence_parallel}")


# ---------------------------------------------------------------- failing ranks: clear errors, no hang

JOIN_TIMEOUT_S = 3.0


def _join_or_not(rank, world_size):
    if rank == 1:
        return None  # never joins
    start = time.monotonic()
    try:
        init_chunk_parallel(world_size, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    except ChunkParallelError as err:
        return str(err), time.monotonic() - start
    return "joined", time.monotonic() - start


def test_a_rank_that_never_joins_gives_a_clear_error_within_the_timeout():
    outcomes = spawn_local(_join_or_not, 2, timeout=60)
    check_outcomes(outcomes)
    message, seconds = outcomes[0].value
    assert "not every process joined" in message and "rank 0 of 2" in message
    assert seconds < JOIN_TIMEOUT_S + 10  # the store gives up after the timeout, plus process start-up slack


def _fail_after_forward(rank, world_size, weights, scheme, how):
    groups = init_chunk_parallel(world_size, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    model = MegalodonLM(tiny()).double()
    model.load_state_dict(weights)
    wrapped = ChunkParallelLM(model, groups.sequence, scheme)
    inputs, targets = _batch(1, 2 * CHUNK * world_size, seed=3)
    segment = segment_slice(inputs.shape[1], rank, world_size, CHUNK)
    logits = wrapped(inputs[:, segment])
    share, _ = chunk_parallel_cross_entropy(logits, targets[:, segment], groups.sequence)
    if rank == world_size - 1:  # the last rank never runs backward: it dies, or stays silent
        if how == "dies":
            os._exit(3)
        time.sleep(JOIN_TIMEOUT_S + 3)  # longer than rank 0 waits before its timeout
        return "slept"
    start = time.monotonic()
    try:
        share.backward()
    except ChunkParallelError as err:
        return str(err), time.monotonic() - start
    return "no error", time.monotonic() - start


@pytest.mark.parametrize("scheme, how", [("chain", "dies"), ("allgather", "hangs")])
def test_a_rank_that_dies_or_hangs_gives_a_clear_error_not_a_hang(scheme, how):
    outcomes = spawn_local(_fail_after_forward, 2, make_model(0).state_dict(), scheme, how, timeout=90)
    check_outcomes(outcomes[:1])
    message, seconds = outcomes[0].value
    assert message.startswith("chunk parallel, rank 0 of 2:") and "failed" in message, message
    expected = "receiving the gradient" if scheme == "chain" else "all-reduce of the gradient"
    assert expected in message, message
    assert seconds < JOIN_TIMEOUT_S + 5
    if how == "dies":
        assert "exited with code 3" in outcomes[1].error


# ---------------------------------------------------------------- the GPU benchmark's CPU smoke mode

def test_sequence_parallel_bench_runs_on_cpu_with_gloo(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "kernels" / "sequence_parallel_bench.py"), "--cpu-smoke", "--contexts", "96", "128",
               "--warmup", "1", "--steps", "1", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    record = json.loads((tmp_path / "sequence_parallel_cpu_smoke.json").read_text())
    assert {"device", "torch", "python", "date", "command", "rows"} <= record.keys()
    runs = {(row["gpus"], row["scheme"], row["context"]) for row in record["rows"]}
    contexts = {row["context"] for row in record["rows"]}
    assert runs == {(1, "single", c) for c in contexts} | {(2, s, c) for s in ("chain", "allgather") for c in contexts}
    single = {row["context"]: row["losses"] for row in record["rows"] if row["gpus"] == 1}
    for row in record["rows"]:
        assert row["tokens_per_s"] > 0 and len(row["peak_memory_GiB"]) == row["gpus"]
        # same seed and data, float32: the split runs follow the single process's losses step by step
        np.testing.assert_allclose(row["losses"], single[row["context"]], rtol=1e-4)
