"""Where the chapters are, and ``megalodon-lite chapters DIR``, which copies them out for a reader.

The chapters (``NN_slug.py`` in jupytext's percent format, plus ``jupytext.toml``) live in
``chapters/`` of a checkout. A wheel carries the same files inside the package, as
``megalodon_lite/_chapters/`` (``setup.py`` copies them there when the wheel is built), so an
installed package can copy them out for a student and build the book without a clone::

    megalodon-lite chapters my-chapters/      # then: jupyter lab my-chapters/

A checkout's ``chapters/`` wins over the packaged copy (an editable install reads the chapters
being edited).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_CHAPTERS = PACKAGE_DIR / "_chapters"
CHECKOUT_CHAPTERS = PACKAGE_DIR.parent / "chapters"
CHAPTER_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.py$")
JUPYTEXT_CONFIG = "jupytext.toml"


class ChaptersNotFound(RuntimeError):
    """No chapters where they were looked for."""


def chapter_files(directory: Path) -> list[Path]:
    """The chapters (``NN_slug.py``) in ``directory``, in book order."""
    return sorted(p for p in Path(directory).glob("*.py") if CHAPTER_NAME.match(p.name))


def default_chapters_dir() -> Path:
    """The checkout's ``chapters/`` when there is one, else the chapters shipped in the package.

    Raises:
        ChaptersNotFound: neither holds a chapter (a broken install), saying where it looked.
    """
    for directory in (CHECKOUT_CHAPTERS, PACKAGED_CHAPTERS):
        if (directory / JUPYTEXT_CONFIG).is_file() and chapter_files(directory):
            return directory
    raise ChaptersNotFound(
        f"no chapters found: looked for NN_slug.py next to {JUPYTEXT_CONFIG} in {CHECKOUT_CHAPTERS} "
        f"(a clone of the repository) and in {PACKAGED_CHAPTERS} (an installed wheel). Reinstall "
        "megalodon-lite, or pass the folder that holds the chapters (--chapters DIR).")


def copy_chapters(destination: Path, *, source: Path | None = None, force: bool = False) -> list[Path]:
    """Copy every chapter and ``jupytext.toml`` into ``destination``; return the files written.

    A file that is already there with the same content is left alone (running it twice is fine).
    One that differs (a reader's own edits) is never overwritten unless ``force``.

    Raises:
        FileExistsError: files in ``destination`` differ from the chapters and ``force`` is false.
        ChaptersNotFound: there are no chapters to copy.
    """
    source = default_chapters_dir() if source is None else Path(source)
    files = chapter_files(source)
    if not files:
        raise ChaptersNotFound(f"no chapters (NN_slug.py) in {source}")
    files.append(source / JUPYTEXT_CONFIG)
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise NotADirectoryError(f"{destination} exists and is not a folder")
    clashes = [f.name for f in files
               if (destination / f.name).exists() and not filecmp.cmp(f, destination / f.name, shallow=False)]
    if clashes and not force:
        raise FileExistsError(f"{destination} already holds different versions of {clashes} "
                              "(your edits?); nothing was copied. Choose another folder, or pass "
                              "--force to overwrite them.")
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        target = destination / f.name
        if not target.exists() or f.name in clashes:
            shutil.copyfile(f, target)
            written.append(target)
    return written


def add_chapters_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="folder to copy the chapters into (created if missing)")
    parser.add_argument("--force", action="store_true", help="overwrite chapters that differ (your edits are lost)")


def run_chapters(args: argparse.Namespace) -> int:
    try:
        source = default_chapters_dir()
        written = copy_chapters(args.directory, source=source, force=args.force)
    except (ChaptersNotFound, FileExistsError, NotADirectoryError) as err:
        print(f"megalodon-lite chapters: {err}", file=sys.stderr)
        return 1
    count = len(chapter_files(args.directory))
    print(f"{count} chapters in {args.directory} ({len(written)} files written, from {source}).")
    print(f"Read them: jupyter lab {args.directory}  (then right-click a chapter -> Open With -> Notebook)")
    return 0
