"""The CUDA architectures a shared library carries, read from its fatbin sections.

nvcc embeds device code in an ELF section ``.nv_fatbin`` (and ``__nv_relfatbin`` for
relocatable device code): a run of fatbin containers, each a 16-byte header (magic
0xBA55ED50, version, header size, size of the entries that follow) and then entries, each
with its own header (kind: 1 = PTX, 2 = ELF/SASS; header size; payload size; and at byte
28 the sm number, 90 for sm_90). Only those headers are read: the file is mmapped, so a
library of hundreds of MB costs the pages its headers sit on, not its size.

One module (container) can carry no kernel at all: a .cu file of only device globals,
built for nvcc's default arch (vLLM 0.11.0's machete_pytorch.cu, sm_52). Its arch is no
target of the library, so a module whose SASS is an uncompressed cubin with no ``.text.*``
section is left out of :func:`arches_of`. A compressed cubin is not opened: it counts.

The reader is pure (a path in, an :class:`Arches` value out); a file that is not a 64-bit
little-endian ELF, or whose fatbin is cut short, is one :class:`~fleetctl.errors.BinaryError`.
"""

from __future__ import annotations

import mmap
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fleetctl.errors import BinaryError

FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")
FATBIN_MAGIC = 0xBA55ED50
KIND_PTX = 1
KIND_SASS = 2

# vLLM's main extension: _C.abi3.so in 0.11.0, _C_stable_libtorch.abi3.so in 0.26.0 and 0.33.0.
VLLM_MEMBERS = ("vllm/_C.abi3.so", "vllm/_C_stable_libtorch.abi3.so")
# torch's kernels live in libtorch_cuda.so; libtorch_cuda_linalg.so (magma, older arches) does not set where torch runs
TORCH_MEMBER = "torch/lib/libtorch_cuda.so"

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_CONTAINER = struct.Struct("<IHHQ")
_ENTRY = struct.Struct("<HHIQ")
_ENTRY_ARCH = struct.Struct("<I")
_ENTRY_ARCH_AT = 28


@dataclass(frozen=True)
class Entry:
    """One fatbin entry: its kind (KIND_PTX or KIND_SASS, others kept as read) and sm number;
    *kernels* is False only for an uncompressed cubin with no kernel in it."""

    kind: int
    arch: int
    kernels: bool = True


@dataclass(frozen=True)
class Arches:
    """The sm numbers a library has SASS and PTX for, sorted (sm_90 → 90)."""

    sass: tuple[int, ...]
    ptx: tuple[int, ...]


def arches_of(modules: tuple[tuple[Entry, ...], ...]) -> Arches:
    """The union of the SASS and PTX arches over the modules (fatbin containers) with a kernel."""
    entries = [e for module in modules if all(e.kernels for e in module) for e in module]
    return Arches(
        sass=tuple(sorted({e.arch for e in entries if e.kind == KIND_SASS})),
        ptx=tuple(sorted({e.arch for e in entries if e.kind == KIND_PTX})),
    )


def read_arches(path: str | Path) -> Arches:
    """The SASS and PTX architectures of the shared library at *path*."""
    return arches_of(read_modules(path))


def read_modules(path: str | Path) -> tuple[tuple[Entry, ...], ...]:
    """Every fatbin container in the library at *path*, each as the tuple of its entries."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise BinaryError(f"{path}: empty file, not an ELF shared library")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return parse_modules(data, str(path))
    except OSError as exc:
        raise BinaryError(f"{path}: cannot read: {exc.strerror}") from None


def parse_modules(data, where: str = "<bytes>") -> tuple[tuple[Entry, ...], ...]:
    """Every fatbin container in an ELF image (bytes or mmap); *where* names it in errors."""
    modules: list[tuple[Entry, ...]] = []
    for name, start, size in _sections(data, where):
        if name in FATBIN_SECTIONS:
            modules.extend(_containers(data, start, start + size, where, name))
    return tuple(modules)


def wheel_arches(wheel_path: str | Path, member: str | None = None) -> Arches:
    """The arches of one library inside a wheel, copying out only that member.

    *member* defaults to the first of VLLM_MEMBERS the wheel holds."""
    wheel_path = Path(wheel_path)
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            names = set(wheel.namelist())
            wanted = (member,) if member else VLLM_MEMBERS
            found = next((m for m in wanted if m in names), None)
            if found is None:
                raise BinaryError(f"{wheel_path}: no {' or '.join(wanted)} in the wheel")
            # A deflated member cannot be mmapped or seeked cheaply; one streamed copy can.
            with tempfile.TemporaryDirectory(prefix="fleetctl-fatbin-") as tmp:
                out = Path(tmp) / Path(found).name
                with wheel.open(found) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return read_arches(out)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise BinaryError(f"{wheel_path}: not a readable wheel: {exc}") from None
    except OSError as exc:
        raise BinaryError(f"{wheel_path}: cannot read: {exc.strerror or exc}") from None


def _unpack(fmt: struct.Struct, data, offset: int, where: str, what: str) -> tuple:
    if offset < 0 or offset + fmt.size > len(data):
        raise BinaryError(f"{where}: truncated: {what} at byte {offset} runs past the end ({len(data)} bytes)")
    return fmt.unpack_from(data, offset)


def _sections(data, where: str, base: int = 0) -> list[tuple[str, int, int]]:
    """(name, offset from *base*, size) of each section of the 64-bit little-endian ELF at *base*."""
    if len(data) < base + 4 or data[base:base + 4] != b"\x7fELF":
        raise BinaryError(f"{where}: not an ELF file")
    ident, *_, shoff, _flags, _ehsize, _phentsize, _phnum, shentsize, shnum, shstrndx = _unpack(
        _ELF_HEADER, data, base, where, "the ELF header")
    if ident[4] != 2 or ident[5] != 1:
        raise BinaryError(f"{where}: not a 64-bit little-endian ELF (class {ident[4]}, data {ident[5]})")
    if shnum == 0:
        return []
    if shentsize != _SECTION.size or shstrndx >= shnum:
        raise BinaryError(f"{where}: malformed ELF section table")
    headers = [_unpack(_SECTION, data, base + shoff + i * shentsize, where, f"section header {i}")
               for i in range(shnum)]
    strtab = base + headers[shstrndx][4]
    sections = []
    for name_at, sh_type, _f, _a, offset, size, *_ in headers:
        name = _cstring(data, strtab + name_at, where)
        # SHT_NOBITS (8) occupies no bytes in the file.
        if sh_type != 8 and base + offset + size > len(data):
            raise BinaryError(f"{where}: truncated: section {name} runs past the end of the file")
        sections.append((name, offset, size))
    return sections


def _cstring(data, offset: int, where: str) -> str:
    end = data.find(b"\0", offset, offset + (1 << 16))  # cubin section names carry mangled kernel names
    if end < 0:
        raise BinaryError(f"{where}: malformed ELF section name at byte {offset}")
    return bytes(data[offset:end]).decode("ascii", "replace")


def _containers(data, offset: int, end: int, where: str, section: str) -> list[tuple[Entry, ...]]:
    modules = []
    while offset < end:
        if data[offset:offset + 4] == b"\0\0\0\0":
            # Containers are aligned; the linker pads between them with zeros.
            offset += 4
            continue
        magic, _version, header_size, entries_size = _unpack(_CONTAINER, data, offset, where, f"{section} container")
        if magic != FATBIN_MAGIC:
            raise BinaryError(f"{where}: {section}: no fatbin magic at byte {offset} (found {magic:#x})")
        first, last = offset + header_size, offset + header_size + entries_size
        if last > end:
            raise BinaryError(f"{where}: truncated: {section} container at byte {offset} runs past its section")
        modules.append(_entries(data, first, last, where, section))
        offset = last
    return modules


def _entries(data, offset: int, end: int, where: str, section: str) -> tuple[Entry, ...]:
    entries = []
    while offset < end:
        kind, _version, header_size, payload_size = _unpack(_ENTRY, data, offset, where, f"{section} entry")
        if header_size < _ENTRY_ARCH_AT + _ENTRY_ARCH.size:
            raise BinaryError(f"{where}: {section}: entry at byte {offset} has a {header_size}-byte header")
        (arch,) = _unpack(_ENTRY_ARCH, data, offset + _ENTRY_ARCH_AT, where, f"{section} entry")
        payload = offset + header_size
        kernels = kind != KIND_SASS or _has_kernel(data, payload, where)
        entries.append(Entry(kind=kind, arch=arch, kernels=kernels))
        offset += header_size + payload_size
    if offset != end:
        raise BinaryError(f"{where}: {section}: entries overrun their container by {offset - end} bytes")
    return tuple(entries)


def _has_kernel(data, cubin: int, where: str) -> bool:
    """Does the cubin at *cubin* hold a kernel (a ``.text.<name>`` section)? A compressed one
    (no ELF magic) cannot be told without inflating it, nor one not 64-bit little-endian:
    both are taken to hold one."""
    if data[cubin:cubin + 6] != b"\x7fELF\x02\x01":
        return True
    return any(name.startswith(".text.") for name, _, _ in _sections(data, f"{where}: cubin at byte {cubin}", cubin))
