#!/usr/bin/env bash
# The cpu preset's recipe at fp32 speed: the three best configs of the cpu-budget
# search (docs/results.md, "Time to quality") and a smaller hidden size, each trained for the preset's
# 8 minutes in fp32, one after another, then their time to quality side by side.
#
#     benchmarks/precision_recipes.sh                 # fp32 on this CPU (about 45 minutes)
#     CAP_AVX2=1 benchmarks/precision_recipes.sh      # an AMX/AVX-512 CPU run as AVX2-only
#
# CAP_AVX2=1 caps oneDNN and ATen at AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY; the train
# command forwards both to its Ray workers): the speed of CPUs without native bf16.
# Runs land in runs/recipe-<name>; the table is benchmarks/time_to_quality.py's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ "${CAP_AVX2:-0}" = 1 ]; then
    export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
fi
COMMON=(--precision fp32 --eval-every 100 --probe-sequences 0)
declare -A RECIPES=(
    # the cpu preset (the search's best, abf65f7a)
    [preset]=""
    # the search's second (e0d21bd9)
    [e0d21bd9]="--learning-rate 1.62e-3 --reconstruction-weight 0.28 --grad-clip-norm 1000"
    # the search's third (3c764d47): twice the units, twice the batch
    [3c764d47]="--hidden-size 1024 --batch-size 64 --learning-rate 2.08e-3 --reconstruction-weight 0.2 --forget-gate-bias 0 --warmup-steps 50 --grad-clip-norm 1000"
    # half the units: about twice the steps in the same minutes
    [hidden256]="--hidden-size 256"
)
folders=()
for name in preset e0d21bd9 3c764d47 hidden256; do
    run="recipe-${name}"
    if [ ! -f "runs/${run}/result.json" ]; then
        # shellcheck disable=SC2086
        "$PYTHON" -m train --name "$run" "${COMMON[@]}" ${RECIPES[$name]}
    fi
    folders+=("runs/${run}")
done
"$PYTHON" benchmarks/time_to_quality.py "${folders[@]}"
