"""Tests for host patterns (--limit, --list-hosts) and Jinja in inventory values, against ansible-core.

Ansible's own answers are the specification: each pattern is run through ``ansible PATTERN
--list-hosts`` and ``ansible all --limit PATTERN --list-hosts``, and templated values through
Ansible's debug module, on inventories in data/inventories/ (sources noted in each file).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.errors import InventoryError
from fleetctl.fleet import rollout
from fleetctl.hosts.inventory import MAX_RANGE_HOSTS, load_inventory
from tests.conftest import requires_ansible

DATA = Path(__file__).parent / "data" / "inventories"
ROOT = Path(__file__).parent.parent
KUBESPRAY = DATA / "kubespray_templated.yml"
GPU_CLUSTER = DATA / "gpu_cluster.yml"


@pytest.fixture
def ansible(ansible_cli):
    """``ansible ARGS…``: (stdout, stderr)."""
    def run(*args: str) -> tuple[str, str]:
        done = ansible_cli("ansible", *args)
        return done.stdout, done.stderr
    return run


def listed(output: str) -> list[str]:
    """The host names of ``--list-hosts`` output, in its order."""
    return [line.strip() for line in output.splitlines()[1:]]


def fleetctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from fleetctl.cli import main; sys.exit(main())",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# Patterns whose answer Ansible gives the same on every run. (Below a group's children, Ansible walks
# its groups in the order of a Python set of objects, which changes between runs; fleetctl takes the
# file order there, which is one of Ansible's answers.)
KUBESPRAY_PATTERNS = [
    "all", "k8s_cluster", "kube_node", "etcd", "kube_node[0]", "kube_node[-1]", "kube_node[1:3]",
    "kube_node[2:]", "k8s_cluster[0]", "k8s_cluster[-1]", "etcd:&kube_node", "kube_node:!etcd",
    "etcd,kube_control_plane", "kube_node:etcd[0]", "node?", "~node[13]", "*", "all:!calico_rr",
    "kube_*", "!etcd", "node5,node1,node3", "etcd[1:0]",
]
GPU_CLUSTER_PATTERNS = ["gpu_nodes", "gpu_nodes[0]", "gpu_nodes[-1]", "gpu_nodes[1:3]", "rack_w1[2:]",
                        "site_west,control", "control:rack_e2", "gpu1?.example.com", "gpu_nodes:!h100_e1"]
CASES = [(KUBESPRAY, p) for p in KUBESPRAY_PATTERNS] + [(GPU_CLUSTER, p) for p in GPU_CLUSTER_PATTERNS]


@requires_ansible
@pytest.mark.parametrize("path, pattern", CASES)
def test_pattern_picks_ansibles_hosts_in_ansibles_order(ansible, path, pattern):
    out, _ = ansible(pattern, "-i", str(path), "--list-hosts")
    assert [host.name for host in load_inventory(path).selection(pattern).hosts] == listed(out)


@requires_ansible
@pytest.mark.parametrize("limit", KUBESPRAY_PATTERNS)
def test_limit_picks_ansibles_hosts_in_ansibles_order(ansible, limit):
    out, _ = ansible("all", "-i", str(KUBESPRAY), "--list-hosts", "--limit", limit)
    assert [host.name for host in load_inventory(KUBESPRAY).select(limit)] == listed(out)


@requires_ansible
@pytest.mark.parametrize("group", ["kube_node", "k8s_cluster", "kube_control_plane", "etcd"])
def test_canary_is_the_host_ansible_calls_group_0(ansible, group):
    """rollout's canary wave is the first host of the --limit selection (fan_out and the plans keep
    its order): --limit GROUP[0] is the host Ansible calls GROUP[0], and --limit GROUP starts with the
    first host a play on all would run with that limit."""
    out, _ = ansible(f"{group}[0]", "-i", str(KUBESPRAY), "--list-hosts")
    selected = [host.name for host in load_inventory(KUBESPRAY).select(f"{group}[0]")]
    assert rollout.waves(selected, 1, "100%")[0] == listed(out)
    out, _ = ansible("all", "-i", str(KUBESPRAY), "--list-hosts", "--limit", group)
    selected = [host.name for host in load_inventory(KUBESPRAY).select(group)]
    assert rollout.waves(selected, 1, "100%")[0] == listed(out)[:1]


def test_group_subscript_counts_in_the_groups_order_not_the_files():
    inventory = load_inventory(KUBESPRAY)
    assert list(inventory.hosts)[:2] == ["node1", "node2"]       # file order
    assert [h.name for h in inventory.select("kube_control_plane[0]")] == ["node2"]
    assert [h.name for h in inventory.select("kube_node[-1]")] == ["node1"]


@requires_ansible
@pytest.mark.parametrize("limit, unmatched", [
    ("all:!gpu*", ["gpu*"]),
    ("etcd,typo", ["typo"]),
    ("kube_node:!nosuch:&etcd", ["nosuch"]),
])
def test_parts_that_match_nothing_warn_as_ansible_does(ansible, limit, unmatched):
    out, err = ansible("all", "-i", str(KUBESPRAY), "--list-hosts", "--limit", limit)
    chosen = load_inventory(KUBESPRAY).selection("all", limit)
    assert [h.name for h in chosen.hosts] == listed(out)
    assert re.findall(r"Could not match supplied host pattern, ignoring: (\S+)", err) == unmatched
    assert chosen.warnings == tuple(f"could not match host pattern '{p}', ignoring it" for p in unmatched)


@pytest.mark.parametrize("limit", ["nosuch", "etcd:&calico_rr", "nosuch,!node1", ""])
def test_a_limit_that_leaves_no_host_is_an_error(limit):
    with pytest.raises(InventoryError, match=f"^--limit '{re.escape(limit)}' leaves no host to target in "):
        load_inventory(KUBESPRAY).select(limit)


def test_a_subscript_past_the_end_is_an_error_as_in_ansible():
    with pytest.raises(InventoryError, match=r"no host matches the subscripted pattern 'etcd\[3\]': 'etcd' has 3"):
        load_inventory(KUBESPRAY).select("etcd[3]")


def test_a_pattern_that_matches_nothing_is_an_empty_listing():
    chosen = load_inventory(KUBESPRAY).selection("calico_rr")  # an empty group: no warning for it
    assert chosen.hosts == () and chosen.warnings == ("no hosts matched, nothing to do",)


@requires_ansible
def test_limit_from_a_file(ansible, tmp_path):
    limit = tmp_path / "retry"
    limit.write_text("node4\n\nkube_control_plane\n")
    out, _ = ansible("all", "-i", str(KUBESPRAY), "--list-hosts", "--limit", f"@{limit}")
    assert [h.name for h in load_inventory(KUBESPRAY).select(f"@{limit}")] == listed(out)
    with pytest.raises(InventoryError, match="cannot read the limit file"):
        load_inventory(KUBESPRAY).select(f"@{tmp_path / 'missing'}")


# --- fleetctl inventory --list-hosts --------------------------------------------------------------

@requires_ansible
@pytest.mark.parametrize("args", [["kube_node"], ["all", "-l", "etcd:!node3"], ["k8s_cluster[1:2]"], []])
def test_list_hosts_prints_what_ansible_prints(ansible, args):
    pattern = args[0] if args else "all"
    out, _ = ansible(pattern, "-i", str(KUBESPRAY), "--list-hosts", *args[1:])
    done = fleetctl("inventory", KUBESPRAY, "--list-hosts", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == out


def test_list_hosts_warns_on_stderr_and_still_lists():
    done = fleetctl("inventory", KUBESPRAY, "--list-hosts", "etcd,typo")
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["  hosts (3):", "    node3", "    node1", "    node2"]
    assert "warning: could not match host pattern 'typo', ignoring it" in done.stderr


def test_a_limit_leaving_no_host_is_one_error_line():
    done = fleetctl("inventory", KUBESPRAY, "--list-hosts", "all", "--limit", "nosuch")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") <= 3 and "--limit 'nosuch' leaves no host to target" in done.stderr


# --- Jinja in inventory values --------------------------------------------------------------------

USED = ["ansible_host", "ansible_port", "ansible_user", "fleet_label", "fleet_peers", "fleet_note"]


@requires_ansible
def test_used_vars_are_templated_as_ansible_templates_them(ansible):
    fields = ", ".join(f'"{var}": {var} | default(None)' for var in USED)
    out, _ = ansible("all", "-i", str(KUBESPRAY), "-m", "debug", "-a", f"msg={{{{ {{{fields}}} }}}}")
    theirs = {host: json.loads(body)["msg"] for host, body in re.findall(r"^(\S+) \| SUCCESS => (\{.*?^\})$",
                                                                          out, re.M | re.S)}
    ours = {host.name: {var: host.vars.get(var) for var in USED} for host in load_inventory(KUBESPRAY).select(None)}
    assert ours == theirs
    assert ours["node2"]["ansible_port"] == 2222  # a number, as Ansible's native templating gives


def test_list_shows_values_as_written():
    listing = load_inventory(KUBESPRAY).to_ansible_list()["_meta"]["hostvars"]
    assert listing["node1"]["ansible_host"] == "{{ access_ip }}"
    assert listing["node4"]["fleet_note"] == {"__ansible_unsafe": "{{ kept as written }}"}


def test_connection_settings_come_from_templated_vars():
    """What connection.py reads (host.vars.get) on a selected host is the templated value."""
    (host,) = load_inventory(KUBESPRAY).select("node2")
    assert (host.vars.get("ansible_host"), host.vars.get("ansible_port"), host.vars.get("ansible_user")) == \
        ("10.10.1.4", 2222, "ubuntu")
    assert dict(host.vars)["ansible_host"] == "10.10.1.4"


def test_vars_fleetctl_does_not_use_are_handed_on_as_written(tmp_path):
    path = tmp_path / "inv.yml"
    path.write_text("all:\n  hosts:\n    gpu1:\n      motd: \"{{ lookup('file', '/etc/motd') }}\"\n")
    (host,) = load_inventory(path).select(None)
    assert host.vars["motd"] == "{{ lookup('file', '/etc/motd') }}"


@pytest.mark.parametrize("value, why", [
    ("{{ nosuch }}", "'nosuch' is undefined"),
    ("{{ lookup('env', 'HOME') }}", "'lookup' is undefined"),
    ("{{ ip | ipaddr }}", "No filter named 'ipaddr'"),
    ("{{ ''.__class__.__mro__ }}", "is unsafe"),
    ("{{ fleet_b }}", "it refers to itself (fleet_a > fleet_b > fleet_a)"),
    ("{{ hostvars['gpu9'].ip }}", "has no attribute 'gpu9'"),
    ("{{ [nosuch] }}", "'nosuch' is undefined"),
])
def test_a_template_beyond_the_sandbox_is_one_error_naming_host_and_var(tmp_path, value, why):
    path = tmp_path / "inv.yml"
    path.write_text("all:\n  hosts:\n    gpu1:\n      ip: 10.0.0.1\n      fleet_b: '{{ fleet_a }}'\n"
                    f"      fleet_a: {json.dumps(value)}\n")
    (host,) = load_inventory(path).select(None)
    with pytest.raises(InventoryError) as caught:
        host.vars["fleet_a"]
    assert str(caught.value).startswith(f"host 'gpu1': cannot template fleet_a {value!r}: ")
    assert why in str(caught.value)


def test_unsafe_and_vault_values_are_never_templated(tmp_path):
    path = tmp_path / "inv.yml"
    path.write_text("all:\n  hosts:\n    gpu1:\n      fleet_cmd: !unsafe '{{ nosuch }}'\n"
                    "      ansible_password: !vault |\n        $ANSIBLE_VAULT;1.1;AES256\n        6162\n")
    (host,) = load_inventory(path).select(None)
    assert host.vars["fleet_cmd"] == "{{ nosuch }}"
    assert host.vars["ansible_password"].ciphertext.startswith("$ANSIBLE_VAULT")


# --- speed: the structure, not a timing (bench/inventory.py measures) ------------------------------

def test_many_hosts_in_many_groups_load_with_ansibles_groups(tmp_path):
    racks = "\n".join(f"    rack{r}:\n      hosts:\n        gpu{r}-[0000:0399]:\n" for r in range(50))
    path = tmp_path / "inv.yml"
    path.write_text(f"all:\n  children:\n{racks}")
    inventory = load_inventory(path)
    assert len(inventory.hosts) == 20_000 and inventory.hosts["gpu49-0399"].groups == ("all", "rack49")
    assert [h.name for h in inventory.select("rack7[-1]")] == ["gpu7-0399"]
    assert MAX_RANGE_HOSTS == 10_000


# --- on real sshd hosts: the connection uses the templated settings ------------------------------

def test_facts_connect_with_templated_connection_vars(small_lab, tmp_path):
    """ansible_host from hostvars, ansible_port and ansible_user from templates: before, fleetctl
    dialled the literal '{{ ... }}' strings; now it reaches the host, and a broken one names the var."""
    from tests.conftest import fleetctl_json
    from tests.lab import PORT

    lab = small_lab(("cpu-t", None, {}), ("cpu-u", None, {}), net=93)
    inventory = lab.inventory()
    address = lab.hosts["cpu-t"].address
    inventory["all"]["vars"].update(ansible_port="{{ lab_port }}", lab_port=PORT, ansible_user="{{ 'ro' ~ 'ot' }}")
    hosts = inventory["all"]["children"]["lab"]["hosts"]
    hosts["cpu-t"].update(ansible_host="{{ hostvars['cpu-t'].lab_address }}", lab_address=address)
    hosts["cpu-u"].update(ansible_host="{{ lab_nowhere }}")
    path = tmp_path / "inv.yml"
    path.write_text(json.dumps(inventory))
    code, out = fleetctl_json("facts", str(path), timeout=120)
    assert out["hosts"]["cpu-t"]["status"] == "ok", out["hosts"]["cpu-t"]
    assert out["hosts"]["cpu-u"]["status"] != "ok"
    assert "host 'cpu-u': cannot template ansible_host '{{ lab_nowhere }}'" in out["hosts"]["cpu-u"]["error"]
    assert code != 0
