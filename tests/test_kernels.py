"""Parity tests for the expert compute paths of ``molora.kernels``.

Covers:
    * the combination vector of docs/algorithms.md 1.6 through every path (``naive``, ``dense``, ``grouped`` and
      ``expert_delta`` with each ``kernel`` including ``"auto"``);
    * a sweep over dtypes (float32, float64; bf16 forward only), token counts, expert counts, ranks, odd widths and
      routings (top-1, top-2, soft, and a sparse routing with empty experts and tokens without any expert): the
      outputs and the gradients with respect to ``x``, ``A``, ``B`` and the router logits agree with ``naive_delta``;
    * routings without any assignment, ``choose_kernel``, and the error for an unknown kernel name.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

import molora.kernels as kernels_module
from molora import MoLoraConfig, Routing
from molora.kernels import (
    KERNEL_CHOICES,
    choose_kernel,
    dense_masked_delta,
    expert_delta,
    grouped_delta,
    naive_delta,
)
from molora.routers import topk_routing

PATHS = {"naive": naive_delta, "dense": dense_masked_delta, "grouped": grouped_delta}
FAST_PATHS = ["dense", "grouped", "auto"]
D_IN, D_OUT = 17, 24


def run_path(name: str, x, A, B, routing, scaling):
    if name == "auto":
        return expert_delta(x, A, B, routing, scaling, kernel="auto")
    return PATHS[name](x, A, B, routing, scaling)


# -- spec 1.6 --------------------------------------------------------------------------------------------------------


def spec_routing(with_gates: bool) -> Routing:
    weight = torch.tensor([0.75, 0.25])
    return Routing(
        probs=torch.tensor([[0.75, 0.25]]),
        token_index=torch.tensor([0, 0]),
        expert_index=torch.tensor([0, 1]),
        weight=weight,
        gates=weight[None].clone() if with_gates else None,
    )


@pytest.mark.parametrize("with_gates", [False, True])
@pytest.mark.parametrize("path", ["naive", "dense", "grouped", "auto"])
def test_spec_combination_vector(path, with_gates):
    scaling = MoLoraConfig(r=1, lora_alpha=2, num_experts=2, top_k=2).scaling
    assert scaling == 2.0
    x = torch.tensor([[1.0, 2.0]])
    A = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]])  # [E=2, d_in=2, r=1]: A_0 = [1, 0], A_1 = [0, 1]
    B = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [E=2, r=1, d_out=2]: B_0 = [1, 0]^T, B_1 = [0, 1]^T
    delta = run_path(path, x, A, B, spec_routing(with_gates), scaling)
    torch.testing.assert_close(delta, torch.tensor([[1.5, 1.0]]))
    w0 = torch.eye(2)
    torch.testing.assert_close(x @ w0.T + delta, torch.tensor([[2.5, 3.0]]))


@pytest.mark.parametrize("kernel", ["naive", "dense", "grouped"])
def test_expert_delta_dispatches_to_named_path(kernel):
    torch.manual_seed(11)
    x, A, B = torch.randn(6, 5), torch.randn(3, 5, 2), torch.randn(3, 2, 4)
    routing = topk_routing(torch.softmax(torch.randn(6, 3), -1), 2)
    torch.testing.assert_close(
        expert_delta(x, A, B, routing, 0.5, kernel=kernel), PATHS[kernel](x, A, B, routing, 0.5)
    )


# -- routings --------------------------------------------------------------------------------------------------------

ROUTING_KINDS = ["topk1", "topk2", "soft", "sparse"]


def make_routing(kind: str, logits: torch.Tensor, seed: int) -> Routing:
    """A routing whose gates are differentiable functions of ``logits[T, E]``."""
    n_tokens, n_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    if kind == "topk1":
        return topk_routing(probs, 1, logits=logits)
    if kind == "topk2":
        return topk_routing(probs, 2, logits=logits)
    if kind == "soft":
        return Routing(
            probs=probs,
            token_index=torch.arange(n_tokens, device=logits.device).repeat_interleave(n_experts),
            expert_index=torch.arange(n_experts, device=logits.device).repeat(n_tokens),
            weight=probs.reshape(-1),
            logits=logits,
            gates=probs,
        )
    if kind == "sparse":
        # a variable number of experts per token, only even experts used (odd ones get no token), some tokens
        # without any expert; the dense gates are built from the triples (``gates=None``)
        gen = torch.Generator().manual_seed(seed)
        allowed = torch.zeros(n_experts, dtype=torch.bool)
        allowed[::2] = True
        mask = (torch.rand(n_tokens, n_experts, generator=gen) < 0.6) & allowed
        if n_tokens > 1:
            mask[0] = False
        token_index, expert_index = mask.to(logits.device).nonzero(as_tuple=True)
        weight = torch.sigmoid(logits[token_index, expert_index])
        return Routing(probs=probs, token_index=token_index, expert_index=expert_index, weight=weight, logits=logits)
    raise AssertionError(kind)


def _cases():
    for dtype, n_tokens, n_experts, rank, kind in itertools.product(
        [torch.float32, torch.float64], [1, 7, 33], [1, 4, 8], [1, 8], ROUTING_KINDS
    ):
        if kind == "topk2" and n_experts < 2:
            continue
        yield pytest.param(
            dtype, n_tokens, n_experts, rank, kind, id=f"{str(dtype)[6:]}-T{n_tokens}-E{n_experts}-r{rank}-{kind}"
        )


def make_inputs(n_tokens, n_experts, rank, dtype, logits_dtype, seed):
    torch.manual_seed(seed)
    x = torch.randn(n_tokens, D_IN, dtype=dtype)
    A = torch.randn(n_experts, D_IN, rank, dtype=dtype) / D_IN**0.5
    B = torch.randn(n_experts, rank, D_OUT, dtype=dtype) / rank**0.5
    logits = torch.randn(n_tokens, n_experts, dtype=logits_dtype)
    return x, A, B, logits


def forward_backward(path, kind, x, A, B, logits, upstream, scaling, seed):
    """Output and gradients of one path, on fresh leaves and a fresh routing (routings cache their dense gates)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, logits)]
    routing = make_routing(kind, leaves[3], seed)
    out = run_path(path, leaves[0], leaves[1], leaves[2], routing, scaling)
    grads = torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("dtype, n_tokens, n_experts, rank, kind", list(_cases()))
def test_paths_agree_with_naive(dtype, n_tokens, n_experts, rank, kind):
    seed = 1000 * n_tokens + 100 * n_experts + 10 * rank + ROUTING_KINDS.index(kind)
    x, A, B, logits = make_inputs(n_tokens, n_experts, rank, dtype, dtype, seed)
    upstream = torch.randn(n_tokens, D_OUT, dtype=dtype)
    scaling = 1.75
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    ref_out, ref_grads = forward_backward("naive", kind, x, A, B, logits, upstream, scaling, seed)
    assert ref_out.shape == (n_tokens, D_OUT) and ref_out.dtype == dtype
    # the reference itself matches an explicit per-token sum over the triples
    routing = make_routing(kind, logits, seed)
    explicit = torch.zeros(n_tokens, D_OUT, dtype=torch.float64)
    for t, e, w in zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist()):
        explicit[t] += w * scaling * (x[t].double() @ A[e].double()) @ B[e].double()
    torch.testing.assert_close(ref_out.double(), explicit, **tol)
    for path in FAST_PATHS:
        out, grads = forward_backward(path, kind, x, A, B, logits, upstream, scaling, seed)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref_out, **tol, msg=lambda m, path=path: f"{path} output: {m}")
        for name, grad, ref in zip(("x", "A", "B", "logits"), grads, ref_grads):
            assert grad is not None and ref is not None, f"{path}: no gradient for {name}"
            torch.testing.assert_close(grad, ref, **tol, msg=lambda m, name=name, path=path: f"{path} d/d{name}: {m}")


@pytest.mark.parametrize("kind", ROUTING_KINDS)
@pytest.mark.parametrize("n_tokens, n_experts, rank", [(7, 4, 8), (33, 8, 1), (1, 2, 8)])
def test_paths_agree_in_bf16_forward(n_tokens, n_experts, rank, kind):
    seed = 77 + n_tokens
    x, A, B, logits = make_inputs(n_tokens, n_experts, rank, torch.bfloat16, torch.float32, seed)
    routing = make_routing(kind, logits, seed)
    # reference: the same bf16 values, computed in float64
    ref = naive_delta(x.double(), A.double(), B.double(), make_routing(kind, logits, seed), 2.0)
    for path in ["naive", *FAST_PATHS]:
        out = run_path(path, x, A, B, routing, 2.0)
        assert out.dtype == torch.bfloat16 and out.shape == (n_tokens, D_OUT)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=5e-2, msg=lambda m, path=path: f"{path}: {m}")


@pytest.mark.parametrize("path", ["naive", *FAST_PATHS])
def test_empty_experts_get_zero_gradient(path):
    torch.manual_seed(5)
    n_tokens, n_experts, rank = 9, 6, 3
    x, A, B, logits = make_inputs(n_tokens, n_experts, rank, torch.float32, torch.float32, 5)
    _, (gx, gA, gB, glogits) = forward_backward(path, "sparse", x, A, B, logits, torch.randn(n_tokens, D_OUT), 1.0, 5)
    # odd experts never receive a token: their A and B get an exactly-zero gradient, the others do not
    assert torch.equal(gA[1::2], torch.zeros_like(gA[1::2]))
    assert torch.equal(gB[1::2], torch.zeros_like(gB[1::2]))
    assert (gA[::2].abs().sum(dim=(1, 2)) > 0).all()
    # token 0 has no expert: zero gradient for its input
    assert torch.equal(gx[0], torch.zeros_like(gx[0]))


@pytest.mark.parametrize("path", ["naive", *FAST_PATHS])
def test_routing_without_assignments(path):
    torch.manual_seed(6)
    n_tokens, n_experts, rank = 4, 3, 2
    x, A, B, logits = make_inputs(n_tokens, n_experts, rank, torch.float32, torch.float32, 6)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B)]
    empty = torch.zeros(0, dtype=torch.long)
    routing = Routing(probs=torch.softmax(logits, -1), token_index=empty, expert_index=empty, weight=torch.zeros(0))
    out = run_path(path, *leaves, routing, 2.0)
    assert torch.equal(out, torch.zeros(n_tokens, D_OUT))
    out.sum().backward()
    # every parameter stays in the graph (DDP) and gets a zero gradient; the input may get none at all
    x_leaf, A_leaf, B_leaf = leaves
    for leaf in (A_leaf, B_leaf):
        assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf))
    assert x_leaf.grad is None or torch.equal(x_leaf.grad, torch.zeros_like(x_leaf))


# -- kernel choice ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, num_assignments, num_experts, rank, width, expected",
    [
        # the layer shapes measured on a CPU (docs/kernels.md, "Choosing the path"), 2048 wide, 512 tokens
        (512, 1024, 8, 8, 2048, "dense"),  # E=8, k=2, r=8: dense 1.06x LoRA(r*k), grouped 1.09x
        (512, 1024, 16, 8, 2048, "grouped"),  # E=16: dense 1.14x, grouped 1.05x
        (512, 1024, 64, 8, 2048, "grouped"),  # E=64: dense 1.72x, grouped 1.16x
        (512, 512, 8, 8, 2048, "grouped"),  # k=1: dense 1.06x, grouped 1.03x
        (512, 2048, 16, 8, 2048, "dense"),  # k=4: dense 1.13x, grouped 1.24x
        (512, 1024, 8, 32, 2048, "grouped"),  # r=32: dense 1.27x, grouped 1.08x
        (512, 512 * 16, 16, 8, 2048, "dense"),  # soft routing: every expert
        (64, 128, 8, 8, 2048, "dense"),  # 64 tokens: dense 1.12x, grouped 1.19x
        (64, 128, 32, 8, 2048, "grouped"),  # dense 1.46x, grouped 1.26x
        # 256 wide: the grouped path's cost per expert segment weighs more
        (512, 1024, 8, 8, 256, "dense"),  # dense 1.62x, grouped 2.09x
        (256, 512, 16, 8, 256, "dense"),  # a training step: dense 1.87x, grouped 1.93x
        (256, 512, 64, 8, 256, "grouped"),  # dense 4.27x, grouped 3.09x
        (4, 8, 64, 8, 256, "dense"),  # a decode step: 8 segments of one row each
        (512, 1024, 16, 8, None, "grouped"),  # width unknown: a wide projection
        (0, 0, 16, 128, 2048, "dense"),  # no tokens: nothing to compute either way
        (10, None, 4, 8, None, "dense"),  # routing unknown: dense if it wins even at one expert per token
        (10, None, 8, 8, None, "grouped"),
    ],
)
def test_choose_kernel(num_tokens, num_assignments, num_experts, rank, width, expected):
    assert choose_kernel(num_tokens, num_assignments, num_experts, rank, "cpu", width) == expected
    assert choose_kernel(num_tokens, num_assignments, num_experts, rank, width=width) == expected


def test_choose_kernel_while_compiling_keeps_dense_banks(monkeypatch):
    # the grouped path runs outside a compiled graph: while tracing, a CPU bank up to 1024 rank columns stays dense
    assert choose_kernel(512, 1024, 16, 8, "cpu", 2048) == "grouped"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose_kernel(512, 1024, 16, 8, "cpu", 2048) == "dense"
    assert choose_kernel(512, 1024, 64, 16, "cpu", 2048) == "dense"  # 1024 columns
    assert choose_kernel(512, 1024, 128, 16, "cpu", 2048) == "grouped"


def test_choose_kernel_on_cuda_devices():
    # decided from the device type alone (no GPU needed): a larger dense limit (E*r <= 4096, measured on an H200),
    # the Triton kernels beyond it for sparse routing; other devices keep the conservative 512
    sparse = "triton" if importlib.util.find_spec("triton") is not None else "grouped"
    assert choose_kernel(10, 20, 64, 64, "cuda") == "dense"  # E*r = 4096
    assert choose_kernel(10, 20, 64, 65, "cuda") == sparse
    assert choose_kernel(10, 640, 64, 65, "cuda") == "dense"  # density 0.5
    assert choose_kernel(10, 20, 256, 32, "cuda") == sparse
    assert choose_kernel(10, 20, 8, 64, "mps") == "dense"  # E*r = 512
    assert choose_kernel(10, 20, 8, 65, "mps") == "grouped"


@pytest.mark.parametrize("kind, expected_path", [("topk1", "grouped"), ("soft", "dense")])
def test_auto_takes_the_chosen_path(kind, expected_path, monkeypatch):
    """``expert_delta(kernel="auto")`` runs the path ``choose_kernel`` names for the call's shapes, and agrees with the
    reference: a 1024-wide bank of 16 experts, sparse (grouped) and soft (dense) routing."""
    n_tokens, n_experts, rank, width = 64, 16, 8, 1024
    torch.manual_seed(13)
    x = torch.randn(n_tokens, width, dtype=torch.float64)
    A = torch.randn(n_experts, width, rank, dtype=torch.float64) / width**0.5
    B = torch.randn(n_experts, rank, width, dtype=torch.float64) / rank**0.5
    logits = torch.randn(n_tokens, n_experts, dtype=torch.float64)
    n_assignments = make_routing(kind, logits, 13).token_index.numel()
    assert choose_kernel(n_tokens, n_assignments, n_experts, rank, "cpu", width) == expected_path
    taken = []
    for name, path in list(kernels_module._PATHS.items()):
        monkeypatch.setitem(
            kernels_module._PATHS, name, lambda *a, name=name, path=path: taken.append(name) or path(*a)
        )
    upstream = torch.randn(n_tokens, width, dtype=torch.float64)
    ref_out, ref_grads = forward_backward("naive", kind, x, A, B, logits, upstream, 0.5, 13)
    taken.clear()
    out, grads = forward_backward("auto", kind, x, A, B, logits, upstream, 0.5, 13)
    assert taken == [expected_path]
    torch.testing.assert_close(out, ref_out)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("kernel", ["grouped", "triton"])
def test_forced_grouped_paths_compute_dense_routings_on_the_dense_path(kernel, monkeypatch):
    """A routing where every token uses every expert (``soft``, ``top_k == num_experts``) sorted into the grouped
    paths' ``[N, d_out]`` rows is a ``[tokens * E, d_out]`` buffer (256 MiB at 4096 tokens, 8 experts, 2048 wide in
    fp32): forced, they compute it on the dense path (the same numbers); a sparse routing stays theirs."""
    taken = []
    for name, path in list(kernels_module._PATHS.items()):
        monkeypatch.setitem(
            kernels_module._PATHS, name, lambda *a, name=name, path=path: taken.append(name) or path(*a)
        )
    torch.manual_seed(5)
    x, A, B = torch.randn(6, 5), torch.randn(4, 5, 2), torch.randn(4, 2, 3)
    logits = torch.randn(6, 4)
    for routing in (make_routing("soft", logits, 5), topk_routing(torch.softmax(logits, -1), 4, logits=logits)):
        taken.clear()
        torch.testing.assert_close(expert_delta(x, A, B, routing, 0.5, kernel), naive_delta(x, A, B, routing, 0.5))
        assert taken == ["dense"]
    if kernel == "grouped":
        taken.clear()
        expert_delta(x, A, B, topk_routing(torch.softmax(logits, -1), 2, logits=logits), 0.5, kernel)
        assert taken == ["grouped"]


def test_grouped_path_keeps_only_rank_activations_for_backward():
    """The grouped path's autograd node keeps the ``[N, r]`` rank activations, not the gathered input rows
    ``[N, d_in]`` nor the expanded rows ``[N, d_out]`` (what autograd over the plain ops kept: twice the memory of
    LoRA's layer)."""
    n_tokens, n_experts, rank, width = 32, 4, 2, 64
    torch.manual_seed(3)
    x = torch.randn(n_tokens, width, requires_grad=True)
    A = torch.randn(n_experts, width, rank, requires_grad=True)
    B = torch.randn(n_experts, rank, width, requires_grad=True)
    logits = torch.randn(n_tokens, n_experts, requires_grad=True)
    routing = make_routing("topk2", logits, 3)
    inputs = {t.untyped_storage().data_ptr() for t in (x, A, B)}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in inputs:
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = grouped_delta(x, A, B, routing, 2.0)
    n_assignments = routing.token_index.numel()
    assert max(saved) <= n_assignments * rank, saved  # nothing [N, d] sized
    out.sum().backward()  # and the backward still runs from what was kept
    assert x.grad is not None and A.grad is not None and B.grad is not None and logits.grad is not None


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_paths_under_autocast(path):
    """In a bf16 autocast region (a trainer's ``bf16=True``) the products run in bf16, as plain ``@`` would, and the
    fp32 leaves get fp32 gradients close to the fp32 computation's."""
    torch.manual_seed(8)
    x, A, B, logits = make_inputs(40, 4, 8, torch.float32, torch.float32, 8)
    upstream = torch.randn(40, D_OUT)
    ref_out, ref_grads = forward_backward("naive", "topk2", x, A, B, logits, upstream, 1.5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = forward_backward(path, "topk2", x, A, B, logits, upstream, 1.5, 8)
    assert out.dtype == torch.bfloat16
    for value, ref in zip((out, *grads), (ref_out, *ref_grads)):
        assert value is out or value.dtype == torch.float32
        # bf16 products: about 3 significant digits, compared over the whole tensor
        assert (value.float() - ref).norm() <= 2e-2 * ref.norm()


@pytest.mark.parametrize("kernel", ["fast", "sgmv", "Dense", "", None])
def test_invalid_kernel_name_raises(kernel):
    torch.manual_seed(0)
    x, A, B = torch.randn(2, 3), torch.randn(2, 3, 1), torch.randn(2, 1, 3)
    routing = topk_routing(torch.softmax(torch.randn(2, 2), -1), 1)
    with pytest.raises(ValueError, match="allowed values") as info:
        expert_delta(x, A, B, routing, 1.0, kernel=kernel)
    message = str(info.value)
    assert repr(kernel) in message
    for choice in KERNEL_CHOICES:
        assert repr(choice) in message
    with pytest.raises(ValueError, match="allowed values"):
        MoLoraConfig(kernel=kernel)


def test_flat_shrink_weight_layout():
    from molora.kernels.torch_ops import flat_shrink_weight

    A = torch.randn(3, 5, 2, requires_grad=True)
    router = torch.randn(4, 5, requires_grad=True)  # more router columns than experts, as AdaMoE's null experts
    flat = flat_shrink_weight(A, router)
    assert flat.shape == (5, 3 * 2 + 4)
    for e in range(3):
        for j in range(2):
            torch.testing.assert_close(flat[:, e * 2 + j], A[e, :, j])
    torch.testing.assert_close(flat[:, 6:], router.t())
    torch.testing.assert_close(flat_shrink_weight(A), flat[:, :6])
    # gradients reach both in their own layouts
    upstream = torch.randn_like(flat)
    (flat * upstream).sum().backward()
    torch.testing.assert_close(A.grad, upstream[:, :6].reshape(5, 3, 2).permute(1, 0, 2))
    torch.testing.assert_close(router.grad, upstream[:, 6:].t())


def test_an_adapter_saved_with_the_triton_path_runs_where_triton_cannot(tmp_path, monkeypatch):
    """``kernel`` is saved with the adapter; one trained with Triton on a GPU raised at every forward on a CPU (and
    ``molora generate`` offered no way out). Every path computes the same delta, so the layer warns once and takes
    ``auto`` there: the same outputs as the adapter on the dense path."""
    from conftest import make_llama
    from peft import PeftModel, get_peft_model

    import molora.adapters.layer as layer_module

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # tests/test_triton_kernels.py turns the interpreter on
    monkeypatch.setattr(layer_module, "_TRITON_FALLBACK_WARNED", set())
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM", kernel="triton")
    get_peft_model(make_llama(), config).save_pretrained(tmp_path)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    with pytest.warns(
        UserWarning, match="kernel='triton' runs on cpu tensors, where Triton cannot run.*kernel='auto'"
    ):
        with torch.no_grad():
            got = loaded(input_ids=ids).logits
    for module in loaded.modules():
        if hasattr(module, "kernel") and isinstance(module.kernel, dict):
            module.kernel["default"] = "dense"
    with torch.no_grad():
        torch.testing.assert_close(got, loaded(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
