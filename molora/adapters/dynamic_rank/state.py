"""DR-LoRA state and equations: hyper-parameters, the per-bank rank state, saliency, allocation, schedule.

See :mod:`molora.adapters.dynamic_rank` for the method and the equations.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...routers.base import Routing
from ...routers.state import buffers_kept_fp32

FREQ_SOURCES = ("probs", "gates")


@dataclass
class DynamicRankParams:
    """Hyper-parameters of DR-LoRA (``MoLoraConfig.dynamic_rank``); ``None`` entries take the spec's defaults.

    The adapter's ``r`` is the capacity ``r_max`` of every expert.

    Args:
        target_rank (int | None): average rank ``r_target`` per expert once the budget is spent; the budget is
            ``layers * num_experts * target_rank`` and the scaling ``lora_alpha / target_rank``. In
            [init_rank, r]. Default: ``r // 2`` (spec: ``r_max = 2 * r_target``).
        init_rank (int | None): active rank of every expert at the start, in [1, target_rank]. Default:
            ``max(1, target_rank // 2)``.
        growth_step (int | None): rank added to an expert per growth event (``Delta r``); must divide
            ``target_rank - init_rank`` so that the budget is met exactly. Default: ``max(1, target_rank // 4)``
            (reduced to a divisor of ``target_rank - init_rank`` when needed).
        experts_per_event (int | None): experts grown per event, over all layers (``m``). Default: derived from the
            schedule so that the budget is spent by the end step.
        growth_interval (int | None): optimizer steps between growth events (``Delta T``). Default: derived from
            ``experts_per_event`` so that the budget is spent by the end step (about 10 events when neither is set).
        start_fraction (float): first growth event at this fraction of the training steps. Default: 0.1.
        end_fraction (float): no growth after this fraction of the training steps. Default: 0.7.
        start_step (int | None): first growth step, overriding ``start_fraction``. Default: None.
        end_step (int | None): last growth step, overriding ``end_fraction``. Default: None.
        freq_source (str): routing frequency from the router's full probabilities (``"probs"``) or from the
            selected gates (``"gates"``). Default: "probs".
        beta_freq (float): EMA factor of the routing frequency, in [0, 1). Default: 0.9.
        beta1 (float): EMA factor of the sensitivity (AdaLoRA), in [0, 1). Default: 0.85.
        beta2 (float): EMA factor of the sensitivity's uncertainty (AdaLoRA), in [0, 1). Default: 0.85.
        reset_optimizer_state (bool): zero the optimizer moments of newly activated components. Default: True.
        layer_ranks (dict[str, int] | None): per-module capacity written by :func:`compact_adapter`; not meant to
            be set by hand. Default: None.
    """

    target_rank: int | None = None
    init_rank: int | None = None
    growth_step: int | None = None
    experts_per_event: int | None = None
    growth_interval: int | None = None
    start_fraction: float = 0.1
    end_fraction: float = 0.7
    start_step: int | None = None
    end_step: int | None = None
    freq_source: str = "probs"
    beta_freq: float = 0.9
    beta1: float = 0.85
    beta2: float = 0.85
    reset_optimizer_state: bool = True
    layer_ranks: dict[str, int] | None = None


def build_dynamic_rank_params(values: dict[str, Any], r: int) -> DynamicRankParams:
    """Validate ``MoLoraConfig.dynamic_rank`` for capacity ``r`` and return it with every default resolved.

    Raises:
        ValueError: on an unknown key or a bad value, naming the key, the value and what is allowed.
    """
    if not isinstance(values, dict):
        raise ValueError(f"`dynamic_rank` must be a dict or None, got {type(values).__name__}.")
    allowed = [f.name for f in dataclasses.fields(DynamicRankParams)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        hints = [f"{k!r} -> {c[0]!r}?" for k in unknown if (c := difflib.get_close_matches(k, allowed, n=1))]
        hint = f" ({', '.join(hints)})" if hints else ""
        raise ValueError(f"`dynamic_rank` has unknown key(s) {unknown}; allowed keys: {allowed}.{hint}")
    p = DynamicRankParams(**values)

    def need_int(name: str, lo: int, hi: int | None = None, extra: str = "") -> None:
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"`dynamic_rank['{name}']`={v!r} must be an integer {bound}{extra}.")

    if p.target_rank is None:
        p.target_rank = max(1, r // 2)
    need_int("target_rank", 1, r, f" (r={r} is every expert's capacity r_max; raise `r` for a larger budget)")
    if p.init_rank is None:
        p.init_rank = max(1, p.target_rank // 2)
    need_int("init_rank", 1, p.target_rank, f" (target_rank={p.target_rank})")
    gap = p.target_rank - p.init_rank
    if p.growth_step is None:
        p.growth_step = math.gcd(max(1, p.target_rank // 4), gap) if gap else 1
    need_int("growth_step", 1, max(1, r - p.init_rank), f" (r - init_rank = {r - p.init_rank})")
    if gap % p.growth_step:
        raise ValueError(
            f"`dynamic_rank['growth_step']`={p.growth_step} must divide target_rank - init_rank = {gap}, so that "
            "growth ends exactly on the budget; pick a divisor or change init_rank/target_rank."
        )
    for name in ("experts_per_event", "growth_interval"):
        if getattr(p, name) is not None:
            need_int(name, 1)
    for name in ("start_step", "end_step"):
        if getattr(p, name) is not None:
            need_int(name, 0)
    for name in ("start_fraction", "end_fraction"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"`dynamic_rank['{name}']`={v!r} must be a number in [0, 1].")
    if p.start_fraction > p.end_fraction:
        raise ValueError(
            f"`dynamic_rank['start_fraction']`={p.start_fraction} must be <= end_fraction={p.end_fraction}."
        )
    if p.start_step is not None and p.end_step is not None and p.start_step > p.end_step:
        raise ValueError(f"`dynamic_rank['start_step']`={p.start_step} must be <= end_step={p.end_step}.")
    if p.freq_source not in FREQ_SOURCES:
        raise ValueError(
            f"`dynamic_rank['freq_source']`={p.freq_source!r} is not supported; allowed values: {list(FREQ_SOURCES)}."
        )
    for name in ("beta_freq", "beta1", "beta2"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"`dynamic_rank['{name}']`={v!r} must be a number in [0, 1).")
    if not isinstance(p.reset_optimizer_state, bool):
        raise ValueError(f"`dynamic_rank['reset_optimizer_state']`={p.reset_optimizer_state!r} must be a bool.")
    if p.layer_ranks is not None:
        if not isinstance(p.layer_ranks, dict):
            raise ValueError("`dynamic_rank['layer_ranks']` must map module names to ranks (see compact_adapter).")
        for key, v in p.layer_ranks.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"`dynamic_rank['layer_ranks']` keys must be module names (strings), got {key!r} "
                    "(see compact_adapter)."
                )
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= r:
                raise ValueError(f"`dynamic_rank['layer_ranks'][{key!r}]`={v!r} must be an integer in [1, {r}].")
    return p


# -- per-layer state ------------------------------------------------------------------------------------------------


class DynamicRankState(nn.Module):
    """Rank mask, saliency signals and importance EMAs of one expert bank (one adapted projection, one adapter).

    Args:
        num_experts (int): experts ``E`` in the bank.
        r_max (int): rank capacity of every expert (the bank's ``r``).
        params (DynamicRankParams): the resolved DR-LoRA hyper-parameters.
    """

    def __init__(self, num_experts: int, r_max: int, params: DynamicRankParams) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.r_max = r_max
        self.params = params
        init = min(params.init_rank, r_max)
        activated_at = torch.full((num_experts, r_max), -1, dtype=torch.long)
        activated_at[:, :init] = 0
        self.register_buffer("activated_at", activated_at)
        self.register_buffer("freq", torch.full((num_experts,), 1.0 / num_experts))
        self.register_buffer("importance", torch.zeros(num_experts))
        # running sums of the routing weights over the micro-batches of one optimizer step (not saved)
        self.register_buffer("_freq_sum", torch.zeros(num_experts), persistent=False)
        self.register_buffer("_freq_tokens", torch.zeros(()), persistent=False)
        # element-wise sensitivity EMAs, allocated on the first importance update (not saved, see module docstring)
        self._ema: dict[str, torch.Tensor] = {}
        # ((activated_at, its version), columns) of masked_weights' cut
        self._columns_cache: tuple[tuple, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # a copy (deepcopy, pickle, torch.save of the module) starts without the cut: the cached key holds the buffer,
        # which the copy replaces by its own copy with a version counter of its own
        state = dict(super().__getstate__())
        state["_columns_cache"] = None
        return state

    def _apply(self, fn, recurse: bool = True):
        # a half-precision base (PEFT places the state like the base layer's weight, `model.to(torch.float16)`) would
        # round the sensitivities (~1e-12) to 0, stall the frequency EMA in bf16 and overflow the fp16 token count
        with buffers_kept_fp32(self, "freq", "importance", "_freq_sum", "_freq_tokens"):
            super()._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r_max={self.r_max}, ranks={self.ranks().tolist()}"

    def mask(self) -> torch.Tensor:
        """The rank mask ``mu[E, r_max]`` (1 for active components) as a bool tensor."""
        return self.activated_at >= 0

    def ranks(self) -> torch.Tensor:
        """Active rank ``R[E]`` of every expert."""
        return self.mask().sum(dim=-1)

    def masked_weights(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A * mu`` and ``mu * B`` for ``A[E, d_in, r_max]``, ``B[E, r_max, d_out]``; gradients are masked too.

        Cut to the components up to the last one any expert has active (``[E, d_in, r]`` and ``[E, r, d_out]``, ``r``
        <= ``r_max``): the columns past it are zero in every expert, and the compute paths need not multiply them
        (components switch on in index order, so early in training ``r`` is about the initial rank, not the
        capacity). The cut columns get a zero gradient, as masked ones do.

        The cut is read back to the host when ``activated_at`` changed, which its version counter tells: growth,
        loading, an in-place copy (PyTorch's in-place operations, ``load_state_dict``, DDP's buffer broadcast). A write
        through ``activated_at.data`` bypasses the counter (as it bypasses autograd's checks): change the buffer
        itself.
        """
        key = self._mask_key()  # before reading the mask: a change after this is seen at the next call
        mask = self.mask()
        cut = self._active_columns(mask, key)
        if cut < self.r_max:
            A, B, mask = A[:, :, :cut], B[:, :cut, :], mask[:, :cut]
        return A * mask[:, None, :].to(A.dtype), B * mask[:, :, None].to(B.dtype)

    def _mask_key(self) -> tuple | None:
        """``(activated_at, its version)``, or ``None`` where there is no version counter (an inference tensor) or
        under ``torch.compile``. The cache holds the buffer itself (a few integers), not its ``id``: a replaced buffer
        freed and a new one allocated at the same address would look the same."""
        if torch.compiler.is_compiling():
            return None
        buffer = self.activated_at
        try:
            return (buffer, buffer._version)
        except RuntimeError:  # an inference tensor (made under inference_mode) has no version counter
            return None

    def _active_columns(self, mask: torch.Tensor, key: tuple | None) -> int:
        """One past the last component index active in any expert (at least 1) for ``mask``, cached under ``key``
        (:meth:`_mask_key`); the full ``r_max`` under ``torch.compile`` (no host read inside a graph)."""
        if torch.compiler.is_compiling():
            return self.r_max
        cached = self._columns_cache
        if key is not None and cached is not None and cached[0][0] is key[0] and cached[0][1] == key[1]:
            return cached[1]
        used = mask.any(dim=0).nonzero()
        cut = int(used.max()) + 1 if used.numel() else 1
        self._columns_cache = (key, cut) if key is not None else None
        return cut

    def observe(self, routing: Routing, valid: torch.Tensor | None) -> None:
        """Add one forward's routing weights (probabilities or gates, per ``freq_source``) to the step's sums."""
        w = routing.probs if self.params.freq_source == "probs" else routing.dense_gates()
        self.observe_weights(w, valid)

    @torch.no_grad()
    def observe_weights(self, weights: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Add routing weights ``[T, E]`` of one forward to the step's sums; ``valid[T]`` marks non-padding tokens.

        A layer re-run by activation checkpointing does not call it again (``MoLoraRuntime.recomputing``).
        """
        w = weights.detach().float()
        if valid is None:
            self._freq_sum += w.sum(dim=0).to(self._freq_sum.device)
            self._freq_tokens += w.shape[0]
            return
        # a 0/1 row weight rather than indexing by the mask: static shapes, so a compiled forward keeps one graph
        keep = valid.to(device=w.device, dtype=w.dtype)
        self._freq_sum += (keep @ w).to(self._freq_sum.device)
        self._freq_tokens += keep.sum().to(self._freq_tokens.device)

    @torch.no_grad()
    def update_frequency(self) -> None:
        """Fold this step's mean routing weights into the frequency EMA and start a new step."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every data-parallel rank must take the same growth decisions: count the tokens of all ranks
            sums = torch.cat([self._freq_sum, self._freq_tokens.reshape(1)])
            torch.distributed.all_reduce(sums)
            self._freq_sum.copy_(sums[:-1])
            self._freq_tokens.copy_(sums[-1])
        if self._freq_tokens.item() > 0:
            beta = self.params.beta_freq
            mean = self._freq_sum / self._freq_tokens
            self.freq.copy_(ema_frequency(self.freq.float(), mean, beta).to(self.freq.dtype))
        self._freq_sum.zero_()
        self._freq_tokens.zero_()

    @torch.no_grad()
    def update_importance(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Update the sensitivity EMAs from ``A.grad``/``B.grad`` and recompute ``importance[E]``.

        Does nothing for a parameter without a gradient (e.g. frozen, or no backward since the last call), and keeps
        the EMAs of a step whose gradients are not finite (an fp16 loss-scale overflow, whose optimizer step the
        ``GradScaler`` skips): folded in, they would make the importance NaN for the rest of training.
        """
        if A.grad is None or B.grad is None:
            return
        mask = self.mask()
        sums = torch.zeros(self.num_experts, self.r_max, device=mask.device)
        count = 0
        parts = (("A", A, mask[:, None, :], 1), ("B", B, mask[:, :, None], 2))
        sens = {
            name: (param.detach().float() * param.grad.detach().float()).abs() * emask
            for name, param, emask, _ in parts
        }
        # a device-side test, no host synchronisation: the old EMAs are selected where the step is not finite
        finite = torch.isfinite(sens["A"]).all() & torch.isfinite(sens["B"]).all()
        for name, param, emask, dims in parts:
            ipt, unc = self._ema.get(name + "_ipt"), self._ema.get(name + "_unc")
            if ipt is None or ipt.shape != sens[name].shape or ipt.device != sens[name].device:
                ipt, unc = torch.zeros_like(sens[name]), torch.zeros_like(sens[name])
            new_ipt, new_unc, _ = sensitivity_ema(ipt, unc, sens[name], self.params.beta1, self.params.beta2)
            ipt, unc = torch.where(finite, new_ipt, ipt), torch.where(finite, new_unc, unc)
            self._ema[name + "_ipt"], self._ema[name + "_unc"] = ipt, unc
            sums += (ipt * unc * emask).sum(dim=dims)
            count += param.shape[dims]
        sigma = sums / count  # [E, r_max], mean over A[e, :, j] and B[e, j, :]
        active = mask.sum(dim=-1).clamp_min(1)
        self.importance.copy_(((sigma * mask).sum(dim=-1) / active).to(self.importance.dtype))

    @torch.no_grad()
    def activate(
        self, expert: int, count: int, step: int, A: torch.Tensor, B: torch.Tensor, optimizer: Any = None
    ) -> list[int]:
        """Switch on the next ``count`` dormant components of ``expert`` at ``step``; return their indices.

        Each new component gets a fresh kaiming-uniform ``A[expert, :, j]`` and a zero ``B[expert, j, :]``, so
        the bank's output does not change; its importance EMAs and (with ``reset_optimizer_state``) its
        optimizer moments restart at zero.
        """
        dormant = (self.activated_at[expert] < 0).nonzero().flatten()[:count].tolist()
        if not dormant:
            return []
        idx = torch.tensor(dormant, device=A.device)
        bound = 1.0 / math.sqrt(A.shape[1])
        fresh = torch.empty(A.shape[1], len(dormant), device=A.device, dtype=torch.float32).uniform_(-bound, bound)
        # index the expert first: `A[e, :, idx]` would put the index dimension first
        A[expert][:, idx] = fresh.to(A.dtype)
        B[expert][idx, :] = 0
        self.activated_at[expert][idx.to(self.activated_at.device)] = int(step)
        for name, tensor in self._ema.items():
            if name.startswith("A"):
                tensor[expert][:, idx.to(tensor.device)] = 0
            else:
                tensor[expert][idx.to(tensor.device), :] = 0
        if optimizer is not None and self.params.reset_optimizer_state:
            _zero_optimizer_rows(optimizer, A, expert, idx, rank_dim=1)
            _zero_optimizer_rows(optimizer, B, expert, idx, rank_dim=0)
        return dormant


def _zero_optimizer_rows(optimizer: Any, param: torch.Tensor, expert: int, idx: torch.Tensor, rank_dim: int) -> None:
    # accelerate's AcceleratedOptimizer is a torch Optimizer whose `.state` is the wrapped optimizer's
    state = getattr(optimizer, "state", None)
    if not state or param not in state:
        return
    for value in state[param].values():
        # per-element moments (Adam's exp_avg/exp_avg_sq, momentum buffers) have the parameter's shape
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value[expert].index_fill_(rank_dim, idx.to(value.device), 0)


# -- the equations (pure functions, unit-tested against the spec vectors) ------------------------------------------


def ema_frequency(freq: torch.Tensor, batch_mean: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * freq + (1 - beta) * batch_mean`` (spec §5 routing frequency)."""
    return beta * freq + (1.0 - beta) * batch_mean


def sensitivity_ema(
    ipt: torch.Tensor, unc: torch.Tensor, sens: torch.Tensor, beta1: float, beta2: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdaLoRA sensitivity update: returns the new ``(Ibar, Ubar, Ibar * Ubar)`` for ``sens = |theta * g|``."""
    ipt = beta1 * ipt + (1.0 - beta1) * sens
    unc = beta2 * unc + (1.0 - beta2) * (sens - ipt).abs()
    return ipt, unc, ipt * unc


def saliency_scores(freqs: list[torch.Tensor], importances: list[torch.Tensor]) -> list[torch.Tensor]:
    """``S_{l,e} = f~_{l,e} * I~_{l,e}`` for per-layer ``freqs[l][E]`` and ``importances[l][E]``.

    Frequencies are normalised per layer, importances over all layers; when every importance is still zero (no
    gradient seen yet) the importance factor is uniform, so the frequency alone decides. Banks of different sizes
    (molora banks beside an MoE base's experts) have their frequencies scaled by ``E_l / mean_l E_l``, so that an
    expert with an average share of its bank's tokens weighs the same in a bank of 4 as in a bank of 8 (with equal
    bank sizes the factor is 1: the spec's ``f / sum f``).
    """
    total_imp = sum(float(i.double().sum()) for i in importances)
    n_all = sum(i.numel() for i in importances)
    mean_size = n_all / max(len(importances), 1)
    out = []
    for f, imp in zip(freqs, importances):
        f = f.double()
        f_norm = f / f.sum() if float(f.sum()) > 0 else torch.full_like(f, 1.0 / f.numel())
        f_norm = f_norm * (f.numel() / mean_size)
        i_norm = imp.double() / total_imp if total_imp > 0 else torch.full_like(f, 1.0 / n_all)
        out.append(f_norm * i_norm)
    return out


def allocate(
    scores: torch.Tensor, ranks: torch.Tensor, r_max: torch.Tensor | int, growth_step: int, num_grow: int, budget: int
) -> torch.Tensor:
    """One growth event: add ``growth_step`` to the ``num_grow`` highest-``scores`` experts that can still grow.

    An expert can grow while ``ranks + growth_step <= r_max``; growth stops when ``sum(ranks)`` reaches
    ``budget``. Ties go to the lower index. When fewer than ``num_grow`` experts have room (late in the schedule,
    most experts full), the event goes round them again in the same order [OURS]: every event adds ``num_grow``
    steps while room and budget last, so the schedule's ``events x num_grow`` spends the budget (one step per
    expert left it unspent, e.g. 242 of 256 with ``target_rank = r``). Shapes: ``scores[N]``, ``ranks[N]``
    (flattened over layers); returns the new ``ranks[N]``.
    """
    ranks = ranks.clone()
    cap = torch.as_tensor(r_max, device=ranks.device).expand_as(ranks)
    order = torch.argsort(-scores.double(), stable=True).tolist()
    left = num_grow
    grew = True
    while left > 0 and grew:
        grew = False
        for i in order:
            if left == 0 or int(ranks.sum()) + growth_step > budget:
                return ranks
            if int(ranks[i]) + growth_step <= int(cap[i]):
                ranks[i] += growth_step
                left -= 1
                grew = True
    return ranks


@dataclass
class GrowthSchedule:
    """The resolved growth schedule of one adapter.

    Attributes:
        start (int): first optimizer step with a growth event (>= 1).
        end (int): last optimizer step that may grow.
        interval (int): steps between events.
        experts_per_event (int): experts grown per event, over all layers.
        growth_step (int): rank added per grown expert.
        budget (int): total rank of all experts when growth is done.
    """

    start: int
    end: int
    interval: int
    experts_per_event: int
    growth_step: int
    budget: int

    def is_event(self, step: int) -> bool:
        """True when ``step`` (optimizer steps completed) is a growth event."""
        return self.start <= step <= self.end and (step - self.start) % self.interval == 0

    @property
    def num_events(self) -> int:
        return (self.end - self.start) // self.interval + 1


def resolve_schedule(params: DynamicRankParams, num_experts_total: int, total_steps: int | None) -> GrowthSchedule:
    """Turn the configured schedule into steps for ``num_experts_total`` experts and ``total_steps`` steps.

    Raises:
        ValueError: if fractions are used and ``total_steps`` is unknown, or the start lies after the end.
    """
    if (params.start_step is None or params.end_step is None) and not total_steps:
        raise ValueError(
            "The DR-LoRA schedule is given as fractions of training (`start_fraction`/`end_fraction`), so the total "
            "number of optimizer steps is needed: pass `total_steps=` (the Trainer callback uses max_steps), or set "
            "`dynamic_rank['start_step']` and `['end_step']`."
        )
    start = params.start_step if params.start_step is not None else int(params.start_fraction * total_steps)
    end = params.end_step if params.end_step is not None else int(params.end_fraction * total_steps)
    start = max(1, start)  # step 0 never ends (on_step_end first sees step 1)
    if end < start and params.start_step is None and params.end_step is None:
        # a window of fractions narrower than a step (a short run: int(0.7 * 1) = 0): one event, at its start
        end = start
    if end < start:

        def given(name: str, value: Any) -> str:
            step = getattr(params, f"{name}_step")
            return f"{name}_step={step}" if step is not None else f"{name}_fraction={value} of {total_steps} steps"

        raise ValueError(
            f"DR-LoRA growth would start at step {start} ({given('start', params.start_fraction)}) but end at step "
            f"{end} ({given('end', params.end_fraction)}): give both ends as steps (`dynamic_rank['start_step']` <= "
            "`['end_step']`) or both as fractions of the run (`start_fraction` <= `end_fraction`, in [0, 1])."
        )
    budget = num_experts_total * params.target_rank
    units = num_experts_total * (params.target_rank - params.init_rank) // params.growth_step
    span = end - start
    m, interval = params.experts_per_event, params.growth_interval
    if interval is None and m is None:
        interval = max(1, span // 10)
    if interval is None:
        events = max(1, math.ceil(units / m))
        interval = max(1, span // max(1, events - 1)) if events > 1 else max(1, span + 1)
    if m is None:
        m = max(1, math.ceil(units / (span // interval + 1)))
    schedule = GrowthSchedule(start, end, interval, m, params.growth_step, budget)
    if units and schedule.num_events * m < units:
        warnings.warn(
            f"DR-LoRA will stop at step {end} before spending its rank budget: {schedule.num_events} events x {m} "
            f"experts x {params.growth_step} rank < {units * params.growth_step} to grow. Raise "
            "`experts_per_event`, lower `growth_interval` or widen the start/end window.",
            stacklevel=2,
        )
    elif units and total_steps and end > total_steps:
        # an explicit end_step beyond the run: the events after its last step never come
        held = 0 if start > total_steps else (total_steps - start) // interval + 1
        if held * m < units:
            warnings.warn(
                f"DR-LoRA's growth window ends at step {end}, after the run's last optimizer step {total_steps}: "
                f"{held} of its {schedule.num_events} growth events happen, so the experts stop short of the rank "
                f"budget (an average rank below target_rank={params.target_rank}). Set `dynamic_rank['end_step']` "
                "(and `start_step`) within the run, or use `end_fraction`.",
                stacklevel=2,
            )
    return schedule
