#!/usr/bin/env bash
# Prepare a Linux host as a pytest-cpr hardware runner (read ci/README.md first). Run as root.
#
#   setup-host.sh --check                      report what is missing; change nothing (exit 1 if any)
#   setup-host.sh [options]                    set up what is missing, then report
#     --runner-user USER   the user the GitHub runner service runs as (kvm group, memlock, sudo)
#     --runner-dir DIR     the runner's folder: hooks and CPR_* settings go into DIR/.env
#     --host-config FILE   installed as /etc/pytest-cpr/host.toml (CPR_HOST_CONFIG)
#     --plugin SPEC        pip requirement for the hooks' virtualenv (default: this checkout)
#     --hook-python PATH   the interpreter the hooks run as root (default /opt/pytest-cpr/venv/bin/python);
#                          written into /opt/pytest-cpr/hooks/python, never taken from the environment
#     --kernel-params      add the IOMMU kernel parameters to GRUB (takes effect after a reboot)
#     --sudoers            give --runner-user sudo for exactly the kit's commands (/etc/sudoers.d/pytest-cpr)
#     --root DIR           write every file under DIR and run nothing that changes the running
#                          system (modprobe, udev, grub, usermod, venv): for review and for tests
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CHECK=0 ROOT="" RUNNER_USER="" RUNNER_DIR="" HOST_CONFIG="" PLUGIN="" KERNEL_PARAMS=0 SUDOERS=0
PREFIX=/opt/pytest-cpr
HOOK_PYTHON=$PREFIX/venv/bin/python
HOOKS=(lib.sh job-started.sh job-completed.sh give-back.sh)
MODULES=(vfio vfio_pci vfio_iommu_type1 iommufd tun bridge)
MISSING=0

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
ok() { printf '  ok       %s\n' "$*"; }
missing() { printf '  MISSING  %s\n' "$*"; MISSING=$((MISSING + 1)); }
did() { printf '  done     %s\n' "$*"; }
section() { printf '%s\n' "$*"; }
live() { [ -z "$ROOT" ] && [ "$CHECK" -eq 0 ]; }  # may change the running system
apply() { [ "$CHECK" -eq 0 ]; }                   # may write files (under ROOT)

while [ $# -gt 0 ]; do
  case $1 in
    --check) CHECK=1 ;;
    --root) ROOT=${2:?--root needs a folder}; shift ;;
    --runner-user) RUNNER_USER=${2:?}; shift ;;
    --runner-dir) RUNNER_DIR=${2:?}; shift ;;
    --host-config) HOST_CONFIG=${2:?}; shift ;;
    --plugin) PLUGIN=${2:?}; shift ;;
    --hook-python) HOOK_PYTHON=${2:?}; shift ;;
    --kernel-params) KERNEL_PARAMS=1 ;;
    --sudoers) SUDOERS=1 ;;
    -h | --help) usage 0 ;;
    *) echo "setup-host.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
case $HOOK_PYTHON in /*) ;; *) echo "setup-host.sh: --hook-python needs an absolute path" >&2; exit 2 ;; esac
if live && [ "$(id -u)" -ne 0 ]; then echo "setup-host.sh: run as root (or use --check / --root DIR)" >&2; exit 2; fi

write_file() {  # path mode: content from stdin, under ROOT
  local dest="$ROOT$1"
  mkdir -p "$(dirname "$dest")"
  cat > "$dest.tmp.$$" && chmod "$2" "$dest.tmp.$$" && mv "$dest.tmp.$$" "$dest"
  did "wrote $1"
}

cpu_flag() { grep -m1 -o -w -E 'vmx|svm' /proc/cpuinfo || true; }

check_virtualization() {
  section "virtualization"
  case $(cpu_flag) in
    vmx) ok "CPU has VT-x (vmx)" ;; svm) ok "CPU has AMD-V (svm)" ;;
    *) missing "no vmx/svm CPU flag: enable virtualization in the firmware setup" ;;
  esac
  if [ -c /dev/kvm ]; then ok "/dev/kvm"; else missing "/dev/kvm: load kvm_intel or kvm_amd"; fi
}

iommu_params() {
  case $(cpu_flag) in svm) echo "amd_iommu=on iommu=pt" ;; *) echo "intel_iommu=on iommu=pt" ;; esac
}

add_grub_params() {  # appends the missing IOMMU parameters to GRUB_CMDLINE_LINUX
  local grub="$ROOT/etc/default/grub" p
  [ -f "$grub" ] || { missing "no /etc/default/grub: add '$(iommu_params)' to the kernel command line by hand"; return; }
  for p in $(iommu_params); do
    grep -q -E "^GRUB_CMDLINE_LINUX=\".*\\b$p\\b" "$grub" && continue
    sed -i -E "s/^GRUB_CMDLINE_LINUX=\"(.*)\"/GRUB_CMDLINE_LINUX=\"\\1 $p\"/" "$grub"
    did "GRUB_CMDLINE_LINUX += $p"
  done
  if live; then
    if command -v update-grub >/dev/null; then update-grub; elif command -v grub2-mkconfig >/dev/null; then
      grub2-mkconfig -o /boot/grub2/grub.cfg; fi
    echo "  reboot the host for the kernel parameters to take effect"
  fi
}

check_kernel_params() {
  section "kernel parameters (IOMMU for VFIO passthrough)"
  local p
  for p in $(iommu_params); do
    if grep -q -w -- "$p" /proc/cmdline; then ok "$p"; else missing "$p not on the kernel command line (--kernel-params)"; fi
  done
  local unit
  unit=$(find /sys/class/iommu -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | head -1)
  if [ -n "$unit" ]; then ok "IOMMU active ($unit)"
  else missing "no IOMMU active (/sys/class/iommu empty): firmware VT-d/AMD-Vi and the parameters above"; fi
  if [ "$KERNEL_PARAMS" -eq 1 ] && apply; then add_grub_params; fi
}

setup_modules() {
  section "kernel modules"
  local m
  if apply; then printf '%s\n' "# pytest-cpr (ci/runner/setup-host.sh)" "${MODULES[@]}" | write_file /etc/modules-load.d/pytest-cpr.conf 0644; fi
  for m in "${MODULES[@]}"; do
    if live; then modprobe "$m" 2>/dev/null || true; fi
    if [ -d "/sys/module/$m" ] || grep -q -E "/${m//_/[-_]}\\.ko" "/lib/modules/$(uname -r)/modules.builtin" 2>/dev/null
    then ok "$m loaded"
    elif [ "$m" = iommufd ]; then ok "$m not loaded (kernel < 6.6 or not built: iommufd tests are skipped)"
    else missing "$m not loaded: modprobe $m"; fi
  done
}

setup_permissions() {
  section "device permissions and limits"
  if apply; then
    write_file /etc/udev/rules.d/70-pytest-cpr.rules 0644 <<'EOF'
# pytest-cpr (ci/runner/setup-host.sh): the kvm group may use KVM, VFIO groups and iommufd, so a
# runner user can run QEMU by hand. The harness itself runs as root (namespaces, driver binding).
KERNEL=="kvm", GROUP="kvm", MODE="0660"
SUBSYSTEM=="vfio", GROUP="kvm", MODE="0660"
KERNEL=="iommu", SUBSYSTEM=="misc", GROUP="kvm", MODE="0660"
EOF
    write_file /etc/tmpfiles.d/pytest-cpr.conf 0644 <<'EOF'
# pytest-cpr: records of running harnesses (cleaned by the runner hooks), and the image cache
d /run/pytest-cpr 0700 root root -
d /var/cache/pytest-cpr 0755 root root -
EOF
    if live; then udevadm control --reload && udevadm trigger --subsystem-match=vfio --subsystem-match=misc || true
      systemd-tmpfiles --create /etc/tmpfiles.d/pytest-cpr.conf || true; fi
  fi
  if [ -n "$RUNNER_USER" ]; then
    if apply; then printf '%s\n' "# pytest-cpr: VFIO pins all guest RAM" "$RUNNER_USER - memlock unlimited" \
      | write_file /etc/security/limits.d/pytest-cpr.conf 0644; fi
    if live; then usermod -a -G kvm "$RUNNER_USER" && did "$RUNNER_USER added to group kvm"; fi
    if id -nG "$RUNNER_USER" 2>/dev/null | grep -q -w kvm; then ok "$RUNNER_USER in group kvm"
    elif live || [ "$CHECK" -eq 1 ]; then missing "$RUNNER_USER not in group kvm"; fi
  fi
  if [ -c /dev/net/tun ]; then ok "/dev/net/tun"; else missing "/dev/net/tun: modprobe tun"; fi
}

sudoers_rules() {  # the narrow rules: exactly the commands the hooks and the action run as root
  local user=$1 clean="$HOOK_PYTHON -I -m pytest_cpr.cleanup --label"
  cat <<EOF
# pytest-cpr (ci/runner/setup-host.sh): what $user may run as root, and nothing else.
# The job hooks' cleanup, exactly as hooks/lib.sh runs it (no argument may differ; sudo empties the
# environment, so no CPR_STATE_DIR or PYTHON* variable reaches it):
Cmnd_Alias CPR_CLEANUP = $clean pytest-cpr job-started, \\
                         $clean pytest-cpr job-completed
# Root's files in the runner's work tree back to the runner user (give-back.sh refuses other paths):
Cmnd_Alias CPR_GIVE_BACK = $PREFIX/hooks/give-back.sh *
# The tests and the image build (network namespaces, taps, vfio-pci, debootstrap) through the hooks'
# root-owned interpreter. They run the job's test code as root: this rule narrows what a stray
# command can do; it is no boundary against the job (ci/README.md, "Security model").
Cmnd_Alias CPR_TESTS = $HOOK_PYTHON -m pytest *, $HOOK_PYTHON -m pytest_cpr.images build *
# SETENV: the action passes its CPR_* settings with sudo --preserve-env=...
$user ALL=(root) NOPASSWD: CPR_CLEANUP, CPR_GIVE_BACK, SETENV: CPR_TESTS
EOF
}

setup_sudoers() {
  [ "$SUDOERS" -eq 1 ] && [ -n "$RUNNER_USER" ] && apply || return 0
  section "sudo for $RUNNER_USER (exactly the kit's commands)"
  sudoers_rules "$RUNNER_USER" | write_file /etc/sudoers.d/pytest-cpr 0440
  if command -v visudo >/dev/null; then
    if visudo -c -q -f "$ROOT/etc/sudoers.d/pytest-cpr"; then ok "sudoers syntax (visudo -c)"
    else rm -f "$ROOT/etc/sudoers.d/pytest-cpr"; missing "sudoers file refused by visudo -c: removed"; fi
  fi
}

setup_hooks() {
  section "runner job hooks and the cleanup tool"
  local h
  if apply; then
    mkdir -p "$ROOT$PREFIX/hooks"
    for h in "${HOOKS[@]}"; do install -m 0755 "$HERE/hooks/$h" "$ROOT$PREFIX/hooks/$h"; done
    printf '%s\n' "$HOOK_PYTHON" | write_file "$PREFIX/hooks/python" 0644
    if [ -n "$RUNNER_DIR" ]; then printf '%s\n' "$RUNNER_DIR/_work" | write_file "$PREFIX/hooks/runner-work" 0644; fi
    did "installed $PREFIX/hooks (root-owned; the hooks refuse to run anything a job could change)"
  fi
  if live && [ "$HOOK_PYTHON" = "$PREFIX/venv/bin/python" ]; then
    local spec=${PLUGIN:-$REPO}
    python3 -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/python" -m pip install --quiet --upgrade "$spec"
    did "$PREFIX/venv with $spec"
  fi
  # from / with -I, as the hooks run it: a checkout in the current directory must not count
  if [ -x "$ROOT$HOOK_PYTHON" ] && (cd / && "$ROOT$HOOK_PYTHON" -I -c 'import pytest_cpr.cleanup') 2>/dev/null
  then ok "$HOOK_PYTHON has pytest_cpr.cleanup"
  elif [ -z "$ROOT" ]; then missing "$HOOK_PYTHON with pytest-cpr (run without --check)"; fi
}

setup_host_config() {
  [ -n "$HOST_CONFIG" ] || return 0
  section "host config"
  if apply; then write_file /etc/pytest-cpr/host.toml 0644 < "$HOST_CONFIG"; fi
  if [ -z "$ROOT" ] && [ -x "$PREFIX/venv/bin/python" ]; then
    if "$PREFIX/venv/bin/python" -c 'import sys; from pathlib import Path; from pytest_cpr.host.hostconfig import load
print(load(Path(sys.argv[1])).describe())' "/etc/pytest-cpr/host.toml"; then ok "host config valid"
    else missing "host config invalid (the lines above name the keys)"; fi
  fi
}

set_env_line() {  # file key value: replace or append KEY=value
  local file=$1 key=$2 value=$3
  touch "$file"
  if grep -q "^$key=" "$file"; then sed -i "s|^$key=.*|$key=$value|" "$file"; else printf '%s=%s\n' "$key" "$value" >> "$file"; fi
  did "$key=$value in ${file#"$ROOT"}"
}

setup_runner_env() {
  [ -n "$RUNNER_DIR" ] || return 0
  section "runner settings ($RUNNER_DIR/.env; restart the runner service afterwards)"
  local env="$ROOT$RUNNER_DIR/.env"
  if apply; then
    mkdir -p "$ROOT$RUNNER_DIR"
    set_env_line "$env" ACTIONS_RUNNER_HOOK_JOB_STARTED "$PREFIX/hooks/job-started.sh"
    set_env_line "$env" ACTIONS_RUNNER_HOOK_JOB_COMPLETED "$PREFIX/hooks/job-completed.sh"
    set_env_line "$env" CPR_CACHE_DIR /var/cache/pytest-cpr
    set_env_line "$env" CPR_STRICT on
    if [ -n "$HOST_CONFIG" ]; then set_env_line "$env" CPR_HOST_CONFIG /etc/pytest-cpr/host.toml; fi
    # the sudo rules allow the tests through this interpreter only (the action then installs nothing)
    if [ "$SUDOERS" -eq 1 ]; then set_env_line "$env" CPR_CI_VENV_PYTHON "$HOOK_PYTHON"; fi
  fi
  if grep -q '^ACTIONS_RUNNER_HOOK_JOB_STARTED=' "$env" 2>/dev/null; then ok "job hooks in .env"
  else missing "job hooks not in $RUNNER_DIR/.env"; fi
  if [ -f "$ROOT$RUNNER_DIR/.service" ] && apply; then  # svc.sh install wrote the systemd unit's name
    local unit
    unit=$(cat "$ROOT$RUNNER_DIR/.service")
    printf '%s\n' "[Service]" "LimitMEMLOCK=infinity" | write_file "/etc/systemd/system/$unit.d/pytest-cpr.conf" 0644
    if live; then systemctl daemon-reload; fi
  fi
}

main() {
  echo "pytest-cpr runner host setup${ROOT:+ (files under $ROOT only)}$([ "$CHECK" -eq 1 ] && echo ' (check only)')"
  check_virtualization
  check_kernel_params
  setup_modules
  setup_permissions
  setup_sudoers
  setup_hooks
  setup_host_config
  setup_runner_env
  echo
  if [ "$MISSING" -gt 0 ]; then echo "$MISSING item(s) missing (see MISSING above)"; else echo "host ready"; fi
  echo "next: run the suite by hand once (ci/README.md, 'First run by hand'), then start the runner"
  [ "$MISSING" -eq 0 ]
}

main
