"""Where a host's proofs run: beside the stack that serves, or in its place (decided before anything runs).

A rollout's gate and ``provision --revalidate`` prove a stack with a second vLLM server (the smoke test)
and the validation kernel while the host's service still serves. On a GPU that service holds most of
the memory (vLLM's default fraction is 0.9), so ``decide`` looks at the facts — each GPU's free memory,
the processes holding it and which of them are the service's — and the proofs' needs
(:mod:`fleetctl.remote.gpumem`, the rule the proofs apply again on the host as they start):

    beside     the proofs fit in what is free next to the serving stack: it serves until activate
    exclusive  they fit only without it: the serving stack is stopped as a planned action (after
               fleet_drain_command), the proofs run, then the new stack serves, or on a failure
               the old one is started again; the downtime is measured and recorded
    refused    not even that: the proof steps fail at once, naming the MiB free and needed and the way out

The operator's knob is ``fleet_proof_mode``: auto (default), beside or exclusive. Pure: facts in, a
:class:`ProofMode` with its reason out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fleetctl.decide.serving import ServeConfig
from fleetctl.facts.probe import Facts, Gpu
from fleetctl.remote import gpumem
from fleetctl.remote.gpumem import GpuMemory

MODES = ("auto", "beside", "exclusive")


@dataclass(frozen=True)
class ProofMode:
    """How a host's proofs run, why, and (refusal) why they cannot."""

    mode: str  # "beside" or "exclusive"
    reason: str
    refusal: str | None = None
    sizing: Mapping[str, Any] | None = None  # the smoke's sizing as the facts gave it (the host sizes again)

    @property
    def exclusive(self) -> bool:
        return self.mode == "exclusive"

    def text(self) -> str:
        return f"proofs {self.mode}: {self.refusal or self.reason}"

    def to_dict(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "refusal": self.refusal,
                "sizing": dict(self.sizing) if self.sizing else None}


def decide(facts: Facts, serve: ServeConfig | None, hostvars: Mapping[str, Any], *, weights_mib: int | None = None,
           model_config: Mapping[str, Any] | None = None) -> ProofMode:
    """The proof mode of a host with *facts*, serving as *serve* says, with its fleet_proof_mode (pure).
    *weights_mib* and *model_config* describe fleet_model's directory where it was read (provision reads
    it; plan does not)."""
    knob = str(hostvars.get("fleet_proof_mode") or "auto").strip().lower()
    if knob not in MODES:
        return ProofMode("beside", "", refusal=f"fleet_proof_mode {knob!r} is not one of {', '.join(MODES)}: "
                                               "set it to auto, beside or exclusive")
    forced = knob if knob != "auto" else None
    serving = bool(facts.fleet and facts.fleet.service == "running")
    mode = forced or "beside"
    if forced:
        said = f"fleet_proof_mode: {forced}"
    if not facts.gpus:
        return ProofMode(mode, said if forced else "no GPU: the proofs run in host memory beside the service")
    if not serving and not forced:
        return ProofMode("beside", "nothing serves on the host: the proofs have its GPUs")
    if any(g.memory_free_mib is None or g.memory_mib is None for g in facts.gpus):
        return ProofMode(mode, (said + "; " if forced else "")
                         + "the GPUs' free memory is not in the facts: the proofs size themselves on the host")
    if serve is not None and serve.model and weights_mib is None:
        return ProofMode(mode, (said + "; " if forced else "") + f"the size of {serve.model} is not known here: "
                         "the smoke test sizes itself on the host from the model's files")
    now = [_memory(g) for g in facts.gpus]
    held, unseen = service_memory(facts) if serving else ({}, False)
    alone = [GpuMemory(m.index, m.total, m.used - held.get(m.index, 0), m.free + held.get(m.index, 0)) for m in now]
    beside, instead = fit(now, serve, weights_mib, model_config), fit(alone, serve, weights_mib, model_config)
    whose = ("; the GPU's processes are not visible by pid here: all its used memory is taken to be the service's"
             if unseen else "")
    if forced == "beside" or (not forced and beside.fits):
        if not beside.fits:
            return ProofMode("beside", said, refusal=gpumem.refusal("the proofs beside the serving stack", beside),
                             sizing=beside.to_dict())
        return ProofMode("beside", (said + ": " if forced else "fits beside the service: ") + beside.text(),
                         sizing=beside.to_dict())
    if not serving:  # forced exclusive with nothing serving: nothing to stop
        return ProofMode("exclusive", f"{said} (nothing serves now: nothing to stop); {instead.text()}",
                         refusal=None if instead.fits else gpumem.refusal("the proofs", instead),
                         sizing=instead.to_dict())
    if not instead.fits:
        others = sorted({p.pid for p in facts.gpu_processes if p.pid not in facts.fleet.service_pids})
        return ProofMode("exclusive", "", sizing=instead.to_dict(), refusal=(
            f"the proofs do not fit in GPU memory even with the serving stack stopped: {instead.free_mib} MiB "
            f"free, {instead.need_mib} MiB needed + {instead.margin_mib} MiB margin"
            + (f"; other processes hold the rest (pids {', '.join(map(str, others))}): stop them" if others else "")
            + "; or prove a smaller model"))
    why = (said + ": " if forced else f"does not fit beside the service ({beside.text()}); ") \
        + f"with the service stopped: {instead.text()}{whose}"
    return ProofMode("exclusive", why, sizing=instead.to_dict())


def fit(gpus: list[GpuMemory], serve: ServeConfig | None, weights_mib: int | None,
        model_config: Mapping[str, Any] | None) -> gpumem.Sizing:
    """The smoke test's sizing on its GPUs (the first TP x DP), or where it fits, and validate's on every GPU
    does not, validate's: the proofs fit only where both do."""
    count = serve.gpus if serve else 1
    tp = serve.tensor_parallel_size if serve else 1
    need = gpumem.smoke_need_mib(weights_mib, dict(model_config) if model_config else None,
                                 serve.max_model_len if serve else None, tp)
    smoke = gpumem.size(gpus[:max(count, 1)], need, serve.gpu_memory_utilization if serve else None)
    kernel = gpumem.size(gpus, gpumem.VALIDATE_NEED_MIB)
    return kernel if smoke.fits and not kernel.fits else smoke


def service_memory(facts: Facts) -> tuple[dict[int, int], bool]:
    """MiB the service holds per GPU index, and whether that is a guess: where the facts list no GPU process of
    the service's (the driver's pids are another pid namespace's, or not listed), all used memory is taken."""
    pids = set(facts.fleet.service_pids) if facts.fleet else set()
    mine = [p for p in facts.gpu_processes if p.pid in pids]
    if mine:
        held: dict[int, int] = {}
        for p in mine:
            held[p.gpu] = held.get(p.gpu, 0) + (p.used_mib or 0)
        return held, False
    return {g.index: g.memory_used_mib or 0 for g in facts.gpus}, True


def _memory(gpu: Gpu) -> GpuMemory:
    return GpuMemory(gpu.index, gpu.memory_mib, gpu.memory_used_mib or 0, gpu.memory_free_mib)


__all__ = ["MODES", "ProofMode", "decide", "service_memory"]
