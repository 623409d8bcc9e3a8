"""Secrets, wheel integrity and what reaches a host (issue 11, items 4, 5 and 8): credentials in index
URLs never written, shown or put on a command line; wheels installed only as the controller has them;
a host that cannot take a file says why; passwords only to verified servers; the probe quoted and
never running another user's code as root. Faults are real: lab hosts (sshd), a tmpfs or a read-only
mount in a host's own mount namespace, an index server and an SSH server that record what they get."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import socket
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.apply import steps
from fleetctl.errors import WheelhouseError
from fleetctl.hosts.inventory import load_inventory
from fleetctl.reach.connection import connect
from fleetctl.redact import redact, redact_data
from tests.conftest import fleetctl, fleetctl_json, wait_until
from tests.test_steps import FACTS, STACK
from tests.test_wheelhouse import base_python, image_python

TOKEN = "s3cr3t-T0KEN-4711"


# ---------------------------------------------------------------- redaction (pure)

@pytest.mark.parametrize("text, shown", [
    ("https://user:TOKEN@mirror.example/simple", "https://user:***@mirror.example/simple"),
    ("https://TOKEN@mirror.example/simple", "https://***@mirror.example/simple"),
    ("torch from http://u:p%40ss@10.0.0.1:8080/whl (fleet_torch_index)", "torch from http://u:***@10.0.0.1:8080/whl "
                                                                          "(fleet_torch_index)"),
    ("https://h/simple?token=abc&x=1", "https://h/simple?token=***&x=1"),
    ("https://h/s?X-Amz-Signature=abc&api_key=k", "https://h/s?X-Amz-Signature=***&api_key=***"),
    ("PIP_EXTRA_INDEX_URL='https://a:b@h/s https://c:d@i/t'",
     "PIP_EXTRA_INDEX_URL='https://a:***@h/s https://c:***@i/t'"),
    ("https://download.pytorch.org/whl/cpu", "https://download.pytorch.org/whl/cpu"),
    ("torch==2.13.0+cpu x=1 user@host", "torch==2.13.0+cpu x=1 user@host"),
])
def test_redact_hides_url_credentials_only(text, shown):
    assert redact(text) == shown and redact(shown) == shown


def test_a_stacks_data_and_id_never_hold_the_credential():
    secret = replace(STACK, torch_index=f"https://me:{TOKEN}@mirror/whl")
    assert TOKEN not in json.dumps(secret.to_dict()) and secret.to_dict()["torch_index"] == "https://me:***@mirror/whl"
    assert secret.torch_index.endswith(f"{TOKEN}@mirror/whl")  # what the install reads
    assert secret.id == replace(STACK, torch_index="https://me:other@mirror/whl").id  # a rotated token: same stack
    assert redact_data({"a": [f"https://x:{TOKEN}@h", ("k", 1)], 2: None}) == {
        "a": ["https://x:***@h", ("k", 1)], 2: None}


def test_the_install_sends_index_urls_on_stdin_never_in_its_command():
    from tests.test_steps import context
    c = context(stack=replace(STACK, torch_index=f"https://me:{TOKEN}@mirror/whl"))
    (action,) = steps.install(c).actions
    assert TOKEN not in action.command and TOKEN in action.stdin and TOKEN not in json.dumps(action.to_dict())
    assert '(umask 077 && cat > "$work/index.env")' in action.command and 'rm -f "$work/index.env"' in action.command


# ---------------------------------------------------------------- credentials on the lab

class HeldIndex(http.server.ThreadingHTTPServer):
    """A package index that records each request's credential and holds /simple/torch/ until released,
    so the test can look at the host's processes while pip waits for it."""

    daemon_threads = True

    def __init__(self, held: str = "/simple/torch"):
        self.seen: list[tuple[str, str]] = []
        self.waiting = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                server.seen.append((self.path, base64.b64decode(auth.split()[-1]).decode() if auth else ""))
                if self.path.startswith(held):
                    server.waiting.set()
                    server.release.wait(120)
                self.send_error(404)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_an_index_credential_is_never_written_shown_or_on_a_command_line(small_lab, tmp_path):
    index = HeldIndex()
    url = f"http://fleet:{TOKEN}@127.0.0.1:{index.server_address[1]}/simple"
    # The host's pip has no other source (no pip.conf, a dead default index): it asks the held index.
    env = {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0"}
    lab = small_lab(("cpu-s", None, {"env": env}), net=86)
    host = lab.hosts["cpu-s"]
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_torch_index=url)
    playbook = tmp_path / "play.yml"
    playbook.write_text("- name: install only\n  hosts: all\n  steps: [check, install]\n")
    lock = tmp_path / "fleet.lock"
    outputs = [fleetctl("plan", inventory, "--json"), fleetctl("plan", inventory, "--write-lock", lock),
               fleetctl("provision", inventory, "--playbook", playbook, "--check", "--diff"),
               fleetctl("plan", inventory)]

    seen_cmdlines: list[str] = []

    def watch():
        index.waiting.wait(300)
        seen_cmdlines.extend(host.processes().values())
        index.release.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    code, record = fleetctl_json("provision", inventory, "--playbook", playbook, timeout=600)
    watcher.join()
    install = next(s for s in record["hosts"]["cpu-s"]["steps"] if s["name"] == "install")
    assert install["status"] == "failed", install  # nothing to install from: the index said 404
    assert index.waiting.is_set() and ("/simple/torch/", f"fleet:{TOKEN}") in index.seen  # pip had the credential
    assert any("pip install" in c for c in seen_cmdlines), seen_cmdlines  # looked while pip ran
    assert not [c for c in seen_cmdlines if TOKEN in c]  # ... and no command line held it
    assert not list(host.fleet_root.glob(".install.*"))  # the 0600 file and its directory are gone, failed or not

    outputs.append(fleetctl("provision", inventory, "--playbook", playbook, "--diff"))  # the recap and the failed step
    assert outputs[-1].returncode == 2 and "install" in outputs[-1].stdout
    shown = [o.stdout + o.stderr for o in outputs] + [json.dumps(record)]
    written = [lock, *Path(os.environ["XDG_STATE_HOME"]).rglob("*.json")]
    written += [p for p in host.fleet_root.rglob("*") if p.is_file()]
    assert all(o.returncode == 0 for o in outputs[:4]), [o.stdout + o.stderr for o in outputs]
    assert "fleet:***@127.0.0.1" in shown[0] and "fleet:***@127.0.0.1" in lock.read_text()
    assert "fleet:***@127.0.0.1" in json.dumps(record["hosts"]["cpu-s"]["stack"])
    leaks = [w for w in shown if TOKEN in w] + [str(p) for p in written if TOKEN.encode() in p.read_bytes()]
    assert not leaks


# ---------------------------------------------------------------- wheel integrity

def wheel(directory: Path, name: str, version: str) -> Path:
    """A real (tiny, pure-Python) wheel pip installs."""
    dist = f"{name}-{version}.dist-info"
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", f"{name}/__init__.py,,\n{dist}/METADATA,,\n{dist}/WHEEL,,\n{dist}/RECORD,,\n")
    return path


def test_a_wheel_changed_after_the_manifest_is_refused_before_anything_is_pushed(tmp_path):
    good = wheel(tmp_path, "tinypkg", "1.0")
    platform = {"python": "3.11", "glibc": FACTS.glibc, "arch": FACTS.arch}
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "classes": {"c1": {
        "hosts": ["cpu-01"], "stack_id": STACK.id, "platform": platform,
        "files": [{"name": good.name, "sha256": hashlib.sha256(good.read_bytes()).hexdigest(), "size": 1}]}}}))
    assert steps.wheels_for(str(tmp_path), "cpu-01", STACK, FACTS, "/r").sha256 == (
        hashlib.sha256(good.read_bytes()).hexdigest(),)
    with zipfile.ZipFile(good, "a") as z:
        z.writestr("tinypkg/evil.py", "import os\n")
    with pytest.raises(WheelhouseError) as err:
        steps.wheels_for(str(tmp_path), "cpu-01", STACK, FACTS, "/r")
    assert str(err.value).startswith(f"{good}: sha256 ") and "changed after fleetctl wheelhouse wrote the manifest" in \
        str(err.value) and "nothing was pushed" in str(err.value)


def test_only_the_pushed_and_verified_wheels_are_installed(small_lab, tmp_path):
    """A newer wheel planted in the host's wheelhouse directory, and a find-links the host's own
    environment adds, are not seen: the install reads a private copy of the files the controller sent."""
    base = base_python("3.12")
    if not base:
        pytest.skip("needs Python 3.12 (pyenv) for the image's Python")
    py = image_python(tmp_path / "image", base, "2.11.0+cu130", "13.0")
    planted = tmp_path / "planted"
    planted.mkdir()
    wheel(planted, "tinypkg", "3.0")
    lab = small_lab(("gpu-w", "h100-sxm-80gb", {"ansible_python_interpreter": str(py),
                                                "env": {"PIP_FIND_LINKS": str(planted)}}), net=87)
    host = lab.hosts["gpu-w"]
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_vllm="none", fleet_system_site_packages="true")
    code, plan = fleetctl_json("plan", inventory)
    stack = plan["hosts"]["gpu-w"]["stack"]
    house = tmp_path / "wheelhouse"
    house.mkdir()
    pins = [p for p in steps.install_pins(steps.Stack.from_dict(stack)) + stack["packages"]]
    for pin in pins:
        name, version = pin.split("==")
        wheel(house, name.replace("-", "_"), version)
    wheel(house, "tinypkg", "1.0")
    (host.fleet_root / "wheelhouse").mkdir(parents=True)
    wheel(host.fleet_root / "wheelhouse", "tinypkg", "2.0")  # planted where the push goes
    playbook = tmp_path / "play.yml"
    playbook.write_text("- name: wheels\n  hosts: all\n  steps: [check, install]\n"
                        "  install: {no_deps: true, extra_packages: [tinypkg]}\n")
    code, record = fleetctl_json("provision", inventory, "--playbook", playbook, "--wheelhouse", house, timeout=600)
    install = next(s for s in record["hosts"]["gpu-w"]["steps"] if s["name"] == "install")
    assert install["status"] == "changed", json.dumps(install)[-3000:]
    got = lab.ssh("gpu-w", f"/opt/fleetctl/envs/{stack['id']}/bin/python -c 'import tinypkg; print(tinypkg.VERSION)'"
                  if lab.namespaces else
                  f"{host.fleet_root}/envs/{stack['id']}/bin/python -c 'import tinypkg; print(tinypkg.VERSION)'")
    assert got.stdout.strip() == "1.0", got.stdout + got.stderr
    assert not list(host.fleet_root.glob(".install.*"))


def test_a_wheel_changed_on_the_host_after_the_push_is_not_installed(small_lab, tmp_path):
    """The host checks every pushed file against the controller's sha256 before pip or uv sees it."""
    from tests.test_steps import context
    lab = small_lab(("cpu-v", None, {}), net=93)
    host = lab.hosts["cpu-v"]
    root = "/opt/fleetctl" if lab.namespaces else str(host.fleet_root)
    house = tmp_path / "house"
    house.mkdir()
    good = wheel(house, "tinypkg", "1.0")
    wheels = steps.Wheels(house, f"{root}/wheelhouse", (good,), sha256=(hashlib.sha256(good.read_bytes()).hexdigest(),))
    c = context(wheels=wheels)
    c = replace(c, target=replace(c.target, root=root))
    (install,) = [a for a in steps.install(c).actions if a.reads]
    swapped = host.fleet_root / "wheelhouse"
    swapped.mkdir()
    wheel(swapped, "tinypkg", "1.0")
    with zipfile.ZipFile(swapped / good.name, "a") as z:  # the pushed file, changed on the host afterwards
        z.writestr("tinypkg/evil.py", "import os\n")
    (h,) = load_inventory(lab.write_inventory(tmp_path / "inv.yml")).select(None)
    conn = connect(h, timeout=20)
    try:
        result = conn.run(install.command, timeout=120, stdin=install.stdin)
    finally:
        conn.close()
    step = steps.install(c).outcome(result)
    assert result.exited == 1 and steps.INSTALL_FAULT in result.stderr, result.stdout + result.stderr
    assert step.status == "failed" and step.detail == (
        f"a wheel on the host differs from the controller's (sha256): {good.name}; nothing was installed")
    assert not (host.fleet_root / "envs").exists() and not list(host.fleet_root.glob(".install.*"))


def namespaced_host(small_lab, net: int):
    lab = small_lab(("gpu-f", "h100-sxm-80gb", {}), net=net)
    if not lab.namespaces:
        pytest.skip("needs lab hosts with their own mount namespace (unshare)")
    return lab


def big_wheelhouse(tmp_path: Path) -> Path:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "big-1.0-py3-none-any.whl").write_bytes(os.urandom(3 << 20))
    return house


def provision_under(small_lab, tmp_path, net: int, mount: str) -> tuple:
    """Provision a wheelhouse onto a namespaced lab host after *mount* made a fault there: (lab, the host's run)."""
    lab = namespaced_host(small_lab, net)
    mounted = lab.ssh("gpu-f", mount)
    assert mounted.returncode == 0, mounted.stderr
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_vllm="none")
    code, record = fleetctl_json("provision", inventory, "--wheelhouse", big_wheelhouse(tmp_path), timeout=600)
    return lab, record["hosts"]["gpu-f"]


def test_a_disk_filling_during_the_push_is_a_failed_step_naming_it(small_lab, tmp_path):
    lab, run = provision_under(small_lab, tmp_path, 88, "mkdir -p /opt/fleetctl/wheelhouse && mount -t tmpfs "
                               "-o size=1m fleet-full /opt/fleetctl/wheelhouse")
    assert run["status"] == "failed", run  # not unreachable: the host answered
    install = next(s for s in run["steps"] if s["name"] == "install")
    assert install["detail"] == ("no space left on device on gpu-f writing "
                                 "/opt/fleetctl/wheelhouse/big-1.0-py3-none-any.whl"), install
    left = lab.ssh("gpu-f", "ls -A /opt/fleetctl/wheelhouse")
    assert left.returncode == 0 and left.stdout.strip() == ""  # the partial file is gone


def test_a_read_only_fleet_root_is_a_failed_step_naming_it(small_lab, tmp_path):
    _, run = provision_under(small_lab, tmp_path, 89,
                             "mount --bind /opt/fleetctl /opt/fleetctl && mount -o remount,bind,ro /opt/fleetctl")
    assert run["status"] == "failed", run
    # The host lock is the run's first write: it fails, naming the file and the cause.
    assert run["steps"][-1]["name"] == "lock", run["steps"]
    assert "/opt/fleetctl/.lock" in run["steps"][-1]["detail"]
    assert "read-only file system" in run["steps"][-1]["detail"].lower(), run["steps"][-1]


def test_a_read_only_wheelhouse_is_a_failed_install_naming_it(small_lab, tmp_path):
    _, run = provision_under(small_lab, tmp_path, 89, "mkdir -p /opt/fleetctl/wheelhouse && mount --bind "
                             "/opt/fleetctl/wheelhouse /opt/fleetctl/wheelhouse && "
                             "mount -o remount,bind,ro /opt/fleetctl/wheelhouse")
    assert run["status"] == "failed", run
    install = next(s for s in run["steps"] if s["name"] == "install")
    assert install["detail"] == ("read-only file system on gpu-f writing "
                                 "/opt/fleetctl/wheelhouse/big-1.0-py3-none-any.whl"), install


# ---------------------------------------------------------------- connections and the probe

class PasswordRecorder:
    """An SSH server (paramiko) that accepts any connection and records every password offered."""

    def __init__(self):
        import paramiko
        self.passwords: list[str] = []
        self.key = paramiko.Ed25519Key.from_private_key_file(str(self._keyfile()))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _keyfile() -> Path:
        import subprocess
        import tempfile
        path = Path(tempfile.mkdtemp()) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        return path

    def _serve(self):
        import paramiko
        recorder = self

        class Server(paramiko.ServerInterface):
            def get_allowed_auths(self, username):
                return "password"

            def check_auth_password(self, username, password):
                recorder.passwords.append(password)
                return paramiko.AUTH_FAILED

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(client)
            transport.add_server_key(self.key)
            try:
                transport.start_server(server=Server())
            except (paramiko.SSHException, EOFError):
                continue


def test_no_password_goes_to_a_server_whose_key_is_not_checked(tmp_path):
    server = PasswordRecorder()
    inventory = tmp_path / "inv.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"box": {
        "ansible_host": "127.0.0.1", "ansible_port": server.sock.getsockname()[1], "ansible_user": "root",
        "ansible_password": "hunter2-secret", "ansible_host_key_checking": False}}}}))
    out = fleetctl("facts", inventory, "-T", "10")
    assert out.returncode != 0
    assert server.passwords == []  # before: paramiko sent it to whoever answered
    line = [ln for ln in (out.stdout + out.stderr).splitlines() if "box" in ln and "host key checking is off" in ln]
    assert line and "hunter2" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert "known_hosts" in out.stdout + out.stderr


def test_a_fleet_root_cannot_smuggle_a_command_through_the_probe(small_lab, tmp_path):
    marker = tmp_path / "ran"
    lab = small_lab(("cpu-q", None, {"ansible_python_interpreter": "/usr/bin/python3 @FLEET_ROOT@",
                                     "fleet_root": f"/tmp/fleet; touch {marker}; :"}), net=90)
    inventory = lab.write_inventory(tmp_path / "inv.yml")
    code, out = fleetctl_json("facts", inventory)
    assert not marker.exists()
    assert out["hosts"]["cpu-q"]["facts"]["fleet_root"] == f"/tmp/fleet; touch {marker}; :"


def test_a_script_shipped_to_a_host_has_its_own_mode(small_lab, tmp_path):
    lab = small_lab(("cpu-m", None, {}), net=91)
    inventory = lab.write_inventory(tmp_path / "inv.yml")
    (host,) = load_inventory(inventory).select(None)
    local = tmp_path / "smoke.py"
    local.write_text("print('hi')\n")
    local.chmod(0o777)
    conn = connect(host, timeout=20)
    try:
        conn.put(local, str(tmp_path / "shipped.py"))
    finally:
        conn.close()
    assert (tmp_path / "shipped.py").stat().st_mode & 0o777 == 0o644


def test_the_probe_does_not_run_an_environment_another_user_owns(small_lab, tmp_path):
    """As root, fleetctl facts must not start <fleet_root>/current/bin/python where another user owns it:
    that user would run code as root. Its versions are read from its metadata files instead."""
    lab = small_lab(("cpu-o", None, {}), net=92)
    root = lab.hosts["cpu-o"].fleet_root
    env = root / "envs" / "kernels-torch-2.13.0-abc"
    site = env / "lib" / "python3.11" / "site-packages"
    (site / "torch-2.13.0+cpu.dist-info").mkdir(parents=True)
    (site / "torch-2.13.0+cpu.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
    (site / "torch").mkdir()
    (site / "torch" / "version.py").write_text("cuda = None\n")
    (env / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    (env / "fleetctl-stack.json").write_text(json.dumps({"id": "kernels-torch-2.13.0-abc"}))
    marker = tmp_path / "ran-as-root"
    (env / "bin").mkdir()
    (env / "bin" / "python").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (env / "bin" / "python").chmod(0o755)
    (root / "current").symlink_to("envs/kernels-torch-2.13.0-abc")
    for path in [env, *env.rglob("*")]:
        os.lchown(path, 65534, 65534)
    inventory = lab.write_inventory(tmp_path / "inv.yml")
    code, out = fleetctl_json("facts", inventory)
    assert not marker.exists()
    installed = out["hosts"]["cpu-o"]["facts"]["installed"]
    assert installed["torch"] == "2.13.0+cpu" and installed["python"] == "3.11.2", installed
    assert installed["stack_id"] == "kernels-torch-2.13.0-abc"


# ---------------------------------------------------------------- issue 26, item 1

def test_rollout_json_shows_the_request_as_the_journal_has_it(small_lab, tmp_path):
    """rollout --json printed hosts.<h>.run.request.torch_index with the token although the journal
    on disk was redacted: both now come from one serialisation."""
    env = {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0"}
    lab = small_lab(("cpu-j", None, {"env": env}), net=94)
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_torch_index=f"http://fleet:{TOKEN}@127.0.0.1:9/simple")
    playbook = tmp_path / "play.yml"
    playbook.write_text("- name: install only\n  hosts: all\n  steps: [check, install]\n")
    proc = fleetctl("rollout", inventory, "--vllm", "0.31.0", "--playbook", playbook, "--json", timeout=600)
    out = json.loads(proc.stdout)
    host = out["hosts"]["cpu-j"]
    assert host["state"] == "failed" and host["run"]["request"]["torch_index"] == "http://fleet:***@127.0.0.1:9/simple"
    journal = Path(os.environ["XDG_STATE_HOME"]).rglob(f"{out['run_id']}.json")
    assert TOKEN not in proc.stdout + proc.stderr and TOKEN not in next(journal).read_text()


def test_the_controllers_pip_gets_index_urls_from_a_private_file_never_argv(tmp_path, monkeypatch):
    """`fleetctl wheelhouse` ran `pip download … --extra-index-url http://user:TOKEN@…`: any user's
    `ps` showed the token. The index server looks at every process's command line while pip asks it."""
    from fleetctl.apply.wheelhouse import HostInput, build, plan_classes
    from tests.test_wheelhouse import KERNELS, facts

    for name, value in {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                        "PIP_RETRIES": "0"}.items():  # this machine's pip asks the held index alone
        monkeypatch.setenv(name, value)
    index = HeldIndex(held="/simple/")
    url = f"http://fleet:{TOKEN}@127.0.0.1:{index.server_address[1]}/simple"
    (plan,) = plan_classes([HostInput("gpu", facts(), replace(KERNELS, torch_index=url), {})])
    seen: list[str] = []

    def watch():
        index.waiting.wait(120)
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                seen.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
        index.release.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    (result,) = build([plan], tmp_path / "wh")
    watcher.join()
    assert not result.ok and index.waiting.is_set()  # pip asked the index (and found nothing there)
    assert any(path.startswith("/simple/") and cred == f"fleet:{TOKEN}" for path, cred in index.seen)
    assert any(" pip " in c for c in seen), seen  # looked while pip ran
    assert not [c for c in seen if TOKEN in c]
    assert TOKEN not in result.error


# ---------------------------------------------------------------- issue 26, item 5

def test_a_full_disk_during_the_environment_build_is_named_and_the_partial_environment_removed(small_lab, tmp_path):
    """The build said only "installing … failed (exit 1)" (ensurepip's tail) and left the partial
    environment filling the disk. A real 150 MiB tmpfs as the fleet root: the wheel is pushed and
    copied, then the venv's pip no longer fits."""
    lab = namespaced_host(small_lab, 90)
    mounted = lab.ssh("gpu-f", "mount -t tmpfs -o size=150m fleet-full /opt/fleetctl")
    assert mounted.returncode == 0, mounted.stderr
    inventory = lab.write_inventory(tmp_path / "inv.yml", fleet_vllm="none")
    play = tmp_path / "play.yml"  # the check's free-space estimate (0.1 GiB seen) is let through
    play.write_text("- name: p\n  hosts: all\n  install: {min_free_gib: 0.05}\n")
    house = tmp_path / "wheelhouse"  # 70 MiB pushed, 70 copied for the install: 10 left for the venv
    house.mkdir()
    (house / "big-1.0-py3-none-any.whl").write_bytes(os.urandom(70 << 20))
    code, record = fleetctl_json("provision", inventory, "--playbook", play, "--wheelhouse", house, timeout=600)
    run = record["hosts"]["gpu-f"]
    install = next((s for s in run["steps"] if s["name"] == "install"), run)
    assert install["status"] == "failed", install
    assert install.get("detail", "").startswith("No space left on device under /opt/fleetctl: "), run["steps"]
    assert install["detail"].endswith(" MiB free"), install["detail"]
    left = lab.ssh("gpu-f", "ls -A /opt/fleetctl/envs 2>/dev/null; ls -d /opt/fleetctl/.install.* 2>/dev/null; true")
    assert left.returncode == 0 and left.stdout.strip() == "", left.stdout  # no partial environment, no work dir
