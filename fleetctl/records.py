"""Run records: one JSON file per provision or rollout run under the user's state directory
($XDG_STATE_HOME/fleetctl, else ~/.local/state/fleetctl), so `fleetctl retry RUN_ID` can rerun
a run's failed hosts and a person can read what happened on each. ``atomic_write`` is how every
file fleetctl writes is written (records, fleet.lock, a wheelhouse manifest, audit output, units);
``read_state`` is how every state file it reads back is read (run records, rollout journals,
audit snapshots, fleet.lock): a file that is missing, unreadable or not the shape it should be is
one StateError naming the file and what is wrong, never a traceback. ``check_yaml_expansion`` is
the limit on YAML aliases every YAML fleetctl reads goes through."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from fleetctl.errors import FleetError, StateError
from fleetctl.redact import redact_data

# A document whose aliases expand past this many nodes is refused: a few lines of nested anchors
# ("billion laughs") would otherwise expand to more objects than the controller has memory for.
MAX_YAML_NODES = 1_000_000


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "fleetctl"


def data_dir() -> Path:
    """What fleetctl keeps for later runs on the controller (models, class caches): $XDG_DATA_HOME/fleetctl."""
    return Path(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")) / "fleetctl"


def new_run_id(kind: str = "run") -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"


def now() -> str:
    """The local time as records write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def provision_record(run_id: str, started: str, outcomes: dict, **asked) -> dict:
    """A provision run's record: what was *asked* (inventory, playbook, limit, check, and the options
    a retry must repeat), and per host its run (steps, facts, stack) with how long it took, or why
    there is none."""
    hosts = {name: {**o.value.to_dict(), "status": o.status, "duration": round(o.duration, 1)} if o.ok
             else {"status": o.status, "error": o.error, "fix": o.fix} for name, o in outcomes.items()}
    return redact_data({"run_id": run_id, "command": "provision", **asked, "started": started, "hosts": hosts,
                        "finished": now()})


def atomic_write(path: Path, text: str, mode: int | None = None) -> Path:
    """Write *text* to *path* so that a reader sees the old file or the new one, never half of one.
    The temporary file is the writer's own (process and thread): two writers at once must not share
    one (a rollout journal saved from two threads lost its rename that way). A file that cannot be
    written is a StateError naming it."""
    path = Path(path)
    if path.is_dir():
        raise StateError(f"cannot write {path}: it is a directory", fix="name a file, not a directory")
    if not path.parent.is_dir():
        raise StateError(f"cannot write {path}: no directory {path.parent}",
                         fix="create the directory first, or name a file in one that exists")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text)
        if mode is not None:
            tmp.chmod(mode)
        tmp.replace(path)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def dumps(record: dict) -> str:
    """A record as text, its credentials redacted: the one form a record takes on disk and in --json
    (a rollout's --json once printed the request's token that its journal on disk hid)."""
    return json.dumps(redact_data(record), indent=2, default=str)


def ready(kind: str = "runs") -> Path:
    """The directory records of *kind* go to, made and checked writable: a run calls it before it
    contacts any host, so a run that changed hosts can always leave its record."""
    directory = state_dir() / kind
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot make the records directory {directory}: {exc.strerror or exc}",
                         fix="set XDG_STATE_HOME to a directory this user can write") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StateError(f"cannot write records in {directory}: permission denied",
                         fix="set XDG_STATE_HOME to a directory this user can write")
    return directory


def save(record: dict, kind: str = "runs") -> Path:
    return atomic_write(ready(kind) / f"{record['run_id']}.json", dumps(record))


# What each kind of record must hold to be used: key → type.
SHAPES = {
    "runs": {"run_id": str, "hosts": dict, "inventory": str, "playbook": str},
    "rollouts": {"run_id": str, "inventory": str, "overrides": dict, "status": str, "waves": list, "hosts": dict,
                 "left_alone": dict, "budget": int, "lock": str},
    "audits": {"run_id": str, "facts": dict},
}
NOUNS = {"runs": "run", "rollouts": "rollout", "audits": "audit"}


def load(run_id: str, kind: str = "runs") -> dict:
    """The record *run_id* of *kind* (runs, rollouts, audits), checked for the keys its readers use."""
    path = state_dir() / kind / f"{run_id}.json"
    noun = NOUNS.get(kind, "record")
    if "/" in run_id or run_id.startswith(".") or not path.is_file():
        known = sorted(p.stem for p in (state_dir() / kind).glob("*.json"))[-3:]
        raise StateError(f"no {noun} {run_id!r} in {state_dir() / kind}",
                         fix=f"recent: {', '.join(known)}" if known else "nothing has run yet")
    return read_state(path, f"{noun} record", json.loads, shape=SHAPES.get(kind, {}))


def read_state(path: Path, what: str, parse: Callable[[str], Any], *, shape: dict[str, type] | None = None,
               fix: str | None = None) -> Any:
    """The state file *path* parsed by *parse*: a mapping holding each key of *shape* with its type.
    Whatever is wrong (missing, not text, not JSON or YAML, a list, a key missing) is one
    StateError naming the file, *what* it should be and the fault."""
    path = Path(path)

    def bad(fault: str) -> StateError:
        return StateError(f"{path}: {fault}, not a usable {what}", fix=fix or "remove or restore it")

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StateError(f"{path}: no {what}", fix=fix) from None
    except IsADirectoryError:
        raise bad("a directory") from None
    except UnicodeDecodeError:
        raise bad("binary data") from None
    except OSError as exc:
        raise bad(f"unreadable ({exc.strerror or exc})") from None
    try:
        data = parse(text)
    except FleetError as exc:
        raise bad(exc.message) from None
    except (ValueError, yaml.YAMLError) as exc:
        reason = "truncated or not JSON" if isinstance(exc, ValueError) else "not valid YAML"
        raise bad(reason) from None
    if not isinstance(data, dict):
        raise bad(f"a {type(data).__name__} where a mapping belongs" if data is not None else "an empty file")
    for key, kind in (shape or {}).items():
        if not isinstance(data.get(key), kind):
            found = "missing" if key not in data else f"a {type(data[key]).__name__}"
            raise bad(f"'{key}' is {found} (a {kind.__name__} belongs there)")
    return data


# ---------------------------------------------------------------- YAML limits

def check_yaml_expansion(root: Node | None, where: str, error: type[FleetError] = StateError) -> None:
    """Refuse a YAML document whose aliases expand past MAX_YAML_NODES nodes (or into themselves).
    Counted on the composed node graph, where an alias is the anchored node itself, so the count
    costs one visit per distinct node however far the aliases would expand."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise error(f"{where}: a YAML alias refers to itself", fix="remove the recursive anchor")
        busy.add(key)
        if isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, SequenceNode):
            children = list(node.value)
        else:
            children = []
        total = 1 + sum(size(child) for child in children)
        busy.discard(key)
        sizes[key] = total
        if total > MAX_YAML_NODES:
            raise error(f"{where}: YAML aliases expand to more than {MAX_YAML_NODES:,} values",
                        fix="write the repeated parts out, or use fewer nested aliases")
        return total

    if root is not None:
        size(root)


def safe_load_yaml(text: str, where: str, error: type[FleetError] = StateError) -> Any:
    """``yaml.safe_load`` with the alias limit: the document is composed, checked, then built (by
    libyaml where present: a thousand hosts' fleet.lock takes the pure-Python parser seconds)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        root = loader.get_single_node()
        check_yaml_expansion(root, where, error)
        return loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()


def retry_argv(record: dict) -> tuple[list[str], list[str]]:
    """The hosts of the run *record* that did not succeed, and the provision arguments that run them again
    with the run's own choices (not today's defaults: a retry installs what the run was asked to)."""
    todo = [name for name, h in record["hosts"].items()
            if not isinstance(h, dict) or h.get("status") not in ("ok", "changed")]
    repeated = [word for option in ("cuda", "vllm", "wheelhouse") if record.get(option)
                for word in (f"--{option}", str(record[option]))]
    return todo, ["provision", record["inventory"], "--playbook", record["playbook"], "--limit", ",".join(todo),
                  *repeated, *(["--revalidate"] if record.get("revalidate") else []),
                  *(["--ignore-health"] if record.get("ignore_health") else []),
                  *(["--check"] if record.get("check") else [])]
