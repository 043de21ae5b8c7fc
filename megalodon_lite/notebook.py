"""What every chapter needs before its first cell of maths: sizes, device, seeds, figures.

Environment variables (read when this module is imported):

- ``MEGALODON_SMOKE=1``: tiny sizes, so each chapter runs top to bottom on a laptop CPU in seconds.
  The test suite and ``python -m megalodon_lite.book`` (without ``--full``) set it.
- ``MEGALODON_WRITE_FIGURES=1``: :func:`save_figure` writes into ``figures/``; otherwise it writes
  nothing, so running the tests never rewrites committed images.
- ``MEGALODON_DEVICE``: force a device (``cpu``, ``cuda``); by default CUDA when present.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}

SMOKE: bool = os.environ.get("MEGALODON_SMOKE", "").strip().lower() in _TRUE
"""True when chapters should pick tiny sizes."""

FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"


def pick(smoke: T, full: T) -> T:
    """The smoke-mode value when ``MEGALODON_SMOKE`` is set, else the full-size one."""
    return smoke if SMOKE else full


def pick_device() -> torch.device:
    """CUDA when available (or whatever ``MEGALODON_DEVICE`` says), else the CPU."""
    forced = os.environ.get("MEGALODON_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              device: torch.device | str | None = None, reduce: str = "median") -> float:
    """Seconds one call of ``fn()`` takes: ``warmup`` untimed calls, then ``repeats`` timed ones.

    On CUDA the device is synchronised around every timed call (kernels run asynchronously, so a
    host clock alone would time the launch, not the work). ``reduce`` is ``"median"`` (robust to
    a busy machine) or ``"min"`` (the best case). For kernel benchmarks use
    ``triton.testing.do_bench``; this is for the chapters' rough scaling plots.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if reduce not in ("median", "min"):
        raise ValueError(f"reduce must be 'median' or 'min', got {reduce!r}")
    sync = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) if reduce == "median" else min(times)


def require_cuda() -> torch.device:
    """The CUDA device, for the cells tagged ``gpu`` that close a chapter (section "On a GPU").

    Raises:
        RuntimeError: when no CUDA device is present. A reader's "Run All" then stops at the first
            such cell, after every CPU cell of the chapter has run (the tests and the book build skip
            these cells without CUDA).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("this cell needs a CUDA GPU (it is tagged 'gpu'); everything above ran without one")
    return torch.device("cuda")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) so a chapter prints the same numbers each run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def writing_figures() -> bool:
    """Whether :func:`save_figure` writes (``MEGALODON_WRITE_FIGURES`` is set)."""
    return os.environ.get("MEGALODON_WRITE_FIGURES", "").strip().lower() in _TRUE


def save_figure(fig, name: str, *, write: bool | None = None, directory: Path | None = None) -> Path | None:
    """Save ``fig`` as ``figures/<name>.png`` only when explicitly asked.

    Args:
        fig: a matplotlib figure.
        name: file stem, letters, digits, ``_`` and ``-`` only.
        write: True/False to decide here; None (default) follows ``MEGALODON_WRITE_FIGURES``.
        directory: where to write (default: the repository's ``figures/``).

    Returns:
        The path written, or None when nothing was written.
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"name must be a non-empty file stem of letters, digits, '_' or '-', got {name!r}")
    if not (writing_figures() if write is None else write):
        return None
    directory = FIGURES_DIR if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    tmp.replace(path)
    return path
