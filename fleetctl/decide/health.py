"""GPU health verdicts: a host's health facts in, healthy / degraded / unhealthy out, per GPU and
for the host, each finding with NVIDIA's documented action as its reason.

Pure: the facts come from the probe (:class:`fleetctl.facts.probe.Health`); what each fact means, the
verdict it gives, the action and its sources are data (``health.yaml``); the checks are the
functions below, one per rule name there. A host is as sick as its sickest GPU or host check.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from fleetctl.facts.probe import Facts, GpuHealth, Health

HEALTHY, DEGRADED, UNHEALTHY, UNKNOWN = "healthy", "degraded", "unhealthy", "unknown"
RANK = {HEALTHY: 0, UNKNOWN: 1, DEGRADED: 2, UNHEALTHY: 3}
HW_SLOWDOWN = 0x8 | 0x40 | 0x80  # nvmlClocksEventReasons: HwSlowdown, HwThermalSlowdown, HwPowerBrakeSlowdown


@dataclass(frozen=True)
class Rules:
    sources: dict
    actions: dict
    gpu: dict
    host: dict
    xids: dict
    xid_verdicts: dict
    allreduce: dict


@lru_cache(maxsize=1)
def load_rules() -> Rules:
    data = yaml.safe_load(resources.files("fleetctl.knowledge").joinpath("health.yaml").read_text())
    return Rules(data["sources"], data["actions"], data["gpu"], data["host"],
                 {int(k): v for k, v in data["xids"].items()}, data["xid_verdicts"], data["allreduce"])


@dataclass(frozen=True)
class Allreduce:
    """What validate's all-reduce over a host's GPUs must reach: the model's figure less the slack."""

    ranks: int
    expected_gbps: float | None  # None: a model health.yaml has no figure for (measured, not judged)
    min_gbps: float | None
    reason: str


def allreduce_floor(gpu_names: list[str]) -> Allreduce | None:
    """The all-reduce a host of these GPUs gets at validate; None on a host of fewer than two GPUs."""
    if len(gpu_names) < 2:
        return None
    table = load_rules().allreduce
    models = set(gpu_names)
    row = next((r for r in table["busbw_gbps"] if len(models) == 1 and r["match"] in gpu_names[0]), None)
    if row is None:
        why = "GPUs of several models" if len(models) > 1 else f"no expected figure for {gpu_names[0]}"
        return Allreduce(len(gpu_names), None, None, f"all-reduce over {len(gpu_names)} GPUs measured, not judged ({why})")
    floor = round(row["gbps"] * (1 - table["slack"]), 1)
    return Allreduce(len(gpu_names), row["gbps"], floor,
                     f"all-reduce over {len(gpu_names)} GPUs must reach {floor} GB/s bus bandwidth "
                     f"({row['gbps']} GB/s expected of {row['match']} over {row['interconnect']}, "
                     f"less {table['slack']:.0%}; sources: {', '.join(row['sources'])})")


@dataclass(frozen=True)
class Finding:
    check: str
    verdict: str
    action: str
    reason: str  # one line: what is wrong and what to do
    gpu: int | None = None  # None: the host
    sources: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"gpu": self.gpu, "check": self.check, "verdict": self.verdict, "action": self.action,
                "reason": self.reason, "sources": list(self.sources)}


@dataclass(frozen=True)
class Verdict:
    """A host's health: its status, each GPU's, what was found, and what could not be read."""

    status: str
    gpus: dict  # {index: status}
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()  # what was not read, and why

    @property
    def unhealthy(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.verdict == UNHEALTHY)

    def summary(self) -> str:
        """The worst findings in one line, e.g. "GPU 0: a memory row is waiting to be remapped: reset the GPU …"."""
        worst = [f for f in self.findings if f.verdict == self.status] or list(self.findings)
        return "; ".join(f.reason for f in worst) or self.status

    def to_json(self) -> dict:
        return {"status": self.status, "gpus": {str(k): v for k, v in self.gpus.items()},
                "findings": [f.to_json() for f in self.findings], "notes": list(self.notes)}


def worst(statuses) -> str:
    return max(statuses, key=RANK.__getitem__, default=HEALTHY)


def _finding(rules: Rules, table: dict, check: str, gpu: int | None, detail: str = "") -> Finding:
    rule = table[check]
    where = f"GPU {gpu}: " if gpu is not None else ""
    action = rules.actions[rule["action"]]
    return Finding(check, rule["verdict"], rule["action"], f"{where}{rule['says']}{detail}: {rule['action']}, {action}",
                   gpu, tuple(rule["sources"]))


def gpu_checks(g: GpuHealth) -> list[tuple[str, str]]:
    """(rule name, detail) of each rule *g*'s facts break."""
    broken = []
    if g.remapped_rows_failure:
        broken.append(("remapped_rows_failure", ""))
    if g.remapped_rows_pending:
        broken.append(("remapped_rows_pending", ""))
    if g.retired_pages_pending:
        broken.append(("retired_pages_pending", ""))
    if g.ecc_uncorrected_volatile:
        broken.append(("ecc_uncorrected_volatile", f" ({g.ecc_uncorrected_volatile})"))
    if g.ecc_mode == "Disabled":
        broken.append(("ecc_disabled", ""))
    if g.clock_event_reasons is not None and g.clock_event_reasons & HW_SLOWDOWN:
        broken.append(("hw_slowdown", f" (reasons {g.clock_event_reasons:#x})"))
    # The width only: the link's generation drops at idle to save power, its width does not.
    if g.pcie_width and g.pcie_width_max and g.pcie_width < g.pcie_width_max:
        broken.append(("pcie_width", f" (x{g.pcie_width} of x{g.pcie_width_max}, gen {g.pcie_gen} of {g.pcie_gen_max})"))
    down = [i for i, up in enumerate(g.nvlinks) if not up]
    if down:
        broken.append(("nvlink_down", f" (link {', '.join(map(str, down))} of {len(g.nvlinks)})"))
    if g.persistence_mode == "Disabled":
        broken.append(("persistence_off", ""))
    if g.fabric_state is not None and (g.fabric_state != "completed" or (g.fabric_status or "success") != "success"):
        broken.append(("fabric_incomplete", f" (state {g.fabric_state}, status {g.fabric_status})"))
    return broken


def host_checks(health: Health, driver: str | None) -> list[tuple[str, str]]:
    """The NVSwitch host's fabric manager against its driver."""
    if not health.nvswitch:
        return []
    fm = health.fabric_manager
    if fm is None or fm.package is None:
        return [("fabric_manager_missing", f" (install nvidia-fabricmanager {driver or 'at the driver version'})")]
    broken = []
    if driver and fm.version != driver:
        broken.append(("fabric_manager_version",
                       f" ({fm.package} {fm.version}, driver {driver}: install nvidia-fabricmanager-{driver.split('.')[0]} {driver})"))
    if fm.service is not None and fm.service != "active":
        broken.append(("fabric_manager_stopped", f" (systemctl is-active: {fm.service})"))
    return broken


def xid_findings(rules: Rules, health: Health) -> list[Finding]:
    """One finding per (GPU, Xid) seen since boot, by the catalog's immediate action."""
    seen: dict[tuple, int] = {}
    for event in health.xids:
        seen[(event.gpu, event.xid, event.pci)] = seen.get((event.gpu, event.xid, event.pci), 0) + 1
    out = []
    for (gpu, xid, pci), count in seen.items():
        row = rules.xids.get(xid)
        where = f"GPU {gpu}" if gpu is not None else f"PCI {pci}"
        times = f" ×{count}" if count > 1 else ""
        if row is None:
            out.append(Finding("xid", DEGRADED, "LOOK_UP", f"{where}: Xid {xid}{times} since boot: not in fleetctl's "
                               "table, look it up in NVIDIA's Xid catalog", gpu, ("xid-catalog",)))
            continue
        action = row["action"]
        out.append(Finding("xid", rules.xid_verdicts.get(action, DEGRADED), action,
                           f"{where}: Xid {xid}{times} since boot ({row['name']}): {action}, {rules.actions[action]}",
                           gpu, ("xid-catalog",)))
    return out


def judge(facts: Facts) -> Verdict:
    """*facts*' health verdict. A host without GPUs is healthy; one whose health facts are missing is unknown."""
    rules = load_rules()
    health = facts.health
    if not facts.gpus:
        return Verdict(HEALTHY, {}, notes=("no GPUs",))
    if health is None or not health.gpus:
        return Verdict(UNKNOWN, {g.index: UNKNOWN for g in facts.gpus},
                       notes=(f"no health facts from {facts.gpu_source or 'the host'}",))
    # The host's own findings first: a fabric manager at the wrong version is why every GPU's fabric is not completed.
    findings = [_finding(rules, rules.host, check, None, detail) for check, detail in host_checks(health, facts.driver_version)]
    findings += [_finding(rules, rules.gpu, check, g.index, detail) for g in health.gpus for check, detail in gpu_checks(g)]
    findings += xid_findings(rules, health)
    known = {g.index for g in health.gpus}
    gpus = {g.index: worst(f.verdict for f in findings if f.gpu == g.index) if g.index in known else UNKNOWN
            for g in facts.gpus}
    notes = () if health.kernel_log == "read" else (f"kernel log {health.kernel_log}",)
    status = worst([*gpus.values(), *(f.verdict for f in findings)])
    return Verdict(status, gpus, tuple(findings), notes)


# ---------------------------------------------------------------- reports

def host_report(facts: Facts) -> dict:
    """One host's entry in `fleetctl health --json` (and what audit keeps to compare next time)."""
    v = judge(facts)
    health = facts.to_dict()["health"]
    gpus = [{"index": g.index, "name": g.name, "uuid": g.uuid, "pci_bus_id": g.pci_bus_id} for g in facts.gpus]
    return {"status": v.status, "summary": v.summary(), "verdict": v.to_json(), "gpus": gpus,
            "driver": facts.driver_version, "facts": health}


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


GPU_SERIES = (  # (metric, help, value from a GpuHealth's JSON form)
    ("fleetctl_gpu_ecc_uncorrected_volatile", "Uncorrectable ECC errors since the driver loaded.",
     lambda g: g["ecc_uncorrected_volatile"]),
    ("fleetctl_gpu_ecc_uncorrected_aggregate", "Uncorrectable ECC errors over the GPU's life.",
     lambda g: g["ecc_uncorrected_aggregate"]),
    ("fleetctl_gpu_remapped_rows_pending", "1 if a memory row waits for a GPU reset to be remapped.",
     lambda g: g["remapped_rows_pending"]),
    ("fleetctl_gpu_remapped_rows_failure", "1 if row remapping failed.", lambda g: g["remapped_rows_failure"]),
    ("fleetctl_gpu_pcie_link_width", "The PCIe link's width now.", lambda g: g["pcie_width"]),
    ("fleetctl_gpu_pcie_link_width_max", "The PCIe link's maximum width.", lambda g: g["pcie_width_max"]),
    ("fleetctl_gpu_nvlinks_down", "NVLinks down.", lambda g: sum(not up for up in g["nvlinks"])),
    ("fleetctl_gpu_clock_event_reasons", "NVML's clock event reasons bitmask.", lambda g: g["clock_event_reasons"]),
)


def to_prometheus(report: dict) -> str:
    """Node exporter textfile format: each host's and GPU's health as a state set, the per-GPU
    counters it was judged on, Xid events since boot."""
    out = ["# HELP fleetctl_host_health 1 for the host's health verdict (healthy, degraded, unhealthy, unknown).",
           "# TYPE fleetctl_host_health gauge"]
    for name, h in report["hosts"].items():
        if "verdict" in h:
            out += [f'fleetctl_host_health{{host="{_label(name)}",status="{s}"}} {int(h["status"] == s)}' for s in RANK]
    out += ["# HELP fleetctl_gpu_health 1 for the GPU's health verdict.", "# TYPE fleetctl_gpu_health gauge"]
    series: dict[str, list[str]] = {m: [] for m, _, _ in GPU_SERIES}
    xids = []
    for name, h in report["hosts"].items():
        if "verdict" not in h:
            continue
        uuids = {g["index"]: g["uuid"] for g in h["gpus"]}
        for index, status in h["verdict"]["gpus"].items():
            labels = f'host="{_label(name)}",gpu="{index}",uuid="{_label(uuids.get(int(index), ""))}"'
            out += [f'fleetctl_gpu_health{{{labels},status="{s}"}} {int(status == s)}' for s in RANK]
        for g in (h["facts"] or {}).get("gpus", []):
            labels = f'host="{_label(name)}",gpu="{g["index"]}",uuid="{_label(uuids.get(g["index"], ""))}"'
            for metric, _, value in GPU_SERIES:
                if value(g) is not None:
                    series[metric].append(f"{metric}{{{labels}}} {int(value(g))}")
        counts: dict[tuple, int] = {}
        for x in (h["facts"] or {}).get("xids", []):
            counts[(x["gpu"], x["xid"])] = counts.get((x["gpu"], x["xid"]), 0) + 1
        xids += [f'fleetctl_gpu_xid_events{{host="{_label(name)}",gpu="{"" if gpu is None else gpu}",xid="{xid}"}} {n}'
                 for (gpu, xid), n in counts.items()]
    for metric, text, _ in GPU_SERIES:
        out += [f"# HELP {metric} {text}", f"# TYPE {metric} gauge", *series[metric]]
    out += ["# HELP fleetctl_gpu_xid_events Xid events in the kernel log since boot.",
            "# TYPE fleetctl_gpu_xid_events gauge", *xids]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- drift between audits

def _xid_counts(health: Health | None) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for x in health.xids if health else ():
        counts[(x.gpu, x.pci, x.xid)] = counts.get((x.gpu, x.pci, x.xid), 0) + 1
    return counts


def health_drift(now: Facts, before: Facts | None) -> list[tuple[str, str]]:
    """(kind, detail) of how *now*'s GPU health drifted: each unhealthy finding ("health"), and since
    the audit that read *before*: Xid events new in the kernel log ("xid"; a reboot empties the log, so
    fewer is no drift) and uncorrectable ECC counts that rose ("ecc") (pure)."""
    out = [("health", f.reason) for f in judge(now).unhealthy]
    if before is None or before.health is None or now.health is None:
        return out
    old = _xid_counts(before.health)
    for (gpu, pci, xid), n in _xid_counts(now.health).items():
        if n > old.get((gpu, pci, xid), 0):
            where = f"GPU {gpu}" if gpu is not None else f"PCI {pci}"
            out.append(("xid", f"{where}: Xid {xid} ×{n - old.get((gpu, pci, xid), 0)} new since the last audit"))
    then = {g.index: g for g in before.health.gpus}
    for g in now.health.gpus:
        was = then.get(g.index)
        if was and (was.ecc_uncorrected_aggregate or 0) < (g.ecc_uncorrected_aggregate or 0):
            out.append(("ecc", f"GPU {g.index}: uncorrectable ECC errors {was.ecc_uncorrected_aggregate} → "
                               f"{g.ecc_uncorrected_aggregate} (aggregate) since the last audit"))
    return out
