"""Prompt-aware routing (MiLoRA, Zhang et al., Findings of EMNLP 2024, arXiv 2410.18035).

One routing decision per *sequence*, computed from its prompt and used for every token of that sequence, prompt
and generated alike (docs/algorithms.md section 3). For the tokens ``x[B, S, d_in]`` entering one adapted projection
and the prompt positions ``m[B, S]``:

1. pool the prompt: ``h_b = Pool({x_{b,t} : m_{b,t}})`` with ``Pool`` = masked ``mean`` (default), ``last`` (the
   last prompt position, wherever the padding is), element-wise ``max`` or ``attn`` (attention pooling with a
   learned query ``q[d_in]``: ``h_b = sum_t softmax_t(q . x_{b,t} / sqrt(d_in)) x_{b,t}`` over the prompt positions;
   ``q`` starts at zero, i.e. as the mean, [OURS]: the spec lists the option without defining it);
2. activate: ``u_b = sigma(h_b)``, ``sigma`` = ``tanh`` (default), ``gelu``, ``relu`` or ``identity``;
3. score: ``l_b = W u_b`` (``W[E, d_in]``, no bias), ``pi_b = softmax(l_b)``;
4. select ``S_b = TopK(pi_b, K)`` with ``K = MoLoraConfig.top_k``; gates ``g_{b,e} = pi_{b,e} / sum_{j in S_b}
   pi_{b,j}`` on ``S_b`` (``gate_mode="renorm"``) or ``pi_{b,e}`` (``"raw"``), 0 elsewhere. The gates stay soft so
   the router is trained by the language-modelling loss;
5. every token ``t`` of sequence ``b`` uses the gates ``g_b``:
   ``y_{b,t} = W0 x_{b,t} + sum_e g_{b,e} Delta_e(x_{b,t})``.

Which positions are the prompt (``m``), in order of precedence:

* an explicit ``MoLoraModel.molora_prompt_mask(...)`` context (``RoutingContext.prompt_mask``);
* with ``labels`` (training, evaluation loss): ``labels == -100`` and ``attention_mask == 1`` before the first
  supervised token, i.e. the leading tokens the loss ignores, which is how SFT data marks the prompt (later
  unsupervised tokens, a multi-turn chat's next user turns, follow an answer and stay out);
* otherwise every non-padding token of the call (a generation prefill is exactly the prompt).

A sequence whose prompt mask is empty (labels supervise every token) falls back to all of its non-padding tokens.
Padding never enters a decision, so a sample routes the same alone and in a padded batch.

Packed rows (TRL's ``packing=True`` / ``padding_free=True``: several whole sequences in a row, ``position_ids``
restarting at each, no ``attention_mask``): the sequences are found from the restarts (:class:`Segments`) and each
gets its own decision by the rules above, laid out from its first token; the model's runtime finds them before the
forward so that compiled code reads them as constants.

Generation: the decision of each sequence is cached at the prefill (``RoutingContext.is_decode`` False) and read at
every cached decode step (no pooling, no router compute). The cache is a plain attribute, not a buffer: it is never
saved with the adapter, it is overwritten by the next prefill (so it cannot leak from one ``generate`` call into
the next), and a decode step whose batch differs from the prefill's raises. ``generate`` expands beams and
``num_return_sequences`` *before* its prefill, so beam search and multiple samples work unchanged.

Two modes (``PromptParams.milora_mode``, docs/prompt_router.md). ``"bank"`` ([OURS], the default): each adapted
projection has its own router over its own bank of ``E`` experts, fed that projection's input. ``"module"`` (MiLoRA
as published): one router per decoder layer, fed the layer's residual-stream input, routes between the layer's
adapted projections, each one LoRA; the router is this class with ``E`` = the layer's modules, driven by
``molora.adapters.milora``.

Balance loss: over *sequences*, not tokens (every token of a sequence shares one decision): ``AuxInputs`` rows are
the sequences with at least one real token, so ``balance_loss_type`` keeps its meaning with "token" read as
"sequence" (e.g. ``"megatron"``: loads = share of the sequences' ``K`` selections that went to each expert).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._amp import without_autocast
from . import balancing
from .base import ROUTER_REGISTRY, Router, RouterParams, Routing, register_router, repeated_arange
from .topk import topk_routing, warn_single_renormalized_gate

if TYPE_CHECKING:
    from ..runtime import RoutingContext

POOLERS = ("mean", "last", "max", "attn")
ACTIVATIONS = ("tanh", "gelu", "relu", "identity")
GATE_MODES = ("renorm", "raw")
MILORA_MODES = ("bank", "module")

_ACTIVATION_FNS = {
    "tanh": torch.tanh,
    "gelu": nn.functional.gelu,
    "relu": torch.relu,
    "identity": lambda u: u,
}


@dataclass
class PromptParams(RouterParams):
    """Hyper-parameters of the ``prompt`` router (MiLoRA's prompt-aware routing).

    Args:
        pooler (str): how the prompt's token inputs are summarised: ``"mean"`` (masked mean), ``"last"`` (the last
            prompt token), ``"max"`` (element-wise masked max) or ``"attn"`` (softmax attention over the prompt
            tokens with a learned query, zero-initialised so that it starts as the mean). Default: "mean".
        activation (str): applied to the pooled vector before the router: ``"tanh"``, ``"gelu"``, ``"relu"`` or
            ``"identity"``. Default: "tanh".
        gate_mode (str): ``"renorm"`` rescales the ``top_k`` kept probabilities to sum to 1; ``"raw"`` keeps the
            softmax probabilities. Default: "renorm".
        milora_mode (str): ``"bank"``: each adapted projection has its own router over its own ``num_experts``
            LoRA experts. ``"module"`` (MiLoRA as published): each adapted projection is one LoRA module
            (``num_experts=1``) and one router per decoder layer, fed the layer's residual-stream input, picks
            ``top_k`` of the layer's adapted projections per sequence (``molora.adapters.milora``). Default: "bank".
    """

    pooler: str = "mean"
    activation: str = "tanh"
    gate_mode: str = "renorm"
    milora_mode: str = "bank"

    def validate(self, num_experts: int, top_k: int) -> None:
        choices = (("pooler", POOLERS), ("activation", ACTIVATIONS), ("gate_mode", GATE_MODES))
        for key, allowed in (*choices, ("milora_mode", MILORA_MODES)):
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(
                    f"`router_kwargs[{key!r}]`={value!r} is not supported; allowed values: {list(allowed)}."
                )
        if self.gate_mode == "renorm":
            # (in module mode top_k counts a decoder layer's modules, of which there are several)
            experts = num_experts if self.milora_mode == "bank" else 2
            warn_single_renormalized_gate(experts, top_k, "gate_mode", self.gate_mode, fix="raw")
        if self.milora_mode == "module" and num_experts != 1:
            raise ValueError(
                f"`num_experts`={num_experts} with router_kwargs['milora_mode']='module': in module mode each adapted "
                "projection is a single LoRA module and the experts of a decoder layer are its projections, so set "
                "`num_experts=1` (and `top_k` to the number of modules each sequence uses, e.g. 3 of 7)."
            )


@dataclass
class PromptRouting(Routing):
    """A token-level :class:`Routing` (every token carries its sequence's gates) plus the per-sequence decision.

    Attributes:
        sequence (Routing): the decision over sequences, ``T = B`` rows (probabilities, logits, top-k gates).
        routed (BoolTensor[B]): sequences with at least one real (non-padding) token; only these enter the losses.
    """

    sequence: Routing | None = None
    routed: torch.Tensor | None = None


@dataclass
class _CachedDecision:
    """One prefill's detached decision, read by the decode steps that follow it."""

    sequence: Routing
    routed: torch.Tensor
    length: int | None  # tokens in the KV cache right after the prefill (None when unknown)
    # module mode (molora.adapters.milora): which modules some sequence selected, read back once per prefill
    active: list[bool] | None = None
    # the token-level routing of a one-token decode step (the same for every such step after this prefill)
    one_token: PromptRouting | None = None


@register_router("prompt")
class PromptRouter(Router):
    """Routes every token of a sequence by one decision computed from its prompt (MiLoRA).

    See the module docstring for the maths, which tokens count as the prompt, and the generation cache. Needs the
    layer input laid out as ``[batch, seq, d_in]`` (every transformers decoder does this).
    """

    Params = PromptParams
    uses_context = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # deliberately not a buffer: the decision belongs to the sequences being generated, not to the adapter
        self._cached: _CachedDecision | None = None
        # pooler="attn": the learned query, saved and trained with the router (zero: attention starts as the mean)
        self.pool_query = (
            nn.Parameter(torch.zeros(self.in_features, dtype=torch.float32)) if self.params.pooler == "attn" else None
        )

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        context: RoutingContext | None = None,
        lead_shape: tuple[int, ...] | torch.Size | None = None,
    ) -> PromptRouting:
        """Route ``x[T, d_in]`` (``T = B * S``) with one decision per sequence.

        Args:
            x (Tensor[T, d_in]): the flattened layer input.
            valid (BoolTensor[T] or None): non-padding tokens (used when ``context`` has no usable mask).
            context (RoutingContext or None): the model-level context (prompt positions, decode flag).
            lead_shape (tuple): ``(B, S)``, the layer input's leading shape.

        Returns:
            PromptRouting: token-level routing (``T`` rows) whose ``sequence`` field holds the ``B``-row decision.

        Raises:
            ValueError: if the input is not laid out as ``[batch, seq, d_in]``, or a decode step does not match the
                cached prefill.
        """
        if lead_shape is None or len(lead_shape) != 2:
            raise ValueError(
                f"router='prompt' routes whole sequences and needs the layer input as [batch, seq, d_in]; got leading "
                f"shape {None if lead_shape is None else tuple(lead_shape)}. Models that flatten tokens before the "
                "adapted projections are not supported."
            )
        batch, seq = int(lead_shape[0]), int(lead_shape[1])
        if context is not None and context.is_decode:
            cached = self._read_cache(batch, context)
            sequence, routed = cached.sequence, cached.routed
            if seq == 1 and not torch.compiler.is_compiling():
                # every one-token decode step routes the same way: build its token-level routing once per prefill
                if cached.one_token is None:
                    cached.one_token = broadcast_to_tokens(sequence, routed, 1)
                return cached.one_token
        else:
            prompt, routed, segments = sequence_masks(context, batch, seq, x.device, valid)
            if segments is None:
                sequence = self.decide(x.reshape(batch, seq, -1), prompt)
            else:
                # a packed call: one decision per sequence of the rows, each laid out from its first token
                sequence = self.decide(segments.pad(x), segments.pad(prompt.reshape(-1)))
            length = None if context is None or context.past_length is None else context.past_length + seq
            self._cached = _CachedDecision(sequence=_detached(sequence), routed=routed, length=length)
            if context is not None and context.deciders is not None:
                # the model's end-of-forward hook keeps this decision with the call's KV cache (also when compiled)
                context.deciders.append(self)
            if segments is not None:
                return broadcast_to_tokens(sequence, routed, seq, segments)
        return broadcast_to_tokens(sequence, routed, seq)

    def decide(self, x: torch.Tensor, prompt: torch.Tensor) -> Routing:
        """The per-sequence decision (steps 1-4 of the module docstring) for ``x[B, S, d_in]``, ``prompt[B, S]``."""
        with without_autocast(x.device.type):  # the "attn" pooler's product: fp32 like the scoring
            pooled = pool(x.float(), prompt, self.params.pooler, query=self.pool_query)
        u = _ACTIVATION_FNS[self.params.activation](pooled)
        return self.select(self.scores(u), None)

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        """Top-``K`` over the sequence logits ``[B, E]``; renormalised or raw gates per ``gate_mode``."""
        probs = torch.softmax(logits, dim=-1)
        return topk_routing(probs, self.top_k, renormalize=self.params.gate_mode == "renorm", logits=logits)

    def clear_cache(self) -> None:
        """Forget the cached decision of the last prefill (it is also replaced by every new prefill)."""
        self._cached = None

    def _read_cache(self, batch: int, context: RoutingContext) -> _CachedDecision:
        # (compiled code reads the router's current decision, which the model's start-of-forward hook restored from
        # the step's KV cache: reading the cache object here would break the graph)
        kept = None if torch.compiler.is_compiling() else _kept_with_cache(context, self)
        if kept is not None:
            # the decision of the prefill that filled this very cache (another generation may have run since, with
            # its own cache: interleaved conversations, a server's requests); it becomes the current one. The cache
            # may have been cropped since (assisted decoding rolls back rejected candidates): no length check
            self._cached = kept
        cached = self._cached
        if cached is None:
            raise RuntimeError(
                "router='prompt' got a cached decode step but has no prompt decision: the KV cache was not filled by "
                "a prefill of this model (pass the prompt without `past_key_values`/`cache` first)."
            )
        cached_batch = cached.sequence.num_tokens
        if batch != cached_batch:
            raise ValueError(
                f"router='prompt' cached decisions for a batch of {cached_batch} sequences at the prefill, but this "
                f"decode step has batch {batch}. Expand the batch (beams, samples) before the prefill, as "
                "`generate` does; a KV cache reused from another call needs a new prefill."
            )
        past = context.past_length
        # not in compiled code: the cache length changes at every decode step, and reading it there would recompile
        # the step each time (the eager runs of the same model check it)
        if torch.compiler.is_compiling():
            return cached
        if kept is None and past is not None and cached.length is not None and past < cached.length:
            raise ValueError(
                f"router='prompt': the KV cache holds {past} tokens but the cached decision was made after a prefill "
                f"of {cached.length}; the cache comes from another call. Run a new prefill."
            )
        return cached

    # aux_inputs below gives the built-in losses either form of rows (see Router.weighted_aux_rows)
    handles_row_weight = True

    def aux_inputs(self, routing: Routing, valid: torch.Tensor | None) -> balancing.AuxInputs:
        """Loss inputs over sequences (one row per sequence with real tokens), not over tokens; compiled, every
        sequence has a row and those without a real token weigh 0 (``AuxInputs.row_weight``)."""
        if not isinstance(routing, PromptRouting) or routing.sequence is None:
            return super().aux_inputs(routing, valid)
        # the sequences with a real token play the part of the valid tokens
        return balancing.AuxInputs.from_routing(
            routing.sequence, routing.routed, top_k=self.top_k, weighted=self.weighted_aux_rows()
        )


def is_prompt_router(name: str) -> bool:
    """Whether ``name`` is registered as the prompt router or a subclass of it (routes whole sequences)."""
    router_cls = ROUTER_REGISTRY.get(name)
    return isinstance(router_cls, type) and issubclass(router_cls, PromptRouter)


def sequence_masks(
    context: RoutingContext | None, batch: int, seq: int, device: torch.device, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, Segments | None]:
    """``(prompt[B, S], routed[N], segments)``: :func:`prompt_positions`, which sequences hold a real token, and the
    sequences of a packed call (:func:`packed_segments`; ``None`` otherwise), for a layer input of ``B`` rows of ``S``
    tokens whose non-padding tokens are ``valid[B * S]`` (or None). ``N`` is ``B``, or a packed call's sequences.

    Computed once per forward and context (every adapted layer asks with the same mask object): the same tensors for
    each layer spare a dozen small operators per layer, and the aux losses' valid-row index of ``routed`` (a read
    back to the host on CUDA, :func:`molora.routers.balancing.valid_rows`) is then taken once per forward.
    """
    key = (batch, seq, torch.device(device))
    if context is not None and not torch.compiler.is_compiling():
        cached = context._sequence_masks
        if cached is not None and cached[0] == key and cached[1] is valid:
            return cached[2]
    valid_bs = valid.reshape(batch, seq) if valid is not None else None
    segments = packed_segments(context, batch, seq, device)
    prompt = prompt_positions(context, batch, seq, device, valid_bs, segments=segments)
    real = valid_bs if valid_bs is not None else prompt
    routed = real.any(dim=1) if segments is None else segments.any(real.reshape(-1))
    masks = prompt, routed, segments
    if context is not None and not torch.compiler.is_compiling():
        context._sequence_masks = (key, valid, masks)
    return masks


def prompt_positions(
    context: RoutingContext | None,
    batch: int,
    seq: int,
    device: torch.device,
    valid: torch.Tensor | None = None,
    segments: Segments | None = None,
) -> torch.Tensor:
    """The prompt positions ``[B, S]`` (bool) of the current input; see the module docstring for the rules.

    ``valid[B, S]`` (non-padding tokens) is used when the context has no attention mask of that shape. In a packed
    call (several sequences per row, :func:`packed_segments`; found here when ``segments`` is not given) the rules
    apply to each sequence of a row: its prompt ends at its own first supervised token.
    """
    shape = (batch, seq)
    if segments is None:
        segments = packed_segments(context, batch, seq, device)
    real = valid
    if context is not None and context.attention_mask is not None and tuple(context.attention_mask.shape) == shape:
        real = context.attention_mask.to(device).bool()
    if real is None:
        real = torch.ones(shape, dtype=torch.bool, device=device)
    prompt = real
    if context is not None:
        if context.prompt_mask is not None:
            if tuple(context.prompt_mask.shape) != shape:
                raise ValueError(
                    f"RoutingContext.prompt_mask has shape {tuple(context.prompt_mask.shape)}, the input {shape}."
                )
            prompt = real & context.prompt_mask.to(device).bool()
        elif context.labels is not None and tuple(context.labels.shape) == shape:
            # the unsupervised tokens before a sequence's first supervised one: in multi-turn chat data the later
            # user turns are -100 too, but they follow the first answer, which a causal decision must not see
            supervised = context.labels.to(device) != -100
            if segments is None:
                if context.position_ids is not None and seq > 1:
                    # position_ids without a mask: a padding-free row holding one sequence, whose first label TRL's
                    # collator masks too (see Segments.unmask_first_labels)
                    supervised = torch.cat([supervised[:, 1:2], supervised[:, 1:]], dim=1)
                prompt = real & (supervised.cumsum(dim=1) == 0)
            else:
                supervised = segments.unmask_first_labels(supervised.reshape(-1))
                prompt = real & (segments.cumsum(supervised) == 0).reshape(shape)
    # a sequence without prompt tokens (every token supervised) is routed from all its real tokens
    if segments is None:
        empty = ~prompt.any(dim=1, keepdim=True)
    else:
        empty = ~segments.any(prompt.reshape(-1)).index_select(0, segments.index).reshape(shape)
    return torch.where(empty, real, prompt)


@dataclass
class Segments:
    """The sequences of a packed call: a row holds several, each a run of tokens whose ``position_ids`` count up
    from where the run starts (TRL's ``packing=True`` / ``padding_free=True``; see :func:`packed_segments`).

    Sequences never span rows; they are numbered in order over the flattened ``[B * S]`` tokens.

    Attributes:
        index (LongTensor[B*S]): the sequence of each token.
        start (LongTensor[N]): the flat position of each sequence's first token.
        count (int): ``N``, the number of sequences.
        max_length (int): the longest sequence's length.
    """

    index: torch.Tensor
    start: torch.Tensor
    count: int
    max_length: int

    @classmethod
    def from_positions(cls, positions: torch.Tensor) -> Segments:
        """The sequences of rows whose ``positions[B, S]`` restart (do not continue from the previous token) where a
        sequence starts; every row starts one. Reads the count and lengths back from the device."""
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        flat = starts.reshape(-1)
        start = flat.nonzero().squeeze(1)
        lengths = torch.diff(start, append=start.new_full((1,), flat.numel()))
        return cls(index=flat.cumsum(0) - 1, start=start, count=start.numel(), max_length=int(lengths.max()))

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """The per-token ``values[B*S, ...]`` laid out per sequence, ``[N, max_length, ...]``, each from its first
        token and zero (False) after its end; differentiable. The pooling of :func:`pool` reads them with the prompt
        mask laid out the same way, whose padding is False."""
        tokens = self.index.numel()
        offset = torch.arange(tokens, device=self.index.device) - self.start.index_select(0, self.index)
        rows = self.index * self.max_length + offset
        out = values.new_zeros((self.count * self.max_length, *values.shape[1:]))
        return out.index_copy(0, rows, values).reshape(self.count, self.max_length, *values.shape[1:])

    def to(self, device: torch.device) -> Segments:
        """These sequences with their index tensors on ``device``."""
        if self.index.device == device:
            return self
        return Segments(self.index.to(device), self.start.to(device), self.count, self.max_length)

    def unmask_first_labels(self, supervised: torch.Tensor) -> torch.Tensor:
        """``supervised[B*S]`` (bool: label not -100) with each sequence's first token read as its second token is.

        TRL's padding-free collator (``packing=True``, ``padding_free=True``) sets the label of every sequence's first
        token to -100, so that no sequence learns to predict the next one's first token; a token is never its own
        sequence's target anyway. Read as written, a sequence supervised throughout (plain language-modelling data,
        whose unpacked batches carry ``labels = input_ids``) would get a one-token prompt, its first token, and every
        sequence starting with the same token (BOS) the same decision. Its first token now counts as supervised
        when the second is: such a sequence is routed from all its tokens, as unpacked. A prompt of one token (its
        completion starts at the second token) is read the same way, as a sequence without prompt."""
        # (a sequence of one token reads the next one's first label or, last, its own: its prompt is its one token
        # either way, as supervised throughout it falls back to all its tokens)
        second = (self.start + 1).clamp_max(supervised.numel() - 1)
        return supervised.index_copy(0, self.start, supervised.index_select(0, second))

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: whether any token of each sequence has ``flags[B*S]`` set."""
        counts = torch.zeros(self.count, dtype=torch.long, device=flags.device)
        return counts.index_add_(0, self.index, flags.long()) > 0

    def cumsum(self, flags: torch.Tensor) -> torch.Tensor:
        """``[B*S]``: the running count of ``flags[B*S]`` within each sequence (``cumsum`` restarted per sequence)."""
        running = flags.long().cumsum(0)
        before = (running - flags.long()).index_select(0, self.start)  # the count up to each sequence's start
        return running - before.index_select(0, self.index)


def packed_segments(context: RoutingContext | None, batch: int, seq: int, device: torch.device) -> Segments | None:
    """The sequences of the call when its rows pack several (``RoutingContext.packed``: ``position_ids`` restart
    inside a row and no ``attention_mask`` separates them), for a layer input of ``B`` rows of ``S`` tokens; ``None``
    otherwise. The model's runtime finds them before the forward (``RoutingContext.segments``), outside any compiled
    graph: their count and lengths are host values, which compiled code reads as constants (a graph for each)."""
    if context is None or not context.packed():
        return None
    positions = context.position_ids
    if tuple(positions.shape) != (batch, seq):
        return None  # the positions of another input (an encoder's, for a decoder's cross-attention)
    segments = context.segments
    if segments is None:  # (a context made without the model's runtime)
        return Segments.from_positions(positions.to(device))
    return segments.to(device)


def pool(x: torch.Tensor, mask: torch.Tensor, pooler: str, query: torch.Tensor | None = None) -> torch.Tensor:
    """Masked pooling of ``x[B, S, d]`` over the positions where ``mask[B, S]`` is True; ``[B, d]``.

    ``query[d]``: the learned query of ``pooler="attn"`` (required there). A row without any True position pools to
    zeros (it is a padding-only row whose outputs nobody reads).
    """
    weights = mask.to(x.dtype).unsqueeze(-1)  # [B, S, 1]
    if pooler == "mean":
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    if pooler == "attn":
        if query is None:
            raise ValueError("pooler='attn' needs the router's learned query (`query`).")
        scores = (x @ query.to(x.dtype)) / math.sqrt(x.shape[-1])  # [B, S]
        scores = scores.masked_fill(~mask, float("-inf"))
        # a row without prompt positions gets all -inf: softmax would be NaN there, so those rows weigh nothing
        alpha = torch.softmax(scores.masked_fill(~mask.any(dim=1, keepdim=True), 0.0), dim=1) * weights.squeeze(-1)
        return (alpha.unsqueeze(-1) * x).sum(dim=1)
    if pooler == "last":
        positions = torch.arange(x.shape[1], device=x.device).expand(mask.shape)
        last = torch.where(mask, positions, -1).amax(dim=1)  # [B], -1 for an empty row
        picked = x[torch.arange(x.shape[0], device=x.device), last.clamp_min(0)]
        return picked * (last >= 0).to(x.dtype).unsqueeze(-1)
    if pooler == "max":
        filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        return torch.where(mask.any(dim=1, keepdim=True), filled, torch.zeros_like(filled))
    raise ValueError(f"`router_kwargs['pooler']`={pooler!r} is not supported; allowed values: {list(POOLERS)}.")


def broadcast_to_tokens(
    sequence: Routing, routed: torch.Tensor, seq: int, segments: Segments | None = None
) -> PromptRouting:
    """Give every one of the ``seq`` tokens of each sequence its sequence's decision (``T = B * seq`` rows); with
    ``segments`` (a packed call), every token its own sequence's among the rows' ``N``."""
    batch, k = sequence.num_tokens, sequence.expert_index.numel() // max(sequence.num_tokens, 1)
    if segments is not None:
        index = segments.index.to(sequence.probs.device)

        def per_token(values: torch.Tensor) -> torch.Tensor:
            return values.index_select(0, index)

        return PromptRouting(
            probs=per_token(sequence.probs),
            token_index=repeated_arange(index.numel(), k, sequence.probs.device),
            expert_index=per_token(sequence.expert_index.reshape(batch, k)).reshape(-1),
            weight=per_token(sequence.weight.reshape(batch, k)).reshape(-1),
            logits=per_token(sequence.logits) if sequence.logits is not None else None,
            gates=per_token(sequence.dense_gates()),
            sequence=sequence,
            routed=routed,
        )
    n_tokens = batch * seq
    logits = sequence.logits.repeat_interleave(seq, dim=0) if sequence.logits is not None else None
    return PromptRouting(
        probs=sequence.probs.repeat_interleave(seq, dim=0),
        token_index=repeated_arange(n_tokens, k, sequence.probs.device),
        expert_index=sequence.expert_index.reshape(batch, k).repeat_interleave(seq, dim=0).reshape(-1),
        weight=sequence.weight.reshape(batch, k).repeat_interleave(seq, dim=0).reshape(-1),
        logits=logits,
        gates=sequence.dense_gates().repeat_interleave(seq, dim=0),
        sequence=sequence,
        routed=routed,
    )


def _detached(routing: Routing) -> Routing:
    def det(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach()

    return Routing(
        probs=det(routing.probs),
        token_index=routing.token_index,
        expert_index=routing.expert_index,
        weight=det(routing.weight),
        logits=det(routing.logits),
        gates=det(routing.dense_gates()),
    )


#: attribute of a KV cache object holding the prompt routers' decisions of the prefill that filled it
_CACHE_ATTRIBUTE = "_molora_prompt_decisions"


def _keep_with_cache(context: RoutingContext | None, router: PromptRouter, decision: _CachedDecision) -> None:
    """Attach a prefill's decision to the KV cache object it fills, keyed by router: decode steps of that cache then
    read their own decision, whatever ran since; a copy of the cache (``copy.deepcopy``, to continue a conversation
    twice) carries it along."""
    cache = context.cache if context is not None else None
    if cache is None:
        return
    try:
        kept = cache.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
    except AttributeError:  # an object without attributes: the router's last decision is used
        return
    kept[id(router)] = decision


def _kept_with_cache(context: RoutingContext | None, router: PromptRouter) -> _CachedDecision | None:
    """The decision :func:`_keep_with_cache` attached to this step's KV cache for ``router``, if any."""
    cache = context.cache if context is not None else None
    kept = getattr(cache, "__dict__", {}).get(_CACHE_ATTRIBUTE) if cache is not None else None
    return kept.get(id(router)) if kept else None


@torch.compiler.disable
def keep_prefill_decisions(context: RoutingContext, deciders: list[PromptRouter], known: dict) -> None:
    """After a prefill (a call with a KV cache), attach the decision each router in ``deciders`` (those that decided
    in this call, :attr:`RoutingContext.deciders`) made to that cache, and empty ``deciders``; ``known`` (router id
    -> weak reference) learns them, for :func:`restore_decisions`.

    Called by the model's end-of-forward hook, outside any compiled graph: a compiled call cannot attach them itself
    (the cache object is no graph value)."""
    for router in deciders:
        if router._cached is not None:
            _keep_with_cache(context, router, router._cached)
            known[id(router)] = weakref.ref(router)
    if len(known) > 4 * max(len(deciders), 64):  # routers of deleted adapters
        for key in [key for key, ref in known.items() if ref() is None]:
            del known[key]
    deciders.clear()


@torch.compiler.disable
def restore_decisions(context: RoutingContext, known: dict) -> None:
    """Before a decode step, make the decisions kept with its KV cache the current ones of their routers (``known``:
    router id -> weak reference, see :func:`keep_prefill_decisions`).

    Called by the model's start-of-forward hook, outside any compiled graph, whose decode steps read the router's
    current decision (reading the cache object would break the graph): another generation with its own cache may
    have run since this cache's prefill (interleaved conversations, a server's requests)."""
    cache = context.cache
    kept = getattr(cache, "__dict__", {}).get(_CACHE_ATTRIBUTE) if cache is not None else None
    for key, decision in (kept or {}).items():
        ref = known.get(key)
        router = ref() if ref is not None else None
        if router is not None:
            router._cached = decision


__all__ = [
    "PromptParams",
    "PromptRouter",
    "PromptRouting",
    "Segments",
    "broadcast_to_tokens",
    "is_prompt_router",
    "packed_segments",
    "pool",
    "prompt_positions",
    "sequence_masks",
]
