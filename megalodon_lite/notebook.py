"""What every chapter needs before its first cell of maths: sizes, device, seeds, figures.

Environment variables (read when this module is imported):

- ``MEGALODON_SMOKE``: ``1`` for tiny sizes (each chapter runs top to bottom on a laptop CPU in
  seconds), ``0`` for full sizes. Unset, the device decides: full size on a CUDA GPU, tiny sizes
  anywhere else (so a chapter opened in JupyterLab on a laptop does not run for minutes). The test
  suite and ``python -m megalodon_lite.book`` (``1`` without ``--full``, ``0`` with it) set it.
  :func:`describe_run` prints which size was chosen and why.
- ``MEGALODON_WRITE_FIGURES=1``: :func:`save_figure` writes into ``figures/``; otherwise it writes
  nothing, so running the tests never rewrites committed images.
- ``MEGALODON_DEVICE``: force a device (``cpu``, ``cuda``); by default CUDA when present.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def pick_device() -> torch.device:
    """CUDA when available (or whatever ``MEGALODON_DEVICE`` says), else the CPU."""
    forced = os.environ.get("MEGALODON_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def smoke_setting(environ: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Whether chapters run at smoke size, and why (the reason :func:`describe_run` prints).

    ``MEGALODON_SMOKE`` decides when it is set (``1``/``true``/``yes``/``on`` or
    ``0``/``false``/``no``/``off``); unset or empty, the device does: full size on CUDA, smoke
    size anywhere else.

    Raises:
        ValueError: ``MEGALODON_SMOKE`` holds something else (a typo must not silently pick a size).
    """
    environ = os.environ if environ is None else environ
    value = environ.get("MEGALODON_SMOKE", "").strip().lower()
    if value in _TRUE:
        return True, "MEGALODON_SMOKE=1"
    if value in _FALSE:
        return False, "MEGALODON_SMOKE=0"
    if value:
        raise ValueError(f"MEGALODON_SMOKE must be 1 or 0 (or unset: the device decides), "
                         f"got {environ['MEGALODON_SMOKE']!r}")
    if pick_device().type == "cuda":
        return False, "a CUDA GPU is present"
    return True, "no CUDA GPU here"


SMOKE, SMOKE_REASON = smoke_setting()
"""True when chapters should pick tiny sizes; and why (an environment variable, or the device)."""

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
"""The checkout this package sits in (``chapters/``, ``kernels/``, ``figures/``); for an installed
wheel, the ``site-packages`` folder, which has none of them."""
FIGURES_DIR = REPOSITORY_ROOT / "figures"
RESULTS_DIRS = (REPOSITORY_ROOT / "kernels" / "results",       # a checkout
                Path(__file__).resolve().parent / "_results")  # an installed wheel


def recorded(name: str) -> Path:
    """A recorded measurement, ``kernels/results/<name>`` of the checkout or the copy an installed
    wheel carries, for the chapters that display GPU results.

    Raises:
        FileNotFoundError: neither has it, naming both places.
    """
    for directory in RESULTS_DIRS:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no recorded result {name!r} in {' or '.join(str(d) for d in RESULTS_DIRS)}")


def recorded_files(pattern: str) -> list[Path]:
    """Every recorded measurement whose name matches the glob ``pattern`` (``"train_compare_*.json"``),
    sorted by name; where the checkout and the installed copy both have a name, the checkout's.
    Empty when none matches (a run not recorded yet)."""
    found: dict[str, Path] = {}
    for directory in RESULTS_DIRS:
        for path in directory.glob(pattern):
            if path.is_file():
                found.setdefault(path.name, path)
    return [found[name] for name in sorted(found)]


def pick(smoke: T, full: T) -> T:
    """The smoke-size value when :data:`SMOKE` holds, else the full-size one."""
    return smoke if SMOKE else full


def run_description(device: torch.device | None = None) -> str:
    """One line saying the size this chapter runs at, on which device, and how to change it."""
    device = pick_device() if device is None else torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    if SMOKE:
        return (f"Smoke size (tiny tensors, seconds per chapter) on {where}: {SMOKE_REASON}. "
                "Full size: set MEGALODON_SMOKE=0 before starting Jupyter.")
    return (f"Full size on {where}: {SMOKE_REASON}. "
            "Tiny sizes: set MEGALODON_SMOKE=1 before starting Jupyter.")


def describe_run(device: torch.device | None = None) -> None:
    """Print :func:`run_description`: every chapter's first code cell calls it."""
    print(run_description(device))


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


class CalmStop(RuntimeError):
    """An expected stop of a reader's "Run All", shown in Jupyter as its one-line message.

    IPython shows an exception through its ``_render_traceback_`` when it has one, so in Jupyter
    this stops the run with its message and no traceback (it is an expected stop, not a
    failure). Anywhere else it is an ordinary ``RuntimeError``.
    """

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


class NoCUDAError(CalmStop):
    """Raised by :func:`require_cuda` without a CUDA device: stops a reader's "Run All" calmly."""


class NeedsCloneError(CalmStop):
    """Raised by :func:`repository_script` where the package was installed without its repository."""


NO_CUDA_MESSAGE = ("Stopped at the GPU section: this cell and the ones after it need a CUDA GPU "
                   "(cells tagged 'gpu'), and there is none here. Everything above ran.")


def require_cuda() -> torch.device:
    """The CUDA device, for the cells tagged ``gpu`` that close a chapter (section "On a GPU").

    Raises:
        NoCUDAError: (a ``RuntimeError``) when no CUDA device is present. A reader's "Run All" then
            stops at the first such cell, after every CPU cell of the chapter has run, with one calm
            line and no traceback (the tests and the book build skip these cells without CUDA).
    """
    if not torch.cuda.is_available():
        raise NoCUDAError(NO_CUDA_MESSAGE)
    return torch.device("cuda")


def repository_script(relative_path: str) -> Path:
    """A script of the repository (``"kernels/bench.py"``), for the gpu cells that run one.

    The scripts that measure on a GPU live in the repository, not in the package, so a chapter
    copied out of an installed wheel (``megalodon-lite chapters DIR``) cannot run them.

    Raises:
        NeedsCloneError: (a ``RuntimeError``, shown in Jupyter as one line without a traceback)
            when this package is not inside a clone of the repository that has the script.
    """
    path = REPOSITORY_ROOT / relative_path
    if not path.is_file():
        raise NeedsCloneError(
            f"This cell runs {relative_path}, a script of the megalodon-lite repository that the installed "
            f"package does not include (it is not in {REPOSITORY_ROOT}): run the chapter from a clone of the "
            "repository, installed there with pip install -e .")
    return path


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
