"""MoR: a mixture of routers, weighted per token by a learnable main router.

Zhang et al., "Mixture of Routers", arXiv 2503.23362 (2025); the equations are reconstructed from the abstract and
reviews (docs/algorithms.md section 4; the combination rule and the loss targets are our choices, marked [OURS]
there). Per adapted projection, for a token ``x``::

    s_j = W_j x,  p^(j) = softmax(s_j)          R sub-routers, W_j [E, d_in]        (j = 1..R)
    w = softmax(W_m x)                           main router, W_m [R, d_in]
    p = sum_j w_j p^(j)                          combine="probs" (default): a mixture of distributions
    p = softmax(sum_j w_j s_j)                   combine="logits": a mixture of scores

then top-k on ``p`` with the kept probabilities renormalised (MoLA convention) and ``y = W0 x + sum_e g_e Delta_e``.
The balance loss applies to the combined ``p``. Two optional extras: ``"main_balance"``,
``R * sum_j (mean_t w_{t,j})^2`` (1 when the main router uses every sub-router equally, R when it has collapsed onto
one), and the z-loss, which here regularises the sub-routers' logits ``mean_{t,j} logsumexp(s_j)^2``.

Parameters: the base ``Router.weight`` is the first sub-router ``W_1``; ``sub_weight[R-1, E, d_in]`` holds the
others and ``main_weight[R, d_in]`` the main router. All are fp32, initialised like ``Router.weight`` with
independent random draws (identical sub-routers would stay identical) and saved with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._amp import fp32_linear
from . import balancing
from .base import Router, RouterParams, Routing, register_router
from .topk import topk_routing, warn_single_renormalized_gate
from .topp import check_loss_coef

COMBINE_CHOICES = ("probs", "logits")


@dataclass
class MoRRouting(Routing):
    """A :class:`Routing` that also carries the sub-routers' logits and the main router's weights.

    Attributes:
        sub_logits (Tensor[T, R, E] or None): logits of each sub-router.
        main_probs (Tensor[T, R] or None): the main router's weights ``w`` over the sub-routers.
    """

    sub_logits: torch.Tensor | None = None
    main_probs: torch.Tensor | None = None


@dataclass
class MoRParams(RouterParams):
    """Hyper-parameters of the ``mor`` router.

    Args:
        num_routers (int): number of sub-routers ``R``, >= 2 (one router is ``router="topk"``). The paper finds two
            near-optimal. Default: 2.
        combine (str): ``"probs"`` mixes the sub-routers' softmax distributions, ``"logits"`` mixes their logits
            before one softmax. Default: "probs".
        renormalize (bool): rescale the kept top-k probabilities to sum to 1 (MoLA convention). Default: True.
        main_balance_coef (float): coefficient of the ``"main_balance"`` loss that keeps the main router from
            collapsing onto one sub-router, >= 0; 0 disables it. Default: 0.0.
    """

    num_routers: int = 2
    combine: str = "probs"
    renormalize: bool = True
    main_balance_coef: float = 0.0

    def validate(self, num_experts: int, top_k: int) -> None:
        if self.num_routers < 2:
            raise ValueError(
                f"`router_kwargs['num_routers']`={self.num_routers} must be >= 2; a single router is router='topk'."
            )
        if self.combine not in COMBINE_CHOICES:
            raise ValueError(
                f"`router_kwargs['combine']`={self.combine!r} is not supported; allowed values: "
                f"{list(COMBINE_CHOICES)}."
            )
        check_loss_coef("main_balance_coef", self.main_balance_coef)
        if self.renormalize:
            warn_single_renormalized_gate(num_experts, top_k, "renormalize", True, fix=False)


@register_router("mor")
class MixtureOfRoutersRouter(Router):
    """Mixture of Routers: ``R`` sub-routers combined per token by a main router, then top-k.

    Args: as :class:`~molora.routers.Router`; ``params`` is a :class:`MoRParams`.
    """

    Params = MoRParams

    def __init__(self, in_features: int, num_experts: int, top_k: int, **kwargs) -> None:
        super().__init__(in_features, num_experts, top_k, **kwargs)
        n_routers = self.params.num_routers
        self.sub_weight = nn.Parameter(torch.empty(n_routers - 1, num_experts, in_features, dtype=torch.float32))
        self.main_weight = nn.Parameter(torch.empty(n_routers, in_features, dtype=torch.float32))
        self._init_extra()

    def reset_parameters(self) -> None:
        """Initialise every router matrix (the base ``weight``, the other sub-routers and the main router)."""
        super().reset_parameters()
        if hasattr(self, "main_weight"):
            self._init_extra()

    def _init_extra(self) -> None:
        with torch.no_grad():
            for weight in (self.sub_weight, self.main_weight):
                if self.init == "normal":
                    nn.init.normal_(weight, mean=0.0, std=self.init_std)
                else:
                    bound = 1.0 / self.in_features**0.5
                    nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_routers={self.params.num_routers}, combine={self.params.combine!r}"

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """All raw scores ``[T, R*E + R]``: the ``R`` sub-routers' logits (flattened), then the main router's."""
        weights = torch.cat([self.weight.unsqueeze(0), self.sub_weight]).reshape(-1, self.in_features)
        return fp32_linear(x, torch.cat([weights, self.main_weight]))

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        n_routers, n_experts = self.params.num_routers, self.num_experts
        sub_logits = logits[:, : n_routers * n_experts].reshape(-1, n_routers, n_experts)  # [T, R, E]
        main_probs = torch.softmax(logits[:, n_routers * n_experts :], dim=-1)  # [T, R]
        if self.params.combine == "probs":
            probs = (main_probs.unsqueeze(-1) * torch.softmax(sub_logits, dim=-1)).sum(dim=1)
        else:
            probs = torch.softmax((main_probs.unsqueeze(-1) * sub_logits).sum(dim=1), dim=-1)
        base = topk_routing(probs, self.top_k, renormalize=self.params.renormalize)
        return MoRRouting(
            probs=base.probs,
            token_index=base.token_index,
            expert_index=base.expert_index,
            weight=base.weight,
            gates=base.gates,
            per_token=base.per_token,
            sub_logits=sub_logits,
            main_probs=main_probs,
        )

    def loss_coefficients(self, config) -> dict[str, float]:
        return {**super().loss_coefficients(config), "main_balance": float(self.params.main_balance_coef)}

    handles_row_weight = True  # aux_losses below weights its own losses' rows too

    def aux_inputs(self, routing: Routing, valid: torch.Tensor | None) -> balancing.AuxInputs:
        inputs = super().aux_inputs(routing, valid)
        for name in ("sub_logits", "main_probs"):
            value = getattr(routing, name, None)
            if value is not None:
                inputs.extra[name] = inputs.same_rows(value, valid)
        return inputs

    @staticmethod
    def aux_losses(
        inputs: balancing.AuxInputs, balance_loss_type: str, need: frozenset[str]
    ) -> dict[str, torch.Tensor]:
        """``"balance"`` on the combined distribution, ``"z"`` on the sub-routers' logits, ``"main_balance"``."""
        out = Router.aux_losses(inputs, balance_loss_type, need - {"z"})
        weight = inputs.row_weight
        if "z" in need and "sub_logits" in inputs.extra:
            # sub_logits [T, R, E]: the mean over every (token, sub-router) pair
            out["z"] = balancing.router_z_loss(inputs.extra["sub_logits"], weight)
        if "main_balance" in need and "main_probs" in inputs.extra:
            main_probs = inputs.extra["main_probs"]
            if main_probs.shape[0] == 0:
                out["main_balance"] = balancing.mean_rows(main_probs[:, 0], main_probs)
            else:
                out["main_balance"] = main_probs.shape[1] * balancing.row_mean(main_probs, weight).square().sum()
        return out


__all__ = ["MixtureOfRoutersRouter", "MoRParams", "MoRRouting"]
