"""What a lab host runs in place of its nvidia-smi, its package manager and its reboot, and the
restart that brings a rebooted host back.

Each lab host's bin/ (first on its PATH) holds ``apt-get`` (and ``apt``), ``apt-mark``, ``dpkg-query``, ``dnf``,
``rpm``, ``reboot``, ``shutdown`` and ``systemctl``: two-line shell wrappers that run this file
with the host's directory (``systemctl`` only for ``reboot``; anything else goes to the real one).
The host's state lives in files of that directory, so the test, the host's sessions and the
restart all see one truth:

    packages.log         every package-manager call, one shell-quoted line each
    packages             installed packages, "name<TAB>version" lines
    held                 apt-mark hold / dnf versionlock names
    modules              dnf module streams enabled, "name:stream" lines
    driver-packages.json {"mapping": {package: hardware profile}, "failing": [package, ...]}
    hardware             the profile the fake nvidia-smi replays now
    pending-hardware     the profile an installed driver package brings at the next boot
    reboot-delay         seconds a reboot stays down;  never-returns: a reboot never comes back
    reboots, boots       counts: reboots begun, boots that reached a listening sshd
    lab.pgid             the process group of the host's sshd now (absent while it is down)
    watcher.pid          the reboot watcher's process group
    reboot.fifo          where the host's ``reboot`` asks the watcher
    reboot.log           what the reboots did

A reboot cannot be done from inside the host: where the lab has namespaces, the host's sshd is PID 1
of its own PID namespace, and killing it kills everything in there, the restart included. So
Lab.start runs a watcher per host outside them (a shell blocked on reading reboot.fifo), in a session
of its own; the host's ``reboot`` writes to the FIFO, and the watcher runs :func:`restart` here.
Stdlib only: it runs with ``python -I``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    from .profiles import capture_driver, profile_dir
except ImportError:  # run as a script on a lab host (python -I standins.py …)
    sys.path.insert(0, str(Path(__file__).parent))
    from profiles import capture_driver, profile_dir

NVIDIA_SMI = """#!/bin/sh
# Fake nvidia-smi for lab host {name}: replays a capture of {profile}.
hw={hw}
case "$*" in
  *--query-gpu=index,pci.bus_id,ecc*)  # the health query: a profile without health.csv has no health capture
    [ -f "$hw/health.csv" ] || {{ echo 'Field "ecc.mode.current" is not a valid field to query (lab: no health capture).'; exit 2; }}
    cat "$hw/health.csv" ;;
  "nvlink -s") [ ! -f "$hw/nvlink-s.txt" ] || cat "$hw/nvlink-s.txt" ;;
  *--query-gpu=*) cat "$hw/query.csv"; ! grep -q "is not a valid field" "$hw/query.csv" || exit 2 ;;
  "") cat "$hw/nvidia-smi.txt" ;;
  *) echo "fake nvidia-smi: unsupported arguments: $*" >&2; exit 2 ;;
esac
[ ! -f "$hw/exit" ] || exit "$(cat "$hw/exit")"
"""

HANGING_NVIDIA_SMI = """#!/bin/sh
# A GPU fallen off the bus: nvidia-smi never returns.
exec sleep 3600
"""

TOOLS = ("apt-get", "apt", "apt-mark", "dpkg-query", "dnf", "rpm", "reboot", "shutdown")

WRAPPER = """#!/bin/sh
# Lab stand-in for {tool} (tests/lab/standins.py): nothing here touches the real machine.
exec {python} -I {standins} {dir} {tool} "$@"
"""

SYSTEMCTL = """#!/bin/sh
# Lab stand-in for `systemctl reboot` and the lab's own services (tests/lab/standins.py: nvidia-fabricmanager);
# every other verb is the real systemctl's.
for a; do
  case "$a" in -*) ;; reboot) exec {python} -I {standins} {dir} systemctl "$@" ;; *) break ;; esac
done
for a; do
  case "$a" in nvidia-fabricmanager|nvidia-fabricmanager.service) exec {python} -I {standins} {dir} service "$@" ;; esac
done
{real}
"""

DMESG = """#!/bin/sh
# Lab stand-in for dmesg: the host's kernel log is {dir}/kernel.log (LabHost.kernel_log writes it).
cat {dir}/kernel.log 2>/dev/null
exit 0
"""

LAB_SERVICES = ("nvidia-fabricmanager",)

WATCHER = """#!/bin/sh
# Reboot watcher of lab host {name}: outside its namespaces, so that killing the host does not kill it.
echo $$ > {dir}/watcher.pid
while :; do
  read -r request < {dir}/reboot.fifo || continue
  [ "$request" = reboot ] && {python} -I {standins} {dir} restart >> {dir}/reboot.log 2>&1
done
"""


# ---------------------------------------------------------------- files of a host's state

def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_count(path: Path) -> int:
    return int(path.read_text() or 0) if path.exists() else 0


def _bump(path: Path) -> None:
    path.write_text(f"{read_count(path) + 1}\n")


def installed(host_dir: Path) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in _lines(host_dir / "packages"))


FABRIC_MANAGER_BIN = """#!/bin/sh
# Lab stand-in for nv-fabricmanager, there while its package is installed (tests/lab/standins.py).
echo "Fabric Manager version is : {version}"
"""


def write_installed(host_dir: Path, packages: dict[str, str]) -> None:
    """The host's packages; a fabric manager package brings its binary (nv-fabricmanager) onto the host's PATH."""
    (host_dir / "packages").write_text("".join(f"{n}\t{v}\n" for n, v in packages.items()))
    binary = host_dir / "bin" / "nv-fabricmanager"
    fm = [v for n, v in packages.items() if n.startswith(("nvidia-fabricmanager", "nvidia-fabric-manager"))]
    if fm and binary.parent.is_dir():
        binary.write_text(FABRIC_MANAGER_BIN.format(version=fm[0].split("-")[0]))
        binary.chmod(0o755)
    elif not fm:
        binary.unlink(missing_ok=True)


def _driver_config(host_dir: Path) -> tuple[dict[str, str], set[str]]:
    path = host_dir / "driver-packages.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    return data.get("mapping", {}), set(data.get("failing", []))


def _derived(host_dir: Path) -> Path:
    return host_dir.parent.parent / "hardware"  # <lab root>/hosts/<name> → <lab root>/hardware


def package_version(host_dir: Path, name: str) -> str:
    """A driver package's version is its profile's driver version; any other package's is 1.0."""
    profile = _driver_config(host_dir)[0].get(name)
    if profile:
        return capture_driver((profile_dir(profile, _derived(host_dir)) / "query.csv").read_text())
    return "1.0"


# ---------------------------------------------------------------- hardware

def write_nvidia_smi(host_dir: Path, name: str, profile: str | None, delay: float = 0) -> None:
    """Make *profile* the host's GPUs now (the fake nvidia-smi in its bin), or none."""
    smi = host_dir / "bin" / "nvidia-smi"
    smi.unlink(missing_ok=True)
    (host_dir / "hardware").write_text(profile or "")
    if profile == "hang":
        smi.write_text(HANGING_NVIDIA_SMI)
    elif profile:
        hw = profile_dir(profile, _derived(host_dir))
        script = NVIDIA_SMI.format(name=name, profile=profile, hw=shlex.quote(str(hw)))
        smi.write_text(script.replace("hw=", f"sleep {delay}\nhw=", 1) if delay else script)
    if profile:
        smi.chmod(0o755)


def apply_pending_hardware(host_dir: Path) -> None:
    """At boot, a driver installed since the last one takes over the GPUs."""
    pending = host_dir / "pending-hardware"
    if pending.exists():
        write_nvidia_smi(host_dir, host_dir.name, pending.read_text().strip())
        pending.unlink()


# ---------------------------------------------------------------- package managers

def _specs(args: list[str], takes_value: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """(verb, package specs) of a package-manager command line, its options left out."""
    words, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in takes_value:
            skip = True
        elif not a.startswith("-"):
            words.append(a)
    return (words[0], words[1:]) if words else (None, [])


@dataclass(frozen=True)
class Transaction:
    """What an install did, for apt's or dnf's words: nothing at all where *failed* or *blocked*."""
    new: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # other driver packages, which conflict with the new one
    failed: list[str] = field(default_factory=list)  # marked to fail: their post-install script fails
    blocked: list[str] = field(default_factory=list)  # held, and the install would replace them


FABRIC_FAMILY = ("nvidia-fabricmanager", "nvidia-fabric-manager", "libnvidia-nscq")  # one of each at a time


def _family(name: str) -> str | None:
    return next((f for f in FABRIC_FAMILY if name.startswith(f)), None)


def _install(host_dir: Path, names: list[str], *, change_held: bool = True,
             versions: dict[str, str] | None = None) -> Transaction:
    """Install *names*. A driver package replaces any other driver package installed (as Ubuntu's
    nvidia-driver-XXX and RHEL's module streams do), and its profile becomes the host's pending
    hardware; a fabric manager or NSCQ package replaces another branch's (they conflict); a name
    marked failing fails the whole call; any other name installs as nothing, at the version pinned in
    *versions* (apt's name=version) where one is, else 1.0. A pinned version other than the installed
    one installs again at it (an upgrade or a downgrade)."""
    mapping, failing = _driver_config(host_dir)
    versions = versions or {}
    packages = installed(host_dir)
    new = [n for n in dict.fromkeys(names) if n not in packages or (n in versions and packages[n] != versions[n])]
    drivers = [n for n in new if n in mapping]
    families = {_family(n) for n in new} - {None}
    replaced = [n for n in packages if (n in mapping and drivers and n not in names)
                or (_family(n) in families and n not in names)]
    held = [n for n in replaced if n in _lines(host_dir / "held")]
    if [n for n in names if n in failing]:
        return Transaction(failed=[n for n in names if n in failing])
    if held and not change_held:
        return Transaction(blocked=held)
    _remove(host_dir, replaced)
    packages = installed(host_dir)
    for name in new:
        packages[name] = versions.get(name) or package_version(host_dir, name)
    write_installed(host_dir, packages)
    if drivers:
        (host_dir / "pending-hardware").write_text(mapping[drivers[-1]] + "\n")
    return Transaction(new=new, already=[n for n in names if n not in new], replaced=replaced)


def _remove(host_dir: Path, names: list[str]) -> list[str]:
    mapping = _driver_config(host_dir)[0]
    packages = installed(host_dir)
    pending = host_dir / "pending-hardware"
    gone = [n for n in names if packages.pop(n, None) is not None]
    for name in gone:  # a driver removed before the reboot that would have brought it
        if name in mapping and pending.exists() and pending.read_text().strip() == mapping[name]:
            pending.unlink()
    write_installed(host_dir, packages)
    return gone


def _apt_name(spec: str) -> str:
    return re.split(r"[=/:]", spec, maxsplit=1)[0]  # name=version, name/release, name:arch


def apt_get(host_dir: Path, args: list[str]) -> int:
    verb, specs = _specs(args, ("-o", "-c", "-t", "--target-release", "--option"))
    names = [_apt_name(s) for s in specs]
    pinned = {_apt_name(s): s.split("=", 1)[1].removesuffix("-*") for s in specs if "=" in s}
    print("Reading package lists... Done")
    if verb == "install":
        done = _install(host_dir, names, change_held="--allow-change-held-packages" in args, versions=pinned)
        if done.blocked:
            print(f"The following held packages will be changed:\n  {' '.join(done.blocked)}")
            print("E: Held packages were changed and -y was used without --allow-change-held-packages.",
                  file=sys.stderr)
            return 100
        for name in done.failed:
            print(f"Setting up {name} ({package_version(host_dir, name)}) ...")
            print(f"dpkg: error processing package {name} (--configure):\n"
                  " installed post-installation script subprocess returned error exit status 1")
        if done.failed:
            print("Errors were encountered while processing:\n" + "".join(f" {n}\n" for n in done.failed), end="")
            print("E: Sub-process /usr/bin/dpkg returned an error code (1)", file=sys.stderr)
            return 100
        versions = installed(host_dir)
        for name in done.already:
            print(f"{name} is already the newest version ({versions[name]}).")
        if done.replaced:
            print(f"The following packages will be REMOVED:\n  {' '.join(done.replaced)}")
        print(f"0 upgraded, {len(done.new)} newly installed, {len(done.replaced)} to remove and 0 not upgraded.")
        for name in done.replaced:
            print(f"Removing {name} ...")
        for name in done.new:
            print(f"Setting up {name} ({versions[name]}) ...")
        return 0
    if verb in ("remove", "purge"):
        gone = _remove(host_dir, names)
        print(f"0 upgraded, 0 newly installed, {len(gone)} to remove and 0 not upgraded.")
        for name in gone:
            print(f"Removing {name} ...")
    return 0  # update, upgrade, autoremove, clean…: nothing to do in the lab


def apt_mark(host_dir: Path, args: list[str]) -> int:
    verb, names = _specs(args, ())
    held = _lines(host_dir / "held")
    if verb == "hold":
        for name in names:
            print(f"{name} set on hold." if name not in held else f"{name} was already set on hold.")
        held += [n for n in names if n not in held]
    elif verb == "unhold":
        for name in names:
            print(f"Canceled hold on {name}." if name in held else f"{name} was already not on hold.")
        held = [n for n in held if n not in names]
    elif verb == "showhold":
        print("".join(f"{n}\n" for n in held if not names or n in names), end="")
    (host_dir / "held").write_text("".join(f"{n}\n" for n in held))
    return 0


def dpkg_query(host_dir: Path, args: list[str]) -> int:
    """``-W [-f FMT|--showformat=FMT] [PATTERN…]`` and ``-s NAME…`` over the host's packages."""
    fmt, words, status, i = "${Package}\t${Version}\n", [], False, 0
    while i < len(args):
        a = args[i]
        if a in ("-f", "--showformat"):
            fmt, i = args[i + 1], i + 1
        elif a.startswith(("-f=", "--showformat=")):
            fmt = a.split("=", 1)[1]
        elif a in ("-s", "--status"):
            status = True
        elif not a.startswith("-"):
            words.append(a)
        i += 1
    fmt = fmt.encode().decode("unicode_escape")
    packages, rc = installed(host_dir), 0
    for pattern in words or ["*"]:
        found = [n for n in packages if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            print(f"dpkg-query: no packages found matching {pattern}", file=sys.stderr)
            rc = 1
        for name in found:
            if status:
                print(f"Package: {name}\nStatus: install ok installed\nVersion: {packages[name]}\n")
                continue
            fields = {"Package": name, "binary:Package": name, "Version": packages[name],
                      "Status": "install ok installed", "db:Status-Abbrev": "ii "}
            print(re.sub(r"\$\{([^}]+)\}", lambda m: fields.get(m[1], ""), fmt), end="")
    return rc


def dnf(host_dir: Path, args: list[str]) -> int:
    """``install``, ``remove``, ``module enable|reset|install``, ``versionlock add|delete``."""
    verb, specs = _specs(args, ("--setopt", "--enablerepo", "--disablerepo", "--releasever", "-x", "--exclude"))
    modules = dict(line.split(":", 1) for line in _lines(host_dir / "modules"))
    sub, rest = (specs[0], specs[1:]) if verb in ("module", "versionlock") and specs else (None, specs)
    mapping = _driver_config(host_dir)[0]

    def transaction(done: Transaction) -> int:
        if done.failed:
            print("Running transaction\n" + "".join(f"  Installing       : {n}\n" for n in done.failed)
                  + "".join(f"Error in POSTIN scriptlet in rpm package {n}\n" for n in done.failed), end="")
            print("Error: Transaction failed", file=sys.stderr)
            return 1
        versions = installed(host_dir)
        for name in done.already:
            print(f"Package {name}-{versions[name]} is already installed.")
        print("".join(f"  Erasing          : {n}\n" for n in done.replaced)
              + "".join(f"  Installing       : {n}-{versions[n]}\n" for n in done.new) + "Complete!")
        return 0

    if verb == "module" and sub in ("enable", "reset", "disable"):
        for spec in rest:
            name, _, stream = spec.partition(":")
            modules.pop(name, None)
            if sub == "enable":
                modules[name] = stream
        (host_dir / "modules").write_text("".join(f"{n}:{s}\n" for n, s in modules.items()))
        print("Complete!")
        return 0
    if verb == "module" and sub == "install":
        return transaction(_install(host_dir, [s.lstrip("@").split("/")[0] for s in rest]))
    if verb == "install":
        # `dnf install nvidia-driver` with a module stream enabled installs that stream.
        names = [f"{n}:{modules[n]}" if n not in mapping and n in modules else n for n in (s.lstrip("@") for s in specs)]
        return transaction(_install(host_dir, names))
    if verb in ("remove", "erase"):
        gone = _remove(host_dir, [n for s in specs for n in installed(host_dir) if n == s or n.startswith(f"{s}:")])
        print("".join(f"  Erasing          : {n}\n" for n in gone) + "Complete!")
    elif verb == "versionlock" and sub in ("add", "delete"):
        held = _lines(host_dir / "held")
        held = held + [n for n in rest if n not in held] if sub == "add" else [n for n in held if n not in rest]
        (host_dir / "held").write_text("".join(f"{n}\n" for n in held))
    return 0  # makecache, check-update, clean…


def rpm(host_dir: Path, args: list[str]) -> int:
    """``rpm -q NAME…`` / ``rpm -qa [PATTERN…]`` (``--qf`` with %{NAME} and %{VERSION})."""
    fmt, words, every, i = "%{NAME}-%{VERSION}\n", [], False, 0
    while i < len(args):
        a = args[i]
        if a in ("--qf", "--queryformat"):
            fmt, i = args[i + 1], i + 1
        elif a.startswith(("--qf=", "--queryformat=")):
            fmt = a.split("=", 1)[1]
        elif a.startswith("-") and not a.startswith("--"):
            every = every or "a" in a
        elif not a.startswith("-"):
            words.append(a)
        i += 1
    fmt = fmt.encode().decode("unicode_escape")
    packages, rc = installed(host_dir), 0

    def show(name):
        print(re.sub(r"%\{(\w+)\}", lambda m: {"NAME": name, "VERSION": packages[name]}.get(m[1], ""), fmt), end="")
    if every:
        for name in packages:
            if not words or any(fnmatch.fnmatchcase(name, p) for p in words):
                show(name)
        return 0
    for name in words:
        if name in packages:
            show(name)
        else:
            print(f"package {name} is not installed")
            rc += 1
    return min(rc, 255)


# ---------------------------------------------------------------- reboot

def request_reboot(host_dir: Path, tool: str, args: list[str]) -> int:
    """On the host: ask its watcher for a reboot, then wait to be killed by it, as every session on a
    rebooting machine is (the command does not return; the ssh session ends)."""
    if tool == "shutdown" and ("-c" in args or not ({"-r", "--reboot"} & set(args))):
        print("lab shutdown: only `shutdown -r` (a reboot) is played; nothing done", file=sys.stderr)
        return 0 if "-c" in args else 1
    with open(host_dir / "reboot.log", "a") as log:
        log.write(f"{time.strftime('%H:%M:%S')} asked: {shlex.join([tool, *args])}\n")
    try:
        fd = os.open(host_dir / "reboot.fifo", os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        print(f"lab reboot: no watcher for this host ({e.strerror}); is the lab started?", file=sys.stderr)
        return 1
    os.write(fd, b"reboot\n")
    os.close(fd)
    time.sleep(120)
    print("lab reboot: still not killed after 120 s", file=sys.stderr)
    return 1


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_tree(pid: int) -> list[int]:
    """*pid* and its descendants, by parentage in /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def kill_host(host_dir: Path) -> None:
    """End the host's sshd and every process it started, and wait until they are gone."""
    pgid = host_dir / "lab.pgid"
    try:
        pid = int(pgid.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 10
    while (tree := [p for p in process_tree(pid) if alive(p)]) and time.monotonic() < deadline:
        for p in tree:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    pgid.unlink(missing_ok=True)  # a dead pid, which the system may give to a stranger


def listen_address(host_dir: Path) -> tuple[str, int]:
    line = next(x for x in _lines(host_dir / "sshd_config") if x.startswith("ListenAddress "))
    address, port = line.split()[1].rsplit(":", 1)
    return address, int(port)


def listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((address, port)) == 0


def boot(host_dir: Path, timeout: float = 20) -> subprocess.Popen:
    """Start the host's sshd by its start script (a session of its own; the script writes lab.pgid)
    and wait until it listens; count the boot."""
    apply_pending_hardware(host_dir)
    boot_services(host_dir)
    proc = subprocess.Popen(["sh", str(host_dir / "start-sshd")], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (host_dir / "lab.pgid").write_text(str(proc.pid))
    address = listen_address(host_dir)
    deadline = time.monotonic() + timeout
    while not listening(*address):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"lab sshd of {host_dir.name} did not start: "
                               + (host_dir / "sshd.log").read_text()[-500:])
        time.sleep(0.02)
    _bump(host_dir / "boots")
    return proc


def restart(host_dir: Path) -> int:
    """The watcher's part of a reboot: every process of the host killed, then, after the host's
    reboot delay, its sshd started again with the hardware its new driver brings, or never."""
    _bump(host_dir / "reboots")
    kill_host(host_dir)
    print(f"{time.strftime('%H:%M:%S')} down")
    if (host_dir / "never-returns").exists():
        print("never returns")
        return 0
    delay = float((host_dir / "reboot-delay").read_text() or 0) if (host_dir / "reboot-delay").exists() else 0
    time.sleep(delay)  # the machine's firmware and kernel taking their time, not a test waiting
    proc = boot(host_dir)
    print(f"{time.strftime('%H:%M:%S')} up (sshd group {proc.pid})")
    return 0


def fabric_manager_start(host_dir: Path) -> str | None:
    """Why the host's nvidia-fabricmanager would not start (not installed, or not at the running driver's
    version: the real one exits then), or None."""
    versions = [v for n, v in installed(host_dir).items() if n.startswith(("nvidia-fabricmanager", "nvidia-fabric-manager"))]
    if not versions:
        return "Unit nvidia-fabricmanager.service not found."
    hardware = (host_dir / "hardware").read_text().strip() if (host_dir / "hardware").exists() else ""
    driver = capture_driver((profile_dir(hardware, _derived(host_dir)) / "query.csv").read_text()) if hardware else None
    if versions[0].split("-")[0] != driver:
        return f"fabric manager {versions[0]} does not match the driver {driver}: it exits (see the journal)"
    return None


def service(host_dir: Path, args: list[str]) -> int:
    """``systemctl VERB [--now] UNIT``: a lab service's state is a file, services/<unit> ("inactive" where
    none), enabled where services/<unit>.enabled exists; an enabled one starts at boot (boot_services)."""
    words = [a for a in args if not a.startswith("-")]
    verb, units = words[0], [w.removesuffix(".service") for w in words[1:]]
    (host_dir / "services").mkdir(exist_ok=True)
    rc = 0
    for unit in units:
        path = host_dir / "services" / unit
        state = path.read_text().strip() if path.exists() else "inactive"
        if verb == "is-active":
            print(state)
            rc = rc or (0 if state == "active" else 3)
        if verb == "enable":
            (host_dir / "services" / f"{unit}.enabled").touch()
        if verb in ("start", "restart") or (verb == "enable" and "--now" in args):
            if why := fabric_manager_start(host_dir):
                path.write_text("failed\n")
                print(f"Job for {unit}.service failed: {why}", file=sys.stderr)
                return 1
            path.write_text("active\n")
        elif verb == "stop" or (verb == "disable" and "--now" in args):
            path.write_text("inactive\n")
        if verb == "disable":
            (host_dir / "services" / f"{unit}.enabled").unlink(missing_ok=True)
    return rc


def boot_services(host_dir: Path) -> None:
    """At boot every lab service stops; an enabled one starts again (or fails, as it would)."""
    for unit in LAB_SERVICES:
        path = host_dir / "services" / unit
        if path.exists() or (host_dir / "services" / f"{unit}.enabled").exists():
            enabled = (host_dir / "services" / f"{unit}.enabled").exists()
            path.write_text("inactive\n" if not enabled else "failed\n" if fabric_manager_start(host_dir) else "active\n")


TOOL_MAIN = {"apt-get": apt_get, "apt": apt_get, "apt-mark": apt_mark, "dpkg-query": dpkg_query, "dnf": dnf, "rpm": rpm}


def main(argv: list[str]) -> int:
    host_dir, tool, args = Path(argv[0]), argv[1], argv[2:]
    if tool == "restart":
        return restart(host_dir)
    if tool == "service":
        return service(host_dir, args)
    if tool in ("reboot", "shutdown", "systemctl"):
        return request_reboot(host_dir, tool, args)
    with open(host_dir / "packages.log", "a") as log:
        log.write(shlex.join([tool, *args]) + "\n")
    return TOOL_MAIN[tool](host_dir, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
