"""A host's driver move inside a rollout wave: drain, install the branch, reboot, come back, verify, serve.

A rollout to a CUDA the host's driver cannot run moves the driver first (the packages and commands are
:mod:`fleetctl.decide.driver`'s decision, kept in the journal). The move runs in phases, each recorded in the
journal before it starts, so a controller that dies mid-reboot resumes where it stopped:

    drain    run the inventory's fleet_drain_command (on the controller: a load balancer's or
             scheduler's cordon); stop the vLLM service
    install  the branch's packages, pinned (the host's package manager)
    reboot   the host reboots; the controller waits for its session to end
    back     the controller waits for the host to answer again, within fleet_reboot_timeout
    verify   facts again: the new branch runs, and every GPU the host had before is still there; on an
             NVSwitch host the fabric manager (installed with the driver, at its version) is started and
             every GPU's fabric must complete before the host serves
    serve    provision the new stack, gated on its proofs (validate + smoke)
    undrain  fleet_undrain_command; the host is done

Each phase's changes (drain, packages, reboot, fabric manager, undrain) are planned actions run by the
one executor (:func:`fleetctl.apply.execute.execute`), their steps kept in the journal's ``driver_steps``;
``rollout --check`` lists them (:func:`move_plans`) and ``--rollback --check`` the way back
(:func:`back_plans`). Waiting for a host to go down, come back and train its fabric only reads.

A failure anywhere stops the host where it is: drained, counted against the failure budget, the
journal naming the phase. ``rollback`` puts the previous branch's packages back, reboots, and serves
the environment the host had.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from fleetctl.apply.execute import SYSTEM, Action, Planned, Step, execute
from fleetctl.apply.steps import on_controller, stop_serving, undrain
from fleetctl.decide.driver import DriverMove, branch_of
from fleetctl.decide.health import judge
from fleetctl.errors import FleetError, HostError
from fleetctl.facts.probe import DEFAULT_ROOT, Facts, gather
from fleetctl.hosts.inventory import Host
from fleetctl.reach.connection import Connection, connect
from fleetctl.reach.fanout import Deadline, fan_out
from fleetctl.status import Status

REBOOT = "nohup sh -c 'sleep 1; reboot' >/dev/null 2>&1 &"  # returns at once; the session ends a second later
REBOOT_TIMEOUT = 900.0  # seconds for a host to answer again after its reboot (fleet_reboot_timeout)
DOWN_TIMEOUT = 180.0  # seconds for a rebooting host to end the session that asked it to
FABRIC_START = "systemctl start nvidia-fabricmanager"


# ---------------------------------------------------------------- the phases' changes, as planned actions

def drain(host: Host, before: Facts) -> Planned:
    """fleet_drain_command on the controller (the host leaves its pool), then the serving stack stops; the
    step's data says whether anything was serving, which a rollback serves again."""
    port = int(host.vars.get("fleet_service_port", 8000))
    python = before.python.path if before.python else "python3"
    stop = stop_serving(before.fleet_root or DEFAULT_ROOT, port, python)
    actions = [Action("the driver changes under the serving stack", stop,
                      change="stop the serving stack", fails="the service did not stop", reads=True,
                      privilege=SYSTEM)]
    if command := host.vars.get("fleet_drain_command"):
        actions.insert(0, on_controller(host.name, "fleet_drain_command", str(command),
                                        "the host leaves its pool before its service stops"))
    return Planned("drain", tuple(actions), lambda r: Step(
        "drain", Status.CHANGED, "drained", data={"stopped": "stopped" in r.stdout.split()}),
        would="would stop the serving stack" + (" after fleet_drain_command" if len(actions) > 1 else ""))


def packages(name: str, commands: list[str], why: str) -> Planned:
    """The driver branch's packages (a move's install, or a rollback's previous branch), pinned and held, each
    command as root in order."""
    return Planned(name, tuple(Action(why, command, change="driver packages", fails=f"`{command}` failed",
                                      privilege=SYSTEM) for command in commands),
                   lambda _: Step(name, Status.CHANGED, f"{len(commands)} package command(s) ran"),
                   would=f"would run {len(commands)} package command(s)")


def restart() -> Planned:
    """The new driver loads at the next boot."""
    return Planned("reboot", (Action("the driver branch loads at boot", REBOOT, change="reboot the host",
                                     fails="reboot refused", privilege=SYSTEM),),
                   lambda _: Step("reboot", Status.CHANGED, "reboot asked"), would="would reboot the host")


def start_fabric() -> Planned:
    """On an NVSwitch host CUDA initialises only once nvidia-fabricmanager runs at the driver's version."""
    return Planned("fabric manager", (Action("CUDA needs the NVSwitch fabric trained", FABRIC_START,
                                             change="start nvidia-fabricmanager",
                                             fails="nvidia-fabricmanager did not start", privilege=SYSTEM),),
                   lambda _: Step("fabric manager", Status.CHANGED, "started"),
                   would="would start nvidia-fabricmanager")


def move_plans(host: Host, entry: dict) -> list[Planned]:
    """A driver move's changes in the order the phases make them (what ``rollout --check`` lists)."""
    move = move_of(entry)
    plans = [drain(host, Facts.from_dict(entry["facts_before"])),
             packages_forth(move), restart()]
    plans += [start_fabric()] if move.fabric_manager else []
    if command := host.vars.get("fleet_undrain_command"):
        plans.append(undrain(host.name, str(command)))
    return plans


def move_of(entry: dict) -> DriverMove:
    """The driver move a rollout's journal entry keeps."""
    return DriverMove.from_json(entry["driver"])


def packages_forth(move: DriverMove) -> Planned:
    """A driver move's new branch, pinned and held."""
    return packages("driver", move.install, f"branch {move.branch}")


def packages_back(entry: dict) -> Planned:
    """A rollback's previous driver branch, pinned and held again."""
    move = move_of(entry)
    return packages("driver back", move.rollback, f"back to branch {branch_of(move.from_version)}")


def back_plans(entry: dict, rebooted: bool) -> list[Planned]:
    """A rollback's driver changes: the previous branch's packages and, where the new driver may be loaded,
    a reboot (and the fabric manager started after it) — what ``rollout --rollback --check`` lists."""
    if not rebooted:
        return [packages_back(entry)]
    return [packages_back(entry), restart()] + ([start_fabric()] if move_of(entry).fabric_manager else [])


def why_failed(step: Step) -> str:
    """A failed phase's step as the journal's one line: what failed, and the end of what it said."""
    tail = (step.tail or "").strip().splitlines()[-3:]
    return step.detail + (f": {' '.join(tail)[-400:]}" if tail else "")


def gpus_lost(before: Facts, after: Facts) -> str | None:
    """Every GPU the host had (by UUID where the driver reports one, else by name) must still be there."""
    def ids(facts: Facts) -> list[str]:
        return sorted(g.uuid or g.name or "" for g in facts.gpus)
    if ids(after) == ids(before):
        return None
    gone = sorted(set(ids(before)) - set(ids(after)))
    return (f"the new driver runs {len(after.gpus)} of the {len(before.gpus)} GPUs the host had"
            + (f" (gone: {', '.join(gone)})" if gone else ""))


class Mover:
    """The driver moves of one wave, against one journal (rollout.Journal: mark, driver_step, recorder, data)."""

    def __init__(self, journal, *, forks: int, timeout: float, provision_task):
        self.journal, self.forks, self.timeout, self.provision_task = journal, forks, timeout, provision_task

    def entry(self, name: str) -> dict:
        return self.journal.data["hosts"][name]

    def moving(self, name: str) -> bool:
        """Still this run's to move: not already stopped (by the fan-out's watchdog, say)."""
        return self.entry(name)["state"] in ("pending", "running")

    def phase(self, name: str, phase: str, **extra) -> None:
        if self.moving(name):
            self.journal.mark(name, "running", phase=phase, drained=True, **extra)

    def stop(self, name: str, phase: str, why: str, state: str = Status.FAILED) -> None:
        self.journal.mark(name, state, stopped_at=phase, error=why, drained=True)

    def at(self, hosts: list[Host], *phases) -> list[Host]:
        """The hosts still moving whose next phase is one of *phases*."""
        return [h for h in hosts if self.entry(h.name)["state"] in ("pending", "running")
                and self.entry(h.name).get("phase") in phases]

    def run(self, hosts: list[Host], on_done=None) -> None:
        """Every host of the wave through every phase it has not passed yet."""
        early = self.at(hosts, None, "drain", "install", "reboot")
        for outcome in fan_out(early, self.until_reboot, forks=self.forks, timeout=self.timeout).values():
            if not outcome.ok:
                self.stop(outcome.host.name, self.entry(outcome.host.name).get("phase") or "drain",
                          outcome.error, state=outcome.status)
        rebooting = self.at(hosts, "back")
        threads = [threading.Thread(target=self.wait_back, args=(h,), daemon=True) for h in rebooting]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        back = self.at(hosts, "verify", "serve", "undrain")
        for outcome in fan_out(back, self.after_reboot, forks=self.forks, timeout=self.timeout,
                               on_done=on_done).values():
            if not outcome.ok and self.moving(outcome.host.name):  # unreachable, timed out, or a bug: stopped here
                self.stop(outcome.host.name, self.entry(outcome.host.name).get("phase"), outcome.error,
                          state=outcome.status)

    # ------------------------------------------------------------ phases over the wave's connection

    def until_reboot(self, host: Host, conn: Connection, deadline: Deadline) -> None:
        name, entry = host.name, self.entry(host.name)
        if entry.get("phase") in (None, "drain"):
            self.phase(name, "drain")
            before = Facts.from_dict(entry["facts_before"])
            if (done := self.change(name, drain(host, before), conn, deadline)) is None:
                return None
            self.journal.mark(name, "running", drain_stopped=done.data["stopped"])
            self.phase(name, "install")
        move = move_of(entry)
        if self.entry(name).get("phase") == "install":
            if self.change(name, packages_forth(move), conn, deadline) is None:
                return None
            self.phase(name, "reboot")
        # Recorded before the reboot is asked for: a controller that dies from here on waits for the host.
        self.phase(name, "back")
        if why := reboot(conn, name, deadline, self.journal.recorder(name)):
            return self.stop(name, "reboot", why)

    def change(self, name: str, plan: Planned, conn: Connection, deadline: Deadline) -> Step | None:
        """Run one phase's planned actions through the executor, keeping the step in the journal; None (the
        host stopped at this phase) where it failed."""
        done = execute(plan, conn, deadline)
        self.journal.driver_step(name, done)
        if done.status == Status.FAILED:
            self.stop(name, self.entry(name).get("phase") or plan.name, why_failed(done))
            return None
        return done

    def wait_back(self, host: Host) -> None:
        limit = float(host.vars.get("fleet_reboot_timeout", REBOOT_TIMEOUT))
        if conn := back_on(host, limit):
            conn.close()
            return self.phase(host.name, "verify")
        self.stop(host.name, "back", f"did not answer within {limit:.0f} s of its reboot (fleet_reboot_timeout)",
                  state=Status.UNREACHABLE)

    # ------------------------------------------------------------ phases over a new connection

    def after_reboot(self, host: Host, conn: Connection, deadline: Deadline):
        name, entry = host.name, self.entry(host.name)
        move = move_of(entry)
        if entry.get("phase") == "verify":
            facts = gather(host, conn, deadline)
            if branch_of(facts.driver_version) != move.branch:
                return self.stop(name, "verify", f"the driver is {facts.driver_version or 'not running'}, not "
                                                 f"branch {move.branch}: the new driver did not load")
            if lost := gpus_lost(Facts.from_dict(entry["facts_before"]), facts):
                return self.stop(name, "verify", lost)
            if move.fabric_manager:
                if why := fabric_up(host, conn, deadline, self.journal.recorder(name)):
                    return self.stop(name, "verify", why)
            self.journal.mark(name, "running", phase="serve", driver_after=facts.driver_version)
        if self.entry(name).get("phase") == "serve":
            run = self.provision_task(host, conn, deadline)
            if run.status == Status.FAILED:
                failed = next(s for s in run.steps if s.status == Status.FAILED)
                self.journal.mark(name, Status.FAILED, stopped_at="serve", step=failed.name, error=failed.detail,
                                  run=run.to_dict(), drained=True)
                return run
            self.journal.mark(name, "running", phase="undrain", run=run.to_dict())
        if command := host.vars.get("fleet_undrain_command"):
            if self.change(name, undrain(name, str(command)), conn, deadline) is None:
                return None
        self.journal.mark(name, "done", phase="done", drained=False)
        return None


def reboot(conn: Connection, name: str, deadline: Deadline, record: Callable[[Step], None]) -> str | None:
    """Ask the host to reboot and wait until it ends this session (its sshd goes down with it); None where
    it did, else why not."""
    asked = execute(restart(), conn, deadline)
    record(asked)
    if asked.status == Status.FAILED:
        return why_failed(asked)
    end = time.monotonic() + DOWN_TIMEOUT
    while time.monotonic() < end:
        try:
            if not conn.run("sleep 5", timeout=30).ok:
                return None
        except (HostError, FleetError, OSError, EOFError):
            return None
    return None


def old_driver_back(host: Host, conn: Connection, deadline: Deadline, entry: dict) -> str | None:
    """After the rollback's reboot the host must run the branch it ran before the move."""
    was, now = move_of(entry).from_version, gather(host, conn, deadline).driver_version
    if branch_of(was) != branch_of(now):
        return f"the driver is {now or 'not running'} after the rollback's reboot, not branch {branch_of(was)}"
    return None


FABRIC_CHECKS = ("fabric_manager_missing", "fabric_manager_version", "fabric_manager_stopped", "fabric_incomplete")
FABRIC_TIMEOUT = 300.0  # seconds for the NVSwitch fabric to complete once the fabric manager runs (fleet_fabric_timeout)


def fabric_problem(facts: Facts) -> str | None:
    """Why an NVSwitch host cannot serve yet: its fabric manager not at the driver's version or not running,
    or a GPU whose fabric is not completed (CUDA does not initialise until it is); None where it can."""
    wrong = [f.reason for f in judge(facts).findings if f.check in FABRIC_CHECKS]
    return "; ".join(wrong) or None


def fabric_up(host: Host, conn: Connection, deadline: Deadline, record: Callable[[Step], None]) -> str | None:
    """After a driver move's reboot on an NVSwitch host: start the fabric manager and wait, within
    fleet_fabric_timeout, until every GPU's fabric completed; None then, else why not."""
    started = execute(start_fabric(), conn, deadline)
    record(started)
    if started.status == Status.FAILED:
        return why_failed(started)
    end = time.monotonic() + float(host.vars.get("fleet_fabric_timeout", FABRIC_TIMEOUT))
    while (why := fabric_problem(gather(host, conn, deadline))) and time.monotonic() < end:
        time.sleep(2)  # the fabric manager trains the NVLinks: seconds to minutes
    return why and f"{why} (after {float(host.vars.get('fleet_fabric_timeout', FABRIC_TIMEOUT)):.0f} s)"


def back_on(host: Host, timeout: float) -> Connection | None:
    """A connection to *host* once it answers again, or None after *timeout* seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            return connect(host, timeout=min(10.0, max(1.0, end - time.monotonic())))
        except (HostError, FleetError, OSError):
            time.sleep(1)
    return None
