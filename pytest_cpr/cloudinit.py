"""Your own guest image (a distribution's cloud image) through a cloud-init NoCloud seed.

The plugin writes the seed itself: root may log in with the session's ephemeral key only, the SSH
host key is one the harness generated (so it is pinned from the first connection, never trusted
on first use), and each NIC gets a static address on the test bridge, matched by MAC. The seed is
an ISO9660 volume labelled `cidata` (pycdlib, no external tool), attached read-only.
Use: --cpr-user-image / CPR_USER_IMAGE = a qcow2 or raw disk image with cloud-init installed.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pytest_cpr.errors import CprSettingError

MISSING_PYCDLIB = ("--cpr-user-image needs pycdlib to write the cloud-init seed: "
                   "pip install 'pytest-cpr[cloud]'")


@dataclass(frozen=True)
class HostKey:
    private_openssh: str
    public_line: str  # "ssh-ed25519 AAAA..."


def generate_host_key() -> HostKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return HostKey(private, public)


def _block(text: str, indent: int) -> str:
    pad = " " * indent
    return "\n".join(pad + line for line in text.strip().splitlines())


def user_data(authorized_key: str, host_key: HostKey) -> str:
    # JSON strings are valid YAML scalars: no quoting surprises from key material
    return "\n".join([
        "#cloud-config",
        "disable_root: false",
        "ssh_pwauth: false",
        "users:",
        "  - name: root",
        f"    ssh_authorized_keys: [{json.dumps(authorized_key)}]",
        "ssh_deletekeys: true",
        # cloud-init makes only the missing ones: none (an empty list fails its schema, a warning on the console)
        "ssh_genkeytypes: [ed25519]",
        "ssh_keys:",
        "  ed25519_private: |",
        _block(host_key.private_openssh, 4),
        f"  ed25519_public: {json.dumps(host_key.public_line)}",
        "",
    ])


def network_config(nics: list[tuple[str, str]]) -> str:
    """Static addresses, each NIC matched by MAC and renamed cpr<i>: the name the image's kernel and udev
    would give (ens2, enp0s2, eth0) depends on the image and the PCI slot, and cloud-init's ifupdown
    (ENI) renderer configures interfaces by name, so without set-name it writes a stanza for an
    interface that does not exist. With set-name cloud-init renames the NIC before configuring it."""
    lines = ["version: 2", "ethernets:"]
    for i, (mac, cidr) in enumerate(nics):
        lines += [f"  cpr{i}:", f"    match: {{macaddress: {json.dumps(mac)}}}", f"    set-name: cpr{i}",
                  f"    addresses: [{json.dumps(cidr)}]"]
    return "\n".join(lines) + "\n"


def meta_data(instance_id: str, hostname: str) -> str:
    return f"instance-id: {json.dumps(instance_id)}\nlocal-hostname: {json.dumps(hostname)}\n"


def write_seed(path: Path, *, instance_id: str, hostname: str, authorized_key: str, host_key: HostKey,
               nics: list[tuple[str, str]]) -> Path:
    """Write the NoCloud seed ISO (volume id `cidata`) and return its path."""
    try:
        import pycdlib
    except ImportError:
        raise CprSettingError(MISSING_PYCDLIB) from None

    files = {"user-data": user_data(authorized_key, host_key), "meta-data": meta_data(instance_id, hostname),
             "network-config": network_config(nics)}
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for i, (name, text) in enumerate(files.items()):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/FILE{i};1", rr_name=name, joliet_path=f"/{name}")
    iso.write(str(path))
    iso.close()
    path.chmod(0o600)  # holds a private host key
    return path


def image_format(image: Path, setting: str = "--cpr-user-image / CPR_USER_IMAGE") -> str:
    if not image.is_file():
        raise CprSettingError(f"{setting}: {image} does not exist; give the path of a qcow2 or raw cloud image")
    out = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise CprSettingError(f"{setting}: qemu-img cannot read {image}: {out.stderr.strip()[:200]}")
    fmt = str(json.loads(out.stdout)["format"])
    if fmt not in ("qcow2", "raw"):
        raise CprSettingError(f"{setting}: {image} is {fmt}; convert it with `qemu-img convert -O qcow2`")
    return fmt


def make_overlay(image: Path, overlay: Path) -> Path:
    """A per-guest qcow2 overlay: source and target QEMU share it, the user's image stays untouched."""
    fmt = image_format(image)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(image.resolve()),
                    str(overlay)], check=True)
    return overlay


# What a distribution cloud image prints on its serial console on the way to SSH, in order: how far a
# boot got, named when it does not answer in time (a first boot under TCG is slow: cloud-init is Python)
BOOT_MILESTONES = (
    ("the kernel started (firmware and bootloader done)", r"Linux version \d"),
    ("init (systemd) started", r"systemd\[1\]: |Welcome to "),
    ("cloud-init looked for its datasource (init-local)", r"Cloud-init v\. \S+ running 'init-local'"),
    ("cloud-init applied the seed (users, SSH keys, network)", r"Cloud-init v\. \S+ running 'init' "),
    ("sshd started", r"OpenBSD Secure Shell server|Started ssh\.service|Starting ssh\.service"),
    ("cloud-init finished (final stage)", r"Cloud-init v\. \S+ finished at"),
)


def boot_progress(console_text: str) -> tuple[str | None, str | None]:
    """(last milestone the console shows, the next one it does not), each None at either end."""
    last = None
    for name, pattern in BOOT_MILESTONES:
        if not re.search(pattern, console_text):
            return last, name
        last = name
    return last, None


def describe_boot_progress(console_text: str) -> str:
    last, missing = boot_progress(console_text)
    if last is None:
        return "its console shows nothing of a boot (firmware or bootloader: is the image bootable by SeaBIOS?)"
    return f"its console shows {last}" + (f", not yet: {missing}" if missing else "")
