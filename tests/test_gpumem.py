"""The proofs' GPU memory rule (fleetctl/remote/gpumem.py): recorded free memory in, a fraction or a
refusal out. The same file runs on hosts beside smoke.py and validate.py; here it is loaded as fleetctl's."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetctl.remote import gpumem
from fleetctl.remote.gpumem import GpuMemory

DATA = Path(__file__).parent / "data" / "gpu-memory"


def recorded(name: str) -> list[GpuMemory]:
    return gpumem.parse_memory_csv((DATA / name).read_text())


def test_parse_memory_csv():
    assert recorded("h100-serving.csv") == [GpuMemory(0, 81559, 75265, 5814)]
    assert [g.free for g in recorded("h200x2-one-serving.csv")] == [13955, 143155]
    # A MIG parent reads [N/A]; a header or an error line is not a GPU.
    assert gpumem.parse_memory_csv("0, [N/A], [N/A], [N/A]\nNVIDIA-SMI has failed\n1, 100, 1, 99\n") == [
        GpuMemory(1, 100, 1, 99)]


@pytest.mark.parametrize("capture, gpus, need, ceiling, fraction", [
    # Issue 25: the H100 with the service at vLLM's 0.9 — 5,814 MiB free, 1,631 margin: 0.05 (4,077 MiB),
    # the fraction that passed by hand beside the service.
    ("h100-serving.csv", 1, gpumem.TINY_NEED_MIB, None, 0.05),
    ("h100-serving.csv", 1, gpumem.VALIDATE_NEED_MIB, None, 0.05),
    # Nothing serving: the serving fraction (vLLM's 0.9, or the operator's) is the ceiling.
    ("h100-idle.csv", 1, gpumem.TINY_NEED_MIB, None, 0.9),
    ("h100-idle.csv", 1, gpumem.TINY_NEED_MIB, 0.6, 0.6),
    # A model of 40 GiB does not fit beside the service, and fits an idle GPU.
    ("h100-serving.csv", 1, 40960, None, None),
    ("h100-idle.csv", 1, 40960, None, 0.9),
    # Two GPUs, a service on GPU 0 only: a TP-2 proof is sized by the fuller one; a one-GPU proof on GPU 0 too.
    ("h200x2-one-serving.csv", 2, gpumem.TINY_NEED_MIB, None, 0.07),
    ("h200x2-one-serving.csv", 1, gpumem.TINY_NEED_MIB, None, 0.07),
])
def test_size(capture, gpus, need, ceiling, fraction):
    sizing = gpumem.size(recorded(capture)[:gpus], need, ceiling)
    assert sizing.fraction == fraction, sizing.text()
    if fraction is not None:  # what it may take is within what was free, less the margin
        assert need <= fraction * sizing.total_mib <= sizing.free_mib - sizing.margin_mib


def test_a_proof_that_does_not_fit_is_one_line_with_the_figures_and_the_way_out():
    sizing = gpumem.size(recorded("h100-serving.csv"), 40960)
    assert not sizing.fits and sizing.to_dict()["fraction"] is None
    line = gpumem.refusal("the smoke test's server", sizing)
    assert "5814 MiB free, 40960 MiB needed + 1632 MiB margin" in line and "fleet_proof_mode: exclusive" in line
    assert "\n" not in line


def test_needs():
    assert gpumem.smoke_need_mib(None) == gpumem.TINY_NEED_MIB
    # Llama 3.1 8B in bf16 (16,064 MiB of weights), 8,192 tokens: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 B.
    llama = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    assert gpumem.kv_mib(llama, 8192) == 1024
    assert gpumem.smoke_need_mib(16064, llama, 8192) == 16064 + 1024 + gpumem.OVERHEAD_MIB
    # Over two GPUs each holds half the weights and half the KV heads.
    assert gpumem.smoke_need_mib(16064, llama, 8192, tp=2) == 8032 + 512 + gpumem.OVERHEAD_MIB
    assert gpumem.kv_mib({"num_hidden_layers": 2}, 256) == 0  # a config that does not say: no guess


def test_weights_and_config_of_a_model_directory(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"\0" * (3 * 2 ** 20))
    (tmp_path / "tokenizer.json").write_bytes(b"\0" * 2 ** 20)
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2}')
    assert gpumem.weights_mib(str(tmp_path)) == 3 and gpumem.model_config(str(tmp_path)) == {"num_hidden_layers": 2}
    assert gpumem.weights_mib(str(tmp_path / "missing")) is None and gpumem.model_config(None) is None


def test_visible_follows_cuda_visible_devices(monkeypatch):
    gpus = recorded("h200x2-one-serving.csv")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [g.index for g in gpumem.visible(gpus, 1)] == [0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.index for g in gpumem.visible(gpus, 1)] == [1]
