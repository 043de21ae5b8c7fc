"""The built book works offline: a small build (chapters 01 and 04, smoke size) opened in Chromium
with every request that is not a local file blocked.

Asserts that the build's output carries no kernel warning; that every equation is rendered
(MathML on the page with a size on screen, none left as TeX, no raw ``$$`` in the visible text); that the CEMA widget is shown as a still
with its note; that every page's previous / contents / next links resolve to pages of the book, in
the index's order, and its title names its chapter; and that no request left the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, require_chromium

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ["01", "04"]

# Per page: its title, its navigation links (rel -> href, resolved by the browser), what a reader
# sees as text, how many MathML formulas it holds and how many of them have a size on screen.
PAGE_STATE = """() => ({
    title: document.title,
    links: [...document.querySelectorAll('nav.book-nav a')].map(a => [a.rel, a.href]),
    text: document.body.innerText,
    formulas: document.querySelectorAll('math').length,
    fallbacks: document.querySelectorAll('.book-math-fallback').length,
    drawn: [...document.querySelectorAll('math')].filter(m => m.getBoundingClientRect().width > 0).length,
    stills: [...document.querySelectorAll('.book-widget-still')].map(s => ({
        note: s.querySelector('.book-widget-note')?.innerText || '',
        images: [...s.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length})),
})"""


def local_path(url: str) -> Path:
    parts = urlsplit(url)
    assert parts.scheme == "file", f"a link leaves the book: {url}"
    return Path(url2pathname(parts.path))


@pytest.fixture(scope="module")
def small_book(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the build picks the inline backend
    done = subprocess.run([sys.executable, "-m", "megalodon_lite.book", "--only", *CHAPTERS, "--out", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"book build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "WARNING" not in done.stderr and "Traceback" not in done.stderr, (
        f"the build's output carries warnings:\n{done.stderr[-3000:]}")
    assert f"book: {len(CHAPTERS)}/{len(CHAPTERS)} chapters built" in done.stdout
    return out


def test_book_pages_render_maths_and_navigate_with_no_network(small_book: Path) -> None:
    require_chromium()
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    blocked: list[str] = []

    def only_local(route) -> None:
        if urlsplit(route.request.url).scheme in ("file", "data", "blob", "about"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.route("**/*", only_local)
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))

            page.goto((small_book / "index.html").as_uri())
            assert page.title() == "Contents · megalodon-lite"
            entries = page.evaluate("() => [...document.querySelectorAll('li a')].map(a => [a.innerText, a.href])")
            assert [title[:2] for title, _ in entries] == CHAPTERS, entries
            pages = {local_path(href): title for title, href in entries}
            assert all(path.is_file() for path in pages), pages

            order = list(pages)
            for i, (path, title) in enumerate(pages.items()):
                page.goto(path.as_uri())
                state = page.evaluate(PAGE_STATE)
                assert state["title"] == f"{title} · megalodon-lite"
                assert "$$" not in state["text"], f"{path.name}: raw $$ in the visible text"
                assert state["fallbacks"] == 0, f"{path.name}: {state['fallbacks']} formulas shown as TeX"
                assert state["formulas"] > 0 and state["drawn"] == state["formulas"], (
                    f"{path.name}: {state['drawn']} of {state['formulas']} formulas drawn")
                links = {}
                for rel, href in state["links"]:
                    links.setdefault(rel, set()).add(local_path(href))
                assert links.pop("contents") == {small_book / "index.html"}
                assert links.pop("prev", None) == ({order[i - 1]} if i > 0 else None), f"{path.name}: previous"
                assert links.pop("next", None) == ({order[i + 1]} if i + 1 < len(order) else None), f"{path.name}: next"
                assert not links, f"{path.name}: unexpected links {links}"
                if path.name.startswith("04"):
                    (still,) = state["stills"]
                    assert "live in JupyterLab" in still["note"] and still["images"] == 1, still
        finally:
            browser.close()

    assert blocked == [], f"the book tried to reach the network: {blocked}"
    outside = [url for url in requests if urlsplit(url).scheme not in ("file", "data", "blob", "about")]
    assert outside == [], f"requests left the machine: {outside}"
