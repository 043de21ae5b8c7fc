"""The student edition and the exercise checks, on a probe chapter (tests/probe_chapters/01_probe.py).

The teacher edition (the chapter as written) passes every check; the student edition (solutions
replaced by nbgrader's stubs) runs top to bottom with its checks saying "not yet implemented";
putting the solution back into the stub makes its check pass.
"""

from __future__ import annotations

import ast
import contextlib
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch
from chapter_code import EXERCISE_CHAPTERS, chapter_path, exercise_section

from megalodon_lite import book, student
from megalodon_lite.chapters import chapter_files, default_chapters_dir
from megalodon_lite.exercises import MUST_PASS_VARIABLE, NOT_IMPLEMENTED, PASSED, check, run_check

PROBE_DIR = Path(__file__).resolve().parent / "probe_chapters"
PROBE = PROBE_DIR / "01_probe.py"


def execute(notebook, tmp_path: Path):
    """Run a notebook as the book build does (gpu cells shown, not run, without CUDA)."""
    from nbclient import NotebookClient

    if not torch.cuda.is_available():
        book.disable_gpu_cells(notebook)
    NotebookClient(notebook, timeout=120, kernel_name="python3", config=book.kernel_config(tmp_path),
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook


def check_outputs(notebook) -> list[str]:
    """What each cell tagged ``check`` printed."""
    found = []
    for cell in notebook.cells:
        if cell.cell_type == "code" and student.CHECK_TAG in cell.metadata.get("tags", []):
            found.append("".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream").strip())
    return found


# --- clearing solution regions, as nbgrader's ClearSolutions does


def test_code_region_becomes_nbgrader_stub_at_its_indentation():
    source = textwrap.dedent("""\
        def f(x):
            \"\"\"Doc.\"\"\"
            ### BEGIN SOLUTION
            return 2 * x
            ### END SOLUTION
        """)
    assert student.clear_solutions(source, code=True) == textwrap.dedent("""\
        def f(x):
            \"\"\"Doc.\"\"\"
            # YOUR CODE HERE
            raise NotImplementedError()
        """)


def test_markdown_region_becomes_your_answer_here():
    source = "Derive it.\n\n### BEGIN SOLUTION\n$w_k = a$\n### END SOLUTION\nThen go on."
    assert student.clear_solutions(source, code=False) == "Derive it.\n\nYOUR ANSWER HERE\nThen go on."


@pytest.mark.parametrize("source, message", [
    ("def f():\n    ### BEGIN SOLUTION\n    return 1\n", "never closed"),
    ("def f():\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    ### END SOLUTION\n", "inside another"),
    ("def f():\n    return 1\n    ### END SOLUTION\n", "without"),
    ("### BEGIN SOLUTION\nanswer = 3\n### END SOLUTION\n", "left margin"),
])
def test_bad_solution_regions_are_refused_with_the_line(source, message):
    with pytest.raises(student.SolutionMarkerError, match=message):
        student.clear_solutions(source, code=True, where="probe cell 3")


def test_install_source_must_be_one_spec():
    for bad in ("", " megalodon-lite", "a\nb"):
        with pytest.raises(ValueError, match="install_source"):
            student.install_cell(bad)


def test_install_cell_pip_installs_the_teachers_source_only_when_missing(monkeypatch):
    import importlib.util

    source = "https://example.org/wheels/megalodon_lite-0.1.0-py3-none-any.whl"
    code = student.install_cell(source).source
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda command: calls.append(command))
    exec(compile(code, "install-cell", "exec"), {})  # noqa: S102 - our own cell; megalodon_lite is importable
    assert calls == []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "megalodon_lite" else real_find_spec(name, *a))
    exec(compile(code, "install-cell", "exec"), {})  # noqa: S102
    assert calls == [[sys.executable, "-m", "pip", "install", "--quiet", source]]


# --- the check helper


def _inputs(generator):
    length = int(torch.randint(1, 6, (), generator=generator))
    return (torch.randn(2, length, generator=generator, dtype=torch.float64),)


def _double(x):
    return 2 * x


def test_check_passes_reports_not_implemented_and_says_what_differs(capsys, monkeypatch):
    monkeypatch.delenv(MUST_PASS_VARIABLE, raising=False)
    assert run_check(lambda x: x + x, _double, _inputs).status == PASSED

    def stub(x):
        raise NotImplementedError()

    assert run_check(stub, _double, _inputs).status == NOT_IMPLEMENTED
    wrong_value = run_check(lambda x: 2 * x + (x > 1.5), _double, _inputs, hint="multiply by two")
    assert not wrong_value.passed and "differs at index" in wrong_value.message
    assert "Hint: multiply by two" in wrong_value.message
    wrong_shape = run_check(lambda x: (2 * x).T, _double, _inputs)
    assert "should have shape" in wrong_shape.message
    wrong_dtype = run_check(lambda x: (2 * x).float(), _double, _inputs)
    assert "should be torch.float64, got torch.float32" in wrong_dtype.message
    crash = run_check(lambda x: x.nope, _double, _inputs)
    assert not crash.passed and "raised AttributeError" in crash.message and "input 1 of 5" in crash.message
    check(stub, _double, _inputs)  # prints, never raises in a reader's notebook
    assert "not yet implemented" in capsys.readouterr().out


def test_named_tuples_go_in_and_come_out_whole():
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: torch.Tensor
        b: torch.Tensor

    def swap(pair: Pair) -> Pair:
        return Pair(pair.b, pair.a)

    def inputs(generator):
        return (Pair(torch.randn(3, generator=generator), torch.randn(2, generator=generator)),)

    assert run_check(lambda pair: Pair(pair.b.clone(), pair.a.clone()), swap, inputs).passed
    wrong = run_check(lambda pair: pair, swap, inputs)
    assert "the output[0] should have shape (2,), got (3,)" in wrong.message


def test_a_notebooks_own_reference_goes_by_its_name():
    def reference(x):
        return 2 * x

    reference.__module__ = "__main__"  # as for a function defined in a notebook cell
    assert "agrees with test_student.test_a_notebooks_own_reference_goes_by_its_name.<locals>.reference" not in (
        message := run_check(lambda x: x + x, reference, _inputs).message)
    assert "agrees with test_a_notebooks_own_reference_goes_by_its_name.<locals>.reference on 5" in message


def test_check_gives_each_function_its_own_copy_of_the_inputs():
    def clobbers(x):
        x.zero_()
        return 2 * x

    assert "differs" in run_check(clobbers, _double, _inputs).message  # the reference saw the real x


@pytest.mark.parametrize("variable, value", [("NBGRADER_EXECUTION", "autograde"), (MUST_PASS_VARIABLE, "1")])
def test_check_raises_where_checks_must_pass(monkeypatch, variable, value):
    def stub(x):
        raise NotImplementedError()

    monkeypatch.delenv("NBGRADER_EXECUTION", raising=False)
    monkeypatch.delenv(MUST_PASS_VARIABLE, raising=False)
    check(stub, _double, _inputs)  # a reader's notebook: prints, goes on
    monkeypatch.setenv(variable, value)
    with pytest.raises(AssertionError, match="not yet implemented"):
        check(stub, _double, _inputs)
    check(lambda x: 2 * x, _double, _inputs)


# --- the probe chapter, both editions


def test_teacher_edition_passes_every_check(tmp_path, monkeypatch):
    monkeypatch.setenv(MUST_PASS_VARIABLE, "1")  # as the test suite and the book build run chapters
    outputs = check_outputs(execute(book.read_chapter(PROBE), tmp_path))
    assert outputs and all(line.startswith("✓ my_ema agrees with") for line in outputs), outputs


def test_student_edition_runs_and_a_filled_stub_passes(tmp_path, monkeypatch):
    monkeypatch.delenv(MUST_PASS_VARIABLE, raising=False)  # as in a reader's kernel (the suite sets it)
    out = tmp_path / "student"
    status = book.main(["--chapters", str(PROBE_DIR), "--student", str(out),
                        "--install-source", "megalodon-lite==0.1.0"])
    assert status == 0 and sorted(p.name for p in out.iterdir()) == ["01_probe.ipynb"]
    notebook = nbformat.read(out / "01_probe.ipynb", as_version=4)
    first = notebook.cells[0]
    assert student.SETUP_TAG in first.metadata["tags"] and "'megalodon-lite==0.1.0'" in first.source
    sources = "\n".join(c.source for c in notebook.cells)
    assert "torch.stack(outputs" not in sources and "(1 - \\alpha)^k" not in sources, "a solution leaked"
    assert "YOUR ANSWER HERE" in sources and "BEGIN SOLUTION" not in sources

    ran = execute(nbformat.from_dict(notebook), tmp_path)
    outputs = check_outputs(ran)
    assert outputs and all(line.startswith("… my_ema: not yet implemented") for line in outputs), outputs

    # The student fills the stub with the teacher's solution: the check passes.
    teacher = {c.source.split("(")[0]: c.source for c in book.read_chapter(PROBE).cells if c.cell_type == "code"}
    for cell in notebook.cells:
        if "raise NotImplementedError()" in cell.source:
            cell.source = teacher[cell.source.split("(")[0]]
    filled = check_outputs(execute(notebook, tmp_path))
    assert filled and all(line.startswith("✓ my_ema agrees with") for line in filled), filled


def test_every_chapter_can_make_its_student_edition():
    """The real chapters' solution regions (the second pass adds them) are all clearable."""
    for chapter in chapter_files(default_chapters_dir()):
        notebook = student.student_notebook(chapter, "megalodon-lite")
        assert not any(student.BEGIN_SOLUTION in c.source for c in notebook.cells), chapter.name


def test_nbgrader_source_keeps_solutions_and_marks_the_exercise_cells(tmp_path):
    """What `nbgrader generate_assignment` needs in source/<assignment>/ (checked by hand with
    nbgrader 0.9.6: it makes the same stubs, and autograde scores the check cell 1 or 0)."""
    status = book.main(["--chapters", str(PROBE_DIR), "--nbgrader-source", str(tmp_path / "ps1")])
    assert status == 0
    notebook = nbformat.read(tmp_path / "ps1" / "01_probe.ipynb", as_version=4)
    marked = [(c.cell_type, c.metadata["nbgrader"]) for c in notebook.cells if "nbgrader" in c.metadata]
    kinds = [(kind, m["solution"], m["grade"], m["locked"], m.get("points")) for kind, m in marked]
    assert kinds == [("markdown", True, True, False, 1),   # the derivation: manually graded answer
                     ("code", True, False, False, None),   # my_ema: autograded answer
                     ("code", False, True, True, 1)]       # its check: autograder tests
    assert len({m["grade_id"] for _, m in marked}) == 3 and all(m["schema_version"] == 3 for _, m in marked)
    sources = "\n".join(c.source for c in notebook.cells)
    assert "torch.stack(outputs" in sources and "### BEGIN SOLUTION" in sources  # nbgrader clears them
    assert student.SETUP_TAG in notebook.cells[0].metadata["tags"]


# --- the real chapters' exercises


def run_exercise_section(number: str, *, student_edition: bool) -> list[str]:
    """Execute chapter ``number``'s Exercises section alone, in this process (solutions kept, or
    cleared as in the student edition); return what each check cell printed."""
    import jupytext

    namespace: dict = {"__name__": f"exercises_{number}"}
    printed = []
    for index, cell in enumerate(exercise_section(jupytext.read(chapter_path(number)).cells)):
        if cell.cell_type != "code":
            continue
        source = cell.source
        if student_edition and student.has_solution(source):
            source = student.clear_solutions(source, code=True, where=f"{number} exercises cell {index}")
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(source, f"chapter {number}, exercises cell {index}", "exec"), namespace)  # noqa: S102
        if student.CHECK_TAG in cell.metadata.get("tags", []):
            printed.append(buffer.getvalue().strip())
    return printed


@pytest.mark.parametrize("number", EXERCISE_CHAPTERS)
def test_the_exercises_run_alone_checks_pass_with_solutions_and_say_not_yet_without(number, monkeypatch):
    """A chapter's Exercises section imports what it uses, so it runs without the rest of the
    chapter (a teacher can hand it out alone; this test runs it in a second). With the solutions
    (the teacher edition) every check passes; with nbgrader's stubs (the student edition) every
    check says "not yet implemented" and nothing else raises."""
    monkeypatch.setenv(MUST_PASS_VARIABLE, "1")
    teacher = run_exercise_section(number, student_edition=False)
    assert teacher and all(line.startswith("✓ ") for line in teacher), teacher
    monkeypatch.delenv(MUST_PASS_VARIABLE)
    students = run_exercise_section(number, student_edition=True)
    assert len(students) == len(teacher), students
    assert all(line.startswith("… ") and line.split("\n")[-1].count(NOT_IMPLEMENTED) == 1 for line in students), students


def functions_the_reader_writes(source: str) -> set[str]:
    """Names of the functions whose body holds a solution region."""
    tree = ast.parse(source)
    lines = source.splitlines()
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            and any(student.BEGIN_SOLUTION in line for line in lines[node.lineno - 1:node.end_lineno])}


@pytest.mark.parametrize("number", EXERCISE_CHAPTERS)
def test_nothing_after_an_exercise_uses_the_readers_function(number):
    """In the student edition the reader's function raises until it is written: only its own check
    cell may call it, never a later cell (gpu cells included), or Run All would stop there."""
    import jupytext

    written: set[str] = set()
    for index, cell in enumerate(jupytext.read(chapter_path(number)).cells):
        if cell.cell_type != "code":
            continue
        if student.CHECK_TAG not in cell.metadata.get("tags", []):
            used = {node.id for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Name)}
            assert not used & written, f"chapter {number}, cell {index} uses the reader's {sorted(used & written)}"
        written |= functions_the_reader_writes(cell.source)
    assert written, f"chapter {number} has no function for the reader to write"
