"""Become end to end on lab hosts with a real systemd, sshd and sudo (tests/lab/systemd.py), reached as
its three users: ``fleet`` (sudo NOPASSWD), ``fleetpw`` (sudo with a password), ``nosudo`` (no sudo).
Fast tests here (facts, refusals, the one sudo try); the provisions that serve vLLM are in
tests/test_become_serve.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import fleetctl, fleetctl_json
from tests.lab.systemd import PASSWORD


def write_inventory(lab, hosts, tmp_path: Path, user: str, name: str = "inv.yml", **extra) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(lab.inventory(hosts, user=user, **extra), sort_keys=False))
    return path


def auth_failures(host) -> int:
    """sudo's failed password tries recorded on the host (its journal: "N incorrect password attempt")."""
    said = host.root("journalctl -q --no-pager -t sudo 2>/dev/null | grep -c 'incorrect password attempt'")
    return int(said.stdout.strip() or 0)


@pytest.mark.parametrize("user, mode, become", [("fleet", "nopasswd", None), ("fleetpw", "password", None),
                                                ("nosudo", "none", None), ("fleet", "nopasswd", "sudo as root")])
def test_facts_say_how_the_host_is_reached(systemd_host, tmp_path, user, mode, become):
    extra = {"ansible_become": True} if become else {}
    inventory = write_inventory(systemd_host.lab, [systemd_host], tmp_path, user, **extra)
    code, out = fleetctl_json("facts", inventory)
    assert code == 0, out
    facts = out["hosts"][systemd_host.name]["facts"]
    assert (facts["user"], facts["sudo"], facts["become"]) == (user, mode, become)
    # Without become the install root is the login user's own; with it, root's.
    assert facts["fleet_root"] == ("/opt/fleetctl" if become else f"/home/{user}/.fleetctl")
    assert facts["fleet_root_writable"] is (not become)


def test_a_wrong_password_is_one_line_one_try_and_a_failed_host(systemd_host, tmp_path):
    inventory = write_inventory(systemd_host.lab, [systemd_host], tmp_path, "fleetpw", ansible_become=True)
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    before = auth_failures(systemd_host)
    code, out = fleetctl_json("provision", inventory, "--become-password-file", wrong, timeout=600)
    assert code == 2, out
    host = out["hosts"][systemd_host.name]
    assert host["status"] == "failed"
    failed = [s for s in host["steps"] if s["status"] == "failed"]
    assert [s["detail"] for s in failed] == ["sudo: incorrect password"]
    assert auth_failures(systemd_host) - before == 1  # one try, never sudo's three
    assert "not-the-password" not in json.dumps(out)


@pytest.mark.parametrize("user, password, reason", [
    ("fleetpw", None, "sudo for fleetpw needs a password and none was given"),
    ("nosudo", None, "nosudo may not run sudo on this host"),
    ("nosudo", "anything", "nosudo may not run sudo on this host"),
])
def test_each_sudo_refusal_has_its_own_line(systemd_host, tmp_path, user, password, reason):
    inventory = write_inventory(systemd_host.lab, [systemd_host], tmp_path, user, ansible_become=True)
    args = ["provision", inventory]
    if password:
        (tmp_path / "pw").write_text(password + "\n")
        args += ["--become-password-file", tmp_path / "pw"]
    code, out = fleetctl_json(*args, timeout=600)
    assert code == 2, out
    failed = [s for s in out["hosts"][systemd_host.name]["steps"] if s["status"] == "failed"]
    assert [s["detail"] for s in failed] == [reason]
    assert systemd_host.root("test -e /opt/fleetctl && echo made").stdout == ""  # nothing ran as root


def test_requiretty_has_its_own_line(systemd_host, tmp_path):
    systemd_host.root("echo 'Defaults:fleet requiretty' > /etc/sudoers.d/zz-tty && chmod 440 /etc/sudoers.d/zz-tty")
    inventory = write_inventory(systemd_host.lab, [systemd_host], tmp_path, "fleet", ansible_become=True)
    code, out = fleetctl_json("facts", inventory)
    assert out["hosts"][systemd_host.name]["facts"]["sudo"] == "requiretty"
    code, out = fleetctl_json("provision", inventory, timeout=600)
    failed = [s for s in out["hosts"][systemd_host.name]["steps"] if s["status"] == "failed"]
    assert [s["detail"] for s in failed] == ["sudo for fleet requires a terminal (Defaults requiretty)"]


def test_a_root_fleet_root_without_become_is_refused_before_anything_runs(systemd_host, tmp_path):
    inventory = write_inventory(systemd_host.lab, [systemd_host], tmp_path, "nosudo", fleet_root="/opt/fleetctl")
    code, out = fleetctl_json("provision", inventory, timeout=600)
    assert code == 2, out
    steps = out["hosts"][systemd_host.name]["steps"]
    assert [s["name"] for s in steps] == ["reach"]
    assert steps[0]["detail"].startswith("/opt/fleetctl is not writable by nosudo and the host does not become root")


def test_ask_become_pass_needs_a_terminal(tmp_path):
    """-K reads only from a terminal: without one it is one line pointing at --become-password-file."""
    inv = tmp_path / "inv.yml"
    inv.write_text("all:\n  hosts:\n    h1:\n      ansible_host: 127.0.0.1\n")
    done = fleetctl("facts", inv, "-K")
    assert done.returncode == 1 and "-K asks for the sudo password on a terminal" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_root_command_that_outlives_its_timeout_is_killed_on_the_host(systemd_host, tmp_path):
    """The host's timeout(1) runs inside sudo: outside it, as the login user, it could not signal the root
    processes of a command that hangs (an install's compileall outlived its timeout so)."""
    from fleetctl.errors import TimedOut
    from fleetctl.hosts.inventory import load_inventory
    from fleetctl.reach.connection import connect
    from tests.conftest import wait_until

    inventory = write_inventory(systemd_host.lab, [systemd_host], tmp_path, "fleetpw", ansible_become=True,
                                ansible_become_password=PASSWORD)
    host = load_inventory(inventory).select(None)[0]
    conn = connect(host, timeout=30)
    try:
        assert conn.run("id -u", timeout=30, root=True).stdout.strip() == "0"
        with pytest.raises(TimedOut):
            conn.run("sleep 4711", timeout=3, root=True)
    finally:
        conn.close()
    wait_until(lambda: "sleep 4711" not in systemd_host.root("ps -eo args").stdout, 30, "the root sleep killed")
