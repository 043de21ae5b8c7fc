"""The book builder and the chapter helpers: failures reported by name, GPU cells, figures."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from chapter_code import EXERCISE_CHAPTERS, EXERCISES_HEADING, exercise_section  # noqa: E402

from megalodon_lite import book, notebook  # noqa: E402
from megalodon_lite.export import chapter_paths, repo_root  # noqa: E402

KERNELSPEC_HEADER = """\
# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---
"""


def write_chapter(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def test_a_failing_chapter_is_reported_and_rendered_while_others_build(tmp_path):
    good = write_chapter(tmp_path, "01_good.py", '''
        # %% [markdown]
        # # 01 · A good chapter

        # %%
        print(6 * 7)
        ''')
    bad = write_chapter(tmp_path, "02_bad.py", '''
        # %% [markdown]
        # # 02 · A broken chapter

        # %%
        x = 1

        # %%
        raise ValueError("the reader should see this message")

        # %%
        print("never reached")
        ''')
    out = tmp_path / "site"
    out.mkdir()
    results = [book.build_chapter(p, out, timeout=120, has_cuda=False) for p in (good, bad)]
    assert results[0].error is None and results[0].title == "01 · A good chapter"
    assert results[1].error is not None and "the reader should see this message" in results[1].error
    assert "42" in (out / "01_good.html").read_text()
    assert "the reader should see this message" in (out / "02_bad.html").read_text()
    index = book.write_index(out, results, smoke=True).read_text()
    assert index.index("01_good.html") < index.index("02_bad.html")
    assert "failed" in index and "the reader should see this message" in index


def test_gpu_cells_are_shown_not_run_without_cuda(tmp_path):
    chapter = write_chapter(tmp_path, "03_gpu.py", '''
        # %% [markdown]
        # # 03 · GPU

        # %% tags=["gpu"]
        raise RuntimeError("needs a GPU")

        # %%
        print("cpu part ran")
        ''')
    result = book.build_chapter(chapter, tmp_path, timeout=120, has_cuda=False)
    assert result.error is None
    page = (tmp_path / "03_gpu.html").read_text()
    assert "GPU-only cell, not run" in page and "cpu part ran" in page


def test_select_chapters_rejects_unknown_numbers():
    with pytest.raises(SystemExit, match="no chapter"):
        book.select_chapters(["99"])


def test_save_figure_writes_only_when_asked(tmp_path, monkeypatch):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    monkeypatch.delenv("MEGALODON_WRITE_FIGURES", raising=False)
    assert notebook.save_figure(fig, "probe", directory=tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("MEGALODON_WRITE_FIGURES", "1")
    path = notebook.save_figure(fig, "probe", directory=tmp_path)
    assert path == tmp_path / "probe.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert notebook.save_figure(fig, "other", directory=tmp_path, write=False) is None
    with pytest.raises(ValueError, match="name must be"):
        notebook.save_figure(fig, "../escape", write=True)
    plt.close(fig)


def test_pick_follows_smoke_mode(monkeypatch):
    monkeypatch.setattr(notebook, "SMOKE", True)
    assert notebook.pick(smoke=2, full=2048) == 2
    monkeypatch.setattr(notebook, "SMOKE", False)
    assert notebook.pick(smoke=2, full=2048) == 2048


CHAPTERS = chapter_paths(repo_root())


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_chapter_opens_with_a_kernel_and_ends_with_its_gpu_cells(chapter):
    """CONTRIBUTING.md: a kernelspec header (JupyterLab starts Python 3 without asking), and the
    cells tagged gpu last, under "## On a GPU", the first calling require_cuda() (so a reader's
    Run All on a laptop runs every CPU cell before it stops)."""
    import jupytext

    assert chapter.read_text(encoding="utf-8").startswith(KERNELSPEC_HEADER), (
        f"{chapter.name} must start with the jupytext header\n{KERNELSPEC_HEADER}")
    cells = jupytext.read(chapter).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# {chapter.name[:2]} · ")
    gpu = [i for i, c in enumerate(cells) if c.cell_type == "code" and "gpu" in c.metadata.get("tags", [])]
    if not gpu:
        return
    cpu_after = [i for i, c in enumerate(cells) if c.cell_type == "code" and i > gpu[0] and i not in gpu]
    assert not cpu_after, f"{chapter.name}: CPU code cells {cpu_after} come after the first gpu cell {gpu[0]}"
    headings = [i for i, c in enumerate(cells[: gpu[0]]) if c.cell_type == "markdown"
                and c.source.startswith("## On a GPU")]
    last_cpu = max(i for i, c in enumerate(cells) if c.cell_type == "code" and i not in gpu)
    assert headings and headings[-1] > last_cpu, f"{chapter.name}: no '## On a GPU' section after the CPU cells"
    assert "require_cuda()" in cells[gpu[0]].source, f"{chapter.name}: the first gpu cell must call require_cuda()"


EXERCISE_NUMBER = re.compile(r"^\*\*(\d+)\. ", re.MULTILINE)  # "**2. Derive.** ..." opens exercise 2


@pytest.mark.parametrize("number", EXERCISE_CHAPTERS)
def test_chapter_ends_with_3_to_5_exercises_and_at_least_one_check(number):
    """The section `## Exercises` is the chapter's last before `## On a GPU` (or its last), holds
    exercises numbered 1..n with 3 <= n <= 5, each in its own markdown cell, and at least one cell
    tagged `check` that calls megalodon_lite.exercises.check on a function the reader writes
    between solution markers."""
    import jupytext

    (path,) = [p for p in CHAPTERS if p.name.startswith(f"{number}_")]
    cells = jupytext.read(path).cells
    section = exercise_section(cells)
    assert section, f"{path.name} has no '{EXERCISES_HEADING}' section"
    after = [c.source.splitlines()[0] for c in cells[cells.index(section[-1]) + 1:]
             if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert after in ([], ["## On a GPU"]), f"{path.name}: sections after the exercises: {after}"
    numbers = [int(n) for c in section if c.cell_type == "markdown" for n in EXERCISE_NUMBER.findall(c.source)]
    assert numbers == list(range(1, len(numbers) + 1)) and 3 <= len(numbers) <= 5, (
        f"{path.name}: exercises numbered {numbers}, expected 1..n with 3 <= n <= 5")
    for cell in section:  # one exercise per cell: nbgrader grades each written answer on its own
        if cell.cell_type == "markdown":
            assert len(EXERCISE_NUMBER.findall(cell.source)) <= 1 and cell.source.count("BEGIN SOLUTION") <= 1, (
                f"{path.name}: a markdown cell holds more than one exercise:\n{cell.source[:200]}")
    checks = [c for c in section if c.cell_type == "code" and "check" in c.metadata.get("tags", [])]
    assert checks, f"{path.name}: no cell tagged 'check' among the exercises"
    for cell in checks:
        assert re.search(r"^check\(", cell.source, re.MULTILINE), f"{path.name}: a check cell that calls no check()"
    solutions = [c for c in section if c.cell_type == "code" and "### BEGIN SOLUTION" in c.source]
    assert solutions, f"{path.name}: no function for the reader to write between solution markers"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_first_code_cell_says_what_size_runs_where(chapter):
    """CONTRIBUTING.md: the first code cell calls describe_run(device) right after
    device = pick_device(), so a reader sees at once the size, the device, why, and how to change it."""
    import jupytext

    first = next(c for c in jupytext.read(chapter).cells if c.cell_type == "code")
    lines = [line.strip() for line in first.source.splitlines()]
    assert "device = pick_device()" in lines, f"{chapter.name}: the first code cell must pick the device"
    after = lines[lines.index("device = pick_device()") + 1]
    assert after == "describe_run(device)", (
        f"{chapter.name}: describe_run(device) must follow device = pick_device(), found {after!r}")


# What a CPU cell would need a clone for: importing the repository's scripts, or building a path into
# its kernels/ or figures/ (an installed wheel has neither; it carries the recorded results).
NEEDS_A_CLONE = re.compile(r"""^\s*(from\s+kernels[.\s]|import\s+kernels\b)|/\s*["'](kernels|figures)["']"""
                           r"""|["'](kernels|figures)/|\bFIGURES_DIR\b|\bimread\(""", re.MULTILINE)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_cpu_cells_run_without_a_clone(chapter):
    """A chapter copied out of an installed wheel (`megalodon-lite chapters DIR`) runs every CPU cell:
    recorded results come through notebook.recorded / recorded_files (the wheel carries them), figures
    are drawn, not read from figures/, and nothing is imported from kernels/ (gpu cells that run a
    script find it through notebook.repository_script, which says when a clone is needed).
    tests/test_install.py builds some of the chapters from a wheel; this covers every chapter cheaply."""
    import jupytext

    found = [(i, match.group(0).strip()) for i, c in enumerate(jupytext.read(chapter).cells)
             if c.cell_type == "code" and "gpu" not in c.metadata.get("tags", [])
             for match in NEEDS_A_CLONE.finditer(c.source)]
    assert not found, f"{chapter.name}: CPU cells that need a clone of the repository (cell, code): {found}"


def test_manifest_records_versions_and_status(tmp_path):
    import json

    import torch

    results = [book.ChapterResult(Path("chapters/01_a.py"), "01 · A", "01_a.html", 1.23),
               book.ChapterResult(Path("chapters/02_b.py"), "02 · B", "02_b.html", 4.56, error="boom")]
    manifest = json.loads(book.write_manifest(tmp_path, results, smoke=True, argv=["--only", "01", "02"]).read_text())
    assert manifest["command"] == "python -m megalodon_lite.book --only 01 02"
    assert manifest["torch"] == torch.__version__ and manifest["size"] == "smoke"
    assert [(c["chapter"], c["ok"], c["error"]) for c in manifest["chapters"]] == [
        ("01_a.py", True, None), ("02_b.py", False, "boom")]


def test_time_call_warms_up_repeats_and_reduces():
    calls = []
    seconds = notebook.time_call(lambda: calls.append(1), repeats=4, warmup=2, device="cpu")
    assert len(calls) == 6 and 0 <= seconds < 1
    durations = iter([0.0, 0.03, 0.01, 0.02])

    def sleeper():
        time.sleep(next(durations))

    assert notebook.time_call(sleeper, repeats=3, warmup=1, reduce="min", device="cpu") < 0.02
    with pytest.raises(ValueError, match="reduce must be"):
        notebook.time_call(lambda: None, reduce="mean")
    with pytest.raises(ValueError, match="repeats must be"):
        notebook.time_call(lambda: None, repeats=0)
