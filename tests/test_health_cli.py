"""`fleetctl health` and `facts --json` through a local connection, NVML answering as the H100 capture did
(a pynvml replaying it, first on the host Python's path), and sick answers derived from it one at a time."""

import json

import pytest

from fleetctl.cli import main
from tests.test_health import FAKE_PYNVML


@pytest.fixture
def local(tmp_path, monkeypatch):
    """An inventory of one local host whose python3 finds the replaying pynvml; returns (inventory, write)."""
    (tmp_path / "nvml").mkdir()
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'nvml'}")
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(f"all:\n  hosts:\n    gpu-host:\n      ansible_connection: local\n"
                         f"      fleet_root: {tmp_path / 'root'}\n")

    def write(**changes):
        text = FAKE_PYNVML
        for name, value in changes.items():
            text += f"\n{name} = {value}\n"
        (tmp_path / "nvml" / "pynvml.py").write_text(text)
    write()
    return inventory, write


def test_health_json_reports_the_captured_h100_healthy(local, capsys):
    inventory, _ = local
    assert main(["health", str(inventory), "--json"]) == 0
    host = json.loads(capsys.readouterr().out)["hosts"]["gpu-host"]
    assert host["status"] == "healthy" and host["verdict"]["gpus"] == {"0": "healthy"}
    assert host["facts"]["source"] == "nvml" and host["facts"]["gpus"][0]["pcie_width"] == 16


def test_facts_json_carries_the_same_health_facts(local, capsys):
    inventory, _ = local
    assert main(["facts", str(inventory), "--json"]) == 0
    health = json.loads(capsys.readouterr().out)["hosts"]["gpu-host"]["facts"]["health"]
    assert health["source"] == "nvml" and health["gpus"][0]["remapped_rows_pending"] is False


def test_a_pending_row_remap_fails_the_host_with_its_action_in_every_format(local, capsys):
    inventory, write = local
    write(nvmlDeviceGetRemappedRows="lambda h: (0, 1, 1, 0)")
    assert main(["health", str(inventory), "--json"]) == 2
    host = json.loads(capsys.readouterr().out)["hosts"]["gpu-host"]
    assert host["status"] == "unhealthy" and "GPU 0: a memory row is waiting to be remapped: RESET_GPU" in host["summary"]
    assert main(["health", str(inventory), "--format", "prometheus"]) == 2
    prom = capsys.readouterr().out
    assert 'fleetctl_gpu_health{host="gpu-host",gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",status="unhealthy"} 1' in prom
    assert 'fleetctl_gpu_remapped_rows_pending{host="gpu-host",gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000"} 1' in prom
    assert main(["health", str(inventory)]) == 2
    assert "RESET_GPU" in capsys.readouterr().out


def test_a_degraded_gpu_is_reported_and_does_not_fail_the_run(local, capsys):
    inventory, write = local
    write(nvmlDeviceGetCurrentClocksEventReasons="lambda h: 0x40")
    assert main(["health", str(inventory), "--json"]) == 0
    host = json.loads(capsys.readouterr().out)["hosts"]["gpu-host"]
    assert host["status"] == "degraded" and host["verdict"]["findings"][0]["action"] == "CHECK_COOLING_POWER"


def test_an_unreachable_host_exits_4(tmp_path, capsys):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    gone:\n      ansible_host: 127.0.0.1\n      ansible_port: 1\n")
    assert main(["health", str(inventory), "--json", "-T", "10"]) == 4
    assert json.loads(capsys.readouterr().out)["hosts"]["gone"]["status"] == "unreachable"
