"""Jinja in inventory values, templated as Ansible templates them: when a value is used.

An inventory may write ``ansible_host: "{{ hostvars['bastion'].ip }}"`` or ``"{{ inventory_hostname }}"``.
Ansible keeps such values as written (``ansible-inventory --list`` shows them so) and templates them
when a task reads them. fleetctl does the same for what it reads: :func:`host_vars` wraps a host's
vars in a mapping that templates the connection settings and the ``fleet_*`` vars on access; any var
those refer to is templated in turn. In scope: the host's own vars, ``hostvars``, ``groups``,
``group_names``, ``inventory_hostname``, ``inventory_hostname_short`` and ``ansible_playbook_python``.

The environment is jinja2's immutable sandbox with its own filters and tests only: Ansible's filters,
lookups and facts are not there, and a template that needs them (or names anything undefined, or
refers to itself) is one ``InventoryError`` naming the host and the var. Only plain ``str`` values
are templates: ``!unsafe`` strings and ``!vault`` values reach the host verbatim.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fleetctl.errors import InventoryError

__all__ = ["TEMPLATED", "host_vars"]

# The vars fleetctl itself reads (connection.py, serving, the playbook's request); the rest of a
# host's vars are handed on as written, since fleetctl never uses them.
TEMPLATED = frozenset({
    "ansible_host", "ansible_port", "ansible_user", "ansible_password", "ansible_ssh_pass",
    "ansible_ssh_private_key_file", "ansible_private_key_file", "ansible_host_key_checking",
    "ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_python_interpreter",
    "ansible_become", "ansible_become_method", "ansible_become_user", "ansible_become_password",
    "ansible_become_pass", "ansible_become_flags",
})


_MAGIC = frozenset({"inventory_hostname", "inventory_hostname_short", "group_names", "groups", "hostvars",
                    "ansible_playbook_python"})


@functools.cache
def _jinja():
    """jinja2 and the sandbox, made on the first template: most inventories have none, and
    importing jinja2 costs about what loading a thousand-host inventory does."""
    import jinja2
    import jinja2.sandbox
    from jinja2.nativetypes import NativeCodeGenerator, native_concat

    class Environment(jinja2.sandbox.ImmutableSandboxedEnvironment):
        """The sandbox, returning native values as Ansible does: ``"{{ 2222 }}"`` is the number 2222."""
        code_generator_class = NativeCodeGenerator
        concat = staticmethod(native_concat)

    return jinja2, Environment(undefined=jinja2.StrictUndefined, autoescape=False)


def is_template(value: Any) -> bool:
    """A plain string with Jinja in it (``Unsafe`` is a str subclass, and so never one)."""
    return type(value) is str and ("{{" in value or "{%" in value)


def _used(key: str) -> bool:
    return key in TEMPLATED or key.startswith("fleet_")


def host_vars(name: str, raw: Mapping[str, Mapping[str, Any]], groups: Mapping[str, list[str]],
              group_names: Callable[[str], list[str]], used: Callable[[str], bool] = _used) -> Mapping[str, Any]:
    """Host *name*'s vars with the *used* ones templated on access. *raw* is every host's vars as
    written, *groups* each group's hosts, *group_names* a host's groups as Ansible's group_names."""
    return _HostVars(_Scope(raw, groups, group_names), name, used)


class _Scope:
    """What every template sees: all hosts' vars, the groups, and the vars being templated now."""

    def __init__(self, raw: Mapping[str, Mapping[str, Any]], groups: Mapping[str, list[str]],
                 group_names: Callable[[str], list[str]]):
        self.raw, self.groups, self.group_names = raw, groups, group_names
        self.busy: list[tuple[str, str]] = []  # (host, var) being templated, to tell a loop


class _HostVars(Mapping):
    """One host's vars, templated on access: those *used* when read from outside, all of them from
    inside a template (where a name is looked up because a template needs it)."""

    def __init__(self, scope: _Scope, name: str, used: Callable[[str], bool] = lambda key: True):
        self.scope, self.name, self.used = scope, name, used

    def _magic(self, key: str) -> Any:
        """Ansible's magic vars fleetctl knows; KeyError for any other name."""
        magic = {"inventory_hostname": lambda: self.name,
                 "inventory_hostname_short": lambda: self.name.split(".")[0],
                 "group_names": lambda: self.scope.group_names(self.name),
                 "groups": lambda: self.scope.groups,
                 "hostvars": lambda: _AllHosts(self.scope),
                 "ansible_playbook_python": lambda: sys.executable}
        return magic[key]()

    def __contains__(self, key: object) -> bool:  # without templating: jinja asks before it reads
        return key in self.scope.raw[self.name] or key in _MAGIC

    def __getitem__(self, key: str) -> Any:
        if key in self.scope.raw[self.name]:
            value = self.scope.raw[self.name][key]
            return _render(self, key, value) if self.used(key) else value
        return self._magic(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.scope.raw[self.name])

    def __len__(self) -> int:
        return len(self.scope.raw[self.name])

    def __repr__(self) -> str:
        return f"<vars of {self.name}>"


class _AllHosts(Mapping):
    """``hostvars``: every host's vars, each templated when a template reads it."""

    def __init__(self, scope: _Scope):
        self.scope = scope

    def __getitem__(self, host: str) -> Mapping[str, Any]:
        if host not in self.scope.raw:
            raise KeyError(host)
        return _HostVars(self.scope, host)

    def __iter__(self) -> Iterator[str]:
        return iter(self.scope.raw)

    def __len__(self) -> int:
        return len(self.scope.raw)


def _render(host: _HostVars, key: str, value: Any) -> Any:
    """*value* with every template in it rendered (into lists and mappings too, as Ansible does)."""
    if isinstance(value, Mapping):
        return {k: _render(host, key, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(host, key, v) for v in value]
    if not is_template(value):
        return value
    where = (host.name, key)
    if where in host.scope.busy:
        loop = " > ".join(f"{var}" for _, var in host.scope.busy[host.scope.busy.index(where):])
        raise _error(host.name, key, value, f"it refers to itself ({loop} > {key})")
    host.scope.busy.append(where)
    jinja2, env = _jinja()
    try:
        template = env.from_string(value)
        # shared=True: names are looked up in the host's vars one by one, so only what is used is templated
        context = template.new_context(_HostVars(host.scope, host.name), shared=True)
        # a lone {{ name }} comes back as an Undefined, not raised: _plain_result raises it
        return _plain_result(env.concat(template.root_render_func(context)))
    except InventoryError:
        raise
    except jinja2.UndefinedError as error:
        raise _error(host.name, key, value, f"{error.message}: fleetctl templates with the host's vars, "
                     "hostvars, groups, group_names and inventory_hostname only") from None
    except jinja2.sandbox.SecurityError as error:
        raise _error(host.name, key, value, f"{error}: the sandbox allows plain values only") from None
    except jinja2.TemplateError as error:
        raise _error(host.name, key, value, str(error.message or error)) from None
    except Exception as error:  # a template's own arithmetic or method call failing
        raise _error(host.name, key, value, f"{type(error).__name__}: {error}") from None
    finally:
        host.scope.busy.pop()


def _plain_result(value: Any) -> Any:
    """A native result as plain data: an undefined inside a list or mapping is an error too."""
    if isinstance(value, _jinja()[0].Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, Mapping) and not isinstance(value, _HostVars):
        return {k: _plain_result(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_result(v) for v in value]
    return value


def _error(host: str, key: str, value: str, why: str) -> InventoryError:
    return InventoryError(f"host '{host}': cannot template {key} {value!r}: {why}",
                          fix="write the value itself, or fix the template")
