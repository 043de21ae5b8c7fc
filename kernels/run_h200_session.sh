#!/usr/bin/env bash
# One GPU session (one call of the device tool, <= 10 min): the GPU tests of the kernels and of the
# model with them, the kernel benchmark with its figure, and the first parts of chapter 10's
# comparison. Every step writes into OUT and a failure in one does not stop the next.
#   OUT=/some/dir bash kernels/run_h200_session.sh [train_compare minutes]
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder}
MINUTES=${1:-5}
mkdir -p "$OUT"
step() { printf '\n=== %s (%ds)\n' "$*" "$SECONDS"; }

step "GPU tests: kernels, dispatch, one training step with kernels vs PyTorch"
# --noconftest -o addopts="": the device image has no nbformat/nbval, which the root conftest and
# pyproject's addopts need for the chapters; these test files need neither.
MEGALODON_SMOKE=1 timeout 300 python3 -m pytest -q -rP --noconftest -o addopts="" -p no:cacheprovider \
    tests/test_ops_cema.py tests/test_ops_timestep_norm.py tests/test_ops_chunk_attention.py tests/test_backend.py \
    tests/test_model_kernels_gpu.py > "$OUT/gpu_tests.log" 2>&1
tail -5 "$OUT/gpu_tests.log"

step "kernels/bench.py: every op, kernel and PyTorch path, with the figure"
timeout 200 python3 kernels/bench.py --figure --out "$OUT" > "$OUT/bench.log" 2>&1
tail -25 "$OUT/bench.log"
cp figures/08_scan_kernels.png "$OUT/" 2>/dev/null

step "chapter 10: throughput, decoding, loss curves and loss by position ($MINUTES min)"
python3 kernels/train_compare.py --out "$OUT/tc" --parts throughput,decode,curves,positions --minutes "$MINUTES" \
    > "$OUT/train_compare.log" 2>&1
tail -30 "$OUT/train_compare.log"
mv "$OUT/tc/train_compare.json" "$OUT/" 2>/dev/null
step "done"
