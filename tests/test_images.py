"""Getting an image onto a host, and a container's GPU request: the planners as tables of data, then
their commands against the real Docker engine (tests/engine.py's, on this machine's default socket):
a pull that cannot reach a registry fails with the daemon's own words, and the air-gapped path saves,
removes and loads a small image made here. Every image a test makes is named fleetctl-test-images/…
and removed again by the test; the engine tests start the engine where none answers (the `engine`
fixture) and skip only where none can be started."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from fleetctl.apply.execute import Planned, Step, execute, failed
from fleetctl.apply.images import (CDI_ALL, ImageState, gpu_compose, gpu_refusal, gpu_run_args, image_state_script,
                             mirrored, obtain, parse_image_state, pull_failed_detail, pull_failure)
from fleetctl.reach.connection import LocalConnection, Result
from fleetctl.reach.fanout import Deadline
from fleetctl.status import Status

IMAGE = "vllm/vllm-openai:v0.11.0"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- obtain, as data

def test_a_present_image_is_never_pulled_nor_loaded(tmp_path):
    tarball = tmp_path / "vllm.tar"
    tarball.write_bytes(b"an archive")
    for given in ({}, {"tarball": tarball, "remote_dir": "/opt/fleet/images"}, {"mirror": "mirror.corp:5000"}):
        got = obtain("docker", IMAGE, present=True, **given)
        assert got.actions == ()
        assert got.note == f"image {IMAGE} present: no pull"


def test_an_absent_image_is_pulled_and_the_pull_is_the_reading_action():
    for runtime in ("docker", "podman"):
        got = obtain(runtime, IMAGE, present=False)
        assert [(a.command, a.reads, a.fails, a.change) for a in got.actions] == [
            (f"{runtime} pull -q vllm/vllm-openai:v0.11.0", True, None, f"pull {IMAGE}")]
        assert got.note == f"pull {IMAGE}"


def test_through_a_mirror_the_pulled_image_is_tagged_back_to_the_name_the_files_run():
    got = obtain("docker", IMAGE, present=False, mirror="mirror.corp:5000/hub")
    assert [a.command for a in got.actions] == [
        "docker pull -q mirror.corp:5000/hub/vllm/vllm-openai:v0.11.0",
        "docker tag mirror.corp:5000/hub/vllm/vllm-openai:v0.11.0 vllm/vllm-openai:v0.11.0"]
    assert got.actions[0].reads and got.actions[1].fails
    # a name on another registry goes there itself: no mirror, no tag
    assert [a.command for a in obtain("docker", "nvcr.io/nvidia/vllm:25.09", present=False,
                                      mirror="mirror.corp:5000").actions] == ["docker pull -q nvcr.io/nvidia/vllm:25.09"]


def test_the_air_gapped_path_pushes_the_tarball_by_sha256_then_loads_and_checks_it(tmp_path):
    tarball = tmp_path / "vllm-0.11.tar"
    tarball.write_bytes(b"not really an archive")
    got = obtain("docker", IMAGE, present=False, tarball=tarball, remote_dir="/opt/fleet/images/")
    mkdir, put, load, check = got.actions
    assert mkdir.command == "mkdir -p /opt/fleet/images/"
    assert (put.put, put.command, put.sha256) == (tarball, "/opt/fleet/images/vllm-0.11.tar", sha(tarball))
    assert load.command == "docker load -i /opt/fleet/images/vllm-0.11.tar" and load.fails
    assert check.command.startswith("docker image inspect --format '{{.Id}}' vllm/vllm-openai:v0.11.0 ")
    assert f"holds no image named {IMAGE}" in check.fails and "docker save -o vllm-0.11.tar" in check.fails
    assert got.note == f"load {IMAGE} from vllm-0.11.tar (pushed)"
    # the host state learns the pushed file's hash, as it does a wheel's
    assert Planned("install", got.actions, lambda r: None).puts == [("/opt/fleet/images/vllm-0.11.tar", sha(tarball))]


def test_a_tarball_the_host_has_by_sha256_is_loaded_without_a_push(tmp_path):
    tarball = tmp_path / "vllm.tar"
    tarball.write_bytes(b"archive")
    got = obtain("podman", IMAGE, present=False, tarball=tarball, remote_dir="/opt/fleet/images",
                 have_sha=sha(tarball))
    assert [a.command.split()[:2] for a in got.actions] == [["podman", "load"], ["podman", "image"]]
    assert not any(a.put for a in got.actions)
    assert got.note.endswith("(already on the host by sha256)")
    stale = obtain("podman", IMAGE, present=False, tarball=tarball, remote_dir="/opt/fleet/images", have_sha="0" * 64)
    assert [a.put for a in stale.actions if a.put] == [tarball]


@pytest.mark.parametrize("runtime, image, given, says", [
    ("lxc", IMAGE, {}, "runtime 'lxc' is not docker or podman"),
    ("docker", "", {}, "is not an image name"),
    ("docker", "vllm; rm -rf /", {}, "is not an image name"),
    ("docker", IMAGE, {"tarball": Path("x.tar"), "remote_dir": "images"}, "is not an absolute path"),
])
def test_obtain_refuses_what_it_cannot_plan(runtime, image, given, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        obtain(runtime, image, present=False, **given)


@pytest.mark.parametrize("image, mirror, expected", [
    ("ubuntu", "mirror.corp", "mirror.corp/library/ubuntu"),
    ("ubuntu:24.04", "mirror.corp:5000/", "mirror.corp:5000/library/ubuntu:24.04"),
    ("ubuntu@sha256:" + "a" * 64, "mirror.corp", "mirror.corp/library/ubuntu@sha256:" + "a" * 64),
    ("library/ubuntu:24.04", "mirror.corp", "mirror.corp/library/ubuntu:24.04"),
    ("vllm/vllm-openai:v0.11.0", "harbor.corp/dockerhub", "harbor.corp/dockerhub/vllm/vllm-openai:v0.11.0"),
    ("docker.io/vllm/vllm-openai:v0.11.0", "mirror.corp", "mirror.corp/vllm/vllm-openai:v0.11.0"),
    ("docker.io/ubuntu", "mirror.corp", "mirror.corp/library/ubuntu"),
    ("index.docker.io/library/ubuntu", "mirror.corp", "mirror.corp/library/ubuntu"),
    ("nvcr.io/nvidia/pytorch:25.01-py3", "mirror.corp", "nvcr.io/nvidia/pytorch:25.01-py3"),
    ("ghcr.io/org/img:1", "mirror.corp", "ghcr.io/org/img:1"),
    ("registry.corp:5000/vllm:1", "mirror.corp", "registry.corp:5000/vllm:1"),
    ("localhost/vllm:1", "mirror.corp", "localhost/vllm:1"),
    ("localhost:5000/vllm:1", "mirror.corp", "localhost:5000/vllm:1"),
    ("Registry/vllm:1", "mirror.corp", "Registry/vllm:1"),
    ("ubuntu", None, "ubuntu"),
    ("ubuntu", "", "ubuntu"),
])
def test_a_mirror_prefixes_docker_hub_names_only(image, mirror, expected):
    assert mirrored(image, mirror) == expected


@pytest.mark.parametrize("mirror", ["https://mirror.corp", "mirror corp", "   "])
def test_a_mirror_is_a_registry_host_not_a_url(mirror):
    with pytest.raises(ValueError, match="not a registry host"):
        mirrored("ubuntu", mirror)


# ---------------------------------------------------------------- what the host has, as a command and a parser

ID = "sha256:" + "1c" * 32


@pytest.mark.parametrize("text, expected", [
    (f"@@image\n{ID}\n", ImageState(True, ID)),
    ("@@image\n", ImageState()),
    (f"@@image\n{'1c' * 32}\n", ImageState(True, "1c" * 32)),  # podman's id
    (f"@@lib\n{'ab' * 32}  validate.py\n@@image\n{ID}\n@@image-tarball\n{'ef' * 32}  /opt/fleet/images/v.tar\n",
     ImageState(True, ID, "ef" * 32)),
    ("@@image\nError: No such image: x\n@@image-tarball\n", ImageState()),
    ("", ImageState()),
])
def test_the_hosts_image_state_is_parsed_from_its_sections(text, expected):
    assert parse_image_state(text) == expected


def test_the_image_state_script_reads_and_never_fails():
    assert image_state_script("podman", "vllm/vllm-openai:v0.11.0", "/opt/fleet/images/v 1.tar").splitlines() == [
        "echo @@image; podman image inspect --format '{{.Id}}' vllm/vllm-openai:v0.11.0 2>/dev/null",
        "echo @@image-tarball; sha256sum -- '/opt/fleet/images/v 1.tar' 2>/dev/null",
        "true"]


# ---------------------------------------------------------------- a failed pull's detail, as text

DOCKER_DNS = ('Error response from daemon: Get "https://registry-1.docker.io/v2/": dial tcp: lookup '
              'registry-1.docker.io on 10.255.255.53:53: no such host')
PODMAN = ("Trying to pull docker.io/vllm/vllm-openai:v0.11.0...\n"
          "Error: initializing source docker://vllm/vllm-openai:v0.11.0: pinging container registry "
          "registry-1.docker.io: Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io: "
          "no such host\n")


@pytest.mark.parametrize("stderr, expected", [
    (DOCKER_DNS + "\n", f"pulling {IMAGE} failed: {DOCKER_DNS}"),
    ("Using default tag: latest\n" + DOCKER_DNS + "\n\n", f"pulling {IMAGE} failed: {DOCKER_DNS}"),
    (PODMAN, f"pulling {IMAGE} failed: {PODMAN.splitlines()[1]}"),
    ("Error response from daemon: pull access denied for vllm/nope, repository does not exist or may require "
     "'docker login': denied: requested access to the resource is denied\n",
     f"pulling {IMAGE} failed: Error response from daemon: pull access denied for vllm/nope, repository does not "
     "exist or may require 'docker login': denied: requested access to the resource is denied"),
    ("v0.11.0: Pulling from vllm/vllm-openai\r\x1b[1A\x1b[2Kabc123: Downloading\r\n"
     "Error response from daemon: manifest for vllm/vllm-openai:v9 not found: manifest unknown\n",
     f"pulling {IMAGE} failed: Error response from daemon: manifest for vllm/vllm-openai:v9 not found: manifest unknown"),
    ("WARN[0000] some warning\nsomething went wrong\n", f"pulling {IMAGE} failed: something went wrong"),
    ("", f"pulling {IMAGE} failed, and the engine said nothing"),
])
def test_a_failed_pull_names_the_registrys_own_message(stderr, expected):
    assert pull_failed_detail(stderr, image=IMAGE) == expected


def test_a_failed_pulls_detail_stays_one_short_line():
    detail = pull_failed_detail("Error response from daemon: " + "x" * 5000)
    assert "\n" not in detail and len(detail) < 500 and detail.endswith("…")
    assert pull_failed_detail(DOCKER_DNS) == f"the pull failed: {DOCKER_DNS}"


def test_pull_failure_judges_only_a_failed_pull():
    def result(exited, stderr="", stdout=""):
        return Result("h", "docker pull -q x", exited, stdout, stderr, 0.1)
    assert pull_failure(None, IMAGE) is None  # present or loaded: no pull ran
    assert pull_failure(result(0, stdout="docker.io/vllm/vllm-openai:v0.11.0\n"), IMAGE) is None
    assert pull_failure(result(1, DOCKER_DNS), IMAGE) == f"pulling {IMAGE} failed: {DOCKER_DNS}"


# ---------------------------------------------------------------- the GPU request, as text

@pytest.mark.parametrize("runtime, gpus, nvidia_runtime, cdi, args, compose", [
    ("docker", 8, True, False, ["--gpus", "all"],
     {"deploy": {"resources": {"reservations": {"devices": [
         {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}}),
    ("docker", 1, True, True, ["--gpus", "all"],
     {"deploy": {"resources": {"reservations": {"devices": [
         {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}}),
    ("docker", 4, False, True, ["--device", "nvidia.com/gpu=all"], {"devices": ["nvidia.com/gpu=all"]}),
    ("podman", 2, False, True, ["--device", "nvidia.com/gpu=all"], {"devices": ["nvidia.com/gpu=all"]}),
    ("podman", 2, True, True, ["--device", "nvidia.com/gpu=all"], {"devices": ["nvidia.com/gpu=all"]}),
    ("docker", 0, False, False, [], {}),
    ("docker", 0, True, True, [], {}),
    ("podman", 0, False, False, [], {}),
])
def test_the_gpu_request_follows_the_hosts_engine(runtime, gpus, nvidia_runtime, cdi, args, compose):
    assert gpu_refusal(gpus, runtime, nvidia_runtime, cdi) is None
    assert gpu_run_args(runtime, gpus, nvidia_runtime, cdi) == args
    assert gpu_compose(runtime, gpus, nvidia_runtime, cdi) == compose
    assert CDI_ALL == "nvidia.com/gpu=all"


@pytest.mark.parametrize("runtime, gpus, nvidia_runtime, expected", [
    ("docker", 8, False,
     "8 GPU(s), but docker has neither the NVIDIA container runtime nor CDI specs for them: install "
     "nvidia-container-toolkit, then `sudo nvidia-ctk runtime configure --runtime=docker` and restart docker "
     "(or `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`)"),
    ("podman", 1, False,
     "1 GPU(s), but podman has no CDI specs for them (podman reaches NVIDIA GPUs only through CDI): install "
     "nvidia-container-toolkit, then `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"),
    ("podman", 1, True,  # the docker runtime's configuration does not reach podman
     "1 GPU(s), but podman has no CDI specs for them (podman reaches NVIDIA GPUs only through CDI): install "
     "nvidia-container-toolkit, then `sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"),
])
def test_a_gpu_host_without_the_nvidia_runtime_or_cdi_is_refused_with_the_fix(runtime, gpus, nvidia_runtime, expected):
    assert gpu_refusal(gpus, runtime, nvidia_runtime, False) == expected
    assert "\n" not in expected
    with pytest.raises(ValueError, match="nvidia-container-toolkit"):
        gpu_run_args(runtime, gpus, nvidia_runtime, False)
    with pytest.raises(ValueError, match="nvidia-container-toolkit"):
        gpu_compose(runtime, gpus, nvidia_runtime, False)


@pytest.mark.parametrize("runtime, gpus", [("lxc", 1), ("docker", -1), ("docker", 1.5), ("docker", True)])
def test_the_gpu_request_refuses_nonsense(runtime, gpus):
    with pytest.raises(ValueError):
        gpu_refusal(gpus, runtime, True, True)


# ---------------------------------------------------------------- against the real engine

# The session's real engine (tests/conftest.py): started where none answers, skipped only where none can be.
engine = pytest.mark.usefixtures("engine")


def sh(command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)


def present(image: str) -> bool:
    return sh(f"docker image inspect {image}").returncode == 0


@pytest.fixture
def images():
    """Makes tiny images named fleetctl-test-images/<what>:<unique tag>; removes every one of them afterwards."""
    made: list[str] = []

    def make(what: str) -> str:
        name = f"fleetctl-test-images/{what}:{uuid.uuid4().hex[:12]}"
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            data = f"{name}\n".encode()
            info = tarfile.TarInfo("hello")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        made.append(name)
        done = subprocess.run(["docker", "import", "-", name], input=archive.getvalue(), capture_output=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return name

    yield make
    for name in made:
        subprocess.run(["docker", "rmi", "-f", name], capture_output=True, timeout=120)


def install(got) -> Planned:
    """The obtaining wired as the install step wires it: the pull reads, its failure is the registry's message."""
    def outcome(result: Result | None) -> Step:
        if detail := pull_failure(result, got.image):
            return failed("install", detail, result)
        return Step("install", Status.CHANGED if got.actions else Status.OK, got.note)
    return Planned("install", got.actions, outcome)


@engine
def test_a_pull_with_no_registry_fails_with_the_daemons_own_message():
    image = f"fleetctl-test-images/unpullable:{uuid.uuid4().hex[:12]}"
    (pull,) = obtain("docker", image, present=False).actions
    done = sh(pull.command)
    assert done.returncode != 0
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("Error response from daemon:")
    assert pull_failed_detail(done.stderr, image=image) == f"pulling {image} failed: {said}"
    # the same, run by the executor: the failed step's detail is the daemon's message, not an exit status
    step = execute(install(obtain("docker", image, present=False)), LocalConnection("local"), Deadline(120))
    assert step.status == Status.FAILED
    assert step.detail.startswith(f"pulling {image} failed: Error response from daemon:")
    assert not present(image)


@engine
def test_a_pull_through_an_unreachable_mirror_names_the_mirror():
    image = f"fleetctl-test-images/unpullable:{uuid.uuid4().hex[:12]}"
    got = obtain("docker", image, present=False, mirror="127.0.0.1:9")
    step = execute(install(got), LocalConnection("local"), Deadline(120))
    assert step.status == Status.FAILED
    assert step.detail.startswith(f"pulling {image} failed: Error response from daemon:")
    assert "127.0.0.1:9" in step.detail
    assert len(step.actions) == 1  # the tag back never ran


@engine
def test_the_air_gapped_path_loads_a_saved_image_pushed_by_sha256(images, tmp_path):
    image = images("tiny")
    tarball = tmp_path / "tiny.tar"
    assert sh(f"docker save -o {tarball} {image}").returncode == 0
    assert sh(f"docker rmi {image}").returncode == 0 and not present(image)
    host_dir = tmp_path / "host" / "images"
    conn = LocalConnection("local")

    state = parse_image_state(sh(image_state_script("docker", image, str(host_dir / "tiny.tar"))).stdout)
    assert state == ImageState()
    got = obtain("docker", image, present=state.present, tarball=tarball, remote_dir=str(host_dir),
                 have_sha=state.tarball_sha)
    assert any(a.put for a in got.actions)
    step = execute(install(got), conn, Deadline(120))
    assert step.status == Status.CHANGED, (step.detail, step.tail)
    assert present(image)
    assert sha(host_dir / "tiny.tar") == sha(tarball)

    # once the host has the tarball by sha256 it is loaded again without a push
    loaded = parse_image_state(sh(image_state_script("docker", image, str(host_dir / "tiny.tar"))).stdout)
    assert loaded.present and loaded.image_id.startswith("sha256:") and loaded.tarball_sha == sha(tarball)
    assert sh(f"docker rmi {image}").returncode == 0
    state = parse_image_state(sh(image_state_script("docker", image, str(host_dir / "tiny.tar"))).stdout)
    assert (state.present, state.tarball_sha) == (False, sha(tarball))
    again = obtain("docker", image, present=state.present, tarball=tarball, remote_dir=str(host_dir),
                   have_sha=state.tarball_sha)
    assert not any(a.put for a in again.actions)
    assert execute(install(again), conn, Deadline(120)).status == Status.CHANGED
    assert present(image)
    # and once present, nothing runs at all
    assert obtain("docker", image, present=present(image), tarball=tarball, remote_dir=str(host_dir)).actions == ()


@engine
def test_a_tarball_holding_another_image_fails_naming_what_it_held(images, tmp_path):
    wanted, other = images("tiny"), images("other")
    tarball = tmp_path / "other.tar"
    assert sh(f"docker save -o {tarball} {other}").returncode == 0
    assert sh(f"docker rmi {wanted} {other}").returncode == 0

    got = obtain("docker", wanted, present=present(wanted), tarball=tarball, remote_dir=str(tmp_path / "host"))
    step = execute(install(got), LocalConnection("local"), Deadline(120))
    assert step.status == Status.FAILED
    assert step.detail.startswith(f"other.tar holds no image named {wanted}")
    assert f"docker save -o other.tar {wanted}" in step.detail
    assert other in step.tail  # the tags the tarball did hold
    assert not present(wanted) and present(other)


@engine
def test_a_tarball_that_is_no_image_archive_fails_at_the_load(tmp_path):
    tarball = tmp_path / "broken.tar"
    tarball.write_bytes(b"this is not a tar archive\n" * 100)
    image = f"fleetctl-test-images/never:{uuid.uuid4().hex[:12]}"
    got = obtain("docker", image, present=False, tarball=tarball, remote_dir=str(tmp_path / "host"))
    step = execute(install(got), LocalConnection("local"), Deadline(120))
    assert step.status == Status.FAILED
    assert step.detail.startswith(f"docker load -i {tmp_path}/host/broken.tar failed")
    assert step.tail
    assert not present(image)
