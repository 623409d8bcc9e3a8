"""Class caches: the kernels one host of a class compiled, kept on the controller and pushed to the others.

A stack's proofs and servers compile into ``<env>/cache`` (:func:`fleetctl.decide.classcache.cache_env`).
The first host of a class whose validate and smoke passed in a run (the canary) sends that tree back as one
tar; the controller keeps it in its store by the class key (``$XDG_DATA_HOME/fleetctl/class-caches/<key
id>.tar``, beside ``<key id>.json``: the key, the tar's sha256 and size, the host it came from). Another host
of the class gets it before its validate: copied with its sha256, checked on the host, unpacked, and
``<env>/cache/fleetctl-cache.json`` says which key it holds. A stored cache whose tar does not match its
recorded sha256, or whose record names another key, is never pushed (the host compiles for itself, and
the step says why).

Within one run the hosts of a class that has no stored cache wait for its canary (:class:`ClassCaches`):
the first to ask builds, the others wait until it stored the cache or gave up; once a canary gives up no
host of that run waits for the class again, so a stack that fails does not fail host after host in turn.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fleetctl.apply.execute import Action, Planned, Step
from fleetctl.apply.target import q
from fleetctl.apply.wheelhouse import sha256
from fleetctl.decide.classcache import CACHE_MARKER, CacheKey
from fleetctl.records import data_dir
from fleetctl.status import Status

TAR = "class-cache.tar"  # a cache in transit: in the fleet_root (sent back) or the environment (pushed)


def store_dir() -> Path:
    return data_dir() / "class-caches"


@dataclass(frozen=True)
class Stored:
    """A class cache in the controller's store."""

    key: str  # the key's id
    sha256: str
    bytes: int
    host: str  # the canary it came from
    path: Path

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


class Store:
    """The controller's class caches, one ``<key id>.tar`` and its ``<key id>.json`` each."""

    def __init__(self, root: Path | None = None):
        self.root = root or store_dir()
        self._hashed: dict[Path, tuple[tuple[int, int], str]] = {}  # tar → ((mtime_ns, size), sha256)

    def meta(self, key: CacheKey) -> Path:
        return self.root / f"{key.id}.json"

    def get(self, key: CacheKey) -> Stored | str | None:
        """The verified cache of *key*; None where there is none; why not where one is there but is not to be
        trusted (its record names another key, or the tar is not what was stored)."""
        try:
            record = json.loads(self.meta(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return f"class cache {key.id}: its record is unreadable ({exc})"
        if not isinstance(record, dict) or record.get("key") != key.to_dict():
            return f"class cache {key.id}: its record names another key; not pushed"
        tar = self.root / f"{key.id}.tar"
        try:
            sha = self._sha256(tar)
        except OSError:
            return f"class cache {key.id}: {tar} is missing"
        if sha != record.get("sha256"):
            return f"class cache {key.id}: {tar} does not match its recorded sha256; not pushed"
        return Stored(key.id, sha, tar.stat().st_size, str(record.get("host")), tar)

    def _sha256(self, tar: Path) -> str:
        """The tar's sha256, hashed again only where its mtime or size moved (a fleet's hosts ask once each)."""
        st = tar.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if self._hashed.get(tar, ((), ""))[0] != stamp:
            self._hashed[tar] = (stamp, sha256(tar))
        return self._hashed[tar][1]

    def put(self, key: CacheKey, tar: Path, host: str) -> Stored:
        """Keep *tar* (moved into the store) as the cache of *key*, built on *host*; the record is written
        last, so a store interrupted half way holds no cache at all."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{key.id}.tar"
        self.meta(key).unlink(missing_ok=True)
        shutil.move(str(tar), final)
        stored = Stored(key.id, sha256(final), final.stat().st_size, host, final)
        record = {"key": key.to_dict(), "sha256": stored.sha256, "bytes": stored.bytes, "host": host,
                  "stored": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        part = self.meta(key).with_suffix(".partial")
        part.write_text(json.dumps(record, indent=1) + "\n")
        part.replace(self.meta(key))
        return stored


class ClassCaches:
    """One run's class caches: the store, and which host of each class is building its cache now."""

    def __init__(self, store: Store | None = None):
        self.store = store or Store()
        self.building: dict[str, str] = {}  # key id → the canary building it
        self.given_up: set[str] = set()  # classes whose canary stored nothing: no host waits for them again
        self.waiting: dict[str, int] = {}
        self._changed = threading.Condition()

    def claim(self, key: CacheKey, host: str, timeout: float) -> Stored | str | None:
        """The class's stored cache for *host* to receive; else *host* compiles for itself (None, or why the
        stored one was refused) — as the class's canary (:meth:`canary`) where no other host builds it, or
        after the canary gave up, or after waiting *timeout* for it."""
        end = time.monotonic() + timeout
        with self._changed:
            while True:
                stored = self.store.get(key)
                if isinstance(stored, Stored) or key.id in self.given_up:
                    return stored
                if self.building.setdefault(key.id, host) == host:
                    return stored
                self.waiting[key.id] = self.waiting.get(key.id, 0) + 1
                woke = self._changed.wait(max(0.0, end - time.monotonic()))
                self.waiting[key.id] -= 1
                if not woke:
                    return stored

    def canary(self, key: CacheKey, host: str) -> bool:
        with self._changed:
            return self.building.get(key.id) == host

    def done(self, key: CacheKey, host: str) -> None:
        """*host* ended its part for *key*: stored a cache, or not (then the class is given up this run)."""
        with self._changed:
            if self.building.get(key.id) == host:
                del self.building[key.id]
                if not isinstance(self.store.get(key), Stored):
                    self.given_up.add(key.id)
            self._changed.notify_all()

    def wait_for_waiters(self, key: CacheKey, count: int, timeout: float) -> None:
        """Until *count* hosts wait for *key*'s canary (for tests: a condition, not a sleep)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._changed:
                if self.waiting.get(key.id, 0) >= count:
                    return
                self._changed.wait(0.05)
        raise TimeoutError(f"{count} hosts did not wait for class cache {key.id}")


# ---------------------------------------------------------------- the actions on a host

def push(key: CacheKey, stored: Stored, cache: str) -> Planned:
    """Copy *stored* to the host, check its sha256 there, unpack it into *cache* and mark which key it holds."""
    env = cache.rsplit("/", 1)[0]
    tar = f"{env}/{TAR}"
    marker = json.dumps({"key": key.id, "class": key.to_dict(), "sha256": stored.sha256, "from": stored.host})
    unpack = (f"echo {q(stored.sha256 + '  ' + tar)} | sha256sum -c --status || "
              f"{{ rm -f {q(tar)}; echo 'the copy does not match its sha256' >&2; exit 1; }}; "
              f"rm -rf {q(cache)} && mkdir -p {q(cache)} && tar -xf {q(tar)} -C {q(cache)} && rm -f {q(tar)} && "
              f"printf '%s\\n' {q(marker)} > {q(cache)}/{CACHE_MARKER} || {{ rm -rf {q(cache)} {q(tar)}; exit 1; }}")
    size = f"{stored.bytes / 1e6:.1f} MB"
    detail = f"class cache {key.id} from {stored.host} ({size}, sha256 checked on the host)"
    return Planned("cache", (
        Action(f"the class's cache, built on {stored.host}", tar, put=stored.path, change=f"copy {size} of kernels"),
        Action("what was copied is what was stored", unpack, change=f"unpack into {cache}",
               fails="the class cache did not unpack"),
    ), lambda _: Step("cache", Status.CHANGED, detail, data={"key": key.id, "from": stored.host,
                                                             "bytes": stored.bytes, "sha256": stored.sha256}),
        would=f"would push {detail}")


def capture(key: CacheKey, cache: str, root: str, local: Path) -> Planned:
    """Pack the canary's *cache* into one tar in *root* and bring it to *local* on the controller."""
    tar = f"{root}/{TAR}"
    marker = json.dumps({"key": key.id, "class": key.to_dict(), "from": "here"})
    pack = (f"mkdir -p {q(cache)} && printf '%s\\n' {q(marker)} > {q(cache)}/{CACHE_MARKER} && "
            f"tar -cf {q(tar)} -C {q(cache)} --exclude {CACHE_MARKER} . && chmod 644 {q(tar)}")
    return Planned("cache", (
        Action("the canary's validate and smoke passed: its compiled kernels serve the class", pack,
               change=f"pack {cache}", fails="packing the class cache failed"),
        Action("kept on the controller by the class key", tar, get=local),
        Action("the copy is on the controller", f"rm -f {q(tar)}", change=f"remove {tar}"),
    ), lambda _: Step("cache", Status.CHANGED, f"class cache {key.id} built here", data={"key": key.id}),
        would=f"would keep this host's compiled kernels as class cache {key.id}")


def clear(cache: str, held: str) -> Planned:
    """A canary whose cache holds another class's kernels (*held*: that key's id) starts from none, so that what
    it keeps is its class's alone."""
    return Planned("cache", (Action(f"it holds class {held}'s kernels, not this class's", f"rm -rf {q(cache)}",
                                    change=f"clear {cache}", fails=f"clearing {cache} failed"),),
                   lambda _: Step("cache", Status.CHANGED, f"cleared the kernels of class {held}: this host builds "
                                                           "its class's cache"),
                   would=f"would clear the kernels of class {held}")
