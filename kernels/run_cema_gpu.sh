#!/usr/bin/env bash
# One GPU session for chapter 08's CEMA kernels (run from the repository root, $OUT collects the logs):
#   1. kernels/tune_cema.py times the variants and makes the best one this checkout's default;
#   2. the GPU tests of tests/test_ops_cema.py (bf16 and fp32 at the benchmark shapes, 2^20 tokens, ...);
#   3. kernels/bench.py --ops cema, with its figure.
# The device image has no jupytext/nbval, so pytest runs without the root conftest (it writes notebooks).
set -u
out=${OUT:-/tmp/cema_gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ date -u; nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/device.txt" 2>&1
timeout 200 python kernels/tune_cema.py --out "$out" --adopt --profile 2>&1 | tee "$out/tune_log.txt"
{ echo "# command: python -m pytest --noconftest -o addopts= -p no:cacheprovider -q -rA -n 16 tests/test_ops_cema.py"
  date -u; python -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
  grep -n "^DEFAULT_CONFIG" megalodon_lite/ops/cema.py
  timeout 150 python -m pytest --noconftest -o addopts= -p no:cacheprovider -q -rA -n 16 tests/test_ops_cema.py 2>&1
} | tee "$out/gpu_tests.txt"
timeout 120 python kernels/bench.py --ops cema --out "$out" --figure 2>&1 | tee "$out/bench_log.txt"
cp figures/08_scan_kernels.png "$out/" 2>/dev/null
ls -la "$out"
