"""fleetctl merge: the --json of N slices, joined, is what one controller prints, with its exit code.

The runs are the CLI's own, over fleetctl's recorded connection (tests/fakes.py): no host, no lab."""

from __future__ import annotations

import json
import re

import pytest

from fleetctl import cli
from fleetctl.errors import FleetError, Unreachable
from fleetctl.fleet.merge import exit_status, merge
from tests.fakes import fake_host

# Out of name order, regions and a host with none: the merge must put them back in inventory order.
INVENTORY = """all:
  children:
    eu:
      vars: {fleet_region: eu-west}
      hosts: {eu-3: {}, eu-1: {}, eu-2: {}, eu-9: {}}
    us:
      vars: {fleet_region: us-east}
      hosts: {us-5: {}, us-4: {}}
  hosts: {lone: {}, down-1: {fleet_region: eu-west}}
"""
DOWN = {"down-1"}


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    def connect(host, timeout):
        if host.name in DOWN:
            raise Unreachable(host.name, "connection refused")
        return fake_host(name=host.name)

    monkeypatch.setattr("fleetctl.reach.fanout.connect", connect)
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(INVENTORY)
    return inventory


def run(capsys, *argv) -> tuple[int, str]:
    """The CLI's exit code and stdout."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().out


def refused(capsys, *argv) -> str:
    """The one line of a run that exits 1."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, (code, err)
    return err


def slices(capsys, tmp_path, command: str, inventory, n: int, *extra) -> list:
    files = []
    for i in range(1, n + 1):
        code, out = run(capsys, command, inventory, "--json", "--slice", f"{i}/{n}", *extra)
        assert json.loads(out)["slice"] == f"{i}/{n}"
        files.append(tmp_path / f"{command}-{i}.json")
        files[-1].write_text(out)
    return files


@pytest.mark.parametrize("command", ["facts", "plan"])
def test_merged_slices_print_what_one_controller_prints(fleet, tmp_path, capsys, command):
    single_code, single = run(capsys, command, fleet, "--json")
    files = slices(capsys, tmp_path, command, fleet, 3)
    code, merged = run(capsys, "merge", command, *files, "-i", fleet)
    assert merged == single  # byte for byte: the same hosts, results and inventory order
    assert code == single_code == 4  # down-1 unreachable, the rest ok
    code, unordered = run(capsys, "merge", command, *reversed(files))  # no inventory: sorted by name
    assert list(json.loads(unordered)["hosts"]) == sorted(json.loads(single)["hosts"])


def test_merged_audit_slices_match_one_audit_in_every_format(fleet, tmp_path, capsys):
    assert run(capsys, "plan", fleet, "--limit", "eu-*:us-5", "--write-lock")[0] == 0  # the rest are unlocked: drift
    single_code, single = run(capsys, "audit", fleet, "--json")
    files = slices(capsys, tmp_path, "audit", fleet, 3)
    code, merged = run(capsys, "merge", "audit", *files, "-i", fleet)
    assert code == single_code == 6  # drift and an unreachable host, as one audit says
    one, joined = json.loads(single), json.loads(merged)
    assert joined["hosts"] == one["hosts"] and list(joined["hosts"]) == list(one["hosts"])
    assert joined["run_id"] == "+".join(json.loads(f.read_text())["run_id"] for f in files)
    assert joined["timestamp"] == min(json.loads(f.read_text())["timestamp"] for f in files)
    for fmt in ("prometheus", "junit"):
        single_code, single = run(capsys, "audit", fleet, "--format", fmt)
        code, merged = run(capsys, "merge", "audit", *files, "-i", fleet, "--format", fmt)
        assert code == single_code == 6
        assert _timeless(merged) == _timeless(single)
    out = tmp_path / "fleet.prom"
    assert run(capsys, "merge", "audit", *files, "--format", "prometheus", "-o", out)[0] == 6
    assert 'fleetctl_host_audited{host="down-1"} 0' in out.read_text()


def _timeless(text: str) -> str:
    return re.sub(r"(timestamp=\"[^\"]*\"|_timestamp_seconds \d+)", "TIME", text)


def test_merged_provision_check_slices_make_one_record(fleet, tmp_path, capsys):
    single_code, single = run(capsys, "provision", fleet, "--check", "--json")
    files = slices(capsys, tmp_path, "provision", fleet, 2, "--check")
    code, merged = run(capsys, "merge", "provision", *files, "-i", fleet)
    one, joined = json.loads(single), json.loads(merged)
    assert code == single_code == 4
    assert list(joined) == list(one)  # the record's keys, in its order
    assert list(joined["hosts"]) == list(one["hosts"])
    assert {n: h["status"] for n, h in joined["hosts"].items()} == {n: h["status"] for n, h in one["hosts"].items()}
    for key in set(one) - {"run_id", "started", "finished", "hosts"}:
        assert joined[key] == one[key], key


def test_a_slice_given_twice_or_missing_is_refused_in_one_line(fleet, tmp_path, capsys):
    files = slices(capsys, tmp_path, "facts", fleet, 3)
    assert "slice 2/3 is given twice" in refused(capsys, "merge", "facts", files[0], files[1], files[1])
    assert "slice 2/3 missing" in refused(capsys, "merge", "facts", files[0], files[2])
    assert "--format junit is for audit" in refused(capsys, "merge", "plan", *files, "--format", "junit")
    (tmp_path / "half.json").write_text(files[0].read_text()[:40])
    assert "half.json: truncated or not JSON" in refused(capsys, "merge", "facts", tmp_path / "half.json")


def test_a_host_in_two_inputs_is_an_error_naming_it():
    a = {"hosts": {"gpu-1": {"status": "ok"}, "gpu-2": {"status": "ok"}}}
    b = {"hosts": {"gpu-3": {"status": "ok"}, "gpu-2": {"status": "failed"}}}
    with pytest.raises(FleetError, match=r"host gpu-2 is in two slices \(inputs 1 and 2\)"):
        merge("facts", [a, b])


@pytest.mark.parametrize("docs, why", [
    ([{"hosts": {}, "slice": "1/2"}, {"hosts": {}, "slice": "2/3"}], "different slicings"),
    ([{"hosts": {}, "slice": "1/2"}, {"hosts": {}}], "some inputs are slices"),
    ([{"run_id": "a", "hosts": {}, "cuda": "12.9"}, {"run_id": "b", "hosts": {}, "cuda": "13.0"}],
     r"asked different.*cuda"),
    ([{"run_id": "a", "time": "t", "timestamp": 1, "hosts": {}, "since": {"run_id": "x", "changes": {}}},
      {"run_id": "b", "time": "t", "timestamp": 2, "hosts": {}}], "different --since"),
    ([{"nodes": {}}], "not a .* --json output"),
])
def test_inputs_that_are_not_one_slicing_are_refused(docs, why):
    kind = "provision" if "cuda" in docs[0] else "audit" if "since" in docs[0] else "facts"
    with pytest.raises(FleetError, match=why):
        merge(kind, docs)


@pytest.mark.parametrize("kind, statuses, code", [
    ("facts", ["ok", "ok"], 0),
    ("facts", ["ok", "unreachable"], 4),
    ("plan", ["ok", "refused", "unreachable"], 2),  # a failure wins over an unreachable host
    ("provision", ["changed", "timeout"], 2),
    ("audit", ["clean", "clean"], 0),
    ("audit", ["clean", "drift"], 2),
    ("audit", ["clean", "timeout"], 4),
    ("audit", ["drift", "unreachable"], 6),
])
def test_the_merged_exit_code_is_the_single_runs(kind, statuses, code):
    when = {"started": "t0", "finished": "t1"} if kind == "provision" else {"time": "t", "timestamp": 0}
    docs = [{"run_id": f"r{i}", **when, "hosts": {f"h{i}": {"status": s}}} for i, s in enumerate(statuses)]
    assert exit_status(kind, merge(kind, docs)) == code


def test_audit_since_changes_are_merged_in_host_order():
    docs = [{"run_id": "a", "time": "t1", "timestamp": 2, "hosts": {"h2": {"status": "clean"}},
             "since": {"run_id": "old", "changes": {"h2": ["vllm 1 → 2"]}}},
            {"run_id": "b", "time": "t0", "timestamp": 1, "hosts": {"h1": {"status": "drift"}},
             "since": {"run_id": "old", "changes": {"h1": ["torch 1 → 2"]}}}]
    merged = merge("audit", docs, ["h1", "h2"])
    assert merged["since"] == {"run_id": "old", "changes": {"h1": ["torch 1 → 2"], "h2": ["vllm 1 → 2"]}}
    assert (merged["time"], merged["timestamp"], list(merged["hosts"])) == ("t0", 1, ["h1", "h2"])
