"""The host packages a stack needs, on a real Debian host (tests/lab/systemd.py) that lacks one as a bare cloud
image does: as the NOPASSWD user ``fleet`` with become, ``provision --check`` lists the apt install as root and
``provision`` installs it through sudo (a playbook that stops before install: the stack itself is not pulled),
a second run changes nothing; as ``nosudo`` check refuses, naming the package and the command."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import fleetctl_json

# The pip installer: the environment is made by Python's own venv, which needs ensurepip (python3.11-venv).
PIP = {"fleet_installer": "pip"}


def bare(host) -> None:
    """The host's python3.11-venv removed (Debian's cloud image ships python3 without it)."""
    said = host.root("dpkg -r --force-depends python3-venv python3.11-venv >/dev/null 2>&1; "
                     "dpkg -l python3.11-venv 2>/dev/null | grep -c '^ii'")
    assert said.stdout.strip() == "0", said.stdout + said.stderr


def files(host, tmp_path: Path, user: str, **extra) -> tuple[Path, Path]:
    inventory, playbook = tmp_path / "inv.yml", tmp_path / "play.yml"
    inventory.write_text(yaml.safe_dump(host.lab.inventory([host], user=user, **PIP, **extra), sort_keys=False))
    playbook.write_text(yaml.safe_dump([{"name": "prerequisites", "hosts": "all", "steps": ["check", "packages"]}]))
    return inventory, playbook


def steps_of(out: dict, host) -> dict:
    return {s["name"]: s for s in out["hosts"][host.name]["steps"]}


def test_a_sudo_user_gets_the_missing_package_installed_through_become(systemd_host, tmp_path):
    bare(systemd_host)
    inventory, playbook = files(systemd_host, tmp_path, "fleet", ansible_become=True)
    code, out = fleetctl_json("provision", inventory, "--playbook", playbook, "--check", timeout=600)
    assert code == 0, out
    [action] = steps_of(out, systemd_host)["packages"]["actions"]
    assert action["as"] == "root" and action["change"] == "install python3.11-venv with apt-get"
    assert action["command"].endswith("apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends "
                                      "python3.11-venv")
    assert systemd_host.root("dpkg -l python3.11-venv 2>/dev/null | grep -c '^ii'").stdout.strip() == "0"

    code, out = fleetctl_json("provision", inventory, "--playbook", playbook, timeout=900)
    assert code == 0, out
    step = steps_of(out, systemd_host)["packages"]
    assert step["status"] == "changed" and step["data"]["installed"] == ["python3.11-venv"], step
    assert systemd_host.root("dpkg -l python3.11-venv | grep -c '^ii'").stdout.strip() == "1"
    assert systemd_host.root("python3 -c 'import ensurepip'").returncode == 0

    code, out = fleetctl_json("provision", inventory, "--playbook", playbook, timeout=600)
    assert code == 0 and steps_of(out, systemd_host)["packages"]["status"] == "ok", out  # a second run: nothing


def test_a_user_without_sudo_is_refused_at_check_naming_the_package_and_the_command(systemd_host, tmp_path):
    bare(systemd_host)
    inventory, playbook = files(systemd_host, tmp_path, "nosudo")
    code, out = fleetctl_json("provision", inventory, "--playbook", playbook, timeout=600)
    assert code == 2, out
    check = steps_of(out, systemd_host)["check"]
    assert check["status"] == "failed" and "packages" not in steps_of(out, systemd_host)
    assert check["detail"].startswith("the host lacks python3.11-venv (Python's venv needs ensurepip to make the "
                                      "stack's environment), and nosudo cannot become root here (sudo: none): "
                                      "run as root `{ apt-cache show")
    assert "install -y --no-install-recommends python3.11-venv`" in check["detail"]
