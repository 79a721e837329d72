"""The MoLoRA tuner layer: a bank of LoRA experts and a router wrapped around one linear projection.

``y = base(x) + sum_e g_e(x) * scaling * B_e A_e dropout(x)``, with ``A[E, d_in, r]`` and ``B[E, r, d_out]``
stacked so that one kernel call covers every expert (``molora.kernels``). The base layer may be ``nn.Linear``,
transformers' ``Conv1D`` (GPT-2) or a quantized linear layer (bitsandbytes 4-bit / 8-bit and the other backends
PEFT recognises): the experts only need the base layer's input and output widths, never its weights.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._amp import autocast_dtype
from ..kernels import TRITON_DTYPES, choose_kernel, expert_delta, triton_available
from ..kernels.fused_dense import (
    _base_and_shrink_forward,
    _gated_expand_forward,
    base_and_shrink,
    dense_topk_layer,
    gated_expand_,
    shrink_matmul,
)
from ..kernels.torch_ops import dense_masked_expand, flat_shrink_weight
from ..routers.base import Router, Routing, build_router_params, get_router_class
from ..runtime import self_delivered
from .bank import ExpertBank, initial_banks
from .dynamic_rank import DynamicRankState
from .milora import MiloraSlot, layer_decision, module_delta, module_routing

MERGE_ERROR = (
    "MoLoRA adapters cannot be merged into the base weights: each token (or prompt) is routed to its own mix of "
    "LoRA experts, so there is no single weight delta that equals the adapter for every input. Keep the PeftModel "
    "for inference, or call `unload()` to get the base model back without the adapter."
)


class MoLoraLayer(BaseTunerLayer):
    """Mixin holding the per-adapter expert banks and routers of one adapted projection.

    Per adapter name: ``molora_A[name].weight`` (``Parameter[E, d_in, r]``) and ``molora_B[name].weight``
    (``Parameter[E, r, d_out]``) (:class:`~molora.adapters.bank.ExpertBank` s, named as PEFT LoRA's weights),
    ``molora_router[name]`` (a :class:`~molora.routers.Router`), ``molora_dropout[name]``, the DR-LoRA rank state
    ``molora_rank[name]`` (a :class:`~molora.adapters.dynamic_rank.DynamicRankState`, only for adapters with
    ``dynamic_rank``), and the plain values in ``other_param_names``.
    """

    adapter_layer_names = ("molora_A", "molora_B", "molora_router", "molora_rank")
    other_param_names = ("r", "lora_alpha", "scaling", "num_experts", "top_k", "kernel", "molora_dropout", "_milora")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.top_k: dict[str, int] = {}
        self.kernel: dict[str, str] = {}
        self.molora_dropout = nn.ModuleDict({})
        self.molora_A = nn.ModuleDict({})  # adapter name -> ExpertBank
        self.molora_B = nn.ModuleDict({})
        self.molora_router = nn.ModuleDict({})
        self.molora_rank = nn.ModuleDict({})
        # MiLoRA module mode: per adapter, this projection's place in its decoder layer's router (set by the tuner)
        self._milora: dict[str, MiloraSlot] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        # per adapter, what the dense path of a call with a KV cache found, for the decode steps after it
        # (see _decode_plan)
        self._molora_decode_plans: dict[str, _DecodePlan] = {}
        self.quantization_backend = resolve_quantization_backend(self.get_base_layer(), **kwargs)
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(
                f"Cannot read the input/output widths of {type(self.get_base_layer()).__name__}; MoLoRA supports "
                "torch.nn.Linear, transformers' Conv1D and quantized linear layers."
            )
        self.in_features = in_features
        self.out_features = out_features
        # set by MoLoraModel when the layer is injected: the shared runtime and this layer's module name
        self._molora_runtime = None
        self._molora_key = ""

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create (or re-create) the expert bank and router of ``adapter_name`` from ``config``."""
        rank, n_experts = config.r, config.num_experts
        dynamic_rank = config.dynamic_rank_params
        if dynamic_rank is not None and dynamic_rank.layer_ranks:
            # a compacted DR-LoRA adapter (dynamic_rank.compact_adapter): this module's banks were sliced
            rank = dynamic_rank.layer_ranks.get(self._molora_key, rank)
        self.r[adapter_name] = rank
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        self.num_experts[adapter_name] = n_experts
        self.top_k[adapter_name] = config.top_k
        self.kernel[adapter_name] = config.kernel
        self.molora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )

        weight_A, weight_B = initial_banks(
            n_experts, self.in_features, self.out_features, rank, config.init_lora_weights
        )
        self.molora_A[adapter_name] = ExpertBank(weight_A)
        self.molora_B[adapter_name] = ExpertBank(weight_B)

        self._milora.pop(adapter_name, None)
        self._molora_decode_plans.pop(adapter_name, None)
        if config.milora_module_mode:
            # MiLoRA module mode: this projection is one LoRA module, gated by its decoder layer's router, which the
            # tuner creates once every projection is adapted (molora.adapters.milora)
            if adapter_name in self.molora_router:
                del self.molora_router[adapter_name]
        else:
            router_cls = get_router_class(config.router)
            params = build_router_params(config.router, config.router_kwargs, n_experts, config.top_k)
            self.molora_router[adapter_name] = router_cls(
                self.in_features,
                n_experts,
                config.top_k,
                params=params,
                init=config.router_init,
                init_std=config.router_init_std,
            )
        if dynamic_rank is not None:
            self.molora_rank[adapter_name] = DynamicRankState(n_experts, rank, dynamic_rank)
        elif adapter_name in self.molora_rank:
            del self.molora_rank[adapter_name]
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if adapter_name in self.molora_router:
            # routers score in fp32 whatever the base dtype (see molora.routers.base)
            self.molora_router[adapter_name].float()
        self.set_adapter(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        # (a decode plan holds the adapter's weights)
        self._molora_decode_plans.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def _drop_decode_plans(self) -> None:
        """Forget every adapter's decode plan (:meth:`_store_decode_plan`), e.g. when a generation ends: a plan holds a
        copy of the adapter's ``A`` and the router's weight, which the next call with a KV cache builds again."""
        self._molora_decode_plans.clear()

    # -- merging is undefined for routed experts --------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        # nothing can have been merged (merge always raises)
        return None

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(MERGE_ERROR)

    # -- forward ----------------------------------------------------------------------------------------------------

    def _prepare(self, x: torch.Tensor, adapter_name: str, weight_A: torch.Tensor | None = None):
        """What every forward path of one adapter needs: flat input, padding mask, routing context, the bank (with
        DR-LoRA's dormant rank components masked out) and the DR-LoRA state. ``weight_A``: the adapter's ``A``
        parameter when the caller already fetched it."""
        lead_shape = x.shape[:-1]
        x_flat = x.reshape(-1, x.shape[-1])  # [T, d_in]
        runtime = self._molora_runtime
        context = runtime.context.for_input(x) if runtime is not None else None
        valid = context.token_mask(lead_shape) if context is not None else None
        if valid is not None and valid.device != x.device:
            valid = valid.to(x.device)
        if weight_A is None:
            weight_A = self.molora_A[adapter_name].weight
        weight_B = self.molora_B[adapter_name].weight
        rank_state = self.molora_rank[adapter_name] if adapter_name in self.molora_rank else None
        if rank_state is not None:
            # DR-LoRA: dormant rank components are masked out of A and B (and so get zero gradient)
            weight_A, weight_B = rank_state.masked_weights(weight_A, weight_B)
        return x_flat, lead_shape, valid, context, weight_A, weight_B, rank_state

    @staticmethod
    def _route(router: nn.Module, x_flat: torch.Tensor, valid, context, lead_shape) -> Routing:
        if router.uses_context:
            # sequence-level routers (e.g. "prompt") also need the [batch, seq] layout (known to the context when the
            # model flattened the tokens in order)
            if context is not None:
                lead_shape = context.sequence_layout(tuple(lead_shape))
            return router(x_flat, valid, context=context, lead_shape=lead_shape)
        return router(x_flat, valid, context=context)

    def _route_with_losses(
        self, adapter_name: str, router, x_flat: torch.Tensor, valid, context, lead_shape, dense: bool = False
    ):
        """Route ``x_flat`` with the router's own scoring; for routers whose ``forward`` is the base class's
        (``select(scores(x))``), through :meth:`_select` so that the router may compute its aux losses with the
        routing (the fused top-k function). Returns ``(routing, losses or None)``. ``dense``: see :meth:`_select`."""
        if type(router).forward is Router.forward and not (router._forward_hooks or router._forward_pre_hooks):
            return self._select(adapter_name, router, router.scores(x_flat), valid, dense)
        return self._route(router, x_flat, valid, context, lead_shape), None

    def _finish(
        self,
        adapter_name: str,
        router,
        routing: Routing,
        valid,
        rank_state,
        out: torch.Tensor,
        lead_shape,
        losses: dict[str, torch.Tensor] | None = None,
    ):
        """Record DR-LoRA frequencies, aux losses and statistics; restore the leading shape."""
        runtime = self._molora_runtime
        if rank_state is not None and self.training and not (runtime is not None and runtime.observes_nothing):
            # (activation checkpointing's recompute: the forward observed these tokens; a generation in train mode)
            rank_state.observe(routing, valid)
        if runtime is not None:
            out = runtime.record(self._molora_key, adapter_name, router, routing, valid, out, losses)
        return out.reshape(*lead_shape, out.shape[-1])

    def _select(self, adapter_name: str, router, logits: torch.Tensor, valid, dense: bool = False):
        """The routing from logits computed by the layer, and the aux losses when the router computes them with it
        (``MoLoraRuntime.select``; without a runtime no loss is recorded). ``dense``: the caller reads only the dense
        gates (the dense path), so a routing with a variable number of experts per token may list all (token,
        expert) pairs instead of finding its assignments (``Routing.from_dense``)."""
        runtime = self._molora_runtime
        if runtime is None:
            routing, losses = router.select(logits, valid), None
        else:
            routing, losses = runtime.select(adapter_name, router, logits, valid, dense)
        # (the router's forward, which this replaces, observes its routing: the loss-free bias's loads)
        router.observe_routing(routing, valid, runtime.context if runtime is not None else None)
        return routing, losses

    def _expert_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        bank = self.molora_A[adapter_name].weight
        x_flat, lead_shape, valid, context, weight_A, weight_B, rank_state = self._prepare(x, adapter_name, bank)
        router = self.molora_router[adapter_name]
        scaling, kernel = self.scaling[adapter_name], self._kernel(adapter_name, x.device)
        losses = None
        x_in = x_flat
        if x_flat.dtype != weight_A.dtype == torch.float32:
            # a bf16/fp16 model with fp32 adapters (PEFT's `autocast_adapter_dtype`): experts and router both read x in
            # fp32; cast it once, so that the router's scoring can share the experts' GEMM
            x_in = self._cast_input_dtype(x_flat, torch.float32)
        if self._can_fuse_router(x_in, adapter_name, kernel):
            # the dense path with the router's scoring in the same GEMM: x @ [A_flat | W_router^T]
            # (a decode step reuses the matrix its prefill built: the plan of a base layer the fused path cannot run)
            plan = self._decode_plan(x_in, adapter_name, fused=False) or self._store_decode_plan(
                x_in, adapter_name, None, weight_A, bank, weight_B, router, router.weight, None
            )
            hl = x_in @ plan.shrink if plan is not None else shrink_matmul(x_in, weight_A, router.weight)
            h, logits = _split_shrink(hl, weight_A)
            routing, losses = self._select(adapter_name, router, logits, valid, dense=True)
            delta = dense_masked_expand(h, weight_B, routing, scaling)
        else:
            routing, losses = self._route_with_losses(adapter_name, router, x_flat, valid, context, lead_shape)
            h = self._cast_input_dtype(self.molora_dropout[adapter_name](x_flat), weight_A.dtype)
            delta = expert_delta(h, weight_A, weight_B, routing, scaling, kernel)
        return self._finish(adapter_name, router, routing, valid, rank_state, delta, lead_shape, losses)

    def _fused_base_forward(self, x: torch.Tensor, adapter_name: str, plan: tuple[nn.Module, torch.Tensor, Any]):
        """Base projection + dense-path experts of one adapter through ``molora.kernels.fused_dense``.

        One function computes the base output and the rank activations (and the router's logits when the router is
        a linear scorer on the same fp32 input); the gated expansion is added into the base output in place. Same
        results as :meth:`forward`'s general path, fewer passes over ``[tokens, d]`` tensors in both directions.
        ``plan``: ``(base layer, A, autocast dtype)`` from :meth:`_fusion_plan` (which checked the dense path and the
        dropout). In an autocast region the products run in its dtype, as the general path's do: the input, the base
        weight and the experts are cast to it (differentiably: the fp32 parameters get fp32 gradients) and autocast
        is switched off inside, so that it cannot recast some products and not the in-place ones; the router scores
        the uncast input in fp32 (``molora.routers.base``).
        """
        base, bank, amp = plan
        if amp is None:
            return self._fused_forward(x, adapter_name, base, bank, None)
        with torch.autocast(x.device.type, enabled=False):
            return self._fused_forward(x, adapter_name, base, bank, amp)

    def _fused_forward(self, x, adapter_name: str, base: nn.Module, bank: torch.Tensor, amp):
        x_flat, lead_shape, valid, context, weight_A, weight_B, rank_state = self._prepare(x, adapter_name, bank)
        router = self.molora_router[adapter_name]
        weight, bias, x_in = base.weight, base.bias, x_flat
        if amp is not None:
            x_in, weight, weight_A, weight_B = x_flat.to(amp), weight.to(amp), weight_A.to(amp), weight_B.to(amp)
            bias = bias.to(amp) if bias is not None else None
        fuse_router = self._router_fusable(x_in, weight_A, router)
        router_weight = router.weight if fuse_router else None
        b_flat = weight_B.reshape(-1, weight_B.shape[-1])
        # None with autograd (the function then builds [A_flat | W_router^T] itself; a plan left by a generation is
        # dropped) or autocast (whose decode steps check everything again)
        plan = None
        if amp is None:
            plan = self._store_decode_plan(
                x, adapter_name, base, weight_A, bank, weight_B, router, router_weight, b_flat
            )
        if fuse_router:
            done = self._dense_topk_forward(adapter_name, weight, bias, base, router, x_in, weight_A, b_flat, valid)
            if done is not None:
                out, routing, losses = done
                return self._finish(adapter_name, router, routing, valid, rank_state, out, lead_shape, losses)
        out, h, logits = base_and_shrink(
            x_in, weight, bias, weight_A, router_weight, isinstance(base, Conv1D), shrink=plan and plan.shrink
        )
        return self._route_and_expand(
            adapter_name, router, out, h, logits, x_flat, valid, context, lead_shape, b_flat, rank_state
        )

    def _route_and_expand(
        self, adapter_name: str, router, out, h, logits, x_flat, valid, context, lead_shape, b_flat, rank_state
    ):
        """The fused path after :func:`base_and_shrink`: route (from ``logits`` when the router's scoring shared the
        GEMM, else with the router's own scoring of ``x_flat``), add the gated expansion into ``out``, finish."""
        losses = None
        if logits is not None:
            routing, losses = self._select(adapter_name, router, logits, valid, dense=True)
        else:
            routing, losses = self._route_with_losses(adapter_name, router, x_flat, valid, context, lead_shape, True)
        out = gated_expand_(out, h, routing.dense_gates(), b_flat, self.scaling[adapter_name])
        return self._finish(adapter_name, router, routing, valid, rank_state, out, lead_shape, losses)

    def _decode_forward(self, x: torch.Tensor, adapter_name: str, plan: _DecodePlan) -> torch.Tensor:
        """:meth:`_fused_forward` of a decode step, with what an earlier call on its KV cache found
        (:meth:`_decode_plan`): the same functions on the same tensors, without looking up and checking again the
        modules and weights of every layer in every step (a good part of a small layer's decode-step time). A plan
        only serves calls without autograd (:meth:`_decode_plan`): the functions' autograd-free forwards are called
        directly."""
        lead_shape = x.shape[:-1]
        x_flat = x.reshape(-1, x.shape[-1])
        runtime = self._molora_runtime
        context = runtime.context.for_input(x)
        valid = context.token_mask(lead_shape)
        if valid is not None and valid.device != x.device:
            valid = valid.to(x.device)
        bank, router_weight = plan.bank, plan.router_weight
        out, hl = _base_and_shrink_forward(
            x_flat, plan.weight, plan.bias, bank, router_weight, plan.conv1d, plan.shrink
        )
        if router_weight is None:
            h, logits = hl, None
        else:
            # _split_rank_and_logits's views, from one call (no autograd here: the multi-output view is never
            # differentiated or modified in place)
            n_experts, _, rank = bank.shape
            h, logits = hl.split_with_sizes([n_experts * rank, hl.shape[1] - n_experts * rank], 1)
        router = plan.router
        # a decode step needs no aux loss (MoLoraRuntime.losses_needed): a router whose selection is the top-k
        # function (FusedTopKSelection) is asked directly, as MoLoraRuntime.select would ask it (the same values;
        # the runtime's checks less, in a step that is mostly such overhead)
        if logits is None or not getattr(type(router).select_with_losses, "fused_topk", False):
            return self._route_and_expand(
                adapter_name, router, out, h, logits, x_flat, valid, context, lead_shape, plan.b_flat, None
            )
        routing, _ = router.select_with_losses(logits, valid, _NO_LOSSES, None, dense=True)
        router.observe_routing(routing, valid, runtime.context)  # as _select passes it
        _gated_expand_forward(out, h, routing.dense_gates(), plan.b_flat, self.scaling[adapter_name])
        # _finish without a rank state (a plan is made for banks that are not DR-LoRA-masked)
        out = runtime.record(self._molora_key, adapter_name, router, routing, valid, out)
        return out.reshape(*lead_shape, out.shape[-1])

    def _dense_topk_forward(self, adapter_name, weight, bias, base, router, x_flat, weight_A, b_flat, valid):
        """``(out, routing, losses)`` through ``fused_dense.dense_topk_layer`` (base projection, top-k routing with its
        losses, and the experts as one autograd node) when a training forward of a top-k router allows it, else
        ``None``. The caller checked the fused dense path and a linear router on the same fp32 input."""
        runtime = self._molora_runtime
        if runtime is None or not torch.is_grad_enabled():
            return None  # without autograd the separate functions run their forwards directly: nothing to merge
        if not (x_flat.requires_grad or weight_A.requires_grad or b_flat.requires_grad or router.weight.requires_grad):
            return None
        args = runtime.selection_args(adapter_name, router)
        if args is None or router.weight.shape[0] != weight_A.shape[0]:
            return None
        need, balance_type, missing = args
        topk_args = router.fused_topk_args(x_flat.dtype, need, balance_type)
        if topk_args is None:
            return None
        out, *routed = dense_topk_layer(
            x_flat,
            weight,
            bias,
            weight_A,
            b_flat,
            router.weight,
            self.scaling[adapter_name],
            conv1d=isinstance(base, Conv1D),
            valid=valid,
            missing_grads=missing,
            **topk_args,
        )
        # the logits stay inside the node (the losses that read them came out of it); the dense path reads the gates
        routing, losses = router.topk_result(*routed, None, need, dense=True)
        router.observe_routing(routing, valid, runtime.context)
        return out, routing, (self_delivered(losses) if missing is not None else losses)

    def _can_fuse_router(self, x_flat: torch.Tensor, adapter_name: str, kernel: str) -> bool:
        """Whether the router's logits can come out of the dense path's shrink GEMM (see ``_split_shrink``).

        Needs the dense path, the same fp32 input for router and experts (no active dropout, no low-precision
        input, which the router would upcast) and a router whose logits are a plain linear map of ``x``.
        """
        resolved = self._resolve_kernel(x_flat.shape[0], adapter_name, kernel, x_flat.device)
        if resolved != "dense" or self._dropout_active(adapter_name):
            return False
        return self._router_fusable(x_flat, self.molora_A[adapter_name].weight, self.molora_router[adapter_name])

    @staticmethod
    def _router_fusable(x_flat: torch.Tensor, weight_A: torch.Tensor, router: Router) -> bool:
        """:meth:`_can_fuse_router` once the dense path and the dropout are known to allow it."""
        if not x_flat.dtype == weight_A.dtype == router.weight.dtype == torch.float32:
            return False
        if torch.is_autocast_enabled(x_flat.device.type):
            return False  # the shared GEMM would run in bf16/fp16: the router's logits must be fp32
        if router._forward_hooks or router._forward_pre_hooks:
            # the fused path never calls router.forward: respect hooks users put on the router
            return False
        return router.linear_scoring()

    def _kernel(self, adapter_name: str, device: torch.device) -> str:
        """The adapter's ``kernel``, or ``"auto"`` where it is ``"triton"`` and Triton cannot run on ``device`` or
        compute the bank's dtype (float64: its kernels compute in fp32): the path is a speed choice saved with the
        adapter, and an adapter trained with Triton on a GPU must still run on a CPU (every path computes the same
        delta). Warns once."""
        kernel = self.kernel[adapter_name]
        if kernel == "triton":
            dtype = self.molora_A[adapter_name].weight.dtype
            if not triton_available(device) or dtype not in TRITON_DTYPES:
                _warn_triton_fallback(device, dtype)
                return "auto"
        return kernel

    def _resolve_kernel(self, n_tokens: int, adapter_name: str, kernel: str, device: torch.device) -> str:
        """``kernel``, with ``"auto"`` resolved for ``n_tokens`` tokens on ``device``, before routing: from the bank's
        shape and the router's expected experts per token."""
        if kernel != "auto":
            return kernel
        weight_A = self.molora_A[adapter_name].weight
        n_experts, d_in, rank = weight_A.shape
        assignments = round(n_tokens * self.molora_router[adapter_name].experts_per_token())
        width = (d_in + self.molora_B[adapter_name].weight.shape[-1]) // 2
        return choose_kernel(n_tokens, assignments, n_experts, rank, device, width, weight_A.dtype)

    def _dropout_active(self, adapter_name: str) -> bool:
        dropout = self.molora_dropout[adapter_name]
        return not (isinstance(dropout, nn.Identity) or not dropout.training or dropout.p == 0)

    def _fusion_plan(self, x: torch.Tensor, adapter_name: str) -> tuple[nn.Module, torch.Tensor, Any] | None:
        """``(base layer, A, autocast dtype or None)`` when the base projection and the dense path can run as one fused
        pair (``molora.kernels.fused_dense``), else ``None``.

        Needs a plain ``nn.Linear``/``Conv1D`` base without hooks whose weights do not train, the dense path, no
        active dropout (the experts must see the base layer's input), and one dtype for input, base and bank or an
        autocast region (whose dtype the fused path then casts all of them to, as autocast does for the general
        path's products). What the check fetched is handed to :meth:`_fused_base_forward` (this runs before every
        layer call, each decode step included, where looking the same modules up again was a visible part of it).
        """
        base = self._plain_base_layer()
        if type(base) not in (nn.Linear, Conv1D) or base._forward_hooks or base._forward_pre_hooks:
            return None
        weight, bias = base.weight, base.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        weight_A = self.molora_A[adapter_name].weight
        amp = autocast_dtype(x.device.type)
        if amp is None and not x.dtype == weight.dtype == weight_A.dtype:
            return None
        n_tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self._resolve_kernel(n_tokens, adapter_name, self._kernel(adapter_name, x.device), x.device) != "dense":
            return None
        if self._dropout_active(adapter_name):
            return None
        return base, weight_A, amp

    def _batch_adapter_names(self, x: torch.Tensor, adapter_names: list[str] | None) -> list[str] | None:
        """Per-sample adapter names for this call: the ``adapter_names`` kwarg, else the model-level mixed call's."""
        if adapter_names is not None:
            candidates = [list(adapter_names)]
        else:
            runtime = self._molora_runtime
            candidates = getattr(runtime, "batch_adapter_names", None)
            if not candidates:
                return None
        batch = x.shape[0] if x.dim() >= 2 else -1
        for names in candidates:
            if len(names) == batch:
                return names
        raise ValueError(
            f"{len(candidates[-1])} adapter names were given for a batch of {batch} samples in {self._molora_key!r}; "
            "pass one name per sample (the layer input must be laid out as [batch, ...])."
        )

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any):
        """Base output plus, for every sample, the experts of its own adapter: all adapters in one grouped pass.

        Each adapter's router routes its own samples' tokens; the assignments are then offset into one
        concatenated expert bank (ranks zero-padded to the largest, each adapter's scaling folded into its gates)
        and a single :func:`~molora.kernels.expert_delta` call computes every delta (one per adapter dtype, when
        adapters of different dtypes share the batch).
        """
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            if name != "__base__" and name in self.molora_A:
                groups.setdefault(name, []).append(row)
        if not groups:
            return result
        runtime = self._molora_runtime
        context = runtime.context.for_input(x) if runtime is not None else None
        valid_all = context.token_mask(x.shape[:-1]) if context is not None else None
        # adapters of different dtypes (one loaded with `autocast_adapter_dtype=False`) are computed in their own
        # dtype, one grouped pass per dtype, as each would be alone: a sample's output must not depend on the others'
        # adapters
        by_dtype: dict[torch.dtype, dict[str, list[int]]] = {}
        for name, rows in groups.items():
            by_dtype.setdefault(self.molora_A[name].weight.dtype, {})[name] = rows
        for dtype_groups in by_dtype.values():
            result = self._grouped_adapters_pass(x, result, dtype_groups, valid_all)
        return result

    def _grouped_adapters_pass(
        self, x: torch.Tensor, result: torch.Tensor, groups: dict[str, list[int]], valid_all: torch.Tensor | None
    ) -> torch.Tensor:
        """``result`` plus the experts' deltas of ``groups`` (adapter -> its rows of the batch, one dtype)."""
        runtime = self._molora_runtime
        first = next(iter(groups))
        dtype = self.molora_A[first].weight.dtype
        max_rank = max(self.molora_A[name].weight.shape[-1] for name in groups)
        rows_order, xs, banks_A, banks_B, token_idx, expert_idx, weights, records = [], [], [], [], [], [], [], []
        token_offset = expert_offset = 0
        for name, rows in groups.items():
            rows_t = torch.tensor(rows, device=x.device)
            sub = x.index_select(0, rows_t)
            sub_flat = sub.reshape(-1, x.shape[-1])
            valid = None
            if valid_all is not None:
                valid = valid_all.view(x.shape[0], -1).index_select(0, rows_t.to(valid_all.device)).reshape(-1)
                valid = valid.to(x.device)
            slot = self._milora.get(name)
            if slot is not None:
                # MiLoRA module mode: this module's gates from its decoder layer's decision over these samples
                decision, computed = layer_decision(self, name, slot, sub.shape[:-1], valid, rows=rows_t)
                routing = module_routing(decision, slot.index)
                if computed:
                    records.append((slot.layer_key, name, slot.router, decision, valid))
            else:
                router = self.molora_router[name]
                context = runtime.context.for_input(x).select_rows(rows_t, x.shape[0]) if runtime is not None else None
                routing = self._route(router, sub_flat, valid, context, sub.shape[:-1])
                records.append((self._molora_key, name, router, routing, valid))
            weight_A, weight_B = self.molora_A[name].weight, self.molora_B[name].weight
            if name in self.molora_rank:
                weight_A, weight_B = self.molora_rank[name].masked_weights(weight_A, weight_B)
            weight_A, weight_B = weight_A.to(dtype), weight_B.to(dtype)
            pad = max_rank - weight_A.shape[-1]
            if pad:
                # zero rank columns contribute nothing; they let adapters of different ranks share one bank
                weight_A = nn.functional.pad(weight_A, (0, pad))
                weight_B = nn.functional.pad(weight_B, (0, 0, 0, pad))
            banks_A.append(weight_A)
            banks_B.append(weight_B)
            xs.append(self._cast_input_dtype(self.molora_dropout[name](sub_flat), dtype))
            token_idx.append(routing.token_index + token_offset)
            expert_idx.append(routing.expert_index + expert_offset)
            weights.append(routing.weight * self.scaling[name])
            rows_order.append(rows_t)
            token_offset += sub_flat.shape[0]
            expert_offset += weight_A.shape[0]
        routing = Routing(
            probs=x.new_zeros((), dtype=torch.float32).expand(token_offset, expert_offset),
            token_index=torch.cat(token_idx),
            expert_index=torch.cat(expert_idx),
            weight=torch.cat(weights),
        )
        kernels = {self._kernel(name, x.device) for name in groups}
        kernel = kernels.pop() if len(kernels) == 1 else "auto"
        delta = expert_delta(torch.cat(xs), torch.cat(banks_A), torch.cat(banks_B), routing, 1.0, kernel)
        if runtime is not None:
            for key, name, router, sub_routing, valid in records:
                delta = runtime.record(key, name, router, sub_routing, valid, delta)
        order = torch.cat(rows_order)
        delta = delta.reshape(order.numel(), *x.shape[1:-1], delta.shape[-1]).to(result.dtype)
        return result.index_add(0, order, delta)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        runtime = self._molora_runtime
        if runtime is not None and not self._disable_adapters and not torch.compiler.is_compiling():
            if _in_backward():
                # activation checkpointing recomputes this layer for the forward it belongs to, maybe after others
                with runtime.recompute(self._molora_key):
                    return self._adapted_forward(x, *args, **kwargs)
            runtime.remember_origin(self._molora_key)
            if self._molora_decode_plans and not args and not kwargs and not runtime.batch_adapter_names:
                # a cached decode step: what _adapted_forward would find, without its generic look-ups
                out = self._planned_decode(x)
                if out is not None:
                    return out
        return self._adapted_forward(x, *args, **kwargs)

    def _planned_decode(self, x: torch.Tensor) -> torch.Tensor | None:
        """:meth:`_adapted_forward` of a call without arguments besides ``x`` and without a mixed-adapter batch
        when its one active adapter has a decode plan that fits (:meth:`_decode_plan`); ``None`` otherwise (the
        caller then takes the general path, which finds the same). The plan itself vouches for the adapter's
        modules (``_DecodePlan.held_by``): only the active adapter is looked up here."""
        active = self._active_adapter
        if not isinstance(active, str):
            if len(active) != 1:
                return None
            active = active[0]
        if active in self._milora:
            return None
        plan = self._decode_plan(x, active)
        if plan is None:
            return None
        return self._decode_forward(x, active, plan)

    def _adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        adapter_names = self._batch_adapter_names(x, adapter_names)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.molora_A]
        if len(active) == 1 and not args and not kwargs and active[0] not in self._milora:
            if not torch.compiler.is_compiling() and self._molora_decode_plans:
                decode = self._decode_plan(x, active[0])
                if decode is not None:
                    return self._decode_forward(x, active[0], decode)
            plan = self._fusion_plan(x, active[0])
            if plan is not None:
                return self._fused_base_forward(x, active[0], plan)
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        in_place = self._base_output_is_private()
        for adapter_name in active:
            slot = self._milora.get(adapter_name)
            if slot is not None:
                delta = module_delta(self, x, adapter_name, slot)
                if delta is None:
                    continue  # no sequence selected this module: its LoRA is skipped
                delta = delta.to(result.dtype)
            else:
                delta = self._expert_output(x, adapter_name).to(result.dtype)
            # adding in place saves a [tokens, d_out] allocation and a pass over it (a few percent of a layer)
            result = result.add_(delta) if in_place else result + delta
        return result

    def _store_decode_plan(
        self, x, adapter_name: str, base, weight_A, bank, weight_B, router, router_weight, b_flat
    ) -> _DecodePlan | None:
        """The dense path's plan for the decode steps that may follow this call, kept in ``_molora_decode_plans``;
        ``None`` (and the adapter's plan dropped) where there is none to keep.

        A plan is made by every call without autograd that passes a KV cache (``RoutingContext.kv_cache``: a
        generation's prefill or decode step), runs outside an autocast region (the caller's check) and computes with
        the adapter's own weights in their own dtype (not DR-LoRA-masked). It holds what this call found (base layer,
        banks, router, whether the router's scoring shares the GEMM) and builds ``[A_flat | W_router^T]`` once: the
        caller uses it for this call, and :meth:`_decode_plan` hands the plan to the decode steps on the same KV cache
        while nothing it read has changed. ``base``: the plain base layer of the fused path (:meth:`_fusion_plan`), or
        ``None`` for the general path's dense kernel with the router's scoring in its shrink GEMM (a quantized base
        layer), whose decode steps reuse the matrix only. With autograd (or without a KV cache or a runtime) the
        matrix is built by the caller's function, so that gradients reach ``A`` and the router, and nothing is kept
        (reentrant checkpointing's gradient-free first pass is such a call without a KV cache: it would have held a
        copy of every layer's bank).
        """
        if torch.compiler.is_compiling():
            return None  # compiled code builds the matrix inside its graph (and must not guard on Python state)
        plans = self._molora_decode_plans
        runtime = self._molora_runtime
        if (
            torch.is_grad_enabled()
            or runtime is None
            or not runtime.context.kv_cache
            or runtime.context.cache_ref is None
            or weight_A is not bank
            or weight_B.dtype != bank.dtype
            or x.dtype != bank.dtype
        ):
            plans.pop(adapter_name, None)
            return None
        plan = _DecodePlan(
            base=base,
            bank=bank,
            weight_B=weight_B,
            b_flat=b_flat,
            router=router,
            router_weight=router_weight,
            shrink=flat_shrink_weight(bank, router_weight),
            dropout=self.molora_dropout[adapter_name],
            cache_ref=runtime.context.cache_ref,
        )
        plan.key = plan.state(x, self, adapter_name)
        plan.dense_token_counts.add(x.numel() // x.shape[-1])  # the caller runs the dense path
        plans[adapter_name] = plan
        return plan

    def _decode_plan(self, x: torch.Tensor, adapter_name: str, fused: bool = True) -> _DecodePlan | None:
        """The plan of this adapter (:meth:`_store_decode_plan`) when this call is a decode step without autograd on
        the KV cache of the call that made it, and nothing the plan read has changed: the input's dtype and device,
        the layer's modules and parameters (still the plan's), their modes and hooks, the weights' storage and version
        (an in-place update), the autocast state, and (for the fused path) the kernel that ``auto`` resolves for the
        call's token count.
        ``None`` otherwise: the call then checks everything again."""
        if torch.compiler.is_compiling():
            return None
        plan = self._molora_decode_plans.get(adapter_name)
        if plan is None or (plan.base is None) == fused or torch.is_grad_enabled():
            return None
        context = self._molora_runtime.context
        if not context.is_decode or context.cache_ref is None or context.cache_ref() is not plan.cache_ref():
            return None
        if plan.state(x, self, adapter_name) != plan.key:
            return None
        if fused:
            # the fused path needs the dense kernel, which `auto` resolves per token count (a prefill's plan serves
            # decode steps of fewer tokens)
            n_tokens = x.numel() // x.shape[-1]
            if n_tokens not in plan.dense_token_counts:
                kernel = self._kernel(adapter_name, x.device)
                if self._resolve_kernel(n_tokens, adapter_name, kernel, x.device) != "dense":
                    return None
                plan.dense_token_counts.add(n_tokens)
        return plan

    def _plain_base_layer(self) -> nn.Module:
        """``get_base_layer()`` without PEFT's generic unwrapping loop when the base layer is not itself a tuner layer
        (the usual case; this runs in every forward)."""
        base = self.base_layer
        return self.get_base_layer() if isinstance(base, BaseTunerLayer) else base

    def _base_output_is_private(self) -> bool:
        """Whether the base layer's output may be modified in place: its backward does not read it, nothing else
        holds it (no forward hooks on the base layer)."""
        base = self._plain_base_layer()
        return type(base) in (nn.Linear, Conv1D) and not base._forward_hooks


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)

#: the aux losses of a decode step (MoLoraRuntime.losses_needed): none
_NO_LOSSES: frozenset[str] = frozenset()


_TRITON_FALLBACK_WARNED: set[str] = set()


def _warn_triton_fallback(device: torch.device, dtype: torch.dtype) -> None:
    if dtype not in TRITON_DTYPES:
        key, why = str(dtype), f"has a {dtype} bank, which Triton's kernels would compute in float32"
    else:
        key = device.type
        why = (
            f"runs on {device.type} tensors, where Triton cannot run (it needs the triton package and CUDA tensors, "
            "or TRITON_INTERPRET=1)"
        )
    if key in _TRITON_FALLBACK_WARNED:
        return
    _TRITON_FALLBACK_WARNED.add(key)
    warnings.warn(
        f"An adapter with kernel='triton' {why}: using kernel='auto' instead (the same results; only speed depends on "
        "the path).",
        stacklevel=3,
    )


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (the autograd engine executes a graph task): a module's forward there
    is activation checkpointing's recompute. ``torch.utils.checkpoint`` asks the engine the same way."""
    return _graph_task_id is not None and _graph_task_id() != -1


def _split_shrink(hl: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``x @ [A_flat | W_router^T]`` into the rank activations and the router's logits.

    The router and the experts read the same ``x``, so one ``[d_in, E*r + E]`` GEMM gives both; in the backward pass
    the input gradient is one GEMM too instead of two plus an addition (docs/kernels.md).
    """
    n_experts, _, rank = A.shape
    return hl.split([n_experts * rank, hl.shape[1] - n_experts * rank], dim=1)


class _DecodePlan:
    """What the dense path of one adapter found in a call with a KV cache, for the decode steps that follow it
    (:meth:`MoLoraLayer._store_decode_plan`): the frozen base layer (``None`` off the fused path), the banks, the
    router, and the shrink matrix ``[A_flat | W_router^T]`` (``W_router`` only when the router's scoring shares the
    GEMM)."""

    __slots__ = (
        "base",
        "weight",
        "bias",
        "conv1d",
        "bank",
        "weight_B",
        "b_flat",
        "router",
        "router_weight",
        "shrink",
        "dropout",
        "cache_ref",
        "device_type",
        "key",
        "dense_token_counts",
    )

    def __init__(self, *, base, bank, weight_B, b_flat, router, router_weight, shrink, dropout, cache_ref):
        self.base, self.conv1d = base, isinstance(base, Conv1D)
        self.weight, self.bias = (base.weight, base.bias) if base is not None else (None, None)
        self.bank, self.weight_B, self.b_flat = bank, weight_B, b_flat
        self.router, self.router_weight, self.shrink = router, router_weight, shrink
        self.dropout, self.cache_ref = dropout, cache_ref
        self.device_type = bank.device.type
        self.key: tuple = ()
        # token counts of calls for which `auto` resolves to the dense kernel (the fused path's)
        self.dense_token_counts: set[int] = set()

    def held_by(self, layer: MoLoraLayer, adapter_name: str) -> bool:
        """Whether ``layer`` still holds the modules and parameters of the plan (a parameter replaced rather than
        updated in place, as ``load_state_dict(assign=True)`` or PEFT's ``low_cpu_mem_usage`` loading do, is another
        tensor). Plain dictionary lookups: ``nn.Module.__getattr__`` costs microseconds per call here."""
        modules = layer._modules
        bank_A = modules["molora_A"]._modules.get(adapter_name)
        bank_B = modules["molora_B"]._modules.get(adapter_name)
        router = modules["molora_router"]._modules.get(adapter_name)
        return (
            bank_A is not None
            and bank_A._parameters.get("weight") is self.bank
            and bank_B is not None
            and bank_B._parameters.get("weight") is self.weight_B
            and router is self.router
            and (self.router_weight is None or router._parameters.get("weight") is self.router_weight)
            and modules["molora_dropout"]._modules.get(adapter_name) is self.dropout
        )

    def __reduce__(self):
        # a copied or pickled model has no plan (it refers to a KV cache object by a weak reference, which cannot be
        # pickled, and a copy's first call with a cache makes its own)
        return _no_plan, ()

    def state(self, x: torch.Tensor, layer: MoLoraLayer, adapter_name: str) -> tuple:
        """What the fused path's checks read, besides the adapter and the call: equal for a call the plan fits. (The
        plan holds the weights it read, so no other tensor can take their storage and look the same.)"""
        base, router, bank, weight_B = self.base, self.router, self.bank, self.weight_B
        key = (
            x.dtype,
            x.device,
            self.held_by(layer, adapter_name),
            torch.is_autocast_enabled(self.device_type),
            self.dropout.training,
            router.training,
            bool(router._forward_hooks or router._forward_pre_hooks),
            bank.data_ptr(),
            bank._version,
            weight_B.data_ptr(),
            weight_B._version,
        )
        if self.router_weight is not None:
            key += (self.router_weight.data_ptr(), self.router_weight._version)
        if base is not None:
            key += (
                layer._modules["base_layer"] is base,
                bool(base._forward_hooks or base._forward_pre_hooks),
                base.weight is self.weight and base.bias is self.bias,
                self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad),
            )
        return key


def _no_plan() -> None:
    """What a :class:`_DecodePlan` becomes in a copied or pickled model."""
    return None


class Linear(nn.Module, MoLoraLayer):
    """MoLoRA on a linear projection (``nn.Linear``, ``Conv1D`` or a quantized linear layer)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, molora_key: str = "", **kwargs: Any
    ) -> None:
        super().__init__()
        MoLoraLayer.__init__(self, base_layer, **kwargs)
        self._molora_key = molora_key
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return MoLoraLayer.forward(self, x, *args, **kwargs)

    def __repr__(self) -> str:
        return "molora." + super().__repr__()
