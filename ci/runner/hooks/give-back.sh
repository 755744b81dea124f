#!/usr/bin/env bash
# give-back.sh DIR...: as root, give folders of the runner's work tree (the job's workspace and
# RUNNER_TEMP, where tests run as root leave root's files) back to the owner of that work tree, so
# the next checkout can delete them. The only chown the runner user may run through sudo
# (setup-host.sh's sudoers file), so it accepts nothing outside the work tree setup-host.sh wrote
# into <hooks dir>/runner-work, and follows no symlink.
set -euo pipefail
HOOKS_DIR=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
[ -f "$HOOKS_DIR/runner-work" ] || { echo "give-back: $HOOKS_DIR/runner-work is missing: run setup-host.sh --runner-dir DIR" >&2; exit 2; }
read -r WORK < "$HOOKS_DIR/runner-work"
WORK=$(readlink -f -- "$WORK")
OWNER=$(stat -c '%u:%g' -- "$WORK")
rc=0
for dir in "$@"; do
  real=$(readlink -f -- "$dir") || real=""
  if [ -z "$real" ] || [ -L "$dir" ] || [ ! -d "$real" ] || [[ $real != "$WORK"/* ]]; then
    echo "give-back: $dir is not a folder inside the runner's work tree $WORK: left alone" >&2; rc=1; continue
  fi
  chown -R -P -- "$OWNER" "$real" || rc=1
done
exit "$rc"
