#!/usr/bin/env bash
# Build the virtual hardware host (tier 2 "L1") image from Debian packages and PyPI wheels only: no
# loop mounts, nothing downloaded at test time. Called by `cpr-image build vhost` with OUT set to
# an empty staging directory; writes there:
#   vmlinuz, initrd.img   trixie-backports kernel + busybox initrd (virtio, ext4), boots to /sbin/cpr-vhost-init
#   rootfs.img            ext4: Debian trixie, QEMU from trixie-backports, /opt/cpr-venv (pytest & co.)
#   packages.txt, kernel-release, qemu-version
set -euo pipefail
: "${OUT:?OUT must name the staging directory}"
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/../lib/initrd.sh"
. "$HERE/../lib/debootstrap.sh"
SUITE=trixie
MIRROR=${CPR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=kmod,pciutils,iproute2,iputils-ping,procps,python3,python3-venv,ca-certificates,util-linux,bash
ROOTFS_SIZE=${CPR_VHOST_ROOTFS_SIZE:-3G}
WORK="$OUT/work"
R="$WORK/rootfs"
T0=$SECONDS
step() { printf '[vhost-image %(%H:%M:%S)T +%ss] %s\n' -1 "$((SECONDS - T0))" "$*"; }
# Commands inside the rootfs run in a private mount namespace: /proc is mounted there and vanishes
# with the namespace, so a killed build leaves no mount behind.
in_root() { unshare --mount --propagation private sh -c 'mount -t proc proc "$0/proc" && exec chroot "$@"' "$R" "$R" "$@"; }

for tool in debootstrap mke2fs busybox cpio depmod modprobe unshare dpkg-deb xz zstd; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install debootstrap e2fsprogs busybox-static cpio kmod xz-utils zstd)" >&2; exit 2; }
done
mkdir -p "$R"

step "debootstrap $SUITE minbase with $PACKAGES"
signed_debootstrap "$SUITE" "$R" "$MIRROR" --variant=minbase --include="$PACKAGES"
[ -x "$R/usr/bin/python3" ] || { echo "debootstrap failed: no python3 in rootfs" >&2; exit 1; }

cat > "$R/etc/apt/sources.list.d/trixie-backports.sources" <<EOS
Types: deb
URIs: $MIRROR
Suites: trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
cp /etc/resolv.conf "$R/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
in_root apt-get -q update >/dev/null

step "QEMU from trixie-backports (VFIO cpr-transfer needs >= 10.1)"
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  -t trixie-backports qemu-system-x86 seabios ipxe-qemu | awk '/^(Setting up|Unpacking) (qemu-system-x86|seabios)/'
QEMU_VERSION=$(in_root qemu-system-x86_64 --version | head -1)
step "  $QEMU_VERSION"

# The kernel packages are unpacked, not installed: installing would run initramfs-tools, and L1 boots
# with our own busybox initrd anyway. trixie-backports splits the kernel into linux-image-<abi>
# (a meta package) plus linux-binary-<abi> (vmlinuz), linux-modules-<abi> and linux-base-<abi>.
step "kernel from trixie-backports (linux-image-amd64), unpacked"
KPKG=$(in_root apt-cache -t trixie-backports depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
PARTS=$(in_root apt-cache -t trixie-backports depends "$KPKG" \
  | awk '$1=="Depends:" && $2 ~ /^linux-(binary|modules|base)-/ {print $2}' | sort -u | tr '\n' ' ')
in_root sh -c "cd /tmp && apt-get -q -t trixie-backports download $KPKG $PARTS" >/dev/null
for deb in "$R"/tmp/linux-*.deb; do
  # tar keeps the merged-/usr symlinks (/lib -> usr/lib) of the rootfs intact
  dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$R"
  echo "$(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)" >> "$OUT/kernel-packages"
done
rm -f "$R"/tmp/linux-*.deb
KVER=$(ls "$R/usr/lib/modules" | sort -V | tail -1)
VMLINUZ=$(ls "$R/usr/lib/modules/$KVER/vmlinuz" "$R/boot/vmlinuz-$KVER" 2>/dev/null | head -1 || true)
[ -n "$VMLINUZ" ] || { echo "no vmlinuz for $KVER in $KPKG $PARTS" >&2; exit 1; }
M="$R/usr/lib/modules/$KVER/kernel"
rm -rf "$M/drivers/gpu" "$M/sound" "$M/drivers/net/wireless" "$M/drivers/media" "$M/drivers/infiniband" \
  "$M/drivers/staging" "$M/drivers/bluetooth" "$M/drivers/usb" "$M/drivers/hid" "$M/drivers/iio" "$M/drivers/isdn"
depmod -b "$R" "$KVER"
step "  kernel $KVER ($KPKG)"

step "python venv /opt/cpr-venv from PyPI: $(grep -v '^#' "$HERE/requirements.txt" | tr '\n' ' ')"
cp "$HERE/requirements.txt" "$R/tmp/requirements.txt"
in_root python3 -m venv /opt/cpr-venv
# pip in the chroot trusts what this machine trusts (a site proxy may re-sign PyPI's TLS): the
# rootfs's CA bundle is swapped for this machine's during the install only.
CA="$R/etc/ssl/certs/ca-certificates.crt"
cp "$CA" "$WORK/ca-rootfs.crt"
cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$CA"
in_root env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
  /opt/cpr-venv/bin/pip install -q --no-cache-dir --only-binary=:all: -r /tmp/requirements.txt
cp "$WORK/ca-rootfs.crt" "$CA"
rm -f "$R/tmp/requirements.txt"
# The project comes from the working tree shared into L1 at /mnt/src: a .pth puts it on sys.path and
# a dist-info registers the pytest11 entry point, exactly as an installed pytest-cpr would.
SITE=$(in_root /opt/cpr-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo /mnt/src > "$R$SITE/cpr-vhost-src.pth"
mkdir -p "$R$SITE/pytest_cpr-0.0.0+vhost.dist-info"
printf 'Metadata-Version: 2.1\nName: pytest-cpr\nVersion: 0.0.0+vhost\n' > "$R$SITE/pytest_cpr-0.0.0+vhost.dist-info/METADATA"
printf '[pytest11]\ncpr = pytest_cpr.plugin\n' > "$R$SITE/pytest_cpr-0.0.0+vhost.dist-info/entry_points.txt"
: > "$R$SITE/pytest_cpr-0.0.0+vhost.dist-info/RECORD"
in_root /opt/cpr-venv/bin/pip freeze > "$OUT/python-packages.txt"

step "initrd: busybox + virtio/ext4 modules, switch_root to /sbin/cpr-vhost-init"
busybox_initrd "$R" "$KVER" "$HERE/initrd-init" "$OUT/initrd.img" virtio_pci virtio_blk ext4
cp "$VMLINUZ" "$OUT/vmlinuz"

step "rootfs: init, agent, image"
install -m 0755 "$HERE/vhost-init" "$R/sbin/cpr-vhost-init"
install -m 0755 "$HERE/vhost-agent" "$R/sbin/cpr-vhost-agent"
mkdir -p "$R/mnt/src" "$R/mnt/guest" "$R/mnt/out"
echo cprvhost > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 cprvhost\n' > "$R/etc/hosts"
: > "$R/etc/machine-id"
rm -f "$R/usr/sbin/policy-rc.d" "$R/etc/resolv.conf"
in_root dpkg-query -W -f '${Package} ${Version}\n' > "$OUT/packages.txt"
cat "$OUT/kernel-packages" >> "$OUT/packages.txt"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/usr/share/doc "$R"/usr/share/man \
  "$R"/usr/share/locale "$R"/boot/* "$R/usr/lib/modules/$KVER/vmlinuz"
mke2fs -q -t ext4 -L cprvhost -d "$R" "$OUT/rootfs.img" "$ROOTFS_SIZE"
echo "$KVER" > "$OUT/kernel-release"
echo "$QEMU_VERSION" > "$OUT/qemu-version"
rm -rf "$WORK"
step "done: $(du -sh --apparent-size "$OUT" | cut -f1) apparent, $(du -sh "$OUT" | cut -f1) on disk"
