"""Planned actions and the one executor that runs them.

A step plans (see :mod:`fleetctl.apply.steps`): it either decides at once — a :class:`Step` that is
ok, skipped or failed — or returns a :class:`Planned`: the :class:`Action` list it needs, each a
command (or a file to copy) with its reason and the change it makes, and a pure ``outcome``
that turns the result of its reading action (a proof's verdict, the installed versions) into
the step. :func:`execute` runs them in order over the host's connection and records them in
the step; with ``check`` it runs nothing and reports what it would do, so ``--check --diff``
shows exactly the planned actions. A command that fails where its action says it must not
ends the step as failed, with the tail of its output; so does a copy the host refuses (a full
disk, a read-only root: the connection names the cause). Details, tails and actions as recorded
have every URL credential redacted (:mod:`fleetctl.redact`).

An action declares the privilege it needs (:attr:`Action.privilege`): ``fleet`` (it writes under the
fleet_root: as root only where that root is not the login user's own), ``system`` (a unit, a package, a
driver, the kernel log: always root) or ``user`` (never). The executor tells the connection which commands
need root; the connection's become wraps them (:mod:`fleetctl.hosts.become`), and nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from fleetctl.errors import CommandFailed
from fleetctl.reach.connection import Connection, LocalConnection, Result
from fleetctl.reach.fanout import Deadline
from fleetctl.redact import redact, redact_data
from fleetctl.status import Status

TAIL_LINES = 40  # of a failed command's output, kept in the step and the run record
USER, FLEET, SYSTEM = "user", "fleet", "system"  # the privilege an action needs (see the module's docstring)


@dataclass(frozen=True)
class Step:
    """One step's result on one host: ok, changed, failed or skipped."""

    name: str
    status: Status
    detail: str = ""
    duration: float = 0.0
    data: dict = field(default_factory=dict)
    tail: str | None = None  # the end of stdout/stderr of a failed command
    actions: tuple[dict, ...] = ()  # what was run (or, in check mode, would be): Action.to_dict()


@dataclass(frozen=True)
class Action:
    """One command on the host, or one file copied there, with why and what it changes."""

    why: str
    command: str = ""  # a shell command; for a copy, the remote path
    put: Path | None = None  # copy this local file to `command` instead of running it
    get: Path | None = None  # copy the host's file `command` to this local file instead of running it
    resume: bool = False  # a put that continues the host's shorter copy instead of starting again
    rate: float | None = None  # a put's cap, in bytes a second
    sha256: str | None = None  # of the file put: the host state knows it has it afterwards
    change: str | None = None  # what it changes on the host; None where it only reads or proves
    fails: str | None = None  # a non-zero exit fails the step with this detail; None: the exit is not judged
    reads: bool = False  # its result is the one the step's outcome reads
    timeout: float | None = None  # at most this (never past the host's deadline)
    stdin: str | None = None
    controller: bool = False  # runs on the controller, not the host (fleet_drain_command: a cordon is its call)
    privilege: str = FLEET  # USER, FLEET or SYSTEM: who must run it (on the host)

    def to_dict(self) -> dict:
        what = ({"put": str(self.put), "to": self.command} if self.put else
                {"get": self.command, "to": str(self.get)} if self.get else {"command": self.command})
        extra = {"on": "controller"} if self.controller else {"as": "root"} if self.privilege == SYSTEM else {}
        return redact_data({**what, "why": self.why, "change": self.change, **extra})

    def as_root(self, fleet_as_root: bool) -> bool:
        """Whether this action runs through become, where the fleet_root is root's (*fleet_as_root*) or not."""
        return not self.controller and (self.privilege == SYSTEM or (self.privilege == FLEET and fleet_as_root))


@dataclass(frozen=True)
class Planned:
    """A step's plan: its actions, and how the result of the reading one becomes the step."""

    name: str
    actions: tuple[Action, ...]
    outcome: Callable[[Result | None], Step]  # pure: the reading action's result (None if none reads) → the step
    would: str = ""  # check mode's detail: "would …"
    proof: bool = False  # proves rather than changes: check mode skips it (nothing to prove without running)

    @property
    def puts(self) -> list[tuple[str, str]]:
        return [(a.command, a.sha256) for a in self.actions if a.put and a.sha256]


def failed(name: str, detail: str, result: Result | None = None, **extra) -> Step:
    """A failed step, with the last lines of the command's output where there was one."""
    tail = None
    if result is not None:
        tail = redact("\n".join((result.stdout + "\n" + result.stderr).strip().splitlines()[-TAIL_LINES:]))
    return Step(name, Status.FAILED, redact(detail), tail=tail, **extra)


def listed(plan: Step | Planned) -> Step:
    """Check mode's step: what *plan* would run, listed, nothing run."""
    if isinstance(plan, Step):
        return plan
    done = tuple(a.to_dict() for a in plan.actions)
    if plan.proof:
        return Step(plan.name, Status.SKIPPED, "check mode", actions=done)
    changes = any(a.change for a in plan.actions)
    return Step(plan.name, Status.CHANGED if changes else Status.OK, plan.would or "nothing to do", actions=done)


def execute(plan: Step | Planned, conn: Connection, deadline: Deadline, *, check: bool = False,
            fleet_as_root: bool = False) -> Step:
    """Run *plan*'s actions on *conn* in order (none with *check*) and return its step; an action runs as
    root where its privilege asks (*fleet_as_root*: the fleet_root is root's, not the login user's)."""
    if isinstance(plan, Step) or check:
        return listed(plan)
    done = tuple(a.to_dict() for a in plan.actions)
    read: Result | None = None
    step: Step | None = None
    for number, action in enumerate(plan.actions, 1):
        ran = done[:number]  # a failed step records what ran, up to the action that failed
        left = deadline.left(conn.name)
        if action.put:
            try:
                conn.put(action.put, action.command, root=action.as_root(fleet_as_root), resume=action.resume,
                         rate=action.rate)
            except CommandFailed as exc:  # the host refused the write: this step failed, the host is there
                return replace(failed(plan.name, exc.reason), actions=ran)
            continue
        if action.get:
            try:
                conn.get(action.command, action.get)
            except CommandFailed as exc:
                return replace(failed(plan.name, exc.reason), actions=ran)
            continue
        runner = LocalConnection(conn.name) if action.controller else conn
        result = runner.run(action.command, timeout=min(action.timeout or left, left), stdin=action.stdin,
                            root=action.as_root(fleet_as_root))
        if action.fails and result.failed:
            return replace(failed(plan.name, action.fails, result), actions=ran)
        if action.reads:
            read, step = result, plan.outcome(result)
            if step.status == Status.FAILED:
                return replace(step, actions=ran)
    return replace(step or plan.outcome(read), actions=done)
