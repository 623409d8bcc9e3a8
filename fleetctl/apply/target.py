"""Where a stack lives on a host, and what is there now: two values decided before any step runs.

:class:`Target` is a pure function of the host's facts and its resolved stack: the install
root, the stack's environment, and how a proof's Python is started — the environment's own
interpreter, or in container mode ``docker run … python3`` in the image (named as such,
never passed off as a path to a Python). :class:`HostState` is what the host has now, read
in one round trip (a command plus a pure parser, as facts are): the environment's marker,
the ``current`` and ``previous`` links, whether the host runs systemd, the service's stack and
whether it is alive (a unit's ``is-active``, or a pid that is still the server: :data:`SERVICE_PID`), the hashes of the
files fleetctl ships there, and the model's ``config.json``. The steps plan from these
values; nothing re-reads the host between them.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from fleetctl.apply.images import ImageState, at_sections, image_state_script, parse_image_state
from fleetctl.apply.models import held_script, parse_held
from fleetctl.decide.classcache import CACHE_DIR, CACHE_MARKER, cache_env
from fleetctl.decide.container import NAME, gpu_run_args
from fleetctl.decide.resolve import Stack
from fleetctl.decide.serving import PYCACHE
from fleetctl.facts.probe import ContainerRuntime, Facts
from fleetctl.hosts.become import facts_privileges
from fleetctl.reach.connection import Connection
from fleetctl.remote.gpumem import WEIGHT_SUFFIXES

MARKER = "fleetctl-stack.json"  # written last into an environment: it is complete
GPUMEM = "gpumem.py"  # the proofs' GPU memory rule, imported by the two scripts from beside them
LIB_SCRIPTS = ("validate.py", "smoke.py", GPUMEM)  # what fleetctl ships to <root>/lib
UNIT = "fleetctl-vllm.service"  # the service where the host runs systemd


def q(value) -> str:
    return shlex.quote(str(value))


@dataclass(frozen=True)
class Target:
    """A stack's place on a host and the command that runs its proofs' Python."""

    root: str
    stack_id: str
    env_rel: str  # relative to root: what current points at
    proof_python: tuple[str, ...]  # argv prefix running a proof: <env>/bin/python, or `docker run … python3`
    proof_env: tuple[tuple[str, str], ...] = ()  # assignments before it (venv mode; a container gets -e)
    runtime: str | None = None  # container mode: the engine that runs the image; None: a virtualenv
    image: str | None = None  # container mode: the stack's image
    name: str = NAME  # container mode: the serving container, its compose project and unit
    compose: tuple[str, ...] = ()  # container mode: the host's compose command (v2 plugin or v1)
    gpu_args: tuple[str, ...] = ()  # container mode: how a container gets the host's GPUs
    fleet_as_root: bool = False  # writes under root go through become (root's, not the login user's)
    system: bool = True  # system units can be written (a login as root, or become); else a pid-file service

    @property
    def container(self) -> bool:
        return self.runtime is not None

    @property
    def env(self) -> str:
        return f"{self.root}/{self.env_rel}"

    @property
    def marker(self) -> str:
        return f"{self.env}/{MARKER}"

    @property
    def pycache(self) -> str | None:
        """Where a server's bytecode goes: inside the stack's environment, never an image's own
        site-packages (a container's environment is not mounted where its server runs)."""
        return None if self.container else f"{self.env}/{PYCACHE}"

    @property
    def cache(self) -> str | None:
        """Where this stack's proofs and servers keep their compiled kernels: the class cache (venv mode; a
        proof's throwaway container keeps nothing)."""
        return None if self.container else f"{self.env}/{CACHE_DIR}"

    def run_env(self) -> dict[str, str]:
        """The environment the stack's proofs and servers run with: the stack's own, and its cache's."""
        return {**dict(self.proof_env), **(cache_env(self.cache) if self.cache else {})}

    def python_command(self) -> str:
        """The proof's Python as a shell command, every word quoted."""
        return " ".join([*(f"{k}={q(v)}" for k, v in self.run_env().items()), *map(q, self.proof_python)])


def engine_commands(engine: ContainerRuntime | None) -> tuple[str, tuple[str, ...]]:
    """The host's container engine and its compose command as argv words (docker and its v2 plugin where the
    facts name neither)."""
    runtime = engine.name if engine else "docker"
    return runtime, tuple(((engine.compose if engine else None) or f"{runtime} compose").split())


def target_for(facts: Facts, stack: Stack, name: str = NAME) -> Target:
    """Where *stack* lives on the host with *facts*, and how its proofs run (pure). In container mode a
    proof runs in a throwaway container of the image, on the host's network and GPUs (as the service does),
    with fleetctl's scripts and the smoke directory mounted at their own paths."""
    root = facts.fleet_root
    may = facts_privileges(facts)
    if stack.container_image is None:
        env_rel = f"envs/{stack.id}"
        return Target(root, stack.id, env_rel, (f"{root}/{env_rel}/bin/python",), tuple(stack.env.items()),
                      fleet_as_root=may.fleet_as_root, system=may.system)
    engine = facts.container_runtime
    runtime, compose = engine_commands(engine)
    try:
        gpus = tuple(gpu_run_args(runtime, len(facts.gpus), bool(engine and engine.nvidia_runtime),
                                  bool(engine and engine.cdi)))
    except ValueError:  # a GPU host whose engine cannot hand out GPUs: refused by the resolver
        gpus = ()
    env = [w for k, v in stack.env.items() for w in ("-e", f"{k}={v}")]
    python = (runtime, "run", "--rm", *gpus, "--ipc=host", "--network", "host", *env,
              "-v", f"{root}/lib:{root}/lib:ro", "-v", f"{root}/smoke:{root}/smoke", "--entrypoint", "python3",
              stack.container_image)
    return Target(root, stack.id, f"containers/{stack.id}", python, runtime=runtime, image=stack.container_image,
                  name=name, compose=compose, gpu_args=gpus, fleet_as_root=may.fleet_as_root, system=may.system)


@dataclass(frozen=True)
class HostState:
    """What the host has, read once before the steps plan."""

    marker: Mapping = field(default_factory=dict)  # the environment's marker; {} where missing or incomplete
    current: str | None = None  # where <root>/current points
    service: str | None = None  # <root>/service.stack: "<stack id> <settings digest>"
    service_alive: bool = False  # <root>/service.pid names a live process that is still the service
    previous: str | None = None  # where <root>/previous points
    systemd: bool = False  # the host runs systemd (/run/systemd/system): the service is a unit
    files: Mapping[str, str] = field(default_factory=dict)  # remote path → sha256, of files fleetctl ships
    model_config: Mapping | None = None  # the model directory's config.json, where one was asked for
    model_weights_mib: int | None = None  # the size of its weight files (None: no model directory read)
    image: ImageState = ImageState()  # container mode: the stack's image in the host's engine
    container: str | None = None  # container mode: the serving container's stack label, where it runs
    uv: str | None = None  # uv on the host's PATH, where it has one
    pip_config: tuple[str, ...] = ()  # where the host tells pip its index or find-links (files, PIP_* names)
    cache: Mapping = field(default_factory=dict)  # <env>/cache/fleetctl-cache.json: the class key its cache holds
    staged: Mapping[str, tuple[int, float]] = field(default_factory=dict)  # a staged model's files: size, mtime
    staged_verified: Mapping = field(default_factory=dict)  # and its marker (apply.models.VERIFIED)

    @property
    def installed(self) -> bool:
        return bool(self.marker)

    @property
    def validated(self) -> bool:
        return bool(self.marker.get("validated"))

    def after(self, puts: Iterable[tuple[str, str]]) -> HostState:
        """This state once files were copied ((remote path, sha256) pairs): no later step sends them again."""
        return replace(self, files={**self.files, **dict(puts)})


# A POSIX sh function (dash runs it): the pid in <root>/service.pid, printed only while that process is
# still the server that wrote it — its start time (/proc/PID/stat field 22) equals <root>/service.start —
# so a pid the kernel gave to another process since is never taken for the service, nor signalled.
# A service.pid without service.start (written by an older fleetctl) is believed only for a vLLM server.
SERVICE_PID = """service_pid() {
  sp=$(head -n 1 "$1/service.pid" 2>/dev/null) || return 1
  case "$sp" in ''|*[!0-9]*) return 1 ;; esac
  [ -r "/proc/$sp/stat" ] || return 1
  if [ -s "$1/service.start" ]; then
    [ "$(sed 's/.*) //' "/proc/$sp/stat" | cut -d' ' -f20)" = "$(head -n 1 "$1/service.start")" ] || return 1
  else
    tr '\\0' ' ' < "/proc/$sp/cmdline" | grep -q 'vllm.entrypoints.openai.api_server' || return 1
  fi
  echo "$sp"
}"""


# Where the host configures pip's packages' source (pip's own config files, in pip's order, and its
# environment; PIP_CONFIG_FILE=/dev/null turns the files off): uv reads none of them, so a host that has
# them installs with pip unless told otherwise (fleet_installer: uv).
PIP_CONFIG = ("""[ "${PIP_CONFIG_FILE:-}" = /dev/null ] || for f in ${PIP_CONFIG_FILE:-} /etc/xdg/pip/pip.conf /etc/pip.conf """
              """"$HOME/.pip/pip.conf" "$HOME/.config/pip/pip.conf"; do """
              """grep -qsE '^[[:space:]]*(index-url|extra-index-url|find-links|no-index)[[:space:]]*=' "$f" && echo "$f"; done; """
              """env | sed -n 's/^\\(PIP_\\(INDEX_URL\\|EXTRA_INDEX_URL\\|FIND_LINKS\\|NO_INDEX\\)\\)=.*/\\1/p'""")


def state_script(target: Target, wheelhouse: str | None = None, model: str | None = None,
                 staged: str | None = None) -> str:
    """One read-only command printing every section :func:`parse_state` reads."""
    root = q(target.root)
    lines = [f"echo @@marker; cat {q(target.marker)} 2>/dev/null",
             f"echo; echo @@current; readlink {root}/current 2>/dev/null",
             f"echo @@service; cat {root}/service.stack 2>/dev/null",
             SERVICE_PID, f"service_pid {root} >/dev/null && echo alive",
             f"echo @@previous; readlink {root}/previous 2>/dev/null",
             "echo @@init; [ -d /run/systemd/system ] && echo systemd",
             f"systemctl is-active --quiet {UNIT} 2>/dev/null && echo unit-active",
             f"echo @@lib; (cd {root}/lib 2>/dev/null && sha256sum -- {' '.join(LIB_SCRIPTS)} 2>/dev/null)",
             f"echo @@bin; (cd {root}/bin 2>/dev/null && sha256sum -- uv 2>/dev/null)",
             "echo @@uv; command -v uv 2>/dev/null",
             *([f"echo @@cache; cat {q(target.cache)}/{CACHE_MARKER} 2>/dev/null; echo"] if target.cache else []),
             f"echo @@pip-config; {PIP_CONFIG}"]
    if target.container:
        lines += [image_state_script(target.runtime, target.image),
                  f"echo @@container; {target.runtime} inspect --format "
                  f"'{{{{.State.Running}}}} {{{{index .Config.Labels \"fleetctl.stack\"}}}}' {q(target.name)} 2>/dev/null"]
    if wheelhouse:
        lines.append(f"echo @@wheelhouse; (cd {q(wheelhouse)} 2>/dev/null && sha256sum -- * 2>/dev/null)")
    if model:
        lines.append(f"echo @@model; cat {q(model)}/config.json 2>/dev/null")
        weights = " ".join(f"{q(model)}/*{suffix}" for suffix in WEIGHT_SUFFIXES)
        lines.append(f"[ -d {q(model)} ] && echo && echo @@weights && {{ stat -L -c %s -- {weights} 2>/dev/null; true; }}")
    if staged:
        lines.append(held_script(staged))
    return "\n".join([*lines, "true"])


def parse_state(text: str, target: Target, wheelhouse: str | None = None) -> HostState:
    """state_script's output → a HostState (a marker of another stack counts as none)."""
    sections = at_sections(text)
    marker = _json("\n".join(sections.get("marker", [])))
    service = [line.strip() for line in sections.get("service", []) if line.strip()]
    alive = bool(service) and service[-1] == "alive"
    init = {line.strip() for line in sections.get("init", [])}
    systemd = "systemd" in init
    files = {f"{where}/{line.split(None, 1)[1].strip()}": line.split()[0]
             for section, where in (("lib", f"{target.root}/lib"), ("bin", f"{target.root}/bin"),
                                    ("wheelhouse", wheelhouse))
             for line in sections.get(section, []) if "  " in line}
    running = [line.split()[1:] for line in sections.get("container", []) if line.startswith("true ")]
    return HostState(marker=marker if marker.get("id") == target.stack_id else {},
                     current="\n".join(sections.get("current", [])).strip() or None,
                     previous="\n".join(sections.get("previous", [])).strip() or None,
                     service=" ".join(service[:-1] if alive else service) or None,
                     # a login that cannot write units serves from a pid file, on a systemd host too
                     service_alive="unit-active" in init if systemd and target.system else alive, systemd=systemd,
                     files=files, model_config=_json("\n".join(sections.get("model", []))) or None,
                     model_weights_mib=_weights(sections.get("weights")),
                     image=parse_image_state(text) if target.container else ImageState(),
                     container=(running[0][0] if running[0] else "") if running else None,
                     uv=next((line.strip() for line in sections.get("uv", []) if line.startswith("/")), None),
                     pip_config=tuple(line.strip() for line in sections.get("pip-config", []) if line.strip()),
                     cache=_json("\n".join(sections.get("cache", []))),
                     staged=parse_held(sections.get("staged", [])),
                     staged_verified=_json("\n".join(sections.get("verified", []))))


def _weights(lines: list[str] | None) -> int | None:
    """The @@weights section (each weight file's bytes) → MiB; None where the model directory was not there."""
    if lines is None:
        return None
    return math.ceil(sum(int(w) for w in lines if w.strip().isdigit()) / 2 ** 20)


def _json(text: str) -> dict:
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def read_state(conn: Connection, target: Target, timeout: float, *, wheelhouse: str | None = None,
               model: str | None = None, staged: str | None = None) -> HostState:
    """The host's state now, in one round trip."""
    return parse_state(conn.run(state_script(target, wheelhouse, model, staged), timeout=timeout).stdout, target,
                       wheelhouse)
