#!/usr/bin/env bash
# One call of the device tool on two H200s (kind nvidia-h200-x2, <= 10 min). Parts, in this order,
# each writing into OUT; a failure in one does not stop the next:
#   attention  chapter 09's tuning run, then the attention GPU tests, benchmark and profile at the tuned tiles
#   sp-bench   chapter 11's two-GPU run (kernels/sequence_parallel_bench.py)
#   decode     the CUDA-graph decoding GPU tests, then chapter 10's throughput and decoding parts
#   attention-check  the attention GPU tests, kernels/bench.py for every op (--figure), the profile
#   memory     kernels/memory_profile.py, then chapter 10's throughput part (speed and peak memory)
#   model-tests  the GPU tests of the model with kernels (one training step vs PyTorch) and of decoding
#   memory-compiled  kernels/memory_profile.py, then chapter 10's throughput-compiled part (eager and compiled)
#   scan-final  CEMA variants (kernels/tune_cema.py --adopt: the best one runs the rest of the call), the
#              CEMA GPU tests, then kernels/bench.py --figure for every op
#   host       kernels/host_profile.py: the host's time per forward+backward of CEMA and TimestepNorm (cProfile)
#   scan-tests the CEMA and TimestepNorm GPU tests at the package defaults
#   bench      kernels/bench.py --figure for every op (eager and CUDA-graph times)
#   recall     chapter 10's recall part (MQAR and passkey), 3.5 minutes
#   sp-train   `megalodon-lite train --sequence-parallel 2` under torchrun with NCCL, a short run
#   OUT=/some/dir bash kernels/run_h200_x2_session.sh attention decode memory sp-bench sp-train
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to a folder}
mkdir -p "$OUT"
step() { printf '\n=== %s (%ds)\n' "$*" "$SECONDS"; }
wants() { [[ " $PARTS " == *" $1 "* ]]; }
PARTS=" $* "
attention_tests() {  # $1: which tiles the call runs with, for the log
    step "GPU tests: attention kernels, dispatch, one training step with kernels vs PyTorch ($1)"
    # --noconftest -o addopts="": the device image has no nbformat/nbval, which the root conftest and
    # pyproject's addopts need for the chapters; these test files need neither.
    CUDA_VISIBLE_DEVICES=0 MEGALODON_SMOKE=1 timeout 150 python3 -m pytest -q -rP --noconftest -o addopts="" \
        -p no:cacheprovider tests/test_ops_chunk_attention.py tests/test_backend.py tests/test_model_kernels_gpu.py \
        > "$OUT/gpu_tests_attention.log" 2>&1
    tail -3 "$OUT/gpu_tests_attention.log"
}
attention_profile() {  # $1: as above
    step "kernels/profile_attention.py: launchers, autograd, custom ops; the GPU's idle gaps ($1)"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 kernels/profile_attention.py --out "$OUT" 2>&1 | grep -v Warning
}
bench_every_op() {  # $1: timeout in seconds; $2: a note for the log
    step "kernels/bench.py, every op, with the figure${2:-}"
    CUDA_VISIBLE_DEVICES=0 timeout "$1" python3 kernels/bench.py --figure --out "$OUT" > "$OUT/bench.log" 2>&1
    tail -20 "$OUT/bench.log"
    cp figures/08_scan_kernels.png "$OUT/" 2>/dev/null
}
cema_tests() {  # $1: timeout in seconds
    CUDA_VISIBLE_DEVICES=0 MEGALODON_SMOKE=1 timeout "$1" python3 -m pytest -q -rA --noconftest -o addopts="" \
        -p no:cacheprovider -n 16 tests/test_ops_cema.py > "$OUT/gpu_tests_cema.log" 2>&1
    tail -3 "$OUT/gpu_tests_cema.log"
}
memory_profile() {
    step "kernels/memory_profile.py: what each model saves for the backward, and its peak, at 32K"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 kernels/memory_profile.py --out "$OUT" 2>&1 | grep -v Warning
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

if wants attention; then
    step "chapter 09: tile candidates and designs (kernels/tune_attention.py)"
    CUDA_VISIBLE_DEVICES=0 timeout 240 python3 kernels/tune_attention.py --out "$OUT" > "$OUT/tune_attention.log" 2>&1
    grep -E "^ *(prologue|epilogue|grad|zgrad) |design|best|whole|overrides|failed" "$OUT/tune_attention.log" | cut -c1-200
    export MEGALODON_ATTENTION_TILES=$(cat "$OUT/best_overrides.json" 2>/dev/null || echo '{}')
    echo "MEGALODON_ATTENTION_TILES=$MEGALODON_ATTENTION_TILES"

    attention_tests "tuned tiles"

    step "kernels/bench.py --ops attention (tuned tiles)"
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 kernels/bench.py --ops attention --out "$OUT/bench" \
        > "$OUT/bench_attention.log" 2>&1
    tail -8 "$OUT/bench_attention.log"
    mv "$OUT/bench/nvidia_h200.json" "$OUT/nvidia_h200_attention.json" 2>/dev/null

    attention_profile "tuned tiles"
fi

if wants attention-check; then
    attention_tests "package tiles"

    bench_every_op 240 " (package tiles)"

    attention_profile "package tiles"
fi

if wants memory; then
    memory_profile

    step "chapter 10: training throughput and peak memory (kernels/train_compare.py --parts throughput)"
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 kernels/train_compare.py --out "$OUT/tcm" --parts throughput \
        --minutes 3 > "$OUT/train_compare_memory.log" 2>&1
    grep throughput "$OUT/train_compare_memory.log"
    mv "$OUT/tcm/train_compare.json" "$OUT/train_compare_throughput.json" 2>/dev/null
fi

if wants model-tests; then
    step "GPU tests: one training step with kernels vs PyTorch, dispatch, CUDA-graph decoding"
    CUDA_VISIBLE_DEVICES=0 MEGALODON_SMOKE=1 timeout 200 python3 -m pytest -q -rP --noconftest -o addopts="" \
        -p no:cacheprovider tests/test_model_kernels_gpu.py tests/test_backend.py tests/test_decoding_gpu.py \
        > "$OUT/gpu_tests_model.log" 2>&1
    tail -3 "$OUT/gpu_tests_model.log"
fi

if wants memory-compiled; then
    memory_profile

    step "chapter 10: eager and compiled throughput and peak memory (kernels/train_compare.py --parts throughput-compiled)"
    CUDA_VISIBLE_DEVICES=0 timeout 280 python3 kernels/train_compare.py --out "$OUT/tcc" --parts throughput-compiled \
        --minutes 4.6 > "$OUT/train_compare_compiled.log" 2>&1
    grep -E "throughput|tok/s|GiB" "$OUT/train_compare_compiled.log" | tail -20
    mv "$OUT/tcc/train_compare.json" "$OUT/train_compare_throughput_compiled.json" 2>/dev/null
fi

if wants scan-final; then
    step "chapter 08: CEMA variants, the best adopted for the rest of this call (kernels/tune_cema.py --adopt)"
    CUDA_VISIBLE_DEVICES=0 timeout 170 python3 kernels/tune_cema.py --out "$OUT" --adopt \
        --variants default scan16 scan16-ends16 scan8 > "$OUT/tune_cema.log" 2>&1
    grep -E "adopted|best|ms" "$OUT/tune_cema.log" | tail -14

    step "GPU tests: CEMA kernels at the adopted config"
    cema_tests 130

    bench_every_op 200
fi

if wants host; then
    step "kernels/host_profile.py: host time per forward+backward, per launch, and where it goes"
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 kernels/host_profile.py --out "$OUT" 2>&1 | grep -v Warning
fi

if wants scan-tests; then
    step "GPU tests: CEMA and TimestepNorm kernels at the package defaults"
    cema_tests 200
    CUDA_VISIBLE_DEVICES=0 MEGALODON_SMOKE=1 timeout 200 python3 -m pytest -q -rA --noconftest -o addopts="" \
        -p no:cacheprovider tests/test_ops_timestep_norm.py > "$OUT/gpu_tests_timestep_norm.log" 2>&1
    tail -3 "$OUT/gpu_tests_timestep_norm.log"
fi

if wants bench; then
    bench_every_op 240
fi

if wants recall; then
    step "chapter 10: MQAR and passkey recall after the same budget (kernels/train_compare.py --parts recall)"
    CUDA_VISIBLE_DEVICES=0 timeout 260 python3 kernels/train_compare.py --out "$OUT/tcr" --parts recall \
        --minutes 3.5 > "$OUT/train_compare_recall.log" 2>&1
    tail -12 "$OUT/train_compare_recall.log"
    mv "$OUT/tcr/train_compare.json" "$OUT/train_compare_recall.json" 2>/dev/null
fi

if wants sp-bench; then
    step "chapter 11: one GPU against two, both schemes, contexts 64K and 128K"
    timeout 200 torchrun --standalone --nproc-per-node 2 kernels/sequence_parallel_bench.py --out "$OUT" \
        > "$OUT/sequence_parallel.log" 2>&1
    tail -12 "$OUT/sequence_parallel.log"
fi

if wants decode; then
    step "GPU tests: decoding on fixed-size buffers, replayed as CUDA graphs"
    CUDA_VISIBLE_DEVICES=0 MEGALODON_SMOKE=1 timeout 120 python3 -m pytest -q -rP --noconftest -o addopts="" \
        -p no:cacheprovider tests/test_decoding_gpu.py > "$OUT/gpu_tests_decoding.log" 2>&1
    tail -3 "$OUT/gpu_tests_decoding.log"

    step "chapter 10: training throughput and decoding (kernels/train_compare.py --parts throughput,decode)"
    CUDA_VISIBLE_DEVICES=0 timeout 240 python3 kernels/train_compare.py --out "$OUT/tc" --parts throughput,decode \
        --minutes 4 > "$OUT/train_compare.log" 2>&1
    tail -30 "$OUT/train_compare.log"
    mv "$OUT/tc/train_compare.json" "$OUT/train_compare.json" 2>/dev/null
fi

if wants sp-train; then
    step "megalodon-lite train --sequence-parallel 2 on two GPUs (NCCL), small preset, context 16K"
    timeout 150 torchrun --standalone --nproc-per-node 2 -m megalodon_lite train --preset small --context 16384 \
        --batch-size 1 --steps 20 --eval-every 10 --eval-windows 2 --log-every 5 --sample-tokens 32 \
        --sequence-parallel 2 --out /tmp/sp_train > "$OUT/sp_train.log" 2>&1
    echo "exit status $?"
    tail -15 "$OUT/sp_train.log"
    cp /tmp/sp_train/log.jsonl "$OUT/sp_train_log.jsonl" 2>/dev/null
fi
step "done"
