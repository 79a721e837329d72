"""LoRA on the experts of a Mixture-of-Experts base model, routed by the base model's own router.

This is DR-LoRA's own setting (docs/algorithms.md §5): a pretrained MoE LLM (Mixtral, OLMoE, Qwen-MoE, ...) keeps
its router and experts frozen, and every base expert ``e`` gets a LoRA on each of its two fused projections::

    gate_up_e(x) = W_gu[e] x + s * B_gu[e]^T A_gu[e]^T x         W_gu[e]: [2I, H]  (gate and up, concatenated)
    down_e(h)    = W_d[e]  h + s * B_d[e]^T  A_d[e]^T  h         W_d[e]:  [H, I]
    y = sum_{e in top-k(x)} g_e(x) * down_e(act(gate) * up)       g: the base router's gates, unchanged

with stacked banks ``A_gu[E, H, r]``, ``B_gu[E, r, 2I]``, ``A_d[E, I, r]``, ``B_d[E, r, H]``. With
``dynamic_rank`` each projection is a DR-LoRA bank (keys ``<experts module>.gate_up_proj`` and ``.down_proj``) whose
routing frequency is the *base* router's: its softmax probabilities, read by a forward hook on the MoE block's
``gate`` (``freq_source="probs"``), or its top-k gates as passed to the experts (``freq_source="gates"``).

Supported layout (transformers >= 5 "fused experts", the one its ``@use_experts_implementation`` decorator calls
concatenated, untransposed, gated and bias-free): ``gate_up_proj[E, 2I, H]``, ``down_proj[E, H, I]``, ``act_fn``,
and ``forward(hidden_states[T, H], top_k_index[T, k], top_k_weights[T, k])``. Mixtral, OLMoE, Qwen2-MoE and
Qwen3-MoE are tested; other models with that layout are accepted, others are refused with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .bank import ExpertBank, initial_banks
from .dynamic_rank import DynamicRankState
from .layer import MoLoraLayer, _in_backward

EXPERTS_MERGE_ERROR = (
    "Merging LoRA banks into fused MoE experts is not implemented; keep the PeftModel for inference, or call "
    "`unload()` to get the base model back without the adapter."
)

_PROJECTIONS = ("gate_up", "down")


def fused_experts_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not a supported fused-experts module (``None`` if it is one)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return "it has no 3-D `gate_up_proj`/`down_proj` expert parameters"
    if gate_up.dim() != 3 or down.dim() != 3:
        return "its `gate_up_proj`/`down_proj` are not 3-D [experts, out, in] tensors"
    for flag, wanted in (("has_gate", True), ("has_bias", False), ("is_transposed", False)):
        if getattr(module, flag, wanted) != wanted:
            return f"its layout has {flag}={getattr(module, flag)} (supported: {flag}={wanted})"
    if not getattr(module, "is_concatenated", True) or getattr(module, "has_post_expert_norm", False):
        return "its gate/up weights are interleaved or it has a post-expert norm"
    n_experts, two_inter, hidden = gate_up.shape
    if two_inter % 2 or tuple(down.shape) != (n_experts, hidden, two_inter // 2):
        return f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not [E, 2I, H], [E, H, I]"
    if not callable(getattr(module, "act_fn", None)):
        return "it has no `act_fn`"
    return None


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers fused-experts module that :class:`MoeExpertsLora` can adapt."""
    return not isinstance(module, BaseTunerLayer) and fused_experts_problem(module) is None


class MoeExpertsLora(nn.Module, MoLoraLayer):
    """LoRA banks on every expert of a fused MoE experts module; the base router's routing is used unchanged.

    A :class:`~molora.adapters.MoLoraLayer` so that PEFT's adapter management treats it like the other molora
    layers, but with no router of its own (``num_experts``, ``top_k`` and ``router`` of the config do not apply:
    the base model's experts and gates are used).

    Args:
        base_layer (nn.Module): the experts module (see the module docstring for the layout).
        adapter_name (str): name of the first adapter.
        config (MoLoraConfig): its configuration (``r``, ``lora_alpha``, ``lora_dropout``, ``dynamic_rank``, ...).
        molora_key (str): the module's name in the model (keys ``layer_ranks`` of compacted adapters).
        router (nn.Module | None): the MoE block's router (its ``gate`` or ``router``), hooked for
            ``freq_source="probs"``; its output must be the logits or a tuple that starts with them.
    """

    adapter_layer_names = (
        "molora_gate_up_A",
        "molora_gate_up_B",
        "molora_down_A",
        "molora_down_B",
        "molora_rank_gate_up",
        "molora_rank_down",
    )
    other_param_names = ("r", "lora_alpha", "scaling", "molora_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        molora_key: str = "",
        router: nn.Module | None = None,
    ) -> None:
        nn.Module.__init__(self)
        problem = fused_experts_problem(base_layer)
        if problem is not None:
            raise TypeError(f"{type(base_layer).__name__} cannot be adapted as MoE experts: {problem}.")
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.molora_dropout = nn.ModuleDict({})
        for proj in _PROJECTIONS:
            setattr(self, f"molora_{proj}_A", nn.ModuleDict({}))  # adapter name -> ExpertBank
            setattr(self, f"molora_{proj}_B", nn.ModuleDict({}))
            setattr(self, f"molora_rank_{proj}", nn.ModuleDict({}))
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        n_experts, two_inter, hidden = base_layer.gate_up_proj.shape
        self.base_num_experts = n_experts
        self.in_features, self.out_features = hidden, hidden
        self.intermediate_size = two_inter // 2
        self._molora_runtime = None
        self._molora_key = molora_key
        self._molora_decode_plans: dict = {}  # MoLoraLayer's; no path of this layer makes one
        self._router_probs: torch.Tensor | None = None
        self._router_hook = router.register_forward_hook(self._capture_router_probs) if router is not None else None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _capture_router_probs(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(logits, torch.Tensor) and logits.shape[-1] == self.base_num_experts:
            self._router_probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Create (or re-create) the gate/up and down LoRA banks of ``adapter_name`` from ``config``."""
        dynamic_rank = config.dynamic_rank_params
        if dynamic_rank is not None and dynamic_rank.freq_source == "probs" and self._router_hook is None:
            raise ValueError(
                f"DR-LoRA on the MoE experts {self._molora_key!r} needs the base router's probabilities, but the "
                "MoE block has no `gate` or `router` module to read them from; set "
                "dynamic_rank['freq_source']='gates'."
            )
        weight = self.base_layer.gate_up_proj
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        n_experts = self.base_num_experts
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        self.molora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        widths = {
            "gate_up": (self.in_features, 2 * self.intermediate_size),
            "down": (self.intermediate_size, self.in_features),
        }
        for proj, (d_in, d_out) in widths.items():
            rank = config.r
            if dynamic_rank is not None and dynamic_rank.layer_ranks:
                rank = dynamic_rank.layer_ranks.get(f"{self._molora_key}.{proj}_proj", rank)
            weight_A, weight_B = initial_banks(n_experts, d_in, d_out, rank, config.init_lora_weights)
            getattr(self, f"molora_{proj}_A")[adapter_name] = ExpertBank(weight_A.to(weight.device, dtype))
            getattr(self, f"molora_{proj}_B")[adapter_name] = ExpertBank(weight_B.to(weight.device, dtype))
            states = getattr(self, f"molora_rank_{proj}")
            if dynamic_rank is not None:
                states[adapter_name] = DynamicRankState(n_experts, rank, dynamic_rank).to(weight.device)
            elif adapter_name in states:
                del states[adapter_name]
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(EXPERTS_MERGE_ERROR)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(EXPERTS_MERGE_ERROR)

    def _valid_tokens(self, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        runtime = self._molora_runtime
        mask = runtime.context.attention_mask if runtime is not None else None
        if mask is None or mask.numel() != n_tokens:
            return None
        return mask.reshape(-1).bool().to(device)

    def _observe(self, adapter_name: str, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, valid) -> None:
        for proj in _PROJECTIONS:
            states = getattr(self, f"molora_rank_{proj}")
            if adapter_name not in states:
                continue
            state = states[adapter_name]
            if state.params.freq_source == "probs" and self._router_probs is not None:
                weights = self._router_probs
            else:
                index = top_k_index.clamp(max=self.base_num_experts - 1)
                weights = torch.zeros(top_k_index.shape[0], self.base_num_experts, device=top_k_index.device)
                weights = weights.scatter_add(
                    1, index, top_k_weights.detach().float() * (top_k_index < self.base_num_experts)
                )
            state.observe_weights(weights, valid)

    def _adapter_weights(self, adapter_name: str) -> tuple:
        out = []
        for proj in _PROJECTIONS:
            weight_A = getattr(self, f"molora_{proj}_A")[adapter_name].weight
            weight_B = getattr(self, f"molora_{proj}_B")[adapter_name].weight
            states = getattr(self, f"molora_rank_{proj}")
            if adapter_name in states:
                weight_A, weight_B = states[adapter_name].masked_weights(weight_A, weight_B)
            out += [weight_A, weight_B]
        return (*out, self.scaling[adapter_name], self.molora_dropout[adapter_name])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The base experts' eager computation with each expert's LoRA deltas added to its two projections."""
        base = self.base_layer
        adapters = [a for a in self.active_adapters if a in self.molora_gate_up_A]
        if self.disable_adapters or not adapters:
            return base(hidden_states, top_k_index, top_k_weights)
        runtime = self._molora_runtime
        # (a recompute by activation checkpointing: the forward observed it; a generation in train mode)
        if self.training and not _in_backward() and not (runtime is not None and runtime.observes_nothing):
            valid = self._valid_tokens(hidden_states.shape[0], hidden_states.device)
            for adapter_name in adapters:
                self._observe(adapter_name, top_k_index, top_k_weights, valid)
        banks = [self._adapter_weights(a) for a in adapters]
        n_experts = self.base_num_experts
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # the same dispatch as transformers' eager experts (index n_experts = a dropped slot)
            expert_mask = F.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in expert_hit:
            e = expert[0]
            if e == n_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            x = hidden_states[token_idx]
            gate_up = F.linear(x, base.gate_up_proj[e])
            for a_gu, b_gu, _, _, scaling, dropout in banks:
                lora = (self._cast_input_dtype(dropout(x), a_gu.dtype) @ a_gu[e]) @ b_gu[e]
                gate_up = gate_up + (scaling * lora).to(gate_up.dtype)
            gate, up = gate_up.chunk(2, dim=-1)
            h = base.act_fn(gate) * up
            out = F.linear(h, base.down_proj[e])
            for _, _, a_d, b_d, scaling, dropout in banks:
                lora = (self._cast_input_dtype(dropout(h), a_d.dtype) @ a_d[e]) @ b_d[e]
                out = out + (scaling * lora).to(out.dtype)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def __repr__(self) -> str:
        return "molora." + super().__repr__()
