"""The model store (fleetctl weights pull) and the transfer plan (who copies a model to whom), issue 29's
first parts: a model made on the spot is pulled from a directory standing in for the hub."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from fleetctl.decide.transfer import CONTROLLER, plan_transfer
from fleetctl.errors import FleetError
from fleetctl.fleet import weights
from tests.conftest import fleetctl
from tests.hubmirror import HubMirror


@pytest.fixture
def model(tmp_path):
    """A model directory as save_pretrained leaves one: weights, config, a tokenizer in a subfolder, and a
    hidden cache folder that is not the model's."""
    root = tmp_path / "tiny-llama"
    (root / "tokenizer").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    (root / ".cache").mkdir()
    (root / ".cache" / "lock").write_text("x")
    return root


def test_a_pulled_directory_is_in_the_store_with_every_files_sha256(model, tmp_path):
    store = tmp_path / "store"
    manifest = weights.pull(str(model), store)
    assert [f.path for f in manifest.files] == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    for f in manifest.files:
        data = (model / f.path).read_bytes()
        assert (f.size, f.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert (store / manifest.key / f.path).read_bytes() == data
    assert manifest.key.startswith("tiny-llama@sha-") and manifest.size == sum(f.size for f in manifest.files)
    assert weights.load_manifest(store, manifest.key) == manifest
    assert weights.verify(manifest, store / manifest.key) == []


def test_the_revision_follows_the_content_and_a_named_one_is_kept(model, tmp_path):
    first = weights.pull(str(model), tmp_path / "s")
    assert weights.pull(str(model), tmp_path / "s").revision == first.revision
    (model / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}')
    assert weights.pull(str(model), tmp_path / "s").revision != first.revision
    assert weights.pull(f"{model}@v1", tmp_path / "s").key == "tiny-llama@v1"


def test_a_second_pull_copies_only_what_is_missing_or_differs(model, tmp_path):
    store = tmp_path / "store"
    manifest = weights.pull(f"{model}@r1", store)
    folder = store / manifest.key
    kept = (folder / "model.safetensors").stat().st_ino
    (folder / "config.json").write_text("corrupt")
    (folder / "tokenizer" / "tokenizer.json").unlink()
    assert sorted(weights.verify(manifest, folder)) == ["config.json: 7 bytes, not 39",
                                                        "tokenizer/tokenizer.json: missing"]
    weights.pull(f"{model}@r1", store)
    assert weights.verify(manifest, folder) == [] and (folder / "model.safetensors").stat().st_ino == kept


def test_a_changed_byte_of_the_same_size_is_found(model, tmp_path):
    manifest = weights.pull(str(model), tmp_path / "store")
    path = tmp_path / "store" / manifest.key / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[4096] ^= 0xFF
    path.write_bytes(bytes(data))
    assert weights.verify(manifest, path.parent) == ["model.safetensors: sha256 differs"]


@pytest.mark.parametrize("spec, words", [
    ("/nonexistent/model", "neither a directory on this machine nor a hub id"),
    ("", "name a model"),
    ("@rev", "name a model"),
])
def test_what_is_no_model_is_one_line(spec, words, tmp_path):
    with pytest.raises(FleetError, match=words):
        weights.pull(spec, tmp_path / "store")


def test_an_empty_directory_and_a_missing_or_corrupt_manifest_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FleetError, match="holds no files"):
        weights.pull(str(tmp_path / "empty"), tmp_path / "store")
    for bad in ("../../etc/passwd@1", "x", ".hidden@1"):
        with pytest.raises(FleetError, match="names no model of a store"):
            weights.load_manifest(tmp_path / "store", bad)
    with pytest.raises(FleetError, match="no model x@1 in the store"):
        weights.load_manifest(tmp_path / "store", "x@1")
    (tmp_path / "store").mkdir()
    weights.manifest_path(tmp_path / "store", "x@1").write_text("{")
    with pytest.raises(FleetError, match="not a model manifest"):
        weights.load_manifest(tmp_path / "store", "x@1")


def test_pull_and_plan_from_the_cli(model, tmp_path):
    store = tmp_path / "store"
    done = fleetctl("weights", "pull", f"{model}@r1", "--store", store, "--json", timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["name"] == "tiny-llama", done.stderr
    inventory = tmp_path / "inv.yml"
    inventory.write_text("all:\n  hosts:\n    a1: {fleet_region: eu}\n    a2: {fleet_region: eu}\n"
                         "    b1: {fleet_region: us}\n")
    done = fleetctl("weights", "plan", inventory, "tiny-llama@r1", "--store", store, "--json", timeout=60)
    plan = json.loads(done.stdout)
    assert done.returncode == 0 and plan["controller_bytes"] == 2 * plan["size"] == 2 * ((1 << 20) + 39 + 2)
    assert plan["naive_bytes"] == 3 * plan["size"]
    done = fleetctl("weights", "plan", inventory, "other@r1", "--store", store, timeout=60)
    assert done.returncode == 1 and "no model other@r1 in the store" in done.stderr


# ---------------------------------------------------------------- the transfer plan (pure)

def test_three_hosts_in_two_regions_one_copy_per_region_over_the_controllers_link():
    plan = plan_transfer({"a1": "eu", "a2": "eu", "b1": "us"}, (), 100)
    copies = [c for r in plan.rounds for c in r]
    assert plan.controller_copies == 2 and plan.controller_bytes == 200 and plan.naive_bytes == 300
    assert {(c.source, c.dest) for c in copies} == {(CONTROLLER, "a1"), (CONTROLLER, "b1"), ("a1", "a2")}


def test_copies_never_cross_regions_and_each_host_gets_one():
    regions = {f"h{i:02d}": f"r{i % 5}" for i in range(50)}
    plan = plan_transfer(regions, (), 1, per_source=2)
    copies = [c for r in plan.rounds for c in r]
    assert sorted(c.dest for c in copies) == sorted(regions)
    assert all(c.source == CONTROLLER or regions[c.source] == regions[c.dest] == c.region for c in copies)
    assert plan.controller_copies == 5 and plan.naive_bytes == 50


def test_a_source_sends_only_what_it_holds_and_at_most_per_source_at_once():
    regions = {f"h{i:02d}": "eu" for i in range(20)}
    plan = plan_transfer(regions, (), 1, per_source=2)
    held = set()
    for copies in plan.rounds:
        senders = [c.source for c in copies]
        assert all(s == CONTROLLER or s in held for s in senders)
        assert all(senders.count(s) <= 2 for s in set(senders) - {CONTROLLER})
        assert senders.count(CONTROLLER) <= 1
        held |= {c.dest for c in copies}
    assert len(plan.rounds) == 4  # 1, 3, 9 hold, then the last 11 (each holder sends to two at a time)


def test_hosts_that_hold_a_copy_serve_their_region_and_the_controller_sends_nothing_there():
    plan = plan_transfer({"a1": "eu", "a2": "eu", "a3": "eu", "b1": "us"}, ["a1", "b1"], 10)
    assert plan.controller_copies == 0 and plan.hosts == 2
    assert [[(c.source, c.dest) for c in r] for r in plan.rounds] == [[("a1", "a2")], [("a1", "a3")]]
    assert plan_transfer({"a1": "eu"}, ["a1"], 10).rounds == ()


# ---------------------------------------------------------------- from the hub, through a mirror (HF_ENDPOINT)

TOKEN = "hf_mirrorSecret0123456789abcdef"


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """The controller's environment for a mirror: HF_ENDPOINT set per test, HF_HOME private, the token set."""
    pytest.importorskip("huggingface_hub", reason="bootstrap.sh --test installs huggingface_hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return monkeypatch


def test_a_hub_model_comes_through_a_mirror_with_the_hubs_own_sha256_and_the_token_nowhere(model, tmp_path, hub_env):
    store = tmp_path / "store"
    with HubMirror("org/tiny-llama", model, token=TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        done = fleetctl("weights", "pull", "org/tiny-llama@main", "--store", store, "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    pulled = json.loads(done.stdout)
    assert (pulled["name"], pulled["revision"], pulled["source"]) == ("org/tiny-llama", hub.commit, "hub")
    listed = {f["path"]: f["sha256"] for f in pulled["files"]}
    assert listed == {f: hashlib.sha256((model / f).read_bytes()).hexdigest() for f in hub.files}
    assert listed["model.safetensors"] == hub.entry("model.safetensors")["lfs"]["sha256"]
    manifest = weights.load_manifest(store, f"org/tiny-llama@{hub.commit}")
    assert weights.verify(manifest, store / manifest.key) == []
    assert f"Bearer {TOKEN}" in {auth for _, _, auth in hub.asked}  # the token was honoured...
    written = [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    assert not any(TOKEN.encode() in b for b in [done.stdout.encode(), done.stderr.encode(), *written])  # ...and kept


def test_a_mirror_that_serves_other_bytes_than_the_hub_lists_is_refused_by_name(model, tmp_path, hub_env):
    store = tmp_path / "store"
    with HubMirror("org/tiny-llama", model, corrupt="model.safetensors") as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        done = fleetctl("weights", "pull", "org/tiny-llama", "--store", store, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "model.safetensors" in done.stderr and len(done.stderr.strip().splitlines()) <= 2, done.stderr
    assert not list(store.glob("*.manifest.json"))  # nothing in the store names it whole


@pytest.mark.parametrize("spec, token, words", [
    ("org/tiny-llama@v9", TOKEN, "RevisionNotFound"),
    ("org/other", TOKEN, "RepositoryNotFound|RepoNotFound|not found"),
    ("org/tiny-llama", "hf_wrong", "401|Gated|gated"),
])
def test_a_missing_revision_repository_or_refused_token_is_one_line_without_the_token(model, tmp_path, hub_env,
                                                                                       spec, token, words):
    hub_env.setenv("HF_TOKEN", token)
    with HubMirror("org/tiny-llama", model, token=TOKEN) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        done = fleetctl("weights", "pull", spec, "--store", tmp_path / "store", timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.search(words, done.stderr) and "HF_TOKEN" in done.stderr, done.stderr
    assert token not in done.stderr + done.stdout


def test_a_second_pull_of_a_commit_in_the_store_downloads_nothing(model, tmp_path, hub_env):
    store = tmp_path / "store"
    with HubMirror("org/tiny-llama", model) as hub:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        first = weights.pull("org/tiny-llama@main", store)
        hub.asked.clear()
        assert weights.pull("org/tiny-llama@main", store) == first
        assert [path for _, path, _ in hub.asked if "/resolve/" in path] == []  # only "main is this commit"
        (store / first.key / "config.json").write_text("{}")  # no longer the size the manifest says
        hub.asked.clear()
        weights.pull("org/tiny-llama@main", store)
    assert weights.verify(first, store / first.key) == [] and any("/resolve/" in path for _, path, _ in hub.asked)


def test_a_runs_hosts_naming_one_hub_model_pull_it_once(tmp_path):
    import threading
    calls, gate = [], threading.Event()

    def slow_pull(spec, store):
        calls.append(spec)
        gate.wait(30)
        if spec.startswith("org/bad"):
            raise FleetError("weights pull org/bad: RepositoryNotFound")
        return spec

    pulls = weights.Pulls(slow_pull)
    got = {}
    threads = [threading.Thread(target=lambda n=n: got.setdefault(n, pulls("org/m@main", tmp_path))) for n in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
    assert calls == ["org/m@main"] and set(got.values()) == {"org/m@main"}
    for _ in range(2):  # a failed pull is said to each host that names the model, not tried again
        with pytest.raises(FleetError, match="RepositoryNotFound"):
            pulls("org/bad@main", tmp_path)
    assert calls == ["org/m@main", "org/bad@main"]
