#!/usr/bin/env bash
# One full GPU verification run, for a lent GPU machine (see the device notes): build the
# extension from source with that machine's python3, run the whole test suite (the `cuda` tests
# included), compute-sanitizer (memcheck + racecheck) and the GPU benchmark grid.
# Results go to ${OUT:-./gpu-results}. First, on the machine with network:
#   bash scripts/fetch_gpu_wheels.sh   # mrcfile, starfile, gemmi into .whl (carry it: carry=[".whl"])
# then, on the GPU machine:
#   bash scripts/gpu_check.sh          # everything
#   SKIP_SANITIZER=1 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1
status=0
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi -L | tee "$OUT/device.txt"
CRYOGS_BUILD_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
    || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
python3 -m cryogs info | tee -a "$OUT/device.txt"
python3 -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest_all.log" || status=1
if [ -z "${SKIP_SANITIZER:-}" ]; then
    bash scripts/sanitize.sh "$OUT/sanitizer" >"$OUT/sanitize.log" 2>&1 || status=1
    tail -5 "$OUT/sanitize.log"
fi
python3 benchmarks/bench_project.py --device cuda --grid gpu --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.log" \
    || status=1
exit $status
