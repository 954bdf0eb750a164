#!/usr/bin/env bash
# The training step on this CPU as it is and capped at AVX2: the same benchmark
# (benchmarks/train_step.py, hidden 1024, batch 32) in fp32 and bf16, natively and with oneDNN
# and ATen capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2), which reproduces
# the slow bf16 path of CPUs without native bf16. Each run prints the CPU line first.
#
#     benchmarks/cpu_classes.sh        # about 6 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SHAPE=(--hidden-size 1024 --batch-size 32)
run() {
    echo "=== $*"
    "$@" 2>&1 | grep -E "^CPU|^reference:|median|speedup|peak"
}
run "$PYTHON" benchmarks/train_step.py "${SHAPE[@]}" --dtype fp32
run "$PYTHON" benchmarks/train_step.py "${SHAPE[@]}" --dtype bf16
export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
run "$PYTHON" benchmarks/train_step.py "${SHAPE[@]}" --dtype fp32
# The reference cannot run in bf16 here (oneDNN refuses its LSTM), and one step of ours takes
# minutes: one timed step.
run "$PYTHON" benchmarks/train_step.py "${SHAPE[@]}" --dtype bf16 --skip-reference --repeats 1 --warmup 0
