"""Top-k routing and its auxiliary losses as one autograd function with an analytic backward.

The top-k router written with plain torch ops (``softmax``, ``topk``, ``gather``, a renormalisation, a ``scatter``
into dense gates) plus the balancing loss (a one-hot of the selection, two column means, a dot product) records about
twenty operators per layer in the autograd graph, and about as many run again in backward. For a ``2048``-wide
projection that is a few percent of the layer; on a GPU, where each of them is a kernel launch, and for small models
it is most of what MoLoRA adds to LoRA. :func:`topk_gates_and_losses` computes the same values in one function
whose backward is written out (docs/algorithms.md 1.1 and 1.4):

* gates ``g = p_S / sum(p_S)`` of the ``k`` largest probabilities ``p = softmax(z)``:
  ``dL/dp_j = (dL/dg_j - sum_{i in S} g_i dL/dg_i) / sum(p_S)`` for ``j`` in ``S`` (``dL/dg_j`` without
  renormalisation), 0 elsewhere;
* balance ``L_b = E * sum_e f_e P_e`` with ``P_e`` the mean probability over valid tokens and ``f_e`` the load:
  ``dL_b/dp_te = E f_e / n_valid`` on valid tokens; a count-based load is constant, the ``"soft"`` load (the mean
  gate) adds ``dL_b/dg_te = E P_e / n_valid`` for each selected gate of a valid token;
* z-loss ``L_z = mean_t logsumexp(z_t)^2``: ``dL_z/dz_te = 2 lse_t p_te / n_valid`` on valid tokens;
* the softmax: ``dL/dz = p * (dL/dp - sum_e p_e dL/dp_e)``.

The same function computes the top-p family of selections (``topp``, ``dynmole``) when given a *selection rule*
(:class:`SelectionRule`): every expert is listed in descending order of probability, those the rule drops with a gate
of 0, so that the top-k formulas hold with the rule's 0/1 ``keep`` factor on each gate (``g_j = keep_j p_j``, or
``keep_j p_j / sum_i keep_i p_i`` renormalised); the count loads count the kept experts; and a per-token entropy loss
``L_H = mean_t H(p_t)`` (the rule supplies ``H`` and ``dH/dp``) adds ``dL_H/dp_te = dH_t/dp_te / n_valid`` on valid
tokens.

Same values and gradients as :func:`molora.routers.topk.topk_routing` followed by
:func:`molora.routers.balancing.load_balancing_loss` / :func:`~molora.routers.balancing.router_z_loss` on the valid
rows (tests/test_fused_router.py checks both against autograd in fp64), for every balance type.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

#: ``missing_grads(device, dtype) -> (d_balance, d_z)`` or ``(d_balance, d_z, d_entropy)``: see
#: :func:`topk_gates_and_losses`
MissingGrads = Callable[[torch.device, torch.dtype], tuple[torch.Tensor | None, ...]]


class SelectionRule:
    """A variable selection for :func:`topk_gates_and_losses` (the top-p family): which of a token's experts it keeps,
    and optionally a per-token entropy (a loss, or the input of the rule). Implemented by the routers
    (``molora.routers.topp``, ``molora.routers.dynmole``); computed without autograd, inside the function."""

    #: whether :meth:`select` can compute a per-token entropy (the ``"entropy"`` loss)
    has_entropy: bool = False

    def select(
        self, probs: torch.Tensor, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(sorted_probs[T, E], order[T, E], keep_sorted[T, E] bool, entropy[T] or None)``: the probabilities in
        descending order (a stable sort), their experts, which of them are kept (at least the first), and the
        per-token entropy when ``with_entropy`` (or when the rule needs it)."""
        raise NotImplementedError

    def entropy_grad(self, probs: torch.Tensor) -> torch.Tensor:
        """``dH_t/dp_te[T, E]`` of the entropy :meth:`select` returns."""
        raise NotImplementedError


#: balance-loss normalisations this function computes (all of ``molora.routers.balancing.BALANCE_LOSS_TYPES``)
FUSED_BALANCE_TYPES = ("megatron", "mixtral", "switch", "soft")


#: bytes in one of ATen's CPU vectors (``at::vec::Vectorized``): 64 with AVX-512, else 32 (AVX2 and the rest); read
#: once (a call inside a compiled forward would break its graph)
_CPU_VECTOR_BYTES = 64 if "AVX512" in torch.backends.cpu.get_cpu_capability().upper() else 32


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits, dim=-1)`` for ``logits[T, E]`` (inside the autograd function: no history is recorded).

    On a CPU, ``torch.softmax`` over the last dimension runs its vectorised loop on whole vectors only: rows shorter
    than one vector (8 fp32 values with AVX2, 16 with AVX-512) take its scalar path. Measured with AVX2 (torch 2.13,
    one thread, ``T = 2048``): 4 columns 253 us against 95 for ``exp(z - max) / sum``, 7 columns 394 against 126,
    while 8 columns (one vector) take 87 against 141; on an AVX-512 machine ``E = 8`` was the slow case (348 against
    68). Below about 256 rows (a decode step, a short batch) the single call wins anyway. The two agree to 1 ulp.
    """
    if (
        logits.device.type != "cpu"
        or logits.shape[0] < 256
        or logits.shape[-1] * logits.element_size() >= _CPU_VECTOR_BYTES
    ):
        return torch.softmax(logits, dim=-1)
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def topk_forward(
    logits,
    k,
    renormalize,
    valid,
    balance_type,
    with_z,
    selection_bias=None,
    sigmoid_scores=False,
    rule: SelectionRule | None = None,
    entropy_loss: bool = False,
):
    """The forward values, plus what the backward needs: ``(outputs, (mass, mask, inv_n, load, lse, importance,
    sigmoid_logits, keep))`` (the logits with sigmoid affinities, else ``None``; ``keep[T, E]``: a ``rule``'s 0/1
    factors in the order of ``expert_index``, else ``None``)."""
    if torch.is_autocast_enabled(logits.device.type):
        # the loss sums are products (`mask @ probs`): autocast would run them, and round the counts, in bf16/fp16
        with torch.autocast(logits.device.type, enabled=False):
            return topk_forward(
                logits, k, renormalize, valid, balance_type, with_z, selection_bias, sigmoid_scores, rule, entropy_loss
            )
    n_tokens, n_experts = logits.shape
    # the log-affinities: the logits, or with sigmoid affinities s = sigmoid(z) (DeepSeek-V3) log s, whose softmax
    # s / sum(s) are then the probabilities
    scores = F.logsigmoid(logits) if sigmoid_scores else logits
    probs = softmax_rows(scores)
    keep = active = token_entropy = None
    if rule is not None:
        # every expert, in descending order of probability; the gate of an expert the rule drops is 0
        top_probs, expert_index, keep_sorted, token_entropy = rule.select(probs, entropy_loss)
        keep = keep_sorted.to(probs.dtype)
        top_probs = top_probs * keep
        active = torch.zeros_like(keep_sorted).scatter_(-1, expert_index, keep_sorted)
    elif selection_bias is None:
        top_probs, expert_index = probs.topk(k, dim=-1)  # [T, k]
    else:
        # loss-free balancing (topk_bias): the bias moves the choice among the affinities, which stay the gates
        affinity = torch.sigmoid(logits) if sigmoid_scores else probs
        expert_index = (affinity + selection_bias.to(probs.dtype)).topk(k, dim=-1).indices
        top_probs = affinity.gather(-1, expert_index)
    mass = None
    if renormalize and selection_bias is not None:
        # s_S / sum(s_S) as the softmax of the kept log-affinities, as topk_routing computes it: a biased choice may
        # keep experts whose probability underflowed to 0, where the ratio is 0 / 0 (the backward goes straight to
        # the kept scores then: no mass is saved)
        top_probs = softmax_rows(scores.gather(-1, expert_index))
    elif renormalize:
        # as in topk_routing; selected by probability, the k largest of E sum to at least k/E (a rule keeps at least
        # the most probable expert, >= 1/E), so its clamp (to the smallest normal number) never binds here: left
        # out, and the backward treats the mass as unclamped
        mass = top_probs.sum(dim=-1, keepdim=True)
        top_probs = top_probs / mass
    gates = torch.zeros_like(probs).scatter_(-1, expert_index, top_probs)

    balance = z_loss = ent_loss = load = lse = mask = importance = None
    inv_n = 1.0
    entropy_loss = entropy_loss and token_entropy is not None
    if balance_type is None and not with_z and not entropy_loss:
        state = (mass, mask, inv_n, load, lse, importance, logits if sigmoid_scores else None, keep)
        return (gates, balance, z_loss, probs, expert_index, top_probs, ent_loss, active), state
    # losses over the valid rows: a 0/1 row weight (not indexing) keeps the shapes static and the device in sync
    mask = None if valid is None else valid.reshape(-1).to(probs.dtype)
    # 1 / valid tokens (a 0-d tensor with a mask: no host synchronisation); a batch without any gives losses of 0
    inv_n = 1.0 / max(n_tokens, 1) if mask is None else mask.sum().clamp_min(1.0).reciprocal()
    keep_rows = None if valid is None else valid.reshape(-1).bool()

    def valid_sum(values: torch.Tensor) -> torch.Tensor:
        """Sum over the valid rows. Selected with `where`, not weighted by the 0/1 mask: a padding row may hold
        NaN (the hidden states of a fully masked query in eager attention), and 0 * NaN would spread it."""
        if keep_rows is None:
            return values.sum(dim=0)
        return torch.where(keep_rows.view(-1, *([1] * (values.dim() - 1))), values, 0.0).sum(dim=0)

    if balance_type is not None:
        prob_sums = valid_sum(probs)
        if balance_type == "soft":
            # the load is the mean gate over the valid tokens, and carries gradient: the backward hands each selected
            # gate d/dg_e = E * P_e / n_valid (P_e: the mean probability, kept for it)
            load = valid_sum(gates) * inv_n
            importance = prob_sums * inv_n
        else:
            if balance_type == "switch":
                one_hot = torch.zeros_like(probs).scatter_(-1, probs.argmax(dim=-1, keepdim=True), 1.0)
            elif active is not None:
                one_hot = active.to(probs.dtype)
            else:
                one_hot = torch.zeros_like(probs).scatter_(-1, expert_index, 1.0)
            counts = valid_sum(one_hot)
            if balance_type == "megatron" and rule is not None:
                # a variable number of assignments per token: over all of them (0 without any)
                load = counts / counts.sum().clamp_min(1.0)
            else:
                # "megatron": counts over all assignments, k per valid token (counts / counts.sum(), 0 without valid
                # tokens); "mixtral" (assignments per token) and "switch" (argmax per token): counts over valid tokens
                load = counts * (inv_n / k if balance_type == "megatron" else inv_n)
        # E * sum_e load_e P_e with P = prob_sums / n_valid
        balance = torch.dot(load, prob_sums) * (n_experts * inv_n)
    if with_z:
        lse = torch.logsumexp(logits, dim=-1)  # [T]
        sq = lse.square()
        z_loss = valid_sum(sq) * inv_n
    if entropy_loss:
        # the rule's per-token entropy, averaged over the valid tokens
        ent_loss = valid_sum(token_entropy) * inv_n
    state = (mass, mask, inv_n, load, lse, importance, logits if sigmoid_scores else None, keep)
    return (gates, balance, z_loss, probs, expert_index, top_probs, ent_loss, active), state


def losses_or_placeholders(routed: tuple, like: torch.Tensor) -> tuple[tuple, list[torch.Tensor]]:
    """:func:`topk_forward`'s outputs with a 0-d tensor in place of each loss that was not requested (``None``), and
    those placeholders (to be marked non-differentiable; :func:`placeholders_to_none` puts the ``None`` back).

    An autograd function must not return ``None`` before an output it marks non-differentiable: ``torch.compile``
    (torch 2.13) applies the marks to the outputs counted without the ``None`` entries, one place off for each
    ``None`` before them. With the z-loss off, the top-k function's per-assignment gates came out of a compiled
    model non-differentiable: the grouped path's router got no gradient from the task loss.
    """
    placeholders = []
    routed = list(routed)
    # balance, z; the entropy loss only when a rule's active mask (marked) follows it: a trailing None shifts no mark
    # (a placeholder is an operator call, per layer and forward)
    for i in (1, 2, 6) if routed[7] is not None else (1, 2):
        if routed[i] is None:
            routed[i] = like.new_zeros(())
            placeholders.append(routed[i])
    return tuple(routed), placeholders


def placeholders_to_none(
    outputs: tuple, offset: int, balance_type: str | None, z_loss: bool, entropy_loss: bool = False, rule=None
) -> tuple:
    """``outputs`` with the losses at ``offset`` (balance), ``offset + 1`` (z) and ``offset + 5`` (entropy) that
    were not requested set back to ``None`` (see :func:`losses_or_placeholders`), and ``active`` (``offset + 6``)
    ``None`` without a ``rule``."""
    outputs = list(outputs)
    if balance_type is None:
        outputs[offset] = None
    if not z_loss:
        outputs[offset + 1] = None
    if not entropy_loss:
        outputs[offset + 5] = None
    if rule is None:
        outputs[offset + 6] = None
    return tuple(outputs)


class _TopKGatesAndLosses(torch.autograd.Function):
    @staticmethod
    def forward(  # noqa: D102
        ctx,
        logits,
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
        ctx.missing_grads = missing_grads
        outputs, state = topk_forward(
            logits, k, renormalize, valid, balance_type, with_z, selection_bias, sigmoid_scores, rule, entropy_loss
        )
        ctx.renormalize = renormalize
        ctx.save_for_backward(*topk_save(ctx, outputs, state, rule))
        outputs, placeholders = losses_or_placeholders(outputs, logits)
        # probs, expert_index (and a rule's active mask); one call: a second one replaces the first one's marks
        marked = [outputs[3], outputs[4], *placeholders] + ([outputs[7]] if rule is not None else [])
        ctx.mark_non_differentiable(*marked)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(  # noqa: D102
        ctx, grad_gates, grad_balance, grad_z, _grad_probs, _grad_index, grad_weight, grad_entropy, _grad_active
    ):
        saved = ctx.saved_tensors
        grad_sel = None
        if grad_gates is not None or grad_weight is not None:
            # the dense gates and the per-assignment weights are the same values: their gradients add up
            grad_sel = grad_gates.gather(-1, saved[1]) if grad_gates is not None else grad_weight
            if grad_gates is not None and grad_weight is not None:
                grad_sel = grad_sel + grad_weight
        grad_logits = topk_backward(
            saved,
            ctx.inv_n,
            ctx.renormalize,
            grad_sel,
            grad_balance,
            grad_z,
            ctx.missing_grads,
            grad_entropy,
            ctx.rule,
        )
        return grad_logits, *([None] * 10)


def topk_save(ctx, outputs, state, rule: SelectionRule | None = None) -> tuple[torch.Tensor | None, ...]:
    """What :func:`topk_backward` needs from :func:`topk_forward`'s ``(outputs, state)``: sets ``ctx.inv_n`` (the
    constant ``1 / n_valid`` without a mask) and ``ctx.rule``, and returns the tensors to save, in the order ``saved``
    expects."""
    probs, expert_index, top_probs = outputs[3:6]
    mass, mask, inv_n, load, lse, importance, sigmoid_logits, keep = state
    ctx.inv_n = inv_n if mask is None else None
    # the entropy's derivative is computed again in backward from the probabilities, when its loss was computed
    ctx.rule = rule if outputs[6] is not None else None
    inv_n = inv_n if mask is not None else None
    return probs, expert_index, top_probs, mass, mask, inv_n, load, lse, importance, sigmoid_logits, keep


def topk_backward(
    saved,
    inv_n_const: float | None,
    renormalize: bool,
    grad_sel: torch.Tensor | None,
    grad_balance: torch.Tensor | None,
    grad_z: torch.Tensor | None,
    missing_grads: MissingGrads | None,
    grad_entropy: torch.Tensor | None = None,
    entropy_rule: SelectionRule | None = None,
) -> torch.Tensor:
    """``dL/dlogits[T, E]`` of the top-k selection and its losses (the module docstring's formulas).

    ``saved``: :func:`topk_save`'s tensors; ``inv_n_const``: ``ctx.inv_n``; ``grad_sel[T, k]``: the gradient of the
    selected gates (``weight``), ``None`` when they got none; ``grad_balance`` / ``grad_z`` / ``grad_entropy``: the
    losses' gradients (``None``: none, and then ``missing_grads`` may supply them); ``entropy_rule``: the rule whose
    entropy loss was computed (``ctx.rule``), else ``None``.
    """
    probs, expert_index, weight, mass, mask, inv_n, load, lse, importance, sigmoid_logits, keep = saved
    if inv_n is None:
        inv_n = inv_n_const
    missing_balance = load is not None and grad_balance is None
    missing_z = lse is not None and grad_z is None
    missing_entropy = entropy_rule is not None and grad_entropy is None
    if missing_grads is not None and (missing_balance or missing_z or missing_entropy):
        # the losses are not part of what is being differentiated (a loss computed from the logits alone): the
        # caller says which gradients they should get anyway (None: none); (d_balance, d_z[, d_entropy])
        fill_balance, fill_z, *fill_entropy = missing_grads(probs.device, probs.dtype)
        grad_balance = fill_balance if missing_balance else grad_balance
        grad_z = fill_z if missing_z else grad_z
        if missing_entropy and fill_entropy:
            grad_entropy = fill_entropy[0]
    if load is not None and grad_balance is not None:
        # the balance loss: the same row d/dP_e = E * load_e / n_valid for every valid token
        row = load * (grad_balance * (probs.shape[1] * inv_n))  # [E]
        grad_probs = row.expand_as(probs).contiguous() if mask is None else mask.unsqueeze(1) * row
    else:
        grad_probs = torch.zeros_like(probs)
    if entropy_rule is not None and grad_entropy is not None:
        # the entropy loss: d/dp_te = dH_t/dp_te / n_valid on valid tokens
        per_token = entropy_rule.entropy_grad(probs) * (grad_entropy * inv_n)
        grad_probs += per_token if mask is None else mask.unsqueeze(1) * per_token
    if importance is not None and grad_balance is not None:
        # "soft": the load is the mean gate, d/dg_e = E * P_e / n_valid for each selected gate of a valid token
        per_gate = (importance * (grad_balance * (probs.shape[1] * inv_n)))[expert_index]  # [T, k]
        if mask is not None:
            per_gate = per_gate * mask.unsqueeze(1)
        grad_sel = per_gate if grad_sel is None else grad_sel + per_gate
    kept_scores = None
    if grad_sel is not None:
        if renormalize:
            grad_sel = grad_sel - (grad_sel * weight).sum(dim=-1, keepdim=True)
        if keep is not None:
            # a rule's gates are keep * p (renormalised: over the kept mass): a dropped expert's gate is a constant 0
            grad_sel = grad_sel * keep
        if mass is not None:  # p_S / sum(p_S)
            grad_probs.scatter_add_(-1, expert_index, grad_sel / mass)
        elif renormalize or sigmoid_logits is not None:
            # gates = softmax of the kept scores (a biased choice), or exp of them (sigmoid affinities unnormalised):
            # straight to those scores, dL/ds_j = g_j * (dL/dg_j - sum_i g_i dL/dg_i) (without the sum unnormalised)
            kept_scores = weight * grad_sel
        else:
            grad_probs.scatter_add_(-1, expert_index, grad_sel)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
    if kept_scores is not None:
        grad_logits.scatter_add_(-1, expert_index, kept_scores)
    if sigmoid_logits is not None:
        # the scores were log sigmoid(z): d/dz = sigmoid(-z)
        grad_logits = grad_logits * torch.sigmoid(-sigmoid_logits)
    if lse is not None and grad_z is not None:
        coef = (2.0 * grad_z * inv_n) * lse  # [T]
        if mask is not None:
            coef = coef * mask
        # the z-loss reads the raw logits: softmax(z), which the probabilities are unless the affinities are sigmoids
        softmax_z = probs if sigmoid_logits is None else (sigmoid_logits - lse.unsqueeze(1)).exp()
        grad_logits += coef.unsqueeze(1) * softmax_z
    return grad_logits


def topk_gates_and_losses(
    logits: torch.Tensor,
    k: int,
    *,
    renormalize: bool = True,
    valid: torch.Tensor | None = None,
    balance_type: str | None = None,
    z_loss: bool = False,
    missing_grads: MissingGrads | None = None,
    selection_bias: torch.Tensor | None = None,
    sigmoid_scores: bool = False,
    rule: SelectionRule | None = None,
    entropy_loss: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """Top-k gates of ``softmax(logits)`` and the requested aux losses, in one autograd node.

    Args:
        logits (Tensor[T, E]): router scores (fp32 or fp64).
        k (int): experts per token (with a ``rule``: the number of experts, every one is listed).
        renormalize (bool): rescale the kept probabilities to sum to 1 (the ``topk`` router's default).
        valid (BoolTensor[T] or None): non-padding tokens; the losses average over these only (``None`` = all).
        balance_type (str or None): ``"megatron"``, ``"mixtral"``, ``"switch"`` or ``"soft"`` computes the unweighted
            balancing loss ``E * sum_e f_e P_e`` of that normalisation; ``None`` skips it.
        z_loss (bool): also compute the router z-loss ``mean_t logsumexp(z_t)^2``.
        missing_grads (callable or None): called in backward, with the device and dtype of the probabilities, when a
            requested loss received no gradient (it is not in what is being differentiated, e.g. the gates are);
            returns ``(d_balance, d_z)`` or ``(d_balance, d_z, d_entropy)``, 0-d tensors (or None: no gradient) used
            as those losses' gradients. The model's runtime passes one that delivers ``coef * loss`` to the router
            when a trainer computes its own loss from the logits (see ``molora.runtime``).
        selection_bias (Tensor[E] or None): added to the probabilities to choose the ``k`` experts, not to the gates
            (loss-free balancing, the ``topk_bias`` router); no gradient. The renormalised gates are then computed
            from the kept logits (exact when the chosen experts' probabilities underflow).
        sigmoid_scores (bool): the affinities are ``s = sigmoid(logits)`` (DeepSeek-V3; needs ``selection_bias``): the
            experts are chosen by ``s + selection_bias``, the gates are the chosen ``s`` (renormalised to sum to 1 or
            not), the probabilities (balance loss, statistics) ``s / sum(s)``; the z-loss still reads the logits.
        rule (SelectionRule or None): a variable selection instead of the top ``k`` (the module docstring): every
            expert is listed (``k`` must be the number of experts), the ones it drops with gate 0. Not with
            ``selection_bias``.
        entropy_loss (bool): also compute the rule's entropy loss ``mean_t H_t`` (needs a rule with an entropy).

    Returns:
        ``(gates[T, E], balance, z, probs[T, E], expert_index[T, k], weight[T, k], entropy, active[T, E])``: the
        dense gates (differentiable), the two losses (0-d, differentiable; ``None`` when not requested), the
        probabilities, chosen experts (in descending order of probability), which carry no gradient, their final
        gates ``weight[T, k]`` (the nonzero entries of ``gates``, differentiable), the entropy loss (0-d,
        differentiable; ``None`` when not requested) and, with a ``rule``, the kept experts as a boolean matrix in
        expert order (``None`` without one).
    """
    if balance_type is not None and balance_type not in FUSED_BALANCE_TYPES:
        raise ValueError(f"`balance_type`={balance_type!r} is not one of {FUSED_BALANCE_TYPES} (or None).")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"`k`={k} must be between 1 and the number of experts ({logits.shape[-1]}).")
    if sigmoid_scores and selection_bias is None:
        raise ValueError("`sigmoid_scores=True` is the loss-free balancing router's: it needs `selection_bias`.")
    check_rule(rule, k, logits.shape[-1], selection_bias, entropy_loss)
    if torch.is_grad_enabled() and logits.requires_grad:
        outputs = _TopKGatesAndLosses.apply(
            logits,
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
        return placeholders_to_none(outputs, 1, balance_type, z_loss, entropy_loss, rule)
    # no gradient wanted (inference, generation): the same values without the autograd.Function call
    return topk_forward(
        logits, k, renormalize, valid, balance_type, z_loss, selection_bias, sigmoid_scores, rule, entropy_loss
    )[0]


def check_rule(
    rule: SelectionRule | None, k: int, n_experts: int, selection_bias: torch.Tensor | None, entropy_loss: bool
) -> None:
    """Raise ``ValueError`` for a selection ``rule`` the top-k functions cannot combine with their other options."""
    if rule is None:
        if entropy_loss:
            raise ValueError("`entropy_loss=True` needs a selection `rule` that computes an entropy.")
        return
    if k != n_experts:
        raise ValueError(f"With a selection `rule` every expert is listed: `k`={k} must be {n_experts}.")
    if selection_bias is not None:
        raise ValueError("A selection `rule` cannot be combined with `selection_bias`.")
    if entropy_loss and not rule.has_entropy:
        raise ValueError(f"`entropy_loss=True`: the selection rule {type(rule).__name__} computes no entropy.")
