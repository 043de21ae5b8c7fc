"""The header every results file of the workbench starts with: what ran, where, with what, when.

    header = results_header()                                # CUDA: the current device's name
    header = results_header("cpu (interpreter)", copy_TBps=copy_tbps)

Keys, in this order: ``device``, the versions asked for (``torch``, ``triton``, ``python``, in that
order), ``date`` (UTC, ISO 8601 to the second: ``2026-11-30T13:00:17+00:00``) and ``command``
(``python kernels/<script>.py --its --arguments``, the script's path relative to the repository,
each argument quoted for a POSIX shell as needed); then the script's own keys in the order given.
Only the standard library at import: torch and triton are imported when their versions are read.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("torch", "triton", "python")   # the order they appear in, whichever are asked for


def version_of(library: str) -> str | None:
    """``torch``, ``triton`` or ``python``'s version string; None for a library that is not installed."""
    if library == "python":
        return platform.python_version()
    try:
        module = __import__(library)
    except ImportError:
        return None
    return module.__version__


def command_line(argv: Sequence[str] | None = None, launcher: Sequence[str] = ("python",)) -> str:
    """The shell command that ran ``argv`` (default ``sys.argv``: the script, then its arguments),
    the script's path relative to the repository (as typed when it lies elsewhere)."""
    script, *arguments = sys.argv if argv is None else argv
    path = Path(script)
    try:
        script = str(path.resolve().relative_to(ROOT))
    except ValueError:
        script = str(path)
    return shlex.join([*launcher, script, *arguments])


def results_header(device_label: str | None = None, *, versions: Sequence[str] = ("torch", "triton"),
                   argv: Sequence[str] | None = None, launcher: Sequence[str] = ("python",),
                   device_key: str = "device", **extra: object) -> dict[str, object]:
    """The common header of a results file, then ``extra`` (the script's own keys).

    ``device_label``: None for the current CUDA device's name (``torch.cuda.get_device_name()``),
    or what ran instead (``"cpu (interpreter)"``, ``"cpu dry run"``, ...), under ``device_key``.
    ``versions``: which of ``torch``, ``triton``, ``python`` to record. ``argv`` and ``launcher``:
    see ``command_line`` (``launcher=("torchrun", "--nproc-per-node", "2")`` for a torchrun script).
    """
    unknown = sorted(set(versions) - set(VERSIONS))
    if unknown:
        raise ValueError(f"versions must be some of {VERSIONS}, got {unknown}")
    clash = sorted(set(extra) & {device_key, *VERSIONS, "date", "command"})
    if clash:
        raise ValueError(f"extra keys {clash} would replace the header's own")
    if device_label is None:
        import torch  # noqa: PLC0415  (only the CUDA case needs it)

        device_label = torch.cuda.get_device_name()
    return {device_key: device_label,
            **{library: version_of(library) for library in VERSIONS if library in versions},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(argv, launcher), **extra}
