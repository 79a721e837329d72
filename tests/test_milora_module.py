"""MiLoRA as published (``router_kwargs={"milora_mode": "module"}``): one router per decoder layer picks ``top_k`` of
the layer's adapted projections per sequence (docs/algorithms.md section 3, molora/adapters/milora.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, make_bart, make_llama, make_t5, padded
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from molora import MoLoraConfig, MoLoraLayer
from molora.routers.prompt import PromptRouter

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MODULES += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROMPTS = [[5, 17, 33, 9, 41, 7], [61, 12, 88, 3], [70, 71, 72, 20, 21]]


def module_config(top_k: int = 3, **overrides) -> MoLoraConfig:
    kwargs = dict(
        r=4,
        lora_alpha=8,
        num_experts=1,
        top_k=top_k,
        router="prompt",
        router_kwargs={"milora_mode": "module"},
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    kwargs.update(overrides)
    return MoLoraConfig(**kwargs)


def module_model(seed: int = 0, **overrides):
    model = get_peft_model(make_llama(seed), module_config(**overrides)).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for router in layer_routers(model):
            router.weight.normal_(0.0, 1.0)  # decisions that differ between prompts and matter for the outputs
    return model


def layer_routers(model, adapter: str = "default") -> list[PromptRouter]:
    return list(model.get_base_model().molora_milora[adapter].values())


class CountShrinks(TorchDispatchMode):
    """Counts matrix products into ``rank`` columns (a LoRA's ``x @ A``)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank, self.calls = rank, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default and args[1].shape[-1] == self.rank:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def reference_gates(router: PromptRouter, hidden: torch.Tensor, prompt: torch.Tensor, top_k: int) -> torch.Tensor:
    """spec section 3, steps 1-4, written out: masked mean pool, tanh, W_g, softmax, top-K, renormalised."""
    weights = prompt.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * weights).sum(1) / weights.sum(1)
    probs = torch.softmax(torch.tanh(pooled) @ router.weight.detach().T, -1)
    top = probs.topk(top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    return gates  # [B, M]


def capture(model):
    """Record every decoder layer's input and every adapted projection's input and output."""
    seen, handles = {}, []
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, MoLoraLayer) or name.endswith(tuple(f"layers.{i}" for i in range(8))):

            def hook(mod, args, out, name=name):
                seen[name] = (args[0] if args else None, out[0] if isinstance(out, tuple) else out)

            handles.append(module.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("top_k", [2, 3])
def test_each_projection_adds_its_gated_lora_exactly_as_the_spec_says(top_k):
    model = module_model(top_k=top_k)
    ids, mask = padded(PROMPTS)
    labels = ids.clone()
    labels[:, :-2] = -100  # the prompt: every position but the last two (padding is never prompt)
    seen, handles = capture(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=labels)
    for handle in handles:
        handle.remove()
    prompt = mask.bool() & (labels == -100)
    scaling = 8 / 4
    checked_zero = checked_nonzero = 0
    for layer_index, router in enumerate(layer_routers(model)):
        assert router.module_names == MODULES
        hidden = seen[f"model.layers.{layer_index}"][0]
        gates = reference_gates(router, hidden.float(), prompt, top_k)
        assert ((gates > 0).sum(-1) == top_k).all()
        for m, module_name in enumerate(MODULES):
            proj = model.base_model.model.get_submodule(f"model.layers.{layer_index}.{module_name}")
            x, y = seen[f"model.layers.{layer_index}.{module_name}"]
            base = proj.base_layer(x)
            lora = x @ proj.molora_A["default"].weight[0] @ proj.molora_B["default"].weight[0] * scaling
            expected = base + gates[:, m].view(-1, 1, 1) * lora
            torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
            checked_zero += int((gates[:, m] == 0).sum())
            checked_nonzero += int((gates[:, m] > 0).sum())
    assert checked_zero and checked_nonzero  # both cases were seen


def test_layer_router_reads_the_residual_stream_before_the_input_norm():
    model = module_model()
    ids, mask = padded(PROMPTS)
    seen = {}
    layer = model.base_model.model.model.layers[1]
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    router = layer_routers(model)[1]
    expected = reference_gates(router, seen["h"].float(), mask.bool(), 3)
    torch.testing.assert_close(router._cached.sequence.dense_gates(), expected, atol=1e-6, rtol=1e-6)


def test_unselected_modules_skip_their_lora_and_get_no_gradient():
    model = module_model(top_k=2)
    ids = torch.tensor([PROMPTS[0]])
    seen, handles = capture(model)
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    router = layer_routers(model)[0]
    gates = router._cached.sequence.dense_gates()[0]
    unselected = [m for m in range(7) if gates[m] == 0]
    assert len(unselected) == 5
    # without autograd only the 2 selected modules of each of the 2 layers compute their LoRA (x @ A: [T, d] @ [d, r])
    with torch.no_grad(), CountShrinks(rank=4) as counter:
        model(input_ids=ids)
    assert counter.calls == 2 * 2
    for m in unselected:
        x, y = seen[f"model.layers.0.{MODULES[m]}"]
        proj = model.base_model.model.get_submodule(f"model.layers.0.{MODULES[m]}")
        assert torch.equal(y, proj.base_layer(x))  # exactly the base output: the LoRA was not computed
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for m in range(7):
        proj = model.base_model.model.get_submodule(f"model.layers.0.{MODULES[m]}")
        grad = proj.molora_B["default"].weight.grad
        assert (grad.abs().sum() == 0) == (m in unselected)
    # the layer router learns from the language-modelling loss through the soft gates, and from the balance loss
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_training_loss_gradients_statistics_and_trainable_parameters():
    model = module_model(aux_loss_coef=0.05)
    model.train()
    ids, mask = padded(PROMPTS)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    losses = model.molora_aux_losses()
    assert set(losses) == {"balance"} and torch.isfinite(losses["balance"])
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    routers = {n for n in trainable if "molora_milora" in n}
    assert routers == {f"base_model.model.molora_milora.default.model_layers_{i}.weight" for i in range(2)}
    # one router per decoder layer of width hidden_size over its 7 modules; no per-projection routers
    assert all(p.shape == (7, 64) for n, p in model.named_parameters() if n in routers)
    assert not any("molora_router" in n for n in trainable)
    assert all(model.get_parameter(n).grad is not None for n in routers)
    stats = model.get_routing_stats()
    assert set(stats) == {"model.layers.0", "model.layers.1"}
    for layer_stats in stats.values():
        assert layer_stats.tokens == int(mask.sum())
        assert layer_stats.experts_per_token == pytest.approx(3.0)
        assert len(layer_stats.load) == 7


def test_aux_loss_reaches_the_layer_routers_when_the_trainer_computes_its_own_loss():
    model = module_model(aux_loss_coef=1.0)
    model.train()
    ids, mask = padded(PROMPTS)
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * 0).sum().backward()  # no language-modelling signal: only the aux loss moves the routers
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in layer_routers(model))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(reentrant):
    grads = []
    for checkpointing in (False, True):
        model = module_model()
        model.train()
        if checkpointing:
            # transformers checkpoints the decoder layers' forward, so the hooks on the layers do not run again in
            # the recompute: the decision must still be recomputed there, from the recomputed input
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        ids, mask = padded(PROMPTS)
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_generation_uses_the_prompt_decision_and_padding_does_not_leak():
    model = module_model()
    ids, mask = padded(PROMPTS)
    cached = greedy(model, ids, mask)
    with model.molora_prompt_mask(mask):
        assert torch.equal(greedy(model, ids, mask, use_cache=False), cached)
    for i, prompt in enumerate(PROMPTS):
        alone = greedy(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(cached[i], alone[0])
    # the decision matters: without the adapter the tokens differ
    with model.disable_adapter():
        assert not torch.equal(greedy(model, ids, mask), cached)


def test_save_load_roundtrip_two_adapters_and_delete(tmp_path):
    model = module_model()
    ids, mask = padded(PROMPTS)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected_keys = {f"base_model.model.molora_milora.model_layers_{i}.weight" for i in (0, 1)}
    assert {k for k in keys if "milora" in k} == expected_keys

    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)

    # a second adapter (loaded under another name) has its own layer routers; switching adapters switches them
    loaded.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    base = loaded.get_base_model()
    assert set(base.molora_milora) == {"default", "other"}
    with torch.no_grad():
        for router in base.molora_milora["other"].values():
            router.weight.neg_()
    loaded.set_adapter("other")
    assert all(r.weight.requires_grad for r in base.molora_milora["other"].values())
    assert not any(r.weight.requires_grad for r in base.molora_milora["default"].values())
    with torch.no_grad():
        assert not torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4)
    loaded.set_adapter("default")
    loaded.delete_adapter("other")
    assert set(base.molora_milora) == {"default"}
    assert all(set(m._milora) == {"default"} for m in loaded.modules() if isinstance(m, MoLoraLayer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_mixed_adapter_batch_equals_each_sample_with_its_adapter(tmp_path):
    model = module_model()
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="other")
    with torch.no_grad():
        for router in model.get_base_model().molora_milora["other"].values():
            router.weight.neg_()
    ids, mask = padded(PROMPTS)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
            torch.testing.assert_close(mixed[i, mask[i].bool()], alone[0, mask[i].bool()], atol=1e-5, rtol=1e-5)
        model.set_adapter("default")
        generated = model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert generated.shape == (3, ids.shape[1] + 4)


def test_unload_restores_the_base_model():
    reference = make_llama(0)
    model = module_model()
    ids, mask = padded(PROMPTS)
    base = model.unload()
    assert not any(hasattr(m, "_molora_layer_key") for m in base.modules())
    assert not hasattr(base, "molora_milora")
    with torch.no_grad():
        torch.testing.assert_close(
            base(input_ids=ids, attention_mask=mask).logits, reference(input_ids=ids, attention_mask=mask).logits
        )


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"`num_experts`=8 .*milora_mode.*num_experts=1"):
        module_config(num_experts=8)
    with pytest.raises(ValueError, match=r"milora_mode.*allowed values: \['bank', 'module'\]"):
        MoLoraConfig(router="prompt", router_kwargs={"milora_mode": "layer"})
    with pytest.raises(ValueError, match="dynamic_rank"):
        module_config(dynamic_rank={"target_rank": 2, "init_rank": 1})
    with pytest.raises(ValueError, match=r"`top_k`=3 .*'model.layers.0' has only 2 adapted"):
        get_peft_model(make_llama(0), module_config(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="not inside a list of layers"):
        get_peft_model(make_llama(0), module_config(top_k=1, target_modules=["q_proj", "lm_head"]))
    # top_k above num_experts is an error in bank mode only
    with pytest.raises(ValueError, match="must be <= num_experts"):
        MoLoraConfig(router="prompt", num_experts=1, top_k=3)


def test_beam_search_and_several_samples_per_prompt():
    model = module_model()
    ids, mask = padded(PROMPTS)
    beams = greedy(model, ids, mask, num_beams=3)
    assert beams.shape == (3, 6)
    with torch.no_grad():
        samples = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=True,
            num_return_sequences=2,
            pad_token_id=0,
        )
    assert samples.shape == (6, ids.shape[1] + 4)
    # the layer routers decided for the expanded batch at the prefill
    assert all(r._cached.sequence.num_tokens == 6 for r in layer_routers(model))


def test_compiled_training_step_is_one_graph_with_eager_gradients():
    torch._dynamo.reset()
    model = module_model()
    model.train()
    ids, mask = padded(PROMPTS)
    labels = ids.masked_fill(mask == 0, -100)
    eager = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    eager.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    counter = torch._dynamo.testing.CompileCounter()
    loss = torch.compile(model, backend=counter)(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(loss, eager)
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5)


def test_attention_pooling_query_of_the_layer_routers_round_trips(tmp_path):
    model = module_model(router_kwargs={"milora_mode": "module", "pooler": "attn"})
    with torch.no_grad():
        for router in layer_routers(model):
            router.pool_query.normal_()
    ids, mask = padded(PROMPTS)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {f"base_model.model.molora_milora.model_layers_{i}.pool_query" for i in (0, 1)} <= keys
    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("recreated", [False, True])
def test_unload_after_a_second_get_peft_model_removes_every_layer_hook(recreated):
    """`get_peft_model` run twice on one base (the second tuner drives the first one's runtime): unloading from the
    second left the decoder-layer hooks the first had installed, and the unloaded model's next forward raised. Also
    when the first tuner removed its module-mode adapter and hooked the layers again for a new one."""
    ids, mask = padded([[5, 6, 7, 8], [9, 10]])
    base = make_llama(0)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask).logits
    with pytest.warns(UserWarning):
        first = get_peft_model(base, module_config())
        second = get_peft_model(base, module_config())
    if recreated:
        first.add_adapter("other", module_config())
        first.delete_adapter("default")
        first.delete_adapter("other")  # the last module-mode adapter: the layers are unhooked
        first.add_adapter("again", module_config())  # hooked again
    restored = second.unload()
    assert not [name for name, m in restored.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask).logits, expected)


def test_inject_adapter_in_model_keeps_the_layer_routers_in_the_model():
    from peft import get_peft_model_state_dict, inject_adapter_in_model

    model = inject_adapter_in_model(module_config(), make_llama(0))
    assert {n for n, p in model.named_parameters() if "molora_milora" in n and p.requires_grad} == {
        f"molora_milora.default.model_layers_{i}.weight" for i in (0, 1)
    }
    saved = get_peft_model_state_dict(model)
    assert {k for k in saved if "milora" in k} == {f"molora_milora.model_layers_{i}.weight" for i in (0, 1)}
    ids, mask = padded(PROMPTS)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "molora_milora" in n)


def test_compiled_generation_gives_eager_tokens_without_graph_breaks():
    # compiling the base model's forward, as transformers documents for generate (the LoRAs of unselected modules
    # then run with gate 0 instead of being skipped: the same tokens)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = module_model()
    ids, mask = padded(PROMPTS)
    expected = greedy(model, ids, mask)
    base = model.get_base_model()
    base.forward = torch.compile(base.forward, backend="eager")
    try:
        for _ in range(2):
            assert torch.equal(greedy(model, ids, mask), expected)
        assert not torch._dynamo.utils.counters["graph_break"]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_models_route_per_layer_and_cross_attention_takes_the_sequence_decision(arch):
    """Encoder-decoder models in module mode: a T5 block holds its sub-layers in a list of its own, and each sub-layer
    got its own router (attention and feed-forward routed apart; the block's hooks never ran); the decoder's
    cross-attention keys and values read the encoder's tokens, where the layer's per-token gates (laid out for the
    decoder's tokens) failed with a shape error. Now one router per block, and those projections take their sequence's
    gate."""
    make = make_t5 if arch == "t5" else make_bart
    model = get_peft_model(make(), module_config(top_k=5, task_type="SEQ_2_SEQ_LM")).train()
    routers = model.get_base_model().molora_milora["default"]
    if arch == "t5":
        assert sorted(routers) == ["decoder_block_0", "encoder_block_0"]
        layer, router = "decoder.block.0", routers["decoder_block_0"]
        assert "layer.0.SelfAttention.q" in router.module_names and "layer.2.DenseReluDense.wi" in router.module_names
        key = "layer.1.EncDecAttention.k"
    else:
        assert sorted(routers) == ["model_decoder_layers_0", "model_encoder_layers_0"]
        layer, router = "model.decoder.layers.0", routers["model_decoder_layers_0"]
        key = "encoder_attn.k_proj"
    assert len(router.module_names) == 10 and key in router.module_names
    torch.manual_seed(3)
    with torch.no_grad():
        for r in routers.values():
            r.weight.normal_(0.0, 1.0)
    seen = {}
    base = model.get_base_model()
    base.get_submodule(layer).register_forward_pre_hook(lambda mod, args: seen.__setitem__("layer", args[0]))
    base.get_submodule(f"{layer}.{key}").register_forward_hook(
        lambda mod, args, out: seen.__setitem__("key", (args[0], out))
    )
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    # decoder inputs of their own: the decoder's routers decide from the first one, here not the same start token
    decoder_ids = torch.randint(3, 64, (3, 4), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids, decoder_input_ids=decoder_ids)
    torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64), decoder_ids.roll(-1, 1).reshape(-1)).backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers.values())
    # the decoder layer's decision (spec section 3 from its input, pooled over its first token), per sequence
    prompt = torch.zeros(3, 4, dtype=torch.bool)
    prompt[:, 0] = True
    expected = reference_gates(router, seen["layer"].detach(), prompt, 5)[:, router.module_names.index(key)]
    # the key projection's gate of each sequence: its delta over its full LoRA delta (gamma * scaling * B A x)
    module = base.get_submodule(f"{layer}.{key}")
    x, y = seen["key"]
    assert x.shape[1] == 7  # the encoder's tokens
    delta = (y - module.base_layer(x)).detach()
    full = (x @ module.molora_A["default"].weight[0] @ module.molora_B["default"].weight[0]).detach()
    full = full * module.scaling["default"]
    gates = (delta * full).sum(dim=(1, 2)) / (full * full).sum(dim=(1, 2))
    assert (expected > 0).any() and (expected == 0).any()  # sequences that selected it and one that did not
    torch.testing.assert_close(gates, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        model.eval()
        single = [model.generate(input_ids=ids[i : i + 1], max_new_tokens=4, do_sample=False) for i in range(3)]
        batched = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    for i in range(3):
        assert torch.equal(batched[i, : single[i].shape[1]], single[i][0])


def test_a_registered_prompt_router_subclass_routes_the_layers():
    """``router=`` names the class that routes: module mode built a plain ``PromptRouter`` whatever was registered (a
    subclass's ``select`` never ran), and the checks that refuse the output projection and packing compared the name
    with "prompt"."""
    from molora import register_router

    calls = []

    class FirstModules(PromptRouter):
        def select(self, logits, valid):
            calls.append(1)
            return super().select(logits, valid)

    register_router("_test_prompt_subclass", FirstModules, overwrite=True)
    model = get_peft_model(make_llama(0), module_config(router="_test_prompt_subclass"))
    assert all(type(r) is FirstModules for r in layer_routers(model))
    ids, mask = padded(PROMPTS)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2  # one decision per decoder layer
    bank = MoLoraConfig(router="_test_prompt_subclass", num_experts=2, top_k=1, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="cannot adapt the output projection"):
        get_peft_model(make_llama(0), bank)
