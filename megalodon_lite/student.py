"""The student edition: the chapters as notebooks with the exercises' solutions taken out.

``megalodon-lite book --student OUT/`` (or ``python -m megalodon_lite.book --student OUT/``) writes
``OUT/NN_slug.ipynb`` for every chapter, unexecuted:

- Every region between nbgrader's markers ``### BEGIN SOLUTION`` and ``### END SOLUTION`` is
  replaced as nbgrader's ``ClearSolutions`` replaces it: in a code cell by
  ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` at the indentation of the BEGIN line, in a
  markdown cell by ``YOUR ANSWER HERE``. A teacher who grades with nbgrader can use the chapters'
  markers as they are.
- The first cell installs megalodon-lite when the kernel cannot import it (a JupyterHub or Colab
  kernel), from the source the teacher names at build time (``--install-source``: a requirement
  such as ``megalodon-lite==0.1.0``, or a wheel's URL or path).

``--nbgrader-source DIR`` writes the same notebooks with the solutions kept and the exercise cells
marked with nbgrader's metadata, for a course's ``source/<assignment>/`` folder: ``nbgrader
generate_assignment`` then makes the student version itself and ``nbgrader autograde`` grades the
check cells.

The chapters' side of the convention (CONTRIBUTING.md, "Exercises"): solution regions sit inside
a function body (so a stub only raises when the function is called, and its check cell reports
"not yet implemented" instead of stopping Run All), and each checkable exercise is followed by a
cell tagged ``check`` that calls :func:`megalodon_lite.exercises.check`.
"""

from __future__ import annotations

import re
from pathlib import Path

BEGIN_SOLUTION = "BEGIN SOLUTION"  # nbgrader's delimiters: a line containing them starts/ends a region
END_SOLUTION = "END SOLUTION"
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"  # nbgrader's ClearSolutions.code_stub["python"]
TEXT_STUB = "YOUR ANSWER HERE"  # nbgrader's ClearSolutions.text_stub
CHECK_TAG = "check"
SETUP_TAG = "setup"

INSTALL_CELL = '''\
# Set-up: installs megalodon-lite when this kernel cannot import it (JupyterHub, Colab).
# Where from was chosen by your teacher when this edition was built.
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("megalodon_lite") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", {source!r}])
    importlib.invalidate_caches()
import megalodon_lite

print("megalodon-lite", megalodon_lite.__version__)'''


class SolutionMarkerError(ValueError):
    """A solution region that cannot be cleared (unclosed, nested, or outside a function body)."""


def has_solution(source: str) -> bool:
    """Whether a cell's source holds a solution region."""
    return any(BEGIN_SOLUTION in line for line in source.split("\n"))


def clear_solutions(source: str, *, code: bool, where: str = "cell") -> str:
    """``source`` with every solution region replaced by nbgrader's stub (see the module docstring).

    Raises:
        SolutionMarkerError: a region is nested, not closed, or (in a code cell) starts at the
            left margin: at top level the stub would raise while the cell runs and stop Run All.
    """
    stub = (CODE_STUB if code else TEXT_STUB).split("\n")
    out: list[str] = []
    inside = False
    for number, line in enumerate(source.split("\n"), start=1):
        if BEGIN_SOLUTION in line:
            if inside:
                raise SolutionMarkerError(f"{where}, line {number}: a solution region inside another one")
            indent = re.match(r"\s*", line).group(0)
            if code and not indent:
                raise SolutionMarkerError(
                    f"{where}, line {number}: a solution region at the left margin; put it inside a "
                    "function body, so that the stub only raises when the function is called")
            inside = True
            out += [indent + stub_line for stub_line in stub]
        elif END_SOLUTION in line:
            if not inside:
                raise SolutionMarkerError(f"{where}, line {number}: {END_SOLUTION} without {BEGIN_SOLUTION}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise SolutionMarkerError(f"{where}: {BEGIN_SOLUTION} is never closed by {END_SOLUTION}")
    return "\n".join(out)


def install_cell(install_source: str):
    """The set-up cell that opens every notebook of the student edition."""
    import nbformat

    if not install_source or install_source != install_source.strip() or "\n" in install_source:
        raise ValueError(f"install_source must be one pip requirement, URL or path, got {install_source!r}")
    return nbformat.v4.new_code_cell(INSTALL_CELL.format(source=install_source), metadata={"tags": [SETUP_TAG]})


def student_notebook(chapter: Path, install_source: str):
    """One chapter as a student-edition notebook (nbformat), solutions cleared, set-up cell first."""
    from megalodon_lite.book import read_chapter

    notebook = read_chapter(chapter)
    for number, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type in ("code", "markdown") and has_solution(cell.source):
            cell.source = clear_solutions(cell.source, code=cell.cell_type == "code",
                                          where=f"{Path(chapter).name} cell {number}")
    notebook.cells.insert(0, install_cell(install_source))
    notebook.metadata.pop("jupytext", None)
    return notebook


def nbgrader_metadata(cell, grade_id: str) -> dict | None:
    """nbgrader's cell metadata (schema 3) for an exercise cell, or None for any other cell.

    A code cell with a solution region is an "autograded answer", a markdown one a "manually
    graded answer" (1 point), and a code cell tagged ``check`` is "autograder tests" (1 point;
    :func:`megalodon_lite.exercises.check` raises under nbgrader when it does not pass).
    """
    base = {"grade_id": grade_id, "schema_version": 3, "task": False}
    tags = cell.metadata.get("tags", [])
    if has_solution(cell.source):
        if cell.cell_type == "code":
            return {**base, "grade": False, "locked": False, "solution": True}
        return {**base, "grade": True, "locked": False, "points": 1, "solution": True}
    if cell.cell_type == "code" and CHECK_TAG in tags:
        return {**base, "grade": True, "locked": True, "points": 1, "solution": False}
    return None


def nbgrader_source_notebook(chapter: Path, install_source: str):
    """One chapter for nbgrader's ``source/`` folder: solutions kept, exercise cells marked with
    nbgrader's metadata (so ``nbgrader generate_assignment`` makes the student version), set-up
    cell first."""
    from megalodon_lite.book import read_chapter

    notebook = read_chapter(chapter)
    stem = Path(chapter).stem
    for number, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type in ("code", "markdown") and has_solution(cell.source):
            clear_solutions(cell.source, code=cell.cell_type == "code", where=f"{Path(chapter).name} cell {number}")
        metadata = nbgrader_metadata(cell, f"{stem}-cell-{number}")
        if metadata is not None:
            cell.metadata["nbgrader"] = metadata
    notebook.cells.insert(0, install_cell(install_source))
    notebook.metadata.pop("jupytext", None)
    return notebook


def write_nbgrader_source(chapters: list[Path], out_dir: Path, install_source: str) -> list[Path]:
    """Write ``out_dir/NN_slug.ipynb`` for nbgrader's ``source/<assignment>/``; return the paths."""
    import nbformat

    notebooks = [(chapter, nbgrader_source_notebook(chapter, install_source)) for chapter in chapters]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for chapter, notebook in notebooks:
        target = Path(out_dir) / (Path(chapter).stem + ".ipynb")
        nbformat.write(notebook, target)
        written.append(target)
    return written


def write_student_edition(chapters: list[Path], out_dir: Path, install_source: str) -> list[Path]:
    """Write ``out_dir/NN_slug.ipynb`` for each chapter; return the paths written."""
    import nbformat

    out_dir = Path(out_dir)
    notebooks = [(chapter, student_notebook(chapter, install_source)) for chapter in chapters]  # all or none
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for chapter, notebook in notebooks:
        target = out_dir / (Path(chapter).stem + ".ipynb")
        nbformat.write(notebook, target)
        written.append(target)
    return written
