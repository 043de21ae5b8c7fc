"""Build hook only (the project is described in pyproject.toml): ship the chapters in the wheel.

The chapters live in ``chapters/`` at the top of the repository, which is not a package. Building a
wheel copies ``chapters/NN_slug.py`` and ``chapters/jupytext.toml`` into the built package as
``megalodon_lite/_chapters/``, so an installed package can copy them out for a reader
(``megalodon-lite chapters DIR``) and build the book without a clone. An editable install reads
``chapters/`` of the checkout instead (``megalodon_lite.chapters.default_chapters_dir``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CHAPTER_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.py$")


def chapter_sources() -> list[Path]:
    chapters = ROOT / "chapters"
    found = sorted(p for p in chapters.glob("*.py") if CHAPTER_NAME.match(p.name))
    if not found:
        raise SystemExit(f"no chapters in {chapters}: a wheel without them could not build the book")
    return [*found, chapters / "jupytext.toml"]


class BuildPyWithChapters(build_py):
    """``build_py`` that also copies the chapters into ``megalodon_lite/_chapters/``."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the checkout's chapters/ is read directly
            return
        target = Path(self.build_lib) / "megalodon_lite" / "_chapters"
        shutil.rmtree(target, ignore_errors=True)  # a renamed chapter must not linger
        target.mkdir(parents=True)
        for source in chapter_sources():
            shutil.copyfile(source, target / source.name)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            target = Path(self.build_lib) / "megalodon_lite" / "_chapters"
            outputs += [str(target / source.name) for source in chapter_sources()]
        return outputs


setup(cmdclass={"build_py": BuildPyWithChapters})
