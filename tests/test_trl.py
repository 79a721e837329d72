"""TRL trains MoLoRA adapters: SFTTrainer with ``peft_config=``, a pre-wrapped model, checkpointing; DPOTrainer's
reference adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHAR_VOCAB, make_char_tokenizer, make_llama, sft_args, text_dataset
from datasets import Dataset
from peft import get_peft_model
from transformers import TrainerCallback

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


class _GenerateAt(TrainerCallback):
    """Samples from the model without autograd at the end of one training step, as GRPO's sampling does inside its
    step (and scores the samples with a no-grad forward)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            ids = torch.randint(3, CHAR_VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, pad_token_id=0)
                model(input_ids=out)


class _PredictAt(TrainerCallback):
    """Runs ``trainer.predict`` on four of the training rows at the end of one training step."""

    def __init__(self, trainer, step: int) -> None:
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.trainer.predict(self.trainer.train_dataset.select(range(4)))


@pytest.mark.parametrize(
    "extra",
    [
        dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4),
        # transformers also evaluates at the last step (5, not a multiple of eval_steps): step 5 was wiped
        dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4, max_steps=5),
        # a checkpoint saved between two logging steps took the window's statistics so far: logged windows were short
        dict(save_strategy="steps", save_steps=2, logging_steps=3, max_steps=6),
        # trainer.predict() during training fires on_predict, not on_evaluate: its forwards were counted
        dict(predict_at=2),
        # no-grad forwards inside training (GRPO samples and scores completions in its step): they were counted
        dict(generate_at=2),
        # reentrant checkpointing runs the layers of a training forward without autograd: still training routing
        dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}, generate_at=2),
    ],
    ids=["evaluations", "final_evaluation", "saves_between_logs", "predict", "generate", "reentrant_checkpointing"],
)
def test_routing_statistics_leave_out_evaluations_and_keep_whole_windows(tmp_path, extra):
    """The run's routing statistics (its ``routing_stats.json``, the heat map) and the logged windows
    (``routing_stats_history.jsonl``, TensorBoard) count the training forwards exactly: the same as the same
    training without evaluations or checkpoints (evaluation forwards were counted, or training steps lost)."""
    import json

    from molora.training.logging import HISTORY_FILE, install_routing_stats_callback

    seen = {}
    for variant in ("plain", "extra"):
        steps = dict(max_steps=extra.get("max_steps", 4), logging_steps=extra.get("logging_steps", 2))
        evaluate = variant == "extra" and "eval_strategy" in extra
        args = (
            {k: v for k, v in extra.items() if k not in steps and not k.endswith("_at")} if variant == "extra" else {}
        )
        trainer = trl.SFTTrainer(
            model=make_llama(vocab_size=CHAR_VOCAB),
            args=sft_args(tmp_path / variant, per_device_train_batch_size=2, **steps, **args),
            train_dataset=text_dataset(8),
            eval_dataset=text_dataset(8) if evaluate else None,
            processing_class=make_char_tokenizer(),
            peft_config=MoLoraConfig(r=2, num_experts=4, top_k=2, task_type="CAUSAL_LM"),
        )
        callback = install_routing_stats_callback(trainer)
        if variant == "extra" and "predict_at" in extra:
            trainer.add_callback(_PredictAt(trainer, extra["predict_at"]))
        if variant == "extra" and "generate_at" in extra:
            trainer.add_callback(_GenerateAt(extra["generate_at"]))
        trainer.train()
        windows = (tmp_path / variant / HISTORY_FILE).read_text().splitlines()
        run = {name: s["tokens"] for name, s in callback.run_stats().items()}
        # the model keeps the run's statistics (the callback used to reset them at every log: `{}` after training)
        assert {name: s.tokens for name, s in trainer.model.get_routing_stats().items()} == run
        seen[variant] = (
            run,
            [{name: s["tokens"] for name, s in json.loads(line)["layers"].items()} for line in windows],
        )
    assert seen["plain"][0] and seen["extra"] == seen["plain"]


def test_a_reset_during_training_drops_only_what_it_reset(tmp_path):
    """The callback reads what the model counted since its last look as a difference of the model's (kept)
    statistics; a user's ``model.reset_routing_stats()`` between two looks makes everything the model then holds new
    (a plain difference would go negative): the run loses the reset forwards only."""
    from molora.training.logging import install_routing_stats_callback

    class ResetAt(TrainerCallback):
        def __init__(self) -> None:
            self.seen = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen[state.global_step] = {name: s.tokens for name, s in model.get_routing_stats().items()}
            if state.global_step == 3:  # after the log at step 2, before the one at step 4
                model.reset_routing_stats()

    runs = {}
    for variant in ("plain", "reset"):
        trainer = trl.SFTTrainer(
            model=make_llama(vocab_size=CHAR_VOCAB),
            args=sft_args(tmp_path / variant, per_device_train_batch_size=2, max_steps=4, logging_steps=2),
            train_dataset=text_dataset(8),
            processing_class=make_char_tokenizer(),
            peft_config=MoLoraConfig(r=2, num_experts=4, top_k=2, task_type="CAUSAL_LM"),
        )
        callback = install_routing_stats_callback(trainer)
        resetter = ResetAt()
        if variant == "reset":
            trainer.add_callback(resetter)
        trainer.train()
        runs[variant] = callback.run_stats()
    step3 = {name: resetter.seen[3][name] - resetter.seen[2][name] for name in resetter.seen[3]}
    assert all(step3.values())
    for name, stats in runs["reset"].items():
        assert stats["tokens"] == runs["plain"][name]["tokens"] - step3[name]
        assert min(stats["load"]) >= 0 and abs(sum(stats["load"]) - 1) < 1e-9


def test_windows_hold_the_layers_that_ran_and_survive_a_restore_of_an_older_mark():
    """The callback's windows are differences of the model's kept statistics: a layer that did not run since the
    last log was in the window with 0 tokens (pulling the logged means down), and a user's restore of a mark taken
    before that log gave a negative window. A restore now counts what the model then holds as new."""
    from types import SimpleNamespace

    from molora.training.logging import RoutingStatsCallback, raw_to_summary

    class TwoLayers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, input_ids, attention_mask=None, use_b=True):
            h = self.a(input_ids)
            return self.b(h) if use_b else h

    torch.manual_seed(0)
    config = MoLoraConfig(num_experts=4, top_k=2, target_modules=["a", "b"], init_lora_weights=False)
    model = get_peft_model(TwoLayers(), config).train()
    callback = RoutingStatsCallback(per_layer_file=False)
    state = SimpleNamespace(global_step=0, log_history=[], is_world_process_zero=True)
    callback.on_train_begin(SimpleNamespace(output_dir=None), state, None, model=model)

    def window():
        return {name: raw_to_summary(raw) for name, raw in callback._window(model).items()}

    model(torch.randn(2, 5, 16))
    mark = model.routing_stats_checkpoint()
    assert {name: s["tokens"] for name, s in window().items()} == {"a": 10, "b": 10}
    model(torch.randn(2, 5, 16), use_b=False)
    assert {name: s["tokens"] for name, s in window().items()} == {"a": 10}  # b did not run
    model(torch.randn(2, 5, 16))
    model.restore_routing_stats(mark)  # back before the last two logs: 10 tokens each
    model(torch.randn(2, 3, 16))
    got = window()
    assert {name: s["tokens"] for name, s in got.items()} == {"a": 16, "b": 16}
    assert all(min(s["load"]) >= 0 for s in got.values())


def test_evaluations_are_rolled_back_only_during_training_and_never_past_a_reset():
    """An evaluation during training is rolled back to the last step's statistics; one after ``train()``
    (``trainer.evaluate()``/``predict()``) keeps its own, and a user's reset after the step's mark is not undone (the
    restore brought back the training run's counts in both cases)."""
    from types import SimpleNamespace

    from molora.training.logging import RoutingStatsCallback

    model = get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=4, top_k=2, init_lora_weights=False))
    callback = RoutingStatsCallback(per_layer_file=False)
    args, state = SimpleNamespace(output_dir=None), SimpleNamespace(global_step=0, log_history=[])
    state.is_world_process_zero = True

    def tokens() -> set[int]:
        return {s.tokens for s in model.get_routing_stats().values()}

    callback.on_train_begin(args, state, None, model=model)
    model.train()
    model(input_ids=torch.randint(3, 60, (2, 8)), labels=torch.randint(3, 60, (2, 8))).loss.backward()
    state.global_step = 1
    callback.on_step_end(args, state, None, model=model)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 60, (2, 5)))
    callback.on_evaluate(args, state, None, model=model)
    assert tokens() == {16}  # the training step's
    model.reset_routing_stats()  # a user's callback, after the step's mark
    with torch.no_grad():
        model(input_ids=torch.randint(3, 60, (2, 5)))
    callback.on_predict(args, state, None, model=model)
    assert model.get_routing_stats() == {}
    callback.on_train_end(args, state, None, model=model)
    model.reset_routing_stats()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 60, (3, 4)))
    callback.on_evaluate(args, state, None, model=model)
    callback.on_predict(args, state, None, model=model)
    assert tokens() == {12}  # the evaluation's, after training


def test_a_run_without_statistics_leaves_no_earlier_runs_statistics(tmp_path):
    """``track_routing_stats=False`` into a folder an earlier run used: its ``routing_stats.json`` (and history)
    described the earlier adapter in the new card and heat map."""
    from molora.training.logging import HISTORY_FILE, STATS_FILE, install_routing_stats_callback

    (tmp_path / STATS_FILE).write_text('{"model.layers.0.mlp.down_proj": {"tokens": 804}}')
    (tmp_path / HISTORY_FILE).write_text('{"step": 2, "layers": {}}\n')
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=sft_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
        train_dataset=text_dataset(4),
        processing_class=make_char_tokenizer(),
        peft_config=MoLoraConfig(r=2, num_experts=2, task_type="CAUSAL_LM", track_routing_stats=False),
    )
    install_routing_stats_callback(trainer)
    trainer.train()
    assert not (tmp_path / STATS_FILE).exists() and not (tmp_path / HISTORY_FILE).exists()


def test_routing_totals_are_float64():
    """Running sums in float64: float32 counts drift past 2**24 tokens per layer (a top-1 router reported
    1.0000001 experts per token after 18M tokens)."""
    model = get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="CAUSAL_LM"))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 60, (2, 8)))
    runtime = model.base_model.molora_runtime
    runtime.commit_stats()
    assert {total.dtype for total in runtime._totals.values()} == {torch.float64}
    stats = model.get_routing_stats()
    assert all(s.tokens == 16 and s.experts_per_token == 1.0 for s in stats.values())


def _dpo_trainer(model, output_dir):
    """One DPO step at learning rate 0 (the policy stays the reference) on four preference rows."""
    rows = [{"prompt": f"say {i}:", "chosen": f" yes {i}!", "rejected": f" no no {i}?"} for i in range(4)]
    args = trl.DPOConfig(
        output_dir=str(output_dir),
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=0.0,
        save_strategy="no",
        use_cpu=True,
        max_length=32,
        logging_steps=1,
    )
    return trl.DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=make_char_tokenizer()
    )


@pytest.mark.parametrize("state", [None, "topk_bias", "dynamic_rank"])
def test_dpo_reference_adapter_is_a_copy_of_the_trained_one(tmp_path, state):
    """TRL's preference trainers (DPO, KTO, GRPO, RLOO) given a model with a trained adapter and no ``ref_model`` add
    a ``ref`` adapter and copy every parameter named ``*.default.*`` into it. The expert banks were bare parameters
    named ``molora_A.default`` (no trailing dot): only the routers were copied, so the reference was the base model
    (fresh ``B = 0`` experts) and DPO's anchor silently wrong. State kept in buffers (``topk_bias``'s selection bias,
    DR-LoRA's rank masks) is not a parameter: molora copies it at the first forward (the reference used to route with
    a zero bias, or add the experts at their initial ranks), and the reference's forward without gradient must round
    as the policy's does (DR-LoRA's scaling 16 / 6 is not a power of two). With a learning rate of 0 the policy is the
    reference:
    the loss is ln 2 and the reward margin 0, as with PEFT LoRA."""
    import math

    from peft import PeftModel

    options = {"router": "topk_bias"} if state == "topk_bias" else {}
    if state == "dynamic_rank":
        options = {"r": 8, "dynamic_rank": {"init_rank": 2, "target_rank": 6}}
    trained = MoLoraConfig(
        **{"r": 4, "num_experts": 4, "top_k": 2, "init_lora_weights": False, "task_type": "CAUSAL_LM", **options}
    )  # B != 0
    sft = get_peft_model(make_llama(vocab_size=CHAR_VOCAB), trained)
    with torch.no_grad():  # what training leaves in the buffers: a selection bias, grown ranks
        gen = torch.Generator().manual_seed(0)
        for name, buffer in sft.named_buffers():
            if name.endswith("selection_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=gen))
            elif name.endswith("activated_at"):
                buffer[:2, 2:5] = 3
    sft.save_pretrained(tmp_path / "sft")
    model = PeftModel.from_pretrained(make_llama(vocab_size=CHAR_VOCAB), tmp_path / "sft", is_trainable=True)
    trainer = _dpo_trainer(model, tmp_path / "dpo")
    named = dict(trainer.model.named_parameters())
    banks = [n for n in named if ".molora_A.default." in n or ".molora_B.default." in n]
    assert len(banks) == 28  # 7 projections x 2 layers x (A, B)
    assert all(torch.equal(named[n], named[n.replace(".default.", ".ref.")]) for n in banks)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-5) and log["rewards/margins"] == pytest.approx(0, abs=1e-6)


def _sft_with_stats(output_dir, resume=None, resume_from=None):
    """4 SFT steps with the routing-statistics callback, checkpoints at steps 2 and 4; returns the run-level
    statistics file and the warnings about them."""
    import json
    import warnings

    from molora.training import RoutingStatsCallback, install_routing_stats_callback

    args = sft_args(output_dir, max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=args,
        train_dataset=text_dataset(16),
        processing_class=make_char_tokenizer(),
        peft_config=MoLoraConfig(r=4, num_experts=4, top_k=2, task_type="CAUSAL_LM"),
    )
    callback = install_routing_stats_callback(trainer, RoutingStatsCallback())
    if resume_from is not None:
        callback.resume_from(resume_from)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    stats = json.loads((output_dir / "routing_stats.json").read_text())
    return stats, [str(w.message) for w in caught if "routing statistics" in str(w.message)]


def _flat(stats: dict) -> dict:
    """``{(layer, field, i): value}`` of a ``routing_stats.json`` (for ``pytest.approx``)."""
    out = {}
    for name, layer in stats.items():
        for key, value in layer.items():
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                out[name, key, i] = v
    return out


def test_resumed_trainer_keeps_the_run_level_routing_statistics(tmp_path):
    """``trainer.train(resume_from_checkpoint=...)`` with ``RoutingStatsCallback`` and nothing else (as
    ``scripts/sft.py`` and a user's own script do it) wrote a ``routing_stats.json`` of the resumed steps only: only
    ``molora sft`` told the callback the checkpoint. The callback now finds the checkpoint's statistics as the
    DR-LoRA callback finds its EMAs (``args.resume_from_checkpoint``, ``<output_dir>/checkpoint-<step>``), warns
    when there are none, and is told a moved one with ``resume_from``."""
    import shutil

    full, warned = _sft_with_stats(tmp_path / "run")
    assert not warned
    at_2 = (tmp_path / "run" / "checkpoint-2" / "routing_stats.json").read_text()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / "moved")
    resumed, warned = _sft_with_stats(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-2"))
    assert not warned
    tokens = {name: layer["tokens"] for name, layer in full.items()}
    assert {name: layer["tokens"] for name, layer in resumed.items()} == tokens
    assert _flat(resumed) == pytest.approx(_flat(full))
    # `resume_from_checkpoint=True`: the newest checkpoint of output_dir (step 4: nothing left to train)
    (tmp_path / "run" / "checkpoint-4").rename(tmp_path / "step4")
    resumed, warned = _sft_with_stats(tmp_path / "run", resume=True)
    assert not warned and {name: layer["tokens"] for name, layer in resumed.items()} == tokens
    # a copy of the checkpoint outside output_dir (a fresh folder): only the two resumed steps, and a warning ...
    (tmp_path / "moved" / "routing_stats.json").rename(tmp_path / "stats_at_2.json")
    partial, warned = _sft_with_stats(tmp_path / "other", resume=str(tmp_path / "moved"))
    assert len(warned) == 1 and "resume_from" in warned[0]
    assert all(layer["tokens"] < tokens[name] for name, layer in partial.items())
    # ... which `resume_from` (what `molora sft` does) answers
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "stats_at_2.json").rename(tmp_path / "elsewhere" / "routing_stats.json")
    assert json.loads((tmp_path / "elsewhere" / "routing_stats.json").read_text()) == json.loads(at_2)
    resumed, warned = _sft_with_stats(
        tmp_path / "other2", resume=str(tmp_path / "moved"), resume_from=tmp_path / "elsewhere"
    )
    assert not warned and _flat(resumed) == pytest.approx(_flat(full))


def test_dpo_routing_statistics_describe_the_trained_adapter(tmp_path):
    """The reference forward of a preference trainer runs TRL's frozen ``ref`` copy of the adapter: the logged routing
    metrics averaged its layers with the trained adapter's, and ``routing_stats.json`` held both (``molora inspect``
    drew the copy as more panels). The callback now keeps the adapters being trained, under plain module names."""
    from molora.training import RoutingStatsCallback, install_routing_stats_callback

    model = get_peft_model(
        make_llama(vocab_size=CHAR_VOCAB), MoLoraConfig(r=4, num_experts=4, top_k=2, task_type="CAUSAL_LM")
    )
    trainer = _dpo_trainer(model, tmp_path)
    with torch.no_grad():  # a policy that moved away from its reference: sharper routers
        for name, param in trainer.model.named_parameters():
            if "molora_router.default." in name:
                param.mul_(8.0)
    seen = {}

    class Peek(TrainerCallback):  # runs before the statistics callback folds the model's statistics
        def on_log(self, args, state, control, model=None, **kwargs):
            seen.update(model.get_routing_stats())

    install_routing_stats_callback(trainer, RoutingStatsCallback())
    trainer.callback_handler.callbacks.insert(0, Peek())
    trainer.train()
    policy = {k.rpartition(":")[0]: v for k, v in seen.items() if k.endswith(":default")} or seen
    reference = [v for k, v in seen.items() if k.endswith(":ref")]
    # the reference forward runs without autograd: while the callback trains, only training forwards are recorded
    assert len(policy) == 14 and not reference
    written = json.loads((tmp_path / "routing_stats.json").read_text())
    assert sorted(written) == sorted(policy)
    for name, stats in policy.items():
        assert written[name]["tokens"] == stats.tokens
        assert written[name]["normalized_entropy"] == pytest.approx(stats.normalized_entropy)
    logged = trainer.state.log_history[0]["molora/router_entropy"]
    entropy = sum(s.normalized_entropy for s in policy.values()) / 14
    assert logged == pytest.approx(entropy)
