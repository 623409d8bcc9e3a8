"""How long ``fleetctl inventory INV --list`` takes on big generated inventories, beside ansible-inventory.

Run: ``.venv/bin/python bench/inventory.py [--sizes 1000,5000,20000] [--no-ansible]``. Each inventory is
YAML with N hosts in 50 groups (10 sites of 5 racks), a few vars on every host and group. Prints one
line per size: seconds for fleetctl (in-process load + --list, and the CLI as a user runs it) and for
ansible-inventory --list. A benchmark, not a test: the figures depend on the machine.
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

import yaml

BIN = Path(sys.executable).parent


def write_inventory(path: Path, hosts: int, groups: int = 50) -> None:
    """N hosts spread over *groups* racks, 5 racks to a site, every rack also in a model group."""
    sites: dict = {}
    per_rack = -(-hosts // groups)
    for rack in range(groups):
        members = {f"gpu{rack:02d}-{n:05d}.example.com": {"ansible_host": f"10.{rack}.{n // 250}.{n % 250 + 1}",
                                                          "fleet_slot": n}
                   for n in range(per_rack) if rack * per_rack + n < hosts}
        site = sites.setdefault(f"site{rack // 5}", {"vars": {"ntp": f"ntp{rack // 5}.example.com"}, "children": {}})
        site["children"][f"rack{rack:02d}"] = {"vars": {"rack": rack, "switch": f"sw{rack}"}, "hosts": members}
    inventory = {"all": {"vars": {"ansible_user": "fleet"}, "children": sites}}
    path.write_text(yaml.safe_dump(inventory, sort_keys=False))


ROOT = Path(__file__).resolve().parent.parent
FLEETCTL = [sys.executable, "-c", "import sys; from fleetctl.cli import main; sys.exit(main())"]  # this checkout's


def timed(command: list[str], work: str) -> float:
    """Seconds *command* takes, Ansible with an empty config so only the inventory counts."""
    config = Path(work) / "ansible.cfg"
    config.touch()
    started = time.perf_counter()
    env = {**os.environ, "ANSIBLE_CONFIG": str(config), "ANSIBLE_HOME": work, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{command[0]} failed: {done.stderr[-500:]}")
    return time.perf_counter() - started


def in_process(path: Path) -> float:
    sys.path.insert(0, str(ROOT))
    from fleetctl.hosts.inventory import load_inventory
    started = time.perf_counter()
    json.dumps(load_inventory(path).to_ansible_list())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--no-ansible", action="store_true", help="skip ansible-inventory (slow at 20k)")
    args = parser.parse_args()
    ansible = None if args.no_ansible else shutil.which("ansible-inventory", path=str(BIN))
    print(f"python {sys.version.split()[0]}, libyaml {'yes' if yaml.__with_libyaml__ else 'no'}, "
          f"{os.cpu_count()} cpus")
    print(f"{'hosts':>7} {'fleetctl load+list':>19} {'fleetctl CLI':>13} {'ansible-inventory':>18}")
    with tempfile.TemporaryDirectory() as work:
        for size in (int(s) for s in args.sizes.split(",")):
            path = Path(work) / f"inv{size}.yml"
            write_inventory(path, size)
            cli = timed([*FLEETCTL, "inventory", str(path), "--list"], work)
            theirs = f"{timed([ansible, '-i', str(path), '--list'], work):17.2f}s" if ansible else f"{'-':>18}"
            print(f"{size:>7} {in_process(path):18.2f}s {cli:12.2f}s {theirs}", flush=True)


if __name__ == "__main__":
    main()
