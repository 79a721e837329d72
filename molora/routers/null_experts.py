"""AdaMoE: token-adaptive routing with null experts (Zeng et al., Findings of EMNLP 2024).

Beside the ``n`` true LoRA experts the router scores ``m`` *null experts* that have no parameters and output zero
(docs/algorithms.md section 11)::

    p     = softmax(z),  z = W_r x in R^(n+m)
    S     = TopK(p, k)                           (k = MoLoraConfig.top_k, over all n + m experts)
    g_e   = p_e / sum_{j in S, j < n} p_j        for true experts e in S, else 0
    delta = sum_e g_e * Delta_e(x)               (null selections contribute nothing)

A token that picks only null experts gets no LoRA delta, so the number of true experts per token adapts between 0
and ``k``. Only true experts produce assignment triples; ``Routing.probs`` and ``Routing.logits`` hold the true
experts' part (``probs`` renormalised over them), which is what the routing statistics report:
``experts_per_token`` counts true experts only, so ``1 - experts_per_token / top_k`` is the share of null slots.

The balance loss sees all ``n + m`` columns (:meth:`AdaMoERouter.aux_inputs`): the router's full distribution, and
assignment counts in which the null experts' counts are replaced by their mean (null experts are balanced as a
group). The mean is spread as a fractional assignment ``(#null slots of the token) / m`` over the null columns of
each token, so every count-based ``balance_loss_type`` and ``loss_reduction="concat"`` apply unchanged; spec
vector with the default ``"megatron"`` normalisation: 0.995620.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import balancing
from .base import DenseGateSelection, Router, RouterParams, Routing, register_router


@dataclass
class AdaMoEParams(RouterParams):
    """Hyper-parameters of the ``adamoe`` router.

    Args:
        num_null_experts (int | None): ``m``, the number of zero-compute null experts scored beside the
            ``num_experts`` true ones; ``None`` uses ``m = num_experts`` (a default of ours: the paper's LoRA
            setting does not state it). Pair it with a larger ``top_k`` than plain top-k routing would use (e.g.
            twice), since part of the slots go to null experts. Default: None.
    """

    num_null_experts: int | None = None

    def validate(self, num_experts: int, top_k: int) -> None:
        m = self.num_null_experts
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(
                f"`router_kwargs['num_null_experts']`={m!r} must be an integer >= 1 or None (= num_experts); "
                "use router='topk' for no null experts."
            )


@dataclass
class NullExpertRouting(Routing):
    """A :class:`Routing` over the true experts that also keeps the router's view of all ``n + m`` experts.

    Attributes:
        full_probs (Tensor[T, n+m]): softmax over true and null experts.
        full_logits (Tensor[T, n+m]): the router's logits over true and null experts.
        full_selected (BoolTensor[T, n+m]): the top-k selection over true and null experts.
    """

    full_probs: torch.Tensor | None = None
    full_logits: torch.Tensor | None = None
    full_selected: torch.Tensor | None = None


@register_router("adamoe")
class AdaMoERouter(DenseGateSelection, Router):
    """Top-k over ``num_experts`` true plus ``num_null_experts`` null experts (AdaMoE).

    The scoring weight has ``n + m`` rows (``weight[n+m, d_in]``); ``Routing`` tensors are ``[T, n]``.
    """

    Params = AdaMoEParams

    @classmethod
    def max_top_k(cls, params: AdaMoEParams, num_experts: int) -> int:
        """Top-k runs over the ``n`` true and ``m`` null experts: ``top_k`` may be up to ``n + m``."""
        return num_experts + (num_experts if params.num_null_experts is None else params.num_null_experts)

    def __init__(self, in_features: int, num_experts: int, top_k: int, **kwargs) -> None:
        super().__init__(in_features, num_experts, top_k, **kwargs)
        m = self.params.num_null_experts
        self.num_null_experts = num_experts if m is None else m
        self.weight = nn.Parameter(torch.empty(num_experts + self.num_null_experts, in_features))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_null_experts={self.num_null_experts}"

    def _routing(self, logits: torch.Tensor, dense: bool) -> Routing:
        n = self.num_experts
        full_probs = torch.softmax(logits, dim=-1)  # [T, n+m]
        top = full_probs.topk(self.top_k, dim=-1).indices  # [T, k]
        full_selected = torch.zeros_like(full_probs, dtype=torch.bool).scatter(-1, top, True)
        selected = full_selected[:, :n]  # [T, n]
        true_logits = logits[:, :n]
        # p_e / sum of the selected true p = softmax over the selected true logits: exact, no 0/0 for any logits
        has_true = selected.any(dim=-1, keepdim=True)
        masked = true_logits.masked_fill(~selected, -math.inf).masked_fill(~has_true, 0.0)
        gates = torch.softmax(masked, dim=-1) * selected
        return NullExpertRouting.from_dense(
            torch.softmax(true_logits, dim=-1),
            gates,
            selected,
            logits=true_logits,
            full_probs=full_probs,
            full_logits=logits,
            full_selected=full_selected,
            dense=dense,
        )

    # aux_inputs gives the built-in losses either form of rows (see Router.weighted_aux_rows)
    handles_row_weight = True

    def aux_inputs(self, routing: Routing, valid: torch.Tensor | None) -> balancing.AuxInputs:
        """The loss inputs over all ``n + m`` experts, null-expert assignments shared evenly among the nulls."""
        if not isinstance(routing, NullExpertRouting):
            raise TypeError(f"AdaMoERouter.aux_inputs expects a NullExpertRouting, got {type(routing).__name__}.")
        n, m = self.num_experts, self.num_null_experts
        selected = routing.full_selected.float()
        null_share = selected[:, n:].mean(dim=-1, keepdim=True).expand(-1, m)
        selected = torch.cat([selected[:, :n], null_share], dim=-1)
        gates = torch.cat([routing.dense_gates(), routing.gates.new_zeros(routing.num_tokens, m)], dim=-1)
        return balancing.AuxInputs.from_rows(
            routing.full_probs,
            gates,
            selected,
            routing.full_logits,
            valid,
            self.top_k,
            self.weighted_aux_rows(),
            pooled_from=n,  # (the null experts' loads as a group, also for "switch"'s top-1 counts)
        )
