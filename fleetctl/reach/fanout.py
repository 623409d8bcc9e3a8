"""Running one task on many hosts at once: one :class:`Outcome` per host.

Each host gets its own deadline, counted from when its turn starts. A host that
fails, hangs or cannot be reached is reported as such and never delays the
others past its deadline: a watchdog closes a connection that outlives it, and a
replacement worker takes over the queue.
"""

from __future__ import annotations

import collections
import gc
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from fleetctl.errors import FleetError, HostError
from fleetctl.hosts.inventory import Host
from fleetctl.reach.connection import Connection, connect
from fleetctl.reach.deadline import Deadline  # noqa: F401 - re-exported: the tasks' deadline
from fleetctl.status import Status

GRACE = 2.0  # seconds past a host's deadline before the watchdog steps in


@dataclass(frozen=True)
class Outcome:
    """What happened on one host. Where the task did not finish, *status* says why (unreachable,
    timeout, failed) and *error* what happened. Where it finished, *value* is what it returned, and
    *status* is the value's own where it has one (a provision run's ok, changed or failed), else ok:
    the one place a host's status is decided, so no caller works it out again."""

    host: Host
    status: Status
    value: Any = None
    error: str | None = None
    fix: str | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """The task finished and *value* holds what it returned (which may itself report a failure)."""
        return self.error is None


Task = Callable[[Host, Connection, Deadline], Any]


def run_task(host: Host, task: Task, timeout: float, opened: list) -> Outcome:
    """Connect, run *task*, close; every error becomes the host's Outcome."""
    start = time.monotonic()
    deadline = Deadline(timeout)
    try:
        conn = connect(host, timeout=deadline.left(host.name))
        opened.append(conn)
        try:
            value = task(host, conn, deadline)
        finally:
            conn.close()
        # A task's value may say how the host fared (a provision run that failed a step); a
        # status that is not one of fleetctl's words is a bug, reported as one below.
        return Outcome(host, Status(getattr(value, "status", Status.OK)), value, duration=time.monotonic() - start)
    except HostError as exc:
        return Outcome(host, exc.status, error=exc.reason, fix=exc.fix, duration=time.monotonic() - start)
    except FleetError as exc:
        return Outcome(host, Status.FAILED, error=str(exc), duration=time.monotonic() - start)
    except Exception as exc:  # noqa: BLE001 - one host's bug must not hide the others
        return Outcome(host, Status.FAILED, error=f"internal error: {type(exc).__name__}: {exc}",
                       duration=time.monotonic() - start)


def fan_out(hosts: Iterable[Host], task: Task, *, forks: int = 50, timeout: float = 60.0,
            on_done: Callable[[Outcome], None] | None = None) -> dict[str, Outcome]:
    """Run *task* on every host, at most *forks* at a time; {host name: Outcome} in inventory order."""
    return _FanOut(list(hosts), task, forks, timeout, on_done).run()


class _FanOut:
    """The state of one fan-out: a queue of hosts, workers taking from it, and a watchdog."""

    def __init__(self, hosts: list[Host], task: Task, forks: int, timeout: float, on_done):
        self.hosts, self.task, self.forks, self.timeout, self.on_done = hosts, task, forks, timeout, on_done
        self.queue = collections.deque(hosts)
        self.outcomes: dict[str, Outcome] = {}
        self.finishing: set[str] = set()
        self.running: dict[str, tuple[float, list]] = {}  # host → (started, connections it opened)
        self.lock = threading.Lock()
        self.changed = threading.Event()

    def run(self) -> dict[str, Outcome]:
        self.spawn(min(self.forks, len(self.hosts)))
        try:
            self.watch()
        except KeyboardInterrupt:
            with self.lock:
                opened = [c for _, conns in self.running.values() for c in conns]
            for conn in opened:  # stop what runs on the hosts (a smoke test's server, say) before leaving
                _close(conn)
            raise
        return {h.name: self.outcomes[h.name] for h in self.hosts}

    def finish(self, outcome: Outcome) -> None:
        with self.lock:
            if outcome.host.name in self.outcomes or outcome.host.name in self.finishing:
                return  # the watchdog already called it (or the worker, just now)
            self.finishing.add(outcome.host.name)
            self.running.pop(outcome.host.name, None)
        try:
            if self.on_done:  # before the host counts as done: fan_out returns after every callback
                self.on_done(outcome)
        finally:
            with self.lock:
                self.outcomes[outcome.host.name] = outcome
            self.changed.set()

    def worker(self) -> None:
        while True:
            with self.lock:
                if not self.queue:
                    return
                host = self.queue.popleft()
                opened: list = []
                self.running[host.name] = (time.monotonic(), opened)
            self.finish(run_task(host, self.task, self.timeout, opened))

    def spawn(self, n: int) -> None:
        for _ in range(n):
            threading.Thread(target=self.worker, daemon=True).start()

    def watch(self) -> None:
        """Wait for every host, cutting off those past their deadline; collect the garbage of each
        round of *forks* hosts. A closed SSH connection leaves reference cycles (paramiko's transport,
        its thread, its channels) that only a full collection frees, and Python runs those ever more
        rarely as the heap grows: left to it, a run's memory grew with its hosts (README, Speed)."""
        by_name = {h.name: h for h in self.hosts}
        collected = 0
        while len(self.outcomes) < len(self.hosts):
            self.changed.wait(0.25)
            self.changed.clear()
            if len(self.outcomes) >= collected + self.forks:
                collected = len(self.outcomes)
                gc.collect()
            now = time.monotonic()
            with self.lock:
                overdue = [(n, t, o) for n, (t, o) in self.running.items() if now > t + self.timeout + GRACE]
            for name, started, opened in overdue:
                self.finish(Outcome(by_name[name], Status.TIMEOUT, error=f"did not finish within {self.timeout:.0f}s",
                                    fix="raise --timeout if the host is just slow", duration=now - started))
                for conn in opened:
                    _close(conn)
                self.spawn(1)  # the stuck worker's replacement


def _close(conn) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a stuck socket is best effort
        pass

