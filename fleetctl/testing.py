"""A recorded connection: the shipped fake of fleetctl's one seam, the :class:`~fleetctl.reach.connection.Connection`.

As httpx ships ``MockTransport`` and invoke ships ``MockContext``, fleetctl ships
:class:`RecordedConnection`: it answers each command from rules (a regular expression
searched in the command → a :class:`Reply`, an exception to raise, or a callable that
makes either) and records what ran and what was copied, so provisioning and rollout
decisions can be tested in milliseconds, with no host::

    conn = RecordedConnection("gpu-01", [
        (r"@@fleetctl", Reply(stdout=captured_probe)),
        (r"readlink .*/current", Reply(stdout="envs/vllm-0.33.0-abc\\n")),
    ])
    ...
    assert conn.commands(r"uv pip install")

The first matching rule answers; a command no rule answers raises :class:`LookupError`
(name a ``default`` to answer everything else), so a test never passes on a command it
did not expect. End-to-end tests use real sshd hosts instead (tests/lab).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

from fleetctl.errors import CommandFailed
from fleetctl.reach.connection import Result


@dataclass(frozen=True)
class Reply:
    """What a rule answers: a command's exit status and output."""

    stdout: str = ""
    exited: int = 0
    stderr: str = ""


Answer = Union[Reply, BaseException, Callable[[str, "str | None"], "Reply | BaseException"]]


class RecordedConnection:
    """A Connection that answers from *rules* and records every command run and file put."""

    def __init__(self, name: str = "host", rules: Iterable[tuple[str, Answer]] = (), *,
                 default: Answer | None = None):
        self.name = name
        self.rules = [(re.compile(pattern), answer) for pattern, answer in rules]
        self.default = default
        self.ran: list[str] = []  # every command, in order
        self.stdin: list[str | None] = []  # what each command was given on stdin
        self.as_root: list[bool] = []  # whether each command's action asked for root (become)
        self.puts: list[tuple[Path, str]] = []  # (local file, remote path), in order
        self.resumed: list[bool] = []  # whether each put continued the host's partial copy
        self.rates: list[float | None] = []  # each put's cap in bytes a second (None: none)
        self.files: dict[str, bytes] = {}  # what the host has for get: remote path → content
        self.gets: list[tuple[str, Path]] = []  # (remote path, local file), in order
        self.released: list[str] = []  # commands left running (hold) that were released
        self.closed = False

    def answer(self, pattern: str, answer: Answer) -> RecordedConnection:
        """Add a rule in front of the others (a later answer overrides an earlier one)."""
        self.rules.insert(0, (re.compile(pattern), answer))
        return self

    def run(self, command: str, *, timeout: float, stdin: str | None = None, root: bool = False) -> Result:
        self.ran.append(command)
        self.stdin.append(stdin)
        self.as_root.append(root)
        answer = next((a for p, a in self.rules if p.search(command)), self.default)
        if answer is None:
            raise LookupError(f"{self.name}: no rule answers {command[:200]!r}")
        if callable(answer) and not isinstance(answer, (Reply, BaseException)):
            answer = answer(command, stdin)
        if isinstance(answer, BaseException):
            raise answer
        return Result(self.name, command, answer.exited, answer.stdout, answer.stderr, 0.0)

    def hold(self, command: str, *, timeout: float, root: bool = False) -> tuple[str, Callable[[], None]]:
        """A command left running (the host lock): answered by a rule that matches it, else "locked" — a
        recorded host grants every lock no rule refuses. Releasing it is recorded in ``released``."""
        self.ran.append(command)
        self.stdin.append(None)
        self.as_root.append(root)
        answer = next((a for p, a in self.rules if p.search(command)), Reply("locked\n"))
        if callable(answer) and not isinstance(answer, (Reply, BaseException)):
            answer = answer(command, None)
        if isinstance(answer, BaseException):
            raise answer
        return answer.stdout.strip(), lambda: self.released.append(command)

    def put(self, local: Path, remote: str, mode: int = 0o644, root: bool = False, resume: bool = False,
            rate: float | None = None) -> None:
        self.puts.append((Path(local), remote))
        self.resumed.append(resume)
        self.rates.append(rate)

    def get(self, remote: str, local: Path) -> None:
        """Write what ``files`` holds for *remote* to *local*; a path it lacks is a copy the host refused."""
        self.gets.append((remote, Path(local)))
        if remote not in self.files:
            raise CommandFailed(self.name, f"no such file on {self.name}: {remote}")
        Path(local).write_bytes(self.files[remote])

    def close(self) -> None:
        self.closed = True

    def commands(self, pattern: str) -> list[str]:
        """The commands that ran and match *pattern* (re.search), in order."""
        return [c for c in self.ran if re.search(pattern, c)]

    def root_commands(self) -> list[str]:
        """The commands that ran asking for root."""
        return [c for c, root in zip(self.ran, self.as_root) if root]
