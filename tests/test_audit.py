"""Drift audits: the pure comparison, every output format parsed by what reads it, the timer,
and end to end on lab hosts (GPU hosts with a lock written by plan; swapping their hardware)."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest

from fleetctl.apply.target import HostState
from fleetctl.decide.plan import Lock
from fleetctl.decide.resolve import Request, resolve
from fleetctl.errors import FleetError
from fleetctl.facts.probe import Facts, Gpu
from fleetctl.fleet import audit
from fleetctl.hosts.inventory import Host
from fleetctl.knowledge.matrix import load_matrix
from fleetctl.reach.connection import Result
from fleetctl.status import exit_code
from tests.conftest import exec_words, fleetctl, fleetctl_json

MATRIX = load_matrix()
H100 = Facts(gpus=(Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-0", "9.0", 81559, None, "Disabled"),),
             driver_version="580.159.04", cuda_driver_version="13.0", python={"version": "3.12.3", "path": "/p"},
             glibc="2.39", arch="x86_64", os={"id": "ubuntu", "version_id": "24.04"}, fleet_root="/opt/fleetctl",
             nvcc="13.0.88")


def locked(facts: Facts, tmp_path, request: Request | None = None):
    request = request or Request()
    lock = Lock(tmp_path / "fleet.lock")
    lock.record("h", facts, request, resolve(facts, request, MATRIX), MATRIX.digest)
    return lock.hosts["h"]


def installed(facts: Facts, entry, **changes) -> Facts:
    """*facts* of a host where the locked stack is installed and current."""
    stack = entry.stack
    env = f"envs/{stack.id}"
    data = {**facts.to_dict(), "fleet": {"current": env, "previous": None, "envs": [env], "service": None},
            "installed": {"env": f"/opt/fleetctl/{env}", "torch": stack.torch, "vllm": stack.vllm,
                          "flashinfer": stack.flashinfer, "stack_id": stack.id}}
    for key, value in changes.items():
        data[key] = value
    return Facts.from_dict(data)


def kinds(facts, entry):
    return {d.kind for d in audit.drift(facts, entry, MATRIX)}


def test_each_drift_kind(tmp_path):
    entry = locked(H100, tmp_path)
    clean = installed(H100, entry)
    assert audit.drift(clean, entry, MATRIX) == []
    assert kinds(clean, None) == {"unlocked"}
    # A driver upgrade: the driver changed, and a newer stack may now fit.
    assert "driver" in kinds(Facts.from_dict({**clean.to_dict(), "driver_version": "580.95.05"}), entry)
    # The driver rolled back to R570: CUDA 12.8, the locked CUDA 13 stack no longer fits.
    r570 = Facts.from_dict({**clean.to_dict(), "driver_version": "570.133.20", "cuda_driver_version": "12.8"})
    assert {"driver", "cuda_driver", "stack_outdated"} <= kinds(r570, entry)
    # A GPU swapped for an older model.
    v100 = Facts.from_dict({**clean.to_dict(), "gpus": [{**clean.to_dict()["gpus"][0], "name": "Tesla V100",
                                                          "compute_capability": "7.0"}]})
    drift = {d.kind: d.detail for d in audit.drift(v100, entry, MATRIX)}
    assert "added Tesla V100 sm 7.0" in drift["gpus"] and "stack_outdated" in drift
    assert "python" in kinds(Facts.from_dict({**clean.to_dict(), "python": {"version": "3.13.1", "path": "/p"}}), entry)
    # pip swapped torch under vLLM.
    swapped = Facts.from_dict({**clean.to_dict(), "installed": {**clean.to_dict()["installed"], "torch": "2.13.0"}})
    assert kinds(swapped, entry) == {"package"}
    # The current link removed, the environment deleted, the service dead.
    assert kinds(installed(H100, entry, fleet={**clean.to_dict()["fleet"], "current": None}), entry) == {"current"}
    assert kinds(installed(H100, entry, fleet={**clean.to_dict()["fleet"], "envs": [], "current": None}), entry) == {
        "environment", "current"}
    # The service: fleetctl started one (service.stack) that no longer runs (a pid gone, a unit not active).
    assert audit.service_drift(HostState(service="s 1", service_alive=True)) == []
    assert audit.service_drift(HostState(service=None)) == []
    assert [d.detail for d in audit.service_drift(HostState(service="s 1"))] == [
        "the vLLM service is not running (its pid is gone)"]
    assert "fleetctl-vllm.service is not active" in audit.service_drift(HostState(service="s 1", systemd=True))[0].detail
    # A host whose driver fell below anything: incompatible.
    old = Facts.from_dict({**clean.to_dict(), "driver_version": "470.182.03", "cuda_driver_version": "11.4"})
    assert "incompatible" in kinds(old, entry)


def sample_report():
    return audit.report_of("audit-x", {
        "a": audit.host_result([]),
        'b"odd': audit.host_result([audit.Drift("driver", "driver 580 → 570 <&>")]),
        "c": {"status": "unreachable", "error": "cannot reach 10.0.0.3:22"},
    })


def audit_exit(report: dict) -> int:
    return exit_code((h["status"] for h in report["hosts"].values()), combine=True)


def test_exit_codes_combine():
    assert audit_exit(audit.report_of("x", {"a": audit.host_result([])})) == 0
    assert audit_exit(audit.report_of("x", {"a": audit.host_result([audit.Drift("driver", "d")])})) == 2
    assert audit_exit(sample_report()) == 6
    # A host the audit could not read, however it failed, is 4: drift is a finding about hosts that answered.
    assert audit_exit(audit.report_of("x", {"a": {"status": "timeout", "error": "x"}})) == 4
    assert audit_exit(audit.report_of("x", {"a": {"status": "failed", "error": "x"}})) == 4


def test_formats_parse():
    report = sample_report()
    assert json.loads(audit.to_json(report))["hosts"]["a"]["status"] == "clean"
    suite = ET.fromstring(audit.to_junit(report))
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    failure = suite.find("testcase[@name='b\"odd']/failure")
    assert failure.get("type") == "driver" and failure.get("message") == "driver 580 → 570 <&>"
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(audit.to_prometheus(report))}
    drift = {(s.labels["host"], s.labels["kind"]): s.value for s in families["fleetctl_drift"].samples}
    assert drift[('b"odd', "driver")] == 1 and drift[("a", "driver")] == 0 and len(drift) == 3 * len(audit.KINDS)
    assert {s.labels["host"]: s.value for s in families["fleetctl_host_audited"].samples}["c"] == 0
    assert families["fleetctl_audit_last_run_timestamp_seconds"].samples[0].value > 1.7e9


def test_timer_files(tmp_path):
    files = audit.schedule_files(["/usr/local/bin/fleetctl"], "/srv/fleet/inventory.yml", "daily",
                                 "/var/lib/node_exporter/textfile_collector/fleetctl.prom", "/srv/fleet")
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string(files["fleetctl-audit.service"])
    assert exec_words(service["Service"]["ExecStart"]) == [
        "/usr/local/bin/fleetctl", "audit", "/srv/fleet/inventory.yml", "--format", "prometheus", "-o",
        "/var/lib/node_exporter/textfile_collector/fleetctl.prom"]
    assert service["Service"]["SuccessExitStatus"] == "2 4 6"
    assert "OnCalendar=daily" in files["fleetctl-audit.timer"]
    assert files["fleetctl-audit.cron"].startswith("17 3 * * * cd /srv/fleet && /usr/local/bin/fleetctl audit")
    verify(tmp_path, files)


def verify(tmp_path, files: dict[str, str]) -> None:
    """systemd-analyze's verdict on the service and timer, fleetctl's path swapped for /bin/true."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed here")
    for name, text in files.items():
        if name.endswith((".service", ".timer")):
            (tmp_path / name).write_text(text.replace("/usr/local/bin/fleetctl", "/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no",
                           str(tmp_path / "fleetctl-audit.service"), str(tmp_path / "fleetctl-audit.timer")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fleetctl-audit.service:" not in proc.stderr, proc.stderr  # a bad escape is a warning naming its line


def test_timer_files_quote_awkward_paths(tmp_path):
    fleet = "/srv/my \"odd\" fleet's 100%n ${HOME}"
    files = audit.schedule_files(["/usr/local/bin/fleetctl"], f"{fleet}/inventory.yml", "daily", f"{fleet}/a.prom",
                                 "/srv/100%h dir")
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string(files["fleetctl-audit.service"])
    words = exec_words(service["Service"]["ExecStart"])
    assert words[2] == f"{fleet}/inventory.yml" and words[-1] == f"{fleet}/a.prom"
    assert service["Service"]["WorkingDirectory"] == "/srv/100%%h dir"
    # cron hands the line after its time fields to sh, each unescaped % made a newline, each \\% a %.
    command = files["fleetctl-audit.cron"].split(" ", 5)[5].rstrip("\n")
    assert re.search(r"(?<!\\)%", command) is None
    assert shlex.split(command.replace("\\%", "%")) == [
        "cd", "/srv/100%h dir", "&&", "/usr/local/bin/fleetctl", "audit", f"{fleet}/inventory.yml", "--format",
        "prometheus", "-o", f"{fleet}/a.prom"]
    verify(tmp_path, files)


def test_timer_refuses_what_no_unit_or_crontab_line_can_hold():
    with pytest.raises(FleetError, match="control character"):
        audit.schedule_files(["/usr/local/bin/fleetctl"], "/srv/fleet\n/inventory.yml", "daily", "/a.prom", "/srv")


def test_install_timer_from_the_cli_refuses_a_newline_in_the_inventory_path(tmp_path):
    inventory = tmp_path / "fleet\nExecStartPre=/bin/touch /tmp/pwned\n" / "inv.yml"
    inventory.parent.mkdir(parents=True)
    inventory.write_text("all:\n  hosts:\n    h1:\n      ansible_host: 192.0.2.1\n")
    proc = fleetctl("audit", inventory, "--install-timer", "daily", "--timer-dir", tmp_path / "units")
    assert proc.returncode == 1 and "control character" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "units").exists() or not any((tmp_path / "units").iterdir())
    odd = tmp_path / "100%d" / "inv.yml"  # % in the cron line: escaped, or cron cuts the line there
    odd.parent.mkdir()
    odd.write_text(inventory.read_text())
    assert fleetctl("audit", odd, "--install-timer", "daily", "--timer-dir", tmp_path / "units").returncode == 0
    cron = (tmp_path / "units" / "fleetctl-audit.cron").read_text()
    assert "100\\%d" in cron and re.search(r"(?<!\\)%", cron) is None


class Recorded:
    """A connection that records what it is asked to run, and answers with a passing verdict."""

    def __init__(self):
        self.commands = []

    def run(self, command: str, *, timeout: float, stdin: str | None = None) -> Result:
        self.commands.append(command)
        return Result("h", command, 0, '{"verdict": "pass"}\n', "", 0.1)


class Deadline:
    def left(self, host: str = "") -> float:
        return 60.0


@pytest.mark.parametrize("sampler, current, flag", [(None, True, "--flashinfer"), ("0", True, "--no-flashinfer"),
                                                    (None, False, "--no-flashinfer")])
def test_validate_proves_flashinfer_where_the_locked_stack_uses_it(tmp_path, sampler, current, flag):
    entry = locked(H100, tmp_path)
    if sampler:  # the resolver's way of saying FlashInfer is not used: its sampler is off
        entry = replace(entry, stack=replace(entry.stack, env={**entry.stack.env, "VLLM_USE_FLASHINFER_SAMPLER": sampler}))
    facts = installed(H100, entry)
    if not current:  # the environment is not the locked stack's: what it runs, the lock does not say
        facts = Facts.from_dict({**facts.to_dict(), "installed": {**facts.to_dict()["installed"], "stack_id": "other"}})
    conn = Recorded()
    verdict = audit._validate(Host("h"), conn, Deadline(), facts, entry)
    assert verdict == {"verdict": "pass"}
    assert flag in conn.commands[0].split() and "--expect-cc 9.0" in conn.commands[0]


def test_audit_the_lab_gpu_hosts(small_lab, tmp_path):
    lab = small_lab(("h100", "h100-sxm-80gb", {}), ("b200", "b200", {}), ("down", "t4", {}), net=81)
    inventory = lab.write_inventory(tmp_path / "inv.yml")
    assert fleetctl("plan", inventory, "--write-lock", "--limit", "h100,b200").returncode == 0
    lab.hosts["down"].kill()
    code, out = fleetctl_json("audit", inventory)
    hosts = out["hosts"]
    assert hosts["down"]["status"] == "unreachable"
    # Planned but never provisioned: the environment and current link are missing; nothing else drifted.
    assert {d["kind"] for d in hosts["h100"]["drift"]} == {"environment", "current"}
    assert code == 6
    first = out["run_id"]

    lab.hosts["h100"].set_hardware("a100-sxm4-80gb")  # new GPUs on an R570 driver
    proc = fleetctl("audit", inventory, "--limit", "h100,b200", "--format", "prometheus", "-o", tmp_path / "a.prom")
    assert proc.returncode == 2
    prom = (tmp_path / "a.prom").read_text()
    assert 'fleetctl_drift{host="h100",kind="gpus"} 1' in prom and 'fleetctl_drift{host="b200",kind="gpus"} 0' in prom
    assert 'fleetctl_drift{host="h100",kind="driver"} 1' in prom
    assert 'fleetctl_drift{host="h100",kind="stack_outdated"} 1' in prom

    code, out = fleetctl_json("audit", inventory, "--limit", "h100", "--since", first)
    assert any("driver_version: 580.159.04 → 570.133.20" in line for line in out["since"]["changes"]["h100"])
    junit = fleetctl("audit", inventory, "--limit", "h100", "--format", "junit")
    assert ET.fromstring(junit.stdout).find("testcase").get("name") == "h100"
    table = fleetctl("audit", inventory, "--limit", "h100,b200")
    assert "gpus: " in table.stdout and "driver: " in table.stdout and "clean" not in table.stdout


def test_no_lock_is_one_line(tmp_path):
    inventory = tmp_path / "inv.yml"
    inventory.write_text("all:\n  hosts:\n    h1:\n      ansible_host: 192.0.2.1\n")  # never contacted
    proc = fleetctl("audit", inventory, "--lock", tmp_path / "missing.lock")
    assert proc.returncode == 1 and "no lock file" in proc.stderr and "plan" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_serving_container_drifts_when_stopped_gone_another_stack_or_its_image_changed():
    """The probe's container lines (as a CI machine's docker answers them) → facts → drift."""
    from fleetctl.facts.probe import FleetState, parse_fleet_state
    old, new = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    line = f"container=fleetctl-vllm running {old} fleetctl/vllm-cpu:s1 s1"
    state = parse_fleet_state(f"current=containers/s1\n{line}\ncontainer_image_now={old}\n")
    assert state.container == f"fleetctl-vllm running {old} fleetctl/vllm-cpu:s1 s1"
    assert audit.container_drift(state, "s1") == []
    assert audit.container_drift(FleetState(), "s1") == []  # venv mode: no container to read

    def kinds(text: str, stack: str = "s1") -> list[tuple[str, str]]:
        return [(d.kind, d.detail) for d in audit.container_drift(parse_fleet_state(text), stack)]

    assert kinds(f"{line.replace('running', 'exited')}\ncontainer_image_now={old}") == [
        ("service", "container fleetctl-vllm is exited, not running")]
    assert kinds("container=fleetctl-vllm missing") == [("service", "container fleetctl-vllm is gone")]
    assert kinds(f"{line}\ncontainer_image_now={old}", stack="s2") == [
        ("service", "container fleetctl-vllm runs s1, locked s2")]
    assert kinds(f"{line}\ncontainer_image_now={new}") == [
        ("environment", f"image fleetctl/vllm-cpu:s1 changed: the tag names {new[:19]}, container fleetctl-vllm "
                        f"runs {old[:19]}")]
    assert kinds(f"{line}\ncontainer_image_now=") == [
        ("environment", f"image fleetctl/vllm-cpu:s1 is gone from the engine (container fleetctl-vllm runs {old[:19]})")]


def test_each_hosts_baseline_is_the_latest_audit_that_saw_it(tmp_path, monkeypatch):
    """Health drift compares with the last audit of *that* host: a later audit of other hosts (--limit),
    or two records of one second whose names sort the other way, is no host's baseline."""
    import os
    from fleetctl.fleet.audit import last_audit_facts
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    audits = tmp_path / "fleetctl" / "audits"
    audits.mkdir(parents=True)
    for name, facts, when in (("audit-1-b.json", {"h100": {"n": 1}, "a100": {"n": 1}}, 1),
                              ("audit-1-a.json", {"a100": {"n": 2}}, 2)):
        (audits / name).write_text(json.dumps({"facts": facts}))
        os.utime(audits / name, ns=(when * 10**9, when * 10**9))
    (audits / "audit-0-broken.json").write_text("{not json")
    assert last_audit_facts() == {"h100": {"n": 1}, "a100": {"n": 2}}
