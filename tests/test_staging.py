"""A stored model staged onto a host (issue 29): what is sent (only what is missing or changed, partial
copies continued), verified on the host before a file takes its name, and audited file by file. Real files
and a real shell through the local connection; the lab run is in tests/test_provision.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fleetctl.apply.execute import execute
from fleetctl.apply.models import StagedModel, stage
from fleetctl.apply.target import Target, parse_state, state_script
from fleetctl.fleet import weights
from fleetctl.fleet.audit import model_drift
from fleetctl.reach.connection import LocalConnection
from fleetctl.reach.fanout import Deadline
from fleetctl.testing import Reply

PYTHON = "python3"


def stored(tmp_path: Path):
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (src / "model.safetensors").write_bytes(os.urandom(3_000_000))
    (src / "tokenizer" / "vocab.txt").parent.mkdir()
    (src / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    store = tmp_path / "store"
    manifest = weights.pull(str(src), store)
    return manifest, store / manifest.key


def held(host_dir: Path) -> tuple[dict, dict]:
    """What the host's state read says it holds (the real state script, run by a real shell)."""
    target = Target(str(host_dir.parent.parent), "s", "envs/s", ("python3",))
    out = LocalConnection("here").run(state_script(target, staged=str(host_dir)), timeout=30).stdout
    state = parse_state(out, target)
    return state.staged, state.staged_verified


def staged(manifest, local, host_dir) -> StagedModel:
    return StagedModel(manifest, local, str(host_dir), *held(host_dir))


def run(model: StagedModel, check: bool = False):
    return execute(stage(model, PYTHON), LocalConnection("here"), Deadline(120), check=check)


def test_a_model_is_sent_verified_and_then_left_alone(tmp_path):
    manifest, local = stored(tmp_path)
    host_dir = tmp_path / "host" / "models" / manifest.key
    listed = run(staged(manifest, local, host_dir), check=True)
    assert listed.detail == f"would send 3 files of {manifest.key} ({manifest.size / 1e6:.1f} MB)"
    assert not host_dir.exists()  # --check moved nothing
    step = run(staged(manifest, local, host_dir))
    assert step.status.value == "changed" and step.data["verified"] == 3 and step.data["bytes"] == manifest.size
    assert weights.verify(manifest, host_dir) == []
    assert sorted(p.name for p in host_dir.rglob("*")) == [".fleetctl-verified.json", "config.json",
                                                           "model.safetensors", "tokenizer", "vocab.txt"]
    again = run(staged(manifest, local, host_dir))
    assert again.status.value == "ok" and "3 files verified on the host" in again.detail and not again.actions


def test_a_changed_file_is_named_by_audit_and_sent_again(tmp_path):
    manifest, local = stored(tmp_path)
    host_dir = tmp_path / "host" / "models" / manifest.key
    run(staged(manifest, local, host_dir))
    weights_file = host_dir / "model.safetensors"
    with open(weights_file, "r+b") as f:  # a flipped byte: same size, another mtime
        f.write(b"\xff")
    (host_dir / "tokenizer" / "vocab.txt").unlink()
    drift = [d.detail for d in model_drift(staged(manifest, local, host_dir))]
    assert drift == [f"{manifest.key}: model.safetensors changed since it was verified (the next provision sends "
                     "it again)", f"{manifest.key}: tokenizer/vocab.txt missing (the next provision sends it again)"]
    step = run(staged(manifest, local, host_dir))
    assert step.status.value == "changed" and step.data["verified"] == 2
    assert [a["to"] for a in step.actions if "put" in a] == [f"{host_dir}/model.safetensors.partial",
                                                           f"{host_dir}/tokenizer/vocab.txt.partial"]
    assert weights.verify(manifest, host_dir) == [] and model_drift(staged(manifest, local, host_dir)) == []


def test_a_copy_stopped_half_way_is_continued_not_sent_again(tmp_path):
    manifest, local = stored(tmp_path)
    host_dir = tmp_path / "host" / "models" / manifest.key
    half = (local / "model.safetensors").read_bytes()[:1_000_000]
    host_dir.mkdir(parents=True)
    (host_dir / "model.safetensors.partial").write_bytes(half)  # what a transfer killed after 1 MB leaves
    model = staged(manifest, local, host_dir)
    [(f, offset)] = [(f, o) for f, o in model.pending() if f.path == "model.safetensors"]
    assert offset == 1_000_000
    step = run(model)
    assert step.status.value == "changed", step.tail
    assert step.data["bytes"] == manifest.size - 1_000_000  # what arrived was not sent again
    assert any("continue a copy stopped at 1.0 MB" in a["why"] for a in step.actions)
    assert weights.verify(manifest, host_dir) == []


def test_a_copy_that_arrives_wrong_never_takes_the_files_name(tmp_path):
    manifest, local = stored(tmp_path)
    host_dir = tmp_path / "host" / "models" / manifest.key
    host_dir.mkdir(parents=True)
    (host_dir / "model.safetensors.partial").write_bytes(b"\0" * 1_000_000)  # a partial copy of other bytes
    step = run(staged(manifest, local, host_dir))
    assert step.status.value == "failed" and "sha256 differs on the host for model.safetensors" in step.detail
    assert not (host_dir / "model.safetensors").exists() and not (host_dir / "model.safetensors.partial").exists()
    assert run(staged(manifest, local, host_dir)).status.value == "changed"  # the next run sends it whole
    assert weights.verify(manifest, host_dir) == []


def test_no_room_is_one_line_before_anything_is_sent(tmp_path):
    manifest, local = stored(tmp_path)
    host_dir = tmp_path / "host" / "models" / manifest.key
    model = staged(manifest, local, host_dir)
    plan = stage(model, PYTHON)
    room = plan.actions[0].command.replace(f"-ge {manifest.size // 1024 + 1} ]", "-ge 999999999999 ]")
    result = LocalConnection("here").run(room, timeout=30)
    assert result.failed and "needs 3.0 MB free in" in result.stderr and "has" in result.stderr


# ---------------------------------------------------------------- in provision (a recorded host)

def provision_model(tmp_path, monkeypatch, fleet_model: str, options: dict | None = None, **hostvars):
    from fleetctl.apply.provision import provision
    from fleetctl.apply.steps import Options
    from fleetctl.hosts.inventory import Host
    from tests.fakes import MATRIX, PLAY, fake_host
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    conn = fake_host().answer(r" - /opt/fleetctl/models/", Reply('{"verified": 1, "bad": []}\n'))
    run = provision(Host("cpu-01", {"fleet_service_port": 18001, "fleet_model": fleet_model, **hostvars}), conn,
                    Deadline(60), PLAY, MATRIX, Options(**(options or {})))
    return run, {s.name: s for s in run.steps}, conn


def test_provision_stages_a_stored_model_before_the_proofs_and_serves_its_path(tmp_path, monkeypatch):
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "config.json").write_text("{}")
    manifest = weights.pull(str(src), tmp_path / "data" / "fleetctl" / "models")
    run, s, conn = provision_model(tmp_path, monkeypatch, f"{manifest.name}@{manifest.revision}")
    names = [step.name for step in run.steps]
    assert names.index("model") < names.index("validate")
    remote = f"/opt/fleetctl/models/{manifest.key}"
    assert (tmp_path / "data" / "fleetctl" / "models" / manifest.key / "config.json", f"{remote}/config.json.partial") \
        in conn.puts
    assert conn.commands(rf"lib/smoke\.py .*--model {remote}")  # the smoke test and the service serve the staged copy
    assert conn.commands(rf"find {remote} -type f")  # read with the host's state, in its one round trip


def test_a_model_missing_from_the_store_fails_the_host_in_one_line(tmp_path, monkeypatch):
    run, s, conn = provision_model(tmp_path, monkeypatch, "llama@abc123")
    assert s["model"].status.value == "failed" and "no model llama@abc123 in the store" in s["model"].detail
    assert "weights pull" in s["model"].detail and not conn.commands(r"lib/smoke\.py")


def test_the_hub_token_reaches_no_host_and_no_record(tmp_path, monkeypatch):
    """HF_TOKEN is the controller's (weights pull from the hub reads it); staging never passes it on."""
    monkeypatch.setenv("HF_TOKEN", "hf_secretTokenValue123")
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "config.json").write_text("{}")
    manifest = weights.pull(str(src), tmp_path / "data" / "fleetctl" / "models")
    run, s, conn = provision_model(tmp_path, monkeypatch, f"{manifest.name}@{manifest.revision}")
    assert s["model"].status.value == "changed"
    sent = json.dumps([conn.ran, conn.stdin, [str(p) for p in conn.puts], run.to_dict()], default=str)
    assert "hf_secretTokenValue123" not in sent and "HF_TOKEN" not in sent


def test_a_capped_copy_takes_at_least_its_bytes_over_the_cap(tmp_path):
    """fleet_model_bandwidth caps each copy to the host: the SFTP or local put paces its blocks (a lower bound
    on the time, which no machine's speed can break)."""
    from dataclasses import replace
    manifest, local = stored(tmp_path)
    host_dir = tmp_path / "host" / "models" / manifest.key
    model = replace(staged(manifest, local, host_dir), rate=6e6)
    listed = run(model, check=True)
    assert "send model.safetensors (3.0 MB at most 6.0 MB/s)" in json.dumps(listed.actions)
    started = time.monotonic()
    assert run(model).status.value == "changed"
    assert time.monotonic() - started >= manifest.size / 6e6
    assert weights.verify(manifest, host_dir) == []


def test_the_bandwidth_var_is_read_as_a_rate_or_refused_in_one_line(tmp_path, monkeypatch):
    from fleetctl.decide.transfer import parse_rate
    assert parse_rate("200MB/s") == 200e6 and parse_rate("800Mbit/s") == 100e6 and parse_rate(None) is None
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "config.json").write_text("{}")
    manifest = weights.pull(str(src), tmp_path / "data" / "fleetctl" / "models")
    run, s, conn = provision_model(tmp_path, monkeypatch, f"{manifest.name}@{manifest.revision}",
                                   fleet_model_bandwidth="1.6Gbit/s")
    capped = {remote: rate for (_, remote), rate in zip(conn.puts, conn.rates) if rate}
    assert s["model"].status.value == "changed" and list(capped.values()) == [200e6]
    assert list(capped) == [f"/opt/fleetctl/models/{manifest.key}/config.json.partial"]  # the model's files only
    for bad in ("100", "fast", "0MB/s"):
        run, s, conn = provision_model(tmp_path, monkeypatch, f"{manifest.name}@{manifest.revision}",
                                       fleet_model_bandwidth=bad)
        assert s["model"].status.value == "failed" and "write a rate per copy such as 200MB/s" in s["model"].detail
        assert not conn.puts


def test_a_hub_model_the_store_lacks_is_pulled_by_provision_then_staged(tmp_path, monkeypatch):
    """fleet_model: org/name@rev, not yet in the store: provision pulls it (through HF_ENDPOINT's mirror, once
    per run) and stages the commit it named; --check says it would pull and pulls nothing."""
    pytest.importorskip("huggingface_hub", reason="bootstrap.sh --test installs huggingface_hub")
    from tests.hubmirror import HubMirror
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(os.urandom(100_000))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with HubMirror("org/tiny", src) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        run, s, conn = provision_model(tmp_path, monkeypatch, "org/tiny@main", {"check": True, "pull": weights.Pulls()})
        assert s["model"].status.value == "changed" and s["model"].detail.startswith("would pull org/tiny@main")
        assert hub.asked == [] and not conn.puts
        run, s, conn = provision_model(tmp_path, monkeypatch, "org/tiny@main", {"pull": weights.Pulls()})
    remote = f"/opt/fleetctl/models/org--tiny@{hub.commit}"
    assert s["model"].status.value == "changed", s["model"].detail
    assert {r for _, r in conn.puts} >= {f"{remote}/config.json.partial", f"{remote}/model.safetensors.partial"}
    assert conn.commands(rf"lib/smoke\.py .*--model {remote}")  # served from the commit main named


# ---------------------------------------------------------------- host to host, within a region

def test_one_copy_per_region_from_the_controller_then_from_a_holder():
    import threading
    from fleetctl.apply.models import Sources
    from fleetctl.hosts.inventory import Host
    sources, a, b = Sources(per_source=1), Host("a"), Host("b")
    assert sources.claim("m@1", "eu", "a", timeout=5) is None  # a seeds eu from the controller
    assert sources.claim("m@1", "us", "c", timeout=5) is None  # regions do not share
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("b", sources.claim("m@1", "eu", "b", timeout=60)))
    waiter.start()
    sources.done("m@1", "eu", a, holds="/opt/fleetctl/models/m@1")
    waiter.join(30)
    assert got["b"] == (a, "/opt/fleetctl/models/m@1") and sources.holders[("m@1", "eu")] == {"a": 1}
    assert sources.claim("m@1", "eu", "d", timeout=0.2) is None  # a serves one at a time: d waited, then went to the controller
    sources.done("m@1", "eu", b, a, holds="/opt/fleetctl/models/m@1")
    assert sources.holders[("m@1", "eu")] == {"a": 0, "b": 0}


def test_a_seed_that_fails_lets_the_next_host_seed():
    import threading
    from fleetctl.apply.models import Sources
    from fleetctl.hosts.inventory import Host
    sources, got = Sources(), {}
    assert sources.claim("m@1", "eu", "a", timeout=5) is None
    waiter = threading.Thread(target=lambda: got.setdefault("b", sources.claim("m@1", "eu", "b", timeout=60)))
    waiter.start()
    sources.done("m@1", "eu", Host("a"))  # its copy failed: it holds nothing
    waiter.join(30)
    assert got == {"b": None} and sources.seeding == {("m@1", "eu"): "b"}


@pytest.mark.parametrize("rate", [None, 1e6])
def test_a_host_copies_from_a_holder_over_http_and_continues_a_cut_copy(tmp_path, monkeypatch, rate):
    """The source host's Python serves its verified copy (SERVE, held open); the receiving host fetches what it
    lacks (FETCH, ranges continue a .partial, at most fleet_model_bandwidth a second), hashes and names it:
    real processes, a real socket."""
    from dataclasses import replace
    from fleetctl.apply import provision as prov
    from fleetctl.apply.steps import Options
    from fleetctl.hosts.inventory import Host
    from tests.fakes import FACTS
    manifest, local = stored(tmp_path)
    source_dir = tmp_path / "a" / "models" / manifest.key
    run(staged(manifest, local, source_dir))  # the holder's verified copy
    dest = tmp_path / "b" / "models" / manifest.key
    dest.mkdir(parents=True)
    weights_bytes = (local / "model.safetensors").read_bytes()
    (dest / "model.safetensors.partial").write_bytes(weights_bytes[:1_000_000])  # a copy cut after 1 MB
    model = replace(staged(manifest, tmp_path / "nowhere", dest), rate=rate)  # nothing can come from the controller
    monkeypatch.setattr("fleetctl.reach.fanout.connect", lambda host, timeout: LocalConnection(host.name))
    holder = Host("a", {"ansible_host": "127.0.0.1"})
    c = prov.Context("b", FACTS, None, Target(str(tmp_path / "b"), "s", "envs/s", ("python3",)), None, None,
                     Options(), model=model)
    started = time.monotonic()
    step = prov.copy_from((holder, str(source_dir)), c, LocalConnection("b"), Deadline(120), PYTHON)
    assert step.status.value == "changed", (step.detail, step.tail)
    assert not rate or time.monotonic() - started >= (manifest.size - 1_000_000) / rate
    assert step.data["source"] == "a" and "from a (host to host)" in step.detail
    assert step.data["bytes"] == manifest.size - 1_000_000  # what had arrived was not fetched again
    assert weights.verify(manifest, dest) == []
    assert "http://" not in json.dumps(step.actions)  # the URL and its token: on stdin only, never recorded
    assert any("continue" in json.dumps(a) or "fetch" in json.dumps(a) for a in step.actions)


# ---------------------------------------------------------------- on lab hosts

def test_three_hosts_of_two_regions_take_one_copy_per_region_over_the_controllers_link(small_lab, tmp_path):
    """Issue 29's transfer on real sshd hosts: a play that only stages (steps: check, model) onto eu-1, eu-2
    and us-1. `--check` says who would copy from whom; then one host of each region gets the model from the
    controller's store, the other eu host copies it from the eu host that holds a verified copy, each copy
    capped by fleet_model_bandwidth; every copy is verified on its host."""
    from tests.conftest import fleetctl_json
    lab = small_lab(*((name, None, {"fleet_region": name[:2]}) for name in ("eu-1", "eu-2", "us-1")), net=99)
    src = tmp_path / "tiny"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(os.urandom(20_000_000))
    code, pulled = fleetctl_json("weights", "pull", str(src))
    assert code == 0
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_model=f"{pulled['name']}@{pulled['revision']}",
                                    fleet_model_bandwidth="40MB/s")
    (tmp_path / "stage.yml").write_text("- name: stage the model\n  hosts: all\n  steps: [check, model]\n")
    code, out = fleetctl_json("provision", str(inventory), "--playbook", str(tmp_path / "stage.yml"), "--check")
    said = {n: next(s for s in h["steps"] if s["name"] == "model")["detail"] for n, h in out["hosts"].items()}
    assert code == 0 and said["us-1"].startswith("would send 2 files"), said  # who would copy from whom
    assert sorted(d.split(" from ")[-1] if "fetch" in d else "controller" for n, d in said.items() if n != "us-1") \
        in (["controller", "eu-1"], ["controller", "eu-2"])
    assert not any((lab.hosts[n].fleet_root / "models").exists() for n in lab.hosts)  # --check moved nothing
    code, out = fleetctl_json("provision", str(inventory), "--playbook", str(tmp_path / "stage.yml"), timeout=600)
    assert code == 0, json.dumps(out, indent=1)[-3000:]
    model = {n: next(s for s in h["steps"] if s["name"] == "model") for n, h in out["hosts"].items()}
    assert all(s["duration"] >= 20_000_000 / 40e6 for s in model.values())  # each copy at most 40 MB/s
    sources = {n: s["data"]["source"] for n, s in model.items()}
    assert sources["us-1"] == "controller"
    assert sorted(sources[n] for n in ("eu-1", "eu-2")) in (["controller", "eu-1"], ["controller", "eu-2"])
    copied = next(n for n in ("eu-1", "eu-2") if sources[n] != "controller")
    assert "(host to host)" in model[copied]["detail"]
    manifest = weights.Manifest.from_dict(pulled)
    for name in lab.hosts:
        assert weights.verify(manifest, lab.hosts[name].fleet_root / "models" / manifest.key) == [], name


def test_a_transfer_killed_half_way_continues_where_it_stopped(small_lab, tmp_path):
    """The controller is killed while a 300 MB file crosses to the host; the next run continues the host's
    .partial copy from its end (the step's bytes are what was missing) and the copy verifies."""
    import signal
    import subprocess
    import sys
    import time
    from tests.conftest import ROOT, fleetctl_json
    lab = small_lab(("cut-1", None, {}), net=88)
    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with open(src / "model.safetensors", "wb") as f:
        for _ in range(300):
            f.write(os.urandom(1_000_000))
    code, pulled = fleetctl_json("weights", "pull", str(src))
    assert code == 0
    manifest = weights.Manifest.from_dict(pulled)
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_model=f"{manifest.name}@{manifest.revision}")
    (tmp_path / "stage.yml").write_text("- name: stage the model\n  hosts: all\n  steps: [check, model]\n")
    argv = [sys.executable, "-m", "fleetctl.cli", "provision", str(inventory), "--playbook", str(tmp_path / "stage.yml"),
            "--json"]
    partial = lab.hosts["cut-1"].fleet_root / "models" / manifest.key / "model.safetensors.partial"
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (partial.exists() and 0 < partial.stat().st_size < 150_000_000):
        assert time.monotonic() < deadline and proc.poll() is None, "the copy never started, or ended first"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the controller dies mid-copy
    proc.wait()
    # Until the host has written what it received: its sessions ("sshd: root@notty", whose internal sftp
    # writes the file) have ended; only the listening sshd is left.
    while any(c.startswith("sshd: ") and "[listener]" not in c for c in lab.hosts["cut-1"].processes().values()):
        assert time.monotonic() < deadline, "the host's session outlived the controller"
        time.sleep(0.05)
    arrived = partial.stat().st_size
    assert 0 < arrived < 300_000_000
    code, out = fleetctl_json("provision", str(inventory), "--playbook", str(tmp_path / "stage.yml"), timeout=300)
    step = next(s for s in out["hosts"]["cut-1"]["steps"] if s["name"] == "model")
    assert code == 0 and step["status"] == "changed", step
    assert step["data"]["bytes"] == manifest.size - arrived  # what had arrived was not sent again
    assert any(a["why"].startswith("model.safetensors: continue a copy stopped at") for a in step["actions"])
    assert weights.verify(manifest, partial.parent) == []
