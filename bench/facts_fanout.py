"""Benchmark: `fleetctl facts` against plain OpenSSH and Ansible on the same lab, same probe.

    .venv/bin/python bench/facts_fanout.py [N ...]      (default: 10 50 100)

Starts a lab of N real sshd hosts (tests/lab), then times, side by side in one run:
- OpenSSH, one `ssh host probe` per host all at once, curve25519 key exchange (the floor
  for a cold fan-out: one handshake per host is the physical cost), and with default kex;
- Ansible, `ansible all -m shell -a PROBE -f N` with pipelining and ControlPersist;
- fleetctl facts at its default --forks 50 (wall time and peak RSS), and at --forks 8;
- fleetctl audit against a lock written by plan (it should cost about one facts run).
Prints one table; fleetctl's ratios to the floor and to Ansible are the figures that matter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleetctl.facts import probe_script  # noqa: E402
from fleetctl.inventory import Host  # noqa: E402
from tests.lab import PORT, Lab  # noqa: E402

PROFILES = ["h100-sxm-80gb", "a100-sxm4-80gb", "l4", "t4", None]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """(seconds, exit status, peak RSS in MiB) of one command."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.monotonic() - start, os.waitstatus_to_exitcode(status), usage.ru_maxrss // 1024


def openssh_all(lab: Lab, probe: str, kex: str | None) -> tuple[float, int]:
    base = ["ssh", "-q", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={lab.known_hosts}",
            "-i", str(lab.key), "-p", str(PORT), "-l", "root"]
    if kex:
        base += ["-o", f"KexAlgorithms={kex}"]
    start = time.monotonic()
    procs = [subprocess.Popen([*base, h.address, probe], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for h in lab.hosts.values()]
    failed = sum(p.wait() != 0 for p in procs)
    return time.monotonic() - start, failed


def main(sizes: list[int]) -> None:
    ansible = shutil.which("ansible", path=str(Path(sys.executable).parent))
    rows = []
    for n in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench{n}-"))
        lab = Lab(tmp, net=90)
        for i in range(n):
            lab.add(f"node{i:03d}", PROFILES[i % len(PROFILES)])
        lab.start()
        try:
            inventory = lab.write_inventory(tmp / "inv.yml")
            probe = probe_script(Host("bench"))
            floor, f1 = openssh_all(lab, probe, "curve25519-sha256")
            default, f2 = openssh_all(lab, probe, None)
            facts = [sys.executable, "-m", "fleetctl.cli", "facts", str(inventory), "--json"]
            fleet, code, rss = timed(facts)  # default --forks 50
            # Every lab "host" shares this machine's cores, so past a few forks the remote work
            # thrashes; a real fleet's remote work runs on the hosts. Shown for that reason.
            fleet8, code8, _ = timed([*facts, "--forks", "8"])
            # An audit is one facts probe per host plus a pure comparison with the lock.
            subprocess.run([sys.executable, "-m", "fleetctl.cli", "plan", str(inventory), "--write-lock"],
                           capture_output=True)
            audit_s, audit_code, _ = timed([sys.executable, "-m", "fleetctl.cli", "audit", str(inventory),
                                            "--format", "json"])
            row = {"N": n, "openssh curve25519": floor, "openssh default kex": default, "fleetctl": fleet,
                   "fleetctl -f 8": fleet8, "audit": audit_s, "fleetctl RSS MiB": rss,
                   "failures": f1 + f2 + (code != 0) + (code8 != 0) + (audit_code not in (0, 2))}
            if ansible:
                env = {**os.environ, "ANSIBLE_PIPELINING": "1", "ANSIBLE_HOST_KEY_CHECKING": "False",
                       "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=60s",
                       "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
                row["ansible"], acode, _ = timed([ansible, "all", "-i", str(inventory), "-m", "shell", "-a", probe,
                                                   "-f", str(n)], env)
                row["failures"] += acode != 0
            rows.append(row)
        finally:
            lab.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'N':>4} {'ssh c25519':>10} {'ssh default':>11} {'ansible':>8} {'fleetctl':>8} "
          f"{'÷floor':>6} {'ansible÷':>8} {'-f 8':>6} {'÷floor':>6} {'audit':>6} {'RSS MiB':>7} {'fail':>4}")
    for r in rows:
        fleet, ansible_s = r["fleetctl"], r.get("ansible")
        vs_ansible = f"{ansible_s / fleet:.1f}x" if ansible_s else "-"
        ansible_col = f"{ansible_s:.2f}" if ansible_s else "-"
        print(f"{r['N']:>4} {r['openssh curve25519']:>10.2f} {r['openssh default kex']:>11.2f} {ansible_col:>8} "
              f"{fleet:>8.2f} {fleet / r['openssh curve25519']:>6.2f} {vs_ansible:>8} "
              f"{r['fleetctl -f 8']:>6.2f} {r['fleetctl -f 8'] / r['openssh curve25519']:>6.2f} {r['audit']:>6.2f} "
              f"{r['fleetctl RSS MiB']:>7} {r['failures']:>4}")

if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10, 50, 100])
