#!/usr/bin/env bash
# The test suite: unit, integration (real guests through cpr-transfer), hardware tests (skipped
# without a host config), the virtual hardware host tier, and cross-version live update to a
# second QEMU build when one is cached (`cpr-image build qemu-next`). JUnit XML: artifacts/junit/.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p artifacts/junit
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
ARGS=("$@")
# The virtual hardware host tier (below, once, not inside the main run) gates like the rest:
# CPR_VHOST=0 is the one way to leave it out (e.g. a machine without the image tools).
TIER2=${CPR_VHOST:-1}
rc=0
# every CPR mode's tests run once, below, with the build that has all three modes (qemu-next)
MODES=(tests/integration/test_modes.py tests/integration/test_mode_preconditions.py)
env -u CPR_VHOST "${PYTEST[@]}" tests "${MODES[@]/#/--ignore=}" --junitxml=artifacts/junit/suite.xml "${ARGS[@]}" || rc=$?
[ "$rc" = 5 ] && rc=0   # no test selected (e.g. a -k filter) is not a failure of the suite

# pytest-xdist: guests and transfers on two workers at once (per-worker run dirs and namespaces, the
# accelerator probe once per run); its own JUnit file and artifacts folder
echo "== pytest-xdist (-n 2): transfers, timelines and faults on two workers"
drc=0
CPR_ARTIFACTS=artifacts/xdist "${PYTEST[@]}" -n 2 tests/integration/test_transfer.py tests/integration/test_measure.py \
  tests/integration/test_faults.py tests/integration/test_old_qemu.py --junitxml=artifacts/junit/xdist.xml "${ARGS[@]}" || drc=$?
[ "$drc" = 5 ] && drc=0
[ "$rc" = 0 ] && rc=$drc

next=$(.venv/bin/cpr-image path qemu-next 2>/dev/null)/bin/qemu-system-x86_64
if [ ! -x "$next" ]; then  # `CPR_VHOST=0 ci/bootstrap.sh` (README's first command) leaves it to here
  echo "== cross-version: the second QEMU build (qemu-next) is not built yet; building it (cached by its recipe)"
  .venv/bin/cpr-image build qemu-next || rc=1
fi
if [ -x "$next" ]; then
  echo "== cross-version: source $(command -v qemu-system-x86_64) -> target $next"
  xrc=0
  CPR_TARGET_QEMU="$next" "${PYTEST[@]}" tests/integration/test_cross_build.py \
    tests/integration/test_transfer.py --junitxml=artifacts/junit/cross-version.xml "${ARGS[@]}" || xrc=$?
  [ "$xrc" = 5 ] && xrc=0
  [ "$rc" = 0 ] && rc=$xrc
  # every CPR mode (cpr-exec needs 10.2, the fd-passed cpr channel 10.1) and each mode's preconditions
  echo "== CPR modes (qemu-next): source and target $next"
  erc=0
  CPR_QEMU="$next" CPR_TARGET_QEMU="$next" "${PYTEST[@]}" "${MODES[@]}" --junitxml=artifacts/junit/cpr-modes.xml \
    "${ARGS[@]}" || erc=$?
  [ "$erc" = 5 ] && erc=0
  [ "$rc" = 0 ] && rc=$erc
fi
# A distribution cloud image (images/cloud: GPT, GRUB, Debian's cloud kernel, cloud-init NoCloud) through
# --cpr-user-image: firmware boot, the plugin's NoCloud seed, three checked transfers. Built here when
# missing (cached by recipe hash; ci/bootstrap.sh builds it unless CPR_VHOST=0).
cloud=$(.venv/bin/cpr-image path cloud 2>/dev/null)/disk.qcow2
[ -f "$cloud" ] || { echo "== cloud image: not built yet, building it"; .venv/bin/cpr-image build cloud || rc=1; }
if [ -f "$cloud" ]; then
  echo "== cloud image through --cpr-user-image: $cloud"
  crc=0
  CPR_USER_IMAGE="$cloud" CPR_BOOT_TIMEOUT="${CPR_BOOT_TIMEOUT:-600}" "${PYTEST[@]}" \
    tests/integration/test_cloud_image.py --junitxml=artifacts/junit/cloud-image.xml "${ARGS[@]}" || crc=$?
  [ "$crc" = 5 ] && crc=0
  [ "$rc" = 0 ] && rc=$crc
fi
# Virtual hardware host tier (L1 VM under TCG with emulated VT-d, igb and NVMe bound to vfio-pci, the
# iommufd-capable kernel and an mdev; the L2 guests on KVM inside L1): tests/hardware on both backends
# with --cpr-strict (a test the virtual host should serve and skips is a failure), in four parts.
# - L1 and our code in it (tests/vhost less the inner run: devices and IOMMU groups, the vfio binder,
#   KVM in L1, an L1 reset held and named): these gate.
# - The passthrough tests, in three sets, each in a fresh L1 (vhost_set): the NIC set (traffic and interrupts
#   through cpr-transfer and cpr-exec, interrupts raised in the blackout and their control, fd passing, the
#   old QEMU's KVM fds and answers, mdev, memlock, cross-version with forky's 11.1.2 <-> 11.1.3 on each
#   backend), the NVMe set (DMA through transfers, two groups, cpr-exec, a container per device with a guest
#   vIOMMU) and the rollback set (fault points and failed ioctls with live NIC + NVMe). The NIC set GATES: a
#   failed CPR check fails CI at once; a fault of L1 itself (frozen, panicked, reset: the emulated machine,
#   named by the harness) gets one announced retry in a fresh L1 of what it had not finished. The NVMe and
#   rollback sets REPORT (CPR_VHOST_GATE=all makes them gate the same way): under their minutes of DMA an L1
#   CPU 0 still stops taking timer interrupts, 3 of 16 runs on the fixed L1 QEMU, its APIC holding the timer
#   vector in service with no handler running (docs/virtual-host.md). They all reported while races in
#   QEMU's TCG killed L2 guests and L1 (docs/virtual-host.md, "The emulator's race"); two are fixed in the
#   QEMU that runs L1 (images/qemu-l0). CPR_VHOST_GATE=0 makes the NIC set report too (vhost-<set>.xml and
#   a ::warning:: naming what failed). The NVMe and rollback sets start only if their timeout fits CI's
#   budget (fits_budget; skipped with a warning otherwise).
# On a hardware runner every test gates (the CI kit).
# Left out of all: the reproducer of target-resets-device-without-flr (the MSI blackout test's strict expected
# failure shows the same bug in CI). The blackout check's control runs in the NIC set: it stops at its
# first catch and misses with a chance of 0.3**6 (the NIC driver's watchdog can mend a dropped interrupt).
VHOST_GATE='tests/hardware --cpr-strict=on -k "not rollback and not ioctl and not viommu and not nvme and not two_groups and not without_flr"'
VHOST_NVME='tests/hardware --cpr-strict=on -k "nvme_dma_through_transfer or two_groups or cpr_exec_keeps_nvme or viommu"'
# failed live updates with live passthrough devices (tests/hardware/test_rollback.py): three fault points on
# each backend, one failed ioctl in the old QEMU per backend (VADDR|ALL unmap, IOAS_CHANGE_PROCESS), the new
# QEMU's failed VADDR map (a strict expected failure: target-vaddr-map-failure-loses-guest) and the control
# whose rollback checks must fail; a fresh L1 (10 tests in 9 min here, 2026-11-27)
VHOST_ROLLBACK='tests/hardware --cpr-strict=on -k "rollback or ioctl"'
vhost_run() {  # $1: run name, $2: the inner pytest arguments, then the L0 run's own; at most
  # CPR_VHOST_TIMEOUT s (62 min). JUnit XML: artifacts/junit/vhost-l0-$1.xml (the tier's own tests),
  # vhost-$1.xml (the inner run)
  local name=$1 tests=$2; shift 2
  timeout -k 60 "${CPR_VHOST_TIMEOUT:-3700}" env CPR_VHOST=1 CPR_VHOST_TESTS="$tests" CPR_VHOST_NAME="$name" \
    "${PYTEST[@]}" tests/vhost --junitxml="artifacts/junit/vhost-l0-$name.xml" "${ARGS[@]}" "$@"
}
if [ "$TIER2" != 0 ] && [ ! -d "$(.venv/bin/cpr-image path vhost 2>/dev/null)" ]; then
  echo "== virtual hardware host tier: its images are not built; ci/bootstrap.sh builds them (~15 min on two" \
       "cores; CPR_VHOST=0 leaves the tier out)"
  CPR_VHOST=1 bash ci/bootstrap.sh || rc=1
fi
build_missing() {  # $1: image name, $2: what it is; built when its cache entry is missing (cached by recipe hash)
  [ -d "$(.venv/bin/cpr-image path "$1" 2>/dev/null)" ] && return 0
  echo "== virtual hardware host tier: building $1 ($2)"
  .venv/bin/cpr-image build "$1" || rc=1
}
if [ "$TIER2" != 0 ]; then
  # shared into L1 when cached (tests/hardware/test_cross_passthrough.py; ~1 min)
  build_missing qemu-forky "the cross-version passthrough tests' second QEMU"
  # Debian's 10.0 source with our fixes of two TCG races (without them another vCPU's XRSTOR undoes CPU 0's
  # GIF and nested-paging bits and the nested guests die, and VMRUN can drop the APIC's interrupt bit and
  # leave a CPU asleep for good: docs/virtual-host.md, "The emulator's race"; ~3 min)
  build_missing qemu-l0 "the QEMU that runs L1"
fi
# CI stops a run at 90 min: the NVMe and rollback sets, and a retry, start only if their timeout still fits
# in the budget (CPR_CI_BUDGET_S, 80 min from CPR_CI_T0, which .ci/run sets before bootstrapping), else they
# are skipped with a warning. The main suite, the L1 part and the NIC set always run.
T0=${CPR_CI_T0:-$(date +%s)}
fits_budget() {  # $1: seconds the part may take, $2: what it is
  local used=$(( $(date +%s) - T0 )) budget=${CPR_CI_BUDGET_S:-4800}
  if [ $(( used + $1 )) -le "$budget" ]; then return 0; fi
  echo "::warning::$2 skipped: CI has run $(( used / 60 )) min and the part may take $(( $1 / 60 )) min of a" \
       "$(( budget / 60 )) min budget (CPR_CI_BUDGET_S)"
  return 1
}
say_failed() {  # $1: run name, $2: what ran, $3: its exit status, $4: ::warning or ::error; the inner failures by name
  local failed
  failed=$(.venv/bin/python -m pytest_cpr.vhost failed "artifacts/junit/vhost-$1.xml")
  failed=${failed//$'\n'/ }  # (the substitution dropped the trailing newline: none failed is empty)
  if [ -z "$failed" ] && [ -f "artifacts/junit/vhost-$1.xml" ]; then
    failed="no inner test failed: the L0 test's verdict on the run failed (above)"
  fi
  echo "$4::$2 in the virtual host failed (exit $3):" \
       "${failed:-no inner JUnit XML came back (L1 died: see the L0 test failure above)}"
}
GATE=${CPR_VHOST_GATE:-1}
vhost_set() {  # $1: run name, $2: what it is, $3: the inner selection, $4: its timeout (s), in a fresh L1;
  # $5: "dma" for a set with minutes of NVMe DMA (the NVMe and rollback sets), where L1's CPU 0 still
  # freezes (3 of 16 such runs, 2026-11-27): those gate only with CPR_VHOST_GATE=all, and report otherwise.
  # A gating set (the NIC set with CPR_VHOST_GATE=1, the default): a failure fails CI, after one announced
  # retry in a fresh L1 only when L1 itself failed (`python -m pytest_cpr.vhost l1fault`: the emulated
  # machine froze, panicked or reset, not the code under test) and the retry fits the budget; any other
  # failure fails at once. CPR_VHOST_GATE=0: every set reports.
  local name=$1 what=$2 tests=$3 limit=$4 src=0 fault again log gates=$GATE
  if [ "${5:-}" = dma ] && [ "$GATE" != all ]; then gates=0; fi
  [ "$gates" = all ] && gates=1
  echo "== virtual hardware host tier, $what ($([ "$gates" = 1 ] && echo gates || echo reports)): $tests"
  CPR_VHOST_TIMEOUT=$limit vhost_run "$name" "$tests" -k test_inner_passthrough_transfer || src=$?
  [ "$src" = 5 ] && src=0
  if [ "$src" = 0 ]; then echo "== $what in the virtual host: all passed"; return; fi
  if [ "$gates" != 1 ]; then say_failed "$name" "$what" "$src" "::warning"; return; fi
  if fault=$(.venv/bin/python -m pytest_cpr.vhost l1fault "artifacts/junit/vhost-l0-$name.xml") &&
     fits_budget "$limit" "the retry of the $what"; then
    # what failed, by node id; with no JUnit XML back (L1 died mid-run) the set less what its streamed
    # log shows done
    again=$(.venv/bin/python -m pytest_cpr.vhost failed "artifacts/junit/vhost-$name.xml")
    log=$(ls -t artifacts/vhost/*/pytest-"$name".log 2>/dev/null | head -1)
    if [ -n "$again" ]; then again="$again --cpr-strict=on"
    elif [ ! -f "artifacts/junit/vhost-$name.xml" ] && [ -n "$log" ]; then
      again="$tests $(.venv/bin/python -m pytest_cpr.vhost finished "$log")"
    else again=$tests; fi
    echo "::warning::$what: L1 itself failed ($fault); its one retry follows, announced, in a fresh L1:" \
         "$again (both attempts' JUnit XML and artifacts are kept)"
    src=0
    CPR_VHOST_TIMEOUT=$limit vhost_run "$name-retry" "$again" -k test_inner_passthrough_transfer || src=$?
    [ "$src" = 5 ] && src=0
    name=$name-retry
  fi
  [ "$src" = 0 ] && return
  say_failed "$name" "$what" "$src" "::error"
  [ "$rc" = 0 ] && rc=$src
}
if [ "$TIER2" != 0 ]; then
  gate=${CPR_VHOST_TESTS:-$VHOST_GATE}
  # L1 itself, our code in it, the binder, KVM in L1 and the held L1 reset: these gate
  echo "== virtual hardware host tier, L1 and the harness in it (gates)"
  lrc=0
  vhost_run l1 "$gate" -k "not test_inner_passthrough_transfer" || lrc=$?
  [ "$lrc" = 5 ] && lrc=0
  [ "$rc" = 0 ] && rc=$lrc
  limit=1800  # the NIC set: 16 min here (2026-11-27); a selection of your own (CPR_VHOST_TESTS) gets 62 min
  [ -n "${CPR_VHOST_TESTS:-}" ] && limit=3700
  vhost_set gate "NIC passthrough tests" "$gate" "$limit"
  if [ -z "${CPR_VHOST_TESTS:-}" ] && [ "${CPR_VHOST_NVME:-1}" != 0 ] && fits_budget 1200 "NVMe DMA tests"; then
    vhost_set nvme "NVMe DMA tests" "$VHOST_NVME" 1200 dma
  fi
  if [ -z "${CPR_VHOST_TESTS:-}" ] && [ "${CPR_VHOST_ROLLBACK:-1}" != 0 ] && fits_budget 1200 "Rollback and ioctl-fault tests"; then
    vhost_set rollback "rollback and ioctl-fault tests" "$VHOST_ROLLBACK" 1200 dma
  fi
fi
# a step that its timeout had to kill (timeout -k) cannot clean up after itself: what it left (an L1 or
# L2 QEMU, a namespace, a vfio binding) goes here, said aloud; what cannot be cleaned fails the run
.venv/bin/python -m pytest_cpr.cleanup --label "ci/test.sh cleanup" || rc=1
exit "$rc"
