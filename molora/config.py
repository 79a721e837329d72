"""``MoLoraConfig``: the configuration of a mixture-of-LoRA-experts adapter, validated when it is built."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils.peft_types import TaskType

from ._peft_type import MOLORA_NAME, ensure_peft_type
from .adapters.dynamic_rank import build_dynamic_rank_params
from .kernels import KERNEL_CHOICES
from .routers.balancing import BALANCE_LOSS_TYPES
from .routers.base import build_router_params, get_router_class

LOSS_REDUCTIONS = ("mean", "sum", "concat")
ROUTER_INITS = ("kaiming", "normal")
BIAS_CHOICES = ("none", "all", "molora_only")


@dataclass
class MoLoraConfig(PeftConfig):
    """Configuration of a MoLoRA adapter: a bank of ``num_experts`` LoRA experts on each targeted projection.

    A drop-in replacement for ``peft.LoraConfig``: pass it to ``peft.get_peft_model`` after ``import molora``.
    Every adapted projection computes ``y = W0 x + sum_e g_e(x) * scaling * B_e A_e dropout(x)`` with the gates
    ``g(x)`` of its own router.

    Args:
        r (int): rank of each expert. Default: 8.
        lora_alpha (float): LoRA scaling numerator; the scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
            Default: 8, as ``peft.LoraConfig`` (the recipes in ``configs/`` use 16, twice the rank).
        lora_dropout (float): dropout on the adapter input, in [0, 1); one mask per token shared by all experts.
            Default: 0.0.
        use_rslora (bool): use rank-stabilised scaling ``lora_alpha / sqrt(r)``. Default: False.
        num_experts (int): experts ``E`` per adapted projection, >= 1. Default: 8.
        top_k (int): experts per token for top-k style routers, in [1, num_experts]. Default: 2.
        router (str): name of a registered router (``molora.ROUTER_REGISTRY``): ``"topk"``, ``"soft"``, ``"topp"``,
            ``"dynmole"``, ``"mor"``, ``"prompt"``, ``"topk_bias"``, ``"adamoe"``, ``"relu"``, ``"expert_choice"``;
            more from ``molora.register_router``. Default: ``"topk"``.
        router_kwargs (dict): the router's own hyper-parameters, validated against its ``Params`` (unknown keys are
            an error). Default: ``{}`` (the router's defaults).
        router_init (str): ``"kaiming"`` (uniform with bound ``1/sqrt(d_in)``, PyTorch's Linear default, as in
            LoRAMoE, MoLA, DynMoLE) or ``"normal"`` (``N(0, router_init_std^2)``, as in MixLoRA). Default: "kaiming".
        router_init_std (float): standard deviation for ``router_init="normal"``. Default: 0.02.
        target_modules (list[str] | str | None): module names (suffix match) or a regex (full match) to adapt.
            ``None`` uses molora's mapping for known architectures (attention and MLP projections). Default: None.
        exclude_modules (list[str] | str | None): modules not to adapt, same matching rules. Default: None.
        target_parameters (None): not supported (experts are routed from a module's input); must stay None.
            Default: None.
        layers_to_transform (list[int] | int | None): only adapt these layer indices. Default: None.
        layers_pattern (list[str] | str | None): name of the layer list, used with ``layers_to_transform``.
            Default: None.
        modules_to_save (list[str] | None): extra modules trained and saved in full (e.g. a classifier head).
            Default: None.
        bias (str): ``"none"``, ``"all"`` or ``"molora_only"``: which biases are trained (``"lora_only"``,
            ``LoraConfig``'s spelling, is read as ``"molora_only"``). Default: "none".
        init_lora_weights (bool | str): ``True`` starts every ``B_e`` at zero so that a fresh adapter leaves the
            model's outputs unchanged, with ``A_e`` kaiming-uniform as ``nn.Linear``; ``"gaussian"`` the same with
            ``A_e ~ N(0, 1/r)`` (as ``peft.LoraConfig``); ``False`` initialises ``B_e`` randomly too (for tests and
            debugging). Default: True.
        aux_loss_coef (float): coefficient of the load-balancing loss added to ``outputs.loss``; 0 disables it.
            Default: 0.01.
        z_loss_coef (float): coefficient of the router z-loss (ST-MoE recommends 1e-3); 0 disables it.
            Default: 0.0.
        balance_loss_type (str): normalisation of the balancing loss: ``"megatron"`` (1 at perfect balance for any
            k), ``"mixtral"`` (k at perfect balance, as HF Mixtral / MixLoRA), ``"switch"`` (argmax loads) or
            ``"soft"`` (mean gates, differentiable, the one to use with soft routing). Default: "megatron".
        loss_reduction (str): how the losses of the many routers combine: ``"mean"`` over routers (a coefficient
            means the same whatever the number of adapted layers), ``"sum"`` (MoLA, AdaMoE, Switch), or
            ``"concat"`` (one loss on all routers' tokens together, MoE-PEFT). Default: "mean".
        track_routing_stats (bool): accumulate per-layer routing statistics (expert load, router entropy, tokens)
            readable with ``model.get_routing_stats()``. Default: True.
        kernel (str): expert compute path: ``"auto"``, ``"dense"`` (one GEMM into all ``E*r`` rank columns),
            ``"grouped"`` (tokens grouped by expert), ``"naive"`` (per-expert loop, the reference) or ``"triton"``
            (SGMV kernels; CUDA). Default: "auto".
        rank_pattern (dict[str, int]): per-module expert rank overriding ``r``, as in ``LoraConfig``: keys are module
            names (suffix match) or regexes, e.g. ``{"down_proj": 16}``. Not with ``dynamic_rank``. Default: ``{}``.
        alpha_pattern (dict[str, float]): per-module ``lora_alpha``, keyed like ``rank_pattern``. Default: ``{}``.
        fan_in_fan_out (bool): accepted for ``LoraConfig`` compatibility (GPT-2 recipes set it): molora recognises
            transformers' ``Conv1D`` (whose weight is stored ``[in, out]``) by its type, whatever this says.
            Default: False.
        use_dora (bool): ``LoraConfig``'s DoRA switch; DoRA's magnitude vector is not defined for a mixture of
            experts, so only ``False`` is accepted. Default: False.
        dynamic_rank (dict | None): enable DR-LoRA (docs/dynamic_rank.md): every expert keeps capacity ``r`` but
            starts at a small active rank that grows during training where routing frequency and gradient
            sensitivity say it is needed, under a budget of ``target_rank`` per expert on average. Keys:
            ``target_rank``, ``init_rank``, ``growth_step``, ``experts_per_event``, ``growth_interval``,
            ``start_fraction``, ``end_fraction``, ``start_step``, ``end_step``, ``freq_source``, ``beta_freq``,
            ``beta1``, ``beta2``, ``reset_optimizer_state`` (see ``molora.adapters.dynamic_rank.DynamicRankParams``;
            unknown keys are an error). The scaling becomes ``lora_alpha / target_rank``. Growth is driven by
            ``molora.training.DynamicRankCallback`` or ``molora.dynamic_rank.maybe_grow``. ``None`` keeps every
            rank fixed at ``r``. Default: None.
    """

    r: int = field(default=8, metadata={"help": "Rank of each LoRA expert (>= 1)."})
    lora_alpha: float = field(
        default=8, metadata={"help": "LoRA scaling numerator: scaling = lora_alpha / r (or / sqrt(r) with rsLoRA)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    use_rslora: bool = field(default=False, metadata={"help": "Use rank-stabilised scaling lora_alpha / sqrt(r)."})
    num_experts: int = field(default=8, metadata={"help": "LoRA experts per adapted projection (>= 1)."})
    top_k: int = field(default=2, metadata={"help": "Experts per token for top-k style routers, 1..num_experts."})
    router: str = field(
        default="topk",
        metadata={"help": "Name of a registered router, e.g. 'topk', 'soft', 'dynmole' (see molora.ROUTER_REGISTRY)."},
    )
    router_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The router's own hyper-parameters; unknown keys are an error."}
    )
    router_init: str = field(
        default="kaiming",
        metadata={"help": "Router weight init: 'kaiming' (U(+-1/sqrt(d_in))) or 'normal' (N(0, router_init_std^2))."},
    )
    router_init_std: float = field(
        default=0.02, metadata={"help": "Std of the router init when router_init='normal'."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex (full match) to adapt; None uses molora's "
            "per-architecture mapping (attention and MLP projections)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Not supported by MoLoRA (experts need a module input); must stay None."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers'), used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full, e.g. a classification head."}
    )
    bias: str = field(default="none", metadata={"help": "Which biases to train: 'none', 'all' or 'molora_only'."})
    init_lora_weights: bool | str = field(
        default=True,
        metadata={
            "help": "True: B = 0 so a fresh adapter is a no-op; 'gaussian': the same with A ~ N(0, 1/r); False: "
            "random B (for tests and debugging)."
        },
    )
    aux_loss_coef: float = field(
        default=0.01, metadata={"help": "Coefficient of the load-balancing loss added to outputs.loss (0 = off)."}
    )
    z_loss_coef: float = field(
        default=0.0, metadata={"help": "Coefficient of the router z-loss (ST-MoE uses 1e-3; 0 = off)."}
    )
    balance_loss_type: str = field(
        default="megatron",
        metadata={"help": "Balance-loss normalisation: 'megatron' (1 at balance), 'mixtral' (k), 'switch', 'soft'."},
    )
    loss_reduction: str = field(
        default="mean",
        metadata={"help": "Reduction of the aux losses over routers: 'mean', 'sum' or 'concat' (MoE-PEFT)."},
    )
    track_routing_stats: bool = field(
        default=True, metadata={"help": "Accumulate per-layer routing statistics (load, entropy, tokens)."}
    )
    kernel: str = field(
        default="auto",
        metadata={"help": "Expert compute path: 'auto', 'dense', 'grouped', 'naive' or 'triton' (CUDA)."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-module expert rank overriding r ({module name or regex: rank}), as in LoraConfig."},
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per-module lora_alpha ({module name or regex: alpha}), as in LoraConfig."},
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Accepted for LoraConfig compatibility; Conv1D layers are recognised by their type."},
    )
    use_dora: bool = field(default=False, metadata={"help": "LoraConfig's DoRA switch; MoLoRA supports only False."})
    dynamic_rank: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "DR-LoRA growing expert ranks: a dict of DynamicRankParams keys (target_rank, init_rank, "
            "growth_step, schedule, EMA factors); r is the capacity r_max. None = fixed rank r."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        self._validate()
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def scaling(self) -> float:
        """The LoRA scaling applied to every expert's output (with DR-LoRA: of the target rank, fixed in training)."""
        rank = self.dynamic_rank_params.target_rank if self.dynamic_rank is not None else self.r
        return self.lora_alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def milora_module_mode(self) -> bool:
        """Whether the router is MiLoRA's per-decoder-layer router over the layer's modules
        (``router_kwargs={"milora_mode": "module"}``, docs/prompt_router.md)."""
        kwargs = self.router_kwargs if isinstance(self.router_kwargs, dict) else {}
        if kwargs.get("milora_mode", "bank") != "module":
            return False
        fields = getattr(get_router_class(self.router).Params, "__dataclass_fields__", {})
        return "milora_mode" in fields

    def for_module(self, key: str) -> MoLoraConfig:
        """This configuration with ``r`` and ``lora_alpha`` of module ``key`` (``rank_pattern`` / ``alpha_pattern``,
        matched as PEFT's ``LoraConfig`` matches them); ``self`` when neither pattern names the module."""
        from peft.utils.other import get_pattern_key

        r, alpha = self.r, self.lora_alpha
        if self.rank_pattern:
            r = self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), key), r)
        if self.alpha_pattern:
            alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), key), alpha)
        if (r, alpha) == (self.r, self.lora_alpha):
            return self
        module_config = copy.copy(self)
        module_config.r, module_config.lora_alpha = r, alpha
        return module_config

    @property
    def dynamic_rank_params(self):
        """The validated :class:`~molora.adapters.dynamic_rank.DynamicRankParams` (``None`` without DR-LoRA)."""
        if self.dynamic_rank is None:
            return None
        return build_dynamic_rank_params(self.dynamic_rank, self.r)

    def check_before_save(self, adapter_name: str | None = None) -> None:
        """Raise a ``ValueError`` naming the field (and ``adapter_name`` when given) if the config is invalid or
        cannot be written as JSON.

        ``PeftModel.save_pretrained`` writes the weights first and the config after: a field set after construction
        to a value JSON cannot hold would leave the folder with new weights and a truncated ``adapter_config.json``.
        The tuner calls this while collecting the adapter's weights, before anything is written."""
        try:
            self._check_before_save()
        except ValueError as err:
            if adapter_name is None:
                raise
            raise ValueError(f"Adapter {adapter_name!r}: {err}") from None

    def _check_before_save(self) -> None:
        self._validate()
        # (PEFT checks these when the config is built, not when it is edited; saved wrong, the folder would not load
        # or would load as another method)
        if getattr(self.peft_type, "value", self.peft_type) != MOLORA_NAME:
            raise ValueError(f"`peft_type`={self.peft_type!r} must be {MOLORA_NAME!r} in a MoLoraConfig.")
        if self.task_type is not None and getattr(self.task_type, "value", self.task_type) not in {
            t.value for t in TaskType
        }:
            raise ValueError(
                f"`task_type`={self.task_type!r} is not a PEFT task type; allowed values: "
                f"{sorted(t.value for t in TaskType)} or None."
            )
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            try:
                # as PEFT writes it (sort_keys: a dict whose keys mix types cannot be sorted)
                json.dumps(list(value) if isinstance(value, set) else value, sort_keys=True)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"`{spec.name}`={value!r} cannot be saved in adapter_config.json ({err}); set it to plain JSON "
                    "values (numbers, strings, lists, dicts). Nothing was written."
                ) from None

    def _validate_loss_fields(self) -> None:
        """Check the aux-loss fields. The model reads them at every forward (they may change during training, e.g.
        a coefficient schedule) and checks them again whenever they changed (``MoLoraRuntime.begin_forward``)."""
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
                # a numpy scalar (a schedule's float32 arithmetic): the same number as a Python float, which
                # adapter_config.json can hold
                value = float(value)
                setattr(self, name, value)
            _require_number(name, value)
            if value < 0:
                raise ValueError(f"`{name}`={value} must be >= 0 (0 disables the loss).")
        _require_choice("balance_loss_type", self.balance_loss_type, BALANCE_LOSS_TYPES)
        _require_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)

    def _validate(self) -> None:
        for name in ("r", "lora_alpha", "lora_dropout", "num_experts", "top_k", "router_init_std"):
            setattr(self, name, _python_number(getattr(self, name)))
        for name in ("rank_pattern", "alpha_pattern", "router_kwargs", "dynamic_rank"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, {key: _python_number(item) for key, item in value.items()})
        _require_int("r", self.r, minimum=1)
        _require_number("lora_alpha", self.lora_alpha, positive=True)
        _require_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout`={self.lora_dropout} must be in [0, 1).")
        _require_int("num_experts", self.num_experts, minimum=1)
        _require_int("top_k", self.top_k, minimum=1)
        if not isinstance(self.router_kwargs, dict):
            raise ValueError(f"`router_kwargs` must be a dict, got {type(self.router_kwargs).__name__}.")
        module_mode = self.milora_module_mode
        # in MiLoRA's module mode top_k counts a decoder layer's modules, checked when the adapter is injected
        params = build_router_params(self.router, self.router_kwargs, self.num_experts, self.top_k)
        limit = get_router_class(self.router).max_top_k(params, self.num_experts)
        if self.top_k > limit and not module_mode:
            among = "num_experts" if limit == self.num_experts else "the experts this router selects among"
            raise ValueError(f"`top_k`={self.top_k} must be <= {among}={limit}; lower `top_k` or add experts.")
        every_expert = self.router == "soft" or (self.router == "topk" and self.top_k >= self.num_experts > 1)
        if every_expert and self.balance_loss_type in ("megatron", "mixtral") and self.aux_loss_coef > 0:
            warnings.warn(
                f"router={self.router!r} selects every expert for every token, so the count-based "
                f"balance_loss_type={self.balance_loss_type!r} is a constant that gives the router no gradient; use "
                "balance_loss_type='soft' (the mean gates) or 'switch' (each token's top expert), or aux_loss_coef=0.",
                stacklevel=3,
            )
        if module_mode and self.dynamic_rank is not None:
            raise ValueError(
                "`dynamic_rank` (DR-LoRA) grows ranks inside an expert bank and is not available with "
                "router_kwargs['milora_mode']='module' (one LoRA module per projection); set dynamic_rank=None."
            )
        _require_choice("router_init", self.router_init, ROUTER_INITS)
        _require_number("router_init_std", self.router_init_std, positive=True)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                if not value.strip():
                    raise ValueError(f"`{name}` is an empty string; give module names, a regex, or None.")
            elif isinstance(value, (list, tuple, set)):
                if name == "target_modules" and len(value) == 0:
                    raise ValueError(
                        "`target_modules` is empty, so no module would be adapted; give module names such as "
                        "['q_proj', 'v_proj'], a regex, 'all-linear', or None for the architecture's defaults."
                    )
                bad = [v for v in value if not isinstance(v, str) or not v]
                if bad:
                    raise ValueError(f"`{name}` must contain non-empty strings, got {bad}.")
            else:
                raise ValueError(f"`{name}` must be a list of module names, a regex string or None, got {value!r}.")
        if self.target_parameters is not None:
            raise ValueError(
                f"`target_parameters`={self.target_parameters!r} is not supported by MoLoRA: experts are routed per "
                "token from a module's input, so they need `target_modules`."
            )
        pattern = self.layers_pattern
        if pattern is not None and not (
            (isinstance(pattern, str) and pattern)
            or (isinstance(pattern, (list, tuple)) and pattern and all(isinstance(p, str) and p for p in pattern))
        ):
            raise ValueError(
                f"`layers_pattern`={pattern!r} must be the name of the model's layer list (e.g. 'layers'), a "
                "non-empty list of such names, or None."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` only has an effect together with `layers_to_transform`; set both.")
        if isinstance(self.target_modules, str):
            # as peft.LoraConfig: PEFT matches a regex as given and would silently ignore the layer selection
            for name in ("layers_to_transform", "layers_pattern"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"`{name}` cannot be used when `target_modules` is a str (a regex, matched as given): "
                        "list the module names instead, or put the layer indices into the regex."
                    )
        if self.bias == "lora_only":  # peft.LoraConfig's name for the same choice (PEFT reads any "*_only")
            self.bias = "molora_only"
        _require_choice("bias", self.bias, BIAS_CHOICES)
        init = self.init_lora_weights
        if not (isinstance(init, bool) or (isinstance(init, str) and init == "gaussian")):
            raise ValueError(
                f"`init_lora_weights`={self.init_lora_weights!r} is not supported; allowed values: True, False, "
                "'gaussian' (LoRA's data-driven initialisations, such as 'pissa' or 'loftq', set one low-rank "
                "update, not a bank of experts)."
            )
        for name in ("use_rslora", "track_routing_stats", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}`={getattr(self, name)!r} must be True or False.")
        if self.modules_to_save is not None and (
            isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ValueError(
                f"`modules_to_save`={self.modules_to_save!r} must be a list of module names (e.g. ['lm_head']) or "
                "None."
            )
        layers = self.layers_to_transform
        if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool))
            or (
                isinstance(layers, (list, tuple))
                and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            )
        ):
            raise ValueError(f"`layers_to_transform`={layers!r} must be a layer index, a list of them, or None.")
        if isinstance(layers, (list, tuple)) and not layers:
            # PEFT reads an empty list as "no selection" and adapts every layer; adapters saved with it load as they
            # were trained, so it is not refused, but said
            warnings.warn(
                f"`layers_to_transform`={layers!r} selects no layer: PEFT reads it as no selection, so every layer is "
                "adapted. Give the indices of the layers to adapt, or None for every layer.",
                stacklevel=2,
            )
        self._validate_loss_fields()
        _require_choice("kernel", self.kernel, KERNEL_CHOICES)
        if self.dynamic_rank is not None:
            build_dynamic_rank_params(self.dynamic_rank, self.r)
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"`{name}` must be a dict {{module name or regex: value}}, got {value!r}.")
            for key, item in value.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"`{name}` keys must be non-empty module names or regexes, got {key!r}.")
                if name == "rank_pattern":
                    _require_int(f"rank_pattern[{key!r}]", item, minimum=1)
                else:
                    _require_number(f"alpha_pattern[{key!r}]", item, positive=True)
        if self.rank_pattern and self.dynamic_rank is not None:
            raise ValueError(
                "`rank_pattern` sets fixed per-module ranks and `dynamic_rank` (DR-LoRA) grows them; use one of them."
            )
        if self.use_dora is not False:
            raise ValueError(
                f"`use_dora`={self.use_dora!r}: DoRA is not supported by MoLoRA (its per-weight magnitude vector has "
                "no meaning for a routed mixture of experts); set use_dora=False, or use peft.LoraConfig for DoRA."
            )


def _explain_lora_options(init):
    """Wrap the dataclass ``__init__``: a ``peft.LoraConfig`` option that MoLoRA does not have is still a
    ``TypeError`` about an unexpected keyword (what PEFT's config loading filters on), but one that says so."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        own = {f.name for f in dataclasses.fields(type(self))}
        unknown = sorted(set(kwargs) - own)
        if unknown:
            from peft import LoraConfig

            lora_fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
            unsupported = []
            for name in unknown:
                if name not in lora_fields:
                    continue
                if kwargs[name] == _field_default(lora_fields[name]):
                    del kwargs[name]  # LoraConfig's default (a converted LoraConfig lists them all): nothing to do
                else:
                    unsupported.append(name)
            if unsupported:
                raise TypeError(
                    f"MoLoraConfig.__init__() got an unexpected keyword argument {unsupported[0]!r}: "
                    f"peft.LoraConfig option(s) {unsupported} are not supported by MoLoRA (only at LoraConfig's "
                    "default); remove them. The LoraConfig options MoLoraConfig takes: r, lora_alpha, lora_dropout, "
                    "use_rslora, target_modules, exclude_modules, layers_to_transform, layers_pattern, "
                    "modules_to_save, bias, init_lora_weights (True/False/'gaussian'), rank_pattern, alpha_pattern, "
                    "fan_in_fan_out, use_dora (False)."
                )
        init(self, *args, **kwargs)

    return __init__


MoLoraConfig.__init__ = _explain_lora_options(MoLoraConfig.__init__)


def _field_default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return dataclasses.MISSING


def _python_number(value: Any) -> Any:
    """A numpy (or other non-builtin) integer or real scalar as the Python ``int``/``float`` of the same value, which
    ``adapter_config.json`` can hold (a hyper-parameter search's ``np.int64(8)``); anything else unchanged."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}`={value!r} must be an integer >= {minimum}.")
    if value < minimum:
        raise ValueError(f"`{name}`={value} must be an integer >= {minimum}.")


def _require_number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}`={value!r} must be a finite number.")
    if positive and value <= 0:
        raise ValueError(f"`{name}`={value} must be > 0.")


def _require_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}`={value!r} is not supported; allowed values: {list(allowed)}.")
