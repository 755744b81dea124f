"""The NoCloud seed for users' own cloud images: content read back from the real ISO."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pycdlib
import pytest
import yaml

from pytest_cpr import cloudinit
from pytest_cpr.errors import CprSettingError
from pytest_cpr.qemu.spec import Nic, VmSpec


def read_iso(path: Path) -> tuple[str, dict[str, str]]:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    label = iso.pvd.volume_identifier.decode().strip()
    files = {}
    for name in ("user-data", "meta-data", "network-config"):
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
        files[name] = out.getvalue().decode()
    iso.close()
    return label, files


def test_seed_has_key_pinned_host_key_and_static_network(tmp_path: Path) -> None:
    host_key = cloudinit.generate_host_key()
    seed = cloudinit.write_seed(tmp_path / "seed.iso", instance_id="cpr-1", hostname="cprguest",
                                authorized_key="ssh-ed25519 AAAAC3Nza pytest-cpr", host_key=host_key,
                                nics=[("52:54:00:77:00:02", "10.77.0.2/24")])
    assert seed.stat().st_mode & 0o077 == 0, "the seed holds a private key: owner-only"
    label, files = read_iso(seed)
    assert label == "cidata"
    user = yaml.safe_load(files["user-data"])
    assert files["user-data"].startswith("#cloud-config\n")
    assert user["users"][0] == {"name": "root", "ssh_authorized_keys": ["ssh-ed25519 AAAAC3Nza pytest-cpr"]}
    assert user["ssh_pwauth"] is False and user["ssh_genkeytypes"] == ["ed25519"]
    assert user["ssh_keys"]["ed25519_public"] == host_key.public_line
    assert user["ssh_keys"]["ed25519_private"].strip() == host_key.private_openssh.strip()
    net = yaml.safe_load(files["network-config"])
    assert net == {"version": 2, "ethernets": {"cpr0": {"match": {"macaddress": "52:54:00:77:00:02"},
                                                        "set-name": "cpr0", "addresses": ["10.77.0.2/24"]}}}
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "cpr-1", "local-hostname": "cprguest"}


def test_overlay_keeps_the_user_image_untouched(tmp_path: Path) -> None:
    base = tmp_path / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    before = base.read_bytes()
    overlay = cloudinit.make_overlay(base, tmp_path / "overlay.qcow2")
    info = subprocess.run(["qemu-img", "info", str(overlay)], capture_output=True, text=True, check=True).stdout
    assert f"backing file: {base}" in info
    assert base.read_bytes() == before


def test_bad_user_image_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(CprSettingError, match=r"--cpr-user-image / CPR_USER_IMAGE: .* does not exist"):
        cloudinit.image_format(tmp_path / "missing.qcow2")
    vdi = tmp_path / "x.vdi"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vdi", str(vdi), "16M"], check=True)
    with pytest.raises(CprSettingError, match="is vdi; convert it"):
        cloudinit.image_format(vdi)


def test_disk_boot_spec_has_no_kernel_a_writable_overlay_and_the_seed() -> None:
    spec = VmSpec(name="u", accel="kvm", memory_mib=1024, cpus=2, kernel=None, initrd=None,
                  rootfs=Path("/run/o.qcow2"), root_format="qcow2", root_readonly=False,
                  seed_iso=Path("/run/seed.iso"), nics=(Nic("n0", "52:54:00:77:00:02", 5, "10.77.0.2/24"),))
    argv = spec.argv("qemu", Path("/c.sock"), Path("/c.log"), Path("/q.sock"))
    assert "-kernel" not in argv and "-append" not in argv
    assert "file=/run/o.qcow2,if=none,id=root,format=qcow2" in argv
    assert "file=/run/seed.iso,if=none,id=seed,format=raw,readonly=on" in argv


def test_without_pycdlib_the_error_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycdlib", None)  # `import pycdlib` raises ImportError
    with pytest.raises(CprSettingError) as err:
        cloudinit.write_seed(tmp_path / "seed.iso", instance_id="cpr-1", hostname="cprguest",
                             authorized_key="ssh-ed25519 AAAA", host_key=cloudinit.generate_host_key(), nics=[])
    assert "pip install 'pytest-cpr[cloud]'" in str(err.value) and "\n" not in str(err.value)


def test_boot_progress_names_how_far_a_cloud_image_got() -> None:
    assert cloudinit.boot_progress("") == (None, "the kernel started (firmware and bootloader done)")
    assert "nothing of a boot" in cloudinit.describe_boot_progress("SeaBIOS noise\n")
    console = ("[    0.000000] Linux version 6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org)\n"
               "[    1.9] systemd[1]: systemd 252 running in system mode\n"
               "[   12.3] cloud-init[201]: Cloud-init v. 22.4.2 running 'init-local' at Thu, 26 Nov 2026\n")
    last, missing = cloudinit.boot_progress(console)
    assert last == "cloud-init looked for its datasource (init-local)"
    assert missing == "cloud-init applied the seed (users, SSH keys, network)"
    done = console + "cloud-init[230]: Cloud-init v. 22.4.2 running 'init' at Thu\n[  OK  ] Started ssh.service\n"
    assert cloudinit.boot_progress(done) == ("sshd started", "cloud-init finished (final stage)")
    done += "cloud-init[300]: Cloud-init v. 22.4.2 finished at Thu, 26 Nov 2026 16:44:12 +0000.\n"
    assert cloudinit.describe_boot_progress(done) == "its console shows cloud-init finished (final stage)"
