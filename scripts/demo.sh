#!/usr/bin/env bash
# The main job from the README: set up .venv, then simulate, reconstruct and evaluate the
# embedded adenylate kinase example into ./cryogs-demo (extra arguments go to `cryogs demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/cryogs demo --out cryogs-demo --overwrite "$@"   # a rerun replaces the last demo
