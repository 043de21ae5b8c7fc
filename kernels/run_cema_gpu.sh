#!/usr/bin/env bash
# One GPU session for chapter 08's CEMA kernels (run from the repository root, $OUT collects the logs):
#   1. kernels/probe_cema.py: the kernels' access pattern alone (tiled copies, the scratch and its transpose);
#   2. kernels/tune_cema.py times the variants ($VARIANTS, default: every one; eager and GPU time) and makes
#      the best one this checkout's default (--adopt: faster in GPU time at every shape than the first);
#   3. the GPU tests of tests/test_ops_cema.py (bf16 and fp32 at the benchmark shapes, 2^20 tokens, ...);
#   4. kernels/bench.py --ops cema, with its figure.
# The device image has no jupytext/nbval, so pytest runs without the root conftest (it writes notebooks).
#   OUT=/some/dir VARIANTS="default scratch" bash kernels/run_cema_gpu.sh
set -u
out=${OUT:-/tmp/cema_gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() { printf '\n=== %s (%ds)\n' "$*" "$SECONDS"; }
step "kernels/probe_cema.py (parts 2 and 3)"
timeout 90 python3 kernels/probe_cema.py --out "$out" > "$out/probe_log.txt" 2>&1
tail -16 "$out/probe_log.txt"
step "kernels/tune_cema.py --adopt ${VARIANTS:-(every variant)}"
timeout 200 python3 kernels/tune_cema.py --out "$out" --adopt ${VARIANTS:+--variants $VARIANTS} > "$out/tune_log.txt" 2>&1
grep -E "GPU time|faster|adopted|wrote|Error" "$out/tune_log.txt" | cut -c1-220
step "GPU tests"
{ echo "# command: python -m pytest --noconftest -o addopts= -p no:cacheprovider -q -rA -n 16 tests/test_ops_cema.py"
  date -u; python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
  grep -n "^DEFAULT_CONFIG" megalodon_lite/ops/cema.py
  timeout 150 python3 -m pytest --noconftest -o addopts= -p no:cacheprovider -q -rA -n 16 tests/test_ops_cema.py 2>&1
} > "$out/gpu_tests.txt"
tail -3 "$out/gpu_tests.txt"
step "kernels/bench.py --ops cema"
timeout 120 python3 kernels/bench.py --ops cema --out "$out" --figure > "$out/bench_log.txt" 2>&1
tail -8 "$out/bench_log.txt"
cp figures/08_scan_kernels.png "$out/" 2>/dev/null
step done
