"""Run records: one JSON file per provision or rollout run under the user's state directory
($XDG_STATE_HOME/fleetctl, else ~/.local/state/fleetctl), so `fleetctl retry RUN_ID` can rerun
a run's failed hosts and a person can read what happened on each."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

from .errors import StateError


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "fleetctl"


def new_run_id(kind: str = "run") -> str:
    return f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"


def save(record: dict, kind: str = "runs") -> Path:
    path = state_dir() / kind / f"{record['run_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer: two threads saving at once must not share a temporary file.
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    return path


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
