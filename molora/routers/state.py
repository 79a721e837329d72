"""Helpers for routers whose state changes once per optimizer step (loss-free bias, ReMoE's adaptive lambda).

Such a router observes something in every training forward (expert loads, active gates), sums it over all the
micro-batches of one optimizer step, reduces the sum over data-parallel ranks, and updates a persistent buffer in
:meth:`~molora.routers.Router.on_optimizer_step_group`, which ``MoLoraModel.molora_on_optimizer_step()`` (and the
``MoLoraCallback`` of :mod:`molora.training`) calls after every ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

# forwards without an optimizer-step update after which a stateful router says that nobody is updating it
_UNUPDATED_FORWARDS_WARNING = 1000
_warned_unupdated = False

# accumulators given a value inside a torch.compile'd forward, waiting for the runtime's (eager) end of that forward
_STAGED: list[StepAccumulator] = []


def exporting() -> bool:
    """Whether ``torch.export`` is tracing the current call (torch >= 2.5 tells; earlier versions: False). Its tensors
    are fake and nothing replays Python side effects after it (as Dynamo does for ``torch.compile``): per-step state,
    routing statistics and aux losses must not take anything from it."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


@contextlib.contextmanager
def buffers_kept_fp32(module: torch.nn.Module, *names: str) -> Iterator[None]:
    """Around ``super()._apply(fn)`` in a module's ``_apply``: the named fp32 buffers follow a device move but keep
    their dtype *and values*.

    ``model.to(torch.bfloat16)`` / ``.half()``, and PEFT placing an adapter on a half-precision base layer, cast every
    floating buffer, and per-step statistics (small EMA updates, token counts past 65504, an L1 coefficient of 1e-8)
    do not survive bf16/fp16: the values from before the cast are put back, on the new device."""
    before = {name: getattr(module, name) for name in names}
    yield
    for name, old in before.items():
        new = getattr(module, name)
        if old is None or new is None or new.dtype == old.dtype or not old.is_floating_point():
            continue
        setattr(module, name, new.to(old.dtype) if old.is_meta else old.to(new.device))


class StepAccumulator:
    """Sums one tensor per model forward until the next optimizer step.

    Observations that arrive under the same ``forward_id`` (``RoutingContext.forward_id``) *replace* each other:
    activation checkpointing re-runs a layer's forward during backward, and the recomputed routing must not be
    counted twice. Observations without an id (a router called on its own) always add up.

    Deliberately a plain object rather than a module buffer: DDP broadcasts every buffer from rank 0 before each
    forward (``broadcast_buffers=True``, the default), which would overwrite each rank's own counts before they
    are all-reduced.
    """

    def __init__(self) -> None:
        self._total: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._pending_id: int | None = None
        self._forwards = 0
        self._staged: torch.Tensor | None = None

    def add(self, value: torch.Tensor, forward_id: int | None = None) -> None:
        """Record ``value`` (detached) for the forward ``forward_id``.

        Inside a ``torch.compile``'d forward the value is only staged, without reading any of this object's state
        (compiled code guards on the Python values it reads, and the forward id and the counters change every
        forward: every step would recompile); :func:`commit_staged`, which the model's runtime calls eagerly at
        the end of the forward, records it with that forward's id.
        """
        value = value.detach()
        if torch.compiler.is_compiling():
            self._staged = value
            _STAGED.append(self)
            return
        if forward_id is not None and forward_id == self._pending_id:
            self._pending = value
            return
        self._commit()
        self._pending = value
        self._pending_id = forward_id
        self._forwards += 1
        if self._forwards == _UNUPDATED_FORWARDS_WARNING:
            _warn_unupdated()

    def _commit(self) -> None:
        if self._pending is None:
            return
        pending = self._pending
        if self._total is None:
            self._total = pending.clone()
        else:
            self._total = self._total + pending.to(self._total.device)
        self._pending = None
        self._pending_id = None

    def pop(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Return the sum since the last ``pop`` (zeros of ``shape`` if nothing was recorded) and start over."""
        self._commit()
        total = self._total
        self._total = None
        self._forwards = 0
        if total is None:
            return torch.zeros(shape, dtype=torch.float32, device=device)
        return total.to(device=device, dtype=torch.float32)


def commit_staged(forward_id: int | None) -> None:
    """Record what compiled code staged (see :meth:`StepAccumulator.add`) for the forward ``forward_id``."""
    while _STAGED:
        accumulator = _STAGED.pop(0)
        staged, accumulator._staged = accumulator._staged, None
        if staged is not None:
            accumulator.add(staged, forward_id)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks when ``torch.distributed`` is initialised; return it.

    Every rank must call this the same number of times in the same order (the model-level hook visits routers in
    module order on every rank, and calls it even when a rank saw no token).
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def pop_stacked(accumulators: list[StepAccumulator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Pop several accumulators into one ``[R, *shape]`` tensor on ``device``, summed over ranks in one call."""
    stacked = torch.stack([acc.pop(shape, device) for acc in accumulators])
    return all_reduce_sum(stacked)


def _warn_unupdated() -> None:
    global _warned_unupdated
    if _warned_unupdated:
        return
    _warned_unupdated = True
    warnings.warn(
        f"A stateful router (e.g. 'topk_bias', 'relu') has seen {_UNUPDATED_FORWARDS_WARNING} training forwards "
        "without an optimizer-step update, so its balancing state is not moving. Add "
        "molora.training.MoLoraCallback() to the Trainer's callbacks, or call model.molora_on_optimizer_step() "
        "after optimizer.step() in a custom loop.",
        stacklevel=3,
    )
