"""Routers from the literature: loss-free bias balancing, AdaMoE null experts, ReMoE ReLU routing, expert choice.

Covers, per router: the spec vectors (docs/algorithms.md sections 9, 11, 12, 13), the per-optimizer-step state
(``Router.on_optimizer_step_group``, ``MoLoraModel.molora_on_optimizer_step``, ``MoLoraCallback``, micro-batch
accumulation, checkpoint recomputation counted once, DDP all-reduce, frozen in eval), params validation, kernel-path
agreement, extreme and low-precision inputs, training and generation, batch invariance under left padding, and
save/load of the router state.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CHAR_VOCAB, make_char_tokenizer, make_llama, sft_args, text_dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from test_save_load import _roundtrip

from molora import MoLoraConfig, MoLoraLayer
from molora.kernels import expert_delta
from molora.routers import (
    AdaMoERouter,
    ExpertChoiceRouter,
    NullExpertRouting,
    ReLURouter,
    TopKBiasRouter,
    balancing,
    get_router_class,
)
from molora.routers.state import StepAccumulator
from molora.runtime import RoutingContext
from molora.training import MoLoraCallback

SPEC_ATOL = 2e-6
Z = [[2.0, 1.0, 0.5, -1.0], [0.1, 0.0, -0.1, 0.05], [-1.0, 0.5, 2.0, 0.0]]  # spec 0.4
ROUTERS = ["topk_bias", "adamoe", "relu", "expert_choice"]


def identity_router(cls, in_features: int, num_experts: int, top_k: int, **params):
    """A router whose scoring weight is the identity, so that its logits equal its input."""
    router = cls(in_features, num_experts, top_k, params=cls.Params(**params))
    router.weight.data = torch.eye(router.weight.shape[0], in_features)
    return router


def selections(routing, n_tokens: int) -> list[set[int]]:
    out = [set() for _ in range(n_tokens)]
    for t, e in zip(routing.token_index.tolist(), routing.expert_index.tolist()):
        out[t].add(e)
    return out


def routers_of(model) -> list:
    return [m.molora_router["default"] for m in model.modules() if isinstance(m, MoLoraLayer)]


# -- loss-free balancing (spec 9) ------------------------------------------------------------------------------------


def test_topk_bias_spec_vector_selection_loads_and_update():
    router = identity_router(TopKBiasRouter, 4, 4, 1, normalize_gates=False).train()
    routing = router(torch.tensor(Z))
    assert routing.expert_index.tolist() == [0, 0, 2]
    torch.testing.assert_close(routing.weight, torch.tensor([0.880797, 0.524979, 0.880797]), atol=SPEC_ATOL, rtol=0)
    counts = router._loads.pop((4,), torch.device("cpu"))
    assert counts.tolist() == [2, 0, 1, 0]
    assert balancing.max_violation(counts).item() == pytest.approx(1.666667, abs=1e-6)
    router._loads.add(counts)
    router.on_optimizer_step()
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.001, 0.001, -0.001, 0.001]))
    assert router.last_max_violation.item() == pytest.approx(1.666667, abs=1e-6)
    assert "selection_bias" in dict(router.named_buffers()) and "selection_bias" not in dict(router.named_parameters())


def test_topk_bias_spec_vector_biased_selection():
    router = identity_router(TopKBiasRouter, 4, 4, 1, normalize_gates=False)
    router.selection_bias.copy_(torch.tensor([-0.2, 0.0, 0.0, 0.0]))
    routing = router(torch.tensor(Z))
    assert routing.expert_index.tolist() == [1, 3, 2]
    torch.testing.assert_close(routing.weight, torch.tensor([0.731059, 0.512497, 0.880797]), atol=SPEC_ATOL, rtol=0)
    # the gates are the unbiased affinities; the normalised affinities are a distribution (probs)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(3))

    router2 = identity_router(TopKBiasRouter, 4, 4, 2)  # normalize_gates=True (default)
    router2.selection_bias.copy_(torch.tensor([0.0, -0.3, 0.0, 0.0]))
    routing2 = router2(torch.tensor([[2.0, 1.0, 0.5, -1.0]]))
    assert set(routing2.expert_index.tolist()) == {0, 2}
    torch.testing.assert_close(
        routing2.dense_gates(), torch.tensor([[0.585926, 0.0, 0.414074, 0.0]]), atol=SPEC_ATOL, rtol=0
    )


def test_topk_bias_softmax_scores():
    router = identity_router(TopKBiasRouter, 4, 4, 2, score_function="softmax")
    router.selection_bias.copy_(torch.tensor([0.0, -0.5, 0.0, 0.0]))
    routing = router(torch.tensor([[2.0, 1.0, 0.5, -1.0]]))
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5, -1.0]), -1)
    assert set(routing.expert_index.tolist()) == {0, 2}
    torch.testing.assert_close(routing.weight.sort().values, (p[[2, 0]] / (p[0] + p[2])).sort().values)


@pytest.mark.parametrize("score_function", ["sigmoid", "softmax"])
def test_topk_bias_gates_of_underflowed_experts_have_finite_gradients(score_function):
    """A token whose affinities all underflow (logits around -1000, as at a down_proj's input) is routed by the bias
    to experts of probability 0. The gates were ``p / clamp_min(sum p, tiny)``: 0 forward, ``1 / tiny`` backward, inf
    and then NaN through the softmax into the router and the layer input. As the softmax of the kept log-scores they
    are exact and finite, and equal ``p / sum p`` where that is well defined."""
    router = identity_router(TopKBiasRouter, 4, 4, 2, score_function=score_function)
    router.selection_bias.copy_(torch.tensor([0.0, 1.5, 0.0, 1.2]))  # the bias picks experts 1 and 3
    logits = torch.tensor([[-1000.0, -1900.0, -1200.0, -1800.0], [2.0, 1.0, 0.5, -1.0]], requires_grad=True)
    routing = router(logits)
    assert routing.expert_index.tolist()[:2] == [1, 3]
    gates = routing.dense_gates()
    (gates * torch.tensor([10.0, 20.0, 30.0, 40.0])).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0].abs().sum() > 0
    torch.testing.assert_close(gates.sum(-1), torch.ones(2))
    torch.testing.assert_close(gates[0, [1, 3]], torch.softmax(torch.tensor([-1900.0, -1800.0]), -1))
    kept = routing.probs[1].gather(0, routing.expert_index[2:])
    torch.testing.assert_close(routing.weight[2:], kept / kept.sum())


def test_topk_bias_update_direction_padding_and_eval_freeze():
    router = identity_router(TopKBiasRouter, 4, 4, 1, bias_update_rate=0.01)
    x = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0, 9.0]])
    valid = torch.tensor([True, True, True, False])  # the padding token would load expert 3
    router.eval()
    router(x, valid)
    router.on_optimizer_step()
    assert torch.equal(router.selection_bias, torch.zeros(4)), "eval forwards must not move the bias"
    router.train()
    router(x, valid)
    router(x, valid)  # a second micro-batch of the same step
    router.on_optimizer_step()
    # loads [4, 2, 0, 0], mean 1.5: expert 0 and 1 overloaded -> down; 2 and 3 idle -> up
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.01, -0.01, 0.01, 0.01]))
    router.on_optimizer_step()  # nothing observed since: unchanged
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.01, -0.01, 0.01, 0.01]))


@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_topk_bias_stays_fp32_when_the_model_is_cast(cast):
    """``model.to(bf16)``/``.half()`` cast parameters and buffers; a bf16 bias would round away its updates (0.001 is
    below bf16's spacing from 0.25 on) and freeze. The selection bias keeps fp32 and keeps moving."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=1, router="topk_bias"))
    first = next(m for m in model.modules() if isinstance(m, MoLoraLayer)).molora_router["default"]
    first.selection_bias.copy_(torch.tensor([0.2513, -0.0021, 0.0004, 1e-8]))  # not representable in bf16/fp16
    before = first.selection_bias.clone()
    model = model.to(torch.bfloat16) if cast == "to_bf16" else model.half()
    routers = [m.molora_router["default"] for m in model.modules() if isinstance(m, MoLoraLayer)]
    router = routers[0]
    assert router.weight.dtype != torch.float32  # the parameters are cast as LoRA's are
    assert {r.selection_bias.dtype for r in routers} == {torch.float32}
    assert torch.equal(router.selection_bias, before)  # and the values are those from before the cast
    router.selection_bias.fill_(0.3)
    router.train()
    x = torch.zeros(4, router.in_features, dtype=router.weight.dtype)
    x[:, 0] = 1.0
    router(x)
    router.on_optimizer_step()
    moved = router.selection_bias - 0.3
    assert moved.abs().max() > 0 and torch.allclose(moved.abs(), torch.full((4,), 0.001), atol=1e-6)


def test_relu_l1_coef_survives_half_and_a_save(tmp_path):
    """``.half()`` rounded ReLU's adaptive lambda (1e-8 at the start) to 0, which the adapter then saved: a reloaded
    model had lambda 0 for good (the update multiplies it). The buffer keeps fp32 and its value through the cast."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=4, top_k=2, router="relu", task_type="CAUSAL_LM"))
    router = model.base_model.model.model.layers[0].self_attn.q_proj.molora_router["default"]
    router.set_l1_coef(7e-9)
    model = model.half()
    assert router.l1_coef.dtype == torch.float32 and router.l1_coef.item() == pytest.approx(7e-9, rel=1e-6)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    reloaded = loaded.base_model.model.model.layers[0].self_attn.q_proj.molora_router["default"]
    assert reloaded._l1_coef_value == pytest.approx(7e-9, rel=1e-6)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("router", ["topk_bias", "relu"])
def test_generation_in_train_mode_leaves_the_step_state_alone(router, use_cache, batch):
    """A ``generate`` while the model is in train mode (RL trainers sample so) counts nothing for the next step, with
    or without a KV cache."""

    def state_after_step(generate):
        model = get_peft_model(
            make_llama(), MoLoraConfig(num_experts=4, top_k=2, router=router, target_modules=["q_proj"])
        )
        model.train()
        model(**batch).loss.backward()
        if generate:
            other = torch.randint(3, 90, (3, 9), generator=torch.Generator().manual_seed(9))
            model.generate(input_ids=other, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=use_cache)
        model.molora_on_optimizer_step()
        routers = [m.molora_router["default"] for m in model.modules() if isinstance(m, MoLoraLayer)]
        return [r.selection_bias.clone() if router == "topk_bias" else r.l1_coef.clone() for r in routers]

    expected = state_after_step(False)
    assert all(torch.equal(a, b) for a, b in zip(state_after_step(True), expected, strict=True))


@pytest.mark.parametrize("router", ["topk_bias", "relu"])
def test_reference_and_no_grad_forwards_leave_the_step_state_alone(router, batch):
    """TRL's DPO/GRPO step with a pre-wrapped adapter: a frozen copy ``ref`` runs under ``no_grad`` in train mode
    (``set_adapter("ref")`` and back), then the trained adapter's forward and backward. The reference's state moved
    every step (its logits 0.78 away after 5 steps), and a no_grad forward of the trained adapter counted as if it
    were trained on. Only the trained forward counts now: the trained adapter's state equals a run without the
    extra forwards, and the frozen copy's never changes."""

    def states(model, name):
        routers = [m.molora_router[name] for m in model.modules() if isinstance(m, MoLoraLayer)]
        return [r.selection_bias.clone() if router == "topk_bias" else r.l1_coef.clone() for r in routers]

    def run(extra_forwards):
        torch.manual_seed(0)
        config = MoLoraConfig(num_experts=4, top_k=2, router=router, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(make_llama(), config)
        model.add_adapter("ref", config)
        model.train()
        ref_start, start = states(model, "ref"), states(model, "default")
        for _ in range(3):
            if extra_forwards:
                model.set_adapter("ref")
                with torch.no_grad():
                    model(**batch)
                model.set_adapter("default")
                with torch.no_grad():
                    model(**batch)  # e.g. GRPO's old-policy log-probs
            model(**batch).loss.backward()
            model.molora_on_optimizer_step()
        assert all(torch.equal(a, b) for a, b in zip(states(model, "ref"), ref_start, strict=True))
        end = states(model, "default")
        assert any(not torch.equal(a, b) for a, b in zip(end, start, strict=True))  # the trained one moves
        return end

    expected = run(False)
    assert all(torch.equal(a, b) for a, b in zip(run(True), expected, strict=True))


def test_step_accumulator_counts_a_recomputed_forward_once():
    acc = StepAccumulator()
    acc.add(torch.tensor([1.0, 2.0]), forward_id=7)
    acc.add(torch.tensor([1.0, 2.0]), forward_id=7)  # activation checkpointing re-runs the layer in backward
    acc.add(torch.tensor([3.0, 0.0]), forward_id=8)  # next micro-batch
    acc.add(torch.tensor([1.0, 1.0]))  # standalone calls always add
    assert acc.pop((2,), torch.device("cpu")).tolist() == [5.0, 3.0]
    assert acc.pop((2,), torch.device("cpu")).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("reference_forward", [False, True], ids=["", "reference_forward_between"])
@pytest.mark.parametrize("use_reentrant", [None, False, True])
def test_loads_counted_once_per_micro_batch_with_activation_checkpointing(batch, use_reentrant, reference_forward):
    """Checkpointed layers re-run their forward in backward; the step's loads must not double, also when a
    reference forward with the adapter disabled runs between a forward and its backward (TRL's DPOTrainer)."""
    config = MoLoraConfig(num_experts=4, top_k=2, router="topk_bias", init_lora_weights=False)
    model = get_peft_model(make_llama(), config)
    if use_reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.enable_input_require_grads()
    model.train()
    for _ in range(2):  # two micro-batches of one optimizer step
        loss = model(**batch).loss
        if reference_forward:
            with torch.no_grad(), model.disable_adapter():
                model(**batch)
        loss.backward()
    n_valid = int(batch["attention_mask"].sum())
    for router in routers_of(model):
        counts = router._loads.pop((4,), torch.device("cpu"))
        assert counts.sum().item() == 2 * n_valid * 2


def test_max_violation():
    counts = torch.tensor([[2.0, 0, 1, 0], [1.0, 1, 1, 1], [4.0, 0, 0, 0], [0.0, 0, 0, 0]])
    torch.testing.assert_close(balancing.max_violation(counts), torch.tensor([5 / 3, 0.0, 3.0, 0.0]))


def test_sft_trainer_with_callback_moves_bias_against_the_load(tmp_path):
    """TRL SFTTrainer + MoLoraCallback: one update per optimizer step, in the spec's direction, and it balances."""
    trl = pytest.importorskip("trl")

    config = MoLoraConfig(
        r=4,
        num_experts=4,
        top_k=1,
        router="topk_bias",
        router_kwargs={"bias_update_rate": 0.05},
        aux_loss_coef=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(make_llama(vocab_size=CHAR_VOCAB), config)
    routers = routers_of(model)
    for router in routers:  # a skewed start: expert 0 takes almost every token
        router.selection_bias.copy_(torch.tensor([0.3, 0.0, 0.0, 0.0]))
    data = text_dataset(16)
    args = sft_args(
        tmp_path,
        max_steps=8,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_length=40,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=make_char_tokenizer(),
        callbacks=[MoLoraCallback()],
    )
    steps = []  # per optimizer step: the loads of each router (both micro-batches) and the biases after the update
    original = TopKBiasRouter.on_optimizer_step_group.__func__

    def spy(cls, group):
        loads = [r._loads.pop((r.num_experts,), torch.device("cpu")) for r in group]
        before = [r.selection_bias.clone() for r in group]
        for r, counts in zip(group, loads):
            r._loads.add(counts)
        original(cls, group)
        steps.append((loads, before, [r.last_max_violation.item() for r in group]))

    TopKBiasRouter.on_optimizer_step_group = classmethod(spy)
    try:
        trainer.train()
    finally:
        TopKBiasRouter.on_optimizer_step_group = classmethod(original)
    assert len(steps) == 8, "MoLoraCallback must fire once per optimizer step"
    for loads, _, _ in steps:
        assert len(loads) == len(routers) == 14
        assert all(counts.sum() > 0 for counts in loads)
    # the first update, checked against the loads the step saw (summed over its two micro-batches)
    loads, before, _ = steps[0]
    after = steps[1][1]
    for counts, b0, b1 in zip(loads, before, after):
        torch.testing.assert_close(b1 - b0, 0.05 * torch.sign(counts.mean() - counts))
    violations = [sum(v) / len(v) for _, _, v in steps]
    assert violations[0] > 1.5 and sum(violations[-2:]) / 2 < 0.5 * violations[0], violations
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_step_updates_are_all_reduced_over_ranks(monkeypatch):
    """With torch.distributed initialised, one all_reduce per router group sums the step's counts over ranks.

    A second rank is simulated: its contribution is added inside ``all_reduce`` (a real multi-process group costs
    tens of seconds of imports per worker here).
    """
    import torch.distributed as dist

    other_rank = {}
    calls = []

    def fake_all_reduce(tensor, op=None):
        calls.append(tensor.shape)
        tensor += other_rank[tuple(tensor.shape)]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    bias_routers = [identity_router(TopKBiasRouter, 4, 4, 1, bias_update_rate=0.01).train() for _ in range(2)]
    for router in bias_routers:
        router(torch.tensor([[9.0, 0, 0, 0]] * 3))  # this rank: loads [3, 0, 0, 0]
    # the other rank: [0, 1, 2, 0] for router 0, nothing for router 1
    other_rank[(2, 4)] = torch.tensor([[0.0, 1, 2, 0], [0, 0, 0, 0]])
    TopKBiasRouter.on_optimizer_step_group(bias_routers)
    torch.testing.assert_close(bias_routers[0].selection_bias, torch.tensor([-0.01, 0.01, -0.01, 0.01]))
    torch.testing.assert_close(bias_routers[1].selection_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert calls == [(2, 4)]

    relu_routers = [identity_router(ReLURouter, 4, 4, 1).train() for _ in range(2)]
    for router in relu_routers:
        router(torch.ones(2, 4))  # this rank: 8 of 8 gates active in each router
    other_rank[(2, 2)] = torch.tensor([[0.0, 8.0], [0.0, 8.0]])  # the other rank: none active
    ReLURouter.on_optimizer_step_group(relu_routers)
    for router in relu_routers:  # pooled sparsity 0.5 < 0.75: lambda grows, the same for every layer
        assert router.last_sparsity == pytest.approx(0.5)
        assert router.l1_coef.item() == pytest.approx(1.2e-8)
    assert calls == [(2, 4), (2, 2)]


# -- AdaMoE null experts (spec 11) -----------------------------------------------------------------------------------

ADAMOE_Z = [[1.0, 0.2, 0.8, -0.5], [0.0, 1.5, -1.0, 1.0], [0.3, 0.1, 1.2, 0.9]]


def adamoe_router(**params):
    return identity_router(AdaMoERouter, 4, 2, 2, num_null_experts=2, **params)


def test_adamoe_spec_vector_single_token():
    routing = adamoe_router()(torch.tensor([ADAMOE_Z[0]]))
    assert isinstance(routing, NullExpertRouting)
    torch.testing.assert_close(
        routing.full_probs, torch.tensor([[0.401415, 0.180367, 0.328650, 0.089568]]), atol=SPEC_ATOL, rtol=0
    )
    assert routing.full_selected.tolist() == [[True, False, True, False]]
    # expert 0 is the only selected true expert: its gate renormalises to 1; the null slot adds no triple
    assert routing.token_index.tolist() == [0] and routing.expert_index.tolist() == [0]
    torch.testing.assert_close(routing.weight, torch.tensor([1.0]))
    assert routing.probs.shape == (1, 2) and routing.dense_gates().tolist() == [[1.0, 0.0]]


def test_adamoe_spec_vector_batch_balance_loss():
    router = adamoe_router()
    routing = router(torch.tensor(ADAMOE_Z))
    assert [set(torch.nonzero(row).flatten().tolist()) for row in routing.full_selected] == [{0, 2}, {1, 3}, {2, 3}]
    assert selections(routing, 3) == [{0}, {1}, set()]  # token 2 chose two null experts: no LoRA delta
    inputs = router.aux_inputs(routing, None)
    assert inputs.probs.shape == (3, 4)
    torch.testing.assert_close(inputs.selected.sum(0), torch.tensor([1.0, 1.0, 2.0, 2.0]))
    torch.testing.assert_close(
        inputs.probs.mean(0), torch.tensor([0.227351, 0.279219, 0.258257, 0.235173]), atol=SPEC_ATOL, rtol=0
    )
    losses = AdaMoERouter.aux_losses(inputs, "megatron", frozenset({"balance", "z"}))
    assert losses["balance"].item() == pytest.approx(0.995620, abs=1e-6)
    torch.testing.assert_close(losses["z"], balancing.router_z_loss(torch.tensor(ADAMOE_Z)))
    # "switch" counts each token's top-1 (true 0, true 1, null 0: f = [1, 1, 1, 0] / 3) and, as the spec's rule for
    # null experts says, averages the null loads ([1/3, 1/3, 1/6, 1/6]); it counted them apart (1.019769)
    switch = AdaMoERouter.aux_losses(inputs, "switch", frozenset({"balance"}))["balance"]
    p = inputs.probs.mean(0).double()
    assert switch.item() == pytest.approx(4 * float(p[0] / 3 + p[1] / 3 + (p[2] + p[3]) / 6), abs=1e-6)
    assert switch.item() == pytest.approx(1.004380, abs=1e-6)


def test_adamoe_null_counts_are_averaged():
    router = identity_router(AdaMoERouter, 5, 2, 1, num_null_experts=3)
    # token 0 -> null 2, token 1 -> null 2, token 2 -> true 0: raw null counts [2, 0, 0] -> averaged [2/3] * 3
    x = torch.tensor([[0, 0, 5.0, 0, 0], [0, 0, 5.0, 0, 0], [5.0, 0, 0, 0, 0]])
    routing = router(x)
    inputs = router.aux_inputs(routing, None)
    torch.testing.assert_close(inputs.selected.sum(0), torch.tensor([1.0, 0.0, 2 / 3, 2 / 3, 2 / 3]))
    load = balancing.expert_load(inputs, "megatron")
    expected = 5 * (load * inputs.probs.mean(0)).sum()
    torch.testing.assert_close(
        AdaMoERouter.aux_losses(inputs, "megatron", frozenset({"balance"}))["balance"], expected
    )
    # padding rows drop out of the loss inputs
    valid = torch.tensor([True, False, True])
    assert router.aux_inputs(routing, valid).selected.sum().item() == pytest.approx(2.0)


def test_adamoe_gates_renormalise_among_selected_true_experts():
    router = identity_router(AdaMoERouter, 6, 3, 3, num_null_experts=3)
    x = torch.tensor([[2.0, 1.0, -3.0, 1.5, -2.0, -2.0]])  # top-3: true 0, null 3, true 1
    routing = router(x)
    assert selections(routing, 1) == [{0, 1}]
    p = torch.softmax(x[0], -1)
    torch.testing.assert_close(routing.dense_gates()[0], torch.stack([p[0], p[1], p[0] * 0]) / (p[0] + p[1]))


def test_adamoe_default_null_experts_and_stats_show_fewer_real_experts(batch):
    config = MoLoraConfig(num_experts=4, top_k=4, router="adamoe", init_lora_weights=False)
    model = get_peft_model(make_llama(), config)
    router = routers_of(model)[0]
    assert router.num_null_experts == 4 and router.weight.shape == (8, 64)
    with torch.no_grad():
        model(**batch)
    stats = model.get_routing_stats()
    per_token = [s.experts_per_token for s in stats.values()]
    assert all(0 < v < 4 for v in per_token), per_token  # some of the 4 slots went to null experts


# -- ReMoE ReLU routing (spec 12) ------------------------------------------------------------------------------------

RELU_Z = [[0.8, -0.2, 0.3, -1.0], [-0.5, -0.1, -0.3, -0.2], [1.2, 0.4, -0.1, 0.0]]


def test_relu_spec_vector_gates_and_regulariser():
    router = identity_router(ReLURouter, 4, 4, 1)
    routing = router(torch.tensor(RELU_Z))
    expected = torch.tensor([[0.8, 0, 0.3, 0], [0, 0, 0, 0], [1.2, 0.4, 0, 0]])
    torch.testing.assert_close(routing.dense_gates(), expected)
    assert selections(routing, 3) == [{0, 2}, set(), {0, 1}]  # ReLU(0.0) = 0 counts as inactive
    inputs = router.aux_inputs(routing, None)
    torch.testing.assert_close(inputs.selected.sum(0).float(), torch.tensor([2.0, 1, 1, 0]))
    torch.testing.assert_close(
        inputs.gates.mean(0), torch.tensor([0.666667, 0.133333, 0.1, 0]), atol=SPEC_ATOL, rtol=0
    )
    l1 = ReLURouter.aux_losses(inputs, "megatron", frozenset({"l1"}))["l1"]
    assert l1.item() == pytest.approx(2.088889, abs=1e-6)
    router.set_l1_coef(0.01)
    config = MoLoraConfig(router="relu", aux_loss_coef=0.0)
    assert router.loss_coefficients(config)["l1"] * l1.item() == pytest.approx(0.020889, abs=1e-6)
    # probs: gates normalised per token, zero for the token without an active expert
    torch.testing.assert_close(routing.probs.sum(-1), torch.tensor([1.0, 0.0, 1.0]))


def test_relu_spec_vector_adaptive_lambda():
    router = identity_router(ReLURouter, 4, 4, 1).train()
    router(torch.tensor(RELU_Z))
    assert router.target_sparsity == 0.75
    router.on_optimizer_step()
    assert router.last_sparsity == pytest.approx(1 - 4 / 12)
    assert router.l1_coef.item() == pytest.approx(1.2e-8) and router._l1_coef_value == pytest.approx(1.2e-8)
    router(-torch.ones(3, 4))  # all inactive: sparsity 1 > 0.75 -> lambda shrinks
    router.on_optimizer_step()
    assert router.l1_coef.item() == pytest.approx(1.0e-8)
    router.eval()
    router(torch.ones(3, 4))
    router.on_optimizer_step()  # eval forwards count nothing: lambda frozen
    assert router.l1_coef.item() == pytest.approx(1.0e-8)


def test_relu_lambda_is_shared_by_all_layers_and_steers_sparsity(batch):
    config = MoLoraConfig(
        num_experts=4, top_k=1, router="relu", router_kwargs={"l1_coef_init": 1e-3, "l1_coef_growth": 2.0}
    )
    model = get_peft_model(make_llama(), config)
    model.train()
    model(**batch)
    model.molora_on_optimizer_step()
    routers = routers_of(model)
    values = {r._l1_coef_value for r in routers}
    assert len(values) == 1 and values.pop() in (pytest.approx(2e-3), pytest.approx(5e-4))
    assert len({r.last_sparsity for r in routers}) == 1
    losses = model.molora_aux_losses()
    assert {"balance", "l1"} <= set(losses)


def test_relu_token_without_active_expert_gets_zero_delta():
    router = identity_router(ReLURouter, 4, 4, 1)
    torch.manual_seed(0)
    A, B = torch.randn(4, 4, 2), torch.randn(4, 2, 3)
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, -1, -1, -1]])
    routing = router(x)
    for kernel in ("dense", "grouped", "naive"):
        delta = expert_delta(x, A, B, routing, 2.0, kernel)
        assert torch.equal(delta[1], torch.zeros(3)) and delta[0].abs().sum() > 0


# -- expert choice (spec 13) -----------------------------------------------------------------------------------------

EC_LOGITS = [[2.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.5, -0.5]]


def test_expert_choice_spec_vector():
    router = identity_router(ExpertChoiceRouter, 2, 2, 1, capacity_factor=1.0)
    routing = router(torch.tensor(EC_LOGITS))
    torch.testing.assert_close(
        routing.probs,
        torch.tensor([[0.880797, 0.119203], [0.5, 0.5], [0.119203, 0.880797], [0.731059, 0.268941]]),
        atol=SPEC_ATOL,
        rtol=0,
    )
    picked = {e: {} for e in range(2)}
    for t, e, w in zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist()):
        picked[e][t] = w
    assert set(picked[0]) == {0, 3} and set(picked[1]) == {1, 2}
    assert picked[0][0] == pytest.approx(0.880797, abs=1e-6) and picked[0][3] == pytest.approx(0.731059, abs=1e-6)
    assert picked[1][2] == pytest.approx(0.880797, abs=1e-6) and picked[1][1] == pytest.approx(0.5, abs=1e-6)


def test_expert_choice_excludes_padding_and_sets_capacity():
    router = identity_router(ExpertChoiceRouter, 2, 2, 1, capacity_factor=1.0)
    x = torch.tensor(EC_LOGITS + [[9.0, 9.0]])  # the padding token would be every expert's favourite
    valid = torch.tensor([True, True, True, True, False])
    routing = router(x, valid)
    assert 4 not in routing.token_index.tolist()
    assert torch.bincount(routing.expert_index).tolist() == [2, 2]
    router2 = identity_router(ExpertChoiceRouter, 4, 4, 1)  # c = 2 (default)
    assert [router2.capacity(n) for n in (1, 2, 3, 8, 10)] == [1, 1, 1, 4, 5]


@pytest.mark.parametrize("how", ["decode", "single_token", "eval_option"])
def test_expert_choice_falls_back_to_token_choice(how):
    params = {"token_choice_in_eval": True} if how == "eval_option" else {}
    router = identity_router(ExpertChoiceRouter, 4, 4, 2, **params)
    x = torch.tensor(Z)
    context = None
    if how == "decode":
        context = RoutingContext(is_decode=True)
    elif how == "single_token":
        x = x[:1]
    else:
        router.eval()
    routing = router(x, None, context)
    # every token has its top-2 experts with raw softmax gates
    assert torch.bincount(routing.token_index).tolist() == [2] * x.shape[0]
    expected = torch.softmax(x, -1).topk(2, -1)
    torch.testing.assert_close(routing.weight.view(-1, 2), expected.values)
    if how == "eval_option":
        router.train()
        assert torch.bincount(router(x).expert_index, minlength=4).tolist() == [1, 1, 1, 1]


# -- shared checks: params, kernels, robustness, training, generation, batch invariance, save/load --------------------


@pytest.mark.parametrize(
    "router, kwargs, field",
    [
        ("topk_bias", {"score_function": "relu"}, "score_function"),
        ("topk_bias", {"bias_update_rate": -1e-3}, "bias_update_rate"),
        ("topk_bias", {"normalize_gates": "yes"}, "normalize_gates"),
        ("adamoe", {"num_null_experts": 0}, "num_null_experts"),
        ("adamoe", {"num_null_experts": 2.5}, "num_null_experts"),
        ("relu", {"l1_coef_init": 0.0}, "l1_coef_init"),
        ("relu", {"l1_coef_growth": 1.0}, "l1_coef_growth"),
        ("relu", {"target_sparsity": 1.0}, "target_sparsity"),
        ("expert_choice", {"capacity_factor": 0.0}, "capacity_factor"),
        ("expert_choice", {"capacity_factor": 5.0}, "capacity_factor"),
        ("expert_choice", {"bias_update_rate": 0.1}, "bias_update_rate"),
    ],
)
def test_bad_router_kwargs_raise_naming_the_field(router, kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoLoraConfig(num_experts=4, top_k=2, router=router, router_kwargs=kwargs)


def test_defaults_follow_the_spec():
    bias = get_router_class("topk_bias").Params()
    assert (bias.score_function, bias.normalize_gates, bias.bias_update_rate) == ("sigmoid", True, 1e-3)
    relu = get_router_class("relu").Params()
    assert (relu.l1_coef_init, relu.l1_coef_growth, relu.target_sparsity) == (1e-8, 1.2, None)
    assert get_router_class("expert_choice").Params().capacity_factor == 2.0
    assert get_router_class("adamoe").Params().num_null_experts is None


def _router_for(name: str, num_experts: int = 4, top_k: int = 2, in_features: int = 6):
    cls = get_router_class(name)
    return cls(in_features, num_experts, top_k, params=cls.Params())


@pytest.mark.parametrize("name", ["relu", "adamoe"])
def test_dense_gate_routers_list_all_pairs_on_the_dense_path_and_honour_a_subclass_select(name):
    """``relu`` and ``adamoe`` (``DenseGateSelection``): given ``dense=True`` their routing lists every (token, expert)
    pair with the same dense gates as ``select``; a subclass that overrides ``select`` is asked through it there too
    (the dense path called the base class's selection and skipped the override)."""
    torch.manual_seed(3)
    router = _router_for(name)
    logits = torch.randn(10, router.weight.shape[0])
    dense, losses = router.select_with_losses(logits, None, frozenset(), "megatron", dense=True)
    assert losses is None and dense.expert_index.numel() == 10 * 4
    assert torch.equal(dense.dense_gates(), router.select(logits, None).dense_gates())

    class Shifted(type(router)):
        def select(self, logits, valid):
            return super().select(logits * 3.0, valid)

    shifted = Shifted(6, 4, 2, params=type(router).Params())
    shifted.load_state_dict(router.state_dict())
    routing, _ = shifted.select_with_losses(logits, None, frozenset(), "megatron", dense=True)
    assert torch.equal(routing.dense_gates(), router.select(logits * 3.0, None).dense_gates())
    assert not torch.equal(routing.dense_gates(), dense.dense_gates())


@pytest.mark.parametrize("name", ROUTERS)
def test_kernel_paths_agree(name):
    torch.manual_seed(11)
    router = _router_for(name)
    if name == "topk_bias":
        router.selection_bias.uniform_(-0.2, 0.2)
    x = torch.randn(10, 6)
    A, B = torch.randn(4, 6, 3), torch.randn(4, 3, 5)
    valid = torch.ones(10, dtype=torch.bool)
    valid[:3] = False
    routing = router(x, valid)
    assert (routing.weight >= 0).all()
    reference = expert_delta(x, A, B, routing, 0.5, "naive")
    for kernel in ("dense", "grouped"):
        torch.testing.assert_close(expert_delta(x, A, B, routing, 0.5, kernel), reference, rtol=1e-5, atol=1e-5)


EXTREME = {
    "pm1e4": [[1e4, -1e4, 0.0, 1e4 - 8], [-1e4, -1e4, 1e4, -1e4], [0.0, 1e4, -1e4, 16.0]],
    "all_equal": [[0.0] * 4, [3.0] * 4, [-1e4] * 4],
    "all_large": [[1e4, 1e4 - 16, 1e4 - 32, 1e4 - 64], [-1e4, -1e4 + 8, -1e4 + 16, -1e4 + 64], [1e4] * 4],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logits_name", list(EXTREME))
@pytest.mark.parametrize("name", ROUTERS)
def test_extreme_and_low_precision_inputs(name, logits_name, dtype):
    cls = get_router_class(name)
    width = 8 if name == "adamoe" else 4  # adamoe scores 4 true + 4 null experts
    rows = [row + row if name == "adamoe" else row for row in EXTREME[logits_name]]
    router = identity_router(cls, width, 4, 2).train()
    if name == "topk_bias":
        router.selection_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.1]))
    routing = router(torch.tensor(rows, dtype=dtype))
    for label, tensor in [("probs", routing.probs), ("weight", routing.weight), ("gates", routing.dense_gates())]:
        assert tensor.dtype == torch.float32, label
        assert torch.isfinite(tensor).all(), label
        assert (tensor >= 0).all(), label
    inputs = router.aux_inputs(routing, None)
    losses = cls.aux_losses(inputs, "megatron", frozenset({"balance", "z", "l1"}))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(router.weight.grad).all()
    router.on_optimizer_step()
    for buffer in router.buffers():
        assert torch.isfinite(buffer).all()


@pytest.mark.parametrize("name", ROUTERS)
def test_training_and_generation(name, batch):
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, router=name, init_lora_weights=False)
    model = get_peft_model(make_llama(), config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(**batch)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(r.weight.grad is not None and torch.isfinite(r.weight.grad).all() for r in routers_of(model))
        optimizer.step()
        optimizer.zero_grad()
        model.molora_on_optimizer_step()
    model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 16)
    stats = model.get_routing_stats()
    assert len(stats) == 14 and all(s.tokens > 0 and math.isfinite(s.max_violation) for s in stats.values())


def _set_router_state(model, name):
    torch.manual_seed(4)
    for router in routers_of(model):
        if name == "topk_bias":
            router.selection_bias.uniform_(-0.3, 0.3)
        elif name == "relu":
            router.set_l1_coef(3.5e-4)


@pytest.mark.parametrize("name", [n for n in ROUTERS if n != "expert_choice"])
def test_sample_alone_equals_sample_in_left_padded_batch(name):
    """Token-choice routers: neither padding nor the batch neighbour changes a sample's outputs or generations."""
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, router=name, init_lora_weights=False)
    model = get_peft_model(make_llama(), config).eval()
    _set_router_state(model, name)
    gen = torch.Generator().manual_seed(9)
    short, long = torch.randint(3, 96, (1, 7), generator=gen), torch.randint(3, 96, (1, 11), generator=gen)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (torch.arange(11) >= 4).long().unsqueeze(0).repeat(2, 1)
    mask[1] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        alone = model(input_ids=short).logits[0]
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0, 4:]
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    gen_alone = model.generate(input_ids=short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    gen_batch = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen_batch[0, 4:].tolist() == gen_alone[0].tolist()


def test_topk_bias_state_roundtrips_in_a_fresh_process(tmp_path):
    config = MoLoraConfig(
        r=2, num_experts=3, top_k=1, router="topk_bias", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    _, adapter_dir, expected, results = _roundtrip(tmp_path, make_llama(), config)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    biases = [v for k, v in tensors.items() if k.endswith("molora_router.selection_bias")]
    assert len(biases) == 14 and all(v.abs().sum() > 0 for v in biases)
    assert torch.equal(results["peft_model"], expected)
    assert torch.equal(results["auto"], expected)


@pytest.mark.parametrize("name", ["topk_bias", "relu", "adamoe"])
def test_router_state_saved_and_loaded_in_process(tmp_path, name, batch):
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, router=name, init_lora_weights=False)
    model = get_peft_model(make_llama(), config).eval()
    _set_router_state(model, name)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    with torch.no_grad():
        expected = model(**inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    with torch.no_grad():
        got = loaded(**inputs)
    assert torch.equal(got.logits, expected.logits)
    torch.testing.assert_close(loaded.molora_aux_loss(), model.molora_aux_loss())
    for saved, restored in zip(routers_of(model), routers_of(loaded)):
        for (key, a), (_, b) in zip(saved.named_buffers(), restored.named_buffers()):
            assert torch.equal(a, b), key
        if name == "relu":
            assert restored._l1_coef_value == pytest.approx(3.5e-4)
        if name == "adamoe":
            assert restored.weight.shape[0] == 8


@pytest.mark.parametrize("name", ROUTERS)
def test_yaml_recipe_builds_the_config(name):
    import dataclasses
    from pathlib import Path

    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml").read_text())
    assert set(recipe) == {"model", "adapter", "training"}
    assert recipe["model"]["name_or_path"] is None
    config = MoLoraConfig(**recipe["adapter"])
    assert config.router == name
    trl = pytest.importorskip("trl")
    unknown = set(recipe["training"]) - {f.name for f in dataclasses.fields(trl.SFTConfig)}
    assert not unknown, unknown


def test_stateful_router_warns_when_nobody_updates_it(monkeypatch):
    from molora.routers import state

    monkeypatch.setattr(state, "_UNUPDATED_FORWARDS_WARNING", 3)
    monkeypatch.setattr(state, "_warned_unupdated", False)
    acc = state.StepAccumulator()
    acc.add(torch.ones(2), forward_id=1)
    acc.pop((2,), torch.device("cpu"))  # an update resets the count
    acc.add(torch.ones(2), forward_id=2)
    acc.add(torch.ones(2), forward_id=3)
    with pytest.warns(UserWarning, match="MoLoraCallback"):
        acc.add(torch.ones(2), forward_id=4)


def test_adamoe_top_k_counts_the_null_experts_too():
    """AdaMoE's top-k runs over the ``n`` true and ``m`` null experts (docs: pair it with a larger ``top_k``), so
    ``top_k`` may exceed ``num_experts`` up to ``n + m``; a token still uses at most ``n`` true experts."""
    config = MoLoraConfig(num_experts=4, top_k=6, router="adamoe", router_kwargs={"num_null_experts": 4})
    model = get_peft_model(make_llama(), config)
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    for stats in model.get_routing_stats().values():
        assert 2.0 <= stats.experts_per_token <= 4.0  # 6 slots, at most 4 null ones, at most 4 true experts
    with pytest.raises(ValueError, match=r"`top_k`=9 must be <= the experts this router selects among=8"):
        MoLoraConfig(num_experts=4, top_k=9, router="adamoe", router_kwargs={"num_null_experts": 4})
    with pytest.raises(ValueError, match=r"`top_k`=5 must be <= num_experts=4"):
        MoLoraConfig(num_experts=4, top_k=5, router="topk")
