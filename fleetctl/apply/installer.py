"""The installer fleetctl carries to hosts: uv's static binary, from the ``uv`` wheel built for the
host's platform (uv is published as one wheel per platform whose only program is the binary,
``uv-<version>.data/scripts/uv``).

The controller takes that wheel from the host's wheelhouse (``fleetctl wheelhouse`` puts it there for
offline hosts), else from its own cache, else downloads it there (``pip download --no-deps`` for the
host's platform tags); it extracts the binary into the cache, checked against the wheel's RECORD, and
names it by its sha256. The install step (:func:`fleetctl.apply.steps.install`) pushes it to
``<fleet_root>/bin/uv`` as a planned copy where the host lacks that file, and the host checks the
sha256 again before running it. A host with uv on its PATH uses its own; ``fleet_installer: pip``
installs with pip.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from fleetctl.apply.wheelhouse import UV_VERSION, Platform, sha256 as file_sha256, uv_download_args as download_args, wheel_for
from fleetctl.redact import redact

INSTALLERS = ("auto", "uv", "pip")  # fleet_installer: auto is uv (the host's, else carried), else pip

Download = Callable[[list[str]], subprocess.CompletedProcess]


@dataclass(frozen=True)
class UvBinary:
    """uv's binary on the controller, ready to push."""

    path: Path
    sha256: str
    version: str
    wheel: str  # the file it came from


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "fleetctl" / "uv"


def pip_download(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


_lock = threading.Lock()  # hosts provision in threads: one download and one extraction of each wheel


def obtain(platform: Platform, wheelhouse: Path | None = None, cache: Path | None = None,
           download: Download = pip_download, version: str = UV_VERSION) -> UvBinary | str:
    """uv's binary for *platform*, or why there is none (the install then uses pip)."""
    cache = cache or cache_dir()
    with _lock:
        wheel = find_wheel([wheelhouse, cache], platform, version)
        if wheel is None and wheelhouse is not None:
            return f"the wheelhouse has no uv {version} wheel for this platform (run fleetctl wheelhouse again)"
        if wheel is None:
            cache.mkdir(parents=True, exist_ok=True)
            done = download(download_args(platform, cache, version))
            wheel = find_wheel([cache], platform, version)
            if done.returncode != 0 or wheel is None:
                lines = [line for line in (done.stderr + done.stdout).splitlines() if line.startswith("ERROR")]
                return redact(f"no uv {version} wheel for this platform could be downloaded: "
                              f"{(lines or ['pip exited %d' % done.returncode])[-1]}")
        return extract(wheel, cache)


def find_wheel(dirs: Iterable[Path | None], platform: Platform, version: str) -> Path | None:
    for d in dirs:
        if d is not None and d.is_dir():
            if name := wheel_for(os.listdir(d), "uv", version, platform):
                return d / name
    return None


def extract(wheel: Path, cache: Path) -> UvBinary | str:
    """The wheel's uv binary, written once into *cache* (named by its sha256) after checking it against the
    wheel's RECORD; a binary already there is checked again, never trusted for its name."""
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".data/scripts/uv"))
            record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
            recorded = {line.split(",")[0]: line.split(",")[1] for line in z.read(record).decode().splitlines() if line}
            data = z.read(member)
    except (OSError, zipfile.BadZipFile, StopIteration, KeyError, IndexError) as exc:
        return f"{wheel.name}: not a uv wheel ({exc.__class__.__name__})"
    digest = hashlib.sha256(data)
    wanted = "sha256=" + base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")
    if recorded.get(member) != wanted:
        return f"{wheel.name}: its uv binary does not match the wheel's RECORD"
    sha = digest.hexdigest()
    path = cache / "bin" / sha / "uv"
    if not (path.is_file() and file_sha256(path) == sha):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, 0o755)
        os.replace(tmp.name, path)
    version = wheel.name.split("-")[1]
    return UvBinary(path, sha, version, wheel.name)
