"""Soft (dense) routing, LoRAMoE-style: every expert is used, weighted by the router's softmax.

``g = softmax(z / temperature)`` over all ``E`` experts; there is no selection, so ``N = T * E``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Router, RouterParams, Routing, register_router, repeated_arange
from .topk import FusedTopKSelection


@dataclass
class SoftParams(RouterParams):
    """Hyper-parameters of the ``soft`` router.

    Args:
        temperature (float): softmax temperature; below 1 sharpens the gates, above 1 flattens them. Must be > 0.
            Default: 1.0.
    """

    temperature: float = 1.0

    def validate(self, num_experts: int, top_k: int) -> None:
        if not self.temperature > 0:
            raise ValueError(f"`router_kwargs['temperature']`={self.temperature} must be > 0.")


@register_router("soft")
class SoftRouter(FusedTopKSelection, Router):
    """All experts weighted by the router's softmax (LoRAMoE). ``top_k`` is ignored.

    The count-based balance losses are constant under dense routing (every expert gets every token); use
    ``balance_loss_type="soft"`` (mean gates) to balance a soft router.
    """

    Params = SoftParams

    def experts_per_token(self) -> float:
        return float(self.num_experts)

    def _fused_topk_options(self) -> dict[str, Any] | None:
        # a top-k of all E experts without renormalisation keeps every gate at its probability: in training the soft
        # routing and its losses take the top-k router's one-node function (the same values as select())
        if type(self).select is not SoftRouter.select or self.params.temperature != 1.0:
            return None
        return {"k": self.num_experts, "renormalize": False}

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        n_tokens, n_experts = probs.shape
        device = probs.device
        return Routing(
            probs=probs,
            token_index=repeated_arange(n_tokens, n_experts, device),
            expert_index=torch.arange(n_experts, device=device).repeat(n_tokens),
            weight=probs.reshape(-1),
            logits=logits,
            gates=probs,
            per_token=n_experts,
        )
