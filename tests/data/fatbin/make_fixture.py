"""Make a fatbin test fixture from a real library: python make_fixture.py LIB.so OUT.elf.xz

The fixture is a synthetic 64-bit ELF holding only what fleetctl.knowledge.fatbin reads: an ELF
header, a section table, .shstrtab, and the library's .nv_fatbin / __nv_relfatbin sections
byte for byte in their headers (every container header and every entry header is the
real one, sizes included) with every payload byte replaced by zero, except what the
reader opens of an uncompressed cubin payload (its ELF header, section table and section
names, to see whether it holds a kernel) for every cubin without a kernel and, per arch,
the cubin with kernels whose names are shortest; the other cubins, zeroed, read as
compressed ones do (taken to hold kernels), which is what they are. The zeros keep each entry at its real offset, so
the reader walks the same layout as in the real library, and they compress away: the file
is xz-compressed and stays tens of KB. No device code from the library survives in it.
"""

from __future__ import annotations

import lzma
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from fleetctl.knowledge.fatbin import _CONTAINER, _ELF_HEADER, _ENTRY, _SECTION, FATBIN_SECTIONS, _sections  # noqa: E402


def cubin_headers(section: bytes, cubin: int) -> list[tuple[int, int]]:
    """(start, size) of the parts of the uncompressed cubin at *cubin* that the reader reads."""
    *_, shoff, _f, _eh, _ph, _pn, shentsize, shnum, shstrndx = _ELF_HEADER.unpack_from(section, cubin)
    strtab = _SECTION.unpack_from(section, cubin + shoff + shstrndx * shentsize)
    return [(cubin, _ELF_HEADER.size), (cubin + shoff, shentsize * shnum), (cubin + strtab[4], strtab[5])]


def kept_cubins(section: bytes, cubins: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Header spans of the cubins to keep: all without a kernel, per arch the smallest with one."""
    kept, smallest = [], {}
    for arch, cubin in cubins:
        spans = cubin_headers(section, cubin)
        names = [n for n, _, _ in _sections(section, "cubin", cubin)]
        if not any(n.startswith(".text.") for n in names):
            kept.append(spans)
        elif arch not in smallest or spans[2][1] < smallest[arch][2][1]:
            smallest[arch] = spans
    return kept + list(smallest.values())


def cut_payloads(section: bytes) -> bytes:
    """The section with container and entry headers kept and everything else zeroed."""
    out = bytearray(len(section))
    cubins: list[tuple[int, int]] = []
    offset = 0
    while offset < len(section):
        if section[offset:offset + 4] == b"\0\0\0\0":
            offset += 4
            continue
        _magic, _v, header_size, entries_size = _CONTAINER.unpack_from(section, offset)
        out[offset:offset + header_size] = section[offset:offset + header_size]
        entry, end = offset + header_size, offset + header_size + entries_size
        while entry < end:
            _kind, _v, entry_header, payload = _ENTRY.unpack_from(section, entry)
            out[entry:entry + entry_header] = section[entry:entry + entry_header]
            if _kind == 2 and section[entry + entry_header:entry + entry_header + 4] == b"\x7fELF":
                cubins.append((struct.unpack_from("<I", section, entry + 28)[0], entry + entry_header))
            entry += entry_header + payload
        offset = end
    for spans in kept_cubins(section, cubins):
        for start, size in spans:
            out[start:start + size] = section[start:start + size]
    return bytes(out)


def synthetic_elf(library: bytes) -> bytes:
    """A minimal ELF whose only content sections are the library's fatbin sections, payloads cut."""
    kept = [(name, cut_payloads(library[start:start + size]))
            for name, start, size in _sections(library, "library") if name in FATBIN_SECTIONS]
    names = b"\0.shstrtab\0" + b"".join(name.encode() + b"\0" for name, _ in kept)
    body, layout, offset = bytearray(), [], 64
    body += names
    layout.append((1, 3, offset, len(names)))  # .shstrtab, SHT_STRTAB
    offset += len(names)
    name_at = len(b"\0.shstrtab\0")
    for name, data in kept:
        pad = -offset % 8
        body += b"\0" * pad
        offset += pad
        layout.append((name_at, 1, offset, len(data)))  # SHT_PROGBITS
        body += data
        offset += len(data)
        name_at += len(name) + 1
    pad = -offset % 8
    body += b"\0" * pad
    shoff = offset + pad
    table = _SECTION.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0) + b"".join(
        _SECTION.pack(n, t, 0, 0, off, size, 0, 0, 8, 0) for n, t, off, size in layout)
    ident = library[:16]
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0,
                         _SECTION.size, len(layout) + 1, 1)
    return header + bytes(body) + table


def main(library: str, out: str) -> None:
    data = Path(library).read_bytes()
    Path(out).write_bytes(lzma.compress(synthetic_elf(data), preset=9 | lzma.PRESET_EXTREME))


if __name__ == "__main__":
    main(*sys.argv[1:])
