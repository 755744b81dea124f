#!/usr/bin/env bash
# The test suite: unit, integration (real guests through cpr-transfer), hardware tests (skipped
# without a host config) and the virtual hardware host tier. JUnit XML lands in artifacts/junit/.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p artifacts/junit
.venv/bin/python -m pytest tests -p no:cacheprovider --junitxml=artifacts/junit/suite.xml "$@"
rc=$?
[ "$rc" = 5 ] && rc=0   # no test selected (e.g. a -k filter) is not a failure of the suite
exit "$rc"
