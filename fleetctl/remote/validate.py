"""The validation kernel shipped to each host: proves the attention path that host will serve with.

Run with the new environment's Python, alone (it never imports fleetctl or vllm):
    python validate.py --expect-gpus N --expect-cc 9.0[,8.6] --backend NAME|none
                       [--flashinfer|--no-flashinfer] [--sampler] [--tolerance 0.02] [--proof-memory]
It owns one verdict: does torch see the GPUs the facts promised, and does the attention kernel
(FlashInfer decode + prefill and a CUDA-graph replay of the decode, or torch SDPA where FlashInfer
does not apply, or SDPA on the CPU) match a higher-precision reference within the tolerance; with
--sampler, FlashInfer's top-k/top-p sampler (vLLM's sampler on CUDA) must keep every draw inside
its row's top k. Its first calls JIT-build those modules into FlashInfer's cache, so the server
that the smoke test starts next finds them built.
With --proof-memory (beside a serving stack) it first checks that the GPUs have room for it (gpumem.py,
shipped beside this file) and caps torch's allocator at that share; where they have not, it fails at
once naming the MiB free and needed.
It prints exactly one JSON line on stdout and exits 0 on pass, 1 on fail; anything the kernels
print (FlashInfer's JIT build) is sent to stderr so the last stdout line is always the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def load_gpumem():
    """The memory rule (gpumem.py), wanted only with --proof-memory: imported then, so the script also runs
    where it is fed on stdin with nothing beside it (audit --validate writes nothing on the host)."""
    if __package__:
        from . import gpumem  # imported as fleetctl.remote.*
    else:  # run as a script from <root>/lib, where fleetctl ships gpumem.py beside it (or loaded by path)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gpumem
    return gpumem


HEADS, KV_HEADS, HEAD_DIM, KV_LEN, PREFILL_LEN = 32, 8, 128, 1024, 128
GRAPH_REPLAYS = 200
ALLREDUCE_MIB, ALLREDUCE_WARMUP, ALLREDUCE_ITERS = 256, 2, 5
FLASHINFER_MIN_CC = (7, 5)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--expect-gpus", type=int, required=True)
    p.add_argument("--expect-cc", type=parse_cc_list, default=[], help="comma list, e.g. 9.0,8.6")
    p.add_argument("--backend", default="none", help="the vLLM attention backend the plan chose, or none")
    p.add_argument("--flashinfer", action=argparse.BooleanOptionalAction, default=None,
                   help="validate FlashInfer's kernels (default: only when --backend is FLASHINFER)")
    p.add_argument("--sampler", action="store_true", help="also prove FlashInfer's top-k/top-p sampler")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--allreduce-min-gbps", type=float, default=None,
                   help="on hosts of 2+ GPUs, the bus bandwidth NCCL's all-reduce over all of them must reach")
    p.add_argument("--proof-memory", action="store_true",
                   help="check the GPUs have room for the kernels now, and cap torch's allocator at it")
    return p.parse_args(argv)


def parse_cc_list(text: str) -> list[str]:
    """'9.0, 8.6' → ['9.0', '8.6']; '90' and '9' are read as 9.0, the way facts sometimes write them."""
    out = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        if "." not in part:
            part = f"{part[:-1]}.{part[-1]}" if len(part) > 1 else f"{part}.0"
        major, minor = part.split(".")
        out.append(f"{int(major)}.{int(minor)}")
    return out


def check(name: str, ok: bool, detail: str, **figures) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail, **figures}


def verdict(checks: list[dict], error: str | None) -> str:
    return "pass" if checks and error is None and all(c["ok"] for c in checks) else "fail"


def cc_matches(seen: list[str], expected: list[str]) -> bool:
    # Set equality, not order: eight H100s are "--expect-cc 9.0", a mixed host lists each kind once.
    return not expected or set(seen) == set(expected)


def wants_flashinfer(args: argparse.Namespace) -> bool:
    return args.flashinfer if args.flashinfer is not None else args.backend.upper() == "FLASHINFER"


# --- references and kernels (torch is imported lazily so the helpers above load without it) ---

def reference_attention(q, k, v, causal: bool, dtype):
    """Plain softmax(qk^T/sqrt(d))v in `dtype`; q is [Lq, H, D], k/v [Lk, Hkv, D] (GQA: repeat kv heads)."""
    import torch
    q, k, v = (t.to(dtype) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        # Bottom-right aligned, as FlashInfer and SDPA decode treat a shorter query.
        lq, lk = q.shape[0], k.shape[0]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def sdpa(q, k, v, causal: bool):
    """torch SDPA with the same [L, H, D] layout as FlashInfer; kv heads repeated for old torch."""
    import torch.nn.functional as F
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          is_causal=causal and q.shape[0] == k.shape[0])
    return out.transpose(0, 1)


def max_err(out, ref) -> float:
    return float((out.to(ref.dtype) - ref).abs().max())


def inputs(lq: int, lk: int, dtype, device):
    import torch
    q = torch.randn(lq, HEADS, HEAD_DIM, dtype=dtype, device=device)
    k = torch.randn(lk, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
    return q, k, torch.randn_like(k)


def timed(fn, sync=lambda: None):
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def graph_check(torch, decode, k, v, ref_dtype) -> tuple[float, float]:
    """Capture one decode in a CUDA graph, replay it with a new q: (max error, µs per replay)."""
    static_q = torch.randn(HEADS, HEAD_DIM, dtype=k.dtype, device=k.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph requires
        for _ in range(2):
            decode(static_q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode(static_q, k, v)
    new_q = torch.randn_like(static_q)
    static_q.copy_(new_q)
    graph.replay()
    torch.cuda.synchronize()
    err = max_err(static_out, reference_attention(new_q[None], k, v, False, ref_dtype)[0])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GRAPH_REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return err, start.elapsed_time(end) * 1000 / GRAPH_REPLAYS


def validate_gpu(torch, index: int, use_flashinfer: bool, tol: float) -> tuple[dict, list[dict]]:
    """One GPU's figures and checks: decode, causal prefill and a CUDA-graph replay of decode."""
    torch.cuda.set_device(index)
    torch.manual_seed(index)
    dev, f32 = torch.device("cuda", index), torch.float32
    props = torch.cuda.get_device_properties(index)
    gpu = {"index": index, "name": props.name, "cc": f"{props.major}.{props.minor}",
           "path": "flashinfer" if use_flashinfer else "sdpa"}
    if use_flashinfer:
        import flashinfer
        decode = flashinfer.single_decode_with_kv_cache
        prefill = lambda q, k, v: flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True)  # noqa: E731
    else:
        decode = lambda q, k, v: sdpa(q[None], k, v, False)[0]  # noqa: E731
        prefill = lambda q, k, v: sdpa(q, k, v, True)  # noqa: E731
    q, k, v = inputs(1, KV_LEN, torch.float16, dev)
    out, gpu["first_call_s"] = timed(lambda: decode(q[0], k, v), torch.cuda.synchronize)  # JIT build, if any
    gpu["decode_max_err"] = max_err(out, reference_attention(q, k, v, False, f32)[0])
    _, seconds = timed(lambda: decode(q[0], k, v), torch.cuda.synchronize)
    gpu["decode_ms"] = seconds * 1000
    pq, pk, pv = inputs(PREFILL_LEN, PREFILL_LEN, torch.float16, dev)
    out, gpu["prefill_first_call_s"] = timed(lambda: prefill(pq, pk, pv), torch.cuda.synchronize)
    gpu["prefill_max_err"] = max_err(out, reference_attention(pq, pk, pv, True, f32))
    gpu["graph_max_err"], gpu["graph_replay_us"] = graph_check(torch, decode, k, v, f32)
    tag = f"gpu{index} {gpu['path']}"
    checks = [check(f"{tag} decode", gpu["decode_max_err"] < tol, f"max abs err {gpu['decode_max_err']:.2e} vs fp32"),
              check(f"{tag} prefill", gpu["prefill_max_err"] < tol, f"max abs err {gpu['prefill_max_err']:.2e} (causal)"),
              check(f"{tag} cuda graph", gpu["graph_max_err"] < tol,
                    f"replay err {gpu['graph_max_err']:.2e}, {gpu['graph_replay_us']:.1f} us/replay")]
    return gpu, checks


def sampler_check(torch, index: int) -> tuple[dict, dict]:
    """FlashInfer's top-k/top-p sampling from logits, as vLLM calls it: every draw within its row's top k."""
    import flashinfer
    batch, vocab, top_k = 8, 32000, 20
    gen = torch.Generator(device=f"cuda:{index}").manual_seed(index)
    logits = torch.randn(batch, vocab, device=f"cuda:{index}", generator=gen, dtype=torch.float32) * 4
    k = torch.full((batch,), top_k, device=logits.device, dtype=torch.int32)
    p = torch.full((batch,), 0.9, device=logits.device, dtype=torch.float32)
    draws, seconds = timed(lambda: flashinfer.sampling.top_k_top_p_sampling_from_logits(
        logits.contiguous(), k, p, deterministic=True), torch.cuda.synchronize)
    allowed = logits.topk(top_k, dim=-1).indices
    inside = bool((allowed == draws.view(-1, 1).long()).any(dim=-1).all())
    figures = {"sampler_first_call_s": seconds}
    return figures, check(f"gpu{index} flashinfer sampler", inside,
                          f"{batch} draws from top-{top_k}/top-p 0.9 {'all' if inside else 'NOT all'} inside the top k "
                          f"(first call {seconds:.1f} s)")


def busbw_gbps(size_bytes: int, seconds: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce, in GB/s: the algorithm bandwidth × 2(n-1)/n, the
    share of the data each link carries in a ring, so the figure compares across GPU counts."""
    return size_bytes / seconds * 2 * (ranks - 1) / ranks / 1e9


def allreduce_rank(rank: int, ranks: int, init: str, backend: str, mib: int, out: str) -> None:
    """One rank of the all-reduce (a process of its own, as NCCL wants): ALLREDUCE_WARMUP then
    ALLREDUCE_ITERS sums of *mib* MiB of ones; rank 0 writes the timing and whether the sum is exact."""
    import torch
    import torch.distributed as dist
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=ranks)
    try:
        x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=f"cuda:{rank}" if cuda else "cpu")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(ALLREDUCE_WARMUP):
            dist.all_reduce(x)
        sync()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(ALLREDUCE_ITERS):
            dist.all_reduce(x)
        sync()
        seconds = (time.perf_counter() - start) / ALLREDUCE_ITERS
        exact = float(x[0]) == float(ranks) ** (ALLREDUCE_WARMUP + ALLREDUCE_ITERS) and float(x[-1]) == float(x[0])
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"seconds": seconds, "exact": exact}, f)
    finally:
        dist.destroy_process_group()


def allreduce(torch, ranks: int, min_gbps: float | None, backend: str = "nccl", mib: int = ALLREDUCE_MIB) -> dict:
    """The host's all-reduce check: one process per GPU (torch.multiprocessing), *mib* MiB a message;
    its bus bandwidth judged against *min_gbps* where the controller knows the model's figure."""
    if ranks < 2:
        return check("allreduce", True, "one GPU: no all-reduce to measure (skipped)", applies=False)
    import socket
    import tempfile
    import torch.multiprocessing as mp
    with socket.socket() as s:  # a free port for the ranks' rendezvous, on loopback only
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "rank0.json")
        mp.spawn(allreduce_rank, args=(ranks, init, backend, mib, out), nprocs=ranks, join=True)
        with open(out) as f:
            result = json.load(f)
    gbps = busbw_gbps(mib * 2**20, result["seconds"], ranks)
    fast = min_gbps is None or gbps >= min_gbps
    judged = f", needs {min_gbps} GB/s" if min_gbps is not None else " (no expected figure: not judged)"
    detail = f"{backend} all-reduce of {mib} MiB over {ranks} ranks: bus bandwidth {gbps:.1f} GB/s{judged}"
    if not result["exact"]:
        detail += "; the sum is WRONG"
    return check("allreduce", fast and result["exact"], detail, busbw_gbps=round(gbps, 1), ranks=ranks,
                 mib=mib, seconds=result["seconds"], min_gbps=min_gbps)


def run_gpu(torch, args) -> tuple[list[dict], list[dict]]:
    count = torch.cuda.device_count()
    ccs = ["{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(count)]
    checks = [check("gpu count", count == args.expect_gpus, f"torch sees {count}, expected {args.expect_gpus}"),
              check("compute capability", cc_matches(ccs, args.expect_cc),
                    f"seen {sorted(set(ccs))}, expected {args.expect_cc or 'any'}")]
    gpus = []
    for i, cc in enumerate(ccs):
        major, minor = map(int, cc.split("."))
        use_fi = wants_flashinfer(args) and (major, minor) >= FLASHINFER_MIN_CC
        if wants_flashinfer(args) and not use_fi:
            checks.append(check(f"gpu{i} flashinfer", args.backend.upper() != "FLASHINFER",
                                f"cc {cc} is below FlashInfer's {FLASHINFER_MIN_CC}; validated SDPA instead"))
        elif args.backend.upper() == "FLASHINFER" and not use_fi:
            checks.append(check(f"gpu{i} flashinfer", False, "backend FLASHINFER but FlashInfer not validated"))
        try:
            gpu, gpu_checks = validate_gpu(torch, i, use_fi, args.tolerance)
            if args.sampler and use_fi:
                figures, sampled = sampler_check(torch, i)
                gpu.update(figures)
                gpu_checks.append(sampled)
        except Exception as exc:  # one GPU's failure is its own check; the others still run
            gpu, gpu_checks = {"index": i, "cc": cc}, [check(f"gpu{i} kernels", False, f"{type(exc).__name__}: {exc}")]
        gpus.append(gpu)
        checks += gpu_checks
    try:  # after the kernels, which leave their GPUs to the ranks' processes
        checks.append(allreduce(torch, count, args.allreduce_min_gbps))
    except Exception as exc:
        checks.append(check("allreduce", False, f"all-reduce over {count} GPUs failed: {type(exc).__name__}: {exc}"))
    return gpus, checks


def scaled_tolerance(torch, dtype, tol: float) -> float:
    """The tolerance is set for fp16; bfloat16 keeps 3 fewer mantissa bits, so its rounding alone
    (a causal prefill row that sees one token returns v itself, |v| up to ~4) needs 8x the room."""
    return tol * max(1.0, torch.finfo(dtype).eps / torch.finfo(torch.float16).eps)


def run_cpu(torch, args) -> list[dict]:
    """The CPU attention path: SDPA in float32 and bfloat16 against a float64 reference."""
    torch.manual_seed(0)
    checks = [check("gpu count", args.expect_gpus == 0, f"no CUDA; expected {args.expect_gpus} GPUs"),
              check("flashinfer", not wants_flashinfer(args), "does not apply on a CPU host", applies=False)]
    for dtype in (torch.float32, torch.bfloat16):
        name, tol = str(dtype).replace("torch.", ""), scaled_tolerance(torch, dtype, args.tolerance)
        q, k, v = inputs(1, KV_LEN, dtype, "cpu")
        out, seconds = timed(lambda: sdpa(q, k, v, False))
        err = max_err(out, reference_attention(q, k, v, False, torch.float64))
        checks.append(check(f"cpu sdpa decode {name}", err < tol, f"max abs err {err:.2e} vs fp64",
                            max_err=err, tolerance=tol, ms=seconds * 1000))
        q, k, v = inputs(PREFILL_LEN, PREFILL_LEN, dtype, "cpu")
        out, seconds = timed(lambda: sdpa(q, k, v, True))
        err = max_err(out, reference_attention(q, k, v, True, torch.float64))
        checks.append(check(f"cpu sdpa prefill {name}", err < tol, f"max abs err {err:.2e} (causal)",
                            max_err=err, tolerance=tol, ms=seconds * 1000))
    return checks


def size_memory(torch, report: dict) -> bool:
    """Room for the kernels on every GPU (gpumem's rule, read through NVML before torch touches a GPU), and
    torch's allocator capped at it; False (with the verdict's error set) where a GPU lacks it."""
    gpumem = load_gpumem()
    gpus = gpumem.read_gpus()
    gpus = gpumem.visible(gpus, len(gpus))
    if not gpus:
        report["memory"] = None
        return True
    sizing = gpumem.size(gpus, gpumem.VALIDATE_NEED_MIB)
    report["memory"] = sizing.to_dict()
    if not sizing.fits:
        report["error"] = gpumem.refusal("the validation kernel", sizing)
        report["verdict"] = "fail"
        return False
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(sizing.fraction, index)
    return True


def run(args) -> dict:
    report = {"verdict": "fail", "device": None, "backend": args.backend, "checks": [], "gpus": [], "error": None}
    try:
        start = time.perf_counter()
        import torch
        report["torch"] = torch.__version__
        report["import_s"] = time.perf_counter() - start
        if torch.cuda.is_available():
            report["device"] = "cuda"
            if args.proof_memory and not size_memory(torch, report):
                return report
            report["gpus"], report["checks"] = run_gpu(torch, args)
        else:
            report["device"] = "cpu"
            report["checks"] = run_cpu(torch, args)
    except Exception as exc:  # a host's failure is a verdict, never a traceback on stdout
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["verdict"] = verdict(report["checks"], report["error"])
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    # Point fd 1 at stderr while kernels run: nvcc and FlashInfer's JIT write to stdout directly.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    report = run(args)
    stdout.write(json.dumps(report) + "\n")
    stdout.flush()
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
