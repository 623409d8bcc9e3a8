"""Faults on real sshd hosts: one host's trouble never hides or delays the others."""

from __future__ import annotations

import subprocess
import threading
import time

from fleetctl import exit_code, fan_out, gather, load_inventory
from tests.conftest import fleetctl_json


def facts_run(lab, tmp_path, *, timeout=5.0, **extra_vars):
    inventory = load_inventory(lab.write_inventory(tmp_path / "inv.yml", **extra_vars))
    start = time.monotonic()
    outcomes = fan_out(inventory.select(None), gather, timeout=timeout)
    return outcomes, time.monotonic() - start


def test_dead_frozen_and_hung_hosts(small_lab, tmp_path):
    lab = small_lab(("good", "h100-sxm-80gb", {}), ("dead", "t4", {}), ("frozen", "l4", {}),
                    ("hung", "hang", {}), ("good-cpu", None, {}))
    lab.hosts["dead"].kill()
    lab.hosts["frozen"].freeze()
    outcomes, elapsed = facts_run(lab, tmp_path, timeout=4)
    status = {n: o.status for n, o in outcomes.items()}
    assert status == {"good": "ok", "dead": "unreachable", "frozen": "timeout", "hung": "timeout",
                      "good-cpu": "ok"}, {n: o.error for n, o in outcomes.items()}
    assert "cannot reach" in outcomes["dead"].error
    assert elapsed < 4 + 3, "a hanging host delayed the run past its deadline"
    assert outcomes["good"].value.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert exit_code(outcomes.values()) == 2
    # The host killed the hung command itself: nothing of the probe lingers there.
    time.sleep(3)
    left = subprocess.run(["pgrep", "-f", "sleep 3600"], capture_output=True, text=True).stdout
    assert not left.strip(), "the hung nvidia-smi outlived its deadline"
    lab.hosts["frozen"].thaw()


def test_host_killed_mid_run(small_lab, tmp_path):
    lab = small_lab(("steady", "a100-sxm4-80gb", {}), ("doomed", "b200", {}))
    lab.hosts["doomed"].set_hardware("b200", delay=3)
    killer = threading.Timer(1.0, lab.hosts["doomed"].kill)
    killer.start()
    outcomes, _ = facts_run(lab, tmp_path, timeout=10)
    killer.join()
    assert outcomes["steady"].ok
    assert outcomes["doomed"].status == "unreachable", outcomes["doomed"]
    assert exit_code(outcomes.values()) == 4


def test_refused_key_and_unknown_host_key(small_lab, tmp_path):
    lab = small_lab(("keyless", "t4", {"authorized": False}), ("fine", "l4", {}))
    outcomes, _ = facts_run(lab, tmp_path)
    assert outcomes["keyless"].status == "unreachable"
    assert "authentication" in outcomes["keyless"].error
    assert outcomes["fine"].ok

    # A host missing from known_hosts is refused unless host key checking is off.
    lab.known_hosts.write_text("")
    outcomes, _ = facts_run(lab, tmp_path)
    assert outcomes["fine"].status == "unreachable" and "known_hosts" in outcomes["fine"].error
    outcomes, _ = facts_run(lab, tmp_path, ansible_host_key_checking=False)
    assert outcomes["fine"].ok


def test_cli_exit_code_for_unreachable_only(small_lab, tmp_path):
    lab = small_lab(("up", "t4", {}), ("down", "t4", {}))
    lab.hosts["down"].kill()
    code, out = fleetctl_json("facts", lab.write_inventory(tmp_path / "inv.yml"), "--timeout", "5")
    assert code == 4
    assert out["hosts"]["down"] == {"status": "unreachable", "error": out["hosts"]["down"]["error"]}
    assert out["hosts"]["up"]["status"] == "ok"
