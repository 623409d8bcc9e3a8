"""The test lab: a fleet of real OpenSSH servers on this machine.

Each lab host is its own ``sshd`` on its own loopback address (127.77.0.N), with
its own host key, and, where the kernel allows, its own mount and PID namespaces:
``/opt/fleetctl`` and ``/etc/os-release`` are that host's own files, and killing
the host ends every session on it. Its
"hardware" is a fake ``nvidia-smi`` first on its PATH that replays captured
output from ``tests/lab/hardware/<profile>/``. Faults are real processes:
``kill()`` an sshd, ``freeze()`` it (accepts TCP, never answers), give a host a
``hang`` nvidia-smi, or an authorized_keys that refuses the lab key.

Only the lab reads hardware fixtures; fleetctl itself never does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HARDWARE = Path(__file__).parent / "hardware"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PORT = 2222

OS_RELEASES = {
    "ubuntu-24.04": 'PRETTY_NAME="Ubuntu 24.04.3 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\nID=ubuntu\nID_LIKE=debian\n',
    "ubuntu-22.04": 'PRETTY_NAME="Ubuntu 22.04.5 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\nID_LIKE=debian\n',
    "rocky-9": 'NAME="Rocky Linux"\nVERSION="9.4 (Blue Onyx)"\nID="rocky"\nID_LIKE="rhel centos fedora"\n'
               'VERSION_ID="9.4"\nPRETTY_NAME="Rocky Linux 9.4 (Blue Onyx)"\n',
}

NVIDIA_SMI = """#!/bin/sh
# Fake nvidia-smi for lab host {name}: replays a capture of {profile}.
hw={hw}
case "$*" in
  *--query-gpu=*) cat "$hw/query.csv"; ! grep -q "is not a valid field" "$hw/query.csv" || exit 2 ;;
  "") cat "$hw/nvidia-smi.txt" ;;
  *) echo "fake nvidia-smi: unsupported arguments: $*" >&2; exit 2 ;;
esac
"""

HANGING_NVIDIA_SMI = """#!/bin/sh
# A GPU fallen off the bus: nvidia-smi never returns.
exec sleep 3600
"""


def ssh_keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class LabHost:
    name: str
    address: str
    dir: Path
    hardware: str | None = None
    os_release: str = "ubuntu-24.04"
    vars: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # set in every session on the host (sshd SetEnv)
    proc: subprocess.Popen | None = None

    @property
    def fleet_root(self) -> Path:
        return self.dir / "opt-fleetctl"

    def kill(self) -> None:
        """The host dies: sshd and every session it started."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def freeze(self) -> None:
        """The host hangs: the kernel still accepts TCP, sshd never answers."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def processes(self) -> dict[int, str]:
        """{pid: command line} of every process running on the host: its sshd and what that started,
        found by parentage (a machine-wide pgrep would also see other labs' hosts, or the tests')."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(stat.parent.name))
        found, todo = {}, [self.proc.pid] if self.proc else []
        while todo:
            pid = todo.pop()
            try:
                found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
            todo += children.get(pid, [])
        return found

    def set_hardware(self, profile: str | None, *, delay: float = 0) -> None:
        """Swap the host's GPUs (the fake nvidia-smi) for another capture, or none;
        *delay* makes it as slow as a driver without persistence mode."""
        self.hardware = profile
        smi = self.dir / "bin" / "nvidia-smi"
        smi.unlink(missing_ok=True)
        if profile == "hang":
            smi.write_text(HANGING_NVIDIA_SMI)
        elif profile:
            script = NVIDIA_SMI.format(name=self.name, profile=profile, hw=HARDWARE / profile)
            smi.write_text(script.replace("hw=", f"sleep {delay}\nhw=", 1) if delay else script)
        if profile:
            smi.chmod(0o755)


class Lab:
    """Start with ``Lab(root).add(...)`` for each host, ``start()``, ``write_inventory()``; ``stop()``."""

    def __init__(self, root: Path, *, net: int = 77, namespaces: bool | None = None):
        self.root = Path(root).resolve()
        self.net = net  # hosts live on 127.<net>.x.y, so several labs can run side by side
        self.hosts: dict[str, LabHost] = {}
        self.namespaces = _can_unshare() if namespaces is None else namespaces
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = self.root / "id_ed25519"
        if not self.key.exists():
            ssh_keygen(self.key)
        self.known_hosts = self.root / "known_hosts"

    def add(self, name: str, hardware: str | None = None, *, os_release: str = "ubuntu-24.04",
            authorized: bool = True, env: dict | None = None, **vars) -> LabHost:
        n = len(self.hosts) + 1
        host = LabHost(name, f"127.{self.net}.{n // 250}.{n % 250 + 1}", self.root / "hosts" / name,
                       os_release=os_release, vars=vars, env=dict(env or {}))
        shutil.rmtree(host.dir, ignore_errors=True)
        (host.dir / "bin").mkdir(parents=True)
        host.fleet_root.mkdir()
        (host.dir / "os-release").write_text(OS_RELEASES[os_release])
        host.set_hardware(hardware)
        pub = self.key.with_suffix(".pub").read_text() if authorized else ssh_keygen(host.dir / "other_key")
        (host.dir / "authorized_keys").write_text(pub)
        ssh_keygen(host.dir / "ssh_host_ed25519_key")
        if not self.namespaces:
            host.vars.setdefault("fleet_root", str(host.fleet_root))
        self.hosts[name] = host
        return host

    def sshd_config(self, host: LabHost) -> str:
        path = f"{host.dir}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return "\n".join([
            f"ListenAddress {host.address}:{PORT}",
            f"HostKey {host.dir}/ssh_host_ed25519_key",
            f"PidFile {host.dir}/sshd.pid",
            f"AuthorizedKeysFile {host.dir}/authorized_keys",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "MaxStartups 400:30:800",
            "LogLevel ERROR",
            f"SetEnv PATH={path}" + "".join(f" {k}={v}" for k, v in host.env.items()),
            "Subsystem sftp internal-sftp",
            "",
        ])

    def start(self, timeout: float = 20) -> Lab:
        Path("/run/sshd").mkdir(exist_ok=True)
        if self.namespaces:
            Path("/opt/fleetctl").mkdir(parents=True, exist_ok=True)
        known = []
        for host in self.hosts.values():
            if host.proc and host.proc.poll() is None:
                continue
            cfg = host.dir / "sshd_config"
            cfg.write_text(self.sshd_config(host))
            cmd = [SSHD, "-D", "-e", "-f", str(cfg)]
            if self.namespaces:
                # Each host sees its own /opt/fleetctl and /etc/os-release.
                # Its root's ~/.bashrc is its own (empty) too: sshd sessions source it, and the
                # controller's (pyenv init, rehash locks) would make a hundred logins crawl.
                (host.dir / "bashrc").write_text("")
                bashrc = f"mount --bind {host.dir}/bashrc /root/.bashrc && " if Path("/root/.bashrc").exists() else ""
                script = (f"mount --bind {host.fleet_root} /opt/fleetctl && "
                          f"mount --bind {host.dir}/os-release /etc/os-release && {bashrc}exec \"$@\"")
                # Its own PID namespace (and /proc, which vLLM's CPU worker reads) means
                # killing its sshd (PID 1 there) ends every session on it, as a host dying does.
                cmd = ["unshare", "-m", "-p", "-f", "--mount-proc", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
            log = open(host.dir / "sshd.log", "ab")
            host.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
            (host.dir / "lab.pgid").write_text(str(host.proc.pid))
        # Every host's key, not just those (re)started now: restarting a killed host must not make the
        # others unknown.
        for host in self.hosts.values():
            pub = (host.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            known.append(f"[{host.address}]:{PORT} {' '.join(pub)}")
        self.known_hosts.write_text("\n".join(known) + "\n")
        deadline = time.monotonic() + timeout
        for host in self.hosts.values():
            while not _listening(host.address, PORT):
                if host.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"lab sshd for {host.name} did not start: "
                                       + (host.dir / "sshd.log").read_text()[-500:])
                time.sleep(0.02)
        return self

    def ssh(self, name: str, command: str) -> subprocess.CompletedProcess:
        """Run *command* on a lab host through the real OpenSSH client (inside its namespaces)."""
        host = self.hosts[name]
        return subprocess.run(["ssh", "-q", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                               "-i", str(self.key), "-p", str(PORT), f"root@{host.address}", command],
                              capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for host in self.hosts.values():
            if host.proc and host.proc.poll() is None:
                os.killpg(host.proc.pid, signal.SIGCONT)
            host.kill()

    def inventory(self, groups: dict[str, list[str]] | None = None, **extra_vars) -> dict:
        """An Ansible YAML inventory of the lab; *groups* maps group name to host names."""
        groups = groups or {"lab": list(self.hosts)}
        hostvars = {h.name: {"ansible_host": h.address, **h.vars} for h in self.hosts.values()}
        return {"all": {
            "vars": {
                "ansible_user": "root",
                "ansible_port": PORT,
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts}",
                **extra_vars,
            },
            "children": {g: {"hosts": {n: hostvars[n] for n in names}} for g, names in groups.items()},
        }}

    def write_inventory(self, path: Path, groups: dict[str, list[str]] | None = None, **extra_vars) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.inventory(groups, **extra_vars), sort_keys=False))
        return path


def _listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((address, port)) == 0


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "-p", "-f", "true"], capture_output=True).returncode == 0
    except OSError:
        return False
