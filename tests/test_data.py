"""Data (chapter 10): the byte corpus and its split, training windows, and the recall probes."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from megalodon_lite.data import (EOD, IGNORE_INDEX, VOCAB_SIZE, DataError, WindowSampler, decode, document_windows,
                                 encode, evaluation_windows, is_validation, load_corpus, mqar_batch, passkey_batch,
                                 stdlib_files)


def write_files(folder: Path, count: int = 60, size: int = 300) -> dict[str, bytes]:
    """``count`` files of distinct text (nested one level), a hidden file and an empty one."""
    files = {}
    for i in range(count):
        name = f"pkg{i % 3}/module_{i:03d}.py"
        files[name] = (f"# module {i}\n" + "".join(f"value_{i}_{j} = {i * j}\n" for j in range(size // 20))).encode()
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(files[name])
    (folder / ".hidden.py").write_text("secret = 1\n")
    (folder / "empty.py").write_text("")
    return files


def test_encode_decode_round_trip_and_separator():
    text = "déjà vu → ok\n"
    tokens = encode(text)
    assert tokens.dtype == torch.int64 and tokens.tolist() == list(text.encode())
    assert decode(torch.cat([tokens, torch.tensor([EOD]), encode("next")])) == text + "\n<|eod|>\nnext"
    assert decode([0xE2, 0x82]) == "\ufffd"  # a cut UTF-8 sequence is replaced, not an exception
    assert VOCAB_SIZE == 257
    with pytest.raises(ValueError, match=r"\[0, 257\)"):
        decode([300])


def test_split_is_a_function_of_the_path_alone():
    names = [f"dir/file_{i}.py" for i in range(4000)]
    held = [is_validation(n) for n in names]
    assert held == [is_validation(n) for n in names]
    assert 0.03 < sum(held) / len(held) < 0.07  # 5% of a uniform hash, give or take sampling noise
    assert sum(is_validation(n, 50) for n in names) > sum(held)


def test_folder_corpus_splits_by_file_and_streams_bytes(tmp_path):
    files = write_files(tmp_path)
    train, val = load_corpus(tmp_path, val_percent=20)
    names = [d.name for d in train.documents] + [d.name for d in val.documents]
    assert sorted(names) == sorted(files)  # hidden and empty files are skipped, every other file once
    assert {d.name for d in val.documents} == {n for n in files if is_validation(n, 20)}
    for corpus in (train, val):
        assert corpus.tokens.dtype == torch.int16 and len(corpus) == sum(d.size + 1 for d in corpus.documents)
        for start, doc in zip(corpus.starts.tolist(), corpus.documents):
            assert bytes(corpus.tokens[start:start + doc.size].tolist()) == files[doc.name]
            assert int(corpus.tokens[start + doc.size]) == EOD
    assert train.fingerprint() == load_corpus(tmp_path, val_percent=20)[0].fingerprint()


def test_single_file_is_split_at_the_end_of_its_stream(tmp_path):
    path = tmp_path / "book.txt"
    text = ("It was a dark and stormy night. " * 400).encode()
    path.write_bytes(text)
    train, val = load_corpus(path, val_percent=10)
    assert len(train) + len(val) == len(text) + 1
    assert torch.equal(torch.cat([train.tokens, val.tokens]).long(), torch.cat([encode(text), torch.tensor([EOD])]))
    assert 0.08 < len(val) / (len(text) + 1) < 0.12


@pytest.mark.parametrize("make, words", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "holds no files"),
])
def test_missing_or_empty_data_is_refused(tmp_path, make, words):
    with pytest.raises(DataError, match=words):
        load_corpus(make(tmp_path))


def test_only_empty_files_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError, match="every file is empty"):
        load_corpus(tmp_path)
    with pytest.raises(ValueError, match="val_percent"):
        load_corpus(tmp_path, val_percent=0)


def test_stdlib_files_are_the_standard_library_sources():
    root, files = stdlib_files()
    assert root == Path(sysconfig.get_paths()["stdlib"]) and len(files) > 100
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert files == sorted(files)


def test_windows_are_contiguous_visited_once_per_epoch_and_reproducible(tmp_path):
    write_files(tmp_path)
    train, _ = load_corpus(tmp_path)
    sampler = WindowSampler(train, length=37, seed=3)
    n = sampler.num_windows
    epoch0, epoch1 = sampler.starts(0, n), sampler.starts(n, n)
    assert sorted(epoch0.tolist()) == [37 * j for j in range(n)]  # a permutation of the cut
    offsets = {s % 37 for s in epoch1.tolist()}
    assert len(offsets) == 1 and len(set(epoch1.tolist())) == n  # epoch 1: one shifted cut, each window once
    assert not torch.equal(epoch0, epoch1)
    batch = sampler.batch(n - 2, 4)  # across the epoch boundary
    for row, start in zip(batch, sampler.starts(n - 2, 4)):
        assert torch.equal(row, train.tokens[start:start + 38].long())
    assert torch.equal(WindowSampler(train, 37, seed=3).batch(n - 2, 4), batch)
    assert not torch.equal(WindowSampler(train, 37, seed=4).starts(0, n), epoch0)
    with pytest.raises(DataError, match="too short"):
        WindowSampler(train, length=len(train))


def test_evaluation_and_document_windows(tmp_path):
    write_files(tmp_path, size=600)
    train, _ = load_corpus(tmp_path)
    windows = evaluation_windows(train, 50, max_windows=5)
    assert windows.shape == (5, 51)
    assert torch.equal(windows[1], train.tokens[50:101].long())
    docs = document_windows(train, 100)
    long_docs = [(s, d) for s, d in zip(train.starts.tolist(), train.documents) if d.size >= 101]
    assert docs.shape == (len(long_docs), 101) and len(long_docs) > 0
    assert (docs != EOD).all()  # every window lies inside its document
    assert document_windows(train, 10_000).shape == (0, 10_001)
    with pytest.raises(DataError, match="too short"):
        evaluation_windows(train, len(train), 1)


@pytest.mark.parametrize("seed", [0, 5])
def test_mqar_answers_are_the_values_of_the_queried_keys(seed):
    batch = mqar_batch(3, 96, num_pairs=10, seed=seed)
    assert batch.inputs.shape == batch.targets.shape == (3, 96)
    for row, targets in zip(batch.inputs, batch.targets):
        keys, values = row[0:20:2], row[1:20:2]
        assert len(set(keys.tolist())) == 10 and keys.min() >= 1 and keys.max() < 128 and values.min() >= 128
        pairs = dict(zip(keys.tolist(), values.tolist()))
        asked = (targets != IGNORE_INDEX).nonzero().flatten()
        assert len(asked) == 10 and asked.min() >= 20 and sorted(row[asked].tolist()) == sorted(pairs)
        assert all(pairs[int(row[t])] == int(targets[t]) for t in asked)
    again = mqar_batch(3, 96, num_pairs=10, seed=seed)
    assert torch.equal(again.inputs, batch.inputs) and torch.equal(again.targets, batch.targets)
    with pytest.raises(ValueError, match="num_pairs"):
        mqar_batch(1, 1000, num_pairs=128, seed=0)
    with pytest.raises(ValueError, match="length"):
        mqar_batch(1, 30, num_pairs=10, seed=0)


def test_passkey_hides_the_key_and_asks_for_it():
    batch = passkey_batch(4, 500, seed=1)
    assert batch.inputs.shape == (4, 500)
    keys = set()
    for row, targets in zip(batch.inputs, batch.targets):
        asked = targets != IGNORE_INDEX
        assert asked.sum() == 5 and asked[-5:].all()
        key = bytes(targets[asked].tolist()).decode()
        text = decode(torch.cat([row, targets[-1:]]))
        assert key.isdigit() and text.count(f"The pass key is {key}. Remember it.") == 1
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        keys.add(key)
    assert len(keys) > 1
    assert torch.equal(passkey_batch(4, 500, seed=1).inputs, batch.inputs)
    with pytest.raises(ValueError, match="length must be at least"):
        passkey_batch(1, 100, seed=0)
