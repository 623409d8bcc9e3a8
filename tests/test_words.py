"""Words that mislead (issue 26, item 7): what a user reads must say what happened. A server that
accepts and closes is not a timeout; an installer's own exit status 3 is not a wheel mismatch; a
smoke test that could not start is not a previous stack that fails to serve."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

from fleetctl import Host, Status, fan_out, gather

from fleetctl.apply import steps
from fleetctl.reach.connection import Result
from fleetctl.status import parse_verdict
from tests.test_steps import context

SMOKE = Path(steps.__file__).parents[1] / "remote" / "smoke.py"


def test_a_server_that_accepts_then_closes_is_not_a_timeout():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def close_each():
        while True:
            client, _ = sock.accept()
            client.close()
    threading.Thread(target=close_each, daemon=True).start()
    host = Host("closer", {"ansible_host": "127.0.0.1", "ansible_port": sock.getsockname()[1],
                           "ansible_host_key_checking": False})
    outcome = fan_out([host], gather, timeout=60)["closer"]
    assert outcome.status == Status.UNREACHABLE, outcome
    assert "closed the connection" in outcome.error and "within 60s" not in outcome.error, outcome.error


def test_an_installers_own_exit_status_3_is_not_a_wheel_mismatch():
    """pip or uv exiting 3 was read as "a wheel on the host differs from the controller's"."""
    planned = steps.install(context())
    step = planned.outcome(Result("gpu-01", "install", 3, "", "error: uv: failed to resolve\n", 1.0))
    assert step.status == Status.FAILED and "differs" not in step.detail and "exit 3" in step.detail, step.detail
    said = f"{steps.INSTALL_FAULT} a wheel on the host differs from the controller's (sha256): x.whl; nothing was installed"
    step = planned.outcome(Result("gpu-01", "install", 1, "", said + "\n", 1.0))
    assert step.detail == "a wheel on the host differs from the controller's (sha256): x.whl; nothing was installed"


def test_a_smoke_test_that_could_not_start_does_not_say_the_old_stack_fails(tmp_path):
    """A read-only fleet root: smoke.py cannot make its work directory, so no server ever started;
    the journal said "smoke test there: fail (OSError …)" while the old stack still served."""
    from fleetctl.fleet.rollout import proof_words

    blocked = tmp_path / "file"
    blocked.write_text("")
    done = subprocess.run([sys.executable, str(SMOKE), "--port", "0", "--work", str(blocked / "smoke")],
                          capture_output=True, text=True, timeout=60)
    verdict = parse_verdict(done.stdout)
    assert verdict["verdict"] == "fail" and verdict["started"] is False, verdict
    serving, words = proof_words("envs/old", verdict)
    assert serving is None and "not proven" in words and "could not start" in words and "fail" not in words, words
    serving, words = proof_words("envs/old", {**verdict, "started": True, "error": "no tokens"})
    assert serving is False and words == "kept envs/old; smoke test there: fail (no tokens)"
    assert proof_words("envs/old", {"verdict": "pass", "started": True}) == (True, "kept envs/old; smoke test there: pass")
