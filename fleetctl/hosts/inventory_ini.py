"""Ansible's INI inventory format, read by Ansible's own rules into plain entries.

Owns the text of an INI inventory: sections ``[g]``, ``[g:vars]`` and ``[g:children]``, hosts before
any section (ungrouped), inline host vars split as a shell would with ``#``/``;`` comments, values
typed as Python literals where they are one (``3``, ``True``, ``['a']``) and strings otherwise, and
``:vars`` lines read whole after the first ``=``. A child group may be named before its own section;
a ``:vars`` or a child of a group no section ever defines is Ansible's error, and fleetctl's.

The result is a list of ``IniEntry`` in the order Ansible creates groups and adds hosts; the host
names are left as written (``gpu[01:16]:2222``), because ranges and ports follow the same rules as
in YAML and are expanded where both formats meet, in inventory.py.
"""

from __future__ import annotations

import ast
import re
import shlex
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from fleetctl.errors import InventoryError

__all__ = ["IniEntry", "parse_ini"]

_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:#.*)?$")
_GROUP_NAME = re.compile(r"^([^:\]\s]+)\s*(?:#.*)?$")


class IniEntry(NamedTuple):
    """A group or a host as the file names it: under which group, with which vars, on which line."""
    kind: str  # "group" or "host"
    name: str
    parent: str | None  # for a group: the group whose children it is, None where it is only declared
    vars: dict[str, Any]
    line: int


def parse_ini(path: Path, text: str, known: frozenset[str] | set[str] = frozenset()) -> list[IniEntry]:
    """The entries of one INI inventory; *known* are the groups earlier sources already defined."""
    defined = {"all", "ungrouped", *known}
    pending: dict[str, tuple[int, str, list[str]]] = {}  # group -> (line, state, parents waiting for it)
    entries: list[IniEntry] = []
    group, state = "ungrouped", "hosts"
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue

        def error(message: str, fix: str) -> InventoryError:
            return InventoryError(f"{path}:{number}: {message}", fix=fix)  # noqa: B023 - used at once

        section = _SECTION.match(line)
        if section:
            group, state = section[1], section[2] or "hosts"
            if state not in ("hosts", "children", "vars"):
                raise error(f"section [{group}:{state}] has unknown type '{state}'",
                            fix="use [name], [name:vars] or [name:children]")
            if group not in defined:
                defined.add(group)
                entries.append(IniEntry("group", group, None, {}, number))
                if state == "vars":
                    pending.setdefault(group, (number, "vars", []))
            if state != "vars" and group in pending:
                entries += _resolve(group, pending, number)
            continue
        if line.startswith("[") and line.endswith("]"):
            raise error(f"invalid section '{line}'", fix="write [name], [name:vars] or [name:children], without spaces")
        if state == "hosts":
            entries += _host_line(line, group, number, error)
        elif state == "vars":
            key, equals, value = line.partition("=")
            if not equals:
                raise error(f"expected key=value in [{group}:vars], got '{line}'", fix="write one key=value a line")
            entries.append(IniEntry("group", group, None, {key.strip(): typed(value.strip())}, number))
        else:
            match = _GROUP_NAME.match(line)
            if not match:
                raise error(f"expected a group name in [{group}:children], got '{line}'", fix="one group name a line")
            child = match[1]
            if child in defined:  # a group named only by a [child:vars] counts, as in Ansible
                entries.append(IniEntry("group", child, group, {}, number))
            else:
                pending.setdefault(child, (number, "children", []))[2].append(group)
    for name, (number, state, parents) in pending.items():
        if state == "vars":
            raise InventoryError(f"{path}:{number}: section [{name}:vars] is for a group no section defines",
                                 fix=f"add a [{name}] or [{name}:children] section, or remove it")
        raise InventoryError(f"{path}:{number}: section [{parents[-1]}:children] names group '{name}', "
                             "which no section defines", fix=f"add a [{name}] section, even an empty one")
    return entries


def _resolve(group: str, pending: dict[str, tuple[int, str, list[str]]], number: int) -> list[IniEntry]:
    """A group now defined joins the parents that named it earlier, as Ansible's pending children do."""
    _, state, parents = pending.pop(group)
    links = [IniEntry("group", group, parent, {}, number) for parent in parents]
    for parent in parents:
        if parent in pending and pending[parent][1] == "children":
            links += _resolve(parent, pending, number)
    return links if state == "children" else []


def _host_line(line: str, group: str, number: int, error) -> list[IniEntry]:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as problem:
        raise error(f"cannot read host line '{line}': {problem}", fix="close the quote") from None
    if not tokens:
        return []
    name, host_vars = tokens[0], {}
    if name.endswith(":") or name.strip() == "---":
        raise error(f"'{name}' is not a host", fix="a trailing ':' needs a port; a file of 'key:' lines is YAML, "
                                                     "so check its YAML")
    for token in tokens[1:]:
        key, equals, value = token.partition("=")
        if not equals:
            raise error(f"expected key=value after host '{name}', got '{token}'", fix="write key=value, quoted")
        host_vars[key] = typed(value)
    return [IniEntry("host", name, group, host_vars, number)]


def typed(value: str) -> Any:
    """A value as Ansible's INI plugin types it: a Python literal where it is one, else the string."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    return _plain(parsed)


def _plain(value: Any) -> Any:
    # Ansible's variables hold no tuple, set, complex or Ellipsis: it turns them into these.
    if isinstance(value, (list, tuple, set)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if value is ...:
        return "..."
    if isinstance(value, complex):
        return str(value)
    return value  # bytes stay bytes: inventory.py marks them !unsafe, as Ansible does
