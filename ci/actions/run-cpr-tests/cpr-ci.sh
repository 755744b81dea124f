#!/usr/bin/env bash
# The steps of the run-cpr-tests action, usable by hand too:
#   cpr-ci.sh install | image | test | summary
# Inputs come from the environment (the action maps its inputs to CPR_CI_*; never `${{ }}` in scripts):
#   CPR_CI_PYTHON    interpreter that makes the virtualenv (default python3); or CPR_CI_VENV_PYTHON
#                    to use an existing environment that already has pytest-cpr (no install)
#   CPR_CI_INSTALL   pip requirements for the plugin, space separated (default "pytest-cpr[plot,html]")
#   CPR_CI_TESTS     test paths / node ids, space separated (default "tests")
#   CPR_CI_PYTEST_ARGS  more pytest arguments, space separated
#   CPR_CI_QEMU, CPR_CI_TARGET_QEMU, CPR_CI_HOST_CONFIG, CPR_CI_ACCEL, CPR_CI_STRICT: pytest-cpr
#                    settings; empty = leave CPR_* from the runner's environment alone
#   CPR_CI_SUDO      auto (sudo when not root) | always | never
#   CPR_CI_NAME      artifact name (default pytest-cpr-$GITHUB_JOB); the outputs go to
#                    $RUNNER_TEMP/pytest-cpr/<name>: junit.xml, pytest.log, artifacts/
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMP=${RUNNER_TEMP:-${TMPDIR:-/tmp}}
NAME=${CPR_CI_NAME:-pytest-cpr-${GITHUB_JOB:-local}}
OUT="$TEMP/pytest-cpr/$NAME"
VENV="$TEMP/pytest-cpr/venv"
PY=${CPR_CI_VENV_PYTHON:-$VENV/bin/python}

log() { printf 'pytest-cpr: %s\n' "$*"; }

output() {  # name value: a step output when running under GitHub Actions
  if [ -n "${GITHUB_OUTPUT:-}" ]; then printf '%s=%s\n' "$1" "$2" >> "$GITHUB_OUTPUT"; fi
}

need_sudo() {
  case ${CPR_CI_SUDO:-auto} in
    never) return 1 ;;
    always) return 0 ;;
    auto) [ "$(id -u)" -ne 0 ] ;;
    *) echo "::error::sudo must be auto, always or never, not '${CPR_CI_SUDO}'" >&2; exit 2 ;;
  esac
}

as_root() {  # run "$@" as root (network namespaces, taps, VFIO, debootstrap), keeping CPR_* and GitHub files;
  # sudo's own PATH (secure_path) stays: setup-host.sh's sudoers rules allow exactly these commands
  if ! need_sudo; then "$@"; return; fi
  local keep
  keep=$(compgen -e | grep -E '^(CPR_|GITHUB_STEP_SUMMARY$)' | grep -v '^CPR_CI_' | paste -sd, -)
  sudo -n ${keep:+--preserve-env="$keep"} -- "$@"
}

give_back() {  # files made by root under sudo: back to the runner user, so the runner can upload and delete them
  if ! need_sudo || [ ! -e "$1" ]; then return 0; fi
  if [ -x /opt/pytest-cpr/hooks/give-back.sh ]; then sudo -n /opt/pytest-cpr/hooks/give-back.sh "$1"  # setup-host.sh's rules
  else sudo -n chown -R "$(id -u):$(id -g)" "$1"; fi
}

export_setting() {  # CPR_CI_X -> CPR_X, only when given
  local value=${!1:-}
  if [ -n "$value" ]; then export "${1/CPR_CI_/CPR_}=$value"; fi
}

cmd_install() {
  mkdir -p "$OUT"
  output out "$OUT"
  output artifact-name "$NAME"
  if [ -n "${CPR_CI_VENV_PYTHON:-}" ]; then
    log "using the existing environment of $CPR_CI_VENV_PYTHON"
  else
    local reqs
    read -r -a reqs <<< "${CPR_CI_INSTALL:-pytest-cpr[plot,html]}"
    log "virtualenv $VENV; pip install ${reqs[*]}"
    "${CPR_CI_PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "${reqs[@]}"
  fi
  "$PY" -c 'import importlib.metadata as m; print("pytest-cpr", m.version("pytest-cpr"))'
}

cmd_image() {
  log "guest image: build unless cached"
  as_root "$PY" -m pytest_cpr.images build guest
}

cmd_test() {
  local tests extra rc=0
  read -r -a tests <<< "${CPR_CI_TESTS:-tests}"
  read -r -a extra <<< "${CPR_CI_PYTEST_ARGS:-}"
  for v in CPR_CI_QEMU CPR_CI_TARGET_QEMU CPR_CI_HOST_CONFIG CPR_CI_ACCEL CPR_CI_STRICT; do export_setting "$v"; done
  mkdir -p "$OUT/artifacts"
  output out "$OUT"
  output junit-xml "$OUT/junit.xml"
  # with pytest-html (pytest-cpr[html]): report.html, each test's transfer timelines and numbers
  local html=()
  "$PY" -c 'import pytest_html' 2>/dev/null && html=(--html="$OUT/report.html" --self-contained-html)
  log "pytest ${tests[*]} ${extra[*]} (outputs in $OUT)"
  # the plugin appends its CPR summary table to $GITHUB_STEP_SUMMARY itself
  as_root "$PY" -m pytest -p no:cacheprovider -rfEs --junitxml="$OUT/junit.xml" "${html[@]}" \
    --cpr-artifacts="$OUT/artifacts" "${tests[@]}" "${extra[@]}" 2>&1 | tee "$OUT/pytest.log" || rc=$?
  give_back "$OUT"
  log "pytest exit status $rc"
  return "$rc"
}

cmd_summary() {
  local target=${GITHUB_STEP_SUMMARY:-/dev/stdout}
  if [ ! -s "$OUT/junit.xml" ]; then
    printf '## pytest-cpr\n\nNo JUnit XML: pytest did not run to the end; see the job log and %s.\n' "$OUT/pytest.log" >> "$target"
    return 0
  fi
  "$PY" "$HERE/junit_summary.py" "$OUT/junit.xml" >> "$target"
}

case ${1:-} in
  install | image | test | summary) "cmd_$1" ;;
  *) echo "usage: $0 install|image|test|summary" >&2; exit 2 ;;
esac
