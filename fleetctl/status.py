"""Statuses and exit codes: the words every result uses, and the one place a run's exit code is decided.

A status is a ``str`` enum, so it compares equal to its word and is written as that word in
JSON (records, --json output, fleet.lock) exactly as before. Exit codes follow
ansible-playbook's: 0 all ok, 1 fleetctl's own error, 2 a host failed (or drifted, or was
refused), 4 a host was unreachable; an audit combines drift and unreachable (6).
"""

from __future__ import annotations

import json
from enum import Enum, IntEnum
from typing import Iterable


class Status(str, Enum):
    OK = "ok"  # done, or nothing to do
    CHANGED = "changed"  # done, and the host changed
    FAILED = "failed"
    SKIPPED = "skipped"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    REFUSED = "refused"  # no stack fits the host
    CLEAN = "clean"  # an audit found no drift
    DRIFT = "drift"

    def __str__(self) -> str:
        return self.value


class Exit(IntEnum):
    OK = 0
    ERROR = 1  # fleetctl's own: bad input, nothing contacted
    FAILED = 2  # some host failed, timed out, was refused, or drifted
    UNREACHABLE = 4  # some host could not be reached


FAILING = {Status.FAILED, Status.TIMEOUT, Status.REFUSED}


def exit_code(statuses: Iterable[str], *, combine: bool = False) -> Exit | int:
    """The run's exit code from its hosts' statuses. A failure wins over an unreachable host, as
    in ansible-playbook. With *combine* (audits, as Puppet's and Terraform's detailed exit codes)
    the bits add up to 6: drift is 2, and a host the audit could not read (unreachable, timed out
    or failed) is 4, since an audit's findings are about the hosts that answered."""
    seen = set(statuses)
    if combine:
        unread = seen - {Status.CLEAN, Status.DRIFT}
        return (Exit.FAILED if Status.DRIFT in seen else 0) | (Exit.UNREACHABLE if unread else 0)
    failed = bool(seen & FAILING) or Status.DRIFT in seen
    unreachable = Status.UNREACHABLE in seen
    return Exit.FAILED if failed else Exit.UNREACHABLE if unreachable else Exit.OK


def parse_verdict(stdout: str) -> dict | None:
    """The JSON verdict a remote script (validate.py, smoke.py) prints as its last stdout line,
    or None where it printed none."""
    lines = stdout.strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return verdict if isinstance(verdict, dict) else None
