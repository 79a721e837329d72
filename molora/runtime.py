"""Per-model runtime state shared by the adapted layers: routing context, aux-loss collector, routing statistics.

One :class:`MoLoraRuntime` lives on each ``MoLoraModel``; every adapted layer holds a reference to it. Hooks on the
wrapped transformers model drive it (``begin_forward`` before every forward, including each ``generate`` step;
``end_forward`` after), so that the layers see what only the model-level call knows: the attention mask (padding
never counts in losses or statistics), whether this is a cached decode step, the labels, per-sample adapter names.

Values recorded by a layer are *keyed by (layer, adapter)* and overwritten, never appended, within one forward: a
layer that is re-run by activation checkpointing during backward records the same values again instead of counting
them twice. Statistics move into the running totals at the start of the next forward or when read.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from .routers.balancing import AuxInputs, entropy

if TYPE_CHECKING:
    from .routers.base import Router, Routing


@dataclass
class RoutingContext:
    """What the model-level forward knows about the current call, published for the routers.

    Attributes:
        attention_mask (Tensor[B, S] or None): 1 for real tokens of the *current* input positions (the trailing
            ``S`` columns of the full mask during cached decoding), 0 for padding.
        is_decode (bool): True for a cached decode step (``past_key_values`` already holds earlier tokens).
        labels (Tensor[B, S] or None): the labels passed to the forward, if any.
        adapter_names (list[str] or None): per-sample adapter names for mixed-adapter batches.
        extra (dict): anything else a router may need (the raw forward kwargs are not kept).
    """

    attention_mask: Optional[torch.Tensor] = None
    is_decode: bool = False
    labels: Optional[torch.Tensor] = None
    adapter_names: Optional[list[str]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def token_mask(self, leading_shape: torch.Size) -> Optional[torch.Tensor]:
        """A flat bool mask ``[prod(leading_shape)]`` of non-padding tokens for a layer input of that leading shape.

        Returns ``None`` (every token counts) when there is no mask or the layer's input is not laid out as
        ``[batch, seq, ...]`` (e.g. tokens already flattened or re-ordered inside the model).
        """
        mask = self.attention_mask
        if mask is None or tuple(leading_shape) != tuple(mask.shape):
            return None
        return mask.reshape(-1).bool()


@dataclass
class _StatsDelta:
    """Routing statistics of one router in one forward (detached, on the router's device)."""

    tokens: torch.Tensor  # scalar, valid tokens
    assignments: torch.Tensor  # [E] assignments per expert
    gate_mass: torch.Tensor  # [E] sum of gates per expert
    prob_mass: torch.Tensor  # [E] sum of router probabilities per expert
    entropy_sum: torch.Tensor  # scalar, sum of router entropies (nats)


@dataclass
class LayerRoutingStats:
    """Accumulated routing statistics of one router (one adapted projection, one adapter).

    Attributes:
        tokens (int): non-padding tokens routed.
        load (list[float]): share of all assignments that went to each expert (sums to 1).
        gate_mass (list[float]): mean gate of each expert per token.
        prob_mass (list[float]): mean router probability of each expert.
        entropy (float): mean router entropy per token, in nats.
        normalized_entropy (float): ``entropy / ln(E)``, in [0, 1] (1 = uniform router).
        experts_per_token (float): mean number of experts a token used.
        max_violation (float): ``(max_e load_e - mean_e load_e) / mean_e load_e``; 0 is perfect balance.
    """

    tokens: int
    load: list[float]
    gate_mass: list[float]
    prob_mass: list[float]
    entropy: float
    normalized_entropy: float
    experts_per_token: float
    max_violation: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Totals:
    def __init__(self, delta: _StatsDelta) -> None:
        self.tokens = delta.tokens.clone()
        self.assignments = delta.assignments.clone()
        self.gate_mass = delta.gate_mass.clone()
        self.prob_mass = delta.prob_mass.clone()
        self.entropy_sum = delta.entropy_sum.clone()

    def add(self, delta: _StatsDelta) -> None:
        self.tokens += delta.tokens
        self.assignments += delta.assignments
        self.gate_mass += delta.gate_mass
        self.prob_mass += delta.prob_mass
        self.entropy_sum += delta.entropy_sum

    def summarize(self) -> LayerRoutingStats:
        tokens = int(self.tokens.item())
        n_experts = self.assignments.numel()
        denom = max(tokens, 1)
        assignments = self.assignments.double().cpu()
        total = float(assignments.sum())
        load = (assignments / total).tolist() if total > 0 else [0.0] * n_experts
        mean_load = 1.0 / n_experts
        max_violation = (max(load) - mean_load) / mean_load if total > 0 else 0.0
        ent = float(self.entropy_sum.item()) / denom
        return LayerRoutingStats(
            tokens=tokens,
            load=load,
            gate_mass=(self.gate_mass.double().cpu() / denom).tolist(),
            prob_mass=(self.prob_mass.double().cpu() / denom).tolist(),
            entropy=ent,
            normalized_entropy=ent / math.log(n_experts) if n_experts > 1 else 0.0,
            experts_per_token=total / denom,
            max_violation=max_violation,
        )


class _LossGradProbe(torch.autograd.Function):
    """Identity on the model loss that records the gradient arriving at it (the caller's loss scaling)."""

    @staticmethod
    def forward(ctx, loss, runtime):  # noqa: D102
        ctx.runtime = runtime
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        ctx.runtime.loss_grad = grad.detach()
        return grad, None


class _AttachAuxGrad(torch.autograd.Function):
    """Identity on a layer output that back-propagates ``d(scale * aux)`` into the router during backward.

    Used only under *reentrant* activation checkpointing, where the first forward runs without autograd so the
    aux loss added to ``outputs.loss`` carries no gradient; the recomputation during backward attaches it here
    (the technique of Megatron-LM's ``MoEAuxLossAutoScaler``).
    """

    @staticmethod
    def forward(ctx, output, aux, runtime):  # noqa: D102
        ctx.runtime = runtime
        ctx.aux_shape = aux.shape
        return output.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        scale = ctx.runtime.loss_grad
        aux_grad = torch.ones(ctx.aux_shape, device=grad.device, dtype=torch.float32)
        if scale is not None:
            aux_grad = aux_grad * scale.to(aux_grad.device, torch.float32)
        return grad, aux_grad, None


@dataclass
class _AuxRecord:
    losses: dict[str, torch.Tensor]
    coefs: dict[str, float]
    inputs: Optional[AuxInputs]
    router_cls: type


class MoLoraRuntime:
    """Routing context, aux-loss collector and routing statistics of one ``MoLoraModel``."""

    def __init__(self, peft_config: dict) -> None:
        self.peft_config = peft_config
        self.context = RoutingContext()
        self._aux: dict[tuple[str, str], _AuxRecord] = {}
        self._pending: dict[tuple[str, str], _StatsDelta] = {}
        self._totals: dict[tuple[str, str], _Totals] = {}
        self._num_routers: dict[tuple[str, str], int] = {}
        self.reentrant_seen = False
        self.loss_grad: Optional[torch.Tensor] = None
        self._warned_concat_reentrant = False

    # -- forward lifecycle ------------------------------------------------------------------------------------------

    def begin_forward(self, args: tuple, kwargs: dict) -> None:
        """Publish the routing context of a model-level call and start a new collection."""
        self.commit_stats()
        self._aux = {}
        self.reentrant_seen = False
        self.loss_grad = None
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        current = input_ids if input_ids is not None else embeds
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and current is not None:
            seq = current.shape[1] if current.dim() >= 2 else None
            if seq is not None and mask.shape[1] >= seq:
                mask = mask[:, mask.shape[1] - seq :]
            else:
                mask = None
        elif not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            mask = None
        self.context = RoutingContext(
            attention_mask=mask,
            is_decode=_is_decode_step(kwargs),
            labels=kwargs.get("labels"),
            adapter_names=kwargs.get("adapter_names"),
        )

    def end_forward(self, output: Any) -> Any:
        """Add the weighted aux losses to ``output.loss`` when the call computed a loss."""
        loss = _get_loss(output)
        if loss is None:
            return output
        aux = self.aux_loss()
        if aux is None:
            return output
        new_loss = loss + aux.to(loss.dtype)
        if self.reentrant_seen and torch.is_grad_enabled() and new_loss.requires_grad:
            new_loss = _LossGradProbe.apply(new_loss, self)
        return _set_loss(output, new_loss)

    # -- recording (called by the layers) ---------------------------------------------------------------------------

    def record(
        self,
        layer_key: str,
        adapter_name: str,
        router: Router,
        routing: Routing,
        valid: Optional[torch.Tensor],
        output: torch.Tensor,
    ) -> torch.Tensor:
        """Record one router's aux losses and statistics; return ``output`` (possibly wrapped, see below)."""
        config = self.peft_config[adapter_name]
        key = (layer_key, adapter_name)
        if config.track_routing_stats:
            self._pending[key] = _stats_delta(routing, valid)
        coefs = router.loss_coefficients(config)
        need = frozenset(name for name, coef in coefs.items() if coef > 0)
        if not need or self.context.is_decode:
            return output
        if not (torch.is_grad_enabled() or self.context.labels is not None):
            return output
        inputs = router.aux_inputs(routing, valid)
        concat = config.loss_reduction == "concat"
        losses = {} if concat else type(router).aux_losses(inputs, config.balance_loss_type, need)
        self._aux[key] = _AuxRecord(losses=losses, coefs=coefs, inputs=inputs if concat else None, router_cls=type(router))
        router_trains = router.weight.requires_grad
        if router.training and router_trains and not torch.is_grad_enabled():
            # first pass of reentrant checkpointing: this aux loss cannot carry a gradient; the recomputation will
            self.reentrant_seen = True
            router._molora_reentrant_pending = True
        elif torch.is_grad_enabled() and getattr(router, "_molora_reentrant_pending", False):
            router._molora_reentrant_pending = False
            if concat:
                if not self._warned_concat_reentrant:
                    warnings.warn(
                        "loss_reduction='concat' cannot back-propagate the router aux losses through reentrant "
                        "gradient checkpointing; use gradient_checkpointing_kwargs={'use_reentrant': False} or "
                        "loss_reduction='mean'.",
                        stacklevel=2,
                    )
                    self._warned_concat_reentrant = True
                return output
            weighted = sum(
                coefs[name] * value / self._num_routers.get((adapter_name, name), 1)
                if config.loss_reduction == "mean"
                else coefs[name] * value
                for name, value in losses.items()
            )
            output = _AttachAuxGrad.apply(output, weighted, self)
        return output

    # -- aux losses -------------------------------------------------------------------------------------------------

    def aux_losses(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """The unweighted aux losses of the last forward, reduced over routers, keyed by loss name."""
        per_adapter = self._reduced(adapter_name)
        out: dict[str, torch.Tensor] = {}
        for losses in per_adapter.values():
            for name, (value, _) in losses.items():
                out[name] = out[name] + value if name in out else value
        return out

    def aux_loss(self, adapter_name: Optional[str] = None) -> Optional[torch.Tensor]:
        """``sum(coef * loss)`` of the last forward over loss names and adapters; ``None`` when nothing was recorded."""
        total = None
        for losses in self._reduced(adapter_name).values():
            for value, coef in losses.values():
                term = coef * value
                total = term if total is None else total + term
        return total

    def _reduced(self, adapter_name: Optional[str]) -> dict[str, dict[str, tuple[torch.Tensor, float]]]:
        by_adapter: dict[str, list[_AuxRecord]] = {}
        for (_, adapter), record in self._aux.items():
            if adapter_name is None or adapter == adapter_name:
                by_adapter.setdefault(adapter, []).append(record)
        out: dict[str, dict[str, tuple[torch.Tensor, float]]] = {}
        for adapter, records in by_adapter.items():
            config = self.peft_config[adapter]
            coefs = records[0].coefs
            if config.loss_reduction == "concat":
                need = frozenset(n for n, c in coefs.items() if c > 0)
                inputs = AuxInputs.cat([r.inputs for r in records])
                losses = records[0].router_cls.aux_losses(inputs, config.balance_loss_type, need)
                out[adapter] = {name: (value, coefs[name]) for name, value in losses.items()}
                continue
            reduced = {}
            for name in coefs:
                values = [r.losses[name] for r in records if name in r.losses]
                if not values:
                    continue
                self._num_routers[(adapter, name)] = len(values)
                total = torch.stack([v.float() for v in values]).sum()
                if config.loss_reduction == "mean":
                    total = total / len(values)
                reduced[name] = (total, coefs[name])
            out[adapter] = reduced
        return out

    # -- statistics -------------------------------------------------------------------------------------------------

    def commit_stats(self) -> None:
        """Move the last forward's statistics into the running totals."""
        for key, delta in self._pending.items():
            totals = self._totals.get(key)
            if totals is None:
                self._totals[key] = _Totals(delta)
            else:
                totals.add(delta)
        self._pending = {}

    def routing_stats(self, adapter_name: Optional[str] = None) -> dict[str, LayerRoutingStats]:
        """Accumulated statistics per adapted layer (keys are module names; ``name:adapter`` with several adapters)."""
        self.commit_stats()
        adapters = {a for (_, a) in self._totals}
        out = {}
        for (layer, adapter), totals in sorted(self._totals.items()):
            if adapter_name is not None and adapter != adapter_name:
                continue
            key = layer if adapter_name is not None or len(adapters) == 1 else f"{layer}:{adapter}"
            out[key] = totals.summarize()
        return out

    def reset_stats(self) -> None:
        """Forget all accumulated routing statistics."""
        self._pending = {}
        self._totals = {}


def _stats_delta(routing: Routing, valid: Optional[torch.Tensor]) -> _StatsDelta:
    with torch.no_grad():
        probs = routing.probs.detach()
        n_experts = probs.shape[1]
        expert_index = routing.expert_index
        weight = routing.weight.detach().float()
        if valid is not None:
            keep = valid[routing.token_index]
            expert_index = expert_index[keep]
            weight = weight[keep]
            probs = probs[valid]
        assignments = torch.bincount(expert_index, minlength=n_experts).float()
        gate_mass = torch.zeros(n_experts, device=probs.device).index_add_(0, expert_index, weight)
        return _StatsDelta(
            tokens=torch.tensor(float(probs.shape[0]), device=probs.device),
            assignments=assignments,
            gate_mass=gate_mass,
            prob_mass=probs.float().sum(dim=0),
            entropy_sum=entropy(probs.float()).sum(),
        )


def _is_decode_step(kwargs: dict) -> bool:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        return bool(cache_position.reshape(-1)[0].item() > 0)
    past = kwargs.get("past_key_values")
    if past is None:
        return False
    get_len = getattr(past, "get_seq_length", None)
    if callable(get_len):
        try:
            return int(get_len()) > 0
        except Exception:  # noqa: BLE001 - a cache type we do not know: treat as prefill
            return False
    return bool(past)


def _get_loss(output: Any) -> Optional[torch.Tensor]:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        if output[0].dim() == 0:
            loss = output[0]
    return loss if isinstance(loss, torch.Tensor) else None


def _set_loss(output: Any, loss: torch.Tensor) -> Any:
    if hasattr(output, "loss"):
        output.loss = loss
        return output
    return (loss,) + tuple(output[1:])
