"""Privilege escalation, as Ansible's ``become``: which commands run as root, and how they get there.

A fleet is rarely reached as root: cloud images log in as ``ubuntu`` or ``admin`` with sudo, on-prem
fleets as a directory user whose sudo wants a password. The inventory says so as it does for Ansible —
``ansible_become``, ``ansible_become_method`` (``sudo``), ``ansible_become_user`` (default root),
``ansible_become_password`` / ``ansible_become_pass``, ``ansible_become_flags`` — or the command line
(``-b``, ``-K``, ``--become-password-file``). Every command still runs as the login user unless its
action declares that it needs root (:attr:`fleetctl.apply.execute.Action.root`); the connection then wraps it
here (:func:`wrap`), and nothing else does.

The password travels on the command's stdin only (``sudo -S -p ''``), ahead of the command's own input,
never in argv, the environment or a file. Before its first command as root, the connection checks sudo
once (:func:`check_command`, then :func:`judge`): ``-k`` makes sudo ask for the password even where it
has credentials cached, so the password line is always consumed by sudo and never becomes the input of
the command behind it; and the check's stdin holds the password alone, so a wrong one is one try
("1 incorrect password attempt"), never three, and no later command of the run tries again.

What the host allows is a fact (``sudo -n true`` in the probe, :func:`sudo_mode`): ``nopasswd``,
``password``, ``none`` (no sudo for this user, or no sudo at all) or ``requiretty``; a login as root is
``root``. This module runs nothing: values in, commands and one-line reasons out.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Mapping

from fleetctl.errors import CommandFailed

FALSY = {"false", "no", "off", "0", "n", ""}
METHODS = ("sudo",)
# sudo's own options that fleetctl decides (how the password is read, whether cached credentials count):
# ansible_become_flags' copies are dropped (Ansible's default flags are "-H -S -n").
OWN_FLAGS = {"-S", "--stdin", "-n", "--non-interactive", "-k", "--reset-timestamp"}

# sudo's messages (sudo 1.9, plugins/sudoers/logging.c and check.c), each the mark of one reason.
WRONG = ("incorrect password attempt", "Sorry, try again")
NEEDS_PASSWORD = ("a password is required", "no password was provided")
NOT_ALLOWED = ("is not in the sudoers file", "may not run sudo", "is not allowed to execute")
TTY = ("you must have a tty", "a terminal is required")


class BecomeFailed(CommandFailed):
    """The host's sudo refused: a wrong password, no sudo, a password not given, requiretty. The host was
    reached, so it is counted failed, never unreachable."""


@dataclass(frozen=True)
class Become:
    """How a host's root commands run: the method, the user they run as, extra flags, the password."""

    method: str = "sudo"
    user: str = "root"
    flags: tuple[str, ...] = ()
    password: str | None = field(default=None, repr=False, compare=False)


def become_for(vars: Mapping, *, forced: bool = False, password: str | None = None) -> Become | None:
    """The host's become from its (templated) vars, or None where it does not become. *forced* is ``-b``;
    *password* is ``-K``'s or ``--become-password-file``'s, which win over the vars' (as in Ansible, where the
    command line's become password is the connection's)."""
    if not forced and str(vars.get("ansible_become", False)).strip().lower() in FALSY:
        return None
    method = str(vars.get("ansible_become_method") or "sudo")
    if method not in METHODS:
        raise ValueError(f"ansible_become_method: {method} is not supported (fleetctl becomes with sudo)")
    given = vars.get("ansible_become_password", vars.get("ansible_become_pass"))
    flags = tuple(f for f in shlex.split(str(vars.get("ansible_become_flags") or "")) if f not in OWN_FLAGS)
    return Become(method, str(vars.get("ansible_become_user") or "root"), flags,
                  password if password is not None else (str(given) if given not in (None, "") else None))


def wrap(command: str, stdin: str | None, become: Become, *, with_password: bool) -> tuple[str, str | None]:
    """*command* run through sudo as the become user, and the stdin to send: the password line first where
    sudo asks for one (*with_password*), then the command's own input."""
    words = ["sudo", *(["-k", "-S", "-p", ""] if with_password else ["-n"]), *become.flags, "-u", become.user,
             "--", "/bin/sh", "-c", command]
    wrapped = " ".join(map(shlex.quote, words))
    if not with_password:
        return wrapped, stdin
    return wrapped, f"{become.password}\n{stdin or ''}"


def check_command(become: Become) -> tuple[str, str | None]:
    """The one sudo try of a run: ``true`` as the become user; stdin holds the password alone."""
    if become.password is None:
        return wrap("true", None, become, with_password=False)
    return wrap("true", None, become, with_password=True)


def judge(host: str, login: str, become: Become, exited: int, stderr: str) -> BecomeFailed | None:
    """The check's result → None (sudo works) or the one-line reason, with its fix."""
    if exited == 0:
        return None
    said = stderr.strip().splitlines()[-1:] or [""]
    if any(m in stderr for m in TTY):
        return BecomeFailed(host, f"sudo for {login} requires a terminal (Defaults requiretty)",
                            fix=f"add 'Defaults:{login} !requiretty' to the host's sudoers")
    if any(m in stderr for m in WRONG):
        return BecomeFailed(host, "sudo: incorrect password",
                            fix="check the become password (-K, --become-password-file, ansible_become_password)")
    if any(m in stderr for m in NOT_ALLOWED) or "sudo: not found" in stderr or exited == 127:
        return BecomeFailed(host, f"{login} may not run sudo on this host",
                            fix="log in as a user with sudo, or set a fleet_root that user owns and drop become")
    if any(m in stderr for m in NEEDS_PASSWORD):
        return BecomeFailed(host, f"sudo for {login} needs a password and none was given",
                            fix="pass -K or --become-password-file, or set ansible_become_password (vault it)")
    return BecomeFailed(host, f"sudo as {become.user} failed (exit {exited}): {said[0]}")


def parse_reach(text: str) -> tuple[str | None, bool | None]:
    """The probe's ``reach`` section → (sudo mode, whether the login user may write the fleet_root).
    The mode: ``root`` (the login is root), ``nopasswd``, ``password``, ``requiretty`` or ``none`` (no
    sudo, or none for this user); None where the section is missing (an older probe's record)."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if "uid" not in values:
        return None, None
    writable = values.get("root_writable") == "yes"
    said, rc = values.get("sudo_said", ""), values.get("sudo_rc", "127")
    if values["uid"].strip() == "0":
        return "root", writable
    if rc == "0":
        return "nopasswd", writable
    if any(m in said for m in TTY):
        return "requiretty", writable
    if any(m in said for m in NEEDS_PASSWORD):
        return "password", writable
    return "none", writable


def validate_command() -> str:
    """``sudo -n -v``: where ``sudo -n true`` said "a password is required", this says "may not run sudo"
    to a user with no sudo at all (and reads no password, counts no try)."""
    return "sudo -n -v"


@dataclass(frozen=True)
class Privileges:
    """What a host's runs may do as root, from its facts (pure): whether writes under the fleet_root go
    through become, whether system changes (units, packages, drivers, the kernel log) can be made at all,
    and why nothing can run, where nothing can."""

    fleet_as_root: bool = False
    system: bool = True
    refusal: str | None = None


def privileges(user: str | None, sudo: str | None, fleet_root: str | None, writable: bool | None,
               become: str | None) -> Privileges:
    """From the facts' login user, sudo mode, fleet_root and its writability, and the host's become."""
    if sudo in (None, "root"):  # root, or facts from before the probe said (taken as root, as then)
        return Privileges()
    if become:
        return Privileges(fleet_as_root=not writable)
    if writable:
        return Privileges(system=False)
    return Privileges(system=False, refusal=f"{fleet_root} is not writable by {user} and the host does not become "
                                            f"root (sudo: {sudo}): set ansible_become: true (or pass -b), or set "
                                            f"fleet_root to a directory {user} owns")


def facts_privileges(facts) -> Privileges:
    """privileges() of a Facts."""
    return privileges(facts.user, facts.sudo, facts.fleet_root, facts.fleet_root_writable, facts.become)
