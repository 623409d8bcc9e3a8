"""The ``fleetctl`` command line: parses arguments, calls the library, prints with
rich (through :mod:`fleetctl.report`), and returns an exit status:
0 all ok, 2 some host failed or timed out, 4 some host unreachable and none
failed, 1 fleetctl's own error (bad input; nothing contacted)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from . import report
from .errors import FleetError
from .facts import gather
from .fanout import EXIT_ERROR, exit_code, fan_out
from .inventory import load_inventory


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


COMMANDS = {"facts": cmd_facts, "inventory": cmd_inventory}


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
