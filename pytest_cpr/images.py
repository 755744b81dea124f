"""Guest images: built from a recipe under images/<name>/ (in a wheel: pytest_cpr/recipes/<name>/),
cached by a hash of the recipe.

Tests only ever use a cached image; building is a separate command
(`cpr-image build guest`, or `python -m pytest_cpr.images build guest`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_cpr.errors import CprSettingError

PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"  # an installed wheel
CHECKOUT_RECIPES = Path(__file__).resolve().parent.parent / "images"  # a checkout (editable install)
REPO_IMAGES = PACKAGED_RECIPES if PACKAGED_RECIPES.is_dir() else CHECKOUT_RECIPES
IMAGE_FILES = ("vmlinuz", "initrd.img", "rootfs.img")


def default_cache_dir() -> Path:
    """$CPR_CACHE_DIR, else the cache_dir setting's default (~/.cache/pytest-cpr)."""
    from pytest_cpr.settings import BY_KEY

    return Path(os.environ.get("CPR_CACHE_DIR") or str(BY_KEY["cache_dir"].default))


def recipe_dir(name: str, images_dir: Path = REPO_IMAGES) -> Path:
    path = images_dir / name
    if not (path / "build.sh").is_file():
        raise CprSettingError(f"no image recipe {path}/build.sh: image names are the folders of {images_dir}")
    return path


def recipe_hash(path: Path) -> str:
    """sha256 over every file of the recipe and of the shared images/lib (names and contents),
    16 hex digits."""
    digest = hashlib.sha256()
    for root in (path, path.parent / "lib"):
        for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(f.relative_to(root.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
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

    def boot_files(self, flavor: str = "cloud") -> tuple[Path, Path]:
        """(kernel, initrd) of a kernel flavour: "cloud" (virtio only, fastest boot) or "full"
        (Debian's generic kernel with NVMe, igb/igbvf and e1000e drivers, for passthrough guests)."""
        if flavor == "cloud":
            return self.kernel, self.initrd
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


def build(name: str, cache_dir: Path, force: bool = False, images_dir: Path = REPO_IMAGES) -> Path:
    """Build image `name` into the cache unless a build of this exact recipe is there already."""
    recipe = recipe_dir(name, images_dir)
    final = cached_path(name, cache_dir, images_dir)
    if final.exists() and not force:
        print(f"[cpr-image] {name}: cached at {final} (recipe {recipe_hash(recipe)})", flush=True)
        return final
    if os.geteuid() != 0:
        raise CprSettingError("building a guest image needs root (debootstrap, chroot): run as root")
    stage = final.with_name(final.name + f".building-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    t0 = time.monotonic()
    print(f"[cpr-image] building {name} from {recipe} into {final}", flush=True)
    env = dict(os.environ, OUT=str(stage))
    try:
        subprocess.run(["bash", str(recipe / "build.sh")], env=env, check=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise SystemExit(f"[cpr-image] building {name} failed (exit code {exc.returncode})") from None
    manifest = {"name": name, "recipe_hash": recipe_hash(recipe), "built": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                time.gmtime()), "build_seconds": round(time.monotonic() - t0, 1)}
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    stage.rename(final)
    print(f"[cpr-image] {name} built in {manifest['build_seconds']}s: {final}", flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpr-image", description="build and locate pytest-cpr images")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build an image unless cached")
    b.add_argument("name", nargs="?", default="guest")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    p = sub.add_parser("path", help="print where the image of the current recipe lives")
    p.add_argument("name", nargs="?", default="guest")
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir)
    try:
        if args.cmd == "build":
            build(args.name, cache, force=args.force)
        else:
            print(cached_path(args.name, cache))
    except CprSettingError as exc:
        print(f"cpr-image: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
