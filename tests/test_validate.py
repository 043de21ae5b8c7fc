"""megalodon_lite.validate.tokens, the check on every model forward: its bounds at both ends, its
messages, and (on a GPU) that it reads the ids' range back to the host once, not once per end."""

from __future__ import annotations

import warnings

import pytest
import torch

from megalodon_lite import validate


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_ids_at_both_ends_of_the_vocabulary_pass(dtype):
    ids = torch.tensor([[0, 17], [255, 3]], dtype=dtype)
    assert validate.tokens(ids, 256) is ids


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("ids, low, high", [
    ([[5, 256], [0, 7]], 0, 256),        # one past the top
    ([[5, -1], [255, 7]], -1, 255),      # one below the bottom
    ([[300, -3], [12, 7]], -3, 300),     # both ends out at once: the message names both
])
def test_ids_outside_the_vocabulary_are_refused_with_the_range_found(dtype, ids, low, high):
    with pytest.raises(ValueError) as info:
        validate.tokens(torch.tensor(ids, dtype=dtype), 256, name="prompt")
    assert str(info.value) == f"prompt must lie in [0, 256) (vocab_size), got ids from {low} to {high}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_host_synchronisation_per_check_on_a_gpu():
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")   # torch warns "called a synchronizing CUDA operation" at each
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            validate.tokens(ids, 256)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in caught]
