# shellcheck shell=bash
# Shared by job-started.sh and job-completed.sh (sourced, not run).
# CPR_HOOK_PYTHON: the Python that has pytest-cpr installed (setup-host.sh makes /opt/pytest-cpr/venv).
CPR_HOOK_PYTHON=${CPR_HOOK_PYTHON:-/opt/pytest-cpr/venv/bin/python}

as_root() {  # the runner user may be unprivileged: it then needs passwordless sudo (ci/README.md)
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n -- "$@"; fi
}

cpr_cleanup() {  # $1: label for the job log; fails the hook when something could not be cleaned
  local out rc=0
  if [ ! -x "$CPR_HOOK_PYTHON" ]; then
    echo "::error::pytest-cpr hook: $CPR_HOOK_PYTHON is missing: run ci/runner/setup-host.sh (or set CPR_HOOK_PYTHON)"
    return 1
  fi
  out=$(as_root "$CPR_HOOK_PYTHON" -m pytest_cpr.cleanup --label "$1" 2>&1) || rc=$?
  printf '%s\n' "$out"
  if [ "$rc" -ne 0 ]; then
    echo "::error::$1: the host is not clean (see the lines above); an admin must look at it"
  elif ! grep -q 'nothing to clean' <<< "$out"; then
    echo "::warning::$1: cleaned what an earlier run left behind (see the lines above)"
  fi
  return "$rc"
}
