"""Moving a host's NVIDIA driver to a branch that runs a CUDA: ``plan_move(facts, cuda, branch, matrix)``, pure.

Facts in, a :class:`DriverMove` out (or None where the host's driver already runs the CUDA, natively or
under the minor-version compatibility the resolver allows): the branch, the kernel-module flavour, the
exact package commands for the host's distribution, the commands that put the previous branch back,
and the reasons for each choice — or a refusal with its fix. Nothing here runs a command.

The rules, in order: ``auto`` takes the oldest branch whose own CUDA is at least the requested one,
that drives every GPU of the host and that NVIDIA still supports (an LTSB or PB before its end of
life; NFBs have none, so only an explicit branch picks one). The flavour follows NVIDIA's guidance
from the host's lowest and highest SM: Blackwell (sm_100 and up) and Grace Hopper need the open
kernel modules, pre-Turing GPUs (below sm_75) the proprietary ones, a host with both is refused;
Turing to Hopper get the branch's default (open from R560). Packages come from the distribution's
own archive where it has the branch (Ubuntu), else NVIDIA's CUDA repository (cuda-drivers-<branch>,
RHEL's nvidia-driver:<branch>-… module streams). Every package is held (apt-mark hold; on RHEL the
module stream holds the branch), so unattended upgrades cannot move the branch.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from datetime import date
from typing import NamedTuple

from packaging.version import Version

from fleetctl.decide.resolve import Request, _compat
from fleetctl.facts.probe import Facts
from fleetctl.hosts.become import facts_privileges
from fleetctl.knowledge.matrix import DriverBranch, Matrix

TURING, BLACKWELL = 75, 100
UBUNTU = {"22.04": "ubuntu-22.04", "24.04": "ubuntu-24.04"}
RHEL_LIKE = ("rhel", "rocky", "almalinux")
SUPPORTED_OS = "Ubuntu 22.04/24.04 and RHEL, Rocky or AlmaLinux 9"
DRIVER_PACKAGES = "'nvidia-*' 'kmod-nvidia*' 'libnvidia*' cuda-drivers"  # what a RHEL rollback syncs back


@dataclass(frozen=True)
class DriverMove:
    """One host's driver move. ``refusal`` (with ``fix``) says why there is none to make."""

    from_version: str | None  # the host's driver now
    branch: str  # "580"
    min_version: str  # the branch's first release that runs the requested CUDA natively
    cuda: str  # the newest CUDA the branch runs natively
    flavor: str | None  # "open" or "proprietary" kernel modules
    distro: str | None  # "ubuntu-22.04", "ubuntu-24.04" or "rhel-9"
    source: str | None  # where the packages come from: the distribution's archive or NVIDIA's CUDA repository
    packages: tuple[str, ...]  # what install puts on the host (RHEL: the module stream first)
    install: tuple[str, ...]  # shell commands, run in order as root
    rollback: tuple[str, ...]  # shell commands that put the previous branch back and hold it
    reasons: tuple[str, ...]
    refusal: str | None = None
    fix: str | None = None
    fabric_manager: tuple[str, ...] = ()  # NVSwitch hosts: nvidia-fabricmanager (and NSCQ) at the driver's version

    @property
    def ok(self) -> bool:
        return self.refusal is None

    @property
    def summary(self) -> str:
        """``535.183.06 → R580 (open)``, or the refusal."""
        if not self.ok:
            return f"refused: {self.refusal}"
        return f"{self.from_version or 'none'} → R{self.branch} ({self.flavor})"

    @classmethod
    def from_json(cls, data: dict) -> DriverMove:
        """A move as a rollout's journal keeps it (:meth:`to_json`)."""
        return cls(data["from"], data["branch"], data["min_version"], data["cuda"], data["flavor"], data["distro"],
                   data["source"], tuple(data["packages"]), tuple(data["install"]), tuple(data["rollback"]),
                   tuple(data["reasons"]), data["refusal"], data["fix"], tuple(data.get("fabric_manager") or ()))

    def to_json(self) -> dict:
        return {"from": self.from_version, "branch": self.branch, "min_version": self.min_version, "cuda": self.cuda,
                "flavor": self.flavor, "distro": self.distro, "source": self.source, "packages": list(self.packages),
                "install": list(self.install), "rollback": list(self.rollback), "reasons": list(self.reasons),
                "refusal": self.refusal, "fix": self.fix, "fabric_manager": list(self.fabric_manager)}


def plan_move(facts: Facts, cuda: str, branch: str, matrix: Matrix, *, cuda_compat: str = "minor",
              today: date | None = None) -> DriverMove | None:
    """The driver move that lets *facts*' host run CUDA *cuda* with *branch* ("auto" or "580"), or None where its
    driver runs it already (under *cuda_compat*); *today* decides which branches NVIDIA still supports."""
    if not facts.gpus:
        return None  # no GPU, no driver to move
    if facts.cuda_driver_version and facts.driver_version and \
            _compat(cuda, facts, Request(cuda_compat=cuda_compat), matrix):
        return None
    month = (today or date.today()).strftime("%Y-%m")
    now = facts.driver_version
    why = [f"driver {now} runs CUDA ≤ {facts.cuda_driver_version}; CUDA {cuda} needs a newer branch" if now
           else f"no working driver reports a CUDA version; CUDA {cuda} needs one"]

    def refuse(target: str, refusal: str, fix: str, row: DriverBranch | None = None) -> DriverMove:
        return DriverMove(now, target, row.min_version if row else "", row.cuda if row else "", None, None, None,
                          (), (), (), tuple(why), refusal, fix)

    if not facts_privileges(facts).system:  # packages, a reboot: root's, and this login cannot become root
        return refuse(branch, f"a driver move needs root: {facts.user} logs in without it and the host does not become "
                              f"root (sudo: {facts.sudo})", "log in as a user with sudo and set ansible_become: true "
                                                            "(or pass -b), or move the driver by hand")
    if any(g.sm is None for g in facts.gpus):
        return refuse(branch, "the driver did not report a compute capability for every GPU",
                      "repair nvidia-smi on the host, or move its driver by hand")
    sms = sorted({g.sm for g in facts.gpus})
    lowest, highest = sms[0], sms[-1]
    distro = distro_key(facts)
    if distro is None:
        return refuse(branch, f"fleetctl knows no driver packages for {facts.os.pretty_name or facts.os.id or 'this OS'}",
                      f"install the driver by hand, or run the host on {SUPPORTED_OS}")
    toolkit = matrix.cuda_row(_minor(cuda))
    if toolkit is not None and not any(s in toolkit.sm for s in sms):
        return refuse(branch, f"CUDA {cuda} builds no code for sm_{lowest}: a newer driver would not let the host "
                      f"run it", "keep this host on its CUDA (leave it out of the move) or replace its GPUs")
    picked = _branch(branch, cuda, sms, matrix, month)
    if isinstance(picked, Refused):
        return refuse(*picked)
    row, row_why = picked
    why.append(row_why)
    flavor, flavor_why = _flavor(facts, lowest, highest, row)
    if flavor is None:
        return refuse(row.branch, flavor_why, "put the pre-Turing and the Blackwell GPUs in different hosts", row)
    why.append(flavor_why)
    picked = _packages(row, distro, flavor)
    if isinstance(picked, str):
        return refuse(row.branch, picked, f"use --driver auto, or install R{row.branch} by hand", row)
    source, packages, source_why = picked
    why.append(source_why)
    rollback, rollback_why = _rollback(facts, distro, lowest, highest, matrix)
    why.append(rollback_why)
    install, fabric = _install(distro, packages), ()
    if facts.health is not None and facts.health.nvswitch:
        fabric = fabric_manager_packages(distro, row.branch)
        install += _fabric_install(distro, fabric, packages)
        rollback += _fabric_rollback(distro, facts) if rollback else ()
        why.append(f"an NVSwitch host: {', '.join(fabric)} at exactly the driver's version, held, started after the "
                   "reboot; the fabric must complete before the host serves")
    return DriverMove(now, row.branch, row.min_version, row.cuda, flavor, distro, source, packages,
                      install, rollback, tuple(why), fabric_manager=fabric)


class Refused(NamedTuple):
    """A branch that cannot be moved to: the target named, why not, and the way out."""

    target: str
    refusal: str
    fix: str
    row: DriverBranch | None


def _branch(branch: str, cuda: str, sms: list[int], matrix: Matrix,
            month: str) -> tuple[DriverBranch, str] | Refused:
    """The branch row to move to and why: with "auto" the oldest NVIDIA-supported LTSB/PB branch that runs
    *cuda* natively on every SM; else the one named, if it runs them."""
    fits = [d for d in sorted(matrix.drivers, key=lambda d: int(d.branch))
            if Version(d.cuda) >= Version(cuda) and all(s in d.sm for s in sms)]
    if branch == "auto":
        supported = [d for d in fits if d.eol and d.eol >= month and d.kind in ("LTSB", "PB")]
        if not supported:
            newest = fits[-1] if fits else None
            return Refused(branch, f"no NVIDIA-supported branch in the matrix runs CUDA {cuda} natively on sm_"
                    f"{'/'.join(map(str, sms))}",
                    f"name a branch with --driver {newest.branch}" if newest else "add the branch to the matrix", None)
        row = supported[0]
        return row, (f"R{row.branch}: the oldest supported branch that runs CUDA {cuda} natively "
                     f"({_lifecycle(row, month)})")
    row = matrix.driver_row(branch.lstrip("Rr"))
    if row is None:
        return Refused(branch, f"R{branch} is not in the matrix",
                f"use --driver auto or one of {', '.join(d.branch for d in matrix.drivers)}", None)
    if Version(row.cuda) < Version(cuda):
        would = fits[0].branch if fits else None
        return Refused(row.branch, f"R{row.branch} runs CUDA ≤ {row.cuda} natively, not {cuda}",
                f"use --driver {would} (or auto)" if would else "add a newer branch to the matrix", row)
    if missing := [s for s in sms if s not in row.sm]:
        return Refused(row.branch, f"R{row.branch} does not drive sm_{'/'.join(map(str, missing))}"
                + (" (pre-Turing GPUs end with R580)" if missing[0] < TURING else ""),
                f"use --driver {fits[0].branch}" if fits else "keep the host on its driver", row)
    return row, f"R{row.branch} as asked ({_lifecycle(row, month)})"


def facts_after(facts: Facts, move: DriverMove) -> Facts:
    """The host's facts once *move* is made: its branch's first release, running the branch's CUDA
    (what plan resolves the new stack against, before any host has moved)."""
    return replace(facts, driver_version=move.min_version, cuda_driver_version=move.cuda)


def distro_key(facts: Facts) -> str | None:
    """The distribution key of the matrix's packages for this host: ubuntu-22.04, ubuntu-24.04, rhel-9 or None."""
    os_id, version = (facts.os.id or "").lower(), facts.os.version_id or ""
    if os_id == "ubuntu":
        return UBUNTU.get(version)
    if os_id in RHEL_LIKE and version.split(".")[0] == "9":
        return "rhel-9"
    return None


def branch_of(version: str | None) -> str | None:
    """"570.133.20" → "570"."""
    head = (version or "").split(".")[0]
    return head if head.isdigit() else None


# ---------------------------------------------------------------- the rules

def _flavor(facts: Facts, lowest: int, highest: int, row: DriverBranch) -> tuple[str | None, str]:
    """(flavour, why) for these GPUs on *row*'s branch; (None, why) where no flavour drives them all."""
    if lowest < TURING and highest >= BLACKWELL:
        return None, (f"mixes pre-Turing (sm_{lowest}) and Blackwell (sm_{highest}) GPUs: Blackwell needs the open "
                      "kernel modules, which do not drive pre-Turing GPUs")
    if lowest < TURING:
        return "proprietary", f"proprietary kernel modules: sm_{lowest} (pre-Turing) has no open-module support"
    if highest >= BLACKWELL:
        return "open", f"open kernel modules: required for sm_{highest} (Blackwell)"
    if any("GH200" in g.name for g in facts.gpus):
        return "open", "open kernel modules: required for Grace Hopper"
    if row.open_default:
        return "open", f"open kernel modules: recommended by NVIDIA for Turing and newer, R{row.branch}'s default"
    return "proprietary", f"proprietary kernel modules: R{row.branch}'s default (open modules are the default from R560)"


def _packages(row: DriverBranch, distro: str, flavor: str):
    """(source, packages, why) for the branch on *distro*, or the reason there are none."""
    if distro == "rhel-9":
        entry = row.packages.get("rhel-9")
        if entry and entry.of(flavor):
            return ("NVIDIA's CUDA repository", entry.of(flavor),
                    f"from NVIDIA's CUDA repository for RHEL 9 (configured on the host): stream "
                    f"{entry.of(flavor)[0]}, which holds the branch")
        return f"the matrix has no RHEL 9 {flavor} packages of R{row.branch}"
    entry, nvidia = row.packages.get(distro), row.packages.get("cuda-ubuntu")
    if entry and entry.of(flavor) and not entry.moved_to:
        return "Ubuntu's archive", entry.of(flavor), f"from Ubuntu's own archive: {', '.join(entry.of(flavor))}"
    if nvidia and nvidia.of(flavor):
        gone = (f"Ubuntu's {entry.of(flavor)[0]} is now transitional to R{entry.moved_to}"
                if entry and entry.of(flavor) and entry.moved_to else f"Ubuntu's archive has no R{row.branch}")
        return ("NVIDIA's CUDA repository", nvidia.of(flavor),
                f"{gone}: {', '.join(nvidia.of(flavor))} from NVIDIA's CUDA repository (configured on the host)")
    return f"neither Ubuntu's archive nor NVIDIA's CUDA repository has {flavor} R{row.branch} packages in the matrix"


def _install(distro: str, packages: tuple[str, ...], version: str | None = None) -> tuple[str, ...]:
    """The commands that install *packages* (at *version*, where given) and hold the branch."""
    if distro == "rhel-9":
        stream, rest = packages[0], packages[1:]
        if version:
            return ("dnf -y module reset nvidia-driver", f"dnf -y module enable {shlex.quote(stream)}",
                    f"dnf -y install --allowerasing {' '.join(map(shlex.quote, rest)) or shlex.quote('@' + stream)}",
                    f"dnf -y distro-sync --allowerasing {DRIVER_PACKAGES}")
        return ("dnf -y module reset nvidia-driver", f"dnf -y module enable {shlex.quote(stream)}",
                f"dnf -y install --allowerasing {' '.join(map(shlex.quote, rest)) or shlex.quote('@' + stream)}")
    pinned = [f"{p}={version}-*" if version else p for p in packages]
    return ("apt-get update",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends --allow-change-held-packages "
            + ("--allow-downgrades " if version else "") + " ".join(map(shlex.quote, pinned)),
            f"apt-mark hold {' '.join(map(shlex.quote, packages))}")


def _rollback(facts: Facts, distro: str, lowest: int, highest: int, matrix: Matrix) -> tuple[tuple[str, ...], str]:
    """The commands that put the host's current branch back, and what they assume."""
    old = matrix.driver_row(branch_of(facts.driver_version) or "")
    if old is None:
        return (), (f"no rollback commands: the host's driver {facts.driver_version or '(none)'} is of a branch the "
                    "matrix does not know; its packages go back by hand")
    flavor, _ = _flavor(facts, lowest, highest, old)
    if flavor is None:
        return (), "no rollback commands: no flavour of the current branch drives these GPUs"
    if distro == "rhel-9":
        entry = old.packages.get("rhel-9")
        packages = entry.of(flavor) if entry else ()
    else:
        entry = old.packages.get(distro) or old.packages.get("cuda-ubuntu")
        packages = entry.of(flavor) if entry else ()
    if not packages:
        return (), f"no rollback commands: the matrix has no {flavor} R{old.branch} packages for {distro}"
    exact = "" if distro == "rhel-9" else f" at exactly {facts.driver_version}"
    return (_install(distro, packages, facts.driver_version),
            f"rollback: {', '.join(packages)}{exact}, held (assumes the host ran R{old.branch}'s {flavor} "
            f"modules{'' if distro != 'rhel-9' else '; the stream brings the branch’s newest release'})")


def fabric_manager_packages(distro: str, branch: str) -> tuple[str, ...]:
    """nvidia-fabricmanager and the NSCQ library NVSwitch hosts need, by the distribution's names: Ubuntu's
    archive splits them per branch (fabric-manager-<branch>: nvidia-fabricmanager-<branch>, libnvidia-nscq-<branch>);
    NVIDIA's RHEL repository has one name each, its module stream holding the branch."""
    if distro == "rhel-9":
        return ("nvidia-fabric-manager", "libnvidia-nscq")
    return (f"nvidia-fabricmanager-{branch}", f"libnvidia-nscq-{branch}")


def _fabric_install(distro: str, fabric: tuple[str, ...], driver_packages: tuple[str, ...]) -> tuple[str, ...]:
    """Install *fabric* at exactly the version of the driver just installed (the fabric manager refuses to
    run at another), hold it, and enable its service so that it starts with the new driver at boot."""
    names = " ".join(map(shlex.quote, fabric))
    if distro == "rhel-9":  # the enabled stream brings the branch's fabric manager with its driver
        return (f"dnf -y install {names}", "systemctl enable nvidia-fabricmanager")
    first = shlex.quote(driver_packages[0])
    pinned = " ".join(f'{shlex.quote(p)}="$v-*"' for p in fabric)
    return (f"v=$(dpkg-query -W -f='${{Version}}' {first} | cut -d- -f1) && [ -n \"$v\" ] && "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends --allow-change-held-packages "
            f"--allow-downgrades {pinned}",
            f"apt-mark hold {names}", "systemctl enable nvidia-fabricmanager")


def _fabric_rollback(distro: str, facts: Facts) -> tuple[str, ...]:
    """The fabric manager the host ran before, at exactly its driver's version, held and enabled."""
    old = branch_of(facts.driver_version)
    if distro == "rhel-9":
        return (f"dnf -y distro-sync --allowerasing {' '.join(fabric_manager_packages(distro, old or ''))}",
                "systemctl enable nvidia-fabricmanager")
    fabric = fabric_manager_packages(distro, old or "")
    return _install(distro, fabric, facts.driver_version) + ("systemctl enable nvidia-fabricmanager",)


def _lifecycle(row: DriverBranch, month: str) -> str:
    if row.eol is None:
        return f"{row.kind}: NVIDIA gives no end of life" + (", supported only until the next branch"
                                                                if row.kind == "NFB" else "")
    return f"{row.kind} until {row.eol}" if row.eol >= month else f"{row.kind}: past its end of life, {row.eol}"


def _minor(cuda: str) -> str:
    v = Version(cuda)
    return f"{v.major}.{v.minor}"
