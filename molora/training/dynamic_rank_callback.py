"""``DynamicRankCallback``: drives DR-LoRA rank growth from a transformers ``Trainer`` (and TRL's ``SFTTrainer``).

Per optimizer step: ``on_pre_optimizer_step`` (gradients exist, accumulated over the micro-batches) folds the step
into the saliency signals (:func:`molora.adapters.dynamic_rank.update_importance`); ``on_step_end`` runs a growth
event when the schedule says so (:func:`~molora.adapters.dynamic_rank.maybe_grow`), zeroing the optimizer moments
of the new components; ``on_log`` adds ``dr/*`` rank summaries to the training logs. ``on_save`` writes the
sensitivity EMAs (not part of the adapter) into the checkpoint and ``on_train_begin`` reads them back on a resume.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .._io import write_atomic
from ..adapters.dynamic_rank import (
    SALIENCY_FILE,
    GrowthSchedule,
    dynamic_rank_banks,
    load_saliency_state,
    maybe_grow,
    rank_summary,
    saliency_state,
    schedule_for,
    update_importance,
)
from .callbacks import checkpoint_dir, resume_folders


class DynamicRankCallback(TrainerCallback):
    """Grow DR-LoRA expert ranks during ``Trainer.train()`` (a no-op for adapters without ``dynamic_rank``).

    Pass it as ``Trainer(..., callbacks=[DynamicRankCallback()])``. Fractions in the schedule
    (``start_fraction``/``end_fraction``) refer to ``TrainerState.max_steps``. Callbacks run in list order and the
    Trainer puts its own (console printing, reporting integrations) first, so ``dr/*`` values reach
    ``trainer.state.log_history`` but not those reporters; :meth:`install` puts the callback in front so that they
    do.

    Attributes:
        events (list[dict]): one entry per growth event: ``{"step": int, "grown": {module: {expert: new rank}}}``.
        schedules (dict[str, GrowthSchedule]): the resolved schedule per adapter, set when training starts.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.schedules: dict[str, GrowthSchedule] = {}
        self._resume_dir: Path | None = None

    @classmethod
    def install(cls, trainer: Any) -> DynamicRankCallback:
        """Create the callback and put it first in ``trainer``'s callbacks, so every reporter sees ``dr/*`` logs."""
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        adapters = {bank.adapter for bank in dynamic_rank_banks(model)}
        self.schedules = {name: schedule_for(model, name, state.max_steps) for name in sorted(adapters)}
        if adapters and state.global_step > 0:  # resumed: the Trainer has loaded the checkpoint's state
            self._resume_saliency(args, state, model)

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Read the sensitivity EMAs from this checkpoint folder when training resumes (``molora sft`` calls it).

        Without it the callback looks in ``args.resume_from_checkpoint`` (when a path) and in
        ``<output_dir>/checkpoint-<step>``, the folder a ``Trainer`` writes at the resumed step."""
        self._resume_dir = Path(checkpoint)

    def _resume_saliency(self, args, state, model) -> None:
        folders = resume_folders(self._resume_dir, args, state)
        for folder in folders:
            path = folder / SALIENCY_FILE
            if path.is_file() and load_saliency_state(model, load_file(str(path))):
                return
        warnings.warn(
            f"Resuming DR-LoRA training at step {state.global_step} without the sensitivity EMAs of every bank: no "
            f"{SALIENCY_FILE} matching the model in {[str(f) for f in folders]}. The missing ones "
            "restart from zero and re-converge within a few steps, so growth decisions may differ from the "
            "uninterrupted run's. DynamicRankCallback writes that file into each checkpoint; point it at the folder "
            "you resume from with `callback.resume_from(folder)` (or keep the run's `output_dir`).",
            stacklevel=2,
        )

    def on_save(self, args, state, control, model=None, **kwargs):
        """Write the banks' sensitivity EMAs into the checkpoint the Trainer has just saved (main process only)."""
        if model is None or not state.is_world_process_zero:
            return
        folder = checkpoint_dir(args, state)
        tensors = saliency_state(model)
        if not tensors or not folder.is_dir():  # nothing learnt yet, or a run folder of a hyper-parameter search
            return
        # an interrupted write never leaves a truncated file a resume would read
        write_atomic(folder / SALIENCY_FILE, lambda tmp: save_file(tensors, tmp))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            update_importance(model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            return
        grown = maybe_grow(model, state.global_step, state.max_steps, optimizer=optimizer)
        if grown:
            self.events.append({"step": state.global_step, "grown": grown})

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None:
            return
        summary = rank_summary(model, trained_only=True)  # not a frozen reference copy's ranks
        if not summary:
            return
        logs.update(summary)
        # the Trainer appended a copy of `logs` to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)
