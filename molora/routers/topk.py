"""Top-k token routing (Mixtral / MixLoRA / MoLA convention).

``p = softmax(z)`` over all ``E`` experts, keep the ``k`` largest, and (by default) renormalise the kept
probabilities to sum to one: ``g_e = p_e / sum_{j in S} p_j`` for ``e in S``, else 0 (docs/algorithms.md 1.1).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels.fused_router import FUSED_BALANCE_TYPES, topk_gates_and_losses
from .base import Router, RouterParams, Routing, register_router, repeated_arange


@dataclass
class TopKParams(RouterParams):
    """Hyper-parameters of the ``topk`` router.

    Args:
        renormalize (bool): rescale the kept probabilities to sum to 1 (Mixtral, MixLoRA). With ``False`` the gates
            are the raw softmax probabilities (Switch style). Default: True.
        jitter_noise (float): multiplicative noise ``x * U(1 - eps, 1 + eps)`` on the router input during training
            (Switch Transformer's exploration trick); 0 disables it. Must be in [0, 1). Default: 0.0.
    """

    renormalize: bool = True
    jitter_noise: float = 0.0

    def validate(self, num_experts: int, top_k: int) -> None:
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ValueError(f"`router_kwargs['jitter_noise']`={self.jitter_noise} must be in [0, 1).")
        if self.renormalize:
            warn_single_renormalized_gate(num_experts, top_k, "renormalize", True, fix=False)


def warn_single_renormalized_gate(num_experts: int, top_k: int, key: str, value: Any, fix: Any) -> None:
    """Warn that ``top_k=1`` with renormalised gates (``router_kwargs[key]=value``; ``fix`` is the raw-gate setting)
    leaves the router without a task-loss gradient: the one kept gate is ``p / p = 1`` whatever the router scores."""
    if top_k == 1 and num_experts > 1:
        warnings.warn(
            f"top_k=1 with router_kwargs[{key!r}]={value!r}: the one kept gate "
            "renormalises to 1, so the task loss gives the router no gradient (only the aux losses train it). Set "
            f"router_kwargs={{{key!r}: {fix!r}}} for the raw probability as the gate (Switch Transformer's), or "
            "top_k >= 2.",
            stacklevel=2,
        )


class FusedTopKSelection:
    """Mixin for routers whose training selection is a top-k of ``softmax(logits)`` (``topk``; ``soft``, which keeps
    all ``E``; ``topk_bias``, whose bias moves the choice among softmax or sigmoid affinities):
    :meth:`select_with_losses` computes the routing and its balance/z losses with
    ``molora.kernels.fused_router.topk_gates_and_losses`` (one autograd node, the same values as :meth:`select` plus
    the default losses), and the dense layer path runs the base projection, this routing and the experts as one node
    (:meth:`fused_topk_args`, ``molora.kernels.fused_dense.dense_topk_layer``).

    A router states when that holds with :meth:`_fused_topk_options`; a subclass that overrides ``select``,
    ``select_with_losses``, ``loss_coefficients``, ``aux_inputs`` or ``aux_losses`` computes its own way (the
    methods check).
    """

    def _fused_topk_options(self) -> dict[str, Any] | None:
        """The selection options of ``topk_gates_and_losses`` (``k``, ``renormalize``; optionally ``selection_bias``,
        ``sigmoid_scores``) when :meth:`select` is (right now) the top-k they describe, else ``None``."""
        raise NotImplementedError

    def select_with_losses(
        self,
        logits: torch.Tensor,
        valid: torch.Tensor | None,
        need: frozenset[str],
        balance_loss_type: str,
        missing_grads=None,
        dense: bool = False,
    ) -> tuple[Routing, dict[str, torch.Tensor] | None]:
        # one autograd node for softmax, top-k, renormalisation, dense gates and the losses (same values); subclasses
        # that change the selection, losses other than balance/z, or a load that carries gradient take select().
        # missing_grads: see topk_gates_and_losses (the runtime's aux-gradient delivery, molora.runtime); dense: the
        # caller reads only the dense gates (a selection rule's routing then lists all pairs, see topk_result)
        args = self._fusable_topk_args(logits.dtype, need, balance_loss_type)
        if args is None:
            return super().select_with_losses(logits, valid, need, balance_loss_type)
        outputs = topk_gates_and_losses(logits, valid=valid, missing_grads=missing_grads, **args)
        return self.topk_result(*outputs, logits, need, dense=dense)

    # read by MoLoraRuntime.select: this implementation takes `missing_grads` and `dense`
    select_with_losses.takes_missing_grads = True
    select_with_losses.takes_dense = True
    # read by fused_topk_args: this implementation computes with topk_gates_and_losses (a subclass overriding it
    # computes its routing and losses its own way, and the layer must call it)
    select_with_losses.fused_topk = True

    def fused_topk_args(self, logits_dtype, need, balance_loss_type):
        if not getattr(type(self).select_with_losses, "fused_topk", False):
            return None
        return self._fusable_topk_args(logits_dtype, need, balance_loss_type)

    #: the loss methods of this class that the fused function reproduces besides the base class's (a router whose
    #: selection rule computes its own loss, e.g. top-p's entropy, lists its ``loss_coefficients`` and
    #: ``aux_inputs``); a subclass that overrides one of them computes its losses its own way
    _fused_loss_methods: ClassVar[tuple[Callable, ...]] = ()

    #: the routing class a selection rule's result is built as
    _rule_routing_cls: ClassVar[type[Routing]] = Routing

    def _fusable_topk_args(self, logits_dtype, need, balance_loss_type):
        options = self._fused_topk_options()
        if options is None:
            return None
        rule = options.get("rule")
        cls, own = type(self), type(self)._fused_loss_methods
        computed = {"balance", "z", "entropy"} if rule is not None and rule.has_entropy else {"balance", "z"}
        fusable = (
            cls.loss_coefficients in (Router.loss_coefficients, *own)
            # losses of its own (a subclass's aux_inputs / aux_losses) are computed from the routing its own way
            and cls.aux_inputs in (Router.aux_inputs, *own)
            and cls.aux_losses in (Router.aux_losses, *own)
            and need <= computed
            and ("balance" not in need or balance_loss_type in FUSED_BALANCE_TYPES)
            and logits_dtype in (torch.float32, torch.float64)
        )
        if not fusable:
            return None
        args = {**options, "balance_type": balance_loss_type if "balance" in need else None, "z_loss": "z" in need}
        if rule is not None:
            args["entropy_loss"] = "entropy" in need
        return args

    def topk_result(
        self, gates, balance, z_loss, probs, expert_index, weight, entropy, active, logits, need, dense=False
    ):
        if active is not None:
            # a selection rule: the kept experts (all T * E pairs for a dense-path caller: no nonzero)
            routing = self._rule_routing_cls.from_dense(probs, gates, active, logits, dense=dense)
        else:
            k = expert_index.shape[1]
            routing = Routing(
                probs=probs,
                token_index=repeated_arange(probs.shape[0], k, probs.device),
                expert_index=expert_index.reshape(-1),
                weight=weight.reshape(-1),
                logits=logits,
                gates=gates,
                per_token=k,
            )
        if not need:
            return routing, {}  # (a decode step's, an inference forward's)
        losses = {"balance": balance, "z": z_loss, "entropy": entropy}
        return routing, {name: losses[name] for name in sorted(need)}


@register_router("topk")
class TopKRouter(FusedTopKSelection, Router):
    """Each token takes its ``top_k`` most probable experts (MixLoRA-style sparse routing)."""

    Params = TopKParams

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.params.jitter_noise
        if self.training and eps > 0:
            x = x.float() * torch.empty_like(x, dtype=torch.float32).uniform_(1.0 - eps, 1.0 + eps)
        return super().scores(x)

    def linear_scoring(self) -> bool:
        # the jitter noise makes the logits a non-linear function of x in training
        if self.training and self.params.jitter_noise > 0:
            return False
        return type(self).forward is Router.forward and type(self).scores is TopKRouter.scores

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        probs = torch.softmax(logits, dim=-1)
        return topk_routing(probs, self.top_k, renormalize=self.params.renormalize, logits=logits)

    def _fused_topk_options(self) -> dict[str, Any] | None:
        if type(self).select is not TopKRouter.select:
            return None
        return {"k": self.top_k, "renormalize": self.params.renormalize}


def topk_routing(
    probs: torch.Tensor,
    k: int,
    *,
    renormalize: bool = True,
    logits: torch.Tensor | None = None,
    selection_scores: torch.Tensor | None = None,
    log_scores: torch.Tensor | None = None,
) -> Routing:
    """Build a top-k :class:`Routing` from ``probs[T, E]``.

    ``selection_scores`` (default: ``probs``) decides which experts are kept; the gates always come from ``probs``.
    Routers that bias the selection (loss-free balancing) pass their biased scores here, and with them
    ``log_scores[T, E]`` (``probs = softmax(log_scores)``), from which the renormalised gates are computed in log
    space: a biased selection may keep experts whose probability underflowed to 0, and ``p / sum p`` there has a
    gradient of ``1 / tiny`` (inf, then NaN through the softmax) where the softmax of the kept log-scores is exact
    and finite.
    """
    n_tokens = probs.shape[0]
    scores = probs if selection_scores is None else selection_scores
    expert_index = scores.topk(k, dim=-1).indices  # [T, k]
    top_probs = probs.gather(-1, expert_index)  # [T, k]
    if renormalize and log_scores is not None:
        top_probs = torch.softmax(log_scores.gather(-1, expert_index), dim=-1).to(probs.dtype)
    elif renormalize:
        # selection by `probs` keeps a mass >= k/E, but a biased selection may pick experts whose probability
        # underflowed to 0: their gates stay 0 instead of becoming 0/0
        mass = top_probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top_probs.dtype).tiny)
        top_probs = top_probs / mass
    gates = torch.zeros_like(probs).scatter(-1, expert_index, top_probs)
    token_index = repeated_arange(n_tokens, k, probs.device)
    return Routing(
        probs=probs,
        token_index=token_index,
        expert_index=expert_index.reshape(-1),
        weight=top_probs.reshape(-1),
        logits=logits,
        gates=gates,
        per_token=k,
    )
