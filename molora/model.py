"""``MoLoraModel``: the PEFT tuner that injects MoLoRA layers and owns the routing runtime."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import get_quantization_kwargs
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import milora
from .adapters.bank import BANK_ATTRS
from .adapters.dynamic_rank import RankStats, get_rank_stats
from .adapters.layer import MERGE_ERROR, Linear, MoLoraLayer
from .adapters.moe_experts import MoeExpertsLora, fused_experts_problem, is_fused_experts
from .config import MoLoraConfig
from .routers.base import Router, get_router_class
from .routers.prompt import is_prompt_router, keep_prefill_decisions, restore_decisions
from .runtime import LayerRoutingStats, MoLoraRuntime, _weak_ref, call_input

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Default ``target_modules`` per ``model_type``: the attention and MLP projections.
MOLORA_TARGET_MODULES: dict[str, list[str]] = {
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
            "cohere",
            "deepseek_v2",
        )
    },
    # MoE models: the attention projections and the fused experts (a LoRA per expert, routed by the base router)
    **{name: ["q_proj", "k_proj", "v_proj", "o_proj", "experts"] for name in ("mixtral", "qwen3_moe", "olmoe")},
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "mt5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    # the attention outputs by their parent's name: BartForSequenceClassification's head has an `out_proj` too
    **{
        name: ["q_proj", "k_proj", "v_proj", "self_attn.out_proj", "encoder_attn.out_proj", "fc1", "fc2"]
        for name in ("bart", "mbart")
    },
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
}


#: the hub tag of a model with MoLoRA adapters (see _add_model_tag)
MODEL_TAG = "molora"


def _add_model_tag(model: nn.Module) -> bool:
    """Tag the wrapped transformers model ``molora``, as PEFT tags a LoRA adapter ``lora`` and TRL's trainers tag the
    models they train: PEFT's model card (``save_pretrained``, ``push_to_hub``) lists the model's tags, which is how
    an adapter is found on the hub. Returns whether the tag was added (``unload`` takes it away again)."""
    if not callable(getattr(model, "add_model_tags", None)) or MODEL_TAG in (getattr(model, "model_tags", None) or []):
        return False
    model.add_model_tags([MODEL_TAG])
    return True


#: per model class: the names of its ``forward``'s positional parameters (see _named_arguments)
_POSITIONAL_NAMES: dict[type, tuple[str, ...]] = {}


def _named_arguments(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A model call's arguments after the first by name: ``model(ids, mask)`` passes its ``attention_mask`` (and
    ``position_ids``, ``past_key_values``, ``labels``, ...) by position, which the routing context reads by name. The
    first stays positional (the input, whatever its name: see ``call_input``)."""
    if len(args) <= 1:
        return args, kwargs
    cls = type(module)
    names = _POSITIONAL_NAMES.get(cls) if "forward" not in module.__dict__ else None
    if names is None:
        try:
            parameters = inspect.signature(module.forward).parameters.values()
        except (TypeError, ValueError):  # a forward without a signature: read by keyword only, as before
            return args, kwargs
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = tuple(p.name for p in parameters if p.kind in kinds)
        if "forward" not in module.__dict__:
            _POSITIONAL_NAMES[cls] = names
    named = dict(zip(names[1:], args[1:]))
    return args[:1], {**named, **kwargs}


def _begin_forward_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    runtime = module._molora_runtime
    if runtime.unchecked_adapters:
        _complete_adapter_copies(module, runtime)
    runtime.begin_forward(*_named_arguments(module, args, kwargs))
    context = runtime.context
    if context.is_decode and context.cache_ref is not None and runtime.prompt_routers:
        # (here, outside any compiled graph, which reads the routers' current decisions)
        restore_decisions(context, runtime.prompt_routers)


def _adapter_tensors(model: nn.Module, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The parameters and persistent buffers of one adapter in ``model`` (in the ``ModuleDict`` s keyed by adapter
    name: banks, routers, rank states, MiLoRA's layer routers, ``modules_to_save`` copies), keyed by their name with
    the adapter's name left out."""
    params, buffers = {}, {}
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.ModuleDict) or adapter_name not in container:
            continue
        for name, module in container[adapter_name].named_modules(prefix=prefix):
            for tensor_name, param in module._parameters.items():
                if param is not None:
                    params[f"{name}.{tensor_name}"] = param
            for tensor_name, buffer in module._buffers.items():
                if buffer is not None and tensor_name not in module._non_persistent_buffers_set:
                    buffers[f"{name}.{tensor_name}"] = buffer
    return params, buffers


@torch.no_grad()
@torch.compiler.disable
def _complete_adapter_copies(model: nn.Module, runtime: MoLoraRuntime) -> None:
    """Make an adapter added as a copy of another one a full copy: also its persistent buffers.

    TRL's preference trainers (``DPOTrainer``, ``KTOTrainer``, ``GRPOTrainer``, ``RLOOTrainer``) build their reference
    adapter from a trained one with ``add_adapter("ref", config)`` and copy ``named_parameters()`` into it. MoLoRA
    keeps state that changes the forward in buffers (``topk_bias``'s selection bias, DR-LoRA's rank masks), which
    that copy leaves at their fresh values: the reference then routes and adds differently from the adapter it copies.
    At the first forward after an adapter is added, if its parameters are bit-identical to another adapter's (never
    the case for a fresh adapter, whose ``A`` and router are random), that adapter's persistent buffers are copied too.
    """
    added, runtime.unchecked_adapters = runtime.unchecked_adapters, set()
    for name in sorted(added):
        if name not in runtime.peft_config:
            continue  # deleted since
        params, buffers = _adapter_tensors(model, name)
        if not any(p.numel() for p in params.values()):
            continue  # none, or partitioned away (DeepSpeed ZeRO-3): nothing to compare
        for source in runtime.peft_config:
            if source == name or source in added:
                continue
            source_params, source_buffers = _adapter_tensors(model, source)
            if source_params.keys() != params.keys() or not all(
                p.shape == params[k].shape and torch.equal(p, params[k]) for k, p in source_params.items()
            ):
                continue
            for key, buffer in buffers.items():
                value = source_buffers.get(key)
                if value is not None and value.shape == buffer.shape:
                    buffer.copy_(value)
            break


def _end_forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    runtime = module._molora_runtime
    context = runtime.context
    if not context.is_decode and runtime.prompt_deciders:
        if not context.kv_cache:
            # a cache the model created itself (`use_cache` without `past_key_values`, as a hand-written decoding
            # loop's prefill): the decode steps that continue it read their decisions from it too
            cache = output.get("cache", output.get("past_key_values")) if isinstance(output, Mapping) else None
            context = dataclasses.replace(context, cache_ref=_weak_ref(cache)) if cache is not None else None
        if context is not None:
            # a prefill's decisions go with the KV cache it filled (compiled code could not attach them)
            keep_prefill_decisions(context, runtime.prompt_deciders, runtime.prompt_routers)
    return runtime.end_forward(output)


def _forward_done_hook(module: nn.Module, args: tuple, output: Any) -> None:
    module._molora_runtime.forward_done()


def _begin_stack_hook(module: nn.Module, args: tuple, kwargs: dict, stack: str) -> None:
    if stack == "backbone" and torch.compiler.is_compiling():
        # traced inside the compiled model's call, where a backbone changes nothing: no graph break there
        return
    module._molora_began = module._molora_runtime.begin_stack(stack, *_named_arguments(module, args, kwargs))


def _end_stack_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if torch.compiler.is_compiling() and "_molora_began" not in module.__dict__:
        return output
    if module.__dict__.pop("_molora_began", False):
        return module._molora_runtime.end_forward(output)
    return output


def _stack_done_hook(module: nn.Module, args: tuple, output: Any) -> None:
    # a stack that began a forward raised (else _end_stack_hook took the flag): a later call alone must begin again
    if torch.compiler.is_compiling() and "_molora_began" not in module.__dict__:
        return
    if module.__dict__.pop("_molora_began", False):
        module._molora_runtime.forward_done()


def _stateful_router(name: str) -> bool:
    """Whether the registered router ``name`` updates state after optimizer steps (overrides ``on_optimizer_step`` or
    ``on_optimizer_step_group``): ``topk_bias``, ``relu``, a user's router."""
    cls = get_router_class(name)
    return (
        cls.on_optimizer_step is not Router.on_optimizer_step
        or cls.on_optimizer_step_group.__func__ is not Router.on_optimizer_step_group.__func__
    )


def _supported_base(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or (
        (backend := resolve_quantization_backend(module)) is not None and backend.layer_type == "linear"
    )


def _loss_shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s own loss shifts the labels (a decoder-only causal LM), as ``transformers.Trainer`` decides
    it when it counts ``num_items_in_batch``."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # older transformers: count as a causal LM
        return True
    config = getattr(model, "config", None)
    causal = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    return causal and not getattr(config, "is_encoder_decoder", False)


def _prompt_length(args: tuple, kwargs: dict) -> int | None:
    """Positions of a ``generate`` call's prompt (``input_ids`` or ``inputs_embeds``; ``None`` when unknown)."""
    prompt = call_input(args, kwargs)
    return prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else None


def _called_from_generate() -> bool:
    """Whether :meth:`MoLoraModel._enable_peft_forward_hooks` was entered by a ``generate`` method (PEFT's), not by a
    ``forward``: the first caller outside ``contextlib`` and the chain of ``_enable_peft_forward_hooks`` contexts."""
    frame = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename == contextlib.__file__ or frame.f_code.co_name == "_enable_peft_forward_hooks"
    ):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_name == "generate"


def _wrapper_adapter_names(module, args, kwargs, names: list[list[str]]):
    """Pre-forward hook of a ``modules_to_save`` wrapper in a mixed-adapter call: the per-sample names whose length
    is the wrapper's batch (beam search repeats the samples in the decoder, not in an encoder)."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0:
        return None
    batch = args[0].shape[0]
    chosen = next((n for n in names if len(n) == batch), names[-1])  # else the wrapper reports the mismatch
    return args, {**kwargs, "adapter_names": chosen}


class MoLoraModel(BaseTuner):
    """Injects banks of LoRA experts with routers into a transformers (or any torch) model.

    Created by ``peft.get_peft_model(model, MoLoraConfig(...))``; not meant to be built directly. Besides PEFT's
    usual tuner methods it offers :meth:`molora_aux_loss`, :meth:`molora_aux_losses`, :meth:`get_routing_stats`,
    :meth:`reset_routing_stats` and :meth:`molora_on_optimizer_step`, which a ``PeftModel`` forwards to it.

    Example:

        ```py
        >>> import molora
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, molora.MoLoraConfig(num_experts=4, top_k=2, task_type="CAUSAL_LM"))
        >>> out = model(**batch)                     # out.loss includes the routers' auxiliary losses
        >>> model.get_routing_stats()                # per-layer expert load, router entropy, tokens
        ```
    """

    prefix: str = "molora_"
    tuner_layer_cls = MoLoraLayer
    target_module_mapping = MOLORA_TARGET_MODULES

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        # the runtime must exist before injection: layers receive a reference when they are created
        self._molora_runtime_obj: MoLoraRuntime | None = None
        self._molora_hooks: list = []
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._install_hooks()
        self._molora_added_tag = _add_model_tag(self.model)

    # -- runtime and hooks ------------------------------------------------------------------------------------------

    @property
    def molora_runtime(self) -> MoLoraRuntime:
        """The routing context / aux-loss collector / statistics object shared by this model's layers."""
        if self._molora_runtime_obj is None:
            existing = self.model.__dict__.get("_molora_runtime")
            if isinstance(existing, MoLoraRuntime) and existing.peft_config is self.peft_config:
                # a second tuner on a model that has MoLoRA adapters (`get_peft_model` run again on the same base,
                # `inject_adapter_in_model` for another adapter: PEFT then shares the model's `peft_config`): its
                # layers already record into this runtime, and the model's hooks drive it
                self._molora_runtime_obj = existing
            else:
                self._molora_runtime_obj = MoLoraRuntime(self.peft_config)
                self._molora_runtime_obj.loss_shifts_labels = _loss_shifts_labels(self.model)
        return self._molora_runtime_obj

    def _install_hooks(self) -> None:
        if self._molora_hooks:
            return
        installed = self.model.__dict__.get("_molora_hook_handles")
        if installed and self.model.__dict__.get("_molora_runtime") is self.molora_runtime:
            # installed by an earlier tuner of this model (see molora_runtime): a second set would begin and end
            # every forward twice, and the aux losses and statistics would miss the runtime the layers record into
            self._molora_hooks = installed
            return
        # the hooks find the runtime through the module (not a closure), so that copy.deepcopy of the model gives
        # a copy whose hooks drive the copy's runtime, the one its layers record into
        self.model._molora_runtime = self.molora_runtime
        self._molora_hooks = [
            self.model.register_forward_pre_hook(_begin_forward_hook, with_kwargs=True),
            self.model.register_forward_hook(_end_forward_hook, with_kwargs=True),
            # also when the forward raised: an encoder that `generate` calls next must begin its own forward
            self.model.register_forward_hook(_forward_done_hook, always_call=True),
        ]
        for stack, module in self._stacks():
            # an encoder-decoder model's stacks: their tokens differ (and `generate` runs the encoder on its own); a
            # decoder-only model's backbone may be called without its head: see MoLoraRuntime.begin_stack
            module._molora_runtime = self.molora_runtime
            hook = functools.partial(_begin_stack_hook, stack=stack)
            self._molora_hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            self._molora_hooks.append(module.register_forward_hook(_end_stack_hook, with_kwargs=True))
            self._molora_hooks.append(module.register_forward_hook(_stack_done_hook, always_call=True))
        self.model._molora_hook_handles = self._molora_hooks

    def _stacks(self) -> list[tuple[str, nn.Module]]:
        """``[("encoder", module), ("decoder", module)]`` of an encoder-decoder model (T5, BART, ...); for another
        transformers model with a head, ``[("backbone", module)]`` (its ``base_model``: ``LlamaForCausalLM.model``,
        ``GPT2LMHeadModel.transformer``), which TRL's distillation trainers call without the head; else ``[]``."""
        if not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            backbone = getattr(self.model, "base_model", None)
            if isinstance(backbone, nn.Module) and backbone is not self.model:
                return [("backbone", backbone)]
            return []
        stacks = []
        for stack in ("encoder", "decoder"):
            getter = getattr(self.model, f"get_{stack}", None)
            module = getter() if callable(getter) else None
            if isinstance(module, nn.Module) and module is not self.model:
                stacks.append((stack, module))
        return stacks

    def _remove_hooks(self) -> None:
        for handle in self._molora_hooks:
            handle.remove()
        self._molora_hooks.clear()  # (the list an earlier tuner of this model shares, see _install_hooks)
        self.model.__dict__.pop("_molora_hook_handles", None)
        self.model.__dict__.pop("_molora_runtime", None)
        for _, module in self._stacks():
            module.__dict__.pop("_molora_runtime", None)
        self._remove_layer_hooks()

    def _remove_layer_hooks(self) -> None:
        """Undo the module-mode hooks on the decoder layers (those of every tuner of this model: the lists are
        shared, see _add_layer_routers)."""
        hooks, layers = self.model.__dict__.pop("_molora_milora_hooks", ([], []))
        milora.remove_layer_hooks(layers, hooks)

    def _milora_hook_lists(self) -> tuple[list, list[nn.Module]]:
        """MiLoRA module mode's hooks on the decoder layers and those layers (molora.adapters.milora). They live with
        the model, not the tuner: a second tuner of it (see molora_runtime) finds the layers hooked, and whichever
        tuner unloads must remove every hook."""
        return self.model.__dict__.setdefault("_molora_milora_hooks", ([], []))

    # -- MiLoRA module mode: one router per decoder layer -----------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if len(self.peft_config) > 1:
            # a copy of another adapter, as TRL's reference adapter, gets that adapter's buffers too (see
            # _complete_adapter_copies): checked at the next forward, once the caller has copied the parameters
            self.molora_runtime.unchecked_adapters.add(adapter_name)
        config = self.peft_config[adapter_name]
        if isinstance(config, MoLoraConfig) and config.milora_module_mode:
            self._add_layer_routers(adapter_name, config)

    def _add_layer_routers(self, adapter_name: str, config: MoLoraConfig) -> None:
        """Create the decoder-layer routers of a module-mode adapter, hook the decoder layers, and set the routers'
        trainability like the adapter's layers.

        The routers live in the wrapped model (``model.molora_milora[adapter_name][layer]``), so that they move, copy
        and train with it, also when ``peft.inject_adapter_in_model`` returns the model without this tuner; PEFT's
        save and load find them through :meth:`_get_adapter_state_dict` and :meth:`_remap_adapter_state_dict_for_load`.
        """
        routers, layers = milora.build_layer_routers(self.model, adapter_name, config, MoLoraLayer)
        container = self.model._modules.get(milora.CONTAINER)
        if container is None:
            container = nn.ModuleDict()
            self.model.add_module(milora.CONTAINER, container)
        container[adapter_name] = nn.ModuleDict(routers)
        container[adapter_name].requires_grad_(adapter_name in self.active_adapters and not config.inference_mode)
        hooks, hooked = self._milora_hook_lists()
        hooks += milora.install_layer_hooks(layers, self.molora_runtime)
        hooked += [layer for layer in layers.values() if all(layer is not m for m in hooked)]

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        if isinstance(config, MoLoraConfig):
            # save_pretrained collects the weights before it writes anything, and writes the config last; it saves
            # the selected adapters one after the other, so every MoLoRA adapter of the model is checked before the
            # first is written (a bad second one left the folder with the first one's new weights)
            for name, other in getattr(model, "peft_config", {adapter_name: config}).items():
                if isinstance(other, MoLoraConfig):
                    other.check_before_save(name)
                    if other.milora_module_mode:
                        try:
                            milora.check_layer_top_k(model, name, other.top_k)
                        except ValueError as err:
                            raise ValueError(f"Adapter {name!r}: {err} Nothing was written.") from None
        to_return = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        # MiLoRA module mode: the decoder-layer routers (`molora_milora.<adapter>.<layer>.*`) are not on a tuner layer
        marker = f"{milora.CONTAINER}.{adapter_name}."
        to_return.update({k: v for k, v in state_dict.items() if k.startswith(marker) or f".{marker}" in k})
        return to_return

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # the decoder-layer routers are saved as `...molora_milora.<layer>.weight`: their adapter name comes before
        # the layer key (`molora_milora.<adapter>.<layer>.weight`), not second to last as in PEFT's default mapping
        marker = f"{milora.CONTAINER}.{adapter_name}."
        if key.startswith(marker) or f".{marker}" in key:
            return key.replace(marker, f"{milora.CONTAINER}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # adapters saved while the banks were bare parameters name them `...molora_A`; now `...molora_A.weight`
        state_dict = {(f"{k}.weight" if k.rpartition(".")[2] in BANK_ATTRS else k): v for k, v in state_dict.items()}
        remapped = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        # a loaded adapter's buffers come from its checkpoint: it is no copy of another adapter whose parameters it
        # may share (see _complete_adapter_copies), and must keep them
        for module in model.modules():
            runtime = module.__dict__.get("_molora_runtime")
            if runtime is not None:
                runtime.unchecked_adapters.discard(adapter_name)
                break
        # the checkpoint's `...molora_milora.<layer>.*` back to the model's `...molora_milora.<adapter>.<layer>.*`
        marker = f"{milora.CONTAINER}."
        return {
            (k.replace(marker, f"{marker}{adapter_name}.", 1) if k.startswith(marker) or f".{marker}" in k else k): v
            for k, v in remapped.items()
        }

    def _layer_routers(self) -> Iterator[tuple[str, nn.Module]]:
        """``(adapter name, router)`` for every decoder-layer router of MiLoRA's module mode."""
        for name, routers in self.model._modules.get(milora.CONTAINER, {}).items():
            for router in routers.values():
                yield name, router

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, router in self._layer_routers():
            router.requires_grad_(name in names and not inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name, router in self._layer_routers():
            if name in names:
                router.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.molora_runtime.forget_adapter(adapter_name)
        routers = self.model._modules.get(milora.CONTAINER)
        if routers is not None and adapter_name in routers:
            del routers[adapter_name]
            if not len(routers):
                # the last module-mode adapter is gone: nothing reads the decoder layers' inputs any more
                del self.model._modules[milora.CONTAINER]
                self._remove_layer_hooks()

    # -- BaseTuner contract -----------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: MoLoraConfig, model_config: dict) -> MoLoraConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            targets = self.target_module_mapping.get(model_type)
            if targets is None:
                # an architecture molora has no mapping for: PEFT LoRA's defaults for it (attention projections)
                from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

                targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
            if targets is None:
                raise ValueError(
                    f"MoLoraConfig.target_modules is None and molora has no default targets for model_type="
                    f"{model_type!r} (nor has PEFT LoRA); set target_modules (e.g. ['q_proj', 'v_proj'] or "
                    f"'all-linear'). Known model types: {sorted(self.target_module_mapping)}."
                )
            peft_config.target_modules = set(targets)
        return peft_config

    def _check_prompt_target(self, config: MoLoraConfig, base: nn.Module, key: str) -> None:
        """The prompt router pools the prompt's positions; the output projection sees only the positions whose logits
        are kept (``generate``'s prefill keeps the last one), so it would decide from one token there and from the
        whole prompt in training."""
        if not is_prompt_router(config.router) or (config.router_kwargs or {}).get("milora_mode") == "module":
            return  # (module mode names its own requirement: a projection inside a decoder layer)
        getter = getattr(self.model, "get_output_embeddings", None)
        try:
            output = getter() if callable(getter) else None
        except (AttributeError, NotImplementedError):
            output = None
        if output is not None and base is output:
            raise ValueError(
                f"router='prompt' cannot adapt the output projection {key!r}: it sees only the positions whose logits "
                "are kept (generate's prefill keeps the last one), so it would route from one token when generating "
                "and from the whole prompt in training. Leave it out of `target_modules` (or put it in "
                "`modules_to_save`), or use a token-level router."
            )

    def _check_new_adapter_config(self, config: PeftConfig) -> None:
        """PEFT's checks, then every field again: a config edited after it was built (a sweep that sets ``r``, a
        loaded config changed by hand) is not re-run through ``__post_init__``, and a bad value would otherwise fail
        deep in the layers (``r=0``: a division by zero) or be used silently (``aux_loss_coef=-1``)."""
        super()._check_new_adapter_config(config)
        if isinstance(config, MoLoraConfig):
            config._validate()

    def _create_and_replace(
        self,
        peft_config: MoLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current key shouldn't be `None`; this should not happen, please report it.")
        if adapter_name == milora.CONTAINER:
            # the saved MiLoRA routers are found by this name in the keys; as an adapter name it would not load back
            raise ValueError(
                f"Adapter name {adapter_name!r} is reserved by molora (it holds MiLoRA's decoder-layer routers); "
                "choose another name."
            )
        peft_config = peft_config.for_module(current_key)  # rank_pattern / alpha_pattern
        if isinstance(target, MoLoraLayer):
            target.update_layer(adapter_name, peft_config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        self._check_prompt_target(peft_config, base, current_key)
        if is_fused_experts(base):
            # the experts of an MoE base model: a LoRA per base expert, routed by the base router (DR-LoRA setting)
            routers = [getattr(parent, name, None) for name in ("gate", "router")]
            router = next((r for r in routers if isinstance(r, nn.Module) and r is not base), None)
            new_module = MoeExpertsLora(target, adapter_name, peft_config, molora_key=current_key, router=router)
        elif not _supported_base(base):
            experts_note = ""
            if hasattr(base, "gate_up_proj"):
                experts_note = f" It looks like MoE experts, but {fused_experts_problem(base)}."
            raise ValueError(
                f"Target module {current_key!r} of type {type(base).__name__} is not supported by MoLoRA; supported "
                "are torch.nn.Linear, transformers' Conv1D, quantized linear layers (bitsandbytes 4/8-bit, ...) and "
                f"fused MoE experts (Mixtral, OLMoE, Qwen-MoE layout).{experts_note} Adjust `target_modules`."
            )
        else:
            self._check_fan_in_fan_out(adapter_name, peft_config, base)
            new_module = Linear(
                target, adapter_name, peft_config, molora_key=current_key, **get_quantization_kwargs(self.model)
            )
        new_module._molora_runtime = self.molora_runtime
        new_module._molora_key = current_key
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_fan_in_fan_out(self, adapter_name: str, config: MoLoraConfig, base: nn.Module) -> None:
        """Correct ``fan_in_fan_out`` to the base layer's layout, with PEFT LoRA's warning: the layer reads the layout
        from the base's type, so a wrong value changes nothing but what ``adapter_config.json`` says."""
        conv1d = isinstance(base, Conv1D)
        if config.fan_in_fan_out == conv1d:
            return
        warnings.warn(
            f"fan_in_fan_out is set to {not conv1d} but the target module is "
            f"`{'Conv1D' if conv1d else 'torch.nn.Linear'}`. Setting fan_in_fan_out to {conv1d}.",
            stacklevel=2,
        )
        config.fan_in_fan_out = conv1d
        self.peft_config[adapter_name].fan_in_fan_out = conv1d

    def _check_merge_allowed(self):
        raise ValueError(MERGE_ERROR)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(MERGE_ERROR)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported (PEFT's LoRA method): raises a ``ValueError`` saying why and what to use instead."""
        raise ValueError(
            "`add_weighted_adapter` is not supported for MoLoRA adapters: it builds one LoRA from weighted sums of "
            "the adapters' A/B matrices, but a MoLoRA adapter is a bank of experts mixed per token by its own router, "
            "so no weighted sum of banks reproduces a mix of adapters. To serve several adapters at once, pass "
            "`adapter_names=` (one per sample) to `forward`/`generate`; to combine them, train a new adapter."
        )

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            raise ValueError(MERGE_ERROR)
        # PEFT's generic replacement copies `.weight` from the base layer, which fused experts do not have: put the
        # experts modules back here, and drop the router hooks they installed
        experts = [(n, m) for n, m in self.model.named_modules() if isinstance(m, MoeExpertsLora)]
        for name, module in experts:
            if module._router_hook is not None:
                module._router_hook.remove()
            parent_name, _, child_name = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child_name, module.get_base_layer())
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._remove_hooks()
        model._modules.pop(milora.CONTAINER, None)  # MiLoRA module mode's decoder-layer routers
        tags = getattr(model, "model_tags", None)
        if getattr(self, "_molora_added_tag", False) and isinstance(tags, list) and MODEL_TAG in tags:
            tags.remove(MODEL_TAG)  # the base model, as it was
        return model

    # -- mixed-adapter batches --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Publish per-sample ``adapter_names`` to the layers for one ``forward`` or ``generate`` call, and tell the
        runtime when the call is a ``generate``.

        ``PeftModel.forward`` and ``PeftModel.generate`` enter this context (as they do for LoRA) and then drop
        ``adapter_names`` from the kwargs. Each adapted layer computes the experts of every adapter named in the batch
        in one grouped pass (``MoLoraLayer._mixed_batch_forward``); ``"__base__"`` rows get no adapter. As with LoRA
        this is for inference: in training mode it raises. The generic ``PeftModel.generate`` (no ``task_type``) calls
        the base model's ``generate`` directly, past :meth:`generate`: the caller's name tells it apart here.
        """
        with contextlib.ExitStack() as stack:
            generating = _called_from_generate()
            if generating:
                stack.enter_context(self._generation(_prompt_length(args, kwargs)))
            stack.enter_context(self._mixed_adapter_names(*args, generating=generating, **kwargs))
            yield

    def _generate_expansion(self, kwargs: dict) -> int:
        """How many rows ``generate`` makes of each sample: ``max(num_beams, num_return_sequences)``, each taken from
        the call's keyword arguments, else from its ``generation_config`` (where set), else from the model's (a saved
        T5's ``generation_config.json`` may set ``num_beams``), as transformers resolves them."""
        sources = [kwargs, kwargs.get("generation_config"), getattr(self.model, "generation_config", None)]

        def setting(name: str) -> int:
            values = (src.get(name) if isinstance(src, dict) else getattr(src, name, None) for src in sources)
            value = next((v for v in values if v is not None), None)
            return value if isinstance(value, int) and value > 1 else 1

        return max(setting("num_beams"), setting("num_return_sequences"))

    @contextlib.contextmanager
    def _mixed_adapter_names(self, *args: Any, generating: bool = False, **kwargs: Any) -> Iterator[None]:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode: mixed-adapter batches are for "
                "inference (call `model.eval()`); the routers' auxiliary losses would mix adapters."
            )
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"`adapter_names` must be a list of adapter names, one per sample; got {adapter_names!r}.")
        known = set()
        for name, module in self.model.named_modules():
            if isinstance(module, MoLoraLayer) and not hasattr(module, "molora_A"):
                raise ValueError(
                    f"`adapter_names` (a mixed-adapter batch) is not supported when a model's MoE experts are adapted "
                    f"({name!r}, routed by the base model's router): run each adapter's samples in their own batch "
                    "(as PEFT LoRA requires for experts too)."
                )
            if isinstance(module, MoLoraLayer):
                known |= set(module.molora_A.keys())
        unknown = sorted({n for n in adapter_names if n != "__base__"} - known)
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; known: {sorted(known)} "
                "and '__base__' (no adapter)."
            )
        names = [list(adapter_names)]
        expansion = self._generate_expansion(kwargs) if generating else 1
        if expansion > 1:
            # generate repeats every sample (beams, returned sequences); an encoder still sees the original batch
            names.insert(0, [n for n in adapter_names for _ in range(expansion)])
        runtime = self.molora_runtime
        runtime.batch_adapter_names = names
        # the adapters' own copies of `modules_to_save` (lm_head, a classifier's `score`) take per-sample names too,
        # through PEFT's wrappers, as for LoRA
        handles = [
            module.register_forward_pre_hook(functools.partial(_wrapper_adapter_names, names=names), with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, AuxiliaryTrainingWrapper)
        ]
        try:
            yield
        finally:
            runtime.batch_adapter_names = None
            for handle in handles:
                handle.remove()

    # -- MoLoRA API -------------------------------------------------------------------------------------------------

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's ``generate`` (what ``PeftModel.generate`` calls), telling the runtime the prompt's
        length: assisted and prompt-lookup decoding feed candidate tokens with the prompt in their first forward, and
        routers that route from the prompt must not pool those (``MoLoraRuntime.generating``)."""
        with self._generation(_prompt_length(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _generation(self, prompt_length: int | None) -> Iterator[None]:
        """One ``generate`` call: entered by :meth:`generate` and, for a ``PeftModel`` without ``task_type`` (whose
        ``generate`` calls the transformers model's directly), by :meth:`_enable_peft_forward_hooks`."""
        try:
            with self.molora_runtime.generating(prompt_length):
                yield
        finally:
            # the layers' decode plans serve the steps of this generation's KV cache only (a copy of each layer's
            # bank and router weight); the next call with a cache builds them again
            for module in self.model.modules():
                if isinstance(module, MoLoraLayer):
                    module._drop_decode_plans()

    def molora_aux_loss(self, adapter_name: str | None = None) -> torch.Tensor | None:
        """The weighted auxiliary loss ``sum(coef * loss)`` of the last forward.

        ``0`` (a 0-d tensor) when that forward computed aux losses but every coefficient is 0; ``None`` when it
        computed none (an inference forward without labels, a cached decode step, no forward yet).

        This is what was added to ``outputs.loss`` (weighted by the micro-batch's share of ``num_items_in_batch``
        when a trainer passed that, see the README). Aux losses are computed when autograd is on or labels are
        passed, and never in cached decode steps. The routers receive the aux-loss gradient in every backward pass
        through the model's outputs, however the loss is computed: through ``outputs.loss``, through this tensor
        when a custom loop adds it to its own loss, and otherwise from the layers themselves (for trainers that
        compute their own loss, like TRL's ``SFTTrainer``). It is never counted twice.
        """
        self._check_adapter_name(adapter_name)
        return self.molora_runtime.user_aux_loss(adapter_name)

    def molora_aux_losses(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The unweighted auxiliary losses of the last forward reduced over routers, e.g. ``{"balance", "z"}``."""
        self._check_adapter_name(adapter_name)
        return self.molora_runtime.aux_losses(adapter_name)

    def get_routing_stats(self, adapter_name: str | None = None) -> dict[str, LayerRoutingStats]:
        """Routing statistics accumulated since creation or the last :meth:`reset_routing_stats`, per layer.

        Keys are module names (``"<name>:<adapter>"`` when several adapters recorded statistics and no
        ``adapter_name`` is given); values are :class:`~molora.runtime.LayerRoutingStats` (expert load fractions,
        router entropy, tokens routed, experts per token). Padding tokens are never counted.
        """
        self._check_adapter_name(adapter_name)
        return self.molora_runtime.routing_stats(adapter_name)

    def _check_adapter_name(self, adapter_name: str | None) -> None:
        if adapter_name is not None and adapter_name not in self.peft_config:
            raise ValueError(
                f"adapter_name={adapter_name!r} is not an adapter of this model; its adapters are "
                f"{sorted(self.peft_config)} (or None for all of them)."
            )

    def reset_routing_stats(self) -> None:
        """Forget the accumulated routing statistics."""
        self.molora_runtime.reset_stats()

    def routing_stats_checkpoint(self) -> Any:
        """An opaque marker of the routing statistics accumulated so far (cheap: no copy, no device sync).

        :meth:`restore_routing_stats` returns to it, forgetting the forwards in between: a trainer callback marks
        each optimizer step's end, so that an evaluation run afterwards (predicted or not) leaves the training
        statistics as they were (``RoutingStatsCallback``)."""
        return self.molora_runtime.stats_checkpoint()

    def restore_routing_stats(self, checkpoint: Any) -> None:
        """Return to the statistics of :meth:`routing_stats_checkpoint`."""
        self.molora_runtime.restore_stats(checkpoint)

    def molora_prompt_mask(self, prompt_mask: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """Context manager: prompt-level routers (``router="prompt"``) pool over ``prompt_mask`` inside the block.

        ``prompt_mask[B, P]`` marks the prompt tokens among the first ``P`` positions of each input; positions after
        ``P`` are never prompt. Use it when a call re-feeds the prompt together with tokens that must not influence
        routing, e.g. scoring completions or ``generate(use_cache=False)``; with the KV cache (the default) and in
        training with ``labels`` the prompt is known without it. See ``docs/prompt_router.md``.

        Example:

            ```py
            >>> with model.molora_prompt_mask(prompt_attention_mask):
            ...     out = model(input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=full_mask)
            ```
        """
        return self.molora_runtime.prompt_mask(prompt_mask)

    def molora_on_optimizer_step(self) -> None:
        """Let every router update its per-step state; call it once after each ``optimizer.step()``.

        Stateful routers (``"topk_bias"``'s selection bias, ``"relu"``'s adaptive L1 coefficient) sum what they
        observe over all micro-batches of a step and update persistent buffers here, all-reduced over
        data-parallel ranks when ``torch.distributed`` is initialised (so every rank must call it). Stateless
        routers ignore it. ``molora.training.MoLoraCallback`` calls it for a ``transformers.Trainer`` or TRL
        trainer; custom loops call ``model.molora_on_optimizer_step()`` after ``optimizer.step()``.
        """
        if not any(
            _stateful_router(config.router) for config in self.peft_config.values() if isinstance(config, MoLoraConfig)
        ):
            return  # nothing to update: no walk over the model's modules every step (21 ms on a 30-layer model)
        groups: dict[tuple[str, type], list] = {}
        for module in self.model.modules():
            if isinstance(module, MoLoraLayer):
                # (MoE experts adapters have no router of their own: the base model's routes them)
                for adapter_name, router in getattr(module, "molora_router", {}).items():
                    groups.setdefault((adapter_name, type(router)), []).append(router)
        for (_, router_cls), routers in groups.items():
            router_cls.on_optimizer_step_group(routers)

    def get_rank_stats(self, adapter_name: str | None = None) -> dict[str, RankStats]:
        """DR-LoRA rank per expert of every bank, now and at every growth event (empty without ``dynamic_rank``).

        Keys are module names like :meth:`get_routing_stats`; values are
        :class:`~molora.adapters.dynamic_rank.RankStats`.
        """
        return get_rank_stats(self, adapter_name)
