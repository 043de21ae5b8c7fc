"""kernels/train_compare.py, the GPU comparison of chapter 10: its cheapest part end to end, and the merge."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "kernels" / "train_compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("train_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_decode_part_writes_results_with_their_provenance(compare, tmp_path):
    out = tmp_path / "call"
    code = compare.main(["--quick", "--out", str(out), "--parts", "positions,decode", "--minutes", "2"])
    results = json.loads((out / "train_compare.json").read_text())
    header = results["header"]
    assert {"device", "torch", "triton", "python", "date", "command", "corpus"} <= set(header)
    assert "--parts positions,decode" in header["command"]
    assert "needs the curves part" in results["parts"]["positions"]["skipped"]
    rows = results["parts"]["decode"]["rows"]
    assert {(r["model"], r["context"]) for r in rows} == {(m, c) for m in ("megalodon", "llama") for c in (64, 256, 1024)}
    assert {r["mode"] for r in rows} == {"eager", "static"}  # "graph" needs CUDA
    for mode in ("eager", "static"):
        megalodon = [r["state_bytes"] for r in rows if r["model"] == "megalodon" and r["mode"] == mode]
        llama = [r["state_bytes"] for r in rows if r["model"] == "llama" and r["mode"] == mode]
        assert len(set(megalodon)) == 1 and llama == sorted(llama) and llama[0] < llama[-1]  # constant vs growing
    for model in ("megalodon", "llama"):  # greedy decoding: the fixed-buffer step picks the eager step's tokens
        picked = {r["mode"]: r["first_tokens"] for r in rows if r["model"] == model and r["context"] == 256}
        assert len(picked["eager"]) == 8 and picked["eager"] == picked["static"]
    assert code == 0
    merged = compare.merge([str(out / "train_compare.json"), str(out / "train_compare.json")],
                           str(tmp_path / "merged.json"))
    assert len(merged["calls"]) == 2 and merged["parts"]["decode"]["call"] == 1
    again = compare.merge([str(tmp_path / "merged.json"), str(out / "train_compare.json")], str(tmp_path / "again.json"))
    assert len(again["calls"]) == 3 and again["parts"]["decode"]["call"] == 2 and again["calls"][:2] == merged["calls"]


def test_unknown_part_and_full_size_on_a_cpu_are_refused(compare, tmp_path):
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--parts", "everything", "--quick"])
    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--parts", "decode", "--device", "cpu"])


def test_quick_recall_part_records_its_setting_and_chance(compare, tmp_path):
    """The recall part trains both models with the same setting and records it, with what guessing scores."""
    out = tmp_path / "call"
    assert compare.main(["--quick", "--out", str(out), "--parts", "recall", "--minutes", "0.5"]) == 0
    recall = json.loads((out / "train_compare.json").read_text())["parts"]["recall"]
    s = compare.sizes(quick=True)
    assert recall["context"] == s["recall_context"] and recall["mqar_pairs"] == s["recall_pairs"]
    assert recall["chance"]["mqar_value_in_sequence"] == 1 / s["recall_pairs"]
    assert recall["chance"]["passkey_number"] == 1 / 90_000  # five digits, the first not 0
    configs = {kind: value["config"] for kind, value in recall["models"].items()}
    assert set(configs) == {"megalodon", "llama"}
    for kind, config in configs.items():
        assert (config["model"], config["steps"], config["lr"]) == (kind, recall["steps"], s["recall_lr"])
        for key in ("mqar_accuracy", "passkey_accuracy", "passkey_digit_accuracy"):
            assert 0.0 <= recall["models"][kind][key] <= 1.0
    full = compare.sizes(quick=False)  # the GPU setting: context a multiple of the shape's chunk, so answers cross chunks
    assert full["recall_context"] >= 2 * full["recall_shape"]["chunk_size"]


def chapter_10_report_functions() -> dict:
    """Chapter 10's functions that read the results (only those: the chapter's dataclasses need their module)."""
    import ast
    import math

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tree = ast.parse((SCRIPT.parents[1] / "chapters" / "10_training.py").read_text())
    namespace = {"np": np, "math": math, "plt": plt}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in {"gpu_part", "rows_by", "decode_rows", "report_gpu_comparison",
                                                                "report_compiled_throughput", "plot_gpu_comparison"}:
            exec(compile(ast.Module([node], []), "10_training.py", "exec"), namespace)  # noqa: S102 - the book's code
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in {"PAPER", "DECODE_MODES"} for t in node.targets):
            exec(compile(ast.Module([node], []), "10_training.py", "exec"), namespace)  # noqa: S102
    return namespace


def test_quick_compiled_throughput_records_rows_skips_what_does_not_fit_and_is_reported(compare, tmp_path, monkeypatch,
                                                                                         capsys):
    """aot_eager: the same tracing and graph breaks as Inductor, compiled in seconds (the GPU run uses Inductor)."""
    monkeypatch.setenv("MEGALODON_COMPILE_BACKEND", "aot_eager")
    out = tmp_path / "call"
    assert compare.main(["--quick", "--out", str(out), "--parts", "throughput-compiled", "--minutes", "0.4"]) == 0
    part = json.loads((out / "train_compare.json").read_text())["parts"]["throughput-compiled"]
    assert part["backend"] == "aot_eager" and part["contexts_order"] == [128, 512, 256]
    rows = part["rows"]
    assert [(r["context"], r["model"], r["mode"]) for r in rows] == [
        (c, m, mode) for c in (128, 512, 256) for m in ("llama", "megalodon") for mode in ("eager", "compiled")]
    for row in rows:
        assert sum(key in row for key in ("tokens_per_s", "skipped", "error")) == 1, row
    assert all("tokens_per_s" in r for r in rows if r["mode"] == "eager")  # cheap: always measured
    first = rows[1]  # the baseline compiled at the first context: the budget holds it
    assert first["mode"] == "compiled" and first["tokens_per_s"] > 0 and first["compile_seconds"] > 0
    assert first["graphs"] >= 1 and first["compile_steps"] >= 1 and "warmup_seconds" in first
    megalodon = [r for r in rows if r["model"] == "megalodon" and r["mode"] == "compiled" and "tokens_per_s" in r]
    assert all(r["graph_breaks"] >= 1 for r in megalodon)  # the breaks TrainConfig.compile's docstring lists
    namespace = chapter_10_report_functions()
    capsys.readouterr()
    namespace["report_gpu_comparison"]({"parts": {"throughput-compiled": part}})
    printed = capsys.readouterr().out
    assert "[throughput-compiled] torch.compile, backend aot_eager" in printed and "context    128: " in printed
    tight = tmp_path / "tight"  # no time: every compiled row skipped, saying why
    assert compare.main(["--quick", "--out", str(tight), "--parts", "throughput-compiled", "--minutes", "0.02"]) == 0
    rows = json.loads((tight / "train_compare.json").read_text())["parts"]["throughput-compiled"]["rows"]
    assert all("time budget" in r["skipped"] for r in rows if r["mode"] == "compiled")
    merged = compare.merge([str(out / "train_compare.json")], str(tmp_path / "merged.json"))
    assert merged["parts"]["throughput-compiled"]["rows"] == part["rows"]
