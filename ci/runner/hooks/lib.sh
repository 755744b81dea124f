# shellcheck shell=bash
# Shared by job-started.sh and job-completed.sh (sourced, not run). They run root's cleanup tool
# between jobs, so they trust nothing a job could have touched:
# - the interpreter is the one setup-host.sh wrote into <hooks dir>/python (CPR_HOOK_PYTHON from the
#   environment is ignored: whoever sets a job's environment would choose what root runs);
# - that file, the interpreter and every directory above them must be root-owned and not writable by
#   group or others (a root-owned sticky directory such as /tmp is fine);
# - the tool runs from / with `python -I` (no current directory, user site or PYTHON* variable on
#   sys.path) in an empty environment (no CPR_STATE_DIR), so a pytest_cpr package left in the job's
#   workspace is never imported.
CPR_HOOKS_DIR=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
CPR_HOOK_PYTHON_FILE=$CPR_HOOKS_DIR/python
CPR_CLEAN_PATH=/usr/sbin:/usr/bin:/sbin:/bin

as_root() {  # the runner user may be unprivileged: it then needs the sudo rules setup-host.sh writes
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n -- "$@"; fi
}

as_root_clean() {  # as_root in an empty environment (sudo's env_reset does that for an unprivileged runner)
  if [ "$(id -u)" -eq 0 ]; then /usr/bin/env -i PATH="$CPR_CLEAN_PATH" LANG=C.UTF-8 "$@"; else sudo -n -- "$@"; fi
}

untrusted() {  # path: why root must not trust it (nothing: it may); checks the path and every directory above
  local p=$1 owner mode kind
  while :; do
    read -r owner mode kind < <(stat -c '%u %a %F' -- "$p" 2>/dev/null) || { echo "$p is missing"; return; }
    if [ "$owner" -ne 0 ]; then echo "$p is owned by uid $owner, not root"; return; fi
    if (( 8#$mode & 8#022 )) && ! { [ "$kind" = directory ] && (( 8#$mode & 8#1000 )); }; then
      echo "$p is writable by group or others (mode $mode)"; return
    fi
    [ "$p" = / ] && return
    p=$(dirname -- "$p")
  done
}

hook_python() {  # prints the interpreter setup-host.sh chose, or why it cannot be used (exit 1)
  local py why
  if [ -n "${CPR_HOOK_PYTHON:-}" ]; then
    echo "::warning::pytest-cpr hook: CPR_HOOK_PYTHON from the environment is ignored; the interpreter is the one in $CPR_HOOK_PYTHON_FILE (setup-host.sh --hook-python)" >&2
  fi
  if [ ! -f "$CPR_HOOK_PYTHON_FILE" ]; then
    echo "$CPR_HOOK_PYTHON_FILE is missing: run ci/runner/setup-host.sh"; return 1
  fi
  why=$(untrusted "$CPR_HOOK_PYTHON_FILE")
  if [ -n "$why" ]; then echo "$why: run ci/runner/setup-host.sh again (as root)"; return 1; fi
  read -r py < "$CPR_HOOK_PYTHON_FILE" || true
  case $py in /*) ;; *) echo "$CPR_HOOK_PYTHON_FILE does not name an absolute path: run ci/runner/setup-host.sh"; return 1 ;; esac
  if [ ! -x "$py" ]; then echo "$py is missing: run ci/runner/setup-host.sh"; return 1; fi
  why=$(untrusted "$(readlink -f -- "$(dirname -- "$py")")")  # the folder holding the name (a venv's symlink)
  [ -n "$why" ] || why=$(untrusted "$(readlink -f -- "$py")")  # and what it resolves to
  if [ -n "$why" ]; then echo "$why: the hooks' interpreter must be root's alone; run ci/runner/setup-host.sh"; return 1; fi
  echo "$py"
}

cpr_cleanup() {  # $1: label for the job log; fails the hook when something could not be cleaned
  local out py rc=0
  if ! py=$(hook_python); then
    echo "::error::pytest-cpr hook: $py"
    return 1
  fi
  out=$(cd / && as_root_clean "$py" -I -m pytest_cpr.cleanup --label "$1" 2>&1) || rc=$?
  printf '%s\n' "$out"
  if [ "$rc" -ne 0 ]; then
    echo "::error::$1: the host is not clean (see the lines above); an admin must look at it"
  elif ! grep -q 'nothing to clean' <<< "$out"; then
    echo "::warning::$1: cleaned what an earlier run left behind (see the lines above)"
  fi
  return "$rc"
}
