#!/usr/bin/env bash
# Runs the CUDA tests (tests/test_cuda.py, marker `cuda`) under compute-sanitizer: memcheck (out of
# bounds / misaligned accesses, CUDA API errors) and racecheck (shared-memory hazards).
#
#   scripts/sanitize.sh [LOG_DIR]      # default ./sanitizer-logs
#
# Needs a GPU and the built extension. Logs: LOG_DIR/{memcheck,racecheck}.log (sanitizer reports) and
# LOG_DIR/{memcheck,racecheck}.pytest.log (test output). Exits nonzero if any tool reports an error,
# any test fails, or the CUDA tests were skipped (nothing would have been checked).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${1:-./sanitizer-logs}"
mkdir -p "$LOG_DIR"

SAN=""
for cand in "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" /usr/local/cuda/bin/compute-sanitizer \
            "$(command -v compute-sanitizer 2>/dev/null || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then SAN="$cand"; break; fi
done
if [ -z "$SAN" ]; then
    echo "sanitize.sh: compute-sanitizer not found (looked in \$CUDA_HOME/bin, /usr/local/cuda/bin, PATH)" >&2
    exit 2
fi
if [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees overruns
# that would otherwise land inside a larger cached block.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export CRYOGS_DEBUG_POISON=1

status=0
for tool in memcheck racecheck; do
    log="$LOG_DIR/$tool.log"
    out="$LOG_DIR/$tool.pytest.log"
    echo "== compute-sanitizer --tool $tool (report: $log)"
    "$SAN" --tool "$tool" --error-exitcode 99 --log-file "$log" --print-limit 100 \
        python -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -rs >"$out" 2>&1
    rc=$?
    tail -n 3 "$out"
    if [ $rc -ne 0 ]; then
        echo "sanitize.sh: $tool run failed (exit $rc; 99 = sanitizer errors), see $log and $out" >&2
        status=1
    elif grep -Eq "(^|[^0-9])[0-9]+ skipped" "$out" && ! grep -Eq "[0-9]+ passed" "$out"; then
        echo "sanitize.sh: the CUDA tests were skipped under $tool (no GPU or extension?)" >&2
        status=1
    fi
    if grep -Eq "ERROR SUMMARY: [1-9]|RACECHECK SUMMARY: [1-9]|\(([1-9][0-9]*) errors" "$log"; then
        echo "sanitize.sh: $tool reported errors, see $log" >&2
        status=1
    fi
done
exit $status
