"""Fact parsers, each fed real recorded output (no host involved)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.facts.probe import (
    ContainerRuntime, Facts, Gpu, GpuProcess, OsRelease, PythonInfo, parse_compute_apps, parse_fleet_state,
    parse_nvml_processes, parse_container, parse_df, parse_glibc, parse_nvcc, parse_nvidia_smi_header,
    parse_nvidia_smi_query, parse_nvml, parse_os_release, parse_packages, parse_probe, split_sections,
    canonical_name,
)

HW = Path(__file__).parent / "lab" / "hardware"
DATA = Path(__file__).parent / "data" / "probe"


def test_h100_query_capture():
    gpus, driver = parse_nvidia_smi_query((HW / "h100-sxm-80gb" / "query.csv").read_text())
    assert driver == "580.159.04"
    assert gpus == (Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-00000000-1111-2222-3333-555555555555", "9.0",
                        81559, "00000000:00:06.0", "Disabled"),)
    assert gpus[0].sm == 90


def test_h200_capture_without_mig_column():
    gpus, driver = parse_nvidia_smi_query((HW / "h200-sxm-141gb" / "query.csv").read_text())
    assert (gpus[0].name, gpus[0].memory_mib, gpus[0].mig_mode, driver) == ("NVIDIA H200", 143771, None, "580.159.04")


def test_cuda_version_from_plain_nvidia_smi():
    assert parse_nvidia_smi_header((HW / "h100-sxm-80gb" / "nvidia-smi.txt").read_text()) == "13.0"
    assert parse_nvidia_smi_header("no header here") is None


@pytest.mark.parametrize("profile", sorted(p.name for p in HW.iterdir() if (p / "query.csv").exists()))
def test_every_lab_profile_parses(profile):
    text = (HW / profile / "query.csv").read_text()
    if "is not a valid field" in text:  # an old driver: nvidia-smi exits non-zero, handled by parse_probe
        with pytest.raises(ValueError):
            parse_nvidia_smi_query(text)
        return
    gpus, driver = parse_nvidia_smi_query(text)
    assert gpus and driver
    assert all(g.memory_mib and g.memory_mib > 1000 for g in gpus)
    assert parse_nvidia_smi_header((HW / profile / "nvidia-smi.txt").read_text())


def test_geforce_na_fields_are_none():
    text = ("index, name, uuid, compute_cap, driver_version, memory.total [MiB], pci.bus_id, persistence_mode, "
            "ecc.mode.current, mig.mode.current\n"
            "0, NVIDIA GeForce RTX 4090, GPU-1, 8.9, 560.35.03, 24564 MiB, 00000000:01:00.0, Disabled, [N/A], [N/A]\n")
    (gpu,), _ = parse_nvidia_smi_query(text)
    assert gpu.mig_mode is None and gpu.compute_capability == "8.9"


def test_nvml_json():
    text = ('{"driver": "580.159.04", "cuda_driver": 13000, "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", '
            '"uuid": "GPU-x", "cc": [9, 0], "memory_bytes": 85520809984, "pci_bus_id": "00000000:00:06.0", '
            '"mig_mode": "Disabled"}]}')
    gpus, driver, cuda = parse_nvml(text)
    assert (driver, cuda) == ("580.159.04", "13.0")
    assert (gpus[0].compute_capability, gpus[0].memory_mib) == ("9.0", 81559)
    assert parse_nvml('{"driver": "575.57.08", "cuda_driver": 12090, "gpus": []}')[2] == "12.9"


def test_nvml_memory_and_processes():
    """The fields the probe reads since issue 25 (NVML's nvmlDeviceGetMemoryInfo and
    nvmlDeviceGetComputeRunningProcesses; a pid's memory None where the driver does not say). Constructed from
    the issue's figures, not captured: tests/gpu/prove.sh beside records the real one (nvml-apps.json)."""
    text = ('{"driver": "580.159.04", "cuda_driver": 13000, "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", '
            '"uuid": "GPU-x", "cc": [9, 0], "memory_bytes": 85520809984, "memory_used_bytes": 78921072640, '
            '"memory_free_bytes": 6096420864, "processes": [[1796, 78416707584], [2210, null]], '
            '"pci_bus_id": "00000000:00:06.0", "mig_mode": "Disabled"}]}')
    gpus, _, _ = parse_nvml(text)
    assert (gpus[0].memory_mib, gpus[0].memory_used_mib, gpus[0].memory_free_mib) == (81559, 75265, 5814)
    assert parse_nvml_processes(text) == (GpuProcess(0, 1796, 74784), GpuProcess(0, 2210, None))
    older = text.replace(', "processes": [[1796, 78416707584], [2210, null]]', "")
    assert parse_nvml_processes(older) == () and parse_nvml(older)[0][0].memory_free_mib == 5814


def test_compute_apps_csv():
    gpus, _ = parse_nvidia_smi_query((HW / "h100-sxm-80gb" / "query.csv").read_text())
    assert gpus[0].memory_used_mib is None  # captured before the query asked for memory.used/free
    apps = (DATA.parent / "gpu-memory" / "compute-apps-h100-serving.csv").read_text()
    assert parse_compute_apps(apps, gpus) == (GpuProcess(0, 1796, 74784), GpuProcess(0, 2210, None))
    assert parse_compute_apps((DATA.parent / "gpu-memory" / "compute-apps-none.csv").read_text(), gpus) == ()
    assert parse_compute_apps("fake nvidia-smi: unsupported arguments", gpus) == ()
    # The real answer on the GPU test host with the service up (an extra process_name column, by header).
    captured = (DATA.parent / "gpu-memory" / "compute-apps-h100-captured.csv").read_text()
    assert parse_compute_apps(captured, (replace(gpus[0], uuid="GPU-00000000-0000-0000-0000-000000000000"),)) == (
        GpuProcess(0, 2171, 75206),)
    with_memory = "index, uuid, memory.total [MiB], memory.used [MiB], memory.free [MiB], name\n" \
                  "0, GPU-x, 81559 MiB, 75265 MiB, 5814 MiB, NVIDIA H100 80GB HBM3\n"
    (gpu,), _ = parse_nvidia_smi_query(with_memory)
    assert (gpu.memory_used_mib, gpu.memory_free_mib) == (75265, 5814)


def test_service_processes_and_gpu_processes_round_trip():
    fleet = parse_fleet_state("current=envs/a\nservice=running\nservice_pids=1796 1797 \nservice_pids=1797 1800\n")
    assert fleet.service_pids == (1796, 1797, 1800)
    facts = Facts(fleet=fleet, gpu_processes=(GpuProcess(0, 1796, 74784),))
    again = Facts.from_dict(json.loads(json.dumps(facts.to_dict())))
    assert again == facts and again.fleet.service_pids == (1796, 1797, 1800)


def test_os_release_and_friends():
    assert parse_os_release('PRETTY_NAME="Ubuntu 24.04.3 LTS"\nID=ubuntu\nVERSION_ID="24.04"\n') == OsRelease(
        id="ubuntu", version_id="24.04", pretty_name="Ubuntu 24.04.3 LTS")
    assert parse_glibc("glibc 2.39") == "2.39"
    assert parse_glibc("ldd (Debian GLIBC 2.36-9+deb12u14) 2.36") == "2.36"
    assert parse_nvcc("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
                      "Build cuda_13.0.r13.0/compiler.36424714_0") == "13.0.88"
    assert parse_nvcc("") is None
    df = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda 264091588 23000000 83886080 22% /\n"
    assert parse_df(df) == 80.0
    assert parse_container("name=docker\nserver=28.2.2\nruntimes={\"nvidia\":{}}") == ContainerRuntime(
        "docker", nvidia_runtime=True, server="28.2.2")
    assert parse_container("nvidia=no") is None


def test_sections_survive_a_cut_off_probe():
    out = "@@fleetctl user\nroot\n@@rc 0\n@@fleetctl nvidia-smi-query\nindex, name"
    assert split_sections(out) == {"user": ("root", 0), "nvidia-smi-query": ("index, name", None)}


@pytest.mark.parametrize("path", sorted(DATA.glob("*.txt")), ids=lambda p: p.stem)
def test_recorded_probe_outputs(path):
    """Whole probe outputs recorded on real machines parse without loss."""
    facts = parse_probe(path.read_text())
    assert facts.arch in ("x86_64", "aarch64") and facts.glibc and facts.python and facts.os.id
    if "gpu" in path.stem:
        assert facts.gpus and all(g.compute_capability for g in facts.gpus)
        assert facts.cuda_driver_version and facts.driver_version


def test_nvml_probe_recorded_on_the_gpu_test_host():
    """The whole probe as it ran on the H200 test host (UUID replaced); NVML answered there."""
    facts = parse_probe((DATA / "gpu-h200-nvml.txt").read_text())
    assert facts.gpu_source == "nvml"
    assert (facts.driver_version, facts.cuda_driver_version, facts.nvcc) == ("580.159.04", "13.0", "13.0.88")
    (gpu,) = facts.gpus
    assert (gpu.name, gpu.compute_capability, gpu.memory_mib, gpu.pci_bus_id, gpu.mig_mode) == (
        "NVIDIA H200", "9.0", 143771, "00000000:00:06.0", "Disabled")
    assert facts.python == PythonInfo(path="/opt/torch/.venv/bin/python3", version="3.12.3", torch="2.11.0",
                                      torch_cuda="13.0", packages={})  # recorded before the probe listed distributions
    assert (facts.os.id, facts.glibc) == ("ubuntu", "2.39")
    # Recorded after fleetctl provisioned the host with playbooks/kernels-only.yml.
    assert facts.fleet.current == facts.fleet.envs[0] == "envs/kernels-torch-2.11.0-c3c319b121"
    assert (facts.installed.flashinfer, facts.installed.torch) == ("0.7.2.post1", "2.11.0")


def test_probe_lists_the_host_pythons_distributions():
    """Recorded on the CI machine with fleetctl's own venv as the host Python (no torch there):
    every distribution it sees, PEP 503 names, versions as installed."""
    facts = parse_probe((DATA / "cpu-venv-packages.txt").read_text())
    python = facts.python
    assert (python.path, python.version, python.torch, python.torch_cuda) == (
        "/work/main/.venv/bin/python", "3.11.7", None, None)
    packages = python.packages
    assert packages["fabric"] == "3.2.3" and packages["pip"] == "23.2.1" and packages["nvidia-ml-py"] == "13.615.71"
    assert "markupsafe" in packages and "MarkupSafe" not in packages
    assert all(name == canonical_name(name) for name in packages)
    assert (facts.glibc, facts.arch) == ("2.36", "x86_64")


def test_packages_line_normalises_names_and_keeps_the_first():
    assert parse_packages("Typing_Extensions==4.12.2 torch==2.11.0+cu130 typing.extensions==4.0 junk ==1 x==") == {
        "typing-extensions": "4.12.2", "torch": "2.11.0+cu130"}
    assert parse_packages("") == {}
