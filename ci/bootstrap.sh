#!/usr/bin/env bash
# Set up this host for pytest-cpr from scratch: QEMU >= 10.0 (Debian 12: bookworm-backports), the
# image tools, a virtualenv with the plugin, and the images (each cached by a hash of its recipe).
# Run as root. Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "ci/bootstrap.sh: run as root (apt, debootstrap, network namespaces)" >&2; exit 1; }
log() { printf '[bootstrap %(%H:%M:%S)T] %s\n' -1 "$*"; }
export DEBIAN_FRONTEND=noninteractive
. /etc/os-release
QEMU_SUITE=()
if [ "${VERSION_CODENAME:-}" = bookworm ]; then
  # bookworm's own QEMU is 7.2 (no cpr-transfer); backports has 10.0.x
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports"
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      > /etc/apt/sources.list.d/bookworm-backports.sources
  fi
  QEMU_SUITE=(-t bookworm-backports)
elif [ "${ID:-}" != debian ] && [ "${ID_LIKE:-}" != debian ]; then
  echo "ci/bootstrap.sh knows Debian and Ubuntu; elsewhere install QEMU >= 10.0, debootstrap, busybox (static)," \
       "cpio, kmod, e2fsprogs and iproute2 by hand, then run the pip and cpr-image steps below" >&2
  exit 1
fi
log "apt: QEMU and image tools"
apt-get update -q >/dev/null || log "apt-get update reported errors (continuing with the lists it has)"
apt-get install -y -q --no-install-recommends "${QEMU_SUITE[@]}" qemu-system-x86 qemu-utils >/dev/null
apt-get install -y -q --no-install-recommends debootstrap busybox-static cpio kmod xz-utils zstd lz4 \
  e2fsprogs iproute2 ca-certificates mmdebstrap gdisk mount >/dev/null
if [ "${CPR_VHOST:-1}" != 0 ]; then
  log "apt: build tools (the virtual host's iommufd-capable kernel, images/vhost-kernel, and the QEMU that runs it," \
      "images/qemu-l0)"
  apt-get install -y -q --no-install-recommends build-essential bc bison flex libelf-dev libssl-dev \
    ninja-build pkg-config python3-venv dpkg-dev patch libglib2.0-dev libpixman-1-dev libfdt-dev libattr1-dev \
    libcap-ng-dev >/dev/null
fi
qemu-system-x86_64 --version | head -1
# The guest image builds while pip installs (both mostly wait on downloads): pytest_cpr.images needs
# only the standard library, so the system python3 runs it from the checkout.
log "images: guest (building in the background while pip runs)"
python3 -m pytest_cpr.images build guest &
guest_build=$!
trap 'kill "$guest_build" 2>/dev/null || true' EXIT
log "python: virtualenv .venv with pytest-cpr and its dev tools"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import pytest_cpr, qemu.qmp, paramiko, pexpect, pyroute2'
log "python: ready; waiting for the guest image"
wait "$guest_build" || { log "the guest image build failed (its output is above)"; exit 1; }
trap - EXIT
for recipe in images/*/; do
  name=$(basename "$recipe")
  [ "$name" = guest ] || [ ! -f "$recipe/build.sh" ] && continue
  case "$name" in vhost* | qemu-next | qemu-forky | qemu-l0 | cloud)
    if [ "${CPR_VHOST:-1}" = 0 ]; then  # the demo needs only the guest; ci/test.sh builds these when it needs them
      log "skipping the $name image (CPR_VHOST=0); ci/test.sh builds it when it first needs it (cached)"; continue
    fi ;;
  esac
  .venv/bin/cpr-image build "$name"
done
log "ready"
