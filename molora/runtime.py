"""Per-model runtime state shared by the adapted layers: routing context, aux-loss collector, routing statistics.

One :class:`MoLoraRuntime` lives on each ``MoLoraModel``; every adapted layer holds a reference to it. Hooks on the
wrapped transformers model drive it (``begin_forward`` before every forward, including each ``generate`` step;
``end_forward`` after), so that the layers see what only the model-level call knows: the attention mask (padding
never counts in losses or statistics), whether this is a cached decode step, the labels, per-sample adapter names.

How the aux-loss gradient reaches the routers, whoever computes the loss: the weighted aux loss is added to
``outputs.loss`` and returned by ``molora_aux_loss()`` as a differentiable tensor, and in addition every router's
loss is attached to its layer's output by an identity autograd function (the technique of Megatron-LM's
``MoEAuxLossAutoScaler``). During backward, if the gradient already arrived through ``outputs.loss`` or
``molora_aux_loss()`` the attachments do nothing; otherwise (a trainer that computes its own loss from the logits
or log-probabilities, as TRL's ``SFTTrainer`` does, or reentrant activation checkpointing, whose first forward runs
without autograd) they deliver ``d(coef * loss)`` themselves, scaled like ``outputs.loss`` was when it is known.
The built-in top-k router needs no attachment: its losses come out of the same autograd node as its gates
(``molora.kernels.fused_router``), whose backward finds no gradient on the losses in exactly those cases and takes
the same ``d(coef * loss)`` from :class:`_MissingAuxGrads` (one autograd node less per layer). This state belongs to
each forward (:class:`ForwardAux`), so another forward before the backward (a reference forward with the adapter
disabled, as in TRL's ``DPOTrainer``, or two forwards entering one loss) does not change what the first delivers.
"Nothing reached ``outputs.loss``" means no gradient at all (DDP with ``find_unused_parameters`` hands an unused
output ``None``), not a zero one. Trainers' normalisations: with ``num_items_in_batch`` (``transformers.Trainer``) the
aux term in ``outputs.loss`` is weighted by this forward's share of those label tokens, and the layers' delivery is
divided by the trainer's accumulation steps (:class:`ForwardAux`), so an optimizer step applies ``coef *`` the mean
aux loss of its micro-batches.

Under ``torch.compile`` the layers' part is traced into the model's graph: :meth:`MoLoraRuntime.record` stores the
statistics and losses (dict stores, which Dynamo replays) and attaches nothing, since an attachment's backward reads
this object's Python state, which a compiled backward cannot. ``begin_forward`` and ``end_forward`` stay eager (a
graph break at the start and at the end of the model's forward, nowhere else), and ``end_forward`` then attaches a
delivery node for all routers to each differentiable output (:class:`_AttachModelAuxGrad`: logits, TRL's
log-probabilities, ...; the first to back-propagate delivers): the same gradients as eager for a loss taken from
``outputs.loss``, from ``molora_aux_loss()`` or from those outputs.

Values recorded by a layer are *keyed by (layer, adapter)* within one forward. A layer that activation checkpointing
re-runs during backward (:meth:`MoLoraRuntime.recompute`) records nothing again: it routes with its forward's context
and delivers its aux gradient through that forward's state, and its recomputed losses are not kept (they would keep
the recomputed activations alive). Statistics move into the running totals at the start of the next forward or when
read.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from .routers.balancing import AuxInputs, entropy
from .routers.state import commit_staged, exporting

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
        loss_targets (bool): the call passes the targets of a loss the model computes (``labels``, a question-answering
            model's ``start_positions``/``end_positions``; see :func:`passes_loss_targets`): its aux losses are
            computed also without autograd, so that an evaluation's ``outputs.loss`` includes them. Unlike
            ``labels``, an encoder-decoder model's encoder and decoder keep it.
        adapter_names (list[str] or None): per-sample adapter names for mixed-adapter batches.
        prompt_mask (BoolTensor[B, S] or None): positions of the current input that an explicit
            :meth:`MoLoraRuntime.prompt_mask` context marks as the prompt (``None`` outside such a context).
        past_length (int or None): tokens already in the KV cache (0 for a prefill; ``None`` when unknown).
        forward_id (int): increases with every model-level forward; a layer re-run by activation checkpointing
            during backward sees the id of its original forward (stateful routers use it to count once).
        kv_cache (bool): the call passes a KV cache (a generation prefill or decode step; cached decode steps may
            follow this call).
        generation (bool): the call is part of a generation (it passes a KV cache, or runs inside ``generate``, also
            with ``use_cache=False``): per-step training state observes nothing from it, also in train mode.
        cache_ref (weakref or None): a weak reference to that KV cache object (``None`` without one, or for a cache
            that takes no weak reference): sequence-level routers keep their prefill's decision with it.
        token_layout (tuple[int, int] or None): ``(batch, seq)`` of the call's current input, which a layer fed the
            tokens flattened in order (``[batch * seq, d]``, OPT's MLP) has lost.
        position_ids (Tensor[B, S] or None): the call's ``position_ids`` when it passes them without an attention
            mask, the way packed / padding-free batches mark several sequences in one row (see :meth:`packed`).
        packed_rows (bool or None): :meth:`packed`, when it was read eagerly at the start of the call (the model's
            runtime does this for adapters that route whole sequences, so that compiled code knows it too).
        segments (molora.routers.prompt.Segments or None): the sequences of packed rows, found with ``packed_rows``
            (their count and lengths are host values, which compiled code could not read without breaking its
            graph).
        deciders (list or None): the model runtime's list of the prompt routers that decided in this call (they
            append themselves; the model's end-of-forward hook keeps their decisions with the call's KV cache).
        logits_to_keep (int, Tensor or None): the call's ``logits_to_keep``: the positions the output projection
            sees (the last ``n``, or these indices), which :meth:`token_mask` cuts the padding mask to.
        extra (dict): anything else a router may need (the raw forward kwargs are not kept).
    """

    attention_mask: torch.Tensor | None = None
    is_decode: bool = False
    labels: torch.Tensor | None = None
    loss_targets: bool = False
    adapter_names: list[str] | None = None
    prompt_mask: torch.Tensor | None = None
    past_length: int | None = 0
    forward_id: int = 0
    kv_cache: bool = False
    generation: bool = False
    cache_ref: Any = None
    token_layout: tuple[int, int] | None = None
    position_ids: torch.Tensor | None = None
    logits_to_keep: int | torch.Tensor | None = None
    packed_rows: bool | None = None
    segments: Any = None
    deciders: list | None = field(default=None, repr=False, compare=False)
    extra: dict[str, Any] = field(default_factory=dict)
    # (attention_mask, its flat bool view) for token_mask: one mask object shared by every layer of a forward
    _flat_mask: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    # what sequence-level routers derive from the context once per forward (molora.routers.prompt.sequence_masks);
    # not an __init__ field, so that a context made from this one by dataclasses.replace starts without it
    _sequence_masks: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cache(self) -> Any:
        """The call's KV cache object while it is alive (through ``cache_ref``); ``None`` without one."""
        return self.cache_ref() if self.cache_ref is not None else None

    def _kept_positions(self, mask: torch.Tensor, leading_shape: tuple[int, ...]) -> torch.Tensor | None:
        """The padding mask of the positions the output projection sees under ``logits_to_keep`` (``[B, n]``), or
        ``None`` when ``leading_shape`` is not such a selection of the call's positions."""
        keep = self.logits_to_keep
        if keep is None or mask.dim() != 2 or len(leading_shape) != 2 or leading_shape[0] != mask.shape[0]:
            return None
        if isinstance(keep, int) and 0 < keep == leading_shape[1] < mask.shape[1]:
            return mask[:, -keep:]
        if isinstance(keep, torch.Tensor) and keep.dim() == 1 and keep.numel() == leading_shape[1]:
            return mask.index_select(1, keep.to(mask.device))
        return None

    def packed(self) -> bool:
        """Whether a row of the call holds several sequences: ``position_ids`` restart inside a row and no attention
        mask separates them (what TRL's ``packing=True`` / ``padding_free=True`` feed, and transformers reads the
        same way). Reads the positions back from the device; in compiled code, which cannot, ``packed_rows`` when it
        was read before the graph (else ``False``)."""
        if self.packed_rows is not None:
            return self.packed_rows
        positions = self.position_ids
        if positions is None or positions.dim() != 2 or positions.shape[1] < 2 or torch.compiler.is_compiling():
            return False
        return bool((positions[:, 1:] != positions[:, :-1] + 1).any())

    def sequence_layout(self, leading_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(batch, seq)`` for a layer input whose leading shape is ``[batch * seq]`` (tokens flattened in order);
        ``leading_shape`` itself otherwise."""
        layout = self.token_layout
        if len(leading_shape) == 1 and layout is not None and layout[0] * layout[1] == leading_shape[0]:
            return layout
        return tuple(leading_shape)

    def for_input(self, x: torch.Tensor) -> RoutingContext:
        """The context of a layer whose input is ``x``: in an encoder-decoder model's decoder, the cross-attention's
        key/value projections read the encoder's output (``encoder_hidden_states``, the very tensor), whose tokens
        have the encoder's padding mask and are all prompt; every other layer gets this context."""
        encoder = self.extra.get("encoder_input")
        if encoder is None:
            return self
        states = encoder[0]()
        if states is x:
            return encoder[1]
        # reentrant activation checkpointing recomputes the decoder layer from a detached copy of its inputs: the
        # same storage, another tensor object
        if (
            states is not None
            and not torch.compiler.is_compiling()
            and x.shape == states.shape
            and x.data_ptr() == states.data_ptr()
            and x.stride() == states.stride()
        ):
            return encoder[1]
        return self

    def select_rows(self, rows: torch.Tensor, batch_size: int) -> RoutingContext:
        """The context of samples ``rows`` of a ``batch_size`` batch (a mixed-adapter batch's samples of one adapter):
        the per-sample tensors (padding mask, labels, prompt mask) cut to those rows, the rest shared."""

        def cut(value: torch.Tensor | None) -> torch.Tensor | None:
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch_size:
                return value
            return value.index_select(0, rows.to(value.device))

        return dataclasses.replace(
            self,
            attention_mask=cut(self.attention_mask),
            labels=cut(self.labels),
            prompt_mask=cut(self.prompt_mask),
            position_ids=cut(self.position_ids),
            packed_rows=None,
            segments=None,
            _flat_mask=None,
        )

    def token_mask(self, leading_shape: torch.Size) -> torch.Tensor | None:
        """A flat bool mask ``[prod(leading_shape)]`` of non-padding tokens for a layer input of that leading shape.

        ``[batch * seq]`` (tokens flattened in order, as OPT's decoder layers feed their MLP) is read the same way.
        Returns ``None`` (every token counts) when there is no mask or the layer's input is laid out otherwise (e.g.
        tokens re-ordered inside the model).
        """
        mask = self.attention_mask
        if mask is None:
            return None
        if tuple(leading_shape) != tuple(mask.shape) and tuple(leading_shape) != (mask.numel(),):
            kept = self._kept_positions(mask, tuple(leading_shape))
            return kept.reshape(-1).bool() if kept is not None else None
        # one flat mask object per attention mask, shared by every layer of the forward pass: the routers cache the
        # valid-row index per mask object (molora.routers.balancing.valid_rows)
        if self._flat_mask is None or self._flat_mask[0] is not mask:
            self._flat_mask = (mask, mask.reshape(-1).bool())
        return self._flat_mask[1]


@dataclass
class _RawRouting:
    """One router's decision in one forward, kept (detached) until the statistics are committed.

    The reduction into sums happens once per forward for all layers together (:func:`_stats_rows`): recording is
    then a handful of references per layer instead of a dozen small operators.
    """

    probs: torch.Tensor  # [T, E]
    token_index: torch.Tensor  # [N]
    expert_index: torch.Tensor  # [N]
    weight: torch.Tensor  # [N]
    valid: torch.Tensor | None  # [T] bool, or None (every token counts)
    # [N] bool for a routing listing all (token, expert) pairs (Routing.dense_assignments): which are assignments
    assigned: torch.Tensor | None = None

    def group(self) -> tuple:
        """Records with equal keys can be stacked and reduced together."""
        valid_shape = None if self.valid is None else tuple(self.valid.shape)
        dense = self.assigned is not None
        # not the number of assignments: routers that choose a variable number per token (top-p, DynMoLE, ReLU)
        # would put every layer in its own group (_stats_rows pads the assignment lists instead)
        return (tuple(self.probs.shape), self.probs.device, valid_shape, dense)


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


def summarize_row(row: torch.Tensor) -> LayerRoutingStats:
    """:class:`LayerRoutingStats` from one flat row of sums ``[tokens, entropy_sum, assignments[E], gates[E],
    probs[E]]`` (the layout of :func:`_stats_rows`, and of the logging callback's raw totals)."""
    n_experts = (row.numel() - 2) // 3
    assignments, gate_mass, prob_mass = row[2:].view(3, n_experts)
    return summarize_sums(row[0], row[1], assignments, gate_mass, prob_mass)


def summarize_sums(
    tokens: torch.Tensor | float,
    entropy_sum: torch.Tensor | float,
    assignments: torch.Tensor,
    gate_mass: torch.Tensor,
    prob_mass: torch.Tensor,
) -> LayerRoutingStats:
    """:class:`LayerRoutingStats` from one router's summed statistics (also used to summarise sums reduced over
    data-parallel processes): valid ``tokens``, the sum of their router entropies, and per-expert sums ``[E]`` of
    assignments, gates and probabilities."""
    n_tokens = int(round(float(tokens)))
    n_experts = assignments.numel()
    denom = max(n_tokens, 1)
    assignments = assignments.double().cpu()
    total = float(assignments.sum())
    load = (assignments / total).tolist() if total > 0 else [0.0] * n_experts
    mean_load = 1.0 / n_experts
    max_violation = (max(load) - mean_load) / mean_load if total > 0 else 0.0
    ent = float(entropy_sum) / denom
    return LayerRoutingStats(
        tokens=n_tokens,
        load=load,
        gate_mass=(gate_mass.double().cpu() / denom).tolist(),
        prob_mass=(prob_mass.double().cpu() / denom).tolist(),
        entropy=ent,
        normalized_entropy=ent / math.log(n_experts) if n_experts > 1 else 0.0,
        experts_per_token=total / denom,
        max_violation=max_violation,
    )


#: forward arguments that are a loss's targets besides ``labels`` and ``*_labels``/``*_label`` (transformers'
#: question-answering heads; ``Trainer`` uses them as the label names of those models)
_TARGET_ARGUMENTS = ("start_positions", "end_positions")


def passes_loss_targets(kwargs: Mapping[str, Any]) -> bool:
    """Whether a model call's keyword arguments include the targets of a loss: ``labels``, ``shift_labels``, other
    ``*_labels``/``*_label`` heads (``next_sentence_label``, ``mc_labels``) or a question-answering model's
    ``start_positions``/``end_positions`` (not ``None``)."""
    return any(
        value is not None and (name in _TARGET_ARGUMENTS or name == "labels" or name.endswith(("_labels", "_label")))
        for name, value in kwargs.items()
    )


def _loss_share(kwargs: Mapping[str, Any], shifts_labels: bool) -> torch.Tensor | None:
    """``labels != -100`` tokens of this forward over ``num_items_in_batch`` (the trainer's count over all
    micro-batches of the optimizer step, and over all processes with ``average_tokens_across_devices``), when the
    trainer passed it; counted as ``transformers.Trainer`` counts them (``shift_labels``, else ``labels[..., 1:]``
    for a causal LM)."""
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and shifts_labels:
            labels = labels[..., 1:]
    if total is None or not isinstance(labels, torch.Tensor):
        return None
    if isinstance(total, torch.Tensor):
        if total.numel() != 1:
            return None  # DataParallel's per-device copies: no single normaliser
        total = total.reshape(()).to(labels.device)
    mine = labels.ne(-100).sum()
    return mine / torch.as_tensor(total, device=labels.device).clamp_min(1)


class _LossProbe(torch.autograd.Function):
    """Identity on a loss that contains the aux loss; records the gradient scale arriving at it during backward.

    ``delivers`` is True when the aux term inside the loss carries autograd history: its gradient then reaches the
    routers through the loss itself, and the per-layer attachments stand down.
    """

    @staticmethod
    def forward(ctx, loss, forward_aux, delivers):  # noqa: D102
        # no zeros for a loss that got no gradient: DDP's output node (with `find_unused_parameters`) passes "none" to
        # an unused `outputs.loss`, which must not count as having delivered the aux gradient (at a scale of 0)
        ctx.set_materialize_grads(False)
        ctx.forward_aux = forward_aux
        ctx.delivers = delivers
        # a copy, not a view: trainers scale the loss in place (`loss *= num_processes`), forbidden on a view
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if grad is None:
            return None, None, None
        state = ctx.forward_aux
        state.loss_grad = grad.detach()
        state.delivered = state.delivered or ctx.delivers
        return grad, None, None


class _AttachAuxGrad(torch.autograd.Function):
    """Identity on a layer output that back-propagates its router's weighted aux losses when nothing else did."""

    @staticmethod
    def forward(ctx, output, runtime, adapter_name, names, router, *losses):  # noqa: D102
        ctx.runtime = runtime
        ctx.forward_aux = runtime.forward_aux
        ctx.adapter_name = adapter_name
        ctx.names = names
        ctx.router_weight = router.weight
        ctx.shapes = [(loss.shape, loss.dtype, loss.device) for loss in losses]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        state = ctx.forward_aux
        if state.delivered:
            return (grad, None, None, None, None) + (None,) * len(ctx.names)
        if not ctx.names:
            ctx.runtime._warn_concat_once()
            return grad, None, None, None, None
        accumulated = ctx.router_weight.grad is not None
        grads = state.fallback_grads(ctx.adapter_name, zip(ctx.names, ctx.shapes), accumulated)
        return (grad, None, None, None, None, *grads)


class _AttachModelAuxGrad(torch.autograd.Function):
    """Identity on one of the model's outputs (its logits, say) that back-propagates the weighted aux losses of a
    compiled forward when nothing else did: :class:`_AttachAuxGrad` for all routers at once, created outside the
    compiled graph (whose backward cannot read the runtime's Python state). A loss computed from ``outputs.logits``
    (or TRL's ``outputs.log_probs``) reaches it; one computed from ``outputs.loss`` or with ``molora_aux_loss()``
    delivers the gradient itself first."""

    @staticmethod
    def forward(ctx, output, runtime, delivery, concat, *losses):  # noqa: D102
        ctx.runtime = runtime
        ctx.forward_aux = runtime.forward_aux
        ctx.delivery = delivery
        ctx.concat = concat
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        state, delivery = ctx.forward_aux, ctx.delivery
        nothing = (grad, None, None, None) + (None,) * len(delivery.specs)
        if delivery.done or state.delivered:
            return nothing
        # once per forward, whichever of the wrapped outputs back-propagates first (not `state.delivered`: the
        # layers that ran eagerly, past a graph break, still deliver their own routers' gradient)
        delivery.done = True
        if ctx.concat:
            ctx.runtime._warn_concat_once()
        grads = [state.fallback_grads(adapter, [(name, spec)])[0] for adapter, name, spec in delivery.specs]
        return (grad, None, None, None, *grads)


@dataclass
class _ModelDelivery:
    """The losses one forward's :class:`_AttachModelAuxGrad` nodes deliver (``(adapter, loss name, (shape, dtype,
    device))`` each) and whether one of them already did."""

    specs: list[tuple[str, str, tuple]]
    done: bool = False


class _MissingAuxGrads:
    """The gradients a router's aux losses get when nothing back-propagated into them (``missing_grads`` of
    :func:`molora.kernels.fused_router.topk_gates_and_losses`): what :class:`_AttachAuxGrad` delivers, from inside the
    router's own autograd node instead of an extra identity node on the layer's output."""

    __slots__ = ("forward_aux", "adapter_name", "router_weight")

    def __init__(self, forward_aux: ForwardAux, adapter_name: str, router_weight: torch.Tensor) -> None:
        self.forward_aux = forward_aux
        self.adapter_name = adapter_name
        self.router_weight = router_weight

    def __call__(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        """``(d_balance, d_z, d_entropy)`` (the entropy loss of the top-p routers' selection rules)."""
        state = self.forward_aux
        if state.delivered:
            return None, None, None
        scalar = (torch.Size(), dtype, device)
        accumulated = self.router_weight.grad is not None
        specs = [("balance", scalar), ("z", scalar), ("entropy", scalar)]
        return tuple(state.fallback_grads(self.adapter_name, specs, accumulated))


class _SelfDelivered(dict):
    """Aux losses (name -> value) whose router delivers their gradient itself (see :class:`_MissingAuxGrads`)."""


def self_delivered(losses: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """``losses`` computed with a ``missing_grads`` callback, marked for :meth:`MoLoraRuntime.record` (which then adds
    no identity node): the losses carry the autograd node that holds the callback. Without gradient there is nothing
    to deliver and they stay a plain dict."""
    if losses is not None and any(loss.requires_grad for loss in losses.values()):
        return _SelfDelivered(losses)
    return losses


def _delivers_missing_grads(router: Router) -> bool:
    # only implementations marked so take the `missing_grads` argument (the built-in top-k router's; a subclass
    # that overrides the method without the mark keeps the identity node on its layer's output)
    return getattr(type(router).select_with_losses, "takes_missing_grads", False)


@dataclass
class _AuxRecord:
    losses: dict[str, torch.Tensor]
    coefs: dict[str, float]
    inputs: AuxInputs | None
    router_cls: type
    # whether the layer took care of the aux gradient's fallback delivery (an attachment on its output or the router's
    # own node); False for a compiled forward, where end_forward attaches one node for the whole model
    delivers: bool = True


_warned_accumulation = False


def _warn_accumulation_once() -> None:
    global _warned_accumulation
    if _warned_accumulation:
        return
    _warned_accumulation = True
    warnings.warn(
        "molora: the routers' aux-loss gradient is delivered by the adapted layers (the trainer computes its own loss "
        "instead of using outputs.loss), and the routers already held gradients from an earlier backward: if "
        "gradients accumulate over micro-batches, each one adds the full aux gradient. Add "
        "molora.training.MoLoraCallback() to the trainer (it divides by gradient_accumulation_steps), or add "
        "model.molora_aux_loss() / steps to the loss of a custom loop.",
        UserWarning,
        stacklevel=2,
    )


class ForwardAux:
    """The state of one model-level forward's aux-gradient delivery.

    Every delivery node of a forward (:class:`_LossProbe`, :class:`_AttachAuxGrad`, :class:`_AttachModelAuxGrad`,
    :class:`_MissingAuxGrads`) holds that forward's object, so forwards whose backward runs later keep their own
    state: a second forward before the backward (a reference model's forward with the adapter disabled, as in TRL's
    ``DPOTrainer``; two forwards whose outputs enter one loss; a ``no_grad`` forward or ``generate`` in between)
    changes nothing for the first.

    It holds no loss tensor: the router's own autograd node holds it (:class:`_MissingAuxGrads`), and a loss that
    carries that node would close a reference cycle through the autograd graph, which Python's garbage collector
    cannot see (every forward's graph, with its saved activations when no backward ran, stayed alive). The losses are
    the runtime's records (``MoLoraRuntime._aux``); this object counts them, for the weights of the fallback delivery.

    Attributes:
        counted: ``(layer, adapter) -> (loss coefficients, loss names)`` of the forward's records (activation
            checkpointing's recompute of a layer keeps the record its forward made, see :meth:`MoLoraRuntime.record`).
        delivered: the aux gradient already reached the routers through ``outputs.loss`` or ``molora_aux_loss()``.
        loss_grad: the gradient that arrived at ``outputs.loss`` (the scale of the fallback delivery), once known.
        share: this forward's share of the loss normaliser when the trainer passed ``num_items_in_batch`` (its label
            tokens over that count; see :func:`_loss_share`), which scales the aux term added to ``outputs.loss``.
        accumulation_steps: micro-batches per optimizer step (``MoLoraCallback`` sets it from the trainer's
            arguments), dividing the fallback delivery when no gradient reached ``outputs.loss``.
        grad_scaler: the trainer's enabled ``torch.amp.GradScaler`` (fp16 mixed precision; ``MoLoraCallback`` finds
            it on the trainer's optimizer) or ``None``: it multiplies the loss before backward and divides every
            gradient after, so the fallback delivery is multiplied by its current scale too.
    """

    __slots__ = (
        "peft_config",
        "counted",
        "delivered",
        "loss_grad",
        "share",
        "accumulation_steps",
        "grad_scaler",
        "_weights",
    )

    def __init__(
        self,
        peft_config: dict,
        share: torch.Tensor | None = None,
        accumulation_steps: int = 1,
        grad_scaler: Any = None,
    ) -> None:
        self.peft_config = peft_config
        self.counted: dict[tuple[str, str], tuple[dict[str, float], tuple[str, ...]]] = {}
        self.delivered = False
        self.loss_grad: torch.Tensor | None = None
        self.share = share
        self.accumulation_steps = accumulation_steps
        self.grad_scaler = grad_scaler
        self._weights: dict[str, dict[str, float]] = {}

    def fallback_grads(self, adapter_name: str, specs, accumulated: bool = False) -> list[torch.Tensor]:
        """``d(weight * loss)/d(loss)`` for one router's losses that received no gradient; ``specs`` are ``(loss name,
        (shape, dtype, device))`` pairs. Scaled like the aux term inside ``outputs.loss`` was when that loss got a
        gradient (``loss_grad``, times ``share``), else by ``1 / accumulation_steps`` (a trainer that computes its own
        loss: the aux loss is then averaged over the micro-batches of an optimizer step, as TRL does for MoE models)
        and by ``grad_scaler``'s scale (what the loss was multiplied by). ``accumulated``: the router's weight already
        held a gradient (from an earlier backward since the gradients were last zeroed); with one accumulation step
        known, that warns once (no ``MoLoraCallback``)."""
        weights = self.weights(adapter_name)
        scale = self.loss_grad
        if scale is not None and self.share is not None:
            scale = scale * self.share.to(scale.device)
        grads = []
        for name, (shape, dtype, device) in specs:
            g = torch.full(shape, weights.get(name, 0.0), dtype=dtype, device=device)
            if scale is not None:
                g = g * scale.to(device=device, dtype=dtype)
            else:
                if self.accumulation_steps != 1:
                    g = g / self.accumulation_steps
                if self.grad_scaler is not None:
                    g = self.grad_scaler.scale(g)  # a device tensor product: no host synchronisation
            grads.append(g)
        if scale is None and accumulated and self.accumulation_steps == 1:
            _warn_accumulation_once()
        return grads

    def weights(self, adapter_name: str) -> dict[str, float]:
        """Weight of one router's loss in the total: ``coef`` (sum) or ``coef / number of routers`` (mean)."""
        if adapter_name not in self._weights:
            self._weights[adapter_name] = self._compute_weights(adapter_name)
        return self._weights[adapter_name]

    def _compute_weights(self, adapter_name: str) -> dict[str, float]:
        config = self.peft_config[adapter_name]
        counts: dict[str, int] = {}
        coefs: dict[str, float] = {}
        for (_, adapter), (record_coefs, names) in self.counted.items():
            if adapter != adapter_name:
                continue
            coefs.update(record_coefs)
            for name in names:
                counts[name] = counts.get(name, 0) + 1
        if config.loss_reduction == "mean":
            return {name: coefs[name] / n for name, n in counts.items()}
        return {name: coefs[name] for name in counts}


class MoLoraRuntime:
    """Routing context, aux-loss collector and routing statistics of one ``MoLoraModel``."""

    def __init__(self, peft_config: dict) -> None:
        self.peft_config = peft_config
        self.context = RoutingContext()
        # adapters added to a model that already had one, not yet compared with the others (molora.model)
        self.unchecked_adapters: set[str] = set()
        # the aux records of the current forward, (layer, adapter) -> _AuxRecord, and their gradient's delivery
        self.forward_aux = ForwardAux(peft_config)
        self._aux: dict[tuple[str, str], _AuxRecord] = {}
        # whether the current forward runs with autograd, and the aux losses of the last such forward that had any
        self._aux_grad = False
        self._last_training_aux: dict[str, torch.Tensor] = {}
        # per (layer, adapter): the last forward's decision (a recompute under activation checkpointing overwrites
        # it instead of counting twice) and the running sums as one flat row (see _stats_rows)
        self._pending: dict[tuple[str, str], _RawRouting] = {}
        self._totals: dict[tuple[str, str], torch.Tensor] = {}
        # how many times the statistics were reset or restored to a checkpoint: RoutingStatsCallback reads what the
        # model counted since its last look as a difference, unless they were replaced in between
        self.stats_resets = 0
        self._call_labels: torch.Tensor | None = None
        # per adapter name: how many times an adapter of that name was deleted (forget_adapter); a checkpoint of the
        # statistics records them, so that restoring it brings back no deleted adapter's counts
        self._forgotten: dict[str, int] = {}
        # leave out the statistics of train-mode forwards that run without autograd (RoutingStatsCallback sets it
        # while a trainer trains: a step's no-grad forwards, such as GRPO's sampling `generate` or a reference pass,
        # are not training routing; eval-mode forwards still record)
        self.stats_grad_only = False
        # earlier forwards' records waiting to be reduced together: cached decode steps (a few tokens each) are
        # committed in batches of up to _MAX_DEFERRED_FORWARDS instead of one reduction per step
        self._deferred: list[dict[tuple[str, str], _RawRouting]] = []
        # counts model-level forwards (RoutingContext.forward_id)
        self.generation = 0
        # per adapted layer: (context, ForwardAux, aux records) of the last forward it ran in outside a backward pass,
        # for activation checkpointing's recompute of it (see recompute); True while such a recompute runs
        self._origins: dict[str, tuple[RoutingContext, ForwardAux, dict]] = {}
        self._recomputing = False
        self._warned_concat = False
        # [B, P] prompt positions set by `prompt_mask()`, published to the routers as `RoutingContext.prompt_mask`
        self._prompt_override: torch.Tensor | None = None
        # the prompt length of the `generate` call running (MoLoraModel.generate), see `generating`
        self._generation_prompt_length: int | None = None
        self._generating = False
        # the device of a zero aux loss for a forward that computes aux losses but has none (see user_aux_loss)
        self._aux_zero_device: torch.device | None = None
        # a model-level forward is running (between begin_forward and end_forward): see begin_stack
        self._in_forward = False
        # how a trainer normalises: causal-LM losses shift the labels (counted like `Trainer._get_num_items_in_batch`),
        # and micro-batches per optimizer step (set by MoLoraCallback for the fallback delivery; see ForwardAux)
        self.loss_shifts_labels = True
        self.accumulation_steps = 1
        # the trainer's fp16 gradient scaler (MoLoraCallback), which scales the fallback delivery as it scales the loss
        self.grad_scaler: Any = None
        # per-sample adapter names of a mixed-adapter call (MoLoraModel._enable_peft_forward_hooks): candidate lists,
        # the first whose length equals a layer's batch size applies (beam search repeats the samples)
        self.batch_adapter_names: list[list[str]] | None = None
        # MiLoRA module mode (molora.adapters.milora): the input of each decoder layer while it runs, and its
        # routers' decisions for this forward, keyed by (layer, adapter)
        self.milora_inputs: dict[str, weakref.ref] = {}
        self.milora_decisions: dict[tuple[str, str], Any] = {}
        self._milora_open: dict[str, bool] = {}
        # the prompt routers that decided in the current call (RoutingContext.deciders), and by id those whose
        # decisions were kept with a KV cache (weak references), for the model's hooks (molora.routers.prompt)
        self.prompt_deciders: list = []
        self.prompt_routers: dict[int, weakref.ref] = {}
        # per adapter, the aux-loss fields of its config as last validated (see _check_loss_fields)
        self._checked_loss_fields: dict[str, tuple] = {}

    def __deepcopy__(self, memo: dict) -> MoLoraRuntime:
        """The runtime of a copied model (``copy.deepcopy``: EMA or reference copies): the configuration, the trainer
        settings and the accumulated statistics; none of the last forward's state, whose aux records hold autograd
        graphs (which cannot be deep-copied) and whose contexts refer to that forward's inputs."""
        clone = self._lasting_copy(copy.deepcopy(self.peft_config, memo))
        memo[id(self)] = clone
        return clone

    def __getstate__(self) -> dict:
        """Pickling (``torch.save(model)``, a model sent to another process) keeps what a deep copy keeps: the last
        forward's state holds autograd graphs and weak references (the KV cache, the encoder's output), which cannot
        be pickled. The configuration stays the object the model holds (pickle keeps the two shared)."""
        return self._lasting_copy(self.peft_config).__dict__

    def __setstate__(self, state: dict) -> None:
        # a runtime pickled by an earlier molora lacks the attributes added since: a fresh runtime's defaults
        self.__dict__.update({**MoLoraRuntime(state["peft_config"]).__dict__, **state})

    def _lasting_copy(self, peft_config: dict) -> MoLoraRuntime:
        """A fresh runtime on ``peft_config`` with this one's trainer settings and (committed) statistics."""
        self.commit_stats()
        clone = MoLoraRuntime(peft_config)
        clone.loss_shifts_labels = self.loss_shifts_labels
        clone.accumulation_steps = self.accumulation_steps
        clone.grad_scaler = self.grad_scaler
        clone.unchecked_adapters = set(self.unchecked_adapters)
        clone._totals = {key: total.detach().clone() for key, total in self._totals.items()}
        clone._forgotten = dict(self._forgotten)
        return clone

    # -- forward lifecycle ------------------------------------------------------------------------------------------

    def _check_loss_fields(self) -> None:
        """Validate each adapter's aux-loss fields when they changed since they were last checked.

        Every forward reads them from the live config, so they may change during training (a coefficient schedule),
        but a bad value must fail, naming the field, rather than act as another (a negative or NaN coefficient as 0,
        an unknown ``loss_reduction`` as ``"sum"``) until ``save_pretrained`` refuses it."""
        for name, config in self.peft_config.items():
            if not hasattr(config, "_validate_loss_fields"):
                continue  # another PEFT method's adapter on the same model (a LoraConfig): no aux losses
            checked = self._checked_loss_fields.get(name)
            # the same objects, not equal values: np.float32(0.5) == 0.5, but adapter_config.json cannot hold it
            if checked is None or any(new is not old for new, old in zip(_loss_fields(config), checked)):
                try:
                    config._validate_loss_fields()
                except ValueError as error:
                    raise ValueError(f"Adapter {name!r}: {error}") from None
                self._checked_loss_fields[name] = _loss_fields(config)  # as validated: a numpy value became a float

    @torch.compiler.disable
    def begin_forward(self, args: tuple, kwargs: dict) -> None:
        """Publish the routing context of a model-level call and start a new collection.

        Not compiled (``torch.compile`` of the model runs it eagerly): it commits statistics and resets Python state,
        and a compiled copy would guard on that state and recompile every forward."""
        past_length, is_decode = _cache_state(kwargs)
        if is_decode and len(self._deferred) < _MAX_DEFERRED_FORWARDS:
            # statistics are only read between calls (routing_stats commits first): keep the records of this
            # generation's steps and reduce them together
            if self._pending:
                self._deferred.append(self._pending)
                self._pending = {}
        elif not exporting():
            # (a torch.export trace leaves the records of earlier forwards for the next eager call: reduced inside
            # the trace, real tensors would meet its fake ones)
            self.commit_stats()
        self._check_loss_fields()
        share = _loss_share(kwargs, self.loss_shifts_labels)
        self.forward_aux = ForwardAux(self.peft_config, share, self.accumulation_steps, self.grad_scaler)
        if not exporting():  # (a trace computes no aux loss, see _coefficients_needed: the last forward's stay)
            grad = torch.is_grad_enabled()
            if grad:
                self._last_training_aux = {}
            elif self._aux and self._aux_grad:
                # a forward without autograd after a training one (a reference model's, a generation):
                # training_aux_losses still reports the training forward's. Detached values, not its records: their
                # graph's AccumulateGrad nodes would keep the parameters alive (a deleted adapter's too)
                with torch.no_grad():
                    self._last_training_aux = {n: v.detach() for n, v in self._summed(self._reduced(None)).items()}
            self._aux = {}
            self._aux_grad = grad
        self.generation += 1
        self.prompt_deciders.clear()  # (a call that raised may have left its deciders)
        # the call's labels: an encoder-decoder's decoder finds its padding in them (see begin_stack)
        self._call_labels = kwargs.get("labels")
        current = call_input(args, kwargs)
        mask = _call_token_mask(current, kwargs.get("attention_mask"), past_length)
        if _cpu_mask_of_ones(mask):
            mask = None
        self._in_forward = True
        # a forward that computes aux losses (autograd on or labels given, not a cached decode step): where
        # user_aux_loss returns 0 rather than None when no router has a loss with a non-zero coefficient
        targets = passes_loss_targets(kwargs)
        computes_aux = (torch.is_grad_enabled() or targets) and not is_decode
        self._aux_zero_device = current.device if computes_aux and current is not None else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        positions = kwargs.get("position_ids")
        if is_decode or kwargs.get("attention_mask") is not None or not isinstance(positions, torch.Tensor):
            positions = None  # only packed rows need them (RoutingContext.packed), and those come without a mask
        self.context = RoutingContext(
            attention_mask=mask,
            is_decode=is_decode,
            labels=kwargs.get("labels"),
            loss_targets=targets,
            adapter_names=kwargs.get("adapter_names"),
            prompt_mask=None if is_decode else self._current_prompt_mask(current),
            past_length=past_length,
            forward_id=self.generation,
            kv_cache=cache is not None,
            generation=cache is not None or self._generating,
            cache_ref=_weak_ref(cache),
            token_layout=_token_layout(current),
            position_ids=positions,
            logits_to_keep=kwargs.get("logits_to_keep", kwargs.get("num_logits_to_keep")),
            deciders=self.prompt_deciders,
        )
        if self.context.adapter_names is None and self.batch_adapter_names is not None:
            self.context.adapter_names = self.batch_adapter_names[0]
        if positions is not None and self.routes_sequences():
            # found here, outside any compiled graph: a compiled prompt router reads them as they are
            from .routers.prompt import Segments

            self.context.packed_rows = self.context.packed()
            if self.context.packed_rows:
                self.context.segments = Segments.from_positions(positions)

    def routes_sequences(self) -> bool:
        """Whether an adapter of the model routes whole sequences (the prompt router), whose decisions need the
        sequences of packed rows."""
        from .routers.prompt import is_prompt_router

        return any(is_prompt_router(getattr(config, "router", None)) for config in self.peft_config.values())

    def forward_done(self) -> None:
        """The model-level forward returned or raised (see :meth:`begin_stack`)."""
        self._in_forward = False
        self._call_labels = None  # (only its decoder reads them; not kept with a pickled or copied model)

    @torch.compiler.disable
    def begin_stack(self, stack: str, args: tuple, kwargs: dict) -> bool:
        """An encoder-decoder model's encoder or decoder (``stack``) starts: its own tokens' padding mask replaces the
        model call's (the encoder's ``attention_mask``), which would apply to decoder tokens whenever the two lengths
        happen to be equal. An encoder called on its own, as ``generate`` calls it before the decoding steps, begins
        a model-level forward (its mask, its statistics); returns True then (the caller ends it).

        ``stack="backbone"``: a decoder-only model's stack without its head (``LlamaForCausalLM.model``). Called alone
        (TRL's distillation trainers compute their loss from its hidden states) it begins a model-level forward, with
        its own padding mask and aux-loss collection, instead of recording into the last call's (after ``generate``
        a generation's, which computes no aux loss); inside the model's call it changes nothing (the same tokens)."""
        if not self._in_forward:
            if stack == "decoder":
                return False
            self.begin_forward(args, kwargs)
            return True
        if stack == "backbone":
            return False
        current = call_input(args, kwargs)
        if stack == "encoder":
            # the encoder's input is the prompt: its padding mask; labels (the decoder's targets) say nothing here
            mask = _call_token_mask(current, kwargs.get("attention_mask"), 0)
            self.context = dataclasses.replace(
                self.context,
                attention_mask=mask,
                labels=None,
                token_layout=_token_layout(current),
                position_ids=None,
                _flat_mask=None,
            )
            return False
        past_length = _cache_state(kwargs)[0]
        mask = _call_token_mask(current, kwargs.get("attention_mask"), past_length)
        labels = self._call_labels
        if (
            mask is None
            and kwargs.get("attention_mask") is None
            and not past_length
            and isinstance(labels, torch.Tensor)
            and current is not None
            and tuple(labels.shape) == tuple(current.shape[:2])
        ):
            # teacher forcing without a decoder mask (DataCollatorForSeq2Seq pads the labels with -100 and passes
            # none): the positions whose target is ignored are the decoder's padding
            mask = labels != -100
        prompt_mask = None
        if past_length == 0 and current is not None and current.dim() >= 2:
            # sequence-level routers decide from the decoder's first token (its start token): what generate's prefill
            # sees, and causal in teacher-forced training (the targets never steer the decision)
            prompt_mask = torch.zeros(current.shape[:2], dtype=torch.bool, device=current.device)
            prompt_mask[:, 0] = True
        extra = dict(self.context.extra)
        encoder_states = kwargs.get("encoder_hidden_states")
        if isinstance(encoder_states, torch.Tensor):
            encoder_mask = kwargs.get("encoder_attention_mask")
            encoder_mask = encoder_mask if isinstance(encoder_mask, torch.Tensor) and encoder_mask.dim() == 2 else None
            encoder_context = dataclasses.replace(
                self.context, attention_mask=encoder_mask, labels=None, prompt_mask=None, _flat_mask=None
            )
            extra["encoder_input"] = (weakref.ref(encoder_states), encoder_context)
        self.context = dataclasses.replace(
            self.context,
            attention_mask=mask,
            labels=None,
            prompt_mask=prompt_mask,
            token_layout=_token_layout(current),
            position_ids=None,
            extra=extra,
            _flat_mask=None,
        )
        return False

    @property
    def recomputing(self) -> bool:
        """Whether an adapted layer's forward is being re-run by activation checkpointing (see :meth:`recompute`)."""
        return self._recomputing

    @property
    def observes_nothing(self) -> bool:
        """Whether per-step training state (DR-LoRA frequencies, stateful routers' loads) must ignore this layer call:
        activation checkpointing's recompute (the forward counted it) or a generation's call (also in train mode, as
        RL trainers sample; see ``RoutingContext.generation``)."""
        return self._recomputing or self.context.generation

    def remember_origin(self, layer_key: str) -> None:
        """An adapted layer runs in the current forward (outside a backward pass): what :meth:`recompute` restores."""
        self._origins[layer_key] = (self.context, self.forward_aux, self._aux)

    @contextlib.contextmanager
    def recompute(self, layer_key: str) -> Iterator[None]:
        """An adapted layer's forward re-run inside a backward pass (activation checkpointing's recompute).

        Within the block the layer routes with the context of the forward it belongs to (its padding mask, labels and
        ``forward_id``, so stateful routers count it once, also when other forwards ran before this backward), its
        delivery nodes use that forward's :class:`ForwardAux` (reentrant checkpointing delivers from the recompute),
        and it records no statistics and keeps the aux record its forward made (see :meth:`record`). The forward is
        the last one that ran the layer outside a backward pass: a reference forward with the adapter disabled, as in
        TRL's ``DPOTrainer``, does not run it."""
        origin = self._origins.get(layer_key)
        saved = (self.context, self.forward_aux, self._aux, self._recomputing)
        if origin is not None:
            self.context, self.forward_aux, self._aux = origin
        self._recomputing = True
        try:
            yield
        finally:
            self.context, self.forward_aux, self._aux, self._recomputing = saved

    def milora_reset(self, layer_key: str) -> None:
        """A decoder layer starts or returns (MiLoRA module mode): forget its input and decisions, and let the next
        submodule it calls publish its input (:meth:`milora_first_input`): the first call of the next forward, or of
        activation checkpointing's recompute of the layer in backward."""
        self._milora_open[layer_key] = True
        self.milora_inputs.pop(layer_key, None)
        if self.milora_decisions:
            for key in [key for key in self.milora_decisions if key[0] == layer_key]:
                del self.milora_decisions[key]

    def milora_first_input(self, layer_key: str, hidden: Any) -> None:
        """A submodule of a decoder layer is called: the first one since :meth:`milora_reset` publishes the layer's
        input (no decision of the layer exists yet: its projections run after that call). Kept as a weak
        reference: the layer's own frame keeps the tensor alive while its projections need it, and nothing here
        keeps activations alive after the layer (or its recompute) is done."""
        if not self._milora_open.get(layer_key, False):
            return
        self._milora_open[layer_key] = False
        if isinstance(hidden, torch.Tensor):
            self.milora_inputs[layer_key] = weakref.ref(hidden)
        else:
            self.milora_inputs.pop(layer_key, None)

    @contextlib.contextmanager
    def prompt_mask(self, prompt_mask: torch.Tensor) -> Iterator[None]:
        """Within the block, routers that route from the prompt (``router="prompt"``) pool over these positions.

        ``prompt_mask[B, P]`` marks the prompt among the *first* ``P`` positions of every forward's input (1 =
        prompt token); later positions (tokens appended after the prompt) are never prompt. This expresses "route
        from the original prompt" for calls that re-feed the whole sequence: scoring a completion, or generating
        with ``use_cache=False``. Padding (``attention_mask == 0``) is excluded whatever the mask says.
        """
        if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.dim() != 2:
            raise ValueError("`prompt_mask` must be a 2-D tensor [batch, prompt_length] of 0/1 (or bool) values.")
        previous = self._prompt_override
        self._prompt_override = prompt_mask.bool()
        try:
            yield
        finally:
            self._prompt_override = previous

    @contextlib.contextmanager
    def generating(self, prompt_length: int | None) -> Iterator[None]:
        """Within a ``generate`` call whose prompt has ``prompt_length`` positions: a first forward that feeds more
        (assisted or prompt-lookup decoding verify candidate tokens in the same forward as the prompt) routes from
        those positions only, as an explicit :meth:`prompt_mask` would."""
        previous = self._generation_prompt_length, self._generating
        self._generation_prompt_length, self._generating = prompt_length, True
        try:
            yield
        finally:
            self._generation_prompt_length, self._generating = previous

    def _current_prompt_mask(self, current: torch.Tensor | None) -> torch.Tensor | None:
        override = self._prompt_override
        if override is None:
            # inside `generate`, a first forward longer than the prompt (candidate tokens) routes from the prompt
            length = self._generation_prompt_length
            if length is None or current is None or current.dim() < 2 or current.shape[1] <= length:
                return None
            positions = torch.arange(current.shape[1], device=current.device) < length
            return positions.expand(current.shape[0], -1)
        if current is None or current.dim() < 2:
            raise ValueError("A `prompt_mask` context needs `input_ids` or `inputs_embeds` laid out as [batch, seq].")
        batch, seq = current.shape[0], current.shape[1]
        if override.shape[0] != batch or override.shape[1] > seq:
            raise ValueError(
                f"The `prompt_mask` of shape {tuple(override.shape)} does not fit an input of batch {batch} and "
                f"length {seq}: it needs the same batch size (expand it yourself for beams) and at most {seq} columns."
            )
        tail = override.new_zeros(batch, seq - override.shape[1])
        return torch.cat([override, tail], dim=1).to(current.device)

    @torch.compiler.disable
    def end_forward(self, output: Any) -> Any:
        """Add the weighted aux losses to ``output.loss`` when the call computed a loss. After a compiled forward, also
        attach the model-level fallback delivery of the aux gradient to the output (:class:`_AttachModelAuxGrad`).

        Not compiled: the loss probe and the delivery node keep Python state for the backward. Also records what
        stateful routers observed inside a compiled forward (``molora.routers.state.commit_staged``)."""
        self._in_forward = False
        commit_staged(self.context.forward_id)
        output = self._attach_model_delivery(output)
        loss = _get_loss(output)
        if loss is None:
            return output
        aux = self.aux_loss()
        if aux is None:
            return output
        share = self.forward_aux.share
        if share is not None:
            # the trainer divides the loss by all micro-batches' label tokens (`num_items_in_batch`) and then neither
            # averages over the micro-batches nor (with `average_tokens_across_devices`) over the processes: weighting
            # each micro-batch's mean aux loss by its share of those tokens averages it over both
            aux = aux * share.to(device=aux.device, dtype=aux.dtype)
        new_loss = loss + aux.to(loss.dtype)
        if torch.is_grad_enabled() and new_loss.requires_grad:
            new_loss = _LossProbe.apply(new_loss, self.forward_aux, aux.requires_grad)
        return _set_loss(output, new_loss)

    def _attach_model_delivery(self, output: Any) -> Any:
        """``output`` with its differentiable tensors (logits, log-probabilities, ...) wrapped by
        :class:`_AttachModelAuxGrad` for the losses that no layer took care of (a compiled forward's); ``output``
        itself when there are none."""
        undelivered = [(adapter, record) for (_, adapter), record in self._aux.items() if not record.delivers]
        if not undelivered or not torch.is_grad_enabled():
            return output
        specs, losses, concat = [], [], False
        for adapter, record in undelivered:
            if not record.losses and record.inputs is not None:
                concat = True  # loss_reduction="concat": not separable per router (warns if nothing delivers)
            for name, value in record.losses.items():
                if value.requires_grad:
                    specs.append((adapter, name, (value.shape, value.dtype, value.device)))
                    losses.append(value)
        targets = [(where, t) for where, t in _output_tensors(output) if t.requires_grad]
        if not targets or not (losses or concat):
            return output
        delivery = _ModelDelivery(specs)
        for where, tensor in targets:
            # one node per output a loss may be computed from (logits, TRL's log-probabilities, ...): the first whose
            # backward runs delivers, the others then find it done
            wrapped = _AttachModelAuxGrad.apply(tensor, self, delivery, concat, *losses)
            if isinstance(where, int):
                output = (*output[:where], wrapped, *output[where + 1 :])
            else:
                output[where] = wrapped
        return output

    # -- recording (called by the layers) ---------------------------------------------------------------------------

    def losses_needed(self, adapter_name: str, router: Router) -> frozenset[str]:
        """Names of the aux losses :meth:`record` will take from ``router`` in the current forward (maybe none)."""
        return self._coefficients_needed(adapter_name, router)[1]

    def _coefficients_needed(self, adapter_name: str, router: Router) -> tuple[dict[str, float], frozenset[str]]:
        """``router``'s loss coefficients and the names of the losses the current forward needs (``({}, {})`` in a
        decode step, in a ``torch.export`` trace, and without autograd, loss targets (``RoutingContext.loss_targets``)
        and training mode).

        A training-mode router records its losses without autograd too: reentrant activation checkpointing runs the
        model's forward without autograd first, and when its recompute delivers the aux gradient in backward (a loss
        computed from the logits), the records of every router tell how many share a ``"mean"`` loss."""
        if (
            self.context.is_decode
            or not (torch.is_grad_enabled() or self.context.loss_targets or router.training)
            or exporting()  # (fake tensors, and nothing in an exported program would read them)
        ):
            return {}, frozenset()
        coefs = router.loss_coefficients(self.peft_config[adapter_name])
        return coefs, frozenset(name for name, coef in coefs.items() if coef > 0)

    def select(
        self, adapter_name: str, router: Router, logits: torch.Tensor, valid: torch.Tensor | None, dense: bool = False
    ) -> tuple[Routing, dict[str, torch.Tensor] | None]:
        """``router.select_with_losses`` for the losses this forward needs: the routing and, when the router computes
        them itself, the losses to hand to :meth:`record` (``None``: record computes them from the routing).
        ``dense``: the caller reads only the dense gates; passed on to implementations marked ``takes_dense``."""
        args = self.selection_args(adapter_name, router)
        if args is None:
            return router.select(logits, valid), None
        need, balance_type, missing = args
        extra = {"dense": True} if dense and getattr(type(router).select_with_losses, "takes_dense", False) else {}
        if missing is None:
            return router.select_with_losses(logits, valid, need, balance_type, **extra)
        routing, losses = router.select_with_losses(logits, valid, need, balance_type, missing_grads=missing, **extra)
        return routing, self_delivered(losses)

    def selection_args(
        self, adapter_name: str, router: Router
    ) -> tuple[frozenset[str], str, _MissingAuxGrads | None] | None:
        """What :meth:`select` passes to ``router.select_with_losses``: the losses this forward needs, the balance
        type, and the missing-gradient callback for routers marked ``takes_missing_grads`` (``None`` for the others,
        and without autograd or losses); ``None`` where the router's plain ``select`` is used instead."""
        config = self.peft_config[adapter_name]
        need = self.losses_needed(adapter_name, router)
        if need and config.loss_reduction == "concat":
            # the concatenated losses need every router's inputs (AuxInputs), not per-router values
            return None
        missing = None
        if (
            need
            and _delivers_missing_grads(router)
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # a compiled backward cannot call back into Python state
        ):
            # the built-in top-k function delivers the aux gradient itself when nothing else does (see the module
            # docstring): no identity node on the layer's output is needed then
            missing = _MissingAuxGrads(self.forward_aux, adapter_name, router.weight)
        return need, config.balance_loss_type, missing

    def record(
        self,
        layer_key: str,
        adapter_name: str,
        router: Router,
        routing: Routing,
        valid: torch.Tensor | None,
        output: torch.Tensor,
        losses: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Record one router's aux losses and statistics; return ``output`` (possibly wrapped, see below).

        ``losses``: the unweighted losses this forward needs (:meth:`losses_needed`), when the router computed them
        with the routing (:meth:`select`); otherwise they are computed here from ``routing``.

        Traced by ``torch.compile`` (the records are dict stores, which Dynamo replays after the graph): compiled, it
        attaches nothing to ``output``, since that node's backward reads this object's Python state, and
        :meth:`end_forward` attaches one delivery node for the whole model instead (:class:`_AttachModelAuxGrad`).
        """
        config = self.peft_config[adapter_name]
        key = (layer_key, adapter_name)
        if (
            config.track_routing_stats
            and not self._recomputing
            and not exporting()
            and not (self.stats_grad_only and not self._aux_grad and getattr(router, "training", False))
        ):
            # (the model-level forward's autograd state, not this layer's: reentrant activation checkpointing runs
            # the layers of a training forward without autograd)
            # (a torch.export trace's tensors are fake and nothing replays this store with real ones, as Dynamo does
            # for torch.compile: kept, they broke the statistics and the next export)
            probs, weight = routing.probs, routing.weight
            if key in self._pending:
                # the module ran before in this forward (weights shared across layers, as ALBERT's): both calls
                # count, reduced with the deferred forwards' records (a recompute records nothing, see above)
                self._deferred.append({key: self._pending.pop(key)})
            self._pending[key] = _RawRouting(
                # detach only what carries history (without autograd, as in generation, two operator calls less)
                probs.detach() if probs.requires_grad else probs,
                routing.token_index,
                routing.expert_index,
                weight.detach() if weight.requires_grad else weight,
                valid,
                routing.active.reshape(-1) if routing.dense_assignments else None,
            )
        coefs, need = self._coefficients_needed(adapter_name, router)
        if not need:
            return output
        concat = config.loss_reduction == "concat"
        inputs = None
        if losses is None:
            inputs = router.aux_inputs(routing, valid)
            losses = {} if concat else type(router).aux_losses(inputs, config.balance_loss_type, need)
        compiling = torch.compiler.is_compiling()
        if not self._recomputing and key in self._aux:
            # the module's second call in this forward (shared weights): a router call of its own for the aux losses,
            # as another layer's (its first record stays; a recompute keeps the forward's records, see below)
            calls = 2
            while (f"{layer_key}#{calls}", adapter_name) in self._aux:
                calls += 1
            key = (f"{layer_key}#{calls}", adapter_name)
        if not self._recomputing or key not in self._aux:
            # a recompute keeps its forward's record (it has the same values): the recomputed losses would keep the
            # recomputed graph, with this layer's activations, alive (non-reentrant checkpointing never runs it).
            # Without one (none was recorded) it counts the router for the "mean" weights, detached.
            kept = {name: value.detach() for name, value in losses.items()} if self._recomputing else losses
            self._aux[key] = _AuxRecord(
                losses=kept,
                coefs=coefs,
                inputs=inputs if concat else None,
                router_cls=type(router),
                delivers=not compiling,
            )
            self.forward_aux.counted[key] = (coefs, tuple(kept))
        if compiling or isinstance(losses, _SelfDelivered):
            # self-delivered: their own autograd node delivers the aux gradient when nothing else does
            return output
        trains = router.weight.requires_grad if concat else any(value.requires_grad for value in losses.values())
        if torch.is_grad_enabled() and trains and output.requires_grad:
            # (a frozen router's losses still train the experts of earlier layers through its input)
            # with concat the per-router losses are not separable: the attachment only warns if nothing delivered
            names = () if concat else tuple(losses)
            output = _AttachAuxGrad.apply(output, self, adapter_name, names, router, *(losses[n] for n in names))
        return output

    def _warn_concat_once(self) -> None:
        if not self._warned_concat:
            warnings.warn(
                "With loss_reduction='concat' the aux-loss gradient reaches the routers only through `outputs.loss` "
                "or `model.molora_aux_loss()`; trainers that compute their own loss (TRL's SFTTrainer) and reentrant "
                "gradient checkpointing train without it. Use loss_reduction='mean' or 'sum' there.",
                stacklevel=3,
            )
            self._warned_concat = True

    # -- aux losses -------------------------------------------------------------------------------------------------

    def aux_losses(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The unweighted aux losses of the last forward, reduced over routers, keyed by loss name."""
        return self._summed(self._reduced(adapter_name))

    def training_aux_losses(self) -> dict[str, torch.Tensor]:
        """:meth:`aux_losses` of the last forward run with autograd that recorded any: what a logging callback reports
        after an optimizer step. The step's last forward may be another one: TRL's preference trainers run the
        reference (the adapter disabled, or a frozen copy without gradient) after the policy."""
        if self._aux and self._aux_grad:
            return self._summed(self._reduced(None))
        return dict(self._last_training_aux)

    @staticmethod
    def _summed(per_adapter: dict[str, dict[str, tuple[torch.Tensor, float]]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for losses in per_adapter.values():
            for name, (value, _) in losses.items():
                out[name] = out[name] + value if name in out else value
        return out

    def user_aux_loss(self, adapter_name: str | None = None) -> torch.Tensor | None:
        """:meth:`aux_loss` for callers that back-propagate it themselves (custom training loops)."""
        aux = self.aux_loss(adapter_name)
        if aux is None and self._aux_zero_device is not None:
            # every coefficient is 0 (aux_loss_coef=0 with topk_bias, expert_choice, ...): the sum of no terms, so that
            # `loss + model.molora_aux_loss()` in a custom loop needs no special case
            return torch.zeros((), device=self._aux_zero_device)
        if aux is not None and aux.requires_grad and torch.is_grad_enabled():
            aux = _LossProbe.apply(aux, self.forward_aux, True)
        return aux

    def aux_loss(self, adapter_name: str | None = None) -> torch.Tensor | None:
        """``sum(coef * loss)`` of the last forward over loss names and adapters (``None`` if nothing recorded)."""
        total = None
        for losses in self._reduced(adapter_name).values():
            for value, coef in losses.values():
                term = coef * value
                total = term if total is None else total + term
        return total

    def _reduced(self, adapter_name: str | None) -> dict[str, dict[str, tuple[torch.Tensor, float]]]:
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
                total = torch.stack([v.float() for v in values]).sum()
                if config.loss_reduction == "mean":
                    total = total / len(values)
                reduced[name] = (total, coefs[name])
            out[adapter] = reduced
        return out

    # -- statistics -------------------------------------------------------------------------------------------------

    def commit_stats(self) -> None:
        """Move the statistics of the forwards not yet counted into the running totals (one batched reduction per
        group of same-shaped records, over layers and deferred decode steps together)."""
        forwards = self._deferred
        if self._pending:
            forwards.append(self._pending)
        self._deferred = []
        self._pending = {}
        groups: dict[tuple, list[tuple[tuple[str, str], _RawRouting]]] = {}
        for pending in forwards:
            for key, raw in pending.items():
                groups.setdefault(raw.group(), []).append((key, raw))
        for members in groups.values():
            rows = _stats_rows([raw for _, raw in members])
            keys = [key for key, _ in members]
            if len(forwards) > 1:
                # the same layer in several forwards: sum its rows first (one index_add for the group)
                order = {key: i for i, key in enumerate(dict.fromkeys(keys))}
                index = torch.tensor([order[key] for key in keys], device=rows.device)
                rows = rows.new_zeros(len(order), rows.shape[1]).index_add_(0, index, rows)
                keys = list(order)
            if rows.device.type != "mps":  # (MPS has no float64)
                # float64 running sums: float32 counts stop being exact past 2**24 tokens per layer
                rows = rows.double()
            for key, row in zip(keys, rows):
                totals = self._totals.get(key)
                # out of place: totals started under torch.inference_mode() are inference tensors, which cannot be
                # updated in place once training resumes (and vice versa)
                self._totals[key] = row.clone() if totals is None else totals + row

    def routing_stats(self, adapter_name: str | None = None) -> dict[str, LayerRoutingStats]:
        """Accumulated statistics per adapted layer (keys are module names; ``name:adapter`` with several adapters)."""
        self.commit_stats()
        adapters = {a for (_, a) in self._totals}
        out = {}
        for (layer, adapter), totals in sorted(self._totals.items()):
            if adapter_name is not None and adapter != adapter_name:
                continue
            key = layer if adapter_name is not None or len(adapters) == 1 else f"{layer}:{adapter}"
            out[key] = summarize_row(totals)
        return out

    def forget_adapter(self, adapter_name: str) -> None:
        """Drop what is held for a deleted adapter: its statistics (counted or waiting), the last forward's aux records
        and module-mode decisions. A new adapter of the same name then starts clean (it may have other shapes)."""

        def keep(records: dict) -> dict:
            return {key: value for key, value in records.items() if key[1] != adapter_name}

        self._pending, self._totals = keep(self._pending), keep(self._totals)
        self._deferred = [keep(records) for records in self._deferred]
        self.milora_decisions = keep(self.milora_decisions)
        for key in [key for key in self._aux if key[1] == adapter_name]:
            del self._aux[key]
            self.forward_aux.counted.pop(key, None)
        self.forward_aux._weights.pop(adapter_name, None)
        self._forgotten[adapter_name] = self._forgotten.get(adapter_name, 0) + 1

    def stats_checkpoint(self) -> dict[tuple[str, str], torch.Tensor]:
        """The statistics accumulated so far, for :meth:`restore_stats` (the running sums are replaced, never
        updated in place, so this holds references, not copies)."""
        self.commit_stats()
        return _StatsCheckpoint(self._totals, forgotten=dict(self._forgotten))

    def restore_stats(self, checkpoint: dict[tuple[str, str], torch.Tensor]) -> None:
        """Back to the statistics of :meth:`stats_checkpoint`: what the forwards since then recorded is forgotten
        (``stats_resets`` counts the resets and restores). An adapter deleted since the checkpoint stays without
        statistics, also when an adapter of its name was added again."""
        if not isinstance(checkpoint, dict) or not all(
            isinstance(key, tuple) and len(key) == 2 and isinstance(total, torch.Tensor)
            for key, total in checkpoint.items()
        ):
            raise TypeError(
                "restore_routing_stats() takes what routing_stats_checkpoint() returned; got "
                f"{type(checkpoint).__name__} {repr(checkpoint)[:80]} (to forget every statistic: "
                "reset_routing_stats())."
            )
        forgotten = getattr(checkpoint, "forgotten", {})
        self._pending = {}
        self._deferred = []
        self._totals = {
            key: total
            for key, total in checkpoint.items()
            if self._forgotten.get(key[1], 0) == forgotten.get(key[1], 0)
        }
        self.stats_resets += 1

    def reset_stats(self) -> None:
        """Forget all accumulated routing statistics."""
        self.restore_stats({})


class _StatsCheckpoint(dict):
    """The running sums of :meth:`MoLoraRuntime.stats_checkpoint`, with how many times each adapter name was deleted
    when it was taken."""

    def __init__(self, totals: dict, forgotten: dict[str, int]) -> None:
        super().__init__(totals)
        self.forgotten = forgotten


#: the most decode steps whose routing records wait for one batched reduction (see MoLoraRuntime.begin_forward)
_MAX_DEFERRED_FORWARDS = 32


def _stats_rows(raws: list[_RawRouting]) -> torch.Tensor:
    """Sums of the routing statistics of several routers with the same shapes, one row each: ``[L, 2 + 3E]`` =
    valid tokens, summed router entropy, then per expert the assignments, gate sums and probability sums.

    No host synchronisation on CUDA: padding is masked with ``where`` (not boolean indexing, a nonzero), counts come
    from ``scatter_add`` (not ``bincount``, which reads its maximum back), token counts stay on the device.
    """
    with torch.no_grad():
        probs = torch.stack([r.probs for r in raws]).float()  # [L, T, E]
        n_layers, n_tokens, n_experts = probs.shape
        sizes = [r.expert_index.numel() for r in raws]
        listed = _padded_rows(raws, sizes)  # [L, N] each: the assignment lists, padded to the longest
        expert_index, token_index = listed["expert_index"], listed["token_index"]
        weight = listed["weight"].float()
        ent = entropy(probs)  # [L, T]
        if raws[0].valid is not None:
            # where, not a product: padding rows are dropped even if their values are not finite
            keep = torch.stack([r.valid for r in raws]).to(probs.device, torch.bool)  # [L, T]
            keep_assignment = keep.gather(1, token_index)
            ones = keep_assignment.float()
            weight = torch.where(keep_assignment, weight, 0.0)
            probs = torch.where(keep.unsqueeze(-1), probs, 0.0)
            ent = torch.where(keep, ent, 0.0)
            tokens = keep.sum(dim=1, dtype=torch.float32)
        else:
            ones = torch.ones_like(weight)
            tokens = probs.new_full((n_layers,), float(n_tokens))
        if raws[0].assigned is not None:
            # all (token, expert) pairs were listed (a compiled variable selection): count the assignments only
            ones = ones * listed["assigned"].to(ones.device, ones.dtype)
        if len(set(sizes)) > 1:
            # the padding of shorter lists counts nothing
            real = torch.arange(max(sizes), device=weight.device) < torch.tensor(sizes, device=weight.device)[:, None]
            ones, weight = ones * real, torch.where(real, weight, 0.0)
        # per layer (row), assignments and gate sums per expert
        counts = probs.new_zeros(n_layers, n_experts).scatter_add_(1, expert_index, ones)
        gate_sums = probs.new_zeros(n_layers, n_experts).scatter_add_(1, expert_index, weight)
        return torch.cat(
            [tokens.unsqueeze(1), ent.sum(dim=1, keepdim=True), counts, gate_sums, probs.sum(dim=1)], dim=1
        )


def _padded_rows(raws: list[_RawRouting], sizes: list[int]) -> dict[str, torch.Tensor]:
    """The records' assignment lists (``expert_index``, ``token_index``, ``weight``, ``assigned``) stacked into
    ``[L, max N]`` tensors, the shorter ones padded at the end (with 0: a valid index, a zero weight)."""
    longest = max(sizes)
    out = {}
    for name in ("expert_index", "token_index", "weight", "assigned"):
        values = [getattr(r, name) for r in raws]
        if values[0] is None:
            continue
        out[name] = torch.stack(
            [v if n == longest else F.pad(v, (0, longest - n)) for v, n in zip(values, sizes, strict=True)]
        )
    return out


def _weak_ref(obj: Any) -> weakref.ref | None:
    """A weak reference to ``obj``, or ``None`` for ``None`` and objects without weak references (tuples)."""
    if obj is None:
        return None
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _token_mask_from_4d(mask: torch.Tensor, past_length: int | None, seq: int) -> torch.Tensor | None:
    """``[batch, seq]`` bool, True for the real tokens among the current ``seq`` positions, from a prepared 4-d
    attention mask ``[batch, heads, query, key]`` (bool: True attends; float: 0 attends, the dtype's minimum masks).

    A real token attends to its own key position ``past_length + i``; a padding token's key column is masked for
    every query, its own included. ``None`` (every token counts, as without a mask) when the layout does not allow
    the check: unknown cache length, or fewer query rows or key columns than the positions need.
    """
    if past_length is None or mask.shape[2] != seq or mask.shape[3] < past_length + seq:
        return None
    position = torch.arange(seq, device=mask.device)
    own = mask[:, 0, position, position + past_length]  # [batch, seq]
    if own.dtype == torch.bool:
        return own
    if own.is_floating_point():
        return own > torch.finfo(own.dtype).min / 2
    return own != 0


def _cache_state(kwargs: dict) -> tuple[int | None, bool]:
    """``(past_length, is_decode)`` of a model-level call, read once from its KV cache.

    ``past_length`` is the number of tokens already in the cache (0 without a cache, ``None`` for a cache we cannot
    measure); ``is_decode`` is True for a cached decode step.
    """
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        past_length = int(cache_position.reshape(-1)[0].item())
        return past_length, past_length > 0
    # transformers >= 5 passes the KV cache as `cache`; older versions as `past_key_values`
    past = kwargs.get("cache")
    if past is None:
        past = kwargs.get("past_key_values")
    if past is None:
        return 0, False
    get_len = getattr(past, "get_seq_length", None)
    if callable(get_len):
        try:
            past_length = int(get_len())
        except Exception:  # noqa: BLE001 - a cache type we do not know: treat as prefill
            return None, False
        return past_length, past_length > 0
    return None, bool(past)


def call_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A model (or encoder/decoder) call's current input: its ``input_ids`` (keyword or first positional argument),
    else its ``inputs_embeds``; ``None`` when it has neither."""
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    return input_ids if input_ids is not None else kwargs.get("inputs_embeds")


def _token_layout(current: torch.Tensor | None) -> tuple[int, int] | None:
    return (int(current.shape[0]), int(current.shape[1])) if current is not None and current.dim() >= 2 else None


def _cpu_mask_of_ones(mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` is the all-ones padding mask collators pass for unpadded batches, on a CPU: published as no
    mask, the layers skip the masked forms of their losses and statistics (2-8 % of a small model's step). Never read
    back on an accelerator, where it would wait for the device once per forward (tests/test_host_sync.py), nor in a
    ``torch.export`` trace (whose program must serve any mask)."""
    return mask is not None and mask.device.type == "cpu" and not exporting() and bool(mask.all())


def _loss_fields(config: Any) -> tuple:
    """The aux-loss fields of an adapter config that every forward reads (see ``MoLoraRuntime._check_loss_fields``)."""
    return (config.aux_loss_coef, config.z_loss_coef, config.balance_loss_type, config.loss_reduction)


def _call_token_mask(current: torch.Tensor | None, mask: Any, past_length: int | None) -> torch.Tensor | None:
    """The ``[B, S]`` padding mask of a call's current input positions (``current``: its ``input_ids`` or
    ``inputs_embeds``) from the ``attention_mask`` it was given, or ``None`` (every token counts)."""
    seq = current.shape[1] if current is not None and current.dim() >= 2 else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and seq is not None:
        return mask[:, mask.shape[1] - seq :] if mask.shape[1] >= seq else None
    if isinstance(mask, dict) and seq is not None:
        # one prepared mask per attention type (Qwen2/3, Gemma2/3 with a static KV cache): a padding token is
        # masked in every one of them; the full-attention one has every key column
        masks = [m for m in (mask.get("full_attention"), *mask.values()) if isinstance(m, torch.Tensor)]
        return _token_mask_from_4d(masks[0], past_length, seq) if masks and masks[0].dim() == 4 else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and seq is not None:
        # a prepared [batch, heads, query, key] mask, as generate() passes with a static KV cache
        return _token_mask_from_4d(mask, past_length, seq)
    return None


def _output_tensors(output: Any) -> list[tuple[str | int, torch.Tensor]]:
    """The model output's floating-point tensors a loss may be computed from, with where they sit: every top-level
    field of a ``ModelOutput`` (or dict) but ``loss`` (``logits``, ``log_probs``, ``last_hidden_state``, ...), or the
    non-scalar tensors among the first two elements of a tuple output (a scalar first element is the loss)."""
    if isinstance(output, Mapping):
        items = [(key, value) for key, value in output.items() if key != "loss"]
    elif isinstance(output, tuple):
        items = [(i, v) for i, v in enumerate(output[:2]) if isinstance(v, torch.Tensor) and v.dim() > 0]
    else:
        return []
    return [(key, value) for key, value in items if isinstance(value, torch.Tensor) and value.is_floating_point()]


def _get_loss(output: Any) -> torch.Tensor | None:
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
