"""Sick and healthy GPU hosts in the lab (real sshd hosts, replayed nvidia-smi, a kernel log and a fabric
manager as stand-ins): `health`, `provision --check` and `audit` over SSH, as a user runs them.

The lab's GPU hosts have no GPU to serve on: provision is run with --check, as tests/test_provision.py
does for its GPU hosts. A healthy host passes `check` and plans its install; each sick one fails at
`check` naming its GPU and NVIDIA's action, and nothing after it runs."""

import json

import pytest

from tests.conftest import NET_OFFSET, _sshd_available, fleetctl, fleetctl_json, unavailable
from tests.lab import Lab
from tests.lab.profiles import xid_line
from tests.lab.standins import write_installed

B200_DRIVER = "580.95.05"  # the b200 profile's driver
SICK = {  # host → (the check that fails, the action)
    "remap": ("remapped_rows_pending", "RESET_GPU"),
    "xid79": ("xid", "RESTART_BM"),
    "fm-skew": ("fabric_manager_version", "INSTALL_FABRIC_MANAGER"),
    "pcie-x8": ("pcie_width", "CHECK_MECHANICALS"),
}
HEALTHY = ("h100", "nvswitch")


@pytest.fixture(scope="module")
def sick_lab(tmp_path_factory):
    if not _sshd_available():
        unavailable("the lab needs root and openssh-server")
    lab = Lab(tmp_path_factory.mktemp("health-lab"), net=79 + NET_OFFSET)
    remap = lab.derive_health("h100-sxm-80gb", "h100-remap-pending", changes={"remapped_rows.pending": "Yes"})
    x8 = lab.derive_health("h100-sxm-80gb", "h100-pcie-x8", changes={"pcie.link.width.current": "8"})
    nvswitch = lab.derive_health("b200", "b200-nvswitch", nvswitch=True)
    # A fabric manager at another version than the driver exits: the fabric never starts on any GPU.
    skewed = lab.derive_health("b200", "b200-nvswitch-fm-skew", nvswitch=True,
                               changes={"fabric.state": "Not Started", "fabric.status": "N/A"})
    lab.add("h100", "h100-sxm-80gb")
    lab.add("remap", remap)
    lab.add("xid79", "h100-sxm-80gb").kernel_log(
        "[    0.665166] NVRM: loading NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build\n"
        + xid_line("0000:00:06", 79, "GPU has fallen off the bus."))
    lab.add("pcie-x8", x8)
    for name, profile, fm, state in (("nvswitch", nvswitch, B200_DRIVER, "active"),
                                     ("fm-skew", skewed, "580.82.07", "failed")):
        host = lab.add(name, profile)
        write_installed(host.dir, {**host.packages, "nvidia-fabricmanager-580": f"{fm}-1"})
        host.set_service("nvidia-fabricmanager", state)
    lab.start()
    inventory = lab.write_inventory(tmp_path_factory.mktemp("inv") / "health.yml")
    yield lab, inventory
    lab.stop()


def test_health_reports_each_sick_host_with_its_action_and_the_healthy_ones(sick_lab):
    lab, inventory = sick_lab
    code, out = fleetctl_json("health", inventory)
    assert code == 2, out
    hosts = out["hosts"]
    for name in HEALTHY:
        assert hosts[name]["status"] == "healthy", hosts[name]
    for name, (check, action) in SICK.items():
        findings = hosts[name]["verdict"]["findings"]
        assert hosts[name]["status"] == "unhealthy" and (findings[0]["check"], findings[0]["action"]) == (check, action)
        assert len(findings) == 1 or name == "fm-skew"
    assert [f["check"] for f in hosts["fm-skew"]["verdict"]["findings"]] == [
        "fabric_manager_version", "fabric_manager_stopped", *["fabric_incomplete"] * 8]
    assert hosts["nvswitch"]["facts"]["fabric_manager"] == {"package": "nvidia-fabricmanager-580", "version": B200_DRIVER,
                                                            "service": "active"}
    assert len(hosts["nvswitch"]["facts"]["gpus"]) == 8
    assert all(g["fabric_state"] == "completed" and len(g["nvlinks"]) == 18 for g in hosts["nvswitch"]["facts"]["gpus"])
    assert "install nvidia-fabricmanager-580 580.95.05" in hosts["fm-skew"]["summary"]
    assert hosts["xid79"]["facts"]["kernel_log"] == "read" and hosts["xid79"]["facts"]["xids"][0]["gpu"] == 0


def test_health_prometheus_carries_per_gpu_series(sick_lab):
    lab, inventory = sick_lab
    proc = fleetctl("health", inventory, "--format", "prometheus")
    assert proc.returncode == 2, proc.stderr
    prom = proc.stdout
    assert 'fleetctl_gpu_health{host="remap",gpu="0",uuid="GPU-00000000-1111-2222-3333-555555555555",status="unhealthy"} 1' in prom
    assert 'fleetctl_gpu_pcie_link_width{host="pcie-x8",gpu="0",uuid="GPU-00000000-1111-2222-3333-555555555555"} 8' in prom
    assert 'fleetctl_gpu_xid_events{host="xid79",gpu="0",xid="79"} 1' in prom
    assert sum(line.startswith('fleetctl_gpu_health{host="nvswitch"') and line.endswith('status="healthy"} 1')
               for line in prom.splitlines()) == 8
    assert 'fleetctl_host_health{host="fm-skew",status="unhealthy"} 1' in prom


def test_provision_plans_the_healthy_and_refuses_each_sick_host_at_check(sick_lab):
    lab, inventory = sick_lab
    code, out = fleetctl_json("provision", inventory, "--check")
    assert code == 2
    for name in HEALTHY:
        steps = {s["name"]: s for s in out["hosts"][name]["steps"]}
        assert steps["check"]["status"] == "ok" and steps["install"]["status"] == "changed", out["hosts"][name]
    for name, (_, action) in SICK.items():
        last = out["hosts"][name]["steps"][-1]
        assert (last["name"], last["status"]) == ("check", "failed") and action in last["detail"], out["hosts"][name]
        assert last["detail"].startswith("unhealthy: GPU 0: " if name != "fm-skew" else "unhealthy: nvidia-fabricmanager")
    assert out["ignore_health"] is False


def test_ignore_health_provisions_a_sick_host_and_the_record_says_so(sick_lab):
    lab, inventory = sick_lab
    code, out = fleetctl_json("provision", inventory, "--check", "--limit", "remap", "--ignore-health")
    steps = {s["name"]: s for s in out["hosts"]["remap"]["steps"]}
    assert steps["check"]["status"] == "ok" and steps["install"]["status"] == "changed"
    assert out["ignore_health"] is True and code == 0


def test_audit_reports_health_drift_and_new_xids_since_the_last_audit(sick_lab, tmp_path):
    lab, inventory = sick_lab
    assert fleetctl("plan", inventory, "--write-lock", "--limit", "xid79:h100").returncode == 0
    fleetctl("audit", inventory, "--format", "json", "--limit", "xid79:h100")
    lab.hosts["h100"].kernel_log(xid_line("0000:00:06", 94, "Contained ECC error."))
    try:
        code, out = fleetctl_json("audit", inventory, "--limit", "xid79:h100")
        kinds = {name: [(d["kind"], d["detail"]) for d in h["drift"]] for name, h in out["hosts"].items()}
        assert ("xid", "GPU 0: Xid 94 ×1 new since the last audit") in kinds["h100"]
        assert [k for k, _ in kinds["xid79"] if k in ("health", "xid", "ecc")] == ["health"]
        junit = fleetctl("audit", inventory, "--format", "junit", "--limit", "xid79").stdout
        assert 'type="health"' in junit and "Xid 79" in junit
        prom = fleetctl("audit", inventory, "--format", "prometheus", "--limit", "xid79").stdout
        assert 'fleetctl_drift{host="xid79",kind="health"} 1' in prom
    finally:
        lab.hosts["h100"].kernel_log("")


def test_a_rollout_wave_refuses_an_unhealthy_host_at_its_gate_unless_told_to_ignore_health(sick_lab, tmp_path):
    lab, inventory = sick_lab
    playbook = tmp_path / "check-only.yml"
    playbook.write_text("- {name: gate, hosts: all, steps: [check]}\n")
    args = ("rollout", inventory, "--vllm", "0.33.0", "--playbook", playbook, "--limit", "remap", "--max-fail", "0")
    code, out = fleetctl_json(*args, timeout=600)
    host = out["hosts"]["remap"]
    assert code == 2 and (host["state"], host["step"]) == ("failed", "check"), host
    assert host["error"].startswith("unhealthy: GPU 0: a memory row is waiting to be remapped: RESET_GPU")
    code, out = fleetctl_json(*args, "--ignore-health", timeout=600)
    assert code == 0 and out["hosts"]["remap"]["state"] == "done" and out["ignore_health"] is True, out["hosts"]["remap"]
