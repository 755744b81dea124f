#!/usr/bin/env python3
"""Write the kernel ELF (vmlinux) inside a bzImage, for QEMU to boot through its PVH entry point.

    python3 pvh_vmlinux.py BZIMAGE OUT

Direct kernel boot of a bzImage runs the kernel's real-mode setup and then its decompressor under
the firmware; QEMU boots an uncompressed vmlinux whose ELF notes name a PVH entry (Xen's
PHYS32_ENTRY, CONFIG_PVH) straight into 32-bit mode, already in place. The compressed payload is
found through the boot protocol's setup header (payload_offset, payload_length: protocol 2.08+),
not by scanning for magic numbers; the kernel appends the decompressed size, which is checked; the
relocation table after the ELF is dropped (PVH boots at the link address). Exit status 3: the
kernel has no PVH entry (the caller boots the bzImage instead); 2: not a bzImage or not readable.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Protocol

XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4


class _Decoder(Protocol):
    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, /) -> bytes: ...


class NotBootable(Exception):
    """Not a bzImage this tool can unpack."""


class NoPvhEntry(Exception):
    """A kernel ELF without a PVH entry note."""


def payload(image: bytes) -> bytes:
    """The compressed kernel of a bzImage (with the 4-byte size the kernel's build appends)."""
    if image[0x202:0x206] != b"HdrS":
        raise NotBootable("no 'HdrS' setup header: not an x86 bzImage")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        raise NotBootable(f"boot protocol {version >> 8}.{version & 0xff:02d} has no payload_offset (2.08+)")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length < 8 or start + length > len(image):
        raise NotBootable(f"payload at {start} of {length} bytes lies outside the {len(image)}-byte file")
    return image[start:start + length]


def _stream(decompressor: _Decoder, data: bytes) -> bytes:
    out = decompressor.decompress(data)
    if not decompressor.eof:
        raise NotBootable("the compressed kernel ends early")
    return out


def _tool(argv: list[str], data: bytes) -> bytes:
    try:
        return subprocess.run(argv, input=data, capture_output=True, check=True).stdout
    except FileNotFoundError:
        raise NotBootable(f"the kernel is compressed with {argv[0]}, which is not installed "
                          f"(apt-get install {argv[0]})") from None
    except subprocess.CalledProcessError as exc:
        raise NotBootable(f"{argv[0]} could not unpack the kernel: {exc.stderr.decode(errors='replace').strip()}"
                          ) from None


def decompress(packed: bytes) -> bytes:
    """Unpack a payload by its format's magic; the stdlib's decoders, else lz4 / zstd."""
    data, size = packed[:-4], struct.unpack("<I", packed[-4:])[0]
    if data.startswith(b"\x1f\x8b"):
        out = _stream(zlib.decompressobj(wbits=31), data)
    elif data.startswith(b"\xfd7zXZ\x00"):
        out = _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), data)
    elif data.startswith(b"\x5d\x00\x00"):
        out = _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), data)
    elif data.startswith(b"BZh"):
        out = _stream(bz2.BZ2Decompressor(), data)
    elif data.startswith(b"\x02\x21\x4c\x18"):
        out = _tool(["lz4", "-dc"], data)
    elif data.startswith(b"\x28\xb5\x2f\xfd"):
        out = _tool(["zstd", "-qdc"], data)
    else:
        raise NotBootable(f"unknown compression (payload starts {data[:6].hex()})")
    if len(out) & 0xFFFFFFFF != size:
        raise NotBootable(f"unpacked {len(out)} bytes, the kernel's build recorded {size}")
    return out


def pvh_elf(vmlinux: bytes) -> bytes:
    """The ELF part of an unpacked kernel (its relocations dropped), checked for a PVH entry note."""
    if vmlinux[:4] != b"\x7fELF" or vmlinux[4] != 2 or vmlinux[5] != 1:
        raise NotBootable("the unpacked kernel is not a 64-bit little-endian ELF")
    phoff, shoff = struct.unpack_from("<QQ", vmlinux, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", vmlinux, 0x36)
    end = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
    entry = None
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", vmlinux, phoff + i * phentsize)
        end = max(end, p_offset + p_filesz)
        if p_type == PT_NOTE:
            entry = entry or _pvh_entry(vmlinux[p_offset:p_offset + p_filesz])
    if entry is None:
        raise NoPvhEntry("the kernel has no PVH entry note (Xen PHYS32_ENTRY: CONFIG_PVH is off)")
    return vmlinux[:end]


def _pvh_entry(notes: bytes) -> int | None:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        name_at, desc_at = pos + 12, pos + 12 + (namesz + 3) // 4 * 4
        if notes[name_at:name_at + namesz].rstrip(b"\0") == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
            return int(struct.unpack_from("<I", notes, desc_at)[0])
        pos = desc_at + (descsz + 3) // 4 * 4
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    try:
        elf = pvh_elf(decompress(payload(src.read_bytes())))
    except NoPvhEntry as exc:
        print(f"pvh_vmlinux: {src}: {exc}", file=sys.stderr)
        return 3
    except (NotBootable, OSError) as exc:
        print(f"pvh_vmlinux: {src}: {exc}", file=sys.stderr)
        return 2
    out.write_bytes(elf)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
