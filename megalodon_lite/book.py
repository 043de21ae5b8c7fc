"""Build the executed book: chapters -> notebooks -> executed -> HTML, with an index page.

    python -m megalodon_lite.book                 # smoke sizes (a laptop CPU, a few minutes)
    python -m megalodon_lite.book --full          # full sizes (meant for a GPU)
    python -m megalodon_lite.book --only 01 04    # some chapters
    python -m megalodon_lite.book --out site/     # somewhere else than build/book
    python -m megalodon_lite.book --chapters my-chapters/   # a folder of (edited) chapters
    python -m megalodon_lite.book --student OUT/ --install-source "megalodon-lite==0.1.0"

``megalodon-lite book ...`` is the same command. The chapters come from the checkout's
``chapters/``, or from the copy shipped inside an installed wheel (``megalodon_lite.chapters``).

The output folder holds one HTML page per chapter, ``index.html`` linking them in order, and
``manifest.json`` (command, date, device, library versions, per-chapter time and status). The pages
work offline: maths is MathML, widgets are shown as stills, nothing is loaded from the internet
(``megalodon_lite.book_html``).

Every chapter is executed in a fresh kernel. A chapter that fails is reported by name with its
error and rendered up to the failing cell; the others are still built, and the command exits 1.
Cells tagged ``gpu`` are shown but not run when no CUDA device is present.

``--student OUT/`` executes nothing: it writes the student edition, the chapters as notebooks with
the exercises' solutions replaced by stubs and a first cell that installs the package where it is
missing (``megalodon_lite.student``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from megalodon_lite.chapters import ChaptersNotFound, chapter_files, default_chapters_dir
from megalodon_lite.export import chapter_paths, repo_root

GPU_TAG = "gpu"
# ipykernel's own kernelspec: a chapter's header says the same, so JupyterLab rewrites nothing.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
BOOK_EXTRA_MODULES = ("jupytext", "nbformat", "nbclient", "nbconvert", "ipykernel", "latex2mathml")


@dataclass
class ChapterResult:
    """What building one chapter produced."""

    chapter: Path
    title: str
    html_name: str
    seconds: float
    error: str | None = None


def chapter_title(notebook) -> str:
    """The first markdown heading of a notebook, or its file name."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return notebook.metadata.get("title", "untitled")


def read_chapter(path: Path):
    """A chapter as an nbformat notebook, with a Python kernelspec so it can be executed."""
    import jupytext

    notebook = jupytext.read(path)
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.metadata.setdefault("language_info", {"name": "python"})
    return notebook


def write_notebooks(out_dir: Path, chapters: list[Path] | None = None) -> list[Path]:
    """Write ``chapters/NN_slug.py`` as ``out_dir/NN_slug.ipynb`` (unexecuted); return the paths."""
    import nbformat

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    all_chapters = chapters is None
    for chapter in chapter_paths(repo_root()) if all_chapters else chapters:
        target = out_dir / (chapter.stem + ".ipynb")
        text = nbformat.writes(read_chapter(chapter))
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # atomic: pytest runs may overlap
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
        written.append(target)
    if all_chapters:  # a renamed or deleted chapter must not linger as a notebook that nbval runs
        for stale in set(out_dir.glob("*.ipynb")) - set(written):
            stale.unlink(missing_ok=True)
    return written


def disable_gpu_cells(notebook) -> int:
    """Turn cells tagged ``gpu`` into markdown showing their code; return how many."""
    import nbformat

    count = 0
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and GPU_TAG in cell.metadata.get("tags", []):
            note = "*GPU-only cell, not run: no CUDA device was present when this book was built.*"
            notebook.cells[i] = nbformat.v4.new_markdown_cell(f"{note}\n\n```python\n{cell.source}\n```")
            count += 1
    return count


def _error_summary(err: Exception) -> str:
    text = str(err)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # strip ANSI colours from tracebacks
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-6:]) if lines else type(err).__name__


def kernel_config(runtime_dir: Path):
    """Kernel settings for one chapter: IPC sockets under ``runtime_dir`` where the OS has them.

    Over TCP without encryption ipykernel prints a security warning into the build's output;
    local sockets are what a build on one machine wants anyway.
    """
    from traitlets.config import Config

    config = Config()
    if os.name != "nt":  # no IPC transport on Windows
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = str(runtime_dir / "kernel")
    return config


def build_chapter(path: Path, out_dir: Path, *, timeout: int, has_cuda: bool,
                  previous=None, following=None) -> ChapterResult:
    """Execute one chapter and render it to ``out_dir/<stem>.html``; never raises for cell errors.

    ``previous`` and ``following`` (:class:`megalodon_lite.book_html.PageLink`) are the pages its
    navigation links to.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from megalodon_lite.book_html import render_page

    notebook = read_chapter(path)
    title = chapter_title(notebook)
    if not has_cuda:
        disable_gpu_cells(notebook)
    start = time.perf_counter()
    error = None
    with tempfile.TemporaryDirectory(prefix="megalodon-kernel-") as runtime:
        client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                config=kernel_config(Path(runtime)),
                                resources={"metadata": {"path": str(out_dir)}})
        try:
            client.execute()
        except CellExecutionError as err:
            error = _error_summary(err)
        except Exception as err:  # kernel died, timeout, ...: still report the chapter by name
            error = f"{type(err).__name__}: {_error_summary(err)}"
    seconds = time.perf_counter() - start
    html_name = path.stem + ".html"
    render_page(notebook, out_dir / html_name, title=title, previous=previous, following=following)
    return ChapterResult(path, title, html_name, seconds, error)


def write_index(out_dir: Path, results: list[ChapterResult], *, smoke: bool) -> Path:
    """The contents page: one line per chapter, linking it, with its status."""
    from megalodon_lite.book_html import PageLink, index_page

    rows = [(PageLink(r.html_name, r.title), f"{'ok' if r.error is None else 'failed'}, {r.seconds:.0f} s", r.error)
            for r in results]
    size = "smoke (tiny sizes)" if smoke else "full size"
    index = out_dir / "index.html"
    index.write_text(index_page(rows, subtitle=f"Executed {time.strftime('%Y-%m-%d %H:%M')} at {size}."),
                     encoding="utf-8")
    return index


def write_manifest(out_dir: Path, results: list[ChapterResult], *, smoke: bool, argv: list[str]) -> Path:
    """``manifest.json``: what was built, where, with which versions, by which command."""
    import json
    import platform

    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    manifest = {
        "command": "python -m megalodon_lite.book " + " ".join(argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "size": "smoke" if smoke else "full",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "chapters": [{"chapter": r.chapter.name, "title": r.title, "seconds": round(r.seconds, 1),
                      "ok": r.error is None, "error": r.error} for r in results],
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def select_chapters(only: list[str] | None, chapters_dir: Path | None = None) -> list[Path]:
    """All chapters of ``chapters_dir`` (default: the checkout's or the installed ones), or those
    whose number or stem is listed in ``only``.

    Raises:
        SystemExit: no chapter there, or ``only`` names one that does not exist.
    """
    if chapters_dir is None:
        try:
            chapters_dir = default_chapters_dir()
        except ChaptersNotFound as err:
            raise SystemExit(f"book: {err}") from None
    chapters = chapter_files(chapters_dir)
    if not chapters:
        raise SystemExit(f"book: no chapters (NN_slug.py) in {chapters_dir}; nothing to build")
    if not only:
        return chapters
    chosen = [p for p in chapters if p.stem[:2] in only or p.stem in only]
    known = {p.stem[:2] for p in chapters} | {p.stem for p in chapters}
    unknown = [o for o in only if o not in known]
    if unknown:
        raise SystemExit(f"--only: no chapter {unknown}; chapters are {[p.stem for p in chapters]}")
    return chosen


def default_out_dir() -> Path:
    """``build/book`` of the checkout, or ``./book`` when the package is installed from a wheel."""
    checkout = repo_root()
    if (checkout / "chapters").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "build" / "book"
    return Path.cwd() / "book"


def missing_book_modules() -> list[str]:
    """The modules of the ``[book]`` extra that cannot be imported here."""
    import importlib.util

    return [name for name in BOOK_EXTRA_MODULES if importlib.util.find_spec(name) is None]


def add_book_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="full sizes (default: smoke sizes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: build/book in a checkout, ./book otherwise)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="chapter numbers or stems to build")
    parser.add_argument("--chapters", type=Path, default=None, metavar="DIR",
                        help="folder of chapters to build (default: the checkout's, or those installed "
                             "with the package)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    parser.add_argument("--student", type=Path, default=None, metavar="OUT",
                        help="write the student edition (notebooks, solutions replaced by stubs) into OUT "
                             "instead of building the book")
    parser.add_argument("--nbgrader-source", type=Path, default=None, metavar="DIR",
                        help="write the chapters, solutions kept, with nbgrader's cell metadata into DIR "
                             "(a course's source/<assignment>/ folder) instead of building the book")
    parser.add_argument("--install-source", default=None, metavar="SPEC",
                        help="what the student edition's first cell pip-installs where megalodon-lite is "
                             "missing: a requirement, or a wheel's URL or path (default: "
                             "megalodon-lite==<this version>)")


def run_student_edition(args: argparse.Namespace, chapters: list[Path]) -> int:
    """``--student OUT`` and/or ``--nbgrader-source DIR``: notebooks written, nothing executed."""
    from megalodon_lite import __version__
    from megalodon_lite.student import SolutionMarkerError, write_nbgrader_source, write_student_edition

    source = args.install_source or f"megalodon-lite=={__version__}"
    jobs = [(flag, folder, write, what) for flag, folder, write, what in (
        ("--student", args.student, write_student_edition, "student edition"),
        ("--nbgrader-source", args.nbgrader_source, write_nbgrader_source, "nbgrader source notebooks"))
        if folder is not None]
    for flag, folder, write, what in jobs:
        try:
            written = write(chapters, folder, source)
        except (SolutionMarkerError, ValueError) as err:
            print(f"book {flag}: {err}", file=sys.stderr)
            return 1
        print(f"{what}: {len(written)} notebooks -> {folder.resolve()}")
    print(f"  their first cell installs {source!r} where megalodon-lite is missing (--install-source)")
    return 0


def run_book(args: argparse.Namespace) -> int:
    missing = missing_book_modules()
    if missing:
        print(f"book: the book build needs {', '.join(missing)}, from the [book] extra: "
              "pip install 'megalodon-lite[book]'", file=sys.stderr)
        return 2
    chapters = select_chapters(args.only, args.chapters)
    if args.student is not None or args.nbgrader_source is not None:
        return run_student_edition(args, chapters)

    from tqdm.auto import tqdm

    from megalodon_lite.book_html import MATH_FAILURES, PageLink

    os.environ["MEGALODON_SMOKE"] = "0" if args.full else "1"
    os.environ["MEGALODON_CHECKS_MUST_PASS"] = "1"  # the book runs the solutions: every check must pass
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # the kernels draw into the page
    import torch

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out_dir = (args.out or default_out_dir()).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    links = [PageLink(p.stem + ".html", chapter_title(read_chapter(p))) for p in chapters]
    results = []
    bar = tqdm(chapters, unit="chapter")
    for i, path in enumerate(bar):
        bar.set_description(path.stem)
        result = build_chapter(path, out_dir, timeout=args.timeout, has_cuda=has_cuda,
                               previous=links[i - 1] if i > 0 else None,
                               following=links[i + 1] if i + 1 < len(links) else None)
        results.append(result)
        if result.error is None:
            bar.write(f"ok      {path.name} ({result.seconds:.1f} s)")
        else:
            bar.write(f"FAILED  {path.name} ({result.seconds:.1f} s)\n        "
                      + result.error.replace("\n", "\n        "))
        write_index(out_dir, results, smoke=not args.full)  # the index is usable even if we stop here
    index = write_index(out_dir, results, smoke=not args.full)
    write_manifest(out_dir, results, smoke=not args.full, argv=getattr(args, "argv", sys.argv[1:]))
    failed = [r.chapter.name for r in results if r.error is not None]
    print(f"book: {len(results) - len(failed)}/{len(results)} chapters built -> {index}")
    for problem in MATH_FAILURES:
        print(f"maths shown as TeX (could not convert): {problem}", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megalodon_lite.book", description=__doc__.split("\n\n")[0])
    add_book_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return run_book(args)


if __name__ == "__main__":
    raise SystemExit(main())
