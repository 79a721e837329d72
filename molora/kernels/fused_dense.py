"""The dense-masked path fused with the frozen base projection: two autograd functions instead of a dozen ops.

An adapted ``nn.Linear`` (or ``Conv1D``) computes ``y = base(x) + (x @ A_flat ⊙ gates) @ B_flat``. Written with
plain torch ops, autograd runs the base projection and the adapter as separate branches: two GEMMs read ``x`` for
the input gradient and an addition sums them, the adapter's output is a fresh ``[T, d_out]`` tensor added to the base
output, and each elementwise step keeps its own buffers. Here:

* :func:`base_and_shrink` computes the base output, the rank activations and (given the router's weight) the
  router's logits in one function, the latter two from one GEMM ``x @ S`` with ``S = [A_flat | W_router^T]``; its
  backward writes the input gradient once: ``dx = dY @ W`` then ``dx += dH @ S^T`` in place (``addmm_``), no extra
  ``[T, d_in]`` buffer or pass, and hands ``A`` and the router their gradients in their own layouts;
* :func:`gated_expand_` scales each expert's rank columns by its gate (times the LoRA scaling) and adds
  ``hg @ B_flat`` into the base output in place (``addmm_``): no ``[T, d_out]`` delta, no separate addition; its
  backward passes ``dY`` through unchanged;
* :func:`dense_topk_layer` is both with the top-k router's function (``molora.kernels.fused_router``) between them, as
  one autograd node: what a training forward of the built-in ``topk`` router runs.

Same results as the unfused path (tests/test_fused_dense.py compares outputs and every gradient). Only for frozen base
weights (the adapter never trains them) and the dense path; the layer falls back to the general path otherwise.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .fused_router import (
    FUSED_BALANCE_TYPES,
    MissingGrads,
    SelectionRule,
    check_rule,
    losses_or_placeholders,
    placeholders_to_none,
    topk_backward,
    topk_forward,
    topk_save,
)
from .torch_ops import flat_shrink_weight


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    # without it (inference, generation) the functions below run their forward directly: an autograd.Function call
    # costs tens of microseconds, which is most of a decode step's work in a small layer
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _base_and_shrink_forward(x, weight, bias, bank, router_weight, conv1d, shrink=None):
    if conv1d:
        out = torch.addmm(bias, x, weight) if bias is not None else x @ weight
    else:
        out = F.linear(x, weight, bias)
    # [A_flat | W_router^T]: one GEMM over x for all experts' rank columns and the router's logits
    if shrink is None:
        shrink = flat_shrink_weight(bank, router_weight)
    return out, x @ shrink


def _split_rank_and_logits(hl, bank, router_weight):
    if router_weight is None:
        return hl, None
    n_experts, _, rank = bank.shape
    return hl[:, : n_experts * rank], hl[:, n_experts * rank :]


class _BaseAndShrink(torch.autograd.Function):
    """``(base(x), x @ A_flat, x @ W_router^T)`` for a frozen base weight; see :func:`base_and_shrink`."""

    @staticmethod
    def forward(ctx, x, weight, bias, bank, router_weight, conv1d):  # noqa: D102
        out, hl = _base_and_shrink_forward(x, weight, bias, bank, router_weight, conv1d)
        ctx.conv1d = conv1d
        needs_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        # the bank and the router's weight, not the [A_flat | W_router^T] built from them: a copy of every layer's
        # bank would stay alive until its backward (rebuilt there, one layer at a time)
        ctx.save_for_backward(x if needs_x else None, weight, bank, router_weight)
        return (out, *_split_rank_and_logits(hl, bank, router_weight))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_h, grad_logits):  # noqa: D102
        x, weight, bank, router_weight = ctx.saved_tensors
        grad_hl = grad_h if grad_logits is None else torch.cat([grad_h, grad_logits], dim=1)
        grad_x, grad_bank, grad_router = _base_and_shrink_backward(
            grad_out,
            grad_hl,
            x,
            weight,
            bank,
            router_weight,
            ctx.conv1d,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[3],
            ctx.needs_input_grad[4],
        )
        return grad_x, None, None, grad_bank, grad_router, None


class _Shrink(torch.autograd.Function):
    """``x @ [A_flat | W_router^T]`` saving ``A`` and ``W_router`` rather than the matrix built from them; see
    :func:`shrink_matmul`."""

    @staticmethod
    def forward(ctx, x, bank, router_weight):  # noqa: D102
        ctx.save_for_backward(x if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None, bank, router_weight)
        return x @ flat_shrink_weight(bank, router_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_hl):  # noqa: D102
        x, bank, router_weight = ctx.saved_tensors
        return _base_and_shrink_backward(None, grad_hl, x, None, bank, router_weight, False, *ctx.needs_input_grad)


def shrink_matmul(x: torch.Tensor, bank: torch.Tensor, router_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x[T, d_in] @ [A_flat | W_router^T]`` (:func:`~molora.kernels.torch_ops.flat_shrink_weight`): the experts'
    rank activations and the router's logits of the dense path when the base projection runs on its own (a quantized
    base). With autograd it keeps ``A`` and the router's weight for backward instead of the concatenated copy (one per
    layer, alive until the layer's backward). Not under autocast (its products would be recast; the caller checks)."""
    if not _needs_autograd(x, bank, router_weight):
        return x @ flat_shrink_weight(bank, router_weight)
    return _Shrink.apply(x, bank, router_weight)


def _base_and_shrink_backward(
    grad_out, grad_hl, x, weight, bank, router_weight, conv1d, needs_x, needs_bank, needs_router
):
    """``(dx, dA, dW_router)`` of :func:`base_and_shrink` from ``dY`` and ``[dH | dlogits]`` (``None`` where not
    needed)."""
    grad_x = grad_bank = grad_router = None
    if needs_x:
        shrink = flat_shrink_weight(bank, router_weight)
        if grad_out is None:  # only the router's losses were differentiated (dense_topk_layer)
            grad_x = grad_hl @ shrink.t()
        else:
            grad_x = grad_out @ (weight.t() if conv1d else weight)
            grad_x.addmm_(grad_hl, shrink.t())
    if needs_bank or needs_router:
        # dH^T x rather than x^T dH: the same product, ~20% faster for these skinny shapes on a CPU
        grad_rows = grad_hl.t() @ x  # [E*r (+ E_router), d_in]
        n_experts, d_in, rank = bank.shape
        if needs_bank:
            grad_bank = grad_rows[: n_experts * rank].view(n_experts, rank, d_in).transpose(1, 2)
        if needs_router:
            # a copy: as a view, AccumulateGrad would keep it as the router's `.grad` (its layout matches) and with it
            # the whole [E*r + E, d_in] buffer until the gradients are zeroed (the bank's view is copied anyway)
            grad_router = grad_rows[n_experts * rank :].clone()
    return grad_x, grad_bank, grad_router


def _gated_expand_forward(out, h, gates, b_flat, scaling):
    """``out += scaling * (h ⊙ gates) @ b_flat`` in place (the scaling is the GEMM's ``alpha``). The same operations
    with and without autograd, so that a frozen copy of an adapter run without gradient (TRL's reference adapter)
    gives bit for bit the outputs of the trained one, also when the scaling is not a power of two and the products
    run in bf16."""
    out.addmm_(_gated(h, gates), b_flat, alpha=scaling)


def _gated(h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``h ⊙ gates`` for ``h[T, E*r]`` and ``gates[T, E]`` (cast to ``h``'s dtype), ``[T, E*r]``: the forward's
    gated activations, not saved beside ``h`` (:func:`_gated_expand_backward` builds them again, scaled)."""
    g = gates if gates.dtype == h.dtype else gates.to(h.dtype)
    # reshape/view rather than unflatten/flatten (Tensor.unflatten is a Python method): the same product, fewer calls
    # in a decode step's small layers
    n_tokens, n_experts = g.shape
    width = h.shape[1]
    return (h.reshape(n_tokens, n_experts, width // n_experts) * g.unsqueeze(-1)).view(n_tokens, width)


class _GatedExpand(torch.autograd.Function):
    """``out += (h ⊙ gates * scaling) @ B_flat`` in place; see :func:`gated_expand_`."""

    @staticmethod
    def forward(ctx, out, h, gates, b_flat, scaling):  # noqa: D102
        _gated_expand_forward(out, h, gates, b_flat, scaling)
        ctx.mark_dirty(out)
        ctx.scaling = scaling
        ctx.save_for_backward(h, gates, b_flat)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        h, gates, b_flat = ctx.saved_tensors
        grad_h, grad_gates, grad_b = _gated_expand_backward(
            grad_out, h, gates, b_flat, ctx.scaling, *ctx.needs_input_grad[1:4]
        )
        if grad_gates is not None:
            grad_gates = grad_gates.to(gates.dtype)
        return grad_out, grad_h, grad_gates, grad_b, None


def _gated_expand_backward(grad_out, h, gates, b_flat, scaling, needs_h, needs_gates, needs_b):
    """``(dH, dgates, dB_flat)`` of :func:`gated_expand_` (``dgates`` in ``h``'s dtype; ``None`` where not needed)."""
    # views, not unflatten/flatten (Python methods), and the scaled gates shared by dH and dB: a small layer's backward
    # is mostly per-operator overhead
    n_tokens, n_experts = gates.shape
    width = h.shape[1]
    h3 = h.reshape(n_tokens, n_experts, width // n_experts)
    scaled = (gates * scaling).to(h.dtype).unsqueeze(-1)  # [T, E, 1]
    grad_h = grad_gates = grad_b = None
    if needs_h or needs_gates:
        grad_hg = (grad_out @ b_flat.t()).view(h3.shape)
    if needs_h:
        grad_h = (grad_hg * scaled).view(n_tokens, width)
    if needs_gates:
        grad_gates = (grad_hg * h3).sum(dim=-1).mul_(scaling)
    if needs_b:
        # d(scaling * (h ⊙ gates) @ B)/dB, the gated activations built again from h and the gates (not saved)
        grad_b = (h3 * scaled).view(n_tokens, width).t() @ grad_out
    return grad_h, grad_gates, grad_b


def base_and_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bank: torch.Tensor,
    router_weight: torch.Tensor | None = None,
    conv1d: bool = False,
    shrink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The frozen base projection of ``x[T, d_in]``, the experts' rank activations and the router's logits.

    ``weight``/``bias`` are an ``nn.Linear``'s (``[d_out, d_in]``) or, with ``conv1d=True``, a transformers
    ``Conv1D``'s (``[d_in, d_out]``); they get no gradient (they must not require one). ``bank`` is the experts'
    ``A[E, d_in, r]``; ``router_weight[E_router, d_in]`` (optional) a linear router's weight, whose logits come out
    of the same GEMM (it may score more columns than there are experts: AdaMoE's null experts).

    ``shrink``: ``flat_shrink_weight(bank, router_weight)`` computed by the caller (a cache), used only when no
    gradient is needed; with autograd the function builds it.

    Returns ``(base(x)[T, d_out], h[T, E*r], logits[T, E_router] or None)``; expert ``e`` owns columns
    ``e*r .. e*r + r - 1`` of ``h``. ``h`` and ``logits`` are views of one buffer: do not modify them in place.
    """
    if not _needs_autograd(x, bank, router_weight):
        out, hl = _base_and_shrink_forward(x, weight, bias, bank, router_weight, conv1d, shrink)
        return (out, *_split_rank_and_logits(hl, bank, router_weight))
    return _BaseAndShrink.apply(x, weight, bias, bank, router_weight, conv1d)


def gated_expand_(
    out: torch.Tensor, h: torch.Tensor, gates: torch.Tensor, b_flat: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """Add ``(h ⊙ gates * scaling) @ b_flat`` to ``out[T, d_out]`` in place and return it.

    ``h[T, E*r]`` are the rank activations (expert ``e`` owns columns ``e*r .. e*r + r - 1``), ``gates[T, E]`` the
    dense gates (any float dtype; cast to ``h``'s), ``scaling`` the LoRA scaling, ``b_flat[E*r, d_out]`` the stacked
    ``B`` bank. ``out`` must be a tensor nothing else reads (the base output from :func:`base_and_shrink`).
    """
    if not _needs_autograd(out, h, gates, b_flat):
        _gated_expand_forward(out, h, gates, b_flat, scaling)  # nothing to save for a backward
        return out
    return _GatedExpand.apply(out, h, gates, b_flat, scaling)


class _DenseTopK(torch.autograd.Function):
    """:func:`base_and_shrink`, the top-k selection with its losses and :func:`gated_expand_` as one node; see
    :func:`dense_topk_layer`."""

    @staticmethod
    def forward(  # noqa: D102
        ctx,
        x,
        weight,
        bias,
        bank,
        b_flat,
        router_weight,
        conv1d,
        scaling,
        k,
        renormalize,
        valid,
        balance_type,
        with_z,
        missing_grads,
        selection_bias,
        sigmoid_scores,
        rule,
        entropy_loss,
    ):
        ctx.set_materialize_grads(False)
        out, hl = _base_and_shrink_forward(x, weight, bias, bank, router_weight, conv1d)
        # one split rather than two slices (no autograd inside: the multi-output view is never differentiated)
        h, logits = hl.split_with_sizes([b_flat.shape[0], hl.shape[1] - b_flat.shape[0]], 1)
        routed, state = topk_forward(
            logits, k, renormalize, valid, balance_type, with_z, selection_bias, sigmoid_scores, rule, entropy_loss
        )
        _gated_expand_forward(out, h, routed[0], b_flat, scaling)
        ctx.conv1d, ctx.scaling = conv1d, scaling
        ctx.renormalize, ctx.missing_grads = renormalize, missing_grads
        needs = ctx.needs_input_grad
        # the bank and router weight rather than [A_flat | W_router^T], h and the gates rather than h ⊙ gates: the
        # backward builds those again (one layer at a time) instead of every layer keeping them until its backward
        ctx.save_for_backward(
            x if needs[3] or needs[5] else None,
            weight,
            bank,
            router_weight,
            h,
            routed[0],
            b_flat,
            *topk_save(ctx, routed, state, rule),
        )
        routed, placeholders = losses_or_placeholders(routed, out)
        gates, balance, z_loss, probs, expert_index, top_probs, entropy, active = routed
        # one call (a second one would replace the marks of the first)
        marked = [gates, probs, expert_index, top_probs, *placeholders] + ([active] if rule is not None else [])
        ctx.mark_non_differentiable(*marked)
        return out, gates, balance, z_loss, probs, expert_index, top_probs, entropy, active

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _gates, grad_balance, grad_z, _probs, _index, _weight, grad_entropy, _active):  # noqa: D102
        x, weight, bank, router_weight, h, gates, b_flat, *routed = ctx.saved_tensors
        needs_x, _, _, needs_bank, needs_b, needs_router = ctx.needs_input_grad[:6]
        grad_sel = grad_b = grad_x = grad_bank = grad_router = None
        if not (needs_x or needs_bank or needs_router):
            # only B trains: nothing upstream of the rank activations and the logits
            if grad_out is not None and needs_b:
                grad_b = _gated_expand_backward(grad_out, h, gates, b_flat, ctx.scaling, False, False, True)[2]
            return None, None, None, None, grad_b, *([None] * 13)
        if grad_out is not None:
            grad_h, grad_gates, grad_b = _gated_expand_backward(
                grad_out, h, gates, b_flat, ctx.scaling, True, True, needs_b
            )
            grad_sel = grad_gates.gather(-1, routed[1])
        else:
            grad_h = torch.zeros_like(h)
        grad_logits = topk_backward(
            routed,
            ctx.inv_n,
            ctx.renormalize,
            grad_sel,
            grad_balance,
            grad_z,
            ctx.missing_grads,
            grad_entropy,
            ctx.rule,
        )
        # [dH | dlogits]: the input gradient and the bank's and router's gradients are then one GEMM each over it (a
        # concatenation measured faster than writing both halves into one buffer through strided `out=` views)
        grad_hl = torch.cat([grad_h, grad_logits], dim=1)
        grad_x, grad_bank, grad_router = _base_and_shrink_backward(
            grad_out, grad_hl, x, weight, bank, router_weight, ctx.conv1d, needs_x, needs_bank, needs_router
        )
        return grad_x, None, None, grad_bank, grad_b, grad_router, *([None] * 12)


def dense_topk_layer(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bank: torch.Tensor,
    b_flat: torch.Tensor,
    router_weight: torch.Tensor,
    scaling: float,
    k: int,
    *,
    conv1d: bool = False,
    renormalize: bool = True,
    valid: torch.Tensor | None = None,
    balance_type: str | None = None,
    z_loss: bool = False,
    missing_grads: MissingGrads | None = None,
    selection_bias: torch.Tensor | None = None,
    sigmoid_scores: bool = False,
    rule: SelectionRule | None = None,
    entropy_loss: bool = False,
) -> tuple[torch.Tensor, ...]:
    """A frozen projection with top-k-routed experts on the dense path, forward and backward in one autograd node.

    The same values and gradients as :func:`base_and_shrink` (with the router's weight), then
    :func:`~molora.kernels.fused_router.topk_gates_and_losses` on the logits and :func:`gated_expand_` with the
    gates, written as one function: a training forward records one node per adapted projection instead of three. On a
    small model, where MoLoRA's cost is mostly operator and Python overhead per layer, a training step gets 4-6 %
    faster (docs/kernels.md); for wide layers it makes no measurable difference.

    Args mirror those functions: ``x[T, d_in]``, the base ``weight``/``bias`` (no gradient; ``conv1d``: a
    transformers ``Conv1D``'s layout), ``bank`` = ``A[E, d_in, r]``, ``b_flat[E*r, d_out]``, ``router_weight[E,
    d_in]`` (a linear router: exactly one logit per expert), the LoRA ``scaling``, then the top-k options (a
    selection ``rule`` and its ``entropy_loss`` included: the top-p routers).

    Returns:
        ``(out[T, d_out], gates[T, E], balance, z, probs[T, E], expert_index[T, k], weight[T, k], entropy,
        active[T, E])``: the layer output (base + experts) and the three requested losses (``None`` when not
        requested) are differentiable; the routing tensors are not (every gradient of the routing reaches the router
        through ``out`` and the losses); ``active`` is ``None`` without a ``rule``.
    """
    if balance_type is not None and balance_type not in FUSED_BALANCE_TYPES:
        raise ValueError(f"`balance_type`={balance_type!r} is not one of {FUSED_BALANCE_TYPES} (or None).")
    if router_weight.shape[0] != bank.shape[0]:
        raise ValueError(
            f"`router_weight` scores {router_weight.shape[0]} columns for {bank.shape[0]} experts; the top-k layer "
            "function needs one logit per expert."
        )
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"`k`={k} must be between 1 and the number of experts ({bank.shape[0]}).")
    if sigmoid_scores and selection_bias is None:
        raise ValueError("`sigmoid_scores=True` is the loss-free balancing router's: it needs `selection_bias`.")
    check_rule(rule, k, bank.shape[0], selection_bias, entropy_loss)
    outputs = _DenseTopK.apply(
        x,
        weight,
        bias,
        bank,
        b_flat,
        router_weight,
        conv1d,
        scaling,
        k,
        renormalize,
        valid,
        balance_type,
        z_loss,
        missing_grads,
        selection_bias,
        sigmoid_scores,
        rule,
        entropy_loss,
    )
    return placeholders_to_none(outputs, 2, balance_type, z_loss, entropy_loss, rule)
