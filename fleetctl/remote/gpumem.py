"""GPU memory for a proof: how much a proof needs, and the memory fraction it may take of what is free.

One rule, used in two places: by the controller (fleetctl.decide.proofmode decides, from the host's facts,
whether a host's proofs run beside its serving stack or in its place), and on the host, where
smoke.py and validate.py import this file from beside them (<root>/lib) and size themselves again
from the memory free when they start (it may have changed since the facts were read). Stdlib only;
the one reader (``read_gpus``) asks NVML through nvidia-ml-py where the Python has it, else
nvidia-smi: neither creates a CUDA context, which would itself hold ~500 MiB for as long as the
smoke test runs.

vLLM's --gpu-memory-utilization is a fraction of the GPU's *total* memory that one server may hold,
and a server refuses to start where less than that is free ("Free memory on device (0.49/79.32 GiB)
on startup is less than desired GPU memory utilization (0.6, 47.59 GiB)", as reported in
vllm-project/vllm issue 20305 and vllm-project/vllm-omni issue 276): a second server beside one
that holds the default 0.9 has to be given a fraction of what is left.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from dataclasses import dataclass

# Left free beside a proof, for what the serving stack and the driver allocate while it runs: 2% of the
# GPU, at least 1 GiB (an H100 80GB: 1,632 MiB; with the service at vLLM's 0.9, 4,182 MiB of 5,814 free
# remain, fraction 0.05 — the fraction that passed by hand beside the service, issue 25).
MARGIN_MIN_MIB = 1024
MARGIN_SHARE = 0.02
# The generated tiny Llama (smoke.py): its weights are ~1 MiB; what it needs is the CUDA context,
# vLLM's profiling run, CUDA graphs and a KV cache for 256 tokens (well under 1 GiB measured; 2 GiB asked).
TINY_NEED_MIB = 2048
# A real model beyond its weights and KV cache: context, activations of the profiling run, CUDA graphs.
OVERHEAD_MIB = 2048
# validate.py: fp16 attention over 1,024 tokens, a 8x32000 sampler, FlashInfer's workspace, the context.
VALIDATE_NEED_MIB = 1024
DEFAULT_CEILING = 0.9  # vLLM's own default --gpu-memory-utilization
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory in MiB, as NVML or nvidia-smi reports it."""

    index: int
    total: int
    used: int
    free: int


def margin_mib(total_mib: int) -> int:
    return max(MARGIN_MIN_MIB, math.ceil(total_mib * MARGIN_SHARE))


def kv_mib(config: dict | None, max_model_len: int | None, tp: int = 1) -> int:
    """KV cache for one sequence of *max_model_len* tokens (vLLM refuses to start without room for one):
    keys and values, every layer, the KV heads this GPU holds, in 16-bit; 0 where the config does not say."""
    if not config or not max_model_len:
        return 0
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size") // heads if heads and config.get("hidden_size")
                                          else None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return 0
    per_gpu_heads = max(1, math.ceil(kv_heads / max(tp, 1)))
    return math.ceil(2 * layers * per_gpu_heads * head_dim * 2 * max_model_len / 2 ** 20)


def smoke_need_mib(weights_mib: int | None, config: dict | None = None, max_model_len: int | None = None,
                   tp: int = 1) -> int:
    """What one GPU of the smoke test's server needs: the tiny model's allowance where no weights are known,
    else its share of the weights, one sequence's KV cache and the overhead."""
    if not weights_mib:
        return TINY_NEED_MIB
    return math.ceil(weights_mib / max(tp, 1)) + kv_mib(config, max_model_len or (config or {}).get(
        "max_position_embeddings"), tp) + OVERHEAD_MIB


@dataclass(frozen=True)
class Sizing:
    """A proof's memory on its GPUs: the fraction to give it (None: it does not fit), and the figures."""

    fraction: float | None
    free_mib: int  # the least free of the GPUs it runs on
    need_mib: int
    margin_mib: int
    total_mib: int

    @property
    def fits(self) -> bool:
        return self.fraction is not None

    def text(self) -> str:
        got = f"fraction {self.fraction:g} ({math.floor(self.fraction * self.total_mib)} MiB)" if self.fits else \
            "does not fit"
        return (f"{self.free_mib} MiB free of {self.total_mib}, {self.need_mib} MiB needed "
                f"+ {self.margin_mib} MiB margin: {got}")

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "free_mib": self.free_mib, "need_mib": self.need_mib,
                "margin_mib": self.margin_mib, "total_mib": self.total_mib}


def size(gpus: list[GpuMemory], need_mib: int, ceiling: float | None = None) -> Sizing:
    """The fraction of total memory a proof on *gpus* may take: what the least free of them has, less the
    margin, in hundredths rounded down, at most *ceiling* (the serving fraction; vLLM's 0.9 by default);
    None where that is less than *need_mib*."""
    total = min(g.total for g in gpus)
    free = min(g.free for g in gpus)
    margin = margin_mib(total)
    fraction = min(ceiling or DEFAULT_CEILING, math.floor((free - margin) / total * 100) / 100)
    fits = fraction > 0 and fraction * total >= need_mib
    return Sizing(fraction if fits else None, free, need_mib, margin, total)


def refusal(what: str, sizing: Sizing) -> str:
    """One line for a proof that does not fit: the figures, and the ways out."""
    return (f"{what} does not fit in GPU memory: {sizing.free_mib} MiB free, {sizing.need_mib} MiB needed "
            f"+ {sizing.margin_mib} MiB margin: free the GPU (fleet_proof_mode: exclusive stops the serving "
            "stack for the proofs), or stop what else holds it")


# ---------------------------------------------------------------- reading the host's GPUs

MEMORY_QUERY = ("nvidia-smi", "--query-gpu=index,memory.total,memory.used,memory.free", "--format=csv,noheader,nounits")


def parse_memory_csv(text: str) -> list[GpuMemory]:
    """``nvidia-smi --query-gpu=index,memory.total,memory.used,memory.free --format=csv,noheader,nounits``
    → one GpuMemory per GPU (rows that are not four numbers are skipped: "[N/A]" on a MIG parent)."""
    gpus = []
    for row in csv.reader(text.strip().splitlines()):
        cells = [c.strip() for c in row]
        if len(cells) == 4 and all(c.isdigit() for c in cells):
            gpus.append(GpuMemory(*map(int, cells)))
    return gpus


def read_gpus() -> list[GpuMemory]:
    """This host's GPUs' memory now: NVML, else nvidia-smi; [] where neither answers (no GPU)."""
    try:
        import pynvml as nv
        nv.nvmlInit()
        try:
            out = []
            for i in range(nv.nvmlDeviceGetCount()):
                info = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i))
                out.append(GpuMemory(i, info.total >> 20, info.used >> 20, info.free >> 20))
            return out
        finally:
            nv.nvmlShutdown()
    except Exception:  # no nvidia-ml-py, or NVML does not answer: nvidia-smi may
        pass
    try:
        result = subprocess.run(MEMORY_QUERY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_memory_csv(result.stdout) if result.returncode == 0 else []


def visible(gpus: list[GpuMemory], count: int) -> list[GpuMemory]:
    """The GPUs a proof of *count* GPUs runs on: CUDA_VISIBLE_DEVICES's (by index) where set, else the first."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if named:
        wanted = [int(w) for w in named.split(",") if w.strip().isdigit()]
        chosen = [g for g in gpus if g.index in wanted]
        if chosen:
            gpus = chosen
    return gpus[:max(count, 1)]


def weights_mib(model_dir: str | None) -> int | None:
    """The size of a model directory's weight files, MiB; None where there is no such directory."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    total = sum(e.stat().st_size for e in os.scandir(model_dir) if e.is_file() and e.name.endswith(WEIGHT_SUFFIXES))
    return math.ceil(total / 2 ** 20)


def model_config(model_dir: str | None) -> dict | None:
    try:
        with open(os.path.join(model_dir or "", "config.json")) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
