"""kernels/header.py: the header of every workbench results file (device, versions, date, command),
its keys in their fixed order, their types, and the command rebuilt from a fake argv."""

from __future__ import annotations

import datetime
import importlib.util
import json
import platform
import re
import sys
from pathlib import Path

import pytest
import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
# a committed results file of kernels/bench.py: new files keep its keys and formats (committed ones stay as they are)
COMMITTED = json.loads((ROOT / "kernels" / "results" / "nvidia_h200.json").read_text())


@pytest.fixture(scope="module")
def header():
    spec = importlib.util.spec_from_file_location("kernels_header", ROOT / "kernels" / "header.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keys_in_order_then_the_scripts_own(header):
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    rows = [{"op": "cema"}]
    result = header.results_header("cpu (interpreter)", argv=[str(ROOT / "kernels" / "bench.py"), "--out", "/tmp/a b"],
                                   copy_TBps=4.1, rows=rows)
    assert list(result) == ["device", "torch", "triton", "date", "command", "copy_TBps", "rows"]
    assert list(result)[:5] == list(COMMITTED)[:5]
    assert result["device"] == "cpu (interpreter)"
    assert result["torch"] == torch.__version__ and result["triton"] == triton.__version__
    # UTC to the second with its offset, as committed (the chapters sort runs by this string)
    assert re.sub(r"\d", "0", result["date"]) == re.sub(r"\d", "0", COMMITTED["date"]) == "0000-00-00T00:00:00+00:00"
    assert before <= datetime.datetime.fromisoformat(result["date"]) <= datetime.datetime.now(datetime.timezone.utc)
    assert result["command"] == "python kernels/bench.py --out '/tmp/a b'"   # quoted for a shell
    assert result["copy_TBps"] == 4.1 and result["rows"] is rows
    json.dumps(result)   # everything in it is JSON


def test_versions_come_in_one_order_whichever_are_asked_for(header):
    argv = ["kernels/x.py"]
    assert list(header.results_header("cpu", versions=("python", "torch"), argv=argv)) == [
        "device", "torch", "python", "date", "command"]
    assert list(header.results_header("cpu", versions=(), argv=argv)) == ["device", "date", "command"]
    assert header.results_header("cpu", versions=("python",), argv=argv)["python"] == platform.python_version()
    with pytest.raises(ValueError, match="versions must be some of"):
        header.results_header("cpu", versions=("numpy",), argv=argv)
    with pytest.raises(ValueError, match=r"extra keys \['date'\]"):
        header.results_header("cpu", argv=argv, date="yesterday")


def test_the_command_defaults_to_sys_argv_relative_to_the_repository(header, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT / "kernels")   # a script run from elsewhere still reads kernels/<script>.py
    monkeypatch.setattr(sys, "argv", ["tune_cema.py", "--interpret"])
    assert header.results_header("cpu", argv=None)["command"] == "python kernels/tune_cema.py --interpret"
    outside = str(tmp_path / "probe.py")   # a script outside the repository: its path as typed
    assert header.command_line([outside, "--n", "2"]) == f"python {outside} --n 2"
    torchrun = ("torchrun", "--standalone", "--nproc-per-node", "2")
    assert (header.command_line([str(ROOT / "kernels" / "sequence_parallel_bench.py"), "--out", "o"], launcher=torchrun)
            == "torchrun --standalone --nproc-per-node 2 kernels/sequence_parallel_bench.py --out o")


def test_the_device_is_the_cuda_name_unless_labelled(header, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA H200")
    assert header.results_header(argv=["kernels/bench.py"])["device"] == "NVIDIA H200"
    target = header.results_header("sm_90", device_key="target", versions=("triton",), argv=["kernels/x.py"])
    assert list(target) == ["target", "triton", "date", "command"] and target["target"] == "sm_90"

