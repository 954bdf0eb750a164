#!/usr/bin/env bash
# Run one pytest selection N times while other processes keep every core busy, and count the
# runs that did not pass: how a test that fails by chance on a loaded CI machine is caught.
#
#     scripts/repeat_under_load.sh N PYTEST_ARGS...
#     scripts/repeat_under_load.sh 30 tests/test_distributed.py -k "two_data_parallel and bf16"
#
# The load is one busy Python loop per core, at normal priority, stopped at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    echo "usage: scripts/repeat_under_load.sh N PYTEST_ARGS..." >&2
    exit 2
fi
runs=$1
shift
python=${PYTHON:-python}
load=()
for _ in $(seq "$(nproc)"); do
    "$python" -c "while True: pass" &
    load+=($!)
done
trap 'kill "${load[@]}" 2>/dev/null' EXIT
failures=0
for run in $(seq "$runs"); do
    output=$("$python" -m pytest -q -p no:cacheprovider "$@" 2>&1)
    code=$?
    if [ "$code" = 0 ]; then
        echo "run $run: passed"
    else
        failures=$((failures + 1))
        echo "run $run: FAILED (exit $code)"
        echo "$output" | tail -40 | sed 's/^/    /'
    fi
done
echo "$((runs - failures)) passed, $failures failed"
[ "$failures" = 0 ]
