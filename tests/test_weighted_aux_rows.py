"""Aux losses over all rows with the padding weighted 0 (``AuxInputs.row_weight``), the form ``torch.compile`` gets.

Selecting the valid rows of a padded batch is a ``nonzero``: under ``torch.compile`` a graph break in every layer.
Compiled, the built-in routers keep every row and weight the padding 0 instead (those with losses of their own
weight them too); the losses and their gradients must be those of the valid rows. User routers that override the
losses without declaring ``handles_row_weight`` keep selecting rows. ``torch.compiler.is_compiling`` is patched here
to take the compiled branch eagerly; tests/test_compile.py trains such models compiled.
"""

from __future__ import annotations

import pytest
import torch

from molora.routers import TopKRouter, balancing, get_router_class
from molora.routers.balancing import BALANCE_LOSS_TYPES, AuxInputs

_VALID = torch.tensor([False, True, True, False, True, True, True, False, True, True])


def _router(name: str):
    torch.manual_seed(3)
    cls = get_router_class(name)
    return cls(6, 4, 2, params=cls.Params())


def _losses(router, x, valid, balance_type, need, compiling, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    routing = router(x, valid)
    inputs = router.aux_inputs(routing, valid)
    assert (inputs.row_weight is not None) == (compiling and valid is not None)
    losses = type(router).aux_losses(inputs, balance_type, need)
    grads = torch.autograd.grad(sum(losses.values()), [p for p in router.parameters() if p.requires_grad])
    return losses, grads


@pytest.mark.parametrize("name", ["topk", "soft", "topk_bias", "mor", "topp", "dynmole", "relu", "adamoe"])
@pytest.mark.parametrize("balance_type", BALANCE_LOSS_TYPES)
def test_weighted_rows_give_the_valid_rows_losses_and_gradients(name, balance_type, monkeypatch):
    router = _router(name)
    x = torch.randn(_VALID.numel(), 6, generator=torch.Generator().manual_seed(0))
    need = frozenset(router.loss_coefficients(_Config()))
    expected, expected_grads = _losses(router, x, _VALID, balance_type, need, False, monkeypatch)
    weighted, weighted_grads = _losses(router, x, _VALID, balance_type, need, True, monkeypatch)
    assert weighted.keys() == expected.keys() and len(expected) >= 2
    for key, value in expected.items():
        torch.testing.assert_close(weighted[key], value, msg=key)
    for got, want in zip(weighted_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    # padding changes nothing: the same losses as the valid tokens alone, without a mask
    alone, _ = _losses(router, x[_VALID], None, balance_type, need, True, monkeypatch)
    for key, value in alone.items():
        torch.testing.assert_close(weighted[key], value, msg=key)


@pytest.mark.parametrize("name", ["topk", "mor"])
def test_weighted_rows_without_a_valid_token_give_zero_connected_losses(name, monkeypatch):
    router = _router(name)
    x = torch.randn(4, 6)
    none_valid = torch.zeros(4, dtype=torch.bool)
    need = frozenset(router.loss_coefficients(_Config()))
    for compiling in (False, True):
        losses, grads = _losses(router, x, none_valid, "megatron", need, compiling, monkeypatch)
        assert all(float(v.detach()) == 0.0 for v in losses.values()), losses
        assert all(torch.all(g == 0) for g in grads)


def test_prompt_router_weights_its_sequence_rows(monkeypatch):
    # the prompt router's losses are over sequences: one row per sequence with a real token. Compiled, every
    # sequence has a row and a fully padded one weighs 0
    router = _router("prompt")
    batch, seq = 3, 4
    x = torch.randn(batch * seq, 6, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[0, :2] = False
    valid[2] = False  # no real token: no row in the losses
    valid = valid.reshape(-1)
    need = frozenset({"balance", "z"})
    results = {}
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        routing = router(x, valid, context=None, lead_shape=(batch, seq))
        inputs = router.aux_inputs(routing, valid)
        assert inputs.probs.shape[0] == (3 if compiling else 2)
        for balance_type in BALANCE_LOSS_TYPES:
            losses = type(router).aux_losses(inputs, balance_type, need)
            results[(compiling, balance_type)] = losses
    for balance_type in BALANCE_LOSS_TYPES:
        for key, value in results[(False, balance_type)].items():
            torch.testing.assert_close(results[(True, balance_type)][key], value, msg=(balance_type, key))


class _OwnLoss(TopKRouter):
    @staticmethod
    def aux_losses(inputs, balance_loss_type, need):
        return {"balance": inputs.probs.mean(dim=0).square().sum()}  # reads the rows, knows nothing of weights


class _OwnLossDeclared(_OwnLoss):
    handles_row_weight = True


class _MoRChild(get_router_class("mor")):
    pass  # inherits MoR's weighted losses


class _MoROwnLoss(get_router_class("mor")):
    @staticmethod
    def aux_losses(inputs, balance_loss_type, need):
        return {"balance": inputs.probs.mean(dim=0).square().sum()}


@pytest.mark.parametrize(
    ("router", "weighted"),
    [
        *[(name, True) for name in ("topk", "soft", "topk_bias", "expert_choice", "mor", "prompt")],
        *[(name, True) for name in ("topp", "dynmole", "relu", "adamoe")],
    ],
)
def test_which_routers_weight_their_rows_under_compile(router, weighted, monkeypatch):
    instance = _router(router)
    assert instance.weighted_aux_rows() is False  # eager: always the valid rows
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert instance.weighted_aux_rows() is weighted


def test_a_router_with_its_own_losses_keeps_the_valid_rows_unless_it_says_otherwise(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _OwnLoss(6, 4, 2).weighted_aux_rows() is False
    assert _OwnLossDeclared(6, 4, 2).weighted_aux_rows() is True
    assert _MoRChild(6, 4, 2).weighted_aux_rows() is True
    assert _MoROwnLoss(6, 4, 2).weighted_aux_rows() is False


def test_concatenating_weighted_and_selected_rows(monkeypatch):
    # loss_reduction="concat" reduces several routers' inputs together, whichever form each has
    router = _router("topk")
    x = torch.randn(_VALID.numel(), 6, generator=torch.Generator().manual_seed(1))
    routing = router(x, _VALID)
    selected = AuxInputs.from_routing(routing, _VALID, top_k=2)
    weighted = AuxInputs.from_routing(routing, _VALID, top_k=2, weighted=True)
    need = frozenset({"balance", "z"})
    for balance_type in BALANCE_LOSS_TYPES:
        want = TopKRouter.aux_losses(AuxInputs.cat([selected, selected]), balance_type, need)
        got = TopKRouter.aux_losses(AuxInputs.cat([selected, weighted]), balance_type, need)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, msg=(balance_type, key))


def test_mean_rows_of_per_token_vectors():
    values = torch.randn(_VALID.numel(), 3)
    weight = _VALID.float()
    torch.testing.assert_close(
        balancing.mean_rows(values, values, weight), balancing.mean_rows(values[_VALID], values)
    )


@pytest.mark.parametrize("name", ["topp", "dynmole", "relu", "adamoe"])
def test_variable_selection_lists_every_pair_when_compiling(name, monkeypatch):
    # a selection of data-dependent size would be a nonzero (a graph break); compiled, every (token, expert) pair is
    # listed with weight 0 off the selection: the same dense gates, selection and per-expert sums
    router = _router(name)
    x = torch.randn(_VALID.numel(), 6, generator=torch.Generator().manual_seed(0))
    eager = router(x, _VALID)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    listed = router(x, _VALID)
    assert listed.dense_assignments and not eager.dense_assignments
    assert listed.weight.numel() == x.shape[0] * eager.num_experts
    torch.testing.assert_close(listed.dense_gates(), eager.dense_gates())
    assert torch.equal(listed.selected(), eager.selected())
    sums = torch.zeros(eager.num_experts).index_add_(0, listed.expert_index, listed.weight)
    torch.testing.assert_close(sums, torch.zeros(eager.num_experts).index_add_(0, eager.expert_index, eager.weight))


@pytest.mark.parametrize("capacity_factor", [2.0, 0.3])
def test_expert_choice_static_selection_equals_eager(capacity_factor, monkeypatch):
    # compiled, expert choice does not read the number of real tokens back: the same choice in static shapes,
    # including the token-choice fallback of a group with at most one real token
    cls = get_router_class("expert_choice")
    torch.manual_seed(3)
    router = cls(6, 4, 2, params=cls.Params(capacity_factor=capacity_factor))
    x = torch.randn(_VALID.numel(), 6, generator=torch.Generator().manual_seed(0))
    one = torch.zeros_like(_VALID).index_fill(0, torch.tensor([4]), True)
    for valid in (_VALID, one, torch.zeros_like(_VALID)):
        eager = router.select(router.scores(x), valid)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        static = router.select(router.scores(x), valid)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        assert static.dense_assignments and not eager.dense_assignments
        assert torch.equal(static.selected(), eager.selected())
        torch.testing.assert_close(static.dense_gates(), eager.dense_gates())


class _Config:
    # the loss coefficients the routers read: every loss on
    aux_loss_coef = 0.01
    z_loss_coef = 0.001
