"""TRL's SFTTrainer trains MoLoRA adapters: with ``peft_config=``, with a pre-wrapped model, with checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import CHAR_VOCAB, make_char_tokenizer, make_llama
from datasets import Dataset
from peft import get_peft_model

from molora import MoLoraConfig, MoLoraLayer

trl = pytest.importorskip("trl")


def _text_dataset(n: int = 32) -> Dataset:
    words = ["red fox", "blue cat", "green owl", "gray wolf"]
    return Dataset.from_list([{"text": f"the {words[i % 4]} sat on mat {i % 4}."} for i in range(n)])


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


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        report_to="none",
        max_steps=16,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        max_length=48,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    kwargs.update(overrides)
    return trl.SFTConfig(**kwargs)


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
        args=_args(tmp_path),
        train_dataset=_text_dataset(),
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
        model=model, args=_args(tmp_path), train_dataset=_chat_dataset(), processing_class=make_char_tokenizer()
    )
    before = _router_weights(trainer.model)
    trainer.train()
    _assert_learned(trainer, before)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_sft_with_gradient_checkpointing(tmp_path, use_reentrant):
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=_args(
            tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
        ),
        train_dataset=_text_dataset(),
        processing_class=make_char_tokenizer(),
        peft_config=MoLoraConfig(r=4, num_experts=4, top_k=2, task_type="CAUSAL_LM"),
    )
    before = _router_weights(trainer.model)
    trainer.train()
    _assert_learned(trainer, before)


def test_sft_with_packing_padding_free(tmp_path):
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=_args(tmp_path, packing=True, max_length=64, max_steps=8),
        train_dataset=_text_dataset(),
        processing_class=make_char_tokenizer(),
        peft_config=MoLoraConfig(r=4, num_experts=4, top_k=2, task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(_losses(trainer))))
