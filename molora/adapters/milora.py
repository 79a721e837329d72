"""MiLoRA as published ("module" mode): the experts of a decoder layer are its adapted projections.

Zhang et al., "MiLoRA: Efficient Mixture of Low-Rank Adaptation for Large Language Models Fine-tuning", Findings of
EMNLP 2024 (docs/algorithms.md section 3). With ``MoLoraConfig(router="prompt", num_experts=1, top_k=K,
router_kwargs={"milora_mode": "module"})``:

* every adapted projection ``m`` of a decoder layer carries one LoRA module ``B_m A_m`` (a bank of one expert);
* one router per decoder layer (a :class:`~molora.routers.prompt.PromptRouter` over the ``M`` adapted projections of
  the layer, ``W_g[M, d]``) reads the layer's residual-stream input ``H`` (the decoder layer's ``hidden_states``
  argument, before its input norm), pools it over the prompt, activates it and picks ``K`` modules per sequence:
  gates ``gamma[B, M]`` (renormalised over the ``K``, or raw);
* projection ``m`` computes ``W0_m x + gamma_{b,m} * scaling * B_m A_m dropout(x)`` for every token of sequence ``b``;
* the decision is computed at the prefill and reused by the cached decode steps (the router's generation cache);
  without autograd, a module that no sequence of the batch selected skips its LoRA compute entirely.

Expert ``m`` of a layer's router is the ``m``-th adapted projection of that layer in module order (for a Llama layer
with the default targets: q, k, v, o, gate, up, down); ``routers[...].module_names`` lists them, and
``get_routing_stats()`` reports each decoder layer under its module name (e.g. ``"model.layers.3"``).

Where things live: the layer routers are in the wrapped model, ``model.molora_milora[adapter][layer key]``, so they
move, copy and train with it; ``MoLoraModel``'s state-dict hooks save and load them with the adapter (the file holds
``base_model.model.molora_milora.model_layers_3.weight``).
Hooks publish each decoder layer's input to the runtime while the layer runs (:func:`install_layer_hooks`); the
first adapted projection of the layer that runs computes the decision (and records the router's losses and
statistics on its own output), the others read it. Activation checkpointing recomputes the decision with the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..routers.base import Routing, build_router_params, get_router_class
from ..routers.prompt import PromptRouter, PromptRouting

if TYPE_CHECKING:
    from .layer import MoLoraLayer


@dataclass(eq=False)
class MiloraSlot:
    """Where one adapted projection sits in MiLoRA's module mode (held by the projection, per adapter).

    Attributes:
        layer_key (str): module name of the decoder layer (``"model.layers.3"``).
        index (int): the projection's expert index in the layer router.
        router (PromptRouter): the decoder layer's router (shared by the layer's projections; owned by the tuner).
    """

    layer_key: str
    index: int
    router: PromptRouter


#: the wrapped model's attribute holding the decoder-layer routers: ``molora_milora[adapter][container_key(layer)]``
CONTAINER = "molora_milora"


def decoder_layer_key(model: nn.Module, module_name: str) -> str | None:
    """The name of the decoder layer holding ``module_name``: its outermost ancestor that is an element of an
    ``nn.ModuleList`` (``"model.layers.3"`` for ``"model.layers.3.self_attn.q_proj"``; ``"decoder.block.0"`` for
    T5's ``"decoder.block.0.layer.1.EncDecAttention.q"``, whose block holds its sub-layers in a list too, as MoE
    layers hold their experts); ``None`` if there is none."""
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[: i + 1])
    return None


def _top_k_problem(top_k: int, layer_key: str, names: tuple[str, ...]) -> str:
    return (
        f"`top_k`={top_k} modules per sequence, but decoder layer {layer_key!r} has only {len(names)} adapted "
        f"projection(s) {list(names)} in router_kwargs['milora_mode']='module'; lower `top_k` or adapt more "
        "projections (MiLoRA: 3 of the 7 attention and MLP projections)."
    )


def check_layer_top_k(model: nn.Module, adapter_name: str, top_k: int) -> None:
    """Raise the ``ValueError`` :func:`build_layer_routers` raises if ``top_k`` exceeds the adapted projections of a
    decoder layer of ``model``'s module-mode adapter ``adapter_name`` (a config edited after the model was built:
    saved, it would not load)."""
    for module in model.modules():
        container = module._modules.get(CONTAINER)
        if container is not None and adapter_name in container:
            for key, router in container[adapter_name].items():
                if top_k > router.num_experts:
                    names = tuple(getattr(router, "module_names", ())) or tuple(map(str, range(router.num_experts)))
                    raise ValueError(_top_k_problem(top_k, key, names))  # (the layer by its container key)
            return


def container_key(layer_key: str) -> str:
    """``layer_key`` as a ``ModuleDict`` key (no dots)."""
    return layer_key.replace(".", "_")


def build_layer_routers(
    model: nn.Module, adapter_name: str, config: Any, layer_cls: type[MoLoraLayer]
) -> tuple[dict[str, PromptRouter], dict[str, nn.Module]]:
    """Create the per-decoder-layer routers of a module-mode adapter and give each projection its slot.

    Returns ``(routers, decoder layers)``: the routers keyed by :func:`container_key` of their decoder layer, and the
    decoder layer modules by name (for the hooks). Raises ``ValueError`` when an adapted projection is not inside a
    list of decoder layers or a layer has fewer adapted projections than ``top_k``.
    """
    groups: dict[str, list[tuple[str, MoLoraLayer]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, layer_cls) and not hasattr(module, "molora_A"):
            raise ValueError(
                f"router_kwargs['milora_mode']='module' routes between the adapted linear projections of each decoder "
                f"layer; {name!r} is a model's MoE experts (routed by the base model's own router). Leave the experts "
                "out of target_modules, or use milora_mode='bank'."
            )
        if isinstance(module, layer_cls) and adapter_name in module.molora_A:
            key = decoder_layer_key(model, name)
            if key is None:
                raise ValueError(
                    f"router_kwargs['milora_mode']='module' routes between the adapted projections of each decoder "
                    f"layer, but {name!r} is not inside a list of layers (an nn.ModuleList such as `model.layers`). "
                    "Adapt only projections inside the decoder layers, or use milora_mode='bank'."
                )
            groups.setdefault(key, []).append((name, module))
    params = build_router_params(config.router, config.router_kwargs, config.num_experts, config.top_k)
    # the registered class: a PromptRouter subclass of the user's routes the layers as it routes in bank mode
    router_cls = get_router_class(config.router)
    if not issubclass(router_cls, PromptRouter):
        raise ValueError(
            f"router_kwargs['milora_mode']='module' needs the prompt router or a subclass of it; `router`="
            f"{config.router!r} is {router_cls.__qualname__}."
        )
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    routers: dict[str, PromptRouter] = {}
    layers = {}
    for key, members in groups.items():
        names = tuple(name.removeprefix(key + ".") for name, _ in members)
        if config.top_k > len(members):
            raise ValueError(_top_k_problem(config.top_k, key, names))
        in_features = width if isinstance(width, int) else members[0][1].in_features
        router = router_cls(
            in_features,
            len(members),
            config.top_k,
            params=params,
            init=config.router_init,
            init_std=config.router_init_std,
        )
        router.module_names = names
        router.to(members[0][1].molora_A[adapter_name].weight.device).float()
        routers[container_key(key)] = router
        layers[key] = model.get_submodule(key)
        for index, (_, module) in enumerate(members):
            module._milora[adapter_name] = MiloraSlot(key, index, router)
    return routers, layers


def _layer_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    module._molora_runtime.milora_reset(module._molora_layer_key)


def _layer_post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module._molora_runtime.milora_reset(module._molora_layer_key)


def _child_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    module._molora_runtime.milora_first_input(module._molora_milora_key, hidden)


def _called_children(layer: nn.Module) -> list[nn.Module]:
    """The direct submodules ``layer`` calls: its children, with a container's (``nn.ModuleList``/``ModuleDict``,
    which are never called themselves: T5's block holds its sub-layers in one) replaced by its elements."""
    called = []
    for child in layer.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            called += _called_children(child)
        else:
            called.append(child)
    return called


def install_layer_hooks(layers: dict[str, nn.Module], runtime: Any) -> list:
    """Hooks that publish each decoder layer's input to ``runtime`` while the layer runs.

    The input is taken from the first direct submodule the layer calls (its input norm in every transformers
    decoder: the residual stream before the norm), because transformers checkpoints a layer's ``forward`` and not
    its ``__call__``: hooks on the decoder layer itself do not run again when activation checkpointing recomputes
    the layer in backward, its submodules' hooks do. The hooks on the layer only open and close the publication.
    The hooks find the runtime and key through the modules, so a deep copy of the model drives its own runtime.
    """
    handles = []
    for key, layer in layers.items():
        if getattr(layer, "_molora_layer_key", None) is not None:
            continue  # another module-mode adapter installed them
        layer._molora_layer_key = key
        layer._molora_runtime = runtime
        handles.append(layer.register_forward_pre_hook(_layer_pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(_layer_post_hook, with_kwargs=True))
        for child in _called_children(layer):
            child._molora_milora_key = key
            if getattr(child, "_molora_runtime", None) is None:
                child._molora_runtime = runtime
            handles.append(child.register_forward_pre_hook(_child_pre_hook, with_kwargs=True, prepend=True))
        runtime.milora_reset(key)  # open for the first call
    return handles


def remove_layer_hooks(layers: list[nn.Module], handles: list) -> None:
    """Undo :func:`install_layer_hooks` on these decoder layers."""
    for handle in handles:
        handle.remove()
    for layer in layers:
        layer.__dict__.pop("_molora_layer_key", None)
        layer.__dict__.pop("_molora_runtime", None)
        for child in _called_children(layer):
            if child.__dict__.pop("_molora_milora_key", None) is not None and not hasattr(child, "_molora_key"):
                child.__dict__.pop("_molora_runtime", None)


def layer_decision(
    layer: MoLoraLayer,
    adapter_name: str,
    slot: MiloraSlot,
    lead_shape: tuple[int, ...] | torch.Size,
    valid: torch.Tensor | None,
    rows: torch.Tensor | None = None,
) -> tuple[PromptRouting, bool]:
    """The decoder layer's decision for this forward, token-level (``[T, M]`` gates); ``(routing, computed)`` with
    ``computed`` True for the call that made it (which records the router's losses and statistics).

    ``rows``: the samples of a mixed-adapter batch that use ``adapter_name`` (their decision is made from their
    rows only, so that it does not depend on the other samples).
    """
    runtime = layer._molora_runtime
    if runtime is None:
        raise RuntimeError("MiLoRA module mode needs the MoLoraModel runtime; build the model with get_peft_model.")
    key = (slot.layer_key, adapter_name)
    hit = runtime.milora_decisions.get(key)
    if hit is not None:
        return hit, False
    ref = runtime.milora_inputs.get(slot.layer_key)
    hidden = ref() if ref is not None else None
    if hidden is None:
        raise RuntimeError(
            f"{layer._molora_key!r} uses MiLoRA module mode, whose router reads the input of decoder layer "
            f"{slot.layer_key!r}, but that layer is not running: call the model (or the decoder layer), not the "
            "projection on its own."
        )
    context = runtime.context
    if rows is not None:
        context = context.select_rows(rows, hidden.shape[0])
        hidden = hidden.index_select(0, rows.to(hidden.device))
    lead_shape = context.sequence_layout(tuple(lead_shape))  # [batch * seq] tokens flattened in order (OPT's MLP)
    if tuple(hidden.shape[:-1]) != tuple(lead_shape) or hidden.shape[-1] != slot.router.in_features:
        raise ValueError(
            f"MiLoRA module mode: decoder layer {slot.layer_key!r} received hidden states of shape "
            f"{tuple(hidden.shape)}, but its projection {layer._molora_key!r} sees tokens laid out as "
            f"{tuple(lead_shape)} and the router expects width {slot.router.in_features}; the layer must take "
            "[batch, seq, hidden_size] hidden states as its first argument."
        )
    flat = hidden.reshape(-1, hidden.shape[-1])
    if valid is not None and valid.device != flat.device:
        valid = valid.to(flat.device)
    routing = slot.router(flat, valid, context=context, lead_shape=tuple(lead_shape))
    runtime.milora_decisions[key] = routing
    return routing, True


def module_routing(decision: PromptRouting, index: int) -> Routing:
    """One projection's share of the layer decision: a one-expert routing whose gate is ``gamma[b, index]`` on
    every token of sequence ``b`` (zero where the sequence did not select the module)."""
    gate = decision.dense_gates()[:, index]
    tokens = gate.shape[0]
    return Routing(
        probs=decision.probs[:, index : index + 1],
        token_index=torch.arange(tokens, device=gate.device),
        expert_index=torch.zeros(tokens, dtype=torch.long, device=gate.device),
        weight=gate,
        gates=gate.unsqueeze(1),
        per_token=1,
    )


def module_selected(router: PromptRouter, decision: PromptRouting, index: int) -> bool:
    """Whether any sequence of the batch selected module ``index`` (inference only: a host read-back, made once per
    prefill and layer and kept with the router's cached decision for the decode steps)."""
    cached = router._cached
    if cached is not None and cached.active is not None:
        return cached.active[index]
    sequence = decision.sequence
    selected = sequence.selected()
    if decision.routed is not None:
        selected = selected & decision.routed.to(selected.device).unsqueeze(1)
    active = selected.any(dim=0).tolist()
    if cached is not None:
        cached.active = active
    return active[index]


def _token_gates(
    layer: MoLoraLayer, decision: PromptRouting, slot: MiloraSlot, lead_shape: tuple[int, ...], n_tokens: int
) -> torch.Tensor:
    """``gamma[b, index]`` for each of the projection's ``n_tokens`` tokens. The decision is laid out for the decoder
    layer's tokens; a projection of the layer that reads other tokens of the same sequences (a decoder's
    cross-attention keys and values, over the encoder's output) gets its sequences' gates."""
    gates = decision.dense_gates()[:, slot.index]
    if gates.shape[0] == n_tokens:
        return gates
    sequence = decision.sequence
    batch = sequence.num_tokens if sequence is not None else None
    if sequence is None or len(lead_shape) != 2 or lead_shape[0] != batch:
        raise ValueError(
            f"MiLoRA module mode: {layer._molora_key!r} reads {n_tokens} tokens laid out as {tuple(lead_shape)}, but "
            f"decoder layer {slot.layer_key!r} decided for {gates.shape[0]} tokens of other sequences; its "
            "projections must read [batch, seq, d] inputs of the layer's batch."
        )
    return sequence.dense_gates()[:, slot.index].repeat_interleave(lead_shape[1])


def module_delta(layer: MoLoraLayer, x: torch.Tensor, adapter_name: str, slot: MiloraSlot) -> torch.Tensor | None:
    """``gamma * scaling * B A dropout(x)`` of one projection in module mode, laid out like the base output;
    ``None`` when, without autograd, no sequence of the batch selected this module (its LoRA is skipped)."""
    skipping = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if skipping:
        # the layer's decision is usually made already (by its first projection): an unselected module returns
        # before any work on its input
        made = layer._molora_runtime.milora_decisions.get((slot.layer_key, adapter_name))
        if made is not None and not module_selected(slot.router, made, slot.index):
            return None
    x_flat, lead_shape, valid, _, weight_A, weight_B, _ = layer._prepare(x, adapter_name)
    decision, computed = layer_decision(layer, adapter_name, slot, lead_shape, valid)
    if skipping:
        if not module_selected(slot.router, decision, slot.index):
            if computed:
                layer._molora_runtime.record(slot.layer_key, adapter_name, slot.router, decision, valid, x_flat)
            return None
    h = layer._cast_input_dtype(layer.molora_dropout[adapter_name](x_flat), weight_A.dtype) @ weight_A[0]
    gate = _token_gates(layer, decision, slot, lead_shape, x_flat.shape[0]) * layer.scaling[adapter_name]
    out = (h * gate.to(h.dtype).unsqueeze(1)) @ weight_B[0]
    if computed:
        out = layer._molora_runtime.record(slot.layer_key, adapter_name, slot.router, decision, valid, out)
    return out.reshape(*lead_shape, out.shape[-1])


__all__ = [
    "MiloraSlot",
    "build_layer_routers",
    "decoder_layer_key",
    "install_layer_hooks",
    "layer_decision",
    "module_delta",
    "module_routing",
]
