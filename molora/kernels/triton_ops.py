"""Triton kernels for the expert bank: SGMV-style grouped shrink and expand with the gate fused, and their backward.

The assignments are sorted by expert once; expert ``e`` owns the contiguous segment ``[start_e, start_{e+1})`` of
the sorted assignments. Three kernels cover forward and backward (``tok[n]`` = token of sorted assignment ``n``,
``w[n]`` = its gate times the LoRA scaling)::

    _sgmv:       out[o(n)] (+)= s(n) * in[i(n)] @ W[e(n)]         shrink: h[n] = x[tok[n]] @ A[e]
                                                                  expand: out[tok[n]] += w[n] * h[n] @ B[e]
                                                                  backward: g[n] = dY[tok[n]] @ B[e]^T,
                                                                            dx[tok[n]] += dh[n] @ A[e]^T
    _seg_outer:  G[e] = sum_{n in e} L[l(n)]^T R[r(n)]             dA[e] = x[tok]^T dh,  dB[e] = (w h)^T dY[tok]

``i``, ``o``, ``l``, ``r`` are either the identity or the gather/scatter through ``tok``: token rows are read in place,
never copied into a ``[N, d_in]`` buffer. A token has several experts, so its output rows are combined: for a
token-major routing with ``Routing.per_token = k`` each product row is stored once at its token-major position in a
``[T * k, d]`` buffer and the ``k`` rows of a token are summed (no atomics); otherwise rows are added atomically
into an fp32 ``[T, d]`` buffer. Gate gradients are ``dw[n] = <g[n], h[n]>`` and ``dh[n] = w[n] * g[n]`` on
``[N, r]`` tensors in torch. Everything accumulates in fp32. With fp32 inputs the products are exact fp32
(``input_precision="ieee"``, no TF32); with bf16/fp16 inputs the operands of each product are cast to that dtype
(tensor cores) and accumulate in fp32, as cuBLAS does for PEFT's LoRA in those dtypes.

Block sizes depend on the kind of product (``shrink``: wide reduction into a few rank columns; ``expand``: a few
rank columns into a wide output; ``outer``: the weight gradients) and were chosen from measurements on an H200
(``scripts/bench_triton.py``); :data:`BLOCK_OVERRIDES` replaces them (for tuning).

Importing this module needs ``triton``. The kernels run on CUDA tensors, or on CPU tensors when the environment
variable ``TRITON_INTERPRET=1`` is set *before* this module is first imported (Triton's interpreter; slow, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..routers.base import Routing

#: kind -> (BLOCK_M, BLOCK_N, BLOCK_K, num_warps); for the outer products (BLOCK_M rows per step, BLOCK_P, BLOCK_Q,
#: num_warps). Kinds: ``shrink``, ``expand``, ``outer_a`` (``dA``: P = d_in wide, Q = rank), ``outer_b`` (``dB``:
#: P = rank, Q = d_out wide). Empty by default; ``scripts/bench_triton.py --tune`` fills it to sweep configurations.
BLOCK_OVERRIDES: dict[str, tuple[int, int, int, int]] = {}


def _pow2_at_least_16(n: int, cap: int = 64) -> int:
    # tl.dot needs every block dimension >= 16; the rank side of a product is as small as the rank allows
    return max(16, min(cap, triton.next_power_of_2(max(1, n))))


def _blocks(kind: str, n_k: int, n_n: int) -> tuple[int, int, int, int]:
    if kind in BLOCK_OVERRIDES:
        return BLOCK_OVERRIDES[kind]
    # the best of scripts/bench_triton.py --tune on an H200 (bf16, T=16384, d=4096, E=8 r=16 and E=64 r=8)
    if kind == "shrink":  # [rows, n_k] @ [n_k, rank]: n_k wide, n_n = rank
        return 128, _pow2_at_least_16(n_n), 64, 4
    if kind == "expand":  # [rows, rank] @ [rank, n_n]: n_k = rank, n_n wide
        return 64, 64, _pow2_at_least_16(n_k), 4
    if kind == "outer_a":  # [n_k = d_in, rows] @ [rows, n_n = rank]
        return 64, 128, _pow2_at_least_16(n_n), 4
    # outer_b: [n_k = rank, rows] @ [rows, n_n = d_out]
    return 64, _pow2_at_least_16(n_k), 128, 4


def _low_precision(*tensors: torch.Tensor) -> tuple[bool, bool]:
    """(LOW_PRECISION, IS_BF16) for the kernels: products in bf16/fp16 when the token-side input is 16-bit."""
    dtype = tensors[0].dtype
    if dtype in (torch.bfloat16, torch.float16):
        return True, dtype == torch.bfloat16
    return False, False


@triton.jit
def _sgmv(
    inp,
    in_idx,
    weight,
    out,
    out_idx,
    scale,
    seg_start,
    n_k,
    n_n,
    stride_in,
    stride_we,
    stride_wk,
    stride_wn,
    stride_out,
    HAS_IN_IDX: tl.constexpr,
    HAS_OUT_IDX: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ATOMIC: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    start = tl.load(seg_start + expert)
    end = tl.load(seg_start + expert + 1)
    rows = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_n
    if HAS_IN_IDX:
        in_rows = tl.load(in_idx + rows, mask=row_mask, other=0)
    else:
        in_rows = rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_k
        a = tl.load(
            inp + in_rows[:, None] * stride_in + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
        b = tl.load(
            weight + expert * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if LOW_PRECISION:
            if IS_BF16:
                acc += tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
            else:
                acc += tl.dot(a.to(tl.float16), b.to(tl.float16))
        else:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if HAS_SCALE:
        gate = tl.load(scale + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * gate[:, None]
    if HAS_OUT_IDX:
        out_rows = tl.load(out_idx + rows, mask=row_mask, other=0)
    else:
        out_rows = rows
    ptrs = out + out_rows[:, None] * stride_out + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _seg_outer(
    left,
    left_idx,
    right,
    right_idx,
    out,
    seg_start,
    n_p,
    n_q,
    stride_left,
    stride_right,
    stride_oe,
    stride_op,
    HAS_LEFT_IDX: tl.constexpr,
    HAS_RIGHT_IDX: tl.constexpr,
    LOW_PRECISION: tl.constexpr,
    IS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    expert = tl.program_id(0)
    start = tl.load(seg_start + expert)
    end = tl.load(seg_start + expert + 1)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = ps < n_p
    q_mask = qs < n_q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        if HAS_LEFT_IDX:
            l_rows = tl.load(left_idx + rows, mask=row_mask, other=0)
        else:
            l_rows = rows
        if HAS_RIGHT_IDX:
            r_rows = tl.load(right_idx + rows, mask=row_mask, other=0)
        else:
            r_rows = rows
        lt = tl.load(
            left + l_rows[:, None] * stride_left + ps[None, :], mask=row_mask[:, None] & p_mask[None, :], other=0.0
        )
        rt = tl.load(
            right + r_rows[:, None] * stride_right + qs[None, :], mask=row_mask[:, None] & q_mask[None, :], other=0.0
        )
        if LOW_PRECISION:
            if IS_BF16:
                acc += tl.dot(tl.trans(lt.to(tl.bfloat16)), rt.to(tl.bfloat16))
            else:
                acc += tl.dot(tl.trans(lt.to(tl.float16)), rt.to(tl.float16))
        else:
            acc += tl.dot(tl.trans(lt.to(tl.float32)), rt.to(tl.float32), input_precision="ieee")
    ptrs = out + expert * stride_oe + ps[:, None] * stride_op + qs[None, :]
    tl.store(ptrs, acc, mask=p_mask[:, None] & q_mask[None, :])


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _sgmv_call(
    kind, inp, in_idx, weight_strides, weight, out, out_idx, scale, seg_start, max_seg, n_k, n_n, atomic, lp
):
    n_experts = seg_start.numel() - 1
    if max_seg == 0 or n_n == 0:
        return
    block_m, block_n, block_k, warps = _blocks(kind, n_k, n_n)
    grid = (n_experts, _cdiv(max_seg, block_m), _cdiv(n_n, block_n))
    dummy = seg_start
    _sgmv[grid](
        inp,
        in_idx if in_idx is not None else dummy,
        weight,
        out,
        out_idx if out_idx is not None else dummy,
        scale if scale is not None else inp,
        seg_start,
        n_k,
        n_n,
        inp.stride(0),
        *weight_strides,
        out.stride(0),
        HAS_IN_IDX=in_idx is not None,
        HAS_OUT_IDX=out_idx is not None,
        HAS_SCALE=scale is not None,
        ATOMIC=atomic,
        LOW_PRECISION=lp[0],
        IS_BF16=lp[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )


def _seg_outer_call(left, left_idx, right, right_idx, seg_start, n_experts, lp):
    n_p, n_q = left.shape[1], right.shape[1]
    out = torch.zeros(n_experts, n_p, n_q, device=left.device, dtype=torch.float32)
    # which side is the rank: dA = x^T dh has the wide side first, dB = (w h)^T dY second
    kind = "outer_a" if n_p >= n_q else "outer_b"
    block_m, block_p, block_q, warps = _blocks(kind, n_p, n_q)
    grid = (n_experts, _cdiv(n_p, block_p), _cdiv(n_q, block_q))
    dummy = seg_start
    _seg_outer[grid](
        left,
        left_idx if left_idx is not None else dummy,
        right,
        right_idx if right_idx is not None else dummy,
        out,
        seg_start,
        n_p,
        n_q,
        left.stride(0),
        right.stride(0),
        out.stride(0),
        out.stride(1),
        HAS_LEFT_IDX=left_idx is not None,
        HAS_RIGHT_IDX=right_idx is not None,
        LOW_PRECISION=lp[0],
        IS_BF16=lp[1],
        BLOCK_M=block_m,
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        num_warps=warps,
    )
    return out


class _SGMVExperts(torch.autograd.Function):
    """``delta = sum_n w[n] * x[tok[n]] @ A[e_n] @ B[e_n]`` over assignments sorted by expert; see the module doc."""

    @staticmethod
    def forward(ctx, x, A, B, weight, tok, seg_start, max_seg, order, per_token):  # noqa: D102
        n_tokens, d_in = x.shape
        n_experts, _, rank = A.shape
        d_out = B.shape[-1]
        x = x.contiguous()
        lp = _low_precision(x)
        h = torch.empty(tok.numel(), rank, device=x.device, dtype=torch.float32)
        _sgmv_call("shrink", x, tok, A.stride(), A, h, None, None, seg_start, max_seg, d_in, rank, False, lp)
        w = weight.float().contiguous()
        out = _scatter_rows(
            "expand", h, B.stride(), B, w, tok, order, per_token, seg_start, max_seg, rank, d_out, n_tokens, x, lp
        )
        ctx.save_for_backward(x, A, B, w, tok, seg_start, h, order)
        ctx.max_seg = max_seg
        ctx.per_token = per_token
        ctx.lp = lp
        ctx.dtypes = (x.dtype, A.dtype, B.dtype, weight.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        x, A, B, w, tok, seg_start, h, order = ctx.saved_tensors
        max_seg, lp = ctx.max_seg, ctx.lp
        n_experts, d_in, rank = A.shape
        d_out = B.shape[-1]
        grad_out = grad_out.contiguous()
        # g[n] = dY[tok[n]] @ B[e]^T: the transposed B is read through its strides
        g = torch.empty(tok.numel(), rank, device=x.device, dtype=torch.float32)
        b_t = (B.stride(0), B.stride(2), B.stride(1))
        _sgmv_call("shrink", grad_out, tok, b_t, B, g, None, None, seg_start, max_seg, d_out, rank, False, lp)
        grad_w = (g * h).sum(dim=-1)
        dh = g * w.unsqueeze(-1)
        a_t = (A.stride(0), A.stride(2), A.stride(1))
        grad_x = _scatter_rows(
            "expand", dh, a_t, A, None, tok, order, ctx.per_token, seg_start, max_seg, rank, d_in, x.shape[0], x, lp
        )
        grad_A = _seg_outer_call(x, tok, dh, None, seg_start, n_experts, lp)
        grad_B = _seg_outer_call(h * w.unsqueeze(-1), None, grad_out, tok, seg_start, n_experts, lp)
        x_dtype, a_dtype, b_dtype, w_dtype = ctx.dtypes
        return grad_x, grad_A.to(a_dtype), grad_B.to(b_dtype), grad_w.to(w_dtype), None, None, None, None, None


def _scatter_rows(
    kind, rows, weight_strides, weight, scale, tok, order, per_token, seg_start, max_seg, n_k, n_n, n_tokens, like, lp
):
    """``out[tok[n]] += scale[n] * rows[n] @ W[e(n)]`` for the sorted assignments ``n``, as a ``[T, n_n]`` tensor of
    ``like``'s dtype.

    With a token-major routing of ``per_token`` assignments per token, each product row is stored once at its
    token-major position in a ``[T * per_token, n_n]`` buffer (no atomics) and the rows of a token are summed;
    otherwise the rows are added atomically into an fp32 ``[T, n_n]`` buffer. Both accumulate in fp32.
    """
    if per_token:
        buf = torch.empty(n_tokens * per_token, n_n, device=like.device, dtype=like.dtype)
        _sgmv_call(
            kind, rows, None, weight_strides, weight, buf, order, scale, seg_start, max_seg, n_k, n_n, False, lp
        )
        return buf.view(n_tokens, per_token, n_n).sum(dim=1, dtype=torch.float32).to(like.dtype)
    out = torch.zeros(n_tokens, n_n, device=like.device, dtype=torch.float32)
    _sgmv_call(kind, rows, None, weight_strides, weight, out, tok, scale, seg_start, max_seg, n_k, n_n, True, lp)
    return out.to(like.dtype)


def triton_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float) -> torch.Tensor:
    """The expert bank through the Triton SGMV kernels; same signature and semantics as the torch paths."""
    n_experts = A.shape[0]
    order = torch.argsort(routing.expert_index, stable=True)
    tok = routing.token_index[order].contiguous()
    weight = routing.weight[order] * scaling
    counts = torch.bincount(routing.expert_index, minlength=n_experts)
    seg_start = torch.zeros(n_experts + 1, dtype=torch.int64, device=x.device)
    seg_start[1:] = torch.cumsum(counts, 0)
    # an expert holds at most one assignment per token, so min(tokens, assignments) rows bound every segment: the
    # grid is sized from shapes known on the host, without reading the counts back (no synchronisation); programs
    # past the end of their segment return at once
    max_seg = min(x.shape[0], tok.numel())
    # token-major routings with a fixed number of assignments per token (top-k, soft) take the atomic-free expand
    per_token = routing.per_token if routing.per_token and tok.numel() == x.shape[0] * routing.per_token else 0
    return _SGMVExperts.apply(
        x, A.contiguous(), B.contiguous(), weight, tok, seg_start, max_seg, order.contiguous(), per_token
    )
