"""The aux-loss gradient under the scalings trainers apply to a loss.

``transformers.Trainer`` normalises the LM loss by ``num_items_in_batch`` (the label tokens of every micro-batch of
an optimizer step, and of every process with ``average_tokens_across_devices``), then neither divides by the
accumulation steps nor keeps the processes' average (it multiplies by their number, in place); TRL's ``SFTTrainer``
computes its own loss and leaves the aux gradient to the layers. In every case an optimizer step must apply
``coef *`` the mean aux loss of its micro-batches: the same aux gradient with gradient accumulation as for one
batch of the same rows. (Two processes: tests/test_ddp.py.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import CHAR_VOCAB, make_char_tokenizer, make_llama, sft_args
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from molora import MoLoraConfig
from molora.training import MoLoraCallback

# equal lengths and no padding: the z-loss of 4 rows is exactly the mean of two 2-row micro-batches' z-losses
TEXTS = [f"the {['red fox', 'blu cat', 'grn owl', 'gry elk'][i % 4]} sat on mat {i % 8}." for i in range(8)]


class _FirstStepRouterGrads(TrainerCallback):
    """Keeps the routers' gradients before the first optimizer step, then stops training."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if "molora_router" in n}
        control.should_training_stop = True
        return control


def _router_grads(kind, accumulation, batch_size, z_coef, callback, **extra):
    """Routers' gradients of the first optimizer step; a fresh adapter (B = 0) makes them the aux gradient alone.
    ``extra``: more training arguments (``fp16=True``)."""
    from datasets import Dataset

    config = MoLoraConfig(r=4, num_experts=4, top_k=2, aux_loss_coef=0.0, z_loss_coef=z_coef, task_type="CAUSAL_LM")
    grab = _FirstStepRouterGrads()
    callbacks = [grab] + ([MoLoraCallback()] if callback else [])
    common = dict(max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
    common.update(extra)
    tokenizer = make_char_tokenizer()
    base = make_llama(vocab_size=CHAR_VOCAB, max_position_embeddings=256)
    if kind == "sft":
        import trl

        trainer = trl.SFTTrainer(
            model=base,
            args=sft_args("unused", max_grad_norm=1e9, **common),
            train_dataset=Dataset.from_list([{"text": t} for t in TEXTS]),
            processing_class=tokenizer,
            peft_config=config,
            callbacks=callbacks,
        )
    else:
        rows = [tokenizer(t)["input_ids"] for t in TEXTS]
        args = TrainingArguments(
            output_dir="unused", report_to="none", use_cpu=True, save_strategy="no", max_grad_norm=1e9, **common
        )
        trainer = Trainer(
            model=get_peft_model(base, config),
            args=args,
            train_dataset=Dataset.from_list([{"input_ids": r, "labels": r} for r in rows]),
            callbacks=callbacks,
        )
    trainer.train()
    return grab.grads


@pytest.mark.parametrize(("kind", "callback"), [("trainer", False), ("sft", True)])
def test_gradient_accumulation_averages_the_aux_loss(kind, callback, tmp_path, monkeypatch):
    """``Trainer`` (the aux term inside ``outputs.loss``, weighted by the micro-batch's share of
    ``num_items_in_batch``) and ``SFTTrainer`` with ``MoLoraCallback`` (delivered by the layers, divided by the
    accumulation steps): the aux gradient of 2 accumulated micro-batches of 2 rows is that of one batch of the 4 rows
    (it was 2x before)."""
    monkeypatch.chdir(tmp_path)
    aux = {}
    for accumulation, batch_size in ((1, 4), (2, 2)):
        with_aux = _router_grads(kind, accumulation, batch_size, 1.0, callback)
        without = _router_grads(kind, accumulation, batch_size, 0.0, callback)
        aux[accumulation] = {n: with_aux[n] - without[n] for n in with_aux}
    assert len(aux[1]) == 14 and all(g.abs().max() > 1e-4 for g in aux[1].values())
    for name, grad in aux[1].items():
        torch.testing.assert_close(aux[2][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_fp16_gradient_scaler_scales_the_layers_delivery():
    """``fp16=True`` on a GPU: the trainer's gradient scaler multiplies the loss by 65536 before backward and divides
    every gradient after. ``MoLoraCallback`` finds it on the trainer's optimizer (accelerate's
    ``AcceleratedOptimizer.scaler``) so that the layers' delivery, when the trainer computes its own loss, is
    multiplied too: the routers' unscaled aux gradient equals the unscaled run's (it was 1/65536 of it).
    (accelerate runs no scaler on a CPU, so the trainer's loop is written out here with a CPU scaler.)"""
    from types import SimpleNamespace

    import torch.nn.functional as F

    grads = {}
    for use_scaler in (False, True):
        torch.manual_seed(0)
        config = MoLoraConfig(r=4, num_experts=4, top_k=2, aux_loss_coef=1.0, z_loss_coef=1.0, task_type="CAUSAL_LM")
        model = get_peft_model(make_llama(), config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16) if use_scaler else None)
        callback, args = MoLoraCallback(), SimpleNamespace(gradient_accumulation_steps=1)
        callback.on_train_begin(args, None, None, model=model, optimizer=optimizer)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
        logits = model(input_ids=ids).logits  # the trainer's own loss: outputs.loss is not used
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        if use_scaler:
            optimizer.scaler.scale(loss).backward()
            optimizer.scaler.unscale_(torch.optim.SGD(params, lr=0.1))
        else:
            loss.backward()
        callback.on_train_end(args, None, None, model=model)
        assert model.base_model.molora_runtime.grad_scaler is None
        # a fresh adapter (B = 0): the routers' gradient is the aux gradient alone
        grads[use_scaler] = {n: p.grad for n, p in model.named_parameters() if "molora_router" in n}
    assert grads[False] and all(g.abs().max() > 1e-4 for g in grads[False].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, msg=name)


@pytest.mark.parametrize("callback", [False, True])
def test_accumulating_without_the_callback_warns(callback, tmp_path, monkeypatch):
    """Without ``MoLoraCallback`` a trainer that computes its own loss cannot know the accumulation steps: molora warns
    once, when a router that already holds a gradient gets the layers' aux delivery; with the callback it is silent."""
    import warnings

    import molora.runtime as runtime_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime_module, "_warned_accumulation", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _router_grads("sft", 2, 2, 1.0, callback)
    warned = [w for w in caught if "MoLoraCallback" in str(w.message)]
    assert len(warned) == (0 if callback else 1)


def test_trainer_with_default_arguments_scales_the_loss_in_place(tmp_path):
    """``Trainer`` multiplies the loss by the number of processes in place (``average_tokens_across_devices``, on by
    default); ``outputs.loss`` (and ``molora_aux_loss()``) are not views, so that works and scales the gradient."""
    model = get_peft_model(make_llama(), MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False)).train()
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    once = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    loss = out.loss
    loss *= 2.0
    loss.backward()
    for name, grad in once.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, 2 * grad, msg=name)
    aux = model.molora_aux_loss()
    aux *= 1.0  # not a view either

    rows = [list(range(3, 15))] * 4
    from datasets import Dataset

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2, save_strategy="no")
    assert args.average_tokens_across_devices
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    )
    assert trainer.train().global_step == 2


def test_an_epochs_last_partial_accumulation_is_counted(tmp_path):
    """5 micro-batches per epoch at ``gradient_accumulation_steps=4``: transformers runs each epoch's second optimizer
    step on 1 micro-batch; the layers' aux delivery must be divided by 1 there, not 4 (aux/4 on that step before)."""
    from datasets import Dataset

    tokenizer = make_char_tokenizer()
    rows = [tokenizer(t)["input_ids"] for t in TEXTS[:5]]
    model = get_peft_model(make_llama(vocab_size=CHAR_VOCAB), MoLoraConfig(r=2, num_experts=2, task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", num_train_epochs=2
    )
    args.per_device_train_batch_size, args.gradient_accumulation_steps = 1, 4
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": r, "labels": r} for r in rows]),
        callbacks=[MoLoraCallback()],
    )
    seen = []

    def record(module, args, kwargs):
        seen.append((trainer.current_gradient_accumulation_steps, model.base_model.molora_runtime.accumulation_steps))

    model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    assert [told for _, told in seen] == [4, 4, 4, 4, 1] * 2
    assert all(trainer_steps == told for trainer_steps, told in seen)
    assert model.base_model.molora_runtime.accumulation_steps == 1  # reset after training
