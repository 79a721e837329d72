"""DR-LoRA on a whole model: saliency updates, growth events, rank statistics, saved adapters and compaction.

See :mod:`molora.adapters.dynamic_rank` for the method and the equations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state import (
    DynamicRankState,
    GrowthSchedule,
    allocate,
    build_dynamic_rank_params,
    resolve_schedule,
    saliency_scores,
)

# -- model-level operations -----------------------------------------------------------------------------------------


#: Containers of DR-LoRA state on a tuner layer: state attribute -> (bank-key suffix, A attribute, B attribute).
#: ``MoLoraLayer`` has one bank per adapter; a LoRA on fused MoE experts has two (gate/up and down projections).
RANK_GROUPS: dict[str, tuple[str, str, str]] = {
    "molora_rank": ("", "molora_A", "molora_B"),
    "molora_rank_gate_up": (".gate_up_proj", "molora_gate_up_A", "molora_gate_up_B"),
    "molora_rank_down": (".down_proj", "molora_down_A", "molora_down_B"),
}


@dataclass
class _Bank:
    key: str
    layer: Any
    adapter: str
    state: DynamicRankState
    a_attr: str
    b_attr: str

    @property
    def A(self) -> torch.Tensor:
        return getattr(self.layer, self.a_attr)[self.adapter].weight

    @property
    def B(self) -> torch.Tensor:
        return getattr(self.layer, self.b_attr)[self.adapter].weight


def dynamic_rank_banks(model: nn.Module, adapter_name: str | None = None) -> list[_Bank]:
    """Every expert bank with DR-LoRA state in ``model`` (a PeftModel, MoLoraModel or plain module), in order."""
    banks = []
    for name, module in model.named_modules():
        for attr, (suffix, a_attr, b_attr) in RANK_GROUPS.items():
            states = getattr(module, attr, None)
            if not isinstance(states, nn.ModuleDict):
                continue
            key = (getattr(module, "_molora_key", "") or name) + suffix
            for adapter, state in states.items():
                if adapter_name is None or adapter == adapter_name:
                    banks.append(_Bank(key, module, adapter, state, a_attr, b_attr))
    return banks


def _by_adapter(model: nn.Module, adapter_name: str | None) -> dict[str, list[_Bank]]:
    out: dict[str, list[_Bank]] = {}
    for bank in dynamic_rank_banks(model, adapter_name):
        out.setdefault(bank.adapter, []).append(bank)
    return out


def _trained_banks(model: nn.Module, adapter_name: str | None) -> dict[str, list[_Bank]]:
    """``adapter_name``'s banks, or (``None``) those of every adapter being trained: whose ``A`` requires gradients
    (PEFT freezes the adapters that are not active). A frozen adapter beside the trained one keeps its ranks."""
    banks = _by_adapter(model, adapter_name)
    if adapter_name is not None:
        return banks
    return {name: group for name, group in banks.items() if any(b.A.requires_grad for b in group)}


def update_importance(model: nn.Module, adapter_name: str | None = None) -> None:
    """Fold the last optimizer step into the saliency signals; call after ``backward()``, before ``step()``.

    Updates every trained bank's routing-frequency EMA (from the routing weights seen since the previous call) and
    its sensitivity EMAs (from the current gradients of ``A`` and ``B``); ``adapter_name=None``: the adapters being
    trained (whose weights require gradients), as in :func:`grow` and :func:`maybe_grow`. The Trainer callback calls
    it from ``on_pre_optimizer_step``; under gradient accumulation this sees the accumulated gradient.
    """
    for banks in _trained_banks(model, adapter_name).values():
        for bank in banks:
            bank.state.update_frequency()
            bank.state.update_importance(bank.A, bank.B)


def _schedule(banks: list[_Bank], total_steps: int | None) -> GrowthSchedule:
    # resolved once per run length and kept on the first bank, so that its warning is not repeated every step
    state = banks[0].state
    key = (total_steps, sum(b.state.num_experts for b in banks))
    cached = getattr(state, "_schedule_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, resolve_schedule(state.params, key[1], total_steps))
        state._schedule_cache = cached
    return cached[1]


def schedule_for(model: nn.Module, adapter_name: str, total_steps: int | None) -> GrowthSchedule:
    """The growth schedule of ``adapter_name`` in ``model`` for a run of ``total_steps`` optimizer steps."""
    banks = _by_adapter(model, adapter_name).get(adapter_name, [])
    if not banks:
        raise ValueError(f"Adapter {adapter_name!r} has no DR-LoRA state; set MoLoraConfig(dynamic_rank={{...}}).")
    return _schedule(banks, total_steps)


def grow(
    model: nn.Module,
    step: int,
    *,
    adapter_name: str | None = None,
    schedule: GrowthSchedule | None = None,
    total_steps: int | None = None,
    optimizer: Any = None,
) -> dict[str, dict[int, int]]:
    """Run one growth event now (whatever the schedule says); return ``{module: {expert: new rank}}`` per growth.

    Uses the schedule's ``experts_per_event`` and ``growth_step`` (resolved from ``total_steps`` when no
    ``schedule`` is given). Components are switched on as described in the module docstring; ``optimizer``
    (a torch optimizer, or a wrapper with ``.optimizer``) gets their moments zeroed. ``adapter_name=None``: every
    adapter being trained (whose weights require gradients).
    """
    grown: dict[str, dict[int, int]] = {}
    several = len(_by_adapter(model, None)) > 1
    for adapter, banks in _trained_banks(model, adapter_name).items():
        sched = schedule or _schedule(banks, total_steps)
        scores = torch.cat(
            saliency_scores([b.state.freq.cpu() for b in banks], [b.state.importance.cpu() for b in banks])
        )
        ranks = torch.cat([b.state.ranks().cpu() for b in banks])
        caps = torch.cat([torch.full((b.state.num_experts,), b.state.r_max) for b in banks])
        new = allocate(scores, ranks, caps, sched.growth_step, sched.experts_per_event, sched.budget)
        offset = 0
        for bank in banks:
            n = bank.state.num_experts
            for e in range(n):
                add = int(new[offset + e] - ranks[offset + e])
                if add > 0:
                    bank.state.activate(e, add, step, bank.A, bank.B, optimizer)
                    key = f"{bank.key}:{adapter}" if several else bank.key
                    grown.setdefault(key, {})[e] = int(new[offset + e])
            offset += n
    return grown


def maybe_grow(
    model: nn.Module,
    step: int,
    total_steps: int | None = None,
    *,
    optimizer: Any = None,
    adapter_name: str | None = None,
) -> dict[str, dict[int, int]]:
    """Grow ranks if optimizer step ``step`` (steps completed) is a growth event; the plain-loop entry point.

    Call once per optimizer step, after ``optimizer.step()``, with ``update_importance(model)`` called between
    ``backward()`` and ``optimizer.step()``::

        loss.backward()
        molora.dynamic_rank.update_importance(model)
        optimizer.step(); optimizer.zero_grad()
        molora.dynamic_rank.maybe_grow(model, step + 1, total_steps, optimizer=optimizer)

    Calling it twice for the same step grows only once. Returns what grew (see :func:`grow`). Without
    ``adapter_name`` it grows the adapters being trained (whose weights require gradients), never a frozen one.
    """
    grown: dict[str, dict[int, int]] = {}
    for adapter, banks in _trained_banks(model, adapter_name).items():
        schedule = _schedule(banks, total_steps)
        if not schedule.is_event(step):
            continue
        if any(int(b.state.activated_at.max()) >= step for b in banks):
            continue  # this event (or a later one, after a rewind) already ran
        grown.update(grow(model, step, adapter_name=adapter, schedule=schedule, optimizer=optimizer))
    return grown


@dataclass
class RankStats:
    """Rank allocation of one expert bank.

    Attributes:
        ranks (list[int]): active rank of each expert now.
        r_max (int): capacity of every expert.
        target_rank (int): average rank the budget allows.
        freq (list[float]): routing-frequency EMA of each expert.
        importance (list[float]): rank importance of each expert.
        history (list[tuple[int, list[int]]]): ``(step, ranks)`` after every step at which this bank grew,
            starting with ``(0, initial ranks)``.
    """

    ranks: list[int]
    r_max: int
    target_rank: int
    freq: list[float]
    importance: list[float]
    history: list[tuple[int, list[int]]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rank_history(activated_at: torch.Tensor) -> list[tuple[int, list[int]]]:
    """``(step, ranks per expert)`` at every step where a component was switched on, from ``activated_at[E, r]``."""
    steps = sorted({int(s) for s in activated_at.flatten().tolist() if s >= 0})
    return [(s, ((activated_at >= 0) & (activated_at <= s)).sum(dim=-1).tolist()) for s in steps]


def get_rank_stats(model: nn.Module, adapter_name: str | None = None) -> dict[str, RankStats]:
    """Rank per expert (now and over time) of every DR-LoRA bank, keyed like ``get_routing_stats``."""
    banks = dynamic_rank_banks(model, adapter_name)
    several = len({b.adapter for b in banks}) > 1 and adapter_name is None
    out = {}
    for b in banks:
        key = f"{b.key}:{b.adapter}" if several else b.key
        out[key] = RankStats(
            ranks=b.state.ranks().tolist(),
            r_max=b.state.r_max,
            target_rank=b.state.params.target_rank,
            freq=b.state.freq.float().tolist(),
            importance=b.state.importance.float().tolist(),
            history=rank_history(b.state.activated_at.cpu()),
        )
    return out


def format_rank_table(stats: dict[str, RankStats]) -> str:
    """A plain-text table of ranks per expert and growth steps per bank (for ``molora inspect`` and logs)."""
    if not stats:
        return "no DR-LoRA rank state"
    total = sum(sum(s.ranks) for s in stats.values())
    budget = sum(len(s.ranks) * s.target_rank for s in stats.values())
    width = max(len(k) for k in stats)
    lines = [
        f"DR-LoRA ranks: total {total} / budget {budget} over {len(stats)} banks",
        f"{'module':<{width}}  r_max  target  ranks per expert  grown at steps",
    ]
    for key, s in stats.items():
        grown = ", ".join(str(step) for step, _ in s.history if step > 0) or "-"
        ranks = " ".join(str(r) for r in s.ranks)
        lines.append(f"{key:<{width}}  {s.r_max:>5}  {s.target_rank:>6}  {ranks:<16}  {grown}")
    return "\n".join(lines)


def rank_summary(model: nn.Module, adapter_name: str | None = None, *, trained_only: bool = False) -> dict[str, float]:
    """Scalars for training logs: total, min, mean and max active rank, and the budget (``dr/...`` keys).

    Over ``adapter_name``'s banks, or every adapter's; ``trained_only=True`` (what the Trainer callback logs) keeps
    the adapters being trained (whose weights require gradients), as :func:`maybe_grow` grows them: a frozen copy
    beside them (a preference trainer's reference adapter) would add a budget nobody spends."""
    if trained_only:
        banks = [bank for group in _trained_banks(model, adapter_name).values() for bank in group]
    else:
        banks = dynamic_rank_banks(model, adapter_name)
    if not banks:
        return {}
    ranks = torch.cat([b.state.ranks().cpu() for b in banks]).float()
    budget = sum(b.state.num_experts * b.state.params.target_rank for b in banks)
    return {
        "dr/total_rank": float(ranks.sum()),
        "dr/budget": float(budget),
        "dr/min_rank": float(ranks.min()),
        "dr/mean_rank": float(ranks.mean()),
        "dr/max_rank": float(ranks.max()),
    }


# -- the saliency EMAs across a resume ----------------------------------------------------------------------------

#: the file :class:`~molora.training.DynamicRankCallback` writes into each Trainer checkpoint
SALIENCY_FILE = "molora_dr_saliency.safetensors"


def saliency_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The element-wise sensitivity EMAs of every bank (not part of the adapter's weights), as CPU tensors keyed
    ``"<adapter>/<module>/<A_ipt|A_unc|B_ipt|B_unc>"``: what a resumed run needs, beside the optimizer state, to take
    the growth decisions the uninterrupted run takes. Empty before the first :func:`update_importance`."""
    out = {}
    for bank in dynamic_rank_banks(model):
        for name, tensor in bank.state._ema.items():
            out[f"{bank.adapter}/{bank.key}/{name}"] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def load_saliency_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Put EMAs from :func:`saliency_state` back into ``model``'s banks; return whether every bank in ``tensors``
    found its place (banks without saved EMAs, e.g. a frozen adapter's, are not expected there).

    A bank whose saved tensors are missing or of another shape (another ``r`` or ``num_experts``) keeps its own
    (they restart from zero at the next :func:`update_importance`)."""
    restored = 0
    for bank in dynamic_rank_banks(model):
        prefix = f"{bank.adapter}/{bank.key}/"
        saved = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        shapes = {"A": tuple(bank.A.shape), "B": tuple(bank.B.shape)}
        if len(saved) != 4 or any(tuple(v.shape) != shapes[k[0]] for k, v in saved.items()):
            continue
        device = bank.state.activated_at.device
        bank.state._ema = {key: value.to(device=device, dtype=torch.float32) for key, value in saved.items()}
        restored += 1
    return restored == len({key.rsplit("/", 1)[0] for key in tensors})  # keys "<adapter>/<module>/<name>"


# -- adapter directories --------------------------------------------------------------------------------------------

_WEIGHTS = "adapter_model.safetensors"
_WEIGHTS_BIN = "adapter_model.bin"  # `save_pretrained(..., safe_serialization=False)`
_CONFIG = "adapter_config.json"


def _read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and the saved tensors of an adapter folder, from either weight file PEFT writes."""
    from peft.utils import load_peft_weights

    if not (adapter_dir / _CONFIG).is_file():
        raise FileNotFoundError(f"{str(adapter_dir)!r} holds no {_CONFIG}: not a saved adapter folder.")
    if not (adapter_dir / _WEIGHTS).is_file() and not (adapter_dir / _WEIGHTS_BIN).is_file():
        raise FileNotFoundError(f"{str(adapter_dir)!r} holds no adapter weights ({_WEIGHTS} or {_WEIGHTS_BIN}).")
    from ...training.models import read_json_object

    config = read_json_object(adapter_dir / _CONFIG)  # (a parse error names the file)
    try:
        tensors = load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors' and torch's errors name no file
        name = _WEIGHTS if (adapter_dir / _WEIGHTS).is_file() else _WEIGHTS_BIN
        raise ValueError(f"Cannot read the adapter weights {str(adapter_dir / name)!r}: {err}") from err
    return config, tensors


def rank_stats_from_adapter(adapter_dir: str | Path) -> dict[str, RankStats]:
    """:class:`RankStats` per module read straight from a saved adapter directory (no model needed)."""
    config, tensors = _read_adapter(Path(adapter_dir))
    params = build_dynamic_rank_params(dict(config.get("dynamic_rank") or {}), config["r"])
    out = {}
    for key, act in tensors.items():
        found = _saved_bank(key)
        if found is None:
            continue
        module_prefix, attr = found
        prefix = f"{module_prefix}.{attr}."
        out[_module_key(module_prefix) + RANK_GROUPS[attr][0]] = RankStats(
            ranks=(act >= 0).sum(dim=-1).tolist(),
            r_max=act.shape[1],
            target_rank=params.target_rank,
            freq=tensors[prefix + "freq"].float().tolist(),
            importance=tensors[prefix + "importance"].float().tolist(),
            history=rank_history(act),
        )
    return out


def _saved_bank(key: str) -> tuple[str, str] | None:
    # "<module>.<rank attr>.activated_at" -> ("<module>", "<rank attr>")
    parts = key.rsplit(".", 2)
    if len(parts) == 3 and parts[2] == "activated_at" and parts[1] in RANK_GROUPS:
        return parts[0], parts[1]
    return None


def _bank_key(tensors: dict[str, torch.Tensor], prefix: str) -> str:
    # a bank is saved as "<module>.molora_A.weight" (as LoRA's "lora_A.weight"); adapters saved while the banks
    # were bare parameters have "<module>.molora_A"
    return f"{prefix}.weight" if f"{prefix}.weight" in tensors else prefix


def _module_key(saved_prefix: str) -> str:
    # saved keys are "base_model.model.<module path>"; PEFT's injection sees "<module path>"
    return saved_prefix.removeprefix("base_model.model.")


def compact_adapter(adapter_dir: str | Path, output_dir: str | Path) -> dict[str, int]:
    """Write a copy of a DR-LoRA adapter whose banks are sliced to the ranks actually used, for inference.

    Stacked banks need one rank per module, so each module keeps ``r_layer = max_e R_e`` components
    (``A[:, :, :r_layer]``, ``B[:, :r_layer, :]``) and its masks; experts below ``r_layer`` stay masked, so the
    outputs equal the masked adapter's. The capacities go to ``dynamic_rank['layer_ranks']`` in the new
    ``adapter_config.json`` so that ``PeftModel.from_pretrained`` builds banks of those shapes. The scaling
    (``lora_alpha / target_rank``) is unchanged. Returns ``{module: r_layer}``.
    """
    from safetensors.torch import save_file

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config, tensors = _read_adapter(adapter_dir)
    if config.get("dynamic_rank") is None:  # ({} is DR-LoRA with the defaults)
        raise ValueError(f"{adapter_dir} is not a DR-LoRA adapter (its config has no `dynamic_rank`).")
    layer_ranks: dict[str, int] = {}
    out = dict(tensors)
    for key, act in tensors.items():
        found = _saved_bank(key)
        if found is None:
            continue
        module_prefix, attr = found
        suffix, a_attr, b_attr = RANK_GROUPS[attr]
        r_layer = max(1, int((act >= 0).sum(dim=-1).max()))
        out[key] = act[:, :r_layer].contiguous()
        a_key, b_key = (_bank_key(tensors, f"{module_prefix}.{attr}") for attr in (a_attr, b_attr))
        out[a_key] = tensors[a_key][:, :, :r_layer].contiguous()
        out[b_key] = tensors[b_key][:, :r_layer, :].contiguous()
        layer_ranks[_module_key(module_prefix) + suffix] = r_layer
    config["dynamic_rank"] = {**config["dynamic_rank"], "layer_ranks": layer_ranks}
    output_dir.mkdir(parents=True, exist_ok=True)
    # every file is written into a staging folder beside the output and moved into place only when all are complete:
    # a failure (also when compacting in place) leaves the folder's previous adapter as it was
    staging = Path(tempfile.mkdtemp(prefix=".compacting-", dir=output_dir))
    try:
        save_file(out, staging / _WEIGHTS, metadata={"format": "pt"})
        (staging / _CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        for extra in adapter_dir.iterdir():
            if extra.name not in (_WEIGHTS, _WEIGHTS_BIN, _CONFIG) and extra.is_file():
                shutil.copyfile(extra, staging / extra.name)
        # the config last, after the weights it describes
        written = sorted(staging.iterdir(), key=lambda p: (p.name == _CONFIG, p.name == _WEIGHTS, p.name))
        # what goes: a `.bin` beside the compacted safetensors would be a second, stale copy; compacting into another
        # adapter's folder, the files it uploads with that adapter (statistics, heat map, card) describe another one
        stale = [output_dir / _WEIGHTS_BIN]
        if output_dir.resolve() != adapter_dir.resolve():
            stale += [p for p in output_dir.iterdir() if not (adapter_dir / p.name).exists() and _pushed(p.name)]
        _move_into_place(written, [p for p in stale if p.is_file()], output_dir, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return layer_ranks


def _pushed(name: str) -> bool:
    """Whether ``molora push`` uploads a file of this name (``molora.hub.PUSH_PATTERNS``)."""
    import fnmatch

    from ...hub import PUSH_PATTERNS

    return any(fnmatch.fnmatch(name, pattern) for pattern in PUSH_PATTERNS)


def _move_into_place(written: list[Path], stale: list[Path], output_dir: Path, staging: Path) -> None:
    """Move the ``written`` files into ``output_dir`` and remove the ``stale`` ones there, as one step as far as the
    process goes: each file replaced or removed is first kept in ``staging``, and put back if anything fails or the
    move is interrupted (``KeyboardInterrupt``), so the folder holds either its previous adapter or the new one."""
    kept = staging / ".previous"
    kept.mkdir()
    done: list[tuple[Path, Path | None]] = []
    try:
        for path in stale:
            done.append((path, kept / path.name))
            os.replace(path, kept / path.name)
        for new in written:
            target = output_dir / new.name
            backup = kept / new.name if target.exists() else None
            done.append((target, backup))
            if backup is not None:
                os.replace(target, backup)
            os.replace(new, target)
    except BaseException:
        for target, backup in reversed(done):
            if backup is not None and backup.exists():
                os.replace(backup, target)
            elif backup is None:
                target.unlink(missing_ok=True)
        raise
