"""The ``fleetctl`` command line: parses arguments, calls the library, prints with
rich (through :mod:`fleetctl.report`), and returns an exit status:
0 all ok, 2 some host failed or timed out, 4 some host unreachable and none
failed, 1 fleetctl's own error (bad input; nothing contacted)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from . import report
from .errors import FleetError
from .facts import gather
from .fanout import EXIT_ERROR, EXIT_FAILED, exit_code, fan_out
from .inventory import load_inventory
from .matrix import load_matrix
from .plan import Lock, plan_host


def host_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("inventory", help="Ansible YAML inventory")
    common.add_argument("-l", "--limit", help="host pattern, as Ansible's --limit")
    common.add_argument("-f", "--forks", type=int, default=50, help="hosts at a time (default 50)")
    common.add_argument("-T", "--timeout", type=float, default=60.0, help="seconds per host (default 60)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return common


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetctl", description="Provision and keep right GPU serving fleets.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("facts", parents=[host_options()], help="gather every host's facts")
    plan = sub.add_parser("plan", parents=[host_options()], help="resolve each host's stack; change nothing")
    plan.add_argument("--cuda", help="what if the fleet moved to this CUDA (e.g. 12.9)")
    plan.add_argument("--vllm", help="vLLM policy: latest, a version or a range (default: fleet_vllm or latest)")
    plan.add_argument("--mode", choices=["venv", "container"], help="install mode (default: fleet_mode or venv)")
    plan.add_argument("--matrix", help="another compatibility matrix file")
    plan.add_argument("--write-lock", nargs="?", const="", metavar="PATH",
                      help="write fleet.lock (default: beside the inventory)")
    inv = sub.add_parser("inventory", help="show the inventory as ansible-inventory does")
    inv.add_argument("inventory")
    inv.add_argument("--list", action="store_true", required=True, help="JSON, as ansible-inventory --list")
    return p


def cmd_inventory(args, console: Console) -> int:
    print(json.dumps(load_inventory(args.inventory).to_ansible_list(), indent=4, sort_keys=True))
    return 0


def cmd_facts(args, console: Console) -> int:
    hosts = load_inventory(args.inventory).select(args.limit)
    with report.progress(console, len(hosts), "facts") as advance:
        outcomes = fan_out(hosts, gather, forks=args.forks, timeout=args.timeout, on_done=advance)
    if args.json:
        print(json.dumps({"hosts": {
            name: {"status": "ok", "facts": o.value.to_dict()} if o.ok else {"status": o.status, "error": o.error}
            for name, o in outcomes.items()
        }}, indent=2))
    else:
        console.print(report.facts_table(outcomes.values()))
        report.print_errors(console, outcomes.values())
        report.print_summary(console, list(outcomes.values()))
    return exit_code(outcomes.values())


def lock_path(args) -> Path:
    return Path(args.write_lock) if args.write_lock else Path(args.inventory).resolve().parent / "fleet.lock"


def cmd_plan(args, console: Console) -> int:
    matrix = load_matrix(args.matrix)
    hosts = load_inventory(args.inventory).select(args.limit)
    with report.progress(console, len(hosts), "facts") as advance:
        outcomes = fan_out(hosts, gather, forks=args.forks, timeout=args.timeout, on_done=advance)
    plans = {name: plan_host(o.host, o.value, matrix, cuda=args.cuda, vllm=args.vllm, mode=args.mode)
             for name, o in outcomes.items() if o.ok}
    if args.write_lock is not None:
        path = lock_path(args)
        lock = Lock.read(path) if path.exists() else Lock(path)
        for name, p in plans.items():
            lock.record(name, p.facts, p.request, p.resolution, matrix.digest)
        lock.write()
        console.print(f"wrote {path}", highlight=False)
    if args.json:
        print(json.dumps({"hosts": {name: plans[name].to_json() if name in plans
                                    else {"status": o.status, "error": o.error}
                                    for name, o in outcomes.items()}}, indent=2))
    else:
        console.print(report.plan_table(plans.values(), args.cuda))
        report.print_errors(console, outcomes.values())
        report.print_refusals(console, plans.values())
    refused = any(not p.resolution.ok for p in plans.values())
    return EXIT_FAILED if refused else exit_code(outcomes.values())  # a refusal counts as a failed host


COMMANDS = {"facts": cmd_facts, "inventory": cmd_inventory, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    to_stderr = args.__dict__.get("json", False)
    stream = sys.stderr if to_stderr else sys.stdout
    # Piped output is read by people too: don't squeeze tables into 80 columns.
    console = Console(stderr=to_stderr, width=None if stream.isatty() else 200)
    try:
        return COMMANDS[args.command](args, console)
    except FleetError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]fleetctl: error:[/] {exc}", highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        Console(stderr=True).print("fleetctl: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
