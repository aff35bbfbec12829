#!/usr/bin/env bash
# Creates ./.venv if needed and installs cryogs into it (editable), with its dependencies.
# The extension is compiled with the CUDA ops (and the cpu backend's) when torch is a CUDA build and
# nvcc is found (CUDA_HOME, else /usr/local/cuda); then a compile error fails this script. Otherwise,
# or with CRYOGS_BUILD_CUDA=0, it is compiled with the CPU ops only when a C++ compiler is present.
# CRYOGS_TORCH overrides the torch requirement (default torch==2.14.1, a CUDA 13.0 build).
# Before the long step it says whether it compiles the extension, and roughly how long that takes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "${CRYOGS_TORCH:-torch==2.14.1}" numpy \
    "setuptools>=64" wheel pybind11 ninja

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
if [ -z "${CRYOGS_BUILD_CUDA:-}" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] \
        && python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
    export CRYOGS_BUILD_CUDA=1   # a toolkit is here: the extension must build
fi
if [ "${CRYOGS_BUILD_CUDA:-0}" = 1 ]; then
    echo "cryogs: installing and compiling the CUDA extension with ${CUDA_HOME:-nvcc}: about 9 minutes" \
         "on 2 CPU cores (a few minutes on more), with no output until it ends (CRYOGS_BUILD_CUDA=0: CPU ops only)"
else
    echo "cryogs: installing and compiling the extension with the CPU ops only (no nvcc, a CPU-only torch, or" \
         "CRYOGS_BUILD_CUDA=0): about 2 minutes on 2 CPU cores; without a C++ compiler it is skipped"
fi
python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
python -c 'from cryogs.render import _extension; print(f"cryogs: {_extension.summary()}")'
