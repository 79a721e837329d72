"""Unit tests for the molora routers, the auxiliary losses and the router registry.

Covers:
    * the ``topk`` and ``soft`` routers against the spec vectors (docs/algorithms.md 0.4, 1.1), the assignment-triple
      contract of section 23 (``N = T * k`` / ``T * E``, triples consistent with ``Routing.dense_gates()``) and the
      soft temperature;
    * the balance-loss normalisations ``mixtral`` / ``megatron`` / ``switch`` / ``soft`` and the router z-loss on the
      spec batch ``Z`` (1.4, 1.5), their values at perfect balance, padding invariance and the all-padding case;
    * numerical robustness: +-1e4 logits, all-equal logits and fp16 / bf16 inputs (the router computes in fp32);
    * ``register_router`` and the ``MoLoraConfig`` validation of ``router`` and ``router_kwargs``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import molora
from molora import MoLoraConfig, Router, RouterParams, Routing, get_router_class, register_router
from molora.kernels.fused_router import topk_gates_and_losses
from molora.routers import SoftParams, SoftRouter, TopKParams, TopKRouter, balancing, topk_routing

# docs/algorithms.md section 0.4
BASE_Z = [2.0, 1.0, 0.5, -1.0]
BASE_P = [0.609460, 0.224208, 0.135989, 0.030343]
Z = [[2.0, 1.0, 0.5, -1.0], [0.1, 0.0, -0.1, 0.05], [-1.0, 0.5, 2.0, 0.0]]
P = [
    [0.609460, 0.224208, 0.135989, 0.030343],
    [0.272124, 0.246228, 0.222796, 0.258852],
    [0.035354, 0.158445, 0.710100, 0.096102],
]
MEAN_P = [0.305646, 0.209627, 0.356295, 0.128432]
SPEC_ATOL = 2e-6  # the spec rounds to 6 decimals

LOSS_TYPES = balancing.BALANCE_LOSS_TYPES


def identity_router(cls: type[Router], num_experts: int, top_k: int, **params) -> Router:
    """A router whose scoring weight is the identity, so that its logits equal its input."""
    router = cls(in_features=num_experts, num_experts=num_experts, top_k=top_k, params=cls.Params(**params))
    router.weight.data = torch.eye(num_experts)
    return router


def z_batch(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(Z, dtype=dtype)


def triples_to_dense(routing: Routing) -> torch.Tensor:
    """Dense ``[T, E]`` gates rebuilt from the assignment triples alone (independent of ``Routing.gates``)."""
    dense = torch.zeros(routing.num_tokens, routing.num_experts, dtype=routing.weight.dtype)
    for t, e, w in zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist()):
        dense[t, e] += w
    return dense


def all_losses(routing: Routing, valid: torch.Tensor | None, top_k: int) -> dict[str, torch.Tensor]:
    inputs = balancing.AuxInputs.from_routing(routing, valid, top_k)
    out = {t: balancing.load_balancing_loss(inputs, t) for t in LOSS_TYPES}
    out["z"] = balancing.router_z_loss(inputs.logits)
    return out


# -- top-k router ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TopKRouter, SoftRouter])
def test_probs_are_softmax_of_spec_batch(cls):
    routing = identity_router(cls, 4, 2)(z_batch())
    assert routing.probs.dtype == torch.float32
    torch.testing.assert_close(routing.probs, torch.tensor(P), atol=SPEC_ATOL, rtol=0)
    torch.testing.assert_close(routing.probs.mean(0), torch.tensor(MEAN_P), atol=SPEC_ATOL, rtol=0)
    torch.testing.assert_close(routing.logits, z_batch())


@pytest.mark.parametrize(
    "renormalize, expected",
    [
        (True, [0.731059, 0.268941, 0.0, 0.0]),  # spec 1.1
        (False, [0.609460, 0.224208, 0.0, 0.0]),  # raw probabilities (Switch style)
    ],
)
def test_topk_spec_vector(renormalize, expected):
    router = identity_router(TopKRouter, 4, 2, renormalize=renormalize)
    routing = router(torch.tensor([BASE_Z]))
    assert set(routing.expert_index.tolist()) == {0, 1}
    assert routing.token_index.tolist() == [0, 0]
    torch.testing.assert_close(routing.dense_gates(), torch.tensor([expected]), atol=SPEC_ATOL, rtol=0)
    torch.testing.assert_close(triples_to_dense(routing), torch.tensor([expected]), atol=SPEC_ATOL, rtol=0)
    torch.testing.assert_close(routing.probs, torch.tensor([BASE_P]), atol=SPEC_ATOL, rtol=0)


@pytest.mark.parametrize(
    "k, selections",
    [
        (1, [{0}, {0}, {2}]),
        (2, [{0, 1}, {0, 3}, {2, 1}]),  # spec 1.4
        (3, [{0, 1, 2}, {0, 3, 1}, {2, 1, 3}]),
        (4, [{0, 1, 2, 3}] * 3),
    ],
)
def test_topk_selection_on_spec_batch(k, selections):
    routing = identity_router(TopKRouter, 4, k)(z_batch())
    got = [set() for _ in range(3)]
    for t, e in zip(routing.token_index.tolist(), routing.expert_index.tolist()):
        got[t].add(e)
    assert got == selections
    assert routing.selected().tolist() == [[e in s for e in range(4)] for s in selections]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_experts, k", [(1, 1), (5, 1), (5, 2), (5, 3), (5, 5), (8, 2)])
def test_topk_assignment_triples_match_dense_gates(num_experts, k, renormalize):
    torch.manual_seed(1000 + 10 * num_experts + k)
    n_tokens = 9
    router = TopKRouter(in_features=6, num_experts=num_experts, top_k=k, params=TopKParams(renormalize=renormalize))
    routing = router(torch.randn(n_tokens, 6))
    n = routing.token_index.numel()
    assert n == n_tokens * k
    assert routing.expert_index.numel() == n and routing.weight.numel() == n
    assert routing.token_index.tolist() == [t for t in range(n_tokens) for _ in range(k)]
    assert routing.token_index.dtype == torch.long and routing.expert_index.dtype == torch.long
    assert routing.weight.dtype == torch.float32
    assert (routing.weight >= 0).all()
    # k distinct experts per token, and they are the k most probable ones
    experts = routing.expert_index.view(n_tokens, k)
    for t in range(n_tokens):
        assert len(set(experts[t].tolist())) == k
        chosen = routing.probs[t, experts[t]]
        mask = torch.ones(num_experts, dtype=torch.bool)
        mask[experts[t]] = False
        if mask.any():
            assert chosen.min() >= routing.probs[t, mask].max()
    # the triples, the router's dense gates and a scatter of the triples all agree
    dense = routing.dense_gates()
    torch.testing.assert_close(triples_to_dense(routing), dense.detach())
    rebuilt = Routing(
        probs=routing.probs, token_index=routing.token_index, expert_index=routing.expert_index, weight=routing.weight
    )
    torch.testing.assert_close(rebuilt.dense_gates(), dense)
    torch.testing.assert_close(rebuilt.selected(), dense > 0)
    if renormalize:
        torch.testing.assert_close(dense.sum(-1), torch.ones(n_tokens))
        expected = routing.probs[routing.token_index, routing.expert_index]
        expected = (
            expected / dense.new_zeros(n_tokens).index_add(0, routing.token_index, expected)[routing.token_index]
        )
        torch.testing.assert_close(routing.weight, expected)
    else:
        torch.testing.assert_close(routing.weight, routing.probs[routing.token_index, routing.expert_index])


def test_topk_jitter_noise_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(in_features=6, num_experts=4, top_k=2, params=TopKParams(jitter_noise=0.5))
    x = torch.randn(16, 6)
    plain = nn.functional.linear(x, router.weight)
    router.eval()
    torch.testing.assert_close(router.scores(x), plain)
    router.train()
    noisy = router.scores(x)
    assert not torch.allclose(noisy, plain)
    # multiplicative noise within [1 - eps, 1 + eps] on each input feature
    ratio_bound = (x.abs() * 0.5) @ router.weight.abs().T
    assert ((noisy - plain).abs() <= ratio_bound + 1e-5).all()


# -- soft router -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0, 2.0, 5.0])
def test_soft_gates_are_tempered_softmax(temperature):
    torch.manual_seed(7)
    n_tokens, n_experts = 5, 6
    router = identity_router(SoftRouter, n_experts, 2, temperature=temperature)
    logits = torch.randn(n_tokens, n_experts) * 3
    routing = router(logits)
    expected = torch.softmax(logits.double() / temperature, dim=-1).float()
    torch.testing.assert_close(routing.probs, expected)
    torch.testing.assert_close(routing.dense_gates(), expected)
    assert routing.token_index.numel() == n_tokens * n_experts
    pairs = sorted(zip(routing.token_index.tolist(), routing.expert_index.tolist()))
    assert pairs == [(t, e) for t in range(n_tokens) for e in range(n_experts)]
    torch.testing.assert_close(triples_to_dense(routing), expected)
    assert routing.selected().all()


def test_soft_temperature_sharpens_and_flattens():
    router = identity_router(SoftRouter, 4, 2)
    entropies = []
    for temperature in (0.25, 0.5, 1.0, 2.0, 4.0):
        router.params = SoftParams(temperature=temperature)
        probs = router(z_batch()).probs
        entropies.append(balancing.entropy(probs))
    # hand check: temperature 0.5 on the base vector is softmax([4, 2, 1, -2])
    router.params = SoftParams(temperature=0.5)
    e = torch.exp(torch.tensor([4.0, 2.0, 1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(router(torch.tensor([BASE_Z])).probs.double(), (e / e.sum())[None], atol=1e-6, rtol=0)
    for lower, higher in zip(entropies, entropies[1:]):
        assert (lower < higher).all()


# -- balancing and z losses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_type, k, expected",
    [
        ("mixtral", 2, 2.020364),
        ("megatron", 2, 1.010182),
        ("switch", 2, 1.290116),  # argmax loads, whatever k
        ("switch", 1, 1.290116),
        ("mixtral", 1, 1.290116),  # with k=1 every normalisation is the Switch loss
        ("megatron", 1, 1.290116),
    ],
)
def test_balance_loss_spec_batch(loss_type, k, expected):
    routing = identity_router(TopKRouter, 4, k)(z_batch())
    inputs = balancing.AuxInputs.from_routing(routing, None, k)
    loss = balancing.load_balancing_loss(inputs, loss_type)
    assert loss.shape == ()
    torch.testing.assert_close(loss.item(), expected, atol=SPEC_ATOL, rtol=0)


def test_switch_load_is_argmax_fraction():
    routing = identity_router(TopKRouter, 4, 2)(z_batch())
    inputs = balancing.AuxInputs.from_routing(routing, None, 2)
    torch.testing.assert_close(balancing.expert_load(inputs, "switch"), torch.tensor([2 / 3, 0.0, 1 / 3, 0.0]))
    torch.testing.assert_close(balancing.expert_load(inputs, "mixtral"), torch.tensor([2.0, 2.0, 1.0, 1.0]) / 3)
    torch.testing.assert_close(balancing.expert_load(inputs, "megatron"), torch.tensor([2.0, 2.0, 1.0, 1.0]) / 6)


def test_z_loss_spec_batch():
    routing = identity_router(TopKRouter, 4, 2)(z_batch())
    inputs = balancing.AuxInputs.from_routing(routing, None, 2)
    torch.testing.assert_close(torch.logsumexp(inputs.logits, -1), torch.tensor([2.495182, 1.401498, 2.342350]))
    torch.testing.assert_close(balancing.router_z_loss(inputs.logits).item(), 4.558910, atol=SPEC_ATOL, rtol=0)
    losses = Router.aux_losses(inputs, "mixtral", frozenset({"balance", "z"}))
    assert set(losses) == {"balance", "z"}
    torch.testing.assert_close(losses["z"].item(), 4.558910, atol=SPEC_ATOL, rtol=0)
    torch.testing.assert_close(losses["balance"].item(), 2.020364, atol=SPEC_ATOL, rtol=0)
    assert set(Router.aux_losses(inputs, "mixtral", frozenset({"z"}))) == {"z"}


def _hand_topk2_gates() -> list[list[float]]:
    """Renormalised top-2 gates of the spec batch, computed from the spec's probabilities."""
    gates = []
    for row, (i, j) in zip(P, [(0, 1), (0, 3), (2, 1)]):
        g = [0.0] * 4
        g[i], g[j] = row[i] / (row[i] + row[j]), row[j] / (row[i] + row[j])
        gates.append(g)
    return gates


@pytest.mark.parametrize("router_name", ["topk", "soft"])
def test_soft_balance_loss_by_hand(router_name):
    cls = get_router_class(router_name)
    routing = identity_router(cls, 4, 2)(z_batch())
    gates = _hand_topk2_gates() if router_name == "topk" else P
    mean_gates = [sum(g[e] for g in gates) / 3 for e in range(4)]
    expected = 4 * sum(mg * mp for mg, mp in zip(mean_gates, MEAN_P))
    inputs = balancing.AuxInputs.from_routing(routing, None, 2)
    torch.testing.assert_close(balancing.expert_load(inputs, "soft"), torch.tensor(mean_gates), atol=SPEC_ATOL, rtol=0)
    loss = balancing.load_balancing_loss(inputs, "soft")
    torch.testing.assert_close(loss.item(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("router_name", ["topk", "soft"])
def test_soft_balance_loss_gradient(router_name):
    """The soft load is differentiable: gradcheck sees both the gates and the mean-probability factor."""
    cls = get_router_class(router_name)
    router = identity_router(cls, 4, 2)

    def loss_fn(logits):
        inputs = balancing.AuxInputs.from_routing(router.select(logits, None), None, 2)
        return balancing.load_balancing_loss(inputs, "soft")

    logits = z_batch(torch.float64).requires_grad_(True)
    # the soft load is evaluated in fp32 (``gates.float()``), hence the coarse finite-difference step
    assert torch.autograd.gradcheck(loss_fn, (logits,), eps=1e-3, atol=1e-4, rtol=1e-3)
    # detaching the gates changes the gradient, so the check above does see them
    detached = balancing.AuxInputs.from_routing(router.select(logits, None), None, 2)
    detached.gates = detached.gates.detach()
    (full,) = torch.autograd.grad(loss_fn(logits), logits)
    (partial,) = torch.autograd.grad(balancing.load_balancing_loss(detached, "soft"), logits)
    assert (full - partial).abs().max() > 1e-3


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_losses_at_perfect_balance(k):
    # cyclic shifts of one (tie-free) logit row: every expert gets the same mean probability and the same load
    row = torch.tensor([1.3, 0.4, -0.2, -1.1])
    logits = torch.stack([row.roll(s) for s in range(4)])
    routing = identity_router(TopKRouter, 4, k)(logits)
    inputs = balancing.AuxInputs.from_routing(routing, None, k)
    expected = {"switch": 1.0, "mixtral": float(k), "megatron": 1.0, "soft": 1.0}
    for loss_type, value in expected.items():
        torch.testing.assert_close(balancing.load_balancing_loss(inputs, loss_type).item(), value, atol=1e-6, rtol=0)


GARBAGE_ROWS = [[50.0, -50.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1e4], [-3.0, -3.0, -3.0, -3.0], [9.0, 8.0, 7.0, 6.0]]


@pytest.mark.parametrize(
    "cls, params, k",
    [(TopKRouter, {}, 1), (TopKRouter, {}, 2), (TopKRouter, {"renormalize": False}, 2), (SoftRouter, {}, 2)],
)
@pytest.mark.parametrize("layout", ["appended", "prepended", "interleaved"])
def test_padding_rows_never_change_losses(cls, params, k, layout):
    router = identity_router(cls, 4, k, **params)
    reference = all_losses(router(z_batch()), None, k)
    all_valid = all_losses(router(z_batch()), torch.ones(3, dtype=torch.bool), k)
    rows = [(r, True) for r in Z]
    garbage = [(r, False) for r in GARBAGE_ROWS]
    if layout == "appended":
        rows = rows + garbage
    elif layout == "prepended":
        rows = garbage + rows
    else:
        rows = [garbage[0], rows[0], garbage[1], garbage[2], rows[1], rows[2], garbage[3]]
    x = torch.tensor([r for r, _ in rows])
    valid = torch.tensor([v for _, v in rows])
    padded = all_losses(router(x), valid, k)
    assert set(padded) == set(LOSS_TYPES) | {"z"}
    for name in padded:
        torch.testing.assert_close(all_valid[name], reference[name], rtol=0, atol=0)
        torch.testing.assert_close(padded[name], reference[name], rtol=1e-6, atol=1e-6)
    # the router's own helper applies the same mask
    via_router = router.aux_inputs(router(x), valid)
    assert via_router.probs.shape == (3, 4)
    torch.testing.assert_close(
        balancing.load_balancing_loss(via_router, "megatron"), reference["megatron"], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("loss_name", list(LOSS_TYPES) + ["z"])
@pytest.mark.parametrize("cls", [TopKRouter, SoftRouter])
def test_all_padding_batch_gives_zero_and_keeps_graph(loss_name, cls):
    router = identity_router(cls, 4, 2)
    logits = torch.tensor(GARBAGE_ROWS, requires_grad=True)
    routing = router.select(logits, None)
    valid = torch.zeros(len(GARBAGE_ROWS), dtype=torch.bool)
    loss = all_losses(routing, valid, 2)[loss_name]
    assert loss.shape == ()
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # through the router's weight too (DDP needs every parameter in the graph)
    routing = router(torch.tensor(GARBAGE_ROWS))
    loss = all_losses(routing, valid, 2)[loss_name]
    loss.backward()
    assert router.weight.grad is not None and torch.equal(router.weight.grad, torch.zeros(4, 4))


def test_aux_inputs_cat_matches_one_batch():
    router = identity_router(TopKRouter, 4, 2)
    whole = balancing.AuxInputs.from_routing(router(z_batch()), None, 2)
    parts = [balancing.AuxInputs.from_routing(router(z_batch()[i : i + 1]), None, 2) for i in range(3)]
    cat = balancing.AuxInputs.cat(parts)
    for loss_type in LOSS_TYPES:
        torch.testing.assert_close(
            balancing.load_balancing_loss(cat, loss_type), balancing.load_balancing_loss(whole, loss_type)
        )
    other = balancing.AuxInputs.from_routing(identity_router(TopKRouter, 3, 2)(z_batch()[:, :3]), None, 2)
    with pytest.raises(ValueError, match="same number of experts"):
        balancing.AuxInputs.cat([whole, other])


def test_unknown_balance_loss_type_raises():
    inputs = balancing.AuxInputs.from_routing(identity_router(TopKRouter, 4, 2)(z_batch()), None, 2)
    with pytest.raises(ValueError, match="balance_loss_type"):
        balancing.load_balancing_loss(inputs, "gshard")


# -- numerical robustness --------------------------------------------------------------------------------------------

EXTREME_LOGITS = {
    "pm1e4": [[1e4, -1e4, 0.0, 1e4 - 8], [-1e4, -1e4, 1e4, -1e4], [0.0, 1e4, -1e4, 16.0]],
    "all_equal": [[0.0] * 4, [3.0] * 4, [-1e4] * 4],
    "all_large": [[1e4, 1e4 - 16, 1e4 - 32, 1e4 - 64], [-1e4, -1e4 + 8, -1e4 + 16, -1e4 + 64], [1e4] * 4],
    "spec": Z,
}
ROUTER_CASES = [
    ("topk-k1", TopKRouter, {}, 1, True),
    ("topk-k2", TopKRouter, {}, 2, True),
    ("topk-k2-raw", TopKRouter, {"renormalize": False}, 2, False),
    ("soft", SoftRouter, {}, 2, True),
    ("soft-t0.01", SoftRouter, {"temperature": 0.01}, 2, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logits_name", list(EXTREME_LOGITS))
@pytest.mark.parametrize("case", ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES])
def test_extreme_and_low_precision_inputs(case, logits_name, dtype):
    _, cls, params, k, sums_to_one = case
    router = identity_router(cls, 4, k, **params)
    x = torch.tensor(EXTREME_LOGITS[logits_name], dtype=dtype)
    routing = router(x)
    assert routing.probs.dtype == torch.float32
    assert routing.weight.dtype == torch.float32
    for name, tensor in [("probs", routing.probs), ("weight", routing.weight), ("gates", routing.dense_gates())]:
        assert torch.isfinite(tensor).all(), name
        assert (tensor >= 0).all(), name
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(3))
    if sums_to_one:
        torch.testing.assert_close(routing.dense_gates().sum(-1), torch.ones(3))
    else:
        assert (routing.dense_gates().sum(-1) <= 1 + 1e-6).all()
    if cls is TopKRouter:
        experts = routing.expert_index.view(3, k)
        assert all(len(set(row.tolist())) == k for row in experts)
        # the logits the router saw are the fp32 upcast of the low-precision input
        torch.testing.assert_close(routing.logits, x.float())
    losses = all_losses(routing, None, k)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values())
    total.backward()
    assert torch.isfinite(router.weight.grad).all()


@pytest.mark.parametrize("k", [1, 2])
def test_topk_routing_with_selection_scores_stays_finite(k):
    """Regression: a biased selection can pick experts whose fp32 probability underflowed to 0 (was 0/0 = NaN)."""
    probs = torch.softmax(torch.tensor([[200.0, 0.0, 0.0, 0.0]]), dim=-1)  # [1, 0, 0, 0] in fp32
    bias = torch.tensor([-2.0, 0.0, 0.1, 0.05])  # the biased selection skips expert 0
    routing = topk_routing(probs, k, selection_scores=probs + bias)
    assert routing.expert_index.tolist() == [2, 3][:k]
    assert torch.isfinite(routing.weight).all() and (routing.weight >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_scores_in_fp32_even_when_cast(dtype):
    torch.manual_seed(3)
    router = TopKRouter(in_features=8, num_experts=4, top_k=2)
    x = torch.randn(5, 8)
    expected = router(x).probs
    router.to(dtype)  # e.g. model.to(bf16); the router still evaluates in fp32
    routing = router(x.to(dtype))
    assert routing.probs.dtype == torch.float32 and routing.logits.dtype == torch.float32
    torch.testing.assert_close(routing.probs, expected, atol=2e-2, rtol=0)


@pytest.mark.parametrize("name", sorted(set(molora.ROUTER_REGISTRY) - {"prompt"}))
def test_routers_compute_in_fp32_inside_autocast(name):
    """A trainer's ``bf16=True`` runs the forward in ``torch.autocast``, which would compute ``linear``/``matmul`` in
    bf16: the routers switch it off and route exactly as outside (``test_prompt_router.py`` covers ``"prompt"``)."""
    torch.manual_seed(3)
    router = get_router_class(name)(in_features=32, num_experts=6, top_k=2).train()
    x = torch.randn(40, 32).to(torch.bfloat16)  # a bf16 model's hidden states
    valid = torch.rand(40) > 0.2
    outside = router(x, valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = router(x, valid)
    assert inside.probs.dtype == torch.float32
    assert torch.equal(inside.probs, outside.probs)
    assert torch.equal(inside.expert_index, outside.expert_index) and torch.equal(inside.weight, outside.weight)


def test_fused_topk_losses_in_fp32_inside_autocast():
    # the balance loss counts tokens with products (`mask @ one_hot`): in bf16 a count of 1001 would round to 1000
    logits = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0))
    valid = torch.arange(3000) % 7 != 0
    outside = topk_gates_and_losses(logits, 2, valid=valid, balance_type="mixtral", z_loss=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = topk_gates_and_losses(logits, 2, valid=valid, balance_type="mixtral", z_loss=True)
    assert inside[6:] == outside[6:] == (None, None)  # no selection rule
    for a, b in zip(inside[:6], outside[:6], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_all_equal_logits_topk_gates_are_uniform():
    router = identity_router(TopKRouter, 4, 2)
    routing = router(torch.zeros(3, 4))
    torch.testing.assert_close(routing.weight, torch.full((6,), 0.5))
    soft = identity_router(SoftRouter, 4, 2)(torch.zeros(3, 4))
    torch.testing.assert_close(soft.dense_gates(), torch.full((3, 4), 0.25))


# -- registry and config validation ----------------------------------------------------------------------------------


@pytest.fixture
def clean_registry():
    """Restore ``molora.ROUTER_REGISTRY`` (and the ``name`` of the registered classes) after the test."""
    saved = dict(molora.ROUTER_REGISTRY)
    saved_names = {cls: cls.name for cls in saved.values()}
    yield molora.ROUTER_REGISTRY
    molora.ROUTER_REGISTRY.clear()
    molora.ROUTER_REGISTRY.update(saved)
    for cls, name in saved_names.items():
        cls.name = name


@dataclass
class FirstParams(RouterParams):
    weight: float = 1.0
    tag: str = "x"

    def validate(self, num_experts: int, top_k: int) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"`router_kwargs['weight']`={self.weight} must be in (0, 1].")


class FirstExpertRouter(Router):
    """Sends every token to expert 0 with a fixed gate."""

    Params = FirstParams

    def select(self, logits, valid):
        n_tokens, n_experts = logits.shape
        probs = torch.softmax(logits, dim=-1)
        return Routing(
            probs=probs,
            token_index=torch.arange(n_tokens),
            expert_index=torch.zeros(n_tokens, dtype=torch.long),
            weight=torch.full((n_tokens,), self.params.weight),
            logits=logits,
        )


class OtherRouter(FirstExpertRouter):
    pass


def test_builtin_routers_registered():
    assert molora.ROUTER_REGISTRY["topk"] is TopKRouter
    assert molora.ROUTER_REGISTRY["soft"] is SoftRouter
    assert get_router_class("topk") is TopKRouter


def test_custom_router_usable_from_config(clean_registry):
    assert register_router("myname", FirstExpertRouter) is FirstExpertRouter
    assert clean_registry["myname"] is FirstExpertRouter
    assert FirstExpertRouter.name == "myname"
    config = MoLoraConfig(
        router="myname", router_kwargs={"weight": 0.5}, num_experts=3, top_k=1, r=2, target_modules=["proj"]
    )
    assert get_router_class(config.router) is FirstExpertRouter
    # the layer builds the custom router with the validated params, and uses it in the forward
    torch.manual_seed(0)
    layer = molora.Linear(nn.Linear(5, 4), "default", config)
    router = layer.molora_router["default"]
    assert type(router) is FirstExpertRouter
    assert router.params == FirstParams(weight=0.5)
    with torch.no_grad():
        layer.molora_B["default"].weight.normal_()
    x = torch.randn(2, 3, 5)
    A, B = layer.molora_A["default"].weight, layer.molora_B["default"].weight
    expected = layer.base_layer(x) + 0.5 * config.scaling * (x @ A[0]) @ B[0]
    torch.testing.assert_close(layer(x), expected)
    # its params are validated like the built-ins'
    with pytest.raises(ValueError, match="weight"):
        MoLoraConfig(router="myname", router_kwargs={"weight": 2.0}, num_experts=3, top_k=1)
    with pytest.raises(ValueError, match="tag"):
        MoLoraConfig(router="myname", router_kwargs={"tag": 3}, num_experts=3, top_k=1)


def test_register_router_as_decorator(clean_registry):
    @register_router("decorated")
    class Decorated(FirstExpertRouter):
        pass

    assert clean_registry["decorated"] is Decorated
    assert Decorated.name == "decorated"
    MoLoraConfig(router="decorated", num_experts=2, top_k=1)


def test_register_duplicate_name_raises(clean_registry):
    register_router("myname", FirstExpertRouter)
    with pytest.raises(ValueError, match="myname.*already registered"):
        register_router("myname", OtherRouter)
    assert clean_registry["myname"] is FirstExpertRouter
    with pytest.raises(ValueError, match="already registered"):
        register_router("topk", FirstExpertRouter)
    assert clean_registry["topk"] is TopKRouter
    # explicit overwrite replaces the entry
    register_router("myname", OtherRouter, overwrite=True)
    assert clean_registry["myname"] is OtherRouter


@pytest.mark.parametrize("name, cls", [("myname", FirstExpertRouter), ("topk", TopKRouter), ("soft", SoftRouter)])
def test_register_same_class_twice_is_noop(clean_registry, name, cls):
    register_router(name, cls)
    before = dict(clean_registry)
    assert register_router(name, cls) is cls
    assert register_router(name)(cls) is cls
    assert dict(clean_registry) == before
    assert cls.name == name


@pytest.mark.parametrize(
    "name, cls, error",
    [
        ("bad", nn.Linear, TypeError),
        ("bad", object, TypeError),
        ("bad", FirstParams, TypeError),
        ("", FirstExpertRouter, ValueError),
        (" spaced ", FirstExpertRouter, ValueError),
        (3, FirstExpertRouter, ValueError),
    ],
)
def test_register_router_rejects_bad_input(clean_registry, name, cls, error):
    before = dict(clean_registry)
    with pytest.raises(error):
        register_router(name, cls)
    assert dict(clean_registry) == before


@pytest.mark.parametrize("name, hint", [("topK", "topk"), ("sotf", "soft"), ("nonexistent", None), (None, None)])
def test_unknown_router_name_lists_allowed(name, hint):
    with pytest.raises(ValueError, match="allowed values") as info:
        MoLoraConfig(router=name)
    message = str(info.value)
    assert repr(name) in message
    assert "'topk'" in message and "'soft'" in message
    if hint is not None:
        assert f"Did you mean {hint!r}" in message


@pytest.mark.parametrize(
    "router, kwargs, bad_key, allowed",
    [
        ("topk", {"renormalise": False}, "renormalise", ["jitter_noise", "renormalize"]),
        ("topk", {"temperature": 2.0}, "temperature", ["jitter_noise", "renormalize"]),
        ("soft", {"temp": 2.0, "temperature": 1.0}, "temp", ["temperature"]),
    ],
)
def test_unknown_router_kwargs_key(router, kwargs, bad_key, allowed):
    with pytest.raises(ValueError, match="unknown key") as info:
        MoLoraConfig(router=router, router_kwargs=kwargs)
    message = str(info.value)
    assert repr(bad_key) in message
    for key in allowed:
        assert repr(key) in message


def test_unknown_router_kwargs_key_for_custom_router(clean_registry):
    register_router("myname", FirstExpertRouter)
    with pytest.raises(ValueError, match="unknown key") as info:
        MoLoraConfig(router="myname", router_kwargs={"wieght": 0.5}, num_experts=2, top_k=1)
    assert "'wieght'" in str(info.value) and "'weight'" in str(info.value) and "'tag'" in str(info.value)


@pytest.mark.parametrize(
    "router, kwargs, key",
    [
        ("topk", {"renormalize": 1}, "renormalize"),
        ("topk", {"renormalize": "yes"}, "renormalize"),
        ("topk", {"jitter_noise": "0.1"}, "jitter_noise"),
        ("topk", {"jitter_noise": True}, "jitter_noise"),
        ("soft", {"temperature": "2"}, "temperature"),
        ("soft", {"temperature": None}, "temperature"),
    ],
)
def test_router_kwargs_wrong_type_raises(router, kwargs, key):
    with pytest.raises(ValueError, match=key):
        MoLoraConfig(router=router, router_kwargs=kwargs)


@pytest.mark.parametrize(
    "router, kwargs, key",
    [
        ("topk", {"jitter_noise": 1.0}, "jitter_noise"),
        ("topk", {"jitter_noise": -0.1}, "jitter_noise"),
        ("soft", {"temperature": 0.0}, "temperature"),
        ("soft", {"temperature": -1.0}, "temperature"),
    ],
)
def test_router_kwargs_bad_value_raises(router, kwargs, key):
    with pytest.raises(ValueError, match=key):
        MoLoraConfig(router=router, router_kwargs=kwargs)


def test_router_kwargs_not_a_dict_raises():
    with pytest.raises(ValueError, match="router_kwargs"):
        MoLoraConfig(router="topk", router_kwargs=[("renormalize", False)])


@pytest.mark.parametrize(
    "router, kwargs, expected",
    [
        ("topk", {}, TopKParams()),
        ("topk", {"renormalize": False, "jitter_noise": 0.1}, TopKParams(renormalize=False, jitter_noise=0.1)),
        ("soft", {"temperature": 2}, SoftParams(temperature=2)),  # an int is a valid float
    ],
)
def test_valid_router_kwargs_accepted(router, kwargs, expected):
    config = MoLoraConfig(router=router, router_kwargs=kwargs)
    layer = molora.Linear(nn.Linear(3, 3), "default", config)
    assert layer.molora_router["default"].params == expected
    assert dataclasses.asdict(layer.molora_router["default"].params) == dataclasses.asdict(expected)


def test_cached_token_index_is_safe_across_inference_mode():
    """The token index is cached per shape; one first built under inference_mode must still serve training."""
    from molora.routers.base import _ARANGE_CACHE, repeated_arange, tiled_arange
    from molora.routers.topk import topk_routing

    _ARANGE_CACHE.clear()
    with torch.inference_mode():
        first = repeated_arange(5, 2, torch.device("cpu"))
        experts = tiled_arange(5, 2, torch.device("cpu"))
    assert torch.equal(first, torch.arange(5).repeat_interleave(2))
    assert torch.equal(experts, torch.arange(2).repeat(5))
    assert repeated_arange(5, 2, torch.device("cpu")) is first  # cached
    assert tiled_arange(5, 2, torch.device("cpu")) is experts  # cached apart from the token index
    assert not experts.is_inference()
    logits = torch.randn(5, 4, requires_grad=True)
    routing = topk_routing(torch.softmax(logits, -1), 2, logits=logits)
    assert routing.token_index is first
    out = torch.zeros(5).index_add(0, routing.token_index, routing.weight)
    out.sum().backward()  # index tensors saved for backward must not be inference tensors
    assert logits.grad is not None


def test_a_single_renormalised_gate_warns_that_the_router_gets_no_task_gradient():
    """``top_k=1`` with renormalised gates: the kept gate is ``p / p = 1``, so the task loss never reaches the router
    (measured: a router gradient of ~1e-10 against ~1e-2 with two gates or raw ones). Said when the config is built;
    raw gates, two experts per token or a single expert say nothing."""
    import warnings

    for kwargs, key in (
        (dict(router="topk"), "renormalize"),
        (dict(router="mor"), "renormalize"),
        (dict(router="topk_bias"), "normalize_gates"),
        (dict(router="prompt"), "gate_mode"),
        (dict(router="prompt", num_experts=1, router_kwargs={"milora_mode": "module"}), "gate_mode"),
    ):
        with pytest.warns(UserWarning, match=f"top_k=1 with router_kwargs\\['{key}'\\].*no gradient"):
            MoLoraConfig(**{"num_experts": 4, "top_k": 1, **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoLoraConfig(num_experts=4, top_k=1, router_kwargs={"renormalize": False})
        MoLoraConfig(num_experts=4, top_k=1, router="mor", router_kwargs={"renormalize": False})
        MoLoraConfig(num_experts=4, top_k=1, router="topk_bias", router_kwargs={"normalize_gates": False})
        MoLoraConfig(num_experts=4, top_k=1, router="prompt", router_kwargs={"gate_mode": "raw"})
        MoLoraConfig(num_experts=4, top_k=2)
        MoLoraConfig(num_experts=1, top_k=1)


def test_a_constant_count_based_balance_loss_warns():
    """Every expert selected for every token (``soft``, ``topk`` with ``top_k == num_experts``): the megatron and
    mixtral balance losses count the selections, which are then constant (exactly 1 and ``E``), so they give the router
    no gradient. Said when the config is built; the soft or switch loss, or no aux loss, say nothing."""
    import warnings

    for kwargs in (
        dict(router="soft"),
        dict(router="topk", top_k=4),
        dict(router="soft", balance_loss_type="mixtral"),
    ):
        with pytest.warns(UserWarning, match="is a constant that gives the router no gradient"):
            MoLoraConfig(num_experts=4, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoLoraConfig(num_experts=4, router="soft", balance_loss_type="soft")
        MoLoraConfig(num_experts=4, router="soft", balance_loss_type="switch")
        MoLoraConfig(num_experts=4, router="soft", aux_loss_coef=0.0)
        MoLoraConfig(num_experts=4, top_k=2)
    # the claim: with every expert selected the megatron loss is exactly 1 whatever the router scores
    probs = torch.softmax(torch.randn(6, 4), -1)
    inputs = balancing.AuxInputs(
        probs=probs, gates=probs, selected=torch.ones(6, 4, dtype=torch.bool), logits=None, top_k=4
    )
    assert balancing.load_balancing_loss(inputs, "megatron").item() == pytest.approx(1.0)
