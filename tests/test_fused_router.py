"""Top-k routing and its aux losses in one autograd node (``molora.kernels.fused_router``).

Function level: values and gradients (through the gates, the per-assignment weights and both losses) against the
plain-op route (``topk_routing`` + ``AuxInputs`` + ``load_balancing_loss`` / ``router_z_loss``) in fp64, for every
balance type it takes, with and without renormalisation, padding and valid tokens; ``gradcheck`` on the function.
Model level: a MoLoRA model trained with the fused selection gives the same loss and gradients as with the router's
plain ``select`` (labels in the forward, and a trainer-style loss computed outside the model), and routers or
settings the function does not cover keep the general route.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import VOCAB, make_llama
from peft import get_peft_model

from molora import MoLoraConfig
from molora.kernels.fused_dense import dense_topk_layer
from molora.kernels.fused_router import topk_gates_and_losses
from molora.routers import balancing
from molora.routers.base import Router, register_router
from molora.routers.dynmole import (
    DynMoLERouter,
    renyi_entropy,
    renyi_entropy_grad,
    tsallis_entropy,
    tsallis_entropy_grad,
)
from molora.routers.loss_free import TopKBiasRouter
from molora.routers.soft import SoftRouter
from molora.routers.topk import TopKRouter, topk_routing
from molora.routers.topp import TopPRouter, TopPRule, shannon_entropy, shannon_entropy_grad

N_TOKENS, N_EXPERTS = 9, 5


def _reference(logits, k, renormalize, valid, balance_type, z_loss, selection_bias=None, sigmoid=False):
    probs = torch.softmax(logits, dim=-1)
    if sigmoid:  # the topk_bias router's select with sigmoid affinities (DeepSeek-V3)
        scores, log_scores = torch.sigmoid(logits), torch.nn.functional.logsigmoid(logits)
        probs = torch.softmax(log_scores, dim=-1)
        if renormalize:
            kept = dict(selection_scores=scores + selection_bias, log_scores=log_scores)
            routing = topk_routing(probs, k, renormalize=True, logits=logits, **kept)
        else:
            biased = scores + selection_bias
            routing = topk_routing(scores, k, renormalize=False, logits=logits, selection_scores=biased)
            routing.probs = probs
    elif selection_bias is None:
        routing = topk_routing(probs, k, renormalize=renormalize, logits=logits)
    else:  # the topk_bias router's select (softmax affinities)
        biased = dict(selection_scores=probs + selection_bias, log_scores=logits if renormalize else None)
        routing = topk_routing(probs, k, renormalize=renormalize, logits=logits, **biased)
    inputs = balancing.AuxInputs.from_routing(routing, valid, top_k=k)
    balance = balancing.load_balancing_loss(inputs, balance_type) if balance_type else None
    z = balancing.router_z_loss(inputs.logits) if z_loss else None
    weight = routing.weight.view(-1, k)
    return routing.dense_gates(), balance, z, routing.probs, routing.expert_index.view(-1, k), weight


def _valid(kind):
    if kind == "none":
        return None
    valid = torch.ones(N_TOKENS, dtype=torch.bool)
    if kind == "padded":
        valid[[0, 3, 4]] = False
    else:  # "empty": a batch of padding only
        valid[:] = False
    return valid


@pytest.mark.parametrize("balance_type", ["megatron", "mixtral", "switch", "soft", None])
@pytest.mark.parametrize("z_loss", [True, False])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("valid_kind", ["none", "padded", "empty"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("choice", ["probabilities", "biased", "sigmoid"])
def test_matches_plain_ops(balance_type, z_loss, renormalize, valid_kind, k, choice):
    torch.manual_seed(k + 7)
    base = torch.randn(N_TOKENS, N_EXPERTS, dtype=torch.float64) * 2
    valid = _valid(valid_kind)
    # a loss-free balancing bias large enough to change the choice of some tokens
    bias = torch.tensor([0.3, -0.2, 0.0, 0.25, -0.1], dtype=torch.float64) if choice != "probabilities" else None
    sigmoid = choice == "sigmoid"
    upstream = {
        "gates": torch.randn(N_TOKENS, N_EXPERTS, dtype=torch.float64),
        "weight": torch.randn(N_TOKENS, k, dtype=torch.float64),
        "balance": torch.tensor(0.7, dtype=torch.float64),
        "z": torch.tensor(-1.3, dtype=torch.float64),
    }
    results = []
    for fused in (True, False):
        logits = base.clone().requires_grad_(True)
        if fused:
            out = topk_gates_and_losses(
                logits,
                k,
                renormalize=renormalize,
                valid=valid,
                balance_type=balance_type,
                z_loss=z_loss,
                selection_bias=bias,
                sigmoid_scores=sigmoid,
            )
        else:
            out = _reference(logits, k, renormalize, valid, balance_type, z_loss, bias, sigmoid)
        gates, balance, z, probs, expert_index, weight = out[:6]
        if fused:  # no entropy loss, no selection rule
            assert out[6:] == (None, None)
        total = (gates * upstream["gates"]).sum() + (weight * upstream["weight"]).sum()
        for value, name in ((balance, "balance"), (z, "z")):
            if value is not None:
                total = total + value * upstream[name]
        (grad,) = torch.autograd.grad(total, logits)
        results.append((gates, balance, z, probs, expert_index, weight, grad))
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            # the plain z-loss computes in fp32 whatever the input (the fused one keeps fp64 here, fp32 in models)
            torch.testing.assert_close(got.detach(), want.detach().to(got.dtype), rtol=1e-5, atol=1e-7)
    fused_out = results[0]
    assert not fused_out[3].requires_grad and not fused_out[4].requires_grad  # probs, expert index
    if valid_kind == "empty" and balance_type is not None:
        assert fused_out[1].item() == 0.0


@pytest.mark.parametrize("balance_type", ["megatron", "mixtral", "switch", "soft"])
@pytest.mark.parametrize("rule", [None, "topp"])
def test_nan_in_padding_rows_stays_out_of_the_losses(balance_type, rule):
    """A padding row may hold NaN (transformers' eager attention gives a fully masked fp64 query NaN hidden states):
    the losses read the valid rows only, and weighting the rows by a 0/1 mask spread it (0 * NaN)."""
    torch.manual_seed(3)
    logits = torch.randn(N_TOKENS, N_EXPERTS, dtype=torch.float64)
    valid = _valid("padded")
    poisoned = logits.clone()
    poisoned[~valid] = float("nan")
    kwargs = dict(valid=valid, balance_type=balance_type, z_loss=True)
    if rule is not None:
        rule_ = TopPRule(0.7, inclusive=True, entropy=shannon_entropy, entropy_grad=shannon_entropy_grad)
        kwargs.update(rule=rule_, entropy_loss=True)
    k = 2 if rule is None else N_EXPERTS  # (a rule lists every expert)
    clean = topk_gates_and_losses(logits, k, **kwargs)
    got = topk_gates_and_losses(poisoned, k, **kwargs)
    losses = [1, 2] + ([6] if rule is not None else [])
    for index in losses:
        assert torch.isfinite(got[index]), index
        torch.testing.assert_close(got[index], clean[index])


@pytest.mark.parametrize("balance_type", ["megatron", "mixtral", "switch", "soft"])
@pytest.mark.parametrize("choice", ["probabilities", "biased", "sigmoid", "sigmoid unnormalised"])
def test_gradcheck(balance_type, choice):
    torch.manual_seed(0)
    logits = (torch.randn(6, 4, dtype=torch.float64) * 2).requires_grad_(True)
    valid = torch.tensor([True, False, True, True, True, False])
    bias = torch.tensor([0.2, -0.3, 0.1, 0.0], dtype=torch.float64) if choice != "probabilities" else None
    options = dict(sigmoid_scores=choice.startswith("sigmoid"), renormalize=choice != "sigmoid unnormalised")

    def fn(z):
        gates, balance, z_loss, _, _, weight, *_ = topk_gates_and_losses(
            z, 2, valid=valid, balance_type=balance_type, z_loss=True, selection_bias=bias, **options
        )
        return gates, balance, z_loss, weight

    assert torch.autograd.gradcheck(fn, (logits,))


def test_biased_choice_of_underflowed_experts_keeps_finite_gates_and_gradients():
    # spec 1.5: the bias may keep experts whose probability underflowed to 0; their renormalised gates come from the
    # kept logits (p_S / sum p_S would be 0 / 0, and its gradient 1 / 0)
    logits = torch.tensor([[0.0, -150.0, -160.0, -170.0], [5.0, 0.0, -1.0, -2.0]], requires_grad=True)
    bias = torch.tensor([-10.0, 2.0, 2.0, 0.0])
    gates, balance, _, probs, index, weight, *_ = topk_gates_and_losses(
        logits, 2, balance_type="megatron", selection_bias=bias
    )
    assert index[0].tolist() == [1, 2] and probs[0, 1] == 0.0
    torch.testing.assert_close(weight[0], torch.softmax(torch.tensor([-150.0, -160.0]), -1))
    (grad,) = torch.autograd.grad((gates * torch.arange(4.0)).sum() + balance, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_gates, ref_balance, *_ = _reference(ref_logits, 2, True, None, "megatron", False, bias)
    (ref,) = torch.autograd.grad((ref_gates * torch.arange(4.0)).sum() + ref_balance, ref_logits)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref)


def test_router_subclass_with_losses_of_its_own_keeps_them(monkeypatch):
    """A top-k (or soft) router subclass that overrides ``aux_losses`` or ``aux_inputs`` computes its losses its own
    way: the fused function, which computes the built-in ones, must not replace them (it did, silently, unless
    ``loss_reduction="concat"``)."""

    class Doubled(TopKRouter):
        @staticmethod
        def aux_losses(inputs, balance_loss_type, need):
            return {name: 2.0 * value for name, value in Router.aux_losses(inputs, balance_loss_type, need).items()}

    class Shifted(SoftRouter):
        def aux_inputs(self, routing, valid):
            inputs = super().aux_inputs(routing, valid)
            inputs.probs = inputs.probs.roll(1, dims=-1)
            return inputs

    logits = torch.randn(6, 4, dtype=torch.float64)
    for cls, base in ((Doubled, TopKRouter), (Shifted, SoftRouter)):
        router, plain = cls(8, 4, 2), base(8, 4, 2)
        assert router.fused_topk_args(torch.float32, frozenset({"balance"}), "soft") is None
        assert plain.fused_topk_args(torch.float32, frozenset({"balance"}), "soft") is not None
        assert router.select_with_losses(logits, None, frozenset({"balance"}), "soft")[1] is None

    losses = {}
    for name, cls in (("doubled", Doubled), ("topk", TopKRouter)):
        register_router(f"_test_{name}", cls, overwrite=True)
        config = MoLoraConfig(r=4, num_experts=4, top_k=2, router=f"_test_{name}", target_modules=["q_proj"])
        model = get_peft_model(make_llama(seed=1), config).train()
        ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
        model(input_ids=ids, labels=ids)
        losses[name] = model.molora_aux_losses()["balance"]
    torch.testing.assert_close(losses["doubled"], 2.0 * losses["topk"])


def test_aux_losses_must_be_a_static_method():
    with pytest.raises(TypeError, match=r"Mine.aux_losses must be a @staticmethod"):

        class Mine(TopKRouter):
            def aux_losses(self, inputs, balance_loss_type, need):
                return Router.aux_losses(inputs, balance_loss_type, need)


def test_bad_arguments_name_the_field():
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="balance_type.*'sofft'"):
        topk_gates_and_losses(logits, 2, balance_type="sofft")
    with pytest.raises(ValueError, match="`k`=5"):
        topk_gates_and_losses(logits, 5)


# -- selection rules (the top-p routers) ------------------------------------------------------------------------------

#: (router class, its params): every option of the two rules that changes the selection, the gates or the entropy
RULE_ROUTERS = {
    "topp": (TopPRouter, {}),
    "topp renormalised, capped": (TopPRouter, {"top_p": 0.6, "renormalize": True, "max_experts": 2}),
    "topp floor of 2": (TopPRouter, {"top_p": 0.2, "min_experts": 2}),
    "topp p=1": (TopPRouter, {"top_p": 1.0}),
    "dynmole": (DynMoLERouter, {"entropy_threshold": 0.8}),
    "dynmole renyi": (DynMoLERouter, {"entropy_type": "renyi", "q": 0.5, "entropy_threshold": 0.85}),
    "dynmole shannon, renormalised": (DynMoLERouter, {"q": 1.0, "renormalize": True, "entropy_threshold": 0.9}),
    "dynmole no broadcast": (DynMoLERouter, {"entropy_threshold": 1.0, "keep_top_k": 1, "top_p": 0.5}),
}


def _rule_router(name):
    cls, params = RULE_ROUTERS[name]
    return cls(N_EXPERTS, N_EXPERTS, 2, params=cls.Params(**params))


def _rule_plain(router, logits, valid, balance_type, z_loss, entropy_loss):
    """The router's own route: ``select``, ``aux_inputs``, ``aux_losses``."""
    routing = router.select(logits, valid)
    need = frozenset(name for name, on in (("balance", balance_type), ("z", z_loss), ("entropy", entropy_loss)) if on)
    losses = type(router).aux_losses(router.aux_inputs(routing, valid), balance_type or "megatron", need)
    return routing.dense_gates(), losses.get("balance"), losses.get("z"), losses.get("entropy"), routing.selected()


@pytest.mark.parametrize("balance_type", ["megatron", "mixtral", "switch", "soft", None])
@pytest.mark.parametrize("valid_kind", ["none", "padded", "empty"])
@pytest.mark.parametrize("losses", ["z and entropy", "neither"])
@pytest.mark.parametrize("name", sorted(RULE_ROUTERS))
def test_selection_rule_matches_the_routers_plain_ops(name, losses, valid_kind, balance_type):
    """The top-p and DynMoLE routers' rules in the top-k function: the same gates, kept experts, balance, z and
    entropy losses, and gradients, as their ``select`` and ``aux_inputs``/``aux_losses`` (fp64)."""
    router = _rule_router(name)
    torch.manual_seed(len(name))
    # some tokens confident, some flat (DynMoLE broadcasts those), one with an underflowed probability
    base = torch.randn(N_TOKENS, N_EXPERTS, dtype=torch.float64) * torch.linspace(0.2, 3.0, N_TOKENS).unsqueeze(1)
    base[2, 0] = -800.0
    valid = _valid(valid_kind)
    z_loss = entropy_loss = losses == "z and entropy"
    upstream = torch.randn(N_TOKENS, N_EXPERTS, dtype=torch.float64)
    results = []
    for fused in (True, False):
        logits = base.clone().requires_grad_(True)
        if fused:
            options = router._fused_topk_options()
            out = topk_gates_and_losses(
                logits, valid=valid, balance_type=balance_type, z_loss=z_loss, entropy_loss=entropy_loss, **options
            )
            gates, balance, z, entropy, active = out[0], out[1], out[2], out[6], out[7]
            assert torch.equal(gates.gather(-1, out[4]), out[5])  # the per-assignment gates, sorted
            # the routing tensors carry no gradient (a gradient through them would be dropped silently)
            assert not any(t.requires_grad for t in (out[3], out[4], active))
        else:
            gates, balance, z, entropy, active = _rule_plain(router, logits, valid, balance_type, z_loss, entropy_loss)
        total = (gates * upstream).sum()
        for value, coef in ((balance, 0.7), (z, -1.3), (entropy, 2.1)):
            if value is not None:
                total = total + coef * value
        (grad,) = torch.autograd.grad(total, logits)
        results.append((gates, balance, z, entropy, active, grad))
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            # the plain z-loss computes in fp32 whatever the input (the fused one keeps fp64 here, fp32 in models)
            torch.testing.assert_close(got.detach(), want.detach().to(got.dtype), rtol=1e-5, atol=1e-7)
    assert results[0][4].dtype == torch.bool
    assert torch.isfinite(results[0][5]).all()


@pytest.mark.parametrize("name", ["topp", "dynmole", "dynmole renyi", "dynmole shannon, renormalised"])
@pytest.mark.parametrize("balance_type", ["megatron", "soft"])
def test_selection_rule_gradcheck(name, balance_type):
    router = _rule_router(name)
    torch.manual_seed(3)
    logits = (torch.randn(6, N_EXPERTS, dtype=torch.float64) * 2).requires_grad_(True)
    valid = torch.tensor([True, False, True, True, True, False])

    def fn(z):
        out = topk_gates_and_losses(
            z, valid=valid, balance_type=balance_type, z_loss=True, entropy_loss=True, **router._fused_topk_options()
        )
        return out[0], out[1], out[2], out[5], out[6]

    assert torch.autograd.gradcheck(fn, (logits,))


def test_entropy_gradients_match_autograd():
    """The written-out entropy derivatives against autograd of the routers' entropies, a zero probability included
    (the clamp to the smallest normal float, which autograd differentiates as a step)."""
    probs = torch.softmax(torch.randn(5, 6, dtype=torch.float64) * 3, dim=-1)
    probs[0, 1] = 0.0
    cases = [
        (shannon_entropy, shannon_entropy_grad),
        *(
            (partial(fn, q=q, eps=eps, normalize=norm), partial(grad, q=q, eps=eps, normalize=norm))
            for fn, grad in ((tsallis_entropy, tsallis_entropy_grad),)
            for q in (0.5, 1.0, 1.1, 2.0)
            for eps in (0.0, 1e-5)
            for norm in (True, False)
        ),
        *(
            (
                partial(renyi_entropy, a=a, eps=eps, normalize=norm),
                partial(renyi_entropy_grad, a=a, eps=eps, normalize=norm),
            )
            for a in (0.5, 1.0, 2.0)
            for eps in (0.0, 1e-5)
            for norm in (True, False)
        ),
    ]
    for value_fn, grad_fn in cases:
        p = probs.clone().requires_grad_(True)
        upstream = torch.arange(1.0, 6.0, dtype=torch.float64)
        (want,) = torch.autograd.grad((value_fn(p) * upstream).sum(), p)
        torch.testing.assert_close(grad_fn(probs) * upstream.unsqueeze(1), want)


def test_selection_rule_bad_arguments():
    logits = torch.randn(3, N_EXPERTS)
    rule = _rule_router("topp")._fused_topk_options()["rule"]
    with pytest.raises(ValueError, match="every expert is listed: `k`=2 must be 5"):
        topk_gates_and_losses(logits, 2, rule=rule)
    with pytest.raises(ValueError, match="`entropy_loss=True` needs a selection `rule`"):
        topk_gates_and_losses(logits, 2, entropy_loss=True)
    with pytest.raises(ValueError, match="cannot be combined with `selection_bias`"):
        topk_gates_and_losses(logits, N_EXPERTS, rule=rule, selection_bias=torch.zeros(N_EXPERTS))
    no_entropy = TopPRule(0.5, inclusive=True)
    with pytest.raises(ValueError, match="TopPRule computes no entropy"):
        topk_gates_and_losses(logits, N_EXPERTS, rule=no_entropy, entropy_loss=True)
    with pytest.raises(ValueError, match="`broadcast_above` needs them"):
        TopPRule(0.5, inclusive=False, broadcast_above=0.9)


# -- model level -------------------------------------------------------------------------------------------------


def _train_grads(
    monkeypatch,
    fused,
    *,
    labels_in_forward=True,
    padded=False,
    dtype=torch.float32,
    router_cls=TopKRouter,
    before=None,
    after=None,
    **config_kwargs,
):
    if not fused:
        monkeypatch.setattr(router_cls, "select_with_losses", Router.select_with_losses)
    calls = []
    original = router_cls.select

    def spy(self, logits, valid):
        calls.append(1)
        return original(self, logits, valid)

    monkeypatch.setattr(router_cls, "select", spy)
    kwargs = dict(r=4, num_experts=4, top_k=2, init_lora_weights=False, target_modules=["q_proj", "up_proj"])
    kwargs.update(config_kwargs)
    model = get_peft_model(make_llama(seed=1).to(dtype), MoLoraConfig(**kwargs)).train()
    if before is not None:
        with torch.no_grad():
            before(model)
    torch.manual_seed(11)  # dropout and jitter noise draw the same numbers in both runs
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=gen)
    mask = torch.ones_like(input_ids)
    if padded:
        mask[0, :3] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    if labels_in_forward:
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        loss = out.loss
    else:
        # as TRL's SFTTrainer does: the model returns logits, the trainer computes the loss
        out = model(input_ids=input_ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if after is not None:
        after(model)
    monkeypatch.undo()
    return loss.detach(), grads, bool(calls), model.get_routing_stats()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"padded": True, "z_loss_coef": 0.01, "balance_loss_type": "mixtral"},
        {"padded": True, "balance_loss_type": "switch", "loss_reduction": "sum"},
        # the load (mean gate) carries gradient to the gates
        {"padded": True, "balance_loss_type": "soft", "router_kwargs": {"renormalize": False}},
        {"balance_loss_type": "soft", "labels_in_forward": False},
        {"labels_in_forward": False, "z_loss_coef": 0.01},
        {"router_kwargs": {"renormalize": False}, "aux_loss_coef": 0.5},
        # the router scored on its own (not in the dense GEMM): other kernels, dropout, jitter noise
        {"kernel": "grouped", "padded": True, "z_loss_coef": 0.01},
        {"kernel": "naive"},
        {"lora_dropout": 0.1},
        {"router_kwargs": {"jitter_noise": 0.1}},
    ],
)
def test_model_matches_plain_select(monkeypatch, settings):
    loss_f, grads_f, plain_f, stats_f = _train_grads(monkeypatch, True, **settings)
    loss_p, grads_p, plain_p, stats_p = _train_grads(monkeypatch, False, **settings)
    assert not plain_f and plain_p, "the fused selection was not taken (or the plain one was not)"
    torch.testing.assert_close(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-7, rtol=1e-5, msg=name)
    router_grads = [g for n, g in grads_f.items() if "molora_router" in n]
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads)
    assert stats_f.keys() == stats_p.keys()
    for name in stats_f:
        assert stats_f[name].tokens == stats_p[name].tokens
        assert stats_f[name].load == pytest.approx(stats_p[name].load)


@pytest.mark.parametrize(
    "router, settings",
    [
        ("topp", {}),
        ("topp", {"padded": True, "z_loss_coef": 0.01, "balance_loss_type": "mixtral"}),
        ("topp", {"labels_in_forward": False, "router_kwargs": {"renormalize": True, "top_p": 0.6}}),
        ("topp", {"padded": True, "kernel": "grouped", "router_kwargs": {"entropy_loss_coef": 0.1}}),
        ("topp", {"lora_dropout": 0.1, "balance_loss_type": "switch"}),  # the router scored on its own
        # configs/dynmole.yaml's losses
        ("dynmole", {"balance_loss_type": "soft", "aux_loss_coef": 0.001}),
        ("dynmole", {"padded": True, "labels_in_forward": False, "router_kwargs": {"entropy_threshold": 0.5}}),
        ("dynmole", {"padded": True, "kernel": "naive", "router_kwargs": {"entropy_type": "renyi", "q": 0.7}}),
        ("dynmole", {"z_loss_coef": 0.01, "loss_reduction": "sum", "router_kwargs": {"renormalize": True}}),
    ],
)
def test_top_p_routers_take_the_top_k_function(monkeypatch, router, settings):
    """``topp`` and ``dynmole`` train through the top-k function with their selection rule (on the dense path, in
    the one-node layer): the loss, every gradient, the aux losses and the routing statistics are those of their own
    ``select`` and ``aux_inputs``/``aux_losses``."""
    cls = {"topp": TopPRouter, "dynmole": DynMoLERouter}[router]
    aux = {}

    def keep_aux(name):
        return lambda model: aux.setdefault(name, model.molora_aux_losses())

    loss_f, grads_f, plain_f, stats_f = _train_grads(
        monkeypatch, True, router=router, router_cls=cls, after=keep_aux("fused"), **settings
    )
    loss_p, grads_p, plain_p, stats_p = _train_grads(
        monkeypatch, False, router=router, router_cls=cls, after=keep_aux("plain"), **settings
    )
    assert not plain_f and plain_p, "the fused selection was not taken (or the plain one was not)"
    torch.testing.assert_close(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-7, rtol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for n, g in grads_f.items() if "molora_router" in n)
    assert aux["fused"].keys() == aux["plain"].keys() >= {"balance", "entropy"}
    for name in aux["fused"]:
        torch.testing.assert_close(aux["fused"][name], aux["plain"][name], msg=name)
    assert stats_f.keys() == stats_p.keys()
    for name in stats_f:
        assert stats_f[name].tokens == stats_p[name].tokens
        assert stats_f[name].load == pytest.approx(stats_p[name].load)
        assert stats_f[name].gate_mass == pytest.approx(stats_p[name].gate_mass)
        assert stats_f[name].experts_per_token == pytest.approx(stats_p[name].experts_per_token)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"padded": True, "balance_loss_type": "soft", "z_loss_coef": 0.01},
        {"balance_loss_type": "soft", "labels_in_forward": False},
        {"padded": True, "balance_loss_type": "mixtral", "kernel": "grouped"},
    ],
)
def test_soft_router_takes_the_top_k_function(monkeypatch, settings):
    # soft routing is the top-k of all E experts without renormalisation: the same loss, gradients and statistics
    loss_f, grads_f, plain_f, stats_f = _train_grads(
        monkeypatch, True, router="soft", router_cls=SoftRouter, **settings
    )
    loss_p, grads_p, plain_p, stats_p = _train_grads(
        monkeypatch, False, router="soft", router_cls=SoftRouter, **settings
    )
    assert not plain_f and plain_p, "the fused selection was not taken (or the plain one was not)"
    torch.testing.assert_close(loss_f, loss_p)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-7, rtol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for n, g in grads_f.items() if "molora_router" in n)
    for name in stats_f:
        assert stats_f[name].tokens == stats_p[name].tokens
        assert stats_f[name].load == pytest.approx(stats_p[name].load)
    # with a temperature the probabilities are not softmax(logits): select() runs
    assert _train_grads(monkeypatch, True, router="soft", router_cls=SoftRouter, router_kwargs={"temperature": 2.0})[2]


@pytest.mark.parametrize(
    "settings",
    [
        {},  # sigmoid affinities, normalised gates (DeepSeek-V3)
        {"padded": True, "z_loss_coef": 0.01},
        {"labels_in_forward": False, "router_kwargs": {"normalize_gates": False}},
        {"router_kwargs": {"score_function": "softmax"}, "balance_loss_type": "soft", "z_loss_coef": 0.01},
        {"router_kwargs": {"score_function": "softmax", "normalize_gates": False}},
    ],
)
def test_loss_free_bias_router_takes_the_top_k_function(monkeypatch, settings):
    """``topk_bias`` observes its loads in ``observe_routing`` (not a ``forward`` of its own), so its scoring shares
    the experts' GEMM and a training forward runs as one top-k node with the bias moving the choice: the same loss,
    gradients, statistics and bias update as its plain ``select``."""
    results = []
    for fused in (True, False):
        biases = {}

        def set_bias(model):
            gen = torch.Generator().manual_seed(4)
            for name, buffer in model.named_buffers():
                if name.endswith("selection_bias"):
                    buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.2)  # changes some tokens' choice

        def update(model, biases=biases):
            model.molora_on_optimizer_step()
            biases.update({n: b.clone() for n, b in model.named_buffers() if n.endswith("selection_bias")})

        out = _train_grads(
            monkeypatch,
            fused,
            router="topk_bias",
            router_cls=TopKBiasRouter,
            before=set_bias,
            after=update,
            **settings,
        )
        results.append((*out, biases))
    (loss_f, grads_f, plain_f, stats_f, bias_f), (loss_p, grads_p, plain_p, stats_p, bias_p) = results
    assert not plain_f and plain_p, "the fused selection was not taken (or the plain one was not)"
    torch.testing.assert_close(loss_f, loss_p)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-7, rtol=1e-5, msg=name)
    for name in stats_f:
        assert stats_f[name].load == pytest.approx(stats_p[name].load)
    assert bias_f.keys() == bias_p.keys() and bias_f
    for name in bias_f:
        assert torch.equal(bias_f[name], bias_p[name]), name


def test_bf16_model_matches_plain_select(monkeypatch):
    # a bf16 model: the router still scores in fp32 (on its own, not in the experts' GEMM) and takes the function
    loss_f, grads_f, plain_f, _ = _train_grads(monkeypatch, True, dtype=torch.bfloat16, padded=True)
    loss_p, grads_p, plain_p, _ = _train_grads(monkeypatch, False, dtype=torch.bfloat16, padded=True)
    assert not plain_f and plain_p
    torch.testing.assert_close(loss_f, loss_p)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], msg=name)


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_reduction": "concat"},  # the losses need every router's inputs
    ],
)
def test_settings_it_does_not_cover_take_the_plain_route(monkeypatch, settings):
    loss_f, grads_f, plain_f, _ = _train_grads(monkeypatch, True, **settings)
    assert plain_f


def test_a_subclass_that_changes_the_selection_keeps_it():
    # the README's custom router: a TopKRouter whose select() differs must not be replaced by the fused function
    class Tempered(TopKRouter):
        def select(self, logits, valid):
            return topk_routing(torch.softmax(logits / 2, -1), self.top_k, logits=logits)

    router = Tempered(8, 4, 2)
    logits = torch.randn(5, 4)
    routing, losses = router.select_with_losses(logits, None, frozenset({"balance"}), "megatron")
    assert losses is None
    torch.testing.assert_close(routing.probs, torch.softmax(logits / 2, -1))
    plain = TopKRouter(8, 4, 2)
    routing, losses = plain.select_with_losses(logits, None, frozenset({"balance"}), "megatron")
    assert set(losses) == {"balance"}
    torch.testing.assert_close(routing.probs, torch.softmax(logits, -1))


@pytest.mark.parametrize("override", ["select", "select_with_losses"])
def test_subclass_overrides_run_in_a_training_forward_of_the_dense_path(override, monkeypatch):
    """The one-node top-k layer (``fused_dense.dense_topk_layer``) serves the plain top-k router only: a subclass that
    overrides ``select`` or ``select_with_losses`` gets its method called."""
    import molora.adapters.layer as layer_module

    calls, merged = [], []

    class Sub(TopKRouter):
        if override == "select":

            def select(self, logits, valid):
                calls.append(override)
                return super().select(logits, valid)

        else:

            def select_with_losses(self, logits, valid, need, balance_loss_type):
                calls.append(override)
                return super().select_with_losses(logits, valid, need, balance_loss_type)

    original = layer_module.dense_topk_layer

    def spy(*args, **kwargs):
        merged.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module, "dense_topk_layer", spy)
    config = MoLoraConfig(
        r=4, num_experts=4, top_k=2, kernel="dense", target_modules=["q_proj", "up_proj"], init_lora_weights=False
    )
    model = get_peft_model(make_llama(seed=1), config).train()
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert merged and not calls
    merged.clear()
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    for router in routers:
        router.__class__ = Sub
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert not merged and len(calls) == len(routers)


@pytest.mark.parametrize("fill", ["weights", "none"])
@pytest.mark.parametrize("valid_kind", ["none", "padded"])
def test_missing_loss_gradients_come_from_the_callback(fill, valid_kind):
    # a loss computed from the gates alone: the losses get no gradient, the callback supplies d(balance), d(z)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(N_TOKENS, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(N_TOKENS, 4, dtype=torch.float64, generator=gen)
    valid = _valid(valid_kind)
    calls = []

    def missing(device, dtype):
        calls.append((device, dtype))
        if fill == "none":
            return None, None
        return torch.tensor(0.3, dtype=dtype, device=device), torch.tensor(0.07, dtype=dtype, device=device)

    gates, *_ = topk_gates_and_losses(
        logits, 2, valid=valid, balance_type="megatron", z_loss=True, missing_grads=missing
    )
    (got,) = torch.autograd.grad((gates * up).sum(), logits)
    assert calls == [(logits.device, torch.float64)]
    ref_gates, balance, z, *_ = _reference(logits, 2, True, valid, "megatron", True)
    target = (ref_gates * up).sum() + (0.3 * balance + 0.07 * z if fill == "weights" else 0.0)
    (expected,) = torch.autograd.grad(target, logits)
    torch.testing.assert_close(got, expected)
    # with the losses in the differentiated expression the callback is not asked
    gates, balance, z, *_ = topk_gates_and_losses(
        logits, 2, valid=valid, balance_type="megatron", z_loss=True, missing_grads=missing
    )
    torch.autograd.grad((gates * up).sum() + balance + z, logits)
    assert len(calls) == 1


def test_double_backward_fails_clearly():
    # the written-out backward is not itself differentiable: a second derivative must raise, not be silently wrong
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    gates, balance, *_ = topk_gates_and_losses(logits, 2, balance_type="megatron")
    (grad,) = torch.autograd.grad((gates.square().sum() + balance), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_triton_kernel_model_matches_plain_select(monkeypatch):
    # the Triton kernels back-propagate into the per-assignment weights (the function's `weight` output); on a CPU
    # they run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1)
    pytest.importorskip("triton")
    from molora.kernels import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("triton cannot run here")
    settings = {"kernel": "triton", "padded": True, "z_loss_coef": 0.01}
    loss_f, grads_f, plain_f, _ = _train_grads(monkeypatch, True, **settings)
    loss_p, grads_p, plain_p, _ = _train_grads(monkeypatch, False, **settings)
    assert not plain_f and plain_p
    torch.testing.assert_close(loss_f, loss_p)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("n_tokens", [5, 300])  # the formula takes rows shorter than a CPU vector from 256 rows on
@pytest.mark.parametrize("n_experts", [4, 8, 32])
def test_softmax_rows_matches_torch(n_tokens, n_experts):
    from molora.kernels.fused_router import softmax_rows

    logits = torch.randn(n_tokens, n_experts) * 5
    torch.testing.assert_close(softmax_rows(logits), torch.softmax(logits, dim=-1))


@pytest.mark.parametrize("n_tokens", [7, 300])  # below and above the row count where the CPU softmax formula is used
def test_without_grad_same_values(n_tokens):
    torch.manual_seed(2)
    logits = torch.randn(n_tokens, 6)
    valid = torch.rand(n_tokens) > 0.3
    kwargs = dict(valid=valid, balance_type="mixtral", z_loss=True)
    with_grad = topk_gates_and_losses(logits.clone().requires_grad_(True), 2, **kwargs)
    with torch.no_grad():
        without = topk_gates_and_losses(logits, 2, **kwargs)
    assert len(without) == len(with_grad) == 8
    for got, want in zip(without, with_grad):
        if want is None:  # the entropy loss and the kept mask of a selection rule
            assert got is None
            continue
        assert not got.requires_grad
        torch.testing.assert_close(got, want.detach())


@pytest.mark.parametrize("balance_type", ["megatron", None])
@pytest.mark.parametrize("z_loss", [True, False])
def test_compiled_outputs_keep_their_gradients(balance_type, z_loss):
    """Compiled (Dynamo), the outputs of the top-k function and of the fused dense layer function are differentiable
    exactly as in eager, whichever losses are off: Dynamo applies ``mark_non_differentiable`` over the outputs
    counted without ``None`` entries, so the functions return placeholders instead of ``None`` inside."""
    torch.manual_seed(4)
    x = torch.randn(6, 8)
    router_weight = torch.randn(4, 8, requires_grad=True)
    bank, b_flat = torch.randn(4, 8, 2, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    base = torch.randn(8, 8)

    def topk(x, router_weight):
        return topk_gates_and_losses(x @ router_weight.t(), 2, balance_type=balance_type, z_loss=z_loss)

    def layer(x, router_weight):
        return dense_topk_layer(
            x, base, None, bank, b_flat, router_weight, 2.0, 2, balance_type=balance_type, z_loss=z_loss
        )

    for fn in (topk, layer):
        eager, compiled = fn(x, router_weight), torch.compile(fn, backend="eager")(x, router_weight)
        assert [t is None for t in compiled] == [t is None for t in eager]
        assert [t is not None and t.requires_grad for t in compiled] == [
            t is not None and t.requires_grad for t in eager
        ]
        # the per-assignment gates (the sixth output) carry the task gradient to the router in the top-k function
        if fn is topk:
            grad = torch.autograd.grad(compiled[5].sum(), router_weight)[0]
            torch.testing.assert_close(grad, torch.autograd.grad(eager[5].sum(), router_weight)[0])
