"""Playbooks: what a host should end up with and which steps run, as Ansible-style YAML.

A playbook is a list of plays. A play names its hosts (an inventory pattern), its
vars (fleet_* request vars and anything else, templated with jinja2 against each
host's inventory vars), its steps, and the settings of the validate and smoke
steps. Unknown keys or step names are a PlaybookError naming the file and key,
raised before any host is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import jinja2
import yaml

from fleetctl.errors import PlaybookError
from fleetctl.records import safe_load_yaml

STEPS = ("check", "packages", "install", "verify", "model", "validate", "smoke", "activate", "service")
PLAY_KEYS = {"name", "hosts", "vars", "steps", "validate", "smoke", "install", "service"}
SETTINGS = {
    "validate": {"tolerance": 0.02, "timeout": 900},
    "smoke": {"model": "", "max_tokens": 8, "port": 0, "timeout": 600},
    "install": {"wheelhouse": "", "no_deps": False, "extra_packages": [], "min_free_gib": 0, "timeout": 1800,
                # container mode: the serving container's name (its compose project and unit too); a CA bundle on
                # the host that pip trusts in image builds; a registry mirror for Docker Hub images; an image
                # tarball on the controller, pushed and loaded instead of a pull (air-gapped hosts)
                "container_name": "{{ fleet_container_name | default('fleetctl-vllm') }}",
                "container_ca_bundle": "{{ fleet_container_ca_bundle | default('') }}",
                "container_mirror": "{{ fleet_container_mirror | default('') }}",
                "image_tarball": "{{ fleet_container_image_tarball | default('') }}"},
    "service": {"port": "{{ fleet_service_port | default(8000) }}", "model": "", "timeout": 600},
}
DEFAULT = "default.yml"


@dataclass(frozen=True)
class Play:
    name: str
    hosts: str
    vars: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[str, ...] = STEPS
    validate: Mapping[str, Any] = field(default_factory=dict)
    smoke: Mapping[str, Any] = field(default_factory=dict)
    install: Mapping[str, Any] = field(default_factory=dict)
    service: Mapping[str, Any] = field(default_factory=dict)

    def for_host(self, hostvars: Mapping[str, Any]) -> Play:
        """This play with every string templated against the host's inventory vars and the play's vars
        (play vars win over inventory vars, as in Ansible)."""
        context = {**hostvars, **self.vars}
        render = _renderer(context, self.name)
        return Play(self.name, self.hosts, render(dict(self.vars)), self.steps, render(dict(self.validate)),
                    render(dict(self.smoke)), render(dict(self.install)), render(dict(self.service)))

    def hostvars(self, hostvars: Mapping[str, Any]) -> dict:
        """Inventory vars overlaid with the play's (templated) vars: what the resolver reads."""
        return {**hostvars, **self.for_host(hostvars).vars}


def _renderer(context: dict, play: str):
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)

    def render(value):
        if isinstance(value, str) and "{" in value:
            try:
                return env.from_string(value).render(context)
            except jinja2.TemplateError as exc:
                raise PlaybookError(f"play {play!r}: cannot template {value!r}: {exc}") from None
        if isinstance(value, dict):
            return {k: render(v) for k, v in value.items()}
        if isinstance(value, list):
            return [render(v) for v in value]
        return value

    return render


def load_playbook(path: str | Path | None = None) -> tuple[Path, list[Play]]:
    """The plays of *path*, or of the built-in default playbook."""
    path = Path(path) if path else Path(str(resources.files("fleetctl").joinpath("playbooks", DEFAULT)))
    try:
        data = safe_load_yaml(path.read_text(), str(path), PlaybookError)
    except OSError as exc:
        raise PlaybookError(f"{path}: cannot read the playbook: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PlaybookError(f"{path}: cannot read the playbook: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PlaybookError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML",
                            fix="check the indentation and quoting there") from None
    if not isinstance(data, list) or not data:
        raise PlaybookError(f"{path}: a playbook is a list of plays", fix="start each play with '- name:'")
    return path, [_play(path, i, raw) for i, raw in enumerate(data)]


def _play(path: Path, index: int, raw) -> Play:
    where = f"{path}: play {index + 1}"
    if not isinstance(raw, dict):
        raise PlaybookError(f"{where} is not a mapping")
    if unknown := set(raw) - PLAY_KEYS:
        raise PlaybookError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                            fix=f"a play takes {', '.join(sorted(PLAY_KEYS))}")
    steps = raw.get("steps", list(STEPS))
    if not isinstance(steps, list) or (bad := [s for s in steps if s not in STEPS]):
        raise PlaybookError(f"{where}: unknown step(s) {', '.join(map(str, bad)) if isinstance(steps, list) else steps}",
                            fix=f"steps are {', '.join(STEPS)}")
    settings = {}
    for section, defaults in SETTINGS.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise PlaybookError(f"{where}: {section} must be a mapping")
        if unknown := set(given) - set(defaults):
            raise PlaybookError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} under {section}",
                                fix=f"{section} takes {', '.join(defaults)}")
        settings[section] = {**defaults, **given}
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        raise PlaybookError(f"{where}: vars must be a mapping")
    if "install" in steps:  # install cannot run without the host packages it needs (nothing where none lacks)
        steps = [*steps, "packages"]
    return Play(str(raw.get("name", f"play {index + 1}")), str(raw.get("hosts", "all")), variables,
                tuple(s for s in STEPS if s in steps), **settings)
