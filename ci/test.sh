#!/usr/bin/env bash
# The test suite: unit, integration (real guests through cpr-transfer), hardware tests (skipped
# without a host config), the virtual hardware host tier, and cross-version live update to a
# second QEMU build when one is cached (`cpr-image build qemu-next`). JUnit XML: artifacts/junit/.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p artifacts/junit
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
ARGS=("$@")
# The virtual host tier runs when its images are built (ci/bootstrap.sh builds them unless CPR_VHOST=0);
# CPR_VHOST=0 skips it, CPR_VHOST=1 insists on it (missing images are then an error).
TIER2=${CPR_VHOST:-auto}   # runs below, once, not inside the main run
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
fi
# Virtual hardware host tier (L1 VM under TCG with emulated VT-d, igb and NVMe bound to vfio-pci, the
# iommufd-capable kernel and an mdev; the L2 guests on KVM inside L1): tests/hardware, unchanged, on
# the legacy container and on iommufd. Nested SVM emulated by TCG has made L1's KVM stop an L2 guest
# ("KVM internal error") or frozen L1 (seen with QEMU 10.0.2 running L1); only that evidence earns
# one retry, and the retry is announced.
# The CI subset: every legacy-container test (NIC traffic, NVMe DMA, both in two groups), the mdev
# blocker, and NIC traffic on iommufd. NVMe DMA on iommufd is left out: in the virtual host it hangs
# the L2 guest now and then even without any transfer (docs/virtual-host.md, "Known limits").
CI_SUBSET='tests/hardware -k "legacy or mdev or (nic_traffic and iommufd)"'
vhost_run() {  # $1: JUnit name
  CPR_VHOST=1 CPR_VHOST_TESTS="${CPR_VHOST_TESTS:-$CI_SUBSET}" \
    "${PYTEST[@]}" tests/vhost --junitxml="artifacts/junit/$1.xml" "${ARGS[@]}"
}
vhost_image=$(.venv/bin/cpr-image path vhost 2>/dev/null)
if [ "$TIER2" = 1 ] && [ ! -d "$vhost_image" ]; then
  echo "CPR_VHOST=1 but the virtual host image is not built: run CPR_VHOST=1 ci/bootstrap.sh" >&2; rc=1
elif [ "$TIER2" != 0 ] && [ ! -d "$vhost_image" ]; then
  echo "== virtual hardware host tier: skipped (no vhost image; ci/bootstrap.sh builds it unless CPR_VHOST=0)"
elif [ "$TIER2" != 0 ]; then
  echo "== virtual hardware host tier"
  stamp=$(mktemp); vrc=0
  vhost_run vhost || vrc=$?
  if [ "$vrc" != 0 ] && [ "$vrc" != 5 ]; then
    evidence=$( { find artifacts/vhost -newer "$stamp" -type f -name l1-stuck.txt
                  find artifacts/vhost -newer "$stamp" -type f -name '*.stderr' \
                    -exec grep -l 'KVM internal error' {} + ; } 2>/dev/null | head -3)
    if [ -n "$evidence" ]; then
      echo "::warning::virtual host tier: nested-virtualization fault of the emulated host, retrying once: $evidence"
      vrc=0; vhost_run vhost-retry || vrc=$?
    fi
  fi
  rm -f "$stamp"
  [ "$vrc" = 5 ] && vrc=0
  [ "$rc" = 0 ] && rc=$vrc
fi
exit "$rc"
