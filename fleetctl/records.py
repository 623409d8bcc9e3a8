"""Run records: one JSON file per provision or rollout run under the user's state directory
($XDG_STATE_HOME/fleetctl, else ~/.local/state/fleetctl), so `fleetctl retry RUN_ID` can rerun
a run's failed hosts and a person can read what happened on each. ``atomic_write`` is how every
file fleetctl writes is written (records, fleet.lock, a wheelhouse manifest, audit output, units)."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

from .errors import StateError
from .redact import redact_data


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "fleetctl"


def new_run_id(kind: str = "run") -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"


def now() -> str:
    """The local time as records write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def provision_record(run_id: str, started: str, outcomes: dict, **asked) -> dict:
    """A provision run's record: what was *asked* (inventory, playbook, limit, check), and per host
    its run (steps, facts, stack) with how long it took, or why there is none."""
    hosts = {name: {**o.value.to_dict(), "status": o.status, "duration": round(o.duration, 1)} if o.ok
             else {"status": o.status, "error": o.error, "fix": o.fix} for name, o in outcomes.items()}
    return redact_data({"run_id": run_id, "command": "provision", **asked, "started": started, "hosts": hosts,
                        "finished": now()})


def atomic_write(path: Path, text: str, mode: int | None = None) -> Path:
    """Write *text* to *path* so that a reader sees the old file or the new one, never half of one.
    The temporary file is the writer's own (process and thread): two writers at once must not share
    one (a rollout journal saved from two threads lost its rename that way)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text)
        if mode is not None:
            tmp.chmod(mode)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save(record: dict, kind: str = "runs") -> Path:
    path = state_dir() / kind / f"{record['run_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(redact_data(record), indent=2, default=str))


def load(run_id: str, kind: str = "runs") -> dict:
    path = state_dir() / kind / f"{run_id}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        known = sorted(p.stem for p in (state_dir() / kind).glob("*.json"))[-3:]
        raise StateError(f"no run {run_id!r} in {path.parent}",
                         fix=f"recent runs: {', '.join(known)}" if known else "nothing has run yet") from None
    except ValueError:
        raise StateError(f"{path}: unreadable run record") from None
