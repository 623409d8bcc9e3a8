"""The compatibility matrix: ``matrix.yaml`` loaded into typed, checked rows.

The knowledge is data (one YAML file, every row with its sources); the rules that
use it live in :mod:`fleetctl.resolve`. A malformed file is a MatrixError naming
the file and the row's key, raised once at load time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import MatrixError


def cc(sm: int) -> str:
    """90 → "9.0"; 120 → "12.0"."""
    return f"{sm // 10}.{sm % 10}"


def covers(sass: tuple[int, ...], sm: int, ptx: tuple[int, ...] = ()) -> bool:
    """Do binaries with these SASS (and PTX) targets run on compute capability *sm*?
    SASS runs on its own major with a minor ≥ its own; PTX JIT-compiles for any CC ≥ its own."""
    return any(s // 10 == sm // 10 and s <= sm for s in sass) or any(p <= sm for p in ptx)


@dataclass(frozen=True)
class Derived:
    """Where a refreshed row came from: the wheel whose metadata it was read from, and when (fleetctl/refresh.py)."""
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
    for key in ("version", "torch", "driver", "major_driver") if cls is not Backend else ():
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
        data = yaml.safe_load(text)
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
    return Matrix(path=path, digest=hashlib.sha256(text.encode()).hexdigest()[:12], sources=sources,
                  backend_priority=data["backend_priority"], **rows)


@functools.cache
def default_matrix() -> Matrix:
    return load_matrix()
