"""A model's weights staged onto a host from the controller's store, resumable and verified there.

The store (``fleetctl weights pull``, :mod:`fleetctl.fleet.weights`) holds ``<store>/<name>@<revision>/`` and
its manifest: every file's path, size and sha256. A host whose ``fleet_model`` names a stored model
(``NAME@REVISION``) gets it in ``<fleet_root>/models/<name>@<revision>/`` before its proofs, and vLLM serves
that path (the hub stays offline). The host's state lists what it holds (size and mtime of each file,
``.partial`` copies included) and ``.fleetctl-verified.json``, the size and mtime of each file when its
sha256 was last checked there. A file verified and not changed since is not sent again; a ``.partial``
copy is continued from where it stopped; every file sent is hashed on the host before it takes its name,
so a file under its final name is one whose sha256 matched. A file changed after it was verified (its
mtime moved) is sent again whole.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping

from fleetctl.apply.execute import Action, Planned, Step
from fleetctl.errors import FleetError
from fleetctl.records import data_dir
from fleetctl.reach.connection import Result
from fleetctl.status import Status

VERIFIED = ".fleetctl-verified.json"  # in a staged model's directory on the host


@dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the model's directory
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a model's directory holds, file by file: what staging copies and every host verifies."""

    name: str  # the hub id, or the controller directory's name
    revision: str
    source: str  # "hub" or the directory pulled from
    files: tuple[ModelFile, ...]

    @property
    def key(self) -> str:
        return store_key(f"{self.name}@{self.revision}")

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        return {"name": self.name, "revision": self.revision, "source": self.source, "size": self.size,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files]}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        files = tuple(ModelFile(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"])
        return cls(str(data["name"]), str(data["revision"]), str(data["source"]), files)


def store_key(model: str) -> str:
    """NAME@REVISION as the store and hosts name the model's directory: a hub id's "/" as "--"."""
    return model.replace("/", "--")


def default_store() -> Path:
    return data_dir() / "models"


def manifest_path(store: Path, key: str) -> Path:
    return store / f"{key}.manifest.json"


def load_manifest(store: Path, model: str) -> Manifest:
    """The manifest of NAME@REVISION (a hub id's "/" allowed, as pull printed it)."""
    key = store_key(model)
    if not re.fullmatch(r"[\w.+-]+@[\w.+-]+", key) or key.startswith("."):
        raise FleetError(f"{key!r} names no model of a store", fix="name it as weights pull printed it: NAME@REVISION")
    path = manifest_path(store, key)
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FleetError(f"no model {key} in the store {store}", fix=f"fleetctl weights pull MODEL --store {store}") \
            from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FleetError(f"{path}: not a model manifest ({exc})", fix="pull the model again") from None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(model: str) -> bool:
    """Whether MODEL[@REV] names a hub repository (org/name): one `weights pull` can bring it to the store."""
    return bool(HUB_ID.match(model.partition("@")[0]))


def is_stored(value: str) -> bool:
    """Whether a fleet_model names a model of the store (NAME@REVISION; a hub model's org/name@rev is one, pulled
    first), not a path on the host or a hub id without a revision (vLLM's own to download)."""
    return "@" in value and not value.startswith(("/", "."))


def digest(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest.to_dict()["files"], sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StagedModel:
    """A stored model and where it goes on one host, with what the host holds of it now."""

    manifest: Manifest
    local: Path  # <store>/<key>
    remote: str  # <fleet_root>/models/<key>
    held: Mapping[str, tuple[int, float]]  # path → (size, mtime) of the files the host has there
    verified: Mapping  # the host's VERIFIED marker: {"manifest": digest, "files": {path: [size, mtime]}}
    rate: float | None = None  # fleet_model_bandwidth: each copy to this host at most so many bytes a second

    @cached_property
    def marks(self) -> Mapping:
        """The marker's size and mtime of each file, where the marker is of this manifest ({} where not)."""
        return self.verified.get("files", {}) if self.verified.get("manifest") == digest(self.manifest) else {}

    def wrong(self, f: ModelFile) -> str | None:
        """Why the host's copy of *f* is not known good (None: verified there, and not changed since)."""
        have, mark = self.held.get(f.path), self.marks.get(f.path)
        if have is None:
            return "missing"
        if have[0] != f.size:
            return f"{have[0]} bytes, not {f.size}"
        if not mark:
            return "not verified there"
        if mark[0] != have[0] or abs(have[1] - float(mark[1])) >= 1e-6:
            return "changed since it was verified"
        return None

    def pending(self) -> list[tuple[ModelFile, int]]:
        """The files to send, each with the bytes of its ``.partial`` copy to continue from (0: whole)."""
        todo = []
        for f in self.manifest.files:
            if self.wrong(f) is None:
                continue
            partial = self.held.get(f"{f.path}.partial", (0, 0.0))[0]
            todo.append((f, partial if 0 < partial < f.size else 0))
        return todo

    def check_input(self, files: list[ModelFile], dry: bool = False) -> str:
        """VERIFY's stdin: the script, then what to check (*dry*: the named files themselves, nothing changed)."""
        spec = json.dumps({"dir": self.remote, "manifest": digest(self.manifest), "dry": dry,
                           "check": [{"path": f.path, "sha256": f.sha256} for f in files],
                           "files": [f.path for f in self.manifest.files]})
        return f"SPEC = {spec!r}\n{VERIFY}"


def stage(model: StagedModel, python: str) -> Step | Planned:
    """The "model" step: send what the host lacks (continuing partial copies), hash it there, name it."""
    m, todo = model.manifest, model.pending()
    if not todo:
        return Step("model", Status.OK, f"{m.key}: {len(m.files)} files verified on the host")
    send = sum(f.size - offset for f, offset in todo)
    dirs = sorted({str(Path(model.remote, f.path).parent) for f, _ in todo})
    need_kb = send // 1024 + 1
    where = shlex.quote(model.remote)
    room = (f"mkdir -p {' '.join(map(shlex.quote, dirs))} && avail=$(df -Pk {where} | awk 'NR==2 {{print $4}}') && "
            f"[ \"$avail\" -ge {need_kb} ] || {{ echo \"needs {mb(send)} free in {model.remote}, has "
            f"$((avail / 1024)) MB\" >&2; exit 1; }}")
    actions = [Action(f"{m.key}: {mb(send)} to send", room, change=f"create {model.remote}",
                      fails=f"not enough room for {m.key} on the host")]
    for f, offset in todo:
        actions.append(Action(f"{f.path}: " + (f"continue a copy stopped at {mb(offset)}" if offset else
                                              "missing or changed since verified"),
                              f"{model.remote}/{f.path}.partial", put=model.local / f.path, resume=offset > 0,
                              rate=model.rate, change=f"send {f.path} ({mb(f.size - offset)}{capped(model.rate)})"))
    actions.append(Action("every file sent is hashed on the host before it takes its name",
                          f"{shlex.quote(python)} - {shlex.quote(model.remote)}",
                          stdin=model.check_input([f for f, _ in todo]), reads=True,
                          change=f"verify and name {len(todo)} files"))

    def outcome(result: Result) -> Step:
        said = result.stdout.strip().splitlines()[-1:] or [""]
        try:
            verdict = json.loads(said[0])
        except ValueError:
            return Step("model", Status.FAILED, f"verifying {m.key} on the host printed no verdict",
                        tail=(result.stdout + result.stderr)[-2000:])
        if verdict.get("bad"):
            return Step("model", Status.FAILED, f"{m.key}: sha256 differs on the host for {', '.join(verdict['bad'])} "
                                                "(removed: the next provision sends them again)", data=verdict)
        return Step("model", Status.CHANGED, f"{m.key}: sent {len(todo)} of {len(m.files)} files ({mb(send)}) from "
                                             "the controller, sha256 checked on the host",
                    data={**verdict, "bytes": send, "source": "controller"})
    return Planned("model", tuple(actions), outcome, would=f"would send {len(todo)} files of {m.key} ({mb(send)})")


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def capped(rate: float | None) -> str:
    return f" at most {mb(rate)}/s" if rate else ""


# Run by the host's Python (its stdin: SPEC, the JSON of what to check, then this): hashes each sent file's
# .partial copy, names it where its sha256 matches (removes it where not), then writes the marker of every
# file's size and mtime as verified now. Prints one JSON line.
VERIFY = r"""import hashlib, json, os, sys
spec = json.loads(SPEC)
root, bad, done, dry = spec["dir"], [], 0, spec.get("dry")
for f in spec["check"]:
    path = os.path.join(root, f["path"])
    h = hashlib.sha256()
    try:
        with open(path if dry else path + ".partial", "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
    except OSError:
        bad.append(f["path"])
        continue
    if dry:
        done += h.hexdigest() == f["sha256"]
        if h.hexdigest() != f["sha256"]:
            bad.append(f["path"])
    elif h.hexdigest() == f["sha256"]:
        os.replace(path + ".partial", path)
        done += 1
    else:
        os.unlink(path + ".partial")
        bad.append(f["path"])
if dry:
    print(json.dumps({"verified": done, "bad": bad}))
    sys.exit(1 if bad else 0)
marks = {}
for name in spec["files"]:
    try:
        st = os.stat(os.path.join(root, name))
    except OSError:
        continue
    marks[name] = [st.st_size, st.st_mtime]
with open(os.path.join(root, ".fleetctl-verified.json.tmp"), "w") as out:
    json.dump({"manifest": spec["manifest"], "files": marks}, out)
os.replace(os.path.join(root, ".fleetctl-verified.json.tmp"), os.path.join(root, ".fleetctl-verified.json"))
print(json.dumps({"verified": done, "bad": bad}))
sys.exit(1 if bad else 0)
"""


def held_script(directory: str) -> str:
    """The state's sections for a staged model: each file's size, mtime and path, then the marker."""
    where = shlex.quote(directory)
    return (f"echo @@staged; find {where} -type f ! -name {VERIFIED} -printf '%s %T@ %P\\n' 2>/dev/null; "
            f"echo @@verified; cat {where}/{VERIFIED} 2>/dev/null; echo")


def parse_held(lines: list[str]) -> dict[str, tuple[int, float]]:
    held = {}
    for line in lines:
        size, _, rest = line.strip().partition(" ")
        mtime, _, path = rest.partition(" ")
        if size.isdigit() and path:
            try:
                held[path] = (int(size), float(mtime))
            except ValueError:
                continue
    return held


# ---------------------------------------------------------------- host to host, within a region

class Sources:
    """One run's copies of stored models, region by region (decide.transfer's rule, applied as hosts finish):
    the first host of a region to need a model gets it from the controller (the region's seed); the others
    wait for a host of their region that holds a verified copy and copy from it, at most *per_source* at once
    from each. Copies never cross regions."""

    def __init__(self, per_source: int = 2):
        self.per_source = per_source
        self.holders: dict[tuple[str, str], dict[str, int]] = {}  # (model key, region) → holder → copies now
        self.hosts: dict[str, tuple[object, str]] = {}  # holder → its inventory Host and its copy's directory
        self.seeding: dict[tuple[str, str], str] = {}
        self._changed = threading.Condition()

    def claim(self, key: str, region: str, host: str, timeout: float) -> tuple[object, str] | None:
        """The host to copy from (its inventory Host and the directory of its copy), or None: from the
        controller (*host* seeds its region, or waited *timeout* for a holder)."""
        end, where = time.monotonic() + timeout, (key, region)
        with self._changed:
            while True:
                free = sorted((n, h) for h, n in self.holders.get(where, {}).items()
                              if n < self.per_source and h != host)
                if free:
                    self.holders[where][free[0][1]] += 1
                    return self.hosts[free[0][1]]
                if not self.holders.get(where) and self.seeding.setdefault(where, host) == host:
                    return None
                if not self._changed.wait(max(0.0, end - time.monotonic())):
                    return None

    def done(self, key: str, region: str, host, source=None, holds: str | None = None) -> None:
        """*host* (an inventory Host) ended its copy (from *source*, a Host, or the controller); *holds*: the
        directory of the verified copy it has now, which it serves to its region."""
        where = (key, region)
        with self._changed:
            if source is not None:
                self.holders[where][source.name] -= 1
            if self.seeding.get(where) == host.name:
                del self.seeding[where]
            if holds:
                self.holders.setdefault(where, {}).setdefault(host.name, 0)
                self.hosts[host.name] = (host, holds)
            self._changed.notify_all()


def address_of(host) -> str:
    """Where the hosts of its region reach *host*: fleet_transfer_address, else the inventory's address."""
    return str(host.vars.get("fleet_transfer_address") or host.vars.get("ansible_host") or host.name)


def fetch(model: StagedModel, python: str, url: str, source: str) -> Planned:
    """The "model" step from a host of the region: *url* (its server's, with the transfer's one-time token:
    given on stdin, never in argv or the record) serves the files; each pending file is fetched into its
    ``.partial`` copy, continued from its end with an HTTP range, then hashed and named as from the controller."""
    plan, todo = stage(model, python), model.pending()
    if isinstance(plan, Step):
        return plan
    spec = json.dumps({"url": url, "dir": model.remote, "rate": model.rate,
                       "files": [{"path": f.path, "offset": offset} for f, offset in todo]})
    get = Action(f"{len(todo)} files from {source}, a host of this region that holds a verified copy",
                 f"{shlex.quote(python)} -", stdin=f"SPEC = {spec!r}\n{FETCH}",
                 change=f"fetch {len(todo)} files from {source}{capped(model.rate)}",
                 fails=f"fetching from {source} failed")
    room, *_, verify = plan.actions
    return Planned("model", (room, get, verify), lambda r: _from(plan.outcome(r), source),
                   would=f"would fetch {len(todo)} files of {model.manifest.key} from {source}")


def _from(step: Step, source: str) -> Step:
    if step.status != Status.CHANGED:
        return step
    return Step(step.name, step.status, step.detail.replace("from the controller", f"from {source} (host to host)"),
                data={**step.data, "source": source})


# Run by a source host's Python, held open by the controller: serves the model's directory read-only over
# HTTP on a port of its own, under a one-time token it prints with the port ("serving PORT TOKEN"), with
# ranges (a cut copy continues), until its stdin closes.
SERVE = r"""import http.server, os, secrets, shutil, sys, threading, urllib.parse
root, token = os.path.realpath(sys.argv[1]), secrets.token_urlsafe(24)
class Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        prefix = "/" + token + "/"
        path = os.path.realpath(os.path.join(root, urllib.parse.unquote(self.path[len(prefix):])))
        if not self.path.startswith(prefix) or not path.startswith(root + os.sep) or not os.path.isfile(path):
            self.send_error(404)
            return
        size, start = os.path.getsize(path), 0
        if (self.headers.get("Range") or "").startswith("bytes="):
            start = min(int(self.headers["Range"][6:].split("-")[0] or 0), size)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            shutil.copyfileobj(f, self.wfile, 1 << 20)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Files)
print("serving", server.server_address[1], token, flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
"""

# Run by the receiving host's Python (stdin: SPEC, then this): each file into its .partial copy, from the
# end of what is there (an HTTP range), until the server has sent it all, at most spec["rate"] bytes a second.
FETCH = r"""import json, os, time, urllib.parse, urllib.request
spec = json.loads(SPEC)
start, got = time.monotonic(), 0
for f in spec["files"]:
    partial = os.path.join(spec["dir"], f["path"]) + ".partial"
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    have = os.path.getsize(partial) if f["offset"] and os.path.exists(partial) else 0
    request = urllib.request.Request(spec["url"] + urllib.parse.quote(f["path"]),
                                     headers={"Range": "bytes=%d-" % have} if have else {})
    with urllib.request.urlopen(request, timeout=60) as answer, open(partial, "ab" if have else "wb") as out:
        if have and answer.status != 206:
            out.truncate(0)
        while block := answer.read(1 << 18):
            out.write(block)
            got += len(block)
            ahead = got / spec["rate"] - (time.monotonic() - start) if spec["rate"] else 0
            if ahead > 0:
                time.sleep(ahead)
"""
