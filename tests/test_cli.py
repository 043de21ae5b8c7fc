"""`megalodon-lite train / sample / eval`: the main job, exact resumption, Ctrl-C, and one clear line per error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megalodon_lite.checkpoint import load_checkpoint, read_manifest
from megalodon_lite.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--context", "32", "--batch-size", "2", "--eval-windows", "2", "--sample-tokens", "0"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def log_records(folder: Path, event: str) -> list[dict]:
    lines = (folder / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_help_lists_the_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "sample", "eval"))


def test_train_sample_and_eval(tmp_path, text, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(text), *FAST, "--steps", "6", "--eval-every", "3", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "training megalodon (tiny preset" in printed and "step      6: validation" in printed
    evals = log_records(out, "eval")
    assert [r["step"] for r in evals] == [3, 6] and all(r["val_bits_per_byte"] > 0 for r in evals)
    assert read_manifest(out)["training"]["state"]["step"] == 6
    assert main(["sample", str(out), "--prompt", "def ", "--tokens", "12", "--seed", "1"]) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("def ") and len(sample) > len("def ")
    assert main(["sample", str(out), "--prompt", "def ", "--tokens", "12", "--seed", "1", "--no-cuda-graph"]) == 0
    assert capsys.readouterr().out == sample  # the seed fixes the sample (and on a CPU there is no graph)
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--windows", "3", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and "bytes of context" in printed
    result = json.loads(report.read_text())
    assert result["context"] == 32 and len(result["loss_per_position"]) == 32 and result["windows"] == 3


def test_default_run_folder_is_never_overwritten(tmp_path, text, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", "--data", str(text), *FAST, "--steps", "2", "--model", "llama"]) == 0
    assert (tmp_path / "runs" / "llama-tiny" / "config.json").exists()
    assert (tmp_path / "runs" / "llama-tiny-2" / "config.json").exists()
    assert "runs/llama-tiny-2" in capsys.readouterr().out


def test_resume_through_the_command_line_is_bit_exact(tmp_path, text, capsys):
    common = ["train", "--data", str(text), *FAST, "--steps", "6", "--log-every", "1", "--eval-every", "0"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--stop-after", "3"]) == 0
    assert "stopped at step 3 of 6" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "split"), "--eval-windows", "2", "--log-every", "1",
                 "--sample-tokens", "0"]) == 0
    straight = [r["loss"] for r in log_records(tmp_path / "straight", "train")]
    resumed = [r["loss"] for r in log_records(tmp_path / "split", "train")]
    assert len(straight) == 6 and resumed == straight
    a, b = (load_checkpoint(tmp_path / name) for name in ("straight", "split"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture()
def trained(tmp_path, text) -> Path:
    folder = tmp_path / "trained"
    assert main(["train", "--data", str(text), *FAST, "--steps", "2", "--out", str(folder)]) == 0
    return folder


def expect_error(capsys, argv: list[str], words: str, code: int = 1) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert words in err and err.startswith("megalodon-lite ") and "Traceback" not in err, err


def test_missing_or_empty_data_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "out"
    expect_error(capsys, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(out)], "does not exist")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["train", "--data", str(tmp_path / "empty"), "--out", str(out)], "holds no files")
    assert not out.exists()


def test_a_context_shorter_than_two_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--context", "1"])
    assert exit_info.value.code == 2
    assert "--context: must be at least 2" in capsys.readouterr().err


def test_existing_checkpoint_is_not_overwritten(trained, text, capsys):
    before = snapshot(trained)
    expect_error(capsys, ["train", "--data", str(text), *FAST, "--out", str(trained)], "already holds a checkpoint")
    assert snapshot(trained) == before


def test_resuming_with_a_different_model_is_refused(trained, capsys):
    before = snapshot(trained)
    expect_error(capsys, ["train", "--resume", str(trained), "--model", "llama"],
                 "resuming with a different model: --model llama (the run used megalodon)")
    expect_error(capsys, ["train", "--resume", str(trained), "--context", "64"], "--context 64 (the run used 32)")
    assert snapshot(trained) == before


def test_corrupt_checkpoint_is_refused_and_left_alone(trained, capsys):
    weights = next(trained.glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(trained)
    expect_error(capsys, ["train", "--resume", str(trained)], "truncated or corrupted")
    expect_error(capsys, ["sample", str(trained)], "truncated or corrupted")
    (trained / "config.json").write_text("{not json")
    expect_error(capsys, ["eval", str(trained)], "not valid JSON")
    expect_error(capsys, ["sample", str(trained.parent / "nothing")], "config.json not found")
    assert snapshot(trained) == {**before, "config.json": b"{not json"}


def test_out_of_memory_is_one_clear_error_and_saves_nothing(tmp_path, text, capsys, monkeypatch):
    from megalodon_lite.train import Trainer

    def no_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", no_memory)
    out = tmp_path / "oom"
    expect_error(capsys, ["train", "--data", str(text), *FAST, "--out", str(out)],
                 "out of memory on cpu: a step of batch 2 x context 32 does not fit")
    assert not (out / "config.json").exists()


def test_an_error_is_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "megalodon_lite", "train", "--data", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr, result.stderr


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, text, capsys):
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "megalodon_lite", "train", "--data", str(text), *FAST,
                                "--steps", "100000", "--eval-every", "0", "--log-every", "1", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not ((out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "saved" in err and "--resume" in err and "Traceback" not in err, err
    step = read_manifest(out)["training"]["state"]["step"]
    assert step >= 2
    assert main(["train", "--resume", str(out), "--stop-after", "1", "--eval-windows", "2", "--sample-tokens", "0"]) == 0
    assert read_manifest(out)["training"]["state"]["step"] == step + 1


def test_resume_drops_log_records_of_the_lost_part_of_a_run(tmp_path, text):
    out = tmp_path / "run"
    common = ["--eval-windows", "2", "--log-every", "1", "--sample-tokens", "0"]
    assert main(["train", "--data", str(text), *FAST, "--steps", "5", "--eval-every", "0", "--stop-after", "2",
                 "--out", str(out), *common]) == 0
    with (out / "log.jsonl").open("a") as log:  # what a crash after step 2's checkpoint would leave behind
        log.write(json.dumps({"event": "train", "step": 3, "loss": 9.0}) + "\n" + '{"event": "tra')
    assert main(["train", "--resume", str(out), *common]) == 0
    steps = [r["step"] for r in log_records(out, "train")]
    assert steps == [1, 2, 3, 4, 5] and 9.0 not in [r["loss"] for r in log_records(out, "train")]


def test_the_published_demo_checkpoint_samples_on_a_cpu(capsys):
    """The README's `sample checkpoints/demo` example: the committed GPU-trained checkpoint loads on
    a CPU (hash verified) and continues a prompt with bytes it learned from Python sources."""
    demo = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"
    assert main(["sample", str(demo), "--prompt", "def read_config(path):", "--tokens", "40", "--seed", "0",
                 "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def read_config(path):") and len(text) > len("def read_config(path):") + 20
