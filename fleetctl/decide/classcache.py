"""The key of a host class's compile caches (pure: facts, stack and serving settings in, a key out).

Every host of a class compiles the same kernels: FlashInfer JIT-builds its attention and sampling modules
(~200 s on an H100), vLLM's torch.compile and Inductor its graphs. What one host of the class built is
valid on another only where everything the compilers saw is the same: the GPUs' architecture (or, on a
CPU-only host, the CPU model and its vector extensions, which Inductor's C++ kernels are compiled for),
the driver's branch, glibc, the stack (its id names torch, vLLM, FlashInfer and the Python), the models
and the serving settings (vLLM keys its compile cache by the model's path and config, the parallel sizes
and the compilation config), and the install root (paths are part of those keys). The key names all of
them; its id is their digest. A cache is pushed to a host only under a key equal to the host's own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from fleetctl.decide.resolve import Stack
from fleetctl.decide.serving import ServeConfig
from fleetctl.facts.probe import Facts

CACHE_DIR = "cache"  # in a stack's environment: VLLM_CACHE_ROOT, FlashInfer's workspace, Triton and Inductor
CACHE_MARKER = "fleetctl-cache.json"  # in CACHE_DIR: which class key the cache holds, and where it came from


@dataclass(frozen=True)
class CacheKey:
    """What a class's compiled kernels depend on; two hosts share a cache only where this is equal."""

    arch: str  # "gpu 9.0" (each GPU's compute capability) or "cpu <model> [<vector extensions>]"
    driver_branch: str | None  # "570"; None without an NVIDIA driver
    glibc: str | None
    stack: str  # the stack id
    root: str  # the install root
    smoke_model: str  # the model the smoke test serves ("" for its generated tiny Llama)
    service_model: str
    serving: str  # the serving settings, as JSON

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "id": self.id}

    @classmethod
    def from_dict(cls, data: dict) -> CacheKey:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})  # a field missing: KeyError

    def differences(self, other: CacheKey) -> list[str]:
        """What differs between two keys, named (for audit and refusals)."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{name} {theirs[name]!r} → {mine[name]!r}" for name in mine if mine[name] != theirs[name]]


def cache_key(facts: Facts, stack: Stack, serve: ServeConfig, *, smoke_model: str | None,
              service_model: str | None) -> CacheKey | None:
    """The class key of a host serving *stack* as *serve* says; None where a cache cannot be keyed safely
    (a CPU-only host whose CPU the probe could not read)."""
    arch, branch = machine(facts)
    if arch is None:
        return None
    settings = {k: v for k, v in serve.to_dict().items() if k not in ("reasons", "model")}
    return CacheKey(arch, branch, facts.glibc, stack.id, str(facts.fleet_root), smoke_model or "",
                    service_model or serve.model or "", json.dumps(settings, sort_keys=True))


def machine(facts: Facts) -> tuple[str | None, str | None]:
    """What compiled kernels are built for on this host: the GPUs' architectures (or the CPU's model and vector
    extensions; None where unknown) and the driver's branch."""
    if facts.gpus:
        arch = "gpu " + ",".join(sorted({g.compute_capability for g in facts.gpus}))
    else:
        arch = f"cpu {facts.cpu}" if facts.cpu else None
    return arch, facts.driver_version.split(".")[0] if facts.driver_version else None


def stale(held: CacheKey, facts: Facts, stack_id: str) -> list[str]:
    """What changed on the host since its cache was built or pushed for the class *held*: the machine, glibc or
    the stack (pure; the serving settings are provision's to compare)."""
    arch, branch = machine(facts)
    return replace(held, arch=arch, driver_branch=branch, glibc=facts.glibc, stack=stack_id).differences(held)


def cache_env(directory: str) -> dict[str, str]:
    """Where the compilers of a stack's proofs and servers keep what they built: all under *directory*, so
    that one tree is the class cache (vLLM's torch.compile cache, FlashInfer's JIT workspace — the library
    adds ``.cache/flashinfer`` — Triton's and Inductor's)."""
    return {"VLLM_CACHE_ROOT": f"{directory}/vllm", "FLASHINFER_WORKSPACE_BASE": f"{directory}/flashinfer",
            "TRITON_CACHE_DIR": f"{directory}/triton", "TORCHINDUCTOR_CACHE_DIR": f"{directory}/inductor"}
