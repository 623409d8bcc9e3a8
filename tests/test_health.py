"""GPU health: the parsers on the real H100 captures, sick values derived one field at a time, the verdicts."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.decide.health import DEGRADED, HEALTHY, UNHEALTHY, UNKNOWN, judge, load_rules
from fleetctl.facts.probe import (HEALTH_FIELDS, HEALTH_FIELDS_OLD, Facts, FabricManager, Gpu, Health, parse_fabric_manager,
                            parse_health_query, parse_kernel_log, parse_nvlink_status, parse_nvml_health, parse_probe)
from tests.lab.profiles import derive_health_csv, nvlink_status, xid_line

H100 = Path(__file__).parent / "data" / "health" / "h100-sxm-2026-12"
CSV = (H100 / "health.csv").read_text()
NVML = (H100 / "nvml.json").read_text()
DRIVER = "580.159.04"


def capture(path: Path) -> dict[str, str]:
    """query-fields.txt: ``field: value`` per line, one nvidia-smi call each."""
    return dict(line.strip().split(": ", 1) for line in path.read_text().splitlines() if ": " in line)


def facts_with(health: Health, gpus: int = 1, driver: str = DRIVER) -> Facts:
    return Facts(gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}", "9.0", 81559, None) for i in range(gpus)),
                 driver_version=driver, health=health)


def csv_health(text: str = CSV, nvlink: str = "", kernel: str = "read=yes", fm: str = "") -> Health:
    gpus = parse_health_query(text, nvlink)
    log, xids = parse_kernel_log(kernel, gpus)
    return Health(gpus=gpus, source="nvidia-smi", fabric_manager=parse_fabric_manager(fm), kernel_log=log, xids=xids)


# ---------------------------------------------------------------- the captures

def test_assembled_csv_holds_the_captured_values_in_the_probes_field_order():
    fields = capture(H100 / "query-fields.txt")
    header, row = CSV.strip().splitlines()
    assert header.split(", ") == HEALTH_FIELDS.split(",")
    for name, value in zip(header.split(", "), row.split(", ")):
        if name == "pci.bus_id":
            assert f"GPU {value}" in (H100 / "q-remap.txt").read_text()
        elif name == "ecc.mode.current":  # not among query-fields.txt's: `-q -d ECC` says it
            assert re.search(rf"ECC Mode\n\s+Current\s+: {value}\n", (H100 / "q-ecc.txt").read_text())
        elif name != "index":
            assert fields[name] == value, name


def test_the_h100_capture_parses_healthy_through_nvidia_smi():
    (g,) = parse_health_query(CSV)
    assert (g.index, g.pci_bus_id, g.ecc_mode, g.ecc_uncorrected_volatile, g.ecc_uncorrected_aggregate) == \
        (0, "00000000:00:06.0", "Enabled", 0, 0)
    assert (g.retired_pages_pending, g.remapped_rows_pending, g.remapped_rows_failure) == (None, False, False)
    assert (g.clock_event_reasons, g.pcie_gen, g.pcie_gen_max, g.pcie_width, g.pcie_width_max) == (1, 5, 5, 16, 16)
    assert (g.persistence_mode, g.fabric_state, g.fabric_status, g.nvlinks) == ("Enabled", None, None, ())


def test_the_h100_capture_parses_the_same_through_nvml():
    assert parse_nvml_health(NVML) == parse_health_query(CSV)


def test_nvml_json_holds_the_captured_nvml_answers():
    said = dict(re.match(r"(\w+) ([=!]) (.*)", line).group(1, 3) for line in (H100 / "pyenv.txt").read_text().splitlines()
                if re.match(r"\w+ [=!] ", line))
    h = json.loads(NVML)["gpus"][0]["health"]
    assert said["remapped_rows"] == str(tuple(h["remapped_rows"]))
    assert [int(said["ecc_uncorr_volatile"]), int(said["ecc_uncorr_aggregate"])] == h["ecc_uncorrected"]
    assert int(said["throttle"], 16) == h["clock_event_reasons"]
    assert said["pcie_gen"] == str(tuple(h["pcie"][:2])) and said["pcie_width"] == str(tuple(h["pcie"][2:]))
    assert int(said["persistence"]) == h["persistence"]
    assert "NotSupported" in said["retired_pending"] and h["retired_pages_pending"] is None
    assert "NotSupported" in said["nvlink0"] and h["nvlink"] == []


def test_the_captured_kernel_log_has_no_xid_and_the_host_no_fabric_manager():
    log = (H100 / "dmesg-xid.txt").read_text()
    assert parse_kernel_log("read=yes\n" + log) == ("read", ())
    assert parse_nvlink_status((H100 / "nvlink-status.txt").read_text()) == {}
    assert "nv-fabricmanager': No such file" in (H100 / "fabric.txt").read_text()
    assert parse_fabric_manager("service=\n") is None


def test_the_h100_capture_is_healthy():
    v = judge(facts_with(csv_health()))
    assert (v.status, v.gpus, v.findings, v.notes) == (HEALTHY, {0: HEALTHY}, (), ())


def test_an_older_driver_answers_the_query_without_the_newer_fields():
    refused = 'Field "fabric.state" is not a valid field to query.\n\n'
    old = "\n".join(", ".join(line.split(", ")[:12]) for line in CSV.strip().splitlines())
    assert old.splitlines()[0].split(", ") == HEALTH_FIELDS_OLD.split(",")
    (g,) = parse_health_query(refused + old)
    assert (g.remapped_rows_pending, g.fabric_state, g.pcie_width) == (None, None, 16)


def test_a_query_that_failed_twice_gives_no_health_and_an_unknown_verdict():
    health = csv_health('Field "ecc.mode.current" is not a valid field to query.\n')
    assert health.gpus == ()
    assert judge(facts_with(health)).status == UNKNOWN


# ---------------------------------------------------------------- sick, one field at a time

SICK = [
    ({"remapped_rows.pending": "Yes"}, "remapped_rows_pending", UNHEALTHY, "RESET_GPU"),
    ({"remapped_rows.failure": "Yes"}, "remapped_rows_failure", UNHEALTHY, "RMA"),
    ({"retired_pages.pending": "Yes"}, "retired_pages_pending", UNHEALTHY, "RESET_GPU"),
    ({"ecc.errors.uncorrected.volatile.total": "2"}, "ecc_uncorrected_volatile", UNHEALTHY, "RESET_GPU"),
    ({"ecc.mode.current": "Disabled"}, "ecc_disabled", DEGRADED, "ENABLE_ECC"),
    ({"clocks_throttle_reasons.active": "0x0000000000000040"}, "hw_slowdown", DEGRADED, "CHECK_COOLING_POWER"),
    ({"clocks_throttle_reasons.active": "0x0000000000000080"}, "hw_slowdown", DEGRADED, "CHECK_COOLING_POWER"),
    ({"pcie.link.width.current": "8"}, "pcie_width", UNHEALTHY, "CHECK_MECHANICALS"),
    ({"persistence_mode": "Disabled"}, "persistence_off", DEGRADED, "ENABLE_PERSISTENCE"),
    ({"fabric.state": "In Progress", "fabric.status": "N/A"}, "fabric_incomplete", UNHEALTHY, "START_FABRIC_MANAGER"),
]


@pytest.mark.parametrize("changes,check,verdict,action", SICK, ids=[s[1] + str(i) for i, s in enumerate(SICK)])
def test_each_sick_field_alone_gives_its_verdict_and_action(changes, check, verdict, action):
    v = judge(facts_with(csv_health(derive_health_csv(CSV, changes)),))
    checks = [f for f in v.findings if f.check != "fabric_manager_missing"]
    assert [(f.check, f.verdict, f.action, f.gpu) for f in checks] == [(check, verdict, action, 0)]
    assert v.gpus == {0: verdict} and v.status == worst_of(v)
    assert checks[0].reason.startswith("GPU 0: ") and action in checks[0].reason
    assert set(checks[0].sources) <= set(load_rules().sources)


def worst_of(v):
    return max((f.verdict for f in v.findings), key=[HEALTHY, UNKNOWN, DEGRADED, UNHEALTHY].index)


def test_the_idle_pcie_generation_drop_is_not_a_finding():
    v = judge(facts_with(csv_health(derive_health_csv(CSV, {"pcie.link.gen.current": "1"}))))
    assert v.status == HEALTHY


def test_pcie_x8_of_x16_names_the_gpu_and_the_widths():
    (f,) = judge(facts_with(csv_health(derive_health_csv(CSV, {"pcie.link.width.current": "8"})))).findings
    assert "x8 of x16" in f.reason and "reseat" in f.reason


# ---------------------------------------------------------------- NVSwitch hosts

def nvswitch_csv(gpus: int = 8) -> str:
    """The H100 capture's row for each of *gpus* GPUs on an NVSwitch system: bus ids and fabric derived."""
    header, row = CSV.strip().splitlines()
    rows = [row.replace("0, 00000000:00:06.0", f"{i}, 00000000:{0x18 + 0x10 * i:02X}:00.0", 1) for i in range(gpus)]
    return derive_health_csv("\n".join([header, *rows]), {"fabric.state": "Completed", "fabric.status": "Success"})


FM_OK = f"package=nvidia-fabricmanager-580 {DRIVER}-0ubuntu1 install ok installed\nservice=active\n"


def test_an_nvswitch_host_with_its_fabric_manager_at_the_drivers_version_is_healthy():
    health = csv_health(nvswitch_csv(), nvlink_status(8), fm=FM_OK)
    assert health.nvswitch and health.fabric_manager == FabricManager("nvidia-fabricmanager-580", DRIVER, "active")
    assert all(g.nvlinks == (True,) * 18 for g in health.gpus)
    assert judge(facts_with(health, gpus=8)).status == HEALTHY


def test_fabric_manager_at_another_version_than_the_driver_asks_for_the_drivers():
    fm = FM_OK.replace(DRIVER, "580.95.05")
    (f,) = judge(facts_with(csv_health(nvswitch_csv(), nvlink_status(8), fm=fm), gpus=8)).findings
    assert (f.check, f.verdict, f.action, f.gpu) == ("fabric_manager_version", UNHEALTHY, "INSTALL_FABRIC_MANAGER", None)
    assert f"nvidia-fabricmanager-580 {DRIVER}" in f.reason and "580.95.05" in f.reason


def test_an_nvswitch_host_without_fabric_manager_or_with_it_stopped():
    missing = judge(facts_with(csv_health(nvswitch_csv(), nvlink_status(8)), gpus=8))
    assert [f.check for f in missing.findings] == ["fabric_manager_missing"]
    stopped = judge(facts_with(csv_health(nvswitch_csv(), nvlink_status(8), fm=FM_OK.replace("=active", "=failed")), gpus=8))
    assert [(f.check, f.action) for f in stopped.findings] == [("fabric_manager_stopped", "START_FABRIC_MANAGER")]


def test_an_nvlink_down_names_the_gpu_and_link():
    health = csv_health(nvswitch_csv(), nvlink_status(8, down={3: {7}}), fm=FM_OK)
    v = judge(facts_with(health, gpus=8))
    assert [(f.check, f.gpu) for f in v.findings] == [("nvlink_down", 3)]
    assert "link 7 of 18" in v.findings[0].reason and v.gpus[3] == UNHEALTHY and v.gpus[2] == HEALTHY


def test_rpm_and_dpkg_package_lines_give_the_upstream_version():
    assert parse_fabric_manager("package=nvidia-fabric-manager 580.95.05 install ok installed\nservice=active") == \
        FabricManager("nvidia-fabric-manager", "580.95.05", "active")
    assert parse_fabric_manager("package=nvidia-fabricmanager-580 1:580.95.05-1 deinstall ok config-files\n") is None


# ---------------------------------------------------------------- Xid events

def test_xid_79_on_a_gpu_is_unhealthy_with_a_reboot():
    kernel = "read=yes\n" + xid_line("0000:00:06", 79, "GPU has fallen off the bus.") * 2
    v = judge(facts_with(csv_health(kernel=kernel)))
    (f,) = v.findings
    assert (f.check, f.verdict, f.action, f.gpu) == ("xid", UNHEALTHY, "RESTART_BM", 0)
    assert "Xid 79 ×2 since boot" in f.reason


@pytest.mark.parametrize("xid, action, verdict", [
    (48, "WORKFLOW_XID_48", UNHEALTHY),      # the catalog's bucket, not a plain RESET_GPU
    (74, "WORKFLOW_NVLINK_ERR", UNHEALTHY),
    (63, "IGNORE", DEGRADED),                # a row remapping recorded: nothing to do for the GPU
    (43, "IGNORE", DEGRADED),
])
def test_xids_take_the_catalogs_immediate_action_bucket(xid, action, verdict):
    kernel = "read=yes\n" + xid_line("0000:00:06", xid, "event")
    (f,) = judge(facts_with(csv_health(kernel=kernel))).findings
    assert (f.check, f.verdict, f.action, f.gpu) == ("xid", verdict, action, 0)


def test_an_xid_not_in_the_table_is_degraded_and_one_on_no_known_gpu_names_its_bus():
    kernel = "read=yes\n" + xid_line("0000:9a:00", 999, "something new")
    (f,) = judge(facts_with(csv_health(kernel=kernel))).findings
    assert (f.verdict, f.gpu) == (DEGRADED, None) and f.reason.startswith("PCI 0000:9a:00: Xid 999")


def test_a_kernel_log_not_read_is_a_note_never_a_finding():
    v = judge(facts_with(csv_health(kernel="unread=reading the kernel log needs root: run as root")))
    assert v.status == HEALTHY and v.notes == ("kernel log unread: reading the kernel log needs root: run as root",)


def test_every_xid_rule_names_a_known_action_and_every_rule_a_known_source():
    rules = load_rules()
    assert all(row["action"] in rules.actions for row in rules.xids.values())
    for table in (rules.gpu, rules.host):
        for rule in table.values():
            assert rule["action"] in rules.actions and set(rule["sources"]) <= set(rules.sources)


# ---------------------------------------------------------------- through the probe

def test_the_probe_output_carries_health_and_it_survives_json():
    probe = (Path(__file__).parent / "data" / "probe" / "gpu-h200-nvml.txt").read_text()
    nvml = probe.split("@@fleetctl nvml\n")[1].split("\n")[0]
    data = json.loads(nvml)
    data["gpus"][0]["health"] = json.loads(NVML)["gpus"][0]["health"]
    probe = probe.replace(nvml, json.dumps(data)).replace(
        "@@fleetctl end", "@@fleetctl fabric-manager\nservice=\n@@rc 0\n@@fleetctl kernel-log\nread=yes\n"
        + xid_line("0000:00:06", 79, "GPU has fallen off the bus.") + "@@rc 0\n@@fleetctl end")
    facts = parse_probe(probe)
    assert facts.health.source == "nvml" and facts.health.xids[0].gpu == 0
    again = Facts.from_dict(json.loads(json.dumps(facts.to_dict())))
    assert again == facts
    assert judge(again).status == UNHEALTHY


def test_a_probe_from_before_health_gives_no_health_facts():
    facts = parse_probe((Path(__file__).parent / "data" / "probe" / "gpu-h200-nvml.txt").read_text())
    assert facts.health == Health(gpus=(), source="nvml", kernel_log="unread: the probe did not say")
    assert judge(facts).status == UNKNOWN
    assert replace(facts, gpus=()).health is not None and judge(replace(facts, gpus=())).status == HEALTHY


# ---------------------------------------------------------------- the probe's NVML code, run

FAKE_PYNVML = '''
"""A pynvml replaying the H100 capture's answers (tests/data/health/h100-sxm-2026-12/pyenv.txt)."""
class NVMLError(Exception):
    pass
class NVMLError_NotSupported(NVMLError):
    pass
NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC, NVML_NVLINK_MAX_LINKS = 1, 0, 1, 18
class Info:
    busId = b"00000000:00:06.0"
    total = 85520809984
    used, free = 0, 81079 * 2**20  # the capture's FB memory: 0 MiB used, 81079 MiB free
class c_nvmlGpuFabricInfo_t:
    state, status = 0, 0
def unsupported(*a):
    raise NVMLError_NotSupported("Not Supported")
nvmlInit = lambda: None
nvmlDeviceGetCount = lambda: 1
nvmlDeviceGetHandleByIndex = lambda i: i
nvmlDeviceGetMigMode = lambda h: (0, 0)
nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
nvmlDeviceGetUUID = lambda h: "GPU-00000000-0000-0000-0000-000000000000"
nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
nvmlDeviceGetMemoryInfo = nvmlDeviceGetPciInfo = lambda h: Info()
nvmlSystemGetDriverVersion = lambda: "580.159.04"
nvmlSystemGetCudaDriverVersion_v2 = lambda: 13000
nvmlDeviceGetEccMode = lambda h: [1, 1]
nvmlDeviceGetTotalEccErrors = lambda h, kind, counter: 0
nvmlDeviceGetRetiredPagesPendingStatus = unsupported
nvmlDeviceGetRemappedRows = lambda h: (0, 0, 0, 0)
nvmlDeviceGetCurrentClocksEventReasons = lambda h: 0x1
nvmlDeviceGetCurrPcieLinkGeneration = nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 5
nvmlDeviceGetCurrPcieLinkWidth = nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
nvmlDeviceGetNvLinkState = unsupported
nvmlDeviceGetPersistenceMode = lambda h: 1
nvmlDeviceGetGpuFabricInfo = unsupported
nvmlDeviceGetComputeRunningProcesses = lambda h: []
'''


def test_the_probes_nvml_code_on_the_captured_answers_gives_the_captured_health(tmp_path):
    import os
    import subprocess

    from fleetctl.facts.probe import probe_script
    from fleetctl.hosts.inventory import Host

    (tmp_path / "pynvml.py").write_text(FAKE_PYNVML)
    script = probe_script(Host("h", {"fleet_root": str(tmp_path / "root")}))
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}).stdout
    facts = parse_probe(out)
    assert facts.gpu_source == "nvml" and facts.health.gpus == parse_health_query(CSV)
    assert judge(facts).gpus == {0: HEALTHY}


# ---------------------------------------------------------------- the gate before install and serve

def test_provision_check_fails_an_unhealthy_host_naming_the_gpu_and_action():
    from fleetctl.apply import steps
    from fleetctl.apply.steps import Options
    from tests.fakes import H100 as FAKE_H100
    from tests.test_steps import context

    sick = replace(FAKE_H100, health=csv_health(derive_health_csv(CSV, {"remapped_rows.pending": "Yes"})))
    step = steps.check(context(facts=sick))
    assert step.status == "failed" and step.detail.startswith("unhealthy: GPU 0: a memory row is waiting to be remapped")
    assert "RESET_GPU" in step.detail and "--ignore-health" in step.detail
    assert steps.check(context(facts=sick, options=Options(ignore_health=True))).status == "ok"
    healthy = replace(FAKE_H100, health=csv_health())
    assert steps.check(context(facts=healthy)).status == "ok"
    degraded = replace(FAKE_H100, health=csv_health(derive_health_csv(CSV, {"persistence_mode": "Disabled"})))
    assert steps.check(context(facts=degraded)).status == "ok"



# ---------------------------------------------------------------- drift between audits

def test_health_drift_new_xids_rising_ecc_and_what_is_unhealthy_now():
    from fleetctl.decide.health import health_drift

    before = facts_with(csv_health(kernel="read=yes\n" + xid_line("0000:00:06", 94, "Contained ECC error.")))
    now = facts_with(csv_health(derive_health_csv(CSV, {"ecc.errors.uncorrected.aggregate.total": "3"}), kernel="read=yes\n"
                                + xid_line("0000:00:06", 94, "Contained ECC error.") + xid_line("0000:00:06", 79, "off the bus")))
    assert health_drift(now, before) == [
        ("health", "GPU 0: Xid 79 since boot (GPU has fallen off the bus): RESTART_BM, reboot the host (a GPU reset does not recover this)"),
        ("xid", "GPU 0: Xid 79 ×1 new since the last audit"),
        ("ecc", "GPU 0: uncorrectable ECC errors 0 → 3 (aggregate) since the last audit")]
    assert health_drift(before, None) == [] and health_drift(before, before) == []
    rebooted = facts_with(csv_health())  # the kernel log starts empty after a reboot: fewer Xids is no drift
    assert health_drift(rebooted, now) == []


def test_an_nvlink_down_or_fabric_not_completed_is_health_drift():
    from fleetctl.decide.health import health_drift

    down = facts_with(csv_health(nvswitch_csv(2), nvlink_status(2, down={1: {0}}), fm=FM_OK), gpus=2)
    assert [k for k, _ in health_drift(down, down)] == ["health"]
    starting = facts_with(csv_health(derive_health_csv(nvswitch_csv(2), {"fabric.state": "In Progress"}), nvlink_status(2),
                                     fm=FM_OK), gpus=2)
    assert [d for k, d in health_drift(starting, None)][0].startswith("GPU 0: NVSwitch fabric not completed (state in progress")
