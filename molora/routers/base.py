"""The router contract shared by every routing family, and the router registry.

A router scores the tokens entering one adapted projection and turns the scores into *assignments*: flat tensors
``token_index[N]``, ``expert_index[N]``, ``weight[N]`` (one triple per non-zero gate), plus the full probability
matrix ``probs[T, E]`` that the balancing losses and the routing statistics use. Top-k gives ``N = T * k``; routers
with a variable number of experts per token give a variable ``N``. One format serves every router and every kernel
(see ``molora.kernels``).

Routers compute in fp32 whatever the dtype of the adapter or of the input ("selective precision", Switch
Transformer): softmax over bf16 logits loses the small probability differences that the balancing losses live on.
This holds inside ``torch.autocast`` regions too (a trainer's ``bf16=True``): :meth:`Router.scores` and the built-in
routers' other products switch autocast off (``molora._amp``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._amp import fp32_linear
from . import balancing
from .state import exporting

if TYPE_CHECKING:
    from ..runtime import RoutingContext


@dataclass
class Routing:
    """The routing decision of one router for one forward pass.

    Shapes use ``T`` = tokens (flattened batch x sequence, padding included), ``E`` = experts, ``N`` = assignments.
    A (token, expert) pair appears at most once (the Triton kernels size their grids on this: an expert holds at most
    ``T`` assignments); :meth:`dense_gates` is the same decision as a matrix.

    Attributes:
        probs (Tensor[T, E], fp32): the router's distribution over experts (what losses and statistics use).
        token_index (LongTensor[N]): token of each assignment.
        expert_index (LongTensor[N]): expert of each assignment.
        weight (Tensor[N], fp32): final gate of each assignment (after any renormalisation); always >= 0.
        logits (Tensor[T, E] or None): raw router scores, for the z-loss; ``None`` for routers without logits.
        gates (Tensor[T, E] or None): the same gates as a dense matrix, when the router has it at hand (saves a
            scatter in the dense kernel); built on demand by :meth:`dense_gates` otherwise.
        per_token (int or None): set when every token has exactly this many assignments, stored token-major
            (assignment ``t * per_token + j`` belongs to token ``t``), as top-k and soft routers produce; the Triton
            kernels then sum each token's rows instead of adding them atomically. ``None``: no such layout.
        active (BoolTensor[T, E] or None): the selection as a dense mask, when the router has it at hand
            (:meth:`selected` returns it).
        dense_assignments (bool): the assignments are all ``T * E`` (token, expert) pairs, token-major, with weight 0
            where ``active`` is False: how :meth:`from_dense` lists a variable selection under ``torch.compile``,
            where the size of the real list (a ``nonzero``) would break the graph. Kernels compute the zero-weight
            pairs (correct, wasted work off the dense path); statistics count only the active ones.
    """

    probs: torch.Tensor
    token_index: torch.Tensor
    expert_index: torch.Tensor
    weight: torch.Tensor
    logits: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    per_token: int | None = None
    active: torch.Tensor | None = None
    dense_assignments: bool = False

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @classmethod
    def from_dense(
        cls,
        probs: torch.Tensor,
        gates: torch.Tensor,
        active: torch.Tensor,
        logits: torch.Tensor | None = None,
        dense: bool = False,
        **fields: Any,
    ) -> Routing:
        """Build a routing from dense ``gates[T, E]``: one assignment per True entry of ``active[T, E]``.

        For routers whose number of experts per token varies (top-p, ReLU, null experts); ``fields`` fill the
        extra attributes of a subclass. With ``dense=True``, and always under ``torch.compile``, the assignments are
        all ``T * E`` pairs instead (see ``dense_assignments``): the same outputs, gradients, losses and statistics
        without the ``nonzero`` (a graph break when compiled, a host synchronisation on CUDA), for a caller that
        only reads the dense gates (the dense path).
        """
        if dense or torch.compiler.is_compiling():
            n_tokens, n_experts = gates.shape
            return cls(
                probs=probs,
                token_index=repeated_arange(n_tokens, n_experts, gates.device),
                expert_index=tiled_arange(n_tokens, n_experts, gates.device),
                weight=gates.masked_fill(~active, 0.0).reshape(-1),
                logits=logits,
                gates=gates,
                per_token=n_experts,
                active=active,
                dense_assignments=True,
                **fields,
            )
        token_index, expert_index = active.nonzero(as_tuple=True)
        return cls(
            probs=probs,
            token_index=token_index,
            expert_index=expert_index,
            weight=gates[token_index, expert_index],
            logits=logits,
            gates=gates,
            active=active,
            **fields,
        )

    def dense_gates(self) -> torch.Tensor:
        """Return the gates as a dense ``[T, E]`` matrix (zero where a token does not use an expert)."""
        if self.gates is None:
            gates = self.weight.new_zeros(self.num_tokens, self.num_experts)
            self.gates = gates.index_put((self.token_index, self.expert_index), self.weight, accumulate=True)
        return self.gates

    def selected(self) -> torch.Tensor:
        """Return a boolean ``[T, E]`` matrix, True where a token was assigned to an expert."""
        if self.active is not None:
            return self.active
        sel = torch.zeros(self.num_tokens, self.num_experts, dtype=torch.bool, device=self.probs.device)
        # a device-side True: assigning the Python scalar would copy it from the host (a synchronisation on CUDA)
        return sel.index_put_((self.token_index, self.expert_index), sel.new_ones(()))


_ARANGE_CACHE: dict[tuple[str, int, int, torch.device], torch.Tensor] = {}


def repeated_arange(n: int, k: int, device: torch.device) -> torch.Tensor:
    """``arange(n).repeat_interleave(k)``, cached per ``(n, k, device)``: every layer of a forward pass asks for the
    same token index, which would otherwise cost five small operators (and kernel launches) per layer.

    Under ``torch.compile`` the index is computed in the graph (the compiler folds it; a lookup in this cache would
    make Dynamo guard on the cache's contents and recompile whenever they change)."""
    if torch.compiler.is_compiling():
        return torch.arange(n, device=device).repeat_interleave(k)
    return _cached_index("repeat_interleave", n, k, device)


def tiled_arange(n: int, k: int, device: torch.device) -> torch.Tensor:
    """``arange(k).repeat(n)`` (the expert of each of ``n * k`` token-major pairs), cached like
    :func:`repeated_arange`."""
    if torch.compiler.is_compiling():
        return torch.arange(k, device=device).repeat(n)
    return _cached_index("repeat", n, k, device)


def _cached_index(kind: str, n: int, k: int, device: torch.device) -> torch.Tensor:
    key = (kind, n, k, torch.device(device))
    index = _ARANGE_CACHE.get(key)
    if index is None:
        if len(_ARANGE_CACHE) > 64:  # shapes vary with dynamic padding: keep the cache small
            _ARANGE_CACHE.clear()
        # a normal tensor even under inference_mode: autograd saves index tensors for backward later
        with torch.inference_mode(False):
            if kind == "repeat":
                index = torch.arange(k, device=device).repeat(n)
            else:
                index = torch.arange(n, device=device).repeat_interleave(k)
        _ARANGE_CACHE[key] = index
    return index


@dataclass
class RouterParams:
    """Base class of a router's own hyper-parameters (``MoLoraConfig.router_kwargs``).

    Subclasses are dataclasses whose fields are the accepted keys; ``validate`` raises ``ValueError`` for bad values.
    """

    def validate(self, num_experts: int, top_k: int) -> None:
        """Check the values against the adapter's shape. Raise ``ValueError`` naming the field on a bad value."""


class Router(nn.Module):
    """Base class of all routers: a linear scoring layer plus a selection rule.

    Subclasses set ``name`` and ``Params`` and implement :meth:`select`. The base class holds the scoring weight
    ``weight[E, d_in]`` (kept and evaluated in fp32), computes logits and the auxiliary-loss inputs, and handles
    the padding mask. Routers that keep state across steps (biases, adaptive coefficients, caches) register it as
    persistent buffers, so that it is saved and loaded with the adapter.

    Args:
        in_features (int): width of the tokens entering the adapted projection.
        num_experts (int): number of experts ``E`` in the bank.
        top_k (int): experts per token for routers that use a fixed ``k`` (others may ignore it).
        params (RouterParams): the validated router hyper-parameters.
        init (str): ``"kaiming"`` (uniform, bound ``1/sqrt(d_in)``) or ``"normal"`` (std ``init_std``).
        init_std (float): standard deviation for ``init="normal"``.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[RouterParams]] = RouterParams
    #: True for routers that need more than the flat tokens: the layer then calls
    #: ``router(x, valid, context=..., lead_shape=...)`` with the model-level
    #: :class:`~molora.runtime.RoutingContext` (``None`` outside a ``MoLoraModel``) and the leading shape of the layer
    #: input (``(B, S)`` for ``x[B, S, d_in]``). Other routers keep the two-argument call.
    uses_context: ClassVar[bool] = False

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        top_k: int,
        *,
        params: RouterParams | None = None,
        init: str = "kaiming",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.params = params if params is not None else self.Params()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32))
        self.init = init
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the scoring weight (see the class docstring for the two conventions)."""
        with torch.no_grad():
            if self.init == "normal":
                nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
            else:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, in_features={self.in_features}, num_experts={self.num_experts}, top_k={self.top_k}"
        )

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` in fp32 for tokens ``x[T, d_in]``."""
        return fp32_linear(x, self.weight)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor | None = None, context: RoutingContext | None = None
    ) -> Routing:
        """Route the tokens ``x[T, d_in]``.

        Args:
            x (Tensor[T, d_in]): the tokens entering the adapted projection.
            valid (BoolTensor[T] or None): non-padding tokens (``None`` = all valid).
            context (RoutingContext or None): what the model-level call knows (cached decode step, forward id);
                ``None`` when the router is called on its own. Routers that depend on it override ``forward``.
        """
        logits = self.scores(x)
        routing = self.select(logits, valid)
        self.observe_routing(routing, valid, context)
        return routing

    def observe_routing(self, routing: Routing, valid: torch.Tensor | None, context: RoutingContext | None) -> None:
        """Feed per-step training state from this forward's ``routing`` (the loss-free bias's loads, ReMoE's sparsity;
        a no-op by default). Called by :meth:`forward`, and by the layer when it routes from logits it computed
        itself (the router's scoring in the experts' GEMM, :meth:`linear_scoring`), once per routing either way.
        Implementations check :meth:`observes` first. A router that keeps state this way needs no ``forward`` of its
        own, and its scoring can then share the experts' GEMM."""

    def linear_scoring(self) -> bool:
        """Whether ``forward(x, valid)`` is exactly ``select(linear(x.float(), weight), valid)`` right now.

        When it is, the layer may compute the logits inside the experts' shrink GEMM (one pass over ``x`` for the
        router and all experts). Routers that override :meth:`scores` or :meth:`forward` return False unless they
        override this method too.
        """
        return type(self).forward is Router.forward and type(self).scores is Router.scores

    def experts_per_token(self) -> float:
        """How many experts a token is expected to get, known before routing: ``kernel="auto"`` chooses the compute
        path (and whether the router's scoring can share the experts' GEMM) from it. The adapter's ``top_k`` by
        default; routers whose count differs override it (``soft``: all experts). Only speed depends on it."""
        return float(self.top_k)

    def observes(self, context: RoutingContext | None) -> bool:
        """Whether this forward feeds per-step training state (the loss-free bias's loads, ReMoE's sparsity): a
        training forward of a trained router, i.e. in train mode, with autograd on, outside a generation (RL
        trainers sample in train mode), and while the router's parameters require gradients. TRL's DPO/GRPO run
        their frozen reference copy of the adapter (``ref``) and the old policy in train mode under ``no_grad``
        beside the trained forward: their routings used to move the state every step, where a frozen adapter never
        changes in PEFT. Reentrant activation checkpointing runs a layer's first forward without autograd; its
        recompute (with autograd, same forward id) counts it once. A ``torch.export`` trace is not a training forward
        (its tensors are fake)."""
        if not self.training or not torch.is_grad_enabled() or (context is not None and context.generation):
            return False
        if exporting():
            return False
        return any(p.requires_grad for p in self.parameters())

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        """Turn logits ``[T, E]`` into a :class:`Routing`. Implemented by each router."""
        raise NotImplementedError

    def select_with_losses(
        self, logits: torch.Tensor, valid: torch.Tensor | None, need: frozenset[str], balance_loss_type: str
    ) -> tuple[Routing, dict[str, torch.Tensor] | None]:
        """:meth:`select` plus the unweighted aux losses named in ``need``, for routers that compute both at once.

        Returns ``(routing, losses)``; ``losses`` is ``None`` when the router leaves them to the default route
        (:meth:`aux_inputs` then :meth:`aux_losses`, run by the model's runtime). The built-in top-k router computes
        its routing, balancing loss and z-loss in one autograd node here (``molora.kernels.fused_router``); the
        values must equal those of the default route.

        An implementation marked ``select_with_losses.takes_missing_grads = True`` is also given
        ``missing_grads=``, a callable its autograd node calls in backward when its losses received no gradient
        (see ``topk_gates_and_losses``); it then delivers the aux gradient itself and the runtime adds no identity
        node on the layer's output. One marked ``select_with_losses.takes_dense = True`` is given ``dense=True`` when
        the layer reads only the dense gates (the dense path): it may then list all (token, expert) pairs
        (:meth:`Routing.from_dense` with ``dense=True``) instead of finding its assignments. Unmarked implementations
        are called with the four arguments above.
        """
        return self.select(logits, valid), None

    def fused_topk_args(
        self, logits_dtype: torch.dtype, need: frozenset[str], balance_loss_type: str
    ) -> dict[str, Any] | None:
        """The top-k options (``k``, ``renormalize``, ``balance_type``, ``z_loss``, a selection ``rule``...) when
        :meth:`select_with_losses` would compute this routing and the losses in ``need`` with
        ``molora.kernels.fused_router`` (the built-in top-k, soft and top-p routers); ``None`` otherwise (the
        default). The dense layer path then computes the base projection, the routing and the experts in one autograd
        node (``molora.kernels.fused_dense.dense_topk_layer``) and builds the result with :meth:`topk_result`."""
        return None

    def topk_result(
        self,
        gates: torch.Tensor,
        balance,
        z_loss,
        probs,
        expert_index,
        weight,
        entropy,
        active,
        logits,
        need: frozenset[str],
        dense: bool = False,
    ) -> tuple[Routing, dict[str, torch.Tensor] | None]:
        """``(routing, losses)`` as :meth:`select_with_losses` returns them, from the fused top-k outputs (see
        :meth:`fused_topk_args`; only called for routers whose ``fused_topk_args`` returned options). ``dense``: the
        caller reads only the dense gates (a selection rule's routing may then list all ``T * E`` pairs, see
        :meth:`Routing.from_dense`)."""
        raise NotImplementedError

    # -- state updated once per optimizer step ---------------------------------------------------------------------

    def on_optimizer_step(self) -> None:
        """Update the router's state after an optimizer step; a no-op for stateless routers.

        Called (through :meth:`on_optimizer_step_group`) by ``MoLoraModel.molora_on_optimizer_step()``, which the
        ``molora.training.MoLoraCallback`` runs after every ``optimizer.step()``. Stateful routers accumulate what
        they observe in training forwards (all micro-batches of the step) and update persistent buffers here.
        """

    @classmethod
    def on_optimizer_step_group(cls, routers: list[Router]) -> None:
        """Run the per-step update for all ``routers`` of this class in one adapter (in module order).

        The default calls :meth:`on_optimizer_step` on each. Routers override it to share one update across layers
        (ReMoE's lambda follows the sparsity of all layers) or to all-reduce every layer's counts over
        data-parallel ranks in a single collective. Every rank calls it with the same routers in the same order.
        """
        for router in routers:
            router.on_optimizer_step()

    @classmethod
    def max_top_k(cls, params: RouterParams, num_experts: int) -> int:
        """The largest ``top_k`` this router takes with these params: the number of experts it selects among."""
        return num_experts

    # -- auxiliary losses -------------------------------------------------------------------------------------------

    def loss_coefficients(self, config: Any) -> dict[str, float]:
        """Coefficient of each auxiliary loss this router produces, read from the adapter config.

        The names are the keys of :meth:`aux_losses`; a coefficient of 0 means the loss is not computed.
        Routers with losses of their own extend the dict (their coefficients usually live in ``Params``).
        """
        return {"balance": float(config.aux_loss_coef), "z": float(config.z_loss_coef)}

    #: whether this class's :meth:`aux_inputs` / :meth:`aux_losses` handle ``AuxInputs.row_weight`` (all rows,
    #: padding weighted 0). Declare it in the class that overrides them (and does); a class that keeps both of this
    #: base class's methods needs nothing (see :meth:`weighted_aux_rows`).
    handles_row_weight: bool = True
    # the decision of weighted_aux_rows for this class, made once when the class is created (compiled code reads a
    # plain attribute; walking the class dictionaries there breaks the graph)
    _aux_rows_weighted: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "aux_losses" in vars(cls) and not isinstance(vars(cls)["aux_losses"], staticmethod):
            # the runtime evaluates it on the class, also on several routers' concatenated inputs
            # (loss_reduction="concat"): an ordinary method failed at the first forward with labels
            raise TypeError(
                f"{cls.__qualname__}.aux_losses must be a @staticmethod (inputs, balance_loss_type, need) -> dict: "
                "the model calls it on the router class, also with several routers' inputs concatenated "
                "(loss_reduction='concat'). Call the base losses as "
                "Router.aux_losses(inputs, balance_loss_type, need)."
            )
        # the nearest class in the MRO that defines aux_inputs, aux_losses or handles_row_weight decides
        cls._aux_rows_weighted = False
        for klass in cls.__mro__:
            defined = vars(klass)
            if "handles_row_weight" in defined:
                cls._aux_rows_weighted = bool(defined["handles_row_weight"])
                break
            if "aux_inputs" in defined or "aux_losses" in defined:
                break

    def weighted_aux_rows(self) -> bool:
        """Whether :meth:`aux_inputs` should keep every row and weight the padding 0 instead of selecting the valid
        rows: under ``torch.compile`` only (selecting is a ``nonzero``, a graph break per layer), and only when the
        class that last defined the loss methods says its losses handle the weights: the nearest class in the MRO
        that defines ``aux_inputs``, ``aux_losses`` or ``handles_row_weight`` must declare ``handles_row_weight =
        True`` (this base class does), so a subclass that overrides the losses without declaring it keeps the rows."""
        return torch.compiler.is_compiling() and type(self)._aux_rows_weighted

    def aux_inputs(self, routing: Routing, valid: torch.Tensor | None) -> balancing.AuxInputs:
        """Collect what the balancing losses need from ``routing``, restricted to the valid (non-padding) tokens (or
        all tokens with the padding weighted 0, see :meth:`weighted_aux_rows`)."""
        weighted = self.weighted_aux_rows()
        return balancing.AuxInputs.from_routing(routing, valid, top_k=self.top_k, weighted=weighted)

    @staticmethod
    def aux_losses(
        inputs: balancing.AuxInputs, balance_loss_type: str, need: frozenset[str]
    ) -> dict[str, torch.Tensor]:
        """Unweighted auxiliary losses (``"balance"``, ``"z"``) computed from ``inputs``; only those in ``need``.

        A static method so that the model can evaluate it on the concatenation of several routers' inputs
        (``loss_reduction="concat"``). A per-token loss a router puts in ``inputs.extra`` under a needed name (e.g.
        ``"entropy"``) is averaged over the valid tokens; routers with other losses extend this method.
        """
        out: dict[str, torch.Tensor] = {}
        if "balance" in need:
            out["balance"] = balancing.load_balancing_loss(inputs, balance_loss_type)
        if "z" in need and inputs.logits is not None:
            out["z"] = balancing.router_z_loss(inputs.logits, inputs.row_weight)
        for name in sorted(need - out.keys()):
            if name in inputs.extra:
                out[name] = balancing.mean_rows(inputs.extra[name], inputs.probs, inputs.row_weight)
        return out


# -- registry -------------------------------------------------------------------------------------------------------

ROUTER_REGISTRY: dict[str, type[Router]] = {}


class DenseGateSelection:
    """Mixin for routers whose selection is built from dense gates (:meth:`Routing.from_dense`; ``relu``,
    ``adamoe``): they implement ``_routing(logits, dense)``. On the dense path, which reads only the dense gates,
    :meth:`select_with_losses` is given ``dense=True`` and lists all (token, expert) pairs instead of a ``nonzero`` per
    adapted layer (on CUDA a host synchronisation in every layer); the losses take the default route either way. A
    subclass that overrides :meth:`select` is asked through it, as the other routers' fused paths check."""

    def _routing(self, logits: torch.Tensor, dense: bool) -> Routing:
        raise NotImplementedError

    def select(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        return self._routing(logits, dense=False)

    def select_with_losses(self, logits, valid, need, balance_loss_type, dense: bool = False):
        if type(self).select is not DenseGateSelection.select:
            return self.select(logits, valid), None  # a subclass's own selection
        return self._routing(logits, dense=dense), None

    select_with_losses.takes_dense = True


def register_router(name: str, cls: type[Router] | None = None, *, overwrite: bool = False):
    """Register a router class under ``name`` so that ``MoLoraConfig(router=name)`` can select it.

    Usable as a decorator (``@register_router("mine")``) or a call (``register_router("mine", MyRouter)``).
    Registering the same class twice is a no-op; registering another class under a taken name raises unless
    ``overwrite=True``.
    """

    def _register(router_cls: type[Router]) -> type[Router]:
        if not (isinstance(router_cls, type) and issubclass(router_cls, Router)):
            raise TypeError(f"register_router({name!r}) expects a subclass of molora.Router, got {router_cls!r}.")
        if not name or not isinstance(name, str) or name != name.strip():
            raise ValueError(f"Router name must be a non-empty string without surrounding spaces, got {name!r}.")
        existing = ROUTER_REGISTRY.get(name)
        if existing is not None and existing is not router_cls and not overwrite:
            raise ValueError(
                f"A router named {name!r} is already registered ({existing.__module__}.{existing.__qualname__}); "
                "pick another name or pass overwrite=True."
            )
        if "name" not in vars(router_cls) or not router_cls.name:
            # the first name a class is registered under is its own; aliases do not rename it
            router_cls.name = name
        ROUTER_REGISTRY[name] = router_cls
        return router_cls

    if cls is not None:
        return _register(cls)
    return _register


def get_router_class(name: str) -> type[Router]:
    """Return the router class registered as ``name``; raise ``ValueError`` listing the known names otherwise."""
    try:
        return ROUTER_REGISTRY[name]
    except (KeyError, TypeError):
        known = sorted(ROUTER_REGISTRY)
        # a case slip ("topK") must suggest its own router, not another one equally close by spelling ("topp")
        by_lower = {k.lower(): k for k in known}
        hint = [by_lower[str(name).lower()]] if str(name).lower() in by_lower else []
        hint = hint or difflib.get_close_matches(str(name), known, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(
            f"`router`={name!r} is not a registered router; allowed values: {known}.{suggestion} "
            "Custom routers are added with molora.register_router(name, cls)."
        ) from None


def build_router_params(router: str, router_kwargs: dict[str, Any] | None, num_experts: int, top_k: int):
    """Validate ``router_kwargs`` for the router named ``router`` and return its ``Params`` instance."""
    cls = get_router_class(router)
    kwargs = dict(router_kwargs or {})
    allowed = {f.name: f for f in dataclasses.fields(cls.Params)}
    for key in kwargs:
        if not isinstance(key, str):
            raise ValueError(
                f"`router_kwargs` keys must be the router's hyper-parameter names (strings), got {key!r}; allowed "
                f"keys for router {router!r}: {sorted(allowed) or 'none'}."
            )
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            if close:
                hints.append(f"{key!r} -> {close[0]!r}?")
        hint = f" ({', '.join(hints)})" if hints else ""
        raise ValueError(
            f"`router_kwargs` has unknown key(s) {unknown} for router {router!r}; allowed keys: "
            f"{sorted(allowed) or 'none'}.{hint}"
        )
    for key, value in kwargs.items():
        _check_type(router, key, value, allowed[key])
    params = cls.Params(**kwargs)
    params.validate(num_experts=num_experts, top_k=top_k)
    return params


def _check_type(router: str, key: str, value: Any, fld: dataclasses.Field) -> None:
    default = fld.default if fld.default is not dataclasses.MISSING else None
    if default is None:
        return
    expected = type(default)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            raise ValueError(f"`router_kwargs[{key!r}]`={value!r} for router {router!r} must be a finite number.")
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ValueError(
            f"`router_kwargs[{key!r}]`={value!r} for router {router!r} must be of type {expected.__name__}."
        )


def params_to_dict(params: RouterParams) -> dict[str, Any]:
    """The router hyper-parameters as a plain dict (for model cards and statistics)."""
    return dataclasses.asdict(params)


__all__ = [
    "ROUTER_REGISTRY",
    "Router",
    "RouterParams",
    "Routing",
    "build_router_params",
    "get_router_class",
    "params_to_dict",
    "register_router",
]
