"""Tests for the routers from the literature: ``topp`` (Harder Tasks), ``dynmole`` (DynMoLE) and ``mor`` (MoR).

Covers:
    * the spec vectors (docs/algorithms.md): Tsallis entropy 1.3, inclusive top-p 1.2 / 10, DynMoLE T1-T4 and its
      losses on {T1, T2, T4} (2), MoR in both combine modes (4);
    * the variable number of assignments and its report in ``experts_per_token``;
    * extreme and low-precision router inputs (finite, non-negative gates and losses, finite gradients);
    * padding: masked out of every aux loss, and a sample gives the same logits and greedy generation alone as in a
      left-padded batch;
    * the kernel paths (dense / grouped / naive) agree in training and generation; save/load keeps the outputs;
    * ``router_kwargs`` validation, and the YAML recipes ``configs/{topp,dynmole,mor}.yaml``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import OneProjection, make_llama
from peft import PeftModel, get_peft_model
from trl import SFTConfig

from molora import MoLoraConfig, MoLoraLayer, get_router_class
from molora.routers import (
    DynMoLERouter,
    MixtureOfRoutersRouter,
    MoRParams,
    TopPRouter,
    balancing,
    renyi_entropy,
    tsallis_entropy,
)

SPEC_ATOL = 2e-6  # the spec rounds to 6 decimals
BASE_Z = [2.0, 1.0, 0.5, -1.0]
BASE_P = [0.609460, 0.224208, 0.135989, 0.030343]
P8 = [0.35, 0.25, 0.14, 0.10, 0.06, 0.05, 0.03, 0.02]
# DynMoLE rows of spec section 2
T1, T2, T4 = [2.0, 1.0, 0.5, -1.0], [0.1, 0.0, -0.1, 0.05], [-1.0, 0.5, 2.0, 0.0]
T3 = [math.log(p) for p in P8]


def identity_router(cls, num_experts: int, top_k: int = 2, **params):
    """A router whose logits equal its input (every scoring matrix is the identity)."""
    router = cls(in_features=num_experts, num_experts=num_experts, top_k=top_k, params=cls.Params(**params))
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
        if isinstance(router, MixtureOfRoutersRouter):
            router.sub_weight.copy_(torch.eye(num_experts).expand_as(router.sub_weight))
            router.main_weight.copy_(torch.eye(router.params.num_routers, num_experts))
    return router


def gate_rows(routing) -> list[dict[int, float]]:
    """Per token, ``{expert: gate}`` rebuilt from the assignment triples alone."""
    rows = [{} for _ in range(routing.num_tokens)]
    for t, e, w in zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist()):
        assert e not in rows[t], "an expert assigned twice to one token"
        rows[t][e] = w
    return rows


def assert_gates(routing, expected: list[list[float]]) -> None:
    """The triples select exactly the non-zero entries of ``expected`` with those values; dense gates agree."""
    rows = gate_rows(routing)
    for row, exp in zip(rows, expected):
        assert set(row) == {e for e, g in enumerate(exp) if g > 0}
        for e, g in row.items():
            assert g == pytest.approx(exp[e], abs=SPEC_ATOL)
    torch.testing.assert_close(routing.dense_gates(), torch.tensor(expected), atol=SPEC_ATOL, rtol=0)


def losses_of(router, routing, valid=None, balance_loss_type="soft", need=("balance", "entropy", "z")):
    inputs = router.aux_inputs(routing, valid)
    return type(router).aux_losses(inputs, balance_loss_type, frozenset(need))


# -- Tsallis / Renyi entropy (spec 1.3) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, q, raw, normalized, with_eps",
    [
        (BASE_P, 1.1, 0.941290, 0.727149, 0.726866),
        (BASE_P, 1.0, 1.014403, 0.731737, 0.731762),
        (BASE_P, 2.0, 0.558876, 0.745167, 0.745141),
        ([0.25] * 4, 1.1, 1.294494, 1.0, None),
        ([0.7, 0.2, 0.1, 0.0], 2.0, 0.460000, 0.613333, None),
        ([0.7, 0.2, 0.1, 0.0], 1.1, 0.748264, 0.578036, None),
    ],
)
def test_tsallis_entropy_spec_table(p, q, raw, normalized, with_eps):
    probs = torch.tensor([p], dtype=torch.float64)
    assert tsallis_entropy(probs, q, normalize=False).item() == pytest.approx(raw, abs=SPEC_ATOL)
    assert tsallis_entropy(probs, q).item() == pytest.approx(normalized, abs=SPEC_ATOL)
    if with_eps is not None:
        assert tsallis_entropy(probs, q, eps=1e-5).item() == pytest.approx(with_eps, abs=SPEC_ATOL)


def test_tsallis_shannon_limit_and_zero_probabilities():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    shannon = -sum(p * math.log(p) for p in (0.7, 0.2, 0.1))
    assert tsallis_entropy(probs, 1.0, normalize=False).item() == pytest.approx(shannon, abs=1e-12)
    # q -> 1 approaches the Shannon value continuously
    near = tsallis_entropy(probs, 1.0 + 1e-6, normalize=False).item()
    assert near == pytest.approx(shannon, abs=1e-5)
    for q in (0.5, 1.0, 1.1, 2.0):
        h = tsallis_entropy(probs, q)
        (grad,) = torch.autograd.grad(h.sum(), probs)
        assert torch.isfinite(grad).all(), q


def test_renyi_entropy():
    probs = torch.tensor([BASE_P, [0.25] * 4], dtype=torch.float64)
    # a = 2: -ln(sum p^2); uniform rows are 1 after normalisation by ln N
    expected = -math.log(sum(p * p for p in BASE_P)) / math.log(4)
    torch.testing.assert_close(renyi_entropy(probs, 2.0)[0].item(), expected)
    torch.testing.assert_close(renyi_entropy(probs, 2.0)[1].item(), 1.0)
    torch.testing.assert_close(renyi_entropy(probs, 1.0), tsallis_entropy(probs, 1.0))


# -- topp (spec 1.2, 10) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.4, [0.609460, 0.0, 0.0, 0.0]),
        (0.8, [0.609460, 0.224208, 0.0, 0.0]),
        (0.95, [0.609460, 0.224208, 0.135989, 0.0]),
        (1.0, BASE_P),
    ],
)
def test_topp_spec_vectors(top_p, expected):
    routing = identity_router(TopPRouter, 4, top_p=top_p)(torch.tensor([BASE_Z]))
    assert_gates(routing, [expected])
    torch.testing.assert_close(routing.probs, torch.tensor([BASE_P]), atol=SPEC_ATOL, rtol=0)


def test_topp_eight_experts_and_variable_assignments():
    z = torch.tensor([T3, [0.0] * 8, [30.0] + [0.0] * 7])
    routing = identity_router(TopPRouter, 8, top_p=0.4)(z)
    rows = gate_rows(routing)
    assert sorted(rows[0]) == [0, 1]  # cumsum 0.35, 0.60: the crossing expert is kept
    assert rows[0][0] == pytest.approx(0.35, abs=SPEC_ATOL) and rows[0][1] == pytest.approx(0.25, abs=SPEC_ATOL)
    assert sorted(rows[1]) == [0, 1, 2, 3]  # uniform over 8: 3/8 < 0.4 <= 4/8; ties go to the lower index
    assert list(rows[2]) == [0]
    assert routing.token_index.tolist() == [0, 0, 1, 1, 1, 1, 2]


@pytest.mark.parametrize(
    "params, expected_experts",
    [
        ({"top_p": 0.4, "min_experts": 2}, {0, 1}),
        ({"top_p": 0.4, "min_experts": 3}, {0, 1, 2}),
        ({"top_p": 1.0, "max_experts": 2}, {0, 1}),
        ({"top_p": 0.95, "min_experts": 1, "max_experts": 1}, {0}),
    ],
)
def test_topp_min_and_max_experts(params, expected_experts):
    routing = identity_router(TopPRouter, 4, **params)(torch.tensor([BASE_Z]))
    assert set(gate_rows(routing)[0]) == expected_experts


@pytest.mark.parametrize("inclusive", [False, True])
def test_top_p_of_one_keeps_every_expert_whatever_the_rounding(inclusive):
    """``top_p=1`` (allowed: the range is (0, 1]) is the whole mass: every expert. The fp32 cumulative sum of a row
    of probabilities lands a rounding step above 1.0 in a few percent of rows, where the exclusive rule (DynMoLE)
    dropped the row's last expert: which tokens got all experts was rounding noise (batch- and kernel-dependent)."""
    from molora.routers.topp import top_p_mask

    probs = torch.softmax(torch.randn(4096, 5, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    assert (sorted_probs.cumsum(dim=-1)[:, -1] > 1.0).any()  # rows where the rounding bites
    assert top_p_mask(probs, 1.0, inclusive=inclusive).all()
    capped = top_p_mask(probs, 1.0, inclusive=inclusive, max_experts=3)
    assert (capped.sum(dim=-1) == 3).all()
    assert torch.equal(capped, probs >= sorted_probs[:, 2:3])  # the three most probable


def test_topp_renormalize():
    routing = identity_router(TopPRouter, 4, top_p=0.8, renormalize=True)(torch.tensor([BASE_Z]))
    assert_gates(routing, [[0.731059, 0.268941, 0.0, 0.0]])


def test_topp_entropy_loss_spec_value_and_gradient():
    router = identity_router(TopPRouter, 4)
    routing = router(torch.tensor([BASE_Z]))
    assert router.loss_coefficients(MoLoraConfig())["entropy"] == pytest.approx(1e-4)
    losses = losses_of(router, routing, need=("entropy",))
    assert set(losses) == {"entropy"}
    assert losses["entropy"].item() == pytest.approx(1.014403, abs=SPEC_ATOL)  # L_dyn(base p), spec 10
    losses["entropy"].backward()
    assert router.weight.grad.abs().sum() > 0
    off = identity_router(TopPRouter, 4, entropy_loss_coef=0.0)
    assert off.loss_coefficients(MoLoraConfig())["entropy"] == 0.0


# -- dynmole (spec 2) ------------------------------------------------------------------------------------------------

DYNMOLE_CASES = {
    "T1": (T1, 0.726866, [0.609460, 0.224208, 0.0, 0.0], False),
    "T2": (T2, 0.997730, [0.272124, 0.246228, 0.222796, 0.258852], True),
    "T4": (T4, 0.622909, [0.0, 0.158445, 0.710100, 0.0], False),
}


@pytest.mark.parametrize("case", list(DYNMOLE_CASES))
def test_dynmole_spec_vectors(case):
    z, entropy, gates, broadcast = DYNMOLE_CASES[case]
    routing = identity_router(DynMoLERouter, 4)(torch.tensor([z]))
    assert routing.entropy.item() == pytest.approx(entropy, abs=SPEC_ATOL)
    assert routing.broadcast.tolist() == [broadcast]
    assert_gates(routing, [gates])


def test_dynmole_t3_keeps_three_of_eight_experts():
    routing = identity_router(DynMoLERouter, 8)(torch.tensor([T3]))
    assert routing.entropy.item() == pytest.approx(0.829494, abs=SPEC_ATOL)
    assert_gates(routing, [[0.35, 0.25, 0.14, 0.0, 0.0, 0.0, 0.0, 0.0]])


def test_dynmole_options():
    z = torch.tensor([T1, T2])
    # renormalised T1 (spec 2, trap 1)
    routing = identity_router(DynMoLERouter, 4, renormalize=True)(z)
    assert gate_rows(routing)[0] == pytest.approx({0: 0.731058, 1: 0.268942}, abs=SPEC_ATOL)
    assert sum(gate_rows(routing)[1].values()) == pytest.approx(1.0)
    # threshold >= 1 turns the broadcast off: T2 keeps its exclusive top-p set (cumsum .272, .531, .777) and floor 2
    routing = identity_router(DynMoLERouter, 4, entropy_threshold=1.0)(z)
    assert set(gate_rows(routing)[1]) == {0, 3}
    assert not routing.broadcast.any()
    # keep_top_k defaults to the adapter's top_k
    assert set(gate_rows(identity_router(DynMoLERouter, 4, top_k=1)(z))[0]) == {0}
    assert set(gate_rows(identity_router(DynMoLERouter, 4, top_k=1, keep_top_k=3)(z))[0]) == {0, 1, 2}
    # renyi entropy drives the switch when asked for
    router = identity_router(DynMoLERouter, 4, entropy_type="renyi", q=2.0, entropy_eps=0.0)
    torch.testing.assert_close(router(z).entropy, renyi_entropy(torch.softmax(z, -1), 2.0))


def test_dynmole_losses_spec_batch():
    router = identity_router(DynMoLERouter, 4)
    routing = router(torch.tensor([T1, T2, T4]))
    inputs = router.aux_inputs(routing, None)
    torch.testing.assert_close(
        balancing.expert_load(inputs, "soft"),
        torch.tensor([0.293861, 0.209627, 0.310965, 0.086284]),
        atol=SPEC_ATOL,
        rtol=0,
    )
    torch.testing.assert_close(inputs.probs.mean(0), torch.tensor([0.305646, 0.209627, 0.356295, 0.128432]))
    losses = losses_of(router, routing)
    assert losses["entropy"].item() == pytest.approx(0.782501, abs=SPEC_ATOL)
    assert losses["balance"].item() == pytest.approx(1.022552, abs=SPEC_ATOL)
    losses["entropy"].backward()
    assert router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_reduction", ["mean", "concat"])
def test_dynmole_weighted_aux_loss_through_the_model(loss_reduction):
    """The paper's setting (soft balance 0.001, entropy 0.01): L_aux = 0.008848 on {T1, T2, T4}, padded or not."""
    config = MoLoraConfig(
        r=1,
        num_experts=4,
        top_k=2,
        router="dynmole",
        target_modules=["proj"],
        balance_loss_type="soft",
        aux_loss_coef=0.001,
        loss_reduction=loss_reduction,
    )
    model = get_peft_model(OneProjection(4), config)
    router = model.base_model.model.proj.molora_router["default"]
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    model(input_ids=torch.tensor([[T1, T2, T4]]))
    assert {k: round(v.item(), 6) for k, v in model.molora_aux_losses().items()} == {
        "entropy": 0.782501,
        "balance": 1.022552,
    }
    assert model.molora_aux_loss().item() == pytest.approx(0.008848, abs=SPEC_ATOL)
    # the same rows spread over two left-padded sequences, garbage under the padding
    x = torch.tensor([[[9.0, -9.0, 3.0, 0.0], T1, T2], [[-5.0, 7.0, 1.0, 2.0], [0.0, 0.0, 8.0, -8.0], T4]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    model(input_ids=x, attention_mask=mask)
    assert model.molora_aux_loss().item() == pytest.approx(0.008848, abs=SPEC_ATOL)


# -- mor (spec 4) ----------------------------------------------------------------------------------------------------


def mor_spec_router(combine: str):
    """MoR with d_in = 1 and x = [1]: the sub-routers' logits are s_1, s_2 and the main logits [1, 0] (spec 4)."""
    router = MixtureOfRoutersRouter(in_features=1, num_experts=4, top_k=2, params=MoRParams(combine=combine))
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[2.0], [1.0], [0.5], [-1.0]]))
        router.sub_weight.copy_(torch.tensor([[[0.0], [2.0], [0.0], [1.0]]]))
        router.main_weight.copy_(torch.tensor([[1.0], [0.0]]))
    return router


@pytest.mark.parametrize(
    "combine, probs, gates",
    [
        ("probs", [0.467764, 0.328043, 0.121629, 0.082564], [0.587786, 0.412214, 0.0, 0.0]),
        ("logits", [0.433965, 0.357733, 0.144948, 0.063353], None),
    ],
)
def test_mor_spec_vector(combine, probs, gates):
    router = mor_spec_router(combine)
    routing = router(torch.ones(1, 1))
    torch.testing.assert_close(routing.main_probs, torch.tensor([[0.731059, 0.268941]]), atol=SPEC_ATOL, rtol=0)
    torch.testing.assert_close(
        torch.softmax(routing.sub_logits, -1),
        torch.tensor([[BASE_P, [0.082595, 0.610296, 0.082595, 0.224515]]]),
        atol=SPEC_ATOL,
        rtol=0,
    )
    torch.testing.assert_close(routing.probs, torch.tensor([probs]), atol=SPEC_ATOL, rtol=0)
    if gates is None:  # top-2 {0, 1} renormalised
        gates = [probs[0] / (probs[0] + probs[1]), probs[1] / (probs[0] + probs[1]), 0.0, 0.0]
    assert_gates(routing, [gates])


def test_mor_losses():
    router = mor_spec_router("probs")
    router.params = MoRParams(main_balance_coef=0.1)
    assert router.loss_coefficients(MoLoraConfig(z_loss_coef=1e-3)) == pytest.approx(
        {"balance": 0.01, "z": 1e-3, "main_balance": 0.1}
    )
    routing = router(torch.tensor([[1.0], [-1.0]]))
    losses = losses_of(router, routing, balance_loss_type="mixtral", need=("balance", "z", "main_balance"))
    # main weights softmax([1, 0]) and softmax([-1, 0]) average to [0.5, 0.5]: perfect balance gives 1
    assert losses["main_balance"].item() == pytest.approx(1.0, abs=1e-6)
    # the z-loss averages logsumexp^2 over tokens and sub-routers; logits flip sign with x
    lse = [torch.logsumexp(torch.tensor(s), 0).item() for s in ([2, 1, 0.5, -1], [0, 2, 0, 1])]
    lse += [torch.logsumexp(-torch.tensor(s), 0).item() for s in ([2, 1, 0.5, -1], [0, 2, 0, 1])]
    assert lse[0] == pytest.approx(2.495182, abs=SPEC_ATOL)  # spec 1.5
    assert losses["z"].item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    # one token: R * sum_j w_j^2 with w = [0.731059, 0.268941]
    one = losses_of(router, router(torch.ones(1, 1)), need=("main_balance",))
    assert one["main_balance"].item() == pytest.approx(2 * (0.731059**2 + 0.268941**2), abs=1e-5)
    one["main_balance"].backward()
    assert router.main_weight.grad.abs().sum() > 0
    assert not router.weight.grad.any() and not router.sub_weight.grad.any()


def test_mor_parameters_are_distinct_fp32_and_reinitialised():
    torch.manual_seed(0)
    router = MixtureOfRoutersRouter(in_features=16, num_experts=4, top_k=2, params=MoRParams(num_routers=3))
    assert router.sub_weight.shape == (2, 4, 16) and router.main_weight.shape == (3, 16)
    matrices = [router.weight, *router.sub_weight, router.main_weight]
    assert all(m.dtype == torch.float32 for m in matrices)
    bound = 1 / 4  # kaiming-uniform U(+-1/sqrt(d_in))
    assert all(m.abs().max() <= bound and m.abs().max() > bound / 2 for m in matrices)
    assert not torch.equal(router.weight, router.sub_weight[0])
    assert not torch.equal(router.sub_weight[0], router.sub_weight[1])
    before = router.sub_weight.detach().clone()
    router.reset_parameters()
    assert not torch.equal(before, router.sub_weight)
    assert sorted(n for n, _ in router.named_parameters()) == ["main_weight", "sub_weight", "weight"]


# -- every router: contract and robustness ----------------------------------------------------------------------------

ROUTER_CASES = [
    ("topp", {}),
    ("topp", {"top_p": 0.9, "renormalize": True, "max_experts": 3}),
    ("dynmole", {}),
    ("dynmole", {"q": 1.0, "renormalize": True}),
    ("dynmole", {"entropy_type": "renyi", "q": 0.5, "entropy_eps": 0.0}),
    ("dynmole", {"q": 0.3, "entropy_eps": 0.0, "entropy_threshold": 0.5}),
    ("mor", {"main_balance_coef": 0.01}),
    ("mor", {"combine": "logits", "num_routers": 3}),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(ROUTER_CASES)]
EXTREME_LOGITS = {
    "pm1e4": [[1e4, -1e4, 0.0, 1e4 - 8], [-1e4, -1e4, 1e4, -1e4], [0.0, 1e4, -1e4, 16.0]],
    "all_equal": [[0.0] * 4, [3.0] * 4, [-1e4] * 4],
    "all_large": [[1e4, 1e4 - 16, 1e4 - 32, 1e4 - 64], [-1e4, -1e4 + 8, -1e4 + 16, -1e4 + 64], [1e4] * 4],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logits_name", list(EXTREME_LOGITS))
@pytest.mark.parametrize("case", ROUTER_CASES, ids=CASE_IDS)
def test_extreme_and_low_precision_inputs(case, logits_name, dtype):
    name, params = case
    router = identity_router(get_router_class(name), 4, **params)
    x = torch.tensor(EXTREME_LOGITS[logits_name], dtype=dtype)
    routing = router(x)
    for label, tensor in [("probs", routing.probs), ("weight", routing.weight), ("gates", routing.dense_gates())]:
        assert tensor.dtype == torch.float32, label
        assert torch.isfinite(tensor).all(), label
        assert (tensor >= 0).all(), label
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(3))
    assert (routing.dense_gates().sum(-1) <= 1 + 1e-5).all()
    assert (routing.token_index.bincount(minlength=3) >= 1).all()  # every token uses an expert
    losses = losses_of(router, routing, need=("balance", "z", "entropy", "main_balance"))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for pname, p in router.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("case", ROUTER_CASES, ids=CASE_IDS)
def test_padding_rows_never_change_aux_losses(case):
    name, params = case
    torch.manual_seed(7)
    cls = get_router_class(name)
    router = cls(in_features=6, num_experts=4, top_k=2, params=cls.Params(**params))
    real = torch.randn(5, 6)
    padded = torch.cat([torch.randn(3, 6) * 50, real[:2], torch.randn(1, 6), real[2:]])
    valid = torch.tensor([False] * 3 + [True] * 2 + [False] + [True] * 3)
    need = ("balance", "z", "entropy", "main_balance")
    for balance_loss_type in ("soft", "megatron"):
        expected = losses_of(router, router(real), balance_loss_type=balance_loss_type, need=need)
        got = losses_of(router, router(padded, valid), valid, balance_loss_type=balance_loss_type, need=need)
        assert set(got) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=key)
    # no valid token at all: zero losses that still reach the router
    none = losses_of(router, router(padded, torch.zeros(9, dtype=torch.bool)), torch.zeros(9, dtype=torch.bool))
    assert all(v.item() == 0 and v.requires_grad for v in none.values())


# -- router_kwargs validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "router, kwargs, field",
    [
        ("topp", {"top_p": 0.0}, "top_p"),
        ("topp", {"top_p": 1.5}, "top_p"),
        ("topp", {"min_experts": 0}, "min_experts"),
        ("topp", {"min_experts": 5}, "min_experts"),
        ("topp", {"min_experts": 3, "max_experts": 2}, "max_experts"),
        ("topp", {"max_experts": 5}, "max_experts"),
        ("topp", {"max_experts": 2.0}, "max_experts"),
        ("topp", {"entropy_loss_coef": -1.0}, "entropy_loss_coef"),
        ("topp", {"top_p": "0.4"}, "top_p"),
        ("dynmole", {"q": 0.0}, "q"),
        ("dynmole", {"q": 2.5}, "q"),
        ("dynmole", {"entropy_threshold": -0.1}, "entropy_threshold"),
        ("dynmole", {"entropy_type": "shannon"}, "entropy_type"),
        ("dynmole", {"entropy_eps": -1e-5}, "entropy_eps"),
        ("dynmole", {"keep_top_k": 0}, "keep_top_k"),
        ("dynmole", {"keep_top_k": 5}, "keep_top_k"),
        ("dynmole", {"keep_top_k": True}, "keep_top_k"),
        ("dynmole", {"top_p": 1.01}, "top_p"),
        ("dynmole", {"entropy_loss_coef": float("nan")}, "entropy_loss_coef"),
        ("dynmole", {"renormalize": 1}, "renormalize"),
        ("mor", {"num_routers": 1}, "num_routers"),
        ("mor", {"num_routers": 2.0}, "num_routers"),
        ("mor", {"combine": "votes"}, "combine"),
        ("mor", {"main_balance_coef": -0.1}, "main_balance_coef"),
        ("mor", {"top_p": 0.5}, "top_p"),
    ],
)
def test_bad_router_kwargs_raise_naming_the_field(router, kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoLoraConfig(num_experts=4, top_k=2, router=router, router_kwargs=kwargs)


def test_choice_errors_list_allowed_values():
    with pytest.raises(ValueError, match=r"\['tsallis', 'renyi'\]"):
        MoLoraConfig(router="dynmole", router_kwargs={"entropy_type": "x"})
    with pytest.raises(ValueError, match=r"\['probs', 'logits'\]"):
        MoLoraConfig(router="mor", router_kwargs={"combine": "x"})


def test_defaults_follow_the_papers():
    assert TopPRouter.Params() == TopPRouter.Params(
        top_p=0.4, min_experts=1, max_experts=None, renormalize=False, entropy_loss_coef=1e-4
    )
    assert DynMoLERouter.Params() == DynMoLERouter.Params(
        q=1.1,
        entropy_threshold=0.9,
        entropy_type="tsallis",
        entropy_eps=1e-5,
        keep_top_k=None,
        top_p=0.75,
        renormalize=False,
        entropy_loss_coef=0.01,
    )
    assert MixtureOfRoutersRouter.Params() == MoRParams(
        num_routers=2, combine="probs", renormalize=True, main_balance_coef=0.0
    )


# -- in a model: kernels, padding, generation, statistics, save/load --------------------------------------------------

MODEL_CASES = [("topp", {}), ("dynmole", {}), ("mor", {"main_balance_coef": 0.01})]
MODEL_IDS = [name for name, _ in MODEL_CASES]


def molora_model(router: str, router_kwargs: dict, kernel: str = "dense", seed: int = 0):
    config = MoLoraConfig(
        r=4,
        num_experts=4,
        top_k=2,
        router=router,
        router_kwargs=router_kwargs,
        kernel=kernel,
        init_lora_weights=False,
        z_loss_coef=1e-3,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed + 100)
    return get_peft_model(make_llama(seed), config)


def left_padded(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


PROMPT_A = [5, 17, 33, 60, 8, 41, 70, 12]
PROMPT_B = [44, 9, 81, 23, 3, 66, 50, 31, 19, 72, 15, 28]


@pytest.mark.parametrize("router, kwargs", MODEL_CASES, ids=MODEL_IDS)
def test_kernel_paths_agree_in_training_and_generation(router, kwargs):
    batch = left_padded([PROMPT_A, PROMPT_B])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = {}
    for kernel in ("naive", "dense", "grouped"):
        model = molora_model(router, kwargs, kernel=kernel)
        model.train()
        out = model(**batch, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.eval()
        tokens = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        results[kernel] = (out.logits.detach(), out.loss.detach(), grads, tokens)
    ref_logits, ref_loss, ref_grads, ref_tokens = results["naive"]
    for kernel in ("dense", "grouped"):
        logits, loss, grads, tokens = results[kernel]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ref_grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)
        assert torch.equal(tokens, ref_tokens)
    # every router parameter learns (MoR: the sub-routers and the main router too)
    router_grads = {n: g for n, g in ref_grads.items() if "molora_router" in n}
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads.values())


# the core routers too: padding must never change what a sample computes
PADDING_CASES = [("topk", {}), ("soft", {}), *MODEL_CASES]


@pytest.mark.parametrize("router, kwargs", PADDING_CASES, ids=[name for name, _ in PADDING_CASES])
def test_sample_alone_equals_sample_in_left_padded_batch(router, kwargs):
    model = molora_model(router, kwargs).eval()
    alone = left_padded([PROMPT_A])
    batch = left_padded([PROMPT_A, PROMPT_B])
    with torch.no_grad():
        logits_alone = model(**alone, position_ids=position_ids(alone["attention_mask"])).logits
        logits_batch = model(**batch, position_ids=position_ids(batch["attention_mask"])).logits
    n = len(PROMPT_A)
    torch.testing.assert_close(logits_batch[0, -n:], logits_alone[0], rtol=1e-4, atol=1e-5)
    new = 6
    gen_alone = model.generate(**alone, max_new_tokens=new, do_sample=False, pad_token_id=0)
    gen_batch = model.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_batch[0, -(n + new) :], gen_alone[0])


@pytest.mark.parametrize("router, kwargs", MODEL_CASES, ids=MODEL_IDS)
def test_statistics_count_the_variable_assignments(router, kwargs):
    model = molora_model(router, kwargs).eval()
    batch = left_padded([PROMPT_A, PROMPT_B])
    counted: dict[str, list[float]] = {}

    def hook(name):
        def record(module, args, routing):
            valid = args[1]
            if valid is None:  # no padding among these positions (a decode step): every token counts
                valid = torch.ones(routing.probs.shape[0], dtype=torch.bool)
            keep = valid[routing.token_index]
            entry = counted.setdefault(name, [0.0, 0.0])
            entry[0] += float(keep.sum())
            entry[1] += float(valid.sum())

        return record

    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, MoLoraLayer)}
    handles = [m.molora_router["default"].register_forward_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad():
        model(**batch)
    model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for h in handles:
        h.remove()
    stats = model.get_routing_stats()
    assert set(stats) == set(layers)
    per_token = []
    for name, s in stats.items():
        assignments, tokens = counted[name]
        assert s.tokens == tokens == 2 * int(batch["attention_mask"].sum()) + 2 * 2
        assert s.experts_per_token == pytest.approx(assignments / tokens)
        assert 1.0 <= s.experts_per_token <= 4.0
        per_token.append(s.experts_per_token)
    if router == "mor":
        assert per_token == pytest.approx([2.0] * len(per_token))
    else:
        # a variable number of experts: not a constant k
        assert any(abs(v - round(v)) > 1e-6 for v in per_token)


@pytest.mark.parametrize("router, kwargs", MODEL_CASES, ids=MODEL_IDS)
def test_aux_losses_are_padding_masked_in_the_model(router, kwargs):
    model = molora_model(router, kwargs)
    batch = left_padded([PROMPT_A, PROMPT_B])
    pos = position_ids(batch["attention_mask"])
    model(**batch, position_ids=pos)
    expected = {k: v.detach() for k, v in model.molora_aux_losses().items()}
    names = {"balance", "z"} | ({"main_balance"} if router == "mor" else {"entropy"})
    assert set(expected) == names
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, : len(PROMPT_B) - len(PROMPT_A)] = torch.tensor([90, 4, 57, 31])
    model(**other, position_ids=pos)
    got = model.molora_aux_losses()
    for name in names:
        torch.testing.assert_close(got[name].detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("router, kwargs", MODEL_CASES, ids=MODEL_IDS)
def test_save_load_roundtrip_keeps_outputs(tmp_path, router, kwargs):
    model = molora_model(router, kwargs).eval()
    batch = left_padded([PROMPT_A, PROMPT_B])
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path).eval()
    assert loaded.peft_config["default"].router == router
    assert loaded.peft_config["default"].router_kwargs == kwargs
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    for name, param in model.named_parameters():
        if "molora_router" in name:
            loaded_param = loaded.get_parameter(name)
            assert loaded_param.dtype == torch.float32
            assert torch.equal(loaded_param, param), name


def test_mor_router_stays_fp32_on_a_bf16_model():
    base = make_llama(0).to(torch.bfloat16)
    model = get_peft_model(base, MoLoraConfig(r=2, num_experts=4, top_k=2, router="mor", task_type="CAUSAL_LM"))
    routers = [m.molora_router["default"] for m in model.modules() if isinstance(m, MoLoraLayer)]
    assert all(p.dtype == torch.float32 for r in routers for p in r.parameters())
    out = model(**left_padded([PROMPT_A]))
    assert torch.isfinite(out.logits).all()


# -- recipes ---------------------------------------------------------------------------------------------------------

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("router", ["topp", "dynmole", "mor"])
def test_recipe_builds_and_trains(router, tmp_path):
    recipe = yaml.safe_load((CONFIGS_DIR / f"{router}.yaml").read_text())
    assert set(recipe) == {"model", "adapter", "training"}
    assert recipe["model"]["name_or_path"] is None
    config = MoLoraConfig(**recipe["adapter"])
    assert config.router == router
    if router == "dynmole":  # the paper's balance: soft loads, coefficient 0.001
        assert (config.balance_loss_type, config.aux_loss_coef) == ("soft", 0.001)
    # bf16=False only because the test machine may lack bf16 support
    SFTConfig(output_dir=str(tmp_path), bf16=False, **recipe["training"])
    model = get_peft_model(make_llama(), config)
    batch = left_padded([PROMPT_A, PROMPT_B])
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.loss)
