"""The image cache on a fake cache dir and a fake quick recipe: signed debootstrap, recipe hash inputs,
file hashes in the manifest checked before use (poisoned entries refused), one build per image at a
time (lock), half-built trees removed, prune. Never touches the real cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_cpr import images, leftovers
from pytest_cpr.errors import CprSettingError

REPO = Path(__file__).resolve().parents[2]
DEBOOTSTRAP_LIB = REPO / "images" / "lib" / "debootstrap.sh"
FAKE_RECIPE = """#!/usr/bin/env bash
set -euo pipefail
echo run >> "$COUNTER"
printf 'kernel %s\\n' "${CPR_FAKE_FLAVOR:-plain}" > "$OUT/vmlinuz"
head -c 4096 /dev/zero > "$OUT/rootfs.img"
mkdir -p "$OUT/bin"
ln -s ../vmlinuz "$OUT/bin/kernel"
printf '#!/bin/sh\necho QEMU emulator version 11.1.3\n' > "$OUT/bin/qemu-system-x86_64"
chmod +x "$OUT/bin/qemu-system-x86_64"
sleep "${FAKE_SLEEP:-0}"
"""

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="cpr-image builds as root only")


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An images folder with one quick recipe, `fake`, counting its runs in $COUNTER."""
    d = tmp_path / "recipes"
    (d / "fake").mkdir(parents=True)
    (d / "fake" / "build.sh").write_text(FAKE_RECIPE)
    (d / "lib").mkdir()
    monkeypatch.setenv("COUNTER", str(tmp_path / "runs"))
    return d


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    c = tmp_path / "cache"
    c.mkdir(mode=0o755)
    return c


def runs(tmp_path: Path) -> int:
    counter = tmp_path / "runs"
    return len(counter.read_text().splitlines()) if counter.exists() else 0


# -- debootstrap: the archive keyring enforced, its failure not hidden ---------------------------------

def signed_debootstrap(tmp_path: Path, rc: int, **env: str) -> subprocess.CompletedProcess[str]:
    """images/lib/debootstrap.sh's signed_debootstrap with a fake debootstrap that logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "debootstrap"
    fake.write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > {tmp_path}/args
echo 'I: Retrieving InRelease'
echo 'I: Checking Release signature'
echo 'I: Valid Release signature (key id 4CB50190207B4758A3F73A796ED0E7B82643E131)'
echo 'W: Cannot check Release signature; keyring file not available'
echo 'I: Retrieving Packages'
[ {rc} -eq 0 ] || echo 'E: Release signed by unknown key'
exit {rc}
""")
    fake.chmod(0o755)
    script = f'set -euo pipefail; . {DEBOOTSTRAP_LIB}; signed_debootstrap bookworm /tmp/none http://m --variant=minbase'
    return subprocess.run(["bash", "-c", script], env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env),
                          capture_output=True, text=True, timeout=30)


def test_debootstrap_checks_signatures_with_the_archive_keyring(tmp_path: Path) -> None:
    result = signed_debootstrap(tmp_path, 0, CPR_DEBIAN_KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg")
    if "missing tool: gpgv" in result.stderr or "no Debian archive keyring" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["--keyring=/usr/share/keyrings/debian-archive-keyring.gpg", "--force-check-gpg",
                        "--variant=minbase"]
    assert "  W: Cannot check Release signature; keyring file not available" in result.stdout
    assert "  I: Valid Release signature (key id 4CB50190207B4758A3F73A796ED0E7B82643E131)" in result.stdout
    assert "Checking Release signature" not in result.stdout  # progress is thinned out


def test_debootstrap_failure_is_not_hidden_by_the_filter(tmp_path: Path) -> None:
    result = signed_debootstrap(tmp_path, 1, CPR_DEBIAN_KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg")
    if "missing tool: gpgv" in result.stderr or "no Debian archive keyring" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 1
    assert "  E: Release signed by unknown key" in result.stdout
    assert "debootstrap of bookworm from http://m failed" in result.stderr


def test_debootstrap_without_the_keyring_stops_with_one_line(tmp_path: Path) -> None:
    result = signed_debootstrap(tmp_path, 0, CPR_DEBIAN_KEYRING=str(tmp_path / "no-keyring.gpg"))
    assert result.returncode == 2 and not (tmp_path / "args").exists()
    assert result.stderr.strip().splitlines() == [
        f"no Debian archive keyring at {tmp_path}/no-keyring.gpg: apt-get install debian-archive-keyring "
        "(or set CPR_DEBIAN_KEYRING)"]


# -- the recipe hash covers what the recipe reads ------------------------------------------------------

def test_recipe_hash_covers_mirror_and_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    guest = images.recipe_dir("guest")
    for name in ("CPR_DEBIAN_MIRROR", "CPR_GUEST_SUITE", "CPR_DEBIAN_KEYRING", "CPR_KERNEL_JOBS"):
        monkeypatch.delenv(name, raising=False)
    plain = images.recipe_hash(guest)
    assert images.recipe_inputs(guest)["CPR_GUEST_SUITE"] == "bookworm"
    monkeypatch.setenv("CPR_GUEST_SUITE", "bookworm")  # the default, given explicitly: the same entry
    assert images.recipe_hash(guest) == plain
    monkeypatch.setenv("CPR_DEBIAN_MIRROR", "http://mirror.example/debian")
    mirrored = images.recipe_hash(guest)
    monkeypatch.setenv("CPR_GUEST_SUITE", "trixie")
    assert len({plain, mirrored, images.recipe_hash(guest)}) == 3
    kernel = images.recipe_hash(images.recipe_dir("vhost-kernel"))
    monkeypatch.setenv("CPR_KERNEL_JOBS", "64")  # how fast, not what: the same entry
    assert images.recipe_hash(images.recipe_dir("vhost-kernel")) == kernel


def test_a_recipe_that_extends_another_is_hashed_with_it(tmp_path: Path) -> None:
    """qemu-forky runs qemu-next's script with other suites: a change to that script is a new qemu-forky
    entry too, and a recipe without an `extends` file is hashed as before (the cached entries stay)."""
    for name in ("base", "child", "lone"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "build.sh").write_text(f"echo {name} ${{CPR_BASE_SUITE:-trixie}}\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "child" / "extends").write_text("base\n")
    child, lone = images.recipe_hash(tmp_path / "child"), images.recipe_hash(tmp_path / "lone")
    assert images.recipe_inputs(tmp_path / "child") == {"CPR_BASE_SUITE": "trixie"}
    (tmp_path / "base" / "build.sh").write_text("echo base changed\n")
    assert images.recipe_hash(tmp_path / "child") != child
    assert images.recipe_hash(tmp_path / "lone") == lone
    (tmp_path / "child" / "extends").write_text("nosuch\n")
    with pytest.raises(CprSettingError, match=r"no image recipe .*nosuch/build\.sh"):
        images.recipe_hash(tmp_path / "child")
    assert (images.REPO_IMAGES / "qemu-forky" / "extends").read_text().split() == ["qemu-next"]


# -- the manifest: file hashes written at build, checked before use ------------------------------------

@root_only
def test_manifest_holds_every_file_hash_and_verify_passes(recipes: Path, cache: Path) -> None:
    entry = images.build("fake", cache, images_dir=recipes)
    files = json.loads((entry / "manifest.json").read_text())["files"]
    assert set(files) == {"vmlinuz", "rootfs.img", "bin/kernel", "bin/qemu-system-x86_64"}
    assert files["bin/kernel"] == "link:../vmlinuz" and files["vmlinuz"].startswith("sha256:")
    assert images.verified("fake", cache, recipes) == entry
    assert (entry / ".verified.json").is_file()


@root_only
@pytest.mark.parametrize(("change", "expected"), [
    (lambda e: (e / "vmlinuz").write_text("kernel evil\n"), "vmlinuz does not match its manifest"),
    (lambda e: (e / "bin" / "extra").write_text("x"), "bin/extra is not in its manifest"),
    (lambda e: (e / "rootfs.img").unlink(), "rootfs.img is missing"),
    (lambda e: ((e / "bin" / "kernel").unlink(), (e / "bin" / "kernel").symlink_to("/bin/sh")),
     "bin/kernel does not match its manifest"),
], ids=["changed", "added", "removed", "relinked"])
def test_manifest_poison_refused_naming_the_file_and_the_fix(recipes: Path, cache: Path, change: object,
                                                             expected: str) -> None:
    entry = images.build("fake", cache, images_dir=recipes)
    images.verified("fake", cache, recipes)  # a stamp from a good check does not hide a later change
    change(entry)  # type: ignore[operator]
    with pytest.raises(CprSettingError) as err:
        images.verified("fake", cache, recipes)
    assert str(err.value) == str(err.value).splitlines()[0]
    assert expected in str(err.value) and "rebuild it with `cpr-image build fake --force`" in str(err.value)


@root_only
def test_manifest_poison_with_the_old_mtime_is_still_refused(recipes: Path, cache: Path) -> None:
    """Same size, mtime put back: the stamp also keys on ctime and inode, so the file is hashed again."""
    entry = images.build("fake", cache, images_dir=recipes)
    images.verified("fake", cache, recipes)
    kernel = entry / "vmlinuz"
    st = kernel.stat()
    kernel.write_text(kernel.read_text().replace("plain", "EVIL!"))
    os.utime(kernel, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert kernel.stat().st_size == st.st_size
    with pytest.raises(CprSettingError, match="vmlinuz does not match its manifest"):
        images.verified("fake", cache, recipes)


@root_only
def test_manifest_stamp_spares_hashing_unchanged_files(recipes: Path, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    entry = images.build("fake", cache, images_dir=recipes)
    hashed: list[Path] = []
    real = images._sha256
    monkeypatch.setattr(images, "_sha256", lambda p: hashed.append(p) or real(p))
    images.verified("fake", cache, recipes)  # the build left a stamp: nothing is hashed again
    images.verified("fake", cache, recipes)
    assert hashed == []
    (entry / "rootfs.img").touch()  # control: a changed stamp key means hashing again
    images.verified("fake", cache, recipes)
    assert hashed == [entry / "rootfs.img"]


@root_only
def test_manifest_of_an_old_entry_without_hashes_is_refused_then_rebuilt(recipes: Path, cache: Path,
                                                                         tmp_path: Path) -> None:
    entry = images.build("fake", cache, images_dir=recipes)
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["files"]
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CprSettingError, match=r"has no file hashes in its manifest .*cpr-image build fake --force"):
        images.verified("fake", cache, recipes)
    assert images.build("fake", cache, images_dir=recipes) == entry and runs(tmp_path) == 2
    images.verified("fake", cache, recipes)


@root_only
@pytest.mark.parametrize("loose", ["cache", "images", "entry"])
def test_manifest_cache_dir_others_can_write_is_refused(recipes: Path, cache: Path, loose: str) -> None:
    entry = images.build("fake", cache, images_dir=recipes)
    target = {"cache": cache, "images": cache / "images", "entry": entry}[loose]
    target.chmod(0o775)
    with pytest.raises(CprSettingError) as err:
        images.verified("fake", cache, recipes)
    assert str(err.value).startswith(f"image cache {target} is writable by group or others (mode 775)")
    assert "\n" not in str(err.value)


# -- one build per image at a time; half-built trees; prune --------------------------------------------

BUILD = "import sys; from pathlib import Path; from pytest_cpr import images; " \
        "images.build('fake', Path(sys.argv[1]), images_dir=Path(sys.argv[2]))"


@root_only
def test_lock_second_concurrent_build_waits_and_reuses_the_first(recipes: Path, cache: Path, tmp_path: Path) -> None:
    env = dict(os.environ, FAKE_SLEEP="2")
    first = subprocess.Popen([sys.executable, "-c", BUILD, str(cache), str(recipes)], env=env,
                             stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while runs(tmp_path) == 0:  # the first build is running its recipe, under the lock
        assert time.monotonic() < deadline and first.poll() is None, "the first build never started"
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", BUILD, str(cache), str(recipes)], env=env,
                            capture_output=True, text=True, timeout=60)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert f"fake: waiting for the build by pid {first.pid}" in second.stdout
    assert "fake: built meanwhile" in second.stdout and "building fake" in out
    assert runs(tmp_path) == 1


@root_only
def test_lock_held_too_long_fails_with_one_line(recipes: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "BUILD_LOCK_WAIT", 0.2)
    held = leftovers.ClaimLock("build-fake", cache / "images").acquire(0)
    try:
        with pytest.raises(CprSettingError, match=rf"another build of fake is still running: lock held by pid "
                                                  rf"{os.getpid()} .* for more than 0.2s"):
            images.build("fake", cache, images_dir=recipes)
    finally:
        held.release()


@root_only
def test_half_built_tree_of_a_killed_build_is_removed(recipes: Path, cache: Path) -> None:
    final = images.cached_path("fake", cache, recipes)
    stale = final.with_name(final.name + ".building-999999")
    (stale / "work").mkdir(parents=True)
    (stale / "work" / "big").write_bytes(b"x" * 1000)
    other = cache / "images" / "fake-extra-0123456789abcdef.building-1"  # another image's: not ours
    other.mkdir()
    images.build("fake", cache, images_dir=recipes)
    assert not stale.exists() and other.exists()


def fake_entry(cache: Path, name: str, digest: str, age_s: float) -> Path:
    entry = cache / "images" / f"{name}-{digest}"
    entry.mkdir(parents=True)
    (entry / "vmlinuz").write_text(name)
    t = time.time() - age_s
    os.utime(entry, (t, t))
    return entry


def test_prune_keeps_the_newest_entries_per_recipe(recipes: Path, cache: Path) -> None:
    guests = [fake_entry(cache, "guest", f"{i:016x}", age_s=100 * i) for i in range(4)]  # guests[0] newest
    kernels = [fake_entry(cache, "vhost-kernel", f"{i:016x}", age_s=100 * i) for i in range(3)]
    current = images.cached_path("fake", cache, recipes)
    current.mkdir()
    os.utime(current, (1, 1))  # the oldest of its image, but the current recipe's: kept
    older_fake = fake_entry(cache, "fake", "f" * 16, age_s=10)
    stage = cache / "images" / f"guest-{'a' * 16}.building-4242"
    stage.mkdir()
    lines = images.prune(cache, keep=1, images_dir=recipes)
    assert [e.exists() for e in guests] == [True, False, False, False]
    assert [e.exists() for e in kernels] == [True, False, False]
    assert current.exists() and older_fake.exists() and not stage.exists()
    assert f"removed {guests[3]}" in lines and f"removed the half-built {stage}" in lines
    assert images.prune(cache, keep=1, images_dir=recipes) == ["nothing to prune"]


def test_prune_leaves_an_image_being_built_alone(recipes: Path, cache: Path) -> None:
    old = [fake_entry(cache, "guest", f"{i:016x}", age_s=100 * i) for i in range(3)]
    held = leftovers.ClaimLock("build-guest", cache / "images").acquire(0)
    try:
        assert images.prune(cache, keep=1, images_dir=recipes) == [
            f"guest: a build is running (pid {os.getpid()}): left alone"]
    finally:
        held.release()
    assert all(e.exists() for e in old)


def test_prune_keep_zero_is_refused(cache: Path) -> None:
    with pytest.raises(CprSettingError, match="--keep 0: keep at least 1 entry per image"):
        images.prune(cache, keep=0)


@root_only
def test_manifest_poison_of_a_cached_qemu_is_refused_before_it_runs(recipes: Path, cache: Path) -> None:
    entry = images.build("fake", cache, images_dir=recipes)
    qemu = entry / "bin" / "qemu-system-x86_64"
    images.verify_binary("/bin/true")  # not in a cache: nothing to check
    images.verify_binary(str(qemu))  # as built
    qemu.write_text("#!/bin/sh\nexec /bin/sh\n")  # replaced after the build
    with pytest.raises(CprSettingError, match=r"bin/qemu-system-x86_64 does not match its manifest"):
        images.verify_binary(str(qemu))


def test_manifest_poison_of_the_virtual_host_qemu_is_refused(tmp_path: Path, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """L1's QEMU (qemu-next from the cache, run as root on L0) is checked when the config is made."""
    from pytest_cpr.vhost import VhostConfig

    monkeypatch.delenv("CPR_IMAGE", raising=False)
    monkeypatch.delenv("CPR_VHOST_QEMU", raising=False)
    entry = images.cached_path("qemu-next", cache)
    (entry / "bin").mkdir(parents=True)
    qemu = entry / "bin" / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\n")
    (entry / "manifest.json").write_text(json.dumps({"name": "qemu-next", "files": images.file_hashes(entry)}))
    assert VhostConfig.from_cache(tmp_path / "art", cache_dir=cache).qemu == str(qemu)
    qemu.write_text("#!/bin/sh\nexec /bin/sh\n")
    with pytest.raises(CprSettingError, match=r"qemu-next-[0-9a-f]{16}: bin/qemu-system-x86_64 does not match"):
        VhostConfig.from_cache(tmp_path / "art", cache_dir=cache)


def test_the_cloud_flavour_boots_the_pvh_kernel_elf_when_the_image_has_one(tmp_path: Path) -> None:
    for f in ("vmlinuz", "initrd.img", "vmlinuz-full", "initrd-full.img"):
        (tmp_path / f).write_text(f)
    img = images.GuestImage(tmp_path, tmp_path / "vmlinuz", tmp_path / "initrd.img", tmp_path / "rootfs.img", {})
    assert img.boot_files("cloud") == (tmp_path / "vmlinuz", tmp_path / "initrd.img")  # an older build: no vmlinux
    (tmp_path / "vmlinux").write_text("elf")
    assert img.boot_files("cloud") == (tmp_path / "vmlinux", tmp_path / "initrd.img")
    assert img.boot_files("cloud", pvh=False) == (tmp_path / "vmlinuz", tmp_path / "initrd.img")  # S3 guests
    assert img.boot_files("full") == (tmp_path / "vmlinuz-full", tmp_path / "initrd-full.img")
