"""Where a host's proofs run (fleetctl.decide.proofmode): recorded GPU memory facts in, proof mode and sizing out.

The figures are the recorded ones of tests/data/gpu-memory (the H100 80GB with the service at vLLM's 0.9:
5,814 MiB free; idle: 81,079 MiB) and the compute-apps fixture (the service's engine, pid 1796, holding
74,784 MiB)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.decide.proofmode import decide, service_memory
from fleetctl.decide.resolve import Request, resolve
from fleetctl.decide.serving import plan_serving
from fleetctl.facts.probe import Facts, FleetState, GpuProcess, parse_compute_apps, parse_nvidia_smi_query
from fleetctl.remote.gpumem import parse_memory_csv
from tests.fakes import MATRIX

HW = Path(__file__).parent / "lab" / "hardware"
MEMORY = Path(__file__).parent / "data" / "gpu-memory"


def h100(memory: str = "h100-serving.csv", apps: str = "compute-apps-h100-serving.csv", *, serving: bool = True,
         service_pids: tuple[int, ...] = (1795, 1796)) -> Facts:
    """The recorded H100: its query capture, with the recorded memory and processes."""
    gpus, driver = parse_nvidia_smi_query((HW / "h100-sxm-80gb" / "query.csv").read_text())
    used = {m.index: m for m in parse_memory_csv((MEMORY / memory).read_text())}
    gpus = tuple(replace(g, memory_used_mib=used[g.index].used, memory_free_mib=used[g.index].free) for g in gpus)
    return Facts(gpus=gpus, driver_version=driver, cuda_driver_version="13.0", fleet_root="/opt/fleetctl",
                 python={"path": "/usr/bin/python3", "version": "3.12.3"}, os={"id": "ubuntu", "version_id": "24.04"},
                 glibc="2.39", arch="x86_64",
                 gpu_processes=parse_compute_apps((MEMORY / apps).read_text(), gpus),
                 fleet=FleetState(current="envs/a", service="running" if serving else None,
                                  service_pids=service_pids if serving else ()))


def serve(facts: Facts, **hostvars):
    stack = resolve(facts, Request(vllm="0.26.0"), MATRIX).stack
    return plan_serving(facts, stack, hostvars).config


LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}


@pytest.mark.parametrize("facts, hostvars, weights, mode, fraction, said", [
    # Issue 25: the tiny smoke model beside the service at 0.9 fits in 0.05 of the GPU.
    (h100(), {}, None, "beside", 0.05, "fits beside the service: 5814 MiB free of 81559, 2048 MiB needed"),
    # Nothing serves: the proofs have the GPU, at the serving fraction.
    (h100("h100-idle.csv", "compute-apps-none.csv", serving=False), {}, None, "beside", None, "nothing serves"),
    # An 8B model (16,064 MiB of weights) cannot be proven beside the service: the service is stopped for it.
    (h100(), {"fleet_model": "/models/llama-8b", "fleet_max_model_len": 8192}, 16064, "exclusive", 0.9,
     "does not fit beside the service (5814 MiB free of 81559, 19136 MiB needed"),
    # The operator asks for exclusive proofs even where they would fit beside.
    (h100(), {"fleet_proof_mode": "exclusive"}, None, "exclusive", 0.9, "fleet_proof_mode: exclusive"),
    # The driver's pids are not the service's (another pid namespace): all used memory is taken as the service's.
    (h100(service_pids=(99,)), {"fleet_model": "/models/llama-8b", "fleet_max_model_len": 8192}, 16064, "exclusive",
     0.9, "not visible by pid here"),
])
def test_proof_mode_from_recorded_memory(facts, hostvars, weights, mode, fraction, said):
    decided = decide(facts, serve(facts, **hostvars), hostvars, weights_mib=weights,
                     model_config=LLAMA_8B if weights else None)
    assert decided.refusal is None, decided.refusal
    assert decided.mode == mode and said in decided.reason, decided.reason
    assert (decided.sizing or {}).get("fraction") == fraction


def test_what_fits_nowhere_is_refused_naming_the_memory_and_the_way_out():
    # A 70B model in bf16 (134,000 MiB) on one H100: not even with the service stopped.
    facts = h100()
    hostvars = {"fleet_model": "/models/llama-70b"}
    decided = decide(facts, serve(facts, **hostvars), hostvars, weights_mib=134000)
    assert decided.refusal.startswith("the proofs do not fit in GPU memory even with the serving stack stopped: "
                                      "80598 MiB free, 136048 MiB needed + 1632 MiB margin")
    # Forced beside where it does not fit: refused, naming exclusive as the way out.
    hostvars = {"fleet_model": "/models/llama-8b", "fleet_proof_mode": "beside"}
    decided = decide(facts, serve(facts, **hostvars), hostvars, weights_mib=16064)
    assert "5814 MiB free, 18112 MiB needed" in decided.refusal and "fleet_proof_mode: exclusive" in decided.refusal
    assert decide(facts, None, {"fleet_proof_mode": "sometimes"}).refusal.startswith(
        "fleet_proof_mode 'sometimes' is not one of auto, beside, exclusive")


def test_another_process_on_the_gpu_is_not_the_service():
    # Pid 2210 is not the service's: stopping the service frees only the service's 74,784 MiB.
    facts = h100()
    held, guessed = service_memory(facts)
    assert held == {0: 74784} and not guessed
    other = replace(facts, gpu_processes=(GpuProcess(0, 1796, 40000), GpuProcess(0, 2210, 34784)))
    hostvars = {"fleet_model": "/models/llama-8b", "fleet_max_model_len": 8192}
    decided = decide(other, serve(other, **hostvars), hostvars, weights_mib=50000)
    assert decided.refusal and "other processes hold the rest (pids 2210): stop them" in decided.refusal


def test_without_memory_facts_or_a_gpu_the_host_sizes_itself():
    facts = h100()
    blind = replace(facts, gpus=tuple(replace(g, memory_free_mib=None) for g in facts.gpus))
    decided = decide(blind, serve(blind), {})
    assert decided.mode == "beside" and "size themselves on the host" in decided.reason
    cpu = Facts(fleet=FleetState(service="running"))
    assert decide(cpu, None, {}).mode == "beside"
    assert decide(cpu, None, {"fleet_proof_mode": "exclusive"}).mode == "exclusive"  # the CPU lab's way to test it
    unread = decide(facts, serve(facts, fleet_model="/models/x"), {"fleet_model": "/models/x"})
    assert unread.mode == "beside" and "is not known here" in unread.reason


def test_plan_says_each_hosts_proof_mode():
    from rich.console import Console

    from fleetctl.decide.plan import plan_host
    from fleetctl.hosts.inventory import Host
    from fleetctl.report import plan_table

    plans = [plan_host(Host("h100-serving", {"fleet_vllm": "0.26.0"}), h100(), MATRIX),
             plan_host(Host("h100-forced", {"fleet_vllm": "0.26.0", "fleet_proof_mode": "exclusive"}), h100(), MATRIX)]
    assert [p.to_json()["proof"]["mode"] for p in plans] == ["beside", "exclusive"]
    console = Console(width=400, record=True)
    console.print(plan_table(plans))
    text = console.export_text()
    assert "proofs beside: fits beside the service: 5814 MiB free of 81559" in text
    assert "proofs exclusive: fleet_proof_mode: exclusive" in text
