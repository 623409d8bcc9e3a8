"""The inventory: which hosts fleetctl may touch, the groups they form, and each host's variables.

Reads an Ansible YAML inventory as Ansible's ``yaml`` inventory plugin does, so a user's existing
file loads unchanged, and answers host patterns and ``--limit`` as Ansible does: its hosts, in its
order (a group's own hosts, then its children's level by level), subscripts counted in that order,
a warning for a part that matches nothing, an error for a limit that leaves no host. Variables are
merged once, at load time, in Ansible's order: group vars from the shallowest group to the deepest
(groups at one depth by ``ansible_group_priority``, then by name), then the host's own vars; a
selected host's vars are templated when read (templating.py), ``hosts`` keeps them as written.

Reads Ansible's sources as Ansible does: a YAML file (as the ``yaml`` plugin), an INI file (parsed
in inventory_ini.py), told apart by extension and by whether the text is a YAML mapping; a
directory of them (Ansible's ignored names and extensions skipped); several sources at once; and
the ``group_vars/`` and ``host_vars/`` beside each source, in Ansible's precedence. Plugin configs,
scripts and TOML are refused, naming ``ansible-inventory --export`` as the way to a static file.

Where Ansible only warns (an unknown key in a group, one host given two addresses, a source it
cannot parse, an empty inventory), fleetctl refuses: an inventory that
says something other than its author meant must not reach a fleet. Every problem is one
``InventoryError`` naming the file and line or key.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import re
import string
from collections import ChainMap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from fleetctl.errors import InventoryError
from fleetctl.hosts.inventory_ini import parse_ini
from fleetctl.hosts.templating import host_vars
from fleetctl.hosts.vault import Vault, is_vault
from fleetctl.records import check_yaml_expansion
from fleetctl.redact import MASK, register_secret

__all__ = ["CONNECTIONS", "Group", "Host", "Inventory", "Selection", "Unsafe", "Vaulted", "load_inventory"]

# Exact spellings only: connection.py tells local from ssh by this value, so an alias such as
# ansible.builtin.local would quietly be reached over ssh.
CONNECTIONS = frozenset({"ssh", "paramiko", "smart", "local"})


@dataclass(frozen=True)
class Vaulted:
    """A ``!vault`` value read with no vault password: the ciphertext, as Ansible keeps it until a task
    uses it (fleetctl refuses to use one: see become.py)."""
    ciphertext: str


class VaultText(str):
    """A value decrypted from a vault (a ``!vault`` value, or any string of a vault-encrypted vars file);
    registered with redact.py, so it is masked wherever printed. ``--list`` shows a ``!vault`` value's
    ciphertext, as Ansible does, and a string from an encrypted file as ``***``."""
    ciphertext: str | None = None

    def __new__(cls, text: str, ciphertext: str | None = None):
        value = super().__new__(cls, text)
        value.ciphertext = ciphertext
        register_secret(text)
        return value


class Unsafe(str):
    """An ``!unsafe`` string: Ansible never templates it, so it must reach the host verbatim."""


@dataclass(frozen=True)
class Host:
    """A machine fleetctl may touch. Equal and hashed by name alone, so it can key a dict."""
    name: str
    vars: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    groups: tuple[str, ...] = field(default=(), compare=False, hash=False)  # in merge order, 'all' first


@dataclass(frozen=True)
class Group:
    """A named set of hosts and child groups, with the vars written on it."""
    name: str
    hosts: tuple[str, ...] = ()  # direct members only
    children: tuple[str, ...] = ()
    vars: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Inventory:
    """A loaded inventory file: its hosts in file order, its groups, and --limit selection."""
    path: Path
    hosts: Mapping[str, Host]
    groups: Mapping[str, Group]
    # The command line's vars (-b, a become password): over every host's own, as Ansible's extra vars; never
    # in --list.
    extra_vars: Mapping[str, Any] = field(default_factory=dict)

    def select(self, limit: str | None) -> list[Host]:
        """The hosts ``--limit`` picks, in Ansible's order for 'all'; None picks every host.
        A limit that leaves no host is an error, as in Ansible; warnings are dropped (see ``selection``)."""
        return list(self.selection("all", limit).hosts)

    def selection(self, pattern: str = "all", limit: str | None = None) -> Selection:
        """What ``ansible PATTERN --limit LIMIT --list-hosts`` picks, in its order, with its warnings.

        A part of either that matches nothing is a warning; a limit that leaves no host at all is an
        error, as in Ansible. A pattern alone that matches nothing is an empty selection, not an error."""
        hosts, warnings = self._evaluate(self._split(pattern))
        if limit is not None:
            parts = self._split(limit)
            if not parts:  # Ansible reads '' as no limit at all; from an unset shell variable, that is a fleet
                raise _no_match(limit, self.path)
            subset, more = self._evaluate(_limit_file_lines(parts))
            warnings += [w for w in more if w not in warnings]
            allowed = set(subset)
            hosts = [name for name in hosts if name in allowed]
            if not hosts:
                raise _no_match(limit, self.path)
        elif not hosts:
            warnings.append("no hosts matched, nothing to do")
        return Selection(tuple(self.templated(name) for name in hosts), tuple(warnings))

    def templated(self, name: str) -> Host:
        """Host *name* with its vars templated as Ansible does when it uses them (see templating.py):
        what the hosts of a selection carry. ``hosts`` keeps the vars as written."""
        host = self.hosts[name]
        templated = host_vars(name, self._raw_vars, _GroupHosts(self), self._group_names)
        return Host(name, ChainMap(dict(self.extra_vars), templated) if self.extra_vars else templated, host.groups)

    @property
    def _raw_vars(self) -> Mapping[str, Mapping[str, Any]]:
        return _HostsVars(self.hosts)

    def _group_names(self, name: str) -> list[str]:
        return sorted(group for group in self.hosts[name].groups if group != "all")

    def to_ansible_list(self) -> dict:
        """What ``ansible-inventory -i FILE --list`` prints, as parsed JSON."""
        listing: dict[str, Any] = {"_meta": {"profile": "inventory_legacy", "hostvars": {
            name: _plain(host.vars) for name, host in self.hosts.items() if host.vars}}}
        for group in self.groups.values():
            # Ansible never lists all's own hosts, and leaves out empty groups though parents still name them.
            entry = {"hosts": list(group.hosts) if group.name != "all" else [], "children": list(group.children)}
            if group.hosts and group.name != "all" or group.children:
                listing[group.name] = {key: names for key, names in entry.items() if names}
        return listing

    def _split(self, pattern: str) -> list[str]:
        # One host's name stays whole, so an IPv6 address is not split on its colons.
        return [pattern] if pattern in self.hosts else _split_patterns(pattern)

    def _evaluate(self, patterns: list[str]) -> tuple[list[str], list[str]]:
        """Host names in Ansible's order: plain patterns in turn, then &intersections, then !exclusions."""
        plain = [p for p in patterns if p[0] not in "!&"] or ["all"]
        hosts: dict[str, None] = {}
        warnings: list[str] = []
        for pattern in plain + [p for p in patterns if p[0] == "&"] + [p for p in patterns if p[0] == "!"]:
            if pattern in self.hosts:
                hosts.setdefault(pattern)
                continue
            found = self._match(pattern[1:] if pattern[0] in "!&" else pattern, warnings)
            if pattern[0] == "!":
                hosts = {name: None for name in hosts if name not in set(found)}
            elif pattern[0] == "&":
                hosts = {name: None for name in hosts if name in set(found)}
            else:
                hosts.update(dict.fromkeys(found))
        return list(hosts), warnings

    def _match(self, pattern: str, warnings: list[str]) -> list[str]:
        """The hosts one pattern names, in Ansible's order: matching groups' hosts, then matching hosts."""
        expr, position = _split_subscript(pattern)
        try:
            regex = re.compile(expr[1:] if expr.startswith("~") else fnmatch.translate(expr))
        except re.error as error:
            raise InventoryError(f"--limit '{pattern}' is not a valid regular expression: {error}") from None
        groups = [name for name in self.groups if regex.match(name)]
        found = dict.fromkeys(name for group in groups for name in self._group_hosts(group))
        # As in Ansible: a plain word that names a group means only that group; a glob also matches hosts.
        if not groups or expr.startswith("~") or any(char in expr for char in ".?*["):
            found.update(dict.fromkeys(name for name in self.hosts if regex.match(name)))
        if not found and not groups and expr != "all":
            warnings.append(f"could not match host pattern '{expr}', ignoring it")
        if position is None or not found:
            return list(found)
        try:
            return _apply_subscript(list(found), position)
        except IndexError:
            raise InventoryError(f"no host matches the subscripted pattern '{pattern}': '{expr}' has "
                                 f"{len(found)} hosts", fix="count from 0, or from -1 at the end") from None

    def _group_hosts(self, group: str) -> list[str]:
        """A group's hosts as Ansible's Group.get_hosts orders them: its own, then its descendants'
        level by level. (Ansible walks a level below the children in set order; fleetctl in file order.)"""
        ordered, level, seen = [group], list(self.groups[group].children), {group}
        while level:
            fresh = [name for name in dict.fromkeys(level) if name not in seen]
            ordered += fresh
            seen.update(fresh)
            level = [child for name in fresh for child in self.groups[name].children]
        return list(dict.fromkeys(host for name in ordered for host in self.groups[name].hosts))


class _GroupHosts(Mapping):
    """``groups`` in a template: each group's hosts in Ansible's order, worked out when read."""

    def __init__(self, inventory: Inventory):
        self.inventory = inventory

    def __getitem__(self, group: str) -> list[str]:
        if group not in self.inventory.groups:
            raise KeyError(group)
        return self.inventory._group_hosts(group)

    def __iter__(self) -> Iterator[str]:
        return iter(self.inventory.groups)

    def __len__(self) -> int:
        return len(self.inventory.groups)


class _HostsVars(Mapping):
    """Every host's vars as written, by host name, without copying them."""

    def __init__(self, hosts: Mapping[str, Host]):
        self.hosts = hosts

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        return self.hosts[name].vars

    def __iter__(self) -> Iterator[str]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)


@dataclass(frozen=True)
class Selection:
    """The hosts a pattern picks, in order, and the warnings Ansible would print on the way."""
    hosts: tuple[Host, ...]
    warnings: tuple[str, ...] = ()


def load_inventory(sources: str | Path | Sequence[str | Path], vault: Vault | None = None) -> Inventory:
    """Read and check one or more inventory sources, as ``ansible-inventory -i A -i B`` would.

    A source is a YAML or INI file (told apart as Ansible does) or a directory of them; the
    ``group_vars/`` and ``host_vars/`` beside each source are merged into its hosts' vars. With *vault*'s
    passwords, vault-encrypted files and ``!vault`` values are decrypted (see vault.py); without, an encrypted
    file is an error and a ``!vault`` value stays :class:`Vaulted`.
    """
    paths = [Path(sources)] if isinstance(sources, (str, Path)) else [Path(source) for source in sources]
    if not paths:
        raise InventoryError("no inventory given", fix="name an inventory file or directory")
    listings: list[_Listing] = []
    for path in paths:
        if not path.exists():
            raise InventoryError(f"{path}: no such inventory file", fix="check the path given with -i")
        files = _source_files(path)
        if not files:
            raise InventoryError(f"{path}: the inventory directory has no inventory file",
                                 fix="put YAML or INI inventory files in it")
        for file in files:
            known = {item.name for item in listings if item.kind == "group"}
            found = _read_source(file, known, vault)
            if not found:  # Ansible lists nothing, silently; a command meant for a fleet must not
                raise InventoryError(f"{file}: the inventory is empty", fix="list hosts under 'all:' / 'hosts:'")
            listings += found
    # As Ansible's host_group_vars: a directory source is its own base, a file's base is its directory.
    bases = tuple(path if path.is_dir() else path.parent for path in paths)
    return _assemble(paths[0], _expanded(listings), bases, vault)


# Ansible's INVENTORY_IGNORE_EXTS (REJECT_EXTS plus .orig, .cfg, .retry) and the names it always skips.
_IGNORED = re.compile(r"^\.|^host_vars$|^group_vars$|^vars_plugins$|"
                      r"(\.pyc|\.pyo|\.swp|\.bak|~|\.rpm|\.md|\.txt|\.rst|\.orig|\.cfg|\.retry)$")
_YAML_EXTS = ("", ".yml", ".yaml", ".json")
_EXPORT = "write a static one with 'ansible-inventory -i {0} --list -y --export > inv.yml' and give fleetctl that"


def _source_files(path: Path) -> list[Path]:
    """The files one source stands for: itself, or a directory's files in name order, as Ansible walks it."""
    if not path.is_dir():
        return [path]
    return [file for entry in sorted(path.iterdir(), key=lambda entry: entry.name) if not _IGNORED.search(entry.name)
            for file in _source_files(entry)]


def _read_source(path: Path, known: set[str], vault: Vault | None = None) -> list[_Listing]:
    """One file's listings: YAML where Ansible's yaml plugin takes it, else (or when that fails) INI."""
    text = _read_text(path, vault)
    if text.startswith("#!"):
        raise InventoryError(f"{path}: this is an inventory script, which fleetctl does not run",
                             fix=_EXPORT.format(path))
    if path.suffix == ".toml":
        raise InventoryError(f"{path}: TOML inventories are not read by fleetctl", fix=_EXPORT.format(path))
    if path.suffix not in _YAML_EXTS:
        return _ini_listings(path, text, known)
    try:
        return _yaml_listings(path, text, vault)
    except _NotYamlInventory as not_yaml:  # Ansible hands a file its yaml plugin rejects to the ini plugin
        try:
            return _ini_listings(path, text, known)
        except InventoryError:
            # Neither reads it: show the YAML error where the file was meant as YAML.
            if not_yaml.error and (path.suffix or _looks_yaml(text)):
                raise not_yaml.error from None
            raise


def _looks_yaml(text: str) -> bool:
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip()[0] not in "#;"]
    return bool(lines) and (lines[0] == "---" or lines[0].endswith(":"))


class _NotYamlInventory(Exception):
    """The text is not a YAML mapping, so not a YAML inventory: a file for the INI reader."""
    def __init__(self, error: InventoryError | None = None):
        super().__init__(str(error))
        self.error = error


def _read_text(path: Path, vault: Vault | None = None, decrypt: bool = True) -> str:
    """A file's text; a vault-encrypted one's plaintext (VaultError where no password opens it)."""
    try:
        text = path.read_text(encoding="utf-8")
        return _opened(text, path, vault) if decrypt else text
    except FileNotFoundError:
        raise InventoryError(f"{path}: no such inventory file", fix="check the path given with -i") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise InventoryError(f"{path}: cannot read the inventory: {reason}", fix="give a UTF-8 YAML file") from None


def _yaml_listings(path: Path, text: str, vault: Vault | None = None) -> list[_Listing]:
    """A YAML file's listings; _NotYamlInventory where the text is not a YAML mapping at all."""
    try:
        loader = _loader(text, path, vault)
        root = loader.get_single_node()
    except yaml.YAMLError as error:
        raise _NotYamlInventory(_yaml_error(path, error)) from None
    if not isinstance(root, MappingNode):
        raise _NotYamlInventory()
    try:
        check_yaml_expansion(root, str(path), InventoryError)
        return list(_walk(_Source(path, loader), root))
    except yaml.YAMLError as error:
        raise _yaml_error(path, error) from None


def _yaml_error(path: Path, error: yaml.YAMLError) -> InventoryError:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = ", ".join(part for part in (error.context, error.problem) if part)
        return InventoryError(f"{where}: YAML error: {problem}", fix="check indentation and quoting there")
    return InventoryError(f"{path}: YAML error: {error}", fix="fix the YAML")


def _ini_listings(path: Path, text: str, known: set[str]) -> list[_Listing]:
    listings = []
    for entry in parse_ini(path, text, known):
        values = _bytes_unsafe(entry.vars)
        if entry.kind == "group":
            listings.append(_Listing("group", entry.name, entry.parent, values, entry.line, path))
        else:
            listings += _host_listings(path, entry.line, entry.name, values, entry.parent)
    return listings


def _bytes_unsafe(value: Any) -> Any:
    """An INI b'...' literal: Ansible keeps its text but never templates it."""
    if isinstance(value, bytes):
        return Unsafe(value.decode("utf-8", "surrogateescape"))
    if isinstance(value, dict):
        return {key: _bytes_unsafe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_bytes_unsafe(item) for item in value]
    return value


# libyaml's parser where PyYAML was built with it: it composes the same nodes, marks included, about
# ten times faster, which is most of the time a 5,000-host inventory takes to load.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """PyYAML's safe loader plus the tags Ansible allows in inventories; ``!vault`` values decrypted with
    the loader's vault where it has passwords."""
    vault: Vault | None = None
    where: str = ""
    yaml_constructors = {
        **yaml.SafeLoader.yaml_constructors,
        "!vault": lambda loader, node: _vault_value(loader, loader.construct_scalar(node)),
        "!unsafe": lambda loader, node: Unsafe(loader.construct_scalar(node)),
    }


def _loader(text: str, path: Path, vault: Vault | None) -> _Loader:
    loader = _Loader(text)
    loader.vault, loader.where = vault, str(path)
    return loader


def _vault_value(loader: _Loader, ciphertext: str) -> Vaulted | VaultText:
    if loader.vault is None or not loader.vault.secrets:
        return Vaulted(ciphertext)
    return VaultText(loader.vault.decrypt(ciphertext, f"{loader.where}: a !vault value"), ciphertext)


@dataclass(frozen=True)
class _Source:
    """The YAML file read node by node, so that every problem can name its line."""
    path: Path
    loader: _Loader

    def error(self, node: Node, message: str, fix: str) -> InventoryError:
        return InventoryError(f"{self.path}:{node.start_mark.line + 1}: {message}", fix=fix)

    def mapping(self, node: Node | None, what: str, shorthand: bool = False) -> dict[Any, tuple[Node, Node | None]]:
        """A mapping's entries as key -> (key node, value node); null reads as empty, as in Ansible."""
        if node is None or node.tag == "tag:yaml.org,2002:null":
            return {}
        if shorthand and node.tag == "tag:yaml.org,2002:str":  # Ansible reads `hosts: gpu01` as one entry
            return {node.value: (node, None)}
        if isinstance(node, SequenceNode):
            raise self.error(node, f"{what} must be a mapping, found a list", fix="write 'name:' lines, not '- name'")
        if not isinstance(node, MappingNode):
            raise self.error(node, f"{what} must be a mapping, found '{node.value}'",
                             fix="indent 'key: value' lines beneath it")
        self.loader.flatten_mapping(node)  # resolves `<<:` merge keys
        entries = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise self.error(key_node, f"{what} has a list or mapping as a key", fix="use plain names as keys")
            entries[key] = (key_node, value_node)
        return entries

    def values(self, node: Node | None, what: str, shorthand: bool = False) -> dict[Any, Any]:
        return {key: None if value is None else self.loader.construct_object(value, deep=True)
                for key, (_, value) in self.mapping(node, what, shorthand).items()}


@dataclass(frozen=True)
class _Listing:
    """One place the file names a group or a host: under which group, with which vars, on which line."""
    kind: str  # "group" or "host"
    name: str
    parent: str | None  # None for a top-level group
    vars: Mapping[str, Any]
    line: int
    file: Path | None = None  # which source, when there are several


def _walk(source: _Source, root: Node | None) -> Iterator[_Listing]:
    top = source.mapping(root, "the inventory")
    if not top:
        raise InventoryError(f"{source.path}: the inventory is empty", fix="list hosts under 'all:' / 'hosts:'")
    if "plugin" in top:
        raise InventoryError(f"{source.path}: this is an inventory plugin config (key 'plugin'), "
                             f"for {top['plugin'][1].value}, which fleetctl does not run",
                             fix=_EXPORT.format(source.path))
    for name, (key_node, node) in top.items():
        yield from _walk_group(source, name, key_node, node, None)


def _walk_group(source: _Source, name: Any, key_node: Node, node: Node | None,
                parent: str | None) -> Iterator[_Listing]:
    if not isinstance(name, str) or not name:
        raise source.error(key_node, f"group name {name!r} is not a name", fix="quote it or rename the group")
    what = f"group '{name}'"
    sections = source.mapping(node, what)
    for key, (section_key, _) in sections.items():
        if key not in ("hosts", "children", "vars"):
            raise source.error(section_key, f"unknown key '{key}' in {what}", fix="use 'hosts', 'children' or 'vars'")
    group_vars = source.values(sections.get("vars", (None, None))[1], f"'vars' of {what}", shorthand=True)
    yield _Listing("group", name, parent, group_vars, key_node.start_mark.line + 1, source.path)
    # hosts and children in file order: it becomes the order of hosts and groups
    for key, (_, section) in sections.items():
        entries = {} if key == "vars" else source.mapping(section, f"'{key}' of {what}", shorthand=True)
        for entry, (entry_key, entry_node) in entries.items():
            walk = _walk_group if key == "children" else _walk_host
            yield from walk(source, entry, entry_key, entry_node, name)


_HOSTPORT = re.compile(r"^\[(.+)\]:([0-9]+)$|^((?:[^:\[\]]|\[[^\]]*\])*):([0-9]+)$")  # [v6addr]:port, name:port


def _walk_host(source: _Source, entry: Any, key_node: Node, node: Node | None, group: str) -> Iterator[_Listing]:
    if not isinstance(entry, str) or not entry:
        raise source.error(key_node, f"host name {entry!r} in group '{group}' is not a name", fix="quote it")
    host_vars = source.values(node, f"host '{entry}'")
    yield from _host_listings(source.path, key_node.start_mark.line + 1, entry, host_vars, group)


def _host_listings(path: Path, line: int, entry: str, host_vars: dict[str, Any], group: str) -> list[_Listing]:
    """One host entry, YAML key or INI line: its port taken out, its range expanded."""
    match = _HOSTPORT.match(entry)
    if match:  # a port in the key is the host's ansible_port, unless its own vars say otherwise
        entry, host_vars = match[1] or match[3], {"ansible_port": int(match[2] or match[4]), **host_vars}
    count = _range_size(entry)
    if count > MAX_RANGE_HOSTS:
        raise InventoryError(f"{path}:{line}: host range '{entry}' names {count:,} hosts, more than the "
                             f"{MAX_RANGE_HOSTS:,} one entry may",
                             fix=f"split it into entries of at most {MAX_RANGE_HOSTS:,} hosts each")
    # Left unexpanded ("range") until the whole inventory's hosts are counted (_expanded).
    return [_Listing("range" if "[" in entry else "host", entry, group, host_vars, line, path)]


def _expanded(listings: list[_Listing]) -> list[_Listing]:
    """Every range listing as its hosts, once the whole inventory's count (every source) is within
    MAX_INVENTORY_HOSTS: a hundred entries of 10,000 each would otherwise expand for minutes."""
    ranges = [item for item in listings if item.kind == "range"]
    total = sum(_range_size(item.name) for item in ranges) + sum(item.kind == "host" for item in listings)
    if total > MAX_INVENTORY_HOSTS:
        where = ranges[0].file if ranges else None
        raise InventoryError(f"{where}: the inventory names {total:,} hosts, more than the {MAX_INVENTORY_HOSTS:,} "
                             "one fleetctl run may", fix="split the fleet into several inventories")
    if not ranges:
        return listings
    out = []
    for item in listings:
        if item.kind != "range":
            out.append(item)
            continue
        try:
            hosts = _expand_range(item.name)
        except ValueError:
            raise InventoryError(f"{item.file}:{item.line}: host range in '{item.name}' is not valid",
                                 fix="write ranges as [01:16], [a:f] or [0:10:2], both ends padded alike") from None
        out += [replace(item, kind="host", name=host) for host in hosts]
    return out


# One inventory entry expands to at most this many hosts: gpu[0:999999] would otherwise take hours
# to load (and every --limit after it), for what is surely a typo.
MAX_RANGE_HOSTS = 10_000
# A whole inventory (all its sources) at most this many: ten times the largest fleet measured
# (README, the benchmark's 1,000 hosts) and then some; counted before any range is expanded.
MAX_INVENTORY_HOSTS = 100_000


def _range_size(name: str) -> int:
    """How many hosts *name* expands to, counted without expanding it (0 where a range is not valid:
    _expand_range says why)."""
    total = 1
    while "[" in name:
        _, _, rest = name.partition("[")
        spec, closed, name = rest.partition("]")
        bounds = spec.split(":")
        try:
            start, end, step = bounds[0] or "0", bounds[1], int(bounds[2]) if len(bounds) == 3 else 1
            if start in string.ascii_letters and end in string.ascii_letters:
                first, last = string.ascii_letters.index(start), string.ascii_letters.index(end)
                total *= len(string.ascii_letters[first:last + 1:step])
            else:
                total *= len(range(int(start), int(end) + 1, step))
        except (IndexError, ValueError):
            return 0
    return total


def _expand_range(name: str) -> list[str]:
    """Expand the first [start:end(:step)] in a name, ends included, then the rest, as Ansible does."""
    if "[" not in name:
        return [name]
    head, _, rest = name.partition("[")
    spec, closed, tail = rest.partition("]")
    bounds = spec.split(":")
    if not closed or len(bounds) not in (2, 3) or not bounds[1]:
        raise ValueError(name)
    start, end, step = bounds[0] or "0", bounds[1], int(bounds[2]) if len(bounds) == 3 else 1
    if start in string.ascii_letters and end in string.ascii_letters:
        first, last = string.ascii_letters.index(start), string.ascii_letters.index(end)
        if first > last:
            raise ValueError(name)
        items = list(string.ascii_letters[first:last + 1:step])
    else:  # numbers, zero-padded to the start's width when it has a leading zero
        width = len(start) if start.startswith("0") and len(start) > 1 else 0
        if width and len(end) != width:
            raise ValueError(name)
        items = [str(number).zfill(width) for number in range(int(start), int(end) + 1, step)]
    return [host for item in items for host in _expand_range(head + item + tail)]


@dataclass
class _Draft:
    """A group while the file is still being read. Names are dict keys: ordered, and found without a scan."""
    hosts: dict[str, None] = field(default_factory=dict)
    children: dict[str, None] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)


def _assemble(path: Path, listings: list[_Listing], bases: tuple[Path, ...] = (),
              vault: Vault | None = None) -> Inventory:
    """Merge each host's vars in Ansible's order, check them, and freeze the result.

    The order is Ansible's: all's inventory vars, group_vars/all, the other groups' inventory vars
    (shallowest first), their group_vars/ files in the same order, the host's inventory vars, then
    host_vars/. Each later one replaces a whole top-level key, as Ansible's default 'replace' does.
    """
    drafts, host_vars = _collect(path, listings)
    files = _VarsFiles(bases, vault)
    parents: dict[str, list[str]] = {name: [] for name in drafts}
    for name, draft in drafts.items():
        for child in draft.children:
            parents[child].append(name)
    depths = _depths(path, parents)
    # Ansible consumes ansible_group_priority for ordering: it never becomes a host's variable.
    priorities = {name: _priority(path, name, draft.vars.pop("ansible_group_priority", 1))
                  for name, draft in drafts.items()}
    member_of: dict[str, set[str]] = {host: set() for host in host_vars}
    for name, draft in drafts.items():
        for host in draft.hosts:
            member_of[host].add(name)
    # Hosts in the same groups share their group order and group vars: work each set of groups out once.
    shared: dict[frozenset[str], tuple[tuple[str, ...], dict[str, Any]]] = {}
    hosts = {}
    for host, own_vars in host_vars.items():
        key = frozenset(member_of[host])
        if key not in shared:
            in_order = tuple(sorted(_with_ancestors(set(key), parents), key=lambda g: (depths[g], priorities[g], g)))
            group_vars = {**drafts["all"].vars, **files.groups(["all"])}
            group_vars.update(item for group in in_order[1:] for item in drafts[group].vars.items())
            shared[key] = in_order, group_vars | files.groups(list(in_order[1:]))
        in_order, group_vars = shared[key]
        merged = group_vars | own_vars | files.host(host)
        _check_connection(path, host, merged)
        hosts[host] = Host(host, MappingProxyType(merged), in_order)
    groups = {name: Group(name, tuple(draft.hosts), tuple(draft.children), MappingProxyType(draft.vars))
              for name, draft in drafts.items()}
    return Inventory(path, MappingProxyType(hosts), MappingProxyType(groups))


class _VarsFiles:
    """The group_vars/ and host_vars/ beside each inventory source, each file read once."""

    def __init__(self, bases: tuple[Path, ...], vault: Vault | None = None):
        self.bases, self.vault = tuple(dict.fromkeys(bases)), vault
        self.cache: dict[tuple[Path, str], dict[str, Any]] = {}

    def groups(self, names: list[str]) -> dict[str, Any]:
        # As Ansible's vars plugins: source by source, and within one source group by group.
        return {key: value for base in self.bases for name in names
                for key, value in self._entity(base / "group_vars", name).items()}

    def host(self, name: str) -> dict[str, Any]:
        return {key: value for base in self.bases for key, value in self._entity(base / "host_vars", name).items()}

    def _entity(self, folder: Path, name: str) -> dict[str, Any]:
        # Cached per group and host: every host of a 5,000-host group asks for the same files.
        if (folder, name) not in self.cache:
            files = _vars_files(folder, name) if folder.is_dir() else []
            self.cache[folder, name] = {key: value for file in files
                                        for key, value in _read_vars(file, self.vault).items()}
        return self.cache[folder, name]


def _vars_files(folder: Path, name: str) -> list[Path]:
    """Ansible's find_vars_files: NAME, NAME.yml, NAME.yaml or NAME.json, the first that exists; a
    directory stands for its files (recursively, in name order, hidden and backup~ files skipped)."""
    for ext in _YAML_EXTS:
        candidate = folder / (name + ext)
        if candidate.is_dir():
            return _dir_vars_files(candidate)
        if candidate.exists():
            return [candidate]
    return []


def _dir_vars_files(folder: Path) -> list[Path]:
    found = []
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        if entry.name.startswith(".") or entry.name.endswith("~"):
            continue
        if entry.is_dir():
            found += _dir_vars_files(entry)
        elif entry.suffix in _YAML_EXTS:
            found.append(entry)
    return found


def _opened(text: str, path: Path, vault: Vault | None) -> str:
    return (vault or Vault()).decrypt(text, str(path)) if is_vault(text) else text


def _read_vars(path: Path, vault: Vault | None = None) -> dict[str, Any]:
    raw = _read_text(path, decrypt=False)
    text = _opened(raw, path, vault)
    try:
        loader = _loader(text, path, vault)
        root = loader.get_single_node()
        check_yaml_expansion(root, str(path), InventoryError)
        values = _Source(path, loader).values(root, f"the vars file {path.name}")
        return _secret_strings(values) if is_vault(raw) else values
    except yaml.YAMLError as error:
        raise _yaml_error(path, error) from None


def _collect(path: Path, listings: list[_Listing]) -> tuple[dict[str, _Draft], dict[str, dict[str, Any]]]:
    """Fold the listings into groups and each host's own vars, then link groups as Ansible's reconcile does."""
    drafts = {"all": _Draft(children={"ungrouped": None}), "ungrouped": _Draft()}
    host_vars: dict[str, dict[str, Any]] = {}
    addresses: dict[tuple[str, str], tuple[str, Any]] = {}
    for item in listings:
        if item.kind == "group":
            drafts.setdefault(item.name, _Draft()).vars.update(item.vars)
            if item.parent:
                drafts[item.parent].children.setdefault(item.name)
        else:
            _check_address(path, item, addresses)
            host_vars.setdefault(item.name, {}).update(item.vars)
            drafts[item.parent].hosts.setdefault(item.name)
    has_parent = {child for draft in drafts.values() for child in draft.children}
    drafts["all"].children.update(dict.fromkeys(name for name in drafts if name != "all" and name not in has_parent))
    # 'ungrouped' keeps the hosts in no group but all/ungrouped: those listed under it first.
    grouped = {host for name, draft in drafts.items() if name not in ("all", "ungrouped") for host in draft.hosts}
    drafts["ungrouped"].hosts = dict.fromkeys(host for host in [*drafts["ungrouped"].hosts, *host_vars]
                                              if host not in grouped)
    return drafts, host_vars


def _check_address(path: Path, item: _Listing, seen: dict[tuple[str, str], tuple[str, Any]]) -> None:
    # Ansible lets the later listing win silently; a host reached at two addresses is a mistake.
    for key in ("ansible_host", "ansible_port"):
        if key in item.vars:
            group, value = seen.setdefault((item.name, key), (item.parent, item.vars[key]))
            if str(value) != str(item.vars[key]):
                raise InventoryError(f"{item.file or path}:{item.line}: host '{item.name}' has {key} "
                                     f"'{item.vars[key]}' in group "
                                     f"'{item.parent}' but '{value}' in group '{group}'", fix=f"set {key} in one group")


def _depths(path: Path, parents: Mapping[str, list[str]]) -> dict[str, int]:
    """Each group's depth: its longest chain of parents up to 'all', which is how Ansible ranks vars."""
    depths: dict[str, int] = {}

    def depth(name: str, below: tuple[str, ...]) -> int:
        if name in below:
            loop = " > ".join((*below[below.index(name):], name))
            raise InventoryError(f"{path}: group '{name}' is inside itself ({loop})",
                                 fix="break the loop of 'children'")
        if name not in depths:
            depths[name] = 1 + max((depth(parent, (*below, name)) for parent in parents[name]), default=-1)
        return depths[name]

    for name in parents:
        depth(name, ())
    return depths


def _priority(path: Path, group: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InventoryError(f"{path}: group '{group}' has ansible_group_priority '{value}'",
                             fix="make it a whole number") from None


def _with_ancestors(groups: set[str], parents: Mapping[str, list[str]]) -> set[str]:
    return groups.union(*(_with_ancestors(set(parents[group]), parents) for group in groups))


def _check_connection(path: Path, host: str, host_vars: Mapping[str, Any]) -> None:
    connection = host_vars.get("ansible_connection", "ssh")
    if not isinstance(connection, str) or connection not in CONNECTIONS:
        raise InventoryError(f"{path}: host '{host}' has ansible_connection '{connection}'",
                             fix="fleetctl connects with " + ", ".join(sorted(CONNECTIONS)))


def _split_patterns(limit: str) -> list[str]:
    """Split on commas, or on colons and spaces for the older `a:b:!c` form, keeping [x:y] whole."""
    # Ansible's own splitter drops an unclosed '[' without a word; this one leaves it for _match to refuse.
    parts = limit.split(",") if "," in limit else re.split(r"[\s:]+(?![^\[]*\])", limit)
    return [part.strip() for part in parts if part.strip()]


def _limit_file_lines(parts: list[str]) -> list[str]:
    """``@file`` parts of a limit replaced by the file's lines, one pattern each, as Ansible reads them."""
    patterns = []
    for part in parts:
        if not part.startswith("@"):
            patterns.append(part)
            continue
        try:
            lines = Path(part[1:]).read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise InventoryError(f"--limit {part}: cannot read the limit file: {reason}",
                                 fix="name a file with one host or pattern a line") from None
        patterns += [line.strip() for line in lines if line.strip()]
    return patterns


_SUBSCRIPT = re.compile(r"^(.+)\[(?:(-?[0-9]+)|([0-9]+)[:-]([0-9]*))\]$")


def _split_subscript(pattern: str) -> tuple[str, tuple[int, int | None] | None]:
    """`gpu[0]`, `gpu[-1]`, `gpu[2:5]`, `gpu[2:]`: a position or an inclusive range, as Ansible reads it."""
    match = None if pattern.startswith("~") else _SUBSCRIPT.match(pattern)
    if not match:
        return pattern, None
    expr, index, start, end = match.groups()
    if index is not None:
        return expr, (int(index), None)
    return expr, (int(start), int(end) if end else -1)


def _apply_subscript(hosts: list[str], position: tuple[int, int | None]) -> list[str]:
    """Ansible's subscript: [n] one host (IndexError past the end), [a:b] a slice with b included,
    [a:] to the end, and [a:0] just [a]."""
    start, end = position
    if end:
        return hosts[start:(len(hosts) - 1 if end == -1 else end) + 1]
    return [hosts[start]]


def _no_match(limit: str, path: Path) -> InventoryError:
    return InventoryError(f"--limit '{limit}' leaves no host to target in {path}",
                          fix="check it against the host and group names: fleetctl inventory INV --list-hosts")


def _secret_strings(value: Any) -> Any:
    """The values of a vault-encrypted vars file, each string a VaultText (masked wherever printed)."""
    if isinstance(value, str) and not isinstance(value, VaultText):
        return VaultText(value)
    if isinstance(value, dict):
        return {key: _secret_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_secret_strings(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    """A variable as Ansible's ``--list`` JSON shows it; a string decrypted from a vault file as ``***``."""
    if isinstance(value, Vaulted):
        return {"__ansible_vault": value.ciphertext}
    if isinstance(value, VaultText):
        return {"__ansible_vault": value.ciphertext} if value.ciphertext else MASK
    if isinstance(value, Unsafe):
        return {"__ansible_unsafe": str(value)}
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, Mapping):  # JSON object keys are strings: 1 becomes "1", True becomes "true"
        return {key if isinstance(key, str) else json.dumps(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
