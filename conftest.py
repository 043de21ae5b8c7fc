"""Test-session setup shared by the package tests and the chapter notebooks.

- Smoke sizes for every chapter, a non-interactive matplotlib backend, exercise checks that must
  pass, and the Triton interpreter when there is no GPU (set before anything imports triton).
- When this file is imported, every ``chapters/NN_slug.py`` is written as
  ``build/notebooks/NN_slug.ipynb`` so that nbval (``--nbval-lax``, configured in pyproject.toml)
  runs the chapters as notebooks. It must happen at import: pytest expands ``testpaths`` right
  after loading this file, and a folder that does not exist yet (a fresh clone) would be dropped.
- A plain ``pytest`` (``testpaths``) that collects no chapter is an error, not a silent pass.
- Cells tagged ``gpu`` are skipped when no CUDA device is present.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MEGALODON_SMOKE", "1")
# The chapters run with their solutions (the teacher edition): an exercise check that does not
# pass fails its chapter instead of printing a hint (megalodon_lite.exercises.check).
os.environ.setdefault("MEGALODON_CHECKS_MUST_PASS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402  (after the environment is set)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent
NOTEBOOK_DIR = ROOT / "build" / "notebooks"
GPU_TAG = "gpu"

from megalodon_lite.book import write_notebooks  # noqa: E402

CHAPTER_NOTEBOOKS = write_notebooks(NOTEBOOK_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        collected = {Path(str(item.path)).resolve() for item in items}
        missing = [nb.name for nb in CHAPTER_NOTEBOOKS if nb.resolve() not in collected]
        if missing:
            raise pytest.UsageError(f"chapters not collected as notebooks: {missing} (is nbval installed?)")
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="cell tagged 'gpu' and no CUDA device is present")
    for item in items:
        cell = getattr(item, "cell", None)  # nbval's notebook-cell items carry the cell
        if cell is not None and GPU_TAG in cell.get("metadata", {}).get("tags", []):
            item.add_marker(skip)
