"""The ``prompt`` router (MiLoRA's prompt-aware routing, bank mode): spec vectors, padding, generation, state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import greedy, interleaved_conversations, make_llama, padded
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from molora import MoLoraConfig, MoLoraLayer
from molora.routers.prompt import PromptParams, PromptRouter, PromptRouting, pool, prompt_positions
from molora.runtime import RoutingContext

# docs/algorithms.md section 3: d = 2, a 3-token prompt, 7 experts (the paper's Q, K, V, O, G, U, D modules)
H = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
W_G = torch.tensor([[1, 0], [0, 0.5], [0.4, 0.5], [-1, 0], [0, -1], [1, 1], [-0.5, 0.25]])
Q, V, U = (list("QKVOGUD").index(m) for m in "QVU")
PI = [0.178963, 0.133725, 0.168831, 0.055791, 0.055791, 0.320525, 0.086375]


def spec_router(top_k: int, **params) -> PromptRouter:
    router = PromptRouter(2, 7, top_k, params=PromptParams(**params))
    with torch.no_grad():
        router.weight.copy_(W_G)
    return router


def gates_of(routing: PromptRouting) -> dict[int, float]:
    seq = routing.sequence
    return {int(e): float(w) for e, w in zip(seq.expert_index, seq.weight.detach())}


@pytest.mark.parametrize(
    ("top_k", "gate_mode", "expected"),
    [
        (2, "renorm", {U: 0.641708, Q: 0.358292}),
        (2, "raw", {U: 0.320525, Q: 0.178963}),
        (3, "renorm", {U: 0.479599, Q: 0.267780, V: 0.252621}),
    ],
)
def test_spec_vector_mean_pooling(top_k, gate_mode, expected):
    routing = spec_router(top_k, gate_mode=gate_mode)(H, lead_shape=(1, 3))
    torch.testing.assert_close(routing.sequence.probs[0], torch.tensor(PI), atol=1e-6, rtol=0)
    logits = torch.tensor([0.582783, 0.291391, 0.524505, -0.582783, -0.582783, 1.165566, -0.145696])
    torch.testing.assert_close(routing.sequence.logits[0], logits, atol=1e-6, rtol=0)
    got = gates_of(routing)
    assert got.keys() == expected.keys()
    for expert, gate in expected.items():
        assert got[expert] == pytest.approx(gate, abs=1e-6)


def test_spec_vector_last_token_pooling():
    router = spec_router(2, pooler="last", gate_mode="raw")
    routing = router(H, lead_shape=(1, 3))
    u = torch.tanh(torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(routing.sequence.probs[0], torch.softmax(W_G @ u, -1))
    assert set(gates_of(routing)) == {U, Q}


def test_pooling_ignores_padding_on_either_side():
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    query = torch.randn(4)
    for pooler in ("mean", "last", "max", "attn"):
        pooled = pool(x, mask, pooler, query=query)
        for b in range(3):
            alone = x[b, mask[b]][None]
            ref = pool(alone, torch.ones(1, alone.shape[1], dtype=torch.bool), pooler, query=query)[0]
            torch.testing.assert_close(pooled[b], ref)
    # the last real position, wherever the padding is
    torch.testing.assert_close(pool(x, mask, "last")[1], x[1, 2])


@pytest.mark.parametrize("pooler", ["mean", "attn"])
def test_decision_in_fp32_inside_autocast(pooler):
    # a trainer's bf16=True: pooling's product and the scoring would run in bf16; the decision is the same as outside
    torch.manual_seed(0)
    router = PromptRouter(32, 6, 2, params=PromptParams(pooler=pooler))
    with torch.no_grad():
        if router.pool_query is not None:
            router.pool_query.normal_()
    x = torch.randn(3, 9, 32).to(torch.bfloat16)
    prompt = torch.rand(3, 9) > 0.3
    outside = router.decide(x, prompt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = router.decide(x, prompt)
    assert inside.probs.dtype == torch.float32 and torch.equal(inside.probs, outside.probs)


def test_attention_pooling_starts_as_the_mean_and_learns_its_query():
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    router = PromptRouter(4, 3, 2, params=PromptParams(pooler="attn"))
    assert torch.equal(router.pool_query, torch.zeros(4))  # zero query: uniform attention over the prompt
    torch.testing.assert_close(pool(x, mask, "attn", query=router.pool_query), pool(x, mask, "mean"))
    # the written-out definition: softmax over the prompt positions of q . x / sqrt(d)
    query = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for b in range(2):
        rows = x[b, mask[b]]
        alpha = torch.softmax(rows @ query / 2.0, dim=0)
        torch.testing.assert_close(pool(x, mask, "attn", query=query)[b], alpha @ rows)
    # an empty row pools to zeros (no NaN), and the query is trained by whatever the decision feeds
    empty = pool(x, torch.zeros(2, 5, dtype=torch.bool), "attn", query=query)
    assert torch.equal(empty, torch.zeros(2, 4))
    with torch.no_grad():
        router.pool_query.copy_(query)
    routing = router(x.reshape(10, 4), mask.reshape(-1), lead_shape=(2, 5))
    routing.sequence.probs[:, 0].sum().backward()  # (the kept gates sum to 1: their sum has no gradient)
    assert router.pool_query.grad is not None and router.pool_query.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="query"):
        pool(x, mask, "attn")


def test_prompt_positions_precedence_and_fallback():
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, 7, 8], [4, 5, 6, 7, -100]])  # row 1 supervises every real token
    ctx = RoutingContext(attention_mask=mask, labels=labels)
    expected = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(prompt_positions(ctx, 2, 5, torch.device("cpu")), expected)
    # an explicit prompt mask wins over the labels; padding stays out whatever it says
    ctx.prompt_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[0, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(prompt_positions(ctx, 2, 5, torch.device("cpu")), expected)
    assert torch.equal(prompt_positions(RoutingContext(attention_mask=mask), 2, 5, torch.device("cpu")), mask.bool())


def test_every_token_of_a_sequence_gets_its_sequence_decision():
    torch.manual_seed(0)
    router = PromptRouter(8, 6, 2)
    with torch.no_grad():
        router.weight.mul_(20)  # sharp decisions, so that different prompts pick different experts
    batch, seq = 6, 5
    routing = router(torch.randn(batch * seq, 8), lead_shape=(batch, seq))
    gates = routing.dense_gates().reshape(batch, seq, 6)
    assert torch.equal(gates, gates[:, :1].expand_as(gates))
    assert (gates > 0).sum(-1).eq(2).all()
    assert len({tuple(g.nonzero().flatten().tolist()) for g in gates[:, 0]}) > 1
    # the balance loss counts sequences, not tokens
    inputs = router.aux_inputs(routing, None)
    assert inputs.probs.shape == (batch, 6) and inputs.selected.sum() == batch * 2


def test_params_are_validated():
    with pytest.raises(ValueError, match=r"pooler.*allowed values: \['mean', 'last', 'max', 'attn'\]"):
        MoLoraConfig(router="prompt", router_kwargs={"pooler": "cls"})
    with pytest.raises(ValueError, match="activation"):
        MoLoraConfig(router="prompt", router_kwargs={"activation": "sigmoid"})
    with pytest.raises(ValueError, match="unknown key.*'pool' -> 'pooler'"):
        MoLoraConfig(router="prompt", router_kwargs={"pool": "mean"})
    cfg = MoLoraConfig(router="prompt", router_kwargs={"pooler": "max", "activation": "gelu", "gate_mode": "raw"})
    assert cfg.router_kwargs["pooler"] == "max"


def test_router_needs_batch_and_sequence_layout():
    with pytest.raises(ValueError, match=r"\[batch, seq, d_in\]"):
        PromptRouter(4, 3, 1)(torch.randn(5, 4))


# -- a tiny Llama ----------------------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 33, 8, 41, 12, 60], [70, 22, 9], [44, 3, 81, 27, 19]]


def prompt_model(seed: int = 0, **router_kwargs):
    config = MoLoraConfig(
        r=4,
        lora_alpha=16,
        num_experts=4,
        top_k=2,
        router="prompt",
        router_kwargs=router_kwargs,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(make_llama(seed), config).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for layer in routers_of(model):
            layer.weight.mul_(8)  # decisions that differ between prompts and matter for the outputs
    return model


def bank_or_module(router_kwargs: dict, **overrides) -> MoLoraConfig:
    """A prompt-router config in bank mode (``{}``) or MiLoRA module mode (one LoRA per projection)."""
    kwargs = dict(
        r=2,
        num_experts=1 if router_kwargs else 4,
        top_k=2,
        router="prompt",
        router_kwargs=router_kwargs,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    return MoLoraConfig(**{**kwargs, **overrides})


def routers_of(model) -> list[PromptRouter]:
    return [m.molora_router["default"] for m in model.modules() if isinstance(m, MoLoraLayer)]


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def test_generate_with_cache_equals_recomputing_the_prompt_decision_every_step():
    model = prompt_model()
    ids, mask = padded(PROMPTS, "left")
    cached = greedy(model, ids, mask)

    # token by token without a KV cache, re-feeding the whole sequence; the decision comes from the prompt columns
    seq, full_mask = ids, mask
    with torch.no_grad(), model.molora_prompt_mask(mask):
        for _ in range(cached.shape[1]):
            logits = model(input_ids=seq, attention_mask=full_mask, position_ids=positions(full_mask)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
    assert torch.equal(seq[:, ids.shape[1] :], cached)
    with model.molora_prompt_mask(mask):
        assert torch.equal(greedy(model, ids, mask, use_cache=False), cached)

    # the decision matters: routing from the whole growing sequence instead of the prompt changes the outputs
    with torch.no_grad():
        recomputed = model(input_ids=seq, attention_mask=full_mask, position_ids=positions(full_mask)).logits
        with model.molora_prompt_mask(mask):
            from_prompt = model(input_ids=seq, attention_mask=full_mask, position_ids=positions(full_mask)).logits
    assert not torch.allclose(recomputed[:, -1], from_prompt[:, -1], atol=1e-3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_routes_each_sample_from_its_own_tokens(side):
    model = prompt_model()
    ids, mask = padded(PROMPTS, side)
    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        decisions = torch.stack([r._cached.sequence.probs for r in routers_of(model)], 1)  # [B, routers, E]
        for i, prompt in enumerate(PROMPTS):
            alone = model(input_ids=torch.tensor([prompt])).logits[0]
            alone_decision = torch.stack([r._cached.sequence.probs[0] for r in routers_of(model)])
            torch.testing.assert_close(batch_logits[i, mask[i].bool()], alone, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(decisions[i], alone_decision, atol=1e-5, rtol=1e-5)
    # samples do get different decisions (otherwise this test could not see a leak between them)
    assert not torch.allclose(decisions[0], decisions[1], atol=1e-3)


def test_greedy_generation_in_a_padded_batch_equals_each_sample_alone():
    model = prompt_model()
    ids, mask = padded(PROMPTS, "left")
    batch = greedy(model, ids, mask)
    for i, prompt in enumerate(PROMPTS):
        alone = greedy(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(batch[i], alone[0])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_static_cache_generation_sees_the_padding(attention):
    # with a static KV cache generate() passes a prepared 4-d mask ([batch, 1, query, key]; bool for sdpa, float
    # for eager attention) instead of the 2-d one: the padding must still be found, or the padded prompt's pooled
    # representation (and so its experts) would include the pad tokens
    model = prompt_model()
    model.base_model.model.config._attn_implementation = attention
    ids, mask = padded(PROMPTS, "left")
    model.reset_routing_stats()
    dynamic = greedy(model, ids, mask)
    dynamic_tokens = next(iter(model.get_routing_stats().values())).tokens
    model.reset_routing_stats()
    static = greedy(model, ids, mask, cache_implementation="static")
    # the statistics count the real tokens only: the prompts' and 5 routed decode steps per sequence
    static_tokens = next(iter(model.get_routing_stats().values())).tokens
    assert static_tokens == dynamic_tokens == sum(map(len, PROMPTS)) + 3 * 5
    assert torch.equal(static, dynamic)
    for i, prompt in enumerate(PROMPTS):
        alone = greedy(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(static[i], alone[0])


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_static_cache_masks_per_attention_type_see_the_padding(arch):
    """Qwen2/3 and Gemma2/3 pass a dict of prepared masks (one per attention type) with a static KV cache: the padding
    must be found there too (the statistics counted it and the padded prompt's decision pooled it)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
    sizes.update(num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    if arch == "qwen2":
        base = Qwen2ForCausalLM(Qwen2Config(**sizes))
    else:
        base = Gemma2ForCausalLM(Gemma2Config(head_dim=16, sliding_window=4, **sizes))
    config = MoLoraConfig(
        r=4, num_experts=4, top_k=2, router="prompt", init_lora_weights=False, target_modules=["q_proj"]
    )
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for router in routers_of(model):
            router.weight.mul_(8)
    ids, mask = padded(PROMPTS, "left")
    model.reset_routing_stats()
    static = greedy(model, ids, mask, cache_implementation="static")
    tokens = {s.tokens for s in model.get_routing_stats().values()}
    assert tokens == {sum(map(len, PROMPTS)) + 3 * 5}
    assert torch.equal(static, greedy(model, ids, mask))
    for i, prompt in enumerate(PROMPTS):
        alone = greedy(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(static[i], alone[0])


def test_beam_search_and_changing_batch_sizes_between_calls():
    model = prompt_model()
    ids, mask = padded(PROMPTS, "left")
    beams = greedy(model, ids, mask, num_beams=2)
    first = torch.tensor([PROMPTS[0]])
    alone = greedy(model, first, torch.ones_like(first), num_beams=2)
    assert torch.equal(beams[0], alone[0])
    # the batch-1 call did not inherit the batch-3 decisions, and a new batch-3 call does not inherit batch 1's
    assert torch.equal(greedy(model, ids, mask, num_beams=2), beams)


@pytest.mark.parametrize("module_mode", [False, True])
def test_continuing_a_conversation_after_another_keeps_its_own_decision(module_mode):
    """Interleaved requests: conversation A's second turn continues A's KV cache after conversation B was generated.
    A keeps the decision of its own prefill (kept with its cache; it took B's, silently), also from a deep copy."""

    if module_mode:
        config = MoLoraConfig(
            r=4,
            num_experts=1,
            top_k=3,
            router="prompt",
            router_kwargs={"milora_mode": "module"},
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(make_llama(), config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "molora_B" in name or "molora_milora" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    else:
        model = prompt_model()
    with torch.no_grad():
        right_away, other, after_b = interleaved_conversations(model)
    assert torch.equal(after_b, right_away)
    assert not torch.equal(other[:, -4:], right_away[:, -4:])


def test_a_hand_written_decoding_loop_keeps_each_prefills_decision_with_the_cache_it_created():
    """``out = model(input_ids=A)`` lets the model create its KV cache; another prefill (another request) runs; A's
    decode step with ``out.cache`` reads A's decision (it read the other prefill's, silently when that prompt was not
    longer: only caches passed in the call got their decisions)."""
    model = prompt_model()
    torch.manual_seed(0)
    a, b, step = torch.randint(3, 90, (1, 6)), torch.randint(3, 90, (1, 4)), torch.randint(3, 90, (1, 1))
    with torch.no_grad():
        with model.molora_prompt_mask(torch.ones(1, 6, dtype=torch.long)):
            expected = model(input_ids=torch.cat([a, step], 1), use_cache=False).logits[:, -1]
        first = model(input_ids=a, use_cache=True)
        cache = first["cache"] if "cache" in first else first["past_key_values"]
        model(input_ids=b, use_cache=True)
        got = model(input_ids=step, cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_kv_cache_keeps_only_its_prefill_decisions_and_pickles():
    """The decisions kept with a KV cache are those made in the prefill that filled it (another adapter's routers,
    which did not run there, attached their older decisions too, and continuing the cache with that adapter then
    used them instead of failing), and the cache can still be pickled (a weak reference kept with it could not)."""
    import pickle

    model = prompt_model()
    model.add_adapter("second", model.peft_config["default"])
    q = torch.randint(3, 90, (3, 20), generator=torch.Generator().manual_seed(0))
    a_ids, a_mask = padded(PROMPTS, "left")
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.set_adapter("second")
        model.generate(input_ids=q, attention_mask=torch.ones_like(q), **kwargs)
        model.set_adapter("default")
        first = model.generate(input_ids=a_ids, attention_mask=a_mask, return_dict_in_generate=True, **kwargs)
        kept = first.past_key_values.__dict__["_molora_prompt_decisions"]
        routers = {n: m for n, m in model.named_modules() if isinstance(m, PromptRouter)}
        assert {id(m) for n, m in routers.items() if n.endswith(".default")} == set(kept)
        restored = pickle.loads(pickle.dumps(first.past_key_values))
        assert restored.__dict__["_molora_prompt_decisions"].keys() == kept.keys()
        model.set_adapter("second")
        turn2 = torch.cat([first.sequences, torch.full((3, 1), 30)], 1)
        turn2_mask = torch.cat([a_mask, torch.ones(3, turn2.shape[1] - a_mask.shape[1], dtype=torch.long)], 1)
        stale = r"holds \d+ tokens but the cached decision was made after a prefill of 20"
        with pytest.raises(ValueError, match=stale):
            model.generate(input_ids=turn2, attention_mask=turn2_mask, cache=first.past_key_values, **kwargs)


@pytest.mark.parametrize("how", ["prompt_lookup", "assistant"])
def test_assisted_decoding_routes_from_the_prompt_and_equals_greedy(how):
    """Assisted and prompt-lookup decoding verify candidate tokens in the same first forward as the prompt, then crop
    the KV cache to the accepted ones: the decision pools the prompt only (``MoLoraModel.generate`` tells the runtime
    its length) and survives the crop (it raised, the cache being "shorter than the prefill"). Greedy either way."""
    model = prompt_model()
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])  # repeating n-grams: prompt lookup proposes at once
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    if how == "prompt_lookup":
        extra = {"prompt_lookup_num_tokens": 3}
    else:
        extra = {"assistant_model": make_llama(seed=5)}
    with torch.no_grad():
        reference = model.generate(input_ids=ids, eos_token_id=None, **kwargs)
        assisted = model.generate(input_ids=ids, eos_token_id=None, **kwargs, **extra)
    assert torch.equal(assisted, reference)
    assert model.base_model.molora_runtime._generation_prompt_length is None  # only during the call


def test_decode_step_that_does_not_follow_its_prefill_raises():
    """A decode step whose cache holds no decision (filled without the adapter: nothing routed there) reads the
    routers' last one, which must fit it."""
    model = prompt_model()
    one, short = torch.tensor([PROMPTS[0]]), torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        with model.disable_adapter():
            cache = model(input_ids=one, use_cache=True).past_key_values
            short_cache = model(input_ids=short, use_cache=True).past_key_values
        model(input_ids=torch.tensor(PROMPTS[1:2] * 2))  # a prefill of another batch replaces the decision
        with pytest.raises(ValueError, match="batch of 2 sequences"):
            model(input_ids=one[:, :1], cache=cache, use_cache=True)
        model(input_ids=one)  # a 7-token prefill; a 3-token cache cannot belong to it
        with pytest.raises(ValueError, match="holds 3 tokens"):
            model(input_ids=short[:, :1], cache=short_cache, use_cache=True)
    fresh = prompt_model()
    with torch.no_grad(), pytest.raises(RuntimeError, match="no prompt decision"):
        fresh(input_ids=one[:, :1], cache=cache, use_cache=True)


def test_training_routes_from_the_prompt_tokens_only():
    model = prompt_model()
    model.train()
    prompt = torch.tensor(PROMPTS[0])
    ids = torch.cat([prompt, torch.tensor([11, 12, 13, 14])])[None]
    labels = ids.clone()
    labels[:, : len(prompt)] = -100

    def decision(input_ids, labels=None):
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
        return out, torch.stack([r._cached.sequence.probs for r in routers_of(model)])

    out, base = decision(ids, labels)
    other = ids.clone()
    other[:, len(prompt) :] = torch.tensor([50, 51, 52, 53])
    other_labels = other.clone()
    other_labels[:, : len(prompt)] = -100
    assert torch.equal(decision(other, other_labels)[1], base)  # completion tokens never reach the decision
    # ... and the decision equals routing the prompt alone (as at inference)
    with torch.no_grad():
        model(input_ids=prompt[None])
    torch.testing.assert_close(torch.stack([r._cached.sequence.probs for r in routers_of(model)]), base)
    # without labels every token is the prompt, so the same completion change does move the decision
    assert not torch.allclose(decision(ids)[1], decision(other)[1])

    # the routers are trained by the LM loss through the soft gates, plus the balance loss over sequences
    assert set(model.molora_aux_losses()) == {"balance"}
    out.loss.backward()
    grads = [r.weight.grad for r in routers_of(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("router_kwargs", [{}, {"milora_mode": "module"}], ids=["bank", "module"])
def test_a_later_unsupervised_turn_does_not_steer_an_earlier_answer(router_kwargs):
    """Multi-turn chat labels (TRL's ``assistant_only_loss``): user turn, answer, user turn, answer, the user turns
    -100. The decision comes from the first turn only: the first answer's logits are causal (a later user turn moved
    them by 0.7) and equal generating it from its prompt."""
    model = get_peft_model(make_llama(), bank_or_module(router_kwargs, r=4)).eval()
    for router in (m for m in model.modules() if isinstance(m, PromptRouter)):
        with torch.no_grad():
            router.weight.mul_(8)
    user1, answer1, answer2 = PROMPTS[0], [11, 12, 13], [14, 15]

    def logits(user2):
        ids = torch.tensor([user1 + answer1 + user2 + answer2])
        labels = torch.full_like(ids, -100)
        labels[0, len(user1) : len(user1) + len(answer1)] = ids[0, len(user1) : len(user1) + len(answer1)]
        labels[0, -len(answer2) :] = ids[0, -len(answer2) :]
        with torch.no_grad():
            return model(input_ids=ids, labels=labels).logits[:, : len(user1) + len(answer1)]

    first = logits([70, 22, 9])
    torch.testing.assert_close(logits([44, 3, 81, 27]), first)  # causal: the later user turn changes nothing
    with torch.no_grad():  # ... and the first turn is routed as generating the first answer routes it (its prefill)
        prefill = model(input_ids=torch.tensor([user1])).logits
    torch.testing.assert_close(prefill, first[:, : len(user1)], atol=1e-5, rtol=1e-5)


def test_attention_pooling_query_is_saved_and_loaded_with_the_adapter(tmp_path):
    model = prompt_model(pooler="attn")
    with torch.no_grad():
        for router in routers_of(model):
            router.pool_query.normal_()
    ids, mask = padded(PROMPTS, "left")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(k.endswith("molora_router.pool_query") for k in keys) == len(routers_of(model))
    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected)


def test_save_load_roundtrip_and_no_cached_decision_in_the_state_dict(tmp_path):
    model = prompt_model(pooler="last")
    ids, mask = padded(PROMPTS, "left")
    expected = greedy(model, ids, mask)  # leaves a cached decision in every router
    assert all(r._cached is not None for r in routers_of(model))
    with torch.no_grad():
        expected_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    suffixes = {key.split("molora_", 1)[1] for key in tensors}
    assert suffixes == {"A.weight", "B.weight", "router.weight"}
    assert len(tensors) == 3 * 14

    loaded = PeftModel.from_pretrained(make_llama(0), tmp_path).eval()
    assert loaded.peft_config["default"].router_kwargs == {"pooler": "last"}
    assert all(r._cached is None for r in routers_of(loaded))
    with torch.no_grad():
        got_logits = loaded(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert torch.equal(got_logits, expected_logits)
    assert torch.equal(greedy(loaded, ids, mask), expected)


def test_recipe_builds_a_prompt_router_config():
    yaml = pytest.importorskip("yaml")
    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "milora.yaml").read_text())
    assert set(recipe) == {"model", "adapter", "training"} and recipe["model"]["name_or_path"] is None
    config = MoLoraConfig(**recipe["adapter"])
    assert config.router == "prompt" and config.router_kwargs["pooler"] == "mean"
    assert recipe["training"]["packing"] is False and recipe["training"]["completion_only_loss"] is True


def test_recipe_packing_for_the_prompt_router():
    """``molora sft`` trains the prompt router on TRL's ``"bfd"`` packing and ``padding_free`` rows (each sequence
    whole, with its own position_ids; compiled too) and refuses, before loading a model, the strategies that cut
    sequences (``"wrapped"``: no boundary left to find; ``"bfd_split"``: a sequence's end without its prompt)."""
    from molora.training.recipe import RecipeError, validate

    adapter = {"router": "prompt", "num_experts": 4, "top_k": 1}
    for training in (
        {"packing": True},
        {"packing": True, "packing_strategy": "bfd", "torch_compile": True},
        {"padding_free": True},
    ):
        validate({"adapter": adapter, "training": training})
    refused = {
        "wrapped": "training.packing_strategy='wrapped' cannot train router='prompt'.*runs each row on across them",
        "bfd_split": "training.packing_strategy='bfd_split' cannot train router='prompt'.*without its prompt",
    }
    for strategy, message in refused.items():
        training = {"packing": True, "packing_strategy": strategy}
        with pytest.raises(RecipeError, match=message):
            validate({"adapter": adapter, "training": training})
        validate({"adapter": {**adapter, "router": "topk", "top_k": 2}, "training": training})


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"packing_strategy": "wrapped"}, "packing_strategy='wrapped' cannot train router='prompt'"),
        ({"packing_strategy": "bfd_split"}, "packing_strategy='bfd_split' cannot train router='prompt'"),
        ({"packing_strategy": "bfd"}, None),
    ],
    ids=["wrapped", "bfd_split", "bfd"],
)
def test_callback_checks_trl_packing_for_the_prompt_router(tmp_path, options, refused):
    """Through ``SFTTrainer`` with ``MoLoraCallback``: a packing the prompt router cannot train with fails at
    ``on_train_begin``, naming the adapter and the option; ``"bfd"`` packing passes, and token-level adapters pass
    every packing."""
    pytest.importorskip("trl")
    from conftest import sft_args
    from transformers import TrainerControl, TrainerState

    from molora.training import MoLoraCallback

    args = sft_args(tmp_path, packing=True, **options)
    model = get_peft_model(make_llama(), bank_or_module({}))
    if refused is None:
        MoLoraCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    else:
        with pytest.raises(ValueError, match=f"SFTConfig: adapter 'default': {refused}"):
            MoLoraCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    token_level = get_peft_model(make_llama(), MoLoraConfig(r=2, num_experts=4, top_k=2, task_type="CAUSAL_LM"))
    MoLoraCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=token_level)


@pytest.mark.parametrize("router_kwargs", [{}, {"milora_mode": "module"}], ids=["bank", "module"])
def test_prompt_router_on_tokens_flattened_in_order(router_kwargs):
    """OPT feeds its MLP the tokens as ``[batch * seq, d]``: the prompt router stopped there ("needs the layer input
    as [batch, seq, d_in]") with molora's default targets; the call's layout restores the sequences, and a padded
    sample is routed as it is alone."""
    from conftest import make_opt

    model = get_peft_model(make_opt(), bank_or_module(router_kwargs)).eval()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, 3:], attention_mask=mask[:1, 3:]).logits
    torch.testing.assert_close(batched[:1, 3:], alone, atol=1e-4, rtol=1e-4)


PACKED_ROUTERS = [
    ({}, {}),
    ({"milora_mode": "module"}, {}),
    ({"pooler": "last"}, {"num_experts": 4}),
    ({"pooler": "max"}, {"num_experts": 4}),
    ({"pooler": "attn"}, {"num_experts": 4}),
]


def _packed(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed row of ``sequences`` and its position_ids (restarting at every sequence), as TRL's padding-free
    collator builds them."""
    return torch.cat(sequences)[None], torch.cat([torch.arange(len(s)) for s in sequences])[None]


@pytest.mark.parametrize(("router_kwargs", "overrides"), PACKED_ROUTERS, ids=["bank", "module", "last", "max", "attn"])
def test_packed_rows_route_each_sequence(router_kwargs, overrides):
    """A packed / padding-free row (TRL's ``packing=True``: position_ids restarting, no attention_mask) holds several
    sequences: each gets its own decision, from its own prompt, so every token's logits are those of its sequence
    alone (one decision per row pooled across them: 0.96 away). With labels the prompt of each sequence ends at its
    own first supervised token (a sequence supervised throughout is routed from all its tokens, as alone)."""
    model = get_peft_model(make_llama(), bank_or_module(router_kwargs, **overrides)).eval()
    sequences = [torch.tensor(p) for p in PROMPTS]
    ids, positions = _packed(sequences)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        alone = torch.cat([model(input_ids=s[None]).logits for s in sequences], 1)
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
        # the prompt from the labels: the first two tokens of each sequence (the rest would move the decisions), all
        # the tokens of the second one, whose every token is supervised
        labels = [s.clone() for s in sequences]
        for label in labels[::2]:
            label[:2] = -100
        # TRL's padding-free collator also masks each sequence's first label (no sequence predicts the next one's
        # first token): the second sequence is still supervised throughout, as alone
        packed_labels = torch.cat([torch.cat([label.new_full((1,), -100), label[1:]]) for label in labels])[None]
        packed = model(input_ids=ids, position_ids=positions, labels=packed_labels, use_cache=False)
        alone = [model(input_ids=s[None], labels=label[None]).logits for s, label in zip(sequences, labels)]
        torch.testing.assert_close(packed.logits, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
        # a padding-free row holding one sequence (position_ids, no mask): its first label is masked too, and it is
        # still routed from all its tokens when the rest are supervised
        second = slice(len(sequences[0]), len(sequences[0]) + len(sequences[1]))  # supervised throughout
        alone = model(input_ids=ids[:, second], labels=ids[:, second]).logits
        single = model(input_ids=ids[:, second], position_ids=positions[:, second], labels=packed_labels[:, second])
        single = single.logits
        torch.testing.assert_close(single, alone, atol=1e-5, rtol=1e-5)
        # explicit position_ids of one sequence per row are one sequence per row; so is a row with a mask (which is
        # how one marks padding, not sequences)
        one = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits
        torch.testing.assert_close(one, model(input_ids=ids).logits)
        masked = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids)).logits
        assert masked.isfinite().all()


@pytest.mark.parametrize("router_kwargs", [{}, {"milora_mode": "module"}], ids=["bank", "module"])
def test_packed_training_matches_the_padded_batch(router_kwargs):
    """A training forward of a packed row gives the loss, the balance and z losses (over sequences) and the gradients
    of the same sequences as a right-padded batch with their attention mask."""
    config = bank_or_module(router_kwargs, aux_loss_coef=0.1, z_loss_coef=0.01)
    model = get_peft_model(make_llama(), config).train()
    sequences = [torch.tensor(p) for p in PROMPTS]
    labels = [s.clone() for s in sequences]
    for label in labels:
        label[:2] = -100
    ids, positions = _packed(sequences)
    width = max(len(s) for s in sequences)
    batch = torch.zeros(len(sequences), width, dtype=torch.long)
    batch_labels = torch.full_like(batch, -100)
    mask = torch.zeros_like(batch)
    for row, (sequence, label) in enumerate(zip(sequences, labels)):
        batch[row, : len(sequence)], batch_labels[row, : len(label)], mask[row, : len(sequence)] = sequence, label, 1
    packed = _training_step(model, model, input_ids=ids, position_ids=positions, labels=torch.cat(labels)[None])
    _assert_same_step(packed, _training_step(model, model, input_ids=batch, attention_mask=mask, labels=batch_labels))


def _training_step(model, run, **kwargs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss, aux loss, gradients)`` of one forward and backward of ``run`` (``model`` or a compiled copy)."""
    model.zero_grad(set_to_none=True)
    out = run(**kwargs, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), model.molora_aux_loss().detach(), grads


def _assert_same_step(step, expected) -> None:
    (loss, aux, grads), (expected_loss, expected_aux, expected_grads) = step, expected
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(aux, expected_aux)
    # (module mode's layer routers are `molora_milora.<adapter>.<layer>`)
    assert aux > 0 and grads.keys() == expected_grads.keys() and any("_router" in n or "milora" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("router_kwargs", [{}, {"milora_mode": "module"}], ids=["bank", "module"])
def test_packed_training_compiles_like_eager(router_kwargs):
    """``torch.compile`` of the model trains packed rows as eager does (loss, aux losses, every gradient). The
    sequences' count and lengths are host values: the runtime finds them before the forward, outside the graph (read
    back inside it, they broke the graph in every layer, and the aux losses' gradients went wrong; before packing was
    supported the compiled router pooled across the sequences without a word)."""
    config = bank_or_module(router_kwargs, aux_loss_coef=0.1, z_loss_coef=0.01)
    model = get_peft_model(make_llama(), config).train()
    ids, positions = _packed([torch.tensor(p) for p in PROMPTS])
    labels = ids.masked_fill(positions == 0, -100)
    eager = _training_step(model, model, input_ids=ids, position_ids=positions, labels=labels)
    compiled = torch.compile(model, backend="aot_eager")
    _assert_same_step(_training_step(model, compiled, input_ids=ids, position_ids=positions, labels=labels), eager)


@pytest.mark.parametrize("data", ["prompt_completion", "text"])
def test_sft_packing_trains_the_prompt_router(tmp_path, data):
    """``SFTTrainer(packing=True)`` (TRL's default ``"bfd"`` strategy: padding-free rows): the rows its collator builds
    give the loss and aux losses of the same sequences in the padded batch its unpacked collator builds, and training
    runs with ``MoLoraCallback``. Prompt-completion data masks the prompts; plain text masks nothing unpacked, and
    packed only each sequence's first token (TRL's padding-free collator does): read as a one-token prompt, every
    sequence starting with the same token got the same decision (0.82 away from the unpacked logits)."""
    trl = pytest.importorskip("trl")
    from conftest import CHAR_VOCAB, make_char_tokenizer, sft_args, text_dataset
    from datasets import Dataset

    from molora.training import MoLoraCallback

    words = ["red fox", "blue cat", "green owl", "gray wolf"]
    rows = [{"prompt": f"say {words[i % 4]}:", "completion": f" {words[i % 4][::-1]}."} for i in range(16)]
    trainer = trl.SFTTrainer(
        model=make_llama(vocab_size=CHAR_VOCAB),
        args=sft_args(tmp_path, packing=True, max_length=64, max_steps=3, per_device_train_batch_size=4),
        train_dataset=Dataset.from_list(rows) if data == "prompt_completion" else text_dataset(16),
        processing_class=make_char_tokenizer(),
        peft_config=bank_or_module({}, aux_loss_coef=0.1),
        callbacks=[MoLoraCallback()],
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    pieces = list(zip(starts[:-1], starts[1:]))
    assert len(pieces) >= 4  # several sequences in one row
    width = max(b - a for a, b in pieces)
    padded_ids = torch.zeros(len(pieces), width, dtype=torch.long)
    padded_labels = torch.full_like(padded_ids, -100)
    mask = torch.zeros_like(padded_ids)
    for row, (a, b) in enumerate(pieces):
        padded_ids[row, : b - a] = batch["input_ids"][0, a:b]
        # the unpacked collator's labels: the prompt masked, the first token of plain text not
        padded_labels[row, : b - a] = batch["labels" if data == "prompt_completion" else "input_ids"][0, a:b]
        mask[row, : b - a] = 1
    model = trainer.model.eval()
    with torch.no_grad():
        # (use_cache=False as TRL calls the model: transformers keeps packed sequences apart only without a cache)
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False
        )
        packed_aux = model.molora_aux_loss()
        alone = model(input_ids=padded_ids, attention_mask=mask, labels=padded_labels)
        torch.testing.assert_close(packed.loss, alone.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_aux, model.molora_aux_loss(), atol=1e-6, rtol=1e-5)
    model.train()
    trainer.train()
    assert trainer.state.global_step == 3


def test_token_level_routers_accept_packed_rows():
    """Routing per token needs no sequence boundaries: a packed row gives each sequence's own logits (transformers
    masks the packed row block-diagonally from its position_ids)."""
    adapter = MoLoraConfig(r=2, num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(make_llama(), adapter).eval()
    a, b = torch.tensor([PROMPTS[0]]), torch.tensor([PROMPTS[2]])
    restart = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    with torch.no_grad():
        # (as in training: with a KV cache transformers would not read the position_ids as boundaries)
        packed = model(input_ids=torch.cat([a, b], 1), position_ids=restart, use_cache=False).logits
        separate = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
