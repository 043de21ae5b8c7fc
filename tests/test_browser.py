"""Chapter 04's CEMA widget, driven in a real browser.

Starts JupyterLab on 127.0.0.1 (random port, random token, isolated settings), opens
``chapters/04_cema.py`` as a notebook through jupytext in Debian's headless Chromium (Playwright
with ``executable_path="/usr/bin/chromium"``; no downloaded browser), runs all cells, moves the
``theta`` slider and asserts that the plot's pixels and the readout changed. The server is stopped
by its process id (with every process it started) and the chapter file must be left byte for byte
as it was.

The widget contract this relies on (chapter 04): the whole widget has CSS class ``cema-widget``;
FloatSliders ``alpha``, ``delta``, ``theta`` carry ``cema-alpha``, ``cema-delta``, ``cema-theta``;
the state selector ``cema-state``; the plot is an ``ipywidgets.Image`` with ``cema-plot``; an
``ipywidgets.HTML`` readout with ``cema-readout`` shows |q|, θ and a half-life after every redraw.

On a machine without CUDA the chapter's cells tagged ``gpu`` raise, as they would for a reader;
the test then resumes below each of them (any other error fails it). To read cell tags and outputs
it runs JupyterLab with ``LabApp.expose_app_in_browser``.

Without ``/usr/bin/chromium`` the test is skipped, unless the ``CI`` environment variable is set:
then it fails. Screenshots of the widget before and after (and of the page on a failure) go to
pytest's ``tmp_path``; JupyterLab's log is ``tmp_path/home/jupyterlab.log``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAPTER = Path("chapters/04_cema.py")  # relative to the server's root_dir
GPU_TAG = "gpu"  # cells that need CUDA (CONTRIBUTING.md); the test suite skips them without one
CHROMIUM = Path("/usr/bin/chromium")
# Headless; no sandbox (it needs privileges a CI container lacks); nothing that phones home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Bounded waits, generous because the CI machine has 2 shared cores. Each wait polls and returns
# as soon as its condition holds; none of them is a fixed sleep.
SERVER_START_S = 60.0
SERVER_STOP_S = 20.0
PAGE_LOAD_S = 60.0
RUN_ALL_S = 90.0
REDRAW_S = 30.0

# JupyterLab user settings for the isolated settings dir: open .py files with jupytext's notebook
# view, never autosave (the chapter file must stay untouched), render every cell (no virtual
# scrolling, so the widget is in the DOM wherever it sits), and fetch no news or updates.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {
        "autosave": False,
        "defaultViewers": {"python": "Jupytext Notebook"},
    },
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {
        "checkForUpdates": False,
        "fetchNews": "false",
    },
}

# Server configuration: nothing fetched from the internet (news, update check, extension index).
SERVER_CONFIG = {
    "LabApp": {
        "news_url": None,
        "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
        "extension_manager": "readonly",
    },
}


def require_chromium() -> None:
    """Skip without Chromium or Playwright, except on CI (``CI`` set), where that is a failure."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -e '.[dev]')")
    if not missing:
        return
    reason = "browser test needs " + " and ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI is set, so this is an error, not a skip")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Process ids of every live descendant of ``pid`` (kernels included), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # Field 4 is the parent pid; field 2 (the name) is in parentheses and may hold spaces.
        parent = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_process(proc: subprocess.Popen) -> list[int]:
    """Stop ``proc`` and everything it started, by process id: terminate, wait, then kill.

    Returns the ids of those processes still running afterwards (none, unless something is wrong).
    """
    family = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=SERVER_STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=SERVER_STOP_S)
    # A clean server shutdown ends its kernels; anything left over is stopped by its own pid.
    for pid in family:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
    deadline = time.monotonic() + SERVER_STOP_S
    while any(alive(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in family:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    return [pid for pid in [proc.pid, *family] if alive(pid)]


@dataclass
class LabServer:
    """A running JupyterLab started by :func:`jupyterlab`."""

    url: str  # http://127.0.0.1:<port>
    token: str
    proc: subprocess.Popen
    log: Path


@contextlib.contextmanager
def jupyterlab(root_dir: Path, home: Path) -> Iterator[LabServer]:
    """Run JupyterLab on 127.0.0.1 with a random token and settings isolated under ``home``.

    Yields once the server answers; on exit stops it by process id and checks that it, and every
    process it started, is gone.
    """
    config_dir = home / "jupyter-config"
    settings_dir = config_dir / "lab" / "user-settings"
    for plugin, settings in LAB_SETTINGS.items():
        package, name = plugin.rsplit("/", 1)
        target = settings_dir / package / f"{name}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(settings))
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(SERVER_CONFIG))

    token = secrets.token_hex(24)
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTER_DATA_DIR": str(home / "jupyter-data"),
        "JUPYTER_RUNTIME_DIR": str(home / "jupyter-runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings_dir),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "jupyter-workspaces"),
        "IPYTHONDIR": str(home / "ipython"),
        "MPLCONFIGDIR": str(home / "matplotlib"),
        "MEGALODON_SMOKE": "1",  # inherited by the kernel: the chapter runs at smoke sizes
    }
    # Nothing from the test session leaks into the reader's view: no extra Jupyter paths, the
    # kernel's own (inline) matplotlib backend, and never writing figures into the repository.
    for name in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "MPLBACKEND", "MEGALODON_WRITE_FIGURES"):
        env.pop(name, None)
    log = home / "jupyterlab.log"
    command = [
        sys.executable, "-m", "jupyter", "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
        "--LabApp.expose_app_in_browser=True",  # the test reads cell tags and outputs from the model
    ]  # fmt: skip
    if os.geteuid() == 0:  # CI containers run as root; JupyterLab refuses that unless told
        command.append("--allow-root")
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            command, cwd=root_dir, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = LabServer(url=f"http://127.0.0.1:{port}", token=token, proc=proc, log=log)
    try:
        wait_until_answering(server)
        yield server
    finally:
        survivors = stop_process(proc)
        assert proc.returncode is not None and not survivors, (
            f"JupyterLab (pid {proc.pid}) or its processes {survivors} are still running"
        )


def wait_until_answering(server: LabServer) -> None:
    """Poll the server's REST API until it answers (or fail with the end of its log)."""
    request = urllib.request.Request(
        f"{server.url}/api/status", headers={"Authorization": f"token {server.token}"}
    )
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"JupyterLab exited with code {server.proc.returncode}:\n{server.log.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"JupyterLab did not answer within {SERVER_START_S:.0f} s:\n{server.log.read_text()[-4000:]}"
            )
        time.sleep(0.25)


def decode_png(png_base64: str):
    """The pixels (H, W, channels) of a base64-encoded PNG."""
    import matplotlib.image

    data = base64.b64decode(png_base64)
    assert data.startswith(b"\x89PNG"), f"the plot is not a PNG: {data[:16]!r}"
    return matplotlib.image.imread(io.BytesIO(data), format="png")


# In-page JavaScript. The plot's <img> is the .cema-plot element or inside it; ipywidgets.Image
# serves its value as a blob: URL, and PNG_BASE64 reads the bytes behind it.
PLOT_SRC = """() => {
    const el = document.querySelector('.cema-widget .cema-plot');
    const img = el && (el.tagName === 'IMG' ? el : el.querySelector('img'));
    return img && img.complete && img.naturalWidth > 0 ? img.src : null;
}"""
READOUT_TEXT = "() => document.querySelector('.cema-widget .cema-readout')?.innerText.trim() || null"
PNG_BASE64 = """async (src) => {
    const bytes = new Uint8Array(await (await fetch(src)).arrayBuffer());
    let binary = '';
    for (const byte of bytes) binary += String.fromCharCode(byte);
    return btoa(binary);
}"""
# 'dialog' while JupyterLab asks which kernel to start (the chapters carry no kernelspec),
# 'ready' once a kernel is attached and idle, else null.
KERNEL_STATE = """() => {
    if (document.querySelector('.jp-Dialog')) return 'dialog';
    const panel = document.querySelector('.jp-NotebookPanel');
    const name = panel?.querySelector('.jp-Toolbar-kernelName')?.textContent.trim();
    const idle = panel?.querySelector(".jp-Notebook-ExecutionIndicator[data-status='idle']");
    return name && name !== 'No Kernel' && idle ? 'ready' : null;
}"""
# Per cell of the open notebook, in order: its kind, tags, the execution count its prompt shows
# (null if it has not run) and the text of its error output, if any. Tags and outputs come from
# the notebook model (JupyterLab draws an error like any stderr text), through `window.jupyterapp`
# (the server runs with LabApp.expose_app_in_browser).
CELL_STATES = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    return panel.content.widgets.map(cell => {
        const code = cell.model.type === 'code';
        const match = code && /\\[(\\d+)\\]/.exec(cell.node.querySelector('.jp-InputPrompt').textContent);
        const errors = [];
        for (let j = 0; code && j < cell.model.outputs.length; j++) {
            const output = cell.model.outputs.get(j).toJSON();
            if (output.output_type === 'error') errors.push(`${output.ename}: ${output.evalue}`);
        }
        return {code, tags: cell.model.getMetadata('tags') || [], count: match ? Number(match[1]) : null,
                error: errors.length ? errors.join('\\n') : null};
    });
}"""
# True once a run started at cell `start` after execution count `last` has finished: no cell is
# queued or running ("[*]") and the first code cell from `start` on ran after `last`.
RUN_FINISHED = """([start, last]) => {
    const cells = [...document.querySelectorAll('.jp-NotebookPanel .jp-Notebook-cell')];
    const prompts = cells.map(c =>
        c.classList.contains('jp-CodeCell') ? c.querySelector('.jp-InputPrompt').textContent : null);
    if (prompts.some(p => p !== null && p.includes('*'))) return false;
    const first = prompts.findIndex((p, i) => i >= start && p !== null);
    if (first < 0) return true;
    const match = /\\[(\\d+)\\]/.exec(prompts[first]);
    return match !== null && Number(match[1]) > last;
}"""


def remaining_ms(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic()) * 1000


def run_menu(page, item: str) -> None:
    """Click Run → ``item`` in JupyterLab's menu bar (failing at once if the item is disabled)."""
    from playwright.sync_api import expect

    page.locator(".lm-MenuBar-itemLabel").get_by_text("Run", exact=True).click()
    entry = page.locator(".lm-Menu-item").filter(has=page.get_by_text(item, exact=True))
    expect(entry).not_to_have_class(re.compile(r"\blm-mod-disabled\b"), timeout=5000)
    entry.click()


def run_all_cells(page, has_cuda: bool) -> None:
    """Run → Run All Cells, as a reader would, and wait until every cell has run.

    Without CUDA a cell tagged ``gpu`` raises and the kernel drops the cells queued after it; like a
    reader on a laptop (and like the test suite, which skips those cells), select the next cell and
    Run → Run Selected Cell and All Below. An error anywhere else fails the test.
    """
    from playwright.sync_api import expect

    deadline = time.monotonic() + RUN_ALL_S
    cells = page.locator(".jp-NotebookPanel .jp-Notebook-cell")
    start, last_count = 0, 0
    run_menu(page, "Run All Cells")
    while True:
        page.wait_for_function(RUN_FINISHED, arg=[start, last_count], timeout=remaining_ms(deadline))
        states = page.evaluate(CELL_STATES)
        last_count = max((cell["count"] or 0) for cell in states)
        failed = next((i for i in range(start, len(states)) if states[i]["error"]), None)
        if failed is None:
            break
        if has_cuda or GPU_TAG not in states[failed]["tags"]:
            raise AssertionError(f"cell {failed} of the notebook raised {states[failed]['error']}")
        if failed + 1 == len(states):
            break
        start = failed + 1
        cells.nth(start).locator(".jp-InputPrompt").first.click()
        expect(cells.nth(start)).to_have_class(re.compile(r"\bjp-mod-active\b"), timeout=remaining_ms(deadline))
        # On the last cell JupyterLab disables "... and All Below" (and "Run Selected Cell" would
        # add a new cell below it).
        last = start == len(states) - 1
        run_menu(page, "Run Selected Cell and Do not Advance" if last else "Run Selected Cell and All Below")
    not_run = [i for i, cell in enumerate(states) if cell["code"] and cell["count"] is None]
    assert not not_run, f"cells {not_run} did not run"


def start_kernel(page) -> None:
    """Answer JupyterLab's "Select Kernel" dialog with Python 3 and wait for an idle kernel."""
    from playwright.sync_api import expect

    deadline = time.monotonic() + PAGE_LOAD_S
    while True:
        state = page.wait_for_function(KERNEL_STATE, timeout=remaining_ms(deadline)).json_value()
        if state == "ready":
            return
        dialog = page.locator(".jp-Dialog").first
        expect(dialog.locator(".jp-Dialog-header")).to_have_text("Select Kernel", timeout=remaining_ms(deadline))
        dialog.locator("select").select_option(value='{"name":"python3"}')
        dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
        dialog.wait_for(state="detached", timeout=remaining_ms(deadline))


def widget_state(page, widget) -> dict:
    """The plot's src and PNG bytes (base64), the readout text and the theta slider's readout."""
    plot = page.evaluate(PLOT_SRC)
    return {
        "plot": plot,
        "png": page.evaluate(PNG_BASE64, plot),
        "readout": page.evaluate(READOUT_TEXT),
        "theta": widget.locator(".cema-theta .widget-readout").first.inner_text().strip(),
    }


def run_widget_in_browser(server: LabServer, notebook: Path, out_dir: Path, *, has_cuda: bool) -> dict:
    """Open ``notebook`` (a jupytext .py under the server's root), run all cells, move ``theta``.

    Cells tagged ``gpu`` may fail when ``has_cuda`` is false (see :func:`run_all_cells`).

    Returns the widget's state (see :func:`widget_state`) before and after moving the slider, and
    the URLs outside 127.0.0.1 that the page tried to load (all blocked). Screenshots of the widget
    (and of the whole page if something fails) are written to ``out_dir``.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import sync_playwright

    observed: dict = {"blocked": []}
    local_host = urlsplit(server.url).netloc

    def only_local(route) -> None:
        parts = urlsplit(route.request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc != local_host:
            observed["blocked"].append(route.request.url)
            route.abort()
        else:
            route.continue_()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.route("**/*", only_local)
            page.goto(f"{server.url}/lab/tree/{notebook.as_posix()}?token={server.token}")
            # The jupytext notebook view (not the text editor) opens, with a running kernel.
            panel = page.locator(".jp-NotebookPanel").first
            panel.wait_for(state="visible", timeout=PAGE_LOAD_S * 1000)
            start_kernel(page)

            run_all_cells(page, has_cuda)

            widget = page.locator(".cema-widget").first
            widget.wait_for(state="visible", timeout=REDRAW_S * 1000)
            widget.scroll_into_view_if_needed()
            page.wait_for_function(f"() => ({PLOT_SRC})() && ({READOUT_TEXT})()", timeout=REDRAW_S * 1000)
            observed["before"] = widget_state(page, widget)
            widget.screenshot(path=str(out_dir / "cema_before.png"))

            # Move theta with the keyboard, as a reader could: focus the handle and press PageUp
            # (once: one new value, so one redraw, and the state read below is the settled one).
            handle = widget.locator(".cema-theta .noUi-handle").first
            handle.focus()
            handle.press("PageUp")
            try:
                page.wait_for_function(
                    f"""([plot, readout]) => {{
                        const now = ({PLOT_SRC})(), text = ({READOUT_TEXT})();
                        return now && text && now !== plot && text !== readout;
                    }}""",
                    arg=[observed["before"]["plot"], observed["before"]["readout"]],
                    timeout=REDRAW_S * 1000,
                )
            except PlaywrightTimeoutError:
                now = {"plot": page.evaluate(PLOT_SRC), "readout": page.evaluate(READOUT_TEXT)}
                unchanged = [key for key in now if now[key] == observed["before"][key]]
                raise AssertionError(
                    f"{REDRAW_S:.0f} s after moving theta, still unchanged: {unchanged} (readout {now['readout']!r})"
                ) from None
            observed["after"] = widget_state(page, widget)
            widget.screenshot(path=str(out_dir / "cema_after.png"))
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(out_dir / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    return observed


def test_cema_widget_redraws_when_theta_moves(tmp_path: Path) -> None:
    require_chromium()
    import torch

    chapter = REPO_ROOT / CHAPTER
    assert chapter.is_file(), f"{CHAPTER} is missing"
    digest_before = hashlib.sha256(chapter.read_bytes()).hexdigest()

    with jupyterlab(REPO_ROOT, tmp_path / "home") as server:
        observed = run_widget_in_browser(server, CHAPTER, tmp_path, has_cuda=torch.cuda.is_available())

    before, after = observed["before"], observed["after"]
    assert after["theta"] != before["theta"], f"theta slider did not move: {before['theta']!r}"
    assert after["readout"] != before["readout"], f"readout did not change: {before['readout']!r}"
    pixels_before, pixels_after = decode_png(before["png"]), decode_png(after["png"])
    assert pixels_before.shape != pixels_after.shape or (pixels_before != pixels_after).any(), (
        "plot image changed its bytes but not its pixels"
    )
    assert observed["blocked"] == [], f"the page tried to reach the internet: {observed['blocked']}"
    digest_after = hashlib.sha256(chapter.read_bytes()).hexdigest()
    assert digest_after == digest_before, f"{CHAPTER} was modified by the browser session"


def test_missing_chromium_skips_here_but_fails_on_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(globals(), "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium"):
        require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_chromium()
