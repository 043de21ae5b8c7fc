#!/usr/bin/env bash
# One call of the device tool on two H200s (kind nvidia-h200-x2, <= 10 min): chapter 09's tuning
# run, the attention GPU tests and benchmark at the tuned tiles, then chapter 11's two-GPU run.
# Every step writes into OUT and a failure in one does not stop the next.
#   OUT=/some/dir bash kernels/run_h200_x2_session.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder}
mkdir -p "$OUT"
step() { printf '\n=== %s (%ds)\n' "$*" "$SECONDS"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

step "chapter 09: tile candidates and designs (kernels/tune_attention.py)"
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 kernels/tune_attention.py --out "$OUT" > "$OUT/tune_attention.log" 2>&1
grep -E "^ *(prologue|epilogue|delta|grad) |design|best|whole|overrides|failed" "$OUT/tune_attention.log" | cut -c1-200
export MEGALODON_ATTENTION_TILES=$(cat "$OUT/best_overrides.json" 2>/dev/null || echo '{}')
echo "MEGALODON_ATTENTION_TILES=$MEGALODON_ATTENTION_TILES"

step "GPU tests: attention kernels, dispatch, one training step with kernels vs PyTorch (tuned tiles)"
# --noconftest -o addopts="": the device image has no nbformat/nbval, which the root conftest and
# pyproject's addopts need for the chapters; these test files need neither.
CUDA_VISIBLE_DEVICES=0 MEGALODON_SMOKE=1 timeout 150 python3 -m pytest -q -rP --noconftest -o addopts="" \
    -p no:cacheprovider tests/test_ops_chunk_attention.py tests/test_backend.py tests/test_model_kernels_gpu.py \
    > "$OUT/gpu_tests_attention.log" 2>&1
tail -3 "$OUT/gpu_tests_attention.log"

step "kernels/bench.py --ops attention (tuned tiles)"
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 kernels/bench.py --ops attention --out "$OUT/bench" > "$OUT/bench_attention.log" 2>&1
tail -8 "$OUT/bench_attention.log"
mv "$OUT/bench/nvidia_h200.json" "$OUT/nvidia_h200_attention.json" 2>/dev/null

step "chapter 11: one GPU against two, both schemes, contexts 64K and 128K"
timeout 200 torchrun --standalone --nproc-per-node 2 kernels/sequence_parallel_bench.py --out "$OUT" \
    > "$OUT/sequence_parallel.log" 2>&1
tail -12 "$OUT/sequence_parallel.log"
step "done"
