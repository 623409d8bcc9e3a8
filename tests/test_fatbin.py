"""The fatbin reader against real vLLM libraries' fatbin headers (tests/data/fatbin, made by
make_fixture.py from the wheels SOURCES.md names), the matrix rows typed by hand from
cuobjdump, and broken files: each a BinaryError, never a struct.error or a traceback."""

from __future__ import annotations

import lzma
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.errors import BinaryError, FleetError
from fleetctl.knowledge.fatbin import (
    KIND_PTX, KIND_SASS, Arches, Entry, arches_of, parse_modules, read_arches, read_modules, wheel_arches,
)
from fleetctl.knowledge.matrix import covers, load_matrix

DATA = Path(__file__).parent / "data" / "fatbin"
FIXTURES = {
    "0.11.0": DATA / "vllm-0.11.0-_C.abi3.so.elf.xz",
    "0.26.0": DATA / "vllm-0.26.0-_C_stable_libtorch.abi3.so.elf.xz",
    "0.33.0": DATA / "vllm-0.33.0-_C_stable_libtorch.abi3.so.elf.xz",
    "torch-2.9.0": DATA / "torch-2.9.0-libtorch_cuda.so.elf.xz",
}


def unpack(fixture: Path, out: Path) -> Path:
    """The fixture's synthetic ELF, streamed out of its xz into *out* as a sparse file: its zeroed
    payloads (914 MB of torch's 0.9 GB library) are holes, so it takes a few MB of disk."""
    page = bytes(4096)
    with lzma.open(fixture) as src, out.open("wb") as dst:
        while chunk := src.read(1 << 20):
            view = memoryview(chunk)
            for at in range(0, len(chunk), len(page)):
                part = view[at:at + len(page)]
                if part == page[:len(part)]:
                    dst.seek(len(part), 1)
                else:
                    dst.write(part)
        dst.truncate()
    return out


@pytest.fixture
def library(request, tmp_path):
    path = unpack(FIXTURES[request.param], tmp_path / f"{request.param}.so")
    yield path
    path.unlink()


@pytest.mark.parametrize("library", ["0.11.0", "0.26.0", "0.33.0"], indirect=True)
def test_real_arches_equal_the_hand_written_row(library):
    row = next(v for v in load_matrix().vllm if v.version == library.stem)
    assert read_arches(library) == Arches(sass=row.sm, ptx=row.ptx)


@pytest.mark.parametrize("library", ["torch-2.9.0"], indirect=True)
def test_torch_arches_run_where_the_hand_written_row_runs(library):
    # torch 2.9.0's PyPI build (cu128): 397 fatbin containers in libtorch_cuda.so. One of them (torch's
    # FP8 rowwise GEMMs, built per file for Ada/Hopper/Blackwell) holds sm_89 SASS too, which the arch
    # list typed from TORCH_CUDA_ARCH_LIST leaves out. sm_89 runs sm_86 SASS anyway: on every compute
    # capability the binary and the row say the same.
    torch = next(t for t in load_matrix().torch if t.version == "2.9.0")
    row = next(v for v in torch.variants if v.name == torch.default)
    read = read_arches(library)
    assert (row.name, read.ptx) == ("cu128", row.ptx)
    assert set(read.sass) - set(row.sm) == {89} and set(row.sm) <= set(read.sass)
    assert all(covers(read.sass, sm, read.ptx) == covers(row.sm, sm, row.ptx) for sm in range(30, 130))
    modules = read_modules(library)
    assert (len(modules), sum(any(e.arch == 89 for e in m) for m in modules)) == (397, 1)


@pytest.mark.parametrize("library", ["0.11.0"], indirect=True)
def test_modules_without_a_kernel_do_not_count(library):
    # vllm 0.11.0's _C.abi3.so holds machete_pytorch.cu built for nvcc's default sm_52 too:
    # a 3.5 KB module of device globals and no kernel. Counted, it would claim sm_52 SASS and
    # compute_52 PTX (a JIT path to every GPU) that no kernel of vLLM has.
    modules = read_modules(library)
    empty = [m for m in modules if not all(e.kernels for e in m)]
    assert (Entry(KIND_SASS, 52, kernels=False), Entry(KIND_PTX, 52)) in empty
    assert 52 in arches_of(tuple(tuple(replace(e, kernels=True) for e in m) for m in modules)).ptx
    assert 52 not in read_arches(library).sass + read_arches(library).ptx


def test_arches_are_the_union_over_modules_with_kernels():
    modules = (
        (Entry(KIND_SASS, 80), Entry(KIND_SASS, 90), Entry(KIND_PTX, 90)),
        (Entry(KIND_SASS, 75), Entry(KIND_SASS, 80)),
        (Entry(KIND_SASS, 52, kernels=False), Entry(KIND_PTX, 52)),
        (Entry(8, 100),),  # neither PTX nor SASS: read, not counted
    )
    assert arches_of(modules) == Arches(sass=(75, 80, 90), ptx=(90,))


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
