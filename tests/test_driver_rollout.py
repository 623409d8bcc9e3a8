"""`rollout --cuda 13.0 --driver auto` on lab hosts that play the driver move with real processes
(tests/lab/standins.py): the host's apt installs the branch as its next boot's nvidia-smi, `reboot` ends
every session and brings the host's sshd back after a delay (or never). A100s on R570 cannot run CUDA 13:
each is drained, moved to R580, rebooted, verified, provisioned, undrained — or stopped where it failed.

The gate here provisions with the `check` step (and `activate`, over environments the test lays down): the
lab's GPUs are recorded nvidia-smi output, which no kernel runs on (the proofs themselves run on the GPU
test host and the CPU lab).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleetctl import records
from tests.conftest import fleetctl_json, needs_sshd, wait_until
from tests.lab.standins import write_installed

pytestmark = needs_sshd
BASE = "a100-sxm4-80gb"  # R570 (570.133.20), CUDA 12.8: R580 is the oldest branch that runs CUDA 13.0
NEW, OLD = "nvidia-driver-580-server-open", "nvidia-driver-570-server-open"  # what plan_move names for them


@pytest.fixture
def fleet(small_lab, tmp_path):
    """make(*names, lose_gpu=False): A100 hosts whose R580 package boots them on 580.65.06 (with one GPU fewer
    where asked); drain and undrain commands log to a file the test reads."""
    def make(*names: str, lose_gpu: bool = False, steps=("check",), **hostvars):
        lab = small_lab(*((n, BASE, {"os_release": "ubuntu-22.04"}) for n in names), net=89)
        new = lab.derive_profile(BASE, driver="580.65.06", cuda="13.0", drop_gpus=1 if lose_gpu else 0)
        for host in lab.hosts.values():
            host.driver_packages({NEW: new, OLD: BASE}, installed=[OLD])
            host.reboot_delay = 2
        log = tmp_path / "drain.log"
        playbook = tmp_path / "check-only.yml"
        playbook.write_text(yaml.safe_dump([{"name": "gate", "hosts": "all", "steps": list(steps)}]))
        inventory = lab.write_inventory(tmp_path / "inv.yml", **({"fleet_reboot_timeout": 60} | hostvars),
                                        fleet_drain_command=f"echo drain $FLEETCTL_HOST >> {log}",
                                        fleet_undrain_command=f"echo undrain $FLEETCTL_HOST >> {log}")
        return lab, inventory, playbook, log
    return make


def rollout(inventory, playbook, *extra, timeout=600):
    return fleetctl_json("rollout", str(inventory), "--cuda", "13.0", "--driver", "auto", "--playbook",
                         str(playbook), "--canary", "1", "--max-fail", "0", *extra, timeout=timeout)


def driver(inventory, name: str) -> str:
    code, out = fleetctl_json("facts", str(inventory), "--limit", name)
    return out["hosts"][name]["facts"]["driver_version"]


def installs(host) -> list[str]:
    return [" ".join(call) for call in host.package_calls() if "install" in call]


def lay_down(host, stack_id: str) -> None:
    """An installed environment for *stack_id* (its marker), as an install would leave it."""
    env = host.fleet_root / "envs" / stack_id
    env.mkdir(parents=True)
    (env / "fleetctl-stack.json").write_text(json.dumps({"id": stack_id, "stack": {}, "validated": False}))


def test_a_driver_move_drains_upgrades_reboots_serves_undrains_and_rolls_back(fleet):
    lab, inventory, playbook, log = fleet("a1", steps=("check", "activate"))
    host = lab.hosts["a1"]
    lay_down(host, "vllm-old")  # what the host served before: current points there
    (host.fleet_root / "current").symlink_to("envs/vllm-old")

    code, check = rollout(inventory, playbook, "--check")
    assert code == 0 and check["status"] == "planned" and check["waves"] == [["a1"]]
    move = check["hosts"]["a1"]["driver"]
    assert (move["from"], move["branch"], move["flavor"]) == ("570.133.20", "580", "open")
    assert any(NEW in command for command in move["install"]) and host.boots == 1 and not installs(host)
    listed = check["hosts"]["a1"]["planned"]["driver"]  # the move's own planned actions, before provision's
    assert [s["name"] for s in listed] == ["drain", "driver", "reboot", "undrain"], listed
    assert [a["command"] for a in listed[1]["actions"]] == move["install"] and not log.exists()
    assert listed[0]["actions"][0]["on"] == "controller" and listed[2]["actions"][0]["as"] == "root"
    lay_down(host, check["hosts"]["a1"]["to"])  # the new stack, installed: activate switches current to it

    code, out = rollout(inventory, playbook)
    entry = out["hosts"]["a1"]
    assert code == 0 and entry["state"] == "done", entry
    assert os.readlink(host.fleet_root / "current") == f"envs/{entry['to']}" and entry["from"] == "envs/vllm-old"
    assert (entry["phase"], entry["drained"], entry["driver_after"]) == ("done", False, "580.65.06")
    assert [s["name"] for s in entry["driver_steps"]] == ["drain", "driver", "reboot", "undrain"]  # what ran
    assert host.boots == 2 and driver(inventory, "a1") == "580.65.06"
    assert log.read_text().split("\n")[:2] == ["drain a1", "undrain a1"]
    assert [name for name in host.packages if name.startswith("nvidia-driver-")] == [NEW] and NEW in host.held

    code, would = fleetctl_json("rollout", "--rollback", out["run_id"], "--check", timeout=600)
    plan = would["hosts"]["a1"]["rollback_plan"]
    assert code == 0 and [s["name"] for s in plan["driver"]] == ["driver back", "reboot"], plan
    assert any(OLD in a["command"] for a in plan["driver"][0]["actions"]) and host.boots == 2
    assert plan["steps"][0]["name"] == "revert" and os.readlink(host.fleet_root / "current") != "envs/vllm-old"

    code, back = fleetctl_json("rollout", "--rollback", out["run_id"], timeout=600)
    assert code == 0 and back["hosts"]["a1"]["state"] == "reverted", back["hosts"]["a1"]
    assert [s["name"] for s in back["hosts"]["a1"]["driver_steps"]][4:] == ["driver back", "reboot", "undrain"]
    assert host.boots == 3 and driver(inventory, "a1") == "570.133.20"
    assert os.readlink(host.fleet_root / "current") == "envs/vllm-old"  # the stack it served before, again
    assert [name for name in host.packages if name.startswith("nvidia-driver-")] == [OLD] and OLD in host.held
    assert log.read_text().split()[-2:] == ["undrain", "a1"]


def test_a_canary_whose_new_driver_loses_a_gpu_stays_drained_and_stops_the_waves(fleet):
    lab, inventory, playbook, log = fleet("a1", "a2", lose_gpu=True)
    code, out = rollout(inventory, playbook)
    canary, second = out["hosts"]["a1"], out["hosts"]["a2"]
    assert code != 0 and out["status"] == "stopped"
    assert (canary["state"], canary["stopped_at"], canary["drained"]) == ("failed", "verify", True)
    assert "the new driver runs 7 of the 8 GPUs the host had" in canary["error"]
    assert log.read_text().split("\n")[0] == "drain a1" and "undrain" not in log.read_text()
    assert second["state"] == "pending" and not installs(lab.hosts["a2"])  # past the budget: never started

    # The drained canary goes back: its previous branch installed and held, a reboot, undrained.
    code, back = fleetctl_json("rollout", "--rollback", out["run_id"], timeout=600)
    assert code == 0 and back["hosts"]["a1"]["state"] == "reverted" and not back["hosts"]["a1"]["drained"]
    assert lab.hosts["a1"].boots == 3 and driver(inventory, "a1") == "570.133.20"
    assert OLD in lab.hosts["a1"].held and log.read_text().split()[-2:] == ["undrain", "a1"]
    assert "a2" not in back["hosts"] or back["hosts"]["a2"]["state"] == "pending"


def test_a_host_that_never_returns_is_counted_and_stops_further_waves(fleet):
    lab, inventory, playbook, log = fleet("a1", "a2", fleet_reboot_timeout=5)
    lab.hosts["a1"].never_returns = True
    code, out = rollout(inventory, playbook)
    canary = out["hosts"]["a1"]
    assert code != 0 and out["status"] == "stopped"
    assert (canary["state"], canary["stopped_at"], canary["drained"]) == ("unreachable", "back", True)
    assert "did not answer within 5 s of its reboot" in canary["error"]
    assert out["hosts"]["a2"]["state"] == "pending" and not installs(lab.hosts["a2"])


def test_a_controller_killed_during_the_reboot_resumes_where_it_stopped(fleet):
    lab, inventory, playbook, log = fleet("a1")
    host = lab.hosts["a1"]
    host.reboot_delay = 15
    rollouts = records.state_dir() / "rollouts"
    before = set(rollouts.glob("rollout-*.json"))
    proc = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "rollout", str(inventory), "--cuda", "13.0",
                             "--driver", "auto", "--playbook", str(playbook), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)

    def rebooting():
        journals = set(rollouts.glob("rollout-*.json")) - before
        if not journals or host.reboots < 1:
            return None
        data = json.loads(next(iter(journals)).read_text())
        return data if data["hosts"]["a1"].get("phase") == "back" else None

    journal = wait_until(rebooting, 120, "the rollout waiting for a1 to come back from its reboot")
    proc.send_signal(signal.SIGKILL)  # the controller dies while the host reboots
    proc.wait()
    assert host.boots == 1

    code, out = fleetctl_json("rollout", "--resume", journal["run_id"], timeout=600)
    entry = out["hosts"]["a1"]
    assert code == 0 and entry["state"] == "done", entry
    assert host.boots == 2 and host.reboots == 1  # waited for the reboot it had asked for; no second one
    assert driver(inventory, "a1") == "580.65.06"
    assert [call for call in installs(host) if NEW in call]  # installed once, before the controller died
    assert len([c for c in installs(host) if NEW in c]) == 1


def test_after_a_driver_move_the_lock_holds_the_new_driver_and_an_audit_is_clean(fleet):
    lab, inventory, playbook, log = fleet("a1")
    code, out = rollout(inventory, playbook)
    assert code == 0 and out["hosts"]["a1"]["state"] == "done"
    lock = yaml.safe_load((Path(inventory).parent / "fleet.lock").read_text())
    facts = lock["classes"][lock["hosts"]["a1"]["class"]]["facts"]
    assert (facts["driver_version"], facts["cuda_driver_version"]) == ("580.65.06", "13.0")
    code, audit = fleetctl_json("audit", str(inventory))
    drifts = {d["kind"] for d in audit["hosts"]["a1"]["drift"]}
    assert not drifts & {"driver", "cuda_driver", "gpus"}, audit["hosts"]["a1"]


FM_OLD, FM_NEW = "nvidia-fabricmanager-570", "nvidia-fabricmanager-580"


def test_an_nvswitch_host_moves_its_fabric_manager_with_the_driver_and_back(small_lab, tmp_path):
    """An HGX A100 (NVSwitch: its GPUs report a fabric state) on R570 with its fabric manager at 570.133.20:
    the move installs R580's at exactly the new driver's version, held and enabled, starts it after the reboot
    and serves only once every GPU's fabric completed; the rollback puts 570.133.20's back."""
    lab = small_lab(("hgx", BASE, {"os_release": "ubuntu-22.04"}), net=89)
    old = lab.derive_health(BASE, "a100-nvswitch", nvswitch=True)
    new = lab.derive_health(lab.derive_profile(BASE, driver="580.65.06", cuda="13.0"), "a100-nvswitch-580", nvswitch=True)
    host = lab.hosts["hgx"]
    host.set_hardware(old)
    host.driver_packages({NEW: new, OLD: old}, installed=[OLD])
    write_installed(host.dir, {**host.packages, FM_OLD: "570.133.20-1", "libnvidia-nscq-570": "570.133.20-1"})
    host.set_service("nvidia-fabricmanager", "active")
    (host.dir / "services" / "nvidia-fabricmanager.enabled").touch()
    host.reboot_delay = 2
    playbook = tmp_path / "check-only.yml"
    playbook.write_text(yaml.safe_dump([{"name": "gate", "hosts": "all", "steps": ["check"]}]))
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_reboot_timeout=60, fleet_fabric_timeout=20)

    code, check = rollout(inventory, playbook, "--check")
    move = check["hosts"]["hgx"]["driver"]
    assert code == 0 and move["fabric_manager"] == [FM_NEW, "libnvidia-nscq-580"]
    assert any(f'{FM_NEW}="$v-*"' in c for c in move["install"]) and "systemctl enable nvidia-fabricmanager" in move["install"]
    assert any(f"{FM_OLD}=570.133.20-*" in c for c in move["rollback"])

    code, out = rollout(inventory, playbook)
    entry = out["hosts"]["hgx"]
    assert code == 0 and entry["state"] == "done", entry
    assert host.packages[FM_NEW] == "580.65.06" and FM_OLD not in host.packages and FM_NEW in host.held
    assert host.service("nvidia-fabricmanager") == "active"
    code, health = fleetctl_json("health", str(inventory))
    assert code == 0 and health["hosts"]["hgx"]["status"] == "healthy", health["hosts"]["hgx"]["summary"]

    code, back = fleetctl_json("rollout", "--rollback", out["run_id"], timeout=600)
    assert code == 0 and back["hosts"]["hgx"]["state"] == "reverted", back["hosts"]["hgx"]
    assert host.packages[FM_OLD] == "570.133.20" and FM_NEW not in host.packages and FM_OLD in host.held
    assert host.service("nvidia-fabricmanager") == "active" and driver(inventory, "hgx") == "570.133.20"


def test_an_nvswitch_host_whose_fabric_never_completes_stops_at_verify_drained(small_lab, tmp_path):
    """Where the fabric does not complete after the new fabric manager started (an NVSwitch or NVLink fault:
    the GPUs' fabric state stays In Progress), the host stops at verify, drained: it never serves without CUDA."""
    lab = small_lab(("hgx", BASE, {"os_release": "ubuntu-22.04"}), net=89)
    old = lab.derive_health(BASE, "a100-nvswitch", nvswitch=True)
    stuck = lab.derive_health(lab.derive_profile(BASE, driver="580.65.06", cuda="13.0"), "a100-nvswitch-580-stuck",
                              nvswitch=True, changes={"fabric.state": "In Progress", "fabric.status": "N/A"})
    host = lab.hosts["hgx"]
    host.set_hardware(old)
    host.driver_packages({NEW: stuck, OLD: old}, installed=[OLD])
    write_installed(host.dir, {**host.packages, FM_OLD: "570.133.20-1"})
    host.reboot_delay = 2
    playbook = tmp_path / "check-only.yml"
    playbook.write_text(yaml.safe_dump([{"name": "gate", "hosts": "all", "steps": ["check"]}]))
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_reboot_timeout=60, fleet_fabric_timeout=3)

    code, out = rollout(inventory, playbook)
    entry = out["hosts"]["hgx"]
    assert code != 0 and (entry["state"], entry["stopped_at"], entry["drained"]) == ("failed", "verify", True), entry
    assert entry["error"].startswith("GPU 0: NVSwitch fabric not completed (state in progress") and "(after 3 s)" in entry["error"]
    assert host.service("nvidia-fabricmanager") == "active" and host.packages[FM_NEW] == "580.65.06"


def test_a_host_sick_after_its_driver_moves_reboot_is_stopped_by_the_gates_health_read(small_lab, tmp_path):
    """The wave's gate reads health before (check, on the facts before the move) and after the reboot (the serve
    phase's check, on the facts the new driver gives): a GPU whose row remap is pending after the reboot fails
    there, named with its action, and the waves stop."""
    lab = small_lab(("a1", BASE, {"os_release": "ubuntu-22.04"}), ("a2", BASE, {"os_release": "ubuntu-22.04"}), net=89)
    sick = lab.derive_health(lab.derive_profile(BASE, driver="580.65.06", cuda="13.0"), "a100-580-remap",
                             changes={"remapped_rows.pending": "Yes"}, gpu=3)
    for host in lab.hosts.values():
        host.driver_packages({NEW: sick, OLD: BASE}, installed=[OLD])
        host.reboot_delay = 2
    playbook = tmp_path / "check-only.yml"
    playbook.write_text(yaml.safe_dump([{"name": "gate", "hosts": "all", "steps": ["check"]}]))
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_reboot_timeout=60)
    code, out = rollout(inventory, playbook)
    canary = out["hosts"]["a1"]
    assert code != 0 and out["status"] == "stopped"
    assert (canary["state"], canary["stopped_at"], canary["step"]) == ("failed", "serve", "check"), canary
    assert canary["error"].startswith("unhealthy: GPU 3: a memory row is waiting to be remapped: RESET_GPU")
    assert out["hosts"]["a2"]["state"] == "pending"
