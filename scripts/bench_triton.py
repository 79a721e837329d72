"""GPU benchmark of the expert-bank compute paths: Triton SGMV kernels against the torch paths, PEFT-style LoRA of the
same active rank, and the memory-bandwidth limit. CUDA only.

    python scripts/bench_triton.py --json triton.json            # the table of docs/kernels.md
    python scripts/bench_triton.py --tune --json tune.json       # also sweep the kernels' block sizes

What is timed (``triton.testing.do_bench``: CUDA events, L2 flushed between calls, median), for bf16 tensors:

* ``fwd``: the expert delta ``x[T, d] -> delta[T, d]`` of a bank ``A[E, d, r]``, ``B[E, r, d]`` under a top-k routing
  of random logits (the routing itself is computed once, outside the timing); ``fwd+bwd``: the same plus the backward
  into ``x``, ``A``, ``B`` and the gates;
* candidates: ``triton``, ``dense``, ``grouped`` (the paths of :mod:`molora.kernels`), ``lora r*k`` (two plain
  matmuls of rank ``r*k``: what PEFT's LoRA computes for the adapter), and ``base gemm`` (the frozen ``x @ W^T`` the
  adapter sits beside, for scale);
* the bandwidth floor: the bytes an adapter delta must move at least (read ``x``, write ``delta``; backward: read
  ``dY`` and ``x``, write ``dx``; plus the bank) over the device-to-device copy bandwidth measured at the start of the
  run. ``× floor`` = time / floor time: 1.0 would be a kernel limited by memory traffic alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molora.kernels import dense_masked_delta, expert_delta, grouped_delta  # noqa: E402
from molora.routers import topk_routing  # noqa: E402

SHAPES = [  # (tokens, width, E, k, r)
    (8192, 4096, 256, 2, 16),  # E*r = 4096 rank columns: where the dense path's FLOPs start to count
    (4096, 4096, 8, 2, 8),
    (16384, 4096, 8, 2, 8),
    (16384, 4096, 8, 2, 16),
    (16384, 4096, 64, 2, 8),
    (16384, 4096, 16, 2, 64),
    (512, 4096, 8, 2, 8),
]

DEVICE = ["cuda"]  # --device cpu (with TRITON_INTERPRET=1 and --tiny) smoke-tests this script without a GPU
TINY_SHAPES = [(40, 64, 4, 2, 8), (8, 64, 16, 2, 4)]

TUNE = {
    "shrink": [
        (16, 16, 64, 4),
        (32, 16, 64, 4),
        (64, 16, 64, 4),
        (64, 16, 128, 4),
        (128, 16, 64, 4),
        (128, 16, 128, 8),
        (64, 16, 256, 8),
        (32, 16, 128, 4),
    ],
    "expand": [
        (32, 64, 16, 4),
        (64, 64, 16, 4),
        (64, 128, 16, 4),
        (128, 64, 16, 4),
        (128, 128, 16, 8),
        (64, 256, 16, 8),
        (32, 128, 16, 4),
    ],
    "outer_a": [
        (32, 64, 16, 4),
        (64, 64, 16, 4),
        (64, 128, 16, 4),
        (128, 64, 16, 4),
        (32, 128, 16, 4),
        (128, 128, 16, 8),
    ],
    "outer_b": [
        (32, 16, 64, 4),
        (64, 16, 64, 4),
        (64, 16, 128, 4),
        (128, 16, 64, 4),
        (32, 16, 128, 4),
        (128, 16, 128, 8),
    ],
}


def do_bench(fn, warmup, rep, grad_to_none=None, return_mode="median"):
    """``triton.testing.do_bench`` on CUDA; a plain median of ``perf_counter`` timings elsewhere (smoke tests)."""
    if DEVICE[0] == "cuda":
        from triton.testing import do_bench as triton_do_bench

        return triton_do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode=return_mode)
    import statistics
    import time

    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(2**30 if DEVICE[0] == "cuda" else 2**20, dtype=torch.uint8, device=DEVICE[0])
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def make_case(tokens, width, n_experts, top_k, rank, dtype=None, seed=0):
    # bf16 on CUDA; fp32 in the CPU smoke test (the Triton interpreter computes bf16 products wrongly)
    dtype = dtype or (torch.bfloat16 if DEVICE[0] == "cuda" else torch.float32)
    gen = torch.Generator(device=DEVICE[0]).manual_seed(seed)
    x = torch.randn(tokens, width, device=DEVICE[0], dtype=dtype, generator=gen)
    A = (torch.randn(n_experts, width, rank, device=DEVICE[0], generator=gen) / width**0.5).to(dtype)
    B = (torch.randn(n_experts, rank, width, device=DEVICE[0], generator=gen) / rank**0.5).to(dtype)
    logits = torch.randn(tokens, n_experts, device=DEVICE[0], generator=gen)
    upstream = torch.randn(tokens, width, device=DEVICE[0], dtype=dtype, generator=gen)
    return x, A, B, logits, upstream


def candidates(x, A, B, logits, top_k):
    """``{name: forward(x, A, B, logits)}`` and the LoRA weights (whose gradients the timing resets)."""
    rank_k = A.shape[-1] * top_k
    width = x.shape[1]
    # LoRA's weights train: its backward computes their gradients too, as the bank's does
    lora_a = (torch.randn(width, rank_k, device=DEVICE[0]) / width**0.5).to(x.dtype).requires_grad_(True)
    lora_b = (torch.randn(rank_k, width, device=DEVICE[0]) / rank_k**0.5).to(x.dtype).requires_grad_(True)
    base_w = (torch.randn(width, width, device=DEVICE[0]) / width**0.5).to(x.dtype)
    scaling = 2.0

    def routed(path):
        def fn(x, A, B, logit_leaf):
            routing = topk_routing(torch.softmax(logit_leaf, -1), top_k, logits=logit_leaf)
            return path(x, A, B, routing, scaling)

        return fn

    fns = {
        "triton": routed(lambda *a: expert_delta(*a, kernel="triton")),
        "dense": routed(dense_masked_delta),
        "grouped": routed(grouped_delta),
        "lora r*k": lambda x, A, B, logit_leaf: (x @ lora_a) @ lora_b * scaling,
        "base gemm": lambda x, A, B, logit_leaf: x @ base_w.T,
    }
    return fns, [lora_a, lora_b]


def floor_bytes(x, A, B, backward: bool) -> int:
    item = x.element_size()
    tokens, width = x.shape
    bank = (A.numel() + B.numel()) * item
    forward = 2 * tokens * width * item + bank  # read x, write delta
    if not backward:
        return forward
    return forward + 3 * tokens * width * item + 2 * bank  # read dY and x, write dx; read the bank, write its grads


def bench_shape(shape, bandwidth, check: bool) -> list[dict]:
    tokens, width, n_experts, top_k, rank = shape
    x, A, B, logits, upstream = make_case(tokens, width, n_experts, top_k, rank)
    rows = []
    fns, extra_grads = candidates(x, A, B, logits, top_k)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, logits)]
    if check:
        ref = fns["dense"](*leaves).float()
        out = fns["triton"](*leaves).float()
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        rows.append({"shape": shape, "check": "triton vs dense fwd, max rel err", "value": err})
    for name, fn in fns.items():
        with torch.no_grad():
            fwd_ms = do_bench(lambda fn=fn: fn(x, A, B, logits), warmup=10, rep=50, return_mode="median")

        def step(fn=fn):
            out = fn(*leaves)
            out.backward(upstream)

        both_ms = do_bench(step, warmup=5, rep=50, grad_to_none=leaves + extra_grads, return_mode="median")
        fwd_floor = floor_bytes(x, A, B, False) / bandwidth * 1e3
        both_floor = floor_bytes(x, A, B, True) / bandwidth * 1e3
        rows.append(
            {
                "shape": shape,
                "candidate": name,
                "fwd_ms": fwd_ms,
                "fwd_bwd_ms": both_ms,
                "fwd_x_floor": fwd_ms / fwd_floor,
                "fwd_bwd_x_floor": both_ms / both_floor,
            }
        )
    lora = next(r for r in rows if r.get("candidate") == "lora r*k")
    for r in rows:
        if "candidate" in r:
            r["fwd_x_lora"] = r["fwd_ms"] / lora["fwd_ms"]
            r["fwd_bwd_x_lora"] = r["fwd_bwd_ms"] / lora["fwd_bwd_ms"]
    return rows


def tune(shape) -> list[dict]:
    """Time each kernel kind alone under each block configuration of :data:`TUNE`."""
    from molora.kernels import triton_ops as ops

    tokens, width, n_experts, top_k, rank = shape
    x, A, B, logits, upstream = make_case(tokens, width, n_experts, top_k, rank)
    routing = topk_routing(torch.softmax(logits, -1), top_k, logits=logits)
    order = torch.argsort(routing.expert_index, stable=True)
    tok = routing.token_index[order].contiguous()
    w = routing.weight[order].float().contiguous()
    counts = torch.bincount(routing.expert_index, minlength=n_experts)
    seg = torch.zeros(n_experts + 1, dtype=torch.int64, device=DEVICE[0])
    seg[1:] = torch.cumsum(counts, 0)
    max_seg = min(tokens, tok.numel())
    lp = ops._low_precision(x)
    h = torch.randn(tok.numel(), rank, device=DEVICE[0])
    out = torch.zeros(tokens, width, device=DEVICE[0])
    calls = {
        "shrink": lambda: ops._sgmv_call(
            "shrink", x, tok, A.stride(), A, h, None, None, seg, max_seg, width, rank, False, lp
        ),
        "expand": lambda: ops._sgmv_call(
            "expand", h, None, B.stride(), B, out, tok, w, seg, max_seg, rank, width, True, lp
        ),
        "outer_a": lambda: ops._seg_outer_call(x, tok, h, None, seg, n_experts, lp),
        "outer_b": lambda: ops._seg_outer_call(h, None, upstream, tok, seg, n_experts, lp),
    }
    rows = []
    for kind, configs in TUNE.items():
        for config in configs:
            ops.BLOCK_OVERRIDES.clear()
            ops.BLOCK_OVERRIDES[kind] = config
            try:
                ms = do_bench(calls[kind], warmup=5, rep=30, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is reported, not fatal
                ms = float("nan")
                print(f"  {kind} {config}: {type(exc).__name__}: {exc}"[:200], flush=True)
            rows.append({"shape": shape, "kind": kind, "config": config, "ms": ms})
            print(f"tune {shape} {kind} {config}: {ms:.4f} ms", flush=True)
        ops.BLOCK_OVERRIDES.clear()
        default_ms = do_bench(calls[kind], warmup=5, rep=30, return_mode="median")
        rows.append({"shape": shape, "kind": kind, "config": "default", "ms": default_ms})
        print(f"tune {shape} {kind} default: {default_ms:.4f} ms", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--tune", action="store_true", help="also sweep block sizes per kernel kind")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only smoke-tests the script (TRITON_INTERPRET=1)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    args = parser.parse_args(argv)
    DEVICE[0] = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_triton.py needs CUDA", file=sys.stderr)
        return 2
    if args.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print(
            "bench_triton.py --device cpu runs Triton's interpreter: set TRITON_INTERPRET=1 (and --tiny)",
            file=sys.stderr,
        )
        return 2
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    result = {"device": name, "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"# {result}", flush=True)
    if args.tune:
        result["tune"] = []
        for shape in TINY_SHAPES[:1] if args.tiny else [(16384, 4096, 8, 2, 16), (16384, 4096, 64, 2, 8)]:
            result["tune"] += tune(shape)
    result["rows"] = []
    print("| shape (T, d, E, k, r) | candidate | fwd ms | × LoRA | × floor | fwd+bwd ms | × LoRA | × floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in TINY_SHAPES if args.tiny else SHAPES:
        rows = bench_shape(shape, bandwidth, check=True)
        result["rows"] += rows
        for r in rows:
            if "check" in r:
                print(f"# {shape} {r['check']}: {r['value']:.2e}", flush=True)
                continue
            print(
                f"| {shape} | {r['candidate']} | {r['fwd_ms']:.3f} | {r['fwd_x_lora']:.2f} | {r['fwd_x_floor']:.2f} | "
                f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_x_lora']:.2f} | {r['fwd_bwd_x_floor']:.2f} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
