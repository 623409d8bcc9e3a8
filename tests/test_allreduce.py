"""Validate's all-reduce over a host's GPUs (issue 30): the floor is data per GPU model, the bus
bandwidth is nccl-tests' figure, one-GPU hosts skip it and say so, a slow fabric fails validate."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest

from fleetctl.apply import steps
from fleetctl.decide.health import allreduce_floor, load_rules
from fleetctl.decide.serving import plan_serving
from fleetctl.facts.probe import Gpu
from fleetctl.remote import validate
from tests.fakes import H100, STACK
from tests.test_steps import context

H100_SXM = "NVIDIA H100 80GB HBM3"
TWO_H100 = replace(H100, gpus=tuple(Gpu(i, H100_SXM, f"GPU-{i}", "9.0", 81559, None) for i in range(2)))
GPU_STACK = replace(STACK, vllm_package="vllm")


@pytest.mark.parametrize("names, floor", [
    ([H100_SXM] * 2, 296.0),             # 370 GB/s ring busbw less 20%
    ([H100_SXM] * 8, 296.0),
    (["NVIDIA H200"] * 2, 296.0),
    (["NVIDIA A100-SXM4-80GB"] * 4, 184.0),
    (["NVIDIA H100 PCIe"] * 2, 28.0),
    (["NVIDIA L4"] * 2, None),           # no figure: measured, not judged
    ([H100_SXM, "NVIDIA H200"], None),   # mixed models: not judged
])
def test_the_floor_is_the_models_figure_less_the_slack(names, floor):
    result = allreduce_floor(names)
    assert result.ranks == len(names) and result.min_gbps == floor
    assert ("must reach" in result.reason) == (floor is not None)


def test_a_host_of_one_gpu_gets_no_all_reduce_and_every_row_cites_known_sources():
    assert allreduce_floor([H100_SXM]) is None and allreduce_floor([]) is None
    table = load_rules().allreduce
    assert all(set(row["sources"]) <= set(table["sources"]) for row in table["busbw_gbps"])


def test_bus_bandwidth_is_nccl_tests_algorithm_bandwidth_times_2_n_minus_1_over_n():
    mib256 = 256 * 2**20
    assert validate.busbw_gbps(mib256, 0.001, 2) == pytest.approx(268.435456)         # n=2: factor 1
    assert validate.busbw_gbps(mib256, 0.001, 8) == pytest.approx(268.435456 * 1.75)  # n=8: factor 7/4


def test_validate_asks_a_multi_gpu_host_for_its_floor_and_the_plan_says_so():
    command = steps.validate(context(facts=TWO_H100, stack=GPU_STACK)).actions[-1].command
    assert "--allreduce-min-gbps 296.0" in command
    assert "--allreduce-min-gbps" not in steps.validate(context(facts=H100, stack=GPU_STACK)).actions[-1].command
    reasons = plan_serving(TWO_H100, GPU_STACK, {}).config.reasons
    assert any(r.startswith("validate: all-reduce over 2 GPUs must reach 296.0 GB/s") for r in reasons)
    assert not any("all-reduce" in r for r in plan_serving(H100, GPU_STACK, {}).config.reasons)


def test_one_gpu_skips_the_all_reduce_and_says_so():
    result = validate.allreduce(None, 1, 296.0)
    assert result["ok"] and result["applies"] is False and "skipped" in result["detail"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not in the test environment (the GPU test host runs the NCCL path)")
@pytest.mark.parametrize("floor, passes", [(0.0, True), (1e9, False)])
def test_a_real_all_reduce_between_two_processes_is_measured_and_judged(floor, passes):
    # The same code path as NCCL on GPUs, over gloo on the CPU: two processes, a real rendezvous.
    import torch
    result = validate.allreduce(torch, 2, floor, backend="gloo", mib=4)
    assert result["ok"] is passes and result["busbw_gbps"] > 0 and result["ranks"] == 2
    assert ("needs 1000000000.0 GB/s" in result["detail"]) is not passes
    json.dumps(result)  # it travels in the verdict's one JSON line
