"""What would change on a host, and the lock file that records what was resolved.

``changes(stack, installed)`` compares a resolved Stack with the host's installed
facts; ``Lock`` is ``fleet.lock``: per host class (hosts with identical
resolution-relevant facts) the facts, request, stack and reasons, and per host
its class. Both are pure; writing is deterministic, so unchanged facts give a
byte-identical lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import yaml

from fleetctl.decide.driver import DriverMove, facts_after, plan_move
from fleetctl.decide.prerequisites import decide as decide_prerequisites
from fleetctl.decide.proofmode import ProofMode, decide
from fleetctl.decide.resolve import Request, Resolution, Stack, resolve
from fleetctl.decide.serving import plan_serving
from fleetctl.errors import StateError
from fleetctl.facts.probe import Facts, Installed
from fleetctl.hosts.inventory import Host
from fleetctl.hosts.playbook import Play
from fleetctl.knowledge.matrix import Matrix
from fleetctl.records import atomic_write, read_state, safe_load_yaml
from fleetctl.redact import redact_data
from fleetctl.status import Status

LOCK_VERSION = 1


@dataclass(frozen=True)
class HostPlan:
    """A host's resolution and what installing it would change."""

    host: Host
    facts: Facts
    request: Request
    resolution: Resolution
    changes: tuple[str, ...]
    driver: DriverMove | None = None  # plan --driver: the driver move the requested CUDA needs
    proof: ProofMode | None = None  # where its proofs would run: beside the serving stack, or in its place

    @property
    def status(self) -> Status:
        return Status.OK if self.resolution.ok else Status.REFUSED

    def to_json(self) -> dict:
        r = self.resolution
        driver = {"driver": self.driver.to_json()} if self.driver else {}
        if not r.ok:
            return {"status": self.status, "reasons": list(r.reasons), "fix": r.fix, **driver}
        proof = {"proof": self.proof.to_dict()} if self.proof else {}
        return {"status": self.status, "stack": {**r.stack.to_dict(), "id": r.stack.id}, "reasons": list(r.reasons),
                "changes": list(self.changes), **proof, **driver}


def request_for(host: Host, play: Play | None = None, overrides: Mapping[str, str | None] | None = None) -> Request:
    """What is asked of *host*: its inventory vars, the play's vars over them (as provision templates them),
    then the command line's *overrides* (--cuda, --vllm, …; None leaves a var as it is). The one way plan,
    provision, rollout, retry and wheelhouse build a request."""
    hostvars = play.hostvars(host.vars) if play is not None else dict(host.vars)
    return Request.from_vars(hostvars, **{k: v for k, v in (overrides or {}).items() if v})


def plan_host(host: Host, facts: Facts, matrix: Matrix, driver: str | None = None, play: Play | None = None,
              **overrides) -> HostPlan:
    """Resolve *host* from its facts and its request (:func:`request_for`: its fleet_* vars, *play*'s vars and
    command-line *overrides*). With *driver* ("auto" or a branch) and a requested CUDA, a host whose driver
    cannot run that CUDA gets a driver move, and its stack is resolved as it will be once the move is made."""
    request = request_for(host, play, overrides)
    move = plan_move(facts, request.cuda, driver, matrix, cuda_compat=request.cuda_compat) \
        if driver and request.cuda != "auto" else None
    resolution = resolve(facts_after(facts, move) if move and move.ok else facts, request, matrix)
    if move and move.ok:
        resolution = replace(resolution, reasons=(f"after the driver move to R{move.branch} ({move.min_version})",
                                                  *resolution.reasons))
    planned = [*changes(resolution.stack, facts.installed), *host_packages(host, play, facts, resolution.stack)] \
        if resolution.ok else []
    return HostPlan(host, facts, request, resolution, tuple(planned), move,
                    proof_mode(host, facts, resolution.stack) if resolution.ok else None)


def host_packages(host: Host, play: Play | None, facts: Facts, stack: Stack) -> list[str]:
    """The host packages provision would install first, each with why (prerequisites.yaml). Python's venv makes
    the environment where fleet_installer is pip; otherwise uv does (the host's or the one fleetctl carries)."""
    if facts.installed and facts.installed.stack_id == stack.id:
        return []
    hostvars = play.hostvars(host.vars) if play is not None else dict(host.vars)
    need = decide_prerequisites(facts, stack, venv_by_pip=str(hostvars.get("fleet_installer")) == "pip",
                                container=stack.container_image is not None)
    if not need.missing:
        return []
    if need.command is None:
        return [f"cannot install host packages: {need.unknown}; the host lacks {need.reasons()}"]
    return [f"install {m.package} with {need.manager} as root: {m.why}" for m in need.missing]


def proof_mode(host: Host, facts: Facts, stack: Stack) -> ProofMode:
    """Where the host's proofs would run, from its facts and serving vars (plan reads no model directory: a
    fleet_model's size is the host's to measure when the proof starts)."""
    serve = plan_serving(facts, stack, host.vars) if stack.vllm else None
    return decide(facts, serve.config if serve and serve.ok else None, host.vars)


def changes(stack: Stack, installed: Installed | None) -> list[str]:
    """What installing *stack* changes on a host whose fleet environment is *installed*."""
    if not installed:
        return [f"create environment {stack.id}", *_installs(stack)]
    if installed.stack_id == stack.id:
        return []
    out = [f"create environment {stack.id}; the current one ({installed.stack_id or installed.env}) "
           "is kept for rollback"]
    want = {"torch": _torch_label(stack), stack.vllm_package: stack.vllm, "flashinfer-python": stack.flashinfer}
    have = {"torch": _installed_torch(installed), installed.vllm_package or stack.vllm_package: installed.vllm,
            "flashinfer-python": installed.flashinfer}
    for name in dict.fromkeys([*want, *have]):
        new, old = want.get(name), have.get(name)
        if new and not old:
            out.append(f"{'reuse the host Python’s' if name == 'torch' and stack.system_site_packages else 'install'} "
                       f"{name} {new}")
        elif old and not new:
            out.append(f"remove {name} {old}")
        elif new != old:
            out.append(f"{name} {old} → {new}")
    return out


def _installs(stack: Stack) -> list[str]:
    return [f"{'reuse the host Python’s' if name == 'torch' and stack.system_site_packages else 'install'} "
            f"{name} {version}" for name, version in
            (("torch", _torch_label(stack)), (stack.vllm_package, stack.vllm), ("flashinfer-python", stack.flashinfer))
            if version]


def _torch_label(stack: Stack) -> str:
    return stack.torch if "+" in stack.torch or not stack.cuda else f"{stack.torch} (CUDA {stack.cuda})"


def _installed_torch(installed: Installed) -> str | None:
    torch = installed.torch
    if not torch or "+" in torch or not installed.torch_cuda:
        return torch
    return f"{torch} (CUDA {installed.torch_cuda})"


# ---------------------------------------------------------------- the lock

@dataclass(frozen=True)
class ClassFacts:
    """The facts a resolution depends on: hosts that agree on these get the same stack (a class of fleet.lock,
    kept there as plain data: :meth:`to_dict` and :meth:`from_dict` are its edge)."""

    gpus: tuple[tuple, ...]  # (name, compute capability, memory MiB, MIG mode) per GPU, in a stable order
    driver_version: str | None
    cuda_driver_version: str | None
    os: Mapping  # os-release's fields (OsRelease as data)
    arch: str | None
    glibc: str | None
    python: str | None
    nvcc: str | None
    container_runtime: Mapping | None

    @classmethod
    def of(cls, facts: Facts) -> ClassFacts:
        return cls.from_dict({
            "gpus": [[g.name, g.compute_capability, g.memory_mib, g.mig_mode] for g in facts.gpus],
            "driver_version": facts.driver_version, "cuda_driver_version": facts.cuda_driver_version,
            "os": asdict(facts.os), "arch": facts.arch, "glibc": facts.glibc,
            "python": facts.python.version if facts.python else None, "nvcc": facts.nvcc,
            "container_runtime": asdict(facts.container_runtime) if facts.container_runtime else None})

    @classmethod
    def from_dict(cls, data: Mapping) -> ClassFacts:
        """From fleet.lock's (or :meth:`of`'s) plain data; a missing or malformed field raises KeyError/TypeError."""
        gpus = tuple(tuple(g) for g in sorted((list(g) for g in data["gpus"]), key=str))
        return cls(gpus, data["driver_version"], data["cuda_driver_version"], dict(data["os"]), data["arch"],
                   data["glibc"], data["python"], data["nvcc"],
                   dict(data["container_runtime"]) if data.get("container_runtime") else None)

    def to_dict(self) -> dict:
        return {**asdict(self), "gpus": [list(g) for g in self.gpus], "os": dict(self.os),
                "container_runtime": dict(self.container_runtime) if self.container_runtime else None}


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LockedHost:
    name: str
    host_class: str
    facts: ClassFacts
    request: dict
    status: str
    stack: Stack | None
    reasons: tuple[str, ...]
    fix: str | None = None


class Lock:
    """``fleet.lock``: {host: LockedHost}, read and written as deterministic YAML."""

    def __init__(self, path: Path | None, hosts: dict[str, LockedHost] | None = None, matrix: str | None = None):
        self.path = Path(path) if path else None
        self.hosts = dict(hosts or {})
        self.matrix = matrix

    @staticmethod
    def beside(inventory: str | Path) -> Path:
        """Where a fleet's lock lives unless told otherwise: next to its inventory."""
        return Path(inventory).resolve().parent / "fleet.lock"

    @classmethod
    def read_or_new(cls, path: Path) -> Lock:
        """The lock at *path*, or an empty one that will be written there."""
        return cls.read(path) if Path(path).exists() else cls(path)

    @classmethod
    def read(cls, path: Path) -> Lock:
        """The lock at *path*; anything wrong with it is one StateError naming the file and the fault."""
        path = Path(path)
        remake = "re-create it with fleetctl plan INVENTORY --write-lock"
        data = read_state(path, "lock file", lambda text: safe_load_yaml(text, str(path)),
                          fix=remake if path.exists() else "write one with fleetctl plan INVENTORY --write-lock")
        if data.get("version") != LOCK_VERSION:
            raise StateError(f"{path}: not a version {LOCK_VERSION} fleet.lock", fix=remake)
        try:
            return cls(path, _locked_hosts(data), data.get("matrix"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            fault = f"host '{exc.args[0]}' names a class the file does not have" if isinstance(exc, _Dangling) \
                else f"an entry is malformed ({type(exc).__name__}: {exc})"
            raise StateError(f"{path}: {fault}, not a usable fleet.lock", fix=remake) from None

    @classmethod
    @contextlib.contextmanager
    def updating(cls, path: Path) -> Iterator[Lock]:
        """The lock at *path* (or a new one), held against every other fleetctl that writes it, and
        written when the block ends: writers that each change some hosts merge rather than one
        losing the other's. The lock is ``fcntl.flock`` on a sibling file, ``.fleet.lock.lock``;
        the kernel releases it if the writer dies."""
        path = Path(path)
        if not path.parent.is_dir():
            raise StateError(f"cannot write {path}: no directory {path.parent}",
                             fix="create the directory first, or name a lock file in one that exists")
        try:
            guard = open(path.with_name(f".{path.name}.lock"), "a")
        except OSError as exc:
            raise StateError(f"cannot lock {path}: {exc.strerror or exc}") from None
        with guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # waits for the other writer: they finish in seconds
            lock = cls.read_or_new(path)
            yield lock
            lock.write()

    @classmethod
    def record_plans(cls, path: Path, plans: Iterable[HostPlan], matrix: str) -> None:
        """plan --write-lock: every planned host's resolution (a refusal too), merged under the lock so that
        a run at once with another --limit keeps both runs' hosts."""
        with cls.updating(path) as lock:
            for p in plans:
                lock.record(p.host.name, p.facts, p.request, p.resolution, matrix)

    @classmethod
    def record_runs(cls, path: Path, outcomes: Iterable, matrix: str) -> None:
        """What provision resolved and installed, for each host that succeeded (a fan-out Outcome whose
        value is its HostRun): an audit right after a provision compares against it."""
        done = [o.value for o in outcomes if o.ok and o.status in (Status.OK, Status.CHANGED)
                and o.value.stack and o.value.request]
        if not done:
            return
        with cls.updating(path) as lock:
            for run in done:
                lock.record_run(run.host, run.facts, run.request, run.stack, run.reasons, matrix)

    def record(self, name: str, facts: Facts, request: Request, resolution: Resolution, matrix: str) -> None:
        cf = ClassFacts.of(facts)
        req = redact_data(asdict(request))
        self.hosts[name] = LockedHost(name, _digest([cf.to_dict(), req]), cf, req, resolution.status, resolution.stack,
                                      resolution.reasons, resolution.fix)
        self.matrix = matrix

    def record_run(self, name: str, facts: dict, request: dict, stack: dict, reasons, matrix: str) -> None:
        """Record what a provision run resolved and installed on *name* (its run's facts, request and
        stack as plain data), as plan would have recorded it."""
        cf = ClassFacts.of(Facts.from_dict(facts))
        self.hosts[name] = LockedHost(name, _digest([cf.to_dict(), request]), cf, dict(request), "ok",
                                      Stack.from_dict(stack), tuple(reasons), None)
        self.matrix = matrix

    def entry(self, name: str) -> dict | None:
        """A host's lock entry as plain data (for a rollout's journal), or None."""
        h = self.hosts.get(name)
        if h is None:
            return None
        return {"class": h.host_class, "facts": h.facts.to_dict(), "request": h.request, "status": h.status,
                "stack": h.stack.to_dict() if h.stack else None, "reasons": list(h.reasons), "fix": h.fix}

    def put(self, name: str, entry: dict | None) -> None:
        """Set (or, with None, drop) a host's entry from plain data."""
        if entry is None:
            self.hosts.pop(name, None)
            return
        self.hosts[name] = LockedHost(name, entry["class"], ClassFacts.from_dict(entry["facts"]), entry["request"],
                                      entry["status"],
                                      Stack.from_dict(entry["stack"]) if entry["stack"] else None,
                                      tuple(entry["reasons"]), entry["fix"])

    def text(self) -> str:
        classes = {}
        for h in self.hosts.values():
            entry = {"facts": h.facts.to_dict(), "request": h.request, "status": h.status, "reasons": list(h.reasons)}
            if h.stack:
                entry.update(stack=h.stack.to_dict(), stack_id=h.stack.id)
            if h.fix:
                entry["fix"] = h.fix
            classes[h.host_class] = entry
        hosts = {name: {"class": h.host_class, "stack_id": h.stack.id if h.stack else None}
                 for name, h in sorted(self.hosts.items())}
        body = yaml.safe_dump(redact_data({"version": LOCK_VERSION, "matrix": self.matrix, "classes": classes,
                                           "hosts": hosts}),
                              sort_keys=True, allow_unicode=True, width=1000)
        return "# fleet.lock: written by `fleetctl plan --write-lock`; re-run plan rather than editing it.\n" + body

    def write(self) -> Path:
        return atomic_write(self.path, self.text())  # readers never see half a lock


class _Dangling(KeyError):
    """A host entry names a class the lock does not have."""


def _locked_hosts(data: dict) -> dict[str, LockedHost]:
    """fleet.lock's hosts from its parsed YAML; a malformed entry raises KeyError, TypeError or ValueError."""
    classes = data.get("classes") or {}
    hosts = {}
    for name, entry in (data.get("hosts") or {}).items():
        if entry["class"] not in classes:
            raise _Dangling(name)
        c = classes[entry["class"]]
        hosts[name] = LockedHost(str(name), entry["class"], ClassFacts.from_dict(c["facts"]), dict(c["request"]),
                                 c["status"],
                                 Stack.from_dict(c["stack"]) if c.get("stack") else None,
                                 tuple(c.get("reasons", ())), c.get("fix"))
    return hosts
