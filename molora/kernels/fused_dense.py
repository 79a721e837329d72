"""The dense-masked path fused with the frozen base projection: two autograd functions instead of a dozen ops.

An adapted ``nn.Linear`` (or ``Conv1D``) computes ``y = base(x) + (x @ A_flat ⊙ gates) @ B_flat``. Written with
plain torch ops, autograd runs the base projection and the adapter as separate branches: two GEMMs read ``x`` for
the input gradient and an addition sums them, the adapter's output is a fresh ``[T, d_out]`` tensor added to the base
output, and each elementwise step keeps its own buffers. Here:

* :func:`base_and_shrink` computes the base output and the rank activations (plus the router's logits, when the
  caller appends the router's weight to the shrink matrix) in one function; its backward writes the input gradient
  once: ``dx = dY @ W`` then ``dx += dH @ S^T`` in place (``addmm_``), no extra ``[T, d_in]`` buffer or pass;
* :func:`gated_expand_` scales each expert's rank columns by its gate and adds ``hg @ B_flat`` into the base output
  in place (``addmm_``): no ``[T, d_out]`` delta, no separate addition; its backward passes ``dY`` through unchanged.

Same results as the unfused path (tests/test_kernels.py compares outputs and every gradient). Only for frozen base
weights (the adapter never trains them) and the dense path; the layer falls back to the general path otherwise.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class _BaseAndShrink(torch.autograd.Function):
    """``(base(x), x @ S)`` for a frozen base weight; see :func:`base_and_shrink`."""

    @staticmethod
    def forward(ctx, x, weight, bias, shrink, conv1d):  # noqa: D102
        if conv1d:
            out = torch.addmm(bias, x, weight) if bias is not None else x @ weight
        else:
            out = F.linear(x, weight, bias)
        hl = x @ shrink
        ctx.conv1d = conv1d
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, weight, shrink)
        return out, hl

    @staticmethod
    def backward(ctx, grad_out, grad_hl):  # noqa: D102
        x, weight, shrink = ctx.saved_tensors
        grad_x = grad_shrink = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ (weight.t() if ctx.conv1d else weight)
            grad_x.addmm_(grad_hl, shrink.t())
        if ctx.needs_input_grad[3]:
            # (dH^T x)^T rather than x^T dH: the same product, ~20% faster for these skinny shapes on a CPU
            grad_shrink = (grad_hl.t() @ x).t()
        return grad_x, None, None, grad_shrink, None


class _GatedExpand(torch.autograd.Function):
    """``out += (h ⊙ gates) @ B_flat`` in place; see :func:`gated_expand_`."""

    @staticmethod
    def forward(ctx, out, h, gates, b_flat):  # noqa: D102
        n_experts = gates.shape[1]
        h3 = h.unflatten(1, (n_experts, h.shape[1] // n_experts))
        hg = (h3 * gates.unsqueeze(-1)).flatten(1)
        out.addmm_(hg, b_flat)
        ctx.mark_dirty(out)
        ctx.save_for_backward(h, gates, b_flat, hg)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        h, gates, b_flat, hg = ctx.saved_tensors
        n_experts = gates.shape[1]
        grad_h = grad_gates = grad_b = None
        grad_hg = (grad_out @ b_flat.t()).unflatten(1, (n_experts, h.shape[1] // n_experts))
        if ctx.needs_input_grad[1]:
            grad_h = (grad_hg * gates.unsqueeze(-1)).flatten(1)
        if ctx.needs_input_grad[2]:
            grad_gates = (grad_hg * h.unflatten(1, grad_hg.shape[1:])).sum(dim=-1)
        if ctx.needs_input_grad[3]:
            grad_b = hg.t() @ grad_out
        return grad_out, grad_h, grad_gates, grad_b


def base_and_shrink(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shrink: torch.Tensor, conv1d: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base projection of ``x[T, d_in]`` and ``x @ shrink`` (``shrink[d_in, C]``), in one function.

    ``weight``/``bias`` are an ``nn.Linear``'s (``[d_out, d_in]``) or, with ``conv1d=True``, a transformers
    ``Conv1D``'s (``[d_in, d_out]``); they get no gradient (they must not require one). ``shrink`` is the flattened
    expert bank ``A_flat[d_in, E*r]``, optionally followed by the router's weight as extra columns.
    """
    return _BaseAndShrink.apply(x, weight, bias, shrink, conv1d)


def gated_expand_(out: torch.Tensor, h: torch.Tensor, gates: torch.Tensor, b_flat: torch.Tensor) -> torch.Tensor:
    """Add ``(h ⊙ gates) @ b_flat`` to ``out[T, d_out]`` in place and return it.

    ``h[T, E*r]`` are the rank activations (expert ``e`` owns columns ``e*r .. e*r + r - 1``), ``gates[T, E]`` the
    dense gates with the LoRA scaling folded in, ``b_flat[E*r, d_out]`` the stacked ``B`` bank. ``out`` must be a
    tensor nothing else reads (the base output from :func:`base_and_shrink`).
    """
    return _GatedExpand.apply(out, h, gates, b_flat)
