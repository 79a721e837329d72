"""ReMoE: ReLU routing with an adaptive L1 regulariser (Wang, Chen, Zhu, ICLR 2025, arXiv 2412.14711).

No softmax and no top-k: the gates are the rectified logits and a token uses every expert with a positive gate
(docs/algorithms.md section 12)::

    g_t,e = ReLU(z_t,e),   active set {e : g_t,e > 0}   (may be empty: that token's LoRA delta is 0)

Sparsity is controlled by a load-balanced L1 regulariser (the Megatron balance formula applied to ReLU gates),
with ``F_e`` non-differentiable and ``G_e`` differentiable, over the non-padding tokens::

    L_l1 = sum_e F_e * G_e,   F_e = E / (k * T) * #{t : g_t,e > 0},   G_e = mean_t g_t,e

weighted by an adaptive coefficient ``lambda`` (the loss's coefficient, replacing a fixed one). After each
optimizer step, with the sparsity ``S = 1 - (#active gates) / (T * E)`` measured over all layers' routers, all
micro-batches of the step and all data-parallel ranks, and the target ``S* = 1 - k / E``::

    lambda <- lambda * alpha   if S < S*   (too dense: push harder)
    lambda <- lambda / alpha   otherwise                          (lambda_0 = 1e-8, alpha = 1.2)

One ``lambda`` per adapter, as in ReMoE (every router holds a copy in its persistent ``l1_coef`` buffer, saved with
the adapter). Training goes through a dense, a sparsifying and a stable phase by itself.

``Routing.probs`` holds the gates normalised per token (``g / sum_e g``; zero for a token without an active expert)
so that the routing statistics (entropy, probability mass) read a distribution; the regulariser uses the raw gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import balancing
from .base import DenseGateSelection, Router, RouterParams, Routing, register_router
from .state import StepAccumulator, buffers_kept_fp32, pop_stacked

if TYPE_CHECKING:
    from ..runtime import RoutingContext

# below this total gate a token is treated as inactive in Routing.probs (bounds the gradient of g / sum g)
_PROBS_EPS = 1e-6


@dataclass
class ReLUParams(RouterParams):
    """Hyper-parameters of the ``relu`` router (ReMoE).

    Args:
        l1_coef_init (float): ``lambda_0``, the initial coefficient of the L1 regulariser. Must be > 0.
            Default: 1e-8.
        l1_coef_growth (float): ``alpha``, the factor by which ``lambda`` grows (too dense) or shrinks (too sparse)
            after each optimizer step. Must be > 1. Default: 1.2.
        target_sparsity (float | None): the fraction of zero gates ``lambda`` steers to, in [0, 1); ``None`` uses
            ``1 - top_k / num_experts`` (on average ``top_k`` active experts per token, as ReMoE). Default: None.
    """

    l1_coef_init: float = 1e-8
    l1_coef_growth: float = 1.2
    target_sparsity: float | None = None

    def validate(self, num_experts: int, top_k: int) -> None:
        if not self.l1_coef_init > 0:
            raise ValueError(f"`router_kwargs['l1_coef_init']`={self.l1_coef_init} must be > 0.")
        if not self.l1_coef_growth > 1:
            raise ValueError(f"`router_kwargs['l1_coef_growth']`={self.l1_coef_growth} must be > 1.")
        s = self.target_sparsity
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1):
            raise ValueError(f"`router_kwargs['target_sparsity']`={s!r} must be a number in [0, 1) or None.")


def l1_balance_loss(inputs: balancing.AuxInputs) -> torch.Tensor:
    """``sum_e F_e * G_e`` with ``F_e = E / (k T) * active count``, ``G_e = mean gate`` over the rows of ``inputs``
    (the rows of weight 1 when ``inputs.row_weight`` is set). ``F`` is the "mixtral" load (active count per row)
    scaled by ``E / k``."""
    gates = inputs.gates
    n_tokens, n_experts = gates.shape
    if n_tokens == 0:
        return gates.sum() * 0.0
    load = balancing.expert_load(inputs, "mixtral") * (n_experts / inputs.top_k)
    return (load * balancing.row_mean(gates, inputs.row_weight)).sum()


@register_router("relu")
class ReLURouter(DenseGateSelection, Router):
    """Gates ``ReLU(z)``: a token uses every expert with a positive logit (ReMoE), sparsity set by adaptive L1.

    State: ``l1_coef`` (persistent scalar buffer, the adaptive ``lambda``). ``last_sparsity`` (``float`` or
    ``None``) is the sparsity measured over the last optimizer step. Change ``lambda`` by hand with
    :meth:`set_l1_coef` (the loss reads a host-side copy, to avoid a device sync per forward).
    """

    Params = ReLUParams

    def __init__(self, in_features: int, num_experts: int, top_k: int, **kwargs) -> None:
        super().__init__(in_features, num_experts, top_k, **kwargs)
        self.register_buffer("l1_coef", torch.tensor(float(self.params.l1_coef_init), dtype=torch.float32))
        self._l1_coef_value = float(self.params.l1_coef_init)
        self._activity = StepAccumulator()
        self.last_sparsity: float | None = None

    def _apply(self, fn, recurse: bool = True):
        # `.half()` would round the initial lambda of 1e-8 to 0, where its multiplicative update can never move it
        with buffers_kept_fp32(self, "l1_coef"):
            super()._apply(fn, recurse)
        return self

    @property
    def target_sparsity(self) -> float:
        """The sparsity ``lambda`` steers to (``1 - top_k / num_experts`` unless set in the params)."""
        s = self.params.target_sparsity
        return 1.0 - self.top_k / self.num_experts if s is None else float(s)

    def set_l1_coef(self, value: float) -> None:
        """Set ``lambda`` (buffer and the host-side copy the loss reads)."""
        self.l1_coef.fill_(value)
        self._l1_coef_value = float(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.l1_coef.is_meta:
            self._l1_coef_value = float(self.l1_coef)

    def _routing(self, logits: torch.Tensor, dense: bool) -> Routing:
        gates = torch.relu(logits)  # [T, E]
        probs = gates / gates.sum(dim=-1, keepdim=True).clamp_min(_PROBS_EPS)
        return Routing.from_dense(probs, gates, gates > 0, logits=logits, dense=dense)

    def observe_routing(self, routing: Routing, valid: torch.Tensor | None, context: RoutingContext | None) -> None:
        if self.observes(context):  # training forwards of a trained router only
            # from the dense selection (the assignment list holds every pair under torch.compile)
            selected = routing.selected()
            if valid is None:
                active = selected.sum().float()
                n_tokens = torch.tensor(float(routing.num_tokens), device=selected.device)
            else:
                valid = valid.to(selected.device)
                active = (selected & valid.unsqueeze(1)).sum().float()
                n_tokens = valid.sum().float()
            observed = torch.stack([active, n_tokens * self.num_experts])
            self._activity.add(observed, context.forward_id if context is not None else None)

    # -- losses -----------------------------------------------------------------------------------------------------

    def loss_coefficients(self, config: Any) -> dict[str, float]:
        """The config's ``balance`` / ``z`` coefficients plus ``l1`` = the current adaptive ``lambda``."""
        return {**super().loss_coefficients(config), "l1": self._l1_coef_value}

    # l1_balance_loss weights the rows like the base losses (see Router.weighted_aux_rows)
    handles_row_weight = True

    @staticmethod
    def aux_losses(
        inputs: balancing.AuxInputs, balance_loss_type: str, need: frozenset[str]
    ) -> dict[str, torch.Tensor]:
        """The base losses plus ``"l1"``: the load-balanced L1 regulariser of the ReLU gates (unweighted)."""
        out = Router.aux_losses(inputs, balance_loss_type, need)
        if "l1" in need:
            out["l1"] = l1_balance_loss(inputs)
        return out

    # -- adaptive lambda --------------------------------------------------------------------------------------------

    def on_optimizer_step(self) -> None:
        """Update ``lambda`` from this router's sparsity alone (the model-level hook uses all layers)."""
        type(self).on_optimizer_step_group([self])

    @classmethod
    def on_optimizer_step_group(cls, routers: list[Router]) -> None:
        """One multiplicative ``lambda`` update for all ``routers``, from their pooled sparsity over ranks."""
        device = routers[0].l1_coef.device
        observed = pop_stacked([r._activity for r in routers], (2,), device).sum(dim=0)
        active, total = observed.tolist()
        if total <= 0:
            return  # no training forward since the last step, on any rank
        sparsity = 1.0 - active / total
        for router in routers:
            factor = router.params.l1_coef_growth
            value = router._l1_coef_value * (factor if sparsity < router.target_sparsity else 1.0 / factor)
            router.set_l1_coef(value)
            router.last_sparsity = sparsity
