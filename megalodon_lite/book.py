"""Build the executed book: chapters -> notebooks -> executed -> HTML, with an index page.

    python -m megalodon_lite.book                 # smoke sizes (a laptop CPU, a few minutes)
    python -m megalodon_lite.book --full          # full sizes (meant for a GPU)
    python -m megalodon_lite.book --only 01 04    # some chapters
    python -m megalodon_lite.book --out site/     # somewhere else than build/book

The output folder holds one HTML page per chapter, ``index.html`` linking them in order, and
``manifest.json`` (command, date, device, library versions, per-chapter time and status).

Every chapter is executed in a fresh kernel. A chapter that fails is reported by name with its
error and rendered up to the failing cell; the others are still built, and the command exits 1.
Cells tagged ``gpu`` are shown but not run when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megalodon_lite.export import chapter_paths, repo_root

GPU_TAG = "gpu"


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
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
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


def build_chapter(path: Path, out_dir: Path, *, timeout: int, has_cuda: bool) -> ChapterResult:
    """Execute one chapter and render it to ``out_dir/<stem>.html``; never raises for cell errors."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    notebook = read_chapter(path)
    title = chapter_title(notebook)
    if not has_cuda:
        disable_gpu_cells(notebook)
    start = time.perf_counter()
    error = None
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(out_dir)}})
    try:
        client.execute()
    except CellExecutionError as err:
        error = _error_summary(err)
    except Exception as err:  # kernel died, timeout, ...: still report the chapter by name
        error = f"{type(err).__name__}: {_error_summary(err)}"
    seconds = time.perf_counter() - start
    body, _ = HTMLExporter().from_notebook_node(notebook)
    html_name = path.stem + ".html"
    (out_dir / html_name).write_text(body, encoding="utf-8")
    return ChapterResult(path, title, html_name, seconds, error)


def write_index(out_dir: Path, results: list[ChapterResult], *, smoke: bool) -> Path:
    """An index page linking the chapters in order, with each one's status."""
    rows = []
    for r in results:
        status = "ok" if r.error is None else "failed"
        detail = "" if r.error is None else f"<pre>{html.escape(r.error)}</pre>"
        rows.append(f'<li><a href="{r.html_name}">{html.escape(r.title)}</a> '
                    f'<small>({status}, {r.seconds:.0f} s)</small>{detail}</li>')
    size = "smoke (tiny sizes)" if smoke else "full size"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>megalodon-lite: the book</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}} pre{{color:#a00}}
ul{{list-style:none;padding:0}} li{{margin:.4em 0}}</style></head>
<body><h1>megalodon-lite</h1>
<p>Megalodon, built chapter by chapter. Executed {time.strftime('%Y-%m-%d %H:%M')} at {size}.</p>
<ul>
{chr(10).join(rows)}
</ul></body></html>
"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
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


def select_chapters(only: list[str] | None) -> list[Path]:
    """All chapters, or those whose number or stem is listed in ``only``."""
    chapters = chapter_paths(repo_root())
    if not only:
        return chapters
    chosen = [p for p in chapters if p.stem[:2] in only or p.stem in only]
    known = {p.stem[:2] for p in chapters} | {p.stem for p in chapters}
    unknown = [o for o in only if o not in known]
    if unknown:
        raise SystemExit(f"--only: no chapter {unknown}; chapters are {[p.stem for p in chapters]}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megalodon_lite.book", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full sizes (default: smoke sizes)")
    parser.add_argument("--out", type=Path, default=repo_root() / "build" / "book", help="output folder")
    parser.add_argument("--only", nargs="+", metavar="NN", help="chapter numbers or stems to build")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    os.environ["MEGALODON_SMOKE"] = "0" if args.full else "1"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    import torch

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    chapters = select_chapters(args.only)
    results = []
    bar = tqdm(chapters, unit="chapter")
    for path in bar:
        bar.set_description(path.stem)
        result = build_chapter(path, out_dir, timeout=args.timeout, has_cuda=has_cuda)
        results.append(result)
        if result.error is None:
            bar.write(f"ok      {path.name} ({result.seconds:.1f} s)")
        else:
            bar.write(f"FAILED  {path.name} ({result.seconds:.1f} s)\n        "
                      + result.error.replace("\n", "\n        "))
        write_index(out_dir, results, smoke=not args.full)  # the index is usable even if we stop here
    index = write_index(out_dir, results, smoke=not args.full)
    write_manifest(out_dir, results, smoke=not args.full, argv=sys.argv[1:] if argv is None else argv)
    failed = [r.chapter.name for r in results if r.error is not None]
    print(f"book: {len(results) - len(failed)}/{len(results)} chapters built -> {index}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
