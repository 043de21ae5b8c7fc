"""Compiled training (chapter 10's ``TrainConfig.compile``, ``train --compile``): the eager step's losses
and gradients to float rounding, plain checkpoints, resumption, and one clear error when compiling fails.

Inductor needs a C++ compiler on a CPU; only the baseline's numbers are checked with it (skipped without
one). The rest use the ``aot_eager`` backend: the same tracing, graph breaks and AOTAutograd, no code
generation, compiled in seconds instead of tens of seconds.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from megalodon_lite.checkpoint import read_manifest
from megalodon_lite.cli import main
from megalodon_lite.data import load_corpus
from megalodon_lite.train import COMPILE_BACKEND_ENV, CompileError, Trainer, TrainConfig

# one narrow layer: compile time grows with the graphs, and one layer has every kind of graph break
ONE_LAYER = {"model_dim": 32, "z_dim": 16, "value_dim": 32, "ffn_hidden_dim": 48, "norm_num_groups": 4,
             "chunk_size": 16, "num_layers": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "(", ")", ":", "import", "class", "for", "in", "\n    "]
    for i in range(12):
        (folder / f"file_{i:02d}.py").write_text(" ".join(rng.choice(words) for _ in range(200 + 40 * i)))
    return load_corpus(folder, val_percent=20)


def config(**changes) -> TrainConfig:
    values = dict(preset="tiny", overrides=ONE_LAYER, context=32, batch_size=2, steps=4, warmup=1, seed=0)
    return TrainConfig(**{**values, **changes})


HAVE_CPP = shutil.which("g++") is not None or shutil.which("cc") is not None


# Inductor (generated C++ on a CPU) for the baseline, whose compiled speed chapter 10 compares against.
# Megalodon-lite runs under aot_eager here: its 15 graph pieces (the breaks listed in compiled_loss)
# take Inductor about 110 s on a 2-core CPU with a cold cache; ("megalodon", "inductor") passes by hand.
@pytest.mark.parametrize("kind, backend", [
    pytest.param("llama", "inductor", marks=pytest.mark.skipif(not HAVE_CPP, reason="Inductor needs a C++ compiler")),
    ("megalodon", "aot_eager")])
def test_a_compiled_step_equals_the_eager_step(kind, backend, corpus):
    eager = Trainer(config(model=kind), device="cpu", corpus=corpus)
    compiled = Trainer(config(model=kind, compile=True), device="cpu", corpus=corpus, compile_backend=backend)
    assert compiled.training_loss is not compiled.loss_fn and eager.training_loss is eager.loss_fn
    inputs, targets = eager.micro_batches(0)[0]
    gradients = []
    for trainer in (eager, compiled):  # the same initial weights (config.seed)
        trainer.training_loss(trainer.model, inputs, targets).backward()
        gradients.append([p.grad.clone() for p in trainer.model.parameters()])
        trainer.model.zero_grad(set_to_none=True)
    # float32: Inductor fuses the elementwise work and adds the norms' and the loss's sums in another
    # order, a few ulps (1.2e-7 each) per operation; after a layer of them, 1e-4 of the gradient's
    # scale is far above that and far below a wrong gradient
    for a, b in zip(*gradients):
        assert torch.allclose(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-12)
    losses = [[trainer.train_step().loss for _ in range(2)] for trainer in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # the loss: a mean, steadier than one gradient entry
    assert not any("_orig_mod" in key for key in compiled.model.state_dict())


def test_a_compiled_run_saves_plain_checkpoints_and_resumes(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    cfg = config(compile=True)
    straight = Trainer(cfg, device="cpu", corpus=corpus)
    expected = [straight.train_step().loss for _ in range(4)]
    first = Trainer(cfg, device="cpu", corpus=corpus)
    losses = [first.train_step().loss for _ in range(2)]
    first.save(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "config.json").read_text())
    assert manifest["training"]["state"]["config"]["compile"] is True  # recorded with the run
    weights = set(Trainer.resume(tmp_path / "run", corpus=corpus).model.state_dict())
    assert weights == set(straight.model.state_dict()) and not any("_orig_mod" in k for k in weights)
    second = Trainer.resume(tmp_path / "run", corpus=corpus)
    assert second.config.compile and second.step == 2
    assert losses + [second.train_step().loss for _ in range(2)] == expected  # aot_eager runs eager's ops: bit for bit
    # a run setting: a resumed run may switch it (expected is not compared on it), to float rounding
    eager = Trainer.resume(tmp_path / "run", expected=cfg.replace(compile=False), compile=False, corpus=corpus)
    assert not eager.config.compile and eager.training_loss is eager.loss_fn
    assert losses + [eager.train_step().loss for _ in range(2)] == pytest.approx(expected, rel=1e-6)


def test_a_failing_compile_is_one_error_naming_the_option(corpus, monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no code generator here")

    trainer = Trainer(config(compile=True), device="cpu", corpus=corpus, compile_backend=broken_backend)
    with pytest.raises(CompileError, match=r"compile=True \(the train command's --compile\).*no code generator here"):
        trainer.train_step()
    assert trainer.step == 0
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "no-such-backend")
    with pytest.raises(CompileError, match="no-such-backend.*MEGALODON_COMPILE_BACKEND"):
        Trainer(config(compile=True), device="cpu", corpus=corpus)
    with pytest.raises(ValueError, match="compile must be True or False"):
        config(compile="yes")


def test_train_compile_on_the_command_line(tmp_path, text, capsys, monkeypatch):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    fast = ["--preset", "tiny", "--context", "32", "--batch-size", "2", "--eval-windows", "2", "--sample-tokens", "0",
            "--data", str(text), "--steps", "2", "--eval-every", "0"]
    out = tmp_path / "run"
    assert main(["train", *fast, "--compile", "--stop-after", "1", "--out", str(out)]) == 0
    assert "compiling the training step" in capsys.readouterr().out
    assert read_manifest(out)["training"]["state"]["config"]["compile"] is True
    assert main(["train", "--resume", str(out), "--no-compile", "--eval-windows", "2", "--sample-tokens", "0"]) == 0
    printed = capsys.readouterr().out
    assert "trained with --compile, this run without" in printed and "compiling" not in printed
    assert read_manifest(out)["training"]["state"]["config"]["compile"] is False
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "no-such-backend")
    assert main(["train", *fast, "--compile", "--out", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert "--compile" in err and "Traceback" not in err and not (tmp_path / "other" / "config.json").exists()
