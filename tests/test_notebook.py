"""What a chapter's first cells rely on: the size chosen from the device, and the calm GPU stop."""

from __future__ import annotations

import re

import nbformat
import pytest
import torch

from megalodon_lite import book, notebook


@pytest.mark.parametrize("value, smoke", [("1", True), ("true", True), (" ON ", True), ("0", False),
                                          ("no", False), ("False", False)])
def test_the_environment_variable_overrides_the_device(value, smoke):
    assert notebook.smoke_setting({"MEGALODON_SMOKE": value}) == (smoke, f"MEGALODON_SMOKE={int(smoke)}")


def test_unset_the_device_decides(monkeypatch):
    monkeypatch.delenv("MEGALODON_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert notebook.smoke_setting({}) == (False, "a CUDA GPU is present")
    assert notebook.smoke_setting({"MEGALODON_SMOKE": ""}) == (False, "a CUDA GPU is present")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert notebook.smoke_setting({}) == (True, "no CUDA GPU here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("MEGALODON_DEVICE", "cpu")  # a forced CPU runs small even next to a GPU
    assert notebook.smoke_setting({}) == (True, "no CUDA GPU here")


def test_a_typo_is_an_error_naming_the_variable():
    with pytest.raises(ValueError, match="MEGALODON_SMOKE must be 1 or 0.*'yes please'"):
        notebook.smoke_setting({"MEGALODON_SMOKE": "yes please"})


def test_describe_run_says_the_size_the_reason_and_the_switch(monkeypatch, capsys):
    monkeypatch.setattr(notebook, "SMOKE", True)
    monkeypatch.setattr(notebook, "SMOKE_REASON", "no CUDA GPU here")
    notebook.describe_run(torch.device("cpu"))
    line = capsys.readouterr().out.strip()
    assert line == ("Smoke size (tiny tensors, seconds per chapter) on CPU: no CUDA GPU here. "
                    "Full size: set MEGALODON_SMOKE=0 before starting Jupyter.")
    monkeypatch.setattr(notebook, "SMOKE", False)
    monkeypatch.setattr(notebook, "SMOKE_REASON", "MEGALODON_SMOKE=0")
    assert notebook.run_description(torch.device("cpu")).startswith("Full size on CPU: MEGALODON_SMOKE=0.")


def test_require_cuda_stops_with_a_runtime_error_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="need a CUDA GPU .*tagged 'gpu'.*Everything above ran"):
        notebook.require_cuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert notebook.require_cuda() == torch.device("cuda")


def test_run_all_without_cuda_stops_at_the_gpu_section_with_one_calm_line(tmp_path):
    """What a reader sees in Jupyter: the stop is an error output whose traceback is the message
    alone (IPython renders it through ``_render_traceback_``), not a red Python traceback."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import torch\ntorch.cuda.is_available = lambda: False  # as on a laptop\n"
                                  "from megalodon_lite.notebook import require_cuda"),
        nbformat.v4.new_code_cell("cuda = require_cuda()\nprint('not reached')", metadata={"tags": ["gpu"]}),
        nbformat.v4.new_code_cell("print('not reached either')", metadata={"tags": ["gpu"]}),
    ]
    client = NotebookClient(nb, timeout=60, kernel_name="python3", config=book.kernel_config(tmp_path))
    with pytest.raises(CellExecutionError):
        client.execute()
    (error,) = [o for o in nb.cells[1].outputs if o.output_type == "error"]
    assert error.ename == "NoCUDAError"
    assert [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in error.traceback] == [notebook.NO_CUDA_MESSAGE]
    assert not nb.cells[2].get("outputs"), "Run All must stop at the first gpu cell"


def test_recorded_finds_the_checkout_results_and_names_both_places_when_missing():
    from megalodon_lite.notebook import RESULTS_DIRS, recorded

    assert recorded("nvidia_h200.json") == RESULTS_DIRS[0] / "nvidia_h200.json"
    with pytest.raises(FileNotFoundError, match="no recorded result 'absent.json' in .*kernels/results or .*_results"):
        recorded("absent.json")


def test_recorded_files_match_a_pattern_and_prefer_the_checkout(tmp_path, monkeypatch):
    checkout, installed = tmp_path / "checkout", tmp_path / "installed"
    for folder, names in ((checkout, ["run_b.json", "other.txt"]), (installed, ["run_a.json", "run_b.json"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_text(folder.name)
    monkeypatch.setattr(notebook, "RESULTS_DIRS", (checkout, installed))
    assert notebook.recorded_files("run_*.json") == [installed / "run_a.json", checkout / "run_b.json"]
    assert notebook.recorded_files("absent_*.json") == []


def test_repository_script_is_found_in_a_clone_and_stops_calmly_without_one(tmp_path, monkeypatch):
    assert notebook.repository_script("kernels/bench.py") == notebook.REPOSITORY_ROOT / "kernels" / "bench.py"
    monkeypatch.setattr(notebook, "REPOSITORY_ROOT", tmp_path)  # as in site-packages of an installed wheel
    with pytest.raises(notebook.NeedsCloneError, match="runs kernels/bench.py, a script of the megalodon-lite "
                                                       "repository .* run the chapter from a clone") as stop:
        notebook.repository_script("kernels/bench.py")
    assert isinstance(stop.value, RuntimeError)
    assert stop.value._render_traceback_() == [str(stop.value)]  # one line in Jupyter, no traceback
