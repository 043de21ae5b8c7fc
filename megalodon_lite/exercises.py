"""Checks for the chapters' exercises: the reader's function against the package's own.

A checkable exercise (CONTRIBUTING.md, "Exercises") is a code cell where the reader writes a
function, the solution between nbgrader's ``### BEGIN SOLUTION`` / ``### END SOLUTION`` markers,
followed by a check cell::

    check(my_ema, reference=ema_recurrence, make_inputs=ema_inputs, hint="h_0 = (1 - alpha) * 0 + alpha * x_0")

:func:`check` calls both functions on a few random inputs (``make_inputs(generator)`` returns the
positional arguments as a tuple, or keyword arguments as a dict; shapes may be random too) and
prints one line: a pass, "not yet implemented" while the function still raises
``NotImplementedError`` (the student edition's stub), or what differs, where, and the hint. It
never raises in a reader's notebook, so Run All goes on. Where a check must pass, anything else
raises ``AssertionError``: under nbgrader (``NBGRADER_EXECUTION`` set, so the cell scores zero),
and where ``MEGALODON_CHECKS_MUST_PASS=1`` (set by the test suite and the book build, which run
the chapters with their solutions: the teacher edition).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

PASSED, NOT_IMPLEMENTED, FAILED = "passed", "not yet implemented", "failed"
MUST_PASS_VARIABLE = "MEGALODON_CHECKS_MUST_PASS"


@dataclass(frozen=True)
class CheckResult:
    """What :func:`run_check` found: ``status`` is ``"passed"``, ``"not yet implemented"`` or ``"failed"``."""

    name: str
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED


class _Mismatch(Exception):
    """An output differs from the reference (the message says where and how)."""


def _clone(value: Any) -> Any:
    """A copy of the inputs, so a function that writes into them cannot change the other's."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple (e.g. TimestepNormState)
        return type(value)(*(_clone(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, {value.dtype}"
    return type(value).__name__


def _compare(expected: Any, got: Any, rtol: float, atol: float, where: str = "the output") -> float:
    """The largest absolute difference; raises :class:`_Mismatch` saying what is wrong."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise _Mismatch(f"{where} should be a {_describe(expected)}, got a {_describe(got)}")
        if got.shape != expected.shape:
            raise _Mismatch(f"{where} should have shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        if got.dtype != expected.dtype:
            raise _Mismatch(f"{where} should be {expected.dtype}, got {got.dtype}")
        if expected.numel() == 0:
            return 0.0
        got_, expected_ = got.detach().cpu(), expected.detach().cpu()
        if expected_.is_floating_point() or expected_.is_complex():
            close = torch.isclose(got_, expected_, rtol=rtol, atol=atol, equal_nan=True)
        else:
            close = got_ == expected_
        difference = (got_.to(torch.complex128 if expected_.is_complex() else torch.float64)
                      - expected_.to(torch.complex128 if expected_.is_complex() else torch.float64)).abs()
        if not bool(close.all()):
            flat = int((~close).flatten().nonzero()[0])
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), expected_.shape))
            raise _Mismatch(f"{where} differs at index {index}: expected {expected_[index].item():.6g}, "
                            f"got {got_[index].item():.6g} ({int((~close).sum())} of {close.numel()} "
                            f"elements off by more than rtol={rtol:g}, atol={atol:g})")
        return float(difference.nan_to_num(0.0).max())
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise _Mismatch(f"{where} should be a {type(expected).__name__} of {len(expected)} values, "
                            f"got {_describe(got)}" + (f" of {len(got)}" if isinstance(got, (tuple, list)) else ""))
        return max((_compare(e, g, rtol, atol, f"{where}[{i}]") for i, (e, g) in enumerate(zip(expected, got))),
                   default=0.0)
    if isinstance(expected, (int, float, complex)) and not isinstance(expected, bool):
        if not isinstance(got, (int, float, complex)) or isinstance(got, bool):
            raise _Mismatch(f"{where} should be a number, got {_describe(got)}")
        if not (math.isclose(abs(got - expected), 0.0, abs_tol=atol) or math.isclose(got, expected, rel_tol=rtol)):
            raise _Mismatch(f"{where} should be {expected:.6g}, got {got:.6g}")
        return float(abs(got - expected))
    if got != expected:
        raise _Mismatch(f"{where} should be {expected!r}, got {got!r}")
    return 0.0


def _arguments(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


def _shapes(args: tuple, kwargs: dict) -> str:
    parts = [_describe(a) if isinstance(a, torch.Tensor) else repr(a) for a in args]
    parts += [f"{k}={_describe(v) if isinstance(v, torch.Tensor) else repr(v)}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) < 200 else text[:197] + "..."


def run_check(fn: Callable, reference: Callable, make_inputs: Callable[[torch.Generator], Any], *,
              trials: int = 5, seed: int = 0, rtol: float = 1e-5, atol: float = 1e-6,
              name: str | None = None, hint: str | None = None) -> CheckResult:
    """Compare ``fn`` with ``reference`` on ``trials`` random inputs; return what was found.

    Args:
        fn: the reader's function.
        reference: the package's implementation it must agree with.
        make_inputs: ``make_inputs(generator)`` -> a tuple of positional arguments, or a dict of
            keyword arguments (draw shapes and values from ``generator``, a seeded
            ``torch.Generator``). Each function gets its own copy.
        trials: how many inputs (``seed``, ``seed + 1``, ... seed the generator).
        rtol, atol: tolerances of ``torch.isclose`` for every tensor the functions return
            (tuples and lists are compared element by element; shapes and dtypes must match).
        name: what the message calls ``fn`` (default: its ``__name__``).
        hint: a sentence added to the message when the check fails.
    """
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    name = name or getattr(fn, "__name__", "your function")
    reference_name = getattr(reference, "__qualname__", getattr(reference, "__name__", "the reference"))
    reference_module = getattr(reference, "__module__", None)
    if reference_module and reference_module != "__main__":  # a notebook's own function goes by its name
        reference_name = f"{reference_module}.{reference_name}"
    tail = f" Hint: {hint}" if hint else ""
    worst = 0.0
    for trial in range(trials):
        generator = torch.Generator().manual_seed(seed + trial)
        args, kwargs = _arguments(make_inputs(generator))
        expected = reference(*_clone(args), **_clone(kwargs))
        where = f"on input {trial + 1} of {trials} ({_shapes(args, kwargs)})"
        try:
            got = fn(*_clone(args), **_clone(kwargs))
        except NotImplementedError:
            return CheckResult(name, NOT_IMPLEMENTED,
                               f"… {name}: not yet implemented. Replace `raise NotImplementedError()` "
                               "in the cell above with your code, run that cell, then this one.")
        except Exception as err:  # the reader's bug: report it in one line, never a traceback
            return CheckResult(name, FAILED, f"✗ {name} raised {type(err).__name__}: {err} {where}.{tail}")
        try:
            worst = max(worst, _compare(expected, got, rtol, atol))
        except _Mismatch as mismatch:
            return CheckResult(name, FAILED, f"✗ {name}: {mismatch} {where}.{tail}")
    return CheckResult(name, PASSED, f"✓ {name} agrees with {reference_name} on {trials} random inputs "
                                     f"(largest difference {worst:.1e}).")


def must_pass() -> bool:
    """Whether a check that does not pass must raise: nbgrader is grading or validating
    (``NBGRADER_EXECUTION``), or ``MEGALODON_CHECKS_MUST_PASS=1`` (the teacher edition's runs)."""
    return bool(os.environ.get("NBGRADER_EXECUTION")) or os.environ.get(MUST_PASS_VARIABLE, "") == "1"


def check(fn: Callable, reference: Callable, make_inputs: Callable[[torch.Generator], Any], **options: Any) -> None:
    """Print one line: ``fn`` agrees with ``reference``, is not yet implemented, or what differs.

    Takes the arguments of :func:`run_check`. Never raises for the reader's mistakes, except where
    checks must pass (:func:`must_pass`): then anything but a pass raises ``AssertionError``.
    """
    result = run_check(fn, reference, make_inputs, **options)
    print(result.message)
    if must_pass() and not result.passed:
        raise AssertionError(result.message)
