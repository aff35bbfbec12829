#!/usr/bin/env bash
# Runs the statistical tests (marker `statistical`) over many seeds and reports each one's failure
# rate. CI runs them on one fixed seed; this shows how much margin that seed hides.
#   bash scripts/flaky.sh [SEEDS] [pytest args...]
#   bash scripts/flaky.sh 200 -k close_pairs        # one test over seeds 1..200
# Seeds are set with CRYOGS_TEST_SEED (see tests/conftest.py); run after scripts/setup_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-20}
shift || true
py=.venv/bin/python
[ -x "$py" ] || py=python3
declare -A failed
tests=$("$py" -m pytest -q -m statistical --collect-only -p no:cacheprovider "$@" | grep '::' || true)
[ -n "$tests" ] || { echo "no statistical tests selected" >&2; exit 2; }
for t in $tests; do failed[$t]=0; done
for ((s = 1; s <= seeds; s++)); do
    out=$(CRYOGS_TEST_SEED=$s "$py" -m pytest -q -m statistical -p no:cacheprovider -rf "$@" 2>&1 || true)
    for t in $(printf '%s\n' "$out" | sed -n 's/^FAILED \([^ ]*\).*/\1/p'); do
        failed[$t]=$((${failed[$t]:-0} + 1))
        echo "seed $s: FAILED $t"
    done
    echo "seed $s done" >&2
done
echo
echo "failures over $seeds seeds:"
for t in $tests; do printf '%5d/%d  %s\n' "${failed[$t]}" "$seeds" "$t"; done
