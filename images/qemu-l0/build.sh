#!/usr/bin/env bash
# The QEMU that runs the virtual host (L1) under TCG: Debian's QEMU source (trixie's, 10.0.x) built for
# x86_64 system emulation only, with our fixes of two TCG races that kill the nested guests
# (docs/virtual-host.md, "The emulator's races"): ignne-hflags2.patch (another vCPU's thread writes back
# CPU 0's stale SVM flags; 10.0.13 and 11.1.3 have it) and virq-bql.patch (VMRUN sets an interrupt bit
# without the BQL and can lose the APIC's; fixed upstream in 10.2 by atomic interrupt_request). Called by `cpr-image build qemu-l0` with OUT set; writes
# OUT/bin/qemu-system-x86_64 (a wrapper that adds the firmware paths of the host's packages) and
# OUT/libexec/qemu-system-x86_64 (the build). Needs the host's build tools and libraries
# (ci/bootstrap.sh installs them) and meson 1.5 from PyPI (the +ds source has no python/wheels).
set -euo pipefail
: "${OUT:?OUT must name the staging directory}"
SUITE=${CPR_QEMU_L0_SUITE:-trixie}
FIX=${CPR_QEMU_L0_FIX:-1}  # 1: both fixes; 0: neither (the races' reproducer, with the probes); ignne: only the first
PROBES=${CPR_QEMU_L0_PROBES:-0}  # 1: also probes.patch (what found the race; off at run time without CPR_WALK_CHECK)
MIRROR=${CPR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")" && pwd)
step() { printf '[qemu-l0 %(%H:%M:%S)T] %s\n' -1 "$*"; }
for tool in gcc ninja pkg-config python3 dpkg-source patch; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install build-essential ninja-build pkg-config" \
    "python3-venv dpkg-dev patch)" >&2; exit 2; }
done
for lib in glib-2.0 pixman-1 libcap-ng /usr/include/libfdt.h /usr/include/attr/libattr.h; do
  case "$lib" in /*) [ -f "$lib" ] ;; *) pkg-config --exists "$lib" ;; esac ||
    { echo "missing library: $lib (apt-get install libglib2.0-dev libpixman-1-dev libfdt-dev libattr1-dev" \
      "libcap-ng-dev)" >&2; exit 2; }
done
WORK=$(mktemp -d /var/tmp/cpr-qemu-l0.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/archives/partial"

# apt with a private source list and state: only the source package is fetched (signatures checked
# against Debian's archive keyring) and unpacked with Debian's patches; nothing is installed
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" > "$WORK/apt/sources.list"
APT=(apt-get -q -o "Dir::Etc::SourceList=$WORK/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache::Archives=$WORK/apt/archives"
     -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root)
step "qemu source from $SUITE"
"${APT[@]}" update >/dev/null
(cd "$WORK" && "${APT[@]}" source qemu >/dev/null 2>&1)
S=$(ls -d "$WORK"/qemu-[0-9]*/ | head -1)
S=${S%/}
basename "$S" | sed 's/^qemu-/qemu /' > "$OUT/source-package"
case "$FIX" in
  1) FIXES="ignne-hflags2 virq-bql" ;;
  ignne) FIXES="ignne-hflags2" ;;
  0) FIXES="" ;;
  *) echo "CPR_QEMU_L0_FIX=$FIX: use 1 (both fixes), ignne (only ignne-hflags2.patch) or 0 (none)" >&2; exit 2 ;;
esac
for fix in $FIXES; do
  step "  $(head -1 "$OUT/source-package"), patched: $fix.patch"
  patch -s -d "$S" -p1 < "$HERE/$fix.patch"
done
if [ "$FIX" != 1 ]; then
  step "  $(head -1 "$OUT/source-package"), NOT fully fixed (CPR_QEMU_L0_FIX=$FIX: a build that shows the races)"
  echo "fixes: ${FIXES:-none}" >> "$OUT/source-package"
fi
if [ "$PROBES" = 1 ]; then
  step "  and probes.patch (CPR_QEMU_L0_PROBES=1)"
  patch -s -d "$S" -p1 < "$HERE/probes.patch"
fi

step "meson 1.5 (PyPI) in a private virtualenv"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q meson==1.5.0 pycotap==1.3.1 2>&1 | grep -v '^WARNING: Location' || true
"$WORK/venv/bin/python" -c 'import mesonbuild' || { echo "meson did not install from PyPI" >&2; exit 1; }

step "configure: x86_64-softmmu, TCG and KVM, 9p, nothing else"
mkdir -p "$S/build"
(cd "$S/build" && ../configure --python="$WORK/venv/bin/python3" --target-list=x86_64-softmmu \
  --without-default-features --enable-tcg --enable-kvm --enable-virtfs --enable-attr --enable-cap-ng \
  --enable-fdt=system --disable-install-blobs --disable-werror --disable-docs >"$WORK/configure.log" 2>&1) \
  || { tail -30 "$WORK/configure.log" >&2; exit 1; }
step "build ($(nproc) jobs)"
ninja -C "$S/build" -j"$(nproc)" qemu-system-x86_64 >"$WORK/ninja.log" 2>&1 || { tail -30 "$WORK/ninja.log" >&2; exit 1; }
mkdir -p "$OUT/bin" "$OUT/libexec"
install -m 0755 "$S/build/qemu-system-x86_64" "$OUT/libexec/qemu-system-x86_64"
cat > "$OUT/bin/qemu-system-x86_64" <<'WRAP'
#!/bin/sh
# QEMU built next to this script (images/qemu-l0), with the firmware of the host's packages
# (seabios, qemu-system-data, ipxe-qemu)
here=$(cd "$(dirname "$0")/.." && pwd)
exec "$here/libexec/qemu-system-x86_64" -L /usr/share/seabios -L /usr/share/qemu -L /usr/lib/ipxe/qemu "$@"
WRAP
chmod +x "$OUT/bin/qemu-system-x86_64"
"$OUT/bin/qemu-system-x86_64" --version | head -1
step "done: $(cat "$OUT/source-package")"
