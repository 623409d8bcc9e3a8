"""How fleetctl reaches a host: an SSH connection (the only module that imports
fabric) or a local one, both returning a :class:`Result` value per command.

Connection settings come from the host's Ansible vars (``ansible_host``,
``ansible_port``, ``ansible_user``, ``ansible_ssh_private_key_file``,
``ansible_password``, ``ansible_host_key_checking``, ``ansible_connection``,
``-o UserKnownHostsFile=`` in ``ansible_ssh_common_args``) and, below them,
``~/.ssh/config``, read through fabric as OpenSSH reads it for Ansible.
paramiko and socket errors are translated into :mod:`fleetctl.errors` here.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from .errors import CommandFailed, TimedOut, Unreachable
from .inventory import Host

FALSY = {"false", "no", "off", "0", "n"}
FILE_MODE = 0o644  # of every file copied to a host: the controller's file modes are not the host's business


@dataclass(frozen=True)
class Result:
    """What one command did on one host."""

    host: str
    command: str
    exited: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exited == 0

    @property
    def failed(self) -> bool:
        return not self.ok

    def check(self, what: str | None = None) -> Result:
        """Return self, or raise CommandFailed naming the step and stderr's last line."""
        if self.ok:
            return self
        tail = (self.stderr.strip() or self.stdout.strip()).splitlines()[-1:] or [""]
        raise CommandFailed(self.host, f"{what or self.command} exited {self.exited}: {tail[0]}")


class Connection(Protocol):
    name: str

    def run(self, command: str, *, timeout: float, stdin: str | None = None) -> Result: ...

    def hold(self, command: str, *, timeout: float) -> tuple[str, Callable[[], None]]: ...

    def put(self, local: Path, remote: str, mode: int = ...) -> None: ...

    def close(self) -> None: ...


def is_local(host: Host) -> bool:
    return str(host.vars.get("ansible_connection", "ssh")) == "local"


def connect(host: Host, *, timeout: float) -> Connection:
    """Open a connection to *host* within *timeout* seconds, or raise Unreachable/TimedOut."""
    if is_local(host):
        return LocalConnection(host.name)
    return SSHConnection.open(host, timeout=timeout)


class LocalConnection:
    """Commands on the controller itself (``ansible_connection: local``)."""

    def __init__(self, name: str):
        self.name = name
        self.running: set[subprocess.Popen] = set()

    def run(self, command: str, *, timeout: float, stdin: str | None = None) -> Result:
        start = time.monotonic()
        # A new session lets a timeout (or close) kill the whole tree, not just the shell.
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.running.add(proc)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TimedOut(self.name, f"command did not finish within {timeout:.0f}s") from None
        finally:
            self.running.discard(proc)
        return Result(self.name, command, proc.returncode, out, err, time.monotonic() - start)

    def hold(self, command: str, *, timeout: float) -> tuple[str, Callable[[], None]]:
        """As SSHConnection.hold: *command* left running with its stdin open until released."""
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True)
        if not select.select([proc.stdout], [], [], timeout)[0]:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimedOut(self.name, f"no answer within {timeout:.0f}s from a command left running")
        line = proc.stdout.readline().decode(errors="replace")

        def release() -> None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return line.strip(), release

    def put(self, local: Path, remote: str, mode: int = FILE_MODE) -> None:
        target = Path(remote)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(local).read_bytes())
            target.chmod(mode)
        except OSError as exc:
            if target.is_file():
                target.unlink()  # no partial copy is left behind
            cause = (exc.strerror or str(exc)).lower()
            raise CommandFailed(self.name, f"{cause} on {self.name} writing {remote}") from None

    def close(self) -> None:
        """End whatever still runs (fleetctl interrupted): TERM first, so scripts clean up."""
        for proc in list(self.running):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


def _ssh_options(host: Host) -> dict[str, str]:
    """``-o Key=Value`` pairs from ansible_ssh_common_args / ansible_ssh_extra_args."""
    words: list[str] = []
    for var in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        words += shlex.split(str(host.vars.get(var) or ""))
    opts = {}
    for i, word in enumerate(words):
        pair = word[2:] if word.startswith("-o") and len(word) > 2 else None
        if word == "-o" and i + 1 < len(words):
            pair = words[i + 1]
        if pair and "=" in pair:
            key, value = pair.split("=", 1)
            opts[key.strip().lower()] = value.strip()
    return opts


def host_key_checking(host: Host) -> bool:
    value = host.vars.get("ansible_host_key_checking", _ssh_options(host).get("stricthostkeychecking", True))
    return str(value).lower() not in FALSY


def _translate(exc: Exception, name: str, conn, timeout: float, elapsed: float) -> Unreachable | TimedOut:
    """A paramiko or socket error while connecting → the one line a user sees."""
    _, paramiko = _ssh_stack()
    where = f"{conn.host}:{conn.port}"
    text = str(exc)
    if isinstance(exc, paramiko.BadHostKeyException):
        return Unreachable(name, f"host key of {where} does not match known_hosts",
                           fix="if the host was reinstalled, remove its old key with ssh-keygen -R")
    if "not found in known_hosts" in text:
        return Unreachable(name, f"{where} is not in known_hosts",
                           fix="add it with ssh-keyscan, or set ansible_host_key_checking: false")
    if isinstance(exc, paramiko.AuthenticationException):
        return Unreachable(name, f"authentication as {conn.user} failed",
                           fix="check ansible_user and ansible_ssh_private_key_file")
    # A host that accepts TCP but never completes the SSH handshake ends in a banner error or
    # a session that never came up (paramiko: "No existing session"): a hang, not a refusal.
    hung = any(s in text for s in ("banner", "No existing session", "Negotiation"))
    if hung or isinstance(exc, socket.timeout) or elapsed >= timeout - 0.5:
        return TimedOut(name, f"no SSH answer from {where} within {timeout:.0f}s",
                        fix="check the host is not hung; raise --timeout if it is just slow")
    if isinstance(exc, OSError) and exc.strerror:
        return Unreachable(name, f"cannot reach {where}: {exc.strerror}", fix="check the host is up and sshd runs")
    return Unreachable(name, f"SSH to {where} failed: {text or type(exc).__name__}")


def _drain(recv) -> bytes:
    data = bytearray()
    while chunk := recv(65536):
        data += chunk
    return bytes(data)


def _killed_remotely_after(command: str, seconds: float) -> str:
    """Wrap *command* so the host itself kills it at the deadline (where it has timeout(1)):
    closing our end of the session does not stop a hung remote process."""
    quoted = shlex.quote(command)
    secs = max(1, int(seconds + 0.999))
    return (f"if command -v timeout >/dev/null 2>&1; then exec timeout -k 2 {secs} sh -c {quoted}; "
            f"else exec sh -c {quoted}; fi")


class SSHConnection:
    """One SSH session to one host, through fabric (imported on first use, see _ssh_stack)."""

    def __init__(self, name: str, fabric_conn):
        self.name = name
        self._conn = fabric_conn

    @classmethod
    def open(cls, host: Host, *, timeout: float) -> SSHConnection:
        fabric, paramiko = _ssh_stack()
        v = host.vars
        kwargs: dict = {
            "banner_timeout": timeout,
            "auth_timeout": timeout,
            "channel_timeout": timeout,
        }
        key = v.get("ansible_ssh_private_key_file") or v.get("ansible_private_key_file")
        if key:
            kwargs.update(_private_key(os.path.expanduser(str(key))), look_for_keys=False, allow_agent=False)
        password = v.get("ansible_password") or v.get("ansible_ssh_pass")
        if password and not host_key_checking(host):
            # As OpenSSH does: a password goes only to a server whose key was checked.
            raise Unreachable(host.name, "ansible_password is set but host key checking is off: fleetctl does "
                              "not send a password to a server whose key it has not verified",
                              fix="add the host's key to known_hosts (ssh-keyscan) and drop "
                                  "ansible_host_key_checking: false, or use ansible_ssh_private_key_file")
        if password:
            kwargs["password"] = str(password)
        conn = _connection_class()(
            host=str(v.get("ansible_host") or host.name),
            user=str(v["ansible_user"]) if v.get("ansible_user") else None,
            port=int(v["ansible_port"]) if v.get("ansible_port") else None,
            connect_timeout=timeout,
            connect_kwargs=kwargs,
            config=_fabric_config(),
        )
        client = conn.client
        if host_key_checking(host):
            # Only this host's known keys, from files parsed once per run: paramiko's own loading
            # compares every line with every other, per connection, which grows with the fleet squared.
            known = _ssh_options(host).get("userknownhostsfile")
            lookup = f"[{conn.host}]:{conn.port}" if conn.port != 22 else conn.host
            for path in [known] if known else ["/etc/ssh/ssh_known_hosts", "~/.ssh/known_hosts"]:
                for key_type, key in _known_hosts(os.path.expanduser(path)).keys_for(lookup):
                    client.get_host_keys().add(lookup, key_type, key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            client.set_missing_host_key_policy(paramiko.MissingHostKeyPolicy())
        started = time.monotonic()
        try:
            conn.open()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _translate(exc, host.name, conn, timeout, time.monotonic() - started) from None
        return cls(host.name, conn)

    def run(self, command: str, *, timeout: float, stdin: str | None = None) -> Result:
        _, paramiko = _ssh_stack()
        # One session channel read with select(): no runner threads per command, which matters
        # with hundreds of hosts on a few cores.
        start = time.monotonic()
        deadline = start + timeout + 3  # the host's own timeout(1) normally wins, cleanly
        out, err = bytearray(), bytearray()
        try:
            transport = self._conn.client.get_transport()
            chan = transport.open_session(timeout=timeout)
            chan.exec_command(_killed_remotely_after(command, timeout))
            if stdin is not None:
                chan.sendall(stdin.encode())
            chan.shutdown_write()
            # Read until the command's output ends; select() on the channel wakes only for data or EOF.
            # After EOF the channel stays readable for ever, so the exit status is waited on as an
            # event (selecting again would spin a core until sshd reaps the command).
            while not (chan.eof_received or chan.closed):
                left = deadline - time.monotonic()
                if left <= 0:
                    chan.close()
                    raise TimedOut(self.name, f"command did not finish within {timeout:.0f}s")
                select.select([chan], [], [], min(left, 1.0))
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
            # A closed channel also sets the event: its status is then -1, the host went away.
            if not chan.status_event.wait(max(deadline - time.monotonic(), 0)):
                chan.close()
                raise TimedOut(self.name, f"command did not finish within {timeout:.0f}s")
            chan.settimeout(1.0)
            out += _drain(chan.recv)
            err += _drain(chan.recv_stderr)
            exited = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Unreachable(self.name, f"connection lost: {exc}", fix="check the host is up") from None
        if exited == -1:  # the channel closed without an exit status: the host went away
            raise Unreachable(self.name, "connection lost while a command ran", fix="check the host is up")
        if exited == 124 and time.monotonic() - start >= timeout - 0.5:
            raise TimedOut(self.name, f"command did not finish within {timeout:.0f}s")
        return Result(self.name, command, exited, out.decode(errors="replace"), err.decode(errors="replace"),
                      time.monotonic() - start)

    def hold(self, command: str, *, timeout: float) -> tuple[str, Callable[[], None]]:
        """Start *command* and leave it running, its stdin open, on a channel of its own (a host lock's
        holder: it ends when released, or when this controller dies and the session closes). Returns
        its first line of output (stderr merged by the command), or all it printed where it exited
        first, and the function that releases it."""
        _, paramiko = _ssh_stack()
        out = bytearray()
        try:
            chan = self._conn.client.get_transport().open_session(timeout=timeout)
            chan.settimeout(timeout)
            chan.exec_command(command)
            while b"\n" not in out and (chunk := chan.recv(4096)):
                out += chunk
        except socket.timeout:
            raise TimedOut(self.name, f"no answer within {timeout:.0f}s from a command left running") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Unreachable(self.name, f"connection lost: {exc}", fix="check the host is up") from None
        return out.decode(errors="replace").strip(), chan.close

    def put(self, local: Path, remote: str, mode: int = FILE_MODE) -> None:
        """Copy *local* to *remote* over SFTP with *mode* (not the controller file's); a host that refuses
        the write (disk full, read-only, no permission) is CommandFailed naming the cause, with the partial
        file removed."""
        try:
            self._conn.put(str(local), remote, preserve_mode=False)
            self._conn.sftp().chmod(remote, mode)
        except (OSError, EOFError) as exc:
            transport = self._conn.client.get_transport()
            if isinstance(exc, EOFError) or not (transport and transport.is_active()):
                raise Unreachable(self.name, f"copy of {Path(local).name} failed: {exc}") from None
            failure = exc
        else:
            return
        # SFTP says only "Failure" for a full disk or a read-only file system: the host's own shell says which.
        try:
            said = self.run(WRITE_CHECK.format(path=shlex.quote(remote)), timeout=30).stdout
        except (TimedOut, Unreachable):
            said = ""
        raise CommandFailed(self.name, f"{write_error(said) or f'copy failed ({failure})'} on {self.name} "
                                       f"writing {remote}") from None

    def close(self) -> None:
        self._conn.close()


# Why a file could not be written at {path}: a small write beside it (while the partial copy still holds
# its space), the shell's or head's own error text; then the partial copy is removed.
WRITE_CHECK = """f={path}
d=$(dirname -- "$f")
while [ ! -d "$d" ]; do echo "No such file or directory: $d"; d=$(dirname -- "$d"); done
t="$d/.fleetctl-write-check.$$"
{{ head -c 65536 /dev/zero > "$t"; }} 2>&1
rm -f -- "$t" "$f"
true
"""
WRITE_ERRORS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                "No such file or directory")


def write_error(said: str) -> str | None:
    """The cause WRITE_CHECK found ("no space left on device"), or None."""
    return next((e.lower() for e in WRITE_ERRORS if e in said), None)


@functools.cache
def _ssh_stack():
    """fabric and paramiko, imported on first SSH use: a controller that only runs local
    connections (a GPU host provisioning itself) needs neither, and starts faster."""
    import fabric
    import paramiko

    # paramiko logs connection failures with tracebacks; they reach the user as Outcomes instead.
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    logging.getLogger("paramiko").propagate = False
    return fabric, paramiko


class KnownHosts:
    """An OpenSSH known_hosts file, parsed once: its plain host names indexed, its hashed ones
    (``|1|salt|hash``) kept to be hashed against; entries paramiko cannot read are skipped, as
    paramiko skips them."""

    def __init__(self, text: str):
        _, paramiko = _ssh_stack()
        self.plain: dict[str, list[tuple[str, object]]] = {}
        self.hashed: list[tuple[str, str, object]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            except paramiko.SSHException:
                continue
            if entry is None:
                continue
            for name in entry.hostnames:
                found = (entry.key.get_name(), entry.key)
                if name.startswith("|1|"):
                    self.hashed.append((name, *found))
                else:
                    self.plain.setdefault(name, []).append(found)

    def keys_for(self, name: str) -> list[tuple[str, object]]:
        """(key type, key) of every entry naming *name* (``host`` or ``[host]:port``)."""
        _, paramiko = _ssh_stack()
        hashed = [(t, k) for h, t, k in self.hashed if paramiko.HostKeys.hash_host(name, h) == h]
        return self.plain.get(name, []) + hashed


# Held while a known_hosts or key file is parsed: the first fifty connections of a run all ask at once.
_PARSING = threading.Lock()


def _known_hosts(path: str) -> KnownHosts:
    try:
        stat = os.stat(path)
    except OSError:
        return KnownHosts("")
    with _PARSING:
        return _parsed_known_hosts(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _parsed_known_hosts(path: str, mtime_ns: int, size: int) -> KnownHosts:
    """One parse per file version (a file changed since is read again)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return KnownHosts(f.read())


def _private_key(path: str) -> dict:
    """paramiko's connect arguments for the key file at *path*: the key itself, read once per file
    version for every host of the run, or the file name where it needs a passphrase or cannot be
    read (paramiko then tries it, and says why it failed, per host)."""
    _, paramiko = _ssh_stack()
    try:
        stat = os.stat(path)
        with _PARSING:
            return {"pkey": _loaded_key(path, stat.st_mtime_ns, stat.st_size)}
    except (OSError, ValueError, paramiko.SSHException):
        return {"key_filename": path}


@functools.lru_cache(maxsize=16)
def _loaded_key(path: str, mtime_ns: int, size: int):
    _, paramiko = _ssh_stack()
    return paramiko.PKey.from_path(path)


@functools.cache
def _connection_class():
    """fabric's Connection, with ``inline_ssh_env`` declared as its own attribute. fabric assigns
    it in every Connection's __init__ and, not declared, invoke's config proxy writes it into the
    Config, which every connection of a run shares (see _fabric_config): each write rebuilds that
    Config while other threads read it, and they failed with "No attribute or config key found
    for 'gateway'" (12 hosts of 100 in one benchmark audit)."""
    fabric, _ = _ssh_stack()

    class Connection(fabric.Connection):
        inline_ssh_env = None

    return Connection


@functools.cache
def _fabric_config():
    """One fabric Config (with ~/.ssh/config parsed once) shared by every connection."""
    fabric, _ = _ssh_stack()
    return fabric.Config(overrides={"run": {"echo": False}})
