"""Auxiliary losses that keep experts alive: load balancing and the router z-loss.

Every loss here is *unweighted*; the coefficients live in ``MoLoraConfig`` and are applied by the model-level
collector, which also reduces over routers (``loss_reduction``). All means are over non-padding tokens only.

Load balancing, ``L = E * sum_e f_e * P_e`` with ``P_e`` the mean router probability of expert ``e`` (the
differentiable factor) and ``f_e`` a load whose normalisation differs between papers, so that the same coefficient
means different strengths (docs/algorithms.md section 1.4):

===========  =============================================  ======================  ===========================
type         f_e                                            value at perfect load   used by
===========  =============================================  ======================  ===========================
"switch"     fraction of tokens whose argmax is e           1                       Switch Transformer (top-1)
"mixtral"    assignments to e / tokens                      k                       HF Mixtral, MixLoRA, MoLA
"megatron"   assignments to e / all assignments             1                       Megatron-LM, ReMoE
"soft"       mean gate of e (differentiable)                --                      DynMoLE, soft routers
===========  =============================================  ======================  ===========================

Router z-loss (ST-MoE): ``L_z = mean_t logsumexp(z_t)^2``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import Routing

# valid-token row indices per padding mask: every adapted layer of one forward pass gets the same mask tensor, so
# the index (a nonzero, which reads back to the host on CUDA) is computed once per forward instead of once per use
_VALID_ROWS: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def valid_rows(valid: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of the padding mask ``valid[T]`` (cached per mask tensor; not under
    ``torch.compile``, which cannot trace the weak reference and traces the ``nonzero`` instead)."""
    if torch.compiler.is_compiling():
        return valid.reshape(-1).nonzero().squeeze(1)
    key = id(valid)
    hit = _VALID_ROWS.get(key)
    if hit is not None and hit[0]() is valid:
        return hit[1]
    # a normal tensor even under inference_mode (index_select saves its index for backward)
    with torch.inference_mode(False):
        rows = valid.reshape(-1).nonzero().squeeze(1)
    if len(_VALID_ROWS) > 64:
        _VALID_ROWS.clear()
    _VALID_ROWS[key] = (weakref.ref(valid), rows)
    return rows


def take_valid(tensor: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor | None:
    """The rows of ``tensor`` (first dimension ``T``) at valid tokens; ``tensor`` itself when ``valid`` is None.

    Same as ``tensor[valid]`` but through :func:`valid_rows` and ``index_select``: no host synchronisation per call
    on CUDA, and a backward without one either.
    """
    if tensor is None or valid is None:
        return tensor
    return tensor.index_select(0, valid_rows(valid).to(tensor.device))


BALANCE_LOSS_TYPES = ("megatron", "mixtral", "switch", "soft")


@dataclass
class AuxInputs:
    """What the losses need from one or more routers, restricted to non-padding tokens.

    The rows are the valid tokens (``Tv`` of them), unless ``row_weight`` is set: then every token has a row and the
    losses here weight the rows by it (0 for padding). That form has static shapes, which ``torch.compile`` needs
    (selecting the valid rows is a ``nonzero``, a graph break); :meth:`from_routing` builds it only when asked
    (``Router.aux_inputs`` does under compilation, for routers whose losses are the built-in ones).

    Attributes:
        probs (Tensor[Tv, E]): router probabilities (differentiable).
        gates (Tensor[Tv, E]): final dense gates (differentiable).
        selected (Tensor[Tv, E], bool or float): which experts each token was assigned to; the count-based losses
            sum its columns, so a float matrix may spread an assignment over several columns (AdaMoE shares a
            null-expert slot evenly among the null experts).
        logits (Tensor[Tv, E] or None): raw router scores.
        top_k (int): the router's nominal ``k``.
        extra (dict[str, Tensor]): router-specific loss inputs, one row per valid token (first dimension ``Tv``),
            e.g. per-token entropies or a second distribution; filled by a router's ``aux_inputs`` and read by its
            ``aux_losses``. Rows are concatenated by :meth:`cat` like the other fields.
        row_weight (Tensor[T] or None): float 0/1 weight of each row (padding 0) when the rows are all tokens rather
            than the valid ones; ``None``: every row counts.
        pooled_from (int or None): the columns from this one on form a group whose loads are averaged (AdaMoE's null
            experts, balanced as a group), also for ``"switch"``, which counts each token's top-1 probability.
    """

    probs: torch.Tensor
    gates: torch.Tensor
    selected: torch.Tensor
    logits: torch.Tensor | None
    top_k: int
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    row_weight: torch.Tensor | None = None
    pooled_from: int | None = None

    @classmethod
    def from_routing(
        cls, routing: Routing, valid: torch.Tensor | None, top_k: int, weighted: bool = False
    ) -> AuxInputs:
        """The inputs of ``routing``'s valid rows, or with ``weighted=True`` all its rows and ``row_weight`` from
        ``valid``."""
        return cls.from_rows(
            routing.probs, routing.dense_gates(), routing.selected(), routing.logits, valid, top_k, weighted
        )

    @classmethod
    def from_rows(
        cls,
        probs: torch.Tensor,
        gates: torch.Tensor,
        selected: torch.Tensor,
        logits: torch.Tensor | None,
        valid: torch.Tensor | None,
        top_k: int,
        weighted: bool = False,
        pooled_from: int | None = None,
    ) -> AuxInputs:
        """:meth:`from_routing` for loss inputs a router assembled itself (rows ``T``, ``valid[T]``)."""
        common = dict(top_k=top_k, pooled_from=pooled_from)
        if weighted and valid is not None:
            weight = valid.reshape(-1).to(device=probs.device, dtype=probs.dtype)
            return cls(probs=probs, gates=gates, selected=selected, logits=logits, row_weight=weight, **common)
        probs, gates, selected, logits = (take_valid(t, valid) for t in (probs, gates, selected, logits))
        return cls(probs=probs, gates=gates, selected=selected, logits=logits, **common)

    def same_rows(self, values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``values[T, ...]`` restricted to the rows these inputs hold: every row when they are weighted
        (``row_weight``), else the valid ones; for the per-token tensors a router adds to :attr:`extra`."""
        return values if self.row_weight is not None else take_valid(values, valid)

    @classmethod
    def cat(cls, inputs: list[AuxInputs]) -> AuxInputs:
        """Concatenate the rows of several routers (``loss_reduction="concat"``, MoE-PEFT style)."""
        widths = {i.probs.shape[1] for i in inputs}
        if len(widths) != 1:
            raise ValueError(
                f"loss_reduction='concat' needs the same number of experts in every router, got {sorted(widths)}; "
                "use loss_reduction='mean' or 'sum'."
            )
        logits = None
        if all(i.logits is not None for i in inputs):
            logits = torch.cat([i.logits for i in inputs])
        # a key only some routers provide cannot be reduced over all rows, so it is dropped
        keys = set.intersection(*(set(i.extra) for i in inputs))
        row_weight = None
        if any(i.row_weight is not None for i in inputs):
            row_weight = torch.cat(
                [i.probs.new_ones(i.probs.shape[0]) if i.row_weight is None else i.row_weight for i in inputs]
            )
        return cls(
            probs=torch.cat([i.probs for i in inputs]),
            gates=torch.cat([i.gates for i in inputs]),
            selected=torch.cat([i.selected for i in inputs]),
            logits=logits,
            top_k=inputs[0].top_k,
            extra={key: torch.cat([i.extra[key] for i in inputs]) for key in sorted(keys)},
            row_weight=row_weight,
            # (one adapter's routers: the same router type with the same null experts)
            pooled_from=inputs[0].pooled_from,
        )


def _zero(like: torch.Tensor) -> torch.Tensor:
    # keeps the router in the autograd graph when a batch has no valid token (DDP needs every parameter used)
    return like.sum() * 0.0


def _row_sum(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Sum of ``values[T, ...]`` over its rows, each weighted by ``weight[T]`` when given."""
    if weight is None:
        return values.sum(dim=0)
    return torch.tensordot(weight.to(values.dtype), values, dims=1)


def _weighted_count(weight: torch.Tensor) -> torch.Tensor:
    """The rows of weight 1 in ``weight[T]``, clamped to 1 (a mean over no row is then 0, not NaN)."""
    return weight.sum().clamp_min(1.0)


def row_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values[T, ...]`` over its rows (a ``[...]`` tensor), over the rows of weight 1 when ``weight[T]`` is
    given; with weights and no row of weight 1 it is 0 (the weighted sum is, and the count is clamped to 1)."""
    if weight is None:
        return values.mean(dim=0)
    return _row_sum(values, weight) / _weighted_count(weight).to(values.dtype)


def expert_load(inputs: AuxInputs, balance_loss_type: str) -> torch.Tensor:
    """The load ``f[E]`` of the chosen normalisation (see the module docstring), the loads of a group of columns
    (:attr:`AuxInputs.pooled_from`) replaced by their mean."""
    load = _expert_load(inputs, balance_loss_type)
    first = inputs.pooled_from
    if first is None or first >= load.shape[0]:
        return load
    return torch.cat([load[:first], load[first:].mean().expand(load.shape[0] - first)])


def _expert_load(inputs: AuxInputs, balance_loss_type: str) -> torch.Tensor:
    probs, weight = inputs.probs, inputs.row_weight
    n_tokens, n_experts = probs.shape
    if balance_loss_type == "switch":
        top1 = probs.argmax(dim=-1)
        if weight is None:
            return torch.bincount(top1, minlength=n_experts).to(probs.dtype) / n_tokens
        # a one-hot of static shape instead of bincount (whose size the host must read)
        return row_mean(torch.zeros_like(probs).scatter_(-1, top1.unsqueeze(-1), 1.0), weight)
    if balance_loss_type == "soft":
        return row_mean(inputs.gates.float(), weight)
    counts = _row_sum(inputs.selected.to(probs.dtype), weight)
    if balance_loss_type == "mixtral":
        return counts / (n_tokens if weight is None else _weighted_count(weight))
    if balance_loss_type == "megatron":
        return counts / counts.sum().clamp_min(1.0)
    raise ValueError(f"`balance_loss_type`={balance_loss_type!r} is not one of {BALANCE_LOSS_TYPES}.")


def load_balancing_loss(inputs: AuxInputs, balance_loss_type: str = "megatron") -> torch.Tensor:
    """``E * sum_e f_e * P_e`` over the valid tokens in ``inputs`` (0 when there are none)."""
    probs = inputs.probs
    if probs.shape[0] == 0:
        return _zero(probs)
    load = expert_load(inputs, balance_loss_type)
    importance = row_mean(probs, inputs.row_weight)
    return probs.shape[1] * (load * importance).sum()


def mean_rows(values: torch.Tensor, like: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the per-token ``values[Tv, ...]`` (over the rows of ``weight`` 1 when given, see :class:`AuxInputs`);
    a graph-connected 0 (through ``like``) when there is no valid token."""
    if values.shape[0] == 0:
        return _zero(like)
    if weight is None:
        return values.mean()
    return row_mean(values, weight).mean()


def router_z_loss(logits: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(z_t)^2`` over the rows of ``logits[T, ..., E]`` (those of ``weight``
    1 when given; 0 when there are none)."""
    return mean_rows(torch.logsumexp(logits.float(), dim=-1).square(), logits, weight)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of ``probs``; zero probabilities contribute 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """``MaxVio = (max_e c_e - mean_e c_e) / mean_e c_e`` over the last dimension of the loads ``counts[..., E]``.

    0 is perfect balance; ``E - 1`` means one expert took everything. Rows without any load give 0.
    """
    counts = counts.float()
    mean = counts.mean(dim=-1)
    return torch.where(mean > 0, (counts.amax(dim=-1) - mean) / mean.clamp_min(torch.finfo(counts.dtype).tiny), 0.0)
