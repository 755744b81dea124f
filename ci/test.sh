#!/usr/bin/env bash
# The test suite: unit, integration (real guests through cpr-transfer), hardware tests (skipped
# without a host config), the virtual hardware host tier, and cross-version live update to a
# second QEMU build when one is cached (`cpr-image build qemu-next`). JUnit XML: artifacts/junit/.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p artifacts/junit
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
rc=0
"${PYTEST[@]}" tests --junitxml=artifacts/junit/suite.xml "$@" || rc=$?
[ "$rc" = 5 ] && rc=0   # no test selected (e.g. a -k filter) is not a failure of the suite

next=$(.venv/bin/cpr-image path qemu-next 2>/dev/null)/bin/qemu-system-x86_64
if [ -x "$next" ]; then
  echo "== cross-version: source $(command -v qemu-system-x86_64) -> target $next"
  xrc=0
  CPR_TARGET_QEMU="$next" "${PYTEST[@]}" tests/integration/test_cross_build.py \
    tests/integration/test_transfer.py --junitxml=artifacts/junit/cross-version.xml "$@" || xrc=$?
  [ "$xrc" = 5 ] && xrc=0
  [ "$rc" = 0 ] && rc=$xrc
fi
exit "$rc"
