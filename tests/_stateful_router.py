"""A user-defined router with persistent state, registered by name (used by the save/load tests)."""

from __future__ import annotations

import torch

from molora import register_router
from molora.routers import TopKRouter, topk_routing


@register_router("test_biased_topk")
class BiasedTopKRouter(TopKRouter):
    """Top-k whose selection adds a per-expert bias buffer (like loss-free balancing) and counts its calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("selection_bias", torch.zeros(self.num_experts))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def select(self, logits, valid):
        self.calls += 1
        probs = torch.softmax(logits, dim=-1)
        return topk_routing(probs, self.top_k, logits=logits, selection_scores=probs + self.selection_bias)
