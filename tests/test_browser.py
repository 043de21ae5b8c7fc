"""Chapter 04's CEMA widget, driven in a real browser.

Starts JupyterLab on 127.0.0.1 (random port, random token, isolated settings), opens
``chapters/04_cema.py`` as a notebook through jupytext in Debian's headless Chromium (Playwright
with ``executable_path="/usr/bin/chromium"``; no downloaded browser), runs all cells, moves the
``θ₁`` slider and asserts that the plot's pixels and the readout changed. The server is stopped
by its process id (with every process it started).

JupyterLab runs with its defaults, autosave included (only its interval is shortened from 120 s to
a few seconds, so the test does not wait two minutes): after Run All and the slider, the test waits
until JupyterLab has saved the notebook back to ``chapters/04_cema.py`` and asserts that the file
is byte for byte as it was. That is the round trip every reader makes; the chapter's header names
ipykernel's own kernelspec, so JupyterLab has nothing to rewrite.

The widget contract this relies on (chapter 04; tests/test_cema_widget.py checks it without a
browser): the whole widget has CSS class ``cema-widget``; the FloatSliders ``|q|`` and ``θ₁``
(the base frequency, rad/token) carry ``cema-magnitude`` and ``cema-theta``; the state selector
``cema-state``; the plot is an ``ipywidgets.Image`` with ``cema-plot``; an ``ipywidgets.HTML``
readout with ``cema-readout`` shows the half-life and the selected state's frequency and period
after every redraw. The test moves ``θ₁``.

The chapter carries a kernelspec, so JupyterLab must start Python 3 without asking (a "Select
Kernel" dialog fails the test). Run All must end cleanly: every CPU cell runs without an error. The
cells tagged ``gpu`` close the chapter (section "On a GPU"); without CUDA the first of them stops
the run with ``require_cuda()``'s NoCUDAError, as it would for a reader on a laptop: one calm line
(its message, no traceback), the only error allowed. The kernel gets no ``MEGALODON_SMOKE`` on a
machine without CUDA: the chapter picks smoke sizes from the device, as it does for a reader. To
read cell tags and outputs it runs JupyterLab with ``LabApp.expose_app_in_browser``.

Without ``/usr/bin/chromium`` the test is skipped, unless the ``CI`` environment variable is set:
then it fails. Screenshots of the widget before and after (and of the page on a failure) go to
pytest's ``tmp_path``; JupyterLab's log is ``tmp_path/home/jupyterlab.log``.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
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

from megalodon_lite.notebook import NO_CUDA_MESSAGE

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAPTER = Path("chapters/04_cema.py")  # relative to the server's root_dir
GPU_TAG = "gpu"  # cells that need CUDA (CONTRIBUTING.md); the test suite skips them without one
# How the first gpu cell stops a run without CUDA (megalodon_lite.notebook.require_cuda): this
# error, shown as its message alone.
NO_CUDA_ERROR = f"NoCUDAError: {NO_CUDA_MESSAGE}"
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
AUTOSAVE_INTERVAL_S = 3  # JupyterLab's default is 120 s
AUTOSAVE_S = 60.0

# JupyterLab user settings for the isolated settings dir: open .py files with jupytext's notebook
# view, autosave on (the default) but every few seconds, render every cell (no virtual scrolling,
# so the widget is in the DOM wherever it sits), and fetch no news or updates.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {
        "autosave": True,
        "autosaveInterval": AUTOSAVE_INTERVAL_S,
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
    }
    # Nothing from the test session leaks into the reader's view: no extra Jupyter paths, the
    # kernel's own (inline) matplotlib backend, and never writing figures into the repository.
    # Without CUDA the chapter chooses smoke sizes itself, as for a reader; with CUDA the test
    # still asks for them (full size is the book build's job).
    for name in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "MPLBACKEND", "MEGALODON_WRITE_FIGURES",
                 "MEGALODON_SMOKE"):
        env.pop(name, None)
    if has_cuda():
        env["MEGALODON_SMOKE"] = "1"
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
# The header of a dialog (such as "Select Kernel", which a chapter without a kernelspec raises),
# 'ready' once a kernel is attached and idle, else null.
KERNEL_STATE = """() => {
    const dialog = document.querySelector('.jp-Dialog');
    if (dialog) return 'dialog: ' + (dialog.querySelector('.jp-Dialog-header')?.innerText.trim() || '?');
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
        const errors = [], tracebacks = [];
        for (let j = 0; code && j < cell.model.outputs.length; j++) {
            const output = cell.model.outputs.get(j).toJSON();
            if (output.output_type === 'error') {
                errors.push(`${output.ename}: ${output.evalue}`);
                tracebacks.push(...output.traceback);
            }
        }
        const shown = code ? (cell.node.querySelector('.jp-OutputArea')?.innerText.trim() || '') : '';
        return {code, tags: cell.model.getMetadata('tags') || [], count: match ? Number(match[1]) : null,
                error: errors.length ? errors.join('\\n') : null, traceback: tracebacks, shown};
    });
}"""
# True once a run has finished: no cell is queued or running ("[*]") and the first code cell has
# an execution count (it has run). A cell whose run the kernel dropped after an error shows "[ ]".
RUN_FINISHED = """() => {
    const prompts = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt')]
        .map(p => p.textContent);
    return prompts.length > 0 && !prompts.some(p => p.includes('*')) && /\\[\\d+\\]/.test(prompts[0]);
}"""


def run_menu(page, item: str) -> None:
    """Click Run → ``item`` in JupyterLab's menu bar (failing at once if the item is disabled)."""
    from playwright.sync_api import expect

    page.locator(".lm-MenuBar-itemLabel").get_by_text("Run", exact=True).click()
    entry = page.locator(".lm-Menu-item").filter(has=page.get_by_text(item, exact=True))
    expect(entry).not_to_have_class(re.compile(r"\blm-mod-disabled\b"), timeout=5000)
    entry.click()


def run_all_cells(page, has_cuda: bool) -> None:
    """Run → Run All Cells, as a reader would; wait until the run ends and check how it ended.

    Every CPU code cell must have run without an error. With CUDA the cells tagged ``gpu`` must
    have run too. Without it the first of them (the chapter's last section) stops the run with
    ``require_cuda()``'s RuntimeError, the one error allowed, and the kernel drops those after it.
    """
    run_menu(page, "Run All Cells")
    page.wait_for_function(RUN_FINISHED, timeout=RUN_ALL_S * 1000)
    states = page.evaluate(CELL_STATES)
    code = [i for i, cell in enumerate(states) if cell["code"]]
    gpu = [i for i in code if GPU_TAG in states[i]["tags"]]
    cpu = [i for i in code if i not in gpu]
    assert not gpu or not cpu or max(cpu) < gpu[0], f"CPU cells {[i for i in cpu if i > gpu[0]]} follow the gpu cell {gpu[0]}"
    errors = {i: cell["error"] for i, cell in enumerate(states) if cell["error"]}
    if gpu and not has_cuda:
        first_gpu_error = errors.pop(gpu[0], None) or ""
        assert first_gpu_error == NO_CUDA_ERROR, (
            f"without CUDA the first gpu cell ({gpu[0]}) must stop the run with {NO_CUDA_ERROR!r}, "
            f"got {first_gpu_error!r}")
        stop = states[gpu[0]]
        assert stop["traceback"] == [NO_CUDA_MESSAGE] and stop["shown"] == NO_CUDA_MESSAGE, (
            f"the stop must show one calm line, not a traceback: {stop['shown']!r}")
    assert not errors, f"Run All raised in cells {errors}"
    must_run = code if has_cuda else cpu
    not_run = [i for i in must_run if states[i]["count"] is None]
    assert not not_run, f"cells {not_run} did not run"


def wait_for_kernel(page) -> None:
    """Wait for an idle Python kernel, which JupyterLab starts from the chapter's kernelspec.

    A dialog instead (above all "Select Kernel": the chapter lost its kernelspec header) fails.
    """
    state = page.wait_for_function(KERNEL_STATE, timeout=PAGE_LOAD_S * 1000).json_value()
    assert state == "ready", f"JupyterLab showed a dialog instead of starting the kernel ({state})"
    name = page.locator(".jp-NotebookPanel .jp-Toolbar-kernelName").first.inner_text().strip()
    assert name.startswith("Python 3"), f"the notebook's kernel is {name!r}, expected Python 3"


def widget_state(page, widget) -> dict:
    """The plot's src and PNG bytes (base64), the readout text and the θ₁ slider's readout."""
    plot = page.evaluate(PLOT_SRC)
    return {
        "plot": plot,
        "png": page.evaluate(PNG_BASE64, plot),
        "readout": page.evaluate(READOUT_TEXT),
        "theta": widget.locator(".cema-theta .widget-readout").first.inner_text().strip(),
    }


# Whether the open notebook has unsaved changes (false right after an autosave).
DIRTY = "() => window.jupyterapp.shell.currentWidget.context.model.dirty"


def wait_for_autosave(page, path: Path, modified_before: int) -> None:
    """Wait until JupyterLab's autosave has written ``path`` (a newer mtime) and nothing is unsaved."""
    deadline = time.monotonic() + AUTOSAVE_S
    while time.monotonic() < deadline:
        if path.stat().st_mtime_ns > modified_before and page.evaluate(DIRTY) is False:
            return
        time.sleep(0.25)
    raise AssertionError(f"JupyterLab did not autosave {path.name} within {AUTOSAVE_S:.0f} s "
                         f"(interval {AUTOSAVE_INTERVAL_S} s)")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_widget_in_browser(server: LabServer, root: Path, notebook: Path, out_dir: Path, *,
                          has_cuda: bool) -> dict:
    """Open ``notebook`` (a jupytext .py under the server's ``root``), run all cells, move ``θ₁``.

    Without CUDA (``has_cuda`` false) the run stops at the first cell tagged ``gpu`` (see
    :func:`run_all_cells`).

    Then waits for JupyterLab's autosave to write the notebook back to its file.

    Returns the widget's state (see :func:`widget_state`) before and after moving the slider, and
    the URLs outside 127.0.0.1 that the page tried to load (all blocked). Screenshots of the widget
    (and of the whole page if something fails) are written to ``out_dir``.
    """
    modified_before = (root / notebook).stat().st_mtime_ns
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
            wait_for_kernel(page)

            run_all_cells(page, has_cuda)

            widget = page.locator(".cema-widget").first
            widget.wait_for(state="visible", timeout=REDRAW_S * 1000)
            widget.scroll_into_view_if_needed()
            page.wait_for_function(f"() => ({PLOT_SRC})() && ({READOUT_TEXT})()", timeout=REDRAW_S * 1000)
            observed["before"] = widget_state(page, widget)
            widget.screenshot(path=str(out_dir / "cema_before.png"))

            # Move θ₁ with the keyboard, as a reader could: focus the handle and press PageUp
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
                    f"{REDRAW_S:.0f} s after moving θ₁, still unchanged: {unchanged} (readout {now['readout']!r})"
                ) from None
            observed["after"] = widget_state(page, widget)
            widget.screenshot(path=str(out_dir / "cema_after.png"))
            wait_for_autosave(page, root / notebook, modified_before)
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(out_dir / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    return observed


def test_cema_widget_redraws_and_autosave_leaves_the_chapter_as_it_was(tmp_path: Path) -> None:
    require_chromium()
    # The server serves a copy of the chapter and its jupytext.toml, so that a failing round trip
    # cannot touch the checkout; the copy is byte for byte the chapter.
    root = tmp_path / "root"
    (root / CHAPTER.parent).mkdir(parents=True)
    for name in (CHAPTER.name, "jupytext.toml"):
        shutil.copyfile(REPO_ROOT / CHAPTER.parent / name, root / CHAPTER.parent / name)
    chapter = root / CHAPTER
    digest_before = hashlib.sha256(chapter.read_bytes()).hexdigest()
    text_before = chapter.read_text(encoding="utf-8")

    with jupyterlab(root, tmp_path / "home") as server:
        observed = run_widget_in_browser(server, root, CHAPTER, tmp_path, has_cuda=has_cuda())

    before, after = observed["before"], observed["after"]
    assert after["theta"] != before["theta"], f"θ₁ slider did not move: {before['theta']!r}"
    assert after["readout"] != before["readout"], f"readout did not change: {before['readout']!r}"
    pixels_before, pixels_after = decode_png(before["png"]), decode_png(after["png"])
    assert pixels_before.shape != pixels_after.shape or (pixels_before != pixels_after).any(), (
        "plot image changed its bytes but not its pixels"
    )
    assert observed["blocked"] == [], f"the page tried to reach the internet: {observed['blocked']}"
    digest_after = hashlib.sha256(chapter.read_bytes()).hexdigest()
    assert digest_after == digest_before, (
        f"JupyterLab's autosave changed {CHAPTER}:\n" + "".join(difflib.unified_diff(
            text_before.splitlines(True), chapter.read_text(encoding="utf-8").splitlines(True), n=1)))


def test_missing_chromium_skips_here_but_fails_on_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(globals(), "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium"):
        require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_chromium()
