"""The package's top-level names: each resolves to the object its module defines."""

from __future__ import annotations

import importlib

import pytest
import torch

import megalodon_lite


@pytest.mark.parametrize("name", megalodon_lite.__all__)
def test_top_level_name_is_the_module_object(name):
    module = importlib.import_module(f"megalodon_lite.{megalodon_lite._EXPORTS[name]}")
    assert getattr(megalodon_lite, name) is getattr(module, name)


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Llama'"):
        megalodon_lite.Llama  # noqa: B018


def test_the_docstring_example_runs():
    from megalodon_lite import MegalodonLM, preset

    torch.manual_seed(0)
    model = MegalodonLM(preset("tiny"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 10))
    logits, state = model(tokens)
    assert logits.shape == (2, 10, model.config.vocab_size) and logits.dtype == torch.float32
    assert state is not None
