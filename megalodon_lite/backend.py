"""Which implementation runs an op: the Triton kernels (chapters 08-09) or plain PyTorch (04-06).

One switch, in two places:

- the ``backend`` field of :class:`~megalodon_lite.config.MegalodonConfig` (and the ``backend``
  attribute of the modules that have a kernel: ``CEMA``, ``TimestepNorm``, ``ChunkAttention``);
- the environment variable ``MEGALODON_BACKEND``, read at each call.

Each holds ``"auto"``, ``"triton"`` or ``"torch"``. An explicit ``"triton"`` or ``"torch"`` on the
module wins; a module left at ``"auto"`` (the default) follows the environment variable; with
both at ``"auto"`` the kernels run on CUDA tensors and PyTorch runs everywhere else. ``"triton"``
on CPU tensors needs the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported, as the test suite does), and is refused with a clear error otherwise.

An op whose kernel does not cover a case (float64 inputs, attention dropout, ...) falls back to
PyTorch under ``"auto"`` by a rule its own docstring states; under an explicit ``"triton"`` that
case is an error rather than a silent fallback.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MEGALODON_BACKEND"


def check_backend(value: object, name: str = "backend") -> str:
    """``value`` if it is one of :data:`BACKENDS`, else a ValueError naming ``name``."""
    if value not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {value!r}")
    return value  # type: ignore[return-value]


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for: ``backend`` unless it is ``"auto"``, then ``MEGALODON_BACKEND``."""
    check_backend(backend)
    if backend != "auto":
        return backend
    return check_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "yes", "on"}


def use_triton(backend: str, device: torch.device, *, supported: bool = True, why_not: str = "") -> bool:
    """Whether an op on tensors of ``device`` runs its Triton kernel.

    Args:
        backend: the module's setting (``"auto"``, ``"triton"``, ``"torch"``).
        device: where the op's inputs live.
        supported: False when the kernel does not cover this call (the op says why in ``why_not``):
            ``"auto"`` then takes PyTorch, an explicit ``"triton"`` raises.

    Raises:
        ValueError: ``"triton"`` was asked for a call the kernel does not cover.
        RuntimeError: ``"triton"`` was asked for CPU tensors without the Triton interpreter.
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return False
    if choice == "auto":
        return supported and device.type == "cuda"
    if not supported:
        raise ValueError(f"backend 'triton' was requested but the kernel does not cover this call: {why_not}")
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(f"backend 'triton' on {device.type} tensors needs a CUDA device or the Triton "
                           "interpreter (set TRITON_INTERPRET=1 before triton is imported)")
    return True
