"""Pure-torch compute paths for a bank of LoRA experts (the reference, and the CPU implementation).

Semantics shared by every path (``s`` = LoRA scaling, gates from a :class:`~molora.routers.Routing`)::

    delta[t] = sum over assignments (t, e, w) of  w * s * (x[t] @ A[e]) @ B[e]

Shapes: ``x[T, d_in]``, ``A[E, d_in, r]``, ``B[E, r, d_out]``, assignments ``token_index[N]``, ``expert_index[N]``,
``weight[N]``. Autograd flows to ``x``, ``A``, ``B`` and the gate weights (hence to the router). No path builds a
``[T, E, d_out]`` tensor (the grouped path's ``[N, d_out]`` rows would be one for a routing where every token uses
every expert: :func:`molora.kernels.expert_delta` sends those to the dense path).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..routers.base import Routing


def naive_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float) -> torch.Tensor:
    """Per-expert loop over all tokens, weighted by the dense gates. Slow; the reference the others are tested on."""
    gates = routing.dense_gates().to(x.dtype)  # [T, E]
    out = x.new_zeros(x.shape[0], B.shape[-1])
    for e in range(A.shape[0]):
        out = out + gates[:, e : e + 1] * ((x @ A[e]) @ B[e])
    return out * scaling


def dense_masked_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float
) -> torch.Tensor:
    """One GEMM into all ``E*r`` rank columns, gates scattered over each expert's ``r`` columns, one GEMM out.

    Exact for any routing; costs ``T*E*r*(d_in + d_out)`` multiply-adds whatever the sparsity, so it wins when
    ``E*r`` is small (the usual MoLoRA regime: a handful of rank-8 experts).
    """
    return dense_masked_expand(x @ flat_shrink_weight(A), B, routing, scaling)


def flat_shrink_weight(A: torch.Tensor, router_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``A[E, d_in, r]`` as one ``[d_in, E*r]`` matrix: column ``e*r + j`` is rank column ``j`` of expert ``e``.

    With ``router_weight[E_router, d_in]``, its transpose follows as ``E_router`` more columns (``[A_flat |
    W_router^T]``: one GEMM over ``x`` then gives the rank activations and the router's logits). Built as one
    concatenation of the experts' ``[d_in, r]`` slices: on a CPU about twice as fast as ``A.permute(1, 0, 2)``
    followed by a reshape and a second concatenation (this copy runs in every forward).
    """
    parts = list(A.unbind(0))
    if router_weight is not None:
        parts.append(router_weight.t().contiguous())
    return torch.cat(parts, dim=1)


def dense_masked_expand(h: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float) -> torch.Tensor:
    """Second half of the dense-masked path: gate the rank activations ``h[T, E*r]`` and expand with ``B``.

    Split out so that a caller which computed ``h`` itself (the layer fuses the router's scoring into the same
    GEMM, see :meth:`molora.adapters.layer.MoLoraLayer._expert_output`) can finish the path.
    """
    n_experts, rank, d_out = B.shape
    n_tokens = h.shape[0]
    gates = (routing.dense_gates() * scaling).to(h.dtype)  # [T, E]
    h = (h.view(n_tokens, n_experts, rank) * gates.unsqueeze(-1)).view(n_tokens, n_experts * rank)
    return h @ B.reshape(n_experts * rank, d_out)


# run eagerly under torch.compile: the segment sizes are read on the host, and Dynamo would guard on their values (a
# recompilation at nearly every call, until its limit)
@torch.compiler.disable
def grouped_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float) -> torch.Tensor:
    """Tokens sorted by expert, one shrink/expand matmul per non-empty expert segment, results scattered back.

    Costs ``N*r*(d_in + d_out)`` multiply-adds (only the assignments that exist), so it wins when experts are many
    or large relative to ``k``. Reads the segment sizes on the host (one synchronisation per call). With gradients,
    one autograd node (:class:`_GroupedExperts`) that keeps only the ``[N, r]`` rank activations for backward. In an
    autocast region the products run in its dtype, as ``@`` would there.
    """
    n_experts = A.shape[0]
    order = torch.argsort(routing.expert_index, stable=True)
    token_index = routing.token_index[order]
    counts = torch.bincount(routing.expert_index, minlength=n_experts).tolist()
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # cast as autocast casts a matmul's operands (differentiably), then compute with it off: the products below
        # write into preallocated buffers, which autocast would not cast
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _grouped(x.to(dtype), A.to(dtype), B.to(dtype), routing.weight[order], scaling, token_index, counts)
    return _grouped(x, A, B, routing.weight[order], scaling, token_index, counts)


def _grouped(x, A, B, weight, scaling, token_index, counts):
    weight = (weight * scaling).to(x.dtype)
    if not any(counts):
        # keep A and B in the graph so that every parameter receives a (zero) gradient
        return x.new_zeros(x.shape[0], B.shape[-1]) + 0.0 * (A.sum() + B.sum())
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, A, B, weight)):
        return _GroupedExperts.apply(x, A, B, weight, token_index, counts)
    return _grouped_forward(x, A, B, weight, token_index, counts)[0]


def _segments(counts: list[int]):
    """``(expert, start, end)`` of every non-empty expert segment of the sorted assignments."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
        start += count


def _grouped_forward(x, A, B, weight, token_index, counts):
    """``(delta[T, d_out], h[N, r])``: the grouped path's forward with the gated weights ``weight[N]`` applied to the
    rank activations ``h``. Its ``[N, d_in]`` and ``[N, d_out]`` temporaries are not kept."""
    xs = x.index_select(0, token_index)  # [N, d_in]
    h = xs.new_empty(xs.shape[0], A.shape[-1])
    for e, start, end in _segments(counts):
        torch.mm(xs[start:end], A[e], out=h[start:end])
    del xs
    hg = h * weight.unsqueeze(-1)
    ys = hg.new_empty(hg.shape[0], B.shape[-1])
    for e, start, end in _segments(counts):
        torch.mm(hg[start:end], B[e], out=ys[start:end])
    return x.new_zeros(x.shape[0], B.shape[-1]).index_add_(0, token_index, ys), h


class _GroupedExperts(torch.autograd.Function):
    """The grouped path as one autograd node: it keeps only the rank activations ``h[N, r]`` for backward (autograd
    over the plain ops kept the gathered rows ``[N, d_in]`` and the expanded rows ``[N, d_out]``), and regathers the
    input rows there; the gate gradient is ``<dL/dhg, h>`` over ``r`` columns instead of ``d_out``."""

    @staticmethod
    def forward(ctx, x, A, B, weight, token_index, counts):  # noqa: D102
        out, h = _grouped_forward(x, A, B, weight, token_index, counts)
        ctx.save_for_backward(x, A, B, weight, token_index, h)
        ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        x, A, B, weight, token_index, h = ctx.saved_tensors
        counts = ctx.counts
        need_x, need_A, need_B, need_w = ctx.needs_input_grad[:4]
        grad_x = grad_A = grad_B = grad_w = None
        gy = grad_out.index_select(0, token_index)  # [N, d_out]
        gate = weight.unsqueeze(-1)
        if need_B:
            hg = h * gate
            grad_B = torch.zeros_like(B)
            for e, start, end in _segments(counts):
                torch.mm(hg[start:end].t(), gy[start:end], out=grad_B[e])
            del hg
        ghg = h.new_empty(h.shape)  # dL/d(h * gate), [N, r]
        for e, start, end in _segments(counts):
            torch.mm(gy[start:end], B[e].t(), out=ghg[start:end])
        del gy
        if need_w:
            grad_w = (ghg * h).sum(-1)
        if not (need_x or need_A):
            return grad_x, grad_A, grad_B, grad_w, None, None
        gh = ghg * gate
        # the gathered rows, regathered; each segment's rows are overwritten by its input gradient once its expert's
        # gradient has read them (one [N, d_in] buffer for both)
        rows = x.index_select(0, token_index) if need_A else x.new_empty(h.shape[0], x.shape[-1])
        if need_A:
            grad_A = torch.zeros_like(A)
        for e, start, end in _segments(counts):
            if need_A:
                torch.mm(rows[start:end].t(), gh[start:end], out=grad_A[e])
            if need_x:
                torch.mm(gh[start:end], A[e].t(), out=rows[start:end])
        if need_x:
            grad_x = torch.zeros_like(x).index_add_(0, token_index, rows)
        return grad_x, grad_A, grad_B, grad_w, None, None
