"""The Triton SGMV kernels (``kernel="triton"``) against the naive per-expert reference.

On a CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set here before molora first imports the
kernels), in fp32 with small shapes; on CUDA (when present) the same cases run compiled, plus bf16 forward.
Covers outputs and the gradients with respect to ``x``, ``A``, ``B`` and the router logits for top-1, top-2, soft
and sparse routings (empty experts, tokens without any expert), single tokens, widths that are not multiples of the
kernel blocks, and a routing without assignments. Skipped when ``triton`` is not installed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    # conftest.py sets this already; triton reads it when it is imported and when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from test_kernels import forward_backward, make_inputs  # noqa: E402

from molora import Routing  # noqa: E402
from molora.kernels import expert_delta, triton_available  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
pytestmark = pytest.mark.skipif(not triton_available(DEVICES[0]), reason="triton cannot run here")


def _to(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "n_tokens, n_experts, rank, kind",
    [
        (1, 4, 8, "topk2"),  # single token
        (7, 4, 3, "topk2"),
        (33, 8, 8, "topk1"),
        (9, 3, 5, "soft"),
        (21, 6, 4, "sparse"),  # empty experts and tokens without any expert
        (40, 2, 1, "topk1"),  # segments longer than one block of rows
    ],
)
def test_triton_matches_naive(device, n_tokens, n_experts, rank, kind, monkeypatch):
    import test_kernels

    seed = 31 * n_tokens + n_experts
    x, A, B, logits = _to(device, *make_inputs(n_tokens, n_experts, rank, torch.float32, torch.float32, seed))
    upstream = torch.randn(n_tokens, test_kernels.D_OUT, device=device)
    monkeypatch.setitem(test_kernels.PATHS, "triton", lambda *a: expert_delta(*a, kernel="triton"))
    ref_out, ref_grads = forward_backward("naive", kind, x, A, B, logits, upstream, 1.5, seed)
    out, grads = forward_backward("triton", kind, x, A, B, logits, upstream, 1.5, seed)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, grad, ref in zip(("x", "A", "B", "logits"), grads, ref_grads):
        assert grad is not None, name
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_without_assignments(device):
    leaves = _to(device, torch.randn(4, 5), torch.randn(3, 5, 2), torch.randn(3, 2, 6))
    x, A, B = (t.requires_grad_(True) for t in leaves)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    routing = Routing(
        probs=torch.full((4, 3), 1 / 3, device=device),
        token_index=empty,
        expert_index=empty,
        weight=torch.zeros(0, device=device),
    )
    out = expert_delta(x, A, B, routing, 2.0, kernel="triton")
    assert torch.equal(out, torch.zeros(4, 6, device=device))
    out.sum().backward()
    for leaf in (A, B):
        assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels are checked on CUDA only")
def test_triton_bf16_forward_on_cuda():
    x, A, B, logits = _to("cuda", *make_inputs(64, 8, 8, torch.bfloat16, torch.float32, 3))
    from molora.routers import topk_routing

    routing = topk_routing(torch.softmax(logits, -1), 2, logits=logits)
    ref = expert_delta(x.double(), A.double(), B.double(), routing, 2.0, kernel="naive")
    out = expert_delta(x, A, B, routing, 2.0, kernel="triton")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels are checked on CUDA only")
@pytest.mark.parametrize("n_tokens, n_experts, rank", [(300, 8, 8), (77, 4, 16), (5, 16, 4)])
def test_triton_bf16_gradients_on_cuda(n_tokens, n_experts, rank, monkeypatch):
    """bf16 inputs take the tensor-core products (fp32 accumulation); all gradients stay near the fp64 reference."""
    import test_kernels

    monkeypatch.setitem(test_kernels.PATHS, "triton", lambda *a: expert_delta(*a, kernel="triton"))
    x, A, B, logits = _to("cuda", *make_inputs(n_tokens, n_experts, rank, torch.bfloat16, torch.float32, 5))
    upstream = torch.randn(n_tokens, test_kernels.D_OUT, device="cuda", dtype=torch.bfloat16)
    ref_out, ref_grads = forward_backward(
        "naive", "topk2", x.double(), A.double(), B.double(), logits.double(), upstream.double(), 1.5, 5
    )
    out, grads = forward_backward("triton", "topk2", x, A, B, logits, upstream, 1.5, 5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_out, atol=5e-2, rtol=5e-2)
    for name, grad, ref in zip(("x", "A", "B", "logits"), grads, ref_grads):
        scale = ref.abs().max().clamp_min(1e-6)
        err = (grad.double() - ref).abs().max() / scale
        assert err < 3e-2, f"d/d{name}: max error {err:.3g} of the largest entry"


@pytest.mark.parametrize("device", DEVICES)
def test_token_major_routings_take_the_atomic_free_expand(device, monkeypatch):
    """Top-k routings (``per_token`` set) store rows once and sum per token; sparse ones add atomically."""
    import test_kernels

    from molora.kernels import triton_ops

    seen = []
    original = triton_ops._scatter_rows

    def spy(*args):
        seen.append(args[7])  # per_token
        return original(*args)

    monkeypatch.setattr(triton_ops, "_scatter_rows", spy)
    monkeypatch.setitem(test_kernels.PATHS, "triton", lambda *a: expert_delta(*a, kernel="triton"))
    x, A, B, logits = _to(device, *make_inputs(9, 4, 3, torch.float32, torch.float32, 2))
    upstream = torch.randn(9, test_kernels.D_OUT, device=device)
    for kind, expected in (("topk2", 2), ("sparse", 0)):
        seen.clear()
        ref_out, ref_grads = forward_backward("naive", kind, x, A, B, logits, upstream, 1.0, 2)
        out, grads = forward_backward("triton", kind, x, A, B, logits, upstream, 1.0, 2)
        assert seen == [expected, expected]  # forward expand and backward input gradient
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        for grad, ref in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)


def test_float64_never_takes_the_triton_kernels(monkeypatch):
    """The kernels compute in fp32: ``expert_delta(kernel="triton")`` on float64 tensors returned a float64 result
    about 1e-6 off (the torch paths: 1e-15), and ``auto`` picked Triton on CUDA for large sparse banks. Now a direct
    call says so, ``auto`` keeps float64 on the torch paths, and an adapter saved with ``kernel="triton"`` computes a
    float64 bank on ``auto`` (warning once), exactly as the dense path does."""
    from conftest import make_llama
    from peft import get_peft_model

    import molora.adapters.layer as layer_module
    from molora import MoLoraConfig
    from molora.kernels import choose_kernel

    x, A, B, logits = make_inputs(6, 4, 3, torch.float64, torch.float64, 0)
    routing = Routing(
        probs=torch.softmax(logits, -1).float(),
        token_index=torch.arange(6),
        expert_index=torch.tensor([0, 1, 2, 3, 0, 1]),
        weight=torch.rand(6, dtype=torch.float64),
    )
    with pytest.raises(ValueError, match=r"'triton' computes in float32 at most.*float64.*'dense' or 'grouped'"):
        expert_delta(x, A, B, routing, 1.0, kernel="triton")
    # a sparse bank of 8192 rank columns: Triton on CUDA, unless float64
    assert choose_kernel(512, 1024, 64, 128, "cuda", 2048, torch.float32) == "triton"
    assert choose_kernel(512, 1024, 64, 128, "cuda", 2048, torch.float64) == "grouped"
    assert choose_kernel(512, 1024, 64, 128, "cuda", 2048) == "triton"

    monkeypatch.setattr(layer_module, "_TRITON_FALLBACK_WARNED", set())
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, kernel="triton")
    model = get_peft_model(make_llama().double(), config)
    assert model.base_model.model.model.layers[0].mlp.down_proj.molora_A["default"].weight.dtype == torch.float64
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="kernel='triton' has a torch.float64 bank.*kernel='auto'"):
        got = model(input_ids=ids).logits
    for module in model.modules():
        if isinstance(getattr(module, "kernel", None), dict):
            module.kernel["default"] = "dense"
    torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=1e-12, atol=1e-12)
