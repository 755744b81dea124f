"""Guest images: built from a recipe under images/<name>/ (in a wheel: pytest_cpr/recipes/<name>/),
cached by a hash of the recipe and of the settings it reads (mirror, suite, ...).

Tests only ever use a cached image; building is a separate command
(`cpr-image build guest`, or `python -m pytest_cpr.images build guest`). One build per image name at
a time (a file lock); each entry's manifest holds the sha256 of every file, checked before use (a
stamp of size, mtime, ctime and inode spares re-hashing unchanged files); `cpr-image prune` removes
old entries. Root runs what the cache holds, so its folders must be private to their owner.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pytest_cpr import leftovers
from pytest_cpr.errors import CprSettingError
from pytest_cpr.progress import heartbeat

PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"  # an installed wheel
CHECKOUT_RECIPES = Path(__file__).resolve().parent.parent / "images"  # a checkout (editable install)
REPO_IMAGES = PACKAGED_RECIPES if PACKAGED_RECIPES.is_dir() else CHECKOUT_RECIPES
IMAGE_FILES = ("vmlinuz", "initrd.img", "rootfs.img")
MANIFEST, STAMP = "manifest.json", ".verified.json"
BUILD_LOCK_WAIT = 3 * 3600.0  # seconds a build waits for another build of the same image (a kernel: ~11 min)
KEEP = 2  # entries per image that `cpr-image prune` keeps by default
# settings a recipe reads that change how it builds, not what it builds
NOT_RECIPE_INPUTS = frozenset({"CPR_KERNEL_JOBS", "CPR_KERNEL_NICE"})
_SETTING = re.compile(r"\$\{(CPR_[A-Z0-9_]+)(?::-([^}]*))?\}")
_ENTRY = re.compile(r"^(?P<name>[a-z0-9-]+)-(?P<hash>[0-9a-f]{16})$")


def default_cache_dir() -> Path:
    """$CPR_CACHE_DIR, else the cache_dir setting's default (~/.cache/pytest-cpr)."""
    from pytest_cpr.settings import BY_KEY

    return Path(os.environ.get("CPR_CACHE_DIR") or str(BY_KEY["cache_dir"].default))


def recipe_dir(name: str, images_dir: Path = REPO_IMAGES) -> Path:
    path = images_dir / name
    if not (path / "build.sh").is_file():
        raise CprSettingError(f"no image recipe {path}/build.sh: image names are the folders of {images_dir}")
    return path


def _recipe_files(path: Path) -> list[Path]:
    """The recipe's files, those of the recipes its `extends` file names (one a line: their build.sh
    runs with other settings, e.g. qemu-forky through qemu-next) and the shared images/lib."""
    extends = path / "extends"
    bases = extends.read_text().split() if extends.is_file() else []
    return [f for root in (path, *(recipe_dir(b, path.parent) for b in bases), path.parent / "lib")
            for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)]


def recipe_inputs(path: Path) -> dict[str, str]:
    """The settings the recipe's scripts read (`${CPR_X:-default}`: the Debian mirror, suites, sizes),
    each with the value a build uses now: the environment's, else the script's default."""
    found: dict[str, str] = {}
    for f in _recipe_files(path):
        for m in _SETTING.finditer(f.read_text(errors="replace")):
            if m.group(1) not in NOT_RECIPE_INPUTS:
                found.setdefault(m.group(1), os.environ.get(m.group(1)) or m.group(2) or "")
    return dict(sorted(found.items()))


def recipe_hash(path: Path) -> str:
    """sha256 over every file of the recipe and of the shared images/lib (names and contents) and the
    settings they read (recipe_inputs), 16 hex digits: another mirror or suite is another entry."""
    digest = hashlib.sha256()
    for f in _recipe_files(path):
        digest.update(str(f.relative_to(path.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
    digest.update(b"inputs\0" + json.dumps(recipe_inputs(path)).encode())
    return digest.hexdigest()[:16]


def cached_path(name: str, cache_dir: Path, images_dir: Path = REPO_IMAGES) -> Path:
    return cache_dir / "images" / f"{name}-{recipe_hash(recipe_dir(name, images_dir))}"


def guest_image_dir(explicit: str | None, cache_dir: Path) -> Path:
    """The guest image directory: the one given (--cpr-image / CPR_IMAGE), else the cached build of
    the current images/guest recipe."""
    return Path(explicit) if explicit else cached_path("guest", cache_dir)


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    manifest: dict[str, object]

    def boot_files(self, flavor: str = "cloud", pvh: bool = True) -> tuple[Path, Path]:
        """(kernel, initrd) of a kernel flavour: "cloud" (virtio only, fastest boot: booted as an ELF through
        its PVH entry when the image has one and `pvh`) or "full" (Debian's generic kernel with NVMe,
        igb/igbvf and e1000e drivers, for passthrough guests). A guest that suspends to RAM needs
        pvh=False: Debian's kernel booted through PVH did not wake from S3 in QEMU 11.1.3 (SeaBIOS),
        the bzImage did (tests/integration/test_modes.py, cpr-reboot with suspend)."""
        if flavor == "cloud":
            elf = self.directory / "vmlinux"
            return (elf if pvh and elf.is_file() else self.kernel), self.initrd
        if flavor == "full":
            kernel, initrd = self.directory / "vmlinuz-full", self.directory / "initrd-full.img"
            if kernel.is_file() and initrd.is_file():
                return kernel, initrd
            raise CprSettingError(f"guest image {self.directory} has no 'full' kernel (vmlinuz-full): rebuild "
                                  "it with `cpr-image build guest --force`")
        raise CprSettingError(f"unknown kernel flavour {flavor!r}: use cloud or full")

    @classmethod
    def load(cls, directory: Path, setting: str = "--cpr-image") -> GuestImage:
        """Validate an image directory; every problem names the setting and the fix."""
        if not directory.is_dir():
            raise CprSettingError(f"{setting}: guest image {directory} does not exist; build it with "
                                  f"`cpr-image build guest` or point {setting} at a built image")
        for f in IMAGE_FILES:
            p = directory / f
            if not p.is_file() or p.stat().st_size == 0:
                raise CprSettingError(f"{setting}: guest image {directory} has no {f} (incomplete or corrupt "
                                      f"build); rebuild with `cpr-image build guest --force`")
        with (directory / "rootfs.img").open("rb") as fh:
            fh.seek(1024 + 56)
            if fh.read(2) != b"\x53\xef":
                raise CprSettingError(f"{setting}: {directory}/rootfs.img is not an ext4 image (corrupt); "
                                      "rebuild with `cpr-image build guest --force`")
        with (directory / "vmlinuz").open("rb") as fh:
            fh.seek(0x202)
            if fh.read(4) != b"HdrS":
                raise CprSettingError(f"{setting}: {directory}/vmlinuz is not a bootable x86 kernel; rebuild "
                                      "with `cpr-image build guest --force`")
        manifest_path = directory / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        return cls(directory, directory / "vmlinuz", directory / "initrd.img", directory / "rootfs.img", manifest)


def check_cache_dirs(*dirs: Path) -> None:
    """Refuse cache folders others can change: root runs what they hold (qemu-next's QEMU on the host)."""
    for path in dirs:
        if problem := leftovers.private_dir_problem(path):
            raise CprSettingError(f"image cache {path} is {problem}: pytest-cpr runs what it holds (as root on a "
                                  f"runner); make it its owner's alone (chown root: and chmod go-w {path}) or "
                                  "point --cpr-cache-dir / CPR_CACHE_DIR at one")


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()


def _tree(directory: Path) -> dict[str, Path]:
    """Every entry below `directory` (symlinks not followed), by relative path; manifest and stamp left out."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_dir():
                out[path.relative_to(directory).as_posix()] = path
    for own in (MANIFEST, STAMP):
        out.pop(own, None)
    return dict(sorted(out.items()))


def _describe(path: Path, stamp: dict[str, object] | None = None, rel: str = "") -> str:
    """What a tree entry is: link:<target>, sha256:<hex> (reused from `stamp` when size, mtime, ctime
    and inode are unchanged), or special:<mode>."""
    st = path.lstat()
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if not path.is_file():
        return f"special:{st.st_mode:o}"
    key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if stamp is not None and isinstance(seen := stamp.get(rel), list) and seen[1:] == key:
        return str(seen[0])
    return _sha256(path)


def file_hashes(directory: Path) -> dict[str, str]:
    """The manifest's `files`: every file and symlink of a built image with its sha256 or target."""
    return {rel: _describe(path) for rel, path in _tree(directory).items()}


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def verify(directory: Path, name: str) -> None:
    """Check a cache entry against the file hashes of its manifest; a mismatch is one line naming the
    file and the fix. Files whose size, mtime, ctime and inode match the stamp of an earlier check are
    not hashed again (a 3 GB rootfs takes ~19 s to hash on a loaded 2-core runner)."""
    fix = f"rebuild it with `cpr-image build {name} --force`"
    check_cache_dirs(directory.parent.parent, directory.parent, directory)
    files = _read_json(directory / MANIFEST).get("files")
    if not isinstance(files, dict):
        raise CprSettingError(f"image cache entry {directory} has no file hashes in its manifest (built by an "
                              f"older pytest-cpr, or not by cpr-image): {fix}")
    stamp = _read_json(directory / STAMP) if not leftovers.private_dir_problem(directory) else {}
    tree = _tree(directory)
    for rel in sorted(set(files) ^ set(tree)):
        what = "is missing" if rel in files else "is not in its manifest"
        raise CprSettingError(f"image cache entry {directory}: {rel} {what} (changed after the build): {fix}")
    for rel, path in tree.items():
        if (found := _describe(path, stamp, rel)) != files[rel]:
            raise CprSettingError(f"image cache entry {directory}: {rel} does not match its manifest ({found[:23]}, "
                                  f"manifest {str(files[rel])[:23]}): {fix}")
    _write_stamp(directory, files, stamp)


def _write_stamp(directory: Path, files: Mapping[str, object], old: Mapping[str, object]) -> None:
    """Record the size, mtime, ctime and inode of each regular file whose hash was just found right, so
    the next check hashes only what changed since (written only by the entry's owner)."""
    fresh: dict[str, object] = {}
    for rel, path in _tree(directory).items():
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            fresh[rel] = [files[rel], st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if fresh != old and directory.stat().st_uid == os.geteuid():
        tmp = directory / f"{STAMP}.{os.getpid()}"
        tmp.write_text(json.dumps(fresh))
        tmp.replace(directory / STAMP)


def verify_existing(entry: Path) -> None:
    """verify() a cache entry <name>-<hash> that exists (a missing one is the caller's message)."""
    if entry.is_dir() and (m := _ENTRY.match(entry.name)):
        verify(entry, m.group("name"))


def verify_binary(binary: str) -> None:
    """A program that lives in a cache entry (qemu-next's QEMU, as --cpr-qemu or --cpr-target-qemu) is
    checked against the entry's manifest before it runs."""
    found = shutil.which(binary)
    for parent in Path(os.path.realpath(found)).parents if found else ():
        if parent.parent.name == "images" and (m := _ENTRY.match(parent.name)):
            verify(parent, m.group("name"))
            return


def verified(name: str, cache_dir: Path, images_dir: Path = REPO_IMAGES) -> Path:
    """The cache entry of the current recipe of `name`, checked against its manifest."""
    entry = cached_path(name, cache_dir, images_dir)
    if not entry.is_dir():
        raise CprSettingError(f"image {name} is not built for the current recipe ({entry} missing): build it "
                              f"with `cpr-image build {name}`")
    verify(entry, name)
    return entry


def _build_lock(name: str, images: Path) -> leftovers.ClaimLock:
    """One build of `name` at a time: a second builder says whom it waits for, then waits."""
    lock = leftovers.ClaimLock(f"build-{name}", images)
    try:
        return lock.acquire(0)
    except leftovers.LockTimeout:
        print(f"[cpr-image] {name}: waiting for the build by pid {lock.holder()} ({lock.path})", flush=True)
    try:
        return lock.acquire(BUILD_LOCK_WAIT)
    except leftovers.LockTimeout as exc:
        raise CprSettingError(f"another build of {name} is still running: lock {exc}; wait for it or stop it"
                              ) from None


def _remove_stages(name: str, images: Path) -> list[str]:
    """Half-built trees of `name` (a killed or failed build); only called under the build lock."""
    out = []
    for stage in sorted(images.glob(f"{name}-*.building-*")):
        if (m := _ENTRY.match(stage.name.split(".building-")[0])) and m.group("name") == name:
            shutil.rmtree(stage, ignore_errors=True)
            out.append(f"removed the half-built {stage}")
    return out


def _has_hashes(entry: Path) -> bool:
    return isinstance(_read_json(entry / MANIFEST).get("files"), dict)


def build(name: str, cache_dir: Path, force: bool = False, images_dir: Path = REPO_IMAGES) -> Path:
    """Build image `name` into the cache unless a build of this exact recipe is there already (with file
    hashes: an entry of an older pytest-cpr without them is rebuilt)."""
    recipe = recipe_dir(name, images_dir)
    final = cached_path(name, cache_dir, images_dir)
    if final.exists() and not force and _has_hashes(final):
        print(f"[cpr-image] {name}: cached at {final} (recipe {recipe_hash(recipe)})", flush=True)
        return final
    if os.geteuid() != 0:
        raise CprSettingError("building a guest image needs root (debootstrap, chroot): run as root")
    images = final.parent
    check_cache_dirs(cache_dir, images)
    images.mkdir(parents=True, exist_ok=True, mode=0o755)
    lock = _build_lock(name, images)
    try:
        if final.exists() and not force and _has_hashes(final):  # built by the run we waited for
            print(f"[cpr-image] {name}: built meanwhile at {final}", flush=True)
            return final
        for line in _remove_stages(name, images):
            print(f"[cpr-image] {line}", flush=True)
        return _build_locked(name, recipe, final)
    finally:
        lock.release()


def _build_locked(name: str, recipe: Path, final: Path) -> Path:
    stage = final.with_name(final.name + f".building-{os.getpid()}")
    stage.mkdir(mode=0o755)
    t0 = time.monotonic()
    print(f"[cpr-image] building {name} from {recipe} into {final}", flush=True)
    env = dict(os.environ, OUT=str(stage))
    try:
        with heartbeat(lambda line: print(f"[cpr-image] {line}", flush=True), f"{name}: still building"):
            subprocess.run(["bash", str(recipe / "build.sh")], env=env, check=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise SystemExit(f"[cpr-image] building {name} failed (exit code {exc.returncode})") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    files = file_hashes(stage)
    manifest = {"name": name, "recipe_hash": recipe_hash(recipe), "inputs": recipe_inputs(recipe),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - t0, 1), "files": files}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _write_stamp(stage, files, {})  # just hashed: the first use need not hash again
    if final.exists():
        shutil.rmtree(final)
    stage.rename(final)
    print(f"[cpr-image] {name} built in {manifest['build_seconds']}s: {final}", flush=True)
    return final


def prune(cache_dir: Path, keep: int = KEEP, images_dir: Path = REPO_IMAGES) -> list[str]:
    """Keep the `keep` newest entries of each image (and always the current recipe's), remove the rest
    and half-built trees; an image being built is skipped (its lock is held). A test running from an
    old entry is not seen: prune when no test runs (between jobs)."""
    if keep < 1:
        raise CprSettingError(f"--keep {keep}: keep at least 1 entry per image")
    images = cache_dir / "images"
    if not images.is_dir():
        return [f"nothing to prune: {images} does not exist"]
    check_cache_dirs(cache_dir, images)
    entries: dict[str, list[Path]] = {}
    for entry in images.iterdir():
        if entry.is_dir() and not entry.is_symlink() and (m := _ENTRY.match(entry.name)):
            entries.setdefault(m.group("name"), []).append(entry)
    stages = {m.group("name") for stage in images.glob("*.building-*")
              if (m := _ENTRY.match(stage.name.split(".building-")[0]))}
    out = []
    for name in sorted(set(entries) | stages):
        lock = leftovers.ClaimLock(f"build-{name}", images)
        try:
            lock.acquire(0)
        except leftovers.LockTimeout:
            out.append(f"{name}: a build is running (pid {lock.holder()}): left alone")
            continue
        try:
            out += _remove_stages(name, images)
            current = _current_entry(name, cache_dir, images_dir)
            newest = sorted(entries.get(name, []), key=lambda e: e.stat().st_mtime, reverse=True)
            for entry in newest[keep:]:
                if entry != current:
                    shutil.rmtree(entry)
                    out.append(f"removed {entry}")
        finally:
            lock.release()
    return out or ["nothing to prune"]


def _current_entry(name: str, cache_dir: Path, images_dir: Path) -> Path | None:
    try:
        return cached_path(name, cache_dir, images_dir)
    except CprSettingError:  # no recipe of that name here (an image of another checkout)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpr-image", description="build and locate pytest-cpr images")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build an image unless cached")
    b.add_argument("name", nargs="?", default="guest")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    p = sub.add_parser("path", help="print where the image of the current recipe lives")
    p.add_argument("name", nargs="?", default="guest")
    v = sub.add_parser("verify", help="check the cached image of the current recipe against its manifest")
    v.add_argument("name", nargs="?", default="guest")
    r = sub.add_parser("prune", help="remove old cache entries and half-built trees")
    r.add_argument("--keep", type=int, default=KEEP,
                   help=f"entries kept per image, newest first (default {KEEP}); the current recipe's always")
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir)
    try:
        if args.cmd == "build":
            build(args.name, cache, force=args.force)
        elif args.cmd == "verify":
            print(f"[cpr-image] {verified(args.name, cache)}: every file matches its manifest")
        elif args.cmd == "prune":
            for line in prune(cache, args.keep):
                print(f"[cpr-image] {line}")
        else:
            print(cached_path(args.name, cache))
    except CprSettingError as exc:
        print(f"cpr-image: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
