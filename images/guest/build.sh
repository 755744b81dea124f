#!/usr/bin/env bash
# Build the default pytest-cpr guest from Debian packages only: no loop mounts, no downloads
# at test time. Called by `python -m pytest_cpr.images build guest` with OUT set to an empty
# staging directory; writes vmlinuz (and vmlinux, the same kernel for PVH boot), initrd.img, rootfs.img and
# packages.txt there.
set -euo pipefail
: "${OUT:?OUT must name the staging directory}"
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../lib/initrd.sh"
. "$HERE/../lib/debootstrap.sh"
SUITE=${CPR_GUEST_SUITE:-bookworm}
MIRROR=${CPR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# busybox-static: the boot's shell scripts run its applets without exec'ing dynamically linked programs
PACKAGES=dropbear-bin,iproute2,iputils-ping,procps,busybox-static
ROOTFS_SIZE=${CPR_GUEST_ROOTFS_SIZE:-768M}
WORK="$OUT/work"
step() { printf '[guest-image %(%H:%M:%S)T] %s\n' -1 "$*"; }

for tool in debootstrap mke2fs busybox cpio depmod modprobe apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install debootstrap e2fsprogs busybox-static cpio kmod lz4)" >&2; exit 2; }
done
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically' || true
mkdir -p "$WORK/rootfs"

step "debootstrap $SUITE minbase with $PACKAGES"
signed_debootstrap "$SUITE" "$WORK/rootfs" "$MIRROR" --variant=minbase --include="$PACKAGES"
[ -x "$WORK/rootfs/usr/sbin/dropbear" ] || { echo "debootstrap failed: no dropbear in rootfs" >&2; exit 1; }

# Two kernels share the rootfs: "cloud" (virtio only, the fastest boot: the default) and "full"
# (Debian's generic kernel with NVMe, igb/igbvf and e1000e drivers, for passthrough guests).
fetch_kernel() {  # $1 package; prints the kernel release; leaves the tree in $WORK/k-$1/x
  local pkg dir="$WORK/k-$1"
  mkdir -p "$dir"
  pkg=$(chroot "$WORK/rootfs" apt-cache depends "$1" | awk '/Depends: linux-image-/{print $2; exit}')
  chroot "$WORK/rootfs" sh -c "cd /tmp && apt-get -q download $pkg" >/dev/null
  mv "$WORK/rootfs/tmp/${pkg}"_*.deb "$dir/"
  dpkg-deb -x "$dir/${pkg}"_*.deb "$dir/x"
  echo "$pkg $(dpkg-deb -f "$dir/${pkg}"_*.deb Version)" >> "$OUT/kernels.txt"
  ls "$dir/x/lib/modules"
}
make_initrd() {  # $1 package, $2 kernel release, $3 output suffix, $4... modules
  local tree="$WORK/k-$1/x" kver=$2 suffix=$3; shift 3
  depmod -b "$tree" "$kver"
  busybox_initrd "$tree" "$kver" "$HERE/initrd-init" "$OUT/initrd$suffix.img" "$@"
  cp "$tree/boot/vmlinuz-$kver" "$OUT/vmlinuz$suffix"
}
cp /etc/resolv.conf "$WORK/rootfs/etc/resolv.conf" 2>/dev/null || true
chroot "$WORK/rootfs" apt-get -q update >/dev/null
step "kernel cloud: linux-image-cloud-amd64 (virtio)"
KVER=$(fetch_kernel linux-image-cloud-amd64)
make_initrd linux-image-cloud-amd64 "$KVER" "" virtio_pci virtio_blk virtio_net virtio_rng
# The default guest boots its kernel ELF through QEMU's PVH entry: no real-mode setup, no decompression
# under TCG (0.3-0.4 s). The full kernel stays a bzImage: it boots under KVM in the virtual host, where
# unpacking is quick and a 65 MB vmlinux would cross 9p.
rc=0; python3 "$HERE/pvh_vmlinux.py" "$OUT/vmlinuz" "$OUT/vmlinux" || rc=$?
case $rc in
  0) ;;
  3) step "kernel cloud: no PVH entry; the guest boots the bzImage (slower under TCG)" ;;
  *) exit 1 ;;
esac
step "kernel full: linux-image-amd64 (virtio, nvme, igb, igbvf, e1000e)"
KVER_FULL=$(fetch_kernel linux-image-amd64)
make_initrd linux-image-amd64 "$KVER_FULL" "-full" virtio_pci virtio_blk virtio_net virtio_rng ext4 \
  crc32c_generic nvme igb igbvf e1000e

step "rootfs: busybox init, dropbear with its key on tmpfs, read-only root"
R="$WORK/rootfs"
install -m 0755 "$HERE/guest-setup" "$R/usr/local/sbin/cpr-guest-setup"
install -m 0644 "$HERE/inittab" "$R/etc/inittab"
install -m 0644 "$HERE/fstab" "$R/etc/fstab"
rm -f "$R"/etc/dropbear/*_host_key "$R/etc/resolv.conf"   # host keys are made at boot, never shipped
echo cprguest > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 cprguest\n' > "$R/etc/hosts"
: > "$R/etc/machine-id"
chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' > "$OUT/packages.txt"
cat "$OUT/kernels.txt" >> "$OUT/packages.txt"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/usr/share/doc "$R"/usr/share/man "$R"/usr/share/locale
mke2fs -q -t ext4 -L cprroot -d "$R" "$OUT/rootfs.img" "$ROOTFS_SIZE"
printf '%s\n%s\n' "$KVER" "$KVER_FULL" > "$OUT/kernel-release"
rm -rf "$WORK"
step "done: $(du -sh --apparent-size "$OUT" | cut -f1)"
