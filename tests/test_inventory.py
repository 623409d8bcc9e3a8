"""Tests for fleetctl.hosts.inventory: Ansible YAML inventories read, merged and selected as Ansible does.

The fixtures are real-world-shaped files under data/inventories/; where ansible-core is installed
next to this Python, each one is also checked against what the real Ansible CLI prints for it.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from tests.conftest import requires_ansible

from fleetctl.errors import InventoryError
from fleetctl.hosts.inventory import Host, Unsafe, Vaulted, load_inventory

DATA = Path(__file__).parent / "data" / "inventories"
INVENTORIES = sorted(path.name for path in DATA.glob("*.yml"))

GPU = [f"gpu{number:02d}.example.com" for number in range(1, 17)]
HEAD, LOCAL = "head01.example.com", "localhost"


@pytest.fixture
def ansible(ansible_cli):
    return lambda tool, *args: ansible_cli(tool, *args).stdout


# --- Ansible's own output is the specification -------------------------------------------------

@requires_ansible
@pytest.mark.parametrize("name", INVENTORIES)
def test_to_ansible_list_matches_ansible_inventory(ansible, name):
    expected = json.loads(ansible("ansible-inventory", "-i", str(DATA / name), "--list"))
    assert load_inventory(DATA / name).to_ansible_list() == expected


@requires_ansible
@pytest.mark.parametrize("pattern", [
    "site_west,control",
    "site_east:&gpu_nodes",
    "gpu_nodes:!h100_e1",
    "gpu1?.example.com",
    r"~gpu0[1-4]\.example\.com",
    "!site_east",
])
def test_select_matches_ansible_list_hosts(ansible, pattern):
    path = DATA / "gpu_cluster.yml"
    listed = ansible("ansible", "-i", str(path), "--list-hosts", pattern).splitlines()[1:]
    # Ansible lists hosts in pattern order; fleetctl in inventory order. The set is what must agree.
    assert sorted(host.name for host in load_inventory(path).select(pattern)) == sorted(line.strip() for line in listed)


# --- loading and merging ------------------------------------------------------------------------

def test_hosts_keep_the_file_order():
    assert list(load_inventory(DATA / "gpu_cluster.yml").hosts) == [*GPU, HEAD, LOCAL]


@pytest.mark.parametrize("name, host, key, expected", [
    ("gpu_cluster.yml", "gpu01.example.com", "cuda_version", "12.6"),           # deepest group wins
    ("gpu_cluster.yml", "gpu01.example.com", "ntp_server", "ntp.east.example.com"),
    ("gpu_cluster.yml", "gpu09.example.com", "cuda_version", "12.4"),           # only 'all' sets it
    ("gpu_cluster.yml", "gpu13.example.com", "gpu_model", "A100"),              # host var
    ("gpu_cluster.yml", HEAD, "ansible_user", "admin"),                         # host beats every group
    ("gpu_cluster.yml", LOCAL, "ansible_connection", "local"),
    ("multi_group.yml", "node01", "role", "monitoring"),    # a second parent made monitoring deeper
    ("multi_group.yml", "node01", "tier", "silver"),        # priority 10 beats training's name order
    ("multi_group.yml", "node03", "role", "zz"),            # same depth and priority: by name
    ("multi_group.yml", "node04", "scheduler_partition", "gpu"),  # a group listed twice keeps both
    ("multi_group.yml", "node01", "ansible_user", "train"),
    ("deep.yml", "p1", "level", "partition"),
    ("deep.yml", "p1", "region", "us"),                     # 'shortcut' sorts after 'region'
    ("deep.yml", "z1", "level", "host"),
    ("ungrouped.yml", "lonely.example.com", "note", "from ungrouped"),
    ("ungrouped.yml", "bastion.example.com", "ansible_port", 2222),           # from `name:2222`
    ("ungrouped.yml", "2001:db8::10", "ansible_port", 2222),                  # from `[v6]:2222`
    ("sparse.yml", "tiny03", "slot", 4),                                      # `<<:` then override
    ("sparse.yml", "tiny03", "rack", "r1"),
    ("sparse.yml", "tiny03", "ansible_user", "merged"),
])
def test_host_vars_merge_as_ansible_does(name, host, key, expected):
    assert load_inventory(DATA / name).hosts[host].vars[key] == expected


def test_host_groups_include_ancestors_in_merge_order():
    inventory = load_inventory(DATA / "multi_group.yml")
    assert inventory.hosts["node01"].groups == ("all", "storage", "training", "inference", "monitoring")
    assert "ansible_group_priority" not in inventory.hosts["node01"].vars


def test_host_ranges_expand_as_ansible_does():
    assert list(load_inventory(DATA / "ranges.yml").hosts) == [
        "nodea.lab", "nodeb.lab", "nodec.lab",
        "cn0", "cn2", "cn4", "cn6", "cn8", "cn10",
        "cn001-ib", "cn002-ib", "cn003-ib",
        "rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02",
        "10.0.1.1", "10.0.1.2", "10.0.1.3",
        "db-a", "db-c", "db-e",
        "edge0", "edge1", "edge2",
        "gpu01.example.com", "gpu06.example.com", "gpu11.example.com", "gpu16.example.com",
        "soloX", "soloY", "soloZ",
    ]


def test_ungrouped_holds_hosts_in_no_other_group():
    groups = load_inventory(DATA / "ungrouped.yml").groups
    assert groups["ungrouped"].hosts == ("solo.example.com", "control", "bastion.example.com", "lonely.example.com")
    assert groups["all"].children == ("ungrouped", "db", "gpu", "empty_top")


def test_tagged_and_typed_values_are_kept():
    host_vars = load_inventory(DATA / "sparse.yml").hosts["tiny01"].vars
    assert isinstance(host_vars["become_password"], Vaulted)
    assert host_vars["become_password"].ciphertext.startswith("$ANSIBLE_VAULT;1.1;AES256\n")
    assert host_vars["motd"] == "{{ not a template }}" and isinstance(host_vars["motd"], Unsafe)
    assert host_vars["installed_on"] == datetime.date(2024, 3, 1)
    assert (host_vars["enabled"], host_vars["nothing"], host_vars["sysctl"][1]) == (True, None, "one")


def test_a_host_is_a_value_keyed_by_name():
    assert Host("gpu01", {"rack": 1}, ("all",)) == Host("gpu01")
    assert {Host("gpu01"): "ok"}[Host("gpu01", {"rack": 2})] == "ok"


@pytest.mark.parametrize("connection", ["ssh", "paramiko", "smart", "local"])
def test_supported_connections_load(tmp_path, connection):
    path = tmp_path / "inventory.yml"
    path.write_text(f"all:\n  hosts:\n    gpu01:\n      ansible_connection: {connection}\n")
    assert load_inventory(path).hosts["gpu01"].vars["ansible_connection"] == connection


@pytest.mark.parametrize("connection", ["ansible.builtin.local", "docker", "~"])
def test_other_connections_are_refused_naming_the_host(tmp_path, connection):
    path = tmp_path / "inventory.yml"
    path.write_text(f"all:\n  hosts:\n    gpu01:\n      ansible_connection: {connection}\n")
    with pytest.raises(InventoryError, match=f"^{path}: host 'gpu01' has ansible_connection"):
        load_inventory(path)


# --- selecting hosts with --limit ---------------------------------------------------------------

# Ansible's order (ansible all --limit P --list-hosts): a group's own hosts, then its children's,
# level by level. gpu_nodes lists gpu13-16 itself, then children h100_e1 (gpu01-08) and rack_e2 (gpu09-12).
EAST = [*GPU[8:12], *GPU[:8]]  # site_east: rack_e2 is a level above h100_e1 (site_east > rack_e1 > h100_e1)
ALL = [HEAD, LOCAL, *GPU[12:], *EAST]


@pytest.mark.parametrize("limit, expected", [
    (None, ALL),
    ("all", ALL),
    ("*", ALL),
    ("site_east", EAST),
    ("rack_e2", GPU[8:12]),
    (HEAD, [HEAD]),
    ("gpu0*.example.com", [GPU[8], *GPU[:8]]),           # Ansible walks levels below 2 in set order: one of its answers
    ("gpu1?.example.com", [*GPU[12:], *GPU[9:12]]),
    (r"~gpu0[1-4]\.example\.com", GPU[:4]),
    ("site_*", [HEAD, *GPU[12:], *EAST]),
    ("*_e?", EAST),
    ("site_west,control", [HEAD, LOCAL, *GPU[12:]]),
    ("control:rack_e2", [HEAD, LOCAL, *GPU[8:12]]),       # the order of 'all', not of the limit
    ("site_east:&gpu_nodes", EAST),
    ("gpu_nodes:!h100_e1", [*GPU[12:], *GPU[8:12]]),
    ("!gpu_nodes", [HEAD, LOCAL]),                        # only exclusions: from all
    ("&control", [HEAD, LOCAL]),
    (" site_east , !rack_e1 ", GPU[8:12]),
    ("gpu_nodes[0]", GPU[12:13]),                         # the group's own order: its own hosts first
    ("gpu_nodes[-1]", GPU[11:12]),
    ("gpu_nodes[1:3]", GPU[13:16]),
    ("rack_w1[2:]", [HEAD, *GPU[14:]]),
])
def test_select(limit, expected):
    assert [host.name for host in load_inventory(DATA / "gpu_cluster.yml").select(limit)] == expected


@pytest.mark.parametrize("limit, message", [
    ("nosuch", "--limit 'nosuch' leaves no host to target in"),
    ("site_east:&site_west", "--limit 'site_east:&site_west' leaves no host to target in"),
    ("gpu_nodes[99]", "no host matches the subscripted pattern 'gpu_nodes[99]'"),
    ("", "--limit '' leaves no host to target in"),
])
def test_select_refuses_a_limit_that_names_nothing(limit, message):
    path = DATA / "gpu_cluster.yml"
    with pytest.raises(InventoryError) as caught:
        load_inventory(path).select(limit)
    assert str(caught.value).startswith(message)


def test_select_refuses_a_broken_regex():
    # Ansible's splitter would quietly read '~gpu[' as '~gpu'.
    with pytest.raises(InventoryError, match=r"--limit '~gpu\[' is not a valid regular expression"):
        load_inventory(DATA / "gpu_cluster.yml").select("~gpu[")


# --- refusing bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("name, fragments", [
    ("syntax.yml", [":5: YAML error"]),
    ("two_documents.yml", [":4: YAML error", "another document"]),
    ("unknown_tag.yml", [":3: YAML error", "'!secret'"]),
    ("hosts_list.yml", [":5: 'hosts' of group 'gpu' must be a mapping, found a list"]),
    ("vars_list.yml", [":5: 'vars' of group 'gpu' must be a mapping"]),
    ("group_list.yml", [":2: group 'all' must be a mapping"]),
    ("host_scalar.yml", [":3: host 'gpu01' must be a mapping, found '10.0.0.1'"]),
    ("unknown_key.yml", [":4: unknown key 'host' in group 'gpu'"]),
    ("address_conflict.yml", [":9: host 'gpu01' has ansible_host '10.0.0.2'", "'inference'", "'training'"]),
    ("port_conflict.yml", [":8: host 'gpu01' has ansible_port '22'", "'inference'", "'2222' in group 'training'"]),
    ("connection.yml", ["host 'win01' has ansible_connection 'winrm'"]),
    ("cycle.yml", ["group 'a' is inside itself (a > b > a)"]),
    ("bad_range.yml", [":3: host range in 'gpu[01:100].example.com'"]),
    ("int_host.yml", [":3: host name 1234"]),
    ("priority.yml", ["group 'gpu' has ansible_group_priority 'high'"]),
    ("plugin.yml", ["inventory plugin config (key 'plugin')"]),
    ("empty.yml", ["the inventory is empty"]),
])
def test_bad_input_is_one_line_naming_file_and_place(name, fragments):
    path = DATA / "bad" / name
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert caught.value.fix  # and says what to do


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(InventoryError, match=r"nosuch\.yml: no such inventory file"):
        load_inventory(tmp_path / "nosuch.yml")
    with pytest.raises(InventoryError, match="has no inventory file"):
        load_inventory(tmp_path)
    (tmp_path / "latin1.yml").write_bytes(b"all:\n  hosts:\n    caf\xe9:\n")
    with pytest.raises(InventoryError, match="cannot read the inventory"):
        load_inventory(tmp_path / "latin1.yml")
