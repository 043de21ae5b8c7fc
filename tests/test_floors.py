"""The benchmark floors (megalodon_lite.ops.floors, chapter 08 Part 1.1; ops.attention_floor, chapter
09 section 1): they reproduce every floor the committed benchmark runs recorded, kernels/bench.py
computes with them, bad input is refused, and the figure of time over floor draws a results file."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from megalodon_lite.notebook import recorded_files
from megalodon_lite.ops.attention_floor import BWD_OVER_FWD_ATTENTION, attention_floor_ms
from megalodon_lite.ops.floors import BWD_OVER_FWD_SCAN, Ceilings, plot_time_over_floor, scan_floor_ms

ROOT = Path(__file__).resolve().parents[1]
SCAN_OPS = ("cema", "timestep_norm")


def load_script(name: str):
    """kernels/<name>.py as a module (registered while it runs: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location(f"kernels_{name}", ROOT / "kernels" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def benchmark_runs() -> list[dict]:
    """Every committed results file of kernels/bench.py's schema (a header with the ceilings, and rows)."""
    runs = [json.loads(path.read_text()) for path in recorded_files("*.json")]
    return [run for run in runs if isinstance(run, dict) and {"copy_TBps", "matmul_TFLOPs", "rows"} <= set(run)]


def test_the_committed_runs_are_found():
    ops = {row["op"] for run in benchmark_runs() for row in run["rows"]}
    assert {*SCAN_OPS, "attention"} <= ops, ops


@pytest.mark.parametrize("run", benchmark_runs(), ids=lambda run: run["command"])
def test_scan_floors_reproduce_every_recorded_row(run, bench):
    ceilings = Ceilings(copy_TBps=run["copy_TBps"], matmul_TFLOPs=run["matmul_TFLOPs"])
    assert run["shapes"]["D"] == bench.D_MODEL
    for row in (r for r in run["rows"] if r["op"] in SCAN_OPS):
        floor = scan_floor_ms(row["B"], row["L"], run["shapes"]["D"], ceilings)
        assert math.isclose(row["floor_fwd_ms"], floor, rel_tol=1e-12, abs_tol=0.0), row
        assert math.isclose(row["floor_fwdbwd_ms"], BWD_OVER_FWD_SCAN * floor, rel_tol=1e-12, abs_tol=0.0), row


@pytest.mark.parametrize("run", benchmark_runs(), ids=lambda run: run["command"])
def test_attention_floors_reproduce_every_recorded_row(run, bench):
    ceilings = Ceilings(copy_TBps=run["copy_TBps"], matmul_TFLOPs=run["matmul_TFLOPs"])
    shapes = {"heads": bench.ATTENTION["H"], "chunk": bench.ATTENTION["c"], "z_head_dim": bench.ATTENTION["z"],
              "v_head_dim": bench.ATTENTION["v"]}
    for row in (r for r in run["rows"] if r["op"] == "attention"):
        floor = attention_floor_ms(row["B"], row["L"], ceilings, **shapes)
        assert math.isclose(row["floor_fwd_ms"], floor, rel_tol=1e-12, abs_tol=0.0), row
        assert math.isclose(row["floor_fwdbwd_ms"], BWD_OVER_FWD_ATTENTION * floor, rel_tol=1e-12, abs_tol=0.0), row


def test_bench_uses_the_package_floors(bench):
    assert bench.scan_floor_ms is scan_floor_ms and bench.Ceilings is Ceilings
    assert bench.attention_floor_ms is attention_floor_ms
    ratios = (bench.BWD_OVER_FWD_SCAN, bench.BWD_OVER_FWD_ATTENTION)
    assert ratios == (BWD_OVER_FWD_SCAN, BWD_OVER_FWD_ATTENTION) == (2.5, 3.5)


def test_scan_floor_is_the_bytes_of_x_and_y_at_the_bandwidth():
    # 1 x 1000 x 500 bf16: x and y are 2 * 1e6 bytes, at 1e12 bytes/s that is 2e-6 s = 2e-3 ms
    assert scan_floor_ms(1, 1000, 500, Ceilings(copy_TBps=1.0, matmul_TFLOPs=1.0)) == pytest.approx(2e-3, rel=1e-15)
    assert scan_floor_ms(1, 1000, 500, Ceilings(2.0, 1.0), bytes_per_element=4) == pytest.approx(2e-3, rel=1e-15)


def test_attention_floor_is_the_causal_pairs_flops_at_the_matmul_rate():
    # 2 chunks of 3 tokens: 2 * 6 pairs, each 2 (z + v) = 2 * 10 FLOPs, twice (B = 2): 480 FLOPs at 1e12/s
    floor = attention_floor_ms(2, 6, Ceilings(1.0, 1.0), heads=1, chunk=3, z_head_dim=4, v_head_dim=6)
    assert floor == pytest.approx(480 / 1e12 * 1e3, rel=1e-15)
    assert attention_floor_ms(1, 6, Ceilings(1.0, 1.0), heads=2, chunk=3, z_head_dim=4, v_head_dim=6) == floor


@pytest.mark.parametrize("args, error, message", [
    ((0, 8, 8, Ceilings(1.0, 1.0)), ValueError, "batch must be a positive int"),
    ((1, 8.0, 8, Ceilings(1.0, 1.0)), ValueError, "length must be a positive int"),
    ((1, 8, 8, Ceilings(1.0, 1.0), 0), ValueError, "bytes_per_element must be a positive int"),
    ((1, 8, 8, {"copy_TBps": 1.0}), TypeError, "ceilings must be a Ceilings, got dict"),
    ((1, 8, 8, Ceilings(0.0, 1.0)), ValueError, "ceilings.copy_TBps must be positive"),
])
def test_scan_floor_refuses_bad_input(args, error, message):
    with pytest.raises(error, match=message):
        scan_floor_ms(*args)


def test_the_figure_of_time_over_floor_draws_a_results_file(tmp_path):
    import matplotlib.pyplot as plt

    # the run figures/08_scan_kernels.png shows (other committed runs of bench.py drew theirs elsewhere)
    (run,) = [json.loads(path.read_text()) for path in recorded_files("nvidia_h200.json")]
    fig = plot_time_over_floor(run)
    series = {(row["op"], row["path"]) for row in run["rows"]}
    graphed = [{(row["op"], row["path"]) for row in run["rows"] if row.get(f"graph_{key}") is not None}
               for key in ("fwd_ms", "fwdbwd_ms")]
    # a line per series, per series with CUDA-graph times, the floor and the target
    assert [len(ax.get_lines()) for ax in fig.axes] == [len(series) + len(extra) + 2 for extra in graphed]
    plt.close(fig)
    graph_run = {**run, "rows": [{**row, "graph_fwd_ms": row["fwd_ms"] / 2, "graph_fwdbwd_ms": row["fwdbwd_ms"] / 2}
                                 for row in run["rows"] if row["op"] == "cema"]}
    fig = plot_time_over_floor(graph_run)
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert "cema (triton, CUDA graph)" in labels and "cema (torch, CUDA graph)" in labels, labels
    graph_line = fig.axes[1].get_lines()[labels.index("cema (triton, CUDA graph)")]
    eager_line = fig.axes[1].get_lines()[labels.index("cema (triton)")]
    assert list(graph_line.get_ydata()) == [y / 2 for y in eager_line.get_ydata()]
    plt.close(fig)
    plot = load_script("plot")
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert plot.plot_results(tmp_path / "run.json", directory=tmp_path) == tmp_path / "08_scan_kernels.png"
    with pytest.raises(ValueError, match="no rows"):
        plot_time_over_floor({**run, "rows": []})


@pytest.mark.parametrize("length, shapes, error, message", [
    (100, {"heads": 1, "chunk": 64, "z_head_dim": 8, "v_head_dim": 8}, ValueError,
     "chunk must be a positive int dividing length=100"),
    (128, {"heads": 0, "chunk": 64, "z_head_dim": 8, "v_head_dim": 8}, ValueError, "heads must be a positive int"),
])
def test_attention_floor_refuses_bad_input(length, shapes, error, message):
    with pytest.raises(error, match=message):
        attention_floor_ms(1, length, Ceilings(1.0, 1.0), **shapes)
    with pytest.raises(ValueError, match="ceilings.matmul_TFLOPs must be positive"):
        attention_floor_ms(1, 128, Ceilings(1.0, -1.0), heads=1, chunk=64, z_head_dim=8, v_head_dim=8)


def _row(op: str, ratio: float, graph_ratio: float | None, path: str = "triton") -> dict:
    floor = 0.25
    return {"op": op, "path": path, "B": 1, "L": 8, "fwd_ms": 1.0, "fwdbwd_ms": ratio * floor, "floor_fwd_ms": 0.1,
            "floor_fwdbwd_ms": floor, "graph_fwd_ms": None,
            "graph_fwdbwd_ms": None if graph_ratio is None else graph_ratio * floor}


def test_target_verdicts_take_the_worst_shape_and_say_why_a_miss_is_missed(bench):
    rows = [_row("cema", 3.0, 2.5), _row("cema", 12.0, 4.0), _row("cema", 99.0, None, path="torch"),
            _row("attention", 1.5, 1.6), _row("attention", 1.65, 1.2)]
    verdicts = bench.target_verdicts(rows)
    assert set(verdicts) == {"cema", "attention"}          # no Triton rows for timestep_norm: no verdict
    cema = verdicts["cema"]
    assert cema["worst_x_floor_fwdbwd_eager"] == pytest.approx(12.0)       # the PyTorch row is not the op's
    assert cema["worst_x_floor_fwdbwd_graph"] == pytest.approx(4.0)
    assert (cema["met_eager"], cema["met_graph"]) == (False, False)
    assert cema["missed_by_graph"] == pytest.approx(4.0 / bench.TARGET_X_FLOOR["cema"])
    assert cema["why"] == bench.WHY_MISSED["cema"]
    attention = verdicts["attention"]
    assert (attention["met_eager"], attention["met_graph"]) == (True, True)
    assert "missed_by_graph" not in attention and "why" not in attention


def test_target_verdicts_without_every_graph_time_leave_the_gpu_verdict_open(bench):
    verdict = bench.target_verdicts([_row("timestep_norm", 1.0, 1.0), _row("timestep_norm", 1.5, None)])["timestep_norm"]
    assert verdict["worst_x_floor_fwdbwd_graph"] is None and verdict["met_graph"] is None
    assert verdict["met_eager"] is True


def test_the_committed_benchmark_states_its_targets(bench):
    """The main results file carries the verdicts its own rows give (bench.py --targets FILE rewrites them)."""
    data = json.loads((ROOT / "kernels" / "results" / "nvidia_h200.json").read_text())
    assert data["targets"] == json.loads(json.dumps(bench.target_verdicts(data["rows"])))
