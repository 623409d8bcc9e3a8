"""`fleetctl facts` end to end against the lab's real sshd hosts."""

from __future__ import annotations

import subprocess

from tests.conftest import FLEET, fleetctl, fleetctl_json


def test_facts_of_the_whole_lab(lab, lab_inventory):
    code, out = fleetctl_json("facts", lab_inventory)
    hosts = out["hosts"]
    assert set(hosts) == set(FLEET)
    assert code == 0, {n: h.get("error") for n, h in hosts.items() if h["status"] != "ok"}

    h100 = hosts["h100"]["facts"]
    assert h100["driver_version"] == "580.159.04" and h100["cuda_driver_version"] == "13.0"
    assert h100["gpu_source"] == "nvidia-smi"
    assert h100["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3",
                             "uuid": "GPU-00000000-1111-2222-3333-555555555555", "compute_capability": "9.0",
                             "memory_mib": 81559, "pci_bus_id": "00000000:00:06.0", "mig_mode": "Disabled",
                             # the capture's query has no memory.used/free columns: not reported, not zero
                             "memory_used_mib": None, "memory_free_mib": None}]
    assert h100["os"]["pretty_name"] == "Ubuntu 24.04.3 LTS"

    # Each host has its own state: its own os-release and its own install root.
    assert hosts["cpu-01"]["facts"]["os"]["id"] == "rocky"
    assert hosts["cpu-01"]["facts"]["gpus"] == [] and hosts["cpu-01"]["facts"]["driver_version"] is None
    assert hosts["cpu-01"]["facts"]["gpu_error"] is None

    # Facts of the controller machine itself, which every lab host really is underneath.
    uname = subprocess.run(["uname", "-r", "-m"], capture_output=True, text=True).stdout.split()
    for name, host in hosts.items():
        facts = host["facts"]
        assert [facts["kernel"], facts["arch"]] == uname, name
        assert facts["user"] == "root" and facts["fleet_root"] == "/opt/fleetctl"
        assert facts["python"]["version"].count(".") == 2
        assert facts["glibc"] and facts["disk_free_gib"] > 0
        assert facts["installed"] is None

    mixed = hosts["mixed"]["facts"]["gpus"]
    assert {g["compute_capability"] for g in mixed} == {"8.0", "8.6"}
    assert len(hosts["a100"]["facts"]["gpus"]) == 8
    assert hosts["a100-mig"]["facts"]["gpus"][0]["mig_mode"] == "Enabled"
    assert hosts["rtx4090"]["facts"]["gpus"][0]["mig_mode"] is None  # GeForce: [N/A]
    assert hosts["b200"]["facts"]["gpus"][0]["compute_capability"] == "10.0"
    assert hosts["unknown"]["facts"]["gpus"][0]["compute_capability"] == "12.0"
    # A driver too old to report compute capability is a fact, not a crash.
    old = hosts["old-470"]["facts"]
    assert old["gpus"] == [] and "nvidia-smi failed" in old["gpu_error"]


def test_limit_and_table(lab, lab_inventory):
    code, out = fleetctl_json("facts", lab_inventory, "--limit", "h1*,cpu-01")
    assert code == 0 and set(out["hosts"]) == {"h100", "cpu-01"}
    proc = fleetctl("facts", lab_inventory, "--limit", "gpu:!a100*:!h*")
    assert proc.returncode == 0, proc.stderr
    assert "Tesla T4" in proc.stdout and "Tesla V100-SXM2-32GB" in proc.stdout
    assert "H100" not in proc.stdout and "A100-SXM4-40GB" not in proc.stdout
    assert "9 hosts: ok=9" in proc.stdout  # 13 GPU hosts less a100, a100-mig, h100 and h200


def test_bad_inventory_is_one_line_and_contacts_nobody(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("all:\n  hosts:\n    a: {ansible_host: 127.0.0.1\n")
    proc = fleetctl("facts", bad)
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
