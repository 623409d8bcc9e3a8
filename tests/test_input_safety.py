"""Bad input and bad state, refused in one line before any host is contacted: options, YAML that
expands without end, host ranges of a million hosts, corrupt state files, paths that cannot be
written; remote and user text printed as it is; fleet.lock writers that merge; what a retry and
a provision remember. The hosts here are never reached (TEST-NET addresses or a closed port), so a
test that contacted one would hang or fail, not pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from fleetctl import records, report
from fleetctl.apply.execute import Step
from fleetctl.apply.provision import HostRun
from fleetctl.decide.plan import Lock
from fleetctl.errors import InventoryError, PlaybookError, StateError
from fleetctl.hosts.inventory import MAX_RANGE_HOSTS, Host, load_inventory
from fleetctl.hosts.playbook import load_playbook
from fleetctl.reach.fanout import Outcome
from fleetctl.status import Status
from tests.conftest import ROOT, fleetctl, fleetctl_json

UNREACHED = "all:\n  hosts:\n    h1:\n      ansible_host: 192.0.2.1\n"  # TEST-NET-1: never answers

BOMB = "".join(["x: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"]
               + [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")])


@pytest.fixture
def inventory(tmp_path) -> Path:
    path = tmp_path / "inv.yml"
    path.write_text(UNREACHED)
    return path


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-1000:], proc.stderr[-1000:])
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    return proc.stderr


# ---------------------------------------------------------------- 3. options

@pytest.mark.parametrize("command, options, words", [
    ("facts", ["--forks", "0"], ["--forks", "at least 1"]),  # hung for ever
    ("facts", ["--forks", "-1"], ["--forks"]),
    ("facts", ["--timeout", "0"], ["--timeout", "above 0"]),  # every host timed out
    ("facts", ["--timeout", "nan"], ["--timeout", "finite"]),  # "internal error" per host
    ("facts", ["--timeout", "inf"], ["--timeout", "finite"]),
    ("plan", ["--cuda", "banana"], ["--cuda", "banana"]),  # contacted every host first
    ("plan", ["--vllm", "banana"], ["--vllm"]),
    ("provision", ["--cuda", "banana"], ["--cuda"]),
    ("provision", ["--vllm", "not-a-version"], ["--vllm"]),
    ("rollout", ["--cuda", "banana"], ["--cuda"]),  # said "done" and exited 0
    ("rollout", ["--batch", "0"], ["--batch", "at least 1"]),  # silently became 1
    ("rollout", ["--batch", "0%"], ["--batch"]),
    ("rollout", ["--batch", "150%"], ["--batch"]),
    ("rollout", ["--max-fail", "-1"], ["--max-fail"]),
    ("rollout", ["--max-fail", "lots"], ["--max-fail"]),
    ("rollout", ["--canary", "-2"], ["--canary"]),
])
def test_bad_options_are_refused_before_any_host(inventory, command, options, words):
    one_line_error(fleetctl(command, inventory, *options, timeout=30), *words)


def test_good_option_values_still_parse():
    from fleetctl.cli import parser
    args = parser().parse_args(["rollout", "inv.yml", "--batch", "25%", "--max-fail", "0", "--canary", "0",
                                "--cuda", "12.9", "--vllm", ">=0.20,<0.30", "-f", "1", "-T", "0.5"])
    assert (args.batch, args.max_fail, args.canary, args.cuda, args.forks, args.timeout) == \
        ("25%", "0", 0, "12.9", 1, 0.5)
    assert parser().parse_args(["plan", "inv.yml", "--cuda", "auto", "--vllm", "none"]).vllm == "none"


# ---------------------------------------------------------------- limits

def test_yaml_alias_expansion_is_refused_everywhere(tmp_path, inventory):
    bomb = "all:\n  vars:\n" + "".join(f"    {line}" for line in BOMB.splitlines(keepends=True)) + UNREACHED[5:]
    (tmp_path / "bomb.yml").write_text(bomb)
    with pytest.raises(InventoryError, match="aliases expand to more than 1,000,000"):
        load_inventory(tmp_path / "bomb.yml")
    (tmp_path / "play.yml").write_text("- name: p\n  vars:\n" + "".join(f"    {line}" for line in
                                                                    BOMB.splitlines(keepends=True)))
    with pytest.raises(PlaybookError, match="aliases expand"):
        load_playbook(tmp_path / "play.yml")
    (tmp_path / "fleet.lock").write_text("version: 1\nclasses: {}\nhosts: {}\n" + BOMB)
    one_line_error(fleetctl("audit", inventory, "--lock", tmp_path / "fleet.lock", timeout=30),
                   "fleet.lock", "aliases expand")
    one_line_error(fleetctl("inventory", tmp_path / "bomb.yml", "--list", timeout=30), "bomb.yml", "aliases")


def test_a_few_aliases_still_load(tmp_path):
    (tmp_path / "inv.yml").write_text("all:\n  vars:\n    base: &b {fleet_vllm: latest}\n  hosts:\n"
                                      "    h1:\n      <<: *b\n    h2: *b\n")
    assert load_inventory(tmp_path / "inv.yml").hosts["h2"].vars["fleet_vllm"] == "latest"


def test_host_ranges_are_capped(tmp_path):
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    gpu[0:999999]:\n")
    proc = fleetctl("inventory", tmp_path / "inv.yml", "--list", timeout=30)  # took hours
    one_line_error(proc, "gpu[0:999999]", "1,000,000 hosts", f"{MAX_RANGE_HOSTS:,}", "split")
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    rack[0:999]-gpu[0:99]:\n")  # nested ranges multiply
    with pytest.raises(InventoryError, match="100,000 hosts"):
        load_inventory(tmp_path / "inv.yml")
    (tmp_path / "inv.yml").write_text(f"all:\n  hosts:\n    gpu[1:{MAX_RANGE_HOSTS}]:\n")
    assert len(load_inventory(tmp_path / "inv.yml").hosts) == MAX_RANGE_HOSTS


# ---------------------------------------------------------------- 6. state files

EMPTY_LOCK = "version: 1\nclasses: {}\nhosts: {}\n"


@pytest.mark.parametrize("text, fault", [
    ("version: 1\nclasses: {}\nhosts:\n  h1: {class: gone, stack_id: x}\n", "names a class"),
    ("- version: 1\n", "a list"),
    (b"\x00\xff\xfe binary \x89PNG", "binary"),
    ("version: 1\nclasses: {a: {facts: {}\n", "not valid YAML"),
    ("version: 1\nclasses: {a: 3}\nhosts:\n  h1: {class: a}\n", "malformed"),
    ("", "empty file"),
])
def test_a_corrupt_lock_is_one_line(tmp_path, inventory, text, fault):
    lock = tmp_path / "fleet.lock"
    lock.write_bytes(text if isinstance(text, bytes) else text.encode())
    one_line_error(fleetctl("audit", inventory, "--lock", lock, timeout=30), str(lock), fault)
    with pytest.raises(StateError, match="re-create it"):
        Lock.read(lock)


def state_file(kind: str, run_id: str, text: str) -> str:
    path = records.state_dir() / kind / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return run_id


@pytest.mark.parametrize("text, fault", [("{}", "'run_id' is missing"), ("[]", "a list"),
                                         ('{"run_id": "r", "hosts": {"a"', "truncated"), ("", "truncated")])
def test_a_corrupt_rollout_journal_is_named_not_missing(text, fault):
    run_id = state_file("rollouts", f"rollout-bad-{abs(hash(text))}", text)
    proc = fleetctl("rollout", "--resume", run_id, timeout=30)
    err = one_line_error(proc, f"{run_id}.json", fault, "rollout record")
    assert "no rollout" not in err  # a truncated journal said "no rollout": as if it had never run
    one_line_error(fleetctl("rollout", "--rollback", run_id, timeout=30), fault)
    one_line_error(fleetctl("rollout", "--resume", "rollout-never", timeout=30), "no rollout 'rollout-never'")


def test_a_corrupt_run_record_is_one_line():
    one_line_error(fleetctl("retry", state_file("runs", "provision-empty", "{}"), timeout=30),
                   "provision-empty.json", "'run_id' is missing")
    one_line_error(fleetctl("retry", state_file("runs", "provision-nohosts",
                                                '{"run_id": "x", "inventory": "i", "playbook": "p", "hosts": 3}'),
                            timeout=30), "'hosts' is a int")


def test_a_snapshot_without_facts_is_one_line(tmp_path, inventory):
    (tmp_path / "fleet.lock").write_text(EMPTY_LOCK)
    run_id = state_file("audits", "audit-nofacts", '{"run_id": "audit-nofacts", "time": "t"}')
    one_line_error(fleetctl("audit", inventory, "--lock", tmp_path / "fleet.lock", "--since", run_id, timeout=30),
                   "audit-nofacts.json", "'facts' is missing")
    run_id = state_file("audits", "audit-badfacts", '{"run_id": "audit-badfacts", "facts": {"h1": {"gpus": 7}}}')
    one_line_error(fleetctl("audit", inventory, "--lock", tmp_path / "fleet.lock", "--since", run_id, timeout=30),
                   "facts of h1 are malformed")


def test_unwritable_outputs_are_refused_before_any_host(tmp_path, inventory):
    one_line_error(fleetctl("plan", inventory, "--write-lock", tmp_path / "no" / "such" / "fleet.lock", timeout=30),
                   "no directory", str(tmp_path / "no" / "such"))
    (tmp_path / "fleet.lock").write_text(EMPTY_LOCK)
    one_line_error(fleetctl("audit", inventory, "--lock", tmp_path / "fleet.lock", "--format", "prometheus",
                            "-o", tmp_path, timeout=30), "is a directory")
    with pytest.raises(StateError, match="is a directory"):
        records.atomic_write(tmp_path, "x")


# ---------------------------------------------------------------- 7. text printed literally

def printed(draw) -> str:
    console = Console(record=True, width=300, force_terminal=False)
    draw(console)
    return console.export_text()


def test_remote_and_user_text_is_printed_literally():
    host = Host("gpu[1]")
    failed = Step("install", Status.FAILED, detail="pip: no matching [extra] for torch[cu130]",
                  tail="ERROR: [/x] stray [bold]closing[/bold] tag\n[/]")
    run = HostRun("gpu[1]", stack={"id": "vllm[cpu]-1"}, steps=[failed], changes=["install [x]"])
    outcomes = [Outcome(host, Status.FAILED, run), Outcome(Host("b[0]"), Status.UNREACHABLE, error="refused [a:b]",
                                                         fix="check [ssh]")]
    out = printed(lambda c: (c.print(report.recap_table(outcomes, diff=True)),
                             report.print_errors(c, outcomes), report.print_failed_steps(c, outcomes)))
    for text in ("gpu[1]", "[extra]", "torch[cu130]", "[/x] stray [bold]closing[/bold] tag", "[/]", "vllm[cpu]-1",
                 "install [x]", "refused [a:b]", "check [ssh]", "b[0]"):
        assert text in out, (text, out)


def test_an_error_message_keeps_its_brackets(tmp_path):
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    gpu[1:x]:\n")
    err = one_line_error(fleetctl("inventory", tmp_path / "inv.yml", "--list", timeout=30), "'gpu[1:x]'")
    assert "[01:16]" in err and "[a:f]" in err  # the range hint, lost as markup before


# ---------------------------------------------------------------- 2. fleet.lock writers merge

WRITER = """
import sys
import time
from fleetctl.decide.plan import ClassFacts, Lock
from fleetctl.facts.probe import Facts
start, path, names = sys.argv[1], sys.argv[2], sys.argv[3:]
facts = ClassFacts.of(Facts()).to_dict()
while open(start).read() != "go":
    pass
for name in names:
    with Lock.updating(path) as lock:
        lock.put(name, {"class": "c" + name, "facts": facts, "request": {}, "status": "refused", "stack": None,
                        "reasons": [], "fix": None})
"""


def test_concurrent_lock_writers_keep_every_host(tmp_path):
    lock, start = tmp_path / "fleet.lock", tmp_path / "start"
    start.write_text("")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(start), str(lock),
                                 *(f"w{w}-{i}" for i in range(15))], cwd=ROOT) for w in range(4)]
    start.write_text("go")  # all four read, change and write at once
    assert [w.wait(timeout=120) for w in writers] == [0] * 4
    assert len(Lock.read(lock).hosts) == 60
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- 9. retry remembers the run's options

def test_retry_repeats_the_runs_options(tmp_path):
    inventory = tmp_path / "inv.yml"  # a closed port: unreachable at once, so the retry has a host to redo
    inventory.write_text("all:\n  hosts:\n    h1:\n      ansible_host: 127.0.0.1\n      ansible_port: 1\n"
                         "      ansible_user: nobody\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "manifest.json").write_text('{"version": 1, "classes": {}}')
    play = tmp_path / "play.yml"
    play.write_text("- name: mine\n  hosts: all\n")
    proc = fleetctl("provision", inventory, "--vllm", "0.32.0", "--cuda", "12.9", "--wheelhouse", wheels,
                    "--playbook", play, "--revalidate", "--check", "--json", timeout=120)
    first = json.loads(proc.stdout)
    assert first["hosts"]["h1"]["status"] == "unreachable", first
    proc = fleetctl("retry", first["run_id"], "--json", timeout=120)
    again = json.loads(proc.stdout)
    assert again["run_id"] != first["run_id"]
    for key, value in (("vllm", "0.32.0"), ("cuda", "12.9"), ("wheelhouse", str(wheels)), ("playbook", str(play)),
                       ("revalidate", True), ("check", True)):
        assert again.get(key) == value, (key, again.get(key))


# ---------------------------------------------------------------- 10. provision records fleet.lock

def test_a_provisioned_host_can_be_audited_at_once(serve_lab, provisioned):
    """`fleetctl audit` right after `fleetctl provision` stopped with "no lock file": provision now
    records what it resolved and installed in fleet.lock (--check records nothing)."""
    lab, inventory = serve_lab
    lock = Lock.beside(inventory)
    lock.unlink(missing_ok=True)
    code, out = fleetctl_json("provision", inventory, "--limit", "cpu-a", "--check")
    assert code == 0 and not lock.exists()
    code, out = fleetctl_json("provision", inventory, "--limit", "cpu-a", timeout=900)
    assert code == 0, out["hosts"]["cpu-a"]
    written = yaml.safe_load(lock.read_text())
    assert written["hosts"]["cpu-a"]["stack_id"] == out["hosts"]["cpu-a"]["stack"]["id"]
    code, audited = fleetctl_json("audit", inventory, "--limit", "cpu-a")
    assert code == 0 and audited["hosts"]["cpu-a"]["status"] == "clean", audited["hosts"]["cpu-a"]
    # plan writes the same entry provision did: one class, the same stack
    assert fleetctl_json("plan", inventory, "--limit", "cpu-a", "--write-lock")[0] == 0
    assert yaml.safe_load(lock.read_text())["hosts"]["cpu-a"] == written["hosts"]["cpu-a"]


# ---------------------------------------------------------------- issue 26, item 2: state files before hosts

class Listener:
    """A TCP port that counts who connects: an inventory host no test may reach."""

    def __init__(self):
        import socket
        import threading
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            client.close()

    def inventory(self, path: Path) -> Path:
        path.write_text(f"all:\n  hosts:\n    h1:\n      ansible_host: 127.0.0.1\n"
                        f"      ansible_port: {self.sock.getsockname()[1]}\n")
        return path


@pytest.mark.parametrize("command", [["provision"], ["rollout", "--vllm", "0.32.0"]])
@pytest.mark.parametrize("fault", ["lock", "state"])
def test_state_files_a_run_writes_are_checked_before_any_host(tmp_path, monkeypatch, command, fault):
    """A truncated fleet.lock was found only after the hosts changed ("not valid YAML", no record):
    fleet.lock and the records directory are read and checked before any host is contacted."""
    listener = Listener()
    inventory = listener.inventory(tmp_path / "inv.yml")
    if fault == "lock":
        (tmp_path / "fleet.lock").write_text("version: 1\nclasses: {a: {facts: {}\n")  # truncated
        words = [str(tmp_path / "fleet.lock"), "not valid YAML"]
    else:
        (tmp_path / "state").write_text("")  # $XDG_STATE_HOME is a file: no records directory can be made
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        words = [str(tmp_path / "state")]
    one_line_error(fleetctl(command[0], inventory, *command[1:], timeout=60), *words)
    assert listener.accepted == 0


def test_a_run_that_changed_hosts_leaves_its_record_when_fleet_lock_cannot_be_written(tmp_path, monkeypatch):
    """fleet.lock going bad during the run (after the check above) still leaves the run's record
    and recap; the lock's fault is the run's last line and exit 1."""
    from fleetctl import cli
    from fleetctl.reach.fanout import Outcome

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    lock = tmp_path / "fleet.lock"
    inventory = Listener().inventory(tmp_path / "inv.yml")
    run = HostRun("h1", facts={}, stack={"id": "s"}, request={"vllm": None},
                  steps=[Step("install", Status.CHANGED, "installed")])

    def changed_then_lock_breaks(hosts, task, **_):
        lock.write_text("version: 1\nclasses: {a: {facts: {}\n")  # truncated while the hosts changed
        return {h.name: Outcome(h, Status.CHANGED, run) for h in hosts}
    monkeypatch.setattr(cli, "fan_out", changed_then_lock_breaks)
    code = cli.main(["provision", str(inventory)])
    assert code == 1
    (saved,) = (tmp_path / "state" / "fleetctl" / "runs").glob("provision-*.json")
    assert json.loads(saved.read_text())["hosts"]["h1"]["status"] == "changed"


# ---------------------------------------------------------------- issue 26, item 3: --wheelhouse

@pytest.mark.parametrize("where, words", [
    ("nowhere", ["no directory"]),  # contacted every host, then "internal error: FileNotFoundError", exit 2
    ("file", ["not a directory"]),
    ("empty", ["neither", "manifest.json", "wheels"]),
    ("corrupt", ["manifest.json", "unreadable"]),
])
def test_a_wheelhouse_that_is_not_one_is_refused_before_any_host(tmp_path, where, words):
    listener = Listener()
    inventory = listener.inventory(tmp_path / "inv.yml")
    wheels = tmp_path / "wheels"
    if where == "file":
        wheels.write_text("")
    elif where in ("empty", "corrupt"):
        wheels.mkdir()
        if where == "corrupt":
            (wheels / "manifest.json").write_text('{"version": 1, "cla')
    err = one_line_error(fleetctl("provision", inventory, "--wheelhouse", wheels, timeout=60), str(wheels), *words)
    assert "internal error" not in err and listener.accepted == 0
    play = tmp_path / "play.yml"  # the playbook's own install.wheelhouse: the same check
    play.write_text(f"- name: p\n  hosts: all\n  install: {{wheelhouse: {json.dumps(str(wheels))}}}\n")
    one_line_error(fleetctl("provision", inventory, "--playbook", play, timeout=60), str(wheels), *words)
    assert listener.accepted == 0


# ---------------------------------------------------------------- issue 26, item 6: a whole inventory's hosts

def test_a_million_hosts_in_many_small_ranges_are_refused_at_once(tmp_path):
    """100 entries of 10,000 hosts each passed the per-entry cap and ran on for minutes (1.3 s and
    19 MB per 10,000 hosts): the whole inventory's hosts are counted before any range is expanded."""
    from fleetctl.hosts.inventory import MAX_INVENTORY_HOSTS

    entries = "".join(f"    rack{r}-gpu[0:9999]:\n" for r in range(100))
    (tmp_path / "inv.yml").write_text(f"all:\n  hosts:\n{entries}")
    start = time.monotonic()
    with pytest.raises(InventoryError, match="1,000,000 hosts") as refused:
        load_inventory(tmp_path / "inv.yml")
    assert time.monotonic() - start < 1.0
    assert f"{MAX_INVENTORY_HOSTS:,}" in str(refused.value)
    proc = fleetctl("inventory", tmp_path / "inv.yml", "--list", timeout=30)
    one_line_error(proc, "1,000,000 hosts", f"{MAX_INVENTORY_HOSTS:,}")
    # Two sources together count as one inventory; INI ranges count too.
    (tmp_path / "a.ini").write_text("".join(f"node{r}-[0:9999]\n" for r in range(6)))
    (tmp_path / "b.yml").write_text("all:\n  hosts:\n" + "".join(f"    gpu{r}-[0:9999]:\n" for r in range(5)))
    with pytest.raises(InventoryError, match="110,000 hosts"):
        load_inventory([tmp_path / "a.ini", tmp_path / "b.yml"])
    (tmp_path / "b.yml").write_text("all:\n  hosts:\n    gpu[1:3]:\n")
    assert len(load_inventory([tmp_path / "a.ini", tmp_path / "b.yml"]).hosts) == 60_003
