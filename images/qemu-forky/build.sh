#!/usr/bin/env bash
# A second QEMU build with VFIO CPR for the cross-version passthrough tests (tests/hardware/
# test_cross_passthrough.py): Debian forky's qemu-system-x86 (11.1.2 when this was written) in a
# trixie tree (debootstrap has no forky script yet; apt takes the package and what it needs from
# forky), built by the qemu-next recipe (named in ./extends, so its script is part of this hash).
# Its own cache entry: the qemu-next entry runs L1 and is the tier-1 cross-version target.
set -euo pipefail
: "${OUT:?OUT must name the staging directory}"
# forky (testing) has a Release file valid for a week only, and a mirror (or snapshot) that has not
# caught up serves one past its Valid-Until, which apt refuses ("Release file ... is expired"). The
# tree's apt gets this before debootstrap fills the tree: the signature is still checked (Signed-By),
# only the age is not.
mkdir -p "$OUT/root/etc/apt/apt.conf.d"
echo 'Acquire::Check-Valid-Until "false";' > "$OUT/root/etc/apt/apt.conf.d/99cpr-no-valid-until"
export CPR_QEMU_NEXT_SUITE=${CPR_QEMU_FORKY_SUITE:-trixie} CPR_QEMU_NEXT_PKG_SUITE=${CPR_QEMU_FORKY_PKG_SUITE:-forky}
exec bash "$(cd "$(dirname "$0")" && pwd)/../qemu-next/build.sh"
