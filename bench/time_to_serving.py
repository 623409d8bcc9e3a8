"""Benchmark: time to serving per phase, for a class's first host and for a second host given its class cache.

    .venv/bin/python bench/time_to_serving.py [--net 72] [--keep] [--control]

Two lab hosts of this machine (tests/lab: real sshd, each its own /opt/fleetctl) of one class (same CPU,
glibc, stack, install root and serving settings) are provisioned one after the other with the default
playbook through `fleetctl provision --json`, with a class-cache store of the benchmark's own
(XDG_DATA_HOME): "first" compiles everything and keeps its kernels on the controller; "second" gets them
before its validate. With --control a third host provisions with `fleet_class_cache: false` (compiling
everything again, as every host did before class caches). Each phase's duration (install, validate,
smoke, service, and the cache step) is read from the run record, and vLLM's own log says whether its
torch.compile work was loaded or compiled. Installs share this machine's download caches, so "install" is
warm for every host after the first. FLEETCTL_NET_OFFSET moves the lab's addresses, as for the tests.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lab import Lab  # noqa: E402

PHASES = ("install", "cache", "validate", "smoke", "service")


def provision(inventory: Path, host: str, env: dict) -> tuple[float, dict]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fleetctl.cli", "provision", str(inventory), "--limit", host,
                           "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    wall = time.monotonic() - start
    try:
        return wall, json.loads(proc.stdout)["hosts"][host]
    except (ValueError, KeyError):
        raise SystemExit(f"{host}: not JSON (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")


def row(name: str, wall: float, run: dict) -> dict:
    steps = {}
    for s in run.get("steps", []):  # a host has two cache steps at most (received, or cleared then kept)
        steps[s["name"]] = {**s, "duration": s.get("duration", 0) + steps.get(s["name"], {}).get("duration", 0)}
    figures = {f"{p}_s": round(steps[p]["duration"], 1) if p in steps else None for p in PHASES}
    return {"host": name, "status": run.get("status"), "wall_s": round(wall, 1), **figures,
            "smoke_compile": (steps.get("smoke", {}).get("data") or {}).get("compile_cache"),
            "service_compile": (steps.get("service", {}).get("data") or {}).get("compile_cache"),
            "proofs_and_service_s": round(sum(figures[f"{p}_s"] or 0 for p in PHASES[1:]), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", type=int, default=72)
    ap.add_argument("--keep", action="store_true", help="leave the lab's directory behind")
    ap.add_argument("--control", action="store_true", help="a third host with fleet_class_cache: false")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetctl-bench-serving-"))
    lab = Lab(work / "lab", net=args.net + int(os.environ.get("FLEETCTL_NET_OFFSET", 0)))
    names = ["first", "second"] + (["control"] if args.control else [])
    for n, name in enumerate(names):
        lab.add(name, None, fleet_service_port=18900 + n, **({"fleet_class_cache": False} if name == "control" else {}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_DATA_HOME": str(work / "data"),
           "XDG_STATE_HOME": str(work / "state")}
    rows = []
    try:
        lab.start()
        inventory = lab.write_inventory(work / "inventory.yml", fleet_torch_index="default")
        for name in names:
            rows.append(row(name, *provision(inventory, name, env)))
            lab.ssh(name, "kill $(cat /opt/fleetctl/service.pid) 2>/dev/null; true")  # one server at a time
    finally:
        lab.stop()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    columns = ["host", "status", "wall_s", *(f"{p}_s" for p in PHASES), "proofs_and_service_s", "smoke_compile",
               "service_compile"]
    print("  ".join(f"{c:>20}" for c in columns))
    for r in rows:
        print("  ".join(f"{str(r[c]):>20}" for c in columns))
    print(json.dumps({"bench": "time_to_serving", "rows": rows}))


if __name__ == "__main__":
    main()
