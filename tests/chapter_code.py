"""A chapter's definitions without its computations, for tests that check what a chapter shows.

Timing claims and widget contracts are tested here, out of the reader's path (CONTRIBUTING.md), but
against the chapter's own code: :func:`chapter_definitions` executes, from every CPU code cell of a
chapter, only its imports, its function and class definitions and its UPPER_CASE constants, so
nothing is measured, plotted or printed. A test that uses a name the chapter no longer defines
fails with a KeyError naming it.
"""

from __future__ import annotations

import __future__
import ast
from pathlib import Path

CHAPTERS_DIR = Path(__file__).resolve().parents[1] / "chapters"
_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _is_definition(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        return False  # every cell is compiled with postponed annotations instead
    if isinstance(node, _DEFINITIONS):
        return True
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return bool(targets) and all(isinstance(t, ast.Name) and t.id.isupper() for t in targets)


def chapter_path(number: str) -> Path:
    """``chapters/<number>_*.py``."""
    (path,) = CHAPTERS_DIR.glob(f"{number}_*.py")
    return path


def chapter_definitions(number: str, **given: object) -> dict[str, object]:
    """The namespace of chapter ``number``'s imports, definitions and constants (gpu cells left out).

    ``given`` seeds the namespace with what a definition needs from the chapter's computations
    (e.g. a default argument computed in an earlier cell).
    """
    import jupytext

    path = chapter_path(number)
    namespace: dict[str, object] = {"__name__": f"chapter_{number}", **given}
    for index, cell in enumerate(jupytext.read(path).cells):
        if cell.cell_type != "code" or "gpu" in cell.metadata.get("tags", []):
            continue
        tree = ast.parse(cell.source)
        module = ast.Module(body=[node for node in tree.body if _is_definition(node)], type_ignores=[])
        code = compile(module, f"{path.name} cell {index}", "exec", flags=__future__.annotations.compiler_flag,
                       dont_inherit=True)
        exec(code, namespace)  # noqa: S102 - the book's own chapters
    return namespace


EXERCISES_HEADING = "## Exercises"
EXERCISE_CHAPTERS = ["00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11"]
"""Chapters that end with exercises (CONTRIBUTING.md, "Exercises"); add a chapter when it gets its own."""


def exercise_section(cells: list) -> list:
    """The cells of a chapter's ``## Exercises`` section: from its heading up to the next ``## ``
    heading (``## On a GPU``) or the end; empty if the chapter has none."""
    start = next((i for i, c in enumerate(cells) if c.cell_type == "markdown"
                  and c.source.startswith(EXERCISES_HEADING)), None)
    if start is None:
        return []
    end = next((i for i in range(start + 1, len(cells)) if cells[i].cell_type == "markdown"
                and cells[i].source.startswith("## ")), len(cells))
    return cells[start:end]
