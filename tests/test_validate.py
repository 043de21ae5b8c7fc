"""megalodon_lite.validate.tokens, the check on every model forward: its bounds at both ends and its messages."""

from __future__ import annotations

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

