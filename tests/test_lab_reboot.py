"""The lab plays a driver upgrade with real processes: a package manager that installs a driver
branch as the host's next hardware, and a reboot that ends every session and the sshd, and brings
the host back after a delay (or never). Seen through fleetctl's own connection and `fleetctl facts`."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from fleetctl.errors import Unreachable
from fleetctl.facts.probe import parse_nvidia_smi_header, parse_nvidia_smi_query
from fleetctl.hosts.inventory import load_inventory
from fleetctl.reach.connection import connect
from tests.conftest import NET_OFFSET, fleetctl_json, wait_until
from tests.lab import HARDWARE, PORT, Lab
from tests.lab.profiles import NO_DEVICES, derive_profile
from tests.lab.standins import alive, listening

NET = 88
NEW = {"driver": "580.65.06", "cuda": "13.0"}  # CUDA 13.0's first driver


def facts_of(inventory, name: str) -> dict:
    _, out = fleetctl_json("facts", inventory, "--limit", name, timeout=120)
    return out["hosts"][name]


def run_over_fleetctl(inventory, name: str, command: str):
    (host,) = load_inventory(inventory).select(name)
    conn = connect(host, timeout=20)
    try:
        return conn.run(command, timeout=60)
    finally:
        conn.close()


# ---------------------------------------------------------------- derived profiles, as data

@pytest.mark.parametrize("base", ["a100-sxm4-80gb", "h100-sxm-80gb", "v100-sxm2-32gb", "t4", "mixed-a100-a10"])
def test_a_derived_profile_is_the_capture_on_the_new_driver(base, tmp_path):
    name = derive_profile(base, tmp_path, **NEW)
    assert name == f"{base}@580.65.06-cuda13.0"
    old_table, new_table = (HARDWARE / base / "nvidia-smi.txt").read_text(), (tmp_path / name / "nvidia-smi.txt").read_text()
    old_gpus, _ = parse_nvidia_smi_query((HARDWARE / base / "query.csv").read_text())
    gpus, driver = parse_nvidia_smi_query((tmp_path / name / "query.csv").read_text())
    assert driver == "580.65.06" and parse_nvidia_smi_header(new_table) == "13.0"
    assert gpus == old_gpus  # the same GPUs: names, UUIDs, bus ids, memory
    # The table keeps its columns; only the header line changed.
    changed = [(a, b) for a, b in zip(old_table.splitlines(), new_table.splitlines()) if a != b]
    assert len(changed) == 1 and len(changed[0][0]) == len(changed[0][1])
    assert re.search(r"NVIDIA-SMI 580\.65\.06 +Driver Version: 580\.65\.06 +CUDA Version: 13\.0 +\|", changed[0][1])
    readme = (tmp_path / name / "README.md").read_text()
    assert f"hardware/{base}" in readme and "-> 580.65.06" in readme


def test_a_lost_gpu_profile_has_the_last_gpu_gone_from_both_outputs(tmp_path):
    name = derive_profile("a100-sxm4-80gb", tmp_path, **NEW, drop_gpus=1)
    assert name == "a100-sxm4-80gb@580.65.06-cuda13.0-lost1"
    gpus, _ = parse_nvidia_smi_query((tmp_path / name / "query.csv").read_text())
    table = (tmp_path / name / "nvidia-smi.txt").read_text()
    assert [g.index for g in gpus] == list(range(7)) and gpus[-1].pci_bus_id == "00000000:B7:00.0"
    assert "00000000:B7:00.0" in table and "00000000:BD:00.0" not in table
    assert table.count("NVIDIA A100-SXM4-80GB") == 7 and "No running processes found" in table
    # A derived profile derives again: the new driver, then one more GPU lost.
    again = derive_profile(name, tmp_path, drop_gpus=1)
    assert len(parse_nvidia_smi_query((tmp_path / again / "query.csv").read_text())[0]) == 6
    # A one-GPU host that loses it answers as nvidia-smi does with no GPU.
    t4 = derive_profile("t4", tmp_path, **NEW, drop_gpus=1)
    assert (tmp_path / t4 / "query.csv").read_text() == NO_DEVICES and (tmp_path / t4 / "exit").read_text() == "6\n"


# ---------------------------------------------------------------- on lab hosts

def test_a_driver_package_takes_effect_at_the_reboot_which_ends_every_session(small_lab, tmp_path):
    lab = small_lab(("a100", "a100-sxm4-80gb", {"os_release": "ubuntu-22.04"}), net=NET)
    host = lab.hosts["a100"]
    new = lab.derive_profile("a100-sxm4-80gb", **NEW)
    host.driver_packages({"nvidia-driver-580-server-open": new, "nvidia-driver-570-server": "a100-sxm4-80gb"},
                         installed=["nvidia-driver-570-server"])
    host.reboot_delay = 2
    inventory = lab.write_inventory(tmp_path / "inv.yml")
    before = facts_of(inventory, "a100")["facts"]
    assert (before["driver_version"], before["cuda_driver_version"], len(before["gpus"])) == ("570.133.20", "12.8", 8)

    installed = run_over_fleetctl(inventory, "a100", "DEBIAN_FRONTEND=noninteractive apt-get install -y "
                                  "-o Dpkg::Options::=--force-confold nvidia-driver-580-server-open=580.65.06")
    assert installed.exited == 0, installed.stderr
    assert "Setting up nvidia-driver-580-server-open (580.65.06)" in installed.stdout
    assert host.package_calls()[-1][:3] == ["apt-get", "install", "-y"]
    assert "REMOVED:\n  nvidia-driver-570-server" in installed.stdout  # one driver at a time
    assert host.packages == {"nvidia-driver-580-server-open": "580.65.06"}
    listed = lab.ssh("a100", "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' 'nvidia-driver-*'")
    assert listed.stdout.splitlines() == ["nvidia-driver-580-server-open 580.65.06 ii "]
    # Installed, not running: the old driver serves until the reboot.
    assert host.pending_hardware == new and facts_of(inventory, "a100")["facts"]["driver_version"] == "570.133.20"

    # A session left open on the host, and its process, end with the reboot.
    session = subprocess.Popen(lab.ssh_argv("a100", "sleep 600"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: any(c == "sleep 600" for c in host.processes().values()), 20, "the open session's sleep")
    old_sshd = host.pid
    rebooted_at = time.monotonic()
    with pytest.raises(Unreachable, match="connection lost"):
        run_over_fleetctl(inventory, "a100", "reboot")
    wait_until(lambda: session.poll() is not None, 20, "the open session ended")
    assert session.returncode == 255
    assert host.reboots == 1 and not any("sleep 600" in c for c in host.processes().values())

    wait_until(lambda: host.boots == 2, 30, "the host back from its reboot")
    assert time.monotonic() - rebooted_at >= 2  # down for its reboot delay
    assert host.pid != old_sshd and host.running and host.pending_hardware is None
    after = facts_of(inventory, "a100")
    assert after["status"] == "ok", after
    facts = after["facts"]
    assert (facts["driver_version"], facts["cuda_driver_version"]) == ("580.65.06", "13.0")
    assert [g["uuid"] for g in facts["gpus"]] == [g["uuid"] for g in before["gpus"]]
    assert facts["os"]["version_id"] == "22.04"  # its own namespaces again

    # The watcher outlives the sshd it restarted: the host reboots again (by OpenSSH, `systemctl reboot`).
    host.reboot_delay = 0
    assert lab.ssh("a100", "systemctl reboot").returncode == 255
    wait_until(lambda: host.boots == 3, 30, "the second reboot")
    assert "systemctl reboot" in (host.dir / "reboot.log").read_text()
    # stop() ends the sshd a reboot started, which the test process never started itself.
    restarted = set(host.processes())
    assert restarted
    lab.stop()
    assert not host.running and not host.processes() and not listening(host.address, PORT)
    assert not any(alive(p) for p in restarted)  # killed (a zombie until init reaps it counts as dead)


def test_a_host_that_never_returns_stays_unreachable_until_the_lab_stops(small_lab, tmp_path):
    lab = small_lab(("gone", "h100-sxm-80gb", {}), ("other", "t4", {}), net=NET)
    host = lab.hosts["gone"]
    host.never_returns = True
    inventory = lab.write_inventory(tmp_path / "inv.yml")
    assert lab.ssh("gone", "shutdown -r now").returncode == 255
    wait_until(lambda: host.reboots == 1 and not host.running, 20, "the host down")
    for _ in range(2):  # still down, however often it is asked
        out = facts_of(inventory, "gone")
        assert out["status"] == "unreachable", out
    assert host.boots == 1 and not listening(host.address, PORT)
    # Its neighbour, another host of the same lab, never noticed.
    assert facts_of(inventory, "other")["status"] == "ok" and lab.hosts["other"].boots == 1
    lab.stop()
    assert host.watcher.poll() is not None and not host.processes()


def test_a_driver_that_loses_a_gpu_shows_one_gpu_fewer_after_the_reboot(small_lab, tmp_path):
    lab = small_lab(("rocky", "a100-sxm4-80gb", {"os_release": "rocky-9"}), net=NET)
    host = lab.hosts["rocky"]
    lost = lab.derive_profile("a100-sxm4-80gb", **NEW, drop_gpus=1)
    host.driver_packages({"nvidia-driver:580-open": lost})
    inventory = lab.write_inventory(tmp_path / "inv.yml")
    before = facts_of(inventory, "rocky")["facts"]["gpus"]

    # RHEL's way: a module stream enabled, then installed.
    steps = ["dnf -y module reset nvidia-driver", "dnf -y module enable nvidia-driver:580-open",
             "dnf -y install nvidia-driver", "rpm -q nvidia-driver:580-open"]
    done = lab.ssh("rocky", " && ".join(steps))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("nvidia-driver:580-open-580.65.06")
    assert [c[:3] for c in host.package_calls()] == [["dnf", "-y", "module"]] * 2 + [["dnf", "-y", "install"], ["rpm", "-q", "nvidia-driver:580-open"]]
    assert host.pending_hardware == lost

    assert lab.ssh("rocky", "reboot").returncode == 255
    wait_until(lambda: host.boots == 2, 30, "the host back from its reboot")
    facts = facts_of(inventory, "rocky")["facts"]
    assert facts["driver_version"] == "580.65.06" and len(facts["gpus"]) == len(before) - 1 == 7
    assert before[-1]["uuid"] not in {g["uuid"] for g in facts["gpus"]}
    assert host.hardware == lost


def test_a_failing_driver_package_fails_as_apt_does_and_changes_nothing(small_lab):
    lab = small_lab(("t4", "t4", {"os_release": "ubuntu-22.04"}), net=NET)
    host = lab.hosts["t4"]
    new = lab.derive_profile("t4", **NEW)
    host.driver_packages({"nvidia-driver-580-server": new}, failing=["nvidia-driver-580-server"])
    done = lab.ssh("t4", "apt-get update && apt-get install -y nvidia-driver-580-server nvidia-utils-580-server")
    assert done.returncode == 100
    assert done.stderr.strip() == "E: Sub-process /usr/bin/dpkg returned an error code (1)"
    assert "Errors were encountered while processing:\n nvidia-driver-580-server" in done.stdout
    assert host.packages == {} and host.pending_hardware is None
    assert [c[:2] for c in host.package_calls()] == [["apt-get", "update"], ["apt-get", "install"]]
    # Unknown packages install as nothing; holds are kept.
    assert lab.ssh("t4", "apt-get install -y nvidia-utils-580-server && apt-mark hold nvidia-utils-580-server").returncode == 0
    assert host.packages == {"nvidia-utils-580-server": "1.0"} and host.held == ["nvidia-utils-580-server"]
    assert lab.ssh("t4", "apt-mark showhold").stdout == "nvidia-utils-580-server\n"
    # dpkg-query says what dpkg does about a package that is not there.
    missing = lab.ssh("t4", "dpkg-query -W nvidia-driver-580-server")
    assert missing.returncode == 1 and "no packages found matching nvidia-driver-580-server" in missing.stderr
    assert lab.ssh("t4", "systemctl is-active fleetctl-vllm.service").returncode != 0  # the real one's answer
    assert host.reboots == 0 and host.boots == 1


def test_a_rollback_reinstalls_the_previous_driver_past_its_hold_and_the_reboot_restores_it(small_lab):
    lab = small_lab(("v100", "v100-sxm2-32gb", {"os_release": "ubuntu-22.04"}), net=NET)
    host = lab.hosts["v100"]
    new = lab.derive_profile("v100-sxm2-32gb", **NEW)
    host.driver_packages({"nvidia-driver-580-server": new, "nvidia-driver-535-server": "v100-sxm2-32gb"},
                         installed=["nvidia-driver-535-server"])
    up = lab.ssh("v100", "apt-get install -y nvidia-driver-580-server && apt-mark hold nvidia-driver-580-server")
    assert up.returncode == 0 and "The following packages will be REMOVED:\n  nvidia-driver-535-server" in up.stdout
    assert host.packages == {"nvidia-driver-580-server": "580.65.06"} and host.pending_hardware == new
    assert lab.ssh("v100", "reboot").returncode == 255
    wait_until(lambda: host.boots == 2, 30, "the upgraded host back")
    assert lab.ssh("v100", "nvidia-smi --query-gpu=driver_version --format=csv").stdout.count("580.65.06") == 8

    # The pinned new driver stands in the way of the old one, as apt's holds do.
    back = "apt-get install -y nvidia-driver-535-server=535.183.06"
    refused = lab.ssh("v100", back)
    assert refused.returncode == 100 and "Held packages were changed" in refused.stderr
    assert host.pending_hardware is None and "nvidia-driver-580-server" in host.packages
    assert lab.ssh("v100", f"{back} --allow-change-held-packages && apt-mark hold nvidia-driver-535-server").returncode == 0
    assert host.packages == {"nvidia-driver-535-server": "535.183.06"} and host.pending_hardware == "v100-sxm2-32gb"
    assert lab.ssh("v100", "reboot").returncode == 255
    wait_until(lambda: host.boots == 3, 30, "the rolled-back host back")
    assert host.hardware == "v100-sxm2-32gb"
    assert "Driver Version: 535.183.06" in lab.ssh("v100", "nvidia-smi").stdout


def test_without_namespaces_a_reboot_still_ends_every_session_of_that_host_only(tmp_path):
    lab = Lab(tmp_path / "lab", net=NET + NET_OFFSET, namespaces=False)
    lab.add("plain", "l4")
    lab.add("neighbour", "l4")
    lab.start()
    try:
        host = lab.hosts["plain"]
        sessions = [subprocess.Popen(lab.ssh_argv(name, "sleep 600"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for name in ("plain", "neighbour")]
        wait_until(lambda: all(any(c == "sleep 600" for c in h.processes().values()) for h in lab.hosts.values()),
                   20, "a session on each host")
        assert lab.ssh("plain", "shutdown --reboot +0").returncode == 255
        wait_until(lambda: sessions[0].poll() is not None, 20, "the rebooted host's session ended")
        wait_until(lambda: host.boots == 2, 30, "the host back")
        assert sessions[1].poll() is None  # the other host's session lives on
        assert lab.ssh("plain", "echo up").stdout == "up\n"
    finally:
        lab.stop()
    assert not any(h.processes() for h in lab.hosts.values())
    assert sessions[1].wait(timeout=20) == 255


def test_stopping_the_lab_mid_reboot_leaves_nothing_behind(small_lab):
    lab = small_lab(("slow", "l4", {}), net=NET)
    host = lab.hosts["slow"]
    host.reboot_delay = 600
    assert lab.ssh("slow", "reboot").returncode == 255
    wait_until(lambda: host.reboots == 1 and not host.running, 20, "the host down for its long reboot")
    lab.stop()
    # Nothing of the host is left to bring its sshd back: no watcher, no restart sleeping out its delay.
    assert host.watcher.poll() is not None
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if str(host.dir).encode() in _read(p)]
    assert host.boots == 1


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # gone meanwhile
