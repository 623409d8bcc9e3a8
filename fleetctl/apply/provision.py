"""Provisioning one host: facts → resolve → check → install → verify → model → validate → smoke → activate →
service.

The flow, and nothing else, lives here: gather the facts, resolve the stack, decide the
:class:`~fleetctl.apply.target.Target` and read the :class:`~fleetctl.apply.target.HostState` once, then
for each step of the play plan it (:mod:`fleetctl.apply.steps`, pure) and run the plan
(:func:`fleetctl.apply.execute.execute`, which in ``--check`` runs nothing). What hosts of one run share
is coordinated here too: a stored model's copies (:class:`~fleetctl.apply.models.Sources`: from the
controller once per region, then host to host) and a class's compile caches
(:class:`~fleetctl.apply.caches.ClassCaches`: the canary's, pushed before the others' first proof). Every step's
:class:`Step` (ok, changed, failed or skipped) goes into the host's :class:`HostRun`, a value the
recap and the run record are built from. A host's stacks live side by side under its install root::

    <fleet_root>/envs/<stack id>/     one virtualenv per resolved stack, kept after use
    <fleet_root>/current -> envs/…    switched atomically, only after validate and smoke pass
    <fleet_root>/previous -> envs/…   what current was before, for rollback
    <fleet_root>/lib/                 the validation and smoke scripts fleetctl ships

An environment is complete once its ``fleetctl-stack.json`` exists (written last),
so an install that dies half way is rebuilt on the next run and never made current:
the host keeps serving what it had. A step failing after activate puts ``current`` and
``previous`` back and starts the old stack's service again (a "revert" step says so).

Every run that changes a host holds its lock (``<fleet_root>/.lock``, flock) from after the facts
to its last step, through a command left running on its own SSH session: a second run fails at
once naming the holder (run, controller, user, pid, since), and a controller that dies takes its
lock with it. ``--check`` takes none.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from fleetctl.apply.caches import Stored, capture, clear, push
from fleetctl.apply.execute import Planned, Step, execute, failed
from fleetctl.apply.installer import UvBinary, cache_dir, extract, obtain
from fleetctl.apply.models import (
    SERVE, Manifest, StagedModel, address_of, default_store, fetch, is_hub_id, is_stored, load_manifest, manifest_path,
    stage, store_key,
)
from fleetctl.apply.steps import (  # noqa: F401 - re-exported: rollout, wheelhouse and the tests use them from here
    ACTIVATE, MARK_VALIDATED, STEPS, STOP_SERVICE, Context, Options, install_pins, mismatches, observed_text, revert,
    summary, undrain, vacate, wheels_for,
)
from fleetctl.apply.target import MARKER, q, read_state, target_for  # noqa: F401 - MARKER re-exported for rollout
from fleetctl.apply.wheelhouse import Platform
from fleetctl.decide.classcache import CacheKey, cache_key
from fleetctl.decide.plan import changes, request_for
from fleetctl.decide.proofmode import decide
from fleetctl.decide.resolve import Request, Stack, resolve
from fleetctl.decide.serving import backend_option, plan_serving
from fleetctl.decide.transfer import parse_rate, region_of
from fleetctl.errors import FleetError, HostError, WheelhouseError
from fleetctl.facts.probe import Facts, gather
from fleetctl.hosts.become import facts_privileges
from fleetctl.hosts.inventory import Host
from fleetctl.hosts.playbook import Play
from fleetctl.knowledge.matrix import Matrix
from fleetctl.reach.connection import Connection
from fleetctl.reach import fanout
from fleetctl.reach.fanout import Deadline
from fleetctl.status import Status


@dataclass
class HostRun:
    """What provisioning did on one host; built step by step, returned as a value."""

    host: str
    facts: dict | None = None
    stack: dict | None = None
    request: dict | None = None  # what was asked (fleet_* vars and options): fleet.lock records it beside the stack
    reasons: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    proof: dict | None = None  # where the proofs ran: beside the serving stack, or in its place (proofmode)
    downtime_s: float | None = None  # exclusive proofs: from stopping the service to a service serving again

    @property
    def status(self) -> Status:
        states = {s.status for s in self.steps}
        return Status.FAILED if Status.FAILED in states else Status.CHANGED if Status.CHANGED in states else Status.OK

    def counts(self) -> dict[str, int]:
        return {str(s): sum(step.status == s for step in self.steps)
                for s in (Status.OK, Status.CHANGED, Status.FAILED, Status.SKIPPED)}

    def figure(self, step: str, key: str):
        return next((s.data.get(key) for s in self.steps if s.name == step), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


class Stopped(Exception):
    """A step failed: the host's later steps do not run (the failure is in the HostRun already)."""


def provision(host: Host, conn: Connection, deadline: Deadline, play: Play, matrix: Matrix, options: Options,
              on_step: Callable[[str, str], None] | None = None) -> HostRun:
    """One host's provisioning over one connection, within one deadline."""
    run = HostRun(host.name)
    record = _recorder(run, host.name, on_step or (lambda host, step: None))
    release = canary = None
    try:
        facts = record("facts", lambda: gather(host, conn, deadline))
        run.facts = facts.to_dict()
        may = facts_privileges(facts)
        if may.refusal:  # before anything runs: a fleet_root this login cannot write, and no become
            record("reach", lambda: failed("reach", may.refusal))
        stack = record("resolve", lambda: _resolve(run, facts, request_for(host, play, options.overrides), matrix))
        if not options.check:  # --check changes nothing, so it takes no lock
            release = record("lock", lambda: lock_host(conn, facts, options.run_id, deadline.left(host.name),
                                                       root=may.fleet_as_root))
        c = record("state", lambda: context(host, conn, deadline, play, matrix, options, facts, stack, run.changes))
        run.proof = c.proof.to_dict() if c.proof else None
        was = None  # current and previous before this run's activate switched them
        stopped = None  # when the serving stack stopped for exclusive proofs
        served = c.state.service_alive
        key = class_key(c, play.hostvars(host.vars))
        for name in c.play.steps:
            if c.model and name in MODEL_STEPS:  # once: where the play says, else before the first proof or service
                record("model", lambda: model_step(c, host, conn, deadline, region_of(play.hostvars(host.vars))))
                c = replace(c, model=None)
            if name == "model":
                continue
            plan = STEPS[name](c)
            if key and name in PROOF_STEPS and isinstance(plan, Planned):  # once, before the first proof that runs
                canary, key = receive(c, key, record, conn, deadline), None
            try:
                if stopped is None and name in PROOF_STEPS and isinstance(plan, Planned) and c.proof \
                        and c.proof.exclusive and c.state.service_alive:
                    stopped, c = time.monotonic(), stop_for_proofs(c, record, conn, deadline, play, host)
                step = record(name, lambda: execute(plan, conn, deadline, check=options.check,
                                                    fleet_as_root=c.target.fleet_as_root))
            except Stopped:
                unwind(run, host, conn, deadline, play, matrix, replace(c, state=replace(c.state, service_alive=served)
                                                                        ) if was is not None else c, was, stopped)
                raise
            if name == "activate" and step.status == Status.CHANGED and not options.check:
                was = step.data.get("was")
            if not options.check and not isinstance(plan, Step):
                c = replace(c, state=c.state.after(plan.puts))  # what this step sent, no later step sends again
        if stopped is not None and not options.check:
            serve_again(run, c, conn, deadline, _drain(play, host, "fleet_undrain_command"), stopped)
        if canary:
            record("cache", lambda: keep(canary, c, run, conn, deadline))
    except Stopped:
        pass
    finally:
        if canary:
            options.caches.done(canary, host.name)
        if release:
            release()
    return run


MODEL_STEPS = ("model", "validate", "smoke", "service")


def model_step(c: Context, host: Host, conn: Connection, deadline: Deadline, region: str) -> Step:
    """The stored model staged onto the host, from the controller or from a host of its region that holds a
    verified copy (the run's Sources); or why it cannot be."""
    if isinstance(c.model, (str, Step)):
        return failed("model", c.model) if isinstance(c.model, str) else c.model
    python, sources, key = c.facts.python.path if c.facts.python else "python3", c.options.sources, c.model.manifest.key
    if not sources or not c.model.pending():
        step = execute(stage(c.model, python), conn, deadline, check=c.options.check,
                       fleet_as_root=c.target.fleet_as_root)
        if sources:
            sources.done(key, region, host, holds=c.model.remote if step.status != Status.FAILED else None)
        return step
    source = sources.claim(key, region, host.name, timeout=deadline.left(host.name) / 2)
    if c.options.check:  # who would copy from whom: a host that would hold the model serves its region
        step = execute(fetch(c.model, python, "", source[0].name) if source else stage(c.model, python), conn,
                       deadline, check=True)
        sources.done(key, region, host, source[0] if source else None, holds=c.model.remote)
        return step
    step = copy_from(source, c, conn, deadline, python) if source else None
    if step is None or step.status == Status.FAILED:  # no host of the region holds it, or its copy failed
        said = f"; {step.detail}, so from the controller" if step else ""
        step = execute(stage(c.model, python), conn, deadline, fleet_as_root=c.target.fleet_as_root)
        step = replace(step, detail=step.detail + said)
    sources.done(key, region, host, source[0] if source else None,
                 holds=c.model.remote if step.status != Status.FAILED else None)
    return step


def copy_from(source: tuple[Host, str], c: Context, conn: Connection, deadline: Deadline, python: str) -> Step:
    """Copy the pending files from *source* (a host of the region and the directory of its verified copy): its
    Python serves them over HTTP for as long as this copy lasts, under a token only this run knows."""
    held, directory = source
    try:
        theirs = fanout.connect(held, timeout=min(30.0, deadline.left(c.host)))
    except HostError as exc:
        return failed("model", f"{held.name} could not be reached to copy from ({exc.reason})")
    try:
        answer, release = theirs.hold(f"python3 -c {q(SERVE)} {q(directory)}", timeout=60)
        try:
            words = answer.split()
            if len(words) != 3 or words[0] != "serving":
                return failed("model", f"{held.name} could not serve its copy: {answer[:200] or 'no answer'}")
            url = f"http://{address_of(held)}:{words[1]}/{words[2]}/"
            return execute(fetch(c.model, python, url, held.name), conn, deadline, fleet_as_root=c.target.fleet_as_root)
        finally:
            release()
    except HostError as exc:
        return failed("model", f"copying from {held.name}: {exc.reason}")
    finally:
        theirs.close()


def unwind(run: HostRun, host: Host, conn: Connection, deadline: Deadline, play: Play, matrix: Matrix, c: Context,
           was: dict | None, stopped: float | None) -> None:
    """A step failed: after activate, current and previous go back and the old service starts again where it
    served before this run (*c* says so); before it, exclusive proofs' stopped service serves again."""
    options = c.options
    if was is not None:
        run.steps.extend(put_back(host, conn, deadline, play, matrix, options, c, was))
    elif stopped is not None and not options.check:
        run.steps.extend(restore(host, conn, deadline, play, matrix, options, c))
    if stopped is not None and not options.check:
        serve_again(run, c, conn, deadline, _drain(play, host, "fleet_undrain_command"), stopped)


def class_key(c: Context, hostvars: dict) -> CacheKey | None:
    """The host's class key, where class caches apply: a run that keeps them, a stack in a virtualenv that
    serves, and no ``fleet_class_cache: false``."""
    if not (c.options.caches and c.target.cache and c.serve and c.serve.ok) or \
            str(hostvars.get("fleet_class_cache", True)).lower() in ("false", "no", "0", "off"):
        return None
    return cache_key(c.facts, c.stack, c.serve.config, smoke_model=str(c.play.smoke["model"] or "") or None,
                     service_model=str(c.play.service["model"] or "") or None)


def receive(c: Context, key: CacheKey, record, conn: Connection, deadline: Deadline) -> CacheKey | None:
    """Before the first proof: the class's stored cache pushed to the host (a "cache" step), once its canary
    kept one. Returns *key* where this host is the class's canary (it keeps its cache after its proofs)."""
    caches = c.options.caches
    if c.options.check:
        stored = caches.store.get(key)
        if isinstance(stored, Stored) and not holds(c.state.cache, key, stored):
            record("cache", lambda: execute(push(key, stored, c.target.cache), conn, deadline, check=True))
        return None
    stored = caches.claim(key, c.host, timeout=deadline.left(c.host) / 2)
    if isinstance(stored, Stored):
        if not holds(c.state.cache, key, stored):
            record("cache", lambda: execute(push(key, stored, c.target.cache), conn, deadline,
                                            fleet_as_root=c.target.fleet_as_root))
        return None
    if stored:  # a stored cache that is not to be trusted: said, and this host compiles for itself
        record("cache", lambda: Step("cache", Status.OK, f"{stored}; this host compiles its own"))
    if not caches.canary(key, c.host):
        return None
    if c.state.cache.get("key") not in (None, key.id):
        record("cache", lambda: execute(clear(c.target.cache, str(c.state.cache["key"])), conn, deadline,
                                        fleet_as_root=c.target.fleet_as_root))
    return key


def holds(marker: dict, key: CacheKey, stored: Stored) -> bool:
    """Whether the host's cache (its marker) is this class's already: built here, or pushed from *stored*."""
    return marker.get("key") == key.id and marker.get("sha256") in (None, stored.sha256)


def keep(key: CacheKey, c: Context, run: HostRun, conn: Connection, deadline: Deadline) -> Step:
    """The canary's validate and smoke passed: its compiled kernels go to the controller's store under the
    class key. Not kept (a proof that did not run, a copy that failed) is said, and fails nothing."""
    unproven = [p for p in PROOF_STEPS if not any(s.name == p and s.status == Status.OK for s in run.steps)]
    if unproven:
        return Step("cache", Status.SKIPPED, f"class cache not kept: {' and '.join(unproven)} did not run here")
    store = c.options.caches.store
    store.root.mkdir(parents=True, exist_ok=True)
    local = store.root / f".{key.id}.{c.host}.partial"
    step = execute(capture(key, c.target.cache, c.target.root, local), conn, deadline,
                   fleet_as_root=c.target.fleet_as_root)
    if step.status == Status.FAILED:
        local.unlink(missing_ok=True)
        return replace(step, status=Status.SKIPPED, detail=f"class cache not kept: {step.detail}")
    stored = store.put(key, local, c.host)
    return replace(step, detail=f"class cache {key.id} kept on the controller ({stored.bytes / 1e6:.1f} MB, "
                                f"sha256 {stored.sha256[:12]}…)", data={**stored.to_dict(), "class": key.to_dict()})


# The host lock, in POSIX sh: flock(1) on <root>/.lock (Python's fcntl where flock is missing), the
# holder's line written into the file, then held by a process reading stdin, which ends when the run
# releases it — or by itself when the controller dies and its SSH session closes: no lock outlives its
# run. A second run is refused at once, naming the holder. The install holds <root>/.install-lock
# itself (its installer inherits the descriptor), which can outlive a killed controller's session:
# the host lock is not granted while it is held, so no second install starts beside it.
LOCK = """exec 2>&1
mkdir -p {root} || exit 1
if command -v flock >/dev/null 2>&1; then
  exec 9>>{root}/.lock || exit 1
  if ! flock -n 9; then echo "held: $(cat {root}/.lock)"; exit 1; fi
  if ! flock -n 8 8>>{root}/.install-lock; then echo "installing: $(cat {root}/.install-lock)"; exit 1; fi
  printf '%s\\n' {holder} > {root}/.lock
  echo locked
  exec cat >/dev/null
fi
exec {python} -c '
import fcntl, sys
f = open(sys.argv[1], "a+")
try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    f.seek(0); print("held: " + f.read().strip()); sys.exit(1)
g = open(sys.argv[3], "a+")
try:
    fcntl.flock(g, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    g.seek(0); print("installing: " + g.read().strip()); sys.exit(1)
g.close()
f.truncate(0); f.write(sys.argv[2] + "\\n"); f.flush(); print("locked", flush=True); sys.stdin.read()
' {root}/.lock {holder} {root}/.install-lock
"""


def holder(run_id: str) -> str:
    """Who holds a host lock: the run, the controller host, the user, the controller's pid, and since when."""
    return (f"run {run_id or 'unnamed'} from {socket.gethostname()} (user {getpass.getuser()}, pid {os.getpid()}) "
            f"since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")


def lock_host(conn: Connection, facts: Facts, run_id: str, timeout: float,
              root: bool = False) -> Callable[[], None] | Step:
    """Hold the host's lock for the rest of this run (the function that releases it), or a failed "lock"
    step naming the run that holds it. *root*: through become (a fleet_root that is root's)."""
    path = facts.fleet_root
    python = facts.python.path if facts.python else "python3"
    answer, release = conn.hold(LOCK.format(root=q(path), holder=q(holder(run_id)), python=q(python)),
                                timeout=timeout, root=root)
    if answer == "locked":
        return release
    release()
    if answer.startswith("installing: "):
        return failed("lock", f"an install is still running on the host ({answer[12:] or 'pid unknown'}), "
                              "left by a run that ended: wait for it to end, then run again (it holds "
                              f"{path}/.install-lock)")
    if answer.startswith("held: "):
        return failed("lock", f"{path} is locked by {answer[6:] or 'another fleetctl run'}: wait for that run "
                              "to finish (a run that died releases the lock when its SSH session closes)")
    return failed("lock", f"cannot lock {path}/.lock: {answer or 'no answer'}")


def put_back(host: Host, conn: Connection, deadline: Deadline, play: Play, matrix: Matrix, options: Options,
             c: Context, was: dict) -> list[Step]:
    """A step after activate failed: current and previous go back to what they were, and where a service
    ran before this run, the old stack's service is started again (the failed step stopped it), so the
    host runs what its links say. Returns the steps saying so ("revert", and "service" again)."""
    start = time.monotonic()
    back = was.get("current")
    try:
        undo = execute(Planned("revert", (revert(c.target.root, back, was.get("previous")),),
                               lambda _: Step("revert", Status.CHANGED, f"current back to {back or 'nothing'}")),
                       conn, deadline, fleet_as_root=c.target.fleet_as_root)
        if undo.status == Status.FAILED or not back or not c.state.service_alive:
            return [replace(undo, duration=round(time.monotonic() - start, 2))]
        old = stack_at(conn, c.target.root, back, deadline.left(host.name))
        if isinstance(old, str):
            return [replace(undo, status=Status.FAILED, detail=f"current back to {back}; its service not restarted: {old}")]
        oc = context(host, conn, deadline, play, matrix, options, c.facts, old, [])
        again = execute(STEPS["service"](oc), conn, deadline, fleet_as_root=oc.target.fleet_as_root)
    except HostError as exc:
        return [failed("revert", f"putting current back to {back or 'nothing'} failed: {exc.reason}")]
    restarted = again.status != Status.FAILED
    return [replace(undo, status=Status.CHANGED if restarted else Status.FAILED,
                    detail=f"current back to {back}; the service of {old.id} "
                           + ("restarted" if restarted else f"not restarted: {again.detail}"),
                    duration=round(time.monotonic() - start, 2), tail=None if restarted else again.tail)]


PROOF_STEPS = ("validate", "smoke")


def _drain(play: Play, host: Host, name: str) -> str | None:
    return str(play.hostvars(host.vars).get(name) or "") or None


def restore(host: Host, conn: Connection, deadline: Deadline, play: Play, matrix: Matrix, options: Options,
            c: Context) -> list[Step]:
    """Exclusive proofs failed before activate: the stack that served before (current, untouched) serves
    again; the step saying so is "restore" (its service step's verdict: the old server generated)."""
    start = time.monotonic()
    back = c.state.current
    try:
        old = stack_at(conn, c.target.root, back, deadline.left(host.name)) if back else "nothing is current"
        if isinstance(old, str):
            return [failed("restore", f"the serving stack was stopped for the proofs and not started again: {old}")]
        oc = context(host, conn, deadline, play, matrix, options, c.facts, old, [])
        again = execute(STEPS["service"](oc), conn, deadline, fleet_as_root=oc.target.fleet_as_root)
    except HostError as exc:
        return [failed("restore", f"starting the old service again failed: {exc.reason}")]
    ok = again.status != Status.FAILED
    return [Step("restore", Status.CHANGED if ok else Status.FAILED,
                 f"the service of {old.id} " + ("serves again" if ok else f"did not start again: {again.detail}"),
                 duration=round(time.monotonic() - start, 2), data=again.data, tail=None if ok else again.tail)]


def stop_for_proofs(c: Context, record, conn: Connection, deadline: Deadline, play: Play, host: Host) -> Context:
    """Exclusive proofs: the serving stack stops (a "vacate" step); the context then says nothing serves, so
    the service step starts one, even of this stack."""
    record("vacate", lambda: execute(vacate(c, _drain(play, host, "fleet_drain_command")), conn, deadline,
                                     check=c.options.check, fleet_as_root=c.target.fleet_as_root))
    return c if c.options.check else replace(c, state=replace(c.state, service_alive=False))


def serve_again(run: HostRun, c: Context, conn: Connection, deadline: Deadline, command: str | None,
                stopped: float) -> None:
    """After exclusive proofs (passed or not; the service stopped at *stopped*): the downtime said, and
    fleet_undrain_command where one drained."""
    run.downtime_s = round(time.monotonic() - stopped, 2)
    run.steps.append(Step("downtime", Status.OK, f"no service for {run.downtime_s:.1f} s (exclusive proofs)",
                          data={"downtime_s": run.downtime_s}))
    if command:
        try:
            run.steps.append(execute(undrain(c.host, command), conn, deadline))
        except HostError as exc:
            run.steps.append(failed("undrain", exc.reason))


def stack_at(conn: Connection, root: str, env_rel: str, timeout: float) -> Stack | str:
    """The stack of the environment *env_rel* under *root*, from its marker; or why not."""
    marker = conn.run(f"cat {q(root)}/{q(env_rel)}/{MARKER}", timeout=timeout)
    try:
        return Stack.from_dict(json.loads(marker.stdout)["stack"])
    except (ValueError, KeyError, TypeError):
        return f"{env_rel} has no readable {MARKER}"


def _recorder(run: HostRun, host: str, on_step: Callable[[str, str], None]):
    """Run one part of the flow, timed: a Step is added to the run (facts, resolve, the lock and reading
    the host's state only when they fail); a failed one stops the host."""
    def record(name: str, action):
        on_step(host, name)
        start = time.monotonic()
        try:
            value = action()
        except HostError as exc:
            if exc.status != Status.FAILED:
                raise  # unreachable or timed out: the whole host's outcome says so
            value = failed(name, exc.reason)
        if isinstance(value, Step) or name not in ("facts", "resolve", "lock", "state"):
            step = replace(value, duration=round(time.monotonic() - start, 2))
            run.steps.append(step)
            if step.status == Status.FAILED:
                raise Stopped
            return step
        return value
    return record


def _resolve(run: HostRun, facts: Facts, request: Request, matrix: Matrix) -> Stack | Step:
    result = resolve(facts, request, matrix)
    run.request = asdict(request)
    run.reasons = list(result.reasons)
    if not result.ok:
        return failed("resolve", f"no stack fits: {result.reasons[-1]} ({result.fix})")
    run.stack = {**result.stack.to_dict(), "id": result.stack.id}
    run.changes = changes(result.stack, facts.installed)
    return result.stack


def context(host: Host, conn: Connection, deadline: Deadline, play: Play, matrix: Matrix, options: Options,
            facts: Facts, stack: Stack, planned_changes: list[str]) -> Context:
    """Everything the steps plan from: the target (pure), the wheelhouse class, and the host's
    state read in one round trip."""
    hostplay, hostvars = play.for_host(host.vars), play.hostvars(host.vars)
    target = target_for(facts, stack, str(hostplay.install["container_name"]))
    wheels = None
    if hostplay.install["wheelhouse"]:
        try:
            wheels = wheels_for(hostplay.install["wheelhouse"], host.name, stack, facts, target.root)
        except WheelhouseError as exc:
            wheels = str(exc)
    smoke_model = str(hostplay.smoke["model"] or "") or None
    stored, hostvars = stored_model(str(hostvars.get("fleet_model") or ""), facts, hostvars, options)
    model = str(hostvars.get("fleet_model") or smoke_model or "")
    state = read_state(conn, target, deadline.left(host.name), wheelhouse=getattr(wheels, "remote", None),
                       model=model if model.startswith("/") else None,
                       staged=model if isinstance(stored, Manifest) else None)
    if isinstance(stored, Manifest):
        try:
            stored = StagedModel(stored, model_store(hostvars) / stored.key, model, state.staged, state.staged_verified,
                                 parse_rate(hostvars.get("fleet_model_bandwidth")))
        except ValueError as exc:
            stored = str(exc)
    installer = str(hostvars.get("fleet_installer") or "auto")
    uv = None
    if not (state.installed or state.uv or target.container or installer == "pip"):
        uv = carried_uv(facts, stack, getattr(wheels, "uv_wheel", None))
    serve = None
    if stack.vllm:
        serve = plan_serving(facts, stack, hostvars, model=smoke_model, model_config=state.model_config)
    proof = decide(facts, serve.config if serve and serve.ok else None, hostvars, weights_mib=state.model_weights_mib,
                   model_config=state.model_config)
    return Context(host.name, facts, stack, target, state, hostplay, options, tuple(planned_changes), serve,
                   backend_option(matrix, stack.vllm), wheels, proof, installer, uv, stored)


def model_store(hostvars: dict) -> Path:
    """The controller's model store: fleet_model_store, else weights pull's default."""
    return Path(str(hostvars["fleet_model_store"])).expanduser() if hostvars.get("fleet_model_store") \
        else default_store()


def stored_model(value: str, facts: Facts, hostvars: dict, options: Options | None = None
                 ) -> tuple[Manifest | Step | str | None, dict]:
    """A fleet_model naming a model of the controller's store (NAME@REVISION): its manifest, and the host
    vars serving it from where it is staged, <fleet_root>/models/<name>@<revision>; or why it cannot be. With
    the run's *options*, a hub model (org/name@rev) the store lacks is pulled first, once per run (--check:
    said, not pulled); without them (audit) only the store is read."""
    if not is_stored(value):
        return None, hostvars

    def staged(key: str) -> dict:
        return {**hostvars, "fleet_model": f"{facts.fleet_root}/models/{key}"}
    store = model_store(hostvars)
    missing = options and is_hub_id(value) and not manifest_path(store, store_key(value)).exists()
    if missing and options.check:
        return Step("model", Status.CHANGED, f"would pull {value} from the hub into {store} first, then send it "
                                             "(its files are listed once it is there: fleetctl weights pull)"), \
            staged(store_key(value))
    try:
        manifest = options.pull(value, store) if missing and options.pull else load_manifest(store, value)
    except FleetError as exc:
        return str(exc), hostvars
    return manifest, staged(manifest.key)


def carried_uv(facts: Facts, stack: Stack, wheel) -> UvBinary | str:
    """uv's binary for a host that has none: from its wheelhouse class's uv wheel, else the controller's cache
    or a download; or why there is none (the install then uses pip)."""
    if not facts.glibc or facts.arch not in ("x86_64", "aarch64"):
        return (f"uv is carried to glibc hosts on x86_64 or aarch64 (this one: {facts.arch}, "
                f"glibc {facts.glibc or 'unknown'})")
    platform = Platform(stack.python, facts.glibc, facts.arch)
    return extract(wheel, cache_dir()) if wheel else obtain(platform)


def provision_host(play: Play, matrix: Matrix, options: Options, on_step=None):
    """A fan-out task: provision one host over its connection."""
    def task(host: Host, conn: Connection, deadline: Deadline) -> HostRun:
        return provision(host, conn, deadline, play, matrix, options, on_step)
    return task
