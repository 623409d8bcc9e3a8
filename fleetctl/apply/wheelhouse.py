"""The wheelhouse: for each host class, exactly the wheels its resolved stack needs on that
host's platform, fetched on a connected controller: the offline half of an air-gapped install
(``provision --wheelhouse DIR`` pushes a class's files and installs them with no index).

    DIR/*.whl            every class's wheels, flat, shared by file name
    DIR/manifest.json    {"version": 1, "classes": {CLASS: {hosts, stack_id, platform, requirements,
                          indexes, no_deps, files: [{name, sha256, size}], provided_by_host, left_out,
                          installer: {name, sha256, size}}}}

A host class is the hosts whose resolved stack and platform (Python, glibc, arch) are equal
(and whose packages are equal, where the stack reuses the host Python's). pip matches
``--platform`` exactly, so a class's platform is every manylinux tag its glibc admits.
``provision --wheelhouse`` trusts the manifest's sha256s, not the files: a file that differs on
the controller is refused before anything is pushed, and the host checks every pushed file again
before installing from a private copy of them (:data:`fleetctl.apply.steps.INSTALL`).

Planning is pure (:func:`plan_classes`, :func:`platform_tags`, :func:`pip_resolve_args`,
:func:`uv_compile_args`, :func:`closure`, :func:`uv_closure`, :func:`left_out`); :func:`build`
runs on the controller, per class: one resolution gives the dependency closure, then
``pip download --no-deps`` fetches the exact pins of what the host lacks. The resolution is uv's
(``uv pip compile --python-platform``: one pass over the foreign platform's closure, the host's
packages as preferences, so a package the stack needs at another version simply gets it and is
named) where uv is on the controller, else pip's (``pip install --dry-run --report``, the host's
packages as constraints, let go one conflict at a time). With ``install.no_deps`` only the listed
packages are fetched, and the closure says what such an install leaves out. A class neither can
serve is a failed class with one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from fleetctl.decide.plan import request_for
from fleetctl.decide.resolve import Stack, install_pins, resolve
from fleetctl.errors import WheelhouseError
from fleetctl.facts.probe import Facts
from fleetctl.records import atomic_write
from fleetctl.redact import redact
from fleetctl.status import Status

MANIFEST = "manifest.json"
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


# ---------------------------------------------------------------- platform

@dataclass(frozen=True)
class Platform:
    python: str  # "3.12": the stack's Python, which the environment is made with
    glibc: str
    arch: str

    @property
    def tags(self) -> tuple[str, ...]:
        return platform_tags(self.glibc, self.arch)

    def to_dict(self) -> dict:
        return {"python": self.python, "glibc": self.glibc, "arch": self.arch, "tags": list(self.tags)}

    def pip_args(self) -> list[str]:
        """pip's target-platform options: the host's interpreter, ABI and every tag it admits."""
        nodot = self.python.replace(".", "")
        return ["--python-version", self.python, "--implementation", "cp", "--abi", f"cp{nodot}",
                "--only-binary=:all:", *(a for tag in self.tags for a in ("--platform", tag))]

    def supported(self) -> list[Tag]:
        """The wheel tags this platform installs, best first (as pip ranks them)."""
        version = tuple(int(p) for p in self.python.split("."))
        nodot = self.python.replace(".", "")
        return [*cpython_tags(version, [f"cp{nodot}"], self.tags),
                *compatible_tags(version, f"cp{nodot}", self.tags)]


def platform_tags(glibc: str, arch: str) -> tuple[str, ...]:
    """Every manylinux tag a host with this glibc and arch installs, newest first: PEP 600's
    ``manylinux_2_N`` down to the oldest for the arch (2_5 on x86_64/i686, 2_17 elsewhere), with
    the legacy aliases (manylinux2014 = 2_17, manylinux2010 = 2_12, manylinux1 = 2_5) beside theirs."""
    major, minor = (int(p) for p in glibc.split(".")[:2])
    if major != 2:
        raise ValueError(f"glibc {glibc}: not a 2.x glibc")
    oldest = 5 if arch in ("x86_64", "i686") else 17
    tags = []
    for m in range(minor, oldest - 1, -1):
        tags.append(f"manylinux_2_{m}_{arch}")
        if m in LEGACY_MANYLINUX and (m == 17 or arch in ("x86_64", "i686")):
            tags.append(f"{LEGACY_MANYLINUX[m]}_{arch}")
    return tuple(tags)


def platform_of(facts: Facts, stack: Stack) -> Platform:
    return Platform(stack.python, facts.glibc or "", facts.arch or "x86_64")


# ---------------------------------------------------------------- planning (pure)

@dataclass(frozen=True)
class ClassPlan:
    """What one host class needs fetched, and how pip is told its platform."""

    name: str
    hosts: tuple[str, ...]
    stack_id: str
    platform: Platform
    requirements: tuple[str, ...]
    indexes: tuple[str, ...] = ()  # extra index URLs; none: the installer's default index
    no_deps: bool = False
    host_packages: tuple[tuple[str, str], ...] = ()  # (name, version) the host provides: reused torch only
    stack_requirements: tuple[str, ...] = ()  # the stack's own, without the play's extra_packages

    @property
    def constraints(self) -> list[str]:
        """The host's own packages, pinned, so the resolution keeps them (a package the
        requirements name is theirs to choose); local labels (+cu130) dropped: an index's build
        of the same release stands in for it."""
        wanted = {requirement_name(r) for r in self.requirements}
        lines = []
        for name, version in self.host_packages:
            try:
                public = Version(version).public
            except InvalidVersion:
                continue
            if name not in wanted:
                lines.append(f"{name}=={public}")
        return lines


def requirements(stack: Stack, install: Mapping) -> list[str]:
    """What provision installs for *stack* under a play's install settings: the pins, the stack's
    extra packages, the play's extra_packages; in that order, each once."""
    seen: dict[str, None] = {}
    for r in [*install_pins(stack), *stack.packages, *(install.get("extra_packages") or [])]:
        seen.setdefault(str(r), None)
    return list(seen)


def requirement_name(text: str) -> str:
    try:
        return canonicalize_name(Requirement(text).name)
    except InvalidRequirement:
        return canonicalize_name(text.split("=")[0].split("<")[0].split(">")[0].strip())


@dataclass(frozen=True)
class HostInput:
    """One host of a play: its facts, resolved stack and the play's install settings."""

    host: str
    facts: Facts
    stack: Stack
    install: Mapping = field(default_factory=dict)


def plan_classes(inputs: Iterable[HostInput]) -> list[ClassPlan]:
    """Hosts grouped into classes, each with its requirements, indexes and platform. Pure."""
    inputs = list(inputs)
    groups: dict[tuple, list[str]] = {}
    for i in inputs:
        if not i.facts.glibc:
            raise WheelhouseError(f"{i.host}: its facts have no glibc version, so no manylinux tag can be chosen",
                                  fix="gather its facts again (fleetctl facts) from a host with getconf or ldd")
        packages = tuple(sorted((i.facts.python.packages if i.facts.python else {}).items())) \
            if i.stack.system_site_packages else ()
        key = (i.stack.id, platform_of(i.facts, i.stack), tuple(requirements(i.stack, i.install)),
               tuple(u for u in (i.stack.torch_index, i.stack.flashinfer_index) if u),
               bool(i.install.get("no_deps")), packages)
        groups.setdefault(key, []).append(i.host)
    plans, names = [], {}
    for key, hosts in sorted(groups.items(), key=lambda kv: sorted(kv[1])):
        stack_id, platform, reqs, indexes, no_deps, packages = key
        base = f"{stack_id}-cp{platform.python.replace('.', '')}-glibc{platform.glibc}-{platform.arch}"
        names[base] = names.get(base, 0) + 1
        # Same stack and platform, other packages or settings (host vars differ): a class of its own.
        name = base if names[base] == 1 else f"{base}-{hashlib.sha256(repr(key).encode()).hexdigest()[:8]}"
        stack = next(i.stack for i in inputs if i.stack.id == stack_id)
        plans.append(ClassPlan(name, tuple(sorted(hosts)), stack_id, platform, reqs,
                               tuple(dict.fromkeys(indexes)), no_deps, packages, tuple(requirements(stack, {}))))
    return plans


def pip_resolve_args(plan: ClassPlan, report: str, target: str, constraints: str | None,
                     requirements: Iterable[str] | None = None, indexes: str | None = None) -> list[str]:
    """``pip install`` arguments that resolve the class's closure from metadata alone (the target
    directory is required by pip with --platform, and never written to with --dry-run)."""
    return ["install", "--dry-run", "--ignore-installed", "--disable-pip-version-check",
            "--target", target, "--report", report, *plan.platform.pip_args(), *index_args(indexes),
            *(["-c", constraints] if constraints else []), *(requirements or plan.requirements)]


def pip_download_args(plan: ClassPlan, dest: str, pins: Iterable[str], indexes: str | None = None) -> list[str]:
    return ["download", "--no-deps", "--quiet", "--disable-pip-version-check", "--dest", dest,
            *plan.platform.pip_args(), *index_args(indexes), *pins]


def index_args(indexes: str | None) -> list[str]:
    """The class's index URLs reach pip as a requirements file (:func:`write_indexes`), never argv:
    any user's ``ps`` shows a command line, and an index URL may hold a credential."""
    return ["-r", indexes] if indexes else []


def write_indexes(plan: ClassPlan, directory: str) -> str | None:
    """The class's ``--extra-index-url`` lines in a file only this user reads (0600, in the build's
    private temporary directory, removed with it), as provision gives them to hosts."""
    if not plan.indexes:
        return None
    path = os.path.join(directory, "indexes.txt")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"--extra-index-url {url}\n" for url in plan.indexes)
    return path


def uv_platform(platform: Platform) -> str | None:
    """uv's ``--python-platform`` for a host: the newest manylinux uv names that the host's glibc admits
    (uv knows 2_17, 2_28 and 2_31 to 2_40); None where uv names none (pip then resolves)."""
    if platform.arch not in ("x86_64", "aarch64"):
        return None
    major, minor = (int(p) for p in platform.glibc.split(".")[:2])
    fits = [m for m in UV_MANYLINUX if major == 2 and m <= minor]
    return f"{platform.arch}-manylinux_2_{max(fits)}" if fits else None


UV_MANYLINUX = (17, 28, *range(31, 41))  # `uv pip compile --help`, uv 0.13.9


def uv_compile_args(plan: ClassPlan, requirements_in: str, output: str) -> list[str]:
    """``uv pip compile`` arguments resolving the class's closure for the host's platform and Python
    (markers included: uv evaluates them for --python-version, not for itself). *output* is read
    first as preferences: seeded with the host's packages, they are kept wherever the stack admits
    them. Index URLs are not here: they go in the environment (:func:`uv_env`), never in argv."""
    return ["pip", "compile", requirements_in, "--output-file", output, "--python-platform", uv_platform(plan.platform),
            "--python-version", plan.platform.python, "--only-binary", ":all:", "--no-header",
            "--annotation-style", "line", "--quiet"]


def uv_env(plan: ClassPlan) -> dict[str, str]:
    """uv's settings for a class: its extra indexes (which may carry a credential: the environment of
    a process is its owner's alone, a command line is every user's), every index's best match as pip
    takes it, and no Python downloaded (a foreign platform's closure needs none)."""
    env = {"UV_INDEX_STRATEGY": "unsafe-best-match", "UV_PYTHON_DOWNLOADS": "never"}
    if plan.indexes:
        env["UV_EXTRA_INDEX_URL"] = " ".join(plan.indexes)
    return env


def uv_closure(compiled: str) -> dict[str, dict]:
    """``uv pip compile`` output (``--annotation-style line``) → {name: {version, file, sha256, via}}
    like :func:`closure`'s (uv names no files: those are pip download's)."""
    chosen = {}
    for line in compiled.splitlines():
        pin, _, note = line.partition("#")
        if not pin.strip() or pin.startswith((" ", "-")):
            continue
        req = Requirement(pin.strip())
        via = [v.strip() for v in note.strip().removeprefix("via").split(",")]
        via = [v for v in via if v and not v.startswith("-")]  # "-r requirements.in" is no package
        chosen[canonicalize_name(req.name)] = {"version": next(iter(req.specifier)).version, "file": None,
                                               "sha256": None, "via": via}
    return chosen


def uv_host_conflicts(chosen: Mapping[str, dict], host: Mapping[str, str]) -> list[str]:
    """The host's packages the closure takes at another release, with who asked for it."""
    return [f"{asked_by(c.get('via') or [])} needs {name}=={c['version']} (the host has {name} {host[name]})"
            for name, c in sorted(chosen.items()) if name in host and not same_release(c["version"], host[name])]


def asked_by(via: list[str]) -> str:
    """"vllm", or "numba, torch, vllm and 13 more": who in the closure depends on a package."""
    if not via:
        return "the stack"
    return ", ".join(via[:3]) + (f" and {len(via) - 3} more" if len(via) > 3 else "")



def closure(report: Mapping) -> dict[str, dict]:
    """pip's installation report → {name: {version, file, sha256}} of every distribution it chose."""
    chosen = {}
    for item in report.get("install", []):
        meta, info = item["metadata"], item.get("download_info") or {}
        url = info.get("url", "")
        chosen[canonicalize_name(meta["name"])] = {
            "version": meta["version"], "file": url.rsplit("/", 1)[-1].split("#")[0] or None,
            "sha256": ((info.get("archive_info") or {}).get("hashes") or {}).get("sha256")}
    return chosen


def same_release(a: str, b: str) -> bool:
    """2.11.0 and 2.11.0+cu130 are one release (the host's build of it)."""
    try:
        return Version(a).public == Version(b).public
    except InvalidVersion:
        return a == b


def provided_by_host(chosen: Mapping[str, dict], host: Mapping[str, str]) -> list[str]:
    """The chosen distributions the host already has at that release: nothing to fetch."""
    return sorted(f"{n}=={host[n]}" for n, c in chosen.items() if n in host and same_release(c["version"], host[n]))


def left_out(chosen: Mapping[str, dict], fetched: Iterable[str], host: Mapping[str, str]) -> list[str]:
    """What the full closure needs that neither the wheelhouse (*fetched* names) nor the host has:
    what a ``no_deps`` install leaves for the host to provide."""
    have = {canonicalize_name(n) for n in fetched} | set(host)
    return sorted(f"{n}=={c['version']}" for n, c in chosen.items() if n not in have)


def wheel_for(files: Iterable[str], name: str, version: str, platform: Platform) -> str | None:
    """The file in a wheelhouse pip would install for name==version on *platform* (best tag first)."""
    rank = {t: i for i, t in enumerate(platform.supported())}
    best = None
    for f in files:
        try:
            fname, fversion, _, tags = parse_wheel_filename(f)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        if fname != canonicalize_name(name) or str(fversion) != str(Version(version)):
            continue
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, f)
    return best[1] if best else None


# ---------------------------------------------------------------- building (runs pip)

@dataclass(frozen=True)
class ClassResult:
    plan: ClassPlan
    entry: dict | None = None  # the manifest entry; None when the class failed
    error: str | None = None
    new_files: tuple[str, ...] = ()
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


Runner = Callable[[list[str]], subprocess.CompletedProcess]


UvRunner = Callable[[list[str], Mapping[str, str]], subprocess.CompletedProcess]


def find_uv() -> str | None:
    """The controller's uv: the one fleetctl's own environment installs (the ``uv`` wheel), else one on PATH."""
    try:
        from uv import find_uv_bin
        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def uv_runner(binary: str) -> UvRunner:
    def run(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([binary, *args], capture_output=True, text=True, env={**os.environ, **env})
    return run


def pip_runner(python: str = sys.executable) -> Runner:
    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True)
    return run


def controller_python(version: str) -> str:
    """A Python of the hosts' version on the controller if one runs pip, else fleetctl's own.
    pip evaluates environment markers (python_version < "3.12") with the interpreter it runs
    in, whatever --python-version says: the host's version gets them right."""
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return found
    return sys.executable


def build(plans: Iterable[ClassPlan], dest: Path, runner: Runner | None = None, uv: UvRunner | None = None,
          resolver: str = "auto") -> list[ClassResult]:
    """Fetch every class's wheels into *dest* and write its manifest; one result per class. *resolver*:
    "uv", "pip", or "auto" (uv where the controller has it and names the host's platform, else pip). A pip
    *runner* given with no *uv* one is a seam for pip alone: the controller's uv is not looked for."""
    dest.mkdir(parents=True, exist_ok=True)
    if resolver != "pip" and uv is None and runner is None and (binary := find_uv()):
        uv = uv_runner(binary)
    if resolver == "uv" and uv is None:
        raise WheelhouseError("uv is not on this controller", fix="pip install uv (or choose --resolver pip)")
    results = []
    for plan in plans:
        python = controller_python(plan.platform.python)
        with_uv = uv if resolver != "pip" and uv_platform(plan.platform) else None
        result = build_class(plan, dest, runner or pip_runner(python), with_uv)
        if (runner is None and with_uv is None and python == sys.executable
                and f"{sys.version_info.major}.{sys.version_info.minor}" != plan.platform.python):
            result = replace(result, note=f"no python{plan.platform.python} with pip on this machine: pip evaluated "
                                          f"environment markers for Python {sys.version_info.major}.{sys.version_info.minor}")
        results.append(result)
    write_manifest(dest, merge_manifest(read_manifest(dest), results))
    return results


def build_class(plan: ClassPlan, dest: Path, runner: Runner, uv: UvRunner | None = None) -> ClassResult:
    where = f"class {plan.name} ({', '.join(plan.hosts)})"
    host = dict(plan.host_packages)
    tool = "uv" if uv else "pip"
    with tempfile.TemporaryDirectory(prefix="fleetctl-wheelhouse-") as tmp:
        constraints = None
        if plan.constraints:
            constraints = os.path.join(tmp, "host-constraints.txt")
            Path(constraints).write_text("\n".join(plan.constraints) + "\n")
        conflicts: list[str] = []
        indexes = write_indexes(plan, tmp)

        def closure_of(requirements=None):
            if uv:
                return resolve_with_uv(plan, tmp, uv, requirements, conflicts)
            return resolve_closure(plan, tmp, constraints, runner, requirements, conflicts, indexes)
        chosen, why = closure_of()
        note = None
        if chosen is None and plan.no_deps and plan.stack_requirements and plan.stack_requirements != plan.requirements:
            # Hand-picked extra packages may contradict the stack's own pins (that is why no_deps is
            # used): what the stack alone needs still says what the host must provide.
            chosen, again = closure_of(plan.stack_requirements)
            note = f"closure of the stack's own pins only; with the extra packages {tool} says: {why}"
            why = again or why
        if chosen is None and not plan.no_deps:
            return ClassResult(plan, error=f"{where}: {tool} cannot resolve {' '.join(plan.requirements)} for "
                               f"{describe(plan.platform)}: {why} (pin versions that have wheels for this "
                               "platform, or check the index URLs)")
        if plan.no_deps:  # the listed packages alone, at the versions the closure chose where they fit
            pins = [closure_pin(r, chosen) for r in plan.requirements]
        else:
            pins = [f"{n}=={c['version']}" for n, c in sorted(chosen.items())]
        pins = [p for p in pins if not host_has(p, host)]
        drop_corrupt(dest, chosen or {})
        before = set(os.listdir(dest))
        if pins:
            done = runner(pip_download_args(plan, str(dest), pins, indexes))
            if done.returncode != 0:
                return ClassResult(plan, error=f"{where}: pip cannot download for {describe(plan.platform)}: "
                                   f"{pip_error(done)} (pin versions that have wheels for this platform, "
                                   "or check the network and index URLs)")
    files, missing = [], []
    listing = sorted(os.listdir(dest))
    for pin in pins:
        name, version = requirement_name(pin), exact_version(pin)
        found = wheel_for(listing, name, version, plan.platform) if version else newest(listing, name, plan.platform)
        (files.append(found) if found else missing.append(pin))
    if missing:
        return ClassResult(plan, error=f"{where}: pip reported success but no wheel of {', '.join(missing)} for "
                           f"{describe(plan.platform)} is in {dest} (remove stale files there and run again)")
    entry = manifest_entry(plan, dest, files, chosen, host, fetch_uv(plan, dest, runner))
    entry.update(host_conflicts=conflicts, resolver=tool)
    if chosen is None:
        entry["left_out_error"] = f"the full dependency closure could not be resolved: {why}"
    elif note:
        entry["left_out_note"] = note
    return ClassResult(plan, entry, new_files=tuple(sorted(set(files) - before)))


def manifest_entry(plan: ClassPlan, dest: Path, files: list[str], chosen: dict | None, host: dict,
                   uv_wheel: str | None) -> dict:
    """A class's entry in the wheelhouse manifest: its hosts, stack and platform, each file with its sha256
    and size, what the host provides, and what the closure had that the class leaves out."""
    return {
        "hosts": list(plan.hosts), "stack_id": plan.stack_id, "platform": plan.platform.to_dict(),
        "requirements": list(plan.requirements), "indexes": [redact(u) for u in plan.indexes], "no_deps": plan.no_deps,
        "files": [{"name": f, "sha256": sha256(dest / f), "size": (dest / f).stat().st_size}
                  for f in sorted(set(files))],
        "provided_by_host": provided_by_host(chosen or {}, host),
        # uv's wheel for the platform: the binary provision carries to hosts without uv (fleetctl.apply.installer).
        **({"installer": {"name": uv_wheel, "sha256": sha256(dest / uv_wheel),
                          "size": (dest / uv_wheel).stat().st_size}} if uv_wheel else {}),
        "left_out": (left_out(chosen, map(requirement_name, plan.requirements), host) if plan.no_deps else [])
        if chosen is not None else None,
    }


def fetch_uv(plan: ClassPlan, dest: Path, runner: Runner) -> str | None:
    """The uv wheel for the class's platform, in *dest* (fetched where missing); None where the index has none
    (those hosts install with pip, or their own uv)."""
    found = wheel_for(os.listdir(dest), "uv", UV_VERSION, plan.platform)
    if found is None:
        runner(uv_download_args(plan.platform, dest))
        found = wheel_for(os.listdir(dest), "uv", UV_VERSION, plan.platform)
    return found


# The uv fleetctl carries to hosts (fleetctl/apply/installer.py) and each class's wheelhouse holds: one version
# for every host, so a fleet installs alike; uv's own changelog (github.com/astral-sh/uv, CHANGELOG.md)
# says what changed.
UV_VERSION = "0.13.9"


def uv_download_args(platform: Platform, dest: Path | str, version: str = UV_VERSION) -> list[str]:
    """pip's arguments fetching uv's wheel for *platform* from the default index (no credential)."""
    return ["download", "--no-deps", "--quiet", "--disable-pip-version-check", "--dest", str(dest),
            *platform.pip_args(), f"uv=={version}"]


def closure_pin(requirement: str, chosen: Mapping[str, dict] | None) -> str:
    """``apache-tvm-ffi`` → ``apache-tvm-ffi==0.1.11`` where the closure chose a version the
    requirement admits; the requirement as written otherwise."""
    name = requirement_name(requirement)
    if not chosen or name not in chosen:
        return requirement
    try:
        fits = Requirement(requirement).specifier.contains(chosen[name]["version"], prereleases=True)
    except (InvalidRequirement, InvalidVersion):
        return requirement
    return f"{name}=={chosen[name]['version']}" if fits else requirement


def exact_version(text: str) -> str | None:
    """``name==1.2`` → "1.2"; None for anything looser."""
    try:
        specs = list(Requirement(text).specifier)
    except InvalidRequirement:
        return None
    return specs[0].version if len(specs) == 1 and specs[0].operator in ("==", "===") else None


def host_has(pin: str, host: Mapping[str, str]) -> bool:
    """Is this exact pin the host's own release (reused packages are never fetched)?"""
    name, version = requirement_name(pin), exact_version(pin)
    return version is not None and name in host and same_release(version, host[name])


def resolve_closure(plan: ClassPlan, tmp: str, constraints: str | None, runner: Runner,
                    requirements: Iterable[str] | None = None, conflicts: list[str] | None = None,
                    indexes: str | None = None):
    """({name: chosen}, None) from pip's metadata-only resolution, or (None, pip's reason).
    A host package the stack needs at another version (vLLM 0.26.0 pins numba 0.65.0, an image
    has 0.68.0) is let go from the constraints and named in *conflicts*: the environment then
    gets the stack's version, shadowing the host's."""
    report = os.path.join(tmp, "report.json")
    requirements = list(requirements or plan.requirements)
    for _ in range(MAX_CONFLICTS):
        if os.path.exists(report):
            os.unlink(report)
        done = runner(pip_resolve_args(plan, report, os.path.join(tmp, "target"), constraints, requirements, indexes))
        if done.returncode == 0 and os.path.exists(report):
            return closure(json.loads(Path(report).read_text())), None
        clash = host_conflicts(done.stdout + "\n" + done.stderr)
        if not clash or constraints is None:
            return None, pip_error(done)
        pinned = Path(constraints).read_text().splitlines()
        Path(constraints).write_text("".join(f"{line}\n" for line in pinned
                                             if requirement_name(line) not in clash))
        if conflicts is not None:
            conflicts += [f"{why} (the host has {name} {dict(plan.host_packages).get(name)})"
                          for name, why in sorted(clash.items())]
    return None, pip_error(done)


def resolve_with_uv(plan: ClassPlan, tmp: str, uv: UvRunner, requirements: Iterable[str] | None = None,
                    conflicts: list[str] | None = None):
    """({name: chosen}, None) from one ``uv pip compile``, or (None, uv's reason). The host's packages
    are preferences, not constraints: one the stack needs at another version is taken at that
    version (shadowing the host's) and named in *conflicts*, with no second resolution."""
    requirements_in, output = os.path.join(tmp, "requirements.in"), os.path.join(tmp, "compiled.txt")
    Path(requirements_in).write_text("\n".join(requirements or plan.requirements) + "\n")
    Path(output).write_text("".join(f"{line}\n" for line in plan.constraints))
    done = uv(uv_compile_args(plan, requirements_in, output), uv_env(plan))
    if done.returncode != 0:
        return None, uv_error(done)
    chosen = uv_closure(Path(output).read_text())
    if conflicts is not None:
        conflicts += uv_host_conflicts(chosen, dict(plan.host_packages))
    return chosen, None


def uv_error(done: subprocess.CompletedProcess) -> str:
    """uv's reason on one line: its error and the causes it gives, indentation and prefixes dropped."""
    lines = [l.strip().removeprefix("error:").removeprefix("cause:").strip() for l in done.stderr.splitlines()]
    lines = [l for l in lines if l and not l.startswith(("warning:", "hint:"))]
    return redact(" ".join(lines) or f"uv exited {done.returncode}")


MAX_CONFLICTS = 10
_CAUSE = re.compile(r"^\s*(?P<who>\S+ \S+) depends on (?P<need>\S.*?)\s*$")
_CONSTRAINT = re.compile(r"The user requested \(constraint\) (?P<pin>\S+)")


def host_conflicts(pip_output: str) -> dict[str, str]:
    """{package: "vllm 0.26.0 depends on numba==0.65.0"} for each host constraint pip's
    ResolutionImpossible names as the cause of the conflict."""
    constrained = {requirement_name(m["pin"]) for m in _CONSTRAINT.finditer(pip_output)}
    out: dict[str, list[str]] = {}
    for line in pip_output.splitlines():
        if (m := _CAUSE.match(line)) and (name := requirement_name(m["need"])) in constrained:
            out.setdefault(name, []).append(f"{m['who']} depends on {m['need']}")
    return {name: "; ".join(out.get(name, [f"the stack needs another {name}"])) for name in constrained}


def drop_corrupt(dest: Path, chosen: Mapping[str, dict]) -> None:
    """A file already in the wheelhouse whose sha256 is not the index's is fetched again."""
    for c in chosen.values():
        path = dest / (c.get("file") or "")
        if c.get("file") and c.get("sha256") and path.is_file() and sha256(path) != c["sha256"]:
            path.unlink()


def newest(files: Iterable[str], name: str, platform: Platform) -> str | None:
    versions = []
    for f in files:
        try:
            fname, fversion, _, _ = parse_wheel_filename(f)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        if fname == canonicalize_name(name):
            versions.append(fversion)
    for v in sorted(set(versions), reverse=True):
        if found := wheel_for(files, name, str(v), platform):
            return found
    return None


def pip_error(done: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (done.stderr + "\n" + done.stdout).splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("ERROR:")]
    return redact((errors or lines or [f"pip exited {done.returncode}"])[-1].removeprefix("ERROR: "))


def describe(platform: Platform) -> str:
    return f"cp{platform.python.replace('.', '')} manylinux_2_{platform.glibc.split('.')[1]} {platform.arch}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- the manifest

def check_dir(dest: str | Path) -> Path:
    """*dest* if it can serve as a wheelhouse (a directory with a readable manifest, or with wheels
    and none); else one WheelhouseError naming it. Provision asks before it contacts any host."""
    path = Path(dest)
    build = "build one with fleetctl wheelhouse INVENTORY DIR, or name the directory it wrote"
    if not path.exists():
        raise WheelhouseError(f"wheelhouse {path}: no directory there", fix=build)
    if not path.is_dir():
        raise WheelhouseError(f"wheelhouse {path}: not a directory", fix=build)
    if read_manifest(path) is None and not any(path.glob("*.whl")):
        raise WheelhouseError(f"wheelhouse {path}: neither a {MANIFEST} nor any wheels in it", fix=build)
    return path


def read_manifest(dest: Path) -> dict | None:
    """DIR's manifest, or None where DIR has none (a plain directory of wheels)."""
    path = Path(dest) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WheelhouseError(f"{path}: unreadable wheelhouse manifest: {exc}",
                              fix="run fleetctl wheelhouse again to rewrite it") from None
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("classes"), dict):
        raise WheelhouseError(f"{path}: not a version-1 wheelhouse manifest", fix="run fleetctl wheelhouse again")
    return data


def merge_manifest(old: dict | None, results: Iterable[ClassResult]) -> dict:
    """This run's classes over the old manifest's; its hosts leave the classes they were in."""
    results = [r for r in results if r.ok]
    hosts = {h for r in results for h in r.plan.hosts}
    classes = {}
    for name, entry in ((old or {}).get("classes") or {}).items():
        kept = [h for h in entry.get("hosts", []) if h not in hosts]
        if kept:
            classes[name] = {**entry, "hosts": kept}
    for r in results:
        classes[r.plan.name] = r.entry
    return {"version": 1, "classes": dict(sorted(classes.items()))}


def write_manifest(dest: Path, manifest: dict) -> Path:
    path = Path(dest) / MANIFEST
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() == text:
        return path  # unchanged: not even its mtime moves
    return atomic_write(path, text)  # a reader (or a provision) never sees half a manifest


def class_for(manifest: Mapping, host: str, stack: Stack, facts: Facts) -> tuple[str, dict]:
    """The manifest class a host installs from: its stack and platform, the one naming it first."""
    platform = platform_of(facts, stack)
    fits = [(name, c) for name, c in sorted(manifest["classes"].items())
            if c.get("stack_id") == stack.id and {k: c.get("platform", {}).get(k) for k in ("python", "glibc", "arch")}
            == {"python": platform.python, "glibc": platform.glibc, "arch": platform.arch}]
    if not fits:
        raise WheelhouseError(f"the wheelhouse has no wheels for stack {stack.id} on this host's platform "
                              f"({describe(platform)})", fix=f"run fleetctl wheelhouse INVENTORY DIR for {host}")
    return next(((n, c) for n, c in fits if host in c.get("hosts", [])), fits[0])


# ---------------------------------------------------------------- hosts in, classes out

def host_inputs(plays, inventory, selected: Iterable[str], facts: Mapping[str, Facts], matrix
                ) -> tuple[list[HostInput], dict[str, str]]:
    """Each selected host of each play resolved with the play's vars, as provision resolves it;
    and, per host, why it has no wheelhouse class (no facts, no stack, a container stack)."""
    selected = set(selected)
    inputs, problems = [], {}
    for play in plays:
        for host in inventory.select(play.hosts):
            if host.name not in selected or host.name not in facts:
                continue
            result = resolve(facts[host.name], request_for(host, play), matrix)
            if not result.ok:
                problems[host.name] = f"{host.name}: no stack fits: {result.reasons[-1]} ({result.fix})"
            elif result.stack.container_image:
                problems[host.name] = (f"{host.name}: resolves to the container image {result.stack.container_image}: "
                                       "a wheelhouse holds wheels, not images (docker save/load carries those)")
            else:
                inputs.append(HostInput(host.name, facts[host.name], result.stack, play.for_host(host.vars).install))
    return inputs, problems


def facts_from_json(path: str | Path, names: Iterable[str]) -> tuple[dict[str, Facts], dict[str, str]]:
    """The facts `fleetctl facts INVENTORY --json` printed (gathered on the isolated side), for *names*;
    and, per host, why there are none."""
    try:
        hosts = json.loads(Path(path).read_text())["hosts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WheelhouseError(f"{path}: not the output of fleetctl facts --json ({exc})",
                              fix="save it with: fleetctl facts INVENTORY --json > FILE") from None
    facts, problems = {}, {}
    for name in names:
        entry = hosts.get(name)
        if entry is None:
            problems[name] = f"{name}: no facts for it in {path} (gather them with fleetctl facts INVENTORY --json)"
        elif entry.get("status") != Status.OK:
            problems[name] = f"{name}: its facts in {path} are {entry.get('status')}: {entry.get('error')}"
        else:
            facts[name] = Facts.from_dict(entry["facts"])
    return facts, problems
