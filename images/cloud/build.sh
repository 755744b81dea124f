#!/usr/bin/env bash
# A distribution cloud image, laid out as Debian lays out its own (debian-cloud-images): a GPT disk
# with a BIOS boot partition and an ext4 root, GRUB from the image's own grub-pc-bin, Debian's cloud
# kernel with its initramfs-tools initramfs, cloud-init limited to the NoCloud datasource, and no
# user, password, SSH key, host key, machine id or network configuration in it: all of that comes
# from the seed at first boot.
# Called by `cpr-image build cloud` with OUT set to an empty staging directory; writes disk.qcow2
# and packages.txt there. Boot it with --cpr-user-image $(cpr-image path cloud)/disk.qcow2.
#
# How, and why not an image builder: diskimage-builder (PyPI) maps partitions with kpartx, and
# grub-install/update-grub (as FAI and mkosi run them) want the root partition as a block device;
# this kernel has neither device-mapper nor partitions on loop devices. So the tree is made by
# mmdebstrap (Debian's apt-based bootstrapper), written into the root partition by `mke2fs -d`, and
# GRUB's core image is made by the image's own grub-mkimage and placed as grub-install's BIOS setup
# places it: no loop device, no mount.
set -euo pipefail
: "${OUT:?OUT must name the staging directory}"
SUITE=${CPR_CLOUD_SUITE:-bookworm}
MIRROR=${CPR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# what a Debian genericcloud image has for booting and first-boot configuration, no more
PACKAGES=systemd-sysv,udev,linux-image-cloud-amd64,initramfs-tools,grub-pc-bin,grub2-common,cloud-init
PACKAGES+=,openssh-server,ifupdown,iproute2,iputils-ping,procps,netbase,e2fsprogs
DISK_SIZE=${CPR_CLOUD_DISK_SIZE:-2G}
WORK="$OUT/work"
step() { printf '[cloud-image %(%H:%M:%S)T] %s\n' -1 "$*"; }

for tool in mmdebstrap mke2fs sgdisk qemu-img; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install mmdebstrap e2fsprogs gdisk qemu-utils)" >&2; exit 2; }
done
R="$WORK/rootfs"
mkdir -p "$R"
trap 'rm -rf "$WORK"' EXIT

step "mmdebstrap $SUITE minbase with $PACKAGES"
mmdebstrap --variant=minbase --include="$PACKAGES" --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  "$SUITE" "$R" "$MIRROR" 2>&1 | grep -E --line-buffered '^I: (running|downloading|installing|extracting|cleaning)' \
  | sed -u 's/^/  /' || true
[ -x "$R/usr/sbin/sshd" ] && [ -x "$R/usr/bin/cloud-init" ] || { echo "mmdebstrap failed: no sshd or cloud-init" >&2; exit 1; }

step "configure: cloud-init NoCloud only, serial console, nothing of a machine's identity"
install -m 0644 /dev/stdin "$R/etc/cloud/cloud.cfg.d/90_dpkg.cfg" <<'EOF'
# the datasources cloud-init looks for (Debian's debconf question cloud-init/datasources)
datasource_list: [ NoCloud, None ]
EOF
install -m 0644 /dev/stdin "$R/etc/cloud/cloud.cfg.d/91_locale.cfg" <<'EOF'
# C.UTF-8 (built into glibc, nothing to generate) as the system locale: cc_locale's en_US.UTF-8
# default runs locale-gen at first boot (slow under TCG) and failed here (update-locale: invalid
# locale settings)
locale: C.UTF-8
EOF
install -m 0644 /dev/stdin "$R/etc/fstab" <<'EOF'
LABEL=cloudroot / ext4 rw,discard,errors=remount-ro 0 1
EOF
install -m 0644 /dev/stdin "$R/etc/network/interfaces" <<'EOF'
# cloud-init writes the NICs' configuration to interfaces.d from the seed's network-config
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
EOF
mkdir -p "$R/etc/default/grub.d"
install -m 0644 /dev/stdin "$R/etc/default/grub.d/10_cloud.cfg" <<'EOF'
# as Debian's cloud images: kernel and GRUB on the serial console, no menu wait
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"
GRUB_TIMEOUT=0
GRUB_TERMINAL="serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
[ -f "$R/etc/default/grub" ] || cp "$R/usr/share/grub/default/grub" "$R/etc/default/grub"
rm -f "$R"/etc/ssh/ssh_host_*        # host keys come from the seed (or are made at first boot)
: > "$R/etc/machine-id"; rm -f "$R/var/lib/dbus/machine-id"   # made at first boot
echo localhost > "$R/etc/hostname"
rm -f "$R/etc/resolv.conf"
chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' > "$OUT/packages.txt"
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/var/log/*.log

step "bootloader: GRUB (i386-pc) from the image's own grub-pc-bin, configured as update-grub does"
KVER=$(basename "$(ls "$R"/boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1)"); KVER=${KVER#vmlinuz-}
UUID=$(cat /proc/sys/kernel/random/uuid)
mkdir -p "$R/boot/grub/i386-pc"
cp "$R"/usr/lib/grub/i386-pc/*.mod "$R"/usr/lib/grub/i386-pc/*.lst "$R/boot/grub/i386-pc/"
install -m 0644 /dev/stdin "$R/boot/grub/grub.cfg" <<EOF
# as update-grub writes it from /etc/default/grub{,.d} (run in the guest, it rewrites this file the
# same way; at build time its device probe has no block device to find)
serial --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root $UUID
menuentry 'Debian GNU/Linux' {
	echo 'Loading Linux $KVER ...'
	linux /boot/vmlinuz-$KVER root=UUID=$UUID ro console=tty0 console=ttyS0,115200
	echo 'Loading initial ramdisk ...'
	initrd /boot/initrd.img-$KVER
}
EOF
printf 'search.fs_uuid %s root\nset prefix=($root)/boot/grub\n' "$UUID" > "$R/tmp/load.cfg"
chroot "$R" grub-mkimage -O i386-pc -c /tmp/load.cfg -p /boot/grub -o /tmp/core.img biosdisk part_gpt ext2 search_fs_uuid
mv "$R/tmp/core.img" "$WORK/core.img"; rm -f "$R/tmp/load.cfg"

step "disk: GPT (BIOS boot partition 14, ext4 root partition 1), $DISK_SIZE, written without loop devices"
truncate -s "$DISK_SIZE" "$WORK/disk.raw"
sgdisk -a 2048 -n 14:2048:+1M -t 14:EF02 -c 14:bios -n 1:0:0 -t 1:8300 -c 1:root "$WORK/disk.raw" >/dev/null
read -r START END < <(sgdisk -i 1 "$WORK/disk.raw" | awk '/^First sector/{s=$3} /^Last sector/{e=$3} END{print s, e}')
mke2fs -q -t ext4 -L cloudroot -U "$UUID" -d "$R" "$WORK/root.img" "$(( (END - START + 1) / 2 ))k"
dd if="$WORK/root.img" of="$WORK/disk.raw" bs=1M oflag=seek_bytes seek=$(( START * 512 )) conv=notrunc,sparse status=none
rm -f "$WORK/root.img"
# What grub-install's BIOS setup does (it wants block devices, and this kernel makes no partitions
# of a loop device): core.img at the BIOS boot partition's first sector, its blocklist naming the
# next sector, and boot.img's code (440 bytes: the protective MBR's partition table stays) loading it.
le64() { printf "$(printf '%016x' "$1" | sed -E 's/(..)(..)(..)(..)(..)(..)(..)(..)/\\x\8\\x\7\\x\6\\x\5\\x\4\\x\3\\x\2\\x\1/')"; }
CORE=$(sgdisk -i 14 "$WORK/disk.raw" | awk '/^First sector/{print $3}')
dd if="$WORK/core.img" of="$WORK/disk.raw" bs=512 seek="$CORE" conv=notrunc status=none
le64 $(( CORE + 1 )) | dd of="$WORK/disk.raw" bs=1 seek=$(( CORE * 512 + 0x1f4 )) conv=notrunc status=none
dd if="$R/usr/lib/grub/i386-pc/boot.img" of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
le64 "$CORE" | dd of="$WORK/disk.raw" bs=1 seek=$(( 0x5c )) conv=notrunc status=none

step "qcow2"
qemu-img convert -O qcow2 "$WORK/disk.raw" "$OUT/disk.qcow2"
step "done: $(du -h "$OUT/disk.qcow2" | cut -f1) on disk, $DISK_SIZE virtual, kernel $KVER"
