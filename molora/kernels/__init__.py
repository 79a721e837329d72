"""Compute paths for a bank of LoRA experts, all with one signature: ``(x, A, B, routing, scaling) -> delta``.

``"dense"`` (dense-masked), ``"grouped"`` and ``"naive"`` (the reference) are pure torch; ``"triton"`` runs the
SGMV-style kernels of :mod:`molora.kernels.triton_ops` (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``"auto"``
picks one from the shapes and the device. See :mod:`molora.kernels.torch_ops` for the semantics.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from ..routers.base import Routing
from .torch_ops import dense_masked_delta, grouped_delta, naive_delta

KERNEL_CHOICES = ("auto", "dense", "grouped", "naive", "triton")


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether ``kernel="triton"`` can run on ``device``: triton installed, and CUDA or ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device is not None and torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_delta(x, A, B, routing, scaling):
    if not triton_available(x.device):
        raise RuntimeError(
            "kernel='triton' needs the `triton` package and CUDA tensors (or TRITON_INTERPRET=1 set before molora "
            f"first uses the kernel, for CPU tests); got tensors on {x.device}. Use kernel='auto' or 'dense'."
        )
    from .triton_ops import triton_delta

    return triton_delta(x, A, B, routing, scaling)


_PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "dense": dense_masked_delta,
    "grouped": grouped_delta,
    "naive": naive_delta,
    "triton": _triton_delta,
}

# The dense path multiplies every token by all E*r rank columns; the grouped path only by the k*r it needs but pays
# for a gather, a scatter and a few small GEMMs per expert (forward and backward). Measured on a CPU at d=2048,
# T=512 (docs/kernels.md): dense wins or ties at every shape up to E*r = 1024 (E=128, r=8: dense 2.6x LoRA(r*k),
# grouped 6.4x; E=8 and E=16 with r=64: ties), so on a CPU the grouped path is only chosen beyond that,
# for sparse routing over at most 32 experts (its cost per expert segment grows with E). On an H200 (bf16, d=4096,
# 8192-16384 tokens; docs/kernels.md) the dense path's extra FLOPs are nearly free and it beat the Triton kernels at
# every shape up to E*r = 1024 (E=128, r=8: dense 1.9x LoRA(r*k) at layer level, Triton 6.2x), so on CUDA the bank
# stays dense up to 4096 rank columns (where its FLOPs start to count, see scripts/bench_triton.py).
_DENSE_MAX_RANK_COLUMNS = {"cpu": 1024, "cuda": 4096}
_DENSE_MAX_RANK_COLUMNS_DEFAULT = 512
_DENSE_MIN_DENSITY = 0.5
_GROUPED_MAX_EXPERTS_CPU = 32


def choose_kernel(
    num_tokens: int,
    num_assignments: int | None,
    num_experts: int,
    rank: int,
    device: torch.device | str | None = None,
) -> str:
    """The path ``kernel="auto"`` uses for these shapes on ``device`` (``None`` = CPU).

    ``num_assignments=None`` means the routing is not known yet: ``"dense"`` is returned only when it wins
    whatever the routing.
    """
    device_type = torch.device(device).type if device is not None else "cpu"
    if num_experts * rank <= _DENSE_MAX_RANK_COLUMNS.get(device_type, _DENSE_MAX_RANK_COLUMNS_DEFAULT):
        return "dense"
    if num_assignments is None:
        return "grouped"
    density = num_assignments / max(1, num_tokens * num_experts)
    if density >= _DENSE_MIN_DENSITY:
        return "dense"
    if device_type == "cuda" and triton_available(device):
        return "triton"
    if device_type == "cpu" and num_experts > _GROUPED_MAX_EXPERTS_CPU:
        return "dense"
    return "grouped"


def expert_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float, kernel: str = "auto"
) -> torch.Tensor:
    """Compute ``delta[T, d_out]`` of the expert bank ``A[E, d_in, r]``, ``B[E, r, d_out]`` for ``x[T, d_in]``."""
    if kernel == "auto":
        kernel = choose_kernel(x.shape[0], routing.token_index.numel(), A.shape[0], A.shape[-1], x.device)
    try:
        path = _PATHS[kernel]
    except KeyError:
        raise ValueError(f"`kernel`={kernel!r} is not supported; allowed values: {list(KERNEL_CHOICES)}.") from None
    return path(x, A, B, routing, scaling)


__all__ = [
    "KERNEL_CHOICES",
    "choose_kernel",
    "triton_available",
    "dense_masked_delta",
    "expert_delta",
    "grouped_delta",
    "naive_delta",
]
