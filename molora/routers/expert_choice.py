"""Expert Choice routing (Zhou et al., NeurIPS 2022): experts pick their tokens.

Over a group of ``n`` tokens (here: the non-padding tokens of one micro-batch entering one projection) with
``S = softmax(X W_r) [n, E]`` over the experts, each expert ``j`` takes the ``k_c`` tokens with the highest
``S[:, j]`` (docs/algorithms.md section 13)::

    k_c = max(1, floor(n * c / E))      (c = capacity_factor; the max keeps tiny groups routed)
    delta_t = sum_{j : t in I_j} S[t, j] * Delta_j(x_t)

Every expert processes exactly ``k_c`` tokens (perfect balance, no auxiliary loss needed); a token may be taken by
0..E experts (``c`` on average). Ties between tokens are broken arbitrarily by ``torch.topk``.

.. warning::
   **Expert choice is not causal.** Whether a token is picked depends on the scores of all other tokens in the
   group: later tokens of the same sequence and the other sequences of the batch. A causal language model trained
   with it sees information from the future through the routing, and a sample's output depends on its batch
   neighbours. At generation time there is no group to choose from, so a cached decode step (``is_decode``) or a
   group of a single token falls back to **token-choice top-k on the same router** (``top_k`` experts per token,
   raw softmax gates like the expert-choice gates); ``token_choice_in_eval=True`` uses that fallback for every
   forward in eval mode, so that evaluation is causal too. Prefer a token-choice router for causal LMs unless you
   know you want this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .balancing import valid_rows
from .base import Router, RouterParams, Routing, register_router
from .topk import topk_routing

if TYPE_CHECKING:
    from ..runtime import RoutingContext


@dataclass
class ExpertChoiceParams(RouterParams):
    """Hyper-parameters of the ``expert_choice`` router.

    Args:
        capacity_factor (float): ``c``, the mean number of experts per token; each expert takes
            ``floor(n * c / E)`` of the group's ``n`` tokens. In (0, num_experts]. Default: 2.0 (the paper's).
        token_choice_in_eval (bool): in eval mode, route every forward by token-choice top-k (causal) instead of
            only cached decode steps and single-token groups. Default: False.
        fallback_renormalize (bool): renormalise the fallback's top-k gates to sum to 1; ``False`` keeps the raw
            softmax probabilities, the same gates expert choice uses. Default: False.
    """

    capacity_factor: float = 2.0
    token_choice_in_eval: bool = False
    fallback_renormalize: bool = False

    def validate(self, num_experts: int, top_k: int) -> None:
        if not 0 < self.capacity_factor <= num_experts:
            raise ValueError(
                f"`router_kwargs['capacity_factor']`={self.capacity_factor} must be in (0, num_experts="
                f"{num_experts}]: each expert can take at most every token of the group."
            )


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert picks its top-``k_c`` tokens of the micro-batch (non-causal; see the module docstring)."""

    Params = ExpertChoiceParams

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, context: RoutingContext | None = None
    ) -> Routing:
        logits = self.scores(x)
        decode = context is not None and context.is_decode
        if decode or (self.params.token_choice_in_eval and not self.training):
            return self.token_choice(logits)
        return self.select(logits, valid)

    def token_choice(self, logits: torch.Tensor) -> Routing:
        """The causal fallback: top-``top_k`` experts per token on the same router."""
        probs = torch.softmax(logits, dim=-1)
        return topk_routing(probs, self.top_k, renormalize=self.params.fallback_renormalize, logits=logits)

    def capacity(self, num_tokens: int) -> int:
        """``k_c``, the tokens each expert takes from a group of ``num_tokens`` non-padding tokens."""
        # the epsilon keeps e.g. 10 * 0.3 / 1 from flooring to 2
        k_c = max(1, math.floor(num_tokens * self.params.capacity_factor / self.num_experts + 1e-9))
        return min(k_c, num_tokens)

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        if valid is not None and torch.compiler.is_compiling():
            return self._select_static(logits, valid)
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        n_tokens, n_experts = probs.shape
        # the capacity depends on the number of real tokens: counted from the padding mask's row index, which every
        # layer of the forward shares (one read-back to the host per forward on CUDA, not one per layer)
        n_valid = n_tokens if valid is None else valid_rows(valid).numel()
        if n_valid <= 1:
            return self.token_choice(logits)
        k_c = self.capacity(n_valid)
        by_expert = probs.detach().t()  # [E, T]; probabilities are >= 0, so -1 never beats a real token
        if valid is not None:
            by_expert = by_expert.masked_fill(~valid.unsqueeze(0), -1.0)
        token_index = by_expert.topk(k_c, dim=-1).indices.reshape(-1)  # [E * k_c]
        expert_index = torch.arange(n_experts, device=probs.device).repeat_interleave(k_c)
        return Routing(
            probs=probs,
            token_index=token_index,
            expert_index=expert_index,
            weight=probs[token_index, expert_index],
            logits=logits,
        )

    def _select_static(self, logits: torch.Tensor, valid: torch.Tensor) -> Routing:
        """:meth:`select` with a padding mask, in shapes that do not depend on the number of real tokens (for
        ``torch.compile``, where that number, a host read-back, would break the graph): every expert takes the top
        ``capacity(T)`` tokens and keeps the first ``k_c``, and the single-token fallback is chosen with ``where``.
        The same gates and selection as :meth:`select`, listed as every (token, expert) pair (``from_dense``)."""
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        n_tokens, n_experts = probs.shape
        valid = valid.reshape(-1).to(probs.device)
        n_valid = valid.sum()
        # capacity(n_valid) as a tensor, in float64 like the Python arithmetic of capacity()
        k_c = torch.floor(n_valid.double() * self.params.capacity_factor / n_experts + 1e-9).clamp_min(1)
        k_c = torch.minimum(k_c, n_valid.double())
        bound = self.capacity(n_tokens)  # >= k_c: capacity grows with the number of tokens
        by_expert = probs.detach().t().masked_fill(~valid.unsqueeze(0), -1.0)
        top = by_expert.topk(bound, dim=-1).indices  # [E, bound], best first
        keep = torch.arange(bound, device=probs.device).unsqueeze(0) < k_c  # [1, bound]
        chosen = torch.zeros(n_experts, n_tokens, dtype=torch.bool, device=probs.device)
        chosen = chosen.scatter(1, top, keep.expand(n_experts, bound)).t()  # [T, E]
        fallback = self.token_choice(logits)
        use_fallback = n_valid <= 1
        active = torch.where(use_fallback, fallback.selected(), chosen)
        gates = torch.where(use_fallback, fallback.dense_gates(), probs * chosen)
        return Routing.from_dense(probs, gates, active, logits=logits)
