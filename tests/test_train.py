"""The trainer (chapter 10): schedule, step, evaluation, checkpoints that resume bit-exactly."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from megalodon_lite.baseline import LlamaLM
from megalodon_lite.checkpoint import CheckpointError, save_checkpoint
from megalodon_lite.data import IGNORE_INDEX, ProbeBatch, WindowSampler, load_corpus
from megalodon_lite.model import MegalodonLM
from megalodon_lite.train import (Trainer, TrainConfig, build_model, build_optimizer, evaluate, learning_rate,
                                  load_optimizer_state, model_config, optimizer_state, probe_accuracy, rng_state,
                                  set_activation_checkpointing, set_rng_state, stream_generate, train_step)

# a model small enough for many steps in a test: the tiny preset, narrower
SMALL = {"model_dim": 32, "z_dim": 16, "value_dim": 32, "ffn_hidden_dim": 48, "norm_num_groups": 4, "chunk_size": 16}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "(", ")", ":", "import", "class", "for", "in", "if", "else", "\n    "]
    for i in range(30):
        (folder / f"file_{i:02d}.py").write_text(" ".join(rng.choice(words) for _ in range(300 + 40 * i)))
    return load_corpus(folder, val_percent=20)


def config(**changes) -> TrainConfig:
    values = dict(preset="tiny", overrides=SMALL, context=32, batch_size=3, steps=8, seed=0)
    return TrainConfig(**{**values, **changes})


def official_lr_cosine(step, warmup, total_steps, cycles, init_ratio, end_ratio):
    """megalodon/optim/lr_scheduler.py::lr_cosine at commit cff8ba5, as written there."""
    if step < warmup:
        lr = init_ratio + float(step) * (1.0 - init_ratio) / warmup
    elif step <= total_steps:
        s = float(step - warmup) / (total_steps - warmup)
        lr = end_ratio + 0.5 * (1 - end_ratio) * (math.cos(math.pi * s * cycles) + 1)
    else:
        lr = end_ratio
    return lr


@pytest.mark.parametrize("steps, warmup", [(1000, None), (40, 3), (7, 0)])
def test_schedule_is_the_official_lr_cosine(steps, warmup):
    cfg = TrainConfig(steps=steps, warmup=warmup, lr=2e-3)
    assert cfg.warmup == (steps // 20 if warmup is None else warmup)
    for step in range(steps):
        expected = 2e-3 * official_lr_cosine(step, cfg.warmup, steps, 1.0, 1e-4, 0.01)
        assert math.isclose(learning_rate(step, cfg), expected, rel_tol=1e-12)


@pytest.mark.parametrize("changes, words", [
    (dict(context=1), "context must be an int >= 2"),
    (dict(model="gpt"), "model must be one of"),
    (dict(preset="huge"), "preset must be one of"),
    (dict(steps=10, warmup=10), "warmup"),
    (dict(batch_size=0), "batch_size"),
    (dict(overrides={"vocab_size": 3}), "overrides"),
])
def test_bad_settings_are_refused(changes, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**changes)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"contxt": 5})


def test_models_are_built_from_the_preset_with_the_byte_vocabulary():
    mega, llama = build_model(model_config(config())), build_model(model_config(config(model="llama")))
    assert isinstance(mega, MegalodonLM) and isinstance(llama, LlamaLM)
    assert mega.config.vocab_size == llama.config.vocab_size == 257 and mega.config.model_dim == 32
    counts = [sum(p.numel() for p in m.parameters()) for m in (mega, llama)]
    assert abs(counts[1] - counts[0]) <= 0.05 * counts[0]


@pytest.mark.parametrize("kind", ["megalodon", "llama"])
def test_accumulated_micro_batches_equal_one_batch(kind):
    cfg = config(model=kind)
    tokens = torch.randint(0, 257, (4, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results, weights = [], []
    for pieces in (1, 2, 4):
        torch.manual_seed(0)
        model = build_model(model_config(cfg)).double()
        optimizer = build_optimizer(model, cfg)
        size = 4 // pieces
        micro = [(inputs[i:i + size], targets[i:i + size]) for i in range(0, 4, size)]
        results.append(train_step(model, optimizer, micro, lr=1e-3, clip=1.0))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    for result, weight in zip(results[1:], weights[1:]):
        assert math.isclose(result.loss, results[0].loss, rel_tol=1e-12)  # float64: summation order only
        assert math.isclose(result.grad_norm, results[0].grad_norm, rel_tol=1e-10)
        assert torch.allclose(weight, weights[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["megalodon", "llama"])
def test_activation_checkpointing_changes_no_number(kind):
    torch.manual_seed(0)
    model = build_model(model_config(config(model=kind)))
    tokens = torch.randint(0, 257, (2, 40))

    def gradients():
        model.zero_grad()
        logits, _ = model(tokens)
        logits.logsumexp(-1).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    def layer_hooks_on() -> list[bool]:  # Megalodon's own saved-tensor hooks yield to the checkpoint's
        return [m.recompute_values for m in model.modules() if hasattr(m, "recompute_values")]

    plain = gradients()
    assert all(layer_hooks_on()) and (kind == "llama") == (not layer_hooks_on())
    set_activation_checkpointing(model, True)
    assert "forward" in model.blocks[0].__dict__ and not any(layer_hooks_on())
    checkpointed = gradients()
    set_activation_checkpointing(model, False)
    assert "forward" not in model.blocks[0].__dict__ and all(layer_hooks_on())
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(plain, checkpointed))


def test_evaluate_is_the_mean_cross_entropy(corpus):
    torch.manual_seed(0)
    model = build_model(model_config(config()))
    windows = torch.randint(0, 257, (5, 21))
    result = evaluate(model, windows, batch_size=2)
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    assert math.isclose(result.loss, float(losses.mean()), rel_tol=1e-6)
    assert math.isclose(result.bits_per_byte, result.loss / math.log(2))
    assert torch.allclose(result.loss_per_position, losses.double().mean(0), rtol=1e-6)
    assert result.tokens == 100 and model.training


class Oracle(torch.nn.Module):
    """Predicts a fixed answer table: logits peaked at ``answers`` (B, L)."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs, state=None):
        return torch.nn.functional.one_hot(self.answers[: inputs.shape[0]], 257).float() + self.anchor, None


def test_probe_accuracy_counts_answers_and_whole_rows():
    targets = torch.full((2, 6), IGNORE_INDEX)
    targets[0, 2], targets[0, 4], targets[1, 5] = 7, 8, 9
    batch = ProbeBatch(torch.zeros(2, 6, dtype=torch.int64), targets)
    answers = targets.clamp(min=0).clone()
    assert probe_accuracy(Oracle(answers), batch, batch_size=2) == 1.0
    answers[0, 4] = 1  # one answer of row 0 wrong
    assert math.isclose(probe_accuracy(Oracle(answers), batch, batch_size=2), 2 / 3)
    assert probe_accuracy(Oracle(answers), batch, batch_size=2, whole_rows=True) == 0.5


def test_optimizer_and_rng_state_round_trip():
    cfg = config()
    torch.manual_seed(0)
    model = build_model(model_config(cfg))
    optimizer = build_optimizer(model, cfg)
    tokens = torch.randint(0, 257, (2, 33))
    train_step(model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], lr=1e-3, clip=1.0)
    _, tensors = optimizer_state(optimizer, model)
    fresh = build_optimizer(model, cfg)
    load_optimizer_state(fresh, model, tensors)
    for p in model.parameters():
        assert all(torch.equal(optimizer.state[p][k], fresh.state[p][k]) for k in optimizer.state[p])
    with pytest.raises(ValueError, match="does not cover"):
        load_optimizer_state(fresh, model, {k: v for k, v in tensors.items() if "embed" not in k})
    state, rng_tensors = rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state, rng_tensors)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.parametrize("kind", ["megalodon", "llama"])
def test_resume_continues_bit_exactly(tmp_path, corpus, kind):
    """The loss curve of 2N steps equals N steps + save + resume + N steps, bit for bit (CPU)."""
    cfg = config(model=kind, steps=6, batch_size=2, accumulate=2, warmup=2)
    straight = Trainer(cfg, device="cpu", corpus=corpus)
    expected = [straight.train_step().loss for _ in range(6)]
    first = Trainer(cfg, device="cpu", corpus=corpus)
    losses = [first.train_step().loss for _ in range(3)]
    first.save(tmp_path)
    del first
    torch.manual_seed(12345)  # whatever the RNG did meanwhile is undone by the resume
    second = Trainer.resume(tmp_path, device="cpu", corpus=corpus)
    assert second.step == 3
    losses += [second.train_step().loss for _ in range(3)]
    assert losses == expected
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_trainer_reads_consecutive_windows_per_step(corpus):
    trainer = Trainer(config(accumulate=2), device="cpu", corpus=corpus)
    sampler = WindowSampler(corpus[0], 32, seed=0)
    batch = trainer.global_batch(3)
    windows = sampler.batch(3 * 6, 6)
    assert torch.equal(batch.inputs, windows[:, :-1]) and torch.equal(batch.targets, windows[:, 1:])
    micro = trainer.micro_batches(3)
    assert len(micro) == 2 and torch.equal(torch.cat([m[0] for m in micro]), batch.inputs)
    assert trainer.tokens_per_step == 6 * 32


def test_run_evaluates_and_stops_when_asked(corpus):
    trainer = Trainer(config(steps=10), device="cpu", corpus=corpus)
    evals, steps = [], []
    finished = trainer.run(10, eval_every=4, eval_windows=2, on_step=lambda r: steps.append(trainer.step),
                           on_eval=lambda r: evals.append(trainer.step), should_stop=lambda: trainer.step >= 6)
    assert not finished and trainer.step == 6 and evals == [4] and steps == list(range(1, 7))
    assert trainer.run(10, eval_every=4, eval_windows=2, on_eval=lambda r: evals.append(trainer.step))
    assert trainer.step == 10 and evals == [4, 8, 10]


def test_resume_refuses_other_settings_other_data_and_plain_checkpoints(tmp_path, corpus):
    trainer = Trainer(config(), device="cpu", corpus=corpus)
    trainer.train_step()
    trainer.save(tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"other settings: model \(checkpoint 'megalodon', asked 'llama'\)"):
        Trainer.resume(tmp_path / "run", expected=config(model="llama"), corpus=corpus)
    other_text = (corpus[1], corpus[0])  # the validation files as training data
    with pytest.raises(CheckpointError, match="is different"):
        Trainer.resume(tmp_path / "run", corpus=other_text)
    save_checkpoint(trainer.model, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no training state"):
        Trainer.resume(tmp_path / "plain", corpus=corpus)


def test_probe_batches_feed_a_trainer():
    def batches(first, rows):
        inputs = torch.arange(first, first + rows)[:, None].repeat(1, 16) % 200
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[:, -1] = 5
        return ProbeBatch(inputs, targets)

    trainer = Trainer(config(context=16, steps=3), device="cpu", batches=batches)
    assert torch.equal(trainer.global_batch(2).inputs[:, 0], torch.tensor([6, 7, 8]))
    assert all(math.isfinite(trainer.train_step().loss) for _ in range(3))
    with pytest.raises(ValueError, match="no validation text"):
        trainer.evaluate()


@pytest.mark.parametrize("kind", ["megalodon", "llama"])
def test_stream_generate_equals_generate(kind):
    torch.manual_seed(0)
    model = build_model(model_config(config(model=kind))).eval()
    prompt = torch.randint(0, 257, (1, 40))  # longer than a Megalodon chunk: read in pieces
    streamed = list(stream_generate(model, prompt, 12, temperature=0.9, top_k=30,
                                    generator=torch.Generator().manual_seed(4)))
    expected = model.generate(prompt, 12, temperature=0.9, top_k=30, generator=torch.Generator().manual_seed(4))
    assert streamed == expected[0].tolist()


def test_loss_and_gradient_hooks_are_called_each_step(corpus):
    calls = {"loss": 0, "reduce": 0}

    def counting_loss(model, inputs, targets):
        calls["loss"] += 1
        from megalodon_lite.train import lm_loss
        return lm_loss(model, inputs, targets)

    def reduce(model):  # what an all-reduce would see: every gradient already accumulated
        calls["reduce"] += 1
        assert all(p.grad is not None for p in model.parameters())

    trainer = Trainer(config(accumulate=3), device="cpu", corpus=corpus, loss_fn=counting_loss,
                      reduce_gradients=reduce)
    trainer.train_step()
    trainer.train_step()
    assert calls == {"loss": 6, "reduce": 2}
