"""Tests for the inventory sources users have: Ansible's INI format, group_vars/ and host_vars/,
directories of sources and several sources at once, and the sources fleetctl names as unsupported.

Ansible's own answer is the specification: every layout here is also listed by ``ansible-inventory``
(ansible-core, installed next to this Python by the ``[test]`` extra) and must list identically.
The real layouts under data/inventories/real/ come from public deployer projects (SOURCES.md).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from fleetctl import cli
from fleetctl.errors import InventoryError
from fleetctl.hosts.inventory import Unsafe, load_inventory
from tests.conftest import requires_ansible

REAL = Path(__file__).parent / "data" / "inventories" / "real"


@pytest.fixture
def ansible_list(ansible_cli):
    """``ansible-inventory -i A [-i B] --list``, as parsed JSON."""
    return lambda *sources: json.loads(ansible_cli(
        "ansible-inventory", *[arg for source in sources for arg in ("-i", Path(source).resolve())], "--list").stdout)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# --- real inventories of public deployer projects ----------------------------------------------

@requires_ansible
@pytest.mark.parametrize("source", [
    "kubespray/inventory.ini", "kubespray", "deepops/inventory", "deepops", "kolla-ansible/multinode",
    "kolla-ansible/all-in-one", "kolla-ansible", "ceph-ansible/hosts", "ceph-ansible", "ansible-core/inventory.ini",
])
def test_real_inventory_lists_as_ansible(ansible_list, source):
    assert load_inventory(REAL / source).to_ansible_list() == ansible_list(REAL / source)


@requires_ansible
@pytest.mark.parametrize("project, inventory", [("kubespray", "inventory.ini"), ("deepops", "inventory")])
def test_real_sample_with_its_hosts_filled_in_lists_as_ansible(ansible_list, tmp_path, project, inventory):
    # The samples ship their hosts commented out; a user uncomments them, and group_vars then reach them.
    layout = shutil.copytree(REAL / project, tmp_path / project)
    text = (layout / inventory).read_text()
    (layout / inventory).write_text(re.sub(r"(?m)^# ?((node|gpu|login|mgmt)[0-9]+)", r"\1", text))
    listed = load_inventory(layout / inventory)
    assert listed.hosts and listed.to_ansible_list() == ansible_list(layout / inventory)


def test_ceph_group_vars_files_without_extension_reach_their_hosts():
    hosts = load_inventory(REAL / "ceph-ansible" / "hosts").hosts
    assert hosts["mon0"].vars["ceph_origin"] == "repository"  # group_vars/all
    assert hosts["mon0"].vars["create_crush_tree"] is True  # group_vars/mons
    assert "create_crush_tree" not in hosts["osd0"].vars
    assert hosts["osd0"].vars["osd_crush_location"]["rack"] == "mon-rackkkk"  # an inline dict literal


# --- Ansible's INI rules -------------------------------------------------------------------------

INI = """\
# hosts before any section are ungrouped
bastion ansible_host=203.0.113.9 ansible_port=2200   # a comment
[gpu]
gpu[01:03].example.com fleet_cuda=12.8 gpus=8
gpu-x[a:c] rack='r 2' enabled=True nums="[1, 2]"
node[0:10:5]:2222
v6 ansible_host=2001:db8::1 note="a # inside quotes"

[fleet:children]   # named before its own section
gpu
head

[head]
head01 fleet_role="head" # trailing comment

[fleet:vars]
ansible_user=ubuntu
motd = hello = world ; not a comment here
timeout=30
ratio=0.5
path=/opt/x
[all:vars]
ansible_user=root
empty=
"""


@requires_ansible
def test_ini_lists_as_ansible(ansible_list, tmp_path):
    inventory = write(tmp_path, {"hosts.ini": INI}) / "hosts.ini"
    assert load_inventory(inventory).to_ansible_list() == ansible_list(inventory)


def test_ini_values_are_typed_as_ansible_types_them(tmp_path):
    hosts = load_inventory(write(tmp_path, {"hosts.ini": INI}) / "hosts.ini").hosts
    assert list(hosts)[:4] == ["bastion", "gpu01.example.com", "gpu02.example.com", "gpu03.example.com"]
    assert hosts["gpu01.example.com"].vars["gpus"] == 8 and hosts["gpu01.example.com"].vars["fleet_cuda"] == 12.8
    assert hosts["gpu-xb"].vars["rack"] == "r 2" and hosts["gpu-xb"].vars["enabled"] is True
    assert hosts["gpu-xb"].vars["nums"] == [1, 2]
    assert hosts["node5"].vars["ansible_port"] == 2222 and "node10" in hosts
    assert hosts["v6"].vars["note"] == "a # inside quotes"
    assert hosts["head01"].vars["ansible_user"] == "ubuntu"  # fleet:vars beats all:vars
    assert hosts["head01"].vars["motd"] == "hello = world ; not a comment here"
    assert hosts["bastion"].vars["ansible_user"] == "root" and hosts["bastion"].vars["empty"] == ""


@requires_ansible
@pytest.mark.parametrize("name, text", [
    ("inventory", "gpu01\n[db]\ndb01\n"),  # no extension, not YAML: INI
    ("inventory", "all:\n  hosts:\n    gpu01:\n      x: 1\n"),  # no extension, YAML
    ("hosts.yml", "[gpu]\ngpu01 x=1\n"),  # Ansible's ini plugin takes what its yaml plugin cannot read
    ("hosts.cfg", "[gpu]\ngpu01\n"),
])
def test_yaml_or_ini_is_told_as_ansible_tells(ansible_list, tmp_path, name, text):
    inventory = write(tmp_path, {name: text}) / name
    assert load_inventory(inventory).to_ansible_list() == ansible_list(inventory)


def test_ini_bytes_literal_is_an_unsafe_string(tmp_path):
    hosts = load_inventory(write(tmp_path, {"hosts": "h1 x=\"b'{{ no }}'\"\n"}) / "hosts").hosts
    assert hosts["h1"].vars["x"] == Unsafe("{{ no }}") and isinstance(hosts["h1"].vars["x"], Unsafe)


@pytest.mark.parametrize("text, line, fragments", [
    ("[gpu:children]\nmissing\n", 2, ["[gpu:children] names group 'missing'", "no section defines"]),
    ("[gpu:vars]\nx=1\n", 1, ["[gpu:vars] is for a group no section defines"]),
    ("[gpu:hostz]\n", 1, ["unknown type 'hostz'"]),
    ("[gpu]\n[db]\n[db:vars]\njust_a_word\n", 4, ["expected key=value"]),
    ("[gpu]\ngpu01 novalue\n", 2, ["expected key=value after host 'gpu01'"]),
    ("[gpu]\ngpu01 x='open\n", 2, ["cannot read host line"]),
    ("[gpu ]\n", 1, ["invalid section"]),
    ("[gpu]\ngpu01:\n", 2, ["'gpu01:' is not a host"]),
    ("[gpu]\ngpu[0:99999]\n", 2, ["names 100,000 hosts"]),
])
def test_ini_mistakes_are_one_line_naming_file_and_line(tmp_path, text, line, fragments):
    inventory = write(tmp_path, {"hosts.ini": text}) / "hosts.ini"
    with pytest.raises(InventoryError) as caught:
        load_inventory(inventory)
    message = str(caught.value)
    assert message.startswith(f"{inventory}:{line}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


# --- group_vars/ and host_vars/ ------------------------------------------------------------------

LAYOUT = {
    "inv/hosts.ini": "[gpu]\ngpu01 level=host_inline\ngpu02\n[a100:children]\ngpu\n[cpu]\ncpu01\n"
                     "[gpu:vars]\nlevel=gpu_inline\nfrom_gpu_inline=1\n"
                     "[all:vars]\nlevel=all_inline\nfrom_all_inline=1\n",
    "inv/group_vars/all.yml": "level: all_file\nfrom_all_file: 1\nansible_user: ubuntu\n",
    "inv/group_vars/a100.yaml": "level: a100_file\nfrom_a100_file: 1\n",
    "inv/group_vars/gpu/10-base.yml": "level: gpu_dir_10\nnested: {a: 1}\n",
    "inv/group_vars/gpu/20-more.json": '{"level": "gpu_dir_20", "nested": {"b": 2}}',
    "inv/group_vars/gpu/sub/30.yml": "from_gpu_subdir: 1\n",
    "inv/group_vars/gpu/notes.txt": "level: not a vars file\n",
    "inv/group_vars/gpu/.hidden.yml": "level: hidden\n",
    "inv/group_vars/gpu/40.yml~": "level: backup\n",
    "inv/group_vars/cpu": "ansible_user: admin\n",
    "inv/group_vars/unknown_group.yml": "level: never\n",
    "inv/host_vars/gpu01.json": '{"level": "gpu01_file"}',
    "inv/host_vars/gpu02/main.yml": "ansible_port: 2222\n",
}


@requires_ansible
def test_group_vars_and_host_vars_list_as_ansible(ansible_list, tmp_path):
    inventory = write(tmp_path, LAYOUT) / "inv" / "hosts.ini"
    assert load_inventory(inventory).to_ansible_list() == ansible_list(inventory)


def test_vars_files_take_ansibles_precedence(tmp_path):
    hosts = load_inventory(write(tmp_path, LAYOUT) / "inv" / "hosts.ini").hosts
    assert hosts["gpu01"].vars["level"] == "gpu01_file"  # host_vars/ beats everything
    # all inline < group_vars/all < groups inline < group_vars/<group> (deepest last) < host inline
    assert hosts["gpu02"].vars["level"] == "gpu_dir_20"
    assert hosts["gpu02"].vars["nested"] == {"b": 2}  # a key is replaced whole, not merged
    assert hosts["gpu02"].vars["ansible_port"] == 2222 and hosts["gpu02"].vars["ansible_user"] == "ubuntu"
    assert hosts["cpu01"].vars["ansible_user"] == "admin" and hosts["cpu01"].vars["level"] == "all_file"
    assert {"from_all_inline", "from_all_file", "from_gpu_inline", "from_a100_file", "from_gpu_subdir"} \
        <= set(hosts["gpu02"].vars)


def test_group_vars_all_loses_to_a_groups_inventory_vars(tmp_path):
    hosts = load_inventory(write(tmp_path, {
        "hosts": "[gpu]\ngpu01\n[gpu:vars]\nansible_user=gpuadmin\n",
        "group_vars/all.yml": "ansible_user: ubuntu\nansible_port: 2200\n"}) / "hosts").hosts
    assert (hosts["gpu01"].vars["ansible_user"], hosts["gpu01"].vars["ansible_port"]) == ("gpuadmin", 2200)


def test_a_bad_vars_file_names_itself(tmp_path):
    write(tmp_path, {"hosts": "gpu01\n", "host_vars/gpu01.yml": "- a list\n"})
    with pytest.raises(InventoryError, match=r"host_vars/gpu01\.yml:1: the vars file gpu01\.yml must be a mapping"):
        load_inventory(tmp_path / "hosts")
    write(tmp_path, {"host_vars/gpu01.yml": "a: [\n"})
    with pytest.raises(InventoryError, match=r"gpu01\.yml:2: YAML error"):
        load_inventory(tmp_path / "hosts")


def test_a_connection_set_in_group_vars_is_checked(tmp_path):
    write(tmp_path, {"hosts": "gpu01\n", "group_vars/all.yml": "ansible_connection: winrm\n"})
    with pytest.raises(InventoryError, match="ansible_connection 'winrm'"):
        load_inventory(tmp_path / "hosts")


# --- directories and several sources -------------------------------------------------------------

DIRECTORY = {
    "inv/01-gpu.ini": "[gpu]\ngpu01\ngpu02\n",
    "inv/02-more.yml": "all:\n  children:\n    gpu:\n      hosts:\n        gpu03:\n"
                       "    head:\n      hosts:\n        head01:\n",
    "inv/03-vars": "[gpu:vars]\nfleet_cuda=12.8\n",  # a group an earlier file defined
    "inv/sub/04.ini": "[db]\ndb01\n",
    "inv/hosts.retry": "not an inventory [[[\n",
    "inv/old.orig": "not an inventory [[[\n",
    "inv/README.md": "# notes\n",
    "inv/ansible.cfg": "[defaults]\n",
    "inv/.hidden": "not an inventory [[[\n",
    "inv/group_vars/gpu.yml": "ansible_user: ubuntu\n",
    "inv/host_vars/head01.yml": "ansible_port: 2201\n",
}


@requires_ansible
def test_a_directory_lists_as_ansible(ansible_list, tmp_path):
    directory = write(tmp_path, DIRECTORY) / "inv"
    listed = load_inventory(directory)
    assert listed.to_ansible_list() == ansible_list(directory)
    assert listed.hosts["gpu03"].vars == {"fleet_cuda": 12.8, "ansible_user": "ubuntu"}
    assert listed.hosts["head01"].vars == {"ansible_port": 2201} and "db01" in listed.hosts


@requires_ansible
def test_several_sources_list_as_ansible(ansible_list, tmp_path):
    write(tmp_path, {"a/hosts.ini": "[gpu]\ngpu01\n", "a/group_vars/gpu.yml": "x: from_a\n",
                     "b/hosts.yml": "gpu:\n  hosts:\n    gpu02:\n", "b/group_vars/gpu.yml": "x: from_b\ny: 1\n",
                     "c/extra.ini": "[gpu:vars]\nz=3\n[gpu]\ngpu03\n"})
    sources = [tmp_path / "a" / "hosts.ini", tmp_path / "b" / "hosts.yml", tmp_path / "c"]
    listed = load_inventory(sources)
    assert listed.to_ansible_list() == ansible_list(*sources)
    assert listed.hosts["gpu01"].vars == {"x": "from_b", "y": 1, "z": 3}  # the later source's group_vars win


@requires_ansible
def test_cli_takes_several_sources(ansible_list, tmp_path, capsys):
    write(tmp_path, {"a.ini": "[gpu]\ngpu01\n", "b.yml": "gpu:\n  hosts:\n    gpu02:\n"})
    assert cli.main(["inventory", str(tmp_path / "a.ini"), str(tmp_path / "b.yml"), "--list"]) == 0
    assert json.loads(capsys.readouterr().out) == ansible_list(tmp_path / "a.ini", tmp_path / "b.yml")
    args = cli.parser().parse_args(["facts", str(tmp_path / "a.ini"), str(tmp_path / "b.yml"), "-l", "gpu"])
    assert args.inventory == str(tmp_path / "a.ini") and len(args.inventories) == 2


def test_an_empty_directory_or_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InventoryError, match="has no inventory file"):
        load_inventory(tmp_path / "empty")
    write(tmp_path, {"only-comments.ini": "# nothing yet\n"})
    with pytest.raises(InventoryError, match="the inventory is empty"):
        load_inventory(tmp_path / "only-comments.ini")


# --- sources fleetctl does not read --------------------------------------------------------------

@pytest.mark.parametrize("name, text, kind", [
    ("aws.aws_ec2.yml", "plugin: amazon.aws.aws_ec2\nregions: [us-east-1]\n", "inventory plugin config"),
    ("netbox.yml", "plugin: netbox.netbox.nb_inventory\n", "inventory plugin config"),
    ("ec2.py", "#!/usr/bin/env python3\nprint('{}')\n", "inventory script"),
    ("hosts.toml", "[gpu.hosts.gpu01]\n", "TOML inventories"),
])
def test_unsupported_source_is_named_with_the_alternative(tmp_path, name, text, kind):
    source = write(tmp_path, {name: text}) / name
    source.chmod(0o755)
    with pytest.raises(InventoryError) as caught:
        load_inventory(source)
    message = str(caught.value)
    assert kind in message and "\n" not in message
    assert f"ansible-inventory -i {source} --list -y --export > inv.yml" in message


@pytest.mark.parametrize("name", ["inventory", "hosts.yml"])
def test_broken_yaml_shows_the_yaml_error_not_the_ini_one(tmp_path, name):
    inventory = write(tmp_path, {name: "all:\n  hosts:\n    gpu01:\n  children: [\n"}) / name
    with pytest.raises(InventoryError, match=rf"{name}:5: YAML error"):
        load_inventory(inventory)


def test_a_conflict_across_sources_names_the_file_it_is_in(tmp_path):
    write(tmp_path, {"a.ini": "[gpu]\ngpu01 ansible_host=10.0.0.1\n", "b.ini": "[db]\n\ngpu01 ansible_host=10.0.0.2\n"})
    with pytest.raises(InventoryError, match=r"b\.ini:3: host 'gpu01' has ansible_host '10\.0\.0\.2'"):
        load_inventory([tmp_path / "a.ini", tmp_path / "b.ini"])
