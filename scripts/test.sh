#!/usr/bin/env bash
# The test command from the README (and .ci/run): set up .venv, build, run the whole suite.
# CUDA tests are marked `cuda` and skip without a GPU. When the extension was meant to be built
# (a CUDA toolkit is present), a missing extension fails the suite instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
if [ "${CRYOGS_BUILD_CUDA:-}" != "0" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    export CRYOGS_REQUIRE_EXTENSION=1
fi
python -m pytest -q "$@"
