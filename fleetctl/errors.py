"""Every error fleetctl raises, one shallow tree.

    FleetError                 one line for the user: what failed, where, what to do
    ├── InventoryError         the inventory file is unusable (file, line or key)
    ├── PlaybookError          the playbook file is unusable (file, key)
    ├── MatrixError            the compatibility matrix is unusable (file, key)
    ├── StateError             a run record, lock or journal is missing or unreadable
    ├── WheelhouseError        a wheelhouse cannot be built or has nothing for a host
    ├── BinaryError            a library's CUDA fatbin cannot be read (not ELF, truncated)
    └── HostError              one host could not do what was asked
        ├── Unreachable        could not connect, authenticate or verify the host key
        ├── TimedOut           the host or its command outlived the deadline
        └── CommandFailed      the command ran and exited non-zero

Third-party exceptions (paramiko, socket, yaml) are translated where they enter,
so nothing above this tree ever reaches the user as a traceback.
"""

from __future__ import annotations

from fleetctl.status import Status


class FleetError(Exception):
    """Base of every fleetctl error; ``str()`` is the one line a user sees."""

    def __init__(self, message: str, *, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message


class InventoryError(FleetError):
    """The inventory cannot be loaded; names the file and where."""


class PlaybookError(FleetError):
    """The playbook cannot be loaded; names the file and key."""


class MatrixError(FleetError):
    """The compatibility matrix cannot be loaded; names the file and key."""


class StateError(FleetError):
    """A run record, lock file or journal is missing or unreadable."""


class WheelhouseError(FleetError):
    """A wheelhouse cannot be built (pip's reason, for which hosts) or has no wheels for a host."""


class BinaryError(FleetError):
    """A shared library's ELF or fatbin sections cannot be read; names the file and byte."""


class HostError(FleetError):
    """Something went wrong on one host; carries the host's name."""

    status = Status.FAILED

    def __init__(self, host: str, message: str, *, fix: str | None = None):
        super().__init__(f"{host}: {message}", fix=fix)
        self.host = host
        self.reason = message


class Unreachable(HostError):
    status = Status.UNREACHABLE


class TimedOut(HostError):
    status = Status.TIMEOUT


class CommandFailed(HostError):
    status = Status.FAILED
