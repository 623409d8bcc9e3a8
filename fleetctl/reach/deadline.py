"""A host's deadline: seconds left for its work, counted from when its turn starts (pure: a clock, no I/O).

The fan-out gives each host one; the facts, the steps and the executor ask it how long a command may
still run, and it raises :class:`~fleetctl.errors.TimedOut` once none are left.
"""

from __future__ import annotations

import time

from fleetctl.errors import TimedOut


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self, host: str = "") -> float:
        """Seconds left; raises TimedOut once none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimedOut(host, f"did not finish within {self.seconds:.0f}s",
                           fix="raise --timeout if the host is just slow")
        return left
