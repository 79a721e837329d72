"""``DynamicRankCallback``: drives DR-LoRA rank growth from a transformers ``Trainer`` (and TRL's ``SFTTrainer``).

Per optimizer step: ``on_pre_optimizer_step`` (gradients exist, accumulated over the micro-batches) folds the step
into the saliency signals (:func:`molora.adapters.dynamic_rank.update_importance`); ``on_step_end`` runs a growth
event when the schedule says so (:func:`~molora.adapters.dynamic_rank.maybe_grow`), zeroing the optimizer moments
of the new components; ``on_log`` adds ``dr/*`` rank summaries to the training logs.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..adapters.dynamic_rank import (
    GrowthSchedule,
    dynamic_rank_banks,
    maybe_grow,
    rank_summary,
    schedule_for,
    update_importance,
)


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
        summary = rank_summary(model)
        if not summary:
            return
        logs.update(summary)
        # the Trainer appended a copy of `logs` to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)
