"""The host's container engine as a fact: the probe's engine lines recorded on real engines, and
`fleetctl facts` on lab hosts that reach this machine's real dockerd (or, told so, no daemon)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fleetctl.facts.probe import ContainerRuntime, Facts, parse_container, parse_probe
from tests.conftest import fleetctl_json, needs_sshd

DATA = Path(__file__).parent / "data" / "container"
NO_ENGINE = "unix:///run/fleetctl-no-engine.sock"  # nothing listens there


def recorded(name: str) -> ContainerRuntime | None:
    """A section recorded by running the probe's container lines on this CI machine."""
    return parse_probe((DATA / f"{name}.txt").read_text()).container_runtime


def test_docker_with_compose_v1_and_an_answering_engine():
    assert recorded("docker-compose-v1") == ContainerRuntime(
        "docker", nvidia_runtime=False, server="20.10.24+dfsg1", compose="docker-compose", cdi=False, error=None)


def test_a_clients_warnings_are_not_the_engines_answer():
    assert recorded("docker-config-warning") == recorded("docker-compose-v1")


def test_a_client_whose_daemon_does_not_answer_is_no_usable_engine():
    runtime = recorded("docker-no-daemon")
    assert (runtime.name, runtime.server, runtime.nvidia_runtime, runtime.compose) == (
        "docker", None, False, "docker-compose")
    assert runtime.error == f"Cannot connect to the Docker daemon at {NO_ENGINE}. Is the docker daemon running?"


def test_podman_without_compose():
    assert recorded("podman") == ContainerRuntime("podman", server="4.3.1")


def test_nvidia_runtime_is_read_from_the_engines_runtimes():
    runtime = recorded("docker-nvidia-runtime")
    assert runtime.nvidia_runtime and runtime.server == "20.10.24+dfsg1" and not runtime.cdi


def test_engine_lines_as_data():
    assert parse_container("cdi=no") is None  # neither docker nor podman on the PATH
    assert parse_container("name=docker\nserver_rc=124\nerror=\ncompose=docker compose\ncdi=yes") == ContainerRuntime(
        "docker", server=None, compose="docker compose", cdi=True, error="docker did not answer within 10 s")
    # podman whose default runtime is NVIDIA's; a compose line the probe never prints is not a command
    podman = parse_container('name=podman\nserver=5.4.0\nruntimes={"name":"nvidia","path":"/usr/bin/nvidia-container-'
                             'runtime"}\ncompose=podman-compose; reboot\ncdi=no')
    assert podman == ContainerRuntime("podman", nvidia_runtime=True, server="5.4.0", compose=None)
    # runtimes that did not come back as JSON, or a runtime named only by its path
    assert not parse_container("name=docker\nserver=27.0.1\nruntimes=template: error").nvidia_runtime
    assert parse_container('name=docker\nserver=27.0.1\nruntimes={"gpu":{"path":"/usr/bin/nvidia-container-runtime"}}'
                           ).nvidia_runtime


def test_records_written_before_the_engine_was_asked_still_load():
    old = Facts.from_dict({"container_runtime": {"name": "docker", "nvidia_runtime": True}})
    assert old.container_runtime == ContainerRuntime("docker", nvidia_runtime=True, server=None, compose=None)
    new = Facts(container_runtime=recorded("docker-compose-v1"))
    assert Facts.from_dict(new.to_dict()) == new


@needs_sshd
def test_facts_report_the_engine_the_host_reaches(engine, small_lab):
    """Two lab hosts on this machine: one reaches the real dockerd, one is told a socket where none listens."""
    lab = small_lab(("engine", None, {}), ("no-daemon", None, {"env": {"DOCKER_HOST": NO_ENGINE}}), net=96)
    server = subprocess.run([engine.docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.strip()
    compose = {None: None, 1: "docker-compose", 2: "docker compose"}[engine.compose and len(engine.compose)]

    code, out = fleetctl_json("facts", lab.write_inventory(lab.root / "inv.yml"))
    assert code == 0, {n: h.get("error") for n, h in out["hosts"].items()}
    assert out["hosts"]["engine"]["facts"]["container_runtime"] == {
        "name": "docker", "nvidia_runtime": False, "server": server, "compose": compose, "cdi": False, "error": None}

    cut_off = out["hosts"]["no-daemon"]["facts"]["container_runtime"]
    assert cut_off["name"] == "docker" and cut_off["server"] is None
    assert f"Cannot connect to the Docker daemon at {NO_ENGINE}" in cut_off["error"]

