"""The fatbin reader against real vLLM libraries' fatbin headers (tests/data/fatbin, made by
make_fixture.py from the wheels SOURCES.md names), the matrix rows typed by hand from
cuobjdump, and broken files: each a BinaryError, never a struct.error or a traceback."""

from __future__ import annotations

import lzma
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from fleetctl.errors import BinaryError, FleetError
from fleetctl.fatbin import (
    KIND_PTX, KIND_SASS, Arches, Entry, arches_of, parse_modules, read_arches, read_modules, wheel_arches,
)
from fleetctl.matrix import load_matrix

DATA = Path(__file__).parent / "data" / "fatbin"
FIXTURES = {
    "0.11.0": DATA / "vllm-0.11.0-_C.abi3.so.elf.xz",
    "0.26.0": DATA / "vllm-0.26.0-_C_stable_libtorch.abi3.so.elf.xz",
    "0.33.0": DATA / "vllm-0.33.0-_C_stable_libtorch.abi3.so.elf.xz",
}


def unpack(fixture: Path, out: Path) -> Path:
    """The fixture's synthetic ELF, streamed out of its xz into *out*."""
    with lzma.open(fixture) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out


@pytest.fixture
def library(request, tmp_path):
    path = unpack(FIXTURES[request.param], tmp_path / f"{request.param}.so")
    yield path
    path.unlink()


@pytest.mark.parametrize("library", ["0.26.0", "0.33.0"], indirect=True)
def test_real_arches_equal_the_hand_written_row(library):
    row = next(v for v in load_matrix().vllm if v.version == library.stem)
    assert read_arches(library) == Arches(sass=row.sm, ptx=row.ptx)


@pytest.mark.parametrize("library", ["0.11.0"], indirect=True)
def test_0_11_0_carries_one_sm_52_module_the_row_leaves_out(library):
    # One 3.5 KB container of vllm 0.11.0's _C.abi3.so holds sm_52 SASS and compute_52 PTX
    # (nvcc's default arch); every other container matches the row typed from cuobjdump.
    # The union is what the binary carries; the row is what vLLM's kernels target.
    row = next(v for v in load_matrix().vllm if v.version == "0.11.0")
    modules = read_modules(library)
    odd = [m for m in modules if any(e.arch == 52 for e in m)]
    assert odd == [(Entry(KIND_SASS, 52), Entry(KIND_PTX, 52))]
    assert arches_of(tuple(m for m in modules if m not in odd)) == Arches(sass=row.sm, ptx=row.ptx)
    assert read_arches(library) == Arches(sass=(52, *row.sm), ptx=(52, *row.ptx))


@pytest.mark.parametrize("library", ["0.33.0"], indirect=True)
def test_wheel_arches_reads_the_member_without_extracting_the_wheel(library, tmp_path):
    wheel = tmp_path / "vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("vllm/__init__.py", "")
        z.write(library, "vllm/_C_stable_libtorch.abi3.so")
    assert wheel_arches(wheel) == read_arches(library)
    with pytest.raises(BinaryError, match="no vllm/_C.abi3.so in the wheel"):
        wheel_arches(wheel, member="vllm/_C.abi3.so")


def test_a_library_without_fatbin_has_no_arches():
    assert read_arches(Path(sys.executable).resolve()) == Arches((), ())  # the Python binary: ELF, no device code


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"#!/bin/sh\necho not a library\n", "not an ELF file"),
    (b"\x7fELF\x01\x01\x01" + b"\0" * 60, "not a 64-bit little-endian ELF"),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 20, "truncated: the ELF header"),
])
def test_a_non_elf_file_is_one_binary_error(tmp_path, content, message):
    path = tmp_path / "lib.so"
    path.write_bytes(content)
    with pytest.raises(BinaryError, match=message) as err:
        read_arches(path)
    assert isinstance(err.value, FleetError) and str(path) in str(err.value)


@pytest.mark.parametrize("keep", [0.999, 0.5])
def test_a_truncated_library_is_one_binary_error(tmp_path, keep):
    image = lzma.decompress(FIXTURES["0.26.0"].read_bytes())
    path = tmp_path / "cut.so"
    path.write_bytes(image[:int(len(image) * keep)])
    with pytest.raises(BinaryError, match="truncated"):
        read_arches(path)


def test_a_fatbin_cut_mid_container_is_one_binary_error():
    image = bytearray(lzma.decompress(FIXTURES["0.26.0"].read_bytes()))
    start = image.find(b"\x50\xed\x55\xba")
    image[start + 8:start + 16] = (10**12).to_bytes(8, "little")  # a container larger than its section
    with pytest.raises(BinaryError, match="runs past its section"):
        parse_modules(bytes(image), "cut")
    image[start:start + 4] = b"JUNK"
    with pytest.raises(BinaryError, match="no fatbin magic"):
        parse_modules(bytes(image), "cut")


def test_a_missing_file_and_a_broken_wheel_are_binary_errors(tmp_path):
    with pytest.raises(BinaryError, match="cannot read"):
        read_arches(tmp_path / "absent.so")
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(BinaryError, match="not a readable wheel"):
        wheel_arches(tmp_path / "bad.whl")
