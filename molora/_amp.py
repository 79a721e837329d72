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
    The weight's gradient is the plain expression's (fp32, cast to the weight's dtype); a bf16 input's gradient is
    computed in bf16, an fp16 input's in fp32 (a GradScaler-scaled gradient cast to fp16 first could overflow where
    the product does not). Forward-mode AD (``jvp``) and ``torch.func`` transforms work as for the plain expression.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), weight.float())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        with without_autocast(grad.device.type):
            if ctx.needs_input_grad[0]:
                if x.dtype == torch.bfloat16:
                    # as autocast computes a bf16 linear's: the [T, d] result joins the input's bf16 gradient anyway,
                    # and an fp32 product would write twice the bytes and need a casting pass (bf16 has fp32's range)
                    grad_x = grad.to(x.dtype).matmul(weight.to(x.dtype))
                else:
                    grad_x = grad.matmul(weight.float()).to(x.dtype)
            if ctx.needs_input_grad[1]:
                flat_grad = grad.reshape(-1, grad.shape[-1])
                grad_w = flat_grad.t().mm(x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        return grad_x, grad_w

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor | None, weight_tangent: torch.Tensor | None) -> torch.Tensor:
        x, weight = ctx.saved_tensors
        out = None
        if x_tangent is not None:
            out = torch.nn.functional.linear(x_tangent.float(), weight.float())
        if weight_tangent is not None:
            term = torch.nn.functional.linear(x.float(), weight_tangent.float())
            out = term if out is None else out + term
        return out
