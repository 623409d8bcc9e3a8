"""Drift: how a host's live facts differ from what fleet.lock says was resolved and installed.

``drift(facts, locked, matrix)`` is pure: facts and a lock entry in, a list of
:class:`Drift` out. ``audit_fleet`` runs an audit: each host's facts gathered and
compared (and, with --validate, the validation kernel run in its current
environment), the snapshot kept for a later ``--since``. The output formats
monitoring already reads (JSON, JUnit XML, Prometheus text) are rendered here
too, as text, and ``install_timer`` writes the systemd timer (and cron line) that
runs an audit on a schedule. An audit only reads the hosts.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Mapping
from xml.sax.saxutils import quoteattr

from fleetctl import records, systemd
from fleetctl.apply.caches import Store, Stored
from fleetctl.apply.models import Manifest, StagedModel
from fleetctl.apply.provision import model_store, stored_model
from fleetctl.apply.target import UNIT, HostState, read_state, target_for
from fleetctl.decide.classcache import CACHE_MARKER, CacheKey, stale
from fleetctl.decide.health import health_drift
from fleetctl.decide.plan import ClassFacts, Lock, LockedHost
from fleetctl.decide.prerequisites import decide as decide_prerequisites
from fleetctl.decide.resolve import Request, flashinfer_in_use, resolve
from fleetctl.errors import FleetError, StateError
from fleetctl.facts.probe import Facts, FleetState, gather
from fleetctl.hosts.inventory import Host
from fleetctl.knowledge.matrix import Matrix
from fleetctl.reach.connection import Connection
from fleetctl.reach.fanout import Deadline, Outcome, fan_out
from fleetctl.status import Status, parse_verdict

KINDS = ("unlocked", "driver", "cuda_driver", "gpus", "python", "platform", "environment", "current",
         "package", "host_package", "service", "validation", "stack_outdated", "incompatible", "health", "xid", "ecc")
AUDITED = (Status.CLEAN, Status.DRIFT)  # the host answered; anything else is why it could not be read


@dataclass(frozen=True)
class Drift:
    kind: str
    detail: str


def drift(facts: Facts, locked: LockedHost | None, matrix: Matrix) -> list[Drift]:
    """Every way *facts* differ from the lock entry (pure)."""
    if locked is None:
        return [Drift("unlocked", "not in fleet.lock: run fleetctl plan --write-lock")]
    now, then = ClassFacts.of(facts), locked.facts
    out = [Drift(kind, f"{what} {getattr(then, key)} → {getattr(now, key)}") for key, kind, what in (
        ("driver_version", "driver", "driver"), ("cuda_driver_version", "cuda_driver", "driver's CUDA"),
        ("python", "python", "Python")) if getattr(now, key) != getattr(then, key)]
    if now.gpus != then.gpus:
        out.append(Drift("gpus", _gpu_change(then.gpus, now.gpus)))
    out += [Drift("platform", f"{key} {_short(getattr(then, key))} → {_short(getattr(now, key))}")
            for key in ("os", "arch", "glibc") if getattr(now, key) != getattr(then, key)]
    stack = locked.stack
    if stack is None:
        return out  # the lock recorded a refusal: nothing was installed to drift from
    fleet = facts.fleet or FleetState()
    wanted = f"{'containers' if stack.container_image else 'envs'}/{stack.id}"
    if wanted not in fleet.envs:
        out.append(Drift("environment", f"{wanted} is missing under {facts.fleet_root}"))
    if fleet.current != wanted:
        out.append(Drift("current", f"current → {fleet.current or 'nothing'}, locked {wanted}"))
    inst = facts.installed
    if fleet.current == wanted and inst:
        for name, want, got in (("torch", stack.torch, inst.torch), (stack.vllm_package, stack.vllm, inst.vllm),
                                ("flashinfer-python", stack.flashinfer, inst.flashinfer)):
            if want and got != want and (got or "").split("+")[0] != want:
                out.append(Drift("package", f"{name} {got} in the environment, locked {want}"))
    if fleet.current == wanted:
        out += host_package_drift(facts, stack)
    out += container_drift(fleet, stack.id)
    again = resolve(facts, Request(**locked.request), matrix)
    if not again.ok:
        out.append(Drift("incompatible", f"no stack fits any more: {again.reasons[-1]} ({again.fix})"))
    elif again.stack.id != stack.id:
        out.append(Drift("stack_outdated", f"the resolver now picks {again.stack.id} (locked {stack.id})"))
    return out


def host_package_drift(facts: Facts, stack) -> list[Drift]:
    """The host packages the installed stack needs to run (prerequisites.yaml; venv only made it) that are
    gone from the host since: removed by hand or by an image's clean-up."""
    need = decide_prerequisites(facts, stack, venv_by_pip=False, container=stack.container_image is not None)
    return [Drift("host_package", f"{m.package or m.fact} is missing from the host: {m.why} "
                                  "(fleetctl provision installs it again)") for m in need.missing]


def container_drift(fleet: FleetState, stack_id: str) -> list[Drift]:
    """Container mode: the serving container stopped or gone, running another stack, or its image's tag now
    naming another image (rebuilt, re-pulled, removed) than the one the container runs."""
    if not fleet.container:
        return []
    name, status, *rest = fleet.container.split() + [""]
    if status == "missing":
        return [Drift("service", f"container {name} is gone")]
    image_id, image, stack = (rest + ["", "", ""])[:3]
    out = [] if status == "running" else [Drift("service", f"container {name} is {status}, not running")]
    if stack and stack != stack_id:
        out.append(Drift("service", f"container {name} runs {stack}, locked {stack_id}"))
    if fleet.container_image_now == "":
        out.append(Drift("environment", f"image {image} is gone from the engine (container {name} runs {image_id[:19]})"))
    elif fleet.container_image_now and fleet.container_image_now != image_id:
        out.append(Drift("environment", f"image {image} changed: the tag names {fleet.container_image_now[:19]}, "
                                        f"container {name} runs {image_id[:19]}"))
    return out


def _gpu_change(then: tuple, now: tuple) -> str:
    def names(gpus):
        return {f"{g[0]} sm {g[1]}" for g in gpus}
    gone, new = names(then) - names(now), names(now) - names(then)
    parts = [f"{len(then)} → {len(now)} GPUs"] if len(then) != len(now) else []
    parts += [f"removed {', '.join(sorted(gone))}"] if gone else []
    parts += [f"added {', '.join(sorted(new))}"] if new else []
    return "; ".join(parts) or "GPU memory or MIG mode changed"


def _short(value) -> str:
    return value.get("pretty_name") or str(value) if isinstance(value, dict) else str(value)


def since(old: dict, new: dict) -> dict[str, list[str]]:
    """What changed per host between two audit snapshots ({host: facts dict})."""
    changes = {}
    for host in sorted(set(old) | set(new)):
        if host not in new or host not in old:
            changes[host] = ["host added" if host in new else "host gone"]
            continue
        a, b = ClassFacts.of(Facts.from_dict(old[host])).to_dict(), ClassFacts.of(Facts.from_dict(new[host])).to_dict()
        lines = [f"{k}: {_short(a[k])} → {_short(b[k])}" for k in a if a[k] != b[k]]
        ia, ib = old[host].get("installed") or {}, new[host].get("installed") or {}
        lines += [f"installed {k}: {ia.get(k)} → {ib.get(k)}" for k in ("torch", "vllm", "flashinfer", "stack_id")
                  if ia.get(k) != ib.get(k)]
        if lines:
            changes[host] = lines
    return changes


# ---------------------------------------------------------------- running an audit

@dataclass(frozen=True)
class HostAudit:
    """One host's audit: its facts and every drift found; its status is the host's in the fan-out."""

    facts: Facts
    drifts: tuple[Drift, ...]

    @property
    def status(self) -> Status:
        return Status.DRIFT if self.drifts else Status.CLEAN


def audit_fleet(hosts: list[Host], lock: Lock, matrix: Matrix, *, validate: bool = False,
                since_id: str | None = None, forks: int = 50, timeout: float = 60.0,
                on_done: Callable[[Outcome], None] | None = None) -> dict:
    """Audit *hosts* against *lock*: the report (each host clean, drifted, or why it could not be
    read), with what changed since the audit *since_id* where one is named. The facts are kept
    as this audit's snapshot, for a later ``--since``."""
    old = snapshot_facts(since_id) if since_id else None  # a wrong id fails before any host is asked
    outcomes = fan_out(hosts, audit_task(lock, matrix, validate, last_audit_facts()), forks=forks, timeout=timeout,
                       on_done=on_done)
    results = {name: host_result(o.value.drifts) if o.ok else {"status": o.status, "error": o.error}
               for name, o in outcomes.items()}
    snapshot = {name: o.value.facts.to_dict() for name, o in outcomes.items() if o.ok}
    run_id = records.new_run_id("audit")
    report = report_of(run_id, results)
    if old is not None:
        report["since"] = {"run_id": since_id, "changes": since(old, snapshot)}
    records.save({"run_id": run_id, "time": report["time"], "facts": snapshot}, "audits")
    return report


def snapshot_facts(run_id: str) -> dict[str, dict]:
    """The facts an earlier audit kept ({host: facts}), each checked to read as Facts."""
    facts = records.load(run_id, "audits")["facts"]
    for host, data in facts.items():
        try:
            Facts.from_dict(data)
        except (TypeError, ValueError, KeyError, AttributeError):
            raise StateError(f"{records.state_dir() / 'audits' / run_id}.json: the facts of {host} are malformed, "
                             "not a usable audit snapshot", fix="name another audit with --since") from None
    return facts


def last_audit_facts() -> dict[str, dict]:
    """Each host's facts as the latest audit that saw it kept them ({host: facts}), for health drift since
    then: an audit of other hosts (--limit) is no host's baseline. A record that does not read is passed
    over (an audit is never stopped by an older one's record)."""
    def written(path):
        try:
            return path.stat().st_mtime_ns, path.name
        except OSError:
            return 0, path.name
    facts: dict[str, dict] = {}
    for path in sorted((records.state_dir() / "audits").glob("audit-*.json"), key=written):
        try:
            facts.update(json.loads(path.read_text()).get("facts") or {})
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return facts


def audit_task(lock: Lock, matrix: Matrix, validate: bool, last: dict[str, dict] | None = None):
    """The fan-out task of an audit: a host's facts against its lock entry and its GPU health against the
    *last* audit's facts (:func:`audit_host`)."""
    store = Store()  # one for the fleet: each class cache is hashed once

    def task(host: Host, conn: Connection, deadline: Deadline) -> HostAudit:
        return audit_host(host, conn, deadline, gather(host, conn, deadline), lock.hosts.get(host.name), matrix,
                          validate=validate, before=_facts_or_none((last or {}).get(host.name)), store=store)
    return task


def audit_host(host: Host, conn: Connection, deadline: Deadline, facts: Facts, locked: LockedHost | None,
               matrix: Matrix, *, validate: bool, before: Facts | None = None,
               store: Store | None = None) -> HostAudit:
    """A host's drift from its lock entry: the facts compared, its GPU health and how that drifted since
    *before* (the last audit's facts), the service as the host's state says it runs (a systemd unit's
    is-active, or a pid that is still the server: :class:`~fleetctl.apply.target.HostState`, read as provision
    reads it), what its port answers, and with *validate* the validation kernel, run read-only in the
    host's current environment."""
    found = drift(facts, locked, matrix)
    found += [Drift(kind, detail) for kind, detail in health_drift(facts, before)]
    stack = locked.stack if locked else None
    stored, served = stored_model(str(host.vars.get("fleet_model") or ""), facts, host.vars)
    if stack and stack.vllm and not stack.container_image:  # a container's service: container_drift
        remote = served["fleet_model"] if isinstance(stored, Manifest) else None
        state = read_state(conn, target_for(facts, stack), deadline.left(host.name), staged=remote)
        found += service_drift(state) + cache_drift(state.cache, facts, stack.id, store or Store())
        if remote:
            model = StagedModel(stored, model_store(host.vars) / stored.key, remote, state.staged,
                                state.staged_verified)
            found += model_drift(model) + (rehashed(model, conn, deadline, facts, host.name) if validate else [])
        if state.service_alive:
            found += served_drift(_served(host, conn, deadline, facts), service_port(host), stack)
    if validate and facts.fleet and facts.fleet.current and facts.installed:
        verdict = _validate(host, conn, deadline, facts, locked)
        if verdict.get("verdict") != "pass":
            found.append(Drift("validation", f"the validation kernel fails: {verdict.get('error') or 'checks'}"))
    return HostAudit(facts, tuple(found))


def _facts_or_none(data: dict | None) -> Facts | None:
    try:
        return Facts.from_dict(data) if isinstance(data, dict) else None
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def service_drift(state: HostState) -> list[Drift]:
    """A service fleetctl started (service.stack says what) that no longer runs (pure)."""
    if not state.service or state.service_alive:
        return []
    if state.systemd:
        return [Drift("service", f"{UNIT} is not active (the unit stopped, failed or was disabled)")]
    return [Drift("service", "the vLLM service is not running (its pid is gone)")]


def model_drift(model: StagedModel) -> list[Drift]:
    """Each file of the staged model that is missing, of another size, or changed since it was verified on
    the host (size and mtime against its marker: cheap; ``--validate`` hashes them)."""
    return [Drift("model", f"{model.manifest.key}: {f.path} {why} (the next provision sends it again)")
            for f in model.manifest.files if (why := model.wrong(f))]


def rehashed(model: StagedModel, conn: Connection, deadline: Deadline, facts: Facts, name: str) -> list[Drift]:
    """``--validate``: every file of the staged model hashed on the host (reads all its bytes: costly)."""
    python = facts.python.path if facts.python else "python3"
    result = conn.run(f"{shlex.quote(python)} - {shlex.quote(model.remote)}", timeout=deadline.left(name),
                      stdin=model.check_input(list(model.manifest.files), dry=True))
    try:
        bad = json.loads(result.stdout.strip().splitlines()[-1])["bad"]
    except (ValueError, IndexError, KeyError, TypeError):
        return [Drift("model", f"{model.manifest.key}: hashing its files on the host printed no verdict")]
    return [Drift("model", f"{model.manifest.key}: {path} sha256 differs from the store's (the next provision "
                           "sends it again once it is noticed: remove it, or touch it)") for path in bad]


def cache_drift(marker: Mapping, facts: Facts, stack_id: str, store: Store) -> list[Drift]:
    """The class cache the host's environment holds (its marker): built for the machine and stack the host has
    now, and the one the controller keeps for that class where it was pushed."""
    if not marker.get("class"):
        return []
    try:
        held = CacheKey.from_dict(marker["class"])
    except (TypeError, AttributeError, KeyError):
        return [Drift("class-cache", f"its cache marker ({CACHE_MARKER}) is unreadable: provision --revalidate "
                                     "builds or receives the class's cache again")]
    if changed := stale(held, facts, stack_id):
        return [Drift("class-cache", f"its compiled kernels are class {held.id}'s, built for another machine or "
                                     f"stack ({'; '.join(changed)}): provision --revalidate replaces them")]
    stored = store.get(held)
    if isinstance(stored, Stored) and marker.get("sha256") not in (None, stored.sha256):
        return [Drift("class-cache", f"class {held.id}'s cache on the controller (sha256 {stored.sha256[:12]}…) is "
                                     f"not the one pushed here ({str(marker['sha256'])[:12]}…): provision "
                                     "--revalidate pushes it again")]
    return []


def service_port(host: Host) -> int:
    """The port the host's service listens on, as the default playbook's service step reads it."""
    return int(host.vars.get("fleet_service_port") or 8000)


def _served(host: Host, conn: Connection, deadline: Deadline, facts: Facts) -> dict | None:
    """What the service's port answers, asked from the host itself (the port may not be reachable from here)."""
    python = facts.python.path if facts.python else "python3"
    result = conn.run(f"{shlex.quote(python)} - {service_port(host)}", timeout=deadline.left(host.name), stdin=SERVED)
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return answer if isinstance(answer, dict) else None


def served_drift(answer: dict | None, port: int, stack) -> list[Drift]:
    """The service's port must answer as vLLM of the locked version, serving a model (pure)."""
    if answer is None:
        return [Drift("service", f"could not ask port {port} what it serves (no Python answer on the host)")]
    version, models = answer.get("/version") or {}, answer.get("/v1/models") or {}
    if "error" in version:
        return [Drift("service", f"the service runs but port {port} does not answer: {version['error']}")]
    got = str(version.get("version"))
    if got.split("+")[0] != stack.vllm:
        return [Drift("service", f"port {port} serves vLLM {got}, locked {stack.vllm}")]
    if "error" in models or not models.get("data"):
        return [Drift("service", f"port {port} serves no model: {models.get('error') or 'an empty /v1/models'}")]
    return []


# Run by the host's Python on stdin: an audit writes nothing on the host.
SERVED = """import json, sys, urllib.request
out = {}
for path in ("/version", "/v1/models"):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (int(sys.argv[1]), path), timeout=10) as answer:
            out[path] = json.load(answer)
    except Exception as exc:
        out[path] = {"error": "%s: %s" % (type(exc).__name__, exc)}
print(json.dumps(out))
"""


def _validate(host: Host, conn: Connection, deadline: Deadline, facts: Facts, locked: LockedHost | None) -> dict:
    # FlashInfer is proven where the environment's stack uses it, as provision decides it: the
    # lock has the stack, and it is the current environment's when its id is the one installed.
    stack = locked.stack if locked else None
    flashinfer = bool(stack and stack.id == facts.installed.stack_id and flashinfer_in_use(stack)
                      and facts.installed.flashinfer)
    argv = ["--expect-gpus", str(len(facts.gpus)), "--backend", "none",
            "--flashinfer" if flashinfer else "--no-flashinfer"]
    if facts.gpus:
        argv += ["--expect-cc", ",".join(g.compute_capability for g in facts.gpus)]
    script = resources.files("fleetctl").joinpath("remote", "validate.py").read_text()
    # Fed on stdin: an audit writes nothing on the host.
    result = conn.run(f"{shlex.quote(facts.fleet_root)}/current/bin/python - {' '.join(argv)}",
                      timeout=deadline.left(host.name), stdin=script)
    return parse_verdict(result.stdout) or {"verdict": "fail", "error": f"no verdict (exit {result.exited})"}


# ---------------------------------------------------------------- output formats

def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)


def to_junit(report: dict) -> str:
    """One testcase per host: a failure per drift, an error where the host could not be audited."""
    hosts = report["hosts"]
    failures = sum(h["status"] == Status.DRIFT for h in hosts.values())
    errors = sum(h["status"] not in AUDITED for h in hosts.values())
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name="fleetctl-audit" tests="{len(hosts)}" failures="{failures}" errors="{errors}" '
             f'timestamp={quoteattr(report["time"])}>']
    for name, h in hosts.items():
        lines.append(f'  <testcase classname="fleet" name={quoteattr(name)}>')
        for d in h.get("drift", []):
            lines.append(f'    <failure type={quoteattr(d["kind"])} message={quoteattr(d["detail"])}/>')
        if h["status"] not in AUDITED:
            lines.append(f'    <error type={quoteattr(h["status"])} message={quoteattr(h.get("error") or "")}/>')
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    return "\n".join(lines) + "\n"


def to_prometheus(report: dict) -> str:
    """Node exporter textfile format: a gauge per host and drift kind, reachability, last audit time."""
    def label(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    out = ["# HELP fleetctl_drift 1 if the host has drift of this kind against fleet.lock, else 0.",
           "# TYPE fleetctl_drift gauge"]
    for name, h in report["hosts"].items():
        found = {d["kind"] for d in h.get("drift", [])}
        for kind in KINDS:
            out.append(f'fleetctl_drift{{host="{label(name)}",kind="{kind}"}} {int(kind in found)}')
    out += ["# HELP fleetctl_host_audited 1 if the host answered the audit, else 0.",
            "# TYPE fleetctl_host_audited gauge"]
    out += [f'fleetctl_host_audited{{host="{label(n)}"}} {int(h["status"] in AUDITED)}'
            for n, h in report["hosts"].items()]
    out += ["# HELP fleetctl_audit_last_run_timestamp_seconds When this audit ran.",
            "# TYPE fleetctl_audit_last_run_timestamp_seconds gauge",
            f"fleetctl_audit_last_run_timestamp_seconds {report['timestamp']:.0f}"]
    return "\n".join(out) + "\n"


FORMATS = {"json": to_json, "junit": to_junit, "prometheus": to_prometheus}


def report_of(run_id: str, results: dict[str, dict]) -> dict:
    return {"run_id": run_id, "time": records.now(), "timestamp": time.time(), "hosts": results}


def host_result(drifts: Iterable[Drift]) -> dict:
    drifts = list(drifts)
    return {"status": Status.DRIFT if drifts else Status.CLEAN, "drift": [asdict(d) for d in drifts]}


# ---------------------------------------------------------------- the schedule

TIMER = """[Unit]
Description=fleetctl drift audit ({schedule})

[Timer]
OnCalendar={schedule}
RandomizedDelaySec=300
Persistent=true

[Install]
WantedBy=timers.target
"""

SERVICE = """[Unit]
Description=fleetctl drift audit of {inventory}
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
WorkingDirectory={workdir}
ExecStart={command}
# 0 clean, 2 drift, 4 unreachable, 6 both: findings, not failures of the unit.
SuccessExitStatus=2 4 6
"""
CRON_TIMES = {"hourly": "0 * * * *", "daily": "17 3 * * *", "weekly": "17 3 * * 1"}


@dataclass(frozen=True)
class TimerFiles:
    """Where ``install_timer`` wrote, and whether as the user's own systemd units (``--user``)."""

    where: Path
    names: tuple[str, ...]
    user: bool


def install_timer(inventory: str, schedule: str, *, output: str | None = None, where: str | None = None) -> TimerFiles:
    """Write the service, timer and cron line that audit *inventory* on *schedule* into Prometheus
    text at *output*: the system's units and node_exporter's textfile directory as root, else the
    user's."""
    root = os.geteuid() == 0
    where_to = Path(where or ("/etc/systemd/system" if root else "~/.config/systemd/user")).expanduser()
    output = output or ("/var/lib/node_exporter/textfile_collector/fleetctl.prom" if root
                        else str(Path("~/.local/state/fleetctl/fleetctl.prom").expanduser()))
    fleetctl = shutil.which("fleetctl")
    files = schedule_files([fleetctl] if fleetctl else [sys.executable, "-m", "fleetctl.cli"],
                           str(Path(inventory).resolve()), schedule, output, str(Path.cwd()))
    try:
        where_to.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FleetError(f"cannot write the timer to {where_to}: {exc.strerror or exc}",
                         fix="name a directory with --timer-dir") from None
    for name, text in files.items():
        records.atomic_write(where_to / name, text)
    return TimerFiles(where_to, tuple(files), user=not root)


def schedule_files(fleetctl: list[str], inventory: str, schedule: str, output: str, workdir: str) -> dict[str, str]:
    """A systemd service + timer pair, and the equivalent cron line, that run the audit on *schedule*.
    *fleetctl* is the command that runs fleetctl (its path, or python -m fleetctl.cli)."""
    argv = [*fleetctl, "audit", inventory, "--format", "prometheus", "-o", output]
    for what, value in (("schedule", schedule), ("working directory", workdir), *(("path", a) for a in argv)):
        # A crontab line, WorkingDirectory= and OnCalendar= have no escape for a newline.
        if any(ord(c) < 32 or c == "\x7f" for c in value):
            raise FleetError(f"cannot schedule the audit: the {what} {value!r} holds a control character",
                             fix="run it from, and name, paths without one")
    return {
        # Description= and WorkingDirectory= are taken as written, but for their % specifiers.
        "fleetctl-audit.service": SERVICE.format(inventory=inventory.replace("%", "%%"),
                                                 workdir=workdir.replace("%", "%%"),
                                                 command=" ".join(map(systemd.quote, argv))),
        "fleetctl-audit.timer": TIMER.format(schedule=schedule),
        "fleetctl-audit.cron": f"{CRON_TIMES.get(schedule, '17 3 * * *')} cd {_cron_word(workdir)} && "
                               f"{' '.join(map(_cron_word, argv))}\n",
    }


def _cron_word(word: str) -> str:
    """One shell word on a crontab line: cron reads an unescaped % as a newline, even in quotes."""
    return shlex.quote(word).replace("%", "\\%")

