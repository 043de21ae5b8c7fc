"""Chapters found in a checkout or an installed package, copied out for a reader, and the book
command's refusals when there is nothing to build."""

from __future__ import annotations

from pathlib import Path

import pytest

from megalodon_lite import book, chapters, cli


def make_chapters(folder: Path, names=("01_a.py", "02_b.py")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"# %% [markdown]\n# # {name[:2]} · {name}\n")
    (folder / chapters.JUPYTEXT_CONFIG).write_text('formats = "py:percent"\n')
    (folder / "notes.py").write_text("# not a chapter\n")
    return folder


def test_a_checkout_reads_its_own_chapters():
    assert chapters.default_chapters_dir() == chapters.CHECKOUT_CHAPTERS
    assert [p.name for p in chapters.chapter_files(chapters.CHECKOUT_CHAPTERS)][:2] == ["00_why.py", "01_ema.py"]


def test_without_a_checkout_the_packaged_chapters_are_used(tmp_path, monkeypatch):
    monkeypatch.setattr(chapters, "CHECKOUT_CHAPTERS", tmp_path / "no-checkout")
    monkeypatch.setattr(chapters, "PACKAGED_CHAPTERS", make_chapters(tmp_path / "_chapters"))
    assert chapters.default_chapters_dir() == tmp_path / "_chapters"
    monkeypatch.setattr(chapters, "PACKAGED_CHAPTERS", tmp_path / "empty")
    with pytest.raises(chapters.ChaptersNotFound, match="no chapters found.*an installed wheel"):
        chapters.default_chapters_dir()


def test_copy_out_is_idempotent_and_never_overwrites_edits(tmp_path, capsys):
    source = make_chapters(tmp_path / "src")
    target = tmp_path / "mine"
    written = chapters.copy_chapters(target, source=source)
    assert sorted(p.name for p in written) == ["01_a.py", "02_b.py", "jupytext.toml"]
    assert not (target / "notes.py").exists()
    assert chapters.copy_chapters(target, source=source) == []  # nothing to do the second time
    (target / "01_a.py").write_text("# my notes\n")
    with pytest.raises(FileExistsError, match=r"\['01_a.py'\].*--force"):
        chapters.copy_chapters(target, source=source)
    assert (target / "01_a.py").read_text() == "# my notes\n"
    assert chapters.copy_chapters(target, source=source, force=True) == [target / "01_a.py"]
    assert (target / "01_a.py").read_text() == (source / "01_a.py").read_text()


def test_chapters_command_copies_the_books_chapters(tmp_path, capsys):
    assert cli.main(["chapters", str(tmp_path / "out")]) == 0
    copied = chapters.chapter_files(tmp_path / "out")
    assert [p.name for p in copied] == [p.name for p in chapters.chapter_files(chapters.CHECKOUT_CHAPTERS)]
    assert (tmp_path / "out" / "jupytext.toml").is_file()
    assert f"jupyter lab {tmp_path / 'out'}" in capsys.readouterr().out
    (tmp_path / "out" / copied[0].name).write_text("edited\n")
    assert cli.main(["chapters", str(tmp_path / "out")]) == 1
    assert "--force" in capsys.readouterr().err


def test_book_with_no_chapters_fails_instead_of_building_zero(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no chapters .* in .*empty; nothing to build"):
        book.main(["--chapters", str(tmp_path / "empty"), "--out", str(tmp_path / "site")])
    assert not (tmp_path / "site").exists()


def test_book_without_the_book_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(book, "BOOK_EXTRA_MODULES", ("jupytext", "surely_not_installed_module"))
    assert cli.main(["book", "--only", "01"]) == 2
    err = capsys.readouterr().err
    assert "surely_not_installed_module" in err and "pip install 'megalodon-lite[book]'" in err
