#!/usr/bin/env bash
# ACTIONS_RUNNER_HOOK_JOB_STARTED: before every job, make the host clean: no QEMU, network namespace
# or VFIO device binding left by an earlier job that was killed, timed out or lost its runner.
# A non-zero exit stops the job before it runs: better than tests on a dirty host.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
cpr_cleanup "pytest-cpr job-started"
