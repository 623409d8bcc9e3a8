"""Ansible Vault (fleetctl/hosts/vault.py): files and ``!vault`` values that the real ``ansible-vault`` wrote,
decrypted as Ansible decrypts them, compared with ``ansible-inventory``; decrypted values masked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.errors import FleetError
from fleetctl.hosts.inventory import VaultText, Vaulted, load_inventory
from fleetctl.hosts.vault import Secret, Vault, VaultError, load_vault
from fleetctl.redact import redact
from tests.conftest import fleetctl, requires_ansible

ANSIBLE_VAULT = Path(sys.executable).parent / "ansible-vault"
pytestmark = requires_ansible


def vault(*args: str, cwd: Path) -> str:
    done = subprocess.run([str(ANSIBLE_VAULT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def vaulted_inventory(tmp_path) -> Path:
    """An inventory whose group_vars hold an encrypted file and a !vault value, as Ansible users write them."""
    (tmp_path / "pw").write_text("the-vault-password\n")
    (tmp_path / "other-pw").write_text("another-one\n")
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv" / "hosts.yml").write_text("all:\n  children:\n    gpu:\n      hosts:\n        h1:\n        h2:\n")
    gv = tmp_path / "inv" / "group_vars" / "gpu"
    gv.mkdir(parents=True)
    (gv / "secret.yml").write_text("vault_become_pass: s3cret-sudo-Pass\nvault_list:\n  - one-item\n  - 2\n")
    vault("encrypt", "--vault-id", f"prod@{tmp_path / 'pw'}", str(gv / "secret.yml"), cwd=tmp_path)
    token = vault("encrypt_string", "--vault-password-file", str(tmp_path / "pw"), "tok-9f8e7d6c",
                  "--name", "api_token", cwd=tmp_path)
    (gv / "plain.yml").write_text('ansible_become_password: "{{ vault_become_pass }}"\nfleet_vllm: latest\n' + token)
    return tmp_path


def test_a_file_and_a_value_ansible_vault_wrote_are_decrypted(vaulted_inventory):
    root = vaulted_inventory
    inv = load_inventory(root / "inv", vault=load_vault([str(root / "pw")]))
    h1 = inv.hosts["h1"].vars
    assert h1["vault_become_pass"] == "s3cret-sudo-Pass" and isinstance(h1["vault_become_pass"], VaultText)
    assert h1["vault_list"] == ["one-item", 2]
    assert h1["api_token"] == "tok-9f8e7d6c"
    # The Ansible idiom: the become password templated from the vaulted var, when it is used.
    assert inv.templated("h1").vars["ansible_become_password"] == "s3cret-sudo-Pass"


def test_decrypted_values_are_masked_wherever_redacted(vaulted_inventory):
    root = vaulted_inventory
    load_inventory(root / "inv", vault=load_vault([str(root / "pw")]))
    assert redact("sudo said s3cret-sudo-Pass and tok-9f8e7d6c") == "sudo said *** and ***"


def test_the_label_of_a_vault_id_is_tried_first_and_any_password_that_opens_it_does(vaulted_inventory):
    root = vaulted_inventory
    both = load_vault([], [f"dev@{root / 'other-pw'}", f"prod@{root / 'pw'}"])
    assert load_inventory(root / "inv", vault=both).hosts["h2"].vars["vault_become_pass"] == "s3cret-sudo-Pass"
    by_env = load_vault([], [], env={"ANSIBLE_VAULT_PASSWORD_FILE": str(root / "pw")})
    assert load_inventory(root / "inv", vault=by_env).hosts["h2"].vars["api_token"] == "tok-9f8e7d6c"


def test_no_password_or_the_wrong_one_is_one_line_naming_the_file(vaulted_inventory):
    root = vaulted_inventory
    with pytest.raises(VaultError, match=r"secret\.yml: encrypted with ansible-vault and no vault password"):
        load_inventory(root / "inv")
    with pytest.raises(VaultError, match=r"\.yml: (a !vault value: )?no vault password given decrypts it"):
        load_inventory(root / "inv", vault=load_vault([str(root / "other-pw")]))


def test_a_vault_value_without_a_password_stays_ciphertext(tmp_path):
    (tmp_path / "pw").write_text("pw1\n")
    token = vault("encrypt_string", "--vault-password-file", str(tmp_path / "pw"), "xyz-secret", "--name", "t",
                  cwd=tmp_path)
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    h1:\n  vars:\n" + "".join(f"    {line}\n"
                                                                                    for line in token.splitlines()))
    value = load_inventory(tmp_path / "inv.yml").hosts["h1"].vars["t"]
    assert isinstance(value, Vaulted) and "$ANSIBLE_VAULT;1.1;AES256" in value.ciphertext


def test_a_script_password_file_is_run(tmp_path):
    script = tmp_path / "pw.sh"
    script.write_text("#!/bin/sh\necho from-a-script\n")
    script.chmod(0o700)
    assert load_vault([str(script)]).secrets[0].password == b"from-a-script"


def test_a_damaged_vault_is_one_line():
    with pytest.raises(VaultError, match="damaged"):
        Vault((Secret("default", b"pw"),)).decrypt("$ANSIBLE_VAULT;1.1;AES256\nzz\n", "x.yml")


def test_inventory_list_agrees_with_ansible_inventory_but_masks_decrypted_file_values(vaulted_inventory,
                                                                                       ansible_cli):
    root = vaulted_inventory
    ours = fleetctl("inventory", root / "inv", "--list", "--vault-password-file", root / "pw")
    assert ours.returncode == 0, ours.stderr
    theirs = json.loads(ansible_cli("ansible-inventory", "-i", root / "inv", "--list",
                                    "--vault-password-file", root / "pw").stdout)
    ours = json.loads(ours.stdout)
    for host in ("h1", "h2"):
        mine, ansible = ours["_meta"]["hostvars"][host], theirs["_meta"]["hostvars"][host]
        assert mine.keys() == ansible.keys()
        # Ansible prints a vault file's values in the clear; fleetctl masks them (README: Inventory).
        assert ansible["vault_become_pass"] == "s3cret-sudo-Pass" and mine["vault_become_pass"] == "***"
        assert ansible["vault_list"] == ["one-item", 2] and mine["vault_list"] == ["***", 2]
        # A !vault value: its ciphertext, as Ansible prints it.
        assert mine["api_token"] == ansible["api_token"] and "__ansible_vault" in mine["api_token"]
        assert mine["fleet_vllm"] == ansible["fleet_vllm"]
        assert mine["ansible_become_password"] == ansible["ansible_become_password"] == "{{ vault_become_pass }}"
    assert "s3cret-sudo-Pass" not in json.dumps(ours)


def test_the_cli_without_the_vault_password_is_one_line(vaulted_inventory):
    done = fleetctl("inventory", vaulted_inventory / "inv", "--list")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "encrypted with ansible-vault and no vault password was given" in done.stderr
    assert isinstance(VaultError("x"), FleetError)
