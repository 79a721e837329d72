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
#: what the Triton kernels compute in (fp32 accumulation): a float64 bank would silently lose precision there
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    dtypes = {t.dtype for t in (x, A, B)}
    if not dtypes <= set(TRITON_DTYPES):
        raise ValueError(
            "kernel='triton' computes in float32 at most (16-bit or float32 tensors); got "
            f"{sorted(map(str, dtypes))}. Use kernel='dense' or 'grouped' (exact in float64), or 'auto'."
        )
    from .triton_ops import triton_delta

    return triton_delta(x, A, B, routing, scaling)


_PATHS: dict[str, Callable[..., torch.Tensor]] = {
    "dense": dense_masked_delta,
    "grouped": grouped_delta,
    "naive": naive_delta,
    "triton": _triton_delta,
}

# On CUDA, measured on an H200 (bf16, d=4096, 8192-16384 tokens; docs/kernels.md): the dense path's extra FLOPs are
# nearly free and it beat the Triton kernels at every shape up to E*r = 1024 (E=128, r=8: dense 1.9x LoRA(r*k) at
# layer level, Triton 6.2x), so the bank stays dense up to 4096 rank columns (where its FLOPs start to count, see
# scripts/bench_triton.py); other devices (unmeasured) keep 512.
_DENSE_MAX_RANK_COLUMNS = {"cuda": 4096}
_DENSE_MAX_RANK_COLUMNS_DEFAULT = 512
_DENSE_MIN_DENSITY = 0.5

# On a CPU, a cost model fitted to layer forward + backward measurements (docs/kernels.md, "Choosing the path"): per
# unit of width the dense path multiplies T tokens by E*r rank columns; the grouped path multiplies the N assignments
# by r columns, pays for gathering each assignment's row and scattering its output back about as much as for
# _CPU_GATHER_COLUMNS more columns, and a fixed cost per non-empty expert segment (its six small GEMM calls forward and
# backward) worth about _CPU_SEGMENT_MACS multiply-adds. Fitted on one and two threads at d = 256 ... 2048, T = 64 ...
# 512, E = 4 ... 128, k = 1 ... 4, r = 8 ... 64; it also sends decode steps (a few tokens) to the dense path.
_CPU_GATHER_COLUMNS = 48
_CPU_SEGMENT_MACS = 1 << 17
# Under torch.compile the grouped path runs outside the graph (its segment sizes are read on the host), so a model on
# it breaks the graph in every layer: compiled, a CPU bank stays dense up to this many rank columns (one graph).
_COMPILED_DENSE_MAX_RANK_COLUMNS = 1024


def _cpu_path(num_tokens: int, num_assignments: int, num_experts: int, rank: int, width: int | None) -> str:
    dense = num_tokens * num_experts * rank
    grouped = num_assignments * (rank + _CPU_GATHER_COLUMNS)
    if width:
        grouped += min(num_experts, num_assignments) * _CPU_SEGMENT_MACS / width
    return "dense" if dense <= grouped else "grouped"


def choose_kernel(
    num_tokens: int,
    num_assignments: int | None,
    num_experts: int,
    rank: int,
    device: torch.device | str | None = None,
    width: int | None = None,
    dtype: torch.dtype | None = None,
) -> str:
    """The path ``kernel="auto"`` uses for these shapes on ``device`` (``None`` = CPU).

    Args:
        num_tokens (int): rows of the layer input.
        num_assignments (int or None): (token, expert) pairs of the routing; ``None`` means the routing is not known
            yet: ``"dense"`` is returned only when it wins even for one expert per token.
        num_experts (int), rank (int): the bank's ``E`` and ``r``.
        device: where the layer runs.
        width (int or None): the projection's width (mean of ``d_in`` and ``d_out``); on a CPU it weighs the grouped
            path's fixed cost per expert against the GEMMs. ``None`` assumes a wide projection.
        dtype (torch.dtype or None): the experts' compute dtype; the Triton kernels are not chosen for a float64
            one (they compute in fp32). ``None``: not known.

    While ``torch.compile`` traces, a CPU bank of up to 1024 rank columns takes the dense path (one graph).
    """
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type == "cpu":
        if torch.compiler.is_compiling() and num_experts * rank <= _COMPILED_DENSE_MAX_RANK_COLUMNS:
            return "dense"  # the grouped path runs outside the graph: each layer would break it
        assignments = num_tokens if num_assignments is None else num_assignments
        return _cpu_path(num_tokens, assignments, num_experts, rank, width)
    if num_experts * rank <= _DENSE_MAX_RANK_COLUMNS.get(device_type, _DENSE_MAX_RANK_COLUMNS_DEFAULT):
        return "dense"
    if num_assignments is None:
        return "grouped"
    density = num_assignments / max(1, num_tokens * num_experts)
    if density >= _DENSE_MIN_DENSITY:
        return "dense"
    if device_type == "cuda" and triton_available(device) and (dtype is None or dtype in TRITON_DTYPES):
        return "triton"
    return "grouped"


def expert_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: Routing, scaling: float, kernel: str = "auto"
) -> torch.Tensor:
    """Compute ``delta[T, d_out]`` of the expert bank ``A[E, d_in, r]``, ``B[E, r, d_out]`` for ``x[T, d_in]``."""
    if kernel == "auto":
        width = (x.shape[-1] + B.shape[-1]) // 2
        n_assignments = routing.token_index.numel()
        kernel = choose_kernel(x.shape[0], n_assignments, A.shape[0], A.shape[-1], x.device, width, x.dtype)
    try:
        path = _PATHS[kernel]
    except KeyError:
        raise ValueError(f"`kernel`={kernel!r} is not supported; allowed values: {list(KERNEL_CHOICES)}.") from None
    if kernel in ("grouped", "triton") and 0 < x.shape[0] * A.shape[0] <= routing.token_index.numel():
        # every token uses every expert (the soft router, top_k == num_experts): the token-sorted rows of these paths
        # would be a [tokens * E, d_out] buffer; the dense path computes the same without it
        path = _PATHS["dense"]
    return path(x, A, B, routing, scaling)


__all__ = [
    "KERNEL_CHOICES",
    "TRITON_DTYPES",
    "choose_kernel",
    "triton_available",
    "dense_masked_delta",
    "expert_delta",
    "grouped_delta",
    "naive_delta",
]
