#!/usr/bin/env bash
# Downloads the wheels that the lent GPU machine lacks (it has no network; its python3 is 3.12
# with torch, numpy, scipy, pandas, matplotlib, tqdm and pytest) into ./.whl, which
# scripts/gpu_check.sh installs. Carry .whl with the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl mrcfile starfile gemmi
ls .whl
