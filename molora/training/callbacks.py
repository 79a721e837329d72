"""``transformers.TrainerCallback`` s that drive molora's per-step router state.

Routers with state (``"topk_bias"``: the loss-free selection bias; ``"relu"``: ReMoE's adaptive L1 coefficient)
update it once per optimizer step from what they saw in all micro-batches of that step. A ``Trainer`` (or TRL's
``SFTTrainer``) does that when it is given :class:`MoLoraCallback`::

    trainer = SFTTrainer(model=..., peft_config=MoLoraConfig(router="topk_bias", ...), callbacks=[MoLoraCallback()])
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def checkpoint_dir(args, state) -> Path:
    """The folder ``Trainer._save_checkpoint`` writes at ``state.global_step`` (and a resume usually names)."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def resume_folders(explicit: str | os.PathLike | None, args, state) -> list[Path]:
    """Where a callback looks for the state it wrote into a checkpoint, when training resumes at
    ``state.global_step``: the folder given to its ``resume_from`` (``molora sft`` passes the one it resumes from),
    ``args.resume_from_checkpoint`` when it is a path, then ``<output_dir>/checkpoint-<step>``, the folder the
    ``Trainer`` wrote at that step (``trainer.train(resume_from_checkpoint=...)`` does not tell callbacks which
    folder it loaded)."""
    folders = [Path(explicit)] if explicit is not None else []
    given = getattr(args, "resume_from_checkpoint", None)
    if isinstance(given, (str, os.PathLike)):
        folders.append(Path(given))
    folders.append(checkpoint_dir(args, state))
    return folders


def molora_on_optimizer_step(model: nn.Module) -> int:
    """Run ``molora_on_optimizer_step()`` on every ``MoLoraModel`` inside ``model``; return how many were found.

    ``model`` may be a ``PeftModel``, a ``MoLoraModel``, or anything wrapping one (DDP, a custom module).
    """
    found = 0
    for module in _molora_models(model):
        module.molora_on_optimizer_step()
        found += 1
    return found


def _molora_models(model: nn.Module) -> Iterator[nn.Module]:
    """Every ``MoLoraModel`` inside ``model`` (a ``PeftModel``, DDP, a custom module, ...)."""
    from ..model import MoLoraModel

    if isinstance(getattr(model, "base_model", None), MoLoraModel):
        return iter((model.base_model,))  # a PeftModel: no walk over the model's modules (every optimizer step)
    return (module for module in model.modules() if isinstance(module, MoLoraModel))


def _set_trainer_state(model: nn.Module, steps: int, grad_scaler: Any) -> None:
    for module in _molora_models(model):
        module.molora_runtime.accumulation_steps = steps
        module.molora_runtime.grad_scaler = grad_scaler


def _refuse_packed_prompt_routing(args: Any, model: nn.Module) -> None:
    """Raise if TRL packs sequences in a way an adapter of the prompt router cannot be trained with (see
    :func:`molora.training.recipe.packed_prompt_routing_problem`): ``"bfd"`` packing and ``padding_free`` keep each
    sequence whole with its own ``position_ids``, from which the router finds them; ``"wrapped"`` packing leaves no
    boundary at all, so the router would decide once per row from prompts pooled across sequences, silently.
    Checked once here, before any step."""
    from .recipe import packed_prompt_routing_problem

    for module in _molora_models(model):
        for name, config in module.peft_config.items():
            problem = packed_prompt_routing_problem(
                getattr(config, "router", None),
                packing=getattr(args, "packing", False) is True,
                strategy=getattr(args, "packing_strategy", "bfd"),
            )
            if problem:
                raise ValueError(f"{type(args).__name__}: adapter {name!r}: {problem}")


def _enabled_grad_scaler(optimizer: Any) -> Any:
    """The ``torch.amp.GradScaler`` of an fp16 trainer (accelerate's ``AcceleratedOptimizer.scaler``) if enabled."""
    scaler = getattr(optimizer, "scaler", None)
    is_enabled = getattr(scaler, "is_enabled", None)
    return scaler if callable(is_enabled) and is_enabled() else None


class MoLoraCallback(TrainerCallback):
    """Calls ``molora_on_optimizer_step()`` after every optimizer step of a ``transformers.Trainer``, and tells the
    model the trainer's ``gradient_accumulation_steps`` for the duration of training.

    ``transformers`` fires ``on_optimizer_step`` right after ``optimizer.step()``, once per gradient-accumulation
    cycle and on every rank, which is what the stateful routers need (their counts are summed over the cycle's
    micro-batches and all-reduced over ranks). Harmless for stateless routers.

    The accumulation steps matter to trainers that compute their own loss (TRL's ``SFTTrainer``): the routers' aux
    gradient is then delivered by the layers themselves, once per micro-batch, and is divided by the steps so that an
    optimizer step applies ``coef *`` the micro-batches' mean aux loss, whatever the accumulation (as TRL averages the
    aux loss of MoE models); the last step of an epoch may have fewer micro-batches (:meth:`on_step_begin`). For the
    same reason it hands the model the trainer's gradient scaler under fp16 mixed precision (``fp16=True``), which
    multiplies the loss before backward and divides every gradient after: the layers' delivery is multiplied by its
    scale too. Through ``outputs.loss`` (``transformers.Trainer``) neither needs the callback.
    """

    def __init__(self) -> None:
        self._accumulation = 1
        self._steps_in_epoch: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        """Publish ``args.gradient_accumulation_steps`` and the optimizer's gradient scaler (fp16) to the model."""
        self._accumulation = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        loader = kwargs.get("train_dataloader")
        try:
            self._steps_in_epoch = len(loader) if loader is not None else None
        except TypeError:  # an iterable dataset: every optimizer step gets its full accumulation
            self._steps_in_epoch = None
        if model is not None:
            _refuse_packed_prompt_routing(args, model)
            _set_trainer_state(model, self._accumulation, _enabled_grad_scaler(kwargs.get("optimizer")))
        return control

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        """The micro-batches of the optimizer step starting now: ``gradient_accumulation_steps``, except in the last
        step of an epoch whose batches do not divide evenly, where ``transformers`` runs the remainder (its
        ``current_gradient_accumulation_steps``, by which TRL divides an MoE model's aux loss too)."""
        batches = self._steps_in_epoch
        if model is None or not batches or self._accumulation == 1:
            return control
        full = self._accumulation
        per_epoch = max(-(-batches // full), 1)  # the trainer's num_update_steps_per_epoch
        last = state.global_step % per_epoch == per_epoch - 1
        steps = (batches % full or full) if last else full
        for module in _molora_models(model):
            module.molora_runtime.accumulation_steps = steps
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        """Back to one micro-batch per step and no scaler (a later custom loop scales its own loss)."""
        if model is not None:
            _set_trainer_state(model, 1, None)
        return control

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
        """Update the routers' per-step state of ``model`` (the trainer passes its model)."""
        if model is not None:
            molora_on_optimizer_step(model)
        return control
