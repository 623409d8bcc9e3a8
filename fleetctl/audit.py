"""Drift: how a host's live facts differ from what fleet.lock says was resolved and installed.

``drift(facts, locked, matrix)`` is pure: facts and a lock entry in, a list of
:class:`Drift` out. The output formats monitoring already reads (JSON, JUnit XML,
Prometheus text) and the systemd timer that runs an audit on a schedule are
rendered here too, as text. An audit only reads: it gathers facts (and, with
--validate, runs the validation kernel in the current environment).
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict, dataclass
from xml.sax.saxutils import quoteattr

from .facts import Facts
from .matrix import Matrix
from .plan import LockedHost, class_facts
from .resolve import Request, resolve

KINDS = ("unlocked", "driver", "cuda_driver", "gpus", "python", "platform", "environment", "current",
         "package", "service", "validation", "stack_outdated", "incompatible")
EXIT_DRIFT, EXIT_UNREACHABLE = 2, 4


@dataclass(frozen=True)
class Drift:
    kind: str
    detail: str


def drift(facts: Facts, locked: LockedHost | None, matrix: Matrix) -> list[Drift]:
    """Every way *facts* differ from the lock entry (pure)."""
    if locked is None:
        return [Drift("unlocked", "not in fleet.lock: run fleetctl plan --write-lock")]
    now, then = class_facts(facts), locked.facts
    out = []
    for key, kind, what in (("driver_version", "driver", "driver"), ("cuda_driver_version", "cuda_driver",
                                                                       "driver's CUDA"), ("python", "python", "Python")):
        if now[key] != then[key]:
            out.append(Drift(kind, f"{what} {then[key]} → {now[key]}"))
    if now["gpus"] != then["gpus"]:
        out.append(Drift("gpus", _gpu_change(then["gpus"], now["gpus"])))
    for key in ("os", "arch", "glibc"):
        if now[key] != then[key]:
            out.append(Drift("platform", f"{key} {_short(then[key])} → {_short(now[key])}"))
    stack = locked.stack
    if stack is None:
        return out  # the lock recorded a refusal: nothing was installed to drift from
    fleet = facts.fleet or {}
    wanted = f"{'containers' if stack.container_image else 'envs'}/{stack.id}"
    if wanted not in fleet.get("envs", []):
        out.append(Drift("environment", f"{wanted} is missing under {facts.fleet_root}"))
    if fleet.get("current") != wanted:
        out.append(Drift("current", f"current → {fleet.get('current') or 'nothing'}, locked {wanted}"))
    inst = facts.installed or {}
    if fleet.get("current") == wanted and inst:
        for name, want, got in (("torch", stack.torch, inst.get("torch")), (stack.vllm_package, stack.vllm,
                                 inst.get("vllm")), ("flashinfer-python", stack.flashinfer, inst.get("flashinfer"))):
            if want and got != want and (got or "").split("+")[0] != want:
                out.append(Drift("package", f"{name} {got} in the environment, locked {want}"))
    if fleet.get("service") == "dead":
        out.append(Drift("service", "the vLLM service is not running (its pid is gone)"))
    again = resolve(facts, Request(**locked.request), matrix)
    if not again.ok:
        out.append(Drift("incompatible", f"no stack fits any more: {again.reasons[-1]} ({again.fix})"))
    elif again.stack.id != stack.id:
        out.append(Drift("stack_outdated", f"the resolver now picks {again.stack.id} (locked {stack.id})"))
    return out


def _gpu_change(then: list, now: list) -> str:
    def names(gpus):
        return {f"{g[0]} sm {g[1]}" for g in gpus}
    gone, new = names(then) - names(now), names(now) - names(then)
    parts = [f"{len(then)} → {len(now)} GPUs"] if len(then) != len(now) else []
    parts += [f"removed {', '.join(sorted(gone))}"] if gone else []
    parts += [f"added {', '.join(sorted(new))}"] if new else []
    return "; ".join(parts) or "GPU memory or MIG mode changed"


def _short(value) -> str:
    return value.get("pretty_name") or str(value) if isinstance(value, dict) else str(value)


def exit_code(report: dict) -> int:
    """Puppet/Terraform-style: 0 clean, 2 drift, 4 unreachable hosts; the bits combine."""
    statuses = {h["status"] for h in report["hosts"].values()}
    return (EXIT_DRIFT if "drift" in statuses else 0) | (EXIT_UNREACHABLE if statuses - {"clean", "drift"} else 0)


def since(old: dict, new: dict) -> dict[str, list[str]]:
    """What changed per host between two audit snapshots ({host: facts dict})."""
    changes = {}
    for host in sorted(set(old) | set(new)):
        if host not in new or host not in old:
            changes[host] = ["host added" if host in new else "host gone"]
            continue
        a, b = class_facts(Facts.from_dict(old[host])), class_facts(Facts.from_dict(new[host]))
        lines = [f"{k}: {_short(a[k])} → {_short(b[k])}" for k in a if a[k] != b[k]]
        ia, ib = old[host].get("installed") or {}, new[host].get("installed") or {}
        lines += [f"installed {k}: {ia.get(k)} → {ib.get(k)}" for k in ("torch", "vllm", "flashinfer", "stack_id")
                  if ia.get(k) != ib.get(k)]
        if lines:
            changes[host] = lines
    return changes


# ---------------------------------------------------------------- output formats

def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)


def to_junit(report: dict) -> str:
    """One testcase per host: a failure per drift, an error where the host could not be audited."""
    hosts = report["hosts"]
    failures = sum(h["status"] == "drift" for h in hosts.values())
    errors = sum(h["status"] not in ("clean", "drift") for h in hosts.values())
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name="fleetctl-audit" tests="{len(hosts)}" failures="{failures}" errors="{errors}" '
             f'timestamp={quoteattr(report["time"])}>']
    for name, h in hosts.items():
        lines.append(f'  <testcase classname="fleet" name={quoteattr(name)}>')
        for d in h.get("drift", []):
            lines.append(f'    <failure type={quoteattr(d["kind"])} message={quoteattr(d["detail"])}/>')
        if h["status"] not in ("clean", "drift"):
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
    out += [f'fleetctl_host_audited{{host="{label(n)}"}} {int(h["status"] in ("clean", "drift"))}'
            for n, h in report["hosts"].items()]
    out += ["# HELP fleetctl_audit_last_run_timestamp_seconds When this audit ran.",
            "# TYPE fleetctl_audit_last_run_timestamp_seconds gauge",
            f"fleetctl_audit_last_run_timestamp_seconds {report['timestamp']:.0f}"]
    return "\n".join(out) + "\n"


FORMATS = {"json": to_json, "junit": to_junit, "prometheus": to_prometheus}


def report_of(run_id: str, results: dict[str, dict]) -> dict:
    return {"run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timestamp": time.time(),
            "hosts": results}


def host_result(drifts: list[Drift]) -> dict:
    return {"status": "drift" if drifts else "clean", "drift": [asdict(d) for d in drifts]}


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


def schedule_files(fleetctl: list[str], inventory: str, schedule: str, output: str, workdir: str) -> dict[str, str]:
    """A systemd service + timer pair, and the equivalent cron line, that run the audit on *schedule*.
    *fleetctl* is the command that runs fleetctl (its path, or python -m fleetctl.cli)."""
    argv = [*fleetctl, "audit", inventory, "--format", "prometheus", "-o", output]
    command = " ".join(_systemd_word(a) for a in argv)
    cron_times = {"hourly": "0 * * * *", "daily": "17 3 * * *", "weekly": "17 3 * * 1"}
    return {
        "fleetctl-audit.service": SERVICE.format(inventory=inventory, workdir=workdir.replace("%", "%%"),
                                                 command=command),
        "fleetctl-audit.timer": TIMER.format(schedule=schedule),
        "fleetctl-audit.cron": f"{cron_times.get(schedule, '17 3 * * *')} cd {shlex.quote(workdir)} && "
                               f"{' '.join(map(shlex.quote, argv))}\n",
    }


def _systemd_word(word: str) -> str:
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'
