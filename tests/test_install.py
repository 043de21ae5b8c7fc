"""A student's set-up without a clone: build the wheel, install it into a fresh virtual environment,
copy the chapters out of it, build chapters of the book from them, write the student edition.

The chapters built are 01 and two of those that display recorded GPU results and check the
package's own formulas (08: the scan floor and the figure of time over floor; 10: the training
comparison), which must find everything they read in the installed package; a gpu cell that needs
a script of the repository says so in one line. (09 and 11 build from a wheel too, for another
~22 s; tests/test_book.py checks statically that no chapter's CPU cells need a clone.)

About 55 s on a 2-core machine, and offline: the wheel is built without build isolation when
this environment's setuptools can (else pip fetches one), and the fresh environment borrows this
one's dependencies (torch, Jupyter, ...) through a ``.pth`` file (and ``JUPYTER_PATH`` for their
data files) instead of installing them. A ``.pth`` file's paths come after the environment's own
site-packages and ``.pth`` files inside them are not run, so this environment's editable
megalodon_lite cannot shadow the installed wheel; the test checks that too.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILT = ["01", "08", "10"]  # smoke size, CPU: about 5 s, 14 s and 14 s
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "megalodon_lite", "chapters", "kernels"]


def setuptools_builds_wheels() -> bool:
    """Whether this environment's setuptools can build a wheel without fetching anything (>= 70.1
    has bdist_wheel built in; a venv's bundled setuptools of Python 3.11 is 65 and cannot)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) >= (70, 1)


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_wheel_installs_copies_chapters_and_builds_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    # 1. The wheel, built from a copy of the sources (the checkout stays untouched).
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "_chapters", "_results"))
        else:
            shutil.copy2(path, source / name)
    # Offline with this environment's setuptools if it builds wheels by itself; else pip fetches one.
    isolation = ["--no-build-isolation"] if setuptools_builds_wheels() else []
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist"),
         str(source)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("megalodon_lite-*.whl")

    # 2. A fresh environment with the wheel, borrowing this environment's dependencies.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       tmp_path, env).strip())
    borrowed = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    # ... and their data files (nbconvert's templates, the python3 kernelspec), which Jupyter looks
    # for under sys.prefix: a real install puts them into the fresh environment itself.
    env["JUPYTER_PATH"] = str(Path(sys.prefix) / "share" / "jupyter")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)
    where = run([str(python), "-c", "import megalodon_lite; print(megalodon_lite.__file__)"], tmp_path, env)
    assert Path(where.strip()).is_relative_to(venv), f"megalodon_lite imported from {where}, not the wheel"
    # the recorded GPU results the later chapters display come with it
    shipped = run([str(python), "-c", "from megalodon_lite.notebook import recorded; print(recorded('nvidia_h200.json'))"],
                  tmp_path, env)
    assert Path(shipped.strip()).is_relative_to(venv) and Path(shipped.strip()).parent.name == "_results"

    # ... but not the repository's scripts: a gpu cell that runs one stops with one line saying why
    stop = subprocess.run([str(python), "-c", "from megalodon_lite.notebook import repository_script; "
                           "repository_script('kernels/bench.py')"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert stop.returncode != 0 and "NeedsCloneError: This cell runs kernels/bench.py" in stop.stderr, stop.stderr
    assert "run the chapter from a clone of the repository" in stop.stderr

    # 3. The student's commands: copy the chapters out, build some of them, write the student edition.
    command = venv / "bin" / "megalodon-lite"
    out = run([str(command), "chapters", "my-chapters"], tmp_path, env)
    copied = sorted(p.name for p in (tmp_path / "my-chapters").iterdir())
    assert copied == sorted([p.name for p in (REPO_ROOT / "chapters").glob("[0-9][0-9]_*.py")] + ["jupytext.toml"])
    assert "jupyter lab my-chapters" in out
    out = run([str(command), "book", "--chapters", "my-chapters", "--only", *BUILT, "--out", "site"], tmp_path, env)
    assert f"book: {len(BUILT)}/{len(BUILT)} chapters built" in out, out
    manifest = json.loads((tmp_path / "site" / "manifest.json").read_text())
    assert [(c["chapter"][:2], c["ok"]) for c in manifest["chapters"]] == [(n, True) for n in BUILT], manifest
    page = (tmp_path / "site" / "01_ema.html").read_text(encoding="utf-8")
    assert "<math" in page and 'href="index.html"' in page
    out = run([str(command), "book", "--student", "student", "--install-source", str(wheel)], tmp_path, env)
    assert (tmp_path / "student" / "01_ema.ipynb").is_file() and str(wheel) in out

    # 4. Without --chapters the chapters installed with the package are the book's.
    done = subprocess.run([str(command), "book", "--only", "99"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "no chapter ['99']" in done.stderr and "00_why" in done.stderr
