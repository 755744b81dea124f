# shellcheck shell=bash
# Shared by the image recipes (sourced; part of every recipe's hash).
# signed_debootstrap SUITE TARGET MIRROR [debootstrap option...]: debootstrap that checks the Release
# file's signature against the Debian archive keyring (CPR_DEBIAN_KEYRING) and stops when it cannot
# (--force-check-gpg: no "Cannot check Release signature" warning and carrying on). Its progress is
# thinned out (I: lines); everything else it says (W:, E:, gpgv's and wget's lines) and its exit status
# are kept.
signed_debootstrap() {
  local - suite=$1 target=$2 mirror=$3 keyring=${CPR_DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
  shift 3
  set -o pipefail
  if [ ! -r "$keyring" ]; then
    echo "no Debian archive keyring at $keyring: apt-get install debian-archive-keyring (or set CPR_DEBIAN_KEYRING)" >&2
    return 2
  fi
  command -v gpgv >/dev/null || { echo "missing tool: gpgv (apt-get install gpgv): debootstrap checks signatures with it" >&2; return 2; }
  if debootstrap --keyring="$keyring" --force-check-gpg "$@" "$suite" "$target" "$mirror" 2>&1 \
    | awk '/^I: / { if (/^I: (Retrieving|Validating|Extracting|Installing|Configuring|Base system)/ &&
                         (n++ % 25 == 0 || /Base system/) || /^I: Valid Release signature/) { print "  " $0; fflush() }; next }
           /^P: / { next }
           { print "  " $0; fflush() }'; then
    return 0
  fi
  echo "debootstrap of $suite from $mirror failed (see its E: lines above)" >&2
  return 1
}
