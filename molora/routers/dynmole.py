"""DynMoLE: hybrid routing switched by the router's Tsallis entropy.

Li et al., "DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid Routing Mechanism",
arXiv 2504.00661 (2025); behaviour pinned down by the authors' code (docs/algorithms.md sections 1.3 and 2).

Tsallis entropy of a distribution ``p`` over ``N`` experts, index ``q > 0``::

    S_q(p) = (1 - sum_i p_i^q) / (q - 1)        S_1(p) = -sum_i p_i ln p_i        (Shannon limit)
    S_q^max(N) = (1 - N^(1-q)) / (q - 1)        S_1^max = ln N                     (uniform p)
    H = S_q(p + eps) / S_q^max(N)               (eps added to every p_i, no renormalisation)

Per token, with ``p = softmax(W_r x)``:

1. ``H`` as above (``q = q``, ``eps = entropy_eps``).
2. Sparse mask: sort ``p`` in descending order, keep the experts whose cumulative mass is ``<= top_p`` (the expert
   that crosses the threshold is *not* kept, unlike ``topp``), then force-keep the ``keep_top_k`` most probable.
3. Hybrid switch: if ``entropy_threshold < 1`` and ``H > entropy_threshold`` the token uses *every* expert
   ("broadcast": an uncertain router gets soft routing instead of a guess).
4. Gates ``g = p * mask``, not renormalised: a sparse token's gates sum to less than 1, a broadcast token's to 1.

Auxiliary losses: ``"entropy"``, ``L_ent = mean_t H_t`` over the non-padding tokens (it pushes the router towards
confident, hence sparse, decisions), and the usual ``"balance"``. The paper balances *soft* loads
``E * sum_e mean_t(g_{t,e}) * mean_t(p_{t,e})``: set ``MoLoraConfig(balance_loss_type="soft", aux_loss_coef=0.001)``
to match it (``configs/dynmole.yaml`` does).

A Renyi variant (``entropy_type="renyi"``) uses ``H_a = ln(sum_i p_i^a) / (1 - a)``, normalised by ``ln N``.

Deviation from the reference code: the entropy loss there also averages over padding rows; molora excludes them,
like every other loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import balancing
from .base import Router, RouterParams, Routing, register_router
from .topk import FusedTopKSelection
from .topp import TopPRule, check_loss_coef, routing_from_mask, top_p_mask

ENTROPY_TYPES = ("tsallis", "renyi")


def tsallis_entropy(probs: torch.Tensor, q: float, *, eps: float = 0.0, normalize: bool = True) -> torch.Tensor:
    """Tsallis entropy ``S_q`` of each row of ``probs[..., N]`` (``q = 1``: Shannon, in nats).

    Args:
        probs (Tensor[..., N]): distributions over ``N`` experts.
        q (float): the entropic index, > 0.
        eps (float): added to every probability first, without renormalising (DynMoLE adds 1e-5). Default: 0.0.
        normalize (bool): divide by the maximum ``S_q^max(N)`` of the uniform distribution (computed without
            ``eps``), giving values in [0, 1] up to the ``eps`` shift. Default: True.

    Returns:
        Tensor[...]: one entropy per row, differentiable and finite even for zero probabilities.
    """
    n = probs.shape[-1]
    # the clamp keeps p^q and p ln p differentiable at p = 0 (their derivatives diverge there)
    x = (probs + eps).clamp_min(torch.finfo(probs.dtype).tiny)
    if q == 1.0:
        h = -(x * x.log()).sum(dim=-1)
        h_max = math.log(n)
    else:
        h = (1.0 - x.pow(q).sum(dim=-1)) / (q - 1.0)
        h_max = (1.0 - n ** (1.0 - q)) / (q - 1.0)
    if not normalize:
        return h
    # one expert: there is no uncertainty to measure
    return h / h_max if n > 1 else torch.zeros_like(h)


def renyi_entropy(probs: torch.Tensor, a: float, *, eps: float = 0.0, normalize: bool = True) -> torch.Tensor:
    """Renyi entropy ``H_a = ln(sum_i p_i^a) / (1 - a)`` of each row (``a = 1``: Shannon), optionally ``/ ln N``."""
    n = probs.shape[-1]
    x = (probs + eps).clamp_min(torch.finfo(probs.dtype).tiny)
    if a == 1.0:
        h = -(x * x.log()).sum(dim=-1)
    else:
        h = x.pow(a).sum(dim=-1).log() / (1.0 - a)
    if not normalize:
        return h
    return h / math.log(n) if n > 1 else torch.zeros_like(h)


def _shifted(probs: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = max(p + eps, tiny)`` as the entropies compute it, and ``dx/dp`` (1 where the clamp does not hold, as
    autograd differentiates it)."""
    shifted = probs + eps
    tiny = torch.finfo(probs.dtype).tiny
    return shifted.clamp_min(tiny), (shifted >= tiny).to(probs.dtype)


def tsallis_entropy_grad(probs: torch.Tensor, q: float, *, eps: float = 0.0, normalize: bool = True) -> torch.Tensor:
    """``d/dp`` of :func:`tsallis_entropy` (same arguments) for each entry of ``probs[..., N]``:
    ``-q x^(q-1) / (q - 1)`` (``q = 1``: ``-(ln x + 1)``) with ``x = p + eps``, over ``S_q^max(N)`` when normalised."""
    n = probs.shape[-1]
    x, dx = _shifted(probs, eps)
    if q == 1.0:
        grad, h_max = -(x.log() + 1.0), math.log(n)
    else:
        grad, h_max = x.pow(q - 1.0) * (-q / (q - 1.0)), (1.0 - n ** (1.0 - q)) / (q - 1.0)
    grad = grad * dx
    if not normalize:
        return grad
    return grad / h_max if n > 1 else torch.zeros_like(grad)


def renyi_entropy_grad(probs: torch.Tensor, a: float, *, eps: float = 0.0, normalize: bool = True) -> torch.Tensor:
    """``d/dp`` of :func:`renyi_entropy` (same arguments): ``a x^(a-1) / (sum_i x_i^a) / (1 - a)`` (``a = 1``:
    ``-(ln x + 1)``) with ``x = p + eps``, over ``ln N`` when normalised."""
    n = probs.shape[-1]
    x, dx = _shifted(probs, eps)
    if a == 1.0:
        grad = -(x.log() + 1.0)
    else:
        powered = x.pow(a - 1.0)
        grad = powered * (a / (1.0 - a)) / (powered * x).sum(dim=-1, keepdim=True)
    grad = grad * dx
    if not normalize:
        return grad
    return grad / math.log(n) if n > 1 else torch.zeros_like(grad)


@dataclass
class DynMoLERouting(Routing):
    """A :class:`Routing` that also carries each token's normalised entropy ``H`` (the switch and the loss input).

    Attributes:
        entropy (Tensor[T] or None): normalised router entropy per token, differentiable; ``None`` where the fused
            training function computed the routing and the entropy loss (``DynMoLERouter._fused_topk_options``).
        broadcast (BoolTensor[T] or None): True for the tokens routed to every expert; ``None`` there too.
    """

    entropy: torch.Tensor | None = None
    broadcast: torch.Tensor | None = None


@dataclass
class DynMoLEParams(RouterParams):
    """Hyper-parameters of the ``dynmole`` router (defaults: the authors' tuned values).

    Args:
        q (float): Tsallis index (DynMoLE's ``entropy_index``; the Renyi order with ``entropy_type="renyi"``), in
            (0, 2]; 1 is the Shannon entropy. Default: 1.1.
        entropy_threshold (float): tokens whose normalised entropy exceeds this value use every expert; >= 0, and
            any value >= 1 turns the broadcast off. Default: 0.9.
        entropy_type (str): ``"tsallis"`` or ``"renyi"``. Default: "tsallis".
        entropy_eps (float): added to every probability before the entropy, >= 0. Default: 1e-5.
        keep_top_k (int or None): experts every token keeps at least, in [1, num_experts]; ``None`` uses the
            adapter's ``top_k`` (2 by default, the paper's value). Default: None.
        top_p (float): cumulative mass of the sparse path, in (0, 1]; the expert that crosses it is not kept.
            Default: 0.75.
        renormalize (bool): rescale a token's gates to sum to 1. The paper does not (a sparse token's gates sum to
            its kept mass). Default: False.
        entropy_loss_coef (float): coefficient of the entropy loss (loss name ``"entropy"``; the paper's
            ``router_dyn_loss_coef``), >= 0; 0 disables it. Default: 0.01.
    """

    q: float = 1.1
    entropy_threshold: float = 0.9
    entropy_type: str = "tsallis"
    entropy_eps: float = 1e-5
    keep_top_k: int | None = None
    top_p: float = 0.75
    renormalize: bool = False
    entropy_loss_coef: float = 0.01

    def validate(self, num_experts: int, top_k: int) -> None:
        if not 0.0 < self.q <= 2.0:
            raise ValueError(f"`router_kwargs['q']`={self.q} must be in (0, 2].")
        if not (math.isfinite(self.entropy_threshold) and self.entropy_threshold >= 0):
            raise ValueError(
                f"`router_kwargs['entropy_threshold']`={self.entropy_threshold} must be a finite number >= 0 "
                "(>= 1 turns the broadcast off)."
            )
        if self.entropy_type not in ENTROPY_TYPES:
            raise ValueError(
                f"`router_kwargs['entropy_type']`={self.entropy_type!r} is not supported; allowed values: "
                f"{list(ENTROPY_TYPES)}."
            )
        if not (math.isfinite(self.entropy_eps) and 0.0 <= self.entropy_eps < 1.0):
            raise ValueError(f"`router_kwargs['entropy_eps']`={self.entropy_eps} must be in [0, 1).")
        if self.keep_top_k is not None:
            if isinstance(self.keep_top_k, bool) or not isinstance(self.keep_top_k, int):
                raise ValueError(
                    f"`router_kwargs['keep_top_k']`={self.keep_top_k!r} must be an integer or None (use top_k)."
                )
            if not 1 <= self.keep_top_k <= num_experts:
                raise ValueError(
                    f"`router_kwargs['keep_top_k']`={self.keep_top_k} must be in [1, num_experts={num_experts}]."
                )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`router_kwargs['top_p']`={self.top_p} must be in (0, 1].")
        check_loss_coef("entropy_loss_coef", self.entropy_loss_coef)


@register_router("dynmole")
class DynMoLERouter(FusedTopKSelection, Router):
    """DynMoLE hybrid routing: exclusive top-p with a ``keep_top_k`` floor, every expert for uncertain tokens.

    In training, the routing and its losses (the entropy loss included) take the top-k router's one-node function
    with a :class:`~molora.routers.topp.TopPRule` (the same values as :meth:`select` and :meth:`aux_inputs`).
    """

    Params = DynMoLEParams
    _rule_routing_cls = DynMoLERouting

    def _fused_topk_options(self) -> dict[str, Any] | None:
        cls = type(self)
        if (
            cls.select is not DynMoLERouter.select
            or cls.normalized_entropy is not DynMoLERouter.normalized_entropy
            or cls.keep_top_k is not DynMoLERouter.keep_top_k
            or torch.compiler.is_compiling()  # (compiled, the general route lists the routing without a graph break)
        ):
            return None
        params = self.params
        grad_fn = tsallis_entropy_grad if params.entropy_type == "tsallis" else renyi_entropy_grad
        q, eps = params.q, params.entropy_eps
        rule = TopPRule(
            params.top_p,
            inclusive=False,
            min_experts=self.keep_top_k,
            entropy=self.normalized_entropy,
            entropy_grad=lambda probs: grad_fn(probs, q, eps=eps, normalize=True),
            broadcast_above=params.entropy_threshold if params.entropy_threshold < 1.0 else None,
        )
        return {"k": self.num_experts, "renormalize": params.renormalize, "rule": rule}

    @property
    def keep_top_k(self) -> int:
        """The floor on the experts per token (``Params.keep_top_k``, or the adapter's ``top_k``)."""
        return self.params.keep_top_k if self.params.keep_top_k is not None else self.top_k

    def normalized_entropy(self, probs: torch.Tensor) -> torch.Tensor:
        """The configured normalised entropy (with ``entropy_eps``) of each row of ``probs[T, E]``."""
        params = self.params
        fn = tsallis_entropy if params.entropy_type == "tsallis" else renyi_entropy
        return fn(probs, params.q, eps=params.entropy_eps, normalize=True)

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        params = self.params
        probs = torch.softmax(logits, dim=-1)
        entropy = self.normalized_entropy(probs)
        keep = top_p_mask(probs, params.top_p, inclusive=False, min_experts=self.keep_top_k)
        if params.entropy_threshold < 1.0:
            broadcast = entropy.detach() > params.entropy_threshold
            keep = keep | broadcast.unsqueeze(-1)
        else:
            broadcast = torch.zeros_like(entropy, dtype=torch.bool)
        routing = routing_from_mask(
            probs, keep, renormalize=params.renormalize, logits=logits, routing_cls=DynMoLERouting
        )
        routing.entropy = entropy
        routing.broadcast = broadcast
        return routing

    def loss_coefficients(self, config) -> dict[str, float]:
        return {**super().loss_coefficients(config), "entropy": float(self.params.entropy_loss_coef)}

    # aux_inputs keeps the entropy's rows as the base class keeps the others (see Router.weighted_aux_rows)
    handles_row_weight = True

    def aux_inputs(self, routing: Routing, valid: torch.Tensor | None) -> balancing.AuxInputs:
        inputs = super().aux_inputs(routing, valid)
        if self.params.entropy_loss_coef > 0:
            entropy = getattr(routing, "entropy", None)
            if entropy is None:
                entropy = self.normalized_entropy(routing.probs)
            inputs.extra["entropy"] = inputs.same_rows(entropy, valid)
        return inputs

    # the fused function's rule computes this entropy loss (TopPRule)
    _fused_loss_methods = (loss_coefficients, aux_inputs)


__all__ = [
    "DynMoLEParams",
    "DynMoLERouter",
    "DynMoLERouting",
    "renyi_entropy",
    "renyi_entropy_grad",
    "tsallis_entropy",
    "tsallis_entropy_grad",
]
