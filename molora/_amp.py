"""Autocast helpers: routers compute in fp32 and the fused layer casts its own operands, inside autocast regions too.

Under ``torch.autocast`` (a trainer's ``bf16=True``/``fp16=True``) every ``linear``/``matmul`` runs in the region's
lower precision. MoLoRA keeps two things out of that: the routers, which score and compute their losses in fp32
whatever the model's precision (``molora.routers.base``), and the layer's fused dense path
(``MoLoraLayer._fused_base_forward`` around ``molora.kernels.fused_dense``), which casts its operands to the region's
dtype itself, as autocast would, and must not have autocast recast some of its products and not the in-place ones.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an enabled autocast region on ``device_type`` runs matrix products in; ``None`` outside one."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on ``device_type`` when it is on (else one that does nothing)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``linear(x, weight)`` in fp32, also inside an autocast region (where it would run in bf16/fp16).

    A 16-bit ``x`` that autograd needs is kept for backward as it is, not as its fp32 copy (:class:`_Fp32Linear`):
    saving the upcast input cost every adapted layer of a bf16 model a ``[T, d]`` fp32 tensor (twice the input the
    adapters already keep), 1.4x LoRA's activation memory in a bf16 training step. The same logits and router
    gradients; the input's gradient is computed in its own precision."""
    with without_autocast(x.device.type):
        if x.dtype != torch.float32 and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _Fp32Linear.apply(x, weight)
        return torch.nn.functional.linear(x.float(), weight.float())


class _Fp32Linear(torch.autograd.Function):
    """``linear(x.float(), weight.float())`` whose backward upcasts ``x`` again instead of keeping the fp32 copy.
    The weight's gradient is the plain expression's (fp32, cast to the weight's dtype); the input's is computed in
    the input's 16-bit dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        with without_autocast(grad.device.type):
            if ctx.needs_input_grad[0]:
                # in the input's precision, as autocast would compute it: the [T, d] result joins the input's 16-bit
                # gradient anyway, and an fp32 product would write twice the bytes and need a casting pass
                grad_x = grad.to(x.dtype).matmul(weight.to(x.dtype))
            if ctx.needs_input_grad[1]:
                flat_grad = grad.reshape(-1, grad.shape[-1])
                grad_w = flat_grad.t().mm(x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        return grad_x, grad_w
