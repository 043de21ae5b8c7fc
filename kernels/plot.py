"""The roofline-style figure of kernels/bench.py's results: each op's time over its floor.

    python kernels/plot.py kernels/results/nvidia_h200.json    # writes figures/08_scan_kernels.png

One panel per direction (forward, forward+backward); per op and path (Triton kernel: solid,
plain PyTorch: dashed) the measured time divided by the row's floor, at every B x L shape of the
results file, on a log scale. A value of 1 is the floor (the bytes or FLOPs at the device's
measured rate); the dotted line at 2 is the target of issue 8. New ops' rows (TimestepNorm,
attention) appear as soon as the results file holds them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megalodon_lite.notebook import FIGURES_DIR, save_figure  # noqa: E402

FIGURE_NAME = "08_scan_kernels"


def plot_results(json_path: str | Path, directory: str | Path | None = None) -> Path:
    """Draw the results file's rows as time / floor and write ``<directory>/08_scan_kernels.png``
    (default: the repository's figures/). Returns the path written."""
    results = json.loads(Path(json_path).read_text())
    rows = results["rows"]
    if not rows:
        raise ValueError(f"{json_path} holds no rows to plot")
    shapes = sorted({(r["B"], r["L"]) for r in rows}, key=lambda s: (s[1], -s[0]))
    series = sorted({(r["op"], r["path"]) for r in rows})
    ops = sorted({op for op, _ in series})
    colours = {op: plt.cm.tab10(i) for i, op in enumerate(ops)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for ax, (key, floor_key, title) in zip(axes, [("fwd_ms", "floor_fwd_ms", "forward"),
                                                 ("fwdbwd_ms", "floor_fwdbwd_ms", "forward + backward")]):
        for op, path in series:
            by_shape = {(r["B"], r["L"]): r for r in rows if r["op"] == op and r["path"] == path}
            xs = [i for i, s in enumerate(shapes) if s in by_shape]
            ratios = [by_shape[shapes[i]][key] / by_shape[shapes[i]][floor_key] for i in xs]
            ax.plot(xs, ratios, "o-" if path == "triton" else "s--", color=colours[op], label=f"{op} ({path})")
            for i, ratio in zip(xs, ratios):
                ax.annotate(f"{ratio:.3g}" if ratio < 100 else f"{ratio:.0f}", (i, ratio), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.axhline(1.0, color="k", lw=1)
        ax.axhline(2.0, color="k", lw=1, ls=":")
        ax.set(yscale="log", title=title, xlabel="B x L (65,536 tokens per call)")
        ax.set_xticks(range(len(shapes)), [f"{b} x {l:,}" for b, l in shapes])
    axes[0].set_ylabel("time / floor (1 = floor, dotted: 2x target)")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{results['device']}: copy {results['copy_TBps']:.2f} TB/s, bf16 matmul "
                 f"{results['matmul_TFLOPs']:.0f} TFLOP/s ({results['date'][:10]})", fontsize=10)
    fig.tight_layout()
    path = save_figure(fig, FIGURE_NAME, write=True, directory=FIGURES_DIR if directory is None else Path(directory))
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python kernels/plot.py RESULTS_JSON")
    print(f"wrote {plot_results(sys.argv[1])}")
