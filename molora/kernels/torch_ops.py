"""Pure-torch compute paths for a bank of LoRA experts (the reference, and the CPU implementation).

Semantics shared by every path (``s`` = LoRA scaling, gates from a :class:`~molora.routers.Routing`)::

    delta[t] = sum over assignments (t, e, w) of  w * s * (x[t] @ A[e]) @ B[e]

Shapes: ``x[T, d_in]``, ``A[E, d_in, r]``, ``B[E, r, d_out]``, assignments ``token_index[N]``, ``expert_index[N]``,
``weight[N]``. Autograd flows to ``x``, ``A``, ``B`` and the gate weights (hence to the router). No path builds a
``[T, E, d_out]`` tensor.
"""

from __future__ import annotations

import torch

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


def grouped_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float) -> torch.Tensor:
    """Tokens sorted by expert, one shrink/expand matmul per non-empty expert segment, results scattered back.

    Costs ``N*r*(d_in + d_out)`` multiply-adds (only the assignments that exist), so it wins when experts are many
    or large relative to ``k``. Reads the segment sizes on the host (one synchronisation per call).
    """
    n_experts = A.shape[0]
    order = torch.argsort(routing.expert_index, stable=True)
    token_index = routing.token_index[order]
    weight = (routing.weight[order] * scaling).to(x.dtype)
    counts = torch.bincount(routing.expert_index, minlength=n_experts).tolist()
    xs = x.index_select(0, token_index)  # [N, d_in]
    # split, not slicing: the backward of E slices would write E zero-filled [N, d_in] gradients, that of one
    # split is a single concatenation
    # unbind, not indexing: the backward of E index operations would each write a zero-filled gradient the size
    # of the whole bank (E^2 work), that of one unbind stacks the experts' gradients once
    experts_A, experts_B = A.unbind(0), B.unbind(0)
    outs = [(seg @ experts_A[e]) @ experts_B[e] for e, seg in enumerate(xs.split(counts)) if counts[e] > 0]
    out = x.new_zeros(x.shape[0], B.shape[-1])
    if not outs:
        # keep A and B in the graph so that every parameter receives a (zero) gradient
        return out + 0.0 * (A.sum() + B.sum())
    ys = torch.cat(outs) * weight.unsqueeze(-1)  # [N, d_out]
    return out.index_add(0, token_index, ys)
