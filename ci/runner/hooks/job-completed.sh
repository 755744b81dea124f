#!/usr/bin/env bash
# ACTIONS_RUNNER_HOOK_JOB_COMPLETED: after every job (passed, failed or cancelled), clean the host and
# give files that tests made as root back to the runner user, so the next checkout can delete them.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"
rc=0
cpr_cleanup "pytest-cpr job-completed" || rc=$?
if [ "$(id -u)" -ne 0 ]; then
  for dir in "${GITHUB_WORKSPACE:-}" "${RUNNER_TEMP:-}"; do
    if [ -n "$dir" ] && [ -d "$dir" ]; then as_root "$CPR_HOOKS_DIR/give-back.sh" "$dir" || rc=1; fi
  done
fi
exit "$rc"
