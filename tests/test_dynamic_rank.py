"""DR-LoRA (docs/algorithms.md §5): spec vectors, masks, growth, schedule, save/load, compaction, Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CHAR_VOCAB, make_char_tokenizer, make_llama, sft_args
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import molora
from molora import MoLoraConfig, MoLoraLayer
from molora.adapters import dynamic_rank as dr
from molora.kernels import naive_delta

TESTS_DIR = Path(__file__).parent


def _config(**overrides) -> MoLoraConfig:
    kwargs = dict(
        r=8,
        num_experts=4,
        top_k=2,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj", "down_proj"],
        dynamic_rank={"start_step": 1, "end_step": 6},
    )
    kwargs.update(overrides)
    return MoLoraConfig(**kwargs)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _train_steps(model, steps: int, optimizer=None, total_steps=None, check_continuity=False):
    """A plain custom loop: forward, backward, update_importance, step, maybe_grow; returns growth per step."""
    inputs = _inputs()
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for step in range(1, steps + 1):
        model.train()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        molora.update_importance(model)
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            before = model(**inputs).logits
        grown = molora.maybe_grow(model, step, total_steps, optimizer=optimizer)
        if check_continuity:
            with torch.no_grad():
                after = model(**inputs).logits
            # (equal up to the rounding of products over the wider cut of masked_weights after a growth event)
            torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6, msg=f"output jumped at growth step {step}")
        history.append(grown)
    return history, optimizer


def _banks(model):
    return dr.dynamic_rank_banks(model)


# -- spec vectors ---------------------------------------------------------------------------------------------------


def test_frequency_ema_spec_vector():
    f = dr.ema_frequency(torch.full((4,), 0.25, dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2, 0.0]).double(), 0.9)
    torch.testing.assert_close(f, torch.tensor([0.275, 0.255, 0.245, 0.225], dtype=torch.float64))


def test_sensitivity_ema_spec_vector():
    ipt = unc = torch.zeros(1, dtype=torch.float64)
    ipt, unc, score = dr.sensitivity_ema(ipt, unc, torch.tensor([1.0]).double(), 0.85, 0.85)
    torch.testing.assert_close((ipt.item(), unc.item(), score.item()), (0.15, 0.1275, 0.019125))
    ipt, unc, score = dr.sensitivity_ema(ipt, unc, torch.tensor([3.0]).double(), 0.85, 0.85)
    torch.testing.assert_close((ipt.item(), unc.item()), (0.5775, 0.47175))
    assert score.item() == pytest.approx(0.272436, abs=1e-6)


def test_saliency_and_allocation_spec_vector():
    f = torch.tensor([0.40, 0.30, 0.20, 0.10])
    imp = torch.tensor([0.6, 2.0, 1.0, 0.5])
    (s,) = dr.saliency_scores([f], [imp])
    torch.testing.assert_close(s, torch.tensor([0.058537, 0.146341, 0.048780, 0.012195]).double(), atol=1e-6, rtol=0)
    assert torch.argsort(-s).tolist() == [1, 0, 2, 3]
    ranks = torch.full((4,), 4)
    seen = []
    for _ in range(6):
        ranks = dr.allocate(s, ranks, 12, growth_step=4, num_grow=1, budget=32)
        seen.append(ranks.tolist())
    assert seen[:4] == [[4, 8, 4, 4], [4, 12, 4, 4], [8, 12, 4, 4], [12, 12, 4, 4]]
    assert seen[4] == seen[5] == [12, 12, 4, 4]  # budget reached: no more growth


def test_an_event_with_fewer_experts_with_room_than_it_grows_goes_round_again():
    """Late in the schedule most experts are full: an event of ``m`` steps grows the experts with room several times
    (one step each left the budget unspent when ``target_rank`` is close to ``r``: 242 of 256)."""
    scores = torch.tensor([0.1, 0.4, 0.3, 0.2])
    ranks = torch.tensor([16, 8, 12, 16])
    new = dr.allocate(scores, ranks, 16, growth_step=2, num_grow=5, budget=64)
    assert new.tolist() == [16, 14, 16, 16]  # 5 steps: expert 1 three times, expert 2 twice
    assert dr.allocate(scores, new, 16, growth_step=2, num_grow=5, budget=64).tolist() == [16, 16, 16, 16]


def test_a_budget_at_full_capacity_is_spent():
    schedule = {"start_step": 1, "end_step": 12, "target_rank": 8}
    model = get_peft_model(make_llama(), _config(r=8, dynamic_rank=schedule))
    _train_steps(model, 14)
    stats = model.get_rank_stats()
    assert all(s.ranks == [8] * 4 for s in stats.values()), {k: s.ranks for k, s in stats.items()}


def test_saliency_weighs_banks_of_different_sizes_alike():
    """A bank of 4 base experts beside a molora bank of 8 (one budget): with uniform routing and equal importances
    every expert scores the same (per-bank ``f / sum f`` gave the smaller bank's experts twice the saliency)."""
    small, large = torch.full((4,), 0.25), torch.full((8,), 0.125)
    s_small, s_large = dr.saliency_scores([small, large], [torch.ones(4), torch.ones(8)])
    torch.testing.assert_close(s_small, torch.full((4,), float(s_large[0])).double())


def test_saliency_normalises_importance_over_layers_and_frequency_per_layer():
    f1, f2 = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])
    i1, i2 = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 4.0])
    s1, s2 = dr.saliency_scores([f1, f2], [i1, i2])
    torch.testing.assert_close(s1, torch.tensor([0.25 * 1 / 8, 0.75 * 1 / 8]).double())
    torch.testing.assert_close(s2, torch.tensor([0.5 * 2 / 8, 0.5 * 4 / 8]).double())
    # before any gradient every importance is 0: the frequency alone decides
    (s,) = dr.saliency_scores([torch.tensor([0.1, 0.6, 0.3])], [torch.zeros(3)])
    assert torch.argsort(-s).tolist() == [1, 2, 0]


# -- config and schedule --------------------------------------------------------------------------------------------

BAD_DYNAMIC_RANK = [
    ({"target_rank": 9}, r"`dynamic_rank\['target_rank'\]`=9 must be an integer in \[1, 8\]"),
    ({"init_rank": 5, "target_rank": 4}, r"`dynamic_rank\['init_rank'\]`=5 must be an integer in \[1, 4\]"),
    ({"target_rank": 6, "init_rank": 2, "growth_step": 3}, r"growth_step'\]`=3 must divide target_rank - init_rank"),
    ({"growth_step": 0}, r"`dynamic_rank\['growth_step'\]`=0 must be an integer"),
    ({"experts_per_event": 0}, r"`dynamic_rank\['experts_per_event'\]`=0 must be an integer >= 1"),
    ({"start_fraction": 0.8, "end_fraction": 0.5}, r"start_fraction'\]`=0.8 must be <= end_fraction=0.5"),
    ({"end_fraction": 1.5}, r"`dynamic_rank\['end_fraction'\]`=1.5 must be a number in \[0, 1\]"),
    ({"start_step": 10, "end_step": 5}, r"`dynamic_rank\['start_step'\]`=10 must be <= end_step=5"),
    ({"freq_source": "topk"}, r"`dynamic_rank\['freq_source'\]`='topk' is not supported; allowed values"),
    ({"beta1": 1.0}, r"`dynamic_rank\['beta1'\]`=1.0 must be a number in \[0, 1\)"),
    ({"target_ranks": 4}, r"unknown key\(s\) \['target_ranks'\].*'target_rank'"),
    ({"layer_ranks": {"q_proj": 20}}, r"layer_ranks'\]\['q_proj'\]`=20 must be an integer in \[1, 8\]"),
    # (a mixed-type key set could not be sorted when PEFT writes adapter_config.json)
    ({"layer_ranks": {"q_proj": 2, 0: 2}}, r"`dynamic_rank\['layer_ranks'\]` keys must be module names .*, got 0"),
]


@pytest.mark.parametrize("values, message", BAD_DYNAMIC_RANK, ids=[next(iter(v)) for v, _ in BAD_DYNAMIC_RANK])
def test_bad_dynamic_rank_values_fail_clearly(values, message):
    with pytest.raises(ValueError, match=message):
        MoLoraConfig(r=8, dynamic_rank=values)


def test_dynamic_rank_must_be_a_dict():
    with pytest.raises(ValueError, match=r"`dynamic_rank` must be a dict or None, got list"):
        MoLoraConfig(dynamic_rank=[1])


def test_defaults_follow_the_spec_and_scaling_uses_the_target_rank():
    config = MoLoraConfig(r=16, lora_alpha=16, dynamic_rank={})
    p = config.dynamic_rank_params
    assert (p.target_rank, p.init_rank, p.growth_step) == (8, 4, 2)  # r_max = 2 r_target, r_init = r_target / 2
    assert config.scaling == 16 / 8
    assert MoLoraConfig(r=16, lora_alpha=16, use_rslora=True, dynamic_rank={}).scaling == 16 / 8**0.5
    # a default growth step that does not divide the gap is reduced to one that does
    assert MoLoraConfig(r=20, dynamic_rank={}).dynamic_rank_params.growth_step == 1  # target 10, init 5


def test_schedule_resolution():
    p = dr.build_dynamic_rank_params({"experts_per_event": 2}, r=8)  # target 4, init 2, step 1
    s = dr.resolve_schedule(p, num_experts_total=8, total_steps=100)  # 16 units of rank to grow, 2 per event
    assert (s.start, s.end, s.experts_per_event, s.budget) == (10, 70, 2, 32)
    assert s.num_events >= 8 and s.is_event(10) and not s.is_event(9) and not s.is_event(71)
    p = dr.build_dynamic_rank_params({"growth_interval": 20}, r=8)
    s = dr.resolve_schedule(p, 8, 100)  # events at 10, 30, 50, 70
    assert s.num_events == 4 and s.experts_per_event == 4
    with pytest.raises(ValueError, match="total number of optimizer steps is needed"):
        dr.resolve_schedule(p, 8, None)
    p = dr.build_dynamic_rank_params({"growth_interval": 50, "experts_per_event": 1}, r=8)
    with pytest.warns(UserWarning, match="before spending its rank budget"):
        dr.resolve_schedule(p, 8, 100)
    # explicit steps past the run's end: the schedule would spend the budget, the run stops first
    p = dr.build_dynamic_rank_params({"start_step": 10, "end_step": 100, "growth_interval": 10}, r=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dr.resolve_schedule(p, 8, 100).num_events == 10  # the run reaches the end step
        dr.resolve_schedule(p, 8, None)  # the run's length is unknown (a custom loop)
        dr.resolve_schedule(p, 8, 95)  # the last event (step 100) is not needed: 9 events x 2 experts >= 16
    with pytest.warns(UserWarning, match=r"ends at step 100, after the run's last optimizer step 50: 5 of its 10"):
        dr.resolve_schedule(p, 8, 50)
    # a window of fractions narrower than a step (a one-step smoke run, int(0.7 * 1) = 0): one event at step 1
    for fractions, steps in (({}, 1), ({"end_fraction": 0.2}, 4)):
        s = dr.resolve_schedule(dr.build_dynamic_rank_params(fractions, r=8), 8, steps)
        assert (s.start, s.end, s.num_events, s.experts_per_event * s.growth_step) == (1, 1, 1, 16)
    # a step at one end and a fraction at the other that cross: named
    for window, named in (
        ({"start_step": 5, "end_fraction": 0.2}, r"start_step=5\).*end_fraction=0.2 of 10 steps"),
        ({"start_fraction": 0.5, "end_step": 2}, r"start_fraction=0.5 of 10 steps\).*end_step=2"),
    ):
        with pytest.raises(ValueError, match=named):
            dr.resolve_schedule(dr.build_dynamic_rank_params(window, r=8), 8, 10)


# -- masks and growth on a model ------------------------------------------------------------------------------------


def test_initial_ranks_masked_bank_equals_a_small_bank_and_masked_rows_get_no_gradient():
    model = get_peft_model(make_llama(), _config())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    state = layer.molora_rank["default"]
    assert state.ranks().tolist() == [2, 2, 2, 2]
    A, B = layer.molora_A["default"].weight, layer.molora_B["default"].weight
    x = torch.randn(5, 64)
    routing = layer.molora_router["default"](x)
    masked = naive_delta(x, *state.masked_weights(A, B), routing, 2.0)
    small = naive_delta(x, A[:, :, :2], B[:, :2, :], routing, 2.0)
    torch.testing.assert_close(masked, small)
    model.train()
    inputs = _inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert A.grad[:, :, 2:].abs().sum() == 0 and B.grad[:, 2:, :].abs().sum() == 0
    assert A.grad[:, :, :2].abs().sum() > 0 and B.grad[:, :2, :].abs().sum() > 0


def test_masked_bank_is_cut_to_the_active_columns_which_follow_growth_and_loading():
    """Early in training only the first components are active: masked_weights hands the compute paths the columns up
    to the last active one (E*2 of E*8 rank columns here), and the cut follows activations and a loaded state."""
    model = get_peft_model(make_llama(), _config())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    state = layer.molora_rank["default"]
    A, B = layer.molora_A["default"].weight, layer.molora_B["default"].weight
    masked_A, masked_B = state.masked_weights(A, B)
    assert masked_A.shape == (4, 64, 2) and masked_B.shape == (4, 2, 64)
    with torch.no_grad():
        state.activate(1, 3, step=1, A=A, B=B)  # expert 1 now has components 0..4
    masked_A, masked_B = state.masked_weights(A, B)
    assert masked_A.shape[-1] == 5 and masked_B.shape[1] == 5
    torch.testing.assert_close(masked_A[1], A[1, :, :5])
    assert masked_A[0, :, 2:].abs().sum() == 0 and masked_B[0, 2:].abs().sum() == 0  # expert 0: still rank 2
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    fresh = get_peft_model(make_llama(), _config())
    fresh_state = fresh.base_model.model.model.layers[0].self_attn.q_proj.molora_rank["default"]
    assert fresh_state.masked_weights(A, B)[0].shape[-1] == 2  # cached at 2 columns
    fresh_state.load_state_dict(saved)
    assert fresh_state.masked_weights(A, B)[0].shape[-1] == 5
    # an in-place copy of another state's buffer (what molora does for TRL's reference adapter), and a new buffer
    with torch.no_grad():
        fresh_state.activated_at.copy_(dr.DynamicRankState(4, 8, state.params).activated_at)
    assert fresh_state.masked_weights(A, B)[0].shape[-1] == 2
    replacement = saved["activated_at"].clone()
    while replacement._version < fresh_state.activated_at._version:  # the same version: told apart by identity
        replacement.add_(0)
    fresh_state.activated_at = replacement
    assert fresh_state.masked_weights(A, B)[0].shape[-1] == 5


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_model_takes_the_cut_of_its_own_rank_masks(tmp_path, how):
    """The cut is cached on the rank-mask buffer and its version; a copy of the model (whose buffer is a new tensor
    with a version counter of its own) must not reuse the original's cache: a grown mask copied before the next
    forward computed the old number of columns (probe_regress3)."""
    import copy

    model = get_peft_model(make_llama(), _config())
    inputs = _inputs()
    model.eval()
    with torch.no_grad():
        model(**inputs)  # the cut is cached at the initial rank
        bank = _banks(model)[0]
        bank.state.activate(0, 3, step=1, A=bank.A, B=bank.B)  # grown, no forward before the copy
        bank.B.normal_(0, 0.1)
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        copied = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(copied(**inputs).logits, expected, rtol=0, atol=0)
    assert _banks(copied)[0].state.masked_weights(bank.A, bank.B)[0].shape[-1] == 5


def test_cut_bank_computes_what_the_full_masked_bank_computes(monkeypatch):
    """The loss and every gradient with the cut to the active columns equal those of the whole masked capacity, on
    each compute path (the dense one fused with the base projection, the grouped one, the naive loop)."""
    results = {}
    for cut in (True, False):
        if not cut:
            monkeypatch.setattr(dr.DynamicRankState, "_active_columns", lambda self, mask, key: self.r_max)
        for kernel in ("auto", "grouped", "naive"):
            model = get_peft_model(make_llama(seed=3), _config(kernel=kernel, init_lora_weights=False)).train()
            for bank in _banks(model):
                assert bank.state.ranks().tolist() == [2, 2, 2, 2]
            with torch.no_grad():
                bank = _banks(model)[0]
                bank.state.activate(2, 1, step=1, A=bank.A, B=bank.B)
                bank.B.normal_(0, 0.1)  # trained Bs, the new component's included
            inputs = _inputs()
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            results[cut, kernel] = (loss.detach(), grads)
        monkeypatch.undo()
    for kernel in ("auto", "grouped", "naive"):
        (loss_c, grads_c), (loss_f, grads_f) = results[True, kernel], results[False, kernel]
        torch.testing.assert_close(loss_c, loss_f)
        for name in grads_f:
            torch.testing.assert_close(grads_c[name], grads_f[name], rtol=1e-5, atol=1e-7, msg=name)


def test_growth_picks_the_most_salient_experts_on_a_constructed_case():
    model = get_peft_model(make_llama(), _config(dynamic_rank={"start_step": 1, "end_step": 1}))
    banks = {b.key: b for b in _banks(model)}
    for bank in banks.values():
        bank.state.freq.fill_(0.25)
        bank.state.importance.fill_(1.0)
    q0 = banks["model.layers.0.self_attn.q_proj"].state
    d1 = banks["model.layers.1.mlp.down_proj"].state
    q0.freq.copy_(torch.tensor([0.1, 0.1, 0.7, 0.1]))  # expert 2 of q_proj 0 is routed to most ...
    q0.importance.copy_(torch.tensor([1.0, 1.0, 5.0, 1.0]))  # ... and learns most
    d1.importance.copy_(torch.tensor([1.0, 4.0, 1.0, 1.0]))  # expert 1 of down_proj 1 learns a lot
    sched = dr.GrowthSchedule(start=1, end=1, interval=1, experts_per_event=2, growth_step=2, budget=6 * 4 * 4)
    grown = dr.grow(model, 1, schedule=sched)
    assert grown == {"model.layers.0.self_attn.q_proj": {2: 4}, "model.layers.1.mlp.down_proj": {1: 4}}
    assert q0.ranks().tolist() == [2, 2, 4, 2] and d1.ranks().tolist() == [2, 4, 2, 2]
    assert q0.activated_at[2].tolist() == [0, 0, 1, 1, -1, -1, -1, -1]


def test_importance_follows_the_gradient_and_frequency_ignores_padding():
    model = get_peft_model(make_llama(), _config(lora_dropout=0.0))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    state = layer.molora_rank["default"]
    captured = {}
    router = layer.molora_router["default"]

    def keep_probs(module, args, out):
        captured["probs"] = out.probs.detach()

    handle = router.register_forward_hook(keep_probs)
    model.train()
    inputs = _inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    handle.remove()
    probs = captured["probs"]  # [T, E], the second sequence has 3 padding tokens
    valid = inputs["attention_mask"].reshape(-1).bool()
    A, B = layer.molora_A["default"].weight, layer.molora_B["default"].weight
    molora.update_importance(model)
    expected_f = 0.9 * 0.25 + 0.1 * probs[valid].mean(dim=0)
    torch.testing.assert_close(state.freq, expected_f)
    mask = state.mask()
    sens_a = (A.detach() * A.grad).abs() * mask[:, None, :]
    sens_b = (B.detach() * B.grad).abs() * mask[:, :, None]
    # one update from zero: Ibar = 0.15 I, Ubar = 0.15 * 0.85 I
    sigma = ((0.15 * sens_a) * (0.1275 * sens_a)).sum(1) + ((0.15 * sens_b) * (0.1275 * sens_b)).sum(2)
    sigma = sigma / (64 + 64)
    expected_i = (sigma * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(state.importance, expected_i)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_step_with_non_finite_gradients_leaves_the_importance_alone(bad):
    """An fp16 loss-scale overflow gives inf/NaN gradients, whose optimizer step the ``GradScaler`` skips: the
    sensitivity EMAs skip it too (folded in, the importance stayed NaN for the rest of training and growth went by
    frequency alone), and the next finite step updates them as usual."""
    model = get_peft_model(make_llama(), _config(lora_dropout=0.0)).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    state = layer.molora_rank["default"]
    inputs = _inputs()

    def backward(poison: bool) -> None:
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        if poison:
            layer.molora_B["default"].weight.grad[0, 0, 0] = bad

    backward(False)
    molora.update_importance(model)
    before = state.importance.clone()
    emas = {name: t.clone() for name, t in state._ema.items()}
    assert torch.isfinite(before).all() and (before > 0).all()
    other = model.base_model.model.model.layers[1].self_attn.q_proj.molora_rank["default"]
    other_before = other.importance.clone()
    backward(True)
    molora.update_importance(model)
    assert torch.equal(state.importance, before)
    assert all(torch.equal(state._ema[name], t) for name, t in emas.items())
    # another bank, whose gradients are finite, counts the step
    assert torch.isfinite(other.importance).all() and not torch.equal(other.importance, other_before)
    backward(False)
    molora.update_importance(model)
    assert torch.isfinite(state.importance).all() and not torch.equal(state.importance, before)


@pytest.mark.parametrize("cast", ["half_base", "model_to_bf16"])
def test_saliency_state_stays_fp32_on_a_half_precision_model(cast):
    """A half-precision base (PEFT places the state like the base layer) or ``model.to(bf16)`` cast every buffer: the
    sensitivities (~1e-12 here) rounded to 0 in fp16, the frequency EMA stalled in bf16 and the fp16 token count
    overflowed past 65504. The state keeps fp32 and the values it had before the cast."""
    base = make_llama()
    if cast == "half_base":
        base = base.half()
    model = get_peft_model(base, _config())
    state = model.base_model.model.model.layers[0].self_attn.q_proj.molora_rank["default"]
    state.freq.copy_(torch.tensor([0.2513, 0.2491, 0.2502, 0.2494]))
    before = state.freq.clone()
    if cast == "model_to_bf16":
        model = model.to(torch.bfloat16)
    buffers = ("freq", "importance", "_freq_sum", "_freq_tokens")
    assert {getattr(state, name).dtype for name in buffers} == {torch.float32}
    assert torch.equal(state.freq, before)
    # 9 micro-batches of 8192 tokens routed [0.4, 0.2, 0.2, 0.2]: 73728 tokens, beyond fp16's largest value
    for _ in range(9):
        state.observe_weights(torch.tensor([0.4, 0.2, 0.2, 0.2]).expand(8192, 4), None)
    assert state._freq_tokens.item() == 73728
    state.update_frequency()
    torch.testing.assert_close(state.freq, 0.9 * before + 0.1 * torch.tensor([0.4, 0.2, 0.2, 0.2]))
    model.train()
    inputs = _inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    molora.update_importance(model)
    assert (state.importance > 0).all()


def test_outputs_are_continuous_across_growth_and_budget_is_never_exceeded():
    model = get_peft_model(make_llama(), _config(dynamic_rank={"start_step": 2, "end_step": 5, "growth_step": 1}))
    budget = sum(b.state.num_experts * 4 for b in _banks(model))
    seen_totals = []
    inputs = _inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 8):
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        molora.update_importance(model)
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            before = model(**inputs).logits
        grown = molora.maybe_grow(model, step, optimizer=optimizer)
        with torch.no_grad():
            after = model(**inputs).logits
        torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6, msg=str(step))  # (see _train)
        assert bool(grown) == (2 <= step <= 5)
        for bank in _banks(model):
            assert int(bank.state.ranks().max()) <= 8
            # a new component starts with B = 0 and zeroed Adam moments
            new = bank.state.activated_at == step
            if new.any():
                e, j = new.nonzero()[0].tolist()
                assert bank.B[e, j].abs().sum() == 0
                for moment in optimizer.state[bank.B].values():
                    if moment.shape == bank.B.shape:
                        assert moment[e, j].abs().sum() == 0
        seen_totals.append(sum(int(b.state.ranks().sum()) for b in _banks(model)))
    assert all(t <= budget for t in seen_totals)
    assert seen_totals[-1] == budget and seen_totals == sorted(seen_totals)
    # growth is by saliency: ranks are heterogeneous
    all_ranks = torch.cat([b.state.ranks() for b in _banks(model)])
    assert all_ranks.min() < 4 < all_ranks.max()
    # calling again for a step that already grew changes nothing
    assert molora.maybe_grow(model, 5, optimizer=optimizer) == {}


@pytest.mark.parametrize("m, step, seed", [(1, 1, 0), (3, 2, 1), (7, 3, 2), (50, 1, 3)])
def test_random_saliency_never_exceeds_budget_or_capacity(m, step, seed):
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.full((24,), 2)
    cap = torch.randint(5, 9, (24,), generator=gen)
    budget = 24 * 4
    for _ in range(200):
        scores = torch.rand(24, generator=gen)
        new = dr.allocate(scores, ranks, cap, step, m, budget)
        assert int(new.sum()) <= budget and bool((new <= cap).all()) and bool((new >= ranks).all())
        assert int((new != ranks).sum()) <= m
        ranks = new
    assert int(ranks.sum()) > budget - step  # every unit that fits was spent


def test_rank_stats_history():
    model = get_peft_model(make_llama(), _config())
    _train_steps(model, 4)
    stats = model.get_rank_stats()
    assert set(stats) == {b.key for b in _banks(model)}
    for s in stats.values():
        assert s.history[0] == (0, [2, 2, 2, 2]) and s.history[-1][1] == s.ranks
        assert s.r_max == 8 and s.target_rank == 4 and len(s.freq) == 4
        steps = [h[0] for h in s.history]
        assert steps == sorted(steps) and all(1 <= t <= 4 for t in steps[1:])


# -- save / load / compaction ---------------------------------------------------------------------------------------

LOADER = textwrap.dedent(
    """
    import sys, torch
    import molora
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, inputs_path, out_path, *adapter_dirs = sys.argv[1:]
    results = []
    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
        with torch.no_grad():
            logits = model(**torch.load(inputs_path)).logits
        ranks = {k: v.ranks for k, v in model.get_rank_stats().items()}
        banks = {k: m.molora_A["default"].weight for k, m in model.named_modules() if hasattr(m, "molora_A")}
        shapes = {k: tuple(bank.shape) for k, bank in banks.items()}
        results.append({"logits": logits, "ranks": ranks, "shapes": shapes})
    torch.save(results, out_path)
    """
)


def _load_in_fresh_process(tmp_path, base_dir, adapter_dirs, inputs):
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    out = tmp_path / "out.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), str(base_dir), str(tmp_path / "inputs.pt"), str(out), *map(str, adapter_dirs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_save_load_restores_ranks_exactly_and_compaction_keeps_outputs(tmp_path):
    base_dir, adapter_dir, compact_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "compact"
    make_llama().save_pretrained(base_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), _config())
    _train_steps(model, 7)  # growth at steps 1..6, some ranks above and below the target
    model.eval()
    inputs = _inputs(3)
    with torch.no_grad():
        expected = model(**inputs).logits
    ranks = {k: v.ranks for k, v in model.get_rank_stats().items()}
    assert len({r for rs in ranks.values() for r in rs}) > 1
    model.save_pretrained(adapter_dir)
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert any(k.endswith("q_proj.molora_rank.activated_at") for k in tensors)
    assert any(k.endswith("q_proj.molora_rank.freq") for k in tensors)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["dynamic_rank"]["end_step"] == 6

    from_dir = molora.dynamic_rank.rank_stats_from_adapter(adapter_dir)
    assert {k: v.ranks for k, v in from_dir.items()} == ranks
    table = molora.dynamic_rank.format_rank_table(from_dir).splitlines()
    assert table[0] == "DR-LoRA ranks: total 96 / budget 96 over 6 banks" and len(table) == 2 + 6
    q0 = next(line for line in table if line.startswith("model.layers.0.self_attn.q_proj "))
    assert " ".join(map(str, ranks["model.layers.0.self_attn.q_proj"])) in q0
    layer_ranks = molora.compact_adapter(adapter_dir, compact_dir)
    assert layer_ranks == {k: max(v) for k, v in ranks.items()}
    assert any(r < 8 for r in layer_ranks.values())

    loaded, compact = _load_in_fresh_process(tmp_path, base_dir, [adapter_dir, compact_dir], inputs)
    assert torch.equal(loaded["logits"], expected)
    assert loaded["ranks"] == ranks
    assert compact["ranks"] == ranks
    for key, r_layer in layer_ranks.items():
        assert compact["shapes"]["base_model.model." + key][-1] == r_layer
    # dormant components contribute exact zeros, so dropping them does not change a single bit (same kernel)
    assert torch.equal(compact["logits"], expected)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), compact_dir).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)


def test_tools_read_an_adapter_saved_without_safetensors_and_compaction_fails_atomically(tmp_path, monkeypatch):
    """``save_pretrained(..., safe_serialization=False)`` writes ``adapter_model.bin``: the rank tools read it (they
    raised FileNotFoundError). Compacting in place writes every file before replacing any, so a failure part-way
    leaves the folder's adapter as it was (new weights beside the old config before)."""
    import molora.adapters.dynamic_rank.growth as growth

    model = get_peft_model(make_llama(), _config())
    _train_steps(model, 7)
    ranks = {k: v.ranks for k, v in model.get_rank_stats().items()}
    folder = tmp_path / "bin"
    model.save_pretrained(folder, safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    assert {k: v.ranks for k, v in molora.dynamic_rank.rank_stats_from_adapter(folder).items()} == ranks

    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    real_copy = growth.shutil.copyfile

    def failing_copy(src, dst, *args, **kwargs):  # the weights and the config are written, then a copy fails
        raise OSError("No space left on device")

    monkeypatch.setattr(growth.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        molora.compact_adapter(folder, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no staging folder left either
    monkeypatch.setattr(growth.shutil, "copyfile", real_copy)
    # interrupted while the files are moved into place (Ctrl-C between the weights and the config): moved back
    real_replace, moved = growth.os.replace, []

    def interrupted_replace(src, dst):
        if Path(dst).name == "adapter_config.json" and Path(src).parent.name.startswith(".compacting-"):
            raise KeyboardInterrupt
        moved.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(growth.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        molora.compact_adapter(folder, folder)
    assert "adapter_model.safetensors" in moved
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.setattr(growth.os, "replace", real_replace)
    # into another adapter's folder: the files it would upload with that adapter (statistics, heat map) go
    other = tmp_path / "other"
    model.save_pretrained(other)
    (other / "routing_stats.json").write_text("{}")
    (other / "expert_load.png").write_bytes(b"png")
    (other / "notes.txt").write_text("mine")
    molora.compact_adapter(folder, other)
    assert sorted(p.name for p in other.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "notes.txt",
    ]

    layer_ranks = molora.compact_adapter(folder, folder)  # in place: safetensors replace the .bin
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert layer_ranks == {k: max(v) for k, v in ranks.items()}
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no adapter weights"):
        molora.dynamic_rank.rank_stats_from_adapter(folder)


def test_growth_leaves_a_frozen_adapter_alone():
    """Training adapter ``a`` beside a frozen ``b`` (both DR-LoRA) with the documented loop: ``b``'s ranks and ``A``
    bank stay as they were (every adapter grew, and ``b``'s ``A`` rows were re-initialised, though ``b`` never ran)."""
    model = get_peft_model(make_llama(), _config(), adapter_name="a")
    model.add_adapter("b", _config())
    b_ranks = {key: stats.ranks for key, stats in model.get_rank_stats("b").items()}
    b_banks = {n: p.detach().clone() for n, p in model.named_parameters() if ".molora_A.b." in n}
    assert len(b_banks) == 6  # 3 projections x 2 layers
    history, _ = _train_steps(model, 6, total_steps=6)
    assert any(history), "adapter a must grow"
    assert {key: stats.ranks for key, stats in model.get_rank_stats("b").items()} == b_ranks
    for name, param in model.named_parameters():
        if name in b_banks:
            assert torch.equal(param, b_banks[name]), name
    # the callback's `dr/*` logs describe the adapter being trained: they summed the frozen one's banks too (a
    # preference trainer's reference copy: a budget that looked a quarter unspent when the trained one had spent it)
    from transformers import TrainerControl, TrainerState

    from molora.training import DynamicRankCallback

    logs, state = {}, TrainerState(global_step=6)
    DynamicRankCallback().on_log(None, state, TrainerControl(), logs=logs, model=model)
    assert logs == dr.rank_summary(model, "a") and logs != dr.rank_summary(model)
    assert logs["dr/budget"] == sum(
        b.state.num_experts * b.state.params.target_rank for b in dr.dynamic_rank_banks(model, "a")
    )


def test_adapter_without_dynamic_rank_has_no_rank_state():
    model = get_peft_model(make_llama(), MoLoraConfig(r=4, num_experts=2, top_k=1, task_type="CAUSAL_LM"))
    assert model.get_rank_stats() == {}
    assert all(len(m.molora_rank) == 0 for m in model.modules() if isinstance(m, MoLoraLayer))
    assert molora.maybe_grow(model, 1, 10) == {}


# -- Trainer / TRL --------------------------------------------------------------------------------------------------


def test_sft_trainer_grows_ranks_with_the_callback(tmp_path):
    trl = pytest.importorskip("trl")

    from molora.training import DynamicRankCallback

    data = _growth_text(32)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=6,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=2,
        save_strategy="no",
        use_cpu=True,
        max_length=32,
        dataloader_num_workers=0,
        seed=0,
    )
    config = _config(init_lora_weights=True, dynamic_rank={"experts_per_event": 12})  # 10% .. 70% of 6 steps
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=args,
        train_dataset=data,
        processing_class=make_char_tokenizer(),
        peft_config=config,
    )
    callback = DynamicRankCallback.install(trainer)
    trainer.train()
    schedule = callback.schedules["default"]
    assert (schedule.start, schedule.end, schedule.interval) == (1, 4, 1)
    steps = [e["step"] for e in callback.events]
    assert steps[0] == 1 and steps == sorted(steps) and all(schedule.is_event(t) for t in steps)
    budget = sum(b.state.num_experts * 4 for b in _banks(trainer.model))
    total = sum(int(b.state.ranks().sum()) for b in _banks(trainer.model))
    assert total == budget
    logged = [h for h in trainer.state.log_history if "dr/total_rank" in h]
    assert logged and logged[-1]["dr/total_rank"] == budget and logged[-1]["dr/budget"] == budget
    assert logged[0]["dr/total_rank"] < budget
    # importance was computed from real gradients during training
    assert any(float(b.state.importance.sum()) > 0 for b in _banks(trainer.model))


def _growth_text(n: int):
    from datasets import Dataset

    words = ["red fox", "blue cat", "green owl", "gray wolf"]
    return Dataset.from_list([{"text": f"the {words[i % 4]} sat on mat {i % 4}."} for i in range(n)])


def _sft_with_growth(output_dir, resume=None):
    """6 steps of SFT with a growth event every step (1..5), checkpoints at steps 2 and 4; returns the adapter's
    final tensors, the growth events and the warnings about the saliency EMAs."""
    import warnings

    trl = pytest.importorskip("trl")
    from molora.training import DynamicRankCallback

    args = sft_args(
        output_dir,
        max_steps=6,
        per_device_train_batch_size=2,
        lr_scheduler_type="linear",
        logging_steps=500,
        save_strategy="steps",
        save_steps=2,
        max_length=32,
    )
    growth = {"init_rank": 1, "target_rank": 3, "growth_step": 1, "start_step": 1, "end_step": 5}
    config = _config(init_lora_weights=True, dynamic_rank={**growth, "growth_interval": 1, "experts_per_event": 3})
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=args,
        train_dataset=_growth_text(24),
        processing_class=make_char_tokenizer(),
        peft_config=config,
    )
    callback = DynamicRankCallback.install(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    tensors = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "molora" in k}
    return tensors, callback.events, [str(w.message) for w in caught if "sensitivity EMAs" in str(w.message)]


def test_resumed_trainer_grows_exactly_as_the_uninterrupted_run(tmp_path):
    """The sensitivity EMAs are not in the adapter; the callback writes them into each checkpoint and reads them back
    on a resume, so growth inside the window continues bit for bit (without them the resumed run grew other experts
    at the next event: weights 8.0 apart at the end). A checkpoint moved away from ``output_dir`` is found through
    ``resume_from``; without it the callback warns that the EMAs restart."""
    import shutil

    full, events, _ = _sft_with_growth(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint-2" / dr.SALIENCY_FILE).is_file()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "moved")
    resumed, resumed_events, warned = _sft_with_growth(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-2"))
    assert not warned and resumed_events == events[2:] and len(resumed_events) == 3
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # resuming from a copy outside `output_dir`: the callback finds no file there, says so, the EMAs restart; told
    # the folder (`resume_from`, what `molora sft` does), it loads them
    from transformers import TrainerControl, TrainerState

    from molora.training import DynamicRankCallback

    model = get_peft_model(make_llama(vocab_size=CHAR_VOCAB), _config(dynamic_rank={"init_rank": 1}))
    model.add_adapter("frozen", _config(dynamic_rank={"init_rank": 1}))  # its banks have no EMAs to restore
    args = type("Args", (), {"output_dir": str(tmp_path / "other"), "resume_from_checkpoint": None})()
    begin = (args, TrainerState(global_step=2, max_steps=6), TrainerControl(), model)
    with pytest.warns(UserWarning, match="restart from zero.*resume_from"):
        DynamicRankCallback().on_train_begin(*begin)
    assert not dr.saliency_state(model)
    callback = DynamicRankCallback()
    callback.resume_from(tmp_path / "moved")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete restore says nothing
        callback.on_train_begin(*begin)
    saved = load_file(str(tmp_path / "moved" / dr.SALIENCY_FILE))
    restored = dr.saliency_state(model)
    assert restored.keys() == saved.keys() and len(saved) == 4 * len(_banks(model)) // 2
    assert all(torch.equal(restored[k], saved[k]) for k in saved)


def test_molora_inspect_shows_the_ranks_per_expert(tmp_path, capsys):
    from molora.cli import main as molora_main

    model = get_peft_model(make_llama(), _config())
    _train_steps(model, 6, total_steps=6)
    model.save_pretrained(tmp_path)
    expected = dr.format_rank_table(dr.rank_stats_from_adapter(tmp_path))
    assert molora_main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DR-LoRA ranks per expert" in out and expected in out
    assert any(len(set(s.ranks)) > 1 for s in dr.rank_stats_from_adapter(tmp_path).values())  # heterogeneous


def test_an_empty_dynamic_rank_dict_is_dr_lora_for_the_adapter_tools(tmp_path, capsys):
    """``dynamic_rank={}`` is DR-LoRA with every default: ``molora inspect`` prints its rank table and
    ``compact_adapter`` compacts it (both took the empty dict for "no DR-LoRA")."""
    from molora.cli import main as molora_main

    model = get_peft_model(make_llama(), _config(dynamic_rank={}))
    _train_steps(model, 2, total_steps=10)  # the default window: growth from step int(0.1 * 10) = 1
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["dynamic_rank"] == {}
    assert molora_main(["inspect", str(tmp_path / "adapter")]) == 0
    assert "DR-LoRA ranks per expert" in capsys.readouterr().out
    ranks = {k: v.ranks for k, v in model.get_rank_stats().items()}
    assert molora.compact_adapter(tmp_path / "adapter", tmp_path / "compact") == {k: max(v) for k, v in ranks.items()}


def test_the_adapter_tools_name_a_damaged_file(tmp_path):
    """``compact_adapter`` and ``rank_stats_from_adapter`` on a truncated weights file or config: a ``ValueError``
    naming the file (safetensors' and json's own errors named none)."""
    get_peft_model(make_llama(), _config()).save_pretrained(tmp_path / "a")
    weights, config = tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_config.json"
    weights.write_bytes(weights.read_bytes()[:100])
    for tool in (dr.rank_stats_from_adapter, lambda d: molora.compact_adapter(d, tmp_path / "out")):
        with pytest.raises(ValueError, match="Cannot read the adapter weights .*adapter_model.safetensors"):
            tool(tmp_path / "a")
    config.write_text(config.read_text()[:50])
    with pytest.raises(ValueError, match="adapter_config.json' is not valid JSON"):
        dr.rank_stats_from_adapter(tmp_path / "a")
    assert not (tmp_path / "out").exists()


def test_generation_in_train_mode_observes_nothing(batch):
    """RL trainers sample with ``generate`` while the model is in train mode: those tokens are not training data and
    must not enter the routing frequencies (eval forwards and generation count nothing)."""
    model = get_peft_model(make_llama(), _config()).train()
    model(**batch).loss.backward()
    states = [m.molora_rank["default"] for m in model.modules() if "default" in getattr(m, "molora_rank", {})]
    counted = [int(state._freq_tokens) for state in states]
    model.generate(input_ids=batch["input_ids"][1:], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert model.training and [int(state._freq_tokens) for state in states] == counted


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_routing_frequencies_count_each_token_once_with_activation_checkpointing(batch, use_reentrant):
    """A layer recomputed in backward observed its tokens a second time (a weighted mean then, since non-reentrant
    checkpointing may stop before the last layers); the recompute now observes nothing."""
    model = get_peft_model(make_llama(), _config())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    model.train()
    model(**batch).loss.backward()
    n_valid = int(batch["attention_mask"].sum())
    states = [m.molora_rank["default"] for m in model.modules() if "default" in getattr(m, "molora_rank", {})]
    assert states and all(int(state._freq_tokens) == n_valid for state in states)


def test_helpers_import_under_the_documented_name():
    """The docs name the helpers ``molora.dynamic_rank.*``: an import statement finds them too."""
    from molora.dynamic_rank import grow, rank_stats_from_adapter  # noqa: F401

    assert grow is dr.grow
