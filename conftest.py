"""Test-session setup shared by the package tests and the chapter notebooks.

- Smoke sizes for every chapter, a non-interactive matplotlib backend, and the Triton interpreter
  when there is no GPU (set before anything imports triton).
- Before collection, every ``chapters/NN_slug.py`` is written as ``build/notebooks/NN_slug.ipynb``
  so that nbval (``--nbval-lax``, configured in pyproject.toml) runs the chapters as notebooks.
- Cells tagged ``gpu`` are skipped when no CUDA device is present.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MEGALODON_SMOKE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402  (after the environment is set)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent
NOTEBOOK_DIR = ROOT / "build" / "notebooks"
GPU_TAG = "gpu"


def pytest_configure(config: pytest.Config) -> None:
    from megalodon_lite.book import write_notebooks

    write_notebooks(NOTEBOOK_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="cell tagged 'gpu' and no CUDA device is present")
    for item in items:
        cell = getattr(item, "cell", None)  # nbval's notebook-cell items carry the cell
        if cell is not None and GPU_TAG in cell.get("metadata", {}).get("tags", []):
            item.add_marker(skip)
