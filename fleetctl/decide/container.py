"""Container deployment files for a resolved stack, pure: text in, text out.

:func:`render_dockerfile` builds a stack's image where no published one fits: vLLM's CPU build
on a Python base (a CPU host in container mode; no vllm-cpu image is published), or a CUDA
stack on NVIDIA's devel image (seed 001's shape: uv, a pinned arch list).
:func:`render_service` serves the image: a compose service and a systemd unit that run the
same container with the server command smoke.py decides, on host networking.
Nothing is written or run here; the steps decide where the files go and what runs them.

Every value from a stack, an inventory or the caller is escaped for the file it lands
in: compose strings are JSON-quoted with ``$`` doubled (compose interpolates ``$``),
ExecStart words take systemd's own quoting (:func:`fleetctl.systemd.quote`: ExecStart is no
shell, and expands ``%`` and ``$`` even inside quotes), Dockerfile RUN words take shlex.quote.

:func:`gpu_run_args` and :func:`gpu_refusal` render the device request from the host's facts: the
NVIDIA runtime (``docker run --gpus all``), CDI specs (``--device nvidia.com/gpu=all``, podman's only
way), nothing on a CPU host, and a refusal with the fix on a GPU host whose engine has neither.
"""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from typing import TYPE_CHECKING, Mapping

import jinja2

from fleetctl import systemd
from fleetctl.errors import FleetError

if TYPE_CHECKING:  # the resolver reads this module's GPU rules: stacks are only annotations here
    from fleetctl.decide.resolve import Stack

# The nvidia/cuda tag for each CUDA a stack can carry: the last patch release of each minor.
# vLLM's docker/Dockerfile builds on 12.8.1 and its docker/versions.json on 13.0.2; seed 001
# names 12.1.1 and 12.9.1; every tag here is a FROM line in public Dockerfiles.
CUDA_IMAGES = {"12.1": "12.1.1", "12.4": "12.4.1", "12.6": "12.6.3", "12.8": "12.8.1",
               "12.9": "12.9.1", "13.0": "13.0.2", "13.2": "13.2.0"}
NAME = "fleetctl-vllm"  # the container, its compose project and its unit's file name (fleet_container_name)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARCH_LIST = re.compile(r"\d+\.\d+(\+PTX)?( \d+\.\d+(\+PTX)?)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def render_service(stack: Stack, *, host: str, name: str, command: list[str], env: Mapping[str, str | None],
                   model: str, port: int, runtime: str = "docker", gpu_args: tuple[str, ...] = ()) -> dict[str, str]:
    """The files that serve *stack*'s image on *host*: a compose file and a systemd unit running one container
    *name* with the server's *command* and *env* (as smoke.py decides them, :func:`fleetctl.apply.steps.server_command`),
    host networking (the server binds *port* itself), the host's *model* directory mounted read-only at its
    own path, and the GPUs the host's runtime hands out (*gpu_args*: ``--gpus all`` or CDI devices)."""
    if problems := _problems(stack, model, port, runtime, name, command):
        raise ValueError("; ".join(problems))
    environment = {k: str(v) for k, v in env.items() if v is not None}
    if bad := [k for k in environment if not _ENV_NAME.fullmatch(str(k))]:
        raise ValueError(f"environment variable names {bad!r} are not identifiers")
    context = {"stack": stack, "host": host, "name": name, "port": port, "runtime": runtime,
               "image": stack.container_image, "model": model, "command": list(command), "env": environment,
               "gpu_args": list(gpu_args), "gpus": bool(gpu_args)}
    return {"compose.yaml": _render("compose.yaml.j2", context), f"{name}.service": _render("vllm.service.j2", context)}


def render_dockerfile(stack: Stack, *, ca: bool = False) -> str:
    """The Dockerfile that builds *stack*'s image: vLLM's CPU build on the stack's base (container_base), or a
    CUDA stack on NVIDIA's devel image of its CUDA. *ca*: the build context holds ca.pem, trusted by pip."""
    if stack.container_base:
        for value in (stack.container_base, stack.torch, stack.vllm, *stack.packages, *stack.uninstall,
                      stack.torch_index or ""):
            _sh(value)  # one word each, no newline: refused here rather than in a broken Dockerfile
        return _render("Dockerfile.cpu.j2", {"stack": stack, "ca": ca})
    if stack.cuda not in CUDA_IMAGES:
        raise FleetError(f"no nvidia/cuda base image is known for CUDA {stack.cuda}",
                         fix=f"build a stack with CUDA {', '.join(CUDA_IMAGES)}, or use a prebuilt image")
    if stack.torch_cuda_arch_list and not _ARCH_LIST.fullmatch(stack.torch_cuda_arch_list):
        raise ValueError(f"torch_cuda_arch_list {stack.torch_cuda_arch_list!r} is not a list like '8.0 9.0'")
    return _render("Dockerfile.j2", {"stack": stack, "cuda_tag": CUDA_IMAGES[stack.cuda], "ca": ca})


def _problems(stack: Stack, model: str, port: int, runtime: str, name: str, command: list[str]) -> list[str]:
    bad = []
    if runtime not in ("docker", "podman"):
        bad.append(f"runtime {runtime!r} is not docker or podman")
    if type(port) is not int or not 0 < port <= 65535:
        bad.append(f"port {port!r} is not a whole number from 1 to 65535")
    if not model.startswith("/") or ":" in model or _CONTROL.search(model):  # docker -v splits on ':'
        bad.append(f"model {model!r} is not an absolute path without ':' or control characters")
    if not NAME_RE.fullmatch(name):
        bad.append(f"container name {name!r} is not [a-z0-9][a-z0-9_.-]* (a compose project name)")
    if not command:
        bad.append("no server command")
    if not stack.container_image:
        bad.append("the stack names no container image: resolve it in container mode")
    return bad


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


RUNTIMES = ("docker", "podman")
CDI_ALL = "nvidia.com/gpu=all"  # the CDI device name nvidia-ctk generates for every GPU


def gpu_refusal(gpus: int, runtime: str, nvidia_runtime: bool, cdi: bool) -> str | None:
    """Why a container cannot reach this host's GPUs, in one line with the fix; None where it can (or needs none)."""
    _check(runtime, gpus)
    if gpus == 0 or cdi or (runtime == "docker" and nvidia_runtime):
        return None
    cdi_fix = "`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"
    if runtime == "podman":
        return (f"{gpus} GPU(s), but podman has no CDI specs for them (podman reaches NVIDIA GPUs only through CDI): "
                f"install nvidia-container-toolkit, then {cdi_fix}")
    return (f"{gpus} GPU(s), but docker has neither the NVIDIA container runtime nor CDI specs for them: install "
            f"nvidia-container-toolkit, then `sudo nvidia-ctk runtime configure --runtime=docker` and restart "
            f"docker (or {cdi_fix})")


def gpu_run_args(runtime: str, gpus: int, nvidia_runtime: bool, cdi: bool) -> list[str]:
    """The ``<runtime> run`` words that give the container every GPU of the host; none on a CPU host.

    ValueError where :func:`gpu_refusal` refuses: a GPU host's container never silently runs without GPUs."""
    if refusal := gpu_refusal(gpus, runtime, nvidia_runtime, cdi):
        raise ValueError(refusal)
    if gpus == 0:
        return []
    if runtime == "docker" and nvidia_runtime:
        return ["--gpus", "all"]
    return ["--device", CDI_ALL]


def gpu_compose(runtime: str, gpus: int, nvidia_runtime: bool, cdi: bool) -> dict:
    """The same request as compose service keys: the NVIDIA runtime's device reservation, CDI's device
    name, or nothing on a CPU host (where a reservation with ``driver: nvidia`` fails the service's start)."""
    if not gpu_run_args(runtime, gpus, nvidia_runtime, cdi):
        return {}
    if runtime == "docker" and nvidia_runtime:
        return {"deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}}
    return {"devices": [CDI_ALL]}


def _check(runtime: str, gpus: int) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not {' or '.join(RUNTIMES)}")
    if type(gpus) is not int or gpus < 0:
        raise ValueError(f"gpus {gpus!r} is not a whole number of GPUs")
