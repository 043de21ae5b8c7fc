"""Build hook only (the project is described in pyproject.toml): ship the chapters in the wheel.

The chapters live in ``chapters/`` at the top of the repository, which is not a package. Building a
wheel copies ``chapters/NN_slug.py`` and ``chapters/jupytext.toml`` into the built package as
``megalodon_lite/_chapters/``, so an installed package can copy them out for a reader
(``megalodon-lite chapters DIR``) and build the book without a clone; and the recorded GPU
measurements the later chapters display (``kernels/results/*.json``, ``*.txt``) as
``megalodon_lite/_results/``. An editable install reads the checkout's folders instead
(``megalodon_lite.chapters.default_chapters_dir``, ``megalodon_lite.notebook.recorded``).
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


def recorded_results() -> list[Path]:
    results = ROOT / "kernels" / "results"
    return sorted(p for p in results.glob("*") if p.suffix in (".json", ".txt"))


SHIPPED = {"_chapters": chapter_sources, "_results": recorded_results}  # package folder -> files


class BuildPyWithChapters(build_py):
    """``build_py`` that also copies the chapters and the recorded results into the package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the checkout's folders are read directly
            return
        for folder, sources in SHIPPED.items():
            target = Path(self.build_lib) / "megalodon_lite" / folder
            shutil.rmtree(target, ignore_errors=True)  # a renamed file must not linger
            target.mkdir(parents=True)
            for source in sources():
                shutil.copyfile(source, target / source.name)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            for folder, sources in SHIPPED.items():
                target = Path(self.build_lib) / "megalodon_lite" / folder
                outputs += [str(target / source.name) for source in sources()]
        return outputs


setup(cmdclass={"build_py": BuildPyWithChapters})
