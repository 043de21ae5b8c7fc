"""`torchrun ... -m megalodon_lite train --sequence-parallel N`: the per-step losses of one process, a
checkpoint that Ctrl-C writes and --resume continues bit for bit, the rows and segments each rank
reads, and one clear line per launch error.

Each torchrun job costs ~12 s on the 2-core CI machine (three Python processes importing torch), so
the module runs three and shares them between its tests: a straight 2-process run, and the same run
interrupted by Ctrl-C, then resumed. What each rank of a data x sequence grid reads is checked in
this process, on a one-process gloo group with the grid's coordinates given by hand.

Tolerance: float32 (unit roundoff 6e-8). A split run adds the same terms in another order (segment
summaries, the loss and gradient all-reduces), so its losses drift from one process's by a few
roundings per step: at most 1.7e-7 relative over these 20 steps when measured. RTOL = 2e-6 leaves a
margin of ten; a real fault (a missing boundary state, a wrong row, a lost part of a gradient) moves
the loss by 1e-2 or more.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megalodon_lite.checkpoint import load_checkpoint, read_manifest
from megalodon_lite.cli import main
from megalodon_lite.data import DataError, load_corpus
from megalodon_lite.parallel import ParallelGroups
from megalodon_lite.parallel_train import ChunkParallelTrainer
from megalodon_lite.train import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RTOL = 2e-6  # see the module docstring
STEPS = 20   # of a schedule planned for 40 (--stop-after), so that Ctrl-C lands before the end


def options(text: Path, batch_size: int = 2) -> list[str]:
    # context 96 = one chunk of the tiny preset's 64 and a half: the last segment ends inside a chunk
    return ["--data", str(text), "--preset", "tiny", "--context", "96", "--batch-size", str(batch_size),
            "--steps", "40", "--eval-every", "10", "--eval-windows", "2", "--log-every", "1", "--sample-tokens", "0"]


def torchrun(processes: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "megalodon_lite", "train", *argv]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def records(folder: Path, key: str) -> list[float]:
    lines = (folder / "log.jsonl").read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if key in r]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text) -> dict[str, Path]:
    """One process; 2 processes straight; 2 interrupted by Ctrl-C, then resumed."""
    base = tmp_path_factory.mktemp("runs")
    folders = {name: base / name for name in ("one", "split", "interrupted")}
    assert main(["train", *options(text), "--stop-after", str(STEPS), "--out", str(folders["one"])]) == 0
    split = run(torchrun(2, [*options(text), "--sequence-parallel", "2", "--stop-after", str(STEPS),
                             "--out", str(folders["split"])]))
    assert "each sequence split over 2 (allgather)" in split.stdout, split.stdout

    process = subprocess.Popen(torchrun(2, [*options(text), "--sequence-parallel", "2", "--eval-every", "0",
                                            "--out", str(folders["interrupted"])]),
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = folders["interrupted"] / "log.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)  # to torchrun, which passes it to every worker
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0 and "saved" in err and "--resume" in err, err
    stopped = read_manifest(folders["interrupted"])["training"]["state"]["step"]
    assert 2 <= stopped < STEPS, stopped
    resumed = run(torchrun(2, ["--resume", str(folders["interrupted"]), "--sequence-parallel", "2",
                               "--stop-after", str(STEPS - stopped), "--eval-windows", "2", "--log-every", "1",
                               "--sample-tokens", "0"]))
    assert f"steps {stopped + 1}-{STEPS} of 40" in resumed.stdout and "note:" not in resumed.stdout, resumed.stdout
    return folders


def test_two_processes_follow_one_step_by_step_and_write_one_checkpoint(runs):
    one, split = runs["one"], runs["split"]
    assert len(records(split, "loss")) == STEPS
    np.testing.assert_allclose(records(split, "loss"), records(one, "loss"), rtol=RTOL)
    np.testing.assert_allclose(records(split, "grad_norm"), records(one, "grad_norm"), rtol=RTOL)
    np.testing.assert_allclose(records(split, "val_loss"), records(one, "val_loss"), rtol=RTOL)  # split evaluation too
    assert sorted(p.name.split("-")[0] for p in split.iterdir()) == ["config.json", "log.jsonl", "model", "training"]
    state = read_manifest(split)["training"]["state"]
    assert state["step"] == STEPS and state["windows_consumed"] == STEPS * 2
    assert {k: state["parallel"][k] for k in ("sequence_parallel", "data_parallel", "scheme")} == {
        "sequence_parallel": 2, "data_parallel": 1, "scheme": "allgather"}
    for a, b in zip(load_checkpoint(one).parameters(), load_checkpoint(split).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # 20 AdamW steps of float32 drift


def test_ctrl_c_saves_and_resume_continues_the_split_run_bit_for_bit(runs):
    assert records(runs["interrupted"], "loss") == records(runs["split"], "loss")
    assert same_weights(runs["interrupted"], runs["split"])


def test_a_split_run_continues_in_one_process_to_float_rounding(runs, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(runs["split"], folder)
    assert main(["train", "--resume", str(folder), "--stop-after", "2", "--eval-windows", "2",
                 "--sample-tokens", "0"]) == 0
    assert "note: " in capsys.readouterr().out and read_manifest(folder)["training"]["state"]["step"] == STEPS + 2


# ---------------------------------------------------------------- launch errors: one line, non-zero exit

@pytest.mark.parametrize("extra, words", [
    ([], "which torchrun starts: torchrun --standalone --nproc-per-node 2 -m megalodon_lite train "
         "--sequence-parallel 2"),
    (["--model", "llama"], "the Llama-style baseline attends over the whole context and cannot be split"),
    (["--context", "64"], "--context 64 with --sequence-parallel 2: a sequence of 64 tokens has 1 chunk(s) of 64"),
    (["--activation-checkpointing"], "--activation-checkpointing with --sequence-parallel 2"),
])
def test_launch_errors_are_one_line(tmp_path, text, capsys, extra, words):
    out = tmp_path / "out"
    argv = ["train", "--data", str(text), "--context", "96", "--sequence-parallel", "2", "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("megalodon-lite train: error:") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_sequence_parallel_that_does_not_divide_the_processes_is_said_once(tmp_path, text, capsys, monkeypatch,
                                                                               rank):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc-per-node 2 sets it; checked before joining
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "out"
    assert main(["train", "--data", str(text), "--context", "256", "--sequence-parallel", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    if rank == "0":
        assert "--sequence-parallel 3 must divide the number of processes torchrun started (2)" in err
        assert err.count("\n") == 1, err
    else:
        assert err == ""  # the same problem on every rank: rank 0 says it
    assert not out.exists()


def test_a_data_parallel_run_does_not_resume_in_one_process(runs, tmp_path, capsys):
    folder = tmp_path / "grid"
    shutil.copytree(runs["split"], folder)
    manifest = json.loads((folder / "config.json").read_text())
    manifest["training"]["state"]["parallel"]["data_parallel"] = 2  # as a 4-process, 2 x 2 run records it
    (folder / "config.json").write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["train", "--resume", str(folder), "--sample-tokens", "0"]) == 1
    err = capsys.readouterr().err
    assert "2 data-parallel rank(s)" in err and "this job has 1" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---------------------------------------------------------------- what each rank of a grid reads

@pytest.fixture()
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_each_rank_reads_its_rows_and_its_segment_of_the_one_window_order(text, one_process_group):
    """Data rank d of D reads the d-th run of batch x accumulate windows of the step's D runs, sequence rank
    s its segment of each: together, the windows one process with a batch D times larger reads."""
    corpus = load_corpus(text, 5)
    config = TrainConfig(preset="tiny", context=96, batch_size=2, accumulate=2, steps=8)
    whole = Trainer(config.replace(batch_size=4), device="cpu", corpus=corpus).global_batch(3)
    rows = []
    for data_rank in range(2):
        segments = []
        for sequence_rank in range(2):
            groups = ParallelGroups(one_process_group, one_process_group, sequence_rank, 2, data_rank, 2)
            trainer = ChunkParallelTrainer(config, groups=groups, device="cpu", corpus=corpus)
            assert trainer.tokens_per_step == 2 * 2 * 2 * 96
            segments.append(trainer.global_batch(3))
        assert [s.inputs.shape[1] for s in segments] == [64, 32]  # whole chunks first, the rest last
        rows.append([torch.cat([s.inputs for s in segments], 1), torch.cat([s.targets for s in segments], 1)])
    assert torch.equal(torch.cat([r[0] for r in rows]), whole.inputs)
    assert torch.equal(torch.cat([r[1] for r in rows]), whole.targets)
    # the baseline trains data-parallel (whole sequences per rank)
    llama = ChunkParallelTrainer(config.replace(model="llama"), corpus=corpus,
                                 groups=ParallelGroups(one_process_group, one_process_group, 0, 1, 1, 2))
    assert torch.equal(llama.global_batch(3).inputs, whole.inputs[4:])


def test_the_parallel_trainer_refuses_what_it_cannot_split(text, one_process_group):
    corpus = load_corpus(text, 5)
    groups = ParallelGroups(one_process_group, one_process_group, 0, 2, 0, 1)
    with pytest.raises(ValueError, match="only a Megalodon model"):
        ChunkParallelTrainer(TrainConfig(model="llama", context=96), groups=groups, corpus=corpus)
    with pytest.raises(ValueError, match="too few for 2 ranks"):
        ChunkParallelTrainer(TrainConfig(context=64), groups=groups, corpus=corpus)
    with pytest.raises(ValueError, match="activation checkpointing"):
        ChunkParallelTrainer(TrainConfig(context=96), groups=groups, corpus=corpus, activation_checkpointing=True)
    with pytest.raises(ValueError, match="provides loss_fn"):
        ChunkParallelTrainer(TrainConfig(context=96), groups=groups, corpus=corpus, loss_fn=print)
    many = ParallelGroups(one_process_group, one_process_group, 0, 1, 0, 10_000)
    with pytest.raises(DataError, match="batch_size x accumulate x data ranks"):
        ChunkParallelTrainer(TrainConfig(context=96, batch_size=8), groups=many, corpus=corpus)
