"""Dynamic top-p routing: a token takes the fewest experts whose probability mass reaches ``p``.

Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models", ACL 2024, arXiv 2403.07652
(docs/algorithms.md sections 1.2 and 10). With ``p = softmax(z)`` sorted in descending order and ``c_j`` its
cumulative sums, the token keeps the sorted experts ``j`` whose *preceding* mass is at most the threshold::

    keep_j = (c_j - p_(j)) <= top_p          # every c_j <= top_p, plus the first expert whose c_j > top_p

(the "inclusive" convention of the authors' code and of MixLoRA-dynamic). The gates are the raw probabilities
``g_e = p_e`` of the kept experts (``renormalize=True`` rescales them to sum to 1). Confident tokens use one
expert, uncertain ones several, so the number of assignments ``N`` varies per token and per step; it is what
``experts_per_token`` in the routing statistics reports.

The paper adds an entropy loss ``L_dyn = mean_t (-sum_e p_{t,e} ln p_{t,e})`` (loss name ``"entropy"``): without
it the router can activate more experts simply by flattening its distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels.fused_router import SelectionRule
from . import balancing
from .base import Router, RouterParams, Routing, register_router
from .topk import FusedTopKSelection


def safe_log(probs: torch.Tensor) -> torch.Tensor:
    """``ln(p)`` with zero probabilities clamped to the smallest normal float.

    A probability that underflowed to 0 then contributes ``0 * ln(tiny) = 0`` to an entropy and a finite gradient,
    where ``xlogy`` would back-propagate ``ln(0) * 0 = nan``.
    """
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def shannon_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of ``probs[..., E]``; differentiable and finite at zero probabilities."""
    return -(probs * safe_log(probs)).sum(dim=-1)


def shannon_entropy_grad(probs: torch.Tensor) -> torch.Tensor:
    """``d/dp`` of :func:`shannon_entropy` for each entry of ``probs[..., E]``: ``-(ln p + 1)``, and ``-ln(tiny)``
    where the clamp holds (``p`` below the smallest normal float, as autograd differentiates the clamp)."""
    tiny = torch.finfo(probs.dtype).tiny
    return -(safe_log(probs) + (probs >= tiny).to(probs.dtype))


def top_p_mask(
    probs: torch.Tensor, top_p: float, *, inclusive: bool, min_experts: int = 1, max_experts: int | None = None
) -> torch.Tensor:
    """Boolean ``[T, E]`` mask of the experts a top-p rule keeps for each row of ``probs[T, E]``.

    Args:
        probs (Tensor[T, E]): router probabilities.
        top_p (float): the mass threshold.
        inclusive (bool): ``True`` keeps the smallest prefix whose mass reaches ``top_p`` (the expert that crosses
            the threshold is kept, "Harder Tasks"); ``False`` keeps only experts with cumulative mass ``<= top_p``
            (DynMoLE).
        min_experts (int): the most probable ``min_experts`` experts are always kept. Default: 1.
        max_experts (int or None): at most this many experts are kept (``None``: no cap). Default: None.

    Returns:
        BoolTensor[T, E]: True where the expert is kept, in the original expert order. ``top_p >= 1`` keeps every
        expert (up to ``max_experts``): the whole mass is 1, where a float cumulative sum lands a rounding step on
        either side of it, which would drop the last expert of some rows by chance.
    """
    if top_p >= 1.0 and max_experts is None:
        return torch.ones_like(probs, dtype=torch.bool)
    # a stable sort breaks ties by expert index, so equal probabilities give the same choice in every batch layout
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = top_p_keep_sorted(
        sorted_probs, top_p, inclusive=inclusive, min_experts=min_experts, max_experts=max_experts
    )
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_p_keep_sorted(
    sorted_probs: torch.Tensor,
    top_p: float,
    *,
    inclusive: bool,
    min_experts: int = 1,
    max_experts: int | None = None,
) -> torch.Tensor:
    """:func:`top_p_mask` in the order of ``sorted_probs[T, E]`` (each row's probabilities in descending order):
    ``keep[T, E]``, True for the experts kept."""
    if top_p >= 1.0 and max_experts is None:
        return torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_p < 1.0:
        cumsum = sorted_probs.cumsum(dim=-1)
        keep_sorted = (cumsum - sorted_probs if inclusive else cumsum) <= top_p
    else:
        keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
    # the floor and the cap by rank (the inclusive rule keeps the first expert anyway: its preceding mass is 0)
    if min_experts > 1 or not inclusive:
        keep_sorted[..., :min_experts] = True
    if max_experts is not None:
        keep_sorted[..., max_experts:] = False
    return keep_sorted


class TopPRule(SelectionRule):
    """The top-p selection of :func:`top_p_mask` for the fused top-k function (``molora.kernels.fused_router``), with
    an optional per-token entropy: the ``"entropy"`` loss, and with ``broadcast_above`` the switch that gives a token
    whose entropy exceeds it every expert (DynMoLE).

    Args:
        top_p, inclusive, min_experts, max_experts: as in :func:`top_p_mask`.
        entropy (callable or None): ``probs[T, E] -> H[T]``, differentiable in the router's own path (the fused
            function calls it without autograd).
        entropy_grad (callable or None): ``probs[T, E] -> dH/dp[T, E]``.
        broadcast_above (float or None): tokens with ``H > broadcast_above`` keep every expert (needs ``entropy``).
    """

    def __init__(
        self,
        top_p: float,
        *,
        inclusive: bool,
        min_experts: int = 1,
        max_experts: int | None = None,
        entropy: Callable[[torch.Tensor], torch.Tensor] | None = None,
        entropy_grad: Callable[[torch.Tensor], torch.Tensor] | None = None,
        broadcast_above: float | None = None,
    ) -> None:
        if (entropy is None) != (entropy_grad is None) or (broadcast_above is not None and entropy is None):
            raise ValueError("TopPRule: `entropy` and `entropy_grad` go together, and `broadcast_above` needs them.")
        self.top_p, self.inclusive = top_p, inclusive
        self.min_experts, self.max_experts = min_experts, max_experts
        self.entropy, self._entropy_grad, self.broadcast_above = entropy, entropy_grad, broadcast_above
        self.has_entropy = entropy is not None

    def select(self, probs: torch.Tensor, with_entropy: bool):  # noqa: D102
        token_entropy = None
        if self.entropy is not None and (with_entropy or self.broadcast_above is not None):
            token_entropy = self.entropy(probs)
        # a stable sort, as top_p_mask's
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep_sorted = top_p_keep_sorted(
            sorted_probs,
            self.top_p,
            inclusive=self.inclusive,
            min_experts=self.min_experts,
            max_experts=self.max_experts,
        )
        if self.broadcast_above is not None:
            keep_sorted = keep_sorted | (token_entropy > self.broadcast_above).unsqueeze(-1)
        return sorted_probs, order, keep_sorted, token_entropy

    def entropy_grad(self, probs: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._entropy_grad(probs)


def routing_from_mask(
    probs: torch.Tensor,
    keep: torch.Tensor,
    *,
    renormalize: bool,
    logits: torch.Tensor | None,
    routing_cls: type[Routing] = Routing,
) -> Routing:
    """Build a variable-``N`` :class:`Routing` whose gates are ``probs`` on the kept experts (``keep[T, E]``).

    With ``renormalize`` the kept probabilities of each token are rescaled to sum to 1. ``routing_cls`` lets a
    router return a :class:`Routing` subclass that carries extra fields.
    """
    gates = probs * keep
    if renormalize:
        # the most probable expert is always kept, so the mass is >= 1/E unless every probability underflowed
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
    return routing_cls.from_dense(probs, gates, keep, logits=logits)


@dataclass
class TopPParams(RouterParams):
    """Hyper-parameters of the ``topp`` router.

    Args:
        top_p (float): probability mass each token must reach, in (0, 1]. The paper's default 0.4 gives one expert
            to a token whose top expert already holds 40 % of the mass; MixLoRA-dynamic uses 0.8. Default: 0.4.
        min_experts (int): experts every token uses at least, in [1, num_experts]. Default: 1.
        max_experts (int or None): cap on the experts per token, in [min_experts, num_experts]; ``None`` means no
            cap (a flat router may then use every expert). Default: None.
        renormalize (bool): rescale the kept probabilities to sum to 1. The paper uses the raw probabilities, so a
            token's gates sum to its kept mass (>= top_p). Default: False.
        entropy_loss_coef (float): coefficient of the entropy loss ``L_dyn`` (loss name ``"entropy"``), >= 0.
            1e-4 is the paper's value as recalled in the spec (not re-checked against the PDF); 0 disables it.
            Default: 1e-4.
    """

    top_p: float = 0.4
    min_experts: int = 1
    max_experts: int | None = None
    renormalize: bool = False
    entropy_loss_coef: float = 1e-4

    def validate(self, num_experts: int, top_k: int) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`router_kwargs['top_p']`={self.top_p} must be in (0, 1].")
        if not 1 <= self.min_experts <= num_experts:
            raise ValueError(
                f"`router_kwargs['min_experts']`={self.min_experts} must be in [1, num_experts={num_experts}]."
            )
        if self.max_experts is not None:
            if isinstance(self.max_experts, bool) or not isinstance(self.max_experts, int):
                raise ValueError(
                    f"`router_kwargs['max_experts']`={self.max_experts!r} must be an integer or None (no cap)."
                )
            if not self.min_experts <= self.max_experts <= num_experts:
                raise ValueError(
                    f"`router_kwargs['max_experts']`={self.max_experts} must be in [min_experts={self.min_experts}, "
                    f"num_experts={num_experts}] or None (no cap)."
                )
        check_loss_coef("entropy_loss_coef", self.entropy_loss_coef)


def check_loss_coef(name: str, value: float) -> None:
    """Raise ``ValueError`` unless the loss coefficient ``router_kwargs[name]`` is finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"`router_kwargs[{name!r}]`={value} must be a finite number >= 0 (0 disables the loss).")


@register_router("topp")
class TopPRouter(FusedTopKSelection, Router):
    """Dynamic top-p routing ("Harder Tasks Need More Experts"): more experts for uncertain tokens.

    ``MoLoraConfig.top_k`` is ignored: the number of experts per token follows from ``top_p`` (bounded by
    ``min_experts`` and ``max_experts``). In training, the routing and its losses (the entropy loss included) take
    the top-k router's one-node function with a :class:`TopPRule` (the same values as :meth:`select` and
    :meth:`aux_inputs`).
    """

    Params = TopPParams

    def _fused_topk_options(self) -> dict[str, Any] | None:
        if type(self).select is not TopPRouter.select or torch.compiler.is_compiling():
            # (compiled, the general route lists the routing without a graph break already)
            return None
        params = self.params
        rule = TopPRule(
            params.top_p,
            inclusive=True,
            min_experts=params.min_experts,
            max_experts=params.max_experts,
            entropy=shannon_entropy,
            entropy_grad=shannon_entropy_grad,
        )
        return {"k": self.num_experts, "renormalize": params.renormalize, "rule": rule}

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        params = self.params
        probs = torch.softmax(logits, dim=-1)
        keep = top_p_mask(
            probs, params.top_p, inclusive=True, min_experts=params.min_experts, max_experts=params.max_experts
        )
        return routing_from_mask(probs, keep, renormalize=params.renormalize, logits=logits)

    def loss_coefficients(self, config) -> dict[str, float]:
        return {**super().loss_coefficients(config), "entropy": float(self.params.entropy_loss_coef)}

    # the entropy below is computed from the rows the base class kept, in either form (see Router.weighted_aux_rows)
    handles_row_weight = True

    def aux_inputs(self, routing: Routing, valid: torch.Tensor | None) -> balancing.AuxInputs:
        inputs = super().aux_inputs(routing, valid)
        if self.params.entropy_loss_coef > 0:
            inputs.extra["entropy"] = shannon_entropy(inputs.probs)
        return inputs

    # the fused function's rule computes this entropy loss (TopPRule)
    _fused_loss_methods = (loss_coefficients, aux_inputs)


__all__ = [
    "TopPParams",
    "TopPRouter",
    "TopPRule",
    "check_loss_coef",
    "routing_from_mask",
    "safe_log",
    "shannon_entropy",
    "shannon_entropy_grad",
    "top_p_keep_sorted",
    "top_p_mask",
]
