"""DR-LoRA in its own setting: a LoRA per base expert of a small random MoE model, grown by the base router."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PhimoeConfig,
    PhimoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import molora
from molora import MoLoraConfig
from molora.adapters import dynamic_rank as dr
from molora.adapters.moe_experts import MoeExpertsLora, fused_experts_problem

COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def make_moe(kind: str, seed: int = 0) -> nn.Module:
    """A 2-layer MoE causal LM with 4 experts (top-2), built from its config; nothing is downloaded."""
    torch.manual_seed(seed)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(num_local_experts=4, **COMMON)).eval()
    if kind == "olmoe":
        return OlmoeForCausalLM(OlmoeConfig(num_experts=4, **COMMON)).eval()
    if kind == "qwen2_moe":
        cfg = Qwen2MoeConfig(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=24, **COMMON)
        return Qwen2MoeForCausalLM(cfg).eval()
    if kind == "qwen3_moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(num_experts=4, moe_intermediate_size=24, **COMMON)).eval()
    if kind == "phimoe":  # the MoE block calls its router `router`, not `gate`
        return PhimoeForCausalLM(PhimoeConfig(num_local_experts=4, **COMMON)).eval()
    if kind == "glm4_moe":
        cfg = Glm4MoeConfig(n_routed_experts=4, moe_intermediate_size=24, first_k_dense_replace=0, **COMMON)
        return Glm4MoeForCausalLM(cfg).eval()
    if kind == "deepseek_v3":  # sigmoid router scores; "probs" is the softmax of its logits
        cfg = DeepseekV3Config(
            n_routed_experts=4,
            moe_intermediate_size=24,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **{**COMMON, "num_key_value_heads": 4},
        )
        return DeepseekV3ForCausalLM(cfg).eval()
    raise ValueError(kind)


def _config(**overrides) -> MoLoraConfig:
    kwargs = dict(
        r=8,
        target_modules=["experts"],
        init_lora_weights=False,
        dynamic_rank={"start_step": 1, "end_step": 4},
        task_type="CAUSAL_LM",
    )
    kwargs.update(overrides)
    return MoLoraConfig(**kwargs)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _train(model, steps: int, check_continuity: bool = True):
    inputs = _inputs()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, steps + 1):
        model.train()
        model(**inputs, labels=labels).loss.backward()
        molora.update_importance(model)
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            before = model(**inputs).logits
        molora.maybe_grow(model, step, optimizer=optimizer)
        if check_continuity:
            with torch.no_grad():
                # (a growth event widens masked_weights' cut: the products then sum over more, zero, columns, which
                # may round differently; a new component that changed the function would move the logits by far more)
                after = model(**inputs).logits
                torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6, msg=f"output jumped at step {step}")


@pytest.mark.parametrize("kind", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "phimoe", "glm4_moe", "deepseek_v3"])
def test_fresh_expert_loras_keep_the_base_output_and_train_only_the_loras(kind):
    base = make_moe(kind)
    inputs = _inputs()
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(base, _config(init_lora_weights=True))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MoeExpertsLora)}
    assert len(layers) == 2 and all(n.endswith("mlp.experts") for n in layers)
    with torch.no_grad():
        # the experts' LoRA path recomputes the base experts: equal on some CPUs, 1e-7-level rounding on others
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-6, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".molora_" in n for n in trainable)
    layer = next(iter(layers.values()))
    experts = layer.get_base_layer()
    n_experts, two_inter, hidden = experts.gate_up_proj.shape
    assert layer.molora_gate_up_A["default"].weight.shape == (n_experts, hidden, 8)
    assert layer.molora_gate_up_B["default"].weight.shape == (n_experts, 8, two_inter)
    assert layer.molora_down_A["default"].weight.shape == (n_experts, two_inter // 2, 8)
    assert layer.molora_rank_gate_up["default"].ranks().tolist() == [2] * n_experts
    assert layer._router_hook is not None  # the base router's probabilities feed the routing frequency
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    molora.update_importance(model)
    state = layer.molora_rank_down["default"]
    assert not torch.equal(state.freq, torch.full_like(state.freq, 0.25))
    # |theta * grad| is 0 for every element while B = 0 (A gets no gradient, B is 0): importance starts at 0
    assert float(state.importance.sum()) == 0


def test_expert_lora_matches_an_explicit_per_expert_computation():
    model = get_peft_model(make_moe("mixtral"), _config(dynamic_rank=None))
    layer = model.base_model.model.model.layers[0].mlp.experts
    experts = layer.get_base_layer()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 32, generator=gen)
    index = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 0]])
    weights = torch.rand(5, 2, generator=gen)
    s = layer.scaling["default"]
    a_gu, b_gu = layer.molora_gate_up_A["default"].weight, layer.molora_gate_up_B["default"].weight
    a_d, b_d = layer.molora_down_A["default"].weight, layer.molora_down_B["default"].weight
    expected = torch.zeros(5, 32)
    for t in range(5):
        for slot in range(2):
            e = int(index[t, slot])
            w_gu = experts.gate_up_proj[e] + s * (a_gu[e] @ b_gu[e]).T
            gate, up = (w_gu @ x[t]).chunk(2)
            h = experts.act_fn(gate) * up
            w_d = experts.down_proj[e] + s * (a_d[e] @ b_d[e]).T
            expected[t] += weights[t, slot] * (w_d @ h)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, index, weights), expected, rtol=1e-5, atol=1e-5)


def test_frequency_is_the_base_routers_probability_over_real_tokens():
    model = get_peft_model(make_moe("olmoe"), _config())
    moe_block = model.base_model.model.model.layers[1].mlp
    captured = {}

    def keep_logits(module, args, output):
        captured["logits"] = output[0].detach()

    handle = moe_block.gate.register_forward_hook(keep_logits)
    inputs = _inputs()
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    handle.remove()
    molora.update_importance(model)
    probs = torch.softmax(captured["logits"].float(), dim=-1)
    valid = inputs["attention_mask"].reshape(-1).bool()
    expected = 0.9 * 0.25 + 0.1 * probs[valid].mean(dim=0)
    for proj in ("gate_up", "down"):
        state = getattr(moe_block.experts, f"molora_rank_{proj}")["default"]
        torch.testing.assert_close(state.freq, expected)
        assert float(state.importance.sum()) > 0


def test_gates_as_frequency_source_use_the_top_k_weights():
    model = get_peft_model(make_moe("mixtral"), _config(dynamic_rank={"freq_source": "gates", "start_step": 1}))
    layer = model.base_model.model.model.layers[0].mlp.experts
    state = layer.molora_rank_down["default"]
    layer.train()
    x = torch.randn(3, 32)
    index = torch.tensor([[0, 1], [0, 2], [3, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    layer(x, index, weights)
    state.update_frequency()
    mean_gates = torch.tensor([0.6 + 0.5 + 0.1, 0.4, 0.5, 0.9]) / 3
    torch.testing.assert_close(state.freq, 0.9 * 0.25 + 0.1 * mean_gates)


def test_growth_is_continuous_within_budget_and_heterogeneous():
    model = get_peft_model(make_moe("qwen3_moe"), _config())
    _train(model, 5)
    banks = dr.dynamic_rank_banks(model)
    assert {b.key.rsplit(".", 1)[-1] for b in banks} == {"gate_up_proj", "down_proj"} and len(banks) == 4
    ranks = torch.cat([b.state.ranks() for b in banks])
    assert int(ranks.sum()) == len(banks) * 4 * 4  # budget: 4 banks x 4 experts x target 4
    assert int(ranks.max()) <= 8 and ranks.min() < 4 < ranks.max()


def test_save_load_and_compaction_are_exact(tmp_path):
    base_dir, adapter_dir, compact_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "compact"
    make_moe("mixtral").save_pretrained(base_dir)
    model = get_peft_model(MixtralForCausalLM.from_pretrained(base_dir), _config())
    _train(model, 5, check_continuity=False)
    model.eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    ranks = {k: v.ranks for k, v in model.get_rank_stats().items()}
    model.save_pretrained(adapter_dir)
    loaded = PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-6, rtol=1e-5)
    assert {k: v.ranks for k, v in loaded.get_rank_stats().items()} == ranks
    assert {k: v.ranks for k, v in dr.rank_stats_from_adapter(adapter_dir).items()} == ranks

    layer_ranks = molora.compact_adapter(adapter_dir, compact_dir)
    assert layer_ranks == {k: max(v) for k, v in ranks.items()}
    compact = PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(base_dir), compact_dir).eval()
    layer = compact.base_model.model.model.layers[0].mlp.experts
    assert layer.molora_down_A["default"].weight.shape[-1] == layer_ranks["model.layers.0.mlp.experts.down_proj"]
    with torch.no_grad():
        # dormant components only ever add exact zeros (bit-identical on some CPUs; GEMMs of another rank may round
        # differently on others)
        torch.testing.assert_close(compact(**inputs).logits, expected, atol=1e-6, rtol=1e-5)


def test_unload_restores_the_base_experts():
    base = make_moe("mixtral")
    model = get_peft_model(base, _config())
    restored = model.unload()
    assert type(restored.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    assert not restored.model.layers[0].mlp.gate._forward_hooks


def test_unsupported_expert_layouts_are_refused_with_the_reason():
    experts = make_moe("mixtral").model.layers[0].mlp.experts
    assert fused_experts_problem(experts) is None
    experts.is_transposed = True
    assert "is_transposed=True" in fused_experts_problem(experts)
    from transformers import GptOssConfig, GptOssForCausalLM

    gpt_oss = GptOssForCausalLM(GptOssConfig(num_local_experts=4, **COMMON))
    assert "has_bias=True" in fused_experts_problem(gpt_oss.model.layers[0].mlp.experts)  # biased, transposed

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 10, 8))
            self.down_proj = nn.Parameter(torch.zeros(4, 8, 4))
            self.act_fn = nn.SiLU()

    assert "not [E, 2I, H], [E, H, I]" in fused_experts_problem(Odd())

    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Odd()

    with pytest.raises(ValueError, match="looks like MoE experts, but gate_up_proj"):
        get_peft_model(Host(), _config(task_type=None))


def test_probs_frequency_needs_a_router_to_read():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = make_moe("mixtral").model.layers[0].mlp.experts

    with pytest.raises(ValueError, match="freq_source'\\]='gates'"):
        get_peft_model(Block(), _config(task_type=None))
    model = get_peft_model(Block(), _config(task_type=None, dynamic_rank={"freq_source": "gates", "start_step": 1}))
    assert isinstance(model.base_model.model.experts, MoeExpertsLora)


def test_trainer_with_checkpointing_grows_expert_ranks(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from molora.training import DynamicRankCallback

    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (16, 12), generator=gen).tolist()]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        gradient_checkpointing=True,
        dataloader_num_workers=0,
        seed=0,
    )
    model = get_peft_model(
        make_moe("mixtral"), _config(init_lora_weights=True, dynamic_rank={"experts_per_event": 11})
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    callback = DynamicRankCallback.install(trainer)
    trainer.train()
    schedule = callback.schedules["default"]
    assert (schedule.start, schedule.end, schedule.interval) == (1, 3, 1)  # 10% .. 70% of 5 steps
    assert [e["step"] for e in callback.events] == [1, 2, 3]
    ranks = torch.cat([b.state.ranks() for b in dr.dynamic_rank_banks(model)])
    assert int(ranks.sum()) == 4 * 4 * 4  # budget: 2 layers x 2 projections x 4 experts x target 4
    assert [h["dr/total_rank"] for h in trainer.state.log_history if "dr/total_rank" in h][-1] == 64


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_frequencies_count_each_token_once_with_activation_checkpointing(use_reentrant):
    model = get_peft_model(make_moe("mixtral"), _config())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    inputs = _inputs()
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    n_valid = int(inputs["attention_mask"].sum())
    for layer in model.base_model.model.model.layers:
        for proj in ("gate_up", "down"):
            assert int(getattr(layer.mlp.experts, f"molora_rank_{proj}")["default"]._freq_tokens) == n_valid


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_default_targets_include_the_experts(kind):
    """``target_modules=None`` on an MoE model adapted the attention only (the Llama names of the MLP do not exist
    there): the experts are the MLP, and a fresh adapter leaves the output unchanged."""
    base = make_moe(kind)
    inputs = _inputs()
    with torch.no_grad():
        reference = base(**inputs).logits
    model = get_peft_model(base, MoLoraConfig(r=4, num_experts=4, task_type="CAUSAL_LM"))
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, molora.MoLoraLayer)}
    assert {"q_proj", "v_proj", "experts"} <= adapted
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-6, rtol=1e-5)


def test_trainer_callbacks_and_mixed_batches_with_adapted_experts():
    """The experts' LoRA has no router of its own: ``molora_on_optimizer_step()`` (``MoLoraCallback``, which
    ``molora sft`` installs) raised an AttributeError at the first optimizer step; a mixed-adapter batch, which the
    experts cannot route per sample, and MiLoRA's module mode over the experts now fail saying so."""
    model = get_peft_model(make_moe("mixtral"), MoLoraConfig(r=4, target_modules=["q_proj", "experts"]))
    model.train()
    inputs = _inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    model.molora_on_optimizer_step()
    model.eval()
    with pytest.raises(ValueError, match="`adapter_names` .* not supported when a model's MoE experts are adapted"):
        model(**inputs, adapter_names=["default", "__base__"])
    module_mode = MoLoraConfig(
        r=4,
        num_experts=1,
        top_k=1,
        router="prompt",
        target_modules=["q_proj", "experts"],
        router_kwargs={"milora_mode": "module"},
    )
    with pytest.raises(ValueError, match="is a model's MoE experts"):
        get_peft_model(make_moe("mixtral"), module_mode)
