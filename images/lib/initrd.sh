# Shared by the image recipes (sourced; part of every recipe's hash).
# busybox_initrd TREE KVER INIT OUT MODULE...: a busybox initrd at OUT whose /init is INIT and whose
# /lib/mods holds MODULE... and their dependencies (from TREE's /lib/modules/KVER, decompressed) in
# load order, listed in /lib/mods/order.
busybox_initrd() {
  local tree=$1 kver=$2 init=$3 out=$4 dir
  shift 4
  dir=$(mktemp -d)
  mkdir -p "$dir"/{bin,dev,proc,sys,newroot,lib/mods}
  cp "$(command -v busybox)" "$dir/bin/busybox"
  for m in "$@"; do
    modprobe -d "$tree" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' | while read -r f; do
    b=$(basename "$f"); b=${b%.xz}; b=${b%.zst}
    case $f in *.xz) xz -dc "$f" ;; *.zst) zstd -qdc "$f" ;; *) cat "$f" ;; esac > "$dir/lib/mods/$b"
    echo "$b" >> "$dir/lib/mods/order"
  done
  install -m 0755 "$init" "$dir/init"
  (cd "$dir" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
  rm -rf "$dir"
}
