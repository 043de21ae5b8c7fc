#!/usr/bin/env bash
# Build the whole book at full size on a GPU, let the chapters write their figures into figures/,
# and record what ran (device, versions, date, command, per-chapter time and status) under
# kernels/results/. Run from the repository root in an environment where `pip install -e ".[dev]"`
# (or the same packages) is installed with a CUDA build of PyTorch.
#
#     bash kernels/run_book_full.sh [OUT_DIR]
set -euo pipefail
out=${1:-build/book-full}
python -c "import torch; assert torch.cuda.is_available(), 'this script is for a CUDA machine'"
MEGALODON_WRITE_FIGURES=1 python -m megalodon_lite.book --full --out "$out"
device=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower())")
mkdir -p kernels/results
cp "$out/manifest.json" "kernels/results/book_full_${device}.json"
echo "recorded kernels/results/book_full_${device}.json; figures in figures/"
