"""TRL's SFTTrainer trains MoLoRA adapters: with ``peft_config=``, with a pre-wrapped model, with checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import CHAR_VOCAB, make_char_tokenizer, make_llama, sft_args, text_dataset
from datasets import Dataset
from peft import get_peft_model

from molora import MoLoraConfig, MoLoraLayer

trl = pytest.importorskip("trl")


def _chat_dataset(n: int = 32) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"say {i % 4}"},
                    {"role": "assistant", "content": f"ok {i % 4}!"},
                ]
            }
            for i in range(n)
        ]
    )


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _router_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: m.molora_router["default"].weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, MoLoraLayer)
    }


def _assert_learned(trainer, before: dict[str, torch.Tensor]) -> None:
    losses = _losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.95, losses
    after = _router_weights(trainer.model)
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)


def test_sft_with_peft_config_trains(tmp_path):
    config = MoLoraConfig(r=4, num_experts=4, top_k=2, aux_loss_coef=0.05, task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=sft_args(tmp_path),
        train_dataset=text_dataset(),
        processing_class=make_char_tokenizer(),
        peft_config=config,
    )
    before = _router_weights(trainer.model)
    trainer.train()
    _assert_learned(trainer, before)
    stats = trainer.model.get_routing_stats()
    assert stats and all(s.tokens > 0 for s in stats.values())


def test_sft_with_prewrapped_model_and_chat_data(tmp_path):
    model = get_peft_model(
        make_llama(vocab_size=CHAR_VOCAB), MoLoraConfig(r=4, num_experts=4, top_k=1, task_type="CAUSAL_LM")
    )
    trainer = trl.SFTTrainer(
        model=model, args=sft_args(tmp_path), train_dataset=_chat_dataset(), processing_class=make_char_tokenizer()
    )
    before = _router_weights(trainer.model)
    trainer.train()
    _assert_learned(trainer, before)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_sft_with_gradient_checkpointing(tmp_path, use_reentrant):
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=sft_args(
            tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
        ),
        train_dataset=text_dataset(),
        processing_class=make_char_tokenizer(),
        peft_config=MoLoraConfig(r=4, num_experts=4, top_k=2, task_type="CAUSAL_LM"),
    )
    before = _router_weights(trainer.model)
    trainer.train()
    _assert_learned(trainer, before)


def test_sft_with_packing_padding_free(tmp_path):
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=sft_args(tmp_path, packing=True, max_length=64, max_steps=8),
        train_dataset=text_dataset(),
        processing_class=make_char_tokenizer(),
        peft_config=MoLoraConfig(r=4, num_experts=4, top_k=2, task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(_losses(trainer))))


def test_routing_statistics_leave_out_evaluations_during_training(tmp_path):
    """With ``eval_strategy="steps"`` the evaluation forwards were counted in the run's routing statistics (its
    ``routing_stats.json``, the logged windows, the heat map): the run's token counts equal those of the same
    training without evaluations."""
    from molora.training.logging import install_routing_stats_callback

    tokens = {}
    for evaluate in (False, True):
        extra = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4) if evaluate else {}
        trainer = trl.SFTTrainer(
            model=make_llama(vocab_size=CHAR_VOCAB),
            args=sft_args(
                tmp_path / str(evaluate), max_steps=4, per_device_train_batch_size=2, logging_steps=2, **extra
            ),
            train_dataset=text_dataset(8),
            eval_dataset=text_dataset(8) if evaluate else None,
            processing_class=make_char_tokenizer(),
            peft_config=MoLoraConfig(r=2, num_experts=4, top_k=2, task_type="CAUSAL_LM"),
        )
        callback = install_routing_stats_callback(trainer)
        trainer.train()
        stats = callback.run_stats()
        tokens[evaluate] = {name: s["tokens"] for name, s in stats.items()}
    assert tokens[False] and tokens[True] == tokens[False]
