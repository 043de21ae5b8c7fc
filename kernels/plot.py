"""The roofline-style figure of kernels/bench.py's results: each op's time over its floor.

    python kernels/plot.py kernels/results/nvidia_h200.json    # writes figures/08_scan_kernels.png

One panel per direction (forward, forward+backward); per op and path (Triton kernel: solid,
plain PyTorch: dashed) the measured time divided by the row's floor, at every B x L shape of the
results file, on a log scale. A value of 1 is the floor (the bytes or FLOPs at the device's
measured rate); the dotted line at 2 is the target of issue 8. New ops' rows (TimestepNorm,
attention) appear as soon as the results file holds them. The drawing is chapter 08's
``megalodon_lite.ops.floors.plot_time_over_floor``, which the chapter shows from the committed run.
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
from megalodon_lite.ops.floors import plot_time_over_floor  # noqa: E402

FIGURE_NAME = "08_scan_kernels"


def plot_results(json_path: str | Path, directory: str | Path | None = None) -> Path:
    """Draw the results file's rows as time / floor (chapter 08's ``plot_time_over_floor``) and write
    ``<directory>/08_scan_kernels.png`` (default: the repository's figures/). Returns the path written."""
    fig = plot_time_over_floor(json.loads(Path(json_path).read_text()))
    path = save_figure(fig, FIGURE_NAME, write=True, directory=FIGURES_DIR if directory is None else Path(directory))
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python kernels/plot.py RESULTS_JSON")
    print(f"wrote {plot_results(sys.argv[1])}")
