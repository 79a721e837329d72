"""``RoutingStatsCallback``: routing statistics and auxiliary losses in the trainer's logs (TensorBoard, W&B, ...).

At every logging step the callback reads the routing statistics accumulated since the previous log (the difference
from what it read then: the model's statistics are left to accumulate, so that after ``trainer.train()``
``model.get_routing_stats()`` describes the training run), reduces them across processes when ``torch.distributed``
is initialised, and adds to the trainer's logs:

* ``molora/aux_<name>``: each unweighted auxiliary loss (``balance``, ``z``, ...) averaged over the optimizer steps
  of the window (the value of each step's last micro-batch, reduced over routers as configured);
* ``molora/router_entropy``: the mean over adapted layers of the normalised router entropy (1 = uniform router);
* ``molora/load_violation`` and ``molora/load_violation_max``: the mean and the worst over layers of
  ``(max_e load_e - 1/E) / (1/E)`` (0 = perfectly balanced experts);
* ``molora/experts_per_token``: the mean number of experts a token used.

It also writes the per-layer statistics of the whole run to ``routing_stats.json`` in the output folder and in
every checkpoint (``molora inspect`` draws its heat map from that file), and appends each window's per-layer loads
to ``routing_stats_history.jsonl``.

Reduction across processes sums the raw per-layer totals (tokens, assignments, gate and probability mass, entropy
sum) of every rank, so the logged numbers are those of the global batch, not of rank 0's shard. The raw totals are
rebuilt from :class:`~molora.runtime.LayerRoutingStats` (``load * experts_per_token * tokens`` is the assignment
count, the means times ``tokens`` are the masses), which keeps the callback on molora's public API.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .._io import write_atomic
from ..runtime import summarize_row
from .callbacks import resume_folders

STATS_FILE = "routing_stats.json"
HISTORY_FILE = "routing_stats_history.jsonl"


def stats_to_raw(stats) -> torch.Tensor:
    """Raw sums ``[tokens, entropy_sum, assignments[E], gate_mass[E], prob_mass[E]]`` of one layer's statistics.

    ``stats`` is a :class:`~molora.runtime.LayerRoutingStats` or its ``to_dict()`` (as in ``routing_stats.json``).
    """
    get = stats.get if isinstance(stats, dict) else lambda key: getattr(stats, key)
    tokens = float(get("tokens"))
    assignments = [x * get("experts_per_token") * tokens for x in get("load")]
    return torch.tensor(
        [tokens, get("entropy") * tokens, *assignments, *(g * tokens for g in get("gate_mass"))]
        + [p * tokens for p in get("prob_mass")],
        dtype=torch.float64,
    )


def raw_to_summary(raw: torch.Tensor) -> dict[str, Any]:
    """Per-layer summary (the fields of ``LayerRoutingStats``) from :func:`stats_to_raw` sums."""
    return summarize_row(raw).to_dict()


def _all_reduce(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum the raw totals of every process (same layer names on every rank: one flat all_reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return raw
    if torch.distributed.get_world_size() == 1 or not raw:
        return raw
    names = sorted(raw)
    flat = torch.cat([raw[n] for n in names])
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    torch.distributed.all_reduce(flat)
    flat = flat.cpu()
    out, start = {}, 0
    for n in names:
        size = raw[n].numel()
        out[n] = flat[start : start + size]
        start += size
    return out


def _is_main(state) -> bool:
    return bool(getattr(state, "is_world_process_zero", True))


class RoutingStatsCallback(TrainerCallback):
    """Adds MoLoRA routing statistics and auxiliary losses to the logs of a ``transformers``/TRL trainer.

    The callback must run before the reporting callbacks (TensorBoard, ...) to add to what they see: install it
    with :func:`install_routing_stats_callback` (or ``trainer.callback_handler.callbacks.insert(0, callback)``).
    ``trainer.add_callback`` appends it after them; the values then still reach ``trainer.state.log_history`` and
    the ``routing_stats`` files, but not the loggers.

    Args:
        per_layer_file (bool): append each window's per-layer statistics to ``routing_stats_history.jsonl``.
    """

    def __init__(self, per_layer_file: bool = True) -> None:
        self.per_layer_file = per_layer_file
        self._aux_sums: dict[str, float] = {}
        self._aux_steps = 0
        self._totals: dict[str, torch.Tensor] = {}
        # training statistics folded out of the model (at a checkpoint save, ...) but not yet logged: the next
        # window starts with them
        self._held: dict[str, torch.Tensor] = {}
        # the model's statistics (raw sums per layer) when they were last folded into `_held`, and its reset count
        # then (MoLoraRuntime.stats_resets)
        self._folded: dict[str, torch.Tensor] = {}
        self._folded_resets: int | None = None
        # the model's statistics at the end of the last optimizer step: an evaluation after it (predicted or not:
        # transformers also evaluates at the last step, user code may call evaluate()) is rolled back to it
        self._step_mark: Any = None
        self._step_mark_resets: int | None = None
        # between on_train_begin and on_train_end: an evaluation outside training (`trainer.evaluate()` after
        # `train()`) keeps its statistics
        self._training = False
        # the history file's lines up to this step belong to the run (a resumed one); later ones and those of an
        # earlier run in the same folder are dropped at the first write
        self._history_kept_step: int | None = None
        # where this run appends its windows (a new run in a folder holding an earlier run's history: beside it,
        # until the run ends)
        self._history_path: Path | None = None
        self._resume_dir: Path | None = None
        # `molora sft` writes the run's files itself, after the adapter they describe is saved
        # (:meth:`write_run_files`): a final save that fails leaves the folder's earlier statistics with its adapter
        self.defer_run_files = False
        self._run_files: tuple[Path, dict[str, dict[str, Any]]] | None = None

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Continue the run-level statistics of this checkpoint folder (its ``routing_stats.json``) when training
        resumes (``molora sft`` calls it). Without it the callback looks in ``args.resume_from_checkpoint`` (when a
        path) and in ``<output_dir>/checkpoint-<step>``, the folder a ``Trainer`` writes at the resumed step."""
        self._resume_dir = Path(checkpoint)

    def _resume_totals(self, args, state, model) -> None:
        folders = resume_folders(self._resume_dir, args, state)
        for folder in folders:
            path = folder / STATS_FILE
            if path.is_file():
                self._totals = {name: stats_to_raw(s) for name, s in json.loads(path.read_text()).items()}
                return
        if _tracks_routing_stats(model):
            warnings.warn(
                f"Resuming training at step {state.global_step} without the routing statistics of the steps before "
                f"it: no {STATS_FILE} in {[str(f) for f in folders]}, so {STATS_FILE} will describe the resumed "
                "steps only. RoutingStatsCallback writes that file into each checkpoint; point it at the folder you "
                "resume from with `callback.resume_from(folder)` (or keep the run's `output_dir`).",
                stacklevel=2,
            )

    # -- collection -------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._history_kept_step = state.global_step  # 0, or the checkpoint's step when resuming
        self._history_path = None
        # the run-level totals: those of the checkpoint the Trainer resumes from, or none for a new run; nothing of
        # an earlier run of this callback object (its unlogged tail, its aux-loss sums) carries over
        self._totals, self._held, self._folded, self._aux_sums, self._aux_steps = {}, {}, {}, {}, 0
        self._folded_resets = None
        if state.global_step > 0:
            self._resume_totals(args, state, model)
        self._training = True
        if model is not None and hasattr(model, "reset_routing_stats"):
            model.reset_routing_stats()  # drop statistics of evaluations run before training
        runtime = getattr(model, "molora_runtime", None) if model is not None else None
        if runtime is not None:
            # only the training forwards count: not the train-mode forwards without autograd inside a step, such as
            # GRPO's sampling `generate` or a reference pass (evaluations are rolled back, see on_evaluate)
            runtime.stats_grad_only = True
        self._mark(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # the step's training forward's losses: its last forward may be a reference model's (TRL's DPO, KTO)
        runtime = getattr(model, "molora_runtime", None) if model is not None else None
        losses = runtime.training_aux_losses() if runtime is not None else {}
        for name, value in losses.items():
            self._aux_sums[name] = self._aux_sums.get(name, 0.0) + float(value.detach().float())
        self._aux_steps += 1
        self._mark(model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # the evaluation's forwards are not training routing: back to the statistics of the last training step
        if not self._training or model is None or not hasattr(model, "restore_routing_stats"):
            return
        if self._step_mark is not None:
            unchanged = _stats_resets(model) == self._folded_resets
            # statistics reset since the mark (by a user's callback after the step): back to the empty statistics
            # that left, not to the mark's
            mark = self._step_mark if _stats_resets(model) == self._step_mark_resets else {}
            model.restore_routing_stats(mark)
            if unchanged:  # (the mark is at or after the last fold: what was folded is still the model's)
                self._folded_resets = _stats_resets(model)

    def on_predict(self, args, state, control, metrics=None, model=None, **kwargs):
        # `trainer.predict()` (fires on_predict, not on_evaluate) during training: its forwards are not training either
        self.on_evaluate(args, state, control, model=model, **kwargs)

    def _mark(self, model) -> None:
        """Remember the model's statistics now (the end of a training step), for :meth:`on_evaluate`."""
        if model is not None and hasattr(model, "routing_stats_checkpoint"):
            self._step_mark = model.routing_stats_checkpoint()
            self._step_mark_resets = _stats_resets(model)

    def _hold(self, model) -> None:
        """Fold the model's statistics since the last fold into ``_held`` (at every logged window and checkpoint
        save). The model keeps its statistics: what it counted since the last fold is the difference."""
        if model is None or not hasattr(model, "get_routing_stats"):
            return
        current = {name: stats_to_raw(stats) for name, stats in _trained_adapters_stats(model).items()}
        resets = _stats_resets(model)
        # reset or restored to an earlier mark in between (by the user; at the start of training): everything the
        # model holds is new
        folded = self._folded if resets == self._folded_resets else {}
        for name, raw in current.items():
            new = raw - folded[name] if name in folded else raw
            if new[0] <= 0:
                continue  # a layer that did not run since (another adapter's, a skipped branch): not in the window
            self._held[name] = self._held[name] + new if name in self._held else new
        self._folded, self._folded_resets = current, resets
        self._mark(model)

    def _window(self, model) -> dict[str, torch.Tensor]:
        if model is None or not hasattr(model, "get_routing_stats"):
            return {}
        self._hold(model)
        local, self._held = self._held, {}
        raw = _all_reduce(local)
        for name, value in raw.items():
            self._totals[name] = self._totals[name] + value if name in self._totals else value.clone()
        return raw

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # only training logs (not eval or the final summary)
            return
        metrics: dict[str, float] = {}
        aux = dict(self._aux_sums)
        steps = self._aux_steps
        if torch.distributed.is_available() and torch.distributed.is_initialized() and aux:
            reduced = _all_reduce({"aux": torch.tensor([aux[n] for n in sorted(aux)], dtype=torch.float64)})["aux"]
            aux = {n: float(v) / torch.distributed.get_world_size() for n, v in zip(sorted(aux), reduced)}
        for name, total in aux.items():
            metrics[f"molora/aux_{name}"] = total / max(steps, 1)
        self._aux_sums, self._aux_steps = {}, 0
        window = {name: raw_to_summary(raw) for name, raw in self._window(model).items()}
        if window:
            layers = list(window.values())
            metrics["molora/router_entropy"] = sum(s["normalized_entropy"] for s in layers) / len(layers)
            metrics["molora/load_violation"] = sum(s["max_violation"] for s in layers) / len(layers)
            metrics["molora/load_violation_max"] = max(s["max_violation"] for s in layers)
            metrics["molora/experts_per_token"] = sum(s["experts_per_token"] for s in layers) / len(layers)
        logs.update(metrics)
        # Trainer.log appended a copy of `logs` to the history before the callbacks ran: keep the history complete
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        if window and self.per_layer_file and _is_main(state) and args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            if self._history_kept_step is not None:
                self._history_path = _start_history(Path(args.output_dir), self._history_kept_step)
                self._history_kept_step = None
            with open(self._history_path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "layers": window}) + "\n")

    # -- files ------------------------------------------------------------------------------------------------------

    def run_stats(self, model=None) -> dict[str, dict[str, Any]]:
        """Per-layer statistics of the whole run so far, including the window not yet logged (which stays the next
        log's: a checkpoint saved between two logging steps does not cut the logged window short)."""
        self._hold(model)
        totals = dict(self._totals)
        for name, value in _all_reduce(self._held).items():
            totals[name] = totals[name] + value if name in totals else value
        return {name: raw_to_summary(raw) for name, raw in sorted(totals.items())}

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        stats = self.run_stats(model)  # every rank joins the reduction; rank 0 writes
        if _is_main(state) and stats and folder.is_dir():
            Path(folder, STATS_FILE).write_text(json.dumps(stats, indent=1))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._training = False
        stats = self.run_stats(model)
        runtime = getattr(model, "molora_runtime", None) if model is not None else None
        if runtime is not None:
            runtime.stats_grad_only = False
        self._run_files = None
        if not (_is_main(state) and args.output_dir) or state.global_step == 0:
            return  # (no step trained: the folder's files still describe its earlier adapter)
        self._run_files = (Path(args.output_dir), stats)
        if not self.defer_run_files:
            self.write_run_files()

    def write_run_files(self) -> None:
        """Write the ended run's ``routing_stats.json`` and move its history over the folder's earlier one (on the
        main process; nothing before the run ended or when it trained no step). :meth:`on_train_end` calls it, or,
        with ``defer_run_files`` set, whoever saves the adapter once it is saved (``molora sft``)."""
        if self._run_files is None:
            return
        (out, stats), self._run_files = self._run_files, None
        if self._history_path is not None and self._history_path.name != HISTORY_FILE:
            self._history_path.replace(out / HISTORY_FILE)  # the run is complete: its history replaces the earlier
            self._history_path = None
        if stats:
            out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(stats, indent=1)
            write_atomic(out / STATS_FILE, lambda tmp: Path(tmp).write_text(text))
            return
        # no statistics (track_routing_stats=False): an earlier run's files in this folder describe another adapter
        Path(out, STATS_FILE).unlink(missing_ok=True)
        if self._history_kept_step is not None:
            _truncate_history(out / HISTORY_FILE, self._history_kept_step)
            if (out / HISTORY_FILE).is_file() and not (out / HISTORY_FILE).read_text():
                (out / HISTORY_FILE).unlink()


def _trained_adapters_stats(model) -> dict[str, Any]:
    """``model.get_routing_stats()`` of the adapters being trained (whose parameters require gradients): a frozen
    adapter run beside them (the reference copy TRL's preference trainers add to a ``PeftModel``) is not the run's
    routing. All adapters when none is trained, and the usual keys: module names while one adapter is trained."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or len(configs) < 2:
        return model.get_routing_stats()
    trained = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            parts = name.split(".")
            # "...<molora_*>.<adapter>.<...>": the adapter's banks, routers, rank states
            trained.update(b for a, b in zip(parts, parts[1:]) if a.startswith("molora_") and b in configs)
    if not trained:
        return model.get_routing_stats()
    recorded = {name: model.get_routing_stats(adapter_name=name) for name in sorted(trained)}
    recorded = {name: stats for name, stats in recorded.items() if stats}
    if len(recorded) <= 1:  # (one trained adapter ran: module names, as with one adapter)
        return next(iter(recorded.values()), {})
    return {f"{key}:{name}": value for name, stats in recorded.items() for key, value in stats.items()}


def _stats_resets(model) -> int | None:
    """How many times the model's routing statistics were reset (``None`` for a model without a MoLoRA runtime)."""
    return getattr(getattr(model, "molora_runtime", None), "stats_resets", None)


def _tracks_routing_stats(model) -> bool:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return model is not None and hasattr(model, "routing_stats")
    return any(getattr(config, "track_routing_stats", False) for config in configs.values())


def install_routing_stats_callback(trainer, callback: RoutingStatsCallback | None = None) -> RoutingStatsCallback:
    """Put a :class:`RoutingStatsCallback` first in ``trainer``'s callbacks (so the loggers see its values)."""
    callback = callback or RoutingStatsCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


#: a new run's history while an earlier run's stays in place (renamed over it when the run ends)
PENDING_HISTORY_FILE = HISTORY_FILE + ".partial"


def _start_history(folder: Path, kept_step: int) -> Path:
    """The file a run that began at ``kept_step`` appends its windows to, prepared for the first one.

    A resumed run (``kept_step > 0``) continues its checkpoint's lines in ``routing_stats_history.jsonl``; a new run
    into a folder that holds an earlier run's history writes beside it (:data:`PENDING_HISTORY_FILE`), so that a run
    that fails leaves the earlier adapter's statistics whole, and :meth:`RoutingStatsCallback.on_train_end` renames
    it over the earlier history."""
    path, pending = folder / HISTORY_FILE, folder / PENDING_HISTORY_FILE
    if kept_step == 0 and path.is_file():
        pending.write_text("")  # (a failed run's leftover)
        return pending
    # resumed: the history of the run being resumed, which is still pending if it was a new run into a used folder
    # that stopped before its end
    path = pending if kept_step > 0 and pending.is_file() else path
    _truncate_history(path, kept_step)
    return path


def _truncate_history(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` (a JSONL history) whose step is at most ``last_step``: a resumed run continues
    its checkpoint's history, a new run in a used folder starts its own."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line + "\n")
    path.write_text("".join(kept))
