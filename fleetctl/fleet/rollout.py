"""Rolling a new stack (a CUDA or vLLM move) across the fleet in waves.

First a plan: which hosts can move and to which stack, which cannot and why, each host resolved as
provision resolves it under the first play whose ``hosts:`` names it (:func:`plan_rollout`). Then waves: a canary, then batches (a count or a percentage, like Ansible's
``serial``), each provisioned with the new stack and gated on its validation
kernel and serving smoke test. A gate that fails leaves the host on its previous
environment (``current`` only moves after the gate passes) and the previous
environment is proven serving again. A failure budget counts failed, timed-out
*and unreachable* hosts; past it no further wave starts.

The rollout's state is a journal, written (atomically) after every host finishes,
so a controller killed mid-wave resumes without redoing finished hosts; a rollback
returns every host the rollout moved to the environment it had before. Every change a rollout or a
rollback makes to a host is a planned action run by the one executor (:mod:`fleetctl.apply.execute`):
the gate is provision itself, the re-proof after a failed gate is the proof builder of the kept
stack's Target, and the rollback's restart is provision's ``service`` step for the previous stack
(:class:`Reverter`), so ``--check`` lists exactly those actions. The
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
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Mapping

from fleetctl import records
from fleetctl.apply.caches import ClassCaches
from fleetctl.apply.models import Sources
from fleetctl.apply.execute import Action, Planned, Step, execute as execute_plan, failed, listed
from fleetctl.apply.provision import context, lock_host, provision_host, stack_at
from fleetctl.apply.steps import ACTIVATE, STEPS, Context, Options, proof, undrain
from fleetctl.apply.target import q
from fleetctl.decide.plan import HostPlan, Lock, plan_host
from fleetctl.decide.serving import backend_option, plan_serving, smoke_argv
from fleetctl.errors import FleetError, StateError
from fleetctl.facts.probe import DEFAULT_ROOT, Facts, gather
from fleetctl.fleet import weights
from fleetctl.fleet.upgrade import (REBOOT_TIMEOUT, Mover, back_on, back_plans, fabric_up, move_of, move_plans,
                                    old_driver_back, packages_back, reboot, why_failed)
from fleetctl.hosts.become import facts_privileges
from fleetctl.hosts.inventory import Host, Inventory
from fleetctl.hosts.playbook import Play, load_playbook
from fleetctl.knowledge.matrix import Matrix, load_matrix
from fleetctl.reach.connection import Connection
from fleetctl.reach.fanout import Deadline, Outcome, fan_out
from fleetctl.status import Status

KIND = "rollouts"
# A host in one of these states counts against the failure budget.
SPENT = {"failed", "rolled_back", "unreachable", "timeout"}


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


class Stage(str, Enum):
    """Where a host of the journal stands (beside :class:`Status`, whose failed/unreachable/timeout it shares)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    ROLLED_BACK = "rolled_back"  # a failed gate: the host kept its previous environment
    REVERTED = "reverted"  # --rollback put it back
    REVERT_FAILED = "revert_failed"  # --rollback could not: the next --rollback tries again

    def __str__(self) -> str:
        return self.value


STAGES = {str(s) for s in Stage}


@dataclass(frozen=True)
class RolloutPlan:
    """Who moves and under which play: each host resolved with the first play whose ``hosts:`` names it."""

    plans: dict[str, HostPlan]
    plays: dict[str, int]  # host → index of its play in the playbook
    unplayed: tuple[str, ...] = ()  # hosts no play names: left alone


def plan_rollout(inventory: Inventory, facts: Mapping[str, Facts], plays: list[Play], matrix: Matrix, *,
                 overrides: Mapping[str, str | None], driver: str | None = None) -> RolloutPlan:
    """Each host with facts resolved as provision would resolve it under its play (:func:`request_for`: the
    play's vars over the host's, then *overrides*); a host named by several plays rolls with the first."""
    index: dict[str, int] = {}
    named: dict[str, Host] = {}
    for number, play in enumerate(plays):
        for host in inventory.selection(play.hosts).hosts:
            index.setdefault(host.name, number)
            named.setdefault(host.name, host)
    plans = {n: plan_host(named[n], f, matrix, driver=driver, play=plays[index[n]], **overrides)
             for n, f in facts.items() if n in index}
    return RolloutPlan(plans, {n: index[n] for n in plans}, tuple(n for n in facts if n not in index))


@dataclass
class Journal:
    """The rollout's state on disk; every change is saved before the next host step."""

    data: dict = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def start(cls, inventory: str, playbook: str | None, overrides: dict, plans: dict[str, HostPlan],
              canary: int, batch: str, max_fail: str, fleet_lock: Lock, *, plays: Mapping[str, int] | None = None,
              unplayed: Iterable[str] = ()) -> Journal:
        """A plan with a driver move (rollout --driver) moves the host's driver first (fleetctl.fleet.upgrade)."""
        moves = {n: p.driver for n, p in plans.items() if p.driver and p.driver.ok}
        cuda_move = bool(overrides.get("cuda"))
        no_gpu = {n for n, p in plans.items() if cuda_move and not p.facts.gpus}
        movable = [n for n, p in plans.items() if p.resolution.ok and (p.changes or n in moves) and n not in no_gpu]
        data = {
            "run_id": records.new_run_id("rollout"), "inventory": inventory, "playbook": playbook,
            "overrides": overrides, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "waves": waves(movable, canary, batch), "max_fail": max_fail,
            "budget": budget(max_fail, len(movable)),
            "left_alone": _left_alone(plans, no_gpu) | {n: {"reason": "no play of the playbook names it"}
                                                        for n in unplayed},
            "hosts": {n: {"state": Stage.PENDING, "to": plans[n].resolution.stack.id, "play": (plays or {}).get(n, 0),
                          "from": (plans[n].facts.fleet.current if plans[n].facts.fleet else None),
                          "proof": plans[n].proof.to_dict() if plans[n].proof else None,
                          "lock_before": fleet_lock.entry(n), "lock_after": _entry(plans[n])} for n in movable},
            "lock": str(fleet_lock.path),
        }
        for number, wave in enumerate(data["waves"], 1):
            for name in wave:
                data["hosts"][name]["wave"] = number
        for name, move in moves.items():
            if name in data["hosts"]:  # the facts as they were: the GPUs the new driver must still run
                data["hosts"][name].update(driver=move.to_json(), facts_before=plans[name].facts.to_dict())
        journal = cls(data)
        journal.save()
        return journal

    @classmethod
    def load(cls, run_id: str) -> Journal:
        """Missing, truncated or the wrong shape (a host entry that is not a mapping with a known state, a
        wave naming a host the journal lacks): one StateError naming the file and the host."""
        data = records.load(run_id, KIND)
        path = records.state_dir() / KIND / f"{run_id}.json"
        for name, entry in data["hosts"].items():
            state = entry.get("state") if isinstance(entry, dict) else None
            if state not in STAGES:
                fault = "is not a mapping" if not isinstance(entry, dict) else (
                    f"has the state {state!r}, none of {', '.join(sorted(STAGES))}" if state else "has no state")
                raise StateError(f"{path}: host {name}'s entry {fault}, not a usable rollout record",
                                 fix="restore the file, or remove it and start a new rollout")
        if lost := [n for w in data["waves"] for n in (w if isinstance(w, list) else [w]) if n not in data["hosts"]]:
            raise StateError(f"{path}: the waves name {', '.join(map(str, lost))}, which the journal has no entry "
                             "for, not a usable rollout record", fix="restore the file, or remove it")
        return cls(data)

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
        return [n for n in wave if self.data["hosts"][n]["state"] in (Stage.PENDING, Stage.RUNNING)]

    def mark(self, name: str, state: str, **extra) -> None:
        with self.lock:
            self.data["hosts"][name].update(state=state, **extra)
            self.save()

    def recorder(self, name: str) -> Callable[[Step], None]:
        """What keeps a host's driver steps (fleet.upgrade's reboot and fabric_up take one)."""
        return lambda step: self.driver_step(name, step)

    def driver_step(self, name: str, step: Step) -> None:
        """A driver move's (or its rollback's) step, with the actions it ran, kept in the host's entry."""
        with self.lock:
            self.data["hosts"][name].setdefault("driver_steps", []).append(asdict(step))
            self.save()

    def record(self, outcome: Outcome) -> None:
        """A host's wave result: done, or why not (a failed gate means it kept its previous env)."""
        name = outcome.host.name
        if not outcome.ok:
            self.mark(name, outcome.status, error=outcome.error)
            return
        run = outcome.value
        # Where the gate's proofs ran, and for exclusive ones how long the host served nothing.
        proof = {"proof_mode": run.proof["mode"]} if run.proof else {}
        if run.downtime_s is not None:
            proof["downtime_s"] = run.downtime_s
        if run.status == Status.FAILED:
            failed = next(s for s in run.steps if s.status == Status.FAILED)
            self.mark(name, Stage.FAILED, step=failed.name, error=failed.detail, run=run.to_dict(), **proof)
        else:
            self.mark(name, Stage.DONE, run=run.to_dict(), **proof)

    def play(self, plays: list[Play], name: str) -> Play:
        """The play *name* rolls with (its index in the journal; journals from before plays were recorded: the
        first)."""
        number = self.data["hosts"][name].get("play") or 0
        if not 0 <= number < len(plays):
            raise FleetError(f"rollout {self.id}: {name} rolled with play {number + 1} of "
                             f"{self.data.get('playbook') or 'the default playbook'}, which now has {len(plays)}",
                             fix="restore the playbook the rollout started with")
        return plays[number]


def _left_alone(plans: dict[str, HostPlan], no_gpu: set[str]) -> dict[str, dict]:
    out = ({n: {"reason": "refused", "why": p.resolution.fix} for n, p in plans.items() if not p.resolution.ok}
           | {n: {"reason": "already on the target stack"} for n, p in plans.items()
              if p.resolution.ok and not p.changes}
           | {n: {"reason": "no GPU: a CUDA move does not apply"} for n in no_gpu})
    for name, plan in plans.items():
        if plan.driver and not plan.driver.ok:
            out[name] = {"reason": "refused", "why": f"{plan.driver.refusal} ({plan.driver.fix})"}
    return out


def summary(journal: Journal) -> dict[str, list[str]]:
    by_state: dict[str, list[str]] = {}
    for name, h in journal.data["hosts"].items():
        by_state.setdefault(h["state"], []).append(name)
    return by_state


def to_json(journal: Journal) -> str:
    return records.dumps(journal.data)


def _entry(plan: HostPlan) -> dict:
    lock = Lock(path=None)
    lock.record(plan.host.name, plan.facts, plan.request, plan.resolution, "")
    return lock.entry(plan.host.name)


def start(inventory: Inventory, inventory_path: str, selected: list[Host], playbook: str | None,
          overrides: dict, *, driver: str | None, canary: int, batch: str, max_fail: str, check: bool,
          forks: int, timeout: float, matrix: Matrix | None = None, on_done=None,
          ignore_health: bool = False) -> Journal:
    """A new rollout's journal: the selected hosts' facts gathered, each planned under its play, the waves
    split; with *check*, each moving host's planned actions (provision --check under its play) kept in its
    entry and the journal "planned"."""
    matrix = matrix or load_matrix()
    _, plays = load_playbook(playbook)
    outcomes = fan_out(selected, gather, forks=forks, timeout=min(timeout, 120), on_done=on_done)
    planned = plan_rollout(inventory, {n: o.value for n, o in outcomes.items() if o.ok}, plays, matrix,
                           overrides=overrides, driver=driver)
    journal = Journal.start(inventory_path, playbook, overrides, planned.plans, canary, batch, max_fail,
                            Lock.read_or_new(Lock.beside(inventory_path)), plays=planned.plays,
                            unplayed=planned.unplayed)
    journal.data["left_alone"].update({n: {"reason": o.status, "why": o.error} for n, o in outcomes.items()
                                       if not o.ok})
    journal.data["ignore_health"] = ignore_health  # --resume keeps it
    if check:
        journal.data["status"] = "planned"
        check_actions(journal, {n: o.host for n, o in outcomes.items()}, plays, matrix, forks=forks, timeout=timeout)
    journal.save()
    return journal


def check_actions(journal: Journal, hosts: dict[str, Host], plays: list[Play], matrix: Matrix, *, forks: int,
                  timeout: float) -> None:
    """Each moving host's provision --check under its play (a driver move's host: as it is now, before the
    move): its planned actions, kept in the journal as ``planned``."""
    options = replace(run_options(journal), check=True, revalidate=True)
    names = [n for w in journal.data["waves"] for n in w]
    for name, outcome in fan_out([hosts[n] for n in names], by_play(journal, plays, matrix, options), forks=forks,
                                 timeout=timeout).items():
        entry = journal.data["hosts"][name]
        entry["planned"] = (outcome.value.to_dict() if outcome.ok
                            else {"status": outcome.status, "error": outcome.error})
        if entry.get("driver"):  # the driver move's changes, before the provision above runs on the new driver
            entry["planned"]["driver"] = [asdict(listed(p)) for p in move_plans(hosts[name], entry)]


def resume(journal: Journal, hosts: dict[str, Host], *, forks: int, timeout: float, on_done=None) -> Journal:
    """Run (or resume) a journal's waves with the playbook it started with."""
    _, plays = load_playbook(journal.data["playbook"])
    return execute(journal, hosts, plays, load_matrix(), run_options(journal), forks=forks, timeout=timeout,
                   on_done=on_done)


def run_options(journal: Journal) -> Options:
    """What every host of the rollout is provisioned with: the journal's overrides and health choice."""
    return Options(overrides={k: v for k, v in journal.data["overrides"].items() if v},
                   ignore_health=bool(journal.data.get("ignore_health")), caches=ClassCaches(),
                   sources=Sources(), pull=weights.Pulls())


def execute(journal: Journal, hosts: dict[str, Host], plays: list[Play], matrix: Matrix, options: Options, *,
            forks: int, timeout: float, on_done=None) -> Journal:
    """Run (or resume) the journal's waves, each host under its play; stop once the failure budget is spent.
    A host still to move that the inventory no longer has stops the run before any host starts."""
    missing = [n for w in journal.data["waves"] for n in journal.todo(w) if n not in hosts]
    if missing:
        raise FleetError(f"rollout {journal.id}: {'hosts' if len(missing) > 1 else 'host'} {', '.join(missing)} "
                         f"{'are' if len(missing) > 1 else 'is'} not in the inventory {journal.data['inventory']} "
                         "any more", fix=f"put {'them' if len(missing) > 1 else 'it'} back and --resume, or "
                                         f"--rollback {journal.id}")
    # The gate is the proofs: they run even where this stack passed on the host before.
    task = by_play(journal, plays, matrix, replace(options, revalidate=True, run_id=journal.id))
    for wave in journal.data["waves"]:
        todo = journal.todo(wave)
        if journal.over_budget():  # no new host starts; a driver move a dead controller left half done finishes
            todo = [n for n in todo if journal.data["hosts"][n].get("phase") not in (None, "drain")]
        if todo:
            run_wave(journal, [hosts[n] for n in todo], task, plays, matrix, forks=forks, timeout=timeout,
                     on_done=on_done)
        if journal.over_budget():
            break
    stopped = journal.over_budget() or any(
        h["state"] in (Stage.PENDING, Stage.RUNNING) for h in journal.data["hosts"].values())
    journal.data["status"] = "stopped" if stopped else "done"
    journal.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    moved = {n: h["lock_after"] for n, h in journal.data["hosts"].items() if h["state"] == Stage.DONE}
    _update_lock(journal, moved)
    journal.save()
    return journal


def by_play(journal: Journal, plays: list[Play], matrix: Matrix, options: Options):
    """A fan-out task provisioning each host under its own play."""
    def task(host: Host, conn: Connection, deadline: Deadline):
        return provision_host(journal.play(plays, host.name), matrix, options)(host, conn, deadline)
    return task


def run_wave(journal: Journal, todo: list[Host], task, plays: list[Play], matrix: Matrix, *, forks: int,
             timeout: float, on_done=None) -> None:
    """One wave: each host provisioned and gated (a driver move first where it has one); a failed gate's
    host proven serving what it kept."""
    for host in todo:
        journal.mark(host.name, Stage.RUNNING)

    def done(outcome: Outcome) -> None:
        journal.record(outcome)
        if on_done:
            on_done(outcome)

    moving = [h for h in todo if journal.data["hosts"][h.name].get("driver")]
    fan_out([h for h in todo if h not in moving], task, forks=forks, timeout=timeout, on_done=done)
    if moving:  # the driver first: drain, install, reboot, verify, then the same gate (fleetctl.fleet.upgrade)
        Mover(journal, forks=forks, timeout=timeout, provision_task=task).run(moving, on_done)
        for host in moving:  # fleet.lock gets the facts as the host now is: on its new driver
            entry = journal.data["hosts"][host.name]
            if entry["state"] == Stage.DONE and (entry.get("run") or {}).get("facts"):
                overrides = {k: v for k, v in journal.data["overrides"].items() if v}
                journal.mark(host.name, Stage.DONE, lock_after=_entry(plan_host(
                    host, Facts.from_dict(entry["run"]["facts"]), matrix, play=journal.play(plays, host.name),
                    **overrides)))
    failed = [h for h in todo if journal.data["hosts"][h.name]["state"] == Stage.FAILED
              and not journal.data["hosts"][h.name].get("drained")]  # a drained host stays as it stopped
    if failed:  # a failed gate: prove the host still serves what it had
        fan_out(failed, prove_previous(journal, plays, matrix), forks=forks, timeout=timeout)


def previous_context(host: Host, conn: Connection, deadline: Deadline, play: Play, matrix: Matrix, facts: Facts,
                     env_rel: str, options: Options | None = None) -> Context | str:
    """What the steps plan from for the environment *env_rel* the host had before (its stack from its marker,
    its Target, the host's state read once), or why there is none."""
    stack = stack_at(conn, facts.fleet_root, env_rel, deadline.left(host.name))
    if isinstance(stack, str):
        return stack
    c = context(host, conn, deadline, play, matrix, options or Options(), facts, stack, [])
    if c.target.env_rel != env_rel:
        return f"{env_rel} holds the marker of {stack.id}, whose place is {c.target.env_rel}"
    return c


def previous_argv(c: Context, hostvars: dict, matrix: Matrix, model: str | None = None, **where) -> list[str] | str:
    """smoke.py's arguments for serving *c*'s stack the way provision serves it (its attention backend and
    CUDA-graph mode, the host's serving vars), or why not (pure)."""
    serve = plan_serving(c.facts, c.stack, hostvars, model=model, model_config=c.state.model_config)
    if not serve.ok:
        return f"cannot serve as asked: {serve.reason} ({serve.fix})"
    return smoke_argv(c.stack, serve.config, backend_option(matrix, c.stack.vllm), pycache=c.target.pycache, **where)


def prove_serving(host: Host, conn: Connection, deadline: Deadline, play: Play, matrix: Matrix, facts: Facts,
                  env_rel: str) -> dict:
    """The smoke test of the environment *env_rel* as its Target runs proofs (its own Python, or its image):
    the verdict. The host's serving vars, not the play's smoke model: that model may be what failed the gate."""
    c = previous_context(host, conn, deadline, play, matrix, facts, env_rel, Options(revalidate=True))
    if isinstance(c, str):
        return {"verdict": "fail", "error": c}
    argv = previous_argv(c, play.hostvars(host.vars), matrix, port=0, work=f"{facts.fleet_root}/smoke", max_tokens=8,
                         proof_memory=bool(facts.gpus))
    if isinstance(argv, str):
        return {"verdict": "fail", "error": argv}
    step = execute_plan(proof(c, "smoke", "smoke.py", argv, float(c.play.smoke.get("timeout") or 600) + 60),
                        conn, deadline, fleet_as_root=c.target.fleet_as_root)
    return dict(step.data) if step.data.get("verdict") else {"verdict": "fail", "error": step.detail}


def prove_previous(journal: Journal, plays: list[Play], matrix: Matrix):
    """After a failed gate: the host's current environment (untouched) must still generate tokens."""
    def task(host: Host, conn: Connection, deadline: Deadline) -> None:
        entry = journal.data["hosts"][host.name]
        facts = Facts.from_dict(entry["run"]["facts"]) if (entry.get("run") or {}).get("facts") else None
        if not entry.get("from") or not facts:
            journal.mark(host.name, Stage.FAILED, serving_again=None, rollback="no previous environment to return to")
            return
        restored = next((s for s in entry["run"].get("steps") or () if s["name"] == "restore"), None)
        if restored:  # exclusive proofs: the gate started the old service again, and it generated then
            journal.mark(host.name, Stage.ROLLED_BACK, serving_again=restored["status"] == Status.CHANGED,
                         rollback=f"kept {entry['from']}; after the exclusive proofs {restored['detail']}")
            return
        root = shlex.quote(facts.fleet_root or DEFAULT_ROOT)
        # The journal says what the host runs: current as read now, not as the gate meant to leave it.
        now = conn.run(f"readlink {root}/current", timeout=deadline.left(host.name)).stdout.strip() or None
        if now != entry["from"]:
            journal.mark(host.name, Stage.FAILED, serving_again=None, current=now,
                         rollback=f"current is {now or 'nothing'}, not {entry['from']}: the host was not put back")
            return
        verdict = prove_serving(host, conn, deadline, journal.play(plays, host.name), matrix, facts, entry["from"])
        serving, words = proof_words(entry["from"], verdict)
        journal.mark(host.name, Stage.ROLLED_BACK, serving_again=serving, current=now, rollback=words)
    return task


def proof_words(kept: str, verdict: dict) -> tuple[bool | None, str]:
    """(serving again: yes, no or unknown; what the journal says) from the smoke test of the kept
    environment. A test that never started a server proves nothing either way."""
    error = f" ({verdict['error']})" if verdict.get("error") else ""
    if verdict.get("verdict") != "pass" and verdict.get("started") is False:
        return None, f"kept {kept}; not proven serving: the smoke test could not start there{error}"
    return verdict.get("verdict") == "pass", f"kept {kept}; smoke test there: {verdict.get('verdict')}{error}"


def to_roll_back(journal: Journal) -> list[str]:
    """Hosts the rollout moved, hosts it left drained mid driver move (their driver may have changed), and
    hosts an earlier --rollback could not put back."""
    return [n for n, h in journal.data["hosts"].items()
            if (h["state"] in (Stage.DONE, Stage.REVERT_FAILED) and (h.get("from") or h.get("driver")))
            or (h.get("driver") and h.get("drained") and h["state"] != Stage.REVERTED)]


def rollback(journal: Journal, hosts: dict[str, Host], *, forks: int, timeout: float,
             matrix: Matrix | None = None, plays: list[Play] | None = None, check: bool = False) -> Journal:
    """Return every host the rollout moved to the environment it had before (with *check*: say how, change
    nothing). The rollout is rolled_back once each of them is; until then rollback_incomplete, and the next
    --rollback tries the rest again."""
    moved = to_roll_back(journal)
    reverter = Reverter(journal, plays or load_playbook(journal.data["playbook"])[1], matrix or load_matrix(), check)
    for name in moved:
        if name not in hosts:
            reverter.fail(name, f"not in the inventory {journal.data['inventory']} any more: put it back and "
                                f"--rollback {journal.id} again")

    def unfinished(outcome: Outcome) -> None:  # a host the rollback could not reach, or a bug: said, not lost
        if not outcome.ok:
            reverter.fail(outcome.host.name, outcome.error)

    fan_out([hosts[n] for n in moved if n in hosts], reverter.task, forks=forks, timeout=timeout,
            on_done=unfinished)
    if check:
        journal.data["status"] = "planned"
        return journal
    reverted = {n: journal.data["hosts"][n]["lock_before"] for n in moved
                if journal.data["hosts"][n]["state"] == Stage.REVERTED}
    _update_lock(journal, reverted)
    journal.data["status"] = "rolled_back" if len(reverted) == len(moved) else "rollback_incomplete"
    journal.save()
    return journal


NO_DRIVER_BACK = ("no commands put this host's previous driver branch back (the matrix does not know it): put the "
                  "driver back by hand")


class Reverter:
    """One rollback's work on each host: its driver back where the rollout moved it, then its previous
    environment current again and its service restarted there by the service step provision runs — every
    change a planned action through the one executor (in check mode, listed and not run)."""

    def __init__(self, journal: Journal, plays: list[Play], matrix: Matrix, check: bool = False):
        self.journal, self.plays, self.matrix, self.check = journal, plays, matrix, check

    def fail(self, name: str, why: str) -> None:
        if self.check:
            self.plan(name, error=why)
        else:
            self.journal.mark(name, Stage.REVERT_FAILED, error=why)

    def plan(self, name: str, **what) -> None:
        """Check mode: what the rollback would do on the host, kept in the (unsaved) journal."""
        with self.journal.lock:
            self.journal.data["hosts"][name].setdefault("rollback_plan", {}).update(what)

    def task(self, host: Host, conn: Connection, deadline: Deadline) -> None:
        entry = self.journal.data["hosts"][host.name]
        # A host stopped mid driver move has no run yet: its facts are those from before the move.
        facts = Facts.from_dict((entry.get("run") or {}).get("facts") or entry["facts_before"])
        if self.check:
            if entry.get("driver") and entry.get("phase") not in (None, "drain"):
                if not move_of(entry).rollback:
                    return self.fail(host.name, NO_DRIVER_BACK)
                self.plan(host.name, driver=[asdict(listed(p)) for p in back_plans(
                    entry, rebooted=entry.get("phase") not in ("install", "reboot"))])
            return self.finish(host, conn, deadline, entry, facts)
        locked = lock_host(conn, facts, f"{self.journal.id} (rollback)", deadline.left(host.name),
                           root=facts_privileges(facts).fleet_as_root)
        if isinstance(locked, Step):
            return self.fail(host.name, locked.detail)
        held = [locked]
        try:
            if entry.get("driver") and entry.get("phase") not in (None, "drain"):
                self.driver_back(host, conn, deadline, entry, facts, held)
            else:
                self.finish(host, conn, deadline, entry, facts)
        finally:
            held[0]()

    def driver_back(self, host: Host, conn: Connection, deadline: Deadline, entry: dict, facts: Facts,
                    held: list) -> None:
        """The previous branch's packages back; where the new driver may be loaded, a reboot, the old branch
        verified, the lock taken again on the new session; then the environment."""
        if not move_of(entry).rollback:
            return self.fail(host.name, NO_DRIVER_BACK)
        rebooted = entry.get("phase") not in ("install", "reboot")  # the new driver may be loaded
        record = self.journal.recorder(host.name)
        back = execute_plan(packages_back(entry), conn, deadline)
        record(back)
        if back.status == Status.FAILED:
            return self.fail(host.name, why_failed(back))
        if rebooted and (why := reboot(conn, host.name, deadline, record)):
            return self.fail(host.name, why)
        if not rebooted:
            return self.finish(host, conn, deadline, entry, facts)
        held[0]()  # the reboot ended the session that held the lock
        held[0] = lambda: None
        conn = back_on(host, min(deadline.left(host.name), float(host.vars.get("fleet_reboot_timeout", REBOOT_TIMEOUT))))
        if conn is None:
            return self.fail(host.name, "did not answer again after the rollback's reboot")
        try:
            if why := old_driver_back(host, conn, deadline, entry) or (
                    move_of(entry).fabric_manager and fabric_up(host, conn, deadline, record)):
                return self.fail(host.name, why)
            relocked = lock_host(conn, facts, f"{self.journal.id} (rollback)", deadline.left(host.name),
                                 root=facts_privileges(facts).fleet_as_root)
            if isinstance(relocked, Step):
                return self.fail(host.name, relocked.detail)
            held[0] = relocked
            self.finish(host, conn, deadline, entry, facts)
        finally:
            conn.close()

    def finish(self, host: Host, conn: Connection, deadline: Deadline, entry: dict, facts: Facts) -> None:
        if entry.get("from"):
            self.revert_env(host, conn, deadline, entry, facts)
        elif not self.check:
            self.journal.mark(host.name, Stage.REVERTED, reverted_to=None,
                              service="no environment before the rollout")
        if entry.get("driver") and not self.check and self.journal.data["hosts"][host.name]["state"] == Stage.REVERTED:
            if command := host.vars.get("fleet_undrain_command"):
                back = execute_plan(undrain(host.name, str(command)), conn, deadline)
                self.journal.driver_step(host.name, back)
                if back.status == Status.FAILED:
                    return self.fail(host.name, why_failed(back))
            self.journal.mark(host.name, Stage.REVERTED, drained=False)

    def revert_env(self, host: Host, conn: Connection, deadline: Deadline, entry: dict, facts: Facts) -> None:
        """The previous environment current again, and where a service ran (or a driver move's drain stopped
        it), the service step of that environment's stack (its marker read): the unit rewritten and
        restarted, the container recreated, or the pid-file server started, as provision does."""
        back = entry["from"]
        switch = execute_plan(Planned("revert", (Action("the rollout is rolled back", ACTIVATE.format(
            root=q(facts.fleet_root), target=q(back)), change=f"current → {back}",
            fails=f"switching current to {back} failed"),), lambda _: Step("revert", Status.CHANGED, f"current → {back}"),
            would=f"would switch current to {back}"), conn, deadline, check=self.check,
            fleet_as_root=facts_privileges(facts).fleet_as_root)
        if switch.status == Status.FAILED:
            return self.fail(host.name, switch.tail or switch.detail)
        c = previous_context(host, conn, deadline, self.journal.play(self.plays, host.name), self.matrix, facts,
                             back, Options(check=self.check))
        again = None
        if isinstance(c, str):
            again = failed("service", c)
        elif c.state.service or c.state.service_alive or c.state.container or entry.get("drain_stopped"):
            again = execute_plan(STEPS["service"](c), conn, deadline, check=self.check,
                                 fleet_as_root=c.target.fleet_as_root)
        if self.check:
            return self.plan(host.name, steps=[asdict(s) for s in (switch, again) if s])
        self.journal.mark(host.name, Stage.REVERTED, reverted_to=back, service=service_text(again))


def service_text(step: Step | None) -> str:
    """What the rollback's service step did, for the journal."""
    if step is None:
        return "no service ran before: none started"
    if step.status == Status.FAILED:
        return f"could not be restarted: {step.detail}"
    how = step.data.get("unit") or (f"container {step.data['container']}" if step.data.get("container") else None)
    if step.status == Status.OK:
        return f"already serving the previous stack: {step.detail}"
    return "restarted on the previous stack" + (f" ({how})" if how else "")


def _update_lock(journal: Journal, entries: dict[str, dict | None]) -> None:
    """fleet.lock changes only for the hosts that moved (or moved back)."""
    if not entries:
        return
    with Lock.updating(Path(journal.data["lock"])) as lock:
        for name, entry in entries.items():
            lock.put(name, entry)
