"""A host's driver move inside a rollout wave: drain, install the branch, reboot, come back, verify, serve.

A rollout to a CUDA the host's driver cannot run moves the driver first (the packages and commands are
:mod:`fleetctl.decide.driver`'s decision, kept in the journal). The move runs in phases, each recorded in the
journal before it starts, so a controller that dies mid-reboot resumes where it stopped:

    drain    stop the vLLM service; run the inventory's fleet_drain_command (on the controller: a
             load balancer's or scheduler's cordon)
    install  the branch's packages, pinned (the host's package manager)
    reboot   the host reboots; the controller waits for its session to end
    back     the controller waits for the host to answer again, within fleet_reboot_timeout
    verify   facts again: the new branch runs, and every GPU the host had before is still there; on an
             NVSwitch host the fabric manager (installed with the driver, at its version) is started and
             every GPU's fabric must complete before the host serves
    serve    provision the new stack, gated on its proofs (validate + smoke)
    undrain  fleet_undrain_command; the host is done

A failure anywhere stops the host where it is: drained, counted against the failure budget, the
journal naming the phase. ``rollback`` puts the previous branch's packages back, reboots, and serves
the environment the host had.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time

from fleetctl.reach.connection import Connection, connect
from fleetctl.decide.driver import branch_of
from fleetctl.errors import FleetError, HostError
from fleetctl.facts.probe import Facts, gather
from fleetctl.reach.fanout import Deadline, fan_out
from fleetctl.decide.health import judge
from fleetctl.hosts.inventory import Host
from fleetctl.status import Status
from fleetctl.apply.steps import stop_service

REBOOT = "nohup sh -c 'sleep 1; reboot' >/dev/null 2>&1 &"  # returns at once; the session ends a second later
REBOOT_TIMEOUT = 900.0  # seconds for a host to answer again after its reboot (fleet_reboot_timeout)
DOWN_TIMEOUT = 180.0  # seconds for a rebooting host to end the session that asked it to


def drain_script(root: str, port: int, python: str) -> str:
    """Stop whatever serves on the host, however it was started (a unit, a container, a pid file), printing
    "stopped" where something was: a rollback serves again what the drain stopped."""
    r = shlex.quote(root)
    return "\n".join([
        "systemctl is-active --quiet fleetctl-vllm.service 2>/dev/null && systemctl stop fleetctl-vllm.service && "
        "echo stopped",
        f"if read -r rt cn < {r}/service.container 2>/dev/null; then \"$rt\" stop \"$cn\" >/dev/null 2>&1 && "
        "echo stopped; fi",
        f"[ -f {r}/service.pid ] || exit 0", "echo stopped", stop_service(root, port, python)])


def controller_command(command: str, host: Host, what: str) -> str | None:
    """Run fleet_drain_command / fleet_undrain_command on the controller (a cordon is a controller's
    call); None where it ran fine, else why not."""
    proc = subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FLEETCTL_HOST": host.name}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its children too, which would hold the pipes open
        proc.communicate()
        return f"{what} did not finish within 300 s"
    if proc.returncode != 0:
        return f"{what} failed (exit {proc.returncode}): {(err.strip() or out.strip())[-300:]}"
    return None


def gpus_lost(before: list[dict], after: Facts) -> str | None:
    """Every GPU the host had (by UUID where the driver reports one, else by name) must still be there."""
    def ids(gpus):
        return sorted(g.get("uuid") or g.get("name") or "" for g in gpus)
    now = [{"uuid": g.uuid, "name": g.name} for g in after.gpus]
    if ids(now) == ids(before):
        return None
    gone = sorted(set(ids(before)) - set(ids(now)))
    return (f"the new driver runs {len(now)} of the {len(before)} GPUs the host had"
            + (f" (gone: {', '.join(gone)})" if gone else ""))


class Mover:
    """The driver moves of one wave, against one journal (rollout.Journal: mark, data)."""

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
        name, move = host.name, self.entry(host.name)["driver"]
        facts = self.entry(name)["facts_before"]
        if self.entry(name).get("phase") in (None, "drain"):
            self.phase(name, "drain")
            port = int(host.vars.get("fleet_service_port", 8000))
            python = (facts.get("python") or {}).get("path") or "python3"
            stopped = conn.run(drain_script(facts["fleet_root"], port, python), timeout=deadline.left(name), root=True)
            if not stopped.ok:
                return self.stop(name, "drain", f"the service did not stop: {stopped.stderr.strip()[-300:]}")
            self.journal.mark(name, "running", drain_stopped="stopped" in stopped.stdout.split())
            if command := host.vars.get("fleet_drain_command"):
                if why := controller_command(str(command), host, "fleet_drain_command"):
                    return self.stop(name, "drain", why)
            self.phase(name, "install")
        if self.entry(name).get("phase") == "install":
            if why := run_all(conn, move["install"], name, deadline):
                return self.stop(name, "install", why)
            self.phase(name, "reboot")
        # Recorded before the reboot is asked for: a controller that dies from here on waits for the host.
        self.phase(name, "back")
        if why := reboot(conn, name, deadline):
            return self.stop(name, "reboot", why)

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
        move = entry["driver"]
        if entry.get("phase") == "verify":
            facts = gather(host, conn, deadline)
            if branch_of(facts.driver_version) != move["branch"]:
                return self.stop(name, "verify", f"the driver is {facts.driver_version or 'not running'}, not "
                                                 f"branch {move['branch']}: the new driver did not load")
            if lost := gpus_lost(entry["facts_before"].get("gpus") or [], facts):
                return self.stop(name, "verify", lost)
            if move.get("fabric_manager"):
                if why := fabric_up(host, conn, deadline):
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
            if why := controller_command(str(command), host, "fleet_undrain_command"):
                return self.stop(name, "undrain", why)
        self.journal.mark(name, "done", phase="done", drained=False)
        return None


def undo(conn: Connection, host: Host, entry: dict, deadline: Deadline, *, restart: bool) -> str | None:
    """Rollback's first half: the previous branch's packages back and pinned, then (where the new driver may
    be loaded) a reboot. None where that went through, else why not."""
    return run_all(conn, entry["driver"]["rollback"], host.name, deadline) or (
        reboot(conn, host.name, deadline) if restart else None)


def run_all(conn: Connection, commands, name: str, deadline: Deadline) -> str | None:
    """Run *commands* in order on the host; None where each exited 0, else which one failed and how."""
    for command in commands:
        done = conn.run(command, timeout=deadline.left(name), root=True)
        if not done.ok:
            return f"`{command}` failed (exit {done.exited}): {(done.stderr.strip() or done.stdout.strip())[-400:]}"
    return None


def reboot(conn: Connection, name: str, deadline: Deadline) -> str | None:
    """Ask the host to reboot and wait until it ends this session (its sshd goes down with it); None where
    it did, else why not."""
    asked = conn.run(REBOOT, timeout=deadline.left(name), root=True)
    if not asked.ok:
        return f"reboot refused (exit {asked.exited}): {asked.stderr.strip()[-300:]}"
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
    was, now = entry["driver"]["from"], gather(host, conn, deadline).driver_version
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


def fabric_up(host: Host, conn: Connection, deadline: Deadline) -> str | None:
    """After a driver move's reboot on an NVSwitch host: start the fabric manager and wait, within
    fleet_fabric_timeout, until every GPU's fabric completed; None then, else why not."""
    started = conn.run("systemctl start nvidia-fabricmanager", timeout=deadline.left(host.name))
    if not started.ok:
        return f"nvidia-fabricmanager did not start: {(started.stderr.strip() or started.stdout.strip())[-300:]}"
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
