"""Benchmark: fleetctl's controller at fleet scale, against OpenSSH and Ansible on the same lab and probe.

    .venv/bin/python bench/fleet_scale.py [N ...] [--ansible-max 100] [--delays 20,100] [--latency-hosts 100]
                                          [--reuse-hosts 100] [--only cpu,latency,reuse]

N defaults to 10 50 100 500 1000. Every lab host is a real sshd (tests/lab) on 127.130-135.x.y of this
machine, so the hosts share the controller's cores: wall time partly measures the hosts, while controller
CPU per host (rusage of the controller's own processes) is the figure that carries to a real fleet.
Every tool runs the same probe (fleetctl.facts.probe_script) with the same parallelism, 50 hosts at a
time (fleetctl's --forks 50, Ansible's -f 50, OpenSSH 50 ssh processes at a time), and OpenSSH and
Ansible use the curve25519 key exchange paramiko negotiates with the lab's sshd. Prints three tables,
each from one run, then the machine:

1. Controller CPU per host at each N: OpenSSH (sum over the per-host ssh processes of user+system time,
   os.wait4 per process), fleetctl facts and audit (the whole `python -m fleetctl.cli` process, start-up
   and imports included, and its peak RSS), Ansible at N <= --ansible-max (the ansible process with every
   worker and ssh it reaped: wait4's rusage counts reaped descendants, checked at start; ControlMaster
   off, so no ssh master escapes the count as a daemon). Hosts per minute: measured, and the CPU-bound
   ceiling of one controller core (fleetctl is one Python process, one core under the GIL).
2. Latency: --latency-hosts hosts behind 0 / 20 / 100 ms of added round trip. This kernel has no sch_netem
   (`tc qdisc add dev lo root netem delay 10ms` -> "Specified qdisc kind is unknown", no modprobe; checked
   at run time in a private network namespace), so the delay is a real userspace process,
   bench/delay_proxy.py, between the tools and the hosts' sshd: it adds latency only, no loss and no
   bandwidth limit, and its own CPU is not counted as the controller's.
3. Connection reuse: within a run, fleetctl's connection (fleetctl.reach.connection.connect) measured in this
   process host by host: connect, first command, a second command and a trivial one on the open
   connection; across runs, OpenSSH's ControlMaster warm floor (a first pass opens masters with
   ControlPersist, a second timed pass reuses them; the masters' CPU read from /proc/PID/schedstat) against
   a cold fleetctl audit of the same hosts: the most a cross-run reuse mode could save.

Labs of 1,000 hosts run without reboot watchers (Lab(watchers=False)); each host keeps its own mount and PID
namespaces (about 1.5 MiB of memory a host). Every lab, proxy, master and temp dir is gone at the end,
on Ctrl-C or an error too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetctl.facts.probe import probe_script  # noqa: E402
from fleetctl.hosts.inventory import Host, load_inventory  # noqa: E402
from tests.lab import PORT, Lab  # noqa: E402

PROFILES = ["h100-sxm-80gb", "a100-sxm4-80gb", "l4", "t4", None]
FORKS = 50
KEX = "curve25519-sha256"
PROXY_PORT = PORT + 100
NET = {"cpu": 130, "latency": 132, "reuse": 134}  # this benchmark's lab nets (127.NET.x.y)
AUDITS_PER_DAY = 24 * 60 // 5
PROBE = probe_script(Host("bench"))


# ---------------------------------------------------------------- measuring processes

@dataclass
class Run:
    """One measured pass of a tool over the hosts."""
    tool: str
    hosts: int
    wall: float
    cpu: float  # controller CPU seconds, user + system
    failed: int
    rss_mib: int | None = None
    errors: dict[str, int] = field(default_factory=dict)  # {what a failed host said: how many}

    @property
    def ms_per_host(self) -> float:
        return 1000 * self.cpu / self.hosts

    @property
    def hosts_per_min(self) -> float:
        return 60 * self.hosts / self.wall


def measured(argv: list[str], *, env: dict | None = None, stdout=subprocess.DEVNULL) -> tuple[float, int, object]:
    """(wall seconds, exit code, rusage) of one process, its reaped descendants' CPU included."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.DEVNULL, env=env,
                            cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return time.monotonic() - start, proc.returncode, usage


def cpu_of(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def check_rusage_counts_descendants() -> None:
    """Ansible's figure relies on it: a grandchild's CPU shows in the wait4 of the process that started it."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass"
    _, _, usage = measured(["sh", "-c", f"{shlex_quote(sys.executable)} -c {shlex_quote(burn)}; true"])
    if cpu_of(usage) < 0.18:
        raise SystemExit(f"wait4 did not count a grandchild's CPU ({cpu_of(usage):.3f}s): Ansible's CPU would be wrong")


def shlex_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def ssh_argv(lab: Lab, address: str, command: str, *, port: int = PORT, known_hosts: Path | None = None,
             options: tuple[str, ...] = ()) -> list[str]:
    """OpenSSH as the floor: no config file, curve25519, the lab's key."""
    argv = ["ssh", "-F", "none", "-q", "-o", "BatchMode=yes", "-o", f"KexAlgorithms={KEX}",
            "-o", f"UserKnownHostsFile={known_hosts or lab.known_hosts}", "-i", str(lab.key), "-p", str(port),
            "-l", "root"]
    for option in options:
        argv += ["-o", option]
    return [*argv, address, command]


def openssh_pass(tool: str, argvs: list[list[str]]) -> Run:
    """One ssh per host, FORKS at a time; CPU is the sum of every ssh process's own."""
    def one(argv: list[str]) -> tuple[int, float]:
        _, code, usage = measured(argv)
        return code, cpu_of(usage)

    start = time.monotonic()
    with ThreadPoolExecutor(FORKS) as pool:
        results = list(pool.map(one, argvs))
    return Run(tool, len(argvs), time.monotonic() - start, sum(c for _, c in results),
               sum(code != 0 for code, _ in results))


def fleetctl_env(work: Path) -> dict:
    # Run records go to the benchmark's temp dir, not the user's ~/.local/state.
    return {**os.environ, "PYTHONPATH": str(ROOT), "XDG_STATE_HOME": str(work / "state")}


def fleetctl_pass(tool: str, args: list[str], hosts: int, work: Path) -> Run:
    """`python -m fleetctl.cli ARGS` as a user runs it; failed = hosts its JSON reports an error for."""
    out = work / "fleetctl-out.json"
    with open(out, "w") as f:
        wall, code, usage = measured([sys.executable, "-m", "fleetctl.cli", *args], env=fleetctl_env(work), stdout=f)
    try:
        errors = Counter(f"{h['status']}: {h['error']}"[:100] for h in json.loads(out.read_text())["hosts"].values()
                         if "error" in h)
    except (ValueError, KeyError):
        errors = Counter({f"no JSON, exit code {code}": hosts})  # the run failed as a whole
    return Run(tool, hosts, wall, cpu_of(usage), sum(errors.values()), usage.ru_maxrss // 1024, dict(errors))


def write_lock(inventory: Path, work: Path) -> None:
    """`fleetctl plan --write-lock` (untimed): what the audit compares the hosts with."""
    done = subprocess.run([sys.executable, "-m", "fleetctl.cli", "plan", str(inventory), "--write-lock"],
                          env=fleetctl_env(work), cwd=ROOT, capture_output=True, text=True)
    if done.returncode not in (0, 2):
        print(f"  (plan --write-lock exited {done.returncode}: {done.stderr.strip()[-300:]})", flush=True)


def ansible_env(work: Path) -> dict:
    (work / "ansible").mkdir(exist_ok=True)
    (work / "ansible.cfg").touch()
    return {**os.environ, "ANSIBLE_CONFIG": str(work / "ansible.cfg"), "ANSIBLE_HOME": str(work / "ansible"),
            "ANSIBLE_LOCAL_TEMP": str(work / "ansible" / "tmp"), "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
            # No ControlMaster: a persisting master is a daemon whose CPU no wait4 would count
            # (one command per host gains nothing from it anyway).
            "ANSIBLE_SSH_ARGS": f"-o ControlMaster=no -o KexAlgorithms={KEX}"}


def ansible_pass(inventory: Path, hosts: int, work: Path) -> Run:
    ansible = shutil.which("ansible", path=str(Path(sys.executable).parent)) or shutil.which("ansible")
    if not ansible:
        return Run("Ansible (not installed)", hosts, float("nan"), float("nan"), hosts)
    out = work / "ansible-out.txt"
    # As JSON, raw: Ansible 2.19 templates a free-form -a (the probe's Python braces fail every host).
    args = json.dumps({"_raw_params": "{% raw %}" + PROBE + "{% endraw %}"})
    with open(out, "w") as f:
        wall, _, usage = measured([ansible, "all", "-i", str(inventory), "-m", "shell", "-a", args,
                                   "-f", str(FORKS)], env=ansible_env(work), stdout=f)
    failed = len(re.findall(r" \| (?:UNREACHABLE|FAILED)", out.read_text()))
    return Run(f"Ansible -f {FORKS}", hosts, wall, cpu_of(usage), failed, usage.ru_maxrss // 1024)


# ---------------------------------------------------------------- labs, proxy, memory

class MemoryWatch:
    """The machine's peak memory use (MemTotal - MemAvailable) while it runs, sampled every 0.5 s."""

    def __init__(self):
        self.peak = self.start = used_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, used_mib())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def used_mib() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda k: int(info[k].split()[0])  # noqa: E731
    return (kib("MemTotal") - kib("MemAvailable")) // 1024


@contextlib.contextmanager
def running_lab(root: Path, hosts: int, net: int):
    """A started lab of *hosts* hosts (GPU profiles in turn), stopped and removed however the block ends."""
    lab = Lab(root, net=net, watchers=False)
    try:
        for i in range(hosts):
            lab.add(f"node{i:04d}", PROFILES[i % len(PROFILES)])
        lab.start(timeout=max(20, hosts / 10))
        yield lab
    finally:
        stop_lab(lab)
        shutil.rmtree(root, ignore_errors=True)


def stop_lab(lab: Lab) -> None:
    """Every host's process group killed at once (its namespace's sessions die with its sshd, PID 1
    there), then Lab.stop's careful pass, which then finds nothing left: minutes less at 1,000 hosts."""
    for host in lab.hosts.values():
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
            os.killpg(host.pid, signal.SIGKILL)
    for host in lab.hosts.values():
        if host.proc:
            host.proc.wait()
    lab.stop()


def warm_up(lab: Lab) -> None:
    """One untimed `true` per host: the first tool measured should not pay the hosts' cold caches."""
    openssh_pass("warm-up", [ssh_argv(lab, h.address, "true") for h in lab.hosts.values()])


@contextlib.contextmanager
def delay_proxy(lab: Lab, delay_ms: float, work: Path):
    """bench/delay_proxy.py in front of every lab host (same address, PROXY_PORT); yields the known_hosts
    file naming the hosts at the proxy's port."""
    routes = work / f"proxy-{delay_ms:g}.map"
    routes.write_text("".join(f"{h.address} {PROXY_PORT} {h.address} {PORT}\n" for h in lab.hosts.values()))
    known = work / "known_hosts.proxy"
    known.write_text(lab.known_hosts.read_text().replace(f"]:{PORT} ", f"]:{PROXY_PORT} "))
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "delay_proxy.py"), "--delay-ms", str(delay_ms),
                             str(routes)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("delay proxy did not start")
        yield known
    finally:
        proc.terminate()
        proc.stdin.close()
        proc.wait(10)


def proxied_inventory(lab: Lab, known: Path, path: Path) -> Path:
    inventory = lab.inventory()
    inventory["all"]["vars"].update(ansible_port=PROXY_PORT, ansible_ssh_common_args=f"-o UserKnownHostsFile={known}")
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))
    return path


def netem_error() -> str:
    """What `tc ... netem` says here, tried on the loopback of a private network namespace (harmless)."""
    try:
        done = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up && "
                               "tc qdisc add dev lo root netem delay 10ms"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not tried ({exc})"
    return "available" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]


# ---------------------------------------------------------------- the three tables

def print_header(label: str = "N") -> None:
    print(f"{label:>6}  {'tool':<34} {'CPU ms/host':>11} {'x OpenSSH':>9} {'RSS MiB':>7} {'wall s':>7} "
          f"{'hosts/min':>9} {'failed':>6}")


def print_row(key, r: Run, floor: Run) -> None:
    """One pass; RSS is the controller process's peak (none for OpenSSH's one process per host)."""
    rss = f"{r.rss_mib}" if r.rss_mib is not None else "-"
    print(f"{key:>6}  {r.tool:<34} {r.ms_per_host:>11.1f} {r.ms_per_host / floor.ms_per_host:>9.2f} "
          f"{rss:>7} {r.wall:>7.2f} {r.hosts_per_min:>9.0f} {r.failed:>6}", flush=True)
    for error, count in sorted(r.errors.items(), key=lambda e: -e[1])[:3]:
        print(f"{'':>8}! {count} x {error}", flush=True)


def cpu_table(sizes: list[int], ansible_max: int, unchecked: bool, work: Path) -> None:
    _, _, usage = measured([sys.executable, "-c", "import fleetctl.cli"], env=fleetctl_env(work))
    print(f"\n== 1. Controller CPU per host (probe {len(PROBE)} bytes; 50 hosts at a time; "
          f"start-up included: `import fleetctl.cli` alone = {1000 * cpu_of(usage):.0f} ms CPU)", flush=True)
    print_header()
    ceilings = []
    for n in sizes:
        started = time.monotonic()
        memory = MemoryWatch()
        with running_lab(work / f"lab{n}", n, NET["cpu"]) as lab:
            lab_up = time.monotonic() - started
            inventory = lab.write_inventory(work / f"lab{n}" / "inventory.yml")
            warm_up(lab)
            floor = openssh_pass(f"OpenSSH {KEX}", [ssh_argv(lab, h.address, PROBE) for h in lab.hosts.values()])
            facts = fleetctl_pass("fleetctl facts", ["facts", str(inventory), "--json"], n, work)
            if unchecked:
                # Diagnostic, not a setting to use: what facts costs without reading known_hosts, which
                # paramiko parses per connection in time quadratic in its length (N lines here).
                no_kh = lab.write_inventory(work / f"lab{n}" / "unchecked.yml", ansible_host_key_checking=False)
                runs_extra = [fleetctl_pass("fleetctl facts, no known_hosts read", ["facts", str(no_kh), "--json"],
                                            n, work)]
            else:
                runs_extra = []
            write_lock(inventory, work)
            audit = fleetctl_pass("fleetctl audit", ["audit", str(inventory), "--format", "json"], n, work)
            runs = [floor, facts, *runs_extra, audit]
            if n <= ansible_max:
                runs.append(ansible_pass(inventory, n, work))
            for r in runs:
                print_row(n, r, floor)
        peak = memory.stop()
        print(f"{'':>6}  (N={n}: lab up in {lab_up:.0f} s, {time.monotonic() - started:.0f} s in all; machine memory "
              f"used {memory.start / 1024:.1f} GiB before, {peak / 1024:.1f} GiB at peak)", flush=True)
        ceilings.append((n, facts, audit))
    print("\nSingle-controller ceiling, hosts per minute: measured here (the lab hosts share these cores), and "
          "CPU-bound on one controller core (60 s / CPU per host)")
    print(f"{'N':>6}  {'facts measured':>14} {'facts CPU-bound':>15} {'audit measured':>14} {'audit CPU-bound':>15}")
    for n, facts, audit in ceilings:
        print(f"{n:>6}  {facts.hosts_per_min:>14.0f} {60000 / facts.ms_per_host:>15.0f} "
              f"{audit.hosts_per_min:>14.0f} {60000 / audit.ms_per_host:>15.0f}")


def latency_table(hosts: int, delays: list[float], work: Path) -> None:
    print(f"\n== 2. Latency: {hosts} hosts, round trip added by bench/delay_proxy.py "
          f"(tc netem here: {netem_error()})", flush=True)
    started = time.monotonic()
    with running_lab(work / "lab-latency", hosts, NET["latency"]) as lab:
        warm_up(lab)
        print_header("RTT ms")
        for delay in [0.0, *delays]:
            with delay_proxy(lab, delay, work) as known:
                inventory = proxied_inventory(lab, known, work / f"inventory-{delay:g}ms.yml")
                floor = openssh_pass(f"OpenSSH {KEX}", [ssh_argv(lab, h.address, PROBE, port=PROXY_PORT,
                                                                 known_hosts=known) for h in lab.hosts.values()])
                facts = fleetctl_pass("fleetctl facts", ["facts", str(inventory), "--json"], hosts, work)
                ansible = ansible_pass(inventory, hosts, work)
            for r in (floor, facts, ansible):
                print_row(f"{delay:g}", r, floor)
    print(f"{'':>6}  (0 ms is the proxy with no delay; {time.monotonic() - started:.0f} s in all)")


def in_process_reuse(inventory: Path) -> dict[str, tuple[float, float]]:
    """Per host, one after another so this process's CPU is that host's: {step: (median wall ms, mean CPU ms)}."""
    from fleetctl.reach.connection import connect

    hosts = load_inventory(inventory).select(None)
    first = connect(hosts[0], timeout=30)  # imports, the crypto backend, fabric's config: not per host
    first.run(PROBE, timeout=60)
    first.close()
    steps: dict[str, list[tuple[float, float]]] = {}

    def step(name: str, action):
        wall, cpu = time.perf_counter(), time.process_time()
        value = action()
        steps.setdefault(name, []).append((1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)))
        return value

    for host in hosts:
        conn = step("connect (TCP, key exchange, auth)", lambda: connect(host, timeout=30))
        step("first probe", lambda: conn.run(PROBE, timeout=60).check())
        step("second probe, same connection", lambda: conn.run(PROBE, timeout=60).check())
        step("`true`, same connection", lambda: conn.run("true", timeout=60).check())
        step("close", conn.close)
    return {name: (statistics.median(w for w, _ in values), statistics.fmean(c for _, c in values))
            for name, values in steps.items()}


def master_cpu(pids: list[int]) -> float:
    """CPU seconds the ssh masters have used so far (schedstat: ns on a CPU, finer than stat's ticks)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return total / 1e9


def control_command(lab: Lab, address: str, operation: str, mux: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`ssh -O check|exit` to the master of *address*."""
    return subprocess.run([*ssh_argv(lab, address, "", options=mux)[:-2], "-O", operation, address],
                          capture_output=True, text=True, timeout=30)


def reuse_table(hosts: int, work: Path) -> None:
    print(f"\n== 3. Connection reuse: {hosts} hosts", flush=True)
    started = time.monotonic()
    with running_lab(work / "lab-reuse", hosts, NET["reuse"]) as lab:
        inventory = lab.write_inventory(work / "lab-reuse" / "inventory.yml")
        warm_up(lab)
        print("Within a run, fleetctl's connection in one process, host by host (median wall, mean CPU):")
        print(f"  {'step':<36} {'wall ms':>8} {'CPU ms':>7}")
        for name, (wall, cpu) in in_process_reuse(inventory).items():
            print(f"  {name:<36} {wall:>8.1f} {cpu:>7.1f}", flush=True)

        control = work / "cm"
        control.mkdir(exist_ok=True)
        mux = ("ControlMaster=auto", f"ControlPath={control}/%C", "ControlPersist=600")
        addresses = [h.address for h in lab.hosts.values()]
        try:
            cold = openssh_pass(f"OpenSSH {KEX}, cold", [ssh_argv(lab, a, PROBE) for a in addresses])
            opening = openssh_pass("OpenSSH, opening masters", [ssh_argv(lab, a, PROBE, options=mux) for a in addresses])
            masters = [int(m.group(1)) for a in addresses
                       if (m := re.search(r"pid=(\d+)", control_command(lab, a, "check", mux).stderr))]
            before = master_cpu(masters)
            warm = openssh_pass("OpenSSH ControlMaster warm", [ssh_argv(lab, a, PROBE, options=mux) for a in addresses])
            warm.cpu += master_cpu(masters) - before  # the masters do the crypto for the muxed sessions
        finally:
            for a in addresses:
                control_command(lab, a, "exit", mux)
        write_lock(inventory, work)
        audit = fleetctl_pass("fleetctl audit, cold", ["audit", str(inventory), "--format", "json"], hosts, work)
        print(f"\nAcross runs ({len(masters)} masters found for {hosts} hosts; the warm row's CPU includes theirs):")
        print_header()
        for r in (cold, opening, warm, audit):
            print_row(hosts, r, cold)
    wall_saved, cpu_saved = audit.wall - warm.wall, audit.cpu - warm.cpu
    print(f"\nA cross-run reuse mode could save at most (fleetctl cold audit - OpenSSH ControlMaster warm floor), "
          f"{hosts} hosts:\n  per run: {wall_saved:.2f} s wall, {cpu_saved:.2f} s controller CPU "
          f"({1000 * cpu_saved / hosts:.1f} ms/host)\n  per day at one audit every 5 minutes ({AUDITS_PER_DAY} runs): "
          f"{wall_saved * AUDITS_PER_DAY / 60:.1f} min wall, {cpu_saved * AUDITS_PER_DAY / 60:.1f} min CPU "
          f"({100 * cpu_saved * AUDITS_PER_DAY / 86400:.2f}% of one core)\n  ({time.monotonic() - started:.0f} s in all)")


def print_machine() -> None:
    import paramiko
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    openssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    print(f"\n== Machine: {os.cpu_count()} cores ({model}), {mem:.1f} GiB RAM, Linux {platform.release()}, "
          f"Python {platform.python_version()}, {openssh}, paramiko {paramiko.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10, 50, 100, 500, 1000], help="lab sizes for table 1")
    parser.add_argument("--ansible-max", type=int, default=100, help="run Ansible in table 1 up to this size")
    parser.add_argument("--no-unchecked-row", dest="unchecked_row", action="store_false",
                        help="skip table 1's diagnostic facts row with host key checking off (no known_hosts read)")
    parser.add_argument("--delays", default="20,100", help="round trips added in table 2, ms")
    parser.add_argument("--latency-hosts", type=int, default=100)
    parser.add_argument("--reuse-hosts", type=int, default=100)
    parser.add_argument("--only", default="cpu,latency,reuse", help="which tables")
    args = parser.parse_args()
    only = set(args.only.split(","))
    # SIGTERM ends the run as Ctrl-C does: through every finally, so no lab is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    check_rusage_counts_descendants()
    # An installed fleetctl runs from compiled bytecode; where PYTHONDONTWRITEBYTECODE is set (as on
    # this project's machines) nothing caches it, and every run would compile fleetctl's sources anew.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "fleetctl")], check=True)
    work = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    started = time.monotonic()
    try:
        if "cpu" in only:
            cpu_table(args.sizes, args.ansible_max, args.unchecked_row, work)
        if "latency" in only:
            latency_table(args.latency_hosts, [float(d) for d in args.delays.split(",") if d], work)
        if "reuse" in only:
            reuse_table(args.reuse_hosts, work)
        print_machine()
        print(f"({time.monotonic() - started:.0f} s in all)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
