"""Auxiliary-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3, arXiv 2412.19437).

Each expert ``e`` carries a bias ``b_e`` that is added to the token's affinities **for the choice of experts
only**; the gates come from the unbiased affinities (docs/algorithms.md section 9)::

    s_t   = sigmoid(z_t)          (score_function="sigmoid", DeepSeek-V3)   or   softmax(z_t)   ("softmax")
    S_t   = TopK(s_t + b, k)
    g_t,e = s_t,e / sum_{j in S_t} s_t,j   (normalize_gates=True)           or   s_t,e          (False),   e in S_t

After every optimizer step, with ``c_e`` the number of (non-padding token, slot) assignments to expert ``e`` summed
over all micro-batches of the step and over data-parallel ranks, and ``c_mean = mean_e c_e``::

    b_e <- b_e + u * sign(c_mean - c_e)            (u = bias_update_rate, 1e-3)

so an overloaded expert becomes harder to select and an idle one easier, without any gradient: ``b`` is a
persistent buffer (saved with the adapter), never a trained parameter. The imbalance is monitored with
``MaxVio = (max_e c_e - c_mean) / c_mean`` (0 = perfect balance).

``Routing.probs`` holds the normalised affinities ``s / sum_e s`` (a distribution also for sigmoid scores, as in
DeepSeek-V3's complementary sequence-wise balance loss), so ``aux_loss_coef`` keeps working if a small
complementary balance loss is wanted; the pure loss-free method sets ``aux_loss_coef=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .balancing import max_violation
from .base import Router, RouterParams, Routing, register_router
from .state import StepAccumulator, buffers_kept_fp32, pop_stacked
from .topk import FusedTopKSelection, topk_routing, warn_single_renormalized_gate

if TYPE_CHECKING:
    from ..runtime import RoutingContext

SCORE_FUNCTIONS = ("sigmoid", "softmax")


@dataclass
class TopKBiasParams(RouterParams):
    """Hyper-parameters of the ``topk_bias`` router (loss-free balancing).

    Args:
        score_function (str): expert affinities: ``"sigmoid"`` of the logits (DeepSeek-V3 and the paper's main
            setting) or ``"softmax"`` over the experts. Default: "sigmoid".
        normalize_gates (bool): rescale the selected experts' affinities to sum to 1 (DeepSeek-V3); ``False`` uses
            them raw (the LFB paper). Default: True.
        bias_update_rate (float): ``u``, the step of the sign update of the selection bias after each optimizer
            step; 0 freezes the bias (DeepSeek-V3 does so for the last part of training). Must be >= 0.
            Default: 0.001.
    """

    score_function: str = "sigmoid"
    normalize_gates: bool = True
    bias_update_rate: float = 1e-3

    def validate(self, num_experts: int, top_k: int) -> None:
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                f"`router_kwargs['score_function']`={self.score_function!r} is not supported; allowed values: "
                f"{list(SCORE_FUNCTIONS)}."
            )
        if not self.bias_update_rate >= 0:
            raise ValueError(
                f"`router_kwargs['bias_update_rate']`={self.bias_update_rate} must be >= 0 (0 freezes the bias)."
            )
        if self.normalize_gates:
            # (the bias balances the choice; the router's weight learns from the gates alone, not from a gate of 1)
            warn_single_renormalized_gate(num_experts, top_k, "normalize_gates", True, fix=False)


@register_router("topk_bias")
class TopKBiasRouter(FusedTopKSelection, Router):
    """Top-k routing balanced by a per-expert selection bias instead of an auxiliary loss (DeepSeek-V3).

    State: ``selection_bias[E]`` (persistent fp32 buffer, saved with the adapter). It moves only in
    :meth:`on_optimizer_step_group`, from the loads of training forwards; eval forwards and generation use it
    frozen and count nothing. ``last_max_violation`` (``Tensor[]`` or ``None``) is the MaxVio of the loads of the
    last optimizer step, for monitoring.
    """

    Params = TopKBiasParams

    def __init__(self, in_features: int, num_experts: int, top_k: int, **kwargs) -> None:
        super().__init__(in_features, num_experts, top_k, **kwargs)
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))
        self._loads = StepAccumulator()
        self.last_max_violation: torch.Tensor | None = None

    def _apply(self, fn, recurse: bool = True):
        # `model.to(torch.bfloat16)` / `.half()` cast buffers too: the bias would then lose its updates (u = 1e-3 is
        # below bf16's spacing from 0.25 on) and stop moving. Devices move; the dtype stays fp32
        with buffers_kept_fp32(self, "selection_bias"):
            super()._apply(fn, recurse)
        return self

    def _scores(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, log s)``: the affinities ``s[T, E]`` and their logs; ``s / sum(s)`` from ``log s`` (a softmax) is
        exact, and finite even when every sigmoid underflows to 0."""
        if self.params.score_function == "softmax":
            return torch.softmax(logits, dim=-1), logits
        return torch.sigmoid(logits), nn.functional.logsigmoid(logits)

    def _fused_topk_options(self) -> dict[str, Any] | None:
        # the top-k function with the bias moving the choice among the (softmax or sigmoid) affinities
        if type(self).select is not TopKBiasRouter.select:
            return None
        return {
            "k": self.top_k,
            "renormalize": self.params.normalize_gates,
            "selection_bias": self.selection_bias,
            "sigmoid_scores": self.params.score_function == "sigmoid",
        }

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        scores, log_scores = self._scores(logits)
        probs = torch.softmax(log_scores, dim=-1)
        selection = scores + self.selection_bias.to(scores.dtype)
        if self.params.normalize_gates:
            # s_e / sum_S s, as the softmax of the kept log-scores: the bias may keep experts whose probability
            # underflowed to 0 (all of a token's sigmoids below ~-104), where probs_e / sum_S probs would be 0 / 0
            return topk_routing(
                probs, self.top_k, renormalize=True, logits=logits, selection_scores=selection, log_scores=log_scores
            )
        routing = topk_routing(scores, self.top_k, renormalize=False, logits=logits, selection_scores=selection)
        routing.probs = probs
        return routing

    def observe_routing(self, routing: Routing, valid: torch.Tensor | None, context: RoutingContext | None) -> None:
        if self.observes(context):  # training forwards of a trained router only
            expert_index = routing.expert_index
            # assignments per expert, padding weighted 0: a scatter-add of static shape, where boolean indexing and
            # `bincount` read back to the host on CUDA (twice per layer) and break a torch.compile graph
            if valid is None:
                weight = torch.ones(expert_index.shape, dtype=torch.float32, device=expert_index.device)
            else:
                weight = valid.to(expert_index.device)[routing.token_index].to(torch.float32)
            counts = torch.zeros(self.num_experts, dtype=torch.float32, device=expert_index.device)
            counts.scatter_add_(0, expert_index, weight)
            self._loads.add(counts, context.forward_id if context is not None else None)

    def on_optimizer_step(self) -> None:
        """Apply the bias update of :meth:`on_optimizer_step_group` to this router alone."""
        type(self).on_optimizer_step_group([self])

    @classmethod
    def on_optimizer_step_group(cls, routers: list[Router]) -> None:
        """``b += u * sign(mean(c) - c)`` for each router, with its loads all-reduced over ranks in one call."""
        by_width: dict[int, list[TopKBiasRouter]] = {}
        for router in routers:
            by_width.setdefault(router.num_experts, []).append(router)
        for width, group in by_width.items():
            device = group[0].selection_bias.device
            counts = pop_stacked([r._loads for r in group], (width,), device)  # [R, E]
            mean = counts.mean(dim=-1, keepdim=True)
            seen = (mean > 0).to(counts.dtype)  # a router that routed no token this step keeps its bias
            violation = max_violation(counts)
            for i, router in enumerate(group):
                step = router.params.bias_update_rate * torch.sign(mean[i] - counts[i]) * seen[i]
                bias = router.selection_bias
                bias.copy_((bias.float() + step.to(bias.device)).to(bias.dtype))
                router.last_max_violation = violation[i].to(bias.device)
