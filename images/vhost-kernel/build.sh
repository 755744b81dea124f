#!/usr/bin/env bash
# The virtual host's iommufd-capable kernel: Debian's kernel source (linux-source-<series> from
# trixie-backports, the same series as the vhost image's distro kernel) built with cpr.config on top
# of x86_64 defconfig + kvm_guest.config. Debian builds without CONFIG_IOMMUFD and
# CONFIG_VFIO_DEVICE_CDEV, so its kernel has no /dev/iommu. Everything is built in (no modules): the
# vhost initrd and init find nothing to load and carry on.
# Called by `cpr-image build vhost-kernel` with OUT set; writes OUT/vmlinuz, OUT/config,
# OUT/kernel-release, OUT/source-package. Takes 12-20 min of two cores: cached by recipe hash, so it
# is rebuilt only when this folder (or images/lib) changes.
set -euo pipefail
: "${OUT:?OUT must name the staging directory}"
HERE=$(cd "$(dirname "$0")" && pwd)
MIRROR=${CPR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${CPR_VHOST_KERNEL_SUITE:-trixie-backports}
SERIES=${CPR_VHOST_KERNEL_SERIES:-7.3}
JOBS=${CPR_KERNEL_JOBS:-$(nproc)}
WORK="$OUT/work"
T0=$SECONDS
step() { printf '[vhost-kernel %(%H:%M:%S)T +%ss] %s\n' -1 "$((SECONDS - T0))" "$*"; }

for tool in gcc make bison flex bc perl xz apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install build-essential bc bison flex libelf-dev libssl-dev xz-utils)" >&2; exit 2; }
done
for header in /usr/include/libelf.h /usr/include/openssl/ssl.h; do
  [ -f "$header" ] || { echo "missing $header (apt-get install libelf-dev libssl-dev)" >&2; exit 2; }
done
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/archives/partial"

# apt with a private source list and state: the source package is only downloaded (signature checked
# against Debian's archive keyring), nothing from another suite is installed on this host.
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" > "$WORK/apt/sources.list"
APT=(apt-get -q -o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache::Archives=$WORK/apt/archives"
     -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Architecture=amd64
     -o APT::Sandbox::User=root)
step "linux-source-$SERIES from $SUITE"
"${APT[@]}" update >/dev/null
(cd "$WORK" && "${APT[@]}" download "linux-source-$SERIES" >/dev/null)
DEB=$(ls "$WORK"/linux-source-"$SERIES"_*.deb)
echo "$(dpkg-deb -f "$DEB" Package) $(dpkg-deb -f "$DEB" Version)" > "$OUT/source-package"
step "  $(cat "$OUT/source-package")"
dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$WORK" --wildcards '*.tar.xz'
rm -f "$DEB"
tar -xf "$WORK"/usr/src/linux-source-"$SERIES".tar.xz -C "$WORK"
rm -rf "$WORK/usr"
S="$WORK/linux-source-$SERIES"

step "configure: defconfig + kvm_guest.config + cpr.config"
make -C "$S" -s defconfig
make -C "$S" -s kvm_guest.config
"$S/scripts/kconfig/merge_config.sh" -m -O "$S" "$S/.config" "$HERE/cpr.config" >/dev/null
make -C "$S" -s olddefconfig
# every line of cpr.config must have survived olddefconfig (a renamed or unmet option fails here)
missing=0
while read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qx "$line" "$S/.config" || { echo "  cpr.config: $line did not stick" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set") sym=${line#\# }; sym=${sym%% *}
      if grep -q "^$sym=" "$S/.config"; then echo "  cpr.config: $sym should be off" >&2; missing=1; fi ;;
  esac
done < "$HERE/cpr.config"
[ "$missing" = 0 ] || exit 1

step "build bzImage with $JOBS jobs (12-20 min on two cores)"
nice -n "${CPR_KERNEL_NICE:-5}" make -C "$S" -s -j"$JOBS" bzImage 2>&1 | awk '!/^  /'
[ -f "$S/arch/x86/boot/bzImage" ] || { echo "kernel build failed (no bzImage)" >&2; exit 1; }
cp "$S/arch/x86/boot/bzImage" "$OUT/vmlinuz"
cp "$S/.config" "$OUT/config"
make -C "$S" -s kernelrelease > "$OUT/kernel-release"
rm -rf "$WORK"
step "done: kernel $(cat "$OUT/kernel-release"), $(du -h "$OUT/vmlinuz" | cut -f1)"
