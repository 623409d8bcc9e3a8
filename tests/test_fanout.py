"""Faults on real sshd hosts: one host's trouble never hides or delays the others. And the
outcome's status: a task's value that reports a failure of its own makes the host's status."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass

from fleetctl import Host, Status, exit_code, fan_out, gather, load_inventory
from tests.conftest import fleetctl, fleetctl_json, wait_until
from tests.lab import PORT


def facts_run(lab, tmp_path, *, timeout=5.0, **extra_vars):
    inventory = load_inventory(lab.write_inventory(tmp_path / "inv.yml", **extra_vars))
    start = time.monotonic()
    outcomes = fan_out(inventory.select(None), gather, timeout=timeout)
    return outcomes, time.monotonic() - start


def statuses(outcomes) -> list[str]:
    return [o.status for o in outcomes.values()]


def test_dead_frozen_and_hung_hosts(small_lab, tmp_path):
    lab = small_lab(("good", "h100-sxm-80gb", {}), ("dead", "t4", {}), ("frozen", "l4", {}),
                    ("hung", "hang", {}), ("good-cpu", None, {}))
    lab.hosts["dead"].kill()
    lab.hosts["frozen"].freeze()
    outcomes, elapsed = facts_run(lab, tmp_path, timeout=4)
    status = {n: o.status for n, o in outcomes.items()}
    assert status == {"good": "ok", "dead": "unreachable", "frozen": "timeout", "hung": "timeout",
                      "good-cpu": "ok"}, {n: o.error for n, o in outcomes.items()}
    assert "cannot reach" in outcomes["dead"].error
    assert elapsed < 4 + 3, "a hanging host delayed the run past its deadline"
    assert outcomes["good"].value.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert exit_code(statuses(outcomes)) == 2
    # The host kills the hung command itself (its timeout(1)): nothing of the probe lingers there.
    hung = lab.hosts["hung"]
    wait_until(lambda: not [c for c in hung.processes().values() if c == "sleep 3600"], 10,
               "the hung nvidia-smi outlived its deadline on the host")
    lab.hosts["frozen"].thaw()


def test_host_killed_mid_run(small_lab, tmp_path):
    lab = small_lab(("steady", "a100-sxm4-80gb", {}), ("doomed", "b200", {}))
    doomed = lab.hosts["doomed"]
    doomed.set_hardware("b200", delay=3)

    def kill_mid_probe():  # once the probe waits on the slow nvidia-smi, the host dies
        wait_until(lambda: "sleep 3" in doomed.processes().values(), 10, "the probe reached nvidia-smi")
        doomed.kill()

    killer = threading.Thread(target=kill_mid_probe)
    killer.start()
    outcomes, _ = facts_run(lab, tmp_path, timeout=10)
    killer.join()
    assert outcomes["steady"].ok and outcomes["steady"].status == "ok"
    assert outcomes["doomed"].status == "unreachable", outcomes["doomed"]
    assert exit_code(statuses(outcomes)) == 4


def test_refused_key_and_unknown_host_key(small_lab, tmp_path):
    lab = small_lab(("keyless", "t4", {"authorized": False}), ("fine", "l4", {}))
    outcomes, _ = facts_run(lab, tmp_path)
    assert outcomes["keyless"].status == "unreachable"
    assert "authentication" in outcomes["keyless"].error
    assert outcomes["fine"].ok

    # A host missing from known_hosts is refused unless host key checking is off.
    lab.known_hosts.write_text("")
    outcomes, _ = facts_run(lab, tmp_path)
    assert outcomes["fine"].status == "unreachable" and "known_hosts" in outcomes["fine"].error
    outcomes, _ = facts_run(lab, tmp_path, ansible_host_key_checking=False)
    assert outcomes["fine"].ok


def test_cli_exit_code_for_unreachable_only(small_lab, tmp_path):
    lab = small_lab(("up", "t4", {}), ("down", "t4", {}))
    lab.hosts["down"].kill()
    code, out = fleetctl_json("facts", lab.write_inventory(tmp_path / "inv.yml"), "--timeout", "5")
    assert code == 4
    down = out["hosts"]["down"]
    assert set(down) == {"status", "error"} and down["status"] == "unreachable"
    assert "cannot reach" in down["error"]
    assert out["hosts"]["up"]["status"] == "ok"


@dataclass
class Run:
    """A task's value that reports how its host fared, as a provision run does."""

    status: str


def test_a_value_that_failed_makes_the_host_failed():
    local = [Host(name, {"ansible_connection": "local"}) for name in ("a", "b", "c")]
    says = {"a": "ok", "b": "changed", "c": "failed"}
    outcomes = fan_out(local, lambda host, conn, deadline: Run(says[host.name]), timeout=10)
    assert {n: o.status for n, o in outcomes.items()} == says
    assert all(o.ok and o.error is None for o in outcomes.values()), "each task finished: its value is there"
    assert outcomes["c"].value == Run("failed")
    assert exit_code(statuses(outcomes)) == 2
    assert exit_code(statuses(outcomes)[:2]) == 0


def test_a_value_with_an_unknown_status_is_a_bug_not_a_success():
    outcomes = fan_out([Host("a", {"ansible_connection": "local"})], lambda host, conn, deadline: Run("fine"),
                       timeout=10)
    assert outcomes["a"].status == Status.FAILED and not outcomes["a"].ok
    assert "internal error" in outcomes["a"].error


def test_known_hosts_read_once_hashed_or_not_and_a_changed_key_refused(small_lab, tmp_path):
    from fleetctl.reach import connection

    lab = small_lab(("one", "t4", {}), ("two", "l4", {}), ("three", None, {}))
    connection._parsed_known_hosts.cache_clear()
    outcomes, _ = facts_run(lab, tmp_path)
    assert statuses(outcomes) == ["ok"] * 3
    # One parse for the run, however many hosts: per-host parsing grows with the fleet squared.
    assert connection._parsed_known_hosts.cache_info().misses == 1

    # Hashed names (ssh-keygen -H, HashKnownHosts) are matched too.
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(lab.known_hosts)], check=True, capture_output=True)
    assert "|1|" in lab.known_hosts.read_text() and "127." not in lab.known_hosts.read_text()
    outcomes, _ = facts_run(lab, tmp_path)
    assert statuses(outcomes) == ["ok"] * 3

    # A host whose key is not the one known is refused; the others are not affected.
    other = tmp_path / "other_key.pub"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other_key")], check=True)
    address = f"[{lab.hosts['two'].address}]:{PORT}"
    subprocess.run(["ssh-keygen", "-q", "-R", address, "-f", str(lab.known_hosts)], check=True, capture_output=True)
    lab.known_hosts.write_text(lab.known_hosts.read_text() + f"{address} {' '.join(other.read_text().split()[:2])}\n")
    outcomes, _ = facts_run(lab, tmp_path)
    assert outcomes["two"].status == "unreachable" and "does not match" in outcomes["two"].error
    assert outcomes["one"].ok and outcomes["three"].ok



def test_connections_leave_the_shared_fabric_config_alone(small_lab, tmp_path):
    """A run's connections share one fabric Config. One that wrote to it (fabric's inline_ssh_env)
    rebuilt it under the other threads' reads, failing hosts at random ("No attribute or config
    key found for 'gateway'")."""
    from fleetctl.reach import connection

    lab = small_lab(("a", "t4", {}), ("b", None, {}))
    outcomes, _ = facts_run(lab, tmp_path)
    assert statuses(outcomes) == ["ok", "ok"]
    assert connection._fabric_config()._modifications == {}


def test_known_hosts_markers_revoked_refused_cert_authority_skipped_with_one_warning(small_lab, tmp_path):
    """Issue 26 item 4: a known_hosts with @cert-authority or @revoked lines failed every host with
    "internal error: InvalidHostKey" while OpenSSH connected. The host here presents a real host
    certificate (ssh-keygen -s CA -h) that OpenSSH accepts through the @cert-authority line alone."""
    lab = small_lab(("certified", "t4", {}), net=95)
    host = lab.hosts["certified"]
    ca = tmp_path / "ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ca)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "lab-host", "-h", "-n", host.address,
                    str(host.dir / "ssh_host_ed25519_key.pub")], check=True, capture_output=True)
    host.kill()
    lab.start()  # sshd again, now with its HostCertificate
    plain = lab.known_hosts.read_text().strip()
    name, key_type, key = plain.split()[:3]
    ca_line = f"@cert-authority {name} {' '.join(ca.with_suffix('.pub').read_text().split()[:2])}"
    inventory = lab.write_inventory(tmp_path / "inv.yml")

    lab.known_hosts.write_text(ca_line + "\n")
    assert lab.ssh("certified", "true").returncode == 0  # OpenSSH: the certificate is good
    proc = fleetctl("facts", inventory, "--json", timeout=60)
    out = json.loads(proc.stdout)["hosts"]["certified"]
    assert "internal error" not in json.dumps(out) and "known_hosts" in out["error"], out
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "@cert-authority" in warnings[0] and str(lab.known_hosts) in warnings[0], warnings

    lab.known_hosts.write_text(f"{ca_line}\n{plain}\n")  # the host's own key beside it: it connects
    proc = fleetctl("facts", inventory, "--json", timeout=60)
    assert json.loads(proc.stdout)["hosts"]["certified"]["status"] == "ok", proc.stdout[-500:]
    assert len([line for line in proc.stderr.splitlines() if "warning" in line]) == 1

    lab.known_hosts.write_text(f"@revoked * {key_type} {key}\n{plain}\n")  # listed, but revoked: refused
    proc = fleetctl("facts", inventory, "--json", timeout=60)
    out = json.loads(proc.stdout)["hosts"]["certified"]
    assert out["status"] == "unreachable" and "revoked" in out["error"], out
    assert lab.ssh("certified", "true").returncode != 0  # as OpenSSH refuses it
