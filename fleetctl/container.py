"""Container deployment files for a resolved stack: ``render_container(stack, ...)``, pure.

A Stack in, ``{filename: text}`` out: a docker compose service, a systemd unit that
runs the same container, and with ``build=True`` a Dockerfile that builds the stack
itself (seed 001's shape: an nvidia/cuda devel base, uv, a pinned arch list).
Nothing is written or run here; the caller decides where the files go.

Every value from a stack, an inventory or the caller is escaped for the file it lands
in: compose strings are JSON-quoted with ``$`` doubled (compose interpolates ``$``),
ExecStart words take systemd's own quoting (:func:`fleetctl.systemd.quote`: ExecStart is no
shell, and expands ``%`` and ``$`` even inside quotes), Dockerfile RUN words take shlex.quote.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from importlib import resources

import jinja2

from . import systemd
from .errors import FleetError
from .resolve import Stack

# The nvidia/cuda tag for each CUDA a stack can carry: the last patch release of each minor.
# vLLM's docker/Dockerfile builds on 12.8.1 and its docker/versions.json on 13.0.2; seed 001
# names 12.1.1 and 12.9.1; every tag here is a FROM line in public Dockerfiles.
CUDA_IMAGES = {"12.1": "12.1.1", "12.4": "12.4.1", "12.6": "12.6.3", "12.8": "12.8.1",
               "12.9": "12.9.1", "13.0": "13.0.2", "13.2": "13.2.0"}
NAME = "fleetctl-vllm"  # the container, and the unit's file name
MODEL_DIR = "/model"  # where the model directory appears inside the container

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARCH_LIST = re.compile(r"\d+\.\d+(\+PTX)?( \d+\.\d+(\+PTX)?)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def render_container(stack: Stack, *, host: str, backend_option: str, model: str, port: int = 8000,
                     runtime: str = "docker", gpus: int, extra_env: dict | None = None,
                     build: bool = False) -> dict[str, str]:
    """The files that serve the model directory *model* (a host path) with *stack* on *host*."""
    if problems := _problems(stack, backend_option, model, port, runtime, gpus, build):
        raise ValueError("; ".join(problems))
    if build and stack.cuda not in CUDA_IMAGES:
        raise FleetError(f"no nvidia/cuda base image is known for CUDA {stack.cuda}",
                         fix=f"build a stack with CUDA {', '.join(CUDA_IMAGES)}, or use a prebuilt image")
    context = {
        "stack": stack, "host": host, "name": NAME, "port": port, "gpus": gpus, "runtime": runtime,
        "build": build, "image": f"fleetctl/vllm:{stack.id}" if build else stack.container_image,
        "model": model, "model_dir": MODEL_DIR, "cuda_tag": CUDA_IMAGES.get(stack.cuda),
        "args": _vllm_args(stack, backend_option, model, port),
        "env": _environment(stack, backend_option, extra_env or {}),
    }
    names = {"compose.yaml": "compose.yaml.j2", f"{NAME}.service": "vllm.service.j2"}
    if build:
        names["Dockerfile"] = "Dockerfile.j2"
    return {name: _render(template, context) for name, template in names.items()}


def _problems(stack: Stack, backend_option: str, model: str, port: int, runtime: str, gpus: int,
              build: bool) -> list[str]:
    bad = []
    if backend_option not in ("env", "flag"):
        bad.append(f"backend_option {backend_option!r} is not env or flag")
    if runtime not in ("docker", "podman"):
        bad.append(f"runtime {runtime!r} is not docker or podman")
    for what, value, top in (("gpus", gpus, 1024), ("port", port, 65535)):
        if type(value) is not int or not 0 < value <= top:
            bad.append(f"{what} {value!r} is not a whole number from 1 to {top}")
    if not model.startswith("/") or ":" in model or _CONTROL.search(model):  # docker -v splits on ':'
        bad.append(f"model {model!r} is not an absolute path without ':' or control characters")
    if stack.torch_cuda_arch_list and not _ARCH_LIST.fullmatch(stack.torch_cuda_arch_list):
        bad.append(f"torch_cuda_arch_list {stack.torch_cuda_arch_list!r} is not a list like '8.0 9.0'")
    if not build and not stack.container_image:
        bad.append("the stack names no container image: resolve it in container mode, or build one")
    return bad


def _vllm_args(stack: Stack, backend_option: str, model: str, port: int) -> list[str]:
    """The OpenAI server's arguments; --model suits both entrypoints (api_server and vllm serve)."""
    args = ["--model", MODEL_DIR, "--served-model-name", posixpath.basename(model.rstrip("/")) or MODEL_DIR,
            "--port", str(port)]
    if stack.attention_backend and backend_option == "flag":
        args += ["--attention-backend", stack.attention_backend]
    if stack.cudagraph_mode:
        args += ["--compilation-config", json.dumps({"cudagraph_mode": stack.cudagraph_mode})]
    return args


def _environment(stack: Stack, backend_option: str, extra_env: dict) -> dict[str, str]:
    env = {}
    if stack.attention_backend and backend_option == "env":
        env["VLLM_ATTENTION_BACKEND"] = stack.attention_backend
    if stack.torch_cuda_arch_list:  # JIT for this host's SMs: an image's own list may reach below sm_75 (seed 002)
        env["TORCH_CUDA_ARCH_LIST"] = stack.torch_cuda_arch_list
    env.update(stack.env)
    env.update(extra_env)
    env["HF_HUB_OFFLINE"] = "1"  # the model is mounted: never reach for the hub
    if bad := [name for name in env if not _ENV_NAME.fullmatch(str(name))]:
        raise ValueError(f"environment variable names {bad!r} are not identifiers")
    return {name: str(value) for name, value in env.items()}


def _compose(value) -> str:
    """A YAML double-quoted string that compose reads back as *value* (``$$`` is compose's literal ``$``)."""
    return json.dumps(str(value).replace("$", "$$"))


def _sh(value) -> str:
    """One shell word for a Dockerfile RUN line, where a newline would end the instruction."""
    if _CONTROL.search(str(value)):
        raise ValueError(f"{value!r} has a control character and cannot go on a Dockerfile line")
    return shlex.quote(str(value))


def _render(name: str, context: dict) -> str:
    text = resources.files("fleetctl").joinpath("templates", name).read_text(encoding="utf-8")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(compose=_compose, systemd=systemd.quote, sh=_sh)
    return env.from_string(text).render(context)
