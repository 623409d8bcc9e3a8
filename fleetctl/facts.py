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

from .connection import Connection
from .errors import CommandFailed
from .fanout import Deadline
from .inventory import Host

QUERY_FIELDS = ("index,name,uuid,compute_cap,driver_version,memory.total,pci.bus_id,"
                "persistence_mode,ecc.mode.current,mig.mode.current")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    compute_capability: str | None
    memory_mib: int | None
    pci_bus_id: str | None
    mig_mode: str | None = None

    @property
    def sm(self) -> int | None:
        """``"9.0"`` → 90; None where the driver did not say."""
        if not self.compute_capability:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)


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


RECORDS = {"python": PythonInfo, "os": OsRelease, "container_runtime": ContainerRuntime,
           "installed": Installed, "fleet": FleetState}


@dataclass(frozen=True)
class Facts:
    gpus: tuple[Gpu, ...] = ()
    gpu_source: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    os: OsRelease = field(default_factory=OsRelease)
    kernel: str | None = None
    arch: str | None = None
    glibc: str | None = None
    python: PythonInfo | None = None
    nvcc: str | None = None
    user: str | None = None
    fleet_root: str | None = None
    disk_free_gib: float | None = None
    container_runtime: ContainerRuntime | None = None
    installed: Installed | None = None
    fleet: FleetState | None = None
    gpu_error: str | None = None

    def __post_init__(self):
        # Sub-records given in their JSON form (recorded facts, a lock, a test's table) become records.
        for name, cls in RECORDS.items():
            object.__setattr__(self, name, _record(cls, getattr(self, name)))
        if self.fleet is not None and not isinstance(self.fleet.envs, tuple):
            object.__setattr__(self, "fleet", replace(self.fleet, envs=tuple(self.fleet.envs)))

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["fleet"] is not None:
            data["fleet"]["envs"] = list(data["fleet"]["envs"])
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
    template = resources.files(__package__).joinpath("remote/probe.sh").read_text()
    python = host.vars.get("ansible_python_interpreter")
    root = host.vars.get("fleet_root")
    values = {"@PYTHON@": shlex.quote(str(python)) if python else '""',
              "@FLEET_ROOT@": shlex.quote(str(root)) if root else '""',
              "@QUERY@": shlex.quote(QUERY_FIELDS)}
    return re.sub("|".join(map(re.escape, values)), lambda m: values[m[0]], template)


def gather(host: Host, conn: Connection, deadline: Deadline) -> Facts:
    """Run the probe on *host* (one round trip) and parse what it printed."""
    result = conn.run(probe_script(host), timeout=deadline.left(host.name))
    if "@@fleetctl end" not in result.stdout:
        raise CommandFailed(host.name, f"the fact probe stopped early (exit {result.exited}): "
                            f"{(result.stderr.strip() or 'no error output').splitlines()[-1]}")
    try:
        return parse_probe(result.stdout)
    except (ValueError, KeyError) as exc:
        raise CommandFailed(host.name, f"unexpected probe output: {exc}",
                            fix="run the probe by hand with fleetctl facts -vv") from None


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

    gpus, driver, cuda, source, error = (), None, None, None, None
    if text("nvml"):
        gpus, driver, cuda = parse_nvml(text("nvml"))
        source = "nvml"
    elif text("nvidia-smi-query", ok_only=False) is not None and s["nvidia-smi-query"][1] != 127:
        body, rc = s["nvidia-smi-query"]
        if rc == 0:
            gpus, driver = parse_nvidia_smi_query(body)
            cuda = parse_nvidia_smi_header(text("nvidia-smi") or "")
            source = "nvidia-smi"
        else:
            error = f"nvidia-smi failed (exit {rc}): {body.strip().splitlines()[-1]}"
    kernel, arch = parse_uname(text("uname") or "")
    return Facts(
        gpus=gpus, gpu_source=source, gpu_error=error,
        driver_version=driver, cuda_driver_version=cuda,
        os=parse_os_release(text("os-release") or ""),
        kernel=kernel, arch=arch,
        glibc=parse_glibc(text("glibc") or ""),
        python=parse_python(text("python") or ""),
        nvcc=parse_nvcc(text("nvcc") or ""),
        user=(text("user") or "").strip() or None,
        fleet_root=(text("fleet-root") or "").strip() or None,
        disk_free_gib=parse_df(text("disk") or ""),
        container_runtime=parse_container(text("container") or ""),
        installed=parse_installed(text("installed") or ""),
        fleet=parse_fleet_state(text("fleet-state") or ""),
    )


# ---------------------------------------------------------------- section parsers

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
    envs = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "env":
            envs.append(value)
        elif key in state and (value or key == "container_image_now"):
            state[key] = value
    return FleetState(envs=tuple(envs), **state)


def parse_nvml(text: str) -> tuple[tuple[Gpu, ...], str | None, str | None]:
    """The probe's NVML JSON → (gpus, driver version, max CUDA "13.0")."""
    data = json.loads(text)
    cuda = data.get("cuda_driver")
    gpus = tuple(Gpu(index=g["index"], name=g["name"], uuid=g["uuid"],
                     compute_capability=f"{g['cc'][0]}.{g['cc'][1]}",
                     memory_mib=g["memory_bytes"] // 2 ** 20, pci_bus_id=g.get("pci_bus_id"),
                     mig_mode=g.get("mig_mode"))
                 for g in data.get("gpus", []))
    return gpus, data.get("driver"), f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None


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
        memory = value(row, "memory.total")
        gpus.append(Gpu(
            index=int(value(row, "index") or len(gpus)), name=value(row, "name") or "unknown",
            uuid=value(row, "uuid") or "", compute_capability=value(row, "compute_cap"),
            memory_mib=int(memory.split()[0]) if memory else None,
            pci_bus_id=value(row, "pci.bus_id"), mig_mode=value(row, "mig.mode.current"),
        ))
    driver = value(rows[1], "driver_version") if len(rows) > 1 else None
    return tuple(gpus), driver


def parse_nvidia_smi_header(text: str) -> str | None:
    """Plain ``nvidia-smi`` → the driver's max CUDA ("CUDA Version: 13.0"; from driver 610 on
    "CUDA UMD Version: 13.3")."""
    m = re.search(r"CUDA (?:UMD )?Version:\s*(\d+\.\d+)", text)
    return m.group(1) if m else None
