"""Become as data and through the connection's seam (fleetctl/hosts/become.py, connection.Escalation): Ansible's
vars in, sudo command lines out; the one sudo check; which actions run as root; sudo's words → reasons.
The same on real hosts with real sudo: tests/test_become_lab.py, tests/test_become_serve.py."""

from __future__ import annotations

import shlex

import pytest

from fleetctl.apply.execute import FLEET, SYSTEM, USER, Action, Planned, Step, execute
from fleetctl.hosts.become import Become, become_for, judge, parse_reach, privileges, wrap
from fleetctl.reach.connection import Escalation
from fleetctl.reach.fanout import Deadline
from fleetctl.status import Status
from fleetctl.testing import RecordedConnection, Reply


def test_ansible_vars_make_the_become():
    assert become_for({}) is None and become_for({"ansible_become": "no"}) is None
    assert become_for({"ansible_become": True}) == Become("sudo", "root", ())
    b = become_for({"ansible_become": "yes", "ansible_become_user": "svc", "ansible_become_pass": "pw1",
                    "ansible_become_flags": "-H -S -n --preserve-env=HOME"})
    assert (b.user, b.flags, b.password) == ("svc", ("-H", "--preserve-env=HOME"), "pw1")
    assert become_for({"ansible_become_password": "x"}, forced=True, password="cli").password == "cli"
    assert "pw1" not in repr(b)
    with pytest.raises(ValueError, match="su is not supported"):
        become_for({"ansible_become": True, "ansible_become_method": "su"})


def test_the_password_goes_on_stdin_ahead_of_the_commands_own_input():
    b = Become(password="hunter2-long")
    command, stdin = wrap("cat > /etc/x", "content\n", b, with_password=True)
    assert shlex.split(command) == ["sudo", "-k", "-S", "-p", "", "-u", "root", "--", "/bin/sh", "-c", "cat > /etc/x"]
    assert stdin == "hunter2-long\ncontent\n" and "hunter2" not in command
    assert wrap("true", None, Become(), with_password=False) == ("sudo -n -u root -- /bin/sh -c true", None)


@pytest.mark.parametrize("exited, stderr, reason", [
    (1, "Sorry, try again.\n\nsudo: no password was provided\nsudo: 1 incorrect password attempt\n",
     "sudo: incorrect password"),
    (1, "sudo: a password is required\n", "sudo for admin needs a password and none was given"),
    (1, "Sorry, user admin may not run sudo on h1.\n", "admin may not run sudo on this host"),
    (1, "admin is not in the sudoers file.  This incident will be reported.\n", "admin may not run sudo on this host"),
    (127, "sh: 1: sudo: not found\n", "admin may not run sudo on this host"),
    (1, "sudo: sorry, you must have a tty to run sudo\n", "sudo for admin requires a terminal (Defaults requiretty)"),
])
def test_each_refusal_of_sudo_is_its_own_line(exited, stderr, reason):
    refused = judge("h1", "admin", Become(), exited, stderr)
    assert refused.reason == reason and refused.status == Status.FAILED and refused.fix
    assert judge("h1", "admin", Become(), 0, "") is None


@pytest.mark.parametrize("section, mode", [
    ("uid=0\nsudo_rc=127\nroot_writable=yes", "root"),
    ("uid=1000\nsudo_rc=0\nsudo_said=\nroot_writable=no", "nopasswd"),
    ("uid=1000\nsudo_rc=1\nsudo_said=sudo: a password is required\nroot_writable=no", "password"),
    ("uid=1000\nsudo_rc=1\nsudo_said=Sorry, user nosudo may not run sudo on h.\nroot_writable=yes", "none"),
    ("uid=1000\nsudo_rc=127\nroot_writable=yes", "none"),
    ("uid=1000\nsudo_rc=1\nsudo_said=sudo: sorry, you must have a tty to run sudo\nroot_writable=no", "requiretty"),
    ("", None),
])
def test_the_probe_says_the_sudo_mode(section, mode):
    assert parse_reach(section)[0] == mode


def test_privileges_from_the_facts():
    assert privileges("root", "root", "/opt/fleetctl", True, None) == privileges("x", None, None, None, None)
    assert privileges("admin", "nopasswd", "/opt/fleetctl", False, "sudo as root").fleet_as_root
    own = privileges("nosudo", "none", "/home/nosudo/.fleetctl", True, None)
    assert (own.fleet_as_root, own.system, own.refusal) == (False, False, None)
    refused = privileges("nosudo", "none", "/opt/fleetctl", False, None).refusal
    assert refused.startswith("/opt/fleetctl is not writable by nosudo and the host does not become root (sudo: none)")


def test_an_action_declares_its_privilege_and_the_executor_asks_the_connection():
    conn = RecordedConnection("h1", default=Reply())
    plan = Planned("x", (Action("a fleet write", "mkdir /opt/fleetctl/a", change="a"),
                         Action("a unit", "systemctl restart u", change="u", privilege=SYSTEM),
                         Action("a read", "cat /etc/os-release", privilege=USER)),
                   lambda _: Step("x", Status.CHANGED))
    execute(plan, conn, Deadline(30))
    assert conn.root_commands() == ["systemctl restart u"]
    conn = RecordedConnection("h1", default=Reply())
    execute(plan, conn, Deadline(30), fleet_as_root=True)
    assert conn.root_commands() == ["mkdir /opt/fleetctl/a", "systemctl restart u"]
    assert Action("w", "x").privilege == FLEET


class Host:
    """What Escalation runs on: a run(command, timeout, stdin) answering like a host's sudo."""

    def __init__(self, mode: str, password: str = "right-pass"):
        self.mode, self.password, self.ran = mode, password, []

    def run(self, command: str, *, timeout: float, stdin: str | None = None):
        from fleetctl.reach.connection import Result
        self.ran.append((command, stdin))
        words = shlex.split(command)
        if self.mode == "nopasswd" or words[:2] != ["sudo", "-n"] and (stdin or "").split("\n")[0] == self.password:
            return Result("h1", command, 0, "", "", 0)
        if words[:3] == ["sudo", "-n", "-v"] and self.mode == "none":
            return Result("h1", command, 1, "", "Sorry, user u may not run sudo on h1.\n", 0)
        if words[:2] == ["sudo", "-n"]:
            return Result("h1", command, 1, "", "sudo: a password is required\n", 0)
        return Result("h1", command, 1, "", "Sorry, try again.\nsudo: 1 incorrect password attempt\n", 0)


def test_nopasswd_sudo_is_never_sent_a_password():
    host = Host("nopasswd")
    escalation = Escalation("h1", "u", Become(password="right-pass"))
    command, stdin = escalation.wrap(host.run, "id -u", None, 30)
    assert stdin is None and command.startswith("sudo -n ")
    assert all("right-pass" not in (s or "") for _, s in host.ran)


def test_the_password_is_tried_once_and_a_refusal_is_remembered():
    host = Host("password")
    escalation = Escalation("h1", "u", Become(password="wrong"))
    for _ in range(3):
        with pytest.raises(Exception, match="sudo: incorrect password"):
            escalation.wrap(host.run, "id -u", None, 30)
    tries = [s for _, s in host.ran if s]
    assert tries == ["wrong\n"]  # the password alone on the check's stdin, once


def test_the_right_password_then_every_root_command_carries_it():
    host = Host("password")
    escalation = Escalation("h1", "u", Become(password="right-pass"))
    command, stdin = escalation.wrap(host.run, "cat > f", "data", 30)
    assert stdin == "right-pass\ndata" and "-k" in shlex.split(command)
    assert len(host.ran) == 3  # sudo -n, sudo -n -v, the one try; then nothing more per command
    escalation.wrap(host.run, "true", None, 30)
    assert len(host.ran) == 3


def test_a_user_with_no_sudo_is_told_so_not_asked_for_a_password():
    host = Host("none")
    with pytest.raises(Exception, match="u may not run sudo on this host"):
        Escalation("h1", "u", Become(password="right-pass")).wrap(host.run, "true", None, 30)
    assert all(not s for _, s in host.ran)  # the password never sent to a user sudo refuses anyway
