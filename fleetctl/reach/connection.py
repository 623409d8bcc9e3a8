"""How fleetctl reaches a host: an SSH connection (the only module that imports
fabric) or a local one, both returning a :class:`Result` value per command.

Connection settings come from the host's Ansible vars (``ansible_host``,
``ansible_port``, ``ansible_user``, ``ansible_ssh_private_key_file``,
``ansible_password``, ``ansible_host_key_checking``, ``ansible_connection``,
``-o UserKnownHostsFile=`` in ``ansible_ssh_common_args``) and, below them,
``~/.ssh/config``, read through fabric as OpenSSH reads it for Ansible.
paramiko and socket errors are translated into :mod:`fleetctl.errors` here.

A command whose action needs root (``root=True``) runs through the host's become (``ansible_become``
and its vars, see :mod:`fleetctl.hosts.become`): :class:`Escalation` checks sudo once per connection, the
password only ever on stdin, and wraps the command; every other command runs as the login user.
"""

from __future__ import annotations

import functools
import getpass
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from fleetctl.errors import CommandFailed, InventoryError, TimedOut, Unreachable
from fleetctl.hosts.become import (NEEDS_PASSWORD, NOT_ALLOWED, Become, BecomeFailed, become_for, check_command, judge,
                     validate_command, wrap)
from fleetctl.hosts.inventory import Host, Vaulted

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

    def run(self, command: str, *, timeout: float, stdin: str | None = None, root: bool = False) -> Result: ...

    def hold(self, command: str, *, timeout: float, root: bool = False) -> tuple[str, Callable[[], None]]: ...

    def put(self, local: Path, remote: str, mode: int = ..., root: bool = False, resume: bool = False,
            rate: float | None = None) -> None: ...

    def get(self, remote: str, local: Path) -> None: ...

    def close(self) -> None: ...


class Escalation:
    """One connection's become: the sudo check, run once before its first root command (a refusal is
    remembered, so the host's sudo is tried once per run), then every root command wrapped."""

    def __init__(self, name: str, login: str | None, become: Become):
        self.name, self.login, self.become = name, login or "the login user", become
        self.with_password: bool | None = None  # decided by the check
        self.refused: BecomeFailed | None = None

    def wrap(self, run: Callable[..., Result], command: str, stdin: str | None, timeout: float
             ) -> tuple[str, str | None]:
        """*command* and *stdin* as they run as the become user (*run* runs the check, unwrapped)."""
        if self.refused:
            raise self.refused
        if self.with_password is None:
            self.with_password = self._check(run, timeout)
        return wrap(command, stdin, self.become, with_password=self.with_password)

    def _check(self, run: Callable[..., Result], timeout: float) -> bool:
        """Whether root commands send the password: not where sudo needs none (NOPASSWD), which is asked
        first with ``-n`` (no password read, no try counted); else the one try with the password."""
        quiet, _ = wrap("true", None, self.become, with_password=False)
        result = run(quiet, timeout=min(timeout, 30), stdin=None)
        if result.ok:
            return False
        if any(m in result.stderr for m in NEEDS_PASSWORD):  # said to a user with no sudo too: -v tells which
            told = run(validate_command(), timeout=min(timeout, 30), stdin=None)
            if any(m in told.stderr for m in NOT_ALLOWED):
                result = told
            elif self.become.password is not None:
                command, stdin = check_command(self.become)
                result = run(command, timeout=min(timeout, 60), stdin=stdin)
        self.refused = judge(self.name, self.login, self.become, result.exited, result.stderr + result.stdout)
        if self.refused:
            raise self.refused
        return True


def escalation_for(host: Host, login: str | None) -> Escalation | None:
    """The host's become as an Escalation, None where it does not become (or logs in as the become user)."""
    password = host.vars.get("ansible_become_password", host.vars.get("ansible_become_pass"))
    if isinstance(password, Vaulted):
        raise InventoryError(f"{host.name}: ansible_become_password is vault-encrypted and no vault password was "
                             "given", fix="pass --vault-password-file FILE or --vault-id, or set "
                                          "ANSIBLE_VAULT_PASSWORD_FILE")
    try:
        become = become_for(host.vars)
    except ValueError as exc:
        raise InventoryError(f"{host.name}: {exc}", fix="set ansible_become_method: sudo") from None
    if become is None or (login is not None and login == become.user):
        return None
    return Escalation(host.name, login, become)


def is_local(host: Host) -> bool:
    return str(host.vars.get("ansible_connection", "ssh")) == "local"


def connect(host: Host, *, timeout: float) -> Connection:
    """Open a connection to *host* within *timeout* seconds, or raise Unreachable/TimedOut."""
    if is_local(host):
        return LocalConnection(host.name, escalation_for(host, getpass.getuser()))
    return SSHConnection.open(host, timeout=timeout)


class LocalConnection:
    """Commands on the controller itself (``ansible_connection: local``)."""

    def __init__(self, name: str, escalation: Escalation | None = None):
        self.name = name
        self.running: set[subprocess.Popen] = set()
        self.escalation = escalation

    def run(self, command: str, *, timeout: float, stdin: str | None = None, root: bool = False) -> Result:
        if root and self.escalation:
            command, stdin = self.escalation.wrap(self._run, command, stdin, timeout)
        return self._run(command, timeout=timeout, stdin=stdin)

    def _run(self, command: str, *, timeout: float, stdin: str | None = None) -> Result:
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

    def hold(self, command: str, *, timeout: float, root: bool = False) -> tuple[str, Callable[[], None]]:
        """As SSHConnection.hold: *command* left running with its stdin open until released."""
        first = None
        if root and self.escalation:
            command, first = self.escalation.wrap(self._run, command, None, timeout)
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True)
        if first:
            proc.stdin.write(first.encode())
            proc.stdin.flush()
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

    def put(self, local: Path, remote: str, mode: int = FILE_MODE, root: bool = False, resume: bool = False,
            rate: float | None = None) -> None:
        if root and self.escalation:
            return put_as_root(self, local, remote, mode, rate)
        target = Path(remote)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "rb") as src, open(target, "ab" if resume else "wb") as dst:
                src.seek(dst.tell())
                for block in paced(src, rate):
                    dst.write(block)
            target.chmod(mode)
        except OSError as exc:
            if target.is_file():
                target.unlink()  # no partial copy is left behind
            cause = (exc.strerror or str(exc)).lower()
            raise CommandFailed(self.name, f"{cause} on {self.name} writing {remote}") from None

    def get(self, remote: str, local: Path) -> None:
        try:
            shutil.copyfile(remote, local)
        except OSError as exc:
            raise CommandFailed(self.name, f"copying {remote} from {self.name} failed: "
                                           f"{(exc.strerror or str(exc)).lower()}") from None

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
    # a session that never came up (paramiko: "No existing session"): a hang where it took the
    # whole timeout, a closed connection where it ended at once (the same words from paramiko).
    hung = any(s in text for s in ("banner", "No existing session", "Negotiation"))
    if (hung or isinstance(exc, EOFError) or "reset by peer" in text) and elapsed < timeout / 2:
        return Unreachable(name, f"{where} accepted and closed the connection {elapsed:.1f}s later, "
                                 "before any SSH answer",
                           fix="check that sshd listens there and admits this controller (MaxStartups, "
                               "AllowUsers, tcp wrappers, a firewall that resets)")
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

    def __init__(self, name: str, fabric_conn, escalation: Escalation | None = None):
        self.name = name
        self._conn = fabric_conn
        self.escalation = escalation

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
            revoked: set[bytes] = set()
            for path in [known] if known else ["/etc/ssh/ssh_known_hosts", "~/.ssh/known_hosts"]:
                parsed = _known_hosts(os.path.expanduser(path))
                revoked |= parsed.revoked
                for key_type, key in parsed.keys_for(lookup):
                    client.get_host_keys().add(lookup, key_type, key)
            client.set_missing_host_key_policy(_reject_policy(revoked))
        else:
            client.set_missing_host_key_policy(paramiko.MissingHostKeyPolicy())
        started = time.monotonic()
        try:
            conn.open()
        except _RevokedHostKey:
            raise Unreachable(host.name, f"host key of {conn.host}:{conn.port} is marked @revoked in known_hosts",
                              fix="give the host a new key, or remove the @revoked line if it was a mistake") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _translate(exc, host.name, conn, timeout, time.monotonic() - started) from None
        return cls(host.name, conn, escalation_for(host, conn.user))

    def run(self, command: str, *, timeout: float, stdin: str | None = None, root: bool = False) -> Result:
        if root and self.escalation:
            # The host's timeout(1) inside sudo: outside, running as the login user, it could not signal the
            # root processes of a command that hangs (they outlived it on a lab host).
            command, stdin = self.escalation.wrap(self._run, _killed_remotely_after(command, timeout), stdin, timeout)
            return self._run(command, timeout=timeout, stdin=stdin, remote_timeout=False)
        return self._run(command, timeout=timeout, stdin=stdin)

    def _run(self, command: str, *, timeout: float, stdin: str | None = None, remote_timeout: bool = True) -> Result:
        _, paramiko = _ssh_stack()
        # One session channel read with select(): no runner threads per command, which matters
        # with hundreds of hosts on a few cores.
        start = time.monotonic()
        deadline = start + timeout + 3  # the host's own timeout(1) normally wins, cleanly
        out, err = bytearray(), bytearray()
        try:
            transport = self._conn.client.get_transport()
            chan = transport.open_session(timeout=timeout)
            chan.exec_command(_killed_remotely_after(command, timeout) if remote_timeout else command)
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

    def hold(self, command: str, *, timeout: float, root: bool = False) -> tuple[str, Callable[[], None]]:
        """Start *command* and leave it running, its stdin open, on a channel of its own (a host lock's
        holder: it ends when released, or when this controller dies and the session closes). Returns
        its first line of output (stderr merged by the command), or all it printed where it exited
        first, and the function that releases it."""
        _, paramiko = _ssh_stack()
        out = bytearray()
        first = None
        if root and self.escalation:
            command, first = self.escalation.wrap(self._run, command, None, timeout)
        try:
            chan = self._conn.client.get_transport().open_session(timeout=timeout)
            chan.settimeout(timeout)
            chan.exec_command(command)
            if first:
                chan.sendall(first.encode())
            while b"\n" not in out and (chunk := chan.recv(4096)):
                out += chunk
        except socket.timeout:
            raise TimedOut(self.name, f"no answer within {timeout:.0f}s from a command left running") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Unreachable(self.name, f"connection lost: {exc}", fix="check the host is up") from None
        return out.decode(errors="replace").strip(), chan.close

    def put(self, local: Path, remote: str, mode: int = FILE_MODE, root: bool = False, resume: bool = False,
            rate: float | None = None) -> None:
        """Copy *local* to *remote* over SFTP with *mode* (not the controller file's); a host that refuses
        the write (disk full, read-only, no permission) is CommandFailed naming the cause, with the partial
        file removed. As root: through the login user's own temporary file (see put_as_root), whole.
        *resume*: continue the host's shorter copy of *remote* from its end; *rate*: at most that many bytes
        a second."""
        if root and self.escalation:
            return put_as_root(self, local, remote, mode, rate)
        try:
            if resume or rate:
                self._send(local, remote, resume, rate)
            else:
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

    def _send(self, local: Path, remote: str, resume: bool, rate: float | None) -> None:
        sftp = self._conn.sftp()
        with open(local, "rb") as src, sftp.open(remote, "ab" if resume else "wb") as dst:
            src.seek(dst.stat().st_size if resume else 0)
            dst.set_pipelined(True)
            for block in paced(src, rate):
                dst.write(block)

    def get(self, remote: str, local: Path) -> None:
        """Copy the host's *remote* to *local* over SFTP, as the login user (a file it cannot read is
        CommandFailed naming the cause); a partial copy is removed."""
        try:
            self._conn.get(remote, str(local))
        except (OSError, EOFError) as exc:
            Path(local).unlink(missing_ok=True)
            transport = self._conn.client.get_transport()
            if isinstance(exc, EOFError) or not (transport and transport.is_active()):
                raise Unreachable(self.name, f"copy of {remote} failed: {exc}") from None
            raise CommandFailed(self.name, f"copying {remote} from {self.name} failed: {exc}") from None

    def close(self) -> None:
        self._conn.close()


def paced(src, rate: float | None, size: int = 1 << 18):
    """*src*'s blocks, no faster than *rate* bytes a second on average (None: as fast as they come)."""
    start, sent = time.monotonic(), 0
    while block := src.read(size):
        yield block
        sent += len(block)
        ahead = sent / rate - (time.monotonic() - start) if rate else 0
        if ahead > 0:
            time.sleep(ahead)


def put_as_root(conn, local: Path, remote: str, mode: int, rate: float | None = None) -> None:
    """Copy *local* where only root may write: to a file of the login user's own (mktemp, in its home),
    then moved into place by root with *mode*, owned by root. Files copied are fleetctl's scripts and
    wheels, never a secret."""
    made = conn.run("mktemp \"${HOME:-/tmp}/.fleetctl-put.XXXXXX\"", timeout=30)
    temp = made.stdout.strip()
    if made.failed or not temp:
        raise CommandFailed(conn.name, f"cannot make a temporary file for {remote}: {made.stderr.strip()}")
    try:
        conn.put(local, temp, mode, rate=rate)
        moved = conn.run(f"mkdir -p -- {shlex.quote(str(Path(remote).parent))} && install -m {mode:o} "
                         f"-- {shlex.quote(temp)} {shlex.quote(remote)}", timeout=120, root=True)
        if moved.failed:
            raise CommandFailed(conn.name, f"{write_error(moved.stderr) or 'copy failed'} on {conn.name} writing "
                                           f"{remote}")
    finally:
        conn.run(f"rm -f -- {shlex.quote(temp)}", timeout=30)


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
    (``|1|salt|hash``) kept to be hashed against, its ``@revoked`` keys refused whatever names
    them (as sshd(8) says of the marker). ``@cert-authority`` lines are skipped and counted:
    paramiko's client negotiates plain host keys only, so it never sees a host certificate to
    check against them. Lines paramiko cannot read are skipped, as paramiko skips them."""

    def __init__(self, text: str):
        _, paramiko = _ssh_stack()
        self.plain: dict[str, list[tuple[str, object]]] = {}
        self.hashed: list[tuple[str, str, object]] = []
        self.revoked: set[bytes] = set()
        self.cert_authorities: list[int] = []  # line numbers
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            marker, _, rest = line.partition(" ") if line.startswith("@") else ("", "", line)
            if marker == "@cert-authority":
                self.cert_authorities.append(number)
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(rest.strip())
            except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey):
                continue
            if entry is None or (marker and marker != "@revoked"):
                continue
            if marker == "@revoked":
                self.revoked.add(entry.key.asbytes())
                continue
            for name in entry.hostnames:
                found = (entry.key.get_name(), entry.key)
                if name.startswith("|1|"):
                    self.hashed.append((name, *found))
                else:
                    self.plain.setdefault(name, []).append(found)

    def keys_for(self, name: str) -> list[tuple[str, object]]:
        """(key type, key) of every entry naming *name* (``host`` or ``[host]:port``), less the revoked."""
        _, paramiko = _ssh_stack()
        hashed = [(t, k) for h, t, k in self.hashed if paramiko.HostKeys.hash_host(name, h) == h]
        return [(t, k) for t, k in self.plain.get(name, []) + hashed if k.asbytes() not in self.revoked]


class _RevokedHostKey(Exception):
    """The server offered a key known_hosts marks ``@revoked``."""


def _reject_policy(revoked: set[bytes]):
    """paramiko's RejectPolicy, saying so where the unknown key is a revoked one (revoked keys are
    never among the known, so paramiko always asks the policy about them)."""
    _, paramiko = _ssh_stack()

    class Policy(paramiko.RejectPolicy):
        def missing_host_key(self, client, hostname, key):
            if key.asbytes() in revoked:
                raise _RevokedHostKey(hostname)
            super().missing_host_key(client, hostname, key)
    return Policy()


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
    """One parse per file version (a file changed since is read again); its skipped certificate
    authorities are one warning (on the "fleetctl" logger, which the CLI prints)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        known = KnownHosts(f.read())
    if known.cert_authorities:
        lines = ", ".join(map(str, known.cert_authorities))
        logging.getLogger("fleetctl").warning(
            f"{path}: @cert-authority line(s) {lines} skipped: fleetctl (paramiko) checks a host's own key, "
            "not host certificates; list the hosts' keys too (ssh-keyscan) or they are not in known_hosts")
    return known


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
