"""``torch.compile`` on a MoLoRA model: one graph for the whole model, no recompilation from step to step, and the same
loss, gradients and routing statistics as eager, whoever computes the loss.

Compiled, the per-layer bookkeeping (:meth:`molora.runtime.MoLoraRuntime.record`: statistics and aux losses) is
traced into the graph as dict stores; the only code left out of it is the model-level ``begin_forward`` /
``end_forward`` (Python state: statistics commits, the loss probe), so a training step breaks the graph at its start
and its end and nowhere else. The aux-loss gradient's fallback delivery (for a loss computed from the logits, or
from ``outputs.log_probs`` as TRL's ``SFTTrainer`` does) is then one node per differentiable output instead of one
per layer: ``test_compiled_logits_loss_trains_the_routers`` and the SFT test fail without it. The ``eager`` backend
exercises Dynamo's tracing without generating code (seconds); one slow test (`-m slow`) runs inductor.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo as dynamo
from conftest import VOCAB, OneProjection, interleaved_conversations, make_llama
from peft import get_peft_model

import molora

# compiling takes 10-50 s a test on a 2-core CPU (about 6 minutes for the file): the whole file runs with the slow
# tests (`pytest -m slow`, and in CI); the compiled prompt-router and MiLoRA module-mode tests stay in the default run
pytestmark = pytest.mark.slow


def _model(cfg):
    return get_peft_model(make_llama(seed=1), cfg).train()


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_IDS = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
_MASK = torch.ones_like(_IDS)
_MASK[0, :2] = 0  # left padding in the first sequence: 14 real tokens


def _loss(model, mode: str, mask: torch.Tensor | None) -> torch.Tensor:
    if mode == "labels":
        return model(input_ids=_IDS, attention_mask=mask, labels=_IDS).loss
    # a trainer that computes its own (scaled) loss from the logits and never reads outputs.loss
    logits = model(input_ids=_IDS, attention_mask=mask).logits
    targets = _IDS[:, 1:].reshape(-1)
    return 0.5 * torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)


def _train(
    cfg, mode: str, backend: str | None, steps: int = 2, mask: torch.Tensor | None = _MASK, base_forward: bool = False
):
    """``steps`` forward/backward passes; returns the model, the last loss, the graph-break reasons, the number of
    graphs and the recompilation messages (``backend=None``: eager). ``base_forward``: compile the base model's
    ``forward`` with ``fullgraph=True`` instead of the whole ``PeftModel``."""
    model = _model(cfg)
    dynamo.reset()
    dynamo.utils.counters.clear()
    handler, logger = _Messages(), logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        # torch's loggers do not propagate to the root logger: listen on Dynamo's own, with recompile reasons on
        with dynamo.config.patch(recompile_limit=8):
            torch._logging.set_logs(recompiles=True)
            run = torch.compile(model, backend=backend) if backend and not base_forward else model
            if backend and base_forward:
                base = model.get_base_model()
                base.forward = torch.compile(base.forward, backend=backend, fullgraph=True)
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                loss = _loss(run, mode, mask)
                loss.backward()
        breaks = dict(dynamo.utils.counters["graph_break"])
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
        dynamo.reset()
    return model, loss.detach(), breaks, graphs, handler.messages


def _assert_same_training(model, loss, eager, eager_loss, atol=None, tokens=2 * 14):
    tol = {} if atol is None else {"atol": atol, "rtol": atol}
    torch.testing.assert_close(loss, eager_loss, **tol)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    eager_grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == eager_grads.keys() == trainable and len(trainable) >= 42  # >= A, B, router of 14 layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], msg=name, **tol)
    stats, eager_stats = model.get_routing_stats(), eager.get_routing_stats()
    assert stats.keys() == eager_stats.keys() and len(stats) == 14
    for name, value in stats.items():
        assert value.tokens == eager_stats[name].tokens == tokens  # default: two steps of 14 real tokens
        torch.testing.assert_close(torch.tensor(value.load), torch.tensor(eager_stats[name].load), msg=name)


def _compiled_like_eager(cfg, mode, backend="eager", atol=None, tokens=2 * 14, **train_kwargs):
    """Train ``cfg`` eagerly and compiled with ``backend``; check one graph and the same training. Returns
    ``(eager_model, compiled_model)``."""
    eager, eager_loss, *_ = _train(cfg, mode, None, **train_kwargs)
    model, loss, breaks, graphs, _ = _train(cfg, mode, backend, **train_kwargs)
    assert graphs == 1, breaks
    _assert_same_training(model, loss, eager, eager_loss, atol=atol, tokens=tokens)
    return eager, model


@pytest.mark.parametrize("mode", ["labels", "logits"])
def test_compiled_model_is_one_graph_and_trains_like_eager(mode):
    # the default targets: all seven projections of both layers, 14 adapted layers; balance and z losses on
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, z_loss_coef=0.01)
    eager, eager_loss, *_ = _train(cfg, mode, None)
    model, loss, breaks, graphs, messages = _train(cfg, mode, "eager")

    # one graph, compiled once: the second step reuses it (no guard on per-forward state such as a step counter)
    assert graphs == 1, (graphs, breaks)
    recompiles = [m for m in messages if "Recompiling" in m or "recompile_limit" in m]
    assert recompiles == [], recompiles
    # the graph breaks only around the model-level calls, twice per step or less
    reasons = {reason.splitlines()[0][:60]: count for reason, count in breaks.items()}
    assert all("MoLoraRuntime.begin_forward" in r or "MoLoraRuntime.end_forward" in r for r in breaks), reasons
    assert sum(breaks.values()) <= 2 * 2, reasons
    _assert_same_training(model, loss, eager, eager_loss)


def test_compiled_grouped_path_trains_like_eager():
    """The default losses (balance on, z-loss off) on the grouped path: compiled, the top-k function's per-assignment
    gates had lost their gradient (test_fused_router.py::test_compiled_outputs_keep_their_gradients), so its routers
    learned from the balance loss alone. The adapted layers are compiled one by one: the grouped path runs outside the
    graph (its segment sizes are read on the host), and breaking a whole model's graph in every layer takes long."""
    cfg = molora.MoLoraConfig(
        r=4, num_experts=4, top_k=2, init_lora_weights=False, kernel="grouped", target_modules=["v_proj", "down_proj"]
    )
    eager, compiled = _model(cfg), _model(cfg)
    layers = [m for m in compiled.modules() if isinstance(m, molora.MoLoraLayer)]
    assert len(layers) == 4
    dynamo.reset()
    try:
        for layer in layers:
            layer.forward = torch.compile(layer.forward, backend="eager")
        losses = [_loss(model, "labels", _MASK) for model in (eager, compiled)]
        for loss in losses:
            loss.backward()
    finally:
        dynamo.reset()
    torch.testing.assert_close(losses[1], losses[0])
    eager_params = dict(eager.named_parameters())
    trainable = [(name, p) for name, p in compiled.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * 4  # A, B and router of each layer
    for name, param in trainable:
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, eager_params[name].grad, msg=name)


def test_compiled_bank_that_eager_runs_grouped_stays_one_graph():
    """A bank for which ``kernel="auto"`` takes the grouped path eagerly on a CPU (16 experts of rank 8 on a 1024-wide
    projection) takes the dense path while compiling: one graph (the grouped path runs outside it), same results."""
    config = molora.MoLoraConfig(r=8, num_experts=16, top_k=2, init_lora_weights=False, target_modules=["proj"])
    torch.manual_seed(0)
    model = get_peft_model(OneProjection(1024), config).train()
    layer = next(m for m in model.modules() if isinstance(m, molora.MoLoraLayer))
    x = torch.randn(2, 256, 1024, generator=torch.Generator().manual_seed(0))
    assert layer._resolve_kernel(512, "default", "auto", x.device) == "grouped"
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    dynamo.reset()
    dynamo.utils.counters.clear()
    try:
        out = torch.compile(model, backend="eager")(x)
        out.sum().backward()
        assert dynamo.utils.counters["stats"]["unique_graphs"] == 1
        breaks = dynamo.utils.counters["graph_break"]  # only where the model-level call starts and ends
        assert all("MoLoraRuntime.begin_forward" in r or "MoLoraRuntime.end_forward" in r for r in breaks), breaks
    finally:
        dynamo.reset()
    # dense and grouped sum in different orders: equal up to float32 rounding, over whole tensors
    params = dict(model.named_parameters())
    for name, value, expected in [("out", out, eager_out)] + [(n, params[n].grad, g) for n, g in eager_grads.items()]:
        assert (value - expected).norm() <= 1e-5 * expected.norm(), name


@pytest.mark.parametrize("mode", ["labels", "logits"])
def test_base_model_forward_compiles_with_fullgraph(mode):
    # the model-level begin/end calls are hooks on the base model, outside its forward: compiling that forward alone
    # (as transformers documents for generation) takes every adapted layer into one graph with fullgraph=True
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, z_loss_coef=0.01)
    eager, eager_loss, *_ = _train(cfg, mode, None)
    model, loss, breaks, graphs, messages = _train(cfg, mode, "eager", base_forward=True)
    assert graphs == 1 and breaks == {}, breaks
    assert [m for m in messages if "Recompiling" in m or "recompile_limit" in m] == []
    _assert_same_training(model, loss, eager, eager_loss)


def test_compiled_logits_loss_trains_the_routers():
    # the aux-loss gradient must reach the routers when the loss comes from the logits alone: a compiled model with
    # the aux losses off is the same model without that gradient, so its router gradients must differ
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, aux_loss_coef=0.5)
    model, *_ = _train(cfg, "logits", "eager", steps=1)
    off = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, aux_loss_coef=0.0)
    without, *_ = _train(off, "logits", "eager", steps=1)
    for name, param in model.named_parameters():
        if "molora_router" in name:
            other = dict(without.named_parameters())[name]
            assert not torch.allclose(param.grad, other.grad), name


def test_compiled_mixture_of_routers_is_one_graph():
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, router="mor")
    _compiled_like_eager(cfg, "logits", mask=None, tokens=2 * 16)


def test_compiled_loss_free_balancing_is_one_graph_and_updates_like_eager():
    # topk_bias (DeepSeek's loss-free balancing): the expert loads it sums for the bias update are staged by the
    # compiled code and recorded by the eager end of the forward, so the per-forward bookkeeping neither breaks the
    # graph nor recompiles it, and the biases move exactly as in eager (padding counts 0 in both)
    cfg = molora.MoLoraConfig(
        r=4, num_experts=4, top_k=2, init_lora_weights=False, router="topk_bias", aux_loss_coef=0.0
    )

    def run(backend):
        model = _model(cfg)
        dynamo.reset()
        dynamo.utils.counters.clear()
        forward = torch.compile(model, backend=backend) if backend else model
        for _ in range(3):
            forward(input_ids=_IDS, attention_mask=_MASK).logits.sum().backward()
            model.molora_on_optimizer_step()
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
        dynamo.reset()
        return {n: b.clone() for n, b in model.named_buffers() if "selection_bias" in n}, graphs

    eager, _ = run(None)
    compiled, graphs = run("eager")
    assert graphs == 1
    assert len(eager) == 14 and all(bias.abs().sum() > 0 for bias in eager.values())
    assert compiled.keys() == eager.keys()
    for name, bias in compiled.items():
        torch.testing.assert_close(bias, eager[name], msg=name)


@pytest.mark.parametrize(
    "options",
    [
        {"router": "prompt"},  # losses over sequences (MiLoRA-style), prompt from the labels
        # a selection of data-dependent size: every (token, expert) pair listed, weight 0 off the selection
        {"router": "topp"},
        {"balance_loss_type": "switch", "z_loss_coef": 0.01},  # not the fused top-k function's types
        # ~12 s each: in the slow run (CI runs it)
        *(
            pytest.param(options, marks=pytest.mark.slow)
            for options in (
                {"router": "soft"},
                {"router": "mor"},  # also test_compiled_mixture_of_routers_is_one_graph
                {"router": "topk_bias"},  # with its complementary balance loss
                {"router": "dynmole"},  # with its entropy loss
                {"router": "adamoe"},  # null experts
                {"balance_loss_type": "soft"},
            )
        ),
    ],
    ids=str,
)
def test_compiled_general_loss_path_with_padding_is_one_graph(options):
    # the aux losses outside the fused top-k function, over a padded batch: compiled, they weight the padding rows 0
    # instead of selecting the valid rows (a nonzero, which broke the graph in every layer), with eager's result
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, **options)
    _compiled_like_eager(cfg, "labels")


def test_compiled_relu_router_is_one_graph_and_adapts_lambda_like_eager():
    # ReMoE: a data-dependent number of experts per token, the L1 loss, and a lambda updated per optimizer step from
    # the sparsity that the compiled forwards observed
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, router="relu")
    eager, model = _compiled_like_eager(cfg, "labels")
    for trained in (eager, model):
        trained.molora_on_optimizer_step()
    routers = [m.molora_router["default"] for m in model.modules() if isinstance(m, molora.MoLoraLayer)]
    eager_routers = [m.molora_router["default"] for m in eager.modules() if isinstance(m, molora.MoLoraLayer)]
    assert [r.last_sparsity for r in routers] == [r.last_sparsity for r in eager_routers]
    assert routers[0].last_sparsity is not None
    assert [r._l1_coef_value for r in routers] == [r._l1_coef_value for r in eager_routers]


def test_compiled_dynamic_rank_is_one_graph_and_observes_like_eager():
    # DR-LoRA's routing-frequency sums selected the valid rows by a boolean mask: a graph break in every layer, and
    # the resumed frames recompiled past the limit (falling back to eager); a 0/1 row weight keeps one graph
    cfg = molora.MoLoraConfig(r=8, num_experts=4, top_k=2, init_lora_weights=False, dynamic_rank={"target_rank": 4})
    eager, model = _compiled_like_eager(cfg, "labels")
    for name, module in model.named_modules():
        if isinstance(module, molora.MoLoraLayer):
            state, other = module.molora_rank["default"], dict(eager.named_modules())[name].molora_rank["default"]
            assert state._freq_tokens.item() == other._freq_tokens.item() == 2 * 14
            torch.testing.assert_close(state._freq_sum, other._freq_sum)


def test_compiled_expert_choice_with_padding_is_one_graph():
    # expert_choice's capacity counts the real tokens: compiled, every expert takes the top capacity(T) tokens and
    # keeps the first k_c (a tensor), instead of reading the count back to the host (a graph break per layer)
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, router="expert_choice")
    _compiled_like_eager(cfg, "logits")


@pytest.mark.slow
def test_inductor_compiled_model_trains_like_eager():
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, z_loss_coef=0.01)
    _compiled_like_eager(cfg, "labels", backend="inductor", atol=1e-5)


@pytest.mark.parametrize("router", ["topk", pytest.param("soft", marks=pytest.mark.slow)])
def test_sft_trainer_with_torch_compile_trains_like_eager(tmp_path, router):
    # SFTConfig(torch_compile=True): the trainer compiles the PEFT model; TRL computes its own loss from the logits, so
    # the routers' aux-loss gradient comes through the model-level delivery node. Same loss curve as eager. (soft: the
    # general loss path on TRL's padded batches, weighted rows)
    trl = pytest.importorskip("trl")
    from conftest import CHAR_VOCAB, make_char_tokenizer, sft_args, text_dataset

    def train(compiled: bool):
        cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, task_type="CAUSAL_LM", aux_loss_coef=0.1, router=router)
        model = get_peft_model(make_llama(vocab_size=CHAR_VOCAB), cfg)
        routers = {n: p.detach().clone() for n, p in model.named_parameters() if "molora_router" in n}
        extra = {"torch_compile": True, "torch_compile_backend": "eager"} if compiled else {}
        args = sft_args(tmp_path / str(compiled), max_steps=4, per_device_train_batch_size=4, max_length=40, **extra)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=text_dataset(16), processing_class=make_char_tokenizer()
        )
        dynamo.reset()
        dynamo.utils.counters.clear()
        try:
            trainer.train()
            graphs = dynamo.utils.counters["stats"]["unique_graphs"]
        finally:
            dynamo.reset()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        moved = [n for n, p in model.named_parameters() if n in routers and not torch.equal(p, routers[n])]
        return losses, graphs, len(moved) == len(routers) == 14, model.get_routing_stats()

    eager_losses, _, eager_moved, eager_stats = train(False)
    losses, graphs, moved, stats = train(True)
    # a graph for the model (TRL's own metrics code adds a break), a recompile for dynamic sequence lengths
    assert 1 <= graphs <= 4, graphs
    assert moved and eager_moved
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-4)
    assert stats.keys() == eager_stats.keys()
    for name, value in stats.items():
        assert value.tokens == eager_stats[name].tokens > 0


@pytest.mark.slow  # ~30 s
def test_compiled_concat_reduction_and_tuple_outputs_behave_like_eager(recwarn):
    # loss_reduction="concat": through outputs.loss the same training as eager; from the logits alone, the same
    # warning as eager (the concatenated losses are not separable per router, nothing is delivered)
    cfg = molora.MoLoraConfig(
        r=4, num_experts=4, top_k=2, init_lora_weights=False, loss_reduction="concat", aux_loss_coef=0.5
    )
    # (with padding: the concatenated rows carry their padding weights)
    _compiled_like_eager(cfg, "labels")
    recwarn.clear()
    _train(cfg, "logits", "eager", steps=1)
    assert any("loss_reduction='concat'" in str(w.message) for w in recwarn.list)

    # return_dict=False: a tuple output; the delivery node wraps its logits
    plain = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False, aux_loss_coef=0.5)
    grads = {}
    for backend in (None, "eager"):
        model = _model(plain)
        run = torch.compile(model, backend=backend) if backend else model
        logits = run(input_ids=_IDS, attention_mask=_MASK, return_dict=False)[0]
        logits.float().logsumexp(-1).mean().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if "molora_router" in n}
        dynamo.reset()
    for name, grad in grads[None].items():
        torch.testing.assert_close(grads["eager"][name], grad, msg=name)


@pytest.mark.parametrize(("router", "cache"), [("topk", None), ("topk", "static"), ("prompt", None)])
def test_compiled_generation_matches_eager_without_graph_breaks(router, cache):
    # the way transformers documents compiled generation: compile the model's forward and call generate(); the
    # decode steps' cache of [A_flat | W_router^T] compares data pointers, which Dynamo cannot trace, so compiled
    # code skips it (it builds the matrix inside the graph); the prompt router's decode steps skip their cache-length
    # check there (reading the length, which grows every step, recompiled each one)
    cfg = molora.MoLoraConfig(
        r=4, num_experts=4, top_k=2, init_lora_weights=False, task_type="CAUSAL_LM", router=router
    )
    model = get_peft_model(make_llama(seed=1), cfg).eval()
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "cache_implementation": cache}
    eager = model.generate(input_ids=_IDS, attention_mask=_MASK, **kwargs)
    eager_tokens = model.get_routing_stats()["model.layers.0.self_attn.q_proj"].tokens
    model.reset_routing_stats()
    dynamo.reset()
    dynamo.utils.counters.clear()
    inner = model.base_model.model
    inner.forward = torch.compile(inner.forward, backend="eager")
    try:
        for _ in range(2):  # the second call reuses the compiled code
            model.reset_routing_stats()
            compiled = model.generate(input_ids=_IDS, attention_mask=_MASK, **kwargs)
            assert torch.equal(compiled, eager)
        breaks = dict(dynamo.utils.counters["graph_break"])
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        del inner.forward
        dynamo.reset()
    assert breaks == {}, breaks
    assert graphs <= 3, graphs  # the prefill, the decode step and its dynamic-shape recompile
    # 14 real prompt tokens, then 5 routed decode steps of 2 sequences
    assert model.get_routing_stats()["model.layers.0.self_attn.q_proj"].tokens == eager_tokens == 14 + 2 * 5


def test_compiled_decode_steps_read_the_decision_kept_with_their_cache():
    """Continuing conversation A from its KV cache after conversation B was generated uses A's prompt decisions also in
    compiled code: compiled decode steps read the router's current decision (the last prefill's, B's), and a compiled
    prefill attached none to its cache. The model's hooks, outside the graph, attach them after the prefill and restore
    them before each decode step; eager and compiled continuations are the same tokens."""
    cfg = molora.MoLoraConfig(
        r=4, num_experts=4, top_k=2, router="prompt", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    model = get_peft_model(make_llama(seed=1), cfg).eval()
    with torch.no_grad():
        eager = interleaved_conversations(model)
        dynamo.reset()
        inner = model.base_model.model
        inner.forward = torch.compile(inner.forward, backend="eager")
        try:
            compiled = interleaved_conversations(model)
        finally:
            del inner.forward
            dynamo.reset()
    right_away, other, after_b = compiled
    assert torch.equal(after_b, right_away) and not torch.equal(other[:, -4:], right_away[:, -4:])
    for got, expected in zip(compiled, eager):
        assert torch.equal(got, expected)


class _Logits(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_torch_export_leaves_the_runtime_state_alone_and_can_run_again():
    """``torch.export`` (non-strict) traces the model with fake tensors and replays none of its Python side effects:
    the routing records of that trace were kept as the model's pending statistics, so that reading the statistics
    afterwards, or a second export, failed on the fake tensors, and the last training forward's aux losses were
    replaced by fake ones. A trace now records nothing and commits nothing (the eager forwards before and after it
    count as usual), and an all-ones or padded mask is traced as a mask (no data-dependent check on it)."""
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "down_proj"])
    model = get_peft_model(make_llama(seed=1), cfg).train()
    model(input_ids=_IDS, attention_mask=_MASK, labels=_IDS)
    trained = {name: value.detach().clone() for name, value in model.molora_aux_losses().items()}
    assert "balance" in trained
    with torch.no_grad():
        torch.export.export(_Logits(model), (_IDS, torch.ones_like(_IDS)), strict=False)  # in train mode
        torch.testing.assert_close(model.molora_aux_losses(), trained)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=_IDS, attention_mask=_MASK).logits  # recorded, not yet committed
        for _ in range(2):
            program = torch.export.export(_Logits(model), (_IDS, _MASK), strict=False)
            torch.testing.assert_close(program.module()(_IDS, _MASK), expected)
        torch.testing.assert_close(model(input_ids=_IDS, attention_mask=_MASK).logits, expected)
    stats = model.get_routing_stats()
    assert set(stats) == {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")}
    # the three eager forwards, 14 real tokens each
    assert {s.tokens for s in stats.values()} == {42}


@pytest.mark.parametrize(
    "router, extra",
    [
        ("topk_bias", {}),
        ("relu", {}),
        ("prompt", {}),
        ("topk", {"r": 8, "dynamic_rank": {"target_rank": 6, "init_rank": 4}}),
    ],
)
def test_torch_export_of_a_training_model_feeds_no_per_step_state(router, extra):
    """Exported in train mode with autograd on (``torch.export`` does not switch it off), the trace is no training
    forward: the stateful routers observe nothing in it (the loss-free bias's accumulation staged its fake loads as
    in a compiled forward, and the end of the forward then looped forever committing them), and no state update is
    traced into the program. Two twin models, one exported between its training steps, end with the same state and
    statistics (ReMoE's sparsity, DR-LoRA's frequencies and the prompt router's decision included)."""
    cfg = molora.MoLoraConfig(
        **{"r": 4, **extra}, num_experts=4, top_k=2, router=router, target_modules=["q_proj", "down_proj"]
    )
    twins = [get_peft_model(make_llama(seed=1), cfg).train() for _ in range(2)]
    for i, model in enumerate(twins):
        for step in range(2):
            model(input_ids=_IDS, attention_mask=_MASK, labels=_IDS).loss.backward()
            if i == 0 and step == 0:
                program = torch.export.export(_Logits(model), (_IDS, _MASK), strict=False)
                # no state update traced into the program (running it would move the state), none kept in Python
                assert not program.graph_signature.buffers_to_mutate
                for name, module in model.named_modules():
                    state = getattr(module, "_cached", None)  # the prompt router's last decision
                    assert state is None or type(state.sequence.probs) is torch.Tensor, name
            model.molora_on_optimizer_step()
    exported, plain = twins
    buffers = dict(plain.named_buffers())
    for name, value in exported.named_buffers():
        assert type(value) is torch.Tensor, name
        torch.testing.assert_close(value, buffers[name], atol=0, rtol=0, msg=name)
    stats, plain_stats = exported.get_routing_stats(), plain.get_routing_stats()
    assert stats.keys() == plain_stats.keys()
    for name, value in stats.items():
        assert value.tokens == plain_stats[name].tokens == 2 * 14, name
        torch.testing.assert_close(value.load, plain_stats[name].load, atol=0, rtol=0)
