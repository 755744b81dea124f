"""images/guest/pvh_vmlinux.py: the kernel ELF for PVH boot, taken out of a bzImage through its setup
header; every way it can refuse is shown on a made-up kernel."""

from __future__ import annotations

import gzip
import importlib.util
import lzma
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "images" / "guest" / "pvh_vmlinux.py"
ENTRY = 0x1000000


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pvh_vmlinux", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pvh = _load()


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name), len(desc), kind) + pad(name) + pad(desc)


def elf(pvh_entry: bool = True) -> bytes:
    """A 64-bit ELF with one PT_NOTE segment: a GNU note, then Xen's PHYS32_ENTRY if asked."""
    notes = _note(b"GNU\0", 3, b"\x01" * 20)
    if pvh_entry:
        notes += _note(b"Xen\0", pvh.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", ENTRY))
    phoff, note_at = 64, 64 + 56
    header = (b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
              + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, ENTRY, phoff, 0, 0, 64, 56, 1, 64, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", pvh.PT_NOTE, 4, note_at, 0, 0, len(notes), len(notes), 4)
    return header + phdr + notes


def bzimage(payload: bytes, version: int = 0x20F, setup_sects: int = 1) -> bytes:
    """A bzImage: setup_sects+1 sectors of real-mode setup, then the protected-mode part holding the
    payload at payload_offset."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    offset = 0x40  # the decompressor's code comes first in a real kernel
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\x90" * offset + payload + b"\0" * 16


def packed(data: bytes, compress: str = "gzip", size: int | None = None) -> bytes:
    body = gzip.compress(data) if compress == "gzip" else lzma.compress(data, lzma.FORMAT_XZ)
    return body + struct.pack("<I", len(data) if size is None else size)


def run(tmp_path: Path, image: bytes) -> tuple[subprocess.CompletedProcess[str], Path]:
    src, out = tmp_path / "vmlinuz", tmp_path / "vmlinux"
    src.write_bytes(image)
    done = subprocess.run([sys.executable, str(SCRIPT), str(src), str(out)], capture_output=True, text=True,
                          timeout=60)
    return done, out


@pytest.mark.parametrize("compress", ["gzip", "xz"])
def test_the_kernel_elf_comes_out_without_the_relocations_appended_to_it(tmp_path: Path, compress: str) -> None:
    kernel = elf()
    done, out = run(tmp_path, bzimage(packed(kernel + b"RELOCS" * 10, compress)))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == kernel


def test_a_kernel_without_a_pvh_entry_exits_3_so_the_build_keeps_the_bzimage(tmp_path: Path) -> None:
    done, out = run(tmp_path, bzimage(packed(elf(pvh_entry=False))))
    assert done.returncode == 3 and "no PVH entry note" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(("image", "message"), [
    (elf(), "no 'HdrS' setup header"),
    (bzimage(packed(elf()), version=0x207), "boot protocol 2.07 has no payload_offset"),
    (bzimage(packed(elf(), size=12345)), "the kernel's build recorded 12345"),
    (bzimage(b"\x11\x22\x33\x44\x55\x66" + struct.pack("<I", 6)), "unknown compression (payload starts 112233445566)"),
    (bzimage(packed(b"not an elf at all")), "not a 64-bit little-endian ELF"),
])
def test_what_is_no_bzimage_exits_2_naming_why(tmp_path: Path, image: bytes, message: str) -> None:
    done, out = run(tmp_path, image)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not out.exists()


def test_a_payload_past_the_end_of_the_file_is_refused() -> None:
    image = bytearray(bzimage(packed(elf())))
    struct.pack_into("<I", image, 0x24C, len(image))
    with pytest.raises(pvh.NotBootable, match="lies outside"):
        pvh.payload(bytes(image))
