"""Checkpoints (chapter 07): bit-exact round trip, clear refusals, atomic saves."""

from __future__ import annotations

import json
import os

import pytest
import torch

import megalodon_lite.checkpoint as checkpoint
from megalodon_lite.checkpoint import CheckpointError, load_checkpoint, load_config, save_checkpoint
from megalodon_lite.config import preset
from megalodon_lite.model import MegalodonLM


def small_model(seed: int = 0, **changes) -> MegalodonLM:
    torch.manual_seed(seed)
    cfg = preset("tiny", model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=32, norm_num_groups=4,
                 chunk_size=8, **changes)
    return MegalodonLM(cfg).eval()


def assert_same_weights(a: MegalodonLM, b: MegalodonLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("share_emb", [False, True])
def test_round_trip_is_bit_exact(tmp_path, share_emb):
    model = small_model(share_emb=share_emb)
    folder = save_checkpoint(model, tmp_path / "ckpt")
    restored = load_checkpoint(folder)
    assert restored.config == model.config
    assert_same_weights(model, restored)
    assert (restored.head.weight is restored.embed.weight) == share_emb
    tokens = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], restored(tokens)[0])
    # loading into an existing model with the same config
    other = small_model(seed=1, share_emb=share_emb)
    load_checkpoint(folder, other)
    assert_same_weights(model, other)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", json.loads(
        (folder / "config.json").read_text())["weights"]]
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in folder.iterdir())  # as any new file


def test_a_new_model_comes_back_in_eval_mode_an_existing_one_keeps_its_mode(tmp_path):
    folder = save_checkpoint(small_model().train(), tmp_path)
    assert not load_checkpoint(folder).training  # ready for inference: dropout off
    for mode in (True, False):
        target = small_model(seed=1).train(mode)
        assert load_checkpoint(folder, target) is target and target.training == mode
        assert all(m.training == mode for m in target.modules())


def test_bf16_round_trip_keeps_the_dtype(tmp_path):
    model = small_model().to(torch.bfloat16)
    restored = load_checkpoint(save_checkpoint(model, tmp_path))
    assert all(p.dtype == torch.bfloat16 for p in restored.parameters())
    assert_same_weights(model, restored)
    into_float32 = load_checkpoint(tmp_path, small_model(seed=1))  # an existing model keeps its dtype
    assert all(p.dtype == torch.float32 for p in into_float32.parameters())
    assert all(torch.equal(a.float(), b) for a, b in zip(model.parameters(), into_float32.parameters()))


def test_mismatched_config_is_refused_naming_the_fields(tmp_path):
    folder = save_checkpoint(small_model(), tmp_path)
    with pytest.raises(CheckpointError, match=r"num_layers \(checkpoint 2, model 3\)"):
        load_checkpoint(folder, small_model(num_layers=3))
    with pytest.raises(CheckpointError, match="chunk_size"):
        load_checkpoint(folder, MegalodonLM(load_config(folder).replace(chunk_size=16)))


def test_truncated_or_corrupted_weights_are_refused(tmp_path):
    folder = save_checkpoint(small_model(), tmp_path)
    weights = next(folder.glob("model-*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_checkpoint(folder, verify=False)  # safetensors itself notices the missing bytes
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # one byte of tensor data: only the hash can notice
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(folder)
    # a refused load leaves the target model exactly as it was (nothing half-loaded)
    target = small_model(seed=1)
    before = {name: t.clone() for name, t in target.state_dict().items()}
    weights.write_bytes(data[: len(data) // 2])
    for verify in (True, False):
        with pytest.raises(CheckpointError):
            load_checkpoint(folder, target, verify=verify)
        assert all(torch.equal(before[name], t) for name, t in target.state_dict().items())


@pytest.mark.parametrize("damage, words", [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: text.replace('"megalodon-lite"', '"other"'), "format"),
    (lambda text: text.replace('"version": 1', '"version": 99'), "version"),
    (lambda text: text.replace('"num_heads": 2', '"num_heads": 3'), "z_dim"),
    (lambda text: text.replace('"num_heads"', '"n_heads"'), "n_heads"),
])
def test_damaged_config_json_is_refused(tmp_path, damage, words):
    folder = save_checkpoint(small_model(), tmp_path)
    path = folder / "config.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(folder)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("fail_at", ["weights", "commit"])
def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, fail_at):
    good = small_model(seed=0)
    folder = save_checkpoint(good, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    if fail_at == "weights":  # die half-way through writing the new weights file
        real_save_file = checkpoint.save_file

        def save_file_then_fail(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(100)
            raise OSError("disk full")

        monkeypatch.setattr(checkpoint, "save_file", save_file_then_fail)
    else:  # die at the very last step, replacing config.json
        real_replace = checkpoint.os.replace

        def replace_but_not_config(src, dst):
            if str(dst).endswith("config.json"):
                raise OSError("power cut")
            real_replace(src, dst)

        monkeypatch.setattr(checkpoint.os, "replace", replace_but_not_config)

    with pytest.raises(OSError):
        save_checkpoint(small_model(seed=1), folder)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == before  # no temporary file, no half-written file, old files byte-identical
    assert_same_weights(good, load_checkpoint(folder))


def test_saving_twice_replaces_and_cleans_up(tmp_path):
    save_checkpoint(small_model(seed=0), tmp_path)
    second = small_model(seed=1)
    save_checkpoint(second, tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 1
    assert not list(tmp_path.glob(".tmp-*"))
    assert_same_weights(second, load_checkpoint(tmp_path))


def test_save_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(TypeError, match="MegalodonLM"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path)


def test_training_state_is_saved_beside_the_weights_and_verified(tmp_path):
    model = small_model()
    state = {"step": 7, "note": "anything JSON can hold"}
    tensors = {"optimizer/embed.weight/exp_avg": torch.randn(3, 4), "rng/torch": torch.get_rng_state()}
    folder = save_checkpoint(model, tmp_path, training=state, training_tensors=tensors)
    manifest = json.loads((folder / "config.json").read_text())
    assert manifest["model"] == "megalodon" and manifest["training"]["state"] == state
    loaded_state, loaded = checkpoint.load_training_state(folder)
    assert loaded_state == state and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert_same_weights(model, load_checkpoint(folder))  # still an ordinary model checkpoint
    training_file = folder / manifest["training"]["tensors"]
    data = training_file.read_bytes()
    training_file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="training state file .* truncated or corrupted"):
        checkpoint.load_training_state(folder)
    # saving a plain model into the folder replaces the training state: its file goes too
    save_checkpoint(model, folder)
    assert not list(folder.glob("training-*.safetensors"))
    with pytest.raises(CheckpointError, match="no training state"):
        checkpoint.load_training_state(folder)


def test_training_state_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(small_model(), tmp_path, training={"bad": object()})
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(ValueError, match="training state dict"):
        save_checkpoint(small_model(), tmp_path, training_tensors={"a": torch.zeros(1)})


def test_failed_training_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    folder = save_checkpoint(small_model(seed=0), tmp_path, training={"step": 1}, training_tensors={"x": torch.ones(2)})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_replace = checkpoint.os.replace

    def replace_but_not_config(src, dst):
        if str(dst).endswith("config.json"):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace_but_not_config)
    with pytest.raises(OSError):
        save_checkpoint(small_model(seed=1), folder, training={"step": 2}, training_tensors={"x": torch.zeros(2)})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert checkpoint.load_training_state(folder)[0] == {"step": 1}
