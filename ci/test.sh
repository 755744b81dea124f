#!/usr/bin/env bash
# The test suite: unit, integration (real guests through cpr-transfer), hardware tests (skipped
# without a host config), the virtual hardware host tier, and cross-version live update to a
# second QEMU build when one is cached (`cpr-image build qemu-next`). JUnit XML: artifacts/junit/.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p artifacts/junit
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
ARGS=("$@")
# The virtual host tier (below, once, not inside the main run): CPR_VHOST=1 runs it and its result
# counts; by default (auto) it runs when its images are built (ci/bootstrap.sh builds them unless
# CPR_VHOST=0) and only reports: under TCG on two cores the nested emulation still stalls a guest
# or L1 now and then (docs/virtual-host.md), and a flaky step must not block every landing.
# CPR_VHOST=0 skips it.
TIER2=${CPR_VHOST:-auto}
rc=0
env -u CPR_VHOST "${PYTEST[@]}" tests --junitxml=artifacts/junit/suite.xml "${ARGS[@]}" || rc=$?
[ "$rc" = 5 ] && rc=0   # no test selected (e.g. a -k filter) is not a failure of the suite

next=$(.venv/bin/cpr-image path qemu-next 2>/dev/null)/bin/qemu-system-x86_64
if [ -x "$next" ]; then
  echo "== cross-version: source $(command -v qemu-system-x86_64) -> target $next"
  xrc=0
  CPR_TARGET_QEMU="$next" "${PYTEST[@]}" tests/integration/test_cross_build.py \
    tests/integration/test_transfer.py --junitxml=artifacts/junit/cross-version.xml "${ARGS[@]}" || xrc=$?
  [ "$xrc" = 5 ] && xrc=0
  [ "$rc" = 0 ] && rc=$xrc
  echo "== cpr-exec (qemu-next): source and target $next"
  erc=0
  CPR_QEMU="$next" CPR_TARGET_QEMU="$next" "${PYTEST[@]}" tests/integration/test_modes.py \
    --junitxml=artifacts/junit/cpr-exec.xml "${ARGS[@]}" || erc=$?
  [ "$erc" = 5 ] && erc=0
  [ "$rc" = 0 ] && rc=$erc
fi
# Virtual hardware host tier (L1 VM under TCG with emulated VT-d, igb and NVMe bound to vfio-pci, the
# iommufd-capable kernel and an mdev; the L2 guests on KVM inside L1). The CI subset: NIC traffic and
# NVMe DMA through legacy-container transfers (two devices, two IOMMU groups), NIC traffic through
# iommufd transfers, the mdev blocker, and the old QEMU's answers and exit after a transfer of a vfio
# guest on KVM (a known QEMU 11.1.3 crash, pytest_cpr/qemu/bugs.py: a strict expected failure). NVMe DMA on iommufd is left out: in the virtual host it hangs
# the L2 guest or L1 itself now and then even without any transfer (docs/virtual-host.md).
# The nested emulation stalls an L2 guest now and then whatever the test does (the control test
# without a transfer shows it), so a failed tier earns one retry; the retry is announced with what
# failed, and both runs' JUnit XML and artifacts are kept. Hardware runners get no such retry.
CI_SUBSET='tests/hardware -k "(two_groups and legacy) or mdev or (nic_traffic and iommufd) or (old_qemu_answers and legacy)"'
vhost_run() {  # $1: JUnit name; at most CPR_VHOST_TIMEOUT seconds (default 25 min)
  timeout -k 60 "${CPR_VHOST_TIMEOUT:-1500}" env CPR_VHOST=1 CPR_VHOST_TESTS="${CPR_VHOST_TESTS:-$CI_SUBSET}" \
    "${PYTEST[@]}" tests/vhost --junitxml="artifacts/junit/$1.xml" "${ARGS[@]}"
}
vhost_image=$(.venv/bin/cpr-image path vhost 2>/dev/null)
if [ "$TIER2" = 1 ] && [ ! -d "$vhost_image" ]; then
  echo "CPR_VHOST=1 but the virtual host image is not built: run CPR_VHOST=1 ci/bootstrap.sh" >&2; rc=1
elif [ "$TIER2" != 0 ] && [ ! -d "$vhost_image" ]; then
  echo "== virtual hardware host tier: skipped (no vhost image; ci/bootstrap.sh builds it unless CPR_VHOST=0)"
elif [ "$TIER2" != 0 ]; then
  echo "== virtual hardware host tier ($([ "$TIER2" = 1 ] && echo "counts: CPR_VHOST=1" || echo "reports only; CPR_VHOST=1 makes it count"))"
  vrc=0
  vhost_run vhost || vrc=$?
  if [ "$vrc" != 0 ] && [ "$vrc" != 5 ]; then
    failed=$(grep -ho 'testcase [^>]*name="[^"]*"[^>]*>[[:space:]]*<failure' artifacts/junit/vhost*.xml 2>/dev/null \
             | grep -o 'name="[^"]*"' | tr '\n' ' ')
    echo "::warning::virtual host tier failed (exit $vrc: ${failed:-see artifacts/junit/vhost.xml}); retrying once (nested emulation)"
    vrc=0
    vhost_run vhost-retry || vrc=$?
  fi
  [ "$vrc" = 5 ] && vrc=0
  if [ "$TIER2" = 1 ]; then
    [ "$rc" = 0 ] && rc=$vrc
  elif [ "$vrc" != 0 ]; then
    echo "::warning::virtual host tier failed twice (exit $vrc); it reports only (CPR_VHOST=1 makes it count)"
  fi
fi
exit "$rc"
