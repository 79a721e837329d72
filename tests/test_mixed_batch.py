"""Mixed-adapter batches (``adapter_names=`` per sample) and the layer's fused router + dense path.

Covers:
    * ``PeftModel.forward(..., adapter_names=[...])`` with two MoLoRA adapters of different ranks, experts and
      routers plus ``"__base__"``: every row equals that adapter alone (``set_adapter``) or the base model;
    * ``generate(..., adapter_names=[...])`` (greedy and beam search) equals separate generation per sample;
    * the same on GPT-2 (``Conv1D`` projections), and a layer called directly with ``adapter_names=``;
    * errors: training mode, unknown adapter names, a names list whose length is not the batch size;
    * routing statistics of a mixed batch count each adapter's own samples only;
    * the layer's fused router-in-GEMM dense path agrees with the unfused paths (outputs and every gradient) for
      the ``topk`` and ``soft`` routers, and is skipped when it would change the maths (jitter noise, dropout).
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_llama
from peft import get_peft_model

from molora import MoLoraConfig
from molora.adapters.layer import MoLoraLayer


def two_adapter_model():
    model = get_peft_model(
        make_llama(seed=3),
        MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM"),
        adapter_name="alpha",
    )
    model.add_adapter(
        "beta",
        MoLoraConfig(r=2, lora_alpha=8, num_experts=3, router="soft", init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    return model.eval()


def reference_logits(model, input_ids, name):
    if name == "__base__":
        with model.disable_adapter():
            return model(input_ids=input_ids).logits
    model.set_adapter(name)
    return model(input_ids=input_ids).logits


def generate_alone(model, input_ids, name, **kwargs):
    """``generate`` with adapter ``name`` alone (``"__base__"``: the adapter disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return model.generate(input_ids=input_ids, **kwargs)
    model.set_adapter(name)
    return model.generate(input_ids=input_ids, **kwargs)


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = two_adapter_model()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (4, 7), generator=gen)
    names = ["beta", "__base__", "alpha", "beta"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        for row, name in enumerate(names):
            ref = reference_logits(model, input_ids[row : row + 1], name)
            torch.testing.assert_close(mixed[row : row + 1], ref, atol=1e-5, rtol=1e-5)
        # the adapters really differ from each other and from the base model
        a, b, base = (reference_logits(model, input_ids[:1], n) for n in ("alpha", "beta", "__base__"))
        assert (a - b).abs().max() > 1e-3 and (a - base).abs().max() > 1e-3


def test_mixed_batch_with_adapters_of_different_dtypes(tmp_path):
    """A bf16 adapter (loaded with ``autocast_adapter_dtype=False``) beside an fp32 one on a bf16 base: each is
    computed in its own dtype, as alone, whatever the other samples' adapters (all of them were computed in the first
    adapter's dtype, so a sample's output changed with the order of the others)."""
    from peft import PeftModel

    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        config = MoLoraConfig(
            r=4, lora_alpha=16, num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM"
        )
        get_peft_model(make_llama(), config).save_pretrained(tmp_path / name)
    model = PeftModel.from_pretrained(
        make_llama().to(torch.bfloat16), tmp_path / "a", adapter_name="a", autocast_adapter_dtype=False
    )
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.eval()
    layer = next(m for m in model.modules() if isinstance(m, MoLoraLayer))
    assert (layer.molora_A["a"].weight.dtype, layer.molora_A["b"].weight.dtype) == (torch.bfloat16, torch.float32)
    input_ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0)).repeat(2, 1)
    with torch.no_grad():
        ab = model(input_ids=input_ids, adapter_names=["a", "b"]).logits
        ba = model(input_ids=input_ids, adapter_names=["b", "a"]).logits
        alone = {name: reference_logits(model, input_ids[:1], name) for name in ("a", "b")}
    assert torch.equal(ab[1], ba[0]) and torch.equal(ab[0], ba[1])
    # the fp32 adapter's sample: computed as alone whatever the other sample uses (it was computed in bf16 behind "a")
    torch.testing.assert_close(ab[1:], alone["b"], atol=1e-6, rtol=1e-6)
    # the bf16 adapter's: bf16 roundings differ between the grouped pass and the alone layer's fused path
    torch.testing.assert_close(ab[:1], alone["a"], atol=8e-2, rtol=5e-2)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_generate_equals_separate_generation(num_beams):
    model = two_adapter_model()
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 5), generator=gen)
    names = ["alpha", "__base__", "beta"]
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, adapter_names=names, **kwargs)
        for row, name in enumerate(names):
            assert torch.equal(mixed[row : row + 1], generate_alone(model, input_ids[row : row + 1], name, **kwargs))
    # the names are only in effect during the call
    assert model.base_model.molora_runtime.batch_adapter_names is None


@pytest.mark.parametrize("where", ["generation_config", "model", "both", "num_return_sequences"])
def test_mixed_generate_expands_names_as_generate_expands_the_batch(where):
    """``generate`` repeats every sample ``max(num_beams, num_return_sequences)`` times, whether those come from the
    call's keywords, its ``generation_config`` or the model's (a saved T5's ``generation_config.json`` may set
    ``num_beams``): the per-sample names follow (only the keyword ``num_beams`` was read, and the others raised)."""
    from transformers import GenerationConfig

    model = two_adapter_model()
    input_ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["alpha", "__base__", "beta"]
    settings = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    if where == "num_return_sequences":
        # sampling from the single most likely token: greedy's tokens, twice per sample
        settings.update(do_sample=True, top_k=1, num_return_sequences=2)
    else:
        settings.update(do_sample=False, num_beams=2)
    with torch.no_grad():
        if where == "generation_config":
            mixed = model.generate(
                input_ids=input_ids, adapter_names=names, generation_config=GenerationConfig(**settings)
            )
        elif where in ("model", "both"):
            saved = model.generation_config
            model.generation_config = GenerationConfig(**settings)
            # "both": a passed config that leaves num_beams unset takes the model's (transformers' resolution)
            passed = {"generation_config": GenerationConfig(max_new_tokens=4)} if where == "both" else {}
            try:
                mixed = model.generate(input_ids=input_ids, adapter_names=names, **passed)
            finally:
                model.generation_config = saved
        else:
            mixed = model.generate(input_ids=input_ids, adapter_names=names, **settings)
        per_sample = 2 if where == "num_return_sequences" else 1
        assert mixed.shape[0] == 3 * per_sample
        beams = {} if where == "num_return_sequences" else {"num_beams": 2}
        for row, name in enumerate(names):
            alone = generate_alone(
                model,
                input_ids[row : row + 1],
                name,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
                **beams,
            )
            for copy in range(per_sample):
                assert torch.equal(mixed[row * per_sample + copy : row * per_sample + copy + 1], alone), (name, copy)


def _own_modules_to_save(model):
    # each adapter's copy of the saved modules gets its own weights (as after training)
    with torch.no_grad():
        for name, param in model.named_parameters():
            for seed, adapter in enumerate(("alpha", "beta")):
                if f"modules_to_save.{adapter}." in name:
                    param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_uses_each_adapters_modules_to_save(num_beams):
    """``modules_to_save`` copies (here ``lm_head``) follow the per-sample names too, as PEFT's LoRA does: each row
    goes through its adapter's copy (the base model's module for ``"__base__"``), in forward and in generate."""
    config = dict(r=4, num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(make_llama(seed=3), MoLoraConfig(modules_to_save=["lm_head"], **config), "alpha")
    model.add_adapter("beta", MoLoraConfig(modules_to_save=["lm_head"], router="soft", **config))
    model = _own_modules_to_save(model)
    input_ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["beta", "__base__", "alpha"]
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=num_beams, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        generated = model.generate(input_ids=input_ids, adapter_names=names, **kwargs)
        for row, name in enumerate(names):
            # (a batch of 3 and of 1 round apart by up to 2e-5 in the logits on some CPUs)
            reference = reference_logits(model, input_ids[row : row + 1], name)
            torch.testing.assert_close(mixed[row : row + 1], reference, atol=5e-5, rtol=1e-4)
            alone = generate_alone(model, input_ids[row : row + 1], name, **kwargs)
            assert torch.equal(generated[row : row + 1], alone), name


def test_mixed_batch_classifier_head_per_sample():
    # task_type="SEQ_CLS" saves the `score` head with each adapter
    from transformers import LlamaForSequenceClassification

    llama_config = make_llama(num_labels=3).config
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(llama_config)
    config = dict(r=4, num_experts=4, top_k=2, init_lora_weights=False, task_type="SEQ_CLS")
    model = get_peft_model(base, MoLoraConfig(**config), "alpha")
    model.add_adapter("beta", MoLoraConfig(**config))
    model = _own_modules_to_save(model)
    input_ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["alpha", "beta", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        for row, name in enumerate(names):
            ref = reference_logits(model, input_ids[row : row + 1], name)
            torch.testing.assert_close(mixed[row : row + 1], ref, atol=1e-5, rtol=1e-5)


def test_mixed_batch_errors():
    model = two_adapter_model()
    input_ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=input_ids, adapter_names=["alpha", "typo"])
    with pytest.raises(ValueError, match="one name per sample"):
        model(input_ids=input_ids, adapter_names=["alpha", "beta", "alpha"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=input_ids, adapter_names=["alpha", "beta"])


def test_mixed_batch_stats_count_each_adapters_own_tokens():
    model = two_adapter_model()
    model.reset_routing_stats()
    input_ids = torch.randint(3, VOCAB, (3, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :2] = 0  # two padding tokens in adapter beta's second sample
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, adapter_names=["alpha", "beta", "beta"])
    stats_a = model.get_routing_stats("alpha")
    stats_b = model.get_routing_stats("beta")
    assert stats_a and stats_b
    assert {s.tokens for s in stats_a.values()} == {6}
    assert {s.tokens for s in stats_b.values()} == {10}


# -- fused router + dense path in the layer --------------------------------------------------------------------------


def layer_grads(router, kernel, router_kwargs=None, dropout=0.0, train=False, seed=0):
    config = MoLoraConfig(
        r=4,
        num_experts=5,
        top_k=2,
        router=router,
        router_kwargs=router_kwargs or {},
        kernel=kernel,
        lora_dropout=dropout,
        init_lora_weights=False,
        aux_loss_coef=0.1,
        z_loss_coef=0.01,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(make_llama(seed=5), config)
    model.train(train)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 6), generator=gen)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, model


@pytest.mark.parametrize("router", ["topk", "soft"])
def test_fused_dense_layer_matches_unfused_paths(router, monkeypatch):
    calls = []
    import molora.adapters.layer as layer_module

    original = layer_module.base_and_shrink
    original_topk = layer_module.dense_topk_layer

    def spy(x, weight, bias, bank, router_weight=None, conv1d=False, **kwargs):
        # the router's weight rides in the shrink GEMM: E*r expert columns plus E router columns
        calls.append(bank.shape[0] * bank.shape[2] + (router_weight.shape[0] if router_weight is not None else 0))
        return original(x, weight, bias, bank, router_weight, conv1d, **kwargs)

    def spy_topk(x, weight, bias, bank, b_flat, router_weight, *args, **kwargs):
        # the top-k router's training forward: the same GEMM inside one node (dense_topk_layer)
        calls.append(bank.shape[0] * bank.shape[2] + router_weight.shape[0])
        return original_topk(x, weight, bias, bank, b_flat, router_weight, *args, **kwargs)

    monkeypatch.setattr(layer_module, "base_and_shrink", spy)
    monkeypatch.setattr(layer_module, "dense_topk_layer", spy_topk)
    loss_fused, grads_fused, _ = layer_grads(router, "dense")
    assert set(calls) == {5 * 4 + 5}
    assert calls, "the fused path was not taken"
    n_fused = len(calls)
    for kernel in ("naive", "grouped"):
        loss, grads, _ = layer_grads(router, kernel)
        assert len(calls) == n_fused  # the other kernels never fuse
        torch.testing.assert_close(loss_fused, loss, atol=1e-6, rtol=1e-5)
        assert grads.keys() == grads_fused.keys()
        for name in grads:
            torch.testing.assert_close(grads_fused[name], grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_fusion_is_skipped_when_it_would_change_the_maths():
    model = layer_grads("topk", "dense")[2]
    layer = next(m for m in model.modules() if isinstance(m, MoLoraLayer))
    x = torch.randn(4, layer.in_features)
    assert layer._can_fuse_router(x, "default", "dense")
    assert not layer._can_fuse_router(x, "default", "grouped")
    assert not layer._can_fuse_router(x.double(), "default", "dense")
    jitter = layer_grads("topk", "dense", router_kwargs={"jitter_noise": 0.1}, train=True)[2]
    layer = next(m for m in jitter.modules() if isinstance(m, MoLoraLayer))
    assert not layer._can_fuse_router(x, "default", "dense")
    jitter.eval()
    assert layer._can_fuse_router(x, "default", "dense")  # no noise in eval mode
    dropout = layer_grads("topk", "dense", dropout=0.1, train=True)[2]
    layer = next(m for m in dropout.modules() if isinstance(m, MoLoraLayer))
    assert not layer._can_fuse_router(x, "default", "dense")


def test_mixed_batch_on_gpt2_and_direct_layer_call():
    from conftest import make_gpt2

    model = get_peft_model(
        make_gpt2(seed=2), MoLoraConfig(r=4, num_experts=3, top_k=1, init_lora_weights=False), adapter_name="alpha"
    )
    model.add_adapter("beta", MoLoraConfig(r=4, num_experts=2, top_k=2, init_lora_weights=False))
    model.eval()
    input_ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=["beta", "alpha"]).logits
        for row, name in enumerate(["beta", "alpha"]):
            torch.testing.assert_close(mixed[row : row + 1], reference_logits(model, input_ids[row : row + 1], name))
        # a layer called on its own with the PEFT-style kwarg
        layer = next(m for m in model.modules() if isinstance(m, MoLoraLayer))
        x = torch.randn(2, 3, layer.in_features)
        out = layer(x, adapter_names=["__base__", "beta"])
        torch.testing.assert_close(out[0], layer.get_base_layer()(x[:1])[0])
        model.set_adapter("beta")
        torch.testing.assert_close(out[1:], layer(x[1:]))


@pytest.mark.parametrize("router_kwargs", [{}, {"milora_mode": "module"}], ids=["bank", "module"])
def test_prompt_router_mixed_batch_uses_each_samples_prompt(router_kwargs):
    """The prompt router pools over each sample's prompt (``labels == -100``, or ``molora_prompt_mask``): in a mixed
    batch the positions were not cut to each adapter's samples (labels ignored, silently; an explicit prompt mask or
    ``generate(use_cache=False)`` raised)."""

    def config(**kwargs):
        return MoLoraConfig(router="prompt", router_kwargs=router_kwargs, init_lora_weights=False, **kwargs)

    module = bool(router_kwargs)  # module mode: one LoRA per projection, top_k of a decoder layer's 7 modules
    model = get_peft_model(
        make_llama(seed=3), config(r=4, num_experts=1 if module else 4, top_k=3 if module else 2), adapter_name="alpha"
    )
    model.add_adapter("beta", config(r=2, num_experts=1 if module else 3, top_k=2 if module else 1))
    model.eval()
    input_ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :6] = -100  # 6 prompt tokens
    names = ["alpha", "beta", "alpha"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, labels=labels, adapter_names=names).logits
        with model.molora_prompt_mask(torch.ones(3, 6, dtype=torch.long)):
            masked = model(input_ids=input_ids, adapter_names=names).logits
        for row, name in enumerate(names):
            model.set_adapter(name)
            alone = model(input_ids=input_ids[row : row + 1], labels=labels[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(masked[row : row + 1], alone, atol=1e-5, rtol=1e-5)
        # generate without a KV cache re-feeds prompt and new tokens: routing stays on the prompt
        uncached = model.generate(
            input_ids=input_ids, max_new_tokens=3, do_sample=False, use_cache=False, adapter_names=names
        )
        cached = model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False, adapter_names=names)
    assert torch.equal(uncached, cached)
