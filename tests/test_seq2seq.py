"""Encoder-decoder models (T5, BART): the encoder's and the decoder's tokens are routed with their own padding masks,
also when ``generate`` runs the encoder on its own."""

from __future__ import annotations

import pytest
import torch
from conftest import make_bart, make_t5
from peft import PeftModel, get_peft_model

from molora import MoLoraConfig


def _padded_inputs():
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, 7:], mask[0, 7:] = 0, 0  # 17 real encoder tokens
    return ids, mask


@pytest.mark.parametrize("decoder_length", [9, 10, 11])
def test_decoder_tokens_are_not_masked_with_the_encoders_padding(decoder_length):
    """The encoder's mask applied to the decoder's tokens whenever the two lengths were equal (10 here): decoder
    positions facing encoder padding dropped out of the statistics and the aux losses."""
    config = MoLoraConfig(r=2, num_experts=4, top_k=1, target_modules=["q"], task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(make_t5(), config)
    ids, mask = _padded_inputs()
    labels = torch.randint(3, 64, (2, decoder_length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=labels)
    stats = model.get_routing_stats()
    assert stats["encoder.block.0.layer.0.SelfAttention.q"].tokens == 17
    assert stats["decoder.block.0.layer.0.SelfAttention.q"].tokens == 2 * decoder_length


@pytest.mark.parametrize("make", [make_t5, make_bart])
def test_decoder_padding_is_read_from_labels_padded_with_minus_100(make):
    """``DataCollatorForSeq2Seq`` pads the labels with -100 and passes no ``decoder_attention_mask``: the decoder
    positions whose target is ignored are its padding, as with that mask (they counted in the statistics and the aux
    losses). Decoder positions of a batch without labels (generation) all count."""
    config = MoLoraConfig(r=2, num_experts=4, top_k=2, init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(make(), config).eval()
    ids, mask = _padded_inputs()
    labels = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    labels[0, 2:] = -100  # 2 + 6 real targets
    results = []
    for extra in ({}, {"decoder_attention_mask": (labels != -100).long()}):
        model.reset_routing_stats()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        results.append((out.loss, model.molora_aux_losses(), model.get_routing_stats()))
    (loss, aux, stats), (loss_masked, aux_masked, stats_masked) = results
    decoder = [
        s.tokens
        for k, s in stats.items()
        if k.startswith("model.decoder.layers." if make is make_bart else "decoder.")
    ]
    assert decoder and set(decoder) <= {8, 17}  # (cross-attention keys and values route the encoder's 17 tokens)
    assert stats == stats_masked
    torch.testing.assert_close(aux["balance"], aux_masked["balance"])
    torch.testing.assert_close(loss, loss_masked)


def test_generate_routes_the_encoder_with_its_mask():
    """``generate`` calls the encoder on its own (not through the model's forward): it ran with the previous call's
    routing context, counting padding (or, after a decode step, as a decode step)."""
    config = MoLoraConfig(r=2, num_experts=4, top_k=1, target_modules=["q", "k", "v", "o"], task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(make_t5(), config)
    ids, mask = _padded_inputs()
    with torch.no_grad():
        for _ in range(2):
            model.reset_routing_stats()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
            assert model.get_routing_stats()["encoder.block.0.layer.0.SelfAttention.q"].tokens == 17


def test_expert_choice_generates_the_same_twice_and_reloads(tmp_path):
    """``expert_choice`` ranks tokens over the call's valid rows: with the stale context of the previous call, two
    identical ``generate`` calls on BART returned different tokens."""
    config = MoLoraConfig(
        r=2, num_experts=4, top_k=1, router="expert_choice", init_lora_weights=False, task_type="SEQ_2_SEQ_LM"
    )
    model = get_peft_model(make_bart(), config).eval()
    ids, mask = _padded_inputs()
    ids[0, 7:] = 1  # BART's pad id
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        first, second = model.generate(**kwargs), model.generate(**kwargs)
    assert torch.equal(first, second)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_bart(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded.generate(**kwargs), first)


def test_prompt_router_decides_from_the_input_and_the_start_token():
    """``router="prompt"`` on T5: the encoder's routers pool over its real tokens (the prompt), the decoder's over
    its start token (what ``generate``'s first step sees; the targets of a teacher-forced forward never steer it),
    and the cross-attention's key/value projections over the encoder's real tokens. A padded sample generates as
    it does alone."""
    config = MoLoraConfig(
        r=2, num_experts=4, top_k=1, router="prompt", init_lora_weights=False, task_type="SEQ_2_SEQ_LM"
    )
    model = get_peft_model(make_t5(), config).eval()
    ids, mask = _padded_inputs()
    labels = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    other = labels.clone()
    other[:, 1:] = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.reset_routing_stats()
        first = model(input_ids=ids, attention_mask=mask, labels=labels).logits[:, 0]
        stats = model.get_routing_stats()
        assert stats["decoder.block.0.layer.1.EncDecAttention.k"].tokens == 17  # encoder tokens, padding left out
        changed = model(input_ids=ids, attention_mask=mask, labels=other).logits[:, 0]
        torch.testing.assert_close(first, changed, rtol=0, atol=0)
        step = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        ).logits[0]
        torch.testing.assert_close(step, first, atol=1e-5, rtol=1e-5)
        kwargs = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[2])
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        alone = model.generate(input_ids=ids[:1, :7], attention_mask=mask[:1, :7], **kwargs)
    assert torch.equal(batched[:1], alone)


@pytest.mark.parametrize("router", ["topk", "prompt"])
def test_activation_checkpointing_gives_the_same_gradients(router):
    """Reentrant checkpointing recomputes a decoder layer from detached copies of its inputs: the cross-attention's
    key/value projections then lost the encoder's context (its mask; for the prompt router, its prompt), and the
    gradients differed (by 1.3 with the prompt router)."""
    ids, mask = _padded_inputs()
    labels = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    grads = {}
    for checkpointing in (None, True, False):
        base = make_t5()
        if checkpointing is not None:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
            base.enable_input_require_grads()
        torch.manual_seed(5)
        config = MoLoraConfig(
            r=2,
            num_experts=4,
            top_k=2,
            router=router,
            init_lora_weights=False,
            z_loss_coef=1e-2,
            task_type="SEQ_2_SEQ_LM",
        )
        model = get_peft_model(base, config).train()
        # (no KV cache in any run: checkpointing turns it off, and T5's decoder rounds differently with one)
        model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for checkpointing in (True, False):
        assert grads[checkpointing].keys() == grads[None].keys()
        for name, grad in grads[None].items():
            torch.testing.assert_close(grads[checkpointing][name], grad, msg=name)


@pytest.mark.parametrize("make", [make_t5, make_bart], ids=["t5", "bart"])
def test_evaluation_loss_with_labels_includes_the_aux_loss(make):
    """The encoder's and decoder's routing contexts drop the labels (the decoder's targets do not mark the encoder's
    prompt); without autograd that also dropped the aux losses: an evaluation's ``outputs.loss`` (Seq2SeqTrainer's
    ``eval_loss``) was the cross-entropy alone and ``molora_aux_loss()`` was 0."""
    config = MoLoraConfig(r=2, num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.1, task_type="SEQ_2_SEQ_LM")
    model = get_peft_model(make(), config).eval()
    ids, mask = _padded_inputs()
    labels = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        aux = model.molora_aux_loss()
        parts = model.molora_aux_losses()
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))
    assert set(parts) == {"balance", "z"} and aux > 0
    torch.testing.assert_close(out.loss, ce + aux)
    torch.testing.assert_close(aux, 0.5 * parts["balance"] + 0.1 * parts["z"])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=labels)
    assert model.molora_aux_loss() is None  # no targets, no autograd: nothing computed


def test_default_targets_of_bart_leave_the_classification_head_alone():
    """The default targets named BART's attention output `out_proj` alone, which BartForSequenceClassification's head
    (`classification_head.out_proj`) matched too: the classifier got experts and a router."""
    from transformers import BartForSequenceClassification

    from molora import MoLoraLayer

    generation = get_peft_model(make_bart(), MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="SEQ_2_SEQ_LM"))
    adapted = {n for n, m in generation.named_modules() if isinstance(m, MoLoraLayer)}
    for stack, attentions in (("encoder", ["self_attn"]), ("decoder", ["self_attn", "encoder_attn"])):
        layer = f"base_model.model.model.{stack}.layers.0"
        expected = {f"{layer}.{a}.{p}" for a in attentions for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        assert {n for n in adapted if n.startswith(layer)} == expected | {f"{layer}.fc1", f"{layer}.fc2"}
    torch.manual_seed(0)
    classifier = BartForSequenceClassification(make_bart().config)
    model = get_peft_model(classifier, MoLoraConfig(r=2, num_experts=2, top_k=1, task_type="SEQ_CLS"))
    adapted = [n for n, m in model.named_modules() if isinstance(m, MoLoraLayer)]
    assert adapted and not any("classification_head" in n for n in adapted)
    assert len(adapted) == 16  # 6 encoder + 10 decoder projections
