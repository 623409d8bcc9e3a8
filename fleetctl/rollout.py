"""Rolling a new stack (a CUDA or vLLM move) across the fleet in waves.

First a plan: which hosts can move and to which stack, which cannot and why.
Then waves: a canary, then batches (a count or a percentage, like Ansible's
``serial``), each provisioned with the new stack and gated on its validation
kernel and serving smoke test. A gate that fails leaves the host on its previous
environment (``current`` only moves after the gate passes) and the previous
environment is proven serving again. A failure budget counts failed, timed-out
*and unreachable* hosts; past it no further wave starts.

The rollout's state is a journal, written (atomically) after every host finishes,
so a controller killed mid-wave resumes without redoing finished hosts; a rollback
returns every host the rollout moved to the environment it had before. The
decisions — the waves, the budget, whether a wave may start — are pure functions
of the journal's data; hosts are reached only through fan_out's connections (in
unit tests, fleetctl's RecordedConnection).
"""

from __future__ import annotations

import json
import math
import shlex
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import records
from .connection import Connection
from .errors import FleetError
from .facts import Facts
from .fanout import Deadline, Outcome, fan_out
from .inventory import Host
from .matrix import Matrix, load_matrix
from .plan import HostPlan, Lock, plan_host
from .playbook import Play
from .execute import Step
from .provision import lock_host, provision_host
from .resolve import Stack
from .serving import PYCACHE, backend_option, plan_serving, smoke_argv
from .status import Status, parse_verdict
from .container import NAME, NAME_RE
from .steps import ACTIVATE, CONTAINER_CHECK, Options, compose_up_command, stop_service
from .target import MARKER, engine_commands
from .upgrade import REBOOT_TIMEOUT, Mover, back_on, controller_command, old_driver_back, undo

KIND = "rollouts"
# A host in one of these states counts against the failure budget.
SPENT = {Status.FAILED, "rolled_back", Status.UNREACHABLE, Status.TIMEOUT}


def waves(hosts: list[str], canary: int, batch: str) -> list[list[str]]:
    """Split *hosts* into a canary wave and batches of *batch* hosts ("5") or percent ("25%")."""
    if canary < 0:
        raise FleetError(f"--canary {canary}: a canary is 0 or more hosts")
    first, rest = hosts[:canary], hosts[canary:]
    size = _size(batch, len(rest) or 1, "--batch")
    out = [first] if first else []
    return out + [rest[i:i + size] for i in range(0, len(rest), size)]


def budget(max_fail: str, total: int) -> int:
    """How many hosts may fail (failed, timed out or unreachable) before the rollout stops."""
    return _size(max_fail, total, "--max-fail", minimum=0)


def _size(spec: str, total: int, option: str, minimum: int = 1) -> int:
    text = str(spec).strip()
    try:
        value = math.floor(total * float(text[:-1]) / 100) if text.endswith("%") else int(text)
    except ValueError:
        raise FleetError(f"{option} {spec!r} is neither a count nor a percentage (e.g. 5 or 25%)") from None
    if value < 0 or (text.endswith("%") and not 0 <= float(text[:-1]) <= 100):
        raise FleetError(f"{option} {spec!r} is out of range")
    return max(value, minimum)


@dataclass
class Journal:
    """The rollout's state on disk; every change is saved before the next host step."""

    data: dict = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def start(cls, inventory: str, playbook: str | None, overrides: dict, plans: dict[str, HostPlan],
              canary: int, batch: str, max_fail: str, fleet_lock: Lock) -> Journal:
        """A plan with a driver move (rollout --driver) moves the host's driver first (fleetctl.upgrade)."""
        moves = {n: p.driver for n, p in plans.items() if p.driver and p.driver.ok}
        cuda_move = bool(overrides.get("cuda"))
        no_gpu = {n for n, p in plans.items() if cuda_move and not p.facts.gpus}
        movable = [n for n, p in plans.items() if p.resolution.ok and (p.changes or n in moves) and n not in no_gpu]
        data = {
            "run_id": records.new_run_id("rollout"), "inventory": inventory, "playbook": playbook,
            "overrides": overrides, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "waves": waves(movable, canary, batch), "max_fail": max_fail,
            "budget": budget(max_fail, len(movable)),
            "left_alone": {n: {"reason": "refused", "why": p.resolution.fix}
                           for n, p in plans.items() if not p.resolution.ok}
            | {n: {"reason": "already on the target stack"} for n, p in plans.items()
               if p.resolution.ok and not p.changes}
            | {n: {"reason": "no GPU: a CUDA move does not apply"} for n in no_gpu},
            "hosts": {n: {"state": "pending", "to": plans[n].resolution.stack.id,
                          "from": (plans[n].facts.fleet.current if plans[n].facts.fleet else None),
                          "lock_before": fleet_lock.entry(n), "lock_after": _entry(plans[n])} for n in movable},
            "lock": str(fleet_lock.path),
        }
        for number, wave in enumerate(data["waves"], 1):
            for name in wave:
                data["hosts"][name]["wave"] = number
        for name, move in moves.items():
            if name in data["hosts"]:  # the facts as they were: the GPUs the new driver must still run
                data["hosts"][name].update(driver=move.to_json(), facts_before=plans[name].facts.to_dict())
        for name, plan in plans.items():
            if plan.driver and not plan.driver.ok:
                data["left_alone"][name] = {"reason": "refused", "why": f"{plan.driver.refusal} ({plan.driver.fix})"}
        journal = cls(data)
        journal.save()
        return journal

    @classmethod
    def load(cls, run_id: str) -> Journal:
        return cls(records.load(run_id, KIND))  # missing, truncated or the wrong shape: a StateError naming the file

    @property
    def id(self) -> str:
        return self.data["run_id"]

    def save(self) -> None:
        with self.lock:  # hosts of a wave finish on several threads
            records.save(self.data, KIND)

    def failures(self) -> int:
        return sum(h["state"] in SPENT for h in self.data["hosts"].values())

    def over_budget(self) -> bool:
        """Past the failure budget no further wave starts."""
        return self.failures() > self.data["budget"]

    def todo(self, wave: list[str]) -> list[str]:
        """Hosts of *wave* not finished yet: pending, or started when the controller died."""
        return [n for n in wave if self.data["hosts"][n]["state"] in ("pending", "running")]

    def mark(self, name: str, state: str, **extra) -> None:
        with self.lock:
            self.data["hosts"][name].update(state=state, **extra)
            self.save()

    def record(self, outcome: Outcome) -> None:
        """A host's wave result: done, or why not (a failed gate means it kept its previous env)."""
        name = outcome.host.name
        if not outcome.ok:
            self.mark(name, outcome.status, error=outcome.error)
            return
        run = outcome.value
        if run.status == Status.FAILED:
            failed = next(s for s in run.steps if s.status == Status.FAILED)
            self.mark(name, Status.FAILED, step=failed.name, error=failed.detail, run=run.to_dict())
        else:
            self.mark(name, "done", run=run.to_dict())


def summary(journal: Journal) -> dict[str, list[str]]:
    by_state: dict[str, list[str]] = {}
    for name, h in journal.data["hosts"].items():
        by_state.setdefault(h["state"], []).append(name)
    return by_state


def to_json(journal: Journal) -> str:
    return json.dumps(journal.data, indent=2, default=str)


def _entry(plan: HostPlan) -> dict:
    lock = Lock(path=None)
    lock.record(plan.host.name, plan.facts, plan.request, plan.resolution, "")
    return lock.entry(plan.host.name)


def execute(journal: Journal, hosts: dict[str, Host], play: Play, matrix: Matrix, options: Options, *,
            forks: int, timeout: float, on_done=None) -> Journal:
    """Run (or resume) the journal's waves; stop once the failure budget is spent."""
    for wave in journal.data["waves"]:
        todo = journal.todo(wave)
        if journal.over_budget():  # no new host starts; a driver move a dead controller left half done finishes
            todo = [n for n in todo if journal.data["hosts"][n].get("phase") not in (None, "drain")]
        if not todo:
            continue
        for name in todo:
            journal.mark(name, "running")

        def done(outcome: Outcome) -> None:
            journal.record(outcome)
            if on_done:
                on_done(outcome)

        # The gate is the proofs: they run even where this stack passed on the host before.
        gate = replace(options, revalidate=True, run_id=journal.id)
        moving = [n for n in todo if journal.data["hosts"][n].get("driver")]
        fan_out([hosts[n] for n in todo if n not in moving], provision_host(play, matrix, gate), forks=forks,
                timeout=timeout, on_done=done)
        if moving:  # the driver first: drain, install, reboot, verify, then the same gate (fleetctl.upgrade)
            Mover(journal, forks=forks, timeout=timeout,
                  provision_task=provision_host(play, matrix, gate)).run([hosts[n] for n in moving], on_done)
            for name in moving:  # fleet.lock gets the facts as the host now is: on its new driver
                entry = journal.data["hosts"][name]
                if entry["state"] == "done" and (entry.get("run") or {}).get("facts"):
                    overrides = {k: v for k, v in journal.data["overrides"].items() if v}
                    journal.mark(name, "done", lock_after=_entry(plan_host(
                        hosts[name], Facts.from_dict(entry["run"]["facts"]), matrix, **overrides)))
        failed = [n for n in todo if journal.data["hosts"][n]["state"] == Status.FAILED
                  and not journal.data["hosts"][n].get("drained")]  # a drained host stays as it stopped
        if failed:  # a failed gate: prove the host still serves what it had
            fan_out([hosts[n] for n in failed], prove_previous(journal, play, matrix), forks=forks, timeout=timeout)
        if journal.over_budget():
            break
    stopped = journal.over_budget() or any(
        h["state"] in ("pending", "running") for h in journal.data["hosts"].values())
    journal.data["status"] = "stopped" if stopped else "done"
    journal.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    moved = {n: h["lock_after"] for n, h in journal.data["hosts"].items() if h["state"] == "done"}
    _update_lock(journal, moved)
    journal.save()
    return journal


def previous_server(conn: Connection, host: Host, facts: dict, env_rel: str, hostvars: dict, matrix: Matrix,
                    deadline: Deadline, model: str | None = None, **where) -> list[str] | str:
    """smoke.py's arguments for serving the environment *env_rel* the way provision serves it
    (its stack's attention backend and CUDA-graph mode, the host's serving vars), or why not."""
    root = facts["fleet_root"]
    marker = conn.run(f"cat {shlex.quote(root)}/{shlex.quote(env_rel)}/{MARKER}", timeout=deadline.left(host.name))
    try:
        stack = Stack.from_dict(json.loads(marker.stdout)["stack"])
    except (ValueError, KeyError, TypeError):
        return f"{env_rel} has no readable {MARKER}"
    serve = plan_serving(Facts.from_dict(facts), stack, hostvars, model=model)
    if not serve.ok:
        return f"cannot serve as asked: {serve.reason} ({serve.fix})"
    return smoke_argv(stack, serve.config, backend_option(matrix, stack.vllm),
                      pycache=f"{root}/{env_rel}/{PYCACHE}", **where)


def prove_previous(journal: Journal, play: Play, matrix: Matrix):
    """After a failed gate: the host's current environment (untouched) must still generate tokens."""
    def task(host: Host, conn: Connection, deadline: Deadline) -> None:
        entry = journal.data["hosts"][host.name]
        facts = entry["run"]["facts"] if entry.get("run") else None
        if not entry.get("from") or not facts:
            journal.mark(host.name, Status.FAILED, serving_again=None, rollback="no previous environment to return to")
            return
        root = shlex.quote(facts["fleet_root"])
        # The journal says what the host runs: current as read now, not as the gate meant to leave it.
        now = conn.run(f"readlink {root}/current", timeout=deadline.left(host.name)).stdout.strip() or None
        if now != entry["from"]:
            journal.mark(host.name, Status.FAILED, serving_again=None, current=now,
                         rollback=f"current is {now or 'nothing'}, not {entry['from']}: the host was not put back")
            return
        # The host's serving vars, not the play's smoke model: that model may be what failed the gate.
        argv = previous_server(conn, host, facts, entry["from"], play.hostvars(host.vars), matrix, deadline,
                               port=0, work=f"{facts['fleet_root']}/smoke", max_tokens=8)
        if isinstance(argv, str):
            verdict = {"verdict": "fail", "error": argv}
        else:
            result = conn.run(f"{root}/current/bin/python {root}/lib/smoke.py {' '.join(map(shlex.quote, argv))}",
                              timeout=deadline.left(host.name))
            verdict = parse_verdict(result.stdout) or {"verdict": "fail", "error": f"no verdict (exit {result.exited})"}
        journal.mark(host.name, "rolled_back", serving_again=verdict.get("verdict") == "pass", current=now,
                     rollback=f"kept {entry['from']}; smoke test there: {verdict.get('verdict')}"
                     + (f" ({verdict['error']})" if verdict.get("error") else ""))
    return task


def rollback(journal: Journal, hosts: dict[str, Host], *, forks: int, timeout: float,
             matrix: Matrix | None = None) -> Journal:
    """Return every host the rollout moved to the environment it had before."""
    # Hosts the rollout moved, and hosts it left drained mid driver move (their driver may have changed).
    moved = [n for n, h in journal.data["hosts"].items()
             if (h["state"] == "done" and (h.get("from") or h.get("driver"))) or (h.get("driver") and h.get("drained"))]
    matrix = matrix or load_matrix()

    def task(host: Host, conn: Connection, deadline: Deadline) -> None:
        entry = journal.data["hosts"][host.name]
        # A host stopped mid driver move has no run yet: its facts are those from before the move.
        facts = (entry.get("run") or {}).get("facts") or entry["facts_before"]
        root = shlex.quote(facts["fleet_root"])
        locked = lock_host(conn, Facts.from_dict(facts), f"{journal.id} (rollback)", deadline.left(host.name))
        if isinstance(locked, Step):
            journal.mark(host.name, "revert_failed", error=locked.detail)
            return
        try:
            if entry.get("driver") and entry.get("phase") not in (None, "drain"):
                if not entry["driver"]["rollback"]:
                    journal.mark(host.name, "revert_failed", error="no commands put this host's previous driver "
                                 "branch back (the matrix does not know it): put the driver back by hand")
                    return
                rebooted = entry.get("phase") not in ("install", "reboot")  # the new driver may be loaded
                if why := undo(conn, host, entry, deadline, restart=rebooted):
                    journal.mark(host.name, "revert_failed", error=why)
                    return
                if rebooted:
                    locked()  # the reboot ended the session that held the lock
                    locked = lambda: None  # noqa: E731
                    conn = back_on(host, min(deadline.left(host.name),
                                             float(host.vars.get("fleet_reboot_timeout", REBOOT_TIMEOUT))))
                    if conn is None:
                        journal.mark(host.name, "revert_failed", error="did not answer again after the rollback's reboot")
                        return
                    try:
                        if why := old_driver_back(host, conn, deadline, entry):
                            journal.mark(host.name, "revert_failed", error=why)
                            return
                        relocked = lock_host(conn, Facts.from_dict(facts), f"{journal.id} (rollback)",
                                             deadline.left(host.name))
                        if isinstance(relocked, Step):
                            journal.mark(host.name, "revert_failed", error=relocked.detail)
                            return
                        try:
                            finish(host, conn, deadline, entry, facts, root)
                        finally:
                            relocked()
                    finally:
                        conn.close()
                    return
            finish(host, conn, deadline, entry, facts, root)
        finally:
            locked()

    def finish(host: Host, conn: Connection, deadline: Deadline, entry: dict, facts: dict, root: str) -> None:
        if entry.get("from"):
            revert_host(host, conn, deadline, entry, facts, root)
        else:
            journal.mark(host.name, "reverted", reverted_to=None, service="no environment before the rollout")
        if entry.get("driver"):
            command = host.vars.get("fleet_undrain_command")
            if command and (why := controller_command(str(command), host, "fleet_undrain_command")):
                journal.mark(host.name, "revert_failed", error=why)
                return
            journal.mark(host.name, journal.data["hosts"][host.name]["state"], drained=False)

    def revert_host(host: Host, conn: Connection, deadline: Deadline, entry: dict, facts: dict, root: str) -> None:
        result = conn.run(ACTIVATE.format(root=root, target=shlex.quote(entry["from"])),
                          timeout=deadline.left(host.name))
        if not result.ok:
            journal.mark(host.name, "revert_failed", error=result.stderr[-500:])
            return
        if entry["from"].startswith("containers/"):
            # The previous stack's compose file is where its service left it: up again, on the previous image.
            runtime, compose = engine_commands(Facts.from_dict(facts).container_runtime)
            name = str(host.vars.get("fleet_container_name") or NAME)
            if not NAME_RE.fullmatch(name):
                journal.mark(host.name, "revert_failed", error=f"fleet_container_name {name!r} is not a container name")
                return
            port = int(host.vars.get("fleet_service_port", 8000))
            check = CONTAINER_CHECK.format(python=shlex.quote((facts.get("python") or {}).get("path") or "python3"),
                                           runtime=runtime, name=name, port=port, tries=600)
            restart = conn.run(f"[ -f {root}/service.container ] || exit 0\n"
                               f"{compose_up_command(compose, name, facts['fleet_root'] + '/current')} && "
                               f"readlink {root}/current | sed 's|.*/||' > {root}/service.stack && {check}",
                               timeout=deadline.left(host.name))
            journal.mark(host.name, "reverted", reverted_to=entry["from"],
                         service=f"container {name} recreated on the previous image, generating on port {port}"
                         if restart.ok else f"container {name} does not serve again: "
                         f"{(restart.stderr.strip() or restart.stdout.strip())[-300:]}")
            return
        # A running service still serves the stack rolled back from: restart it on current.
        argv = previous_server(conn, host, facts, entry["from"], dict(host.vars), matrix, deadline,
                               port=host.vars.get("fleet_service_port", 8000), work=f"{facts['fleet_root']}/service",
                               keep_serving=f"{facts['fleet_root']}/service.pid")
        restarted = False
        if not isinstance(argv, str):
            port = host.vars.get("fleet_service_port", 8000)
            python = (facts.get("python") or {}).get("path") or "python3"
            stop = stop_service(facts["fleet_root"], port, python)
            # A driver move's drain stopped the service (and removed its pid file): it serves again all the same.
            guard = "" if entry.get("drain_stopped") else f"[ -f {root}/service.pid ] || exit 0\n"
            restart = conn.run(f"{guard}({stop}) >/dev/null || exit 1\n"
                               f"{root}/current/bin/python {root}/lib/smoke.py {' '.join(map(shlex.quote, argv))} "
                               f">/dev/null && readlink {root}/current | sed 's|.*/||' > {root}/service.stack",
                               timeout=deadline.left(host.name))
            restarted = restart.ok
        journal.mark(host.name, "reverted", reverted_to=entry["from"],
                     service="restarted on the previous stack" if restarted else "could not be restarted"
                     + (f": {argv}" if isinstance(argv, str) else ""))

    def unfinished(outcome: Outcome) -> None:  # a host the rollback could not reach, or a bug: said, not lost
        if not outcome.ok:
            journal.mark(outcome.host.name, "revert_failed", error=outcome.error)

    fan_out([hosts[n] for n in moved if n in hosts], task, forks=forks, timeout=timeout, on_done=unfinished)
    reverted = {n: journal.data["hosts"][n]["lock_before"] for n in moved
                if journal.data["hosts"][n]["state"] == "reverted"}
    _update_lock(journal, reverted)
    journal.data["status"] = "rolled_back"
    journal.save()
    return journal


def _update_lock(journal: Journal, entries: dict[str, dict | None]) -> None:
    """fleet.lock changes only for the hosts that moved (or moved back)."""
    if not entries:
        return
    with Lock.updating(Path(journal.data["lock"])) as lock:
        for name, entry in entries.items():
            lock.put(name, entry)
