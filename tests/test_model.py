"""MoLoRA through PEFT's public API: injection, identity at init, aux losses, padding, statistics, adapters."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FACTORIES, make_gpt2, make_llama
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

import molora
from molora import MoLoraConfig, MoLoraLayer

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def molora_layers(model) -> dict[str, MoLoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLoraLayer)}


def test_import_registers_type_idempotently():
    assert PeftType("MOLORA") is PeftType.MOLORA
    importlib.reload(molora)
    importlib.reload(molora)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MOLORA] is molora.MoLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MOLORA] is molora.MoLoraModel
    assert list(PeftType).count(PeftType.MOLORA) == 1
    assert MoLoraConfig().peft_type == "MOLORA"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_adapter_leaves_outputs_unchanged(arch, batch):
    base = MODEL_FACTORIES[arch]()
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = get_peft_model(base, MoLoraConfig(num_experts=4, top_k=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(expected, got)


def test_default_targets_llama_and_shapes():
    model = get_peft_model(make_llama(), MoLoraConfig(r=4, num_experts=3, top_k=1, task_type="CAUSAL_LM"))
    layers = molora_layers(model)
    assert {name.rsplit(".", 1)[-1] for name in layers} == LLAMA_TARGETS
    assert len(layers) == 7 * 2
    q = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    assert q.molora_A["default"].weight.shape == (3, 64, 4)
    assert q.molora_B["default"].weight.shape == (3, 4, 64)
    assert q.molora_router["default"].weight.shape == (3, 64)
    assert torch.count_nonzero(q.molora_B["default"].weight) == 0


def test_default_targets_gpt2_conv1d():
    model = get_peft_model(make_gpt2(), MoLoraConfig(r=4, num_experts=2, top_k=1, task_type="CAUSAL_LM"))
    layers = molora_layers(model)
    assert len(layers) == 4 * 2
    c_attn = layers["base_model.model.transformer.h.0.attn.c_attn"]
    assert isinstance(c_attn.get_base_layer(), Conv1D)
    assert c_attn.molora_A["default"].weight.shape == (2, 48, 4)
    assert c_attn.molora_B["default"].weight.shape == (2, 4, 144)


def test_unknown_architecture_without_targets_fails_clearly():
    tiny = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(tiny, MoLoraConfig())


def test_default_targets_fall_back_to_peft_loras():
    """An architecture without a molora mapping (GPT-BigCode here) takes PEFT LoRA's default targets for it, as
    ``LoraConfig(target_modules=None)`` does; BART has molora's own (attention and MLP projections)."""
    from conftest import make_bart
    from peft import LoraConfig
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    bigcode = GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = get_peft_model(GPTBigCodeForCausalLM(bigcode), MoLoraConfig(r=2, num_experts=2, top_k=1))
    lora = get_peft_model(GPTBigCodeForCausalLM(bigcode), LoraConfig(r=2))
    lora_targets = {n for n, m in lora.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert set(molora_layers(model)) == lora_targets and lora_targets
    model = get_peft_model(make_bart(), MoLoraConfig(r=2, num_experts=2, top_k=1))
    names = {name.rsplit(".", 1)[-1] for name in molora_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    # ELECTRA has BERT's module names: its attention and MLP projections, not LoRA's query/value alone (nor the
    # discriminator head's dense layer)
    from transformers import ElectraConfig, ElectraForSequenceClassification

    electra = ElectraConfig(
        vocab_size=64,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    config = MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="SEQ_CLS")
    model = get_peft_model(ElectraForSequenceClassification(electra), config)
    names = {name.split("layer.0.", 1)[-1] for name in molora_layers(model)}
    assert names == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 8), (True, 16 / 8**0.5)])
def test_scaling(use_rslora, expected):
    model = get_peft_model(make_llama(), MoLoraConfig(r=8, lora_alpha=16, use_rslora=use_rslora))
    layer = next(iter(molora_layers(model).values()))
    assert layer.scaling["default"] == pytest.approx(expected)


def test_trainable_parameters_count_experts_and_routers():
    cfg = MoLoraConfig(r=4, num_experts=3, top_k=2, task_type="CAUSAL_LM")
    model = get_peft_model(make_llama(), cfg)
    expected = 0
    for layer in molora_layers(model).values():
        expected += 3 * 4 * (layer.in_features + layer.out_features) + 3 * layer.in_features
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert all(("molora_" in n) == p.requires_grad for n, p in model.named_parameters())


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-3])
def test_aux_loss_is_added_to_outputs_loss(batch, z_loss_coef):
    cfg = MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=0.05, z_loss_coef=z_loss_coef, task_type="CAUSAL_LM")
    model = get_peft_model(make_llama(), cfg)
    model.train()
    out = model(**batch)
    aux = model.molora_aux_loss()
    assert aux is not None and aux.requires_grad
    torch.testing.assert_close(out.loss, _lm_loss(out.logits, batch["labels"]) + aux)
    parts = model.molora_aux_losses()
    assert set(parts) == ({"balance", "z"} if z_loss_coef else {"balance"})
    expected = 0.05 * parts["balance"] + (z_loss_coef * parts["z"] if z_loss_coef else 0.0)
    torch.testing.assert_close(aux, expected)
    # with the megatron normalisation a balanced router scores ~1, never below 1 by much
    assert parts["balance"].item() > 0.9


def test_question_answering_evaluation_loss_includes_the_aux_loss():
    """A question-answering head's targets are ``start_positions``/``end_positions`` (``Trainer``'s label names for
    it), not ``labels``: without autograd (``Trainer.evaluate``) the aux losses were not computed, and ``eval_loss``
    left out the term the training loss has."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    base = BertForQuestionAnswering(config)
    cfg = MoLoraConfig(r=2, num_experts=4, top_k=2, aux_loss_coef=0.5, task_type="QUESTION_ANS")
    model = get_peft_model(base, cfg).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    starts, ends = torch.tensor([1, 2]), torch.tensor([3, 6])
    with torch.no_grad():
        out = model(input_ids=ids, start_positions=starts, end_positions=ends)
        aux = model.molora_aux_loss()
        qa = (F.cross_entropy(out.start_logits, starts) + F.cross_entropy(out.end_logits, ends)) / 2
    assert aux is not None and aux > 0
    torch.testing.assert_close(out.loss, qa + aux)
    with torch.no_grad():
        model(input_ids=ids)
    assert model.molora_aux_loss() is None


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"labels": torch.zeros(1)}, True),
        ({"start_positions": torch.zeros(1), "end_positions": torch.zeros(1)}, True),
        ({"next_sentence_label": torch.zeros(1)}, True),
        ({"mc_labels": torch.zeros(1)}, True),
        ({"labels": None, "input_ids": torch.zeros(1)}, False),
        ({"attention_mask": torch.zeros(1), "position_ids": torch.zeros(1)}, False),
    ],
)
def test_loss_targets_are_recognised(kwargs, expected):
    from molora.runtime import passes_loss_targets

    assert passes_loss_targets(kwargs) is expected


def test_no_aux_loss_when_coefficients_are_zero(batch):
    """``outputs.loss`` is the LM loss alone; ``molora_aux_loss()`` is 0 (not None: the README's custom loop adds it
    to its loss whatever the coefficients), and None for a forward that computes no aux losses."""
    model = get_peft_model(make_llama(), MoLoraConfig(aux_loss_coef=0.0, task_type="CAUSAL_LM"))
    out = model(**batch)
    assert model.molora_aux_loss().item() == 0.0 and model.molora_aux_losses() == {}
    torch.testing.assert_close(out.loss, _lm_loss(out.logits, batch["labels"]))
    (out.loss + model.molora_aux_loss()).backward()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert model.molora_aux_loss() is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "concat"])
def test_loss_reduction(batch, reduction):
    model = get_peft_model(make_llama(), MoLoraConfig(aux_loss_coef=1.0, loss_reduction=reduction))
    model(**batch)
    runtime = model.base_model.molora_runtime
    per_router = [r.losses.get("balance") for r in runtime._aux.values()]
    aux = model.molora_aux_loss()
    if reduction == "mean":
        torch.testing.assert_close(aux, torch.stack(per_router).mean())
    elif reduction == "sum":
        torch.testing.assert_close(aux, torch.stack(per_router).sum())
    else:
        inputs = molora.routers.balancing.AuxInputs.cat([r.inputs for r in runtime._aux.values()])
        torch.testing.assert_close(aux, molora.routers.balancing.load_balancing_loss(inputs, "megatron"))


def test_loss_fields_changed_on_a_live_model_are_checked_at_the_next_forward(batch, tmp_path):
    """The aux-loss fields are read from the live config at every forward, so a schedule may change them during
    training; a bad value fails at the next forward, naming the field, instead of acting as another (a negative or NaN
    coefficient as 0, an unknown reduction as "sum") until ``save_pretrained`` refuses it."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=0.5))
    config = model.peft_config["default"]
    model(**batch)
    half = model.molora_aux_loss().detach()
    bad = [
        ("aux_loss_coef", -1.0, r"Adapter 'default': `aux_loss_coef`=-1.0 must be >= 0"),
        ("aux_loss_coef", float("nan"), r"`aux_loss_coef`=nan must be a finite number"),
        ("z_loss_coef", -5.0, r"`z_loss_coef`=-5.0 must be >= 0"),
        ("loss_reduction", "max", r"`loss_reduction`='max' is not supported; allowed values: \['mean', 'sum'"),
        ("balance_loss_type", "bogus", r"`balance_loss_type`='bogus' is not supported; allowed values"),
    ]
    for field, value, message in bad:
        good = getattr(config, field)
        setattr(config, field, value)
        with pytest.raises(ValueError, match=message):
            model(**batch)
        setattr(config, field, good)
    # a valid change takes effect (a schedule doubling the coefficient doubles the weighted loss)
    config.aux_loss_coef = 1.0
    model(**batch)
    torch.testing.assert_close(model.molora_aux_loss().detach(), 2 * half)
    # numpy scalars (a schedule's float32 arithmetic) are numbers: kept as the same Python floats, which the adapter's
    # JSON can hold; also one equal to the value checked before (0.5 == np.float32(0.5))
    for value in (np.float32(0.25), np.float32(0.5), np.float32(0.5)):
        config.aux_loss_coef = value
        model(**batch)
        assert type(config.aux_loss_coef) is float and config.aux_loss_coef == float(value)
    torch.testing.assert_close(model.molora_aux_loss().detach(), half)
    model.save_pretrained(tmp_path)


def test_a_model_pickled_by_an_earlier_molora_gets_the_runtimes_new_attributes(monkeypatch):
    """``torch.save(model)`` pickles the runtime; one pickled before an attribute was added lacks it, and the first
    forward after loading failed (``_checked_loss_fields``): unpickling fills in a fresh runtime's defaults."""
    import pickle

    from molora.runtime import MoLoraRuntime

    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=2, top_k=1))
    current = MoLoraRuntime.__getstate__

    def older_state(self):
        state = current(self)
        del state["_checked_loss_fields"]
        return state

    monkeypatch.setattr(MoLoraRuntime, "__getstate__", older_state)
    restored = pickle.loads(pickle.dumps(model))
    monkeypatch.undo()
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits)


def test_padding_never_counts_in_losses_or_statistics(batch):
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, task_type="CAUSAL_LM"))
    model(**batch)
    aux = model.molora_aux_loss().detach()
    stats = model.get_routing_stats()
    n_real = int(batch["attention_mask"].sum())
    assert {s.tokens for s in stats.values()} == {n_real}

    # different token ids under the padding: identical losses and statistics
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, :4] = torch.tensor([5, 17, 33, 60])
    model.reset_routing_stats()
    model(**other)
    torch.testing.assert_close(model.molora_aux_loss().detach(), aux)
    other_stats = model.get_routing_stats()
    for name, s in stats.items():
        assert other_stats[name].load == pytest.approx(s.load)
        assert other_stats[name].entropy == pytest.approx(s.entropy, rel=1e-5)


@pytest.mark.parametrize(
    "router, k, expected_per_token",
    [("topk", 1, 1.0), ("topk", 3, 3.0), ("soft", 2, 4.0)],
)
def test_routing_statistics(batch, router, k, expected_per_token):
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=k, router=router))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    stats = model.get_routing_stats()
    assert set(stats) == {n.removeprefix("base_model.model.") for n in molora_layers(model)}
    n_real = int(batch["attention_mask"].sum())
    for s in stats.values():
        assert s.tokens == 2 * n_real
        assert sum(s.load) == pytest.approx(1.0)
        assert s.experts_per_token == pytest.approx(expected_per_token)
        assert 0.0 <= s.normalized_entropy <= 1.0
        assert sum(s.prob_mass) == pytest.approx(1.0, rel=1e-5)
        assert s.max_violation >= 0
        assert set(s.to_dict()) >= {"tokens", "load", "entropy", "experts_per_token"}
    model.reset_routing_stats()
    assert model.get_routing_stats() == {}


def test_stats_can_be_turned_off(batch):
    model = get_peft_model(make_llama(), MoLoraConfig(track_routing_stats=False))
    model(**batch)
    assert model.get_routing_stats() == {}


def test_gradients_reach_experts_and_routers(batch):
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, task_type="CAUSAL_LM"))
    model.train()
    model(**batch).loss.backward()
    layer = molora_layers(model)["base_model.model.model.layers.0.mlp.up_proj"]
    assert layer.molora_B["default"].weight.grad.abs().sum() > 0
    assert layer.molora_router["default"].weight.grad.abs().sum() > 0  # from the balance loss at least
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("backward", [False, True])
def test_forwards_do_not_keep_their_autograd_graphs_alive(batch, backward):
    """Each training forward's aux losses carry the router's autograd node, which holds the forward's delivery state
    (``ForwardAux``). That state held the losses: a reference cycle through the graph that Python's garbage collector
    cannot see, so every forward's graph (with its saved activations when no backward ran, with the parameters it
    reached after one) stayed alive: memory grew with every step, and a deleted adapter's weights were never freed."""
    import gc
    import weakref

    from molora.runtime import ForwardAux

    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False))
    model.add_adapter("other", MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False))
    model.set_adapter("other")
    model.train()
    for _ in range(4):
        out = model(**batch)
        if backward:
            out.loss.backward()
        del out
    gc.collect()
    config = model.base_model.peft_config
    alive = [obj for obj in gc.get_objects() if isinstance(obj, ForwardAux) and obj.peft_config is config]
    assert len(alive) == 1  # the runtime's current one
    bank = weakref.ref(next(m for m in model.modules() if isinstance(m, MoLoraLayer)).molora_A["other"].weight)
    model.delete_adapter("other")
    gc.collect()
    assert bank() is None


def test_multiple_adapters_set_adapter_and_disable(batch):
    base = make_llama()
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = get_peft_model(base, MoLoraConfig(num_experts=2, top_k=1, init_lora_weights=False))
    model.add_adapter("second", MoLoraConfig(num_experts=3, top_k=2, router="soft", init_lora_weights=False))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        first = model(**inputs).logits
        model.set_adapter("second")
        second = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        model.set_adapter("default")
        first_again = model(**inputs).logits
    assert not torch.allclose(first, second)
    assert torch.equal(first, first_again)
    assert torch.equal(disabled, expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)


def test_unload_restores_base_modules(batch):
    base = make_llama()
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = get_peft_model(base, MoLoraConfig(init_lora_weights=False))
    restored = model.unload()
    assert not molora_layers(restored)
    assert type(restored.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        got = restored(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(expected, got)
    assert not restored._forward_pre_hooks and not restored._forward_hooks
    assert not restored.model_tags  # the "molora" tag goes with the adapters


def test_the_model_card_is_tagged_molora(tmp_path):
    """PEFT tags a LoRA adapter's card ``lora`` (and TRL its trainers' models): a MoLoRA adapter's card saved by
    ``save_pretrained`` lists ``molora``, the tag it is found by on the hub; a tag of the user's own is kept."""
    base = make_llama()
    base.add_model_tags(["mine"])
    model = get_peft_model(base, MoLoraConfig())
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "- molora" in front and "- mine" in front
    assert model.unload().model_tags == ["mine"]


@pytest.mark.parametrize("how", ["get_peft_model_again", "inject_adapter_in_model_twice"])
def test_a_second_tuner_on_the_same_model_keeps_one_runtime(batch, how):
    """`get_peft_model` run again on the same base model (a notebook cell run twice), or PEFT's low-level
    `inject_adapter_in_model` for a second adapter, builds a second tuner on a model whose layers already record into
    the first tuner's runtime: the second must drive that runtime with one set of model hooks, or `outputs.loss`
    silently loses the aux term and the routing statistics stop."""
    from peft import inject_adapter_in_model

    def config(targets):
        return MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=1.0, init_lora_weights=False, target_modules=targets)

    base = make_llama()
    with pytest.warns(UserWarning):  # PEFT's "already found a `peft_config`" / "modify a model ... second time"
        if how == "get_peft_model_again":
            get_peft_model(base, config(["q_proj", "v_proj"]))
            model = get_peft_model(base, config(["q_proj", "v_proj"]))
            runtime, net = model.base_model.molora_runtime, model.base_model.model
        else:
            net = inject_adapter_in_model(config(["q_proj", "v_proj"]), base, adapter_name="a")
            net = inject_adapter_in_model(config(["q_proj"]), net, adapter_name="b")
            model, runtime = net, net._molora_runtime
    assert len(net._forward_pre_hooks) == 1 and len(net.model._forward_pre_hooks) == 1
    assert all(layer._molora_runtime is runtime for layer in molora_layers(net).values())
    model.train()
    for step in (1, 2):
        out = model(**batch)
        aux = runtime.user_aux_loss()
        assert aux is not None and aux.item() > 0.5  # the balance loss with coefficient 1 (about 1 when balanced)
        torch.testing.assert_close(out.loss, _lm_loss(out.logits, batch["labels"]) + aux)
        out.loss.backward()
        stats = runtime.routing_stats(None)
        assert stats and all(s.tokens == 20 * step for s in stats.values())  # 20 non-padding tokens per forward


@pytest.mark.parametrize("lora_first", [True, False])
def test_a_lora_adapter_on_the_same_model_is_left_to_peft(batch, lora_first):
    """A PEFT LoRA adapter injected into the same base (its config in the model's shared `peft_config`): the
    runtime's per-forward check of the aux-loss fields read every config as a MoLoraConfig and raised
    AttributeError at the first forward."""
    from peft import LoraConfig

    base = make_llama()
    configs = [
        ("lora", LoraConfig(target_modules=["k_proj"])),
        ("mo", MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=1.0, target_modules=["q_proj", "v_proj"])),
    ]
    with pytest.warns(UserWarning):
        for name, config in configs if lora_first else configs[::-1]:
            model = get_peft_model(base, config, adapter_name=name)
    model.train()
    out = model(**batch)
    aux = base._molora_runtime.user_aux_loss()
    assert aux is not None and aux.item() > 0.5
    torch.testing.assert_close(out.loss, _lm_loss(out.logits, batch["labels"]) + aux)


def test_merge_fails_clearly_and_changes_nothing(batch):
    model = get_peft_model(make_llama(), MoLoraConfig(init_lora_weights=False))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        before = model(**inputs).logits
    with pytest.raises(ValueError, match="routed"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="routed"):
        model.merge_adapter()
    assert molora_layers(model)
    with torch.no_grad():
        assert torch.equal(before, model(**inputs).logits)


def test_bf16_adapter_weights_with_fp32_inputs(batch):
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    model.train()
    out = model(**batch)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 32), (2, 5, 32)])
def test_fp32_router_scores_keep_the_16_bit_input_for_backward(x_dtype, w_dtype, shape):
    """The routers score in fp32 (`molora._amp.fp32_linear`): autograd kept the upcast copy of a bf16/fp16 input,
    a `[T, d]` fp32 tensor per adapted layer. Now it keeps the input itself, with the same logits and router
    gradients."""
    from molora._amp import fp32_linear

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=x_dtype, requires_grad=True)
    w = torch.randn(8, 32, dtype=w_dtype, requires_grad=True)
    grad = torch.randn(*shape[:-1], 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fp32_linear(x, w)
    assert out.dtype == torch.float32
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape == x.shape]
    out.backward(grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = F.linear(x_ref.float(), w_ref.float())
    expected.backward(grad)
    assert torch.equal(out, expected)
    # the input's gradient in the input's precision (as autocast computes a 16-bit linear's), the weight's in fp32
    assert x.grad.dtype == x_dtype
    torch.testing.assert_close(
        x.grad.float(), x_ref.grad.float(), rtol=2e-2, atol=2e-2 * x_ref.grad.abs().max().item()
    )
    assert w.grad.dtype == w_dtype and torch.equal(w.grad, w_ref.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the region's matrix products would run in bf16
        assert torch.equal(fp32_linear(x, w), expected)


def test_fp32_router_scores_of_fp16_inputs_keep_the_range_and_the_transforms():
    """An fp16 input's gradient stays an fp32 product cast once (a GradScaler-sized upstream gradient cast to fp16
    first overflowed where the product does not), and forward-mode AD and `torch.func` transforms work on the
    16-bit path as on the plain expression."""
    import torch.autograd.forward_ad as fwAD

    from molora._amp import fp32_linear

    torch.manual_seed(0)
    x = torch.randn(4, 32, dtype=torch.float16, requires_grad=True)
    w = (torch.randn(8, 32) * 1e-3).requires_grad_()
    fp32_linear(x, w).backward(torch.full((4, 8), 1e5))  # 1e5 > fp16's largest value, 65504
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 100
    tangent = torch.randn(4, 32, dtype=torch.float16)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), tangent)
        jvp = fwAD.unpack_dual(fp32_linear(dual, w.detach().requires_grad_())).tangent
    torch.testing.assert_close(jvp, F.linear(tangent.float(), w.detach()))
    per_sample = torch.func.vmap(torch.func.grad(lambda row: fp32_linear(row, w.detach()).square().sum()))
    grads = per_sample(x.detach().to(torch.bfloat16))
    assert grads.shape == (4, 32) and grads.dtype == torch.bfloat16


@pytest.mark.parametrize("amp", [False, True], ids=["bf16", "bf16_base_fp32_adapters_autocast"])
def test_bf16_training_step_memory_stays_near_loras(amp):
    """A bf16 training step's own tensors (activations, gradients) against PEFT LoRA r=16's: 1.78x (pure bf16) and
    1.56x (bf16 base, fp32 adapters, autocast) while every router kept an fp32 copy of its layer's input for
    backward, at d=1024; about 1.03x and 0.97x since (`molora bench --dtype bfloat16 [--amp]` reports the same
    column)."""
    from molora import bench

    rows = bench.bench_train_step(
        512, 2, 2, 64, 8, 8, 2, ["lora r·k", "molora auto"], 0, 1, dtype=torch.bfloat16, amp=amp
    )
    molora_row = next(row for row in rows if row.candidate == "molora auto")
    # here: 1.06x and 1.11x (1.81x and 1.68x before); autocast's bf16 copies of the 4x wider bank weigh more at
    # few tokens
    assert molora_row.step_mem_vs_lora < 1.25, molora_row


@pytest.mark.parametrize("router", ["topk", "topp"])
@pytest.mark.parametrize("own_loss", [False, True], ids=["outputs_loss", "loss_from_logits"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(batch, use_reentrant, own_loss, router):
    """Also when the loss is computed from the logits without labels (the aux gradient then comes from the layers):
    reentrant checkpointing's first pass runs without autograd and used to record no losses, so the recompute's
    "mean" weights counted only the routers recomputed so far (twice the aux gradient in a 2-layer model)."""

    def grads(checkpointing: bool):
        model = get_peft_model(
            make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False, router=router)
        )
        torch.manual_seed(3)
        for layer in molora_layers(model).values():
            layer.molora_router["default"].reset_parameters()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        if own_loss:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = _lm_loss(out.logits, batch["labels"])
        else:
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, ref = grads(False)
    loss_ckpt, got = grads(True)
    torch.testing.assert_close(loss_ckpt, loss_ref)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_generate_works_and_decode_steps_skip_aux_losses(batch):
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16)
    runtime = model.base_model.molora_runtime
    assert runtime.context.is_decode
    assert model.molora_aux_loss() is None
    tokens = {s.tokens for s in model.get_routing_stats().values()}
    # prefill counts the real prompt tokens, then 3 decode steps of 2 tokens each
    assert tokens == {int(batch["attention_mask"].sum()) + 3 * 2}


def test_decode_step_statistics_are_reduced_in_batches_with_the_same_totals(batch, monkeypatch):
    """Cached decode steps keep their routing records and reduce them together (at most _MAX_DEFERRED_FORWARDS at a
    time); the totals equal those of one reduction per step, and reading the statistics counts everything."""
    import molora.runtime as runtime_module

    def generate_stats(max_deferred, new_tokens):
        monkeypatch.setattr(runtime_module, "_MAX_DEFERRED_FORWARDS", max_deferred)
        model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False))
        runtime = model.base_model.molora_runtime
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, min_new_tokens=new_tokens)
        deferred = len(runtime._deferred)
        return model.get_routing_stats(), deferred, len(runtime._deferred)

    per_step, deferred_0, _ = generate_stats(0, 9)
    batched, deferred_before_read, deferred_after_read = generate_stats(4, 9)
    assert deferred_0 == 0 and 1 <= deferred_before_read <= 4 and deferred_after_read == 0
    assert per_step.keys() == batched.keys()
    for name, stats in per_step.items():
        other = batched[name]
        assert stats.tokens == other.tokens == int(batch["attention_mask"].sum()) + 8 * 2
        for field in ("load", "gate_mass", "prob_mass"):
            torch.testing.assert_close(torch.tensor(getattr(other, field)), torch.tensor(getattr(stats, field)))
        assert abs(other.entropy - stats.entropy) < 1e-6


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("router", ["topp", "dynmole", "topk"])
def test_a_forwards_statistics_are_one_reduction_whatever_the_assignments(batch, router, padded, monkeypatch):
    """Routers that choose a variable number of experts per token give each layer its own number of assignments:
    their records went through one reduction per layer (~20 operators each). The lists are padded into one; the
    statistics equal each layer's own reduction. (The grouped path: on the dense path the top-p routers list all
    (token, expert) pairs, the same number in every layer.)"""
    import molora.runtime as runtime_module

    config = MoLoraConfig(num_experts=4, top_k=2, router=router, init_lora_weights=False, kernel="grouped")
    model = get_peft_model(make_llama(), config)
    runtime = model.base_model.molora_runtime
    inputs = batch if padded else {"input_ids": batch["input_ids"][1:]}
    with torch.no_grad():
        model(**inputs)
    pending = dict(runtime._pending)
    if router != "topk":
        assert len({r.expert_index.numel() for r in pending.values()}) > 1  # the case this is about
    calls = []
    real = runtime_module._stats_rows
    monkeypatch.setattr(runtime_module, "_stats_rows", lambda raws: calls.append(len(raws)) or real(raws))
    stats = model.get_routing_stats()
    assert calls == [14]
    alone = {key: runtime_module.summarize_row(real([raw]).double()[0]) for key, raw in pending.items()}
    for (layer, _), want in alone.items():
        got = stats[layer]
        assert got.tokens == want.tokens == (int(batch["attention_mask"].sum()) if padded else 12)
        for field in ("load", "gate_mass", "prob_mass"):
            torch.testing.assert_close(torch.tensor(getattr(got, field)), torch.tensor(getattr(want, field)))
        assert abs(got.entropy - want.entropy) < 1e-6 and abs(got.experts_per_token - want.experts_per_token) < 1e-9


def test_peft_model_from_pretrained_in_process(tmp_path, batch):
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert isinstance(loaded.peft_config["default"], MoLoraConfig)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def _router_grads(model) -> dict[str, torch.Tensor]:
    return {n: m.molora_router["default"].weight.grad.clone() for n, m in molora_layers(model).items()}


@pytest.mark.parametrize("how", ["logits_only", "custom_loop_adds_aux", "scaled_outputs_loss", "aux_alone"])
@pytest.mark.parametrize("router", ["topk", "topp"])
def test_aux_gradient_reaches_routers_exactly_once_whoever_computes_the_loss(batch, how, router):
    """The routers get d(aux) once: via outputs.loss, via molora_aux_loss(), or from the layers themselves (the
    top-k router's own autograd node; an identity node on the layer output for the others, e.g. top-p)."""

    def run(mode):
        model = get_peft_model(
            make_llama(),
            MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=0.5, init_lora_weights=False, router=router),
        )
        model.train()
        if mode == "reference":
            model(**batch).loss.backward()
        elif mode == "reference_aux_alone":
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            runtime = model.base_model.molora_runtime
            runtime.forward_aux.delivered = True  # plain autograd of the aux loss, layer attachments switched off
            runtime.aux_loss().backward()
        else:
            out = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=(batch["labels"] if mode == "scaled_outputs_loss" else None),
            )
            if mode == "logits_only":
                _lm_loss(out.logits, batch["labels"]).backward()
            elif mode == "custom_loop_adds_aux":
                (_lm_loss(out.logits, batch["labels"]) + model.molora_aux_loss()).backward()
            elif mode == "scaled_outputs_loss":
                (0.25 * out.loss).backward()
            elif mode == "aux_alone":
                model.molora_aux_loss().backward()
        return _router_grads(model)

    reference = run("reference_aux_alone" if how == "aux_alone" else "reference")
    got = run(how)
    factor = 0.25 if how == "scaled_outputs_loss" else 1.0
    for name in reference:
        torch.testing.assert_close(got[name], factor * reference[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("factory", [make_llama, make_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("router", ["topk", "topp"])
def test_backbone_called_without_its_head_is_a_forward_of_its_own(batch, factory, router):
    """TRL's distillation trainers compute their loss from the hidden states of the backbone alone
    (``LlamaForCausalLM.model``). That call begins its own forward: its padding mask, its aux losses and their
    gradient for the routers, as a call of the whole model on the same tokens gives them; it used to record into the
    last model-level call's forward (after ``generate``: a generation's, no aux loss, no gradient for the routers)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def run(through_backbone: bool):
        cfg = MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=0.5, init_lora_weights=False, router=router)
        model = get_peft_model(factory(), cfg)
        model.eval()
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        model.train()
        model.reset_routing_stats()
        if through_backbone:
            backbone = model.get_base_model().base_model
            with pytest.raises(IndexError):  # a call that raises must not leave its forward open for the next one
                backbone(input_ids=torch.full((1, 3), 10**6))
            hidden = backbone(**inputs).last_hidden_state
        else:
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
        hidden.pow(2).mean().backward()
        tokens = {name: stats.tokens for name, stats in model.get_routing_stats().items()}
        return model.molora_aux_loss(), _router_grads(model), tokens

    aux, grads, tokens = run(through_backbone=True)
    want_aux, want_grads, want_tokens = run(through_backbone=False)
    assert aux is not None
    torch.testing.assert_close(aux, want_aux)
    assert tokens == want_tokens and set(tokens.values()) == {int(batch["attention_mask"].sum())}
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("how", ["logits_only", "reentrant_checkpointing"])
@pytest.mark.parametrize("router", ["topk", "topp"])
def test_frozen_routers_losses_still_train_the_experts_before_them(batch, how, router):
    """With the routers frozen, the aux losses still depend on the experts of earlier layers (through the routers'
    inputs): ``outputs.loss`` trains them, and so must the layers' own delivery (a loss computed from the logits,
    reentrant checkpointing), which was skipped for a frozen router (6.5e-3 off in a 3.4e-2 gradient)."""

    def run(mode):
        model = get_peft_model(
            make_llama(),
            MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=1.0, init_lora_weights=False, router=router),
        )
        for name, param in model.named_parameters():
            if "molora_router" in name:
                param.requires_grad_(False)
        if mode == "reentrant_checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        if mode == "logits_only":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            _lm_loss(out.logits, batch["labels"]).backward()
        else:
            model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference, got = run("reference"), run(how)
    first = next(name for name in reference if "layers.0.self_attn.q_proj.molora_A" in name)
    assert reference[first].abs().max() > 1e-4
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "between", ["no_grad", "no_grad_with_labels", "generate", "adapter_disabled", "eval_with_grad"]
)
@pytest.mark.parametrize("router", ["topk", "topp"])
def test_aux_gradient_of_a_forward_survives_other_forwards_before_its_backward(batch, between, router):
    """A forward's aux gradient reaches the routers when another forward runs before its backward (TRL's DPOTrainer
    runs the reference forward, adapter disabled, between the policy forward and the backward). Each forward's
    delivery state used to be the runtime's, so any later forward switched the earlier one's delivery off."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def run(interleave: bool):
        model = get_peft_model(
            make_llama(),
            MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=0.5, init_lora_weights=False, router=router),
        )
        model.train()
        out = model(**inputs)
        if interleave:
            if between == "no_grad":
                with torch.no_grad():
                    model(**inputs)
            elif between == "no_grad_with_labels":
                with torch.no_grad():
                    model(**batch)
            elif between == "generate":
                model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
            elif between == "adapter_disabled":
                with torch.no_grad(), model.disable_adapter():
                    model(**inputs)
            elif between == "eval_with_grad":
                model.eval()
                model(**inputs)
                model.train()
        _lm_loss(out.logits, batch["labels"]).backward()
        return _router_grads(model)

    reference, got = run(False), run(True)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("router", ["topk", "topp"])
def test_checkpointed_forward_with_a_reference_forward_before_its_backward(batch, use_reentrant, router):
    """Activation checkpointing recomputes a layer in backward, after the reference forward (adapter disabled) that
    DPO-style trainers run in between: the recompute routes with its own forward's mask, delivers that forward's aux
    gradient (reentrant: from the recompute itself) and counts no statistics again."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def run(checkpointing: bool):
        model = get_peft_model(
            make_llama(),
            MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=0.5, init_lora_weights=False, router=router),
        )
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        out = model(**inputs)
        if checkpointing:
            with torch.no_grad(), model.disable_adapter():
                model(input_ids=batch["input_ids"][:1])  # another shape and no padding: a different context
        _lm_loss(out.logits, batch["labels"]).backward()
        return _router_grads(model), {name: s.tokens for name, s in model.get_routing_stats().items()}

    (reference, ref_tokens), (got, tokens) = run(False), run(True)
    assert tokens == ref_tokens
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("router", ["topk", "topp"])
def test_two_forwards_in_one_loss_each_deliver_their_aux_gradient(batch, router):
    """Two forwards whose logits enter one loss (R-Drop, consistency losses): the routers get the aux gradient of
    both, as when both forwards' ``outputs.loss`` are added (it used to be the second forward's only)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    second = dict(inputs, input_ids=batch["input_ids"].flip(1))

    def run(with_labels: bool):
        model = get_peft_model(
            make_llama(),
            MoLoraConfig(num_experts=4, top_k=2, aux_loss_coef=0.5, init_lora_weights=False, router=router),
        )
        model.train()
        if with_labels:
            first_out = model(**inputs, labels=batch["labels"])
            second_out = model(**second, labels=batch["labels"])
            (first_out.loss + second_out.loss).backward()
        else:
            first_out, second_out = model(**inputs), model(**second)
            (_lm_loss(first_out.logits, batch["labels"]) + _lm_loss(second_out.logits, batch["labels"])).backward()
        return _router_grads(model)

    reference, got = run(True), run(False)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-7, msg=name)


def test_unknown_adapter_name_in_the_molora_accessors_is_an_error(batch):
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2))
    model.train()
    model(**batch)
    for accessor in (model.get_routing_stats, model.molora_aux_loss, model.molora_aux_losses):
        with pytest.raises(ValueError, match=r"adapter_name='nope' is not an adapter of this model.*\['default'\]"):
            accessor("nope")
    assert model.get_routing_stats("default") and model.molora_aux_losses("default")


def test_bf16_base_adapter_loaded_for_inference_is_frozen(tmp_path):
    """Regression: PEFT's fp32 upcast re-wrapped molora_A/B of a bf16 base as new trainable Parameters."""
    get_peft_model(make_llama(), MoLoraConfig(num_experts=2, top_k=1)).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama().to(torch.bfloat16), tmp_path)
    assert not [n for n, p in loaded.named_parameters() if p.requires_grad]
    layer = next(iter(molora_layers(loaded).values()))
    assert layer.molora_A["default"].weight.dtype == torch.float32
    model = get_peft_model(make_llama().to(torch.bfloat16), MoLoraConfig(num_experts=2, top_k=1))
    model.add_adapter("second", MoLoraConfig(num_experts=2, top_k=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(".second" in n for n in trainable)


def test_delete_adapter(batch):
    base = make_llama()
    model = get_peft_model(base, MoLoraConfig(num_experts=2, top_k=1, init_lora_weights=False))
    model.add_adapter("second", MoLoraConfig(num_experts=3, top_k=1, init_lora_weights=False))
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    for layer in molora_layers(model).values():
        assert set(layer.molora_A) == set(layer.molora_router) == {"default"}
        assert "second" not in layer.num_experts
    model(**batch)
    assert all(":" not in key for key in model.get_routing_stats())


def test_add_weighted_adapter_refuses_clearly():
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=2, top_k=1, target_modules=["q_proj"]))
    model.add_adapter("second", MoLoraConfig(num_experts=2, top_k=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="add_weighted_adapter.*not supported.*adapter_names="):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "combined")
    assert list(model.peft_config) == ["default", "second"]


def test_deleted_adapter_leaves_no_statistics_behind(batch):
    """A deleted adapter's routing statistics go with it; a new adapter of that name (other shapes) starts clean."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=2, top_k=1, target_modules=["q_proj"]))
    model.add_adapter("second", MoLoraConfig(num_experts=4, top_k=2, target_modules=["q_proj"]))
    model.eval()
    n_rows = batch["input_ids"].shape[0]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], adapter_names=["second"] * n_rows)  # counted, not yet reduced
        model.set_adapter("second")
        model(input_ids=batch["input_ids"])
    assert model.get_routing_stats(adapter_name="second")
    model(input_ids=batch["input_ids"][:1])  # a record waiting when the adapter goes
    model.delete_adapter("second")
    assert all(":" not in key for key in model.get_routing_stats())  # only "default" is left
    model.add_adapter("second", MoLoraConfig(num_experts=3, top_k=1, target_modules=["q_proj"]))
    assert model.get_routing_stats(adapter_name="second") == {}
    model.set_adapter("second")
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    stats = model.get_routing_stats(adapter_name="second")
    n_tokens = batch["input_ids"].numel()
    assert {len(s.load) for s in stats.values()} == {3} and {s.tokens for s in stats.values()} == {n_tokens}


def test_restoring_statistics_brings_back_no_deleted_adapter(batch):
    """A statistics mark taken before ``delete_adapter`` (``RoutingStatsCallback`` takes one each step) brings back
    the counts of the adapters still there, not the deleted one's, also when an adapter of its name (other shapes) was
    added again; the kept adapter's counts are those of the mark."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=2, top_k=1, target_modules=["q_proj"]))
    model.add_adapter("second", MoLoraConfig(num_experts=4, top_k=2, target_modules=["q_proj"]))
    model.eval()
    n_rows = batch["input_ids"].shape[0]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], adapter_names=["default", "second"] + ["default"] * (n_rows - 2))
    kept = model.get_routing_stats(adapter_name="default")
    mark = model.routing_stats_checkpoint()
    model.delete_adapter("second")
    model.restore_routing_stats(mark)
    assert all(":" not in key for key in model.get_routing_stats())  # only "default" is left
    model.add_adapter("second", MoLoraConfig(num_experts=3, top_k=1, target_modules=["q_proj"]))
    model.restore_routing_stats(mark)
    assert model.get_routing_stats(adapter_name="second") == {}
    model.set_adapter("second")
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:1])
    stats = model.get_routing_stats()
    assert {len(s.load) for k, s in stats.items() if k.endswith(":second")} == {3}
    assert {s.tokens for k, s in stats.items() if k.endswith(":second")} == {batch["input_ids"][:1].numel()}
    assert {k.removesuffix(":default"): s for k, s in stats.items() if k.endswith(":default")} == kept
    for bad in ({"model.layers.0.self_attn.q_proj": 1}, None, {("a", "b"): 1.0}):
        with pytest.raises(TypeError, match="takes what routing_stats_checkpoint\\(\\) returned"):
            model.restore_routing_stats(bad)
    assert model.get_routing_stats() == stats  # a refused mark changes nothing


def test_encoder_sequence_classification_with_modules_to_save(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50, num_labels=3
    )
    base = BertForSequenceClassification(config).eval()
    inputs = {"input_ids": torch.randint(1, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    inputs["attention_mask"][1, 5:] = 0
    with torch.no_grad():
        expected = base(**inputs).logits
    model = get_peft_model(
        base, MoLoraConfig(num_experts=2, top_k=1, modules_to_save=["classifier"], task_type="SEQ_CLS")
    )
    assert len(molora_layers(model)) == 6 * 2
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected)
    model.train()
    out = model(**inputs, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert model.molora_aux_loss() is not None
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(BertForSequenceClassification(config).eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, before)


def test_concat_reduction_warns_only_when_its_gradient_cannot_be_delivered(batch, recwarn):
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, loss_reduction="concat"))
    model.train()
    model(**batch).loss.backward()  # through outputs.loss: delivered, no warning
    assert not [w for w in recwarn if "concat" in str(w.message)]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.warns(UserWarning, match="loss_reduction='concat'"):
        _lm_loss(out.logits, batch["labels"]).backward()


def test_statistics_survive_switching_between_inference_mode_and_training(batch):
    """Regression: totals created under torch.inference_mode() could not be updated in place afterwards."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2))
    with torch.inference_mode():
        model(**batch)
        model(**batch)
    model.train()
    model(**batch).loss.backward()
    model(**batch)
    with torch.inference_mode():
        model(**batch)
    n_real = int(batch["attention_mask"].sum())
    assert {s.tokens for s in model.get_routing_stats().values()} == {5 * n_real}


def test_deepcopy_gives_an_independent_working_model(batch):
    import copy

    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False))
    clone = copy.deepcopy(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, model(**inputs).logits)
    n_real = int(batch["attention_mask"].sum())
    # each copy's padding mask and statistics belong to its own forwards
    assert {s.tokens for s in clone.get_routing_stats().values()} == {n_real}
    assert {s.tokens for s in model.get_routing_stats().values()} == {n_real}
    clone.train()
    out = clone(**batch)
    torch.testing.assert_close(out.loss, _lm_loss(out.logits, batch["labels"]) + clone.molora_aux_loss())
    # after a training forward (the runtime then holds autograd graphs, which cannot be deep-copied: it raised), a copy
    # starts clean, keeps the statistics, and trains with its own aux loss
    again = copy.deepcopy(clone)
    assert again.get_routing_stats().keys() == clone.get_routing_stats().keys()
    out = again(**batch)
    out.loss.backward()
    assert again.molora_aux_loss() is not None
    routers = [p.grad for n, p in again.named_parameters() if "molora_router" in n]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)


def test_tokens_flattened_in_order_keep_their_padding_mask():
    """OPT's decoder layers feed their MLP (``fc1``/``fc2``) the tokens as ``[batch * seq, d]``: padding was counted
    there, in the statistics and the balance loss (which changed with the ids of masked tokens)."""
    from conftest import make_opt

    model = get_peft_model(make_opt(), MoLoraConfig(r=2, num_experts=4, top_k=2, task_type="CAUSAL_LM")).eval()
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    balance = []
    for pad_id in (0, 7):
        ids[0, :4] = pad_id
        model.reset_routing_stats()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        balance.append(model.molora_aux_losses()["balance"])
        stats = model.get_routing_stats()
        assert stats["model.decoder.layers.0.fc1"].tokens == stats["model.decoder.layers.0.fc2"].tokens == 16
    torch.testing.assert_close(balance[0], balance[1], rtol=0, atol=0)


def test_molora_training_is_reachable_after_a_plain_import():
    """The README writes ``molora.training.MoLoraCallback()`` after ``import molora`` (a fresh process: here other
    tests have imported the subpackage already)."""
    import subprocess
    import sys

    code = "import molora; print(type(molora.training.MoLoraCallback()).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "MoLoraCallback", proc.stderr[-2000:]


def test_adapted_lm_head_under_logits_to_keep_sees_the_padding_of_its_positions():
    """``logits_to_keep`` (``generate`` keeps the last position) gives the output projection a subset of the
    positions: their padding mask is the call's cut the same way (a kept padding position was counted as a token)."""
    config = MoLoraConfig(r=2, num_experts=2, top_k=1, target_modules=["lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(make_llama(), config).eval()
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding: sample 1's last position is padding
    for keep, real in ((1, 1), (torch.tensor([0, 5]), 3), (0, 10)):
        model.reset_routing_stats()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, logits_to_keep=keep)
        assert model.get_routing_stats()["lm_head"].tokens == real, keep


def test_prompt_router_refuses_the_output_projection():
    config = MoLoraConfig(r=2, num_experts=2, router="prompt", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="router='prompt' cannot adapt the output projection 'lm_head'"):
        get_peft_model(make_llama(), config)


def test_an_adapter_added_as_a_copy_gets_the_buffers_too(batch):
    """TRL's reference adapter: ``add_adapter("ref", config)``, then every ``*.default.*`` parameter copied into it.
    At the next forward molora copies the buffers as well (here ``topk_bias``'s selection bias); an added adapter that
    is not a copy keeps its own."""
    config = MoLoraConfig(num_experts=4, top_k=2, router="topk_bias", init_lora_weights=False)
    model = get_peft_model(make_llama(), config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("default.selection_bias"):
                buffer.copy_(torch.randn(buffer.shape))
    model.add_adapter("ref", config)
    model.add_adapter("other", config)
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
        buffers = dict(model.named_buffers())
        default = {n: b for n, b in buffers.items() if n.endswith("default.selection_bias")}
        assert len(default) == 14
        for name, bias in default.items():
            assert torch.equal(buffers[name.replace(".default.", ".ref.")], bias)
            assert not buffers[name.replace(".default.", ".other.")].any()
        logits = {}
        for adapter in ("default", "ref"):
            model.set_adapter(adapter)
            logits[adapter] = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(logits["default"], logits["ref"])


def test_a_loaded_adapter_keeps_its_buffers_beside_one_with_the_same_parameters(batch, tmp_path):
    """``load_adapter`` of a checkpoint whose parameters equal a loaded adapter's (here two saves of one adapter, the
    second with another selection bias) is no copy of that adapter: it keeps the buffers it was saved with, as when it
    is loaded alone."""
    config = MoLoraConfig(num_experts=4, top_k=2, router="topk_bias", init_lora_weights=False)
    model = get_peft_model(make_llama(), config).eval()
    model.save_pretrained(tmp_path / "v1")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("selection_bias"):
                buffer.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))
        expected = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path / "v2")
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path / "v1", adapter_name="v1").eval()
    loaded.load_adapter(tmp_path / "v2", adapter_name="v2")
    with torch.no_grad():
        mixed = loaded(input_ids=batch["input_ids"], adapter_names=["v2"] * len(batch["input_ids"])).logits
        loaded.set_adapter("v2")
        alone = loaded(input_ids=batch["input_ids"]).logits
    biases = [b for n, b in loaded.named_buffers() if n.endswith("v2.selection_bias")]
    assert biases and all(b.tolist() == [5.0, 5.0, -5.0, -5.0] for b in biases)
    # (the mixed-adapter batch runs the grouped pass, whose sums are ordered otherwise: equal to rounding; the other
    # adapter's buffers moved the logits by 0.63)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)
    assert torch.equal(alone, expected)


@pytest.mark.parametrize(
    ("make", "given", "layout"), [(make_llama, True, "torch.nn.Linear"), (make_gpt2, False, "Conv1D")]
)
def test_fan_in_fan_out_is_corrected_to_the_base_layout_with_a_warning(make, given, layout, tmp_path):
    """As PEFT's LoRA: a ``fan_in_fan_out`` that contradicts the base layer's layout warns once and is corrected in
    the config (the layer reads the layout from the base's type; the saved config said the opposite)."""
    with pytest.warns(
        UserWarning, match=f"fan_in_fan_out is set to {given} but the target module is `{layout}`"
    ) as rec:
        model = get_peft_model(make(), MoLoraConfig(num_experts=2, top_k=1, fan_in_fan_out=given))
    assert sum("fan_in_fan_out" in str(w.message) for w in rec) == 1
    model.save_pretrained(tmp_path)
    assert model.peft_config["default"].fan_in_fan_out is (not given)
    assert PeftConfig.from_pretrained(tmp_path).fan_in_fan_out is (not given)


def test_a_module_called_twice_in_a_forward_counts_both_calls():
    """Weights shared across layers (ALBERT's layer groups, a module a user calls twice): both calls are routed and
    count, as two layers with copies of the weights do: statistics (only the last call's were kept), aux losses and
    the gradients they give."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)

        def forward(self, input_ids, attention_mask=None):
            return self.a(torch.tanh(self.a(input_ids)))

    class Copies(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a1, self.a2 = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, input_ids, attention_mask=None):
            return self.a2(torch.tanh(self.a1(input_ids)))

    torch.manual_seed(0)
    shared = get_peft_model(
        Shared(), MoLoraConfig(num_experts=4, top_k=2, target_modules=["a"], init_lora_weights=False)
    )
    copies = get_peft_model(Copies(), MoLoraConfig(num_experts=4, top_k=2, target_modules=["a1", "a2"]))
    source = dict(shared.named_parameters())
    with torch.no_grad():
        for name, param in copies.named_parameters():
            param.copy_(source[name.replace(".a1.", ".a.").replace(".a2.", ".a.")])
    x = torch.randn(2, 5, 16)
    outputs, aux, stats = {}, {}, {}
    for name, model in (("shared", shared), ("copies", copies)):
        model.train()
        out = model(x)
        out.pow(2).mean().backward()
        outputs[name], aux[name] = out.detach(), model.molora_aux_losses()
        stats[name] = model.get_routing_stats()
    torch.testing.assert_close(outputs["shared"], outputs["copies"])
    assert aux["shared"].keys() == aux["copies"].keys() and aux["shared"]
    for loss in aux["shared"]:
        torch.testing.assert_close(aux["shared"][loss], aux["copies"][loss])
    grads = {n: p.grad for n, p in copies.named_parameters() if p.requires_grad}
    for name, param in shared.named_parameters():
        if param.requires_grad:  # the shared weights' gradient: the sum of the copies'
            expected = grads[name.replace(".a.", ".a1.")] + grads[name.replace(".a.", ".a2.")]
            torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-7, msg=name)
    (one,) = stats["shared"].values()
    assert one.tokens == 20
    first, second = stats["copies"].values()
    torch.testing.assert_close(torch.tensor(one.load), (torch.tensor(first.load) + torch.tensor(second.load)) / 2)


@pytest.mark.parametrize("router", ["topk", "prompt"])
def test_a_mask_passed_by_position_is_the_mask(router):
    """``model.base_model(ids, mask)``, ``get_base_model()(ids, mask)`` and the backbone alone: the mask passed by
    position keeps padding out of the statistics and of the prompt router's decision, as by keyword (it was read by
    keyword only: padding counted, and a left-padded row's prompt decision changed)."""
    config = MoLoraConfig(num_experts=4, top_k=2, router=router, init_lora_weights=False)
    model = get_peft_model(make_llama(), config).eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 60, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    calls = {
        "keyword": lambda: model(input_ids=ids, attention_mask=mask).logits,
        "tuner": lambda: model.base_model(ids, mask).logits,
        "transformers model": lambda: model.get_base_model()(ids, mask).logits,
        "backbone": lambda: model.get_base_model().model(ids, mask).last_hidden_state,
    }
    results = {}
    for name, call in calls.items():
        model.reset_routing_stats()
        with torch.no_grad():
            out = call()
        results[name] = (out, model.get_routing_stats())
    assert {s.tokens for s in results["keyword"][1].values()} == {int(mask.sum())}
    for name in ("tuner", "transformers model"):
        assert torch.equal(results[name][0], results["keyword"][0]), name
    for name in calls:
        assert results[name][1] == results["keyword"][1], name


def test_an_all_ones_attention_mask_is_no_mask(batch):
    """Collators pass ``attention_mask`` of ones for unpadded batches: the layers then run their unmasked losses and
    statistics (the same values, fewer operators), as without a mask; a mask with padding is kept."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False)).train()
    runtime = model.base_model.molora_runtime
    ids = batch["input_ids"][1:]
    results = []
    for mask in (None, torch.ones_like(ids)):
        model.reset_routing_stats()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        assert runtime.context.attention_mask is None
        results.append((out.loss, model.molora_aux_loss(), model.get_routing_stats()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert {k: v.load for k, v in results[0][2].items()} == {k: v.load for k, v in results[1][2].items()}
    model(**batch)
    assert torch.equal(runtime.context.attention_mask, batch["attention_mask"])


def test_training_aux_losses_outlast_a_reference_forward(batch):
    """What a logging callback reports after a step: the aux losses of the step's training forward, also when a
    forward without autograd ran after it (TRL's DPO/KTO: the reference, with the adapter disabled, after the policy,
    left nothing to log); the next training forward replaces them."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, init_lora_weights=False)).train()
    runtime = model.base_model.molora_runtime
    model(**batch)
    trained = {name: value.detach().clone() for name, value in model.molora_aux_losses().items()}
    assert set(trained) == {"balance"}
    with torch.no_grad(), model.disable_adapter():
        model(**batch)
    assert model.molora_aux_losses() == {}  # the last forward's, as documented
    assert {n: v.detach() for n, v in runtime.training_aux_losses().items()} == trained
    # kept as values: a graph would hold its AccumulateGrad nodes and with them the parameters (a deleted adapter's)
    assert all(v.grad_fn is None for v in runtime.training_aux_losses().values())
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:1])  # the adapter's own forward without autograd: not a training one
    torch.testing.assert_close(runtime.training_aux_losses()["balance"], trained["balance"])
    model(input_ids=batch["input_ids"][:1])
    assert not torch.equal(runtime.training_aux_losses()["balance"], trained["balance"])
