"""The compatibility matrix: ``matrix.yaml`` loaded into typed, checked rows.

The knowledge is data (one YAML file, every row with its sources); the rules that
use it live in :mod:`fleetctl.decide.resolve`. A malformed file is a MatrixError naming
the file and the row's key, raised once at load time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from fleetctl.errors import MatrixError


def cc(sm: int) -> str:
    """90 → "9.0"; 120 → "12.0"."""
    return f"{sm // 10}.{sm % 10}"


def covers(sass: tuple[int, ...], sm: int, ptx: tuple[int, ...] = ()) -> bool:
    """Do binaries with these SASS (and PTX) targets run on compute capability *sm*?
    SASS runs on its own major with a minor ≥ its own; PTX JIT-compiles for any CC ≥ its own."""
    return any(s // 10 == sm // 10 and s <= sm for s in sass) or any(p <= sm for p in ptx)


@dataclass(frozen=True)
class Derived:
    """Where a refreshed row came from: the wheel whose metadata it was read from, and when (fleetctl/knowledge/refresh.py)."""
    file: str
    at: str


@dataclass(frozen=True)
class Cuda:
    version: str
    driver: str
    major_driver: str
    sm: tuple[int, ...]
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Variant:
    name: str
    cuda: str
    sm: tuple[int, ...]
    ptx: tuple[int, ...] = ()  # torch builds name PTX only where their binary carries some


@dataclass(frozen=True)
class Torch:
    version: str
    python: str
    glibc: str
    default: str
    variants: tuple[Variant, ...]
    sources: tuple[str, ...]
    aarch64: tuple[Variant, ...] = ()
    derived: Derived | None = None  # read from the package's metadata, not typed in
    carried: tuple[str, ...] = ()  # fields a derived row took from the nearest older hand-written row


@dataclass(frozen=True)
class Vllm:
    version: str
    torch: str
    python: str
    cuda: str
    sm: tuple[int, ...]
    ptx: tuple[int, ...]
    glibc: str
    aarch64: bool
    flashinfer: str | None
    engine: str
    backend_option: str
    sources: tuple[str, ...]
    cudagraph_mode: bool = False
    derived: Derived | None = None  # read from the package's metadata, not typed in
    carried: tuple[str, ...] = ()  # fields a derived row took from the nearest older hand-written row


@dataclass(frozen=True)
class VllmCpu:
    version: str
    torch: str
    python: str
    arch: tuple[str, ...]
    torch_index: str | None
    sources: tuple[str, ...]
    uninstall: tuple[str, ...] = ()
    derived: Derived | None = None  # read from the package's metadata, not typed in
    carried: tuple[str, ...] = ()  # fields a derived row took from the nearest older hand-written row


@dataclass(frozen=True)
class FlashInfer:
    version: str
    package: str
    python: str
    min_sm: int
    jit: bool
    jit_cache_index: str | None
    sources: tuple[str, ...]
    jit_cache_cuda: tuple[str, ...] = ()
    derived: Derived | None = None
    carried: tuple[str, ...] = ()


@dataclass(frozen=True)
class Backend:
    name: str
    engines: tuple[str, ...]
    cudagraph: str
    sources: tuple[str, ...]
    min_sm: int = 0
    max_sm: int = 999
    vllm: str = ""
    needs_flashinfer: bool = False


@dataclass(frozen=True)
class Container:
    image: str
    vllm: str
    cuda: str
    python: str
    arch_list: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class DriverPackages:
    """One distribution's packages for a driver branch, per kernel-module flavour. For RHEL the
    entries naming a module stream (``nvidia-driver:580-open``) come first. ``moved_to``: the
    distribution's newest package of these names is a transitional one that installs that branch
    instead, so only an exact older version still brings this branch."""
    open: tuple[str, ...] = ()
    proprietary: tuple[str, ...] = ()
    moved_to: str | None = None

    def of(self, flavor: str) -> tuple[str, ...]:
        return self.open if flavor == "open" else self.proprietary


@dataclass(frozen=True)
class DriverBranch:
    """An NVIDIA driver branch (R580): what it runs natively, its lifecycle and its packages."""
    branch: str
    kind: str  # LTSB, PB or NFB
    min_version: str  # the first Linux release of the branch that runs `cuda` natively (toolkit table 3)
    cuda: str  # the newest CUDA it runs natively (nvidia-smi's "CUDA Version")
    eol: str | None  # "YYYY-MM" where NVIDIA gives an end of life; None where it gives none
    open_default: bool  # open kernel modules are the branch's default for Turing and newer (from R560)
    sm: tuple[int, ...]  # the compute capabilities the branch drives
    packages: dict = field(compare=False)  # {distro key: DriverPackages}
    sources: tuple[str, ...] = ()


DRIVER_KINDS = ("LTSB", "PB", "NFB")
DRIVER_DISTROS = ("ubuntu-22.04", "ubuntu-24.04", "rhel-9", "cuda-ubuntu")


@dataclass(frozen=True)
class Matrix:
    path: Path
    digest: str
    sources: dict = field(compare=False)
    cuda: tuple[Cuda, ...]
    torch: tuple[Torch, ...]
    vllm: tuple[Vllm, ...]
    vllm_cpu: tuple[VllmCpu, ...]
    flashinfer: tuple[FlashInfer, ...]
    backends: tuple[Backend, ...]
    backend_priority: dict = field(compare=False)
    containers: tuple[Container, ...]
    drivers: tuple[DriverBranch, ...] = ()

    def driver_row(self, branch: str) -> DriverBranch | None:
        return next((d for d in self.drivers if d.branch == branch), None)

    def cuda_row(self, version: str) -> Cuda | None:
        return next((c for c in self.cuda if c.version == version), None)

    def torch_row(self, version: str) -> Torch | None:
        return next((t for t in self.torch if t.version == version), None)

    def flashinfer_row(self, version: str | None) -> FlashInfer | None:
        return next((f for f in self.flashinfer if f.version == version), None)


ROW_TYPES = {"cuda": Cuda, "torch": Torch, "vllm": Vllm, "vllm_cpu": VllmCpu, "flashinfer": FlashInfer,
             "backends": Backend, "containers": Container}


RANGES = {Torch: ("python",), Vllm: ("python",), VllmCpu: ("python",), FlashInfer: ("python",), Backend: ("vllm",)}


def _row(kind: str, cls, raw, where: str, sources: dict):
    if not isinstance(raw, dict):
        raise MatrixError(f"{where}: a {kind} row must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    missing = {n for n, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and n not in raw}
    if unknown or missing:
        raise MatrixError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {', '.join(sorted(unknown))}"] if unknown else [])
            + ([f"missing key(s) {', '.join(sorted(missing))}"] if missing else [])))
    values = dict(raw)
    for key in ("sm", "ptx", "sources", "engines", "arch", "jit_cache_cuda", "uninstall", "carried"):
        if key in values:
            values[key] = tuple(values[key] or ())
    for key in ("variants", "aarch64") if cls is Torch else ():
        values[key] = tuple(Variant(name, v["cuda"], tuple(v["sm"]), tuple(v.get("ptx", ()))) for name, v in (values.get(key) or {}).items())
    if values.get("derived") is not None:
        derived = values["derived"]
        if not isinstance(derived, dict) or set(derived) != {"from", "at"}:
            raise MatrixError(f"{where}: derived must be {{from: <wheel file>, at: <date>}}")
        values["derived"] = Derived(str(derived["from"]), str(derived["at"]))
    for name in values.get("carried", ()):
        if name not in fields:
            raise MatrixError(f"{where}: carried names {name!r}, which is not a field of a {kind} row")
    for name in values.get("sources", ()):
        if name not in sources:
            raise MatrixError(f"{where}: source {name!r} is not listed under sources:")
    for key in ("version", "torch", "driver", "major_driver", "min_version") if cls is not Backend else ():
        if isinstance(values.get(key), str):
            try:
                Version(values[key].split("+")[0])
            except InvalidVersion:
                raise MatrixError(f"{where}: {key} {values[key]!r} is not a version") from None
    for key in RANGES.get(cls, ()):
        try:
            SpecifierSet(values.get(key) or "")
        except InvalidSpecifier:
            raise MatrixError(f"{where}: {key} {values[key]!r} is not a version range") from None
    return cls(**values)


def load_matrix(path: str | Path | None = None) -> Matrix:
    """Load and check the matrix (the packaged one by default)."""
    path = Path(path) if path else Path(str(resources.files(__package__).joinpath("matrix.yaml")))
    try:
        text = path.read_text()
        # libyaml's parser where present: the pure-Python one takes ~0.12 s of every run that resolves
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as exc:
        raise MatrixError(f"{path}: cannot read the matrix: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise MatrixError(f"{path}{f':{line + 1}' if line is not None else ''}: not valid YAML") from None
    if not isinstance(data, dict):
        raise MatrixError(f"{path}: the matrix must be a mapping of sections")
    missing = {"sources", "backend_priority", *ROW_TYPES} - set(data)
    if missing:
        raise MatrixError(f"{path}: missing section(s) {', '.join(sorted(missing))}")
    sources = data["sources"]
    try:
        rows = {kind: tuple(_row(kind, cls, raw, f"{path}: {kind}[{i}]", sources)
                            for i, raw in enumerate(data[kind] or ()))
                for kind, cls in ROW_TYPES.items()}
    except (TypeError, KeyError, AttributeError) as exc:
        raise MatrixError(f"{path}: malformed row ({type(exc).__name__}: {exc})") from None
    for v in rows["vllm"]:
        if not any(t.version == v.torch for t in rows["torch"]):
            raise MatrixError(f"{path}: vllm {v.version} pins torch {v.torch}, which has no torch row")
    drivers = tuple(_driver_row(raw, f"{path}: drivers[{i}]", sources) for i, raw in enumerate(data.get("drivers") or ()))
    return Matrix(path=path, digest=hashlib.sha256(text.encode()).hexdigest()[:12], sources=sources,
                  backend_priority=data["backend_priority"], drivers=drivers, **rows)


def _driver_row(raw, where: str, sources: dict) -> DriverBranch:
    """A ``drivers:`` row, checked: its kind, versions, dates, flavours and distribution keys."""
    if not isinstance(raw, dict) or not isinstance(raw.get("packages"), dict):
        raise MatrixError(f"{where}: a drivers row must be a mapping with a packages mapping")
    packages = {}
    for distro, entry in raw["packages"].items():
        if distro not in DRIVER_DISTROS:
            raise MatrixError(f"{where}: packages for {distro!r}, which is not one of {', '.join(DRIVER_DISTROS)}")
        if not isinstance(entry, dict) or set(entry) - {"open", "proprietary", "moved_to"}:
            raise MatrixError(f"{where}: packages {distro} must map open / proprietary to package lists (and moved_to)")
        packages[distro] = DriverPackages(tuple(entry.get("open") or ()), tuple(entry.get("proprietary") or ()),
                                          str(entry["moved_to"]) if entry.get("moved_to") else None)
    row = _row("drivers", DriverBranch, {**raw, "branch": str(raw.get("branch")), "packages": {}}, where, sources)
    if row.kind not in DRIVER_KINDS:
        raise MatrixError(f"{where}: kind {row.kind!r} is not one of {', '.join(DRIVER_KINDS)}")
    if not str(row.branch).isdigit() or not str(row.min_version).startswith(f"{row.branch}."):
        raise MatrixError(f"{where}: branch {row.branch!r} must be digits and min_version {row.min_version!r} of it")
    if row.eol is not None and not re.fullmatch(r"\d{4}-\d{2}", str(row.eol)):
        raise MatrixError(f"{where}: eol {row.eol!r} is not YYYY-MM")
    try:
        Version(row.cuda)
    except InvalidVersion:
        raise MatrixError(f"{where}: cuda {row.cuda!r} is not a version") from None
    return dataclasses.replace(row, packages=packages)


@functools.cache
def default_matrix() -> Matrix:
    return load_matrix()
