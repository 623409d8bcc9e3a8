"""The controller's model store: a model's weights pulled once, every file checksummed, ready to stage.

``fleetctl weights pull MODEL[@REV] [--store DIR]`` fills ``<store>/<name>@<revision>/`` from a directory on
the controller or from the hub, and writes ``<store>/<name>@<revision>.manifest.json``: each file's path,
size and sha256. From the hub (huggingface_hub, imported only then: it honours ``HF_ENDPOINT`` mirrors and
``HF_TOKEN``, which fleetctl never passes on, prints or records) the revision is the commit the hub names
and each LFS file's sha256 is the hub's own, checked against the bytes that arrived: huggingface_hub
reports success on a mismatch (its #3643) and safetensors carries no checksum (its #220). A pull copies
only files that are missing or differ, each through a ``.partial`` file renamed when complete, and writes
the manifest last: an interrupted pull is finished by the next, never taken for a whole one; a pull of a
hub commit the store holds whole downloads nothing. Provision and rollout pull a host's hub fleet_model
the store lacks through :class:`Pulls`, once per run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from fleetctl.apply.models import (  # noqa: F401 - the store's manifest, re-exported for the CLI and tests
    HUB_ID, Manifest, ModelFile, default_store, load_manifest, manifest_path, store_key,
)
from fleetctl.apply.wheelhouse import sha256
from fleetctl.errors import FleetError
from fleetctl.records import atomic_write


def pull(spec: str, store: Path) -> Manifest:
    """MODEL[@REV] into *store*: a directory on the controller (its revision, unless given, the digest of
    its files), else a hub id."""
    ref, _, revision = spec.partition("@")
    if not ref:
        raise FleetError(f"weights pull {spec!r}: name a model (a directory or a hub id such as org/name[@rev])")
    if Path(ref).is_dir():
        return from_directory(Path(ref), revision or None, store)
    if Path(ref).exists() or not HUB_ID.match(ref):
        raise FleetError(f"weights pull: {ref} is neither a directory on this machine nor a hub id (org/name)",
                         fix="name the model's directory, or its hub id with an optional @revision")
    return from_hub(ref, revision or None, store)


def from_directory(source: Path, revision: str | None, store: Path) -> Manifest:
    files = sorted(p for p in source.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(source).parts))
    if not files:
        raise FleetError(f"weights pull: {source} holds no files", fix="name the directory the model was saved to")
    listed = [ModelFile(str(p.relative_to(source)), p.stat().st_size, sha256(p)) for p in files]
    revision = revision or "sha-" + hashlib.sha256(
        json.dumps([[f.path, f.sha256] for f in listed]).encode()).hexdigest()[:12]
    manifest = Manifest(source.resolve().name, revision, str(source.resolve()), tuple(listed))
    return store_files(manifest, {f.path: source / f.path for f in listed}, store)


def from_hub(repo_id: str, revision: str | None, store: Path) -> Manifest:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        raise FleetError("weights pull from the hub needs huggingface_hub on the controller",
                         fix="pip install huggingface_hub, or download the model and pull its directory") from None
    if not sys.stderr.isatty():  # its bars are for a person watching; in a log they bury the one line that counts
        disable_progress_bars()
    try:
        endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it once, at import
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
        held = whole_in(store, f"{repo_id}@{info.sha}")
        if held:  # the commit the revision names now is in the store already: nothing to download
            return held
        with tempfile.TemporaryDirectory(prefix="fleetctl-pull-") as tmp:
            local = Path(snapshot_download(repo_id, revision=info.sha, local_dir=tmp, endpoint=endpoint))
            expected = {s.rfilename: s.lfs.sha256 for s in info.siblings or () if getattr(s, "lfs", None)}
            listed = []
            for name in sorted(s.rfilename for s in info.siblings or ()):
                path = local / name
                got = sha256(path)
                if name in expected and expected[name] != got:
                    raise FleetError(f"weights pull {repo_id}@{info.sha}: {name} arrived with sha256 {got}, the hub "
                                     f"says {expected[name]}", fix="pull again; if it repeats, the mirror serves "
                                                                   "another file than the hub")
                listed.append(ModelFile(name, path.stat().st_size, got))
            manifest = Manifest(repo_id, str(info.sha), "hub", tuple(listed))
            return store_files(manifest, {f.path: local / f.path for f in listed}, store)
    except FleetError:
        raise
    except Exception as exc:  # the hub's errors (network, 401, missing revision) are one line here
        raise FleetError(f"weights pull {repo_id}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                         fix="check the model id and revision, HF_ENDPOINT and HF_TOKEN") from None


def whole_in(store: Path, model: str) -> Manifest | None:
    """The store's manifest of NAME@REVISION where each of its files is there at its size (None: pull it)."""
    try:
        manifest = load_manifest(store, model)
    except FleetError:
        return None
    folder = store / manifest.key
    whole = all((folder / f.path).is_file() and (folder / f.path).stat().st_size == f.size for f in manifest.files)
    return manifest if whole else None


class Pulls:
    """One run's pulls from the hub for hosts whose fleet_model names a hub model not yet in the store: each
    model once, the other hosts naming it waiting for that pull (and its failure, said to each)."""

    def __init__(self, pull=pull):
        self._pull, self._lock, self._each, self._done = pull, threading.Lock(), {}, {}

    def __call__(self, spec: str, store: Path) -> Manifest:
        with self._lock:
            one = self._each.setdefault((spec, store), threading.Lock())
        with one:
            if (spec, store) not in self._done:
                try:
                    self._done[spec, store] = self._pull(spec, store)
                except FleetError as exc:
                    self._done[spec, store] = exc
        got = self._done[spec, store]
        if isinstance(got, FleetError):
            raise got
        return got


def store_files(manifest: Manifest, sources: dict[str, Path], store: Path) -> Manifest:
    """Copy into ``<store>/<key>/`` each file that is missing or differs, then write the manifest."""
    folder = store / manifest.key
    for f in manifest.files:
        dest = folder / f.path
        if dest.is_file() and dest.stat().st_size == f.size and sha256(dest) == f.sha256:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        try:
            shutil.copyfile(sources[f.path], partial)
            os.replace(partial, dest)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise FleetError(f"weights pull: copying {f.path} into {folder}: {exc.strerror or exc}",
                             fix="free space there or choose another --store") from None
    atomic_write(manifest_path(store, manifest.key), json.dumps(manifest.to_dict(), indent=1) + "\n")
    return manifest


def verify(manifest: Manifest, folder: Path) -> list[str]:
    """The files of *manifest* that are missing under *folder* or whose size or sha256 differ (empty: whole)."""
    bad = []
    for f in manifest.files:
        path = folder / f.path
        if not path.is_file():
            bad.append(f"{f.path}: missing")
        elif path.stat().st_size != f.size:
            bad.append(f"{f.path}: {path.stat().st_size} bytes, not {f.size}")
        elif sha256(path) != f.sha256:
            bad.append(f"{f.path}: sha256 differs")
    return bad
