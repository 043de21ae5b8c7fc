"""Fixtures shared by the tests of the training command (tests/test_cli.py, tests/test_parallel_train.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A folder of 24 small Python-looking text files (a deterministic corpus for `train --data`)."""
    folder = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "(", ")", ":", "import", "class", "for", "in", "\n    "]
    for i in range(24):
        (folder / f"file_{i:02d}.py").write_text(" ".join(rng.choice(words) for _ in range(200 + 30 * i)))
    return folder
