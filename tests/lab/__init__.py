"""The test lab: a fleet of real OpenSSH servers on this machine.

Each lab host is its own ``sshd`` on its own loopback address (127.77.0.N), with
its own host key, and, where the kernel allows, its own mount and PID namespaces:
``/opt/fleetctl`` and ``/etc/os-release`` are that host's own files, and killing
the host ends every session on it. Its
"hardware" is a fake ``nvidia-smi`` first on its PATH that replays captured
output from ``tests/lab/hardware/<profile>/``. Faults are real processes:
``kill()`` an sshd, ``freeze()`` it (accepts TCP, never answers), give a host a
``hang`` nvidia-smi, or an authorized_keys that refuses the lab key.

A host also has a package manager and a reboot that play a driver upgrade (tests/lab/standins.py):
``driver_packages()`` maps package names to hardware profiles; installing one with ``apt-get``/``dnf``
makes that profile the host's GPUs at its next boot; ``reboot`` (``shutdown -r``, ``systemctl reboot``)
really ends every session and the sshd, and the host's watcher (outside its namespaces) starts it
again by the host's start script after ``reboot_delay`` seconds, or never (``never_returns``).
``Lab.derive_profile()`` makes "these GPUs on that driver" or "one GPU fewer" profiles from the
captures (tests/lab/profiles.py).

Only the lab reads hardware fixtures; fleetctl itself never does.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .profiles import HARDWARE, derive_health, derive_profile
from .standins import (DMESG, SYSTEMCTL, TOOLS, WATCHER, WRAPPER, alive, apply_pending_hardware, installed, kill_host,
                       package_version, process_tree, read_count, write_installed, write_nvidia_smi)

STANDINS = Path(__file__).parent / "standins.py"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PORT = 2222

OS_RELEASES = {
    "ubuntu-24.04": 'PRETTY_NAME="Ubuntu 24.04.3 LTS"\nNAME="Ubuntu"\nVERSION_ID="24.04"\nID=ubuntu\nID_LIKE=debian\n',
    "ubuntu-22.04": 'PRETTY_NAME="Ubuntu 22.04.5 LTS"\nNAME="Ubuntu"\nVERSION_ID="22.04"\nID=ubuntu\nID_LIKE=debian\n',
    "rocky-9": 'NAME="Rocky Linux"\nVERSION="9.4 (Blue Onyx)"\nID="rocky"\nID_LIKE="rhel centos fedora"\n'
               'VERSION_ID="9.4"\nPRETTY_NAME="Rocky Linux 9.4 (Blue Onyx)"\n',
}

def ssh_keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class LabHost:
    name: str
    address: str
    dir: Path
    os_release: str = "ubuntu-24.04"
    vars: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)  # set in every session on the host (sshd SetEnv)
    proc: subprocess.Popen | None = None  # the start script as Lab.start ran it; a reboot's is not ours
    watcher: subprocess.Popen | None = None

    @property
    def fleet_root(self) -> Path:
        return self.dir / "opt-fleetctl"

    @property
    def pid(self) -> int | None:
        """The process group of the host's sshd now (Lab.start's, or the one a reboot started)."""
        try:
            return int((self.dir / "lab.pgid").read_text())
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        return self.pid is not None and alive(self.pid)

    def kill(self) -> None:
        """The host dies: sshd and every session it started."""
        kill_host(self.dir)
        if self.proc:
            self.proc.poll()  # reaped, so that its pid is gone for good

    def freeze(self) -> None:
        """The host hangs: the kernel still accepts TCP, sshd never answers."""
        os.killpg(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def processes(self) -> dict[int, str]:
        """{pid: command line} of every process running on the host: its sshd and what that started,
        found by parentage (a machine-wide pgrep would also see other labs' hosts, or the tests')."""
        found = {}
        for pid in process_tree(self.pid) if self.running else ():
            try:
                found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue  # gone meanwhile
        return found

    @property
    def hardware(self) -> str | None:
        """The profile the host's nvidia-smi replays now (a reboot may have changed it)."""
        path = self.dir / "hardware"
        return (path.read_text().strip() or None) if path.exists() else None

    def set_hardware(self, profile: str | None, *, delay: float = 0) -> None:
        """Swap the host's GPUs (the fake nvidia-smi) for another capture, or none;
        *delay* makes it as slow as a driver without persistence mode."""
        write_nvidia_smi(self.dir, self.name, profile, delay)

    def kernel_log(self, text: str) -> None:
        """The host's kernel log from now on, as its dmesg stand-in prints it."""
        (self.dir / "kernel.log").write_text(text)

    def service(self, unit: str) -> str:
        """A lab service's state (nvidia-fabricmanager): "active", else "inactive"."""
        path = self.dir / "services" / unit
        return path.read_text().strip() if path.exists() else "inactive"

    def set_service(self, unit: str, state: str) -> None:
        (self.dir / "services").mkdir(exist_ok=True)
        (self.dir / "services" / unit).write_text(state + "\n")

    # ------------------------------------------------------------ a driver upgrade, played

    def driver_packages(self, mapping: dict[str, str], *, installed: Iterable[str] = (),
                        failing: Iterable[str] = ()) -> None:
        """Package names that are drivers: installing one (apt-get install, dnf install, dnf module
        install) makes its hardware profile the host's GPUs at the next boot, and removes any other
        driver package (apt refuses where that one is held, without --allow-change-held-packages).
        *installed* are on the host already (its current driver, say); *failing* ones fail to
        install, apt's or dnf's way, and change nothing. A driver package's version is its profile's
        driver version; any other package installs as nothing, version 1.0."""
        (self.dir / "driver-packages.json").write_text(json.dumps({"mapping": mapping, "failing": sorted(failing)}))
        write_installed(self.dir, {**self.packages, **{n: package_version(self.dir, n) for n in installed}})

    @property
    def packages(self) -> dict[str, str]:
        """{name: version} installed on the host."""
        return installed(self.dir)

    @property
    def held(self) -> list[str]:
        """Packages apt-mark hold or dnf versionlock pinned."""
        path = self.dir / "held"
        return path.read_text().split() if path.exists() else []

    def package_calls(self) -> list[list[str]]:
        """Every package-manager command run on the host, as argument lists, in order."""
        path = self.dir / "packages.log"
        return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def pending_hardware(self) -> str | None:
        """The profile the next boot brings, if a driver package was installed since the last."""
        path = self.dir / "pending-hardware"
        return path.read_text().strip() if path.exists() else None

    @property
    def boots(self) -> int:
        """How many times the host's sshd came up (1 after Lab.start; a reboot that returns adds one)."""
        return read_count(self.dir / "boots")

    @property
    def reboots(self) -> int:
        """How many reboots began (the host's processes killed)."""
        return read_count(self.dir / "reboots")

    @property
    def reboot_delay(self) -> float:
        path = self.dir / "reboot-delay"
        return float(path.read_text() or 0) if path.exists() else 0.0

    @reboot_delay.setter
    def reboot_delay(self, seconds: float) -> None:
        """How long a reboot keeps the host down, from its sessions' end to its sshd's start."""
        (self.dir / "reboot-delay").write_text(f"{seconds}\n")

    @property
    def never_returns(self) -> bool:
        return (self.dir / "never-returns").exists()

    @never_returns.setter
    def never_returns(self, value: bool) -> None:
        """A reboot of the host ends it for good (until the test's Lab.start boots it again)."""
        path = self.dir / "never-returns"
        path.write_text("") if value else path.unlink(missing_ok=True)


class Lab:
    """Start with ``Lab(root).add(...)`` for each host, ``start()``, ``write_inventory()``; ``stop()``."""

    def __init__(self, root: Path, *, net: int = 77, namespaces: bool | None = None, watchers: bool = True):
        self.root = Path(root).resolve()
        self.net = net  # hosts live on 127.<net>.x.y, so several labs can run side by side
        # watchers=False: no reboot watcher per host (a reboot then never returns), for labs of a
        # thousand hosts that only answer probes (bench/fleet_scale.py): a process per host fewer.
        self.watchers = watchers
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
        self._install_standins(host)
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
            # A host certificate (ssh-keygen -s CA -h) beside the host key is presented too, as sshd does with it.
            *([f"HostCertificate {host.dir}/ssh_host_ed25519_key-cert.pub"]
              if (host.dir / "ssh_host_ed25519_key-cert.pub").exists() else []),
            "",
        ])

    def derive_profile(self, base: str, *, driver: str | None = None, cuda: str | None = None,
                       drop_gpus: int = 0) -> str:
        """The profile "*base*'s GPUs on *driver* / *cuda*, less its last *drop_gpus*", written into
        this lab's own directory (tests/lab/profiles.py says what is substituted); its name, for
        add(), set_hardware() or driver_packages()."""
        return derive_profile(base, self.root / "hardware", driver=driver, cuda=cuda, drop_gpus=drop_gpus)

    def derive_health(self, base: str, name: str, **kw) -> str:
        """A profile of *base*'s GPUs with health values, sick ones changed one at a time
        (tests/lab/profiles.py:derive_health says what is derived), in this lab's own directory."""
        return derive_health(base, self.root / "hardware", name, **kw)

    def _install_standins(self, host: LabHost) -> None:
        """The host's package manager, reboot and systemctl (for `systemctl reboot`), first on its PATH."""
        words = {"python": shlex.quote(sys.executable), "standins": shlex.quote(str(STANDINS)),
                 "dir": shlex.quote(str(host.dir))}
        real = shutil.which("systemctl", path="/usr/bin:/bin")
        scripts = {tool: WRAPPER.format(tool=tool, **words) for tool in TOOLS}
        scripts["systemctl"] = SYSTEMCTL.format(real=f'exec {real} "$@"' if real else
                                                'echo "System has not been booted with systemd as init system '
                                                '(PID 1). Can\'t operate." >&2; exit 1', **words)
        scripts["dmesg"] = DMESG.format(**words)
        for tool, script in scripts.items():
            (host.dir / "bin" / tool).write_text(script)
            (host.dir / "bin" / tool).chmod(0o755)
        os.mkfifo(host.dir / "reboot.fifo")

    def start_script(self, host: LabHost) -> str:
        """The shell script that boots *host*: its sshd, in namespaces of its own where the lab has
        them. Lab.start runs it, and so does the host's watcher when a reboot brings the host back."""
        cfg = host.dir / "sshd_config"
        cmd = [SSHD, "-D", "-e", "-f", str(cfg)]
        if self.namespaces:
            # Each host sees its own /opt/fleetctl and /etc/os-release.
            # Its root's ~/.bashrc is its own (empty) too: sshd sessions source it, and the
            # controller's (pyenv init, rehash locks) would make a hundred logins crawl.
            bashrc = f"mount --bind {host.dir}/bashrc /root/.bashrc && " if Path("/root/.bashrc").exists() else ""
            script = (f"mount --bind {host.fleet_root} /opt/fleetctl && "
                      f"mount --bind {host.dir}/os-release /etc/os-release && {bashrc}exec \"$@\"")
            # Its own PID namespace (and /proc, which vLLM's CPU worker reads) means
            # killing its sshd (PID 1 there) ends every session on it, as a host dying does.
            cmd = ["unshare", "-m", "-p", "-f", "--mount-proc", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
        d = shlex.quote(str(host.dir))
        return (f"#!/bin/sh\n# Boots lab host {host.name} (written by Lab.start).\n"
                f"echo $$ > {d}/lab.pgid\nexec {shlex.join(cmd)} >> {d}/sshd.log 2>&1\n")

    def _start_watcher(self, host: LabHost) -> None:
        """The host's reboot watcher, in a session of its own outside the host's namespaces."""
        if host.watcher and host.watcher.poll() is None:
            return
        watcher = host.dir / "reboot-watcher"
        watcher.write_text(WATCHER.format(name=host.name, python=shlex.quote(sys.executable),
                                          standins=shlex.quote(str(STANDINS)), dir=shlex.quote(str(host.dir))))
        host.watcher = subprocess.Popen(["sh", str(watcher)], start_new_session=True, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (host.dir / "watcher.pid").write_text(str(host.watcher.pid))

    def start(self, timeout: float = 20) -> Lab:
        Path("/run/sshd").mkdir(exist_ok=True)
        if self.namespaces:
            Path("/opt/fleetctl").mkdir(parents=True, exist_ok=True)
        known, started = [], []
        for host in self.hosts.values():
            if self.watchers:
                self._start_watcher(host)
            if host.running:
                continue
            (host.dir / "sshd_config").write_text(self.sshd_config(host))
            (host.dir / "bashrc").write_text("")
            (host.dir / "start-sshd").write_text(self.start_script(host))
            apply_pending_hardware(host.dir)  # a host started again is a host booted again
            host.proc = subprocess.Popen(["sh", str(host.dir / "start-sshd")], start_new_session=True,
                                         stdin=subprocess.DEVNULL)
            (host.dir / "lab.pgid").write_text(str(host.proc.pid))
            started.append(host)
        # Every host's key, not just those (re)started now: restarting a killed host must not make the
        # others unknown.
        for host in self.hosts.values():
            pub = (host.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
            known.append(f"[{host.address}]:{PORT} {' '.join(pub)}")
        self.known_hosts.write_text("\n".join(known) + "\n")
        deadline = time.monotonic() + timeout
        for host in started:
            while not _listening(host.address, PORT):
                if host.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"lab sshd for {host.name} did not start: "
                                       + (host.dir / "sshd.log").read_text()[-500:])
                time.sleep(0.02)
            (host.dir / "boots").write_text(f"{host.boots + 1}\n")
        return self

    def ssh_argv(self, name: str, command: str) -> list[str]:
        """The OpenSSH client command line running *command* on a lab host (for a session left open)."""
        return ["ssh", "-q", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-i", str(self.key), "-p", str(PORT), f"root@{self.hosts[name].address}", command]

    def ssh(self, name: str, command: str) -> subprocess.CompletedProcess:
        """Run *command* on a lab host through the real OpenSSH client (inside its namespaces)."""
        return subprocess.run(self.ssh_argv(name, command), capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        """Every host down: its watcher first (with a reboot it may be running), then its sshd, whether
        Lab.start or a reboot started it (the pid file says which)."""
        for host in self.hosts.values():
            if host.watcher and host.watcher.poll() is None:
                os.killpg(host.watcher.pid, signal.SIGKILL)
                host.watcher.wait()
            if host.running:
                os.killpg(host.pid, signal.SIGCONT)
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
