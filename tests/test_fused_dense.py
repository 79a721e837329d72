"""The dense path fused with the frozen base projection (``molora.kernels.fused_dense``).

Function level: ``base_and_shrink`` + ``gated_expand_`` against the same maths in plain fp64 torch ops, for
``nn.Linear`` and ``Conv1D`` weights, with and without bias and router, with an input that does or does not need a
gradient; ``dense_topk_layer`` (the same with the top-k router's function, as one node) against the three functions
in sequence, for every loss setting, gradient source and set of trainable inputs.
Layer level: a model whose layers take the fused path gives the same loss and gradients as the naive reference
kernel (Llama and GPT-2's Conv1D, a router with extra null-expert columns, DR-LoRA masks), and the layer falls back
to the general path whenever fusing would change the maths (hooks, trainable base weights, dropout, mixed dtypes); in
an autocast region it casts its operands as autocast does and agrees with the general path there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, OneProjection, greedy_scores, make_gpt2, make_llama
from peft import PeftModel, get_peft_model
from torch import nn

import molora.adapters.layer as layer_module
from molora import MoLoraConfig, MoLoraLayer
from molora.kernels.fused_dense import base_and_shrink, dense_topk_layer, gated_expand_
from molora.kernels.fused_router import topk_gates_and_losses
from molora.routers.dynmole import DynMoLERouter
from molora.routers.topp import TopPRouter


def reference(x, weight, bias, bank, router, gates, b_flat, scaling, conv1d):
    base = x @ weight if conv1d else x @ weight.t()
    if bias is not None:
        base = base + bias
    n_experts, d_in, rank = bank.shape
    h = x @ bank.permute(1, 0, 2).reshape(d_in, n_experts * rank)
    logits = x @ router.t() if router is not None else None
    hg = (h.unflatten(1, (n_experts, -1)) * (gates * scaling).unsqueeze(-1)).flatten(1)
    return base + hg @ b_flat, logits


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("with_router", [True, False])
def test_functions_match_plain_ops(conv1d, with_bias, x_grad, with_router):
    torch.manual_seed(3)
    n_tokens, d_in, d_out, n_experts, rank, extra, scaling = 7, 6, 5, 3, 2, 4, 0.5
    weight = torch.randn(d_in, d_out) if conv1d else torch.randn(d_out, d_in)
    bias = torch.randn(d_out) if with_bias else None
    leaves = {
        "x": torch.randn(n_tokens, d_in, dtype=torch.float64),
        "bank": torch.randn(n_experts, d_in, rank, dtype=torch.float64),
        "gates": torch.rand(n_tokens, n_experts, dtype=torch.float64),
        "b": torch.randn(n_experts * rank, d_out, dtype=torch.float64),
    }
    if with_router:
        # more router columns than experts, as AdaMoE's null experts
        leaves["router"] = torch.randn(extra, d_in, dtype=torch.float64)
    upstream = torch.randn(n_tokens, d_out, dtype=torch.float64)
    up_logits = torch.randn(n_tokens, extra, dtype=torch.float64)
    results = []
    for fused in (True, False):
        t = {k: v.clone().requires_grad_(k != "x" or x_grad) for k, v in leaves.items()}
        w, b = weight.double(), bias.double() if bias is not None else None
        router = t.get("router")
        if fused:
            out, h, logits = base_and_shrink(t["x"], w, b, t["bank"], router, conv1d)
            assert h.shape == (n_tokens, n_experts * rank)
            out = gated_expand_(out, h, t["gates"], t["b"], scaling)
        else:
            out, logits = reference(t["x"], w, b, t["bank"], router, t["gates"], t["b"], scaling, conv1d)
        loss = (out * upstream).sum()
        if with_router:
            loss = loss + (logits * up_logits).sum()
        else:
            assert logits is None
        wanted = [v for v in t.values() if v.requires_grad]
        results.append((out.detach(), torch.autograd.grad(loss, wanted)))
    (out_f, grads_f), (out_r, grads_r) = results
    torch.testing.assert_close(out_f, out_r)
    assert len(grads_f) == len(leaves) - (0 if x_grad else 1)
    for g_f, g_r in zip(grads_f, grads_r):
        assert g_f.shape == g_r.shape
        torch.testing.assert_close(g_f, g_r)


def _topk_layer_pieces(t, weight, bias, conv1d, scaling, k, valid, missing, options):
    """The three functions in sequence: what ``dense_topk_layer`` computes as one node."""
    out, h, logits = base_and_shrink(t["x"], weight, bias, t["bank"], t["router"], conv1d)
    gates, balance, z_loss, *_ = topk_gates_and_losses(logits, k, valid=valid, missing_grads=missing, **options)
    return gated_expand_(out, h, gates, t["b"], scaling), balance, z_loss


TOPK_OPTIONS = [
    {"balance_type": "megatron", "z_loss": True},
    {"balance_type": "mixtral", "renormalize": False},
    {"balance_type": "switch"},
    {"balance_type": "soft", "z_loss": True},  # a load with a gradient
    {"balance_type": None, "z_loss": True},
    {},
]
FROZEN = {"all": set(), "no x": {"x"}, "only B": {"x", "bank", "router"}, "no router": {"router"}}


def _topk_cases():
    for options in TOPK_OPTIONS:
        has_losses = options.get("balance_type") is not None or options.get("z_loss", False)
        for trainable, frozen in FROZEN.items():
            for source in ("everything", "output only", "losses only"):
                # the losses alone reach a trainable input only through the logits (x or the router)
                if source != "losses only" or (has_losses and {"x", "router"} - frozen):
                    yield options, source, trainable


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("options, source, trainable", list(_topk_cases()))
def test_dense_topk_layer_matches_the_three_functions(options, padded, source, trainable):
    torch.manual_seed(5)
    n_tokens, d_in, d_out, n_experts, rank, k, scaling = 9, 6, 5, 4, 3, 2, 0.75
    conv1d = trainable == "no router"  # a Conv1D base with a bias once
    weight = (torch.randn(d_in, d_out) if conv1d else torch.randn(d_out, d_in)).double()
    bias = torch.randn(d_out, dtype=torch.float64) if conv1d else None
    leaves = {
        "x": torch.randn(n_tokens, d_in, dtype=torch.float64),
        "bank": torch.randn(n_experts, d_in, rank, dtype=torch.float64),
        "b": torch.randn(n_experts * rank, d_out, dtype=torch.float64),
        "router": torch.randn(n_experts, d_in, dtype=torch.float64),
    }
    frozen = FROZEN[trainable]
    valid = torch.rand(n_tokens, generator=torch.Generator().manual_seed(1)) > 0.3 if padded else None
    upstream = torch.randn(n_tokens, d_out, dtype=torch.float64)
    has_losses = options.get("balance_type") is not None or options.get("z_loss", False)
    # a trainer that differentiates only the output: the callback supplies the losses' gradients (as the runtime)
    fill = (torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.05, dtype=torch.float64))
    calls = []

    def missing(device, dtype):
        calls.append(1)
        return fill

    results = []
    for fused in (True, False):
        t = {name: v.clone().requires_grad_(name not in frozen) for name, v in leaves.items()}
        if fused:
            out, gates, balance, z_loss, probs, index, top, entropy, active = dense_topk_layer(
                t["x"],
                weight,
                bias,
                t["bank"],
                t["b"],
                t["router"],
                scaling,
                k,
                conv1d=conv1d,
                valid=valid,
                missing_grads=missing,
                **options,
            )
            assert not any(v.requires_grad for v in (gates, probs, top)) and index.dtype == torch.long
            assert torch.equal(gates.gather(-1, index), top)
            assert entropy is None and active is None  # no selection rule
        else:
            out, balance, z_loss = _topk_layer_pieces(t, weight, bias, conv1d, scaling, k, valid, missing, options)
        assert (balance is None) == (options.get("balance_type") is None)
        assert (z_loss is None) == (not options.get("z_loss", False))
        terms = []
        if source != "losses only":
            terms.append((out * upstream).sum())
        if source != "output only":
            terms += [0.7 * loss for loss in (balance, z_loss) if loss is not None]
        wanted = [v for v in t.values() if v.requires_grad]
        grads = torch.autograd.grad(sum(terms), wanted, allow_unused=True)
        results.append((out.detach(), [loss.detach() for loss in (balance, z_loss) if loss is not None], grads))
    (out_f, losses_f, grads_f), (out_r, losses_r, grads_r) = results
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(losses_f, losses_r)
    for name, g_f, g_r in zip([n for n in leaves if n not in frozen], grads_f, grads_r):
        if g_r is None:  # B through the losses alone
            assert g_f is None or not g_f.any(), name
            continue
        assert g_f is not None and g_f.shape == g_r.shape, name
        torch.testing.assert_close(g_f, g_r, msg=name)
    # the callback ran in both (and only) where the losses got no gradient of their own
    wants_fill = source == "output only" and has_losses and bool({"x", "bank", "router"} - frozen)
    assert len(calls) == (2 if wants_fill else 0)


@pytest.mark.parametrize("source", ["everything", "output only", "losses only"])
@pytest.mark.parametrize(
    "router_cls, params, balance_type",
    [
        (TopPRouter, {"top_p": 0.5}, "megatron"),
        (TopPRouter, {"top_p": 0.7, "renormalize": True, "max_experts": 3}, "soft"),
        (DynMoLERouter, {"entropy_threshold": 0.8, "keep_top_k": 1}, "soft"),
        (DynMoLERouter, {"entropy_type": "renyi", "q": 0.5, "top_p": 0.6}, "mixtral"),
    ],
)
def test_dense_topk_layer_with_a_selection_rule_matches_the_three_functions(router_cls, params, balance_type, source):
    """The top-p routers' rules (with the entropy loss) in the one-node layer: the same output, losses and gradients
    as the three functions in sequence, the routing tensors without gradient, and the missing-gradient callback's
    third value (the entropy loss's) used when only the output is differentiated."""
    torch.manual_seed(6)
    n_tokens, d_in, d_out, n_experts, rank, scaling = 9, 6, 5, 4, 3, 0.75
    router = router_cls(d_in, n_experts, 2, params=router_cls.Params(**params))
    options = router._fused_topk_options()
    weight = torch.randn(d_out, d_in, dtype=torch.float64)
    leaves = {
        "x": torch.randn(n_tokens, d_in, dtype=torch.float64),
        "bank": torch.randn(n_experts, d_in, rank, dtype=torch.float64),
        "b": torch.randn(n_experts * rank, d_out, dtype=torch.float64),
        "router": torch.randn(n_experts, d_in, dtype=torch.float64) * 2,
    }
    valid = torch.rand(n_tokens, generator=torch.Generator().manual_seed(2)) > 0.3
    upstream = torch.randn(n_tokens, d_out, dtype=torch.float64)
    fill = tuple(torch.tensor(v, dtype=torch.float64) for v in (0.3, 0.05, 0.2))
    losses_args = dict(valid=valid, balance_type=balance_type, z_loss=True, entropy_loss=True, **options)
    results = []
    for fused in (True, False):
        t = {name: v.clone().requires_grad_(True) for name, v in leaves.items()}
        if fused:
            out, gates, balance, z, probs, index, top, entropy, active = dense_topk_layer(
                t["x"],
                weight,
                None,
                t["bank"],
                t["b"],
                t["router"],
                scaling,
                missing_grads=lambda *a: fill,
                **losses_args,
            )
            assert not any(v.requires_grad for v in (gates, probs, index, top, active))
            assert active.dtype == torch.bool and torch.equal(gates != 0, active & (probs != 0))
        else:
            out, h, logits = base_and_shrink(t["x"], weight, None, t["bank"], t["router"])
            routed = topk_gates_and_losses(logits, missing_grads=lambda *a: fill, **losses_args)
            gates, balance, z, entropy = routed[0], routed[1], routed[2], routed[6]
            out = gated_expand_(out, h, gates, t["b"], scaling)
        losses = (balance, z, entropy)
        terms = [] if source == "losses only" else [(out * upstream).sum()]
        if source != "output only":
            terms += [c * loss for c, loss in zip((0.7, -0.4, 1.3), losses)]
        grads = torch.autograd.grad(sum(terms), list(t.values()), allow_unused=True)
        results.append((out.detach(), [loss.detach() for loss in losses], grads))
    (out_f, losses_f, grads_f), (out_r, losses_r, grads_r) = results
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(losses_f, losses_r)
    for name, g_f, g_r in zip(leaves, grads_f, grads_r):
        if g_r is None:  # B through the losses alone
            assert g_f is None or not g_f.any(), name
            continue
        torch.testing.assert_close(g_f, g_r, msg=name)


def test_dense_topk_layer_rejects_what_it_cannot_compute():
    x, weight = torch.randn(3, 4), torch.randn(5, 4)
    bank, b_flat = torch.randn(2, 4, 3), torch.randn(6, 5)
    with pytest.raises(ValueError, match="balance_type"):
        dense_topk_layer(x, weight, None, bank, b_flat, torch.randn(2, 4), 1.0, 1, balance_type="sofft")
    with pytest.raises(ValueError, match="one logit per expert"):
        dense_topk_layer(x, weight, None, bank, b_flat, torch.randn(3, 4), 1.0, 1)
    with pytest.raises(ValueError, match="`k`=3"):
        dense_topk_layer(x, weight, None, bank, b_flat, torch.randn(2, 4), 1.0, 3)


def model_grads(make, kernel, targets, router="topk", seed=0, **config_kwargs):
    config = MoLoraConfig(
        r=4,
        num_experts=4,
        top_k=2,
        router=router,
        kernel=kernel,
        init_lora_weights=False,
        aux_loss_coef=0.1,
        z_loss_coef=0.01,
        target_modules=targets,
        task_type="CAUSAL_LM",
        **config_kwargs,
    )
    model = get_peft_model(make(seed=seed), config).train()
    input_ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize(
    "router, options", [("relu", {}), ("topk_bias", {}), ("topk_bias", {"score_function": "softmax"})]
)
def test_stateful_routers_observe_each_training_forward_once_on_every_path(router, options, monkeypatch):
    """ReMoE's sparsity and the loss-free bias's loads are observed in ``observe_routing``, called by the router's
    ``forward`` or, where the layer routes from logits it computed (the shared GEMM, the one-node top-k layer), by
    the layer: the same per-step state from every path, counted once per forward."""
    states = []
    for kernel in ("dense", "naive"):
        calls = _count_calls(monkeypatch)
        config = MoLoraConfig(
            r=4,
            num_experts=4,
            top_k=2,
            router=router,
            router_kwargs=options,
            kernel=kernel,
            target_modules=["q_proj", "up_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(make_llama(seed=2), config).train()
        ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        assert bool(calls) == (kernel == "dense")
        monkeypatch.undo()
        routers = [m for m in model.modules() if type(m).__name__ in ("ReLURouter", "TopKBiasRouter")]
        assert len(routers) == 4  # 2 layers x q_proj, up_proj
        accumulators = [r._activity if router == "relu" else r._loads for r in routers]
        assert all(a._forwards == 1 for a in accumulators)
        states.append([a._pending.clone() for a in accumulators])
    for dense, naive in zip(*states):
        torch.testing.assert_close(dense, naive)
    if router == "topk_bias":  # 10 valid tokens x 2 experts
        assert all(counts.sum() == 20 for counts in states[0])


FUSED_ENTRIES = ("base_and_shrink", "dense_topk_layer")


def _count_calls(monkeypatch, names=FUSED_ENTRIES):
    """Count the layer module's calls of the functions ``names`` (by default the fused path's two entry points: the
    separate functions, and the one-node top-k layer of a training forward); each call appends its name."""
    calls = []
    for name in (names,) if isinstance(names, str) else names:
        original = getattr(layer_module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(layer_module, name, spy)
    return calls


@pytest.mark.parametrize(
    "make, targets, router, extra",
    [
        (make_llama, ["q_proj", "v_proj", "down_proj"], "topk", {}),
        (make_llama, ["q_proj", "o_proj"], "adamoe", {}),  # null experts: more router columns than experts
        (make_llama, ["up_proj"], "topk", {"dynamic_rank": {"init_rank": 2}}),  # DR-LoRA masks
        (make_gpt2, ["c_attn", "c_fc"], "topp", {}),  # transformers' Conv1D, a top-p rule in the top-k node
        (make_gpt2, ["c_attn", "c_fc"], "relu", {}),  # Conv1D, separate functions
        (make_llama, ["q_proj", "down_proj"], "dynmole", {"balance_loss_type": "soft"}),
        (make_gpt2, ["c_attn", "c_fc"], "soft", {}),  # all experts: a top-k node of k = E
        # routers with per-step state observe their routing in observe_routing: their scoring shares the GEMM too
        (make_llama, ["q_proj", "up_proj"], "relu", {}),
        (make_llama, ["q_proj", "up_proj"], "topk_bias", {}),  # sigmoid affinities, the bias moving the choice
        (make_llama, ["q_proj", "up_proj"], "topk_bias", {"router_kwargs": {"score_function": "softmax"}}),
        (make_gpt2, ["c_attn", "c_proj"], "topk", {}),  # Conv1D with a bias, as one top-k node
    ],
)
def test_fused_model_matches_naive(make, targets, router, extra, monkeypatch):
    calls = _count_calls(monkeypatch)
    loss_f, logits_f, grads_f = model_grads(make, "dense", targets, router, **extra)
    assert calls, "the fused path was not taken"
    # a training forward of the top-k, soft and top-p routers runs as one node per layer; the others as separate
    # functions
    one_node = ("topk", "soft", "topk_bias", "topp", "dynmole")
    assert set(calls) == {"dense_topk_layer" if router in one_node else "base_and_shrink"}
    n_calls = len(calls)
    loss_n, logits_n, grads_n = model_grads(make, "naive", targets, router, **extra)
    assert len(calls) == n_calls
    torch.testing.assert_close(loss_f, loss_n, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits_f, logits_n, atol=1e-5, rtol=1e-5)
    assert grads_f.keys() == grads_n.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_n[name], atol=1e-6, rtol=1e-4, msg=name)


def _layer(model):
    return next(m for m in model.modules() if isinstance(m, MoLoraLayer))


def test_fusion_falls_back_when_it_would_change_the_maths():
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(make_llama(), config).train()
    layer = _layer(model)
    x = torch.randn(2, 3, layer.in_features)
    assert layer._fusion_plan(x, "default") is not None
    assert layer._fusion_plan(x.double(), "default") is None  # dtype differs from the base weight
    layer.kernel["default"] = "grouped"
    assert layer._fusion_plan(x, "default") is None
    layer.kernel["default"] = "auto"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # fused, with the operands cast to the region's dtype (test_autocast_fused_layer_matches_the_general_path)
        assert layer._fusion_plan(x.double(), "default")[2] == torch.bfloat16
    handle = layer.base_layer.register_forward_hook(lambda *a: None)
    assert layer._fusion_plan(x, "default") is None  # a hook on the base layer must see its call
    handle.remove()
    layer.base_layer.weight.requires_grad_(True)
    assert layer._fusion_plan(x, "default") is None  # the fused functions give the base weight no gradient
    layer.base_layer.weight.requires_grad_(False)
    layer.molora_dropout["default"] = nn.Dropout(0.5)
    assert layer._fusion_plan(x, "default") is None  # the experts would see another input than the base
    layer.molora_dropout["default"].eval()
    assert layer._fusion_plan(x, "default") is not None


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_autocast_fused_layer_matches_the_general_path(base_dtype, make, monkeypatch):
    """Inside ``torch.autocast`` (a trainer's ``bf16=True``) on a bf16 or fp32 base with fp32 adapters (PEFT's
    ``autocast_adapter_dtype``): the fused path is taken, its products run in bf16 as the general path's do under
    autocast, the router scores the same input in fp32 in both, so the routing is the same and the fp32 parameters
    get the same gradients; output and input gradient agree to bf16 rounding (the in-place sums round once, the general
    path's twice)."""
    targets = ["q_proj"] if make is make_llama else ["c_attn"]
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(make().to(base_dtype), config).train()
    layer = _layer(model)
    assert layer.molora_A["default"].weight.dtype == torch.float32
    x0 = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1)).to(base_dtype)
    weights = torch.linspace(-1, 1, layer.out_features)
    calls = _count_calls(monkeypatch)
    results = []
    for fused in (True, False):
        handle = None if fused else layer.base_layer.register_forward_hook(lambda *a: None)  # the general path
        model.zero_grad()
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        (y.float() * weights).sum().backward()
        results.append((y, x.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}))
        if handle is not None:
            handle.remove()
        assert calls == ["base_and_shrink"], calls  # once, by the fused call
    (y_f, dx_f, grads_f), (y_g, dx_g, grads_g) = results
    assert y_f.dtype == y_g.dtype == torch.bfloat16
    torch.testing.assert_close(y_f.float(), y_g.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(dx_f.float(), dx_g.float(), atol=2e-2, rtol=2e-2)
    assert grads_f.keys() == grads_g.keys() and len(grads_f) == 3  # A, B, router
    for name, grad in grads_f.items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, grads_g[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fp32_adapters_on_a_bf16_base_share_the_router_gemm(monkeypatch):
    """A bf16 model with fp32 adapters (PEFT's default ``autocast_adapter_dtype``, e.g. ``PeftModel.from_pretrained``
    on a bf16 base): the input is cast to fp32 once and the router's logits come out of the experts' GEMM, with the
    results of the router scoring on its own (which a hook on the router forces)."""
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(make_llama().to(torch.bfloat16), config).train()
    layer = _layer(model)
    router = layer.molora_router["default"]
    assert layer.molora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    x0 = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    weights = torch.linspace(-1, 1, layer.out_features)
    scored, results = [], []
    scores = router.scores
    monkeypatch.setattr(router, "scores", lambda x: scored.append(1) or scores(x))
    for shared in (True, False):
        handle = router.register_forward_hook(lambda *a: None) if not shared else None
        model.zero_grad()
        x = x0.clone().requires_grad_()
        y = layer(x)
        (y.float() * weights).sum().backward()
        results.append((y, x.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}))
        if handle is not None:
            handle.remove()
        assert len(scored) == (0 if shared else 1)  # the router scored on its own only when it had to
    (y_s, dx_s, grads_s), (y_r, dx_r, grads_r) = results
    assert y_s.dtype == torch.bfloat16
    torch.testing.assert_close(y_s.float(), y_r.float(), atol=1e-2, rtol=1e-2)  # one bf16 rounding at most
    torch.testing.assert_close(dx_s.float(), dx_r.float(), atol=1e-2, rtol=1e-2)
    assert len(grads_s) == 3
    for name, grad in grads_s.items():
        torch.testing.assert_close(grad, grads_r[name], atol=1e-6, rtol=1e-4, msg=name)


def test_base_hook_still_runs_and_results_agree():
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(make_llama(), config).eval()
    layer = _layer(model)
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        fused = layer(x)
        seen = []
        handle = layer.base_layer.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
        general = layer(x)
        handle.remove()
    assert seen == [torch.Size([2, 3, layer.out_features])]
    torch.testing.assert_close(fused, general, atol=1e-6, rtol=1e-5)


def test_bf16_model_with_bf16_adapters_takes_the_fused_path(monkeypatch):
    """A bf16 base with bf16 banks (the router stays fp32): fused, and close to the naive reference in fp32."""
    calls = _count_calls(monkeypatch)
    config = MoLoraConfig(
        r=4,
        num_experts=4,
        top_k=2,
        target_modules=["q_proj", "up_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        kernel="auto",
    )
    model = get_peft_model(make_llama(seed=2), config, autocast_adapter_dtype=False).to(torch.bfloat16).train()
    assert next(p for n, p in model.named_parameters() if "molora_A" in n).dtype == torch.bfloat16
    input_ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    assert calls, "the fused path was not taken"
    reference = get_peft_model(make_llama(seed=2), config, autocast_adapter_dtype=False)
    reference.load_state_dict(model.state_dict())  # same (bf16-rounded) weights, computed in fp32 below
    for module in reference.modules():
        if isinstance(module, MoLoraLayer):
            module.kernel["default"] = "naive"
    reference.float().train()
    ref = reference(input_ids=input_ids, labels=input_ids)
    ref.loss.backward()
    torch.testing.assert_close(out.logits.float(), ref.logits, atol=0.1, rtol=0.05)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, p_ref in reference.named_parameters():
        if p_ref.requires_grad and ("molora_A" in name or "molora_B" in name):
            cosine = torch.nn.functional.cosine_similarity(grads[name].float().flatten(), p_ref.grad.flatten(), dim=0)
            assert cosine > 0.95, (name, cosine.item())  # bf16 end to end against fp32: a sanity bound


def test_functions_without_grad_give_the_same_values():
    # inference and generation skip the autograd.Function call; the values must not change
    torch.manual_seed(4)
    x, weight = torch.randn(5, 6), torch.randn(7, 6)
    bank, router = torch.randn(3, 6, 2, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    gates, b_flat = torch.rand(5, 3), torch.randn(6, 7, requires_grad=True)
    out, h, logits = base_and_shrink(x, weight, None, bank, router)
    want = gated_expand_(out, h, gates, b_flat, 0.5)
    assert want.requires_grad
    with torch.no_grad():
        out, h, logits_ng = base_and_shrink(x, weight, None, bank, router)
        got = gated_expand_(out, h, gates, b_flat, 0.5)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(logits_ng, logits.detach())


def test_generation_reuses_the_shrink_matrix_only_within_one_call(monkeypatch):
    # the decode steps of one generate() reuse the [A_flat | W_router^T] their prefill built; a new call rebuilds it,
    # so weights changed between calls (even through .data, which no version counter sees) are used
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(make_llama(seed=3), config).eval()
    builds = _count_calls(monkeypatch, "flat_shrink_weight")
    input_ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        first = model.generate(input_ids=input_ids, **kwargs)
    n_layers = sum(isinstance(m, MoLoraLayer) for m in model.modules())
    assert len(builds) == n_layers  # once per layer at the prefill, not per decode step
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MoLoraLayer):
                module.molora_A["default"].weight.data.copy_(torch.randn_like(module.molora_A["default"].weight))
        changed = model.generate(input_ids=input_ids, **kwargs)
        # the same weights without any cache: a full forward per step
        uncached = model.generate(input_ids=input_ids, use_cache=False, **kwargs)
    assert not torch.equal(first, changed)
    torch.testing.assert_close(changed, uncached)


@pytest.mark.parametrize("router", ["topk", "mor"])
def test_decode_steps_reuse_their_plan_until_something_it_read_changes(monkeypatch, router):
    """A cached decode step runs the fused path with what an earlier call on its KV cache found (``_DecodePlan``):
    each change the plan depends on, made between two steps on the same cache, sends the next step through the full
    checks, and every step equals the same step without a plan. (``mor`` scores with its own routers: no router
    columns in the plan's matrix.)"""
    config = MoLoraConfig(
        r=4, num_experts=4, top_k=2, router=router, target_modules=["q_proj"], init_lora_weights=False
    )
    model = get_peft_model(make_llama(seed=5), config).eval()
    layers = [m for m in model.modules() if isinstance(m, MoLoraLayer)]
    planned = []
    original = MoLoraLayer._decode_forward

    def counting(self, *args, **kwargs):
        planned.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MoLoraLayer, "_decode_forward", counting)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    hooked = []
    base = layers[0].base_layer

    def changes():
        # a prefill without a cache object makes none (no decode step may follow): the first step makes them
        yield "first step", lambda: None
        yield "nothing", lambda: None
        # in place: the matrix copied at the prefill would be stale (the version counter tells)
        yield "A in place", lambda: layers[0].molora_A["default"].weight.mul_(1.5)
        yield "router in place", lambda: layers[1].molora_router["default"].weight.add_(0.25)
        # replaced rather than updated in place (load_state_dict(assign=True), PEFT's low_cpu_mem_usage loading)
        yield (
            "B replaced",
            lambda: setattr(
                layers[0].molora_B["default"], "weight", nn.Parameter(layers[0].molora_B["default"].weight * 1.5)
            ),
        )
        # the fused path never calls the base layer: a hook put on it must see its call
        yield "hook on the base", lambda: base.register_forward_hook(lambda *args: hooked.append(1))
        # through .data no version counter tells; a step on another cache (another generation) makes its own plan
        yield (
            "A through .data, another cache",
            lambda: (
                layers[1].molora_A["default"].weight.data.mul_(1.5),
                caches.append(copy.deepcopy(caches[-1])),
            ),
        )
        yield "autocast", None

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        caches, seq = [out.past_key_values], ids
        for what, change in changes():
            seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], dim=1)
            del planned[:]
            if change is not None:
                change()
                # the reference: the same step on copies (a copied model has no plan)
                ref_model, ref_cache = copy.deepcopy((model, caches[-1]))
                out = model(input_ids=seq[:, -1:], cache=caches[-1], use_cache=True)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(input_ids=seq[:, -1:], cache=caches[-1], use_cache=True)
                assert not planned, what  # the plan was made outside autocast
                continue
            n_planned = len(planned)
            ref = ref_model(input_ids=seq[:, -1:], cache=ref_cache, use_cache=True).logits
            assert len(planned) == n_planned, what
            torch.testing.assert_close(out.logits, ref, atol=0, rtol=0)
            if what == "first step":
                assert not planned and all(layer._molora_decode_plans for layer in layers), what
            elif what == "nothing":
                assert planned == layers, what  # both layers took their plan
            elif what == "hook on the base":
                assert hooked and layers[0] not in planned and layers[1] in planned, what
            elif what.startswith("A through"):
                assert not planned, what
            else:
                changed = layers[0] if what in ("A in place", "B replaced") else layers[1]
                if router == "mor" and what == "router in place":
                    # mor's scoring is not in the plan's matrix: its change needs no new plan
                    assert planned == layers, what
                else:
                    assert changed not in planned and len(planned) == 1, what


@pytest.mark.parametrize(
    "router, kwargs",
    [("topk", {}), ("soft", {}), ("topk_bias", {"score_function": "sigmoid"}), ("topp", {}), ("dynmole", {})],
)
def test_decode_steps_of_top_k_routers_call_the_top_k_function_directly(monkeypatch, router, kwargs):
    """A decode step needs no aux loss, so a router whose selection is the top-k function is asked directly
    (``select_with_losses``, not through ``MoLoraRuntime.select``): the same scores, tokens and statistics, bit for
    bit, as the general selection on the same plan."""
    from molora.routers.topk import FusedTopKSelection
    from molora.runtime import MoLoraRuntime

    config = MoLoraConfig(
        r=4, num_experts=4, top_k=2, router=router, router_kwargs=kwargs, target_modules=["q_proj", "down_proj"]
    )
    model = get_peft_model(make_llama(seed=5), config).eval()
    for module in model.modules():
        if isinstance(module, MoLoraLayer):
            nn.init.normal_(module.molora_B["default"].weight, std=0.5)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    selections = []
    select = MoLoraRuntime.select

    def counting(self, *args, **kwargs):
        selections.append(self.context.is_decode)
        return select(self, *args, **kwargs)

    monkeypatch.setattr(MoLoraRuntime, "select", counting)

    def generate():
        model.reset_routing_stats()
        out = greedy_scores(model, ids, mask, n=5)
        return out, model.get_routing_stats()

    direct, direct_stats = generate()
    assert selections and not any(selections)  # the prefill only
    del selections[:]
    # the general selection: through MoLoraRuntime.select, as for any other router
    monkeypatch.setattr(FusedTopKSelection.select_with_losses, "fused_topk", False)
    general, general_stats = generate()
    n_layers = sum(isinstance(m, MoLoraLayer) for m in model.modules())
    assert sum(selections) == n_layers * 4  # every layer in each of the 4 decode steps
    assert torch.equal(direct.sequences, general.sequences)
    for got, want in zip(direct.scores, general.scores):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert direct_stats.keys() == general_stats.keys()
    for name, stats in direct_stats.items():
        assert stats.tokens == general_stats[name].tokens == 2 * 6 - 2 + 2 * 4
        torch.testing.assert_close(stats.load, general_stats[name].load, atol=0, rtol=0)


def test_decode_plans_do_not_outlive_their_generation_or_adapter(batch):
    """A plan holds a copy of the bank and the router's weight: ``generate`` drops them when it returns, a training
    forward drops them, and ``delete_adapter`` drops the deleted adapter's (whose weights are then freed, as with
    PEFT LoRA)."""
    import gc
    import weakref

    settings = dict(
        r=4,
        num_experts=4,
        top_k=2,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    config = MoLoraConfig(**settings)
    model = get_peft_model(make_llama(seed=3), config).eval()
    model.add_adapter("other", config)
    layers = [m for m in model.modules() if isinstance(m, MoLoraLayer)]
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert not any(layer._molora_decode_plans for layer in layers)
        # a PeftModel without task_type: PEFT's generic generate calls the transformers model's directly
        generic = get_peft_model(make_llama(seed=3), MoLoraConfig(**{**settings, "task_type": None})).eval()
        assert type(generic) is PeftModel
        generic.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert not any(m._molora_decode_plans for m in generic.modules() if isinstance(m, MoLoraLayer))
        model.set_adapter("other")
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], cache=out.past_key_values, use_cache=True)  # a manual decode step makes plans
    assert all(set(layer._molora_decode_plans) == {"other"} for layer in layers)
    model.train()
    model(**batch).loss.backward()
    assert not any(layer._molora_decode_plans for layer in layers)
    with torch.no_grad():
        model.eval()
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, :1], cache=out.past_key_values, use_cache=True)
    bank = weakref.ref(layers[0].molora_A["other"].weight)
    model.delete_adapter("other")
    gc.collect()
    assert not any(layer._molora_decode_plans for layer in layers) and bank() is None


@pytest.mark.parametrize("router", ["topk", "soft"])
def test_router_gradients_own_their_storage(batch, router):
    """The router's gradient came out as a slice of the ``[E*r + E, d_in]`` buffer of the bank's and the router's
    gradients; AccumulateGrad kept the slice as ``.grad`` (its layout matches) and with it the whole buffer, 8x the
    router's size, until the gradients were zeroed."""
    model = get_peft_model(make_llama(), MoLoraConfig(num_experts=8, top_k=2, router=router, init_lora_weights=False))
    model.train()
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    for g in grads:
        assert g.untyped_storage().nbytes() == g.numel() * g.element_size()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_keeps_no_recomputed_activations(batch, use_reentrant):
    """After its backward a checkpointed step holds what an unchecked one does (the gradients and the routing
    records): the recompute's aux losses used to replace the forward's records and keep the recomputed graph, with
    every layer's activations, alive until the next forward (non-reentrant checkpointing then saved almost no
    memory), and reentrant checkpointing's first pass cached every layer's shrink matrix."""
    from molora.bench import PeakTensorMemory

    def held_after_backward(checkpointing: bool) -> int:
        model = get_peft_model(make_llama(num_hidden_layers=4), MoLoraConfig(num_experts=8, top_k=2))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        model(**batch).loss.backward()  # a first step: nothing created lazily counts below
        model.zero_grad(set_to_none=True)
        with PeakTensorMemory() as tracker:
            out = model(**batch)
            out.loss.backward()
            del out
            return tracker.current

    plain, checkpointed = held_after_backward(False), held_after_backward(True)
    # non-reentrant checkpointing leaves two [batch, seq, hidden] tensors (12 KB here; not found in molora's state);
    # the recomputed graph was 1 MB (reentrant: 0.6 MB)
    hidden = batch["input_ids"].numel() * 64 * 4
    assert checkpointed - plain <= 2 * hidden, (checkpointed, plain)


@pytest.mark.parametrize(
    "router, num_experts, fused",
    [
        ("topk", 8, True),  # E*r = 64, two experts per token: dense wins on a CPU, fused with the base
        ("topk", 16, False),  # E*r = 128 at k=2: the grouped path (docs/kernels.md)
        ("soft", 16, True),  # the same bank, every expert per token: dense (SoftRouter.experts_per_token)
    ],
)
def test_auto_path_before_routing_follows_the_router(router, num_experts, fused):
    """Before routing, ``kernel="auto"`` estimates the assignments from the router's ``experts_per_token()``: a sparse
    top-k bank wide enough runs the grouped path, the soft router on the same bank stays on the fused dense one."""
    config = MoLoraConfig(r=8, num_experts=num_experts, top_k=2, router=router, target_modules=["proj"])
    model = get_peft_model(OneProjection(1024), config).train()
    layer = _layer(model)
    x = torch.randn(2, 256, 1024)
    assert (layer._fusion_plan(x, "default") is not None) is fused
    model(x).sum().backward()  # either path trains
    assert layer.molora_A["default"].weight.grad is not None


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
def test_forward_without_gradient_is_bit_identical_to_the_training_forward(batch, amp):
    """A preference trainer's reference (a frozen copy of the adapter, or the adapter itself under ``no_grad``) must
    give the policy's outputs bit for bit at step 0 (DPO's loss ln 2 at a learning rate of 0). The fused functions have
    a forward without autograd: it put the LoRA scaling into the GEMM's alpha where the training forward multiplied
    the gates by it, which rounds differently unless the scaling is a power of two (here 16 / 6), by ~1e-7 in fp32
    and by bf16's 0.4 % under a trainer's ``bf16=True`` autocast."""
    config = MoLoraConfig(r=6, lora_alpha=16, num_experts=4, top_k=2, init_lora_weights=False)
    model = get_peft_model(make_llama(seed=2), config).train()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        trained = model(**inputs).logits
        with torch.no_grad():
            frozen = model(**inputs).logits
    assert torch.equal(trained, frozen)


@pytest.mark.parametrize("router", ["topk", "soft", "general path"])
def test_training_forward_keeps_no_copy_of_the_bank_for_backward(router):
    """What a layer's fused training forward saves for backward: the parameters themselves, not ``[A_flat | W^T]``
    built from them (a copy of every layer's bank alive until its backward: most of MoLoRA's extra activation
    memory at short micro-batches), and ``h`` and the gates, not also ``h ⊙ gates``. ``topk``: the one-node layer;
    ``soft``: base-and-shrink and the gated expansion as two functions; ``general path``: a base layer the fused
    path does not run (here: one with a hook; a quantized base in practice), the shrink GEMM on its own."""
    d, n_experts, rank, tokens = 64, 4, 8, 24
    config = MoLoraConfig(
        r=rank, num_experts=n_experts, top_k=2, router=router.replace("general path", "topk"), target_modules=["proj"]
    )
    model = get_peft_model(OneProjection(d), config).train()
    if router == "general path":
        model.base_model.model.proj.base_layer.register_forward_hook(lambda module, args, out: None)
    parameters = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(tokens, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
    shapes = [tuple(t.shape) for t in saved if t.data_ptr() not in parameters]
    assert (d, n_experts * rank + n_experts) not in shapes and (d, n_experts * rank) not in shapes, shapes
    if router != "general path":  # (the general path's expansion is plain autograd, which saves what it needs)
        assert shapes.count((tokens, n_experts * rank)) == 1, shapes  # h only
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_decode_steps_expand_with_the_gates_of_the_routers_own_result():
    """The decode step's direct top-k call builds the routing with ``router.topk_result`` and expands with that
    routing's gates: a subclass that changes them there (here: squared, renormalised weights) gets them in every
    decode step, as in the prefill and in a forward without a cache."""
    from molora.routers.base import ROUTER_REGISTRY, register_router
    from molora.routers.topk import TopKRouter

    class SharpTopK(TopKRouter):
        def topk_result(self, gates, *rest, dense=False):
            routing, losses = super().topk_result(gates, *rest, dense=dense)
            weight = routing.weight.reshape(-1, routing.per_token) ** 2
            routing.weight = (weight / weight.sum(-1, keepdim=True)).reshape(-1)
            routing.gates = None  # rebuilt from the weights by dense_gates()
            return routing, losses

    register_router("sharp_topk_test", SharpTopK, overwrite=True)
    try:
        config = MoLoraConfig(r=4, num_experts=4, top_k=2, router="sharp_topk_test", target_modules=["q_proj"])
        model = get_peft_model(make_llama(seed=5), config).eval()
        for module in model.modules():
            if isinstance(module, MoLoraLayer):
                nn.init.normal_(module.molora_B["default"].weight, std=0.5)
        ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
        out = greedy_scores(model, ids, n=4)
        with torch.no_grad():
            full = model(input_ids=out.sequences, use_cache=False).logits
        for step, score in enumerate(out.scores):
            torch.testing.assert_close(score, full[:, ids.shape[1] - 1 + step], atol=1e-5, rtol=1e-5)
    finally:
        ROUTER_REGISTRY.pop("sharp_topk_test", None)
