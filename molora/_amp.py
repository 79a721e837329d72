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
    """``linear(x, weight)`` in fp32, also inside an autocast region (where it would run in bf16/fp16)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x.float(), weight.float())
    return torch.nn.functional.linear(x.float(), weight.float())
