"""What a host is: one probe script run in a single round trip, and a pure parser
per section of its output.

The probe prints ``@@fleetctl <section>`` before each section and ``@@rc <n>``
after it. GPUs come from NVML (nvidia-ml-py in the host's Python) where it
works, else from ``nvidia-smi`` on the host's PATH; a host with neither is a
valid host with no GPUs. Compute capability always comes from the driver,
never from a table of GPU names. The fleet environment's own Python runs only where
this user or root owns the install root and the environment; otherwise (another user
could plant code there, run as root) its versions are read from its metadata files.
Every inventory value in the probe is quoted, and substituted in one pass.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING

from fleetctl.errors import CommandFailed
from fleetctl.hosts.become import become_for, parse_reach
from fleetctl.hosts.inventory import Host
from fleetctl.reach.deadline import Deadline

if TYPE_CHECKING:  # gather is handed a connection; the facts import nothing that runs commands
    from fleetctl.reach.connection import Connection

QUERY_FIELDS = ("index,name,uuid,compute_cap,driver_version,memory.total,pci.bus_id,"
                "persistence_mode,ecc.mode.current,mig.mode.current,memory.used,memory.free")
# The health fields where NVML does not answer (`nvidia-smi --help-query-gpu` names each). The
# throttle name of the clock event reasons, as drivers before R535 know no other.
HEALTH_FIELDS = ("index,pci.bus_id,ecc.mode.current,ecc.errors.uncorrected.volatile.total,"
                 "ecc.errors.uncorrected.aggregate.total,retired_pages.pending,clocks_throttle_reasons.active,"
                 "pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max,"
                 "persistence_mode,remapped_rows.pending,remapped_rows.failure,fabric.state,fabric.status")
HEALTH_FIELDS_OLD = HEALTH_FIELDS.split(",remapped_rows.pending")[0]


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    compute_capability: str | None
    memory_mib: int | None
    pci_bus_id: str | None
    mig_mode: str | None = None
    memory_used_mib: int | None = None  # when the facts were read (None: not reported)
    memory_free_mib: int | None = None

    @property
    def sm(self) -> int | None:
        """``"9.0"`` → 90; None where the driver did not say."""
        if not self.compute_capability:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)


@dataclass(frozen=True)
class GpuProcess:
    """A process holding GPU memory (a CUDA context): which GPU, its pid as the driver sees it, and its MiB
    (None where the driver does not say, as in some containers)."""

    gpu: int
    pid: int
    used_mib: int | None = None


def _record(cls, value):
    """A sub-record from its JSON form (a dict), as recorded facts, locks and snapshots hold it."""
    if value is None or isinstance(value, cls):
        return value
    return cls(**{k: v for k, v in value.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class PythonInfo:
    """The host's python3 (or ansible_python_interpreter) and the torch it sees, from metadata."""

    path: str
    version: str  # "3.12.3"
    torch: str | None = None
    torch_cuda: str | None = None
    packages: dict = field(default_factory=dict)  # {PEP 503 name: version} of what that Python sees

    @property
    def minor(self) -> str:
        """"3.12.3" → "3.12"."""
        return ".".join(self.version.split(".")[:2])


@dataclass(frozen=True)
class OsRelease:
    id: str | None = None
    version_id: str | None = None
    pretty_name: str | None = None


@dataclass(frozen=True)
class ContainerRuntime:
    """The host's container engine as the engine itself answered: a client is not a runtime."""

    name: str  # docker or podman: the client on the host's PATH (docker first)
    nvidia_runtime: bool = False  # the engine lists an NVIDIA runtime (nvidia-ctk runtime configure)
    server: str | None = None  # the engine's version; None where it did not answer (no daemon)
    compose: str | None = None  # one of COMPOSE_COMMANDS, the first that works on the host; None: none
    cdi: bool = False  # an NVIDIA CDI spec is on the host (/etc/cdi or /var/run/cdi nvidia.yaml)
    error: str | None = None  # why the engine did not answer


@dataclass(frozen=True)
class Installed:
    """What the host's current fleet environment holds, read there (not what was meant to be)."""

    env: str
    python: str | None = None
    torch: str | None = None
    torch_cuda: str | None = None
    vllm: str | None = None
    vllm_package: str | None = None
    flashinfer: str | None = None
    stack_id: str | None = None


@dataclass(frozen=True)
class FleetState:
    """The install root: where current and previous point, the complete environments, the service."""

    current: str | None = None
    previous: str | None = None
    envs: tuple[str, ...] = ()
    service: str | None = None
    container: str | None = None  # container mode: "<name> <status> <image id> <image> <stack id>", or "<name> missing"
    container_image_now: str | None = None  # the id its image's tag names now ("": the tag is gone)
    service_pids: tuple[int, ...] = ()  # the service's processes: its process group, or its unit's control group


@dataclass(frozen=True)
class GpuHealth:
    """One GPU's health as NVML (or nvidia-smi) reports it; None: the GPU or driver does not say."""

    index: int
    pci_bus_id: str | None = None
    ecc_mode: str | None = None  # "Enabled" / "Disabled"; None: no ECC on this GPU
    ecc_uncorrected_volatile: int | None = None  # since the driver loaded
    ecc_uncorrected_aggregate: int | None = None  # over the GPU's life
    retired_pages_pending: bool | None = None  # pre-Ampere page retirement; None on GPUs that remap rows
    remapped_rows_pending: bool | None = None  # Ampere and later
    remapped_rows_failure: bool | None = None
    clock_event_reasons: int | None = None  # NVML's nvmlClocksEventReasons bitmask
    pcie_gen: int | None = None
    pcie_gen_max: int | None = None
    pcie_width: int | None = None
    pcie_width_max: int | None = None
    nvlinks: tuple[bool, ...] = ()  # each NVLink up; () where the GPU has none active or known
    persistence_mode: str | None = None
    fabric_state: str | None = None  # "not started" / "in progress" / "completed"; None: no NVSwitch fabric
    fabric_status: str | None = None  # "success" or the error NVML gave


@dataclass(frozen=True)
class XidEvent:
    """One ``NVRM: Xid`` line of the kernel log since boot."""

    xid: int
    pci: str  # as the line gives it, e.g. "0000:3b:00"
    gpu: int | None  # the GPU at that bus; None where none of the host's is
    message: str


@dataclass(frozen=True)
class FabricManager:
    """nvidia-fabricmanager on the host: its package and version, and its service's state."""

    package: str | None = None
    version: str | None = None  # the package's upstream version, "580.95.05"
    service: str | None = None  # systemctl is-active's word; None where there is no systemctl


@dataclass(frozen=True)
class Health:
    """The host's GPU health facts."""

    gpus: tuple[GpuHealth, ...] = ()
    source: str | None = None  # "nvml" or "nvidia-smi"
    fabric_manager: FabricManager | None = None
    kernel_log: str = "unread"  # "read", or "unread: why"
    xids: tuple[XidEvent, ...] = ()

    @property
    def nvswitch(self) -> bool:
        """An NVSwitch system: its GPUs report a fabric state (NVML says not supported elsewhere)."""
        return any(g.fabric_state is not None for g in self.gpus)

    @classmethod
    def from_dict(cls, data: dict) -> Health:
        gpus = tuple(replace(_record(GpuHealth, g), nvlinks=tuple(g.get("nvlinks") or ())) for g in data.get("gpus", ()))
        return cls(gpus=gpus, source=data.get("source"), fabric_manager=_record(FabricManager, data.get("fabric_manager")),
                   kernel_log=data.get("kernel_log", "unread"),
                   xids=tuple(_record(XidEvent, x) for x in data.get("xids", ())))


@dataclass(frozen=True)
class HostPackages:
    """What a stack may need from the host's own packages (a bare cloud image lacks them): venv with
    ensurepip for the host's Python, its headers, a C++ compiler, libnuma; and the package manager."""

    venv: bool = False
    python_headers: bool = False
    cxx: bool = False
    libnuma: bool = False
    manager: str | None = None  # apt-get, dnf, yum, zypper; None where none is found


RECORDS = {"python": PythonInfo, "os": OsRelease, "container_runtime": ContainerRuntime,
           "installed": Installed, "fleet": FleetState, "host_packages": HostPackages}


@dataclass(frozen=True)
class Facts:
    gpus: tuple[Gpu, ...] = ()
    gpu_source: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    os: OsRelease = field(default_factory=OsRelease)
    kernel: str | None = None
    arch: str | None = None
    cpu: str | None = None  # the first CPU's model and its vector extensions: "AMD EPYC [avx2 avx512f …]"
    glibc: str | None = None
    python: PythonInfo | None = None
    nvcc: str | None = None
    user: str | None = None
    fleet_root: str | None = None
    sudo: str | None = None  # root (the login is root), nopasswd, password, requiretty or none (become.py)
    fleet_root_writable: bool | None = None  # by the login user (or the directory it would be made in)
    become: str | None = None  # how root commands run: "sudo as root", None where the host does not become
    host_packages: HostPackages | None = None
    disk_free_gib: float | None = None
    container_runtime: ContainerRuntime | None = None
    installed: Installed | None = None
    fleet: FleetState | None = None
    gpu_error: str | None = None
    health: Health | None = None
    gpu_processes: tuple[GpuProcess, ...] = ()  # what holds GPU memory (NVML, or nvidia-smi --query-compute-apps)

    def __post_init__(self):
        # Sub-records given in their JSON form (recorded facts, a lock, a test's table) become records.
        for name, cls in RECORDS.items():
            object.__setattr__(self, name, _record(cls, getattr(self, name)))
        if isinstance(self.health, dict):
            object.__setattr__(self, "health", Health.from_dict(self.health))
        if self.fleet is not None and not isinstance(self.fleet.envs, tuple):
            object.__setattr__(self, "fleet", replace(self.fleet, envs=tuple(self.fleet.envs)))
        if self.fleet is not None and not isinstance(self.fleet.service_pids, tuple):
            object.__setattr__(self, "fleet", replace(self.fleet, service_pids=tuple(self.fleet.service_pids)))
        object.__setattr__(self, "gpu_processes", tuple(_record(GpuProcess, p) for p in self.gpu_processes))

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["fleet"] is not None:
            data["fleet"]["envs"] = list(data["fleet"]["envs"])
            data["fleet"]["service_pids"] = list(data["fleet"]["service_pids"])
        data["gpu_processes"] = [asdict(p) for p in self.gpu_processes]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Facts:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["gpus"] = tuple(Gpu(**{k: v for k, v in g.items() if k in Gpu.__dataclass_fields__})
                              for g in data.get("gpus", ()))
        return cls(**known)

    @property
    def min_sm(self) -> int | None:
        sms = [g.sm for g in self.gpus if g.sm is not None]
        return min(sms) if sms else None


# ---------------------------------------------------------------- the probe

def probe_script(host: Host) -> str:
    """The shell script that gathers every fact of *host* in one execution. Every placeholder is
    replaced in one pass, each by its quoted value: a value holding another placeholder's name is
    never substituted again (it would land unquoted inside the first value's quotes)."""
    template = resources.files("fleetctl").joinpath("remote", "probe.sh").read_text()
    python = host.vars.get("ansible_python_interpreter")
    # A host that becomes root installs where root would (/opt/fleetctl), not in the login user's home.
    root = host.vars.get("fleet_root") or (DEFAULT_ROOT if becomes(host) else None)
    values = {"@PYTHON@": shlex.quote(str(python)) if python else '""',
              "@FLEET_ROOT@": shlex.quote(str(root)) if root else '""',
              "@QUERY@": shlex.quote(QUERY_FIELDS), "@HEALTH@": shlex.quote(HEALTH_FIELDS),
              "@HEALTH_OLD@": shlex.quote(HEALTH_FIELDS_OLD)}
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m[0]], template)


def gather(host: Host, conn: Connection, deadline: Deadline) -> Facts:
    """Run the probe on *host* (one round trip) and parse what it printed."""
    result = conn.run(probe_script(host), timeout=deadline.left(host.name))
    if "@@fleetctl end" not in result.stdout:
        raise CommandFailed(host.name, f"the fact probe stopped early (exit {result.exited}): "
                            f"{(result.stderr.strip() or 'no error output').splitlines()[-1]}")
    try:
        facts = parse_probe(result.stdout)
    except (ValueError, KeyError) as exc:
        raise CommandFailed(host.name, f"unexpected probe output: {exc}",
                            fix="run the probe by hand with fleetctl facts -vv") from None
    become = becomes(host)
    return replace(facts, become=f"{become.method} as {become.user}" if become else None)


DEFAULT_ROOT = "/opt/fleetctl"


def becomes(host: Host):
    """The host's Become (ansible_become and its vars), or None; an unsupported method counts as none here
    (the connection refuses it with its reason)."""
    try:
        return become_for(host.vars)
    except ValueError:
        return None


def split_sections(output: str) -> dict[str, tuple[str, int | None]]:
    """``@@fleetctl name`` … ``@@rc n`` blocks → {name: (text, rc)}."""
    sections: dict[str, tuple[str, int | None]] = {}
    name, lines = None, []
    for line in output.splitlines():
        if line.startswith("@@fleetctl "):
            name, lines = line.split(None, 1)[1].strip(), []
        elif line.startswith("@@rc ") and name:
            sections[name] = ("\n".join(lines), int(line[5:].strip() or -1))
            name = None
        elif name:
            lines.append(line)
    if name:  # cut off mid-section: keep what came, without an exit code
        sections[name] = ("\n".join(lines), None)
    return sections


def parse_probe(output: str) -> Facts:
    """The probe's whole output → Facts. Pure: every section has its own parser."""
    s = split_sections(output)

    def text(name: str, *, ok_only: bool = True) -> str | None:
        body, rc = s.get(name, ("", None))
        return body if (rc == 0 or not ok_only) and body.strip() else None

    gpus, driver, cuda, source, error, health, apps = (), None, None, None, None, None, ()
    if text("nvml"):
        gpus, driver, cuda = parse_nvml(text("nvml"))
        apps = parse_nvml_processes(text("nvml"))
        source = "nvml"
        health = Health(gpus=parse_nvml_health(text("nvml")), source="nvml")
    elif text("nvidia-smi-query", ok_only=False) is not None and s["nvidia-smi-query"][1] != 127:
        body, rc = s["nvidia-smi-query"]
        if rc == 0:
            gpus, driver = parse_nvidia_smi_query(body)
            cuda = parse_nvidia_smi_header(text("nvidia-smi") or "")
            apps = parse_compute_apps(text("nvidia-smi-apps") or "", gpus)
            source = "nvidia-smi"
            health = Health(gpus=parse_health_query(text("gpu-health", ok_only=False) or "",
                                                    text("nvlink") or ""), source="nvidia-smi")
        else:
            error = f"nvidia-smi failed (exit {rc}): {body.strip().splitlines()[-1]}"
    if health is not None:
        kernel_log, xids = parse_kernel_log(text("kernel-log") or "", health.gpus)
        health = replace(health, fabric_manager=parse_fabric_manager(text("fabric-manager") or ""),
                         kernel_log=kernel_log, xids=xids)
    kernel, arch = parse_uname(text("uname") or "")
    sudo, writable = parse_reach(text("reach") or "")
    return Facts(health=health,
        gpus=gpus, gpu_source=source, gpu_error=error, gpu_processes=apps,
        driver_version=driver, cuda_driver_version=cuda,
        os=parse_os_release(text("os-release") or ""),
        kernel=kernel, arch=arch, cpu=parse_cpu(text("cpu") or ""),
        glibc=parse_glibc(text("glibc") or ""),
        python=parse_python(text("python") or ""),
        nvcc=parse_nvcc(text("nvcc") or ""),
        user=(text("user") or "").strip() or None,
        fleet_root=(text("fleet-root") or "").strip() or None,
        sudo=sudo, fleet_root_writable=writable,
        host_packages=parse_host_packages(text("host-packages") or ""),
        disk_free_gib=parse_df(text("disk") or ""),
        container_runtime=parse_container(text("container") or ""),
        installed=parse_installed(text("installed") or ""),
        fleet=parse_fleet_state(text("fleet-state") or ""),
    )


# ---------------------------------------------------------------- section parsers

def parse_host_packages(text: str) -> HostPackages | None:
    """The probe's ``host-packages`` section (``key=yes|no``, ``manager=NAME``) → HostPackages; None where the
    section is missing (facts recorded by an older probe)."""
    values = dict(line.strip().split("=", 1) for line in text.splitlines() if "=" in line)
    if not values:
        return None
    yes = {key for key, value in values.items() if value == "yes"}
    return HostPackages(venv="venv" in yes, python_headers="python_headers" in yes, cxx="cxx" in yes,
                        libnuma="libnuma" in yes, manager=values.get("manager") or None)


def parse_os_release(text: str) -> OsRelease:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"').strip("'")
    return OsRelease(values.get("ID"), values.get("VERSION_ID"), values.get("PRETTY_NAME"))


def parse_uname(text: str) -> tuple[str | None, str | None]:
    """``uname -r -m`` → (kernel release, machine)."""
    words = text.split()
    return (words[0], words[1]) if len(words) >= 2 else (None, None)


VECTOR_FLAGS = re.compile(r"^(avx|amx|asimd|sve|fma|f16c|fp16|bf16|i8mm)")  # what compiled CPU kernels may use


def parse_cpu(text: str) -> str | None:
    """The first processor's ``/proc/cpuinfo`` lines (x86: model name, flags; Arm: CPU implementer, CPU part,
    Features) → "MODEL [vector extensions]"; None where there are none."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values.setdefault(key.strip(), value.strip())
    model = values.get("model name") or " ".join(
        f"{k.split()[-1]} {values[k]}" for k in ("CPU implementer", "CPU part") if k in values)
    flags = sorted({f for f in (values.get("flags") or values.get("Features") or "").split() if VECTOR_FLAGS.match(f)})
    return f"{model} [{' '.join(flags)}]" if model or flags else None


def parse_glibc(text: str) -> str | None:
    """``getconf GNU_LIBC_VERSION`` ("glibc 2.39") or ``ldd --version``'s first line."""
    m = re.search(r"(?:glibc|GLIBC|GNU libc)\D*?(\d+\.\d+)", text) or re.search(r"\b(2\.\d+)\s*$", text, re.M)
    return m.group(1) if m else None


def parse_python(text: str) -> PythonInfo | None:
    """path, version, then torch's version and CUDA in that Python (blank lines if none), then
    the distributions it sees as one line of ``name==version`` (a probe before that line: {})."""
    lines = text.strip("\n").splitlines() + ["", "", ""]
    if len(lines) < 5 or not lines[1]:
        return None
    return PythonInfo(path=lines[0], version=lines[1], torch=lines[2] or None, torch_cuda=lines[3] or None,
                      packages=parse_packages(lines[4]))


def parse_packages(text: str) -> dict[str, str]:
    """``name==version …`` → {PEP 503 name: version}; the first of a name wins, as on sys.path."""
    packages: dict[str, str] = {}
    for word in text.split():
        name, sep, version = word.partition("==")
        if sep and name and version:
            packages.setdefault(canonical_name(name), version)
    return packages


def canonical_name(name: str) -> str:
    """PEP 503: ``Typing_Extensions`` and ``typing-extensions`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_nvcc(text: str) -> str | None:
    """``nvcc --version`` → "13.0.88" (from "Build cuda_13.0.r13.0/compiler…" or "V13.0.88")."""
    m = re.search(r"release \d+\.\d+, V(\d+\.\d+\.\d+)", text) or re.search(r"release (\d+\.\d+)", text)
    return m.group(1) if m else None


def parse_df(text: str) -> float | None:
    """``df -Pk PATH`` → free GiB."""
    lines = text.strip().splitlines()
    if len(lines) < 2:
        return None
    fields = lines[-1].split()
    return round(int(fields[3]) / 1024 ** 2, 1) if len(fields) >= 4 and fields[3].isdigit() else None


COMPOSE_COMMANDS = ("docker compose", "docker-compose", "podman compose", "podman-compose")


def parse_container(text: str) -> ContainerRuntime | None:
    """The probe's engine lines → the runtime, or None where the host has no docker or podman.

    ``name=``; then the engine's answers, ``server=`` (its version) and ``runtimes=`` (as JSON), each
    answer's last line (a client's warnings come before it), or ``server_rc=`` and ``error=`` lines
    where it did not answer; ``compose=``; ``cdi=yes|no``."""
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            lines.setdefault(key, []).append(value.strip())

    def last(key: str) -> str | None:
        return next((v for v in reversed(lines.get(key, [])) if v), None)

    name = last("name")
    if name not in ("docker", "podman"):
        return None
    server = last("server")
    error = None
    if server is None:
        error = (f"{name} did not answer within 10 s" if last("server_rc") == "124"
                 else "; ".join(v for v in lines.get("error", []) if v) or f"{name} reported no engine version")
    compose = last("compose")
    return ContainerRuntime(
        name, nvidia_runtime=server is not None and _lists_nvidia(last("runtimes") or ""), server=server,
        compose=compose if compose in COMPOSE_COMMANDS else None, cdi=last("cdi") == "yes", error=error)


def _lists_nvidia(runtimes: str) -> bool:
    """docker's ``{{json .Runtimes}}`` (a map by runtime name) or podman's ``{{json .Host.OCIRuntime}}``
    (the one runtime it uses) names NVIDIA's runtime."""
    try:
        data = json.loads(runtimes)
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    if isinstance(data.get("name"), str):  # podman: the one runtime it uses
        named = [data["name"], data.get("path")]
    else:  # docker: every runtime by name, each with its path
        named = [*data, *(r.get("path") for r in data.values() if isinstance(r, dict))]
    return any(isinstance(n, str) and "nvidia" in n for n in named)


def parse_installed(text: str) -> Installed | None:
    """The fleet environment's report (JSON) → what it holds, or None."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return _record(Installed, data) if isinstance(data, dict) and data.get("env") else None


def parse_fleet_state(text: str) -> FleetState:
    """current/previous links, complete environments, the service's state under the install root."""
    state: dict = {"current": None, "previous": None, "service": None, "container": None, "container_image_now": None}
    envs, pids = [], []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "env":
            envs.append(value)
        elif key == "service_pids":
            pids += [int(w) for w in value.split() if w.isdigit() and int(w) not in pids]
        elif key in state and (value or key == "container_image_now"):
            state[key] = value
    return FleetState(envs=tuple(envs), service_pids=tuple(pids), **state)


def parse_nvml(text: str) -> tuple[tuple[Gpu, ...], str | None, str | None]:
    """The probe's NVML JSON → (gpus, driver version, max CUDA "13.0")."""
    data = json.loads(text)
    cuda = data.get("cuda_driver")
    gpus = tuple(Gpu(index=g["index"], name=g["name"], uuid=g["uuid"],
                     compute_capability=f"{g['cc'][0]}.{g['cc'][1]}",
                     memory_mib=g["memory_bytes"] // 2 ** 20, pci_bus_id=g.get("pci_bus_id"),
                     mig_mode=g.get("mig_mode"), memory_used_mib=_mib(g.get("memory_used_bytes")),
                     memory_free_mib=_mib(g.get("memory_free_bytes")))
                 for g in data.get("gpus", []))
    return gpus, data.get("driver"), f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None


def _mib(value) -> int | None:
    return value // 2 ** 20 if isinstance(value, int) else None


def parse_nvml_processes(text: str) -> tuple[GpuProcess, ...]:
    """The probe's NVML JSON → the compute processes on each GPU (a probe from before they were read: none)."""
    return tuple(GpuProcess(g["index"], int(pid), _mib(used)) for g in json.loads(text).get("gpus", [])
                 for pid, used in (g.get("processes") or ()))


def parse_compute_apps(text: str, gpus: tuple[Gpu, ...]) -> tuple[GpuProcess, ...]:
    """``nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv`` → the processes, each on the
    GPU its UUID names. Columns by header ("used_gpu_memory [MiB]" is the used_memory field); "[N/A]" memory
    is unknown; anything else (an error, "No running processes found" of older drivers) is none."""
    rows = [[c.strip() for c in row] for row in csv.reader(text.strip().splitlines()) if row]
    if not rows or "pid" not in rows[0]:
        return ()
    header = [h.split(" [")[0] for h in rows[0]]
    used = next((i for i, h in enumerate(header) if h.startswith("used")), None)
    index = {g.uuid: g.index for g in gpus}
    out = []
    for row in rows[1:]:
        if len(row) != len(header) or not row[header.index("pid")].isdigit():
            continue
        uuid = row[header.index("gpu_uuid")] if "gpu_uuid" in header else ""
        memory = row[used].split()[0] if used is not None and row[used] else ""
        out.append(GpuProcess(index.get(uuid, -1), int(row[header.index("pid")]),
                              int(memory) if memory.isdigit() else None))
    return tuple(out)


def parse_nvidia_smi_query(text: str) -> tuple[tuple[Gpu, ...], str | None]:
    """``nvidia-smi --query-gpu=… --format=csv`` (with header) → (gpus, driver version).

    Columns are found by header name: older drivers lack some fields (compute_cap,
    mig.mode.current), and a field a GPU does not support reads ``[N/A]``.
    """
    rows = [[c.strip() for c in row] for row in csv.reader(text.strip().splitlines()) if row]
    if not rows or "name" not in rows[0]:
        raise ValueError(f"unexpected nvidia-smi output: {text.strip()[:120]!r}")
    header = [h.split(" [")[0] for h in rows[0]]

    def value(row: list[str], column: str) -> str | None:
        v = row[header.index(column)] if column in header and header.index(column) < len(row) else None
        return None if v in (None, "", "[N/A]", "N/A", "[Not Supported]") else v

    gpus = []
    for row in rows[1:]:
        memory, used, free = (value(row, f"memory.{k}") for k in ("total", "used", "free"))
        gpus.append(Gpu(
            index=int(value(row, "index") or len(gpus)), name=value(row, "name") or "unknown",
            uuid=value(row, "uuid") or "", compute_capability=value(row, "compute_cap"),
            memory_mib=int(memory.split()[0]) if memory else None,
            pci_bus_id=value(row, "pci.bus_id"), mig_mode=value(row, "mig.mode.current"),
            memory_used_mib=int(used.split()[0]) if used else None,
            memory_free_mib=int(free.split()[0]) if free else None,
        ))
    driver = value(rows[1], "driver_version") if len(rows) > 1 else None
    return tuple(gpus), driver


def parse_nvidia_smi_header(text: str) -> str | None:
    """Plain ``nvidia-smi`` → the driver's max CUDA ("CUDA Version: 13.0"; from driver 610 on
    "CUDA UMD Version: 13.3")."""
    m = re.search(r"CUDA (?:UMD )?Version:\s*(\d+\.\d+)", text)
    return m.group(1) if m else None


# ---------------------------------------------------------------- GPU health

NVML_FABRIC_STATES = {1: "not started", 2: "in progress", 3: "completed"}  # nvmlGpuFabricState_t; 0: not supported


def parse_nvml_health(text: str) -> tuple[GpuHealth, ...]:
    """The probe's NVML JSON → each GPU's health (a probe without the health keys: none)."""
    out = []
    for g in json.loads(text).get("gpus", []):
        h = g.get("health")
        if not isinstance(h, dict):
            continue
        ecc = h.get("ecc_mode")
        volatile, aggregate = (h.get("ecc_uncorrected") or [None, None])[:2]
        rows = h.get("remapped_rows") or [None] * 4
        gen, gen_max, width, width_max = (h.get("pcie") or [None] * 4)[:4]
        fabric = h.get("fabric") or [0, None]
        state = NVML_FABRIC_STATES.get(fabric[0])
        pending = h.get("retired_pages_pending")
        out.append(GpuHealth(
            index=g["index"], pci_bus_id=g.get("pci_bus_id"),
            ecc_mode=None if ecc is None else ("Enabled" if ecc else "Disabled"),
            ecc_uncorrected_volatile=volatile, ecc_uncorrected_aggregate=aggregate,
            retired_pages_pending=None if pending is None else bool(pending),
            remapped_rows_pending=None if rows[2] is None else bool(rows[2]),
            remapped_rows_failure=None if rows[3] is None else bool(rows[3]),
            clock_event_reasons=h.get("clock_event_reasons"),
            pcie_gen=gen, pcie_gen_max=gen_max, pcie_width=width, pcie_width_max=width_max,
            nvlinks=tuple(bool(s) for s in h.get("nvlink") or ()),
            persistence_mode=None if h.get("persistence") is None else ("Enabled" if h["persistence"] else "Disabled"),
            fabric_state=state,
            fabric_status=None if state is None else ("success" if fabric[1] == 0 else f"NVML error {fabric[1]}"),
        ))
    return tuple(out)


def _csv_value(value: str | None) -> str | None:
    return None if value in (None, "", "[N/A]", "N/A", "[Not Supported]", "[Unknown Error]") else value


def _yes(value: str | None) -> bool | None:
    return None if value is None else value.strip().lower() == "yes"


def _int(value: str | None, base: int = 10) -> int | None:
    try:
        return int(value, base) if value is not None else None
    except ValueError:
        return None


def parse_health_query(text: str, nvlink: str = "") -> tuple[GpuHealth, ...]:
    """``nvidia-smi --query-gpu=<HEALTH_FIELDS> --format=csv`` → each GPU's health. The query is asked
    again without the newer fields where the driver refused them: the last header line's table counts."""
    lines = text.strip().splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith("index")), default=None)
    if start is None:
        return ()
    rows = [[c.strip() for c in row] for row in csv.reader(lines[start:]) if row]
    header = [h.split(" [")[0] for h in rows[0]]
    links = parse_nvlink_status(nvlink)
    out = []
    for row in rows[1:]:
        v = {name: _csv_value(row[i]) if i < len(row) else None for i, name in enumerate(header)}
        index = _int(v.get("index"))
        if index is None:
            continue
        state = (v.get("fabric.state") or "").lower() or None
        out.append(GpuHealth(
            index=index, pci_bus_id=v.get("pci.bus_id"), ecc_mode=v.get("ecc.mode.current"),
            ecc_uncorrected_volatile=_int(v.get("ecc.errors.uncorrected.volatile.total")),
            ecc_uncorrected_aggregate=_int(v.get("ecc.errors.uncorrected.aggregate.total")),
            retired_pages_pending=_yes(v.get("retired_pages.pending")),
            remapped_rows_pending=_yes(v.get("remapped_rows.pending")),
            remapped_rows_failure=_yes(v.get("remapped_rows.failure")),
            clock_event_reasons=_int(v.get("clocks_throttle_reasons.active"), 16),
            pcie_gen=_int(v.get("pcie.link.gen.current")), pcie_gen_max=_int(v.get("pcie.link.gen.max")),
            pcie_width=_int(v.get("pcie.link.width.current")), pcie_width_max=_int(v.get("pcie.link.width.max")),
            nvlinks=links.get(index, ()), persistence_mode=v.get("persistence_mode"),
            fabric_state=state, fabric_status=(v.get("fabric.status") or "").lower() or None if state else None,
        ))
    return tuple(out)


def parse_nvlink_status(text: str) -> dict[int, tuple[bool, ...]]:
    """``nvidia-smi nvlink -s`` → {GPU index: each link up}. A GPU's block is its ``GPU N: …`` line,
    then one ``Link L: <speed>`` per link, ``<inactive>`` where the link is down. A GPU without
    NVLink prints no block (the H100 PCIe capture prints nothing at all)."""
    links: dict[int, list[bool]] = {}
    gpu = None
    for line in text.splitlines():
        m = re.match(r"GPU (\d+):", line)
        if m:
            gpu = int(m[1])
            links[gpu] = []
            continue
        m = re.match(r"\s*Link \d+:\s*(.*)", line)
        if m and gpu is not None:
            links[gpu].append("inactive" not in m[1].lower())
    return {g: tuple(states) for g, states in links.items()}


def parse_fabric_manager(text: str) -> FabricManager | None:
    """The probe's ``package=NAME VERSION STATUS`` lines (dpkg's or rpm's) and ``service=`` →
    nvidia-fabricmanager's package and service, or None where neither is on the host."""
    package = version = service = None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        words = value.split()
        if key == "package" and len(words) >= 2 and value.endswith("installed") and "not-installed" not in value:
            package, version = words[0], re.split(r"[-~+]", words[1].split(":")[-1])[0]
        elif key == "service" and words:
            service = words[0]
    if package is None and service in (None, "inactive", "unknown"):
        return None
    return FabricManager(package=package, version=version, service=service)


XID_LINE = re.compile(r"NVRM: Xid \((?:PCI:)?([0-9A-Fa-f]+:[0-9A-Fa-f]+:[0-9A-Fa-f]+)(?:\.\d)?\): (\d+),\s*(.*)")


def _bus(pci: str) -> tuple[int, int, int] | None:
    """"00000000:3B:00.0" or "0000:3b:00" → (domain, bus, device)."""
    parts = pci.split(".")[0].split(":")
    try:
        return int(parts[-3], 16), int(parts[-2], 16), int(parts[-1], 16)
    except (IndexError, ValueError):
        return None


def parse_kernel_log(text: str, gpus: tuple[GpuHealth, ...] = ()) -> tuple[str, tuple[XidEvent, ...]]:
    """The probe's kernel-log section → ("read" or "unread: why", its Xid events, each on its GPU).
    The section is ``read=yes`` then the log's ``NVRM: Xid`` lines, or ``unread=<why>``."""
    lines = text.splitlines()
    unread = next((line.split("=", 1)[1] for line in lines if line.startswith("unread=")), None)
    if unread is not None or "read=yes" not in lines:
        return f"unread: {unread or 'the probe did not say'}", ()
    by_bus = {_bus(g.pci_bus_id): g.index for g in gpus if g.pci_bus_id}
    events = []
    for line in lines:
        m = XID_LINE.search(line)
        if m:
            events.append(XidEvent(xid=int(m[2]), pci=m[1], gpu=by_bus.get(_bus(m[1])), message=m[3].strip()))
    return "read", tuple(events)
