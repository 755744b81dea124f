#!/usr/bin/env bash
# A second, newer QEMU build for cross-version live update tests (build A -> build B) on a host
# whose own QEMU is older: Debian trixie-backports' qemu-system-x86 in a debootstrapped tree,
# run through that tree's own dynamic loader and libraries (no chroot, so every host path a test
# uses stays valid). Called by `cpr-image build qemu-next` with OUT set; writes
# OUT/bin/qemu-system-x86_64 (a wrapper) and OUT/root (the tree).
set -euo pipefail
: "${OUT:?OUT must name the staging directory}"
SUITE=${CPR_QEMU_NEXT_SUITE:-trixie}
PKG_SUITE=${CPR_QEMU_NEXT_PKG_SUITE:-trixie-backports}
MIRROR=${CPR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
R="$OUT/root"
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../lib/debootstrap.sh"
step() { printf '[qemu-next %(%H:%M:%S)T] %s\n' -1 "$*"; }

step "debootstrap $SUITE minbase"
signed_debootstrap "$SUITE" "$R" "$MIRROR" --variant=minbase
[ -x "$R/bin/sh" ] || { echo "debootstrap of $SUITE failed" >&2; exit 1; }
step "qemu-system-x86 from $PKG_SUITE"
printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
  "$MIRROR" "$PKG_SUITE" > "$R/etc/apt/sources.list.d/$PKG_SUITE.sources"
cp /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
chroot "$R" apt-get -q update >/dev/null
chroot "$R" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  -t "$PKG_SUITE" qemu-system-x86 >/dev/null
chroot "$R" apt-get clean
rm -rf "$R"/usr/share/doc "$R"/usr/share/man "$R"/usr/share/locale "$R"/var/lib/apt/lists/*
chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' qemu-system-x86 > "$OUT/packages.txt"
mkdir -p "$OUT/bin"
cat > "$OUT/bin/qemu-system-x86_64" <<'WRAP'
#!/bin/sh
# QEMU from the tree next to this script, with that tree's loader, libraries, firmware and modules.
# QEMU also searches its compiled-in module dir, which on this host holds the host build's modules
# ("Only modules from the same build can be loaded"): a private mount namespace covers that dir
# with the tree's own for this process only (gone when it exits).
here=$(cd "$(dirname "$0")/.." && pwd)
r="$here/root"
moddir=/usr/lib/x86_64-linux-gnu/qemu
set -- "$r/lib64/ld-linux-x86-64.so.2" --library-path "$r/usr/lib/x86_64-linux-gnu:$r/lib/x86_64-linux-gnu" \
  "$r/usr/bin/qemu-system-x86_64" -L "$r/usr/share/qemu" "$@"
if [ -d "$moddir" ] && [ "$(id -u)" = 0 ]; then
  exec unshare --mount --propagation private -- /bin/sh -c \
    'mount --bind "$0" '"$moddir"' && exec "$@"' "$r$moddir" "$@"
fi
exec "$@"
WRAP
chmod +x "$OUT/bin/qemu-system-x86_64"
"$OUT/bin/qemu-system-x86_64" --version | head -1
step "done: $(cat "$OUT/packages.txt")"
