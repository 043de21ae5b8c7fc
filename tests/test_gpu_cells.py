"""Cells tagged `gpu` are skipped under nbval when no CUDA device is present (the conftest hook)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows the CPU behaviour")
def test_gpu_tagged_cell_is_skipped_and_the_rest_runs(pytester: pytest.Pytester) -> None:
    shutil.copy(ROOT / "conftest.py", pytester.path / "conftest.py")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise RuntimeError('this cell needs a GPU')", metadata={"tags": ["gpu"]}),
        nbformat.v4.new_code_cell("assert x == 1"),
    ]
    nbformat.write(nb, pytester.path / "probe.ipynb")
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest_subprocess("--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
                                           "probe.ipynb", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*cell tagged 'gpu' and no CUDA device is present*"])
