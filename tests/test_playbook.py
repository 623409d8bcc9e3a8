"""Playbooks load, template per host, and refuse bad keys before any host is touched;
what verify compares after an install."""

from __future__ import annotations

import pytest

from fleetctl.apply.provision import install_pins, mismatches
from fleetctl.decide.resolve import Stack
from fleetctl.errors import PlaybookError
from fleetctl.hosts.playbook import STEPS, load_playbook
from tests.conftest import ROOT, fleetctl


def test_builtin_and_shipped_playbooks_load():
    path, (play,) = load_playbook()
    assert path.name == "default.yml" and play.steps == STEPS
    for shipped in (ROOT / "playbooks").glob("*.yml"):
        assert load_playbook(shipped)[1]


def test_templating_against_host_vars(tmp_path):
    path = tmp_path / "p.yml"
    path.write_text("- name: pinned\n  vars:\n    fleet_vllm: \"{{ serve_vllm | default('latest') }}\"\n"
                    "  smoke:\n    model: \"/models/{{ inventory_model }}\"\n")
    _, (play,) = load_playbook(path)
    host = play.for_host({"serve_vllm": "0.31.0", "inventory_model": "llama 3"})
    assert host.vars["fleet_vllm"] == "0.31.0" and host.smoke["model"] == "/models/llama 3"
    assert play.hostvars({"fleet_vllm": "0.30.0", "serve_vllm": "0.32.0", "inventory_model": "x"})["fleet_vllm"] == "0.32.0"
    with pytest.raises(PlaybookError, match="cannot template"):
        play.for_host({})  # inventory_model is undefined


@pytest.mark.parametrize("text, message", [
    ("- name: x\n  taks: []\n", "unknown key(s) taks"),
    ("- name: x\n  steps: [install, reboot]\n", "unknown step(s) reboot"),
    ("- name: x\n  smoke: {tokens: 4}\n", "unknown key(s) tokens under smoke"),
    ("name: x\n", "a playbook is a list of plays"),
    ("- name: x\n  vars: [1]\n", "vars must be a mapping"),
    ("- name: [x\n", "not valid YAML"),
])
def test_bad_playbooks(tmp_path, text, message):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(PlaybookError) as err:
        load_playbook(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_bad_playbook_on_the_command_line_touches_no_host(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("- name: x\n  steps: [reboot]\n")
    proc = fleetctl("provision", ROOT / "inventories" / "local.yml", "--playbook", path)
    assert proc.returncode == 1 and "unknown step(s) reboot" in proc.stderr and "Traceback" not in proc.stderr


GPU = Stack(python="3.12", torch="2.14.0", cuda="13.0", torch_index=None, vllm="0.33.0", vllm_package="vllm",
            flashinfer="0.7.2.post1", flashinfer_index=None, container_image=None, attention_backend="FLASH_ATTN",
            cudagraph_mode="FULL_AND_PIECEWISE", torch_cuda_arch_list="9.0")


def test_verify_catches_a_swapped_torch():
    good = {"torch": "2.14.0+cu130", "torch_cuda": "13.0", "vllm": "0.33.0", "flashinfer-python": "0.7.2.post1"}
    assert mismatches(GPU, good) == []
    assert mismatches(GPU, {**good, "torch": "2.13.0"}) == ["torch is 2.13.0, resolved 2.14.0"]
    assert mismatches(GPU, {**good, "torch_cuda": "12.8"}) == ["torch is built for CUDA 12.8, resolved CUDA 13.0"]
    assert mismatches(GPU, {**good, "vllm": None}) == ["vllm is None, resolved 0.33.0"]
    assert install_pins(GPU) == ["torch==2.14.0", "vllm==0.33.0", "flashinfer-python==0.7.2.post1"]
