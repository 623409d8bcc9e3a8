"""driver.py: the driver move per host, as data — the lab's hardware fixtures and the GPU test hosts'
captures (through fleetctl.facts.probe' parsers) × distributions — and the package names checked against the
real distributions' package indexes recorded in tests/data/driver/ (SOURCES.md says from where)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest
from rich.console import Console

from fleetctl.decide.driver import DriverMove, branch_of, plan_move
from fleetctl.decide.plan import plan_host
from fleetctl.facts.probe import (FabricManager, Facts, GpuHealth, Health, OsRelease, PythonInfo, parse_nvidia_smi_header,
                            parse_nvidia_smi_query)
from fleetctl.hosts.inventory import Host
from fleetctl.knowledge.matrix import DRIVER_DISTROS, load_matrix
from fleetctl.report import plan_table
from tests.conftest import ROOT, fleetctl

MATRIX = load_matrix()
TODAY = date(2026, 11, 27)
HARDWARE = ROOT / "tests" / "lab" / "hardware"
CAPTURES = ROOT.parent / "shared" / "fixtures" / "nvidia-smi"
DATA = ROOT / "tests" / "data" / "driver"
OS = {"ubuntu-22.04": OsRelease("ubuntu", "22.04", "Ubuntu 22.04.5 LTS"),
      "ubuntu-24.04": OsRelease("ubuntu", "24.04", "Ubuntu 24.04.1 LTS"),
      "rhel-9": OsRelease("rhel", "9.4", "Red Hat Enterprise Linux 9.4"),
      "rocky-9": OsRelease("rocky", "9.5", "Rocky Linux 9.5"),
      "almalinux-9": OsRelease("almalinux", "9.4", "AlmaLinux 9.4")}


def hardware(name: str, os: str = "ubuntu-24.04") -> Facts:
    """A lab hardware fixture (or, where the lab has none, a real capture) as facts on *os*."""
    folder = HARDWARE / name if (HARDWARE / name).is_dir() else CAPTURES / name
    query = folder / "query.csv" if (folder / "query.csv").exists() else folder / "nvidia-smi-query.csv"
    gpus, driver = parse_nvidia_smi_query(query.read_text())
    return Facts(gpus=gpus, driver_version=driver, os=OS[os], arch="x86_64", glibc="2.39",
                 python=PythonInfo("/usr/bin/python3", "3.12.3"),
                 cuda_driver_version=parse_nvidia_smi_header((folder / "nvidia-smi.txt").read_text()))


def move(facts: Facts, cuda: str = "13.0", branch: str = "auto", cuda_compat: str = "strict") -> DriverMove | None:
    """The move to *cuda*; strictly by default, so that a 12.x move is not already covered by 12.x's
    minor-version compatibility (the resolver's default, tested on its own below)."""
    return plan_move(facts, cuda, branch, MATRIX, today=TODAY, cuda_compat=cuda_compat)


# ---------------------------------------------------------------- which branch, which flavour

@pytest.mark.parametrize("os", ["ubuntu-22.04", "ubuntu-24.04", "rhel-9", "rocky-9", "almalinux-9"])
@pytest.mark.parametrize("name, cuda, flavor", [
    ("a100-sxm4-80gb", "13.0", "open"),  # 570 → R580, Ampere: open recommended
    ("l4", "13.0", "open"),
    ("t4", "13.0", "open"),  # Turing is the open modules' floor
    ("rtx4090", "13.0", "open"),
    ("rtx5090", "13.0", "open"),  # Blackwell: open required
    ("mixed-a100-a10", "13.0", "open"),
    ("v100-sxm2-32gb", "12.9", "proprietary"),  # Volta: no open modules (12.9 strictly: R535 runs it under MVC)
    ("a100-mig", "12.9", "open"),
])
def test_hosts_that_need_a_move_get_r580_with_the_flavour_of_their_gpus(name, cuda, flavor, os):
    m = move(hardware(name, os), cuda, cuda_compat="minor" if cuda == "13.0" else "strict")
    assert m.ok and m.branch == "580" and m.flavor == flavor and m.min_version == "580.65.06", m
    assert m.distro == ("rhel-9" if os in ("rhel-9", "rocky-9", "almalinux-9") else os)
    assert any("LTSB until 2028-06" in r for r in m.reasons) and any(f"{flavor} kernel modules" in r for r in m.reasons)
    packages = " ".join(m.install)
    if m.distro == "rhel-9":
        stream = "nvidia-driver:580-open" if flavor == "open" else "nvidia-driver:580-dkms"
        assert m.install == ("dnf -y module reset nvidia-driver", f"dnf -y module enable {stream}",
                             f"dnf -y install --allowerasing {'nvidia-open' if flavor == 'open' else 'cuda-drivers'}")
    else:
        package = "nvidia-driver-580-server-open" if flavor == "open" else "nvidia-driver-580-server"
        assert packages.endswith(f"--allow-change-held-packages {package} apt-mark hold {package}"), packages
        assert "--no-install-recommends" in packages


@pytest.mark.parametrize("name", ["b200", "h100-sxm-80gb", "h200-sxm-141gb", "unknown-gpu"])
def test_a_driver_that_runs_the_cuda_needs_no_move(name):
    assert move(hardware(name), "13.0") is None
    assert move(hardware(name), "12.4") is None  # older CUDA: backward compatibility


def test_minor_version_compatibility_is_the_resolvers_rule():
    """R580 runs CUDA 13.2 under minor-version compatibility (the resolver's default), not under strict."""
    h100 = hardware("h100-sxm-80gb")
    assert move(h100, "13.2", cuda_compat="minor") is None
    strict = move(h100, "13.2", cuda_compat="strict")
    assert strict.ok and strict.branch == "595" and "PB until 2027-03" in " ".join(strict.reasons)
    assert strict.distro == "ubuntu-24.04" and strict.packages == ("nvidia-driver-595-open",)


def test_h100_on_r535_moves_to_open_modules_and_rolls_back_to_its_exact_version():
    h100 = replace(hardware("h100-sxm-80gb"), driver_version="535.161.08", cuda_driver_version="12.2")
    m = move(h100)
    assert m.summary == "535.161.08 → R580 (open)"
    assert "recommended by NVIDIA for Turing and newer" in " ".join(m.reasons)
    # R535's default was the proprietary modules: the rollback puts back that exact release, held
    assert m.rollback == ("apt-get update",
                          "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                          "--allow-change-held-packages --allow-downgrades 'nvidia-driver-535-server=535.161.08-*'",
                          "apt-mark hold nvidia-driver-535-server")


def test_b200_and_a_pre_turing_gpu_in_one_host_is_refused():
    b200 = hardware("b200")
    v100 = hardware("v100-sxm2-32gb").gpus[0]
    mixed = replace(b200, gpus=b200.gpus + (v100,), driver_version="570.195.03", cuda_driver_version="12.8")
    m = move(mixed, "12.9")
    assert not m.ok and "mixes pre-Turing (sm_70) and Blackwell (sm_100)" in m.refusal and m.fix
    assert m.install == () and m.rollback == ()


def test_a_v100_host_is_not_moved_for_a_cuda_that_has_no_volta_code():
    m = move(hardware("v100-sxm2-32gb"), "13.0")
    assert not m.ok and "builds no code for sm_70" in m.refusal


@pytest.mark.parametrize("branch, cuda, refusal, fix", [
    ("570", "13.0", "R570 runs CUDA ≤ 12.8 natively, not 13.0", "use --driver 580"),
    ("535", "12.9", "R535 runs CUDA ≤ 12.2 natively, not 12.9", "use --driver 575"),
    ("470", "13.0", "R470 is not in the matrix", "--driver auto"),
])
def test_an_explicit_branch_too_old_is_refused_naming_the_one_that_would_do(branch, cuda, refusal, fix):
    m = move(hardware("l4"), cuda, branch)
    assert not m.ok and m.refusal == refusal and fix in m.fix


def test_r590_drops_volta():
    m = move(hardware("v100-sxm2-32gb"), "12.9", "590")
    assert not m.ok and "does not drive sm_70 (pre-Turing GPUs end with R580)" in m.refusal and m.fix == "use --driver 575"


def test_auto_prefers_a_supported_ltsb_or_pb_and_knows_the_date():
    l4 = hardware("l4")  # R550 → CUDA 12.4
    assert move(l4, "12.8").branch == "580"  # R570 ended 2026-02; R575 is an NFB
    assert plan_move(l4, "12.8", "auto", MATRIX, today=date(2025, 9, 1), cuda_compat="strict").branch == "570"
    nfb = move(l4, "12.9", "575")  # an NFB only when asked for, from NVIDIA's repository on Ubuntu
    assert nfb.ok and nfb.source == "NVIDIA's CUDA repository" and nfb.packages == ("nvidia-open-575",)
    assert "NFB: NVIDIA gives no end of life, supported only until the next branch" in " ".join(nfb.reasons)


def test_an_ubuntu_package_that_is_now_transitional_comes_from_nvidias_repository():
    m = move(hardware("t4"), "12.8", "570")
    assert m.packages == ("nvidia-open-570",)
    assert "nvidia-driver-570-server-open is now transitional to R580" in " ".join(m.reasons)
    assert "past its end of life, 2026-02" in " ".join(m.reasons)


@pytest.mark.parametrize("os, why", [
    (OsRelease("debian", "12", "Debian GNU/Linux 12 (bookworm)"), "Debian GNU/Linux 12"),
    (OsRelease("ubuntu", "20.04", "Ubuntu 20.04.6 LTS"), "Ubuntu 20.04"),
    (OsRelease("rhel", "8.9", "Red Hat Enterprise Linux 8.9"), "Red Hat Enterprise Linux 8.9"),
])
def test_other_distributions_are_refused_in_one_line(os, why):
    m = move(replace(hardware("l4"), os=os))
    assert not m.ok and why in m.refusal and "Ubuntu 22.04/24.04" in m.fix and "\n" not in m.refusal + m.fix


def test_grace_hopper_needs_the_open_modules_even_on_r535():
    h100 = hardware("h100-sxm-80gb")
    gh = replace(h100, gpus=tuple(replace(g, name="NVIDIA GH200 480GB") for g in h100.gpus),
                 driver_version="535.161.08", cuda_driver_version="12.2")
    assert move(gh, "12.2", "535") is None  # its driver runs 12.2
    old = replace(gh, driver_version="525.147.05", cuda_driver_version="12.0")
    m = move(replace(old, os=OS["rhel-9"]), "12.2", "535")
    assert m.flavor == "open" and "Grace Hopper" in " ".join(m.reasons) and m.packages == ("nvidia-driver:535-open",)
    ubuntu = move(old, "12.2", "535")  # Ubuntu's R535 is transitional now, NVIDIA's repository has no open R535
    assert not ubuntu.ok and "open R535" in ubuntu.refusal


def test_branch_of():
    assert branch_of("570.133.20") == "570" and branch_of(None) is None and branch_of("n/a") is None


# ---------------------------------------------------------------- the real package indexes

def ubuntu_index(release: str) -> dict[str, list[tuple[str, str | None]]]:
    """{package: [(version, transitional target or None)]} from a recorded Ubuntu excerpt."""
    out: dict[str, list[tuple[str, str | None]]] = {}
    for stanza in (DATA / f"ubuntu-{release}-restricted.txt").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith("#"))
        if "Package" in fields:
            out.setdefault(fields["Package"], []).append((fields["Version"], fields.get("Depends")))
    return out


UBUNTU = {"ubuntu-22.04": "jammy", "ubuntu-24.04": "noble"}


@pytest.mark.parametrize("distro", ["ubuntu-22.04", "ubuntu-24.04"])
def test_every_ubuntu_package_named_is_in_ubuntus_real_index_and_transitional_ones_are_marked(distro):
    index = ubuntu_index(UBUNTU[distro])
    named = 0
    for row in MATRIX.drivers:
        entry = row.packages.get(distro)
        for package in (entry.open + entry.proprietary) if entry else ():
            named += 1
            assert package in index, f"R{row.branch}: {package} is not in Ubuntu {distro}'s archive"
            newest = max(index[package], key=lambda v: [int(x) for x in re.findall(r"\d+", v[0])[:3]])
            target = newest[1] and re.match(r"nvidia-driver-(\d+)", newest[1]).group(1)
            assert entry.moved_to == target, (f"R{row.branch} {package}: the archive's newest {newest[0]} is "
                                              f"{'transitional to R' + target if target else 'the real driver'}")
    assert named >= 10


@pytest.mark.parametrize("distro", ["ubuntu-22.04", "ubuntu-24.04"])
def test_every_ubuntu_install_that_plan_move_writes_names_a_real_package_of_its_branch(distro):
    index = ubuntu_index(UBUNTU[distro])
    checked = 0
    for row in MATRIX.drivers:
        for name in ("l4", "b200"):  # proprietary-capable and open-only GPUs
            facts = replace(hardware(name, distro), driver_version="525.147.05", cuda_driver_version="12.0")
            m = move(facts, row.cuda, row.branch)
            if m is None or not m.ok or m.source != "Ubuntu's archive":
                continue
            for package in m.packages:
                checked += 1
                assert any(v.startswith(f"{row.branch}.") and t is None for v, t in index[package]), package
                assert f"apt-mark hold {package}" in m.install
    assert checked >= 2  # R580 everywhere, R595 on noble


def test_a_rollback_version_pin_matches_a_real_version_in_the_index():
    """noble's release pocket still has nvidia-driver-535-server 535.161.08 (not the transitional 535.309.01)."""
    h100 = replace(hardware("h100-sxm-80gb"), driver_version="535.161.08", cuda_driver_version="12.2")
    pin = re.search(r"'(nvidia-driver-535-server)=([^']+)'", move(h100).rollback[1])
    versions = [v for v, t in ubuntu_index("noble")[pin.group(1)] if t is None]
    assert any(re.fullmatch(pin.group(2).replace(".", r"\.").replace("*", ".*"), v) for v in versions), versions


def test_every_rhel_stream_follows_nvidias_documented_names():
    """NVIDIA's CUDA repository is not reachable from here (SOURCES.md): the streams and packages are checked
    against the names NVIDIA's driver installation guide gives, recorded in nvidia-install-guide.txt."""
    guide = (DATA / "nvidia-install-guide.txt").read_text()
    for row in MATRIX.drivers:
        entry = row.packages["rhel-9"]
        assert entry.open[0] == f"nvidia-driver:{row.branch}-open"
        assert entry.proprietary[0] == f"nvidia-driver:{row.branch}-dkms"
        if int(row.branch) > 570:  # "All releases beyond driver version 570 will use these packaging conventions"
            assert entry.open[1:] == ("nvidia-open",) and entry.proprietary[1:] == ("cuda-drivers",)
        else:
            assert entry.open[1:] == () and entry.proprietary[1:] == ()
    for text in ("dnf module enable nvidia-driver:580-open", "dnf install nvidia-open", "-dkms", "cuda-drivers",
                 "apt-get install -y nvidia-open-580", "cuda-drivers-580"):
        assert text in guide, text
    for row in MATRIX.drivers:
        nvidia = row.packages["cuda-ubuntu"]
        assert nvidia.proprietary == (f"cuda-drivers-{row.branch}",)
        assert nvidia.open in ((), (f"nvidia-open-{row.branch}",))


def test_every_row_names_known_distributions_and_sources():
    assert {d.branch for d in MATRIX.drivers} >= {"535", "550", "570", "575", "580", "590", "595"}
    for row in MATRIX.drivers:
        assert set(row.packages) <= set(DRIVER_DISTROS) and "rhel-9" in row.packages and row.sources
        assert MATRIX.cuda_row(row.cuda) is None or MATRIX.cuda_row(row.cuda).driver == row.min_version


def test_the_matrix_refuses_a_bad_drivers_row(tmp_path):
    from fleetctl.errors import MatrixError
    text = (ROOT / "fleetctl" / "knowledge" / "matrix.yaml").read_text()
    bad = tmp_path / "matrix.yaml"
    bad.write_text(text.replace("    kind: LTSB\n    min_version: \"580.65.06\"", "    kind: LTS\n    min_version: \"580.65.06\""))
    with pytest.raises(MatrixError, match=r"drivers\[4\]: kind 'LTS'"):
        load_matrix(bad)
    bad.write_text(text.replace("      rhel-9: {open: [\"nvidia-driver:580-open\"", "      rhel-8: {open: [\"nvidia-driver:580-open\""))
    with pytest.raises(MatrixError, match="rhel-8"):
        load_matrix(bad)


# ---------------------------------------------------------------- plan --driver

def test_plan_host_with_a_driver_move_resolves_the_stack_after_it():
    facts = hardware("a100-sxm4-80gb")
    before = plan_host(Host("a100"), facts, MATRIX, cuda="13.0")
    assert not before.resolution.ok and before.driver is None and "driver" not in before.to_json()
    after = plan_host(Host("a100"), facts, MATRIX, driver="auto", cuda="13.0")
    assert after.driver.branch == "580" and after.resolution.ok, after.resolution
    assert after.resolution.reasons[0] == "after the driver move to R580 (580.65.06)"
    data = json.loads(json.dumps(after.to_json()))
    assert set(data) == {"status", "stack", "reasons", "changes", "proof", "driver"}
    assert data["driver"]["install"][-1] == "apt-mark hold nvidia-driver-580-server-open"
    assert data["driver"]["rollback"] and data["driver"]["flavor"] == "open"
    console = Console(width=400, record=True)
    console.print(plan_table([after, plan_host(Host("h100"), hardware("h100-sxm-80gb"), MATRIX, driver="auto",
                                               cuda="13.0")]))
    text = console.export_text()
    assert "driver commands" in text and "570.133.20 → R580 (open)" in text and "none: the driver runs" in text


def test_plan_without_driver_keeps_its_table():
    console = Console(width=400, record=True)
    console.print(plan_table([plan_host(Host("a100"), hardware("a100-sxm4-80gb"), MATRIX, cuda="13.0")]))
    text = console.export_text()
    assert "driver commands" not in text and "R580" not in text


@pytest.mark.parametrize("args, error", [
    (["--driver", "newest"], "auto or a driver branch"),
    (["--driver", "auto"], "--driver needs --cuda"),
    (["--driver", "580", "--cuda", "13.0", "--write-lock"], "not a lock"),
])
def test_plan_validates_driver_before_any_host(tmp_path, args, error):
    inventory = tmp_path / "inv.yml"
    inventory.write_text("all:\n  hosts:\n    nowhere: {ansible_host: 127.0.0.1, ansible_port: 1}\n")
    proc = fleetctl("plan", inventory, *args, timeout=60)
    assert proc.returncode != 0 and error in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- NVSwitch hosts: the fabric manager moves with the driver

def nvswitch(facts: Facts) -> Facts:
    """*facts* on an NVSwitch system: every GPU's fabric completed, R570's fabric manager running."""
    gpus = tuple(GpuHealth(g.index, fabric_state="completed", fabric_status="success") for g in facts.gpus)
    fm = FabricManager("nvidia-fabricmanager-570", facts.driver_version, "active")
    return replace(facts, health=Health(gpus=gpus, source="nvidia-smi", fabric_manager=fm))


def test_an_nvswitch_hosts_move_installs_its_fabric_manager_at_the_drivers_version_and_rolls_it_back():
    m = move(nvswitch(hardware("a100-sxm4-80gb", "ubuntu-22.04")))
    assert m.fabric_manager == ("nvidia-fabricmanager-580", "libnvidia-nscq-580")
    first = shlex.quote(m.packages[0])
    assert m.install[-3:] == (
        f"v=$(dpkg-query -W -f='${{Version}}' {first} | cut -d- -f1) && [ -n \"$v\" ] && DEBIAN_FRONTEND=noninteractive "
        "apt-get install -y --no-install-recommends --allow-change-held-packages --allow-downgrades "
        "nvidia-fabricmanager-580=\"$v-*\" libnvidia-nscq-580=\"$v-*\"",
        "apt-mark hold nvidia-fabricmanager-580 libnvidia-nscq-580", "systemctl enable nvidia-fabricmanager")
    assert "'nvidia-fabricmanager-570=570.133.20-*' 'libnvidia-nscq-570=570.133.20-*'" in " ".join(m.rollback)
    assert m.rollback[-1] == "systemctl enable nvidia-fabricmanager"
    assert "an NVSwitch host" in m.reasons[-1]
    rhel = move(nvswitch(hardware("a100-sxm4-80gb", "rocky-9")))
    assert rhel.fabric_manager == ("nvidia-fabric-manager", "libnvidia-nscq")
    assert rhel.install[-2:] == ("dnf -y install nvidia-fabric-manager libnvidia-nscq", "systemctl enable nvidia-fabricmanager")


def test_a_move_comes_back_whole_from_the_journals_json():
    m = move(nvswitch(hardware("a100-sxm4-80gb", "ubuntu-22.04")))
    assert DriverMove.from_json(json.loads(json.dumps(m.to_json()))) == m and m.fabric_manager


def test_a_host_without_nvswitch_moves_its_driver_alone():
    plain = move(hardware("a100-sxm4-80gb", "ubuntu-22.04"))
    assert plain.fabric_manager == () and not any("fabric" in c for c in plain.install + plain.rollback)
