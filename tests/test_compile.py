"""``torch.compile`` on a MoLoRA model: same loss and gradients as eager, and no per-layer recompilation.

The runtime's per-layer bookkeeping (:meth:`molora.runtime.MoLoraRuntime.record`: routing statistics, aux losses,
the aux-gradient attachment) mutates Python state, so Dynamo graph-breaks there; it is excluded from compilation
(``torch.compiler.disable``), otherwise Dynamo compiled one variant of it per adapted layer (its guards see the
growing loss dict) and hit the recompile limit on any model with more than eight adapted projections. The ``eager``
backend exercises Dynamo's tracing without generating code (a few seconds).
"""

from __future__ import annotations

import logging

import torch
import torch._dynamo as dynamo
from conftest import VOCAB, make_llama
from peft import get_peft_model

import molora


def _model(cfg):
    return get_peft_model(make_llama(seed=1), cfg).train()


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_compiled_model_matches_eager_and_does_not_recompile_per_layer():
    # the default targets: all seven projections of both layers, 14 adapted layers
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    eager = _model(cfg)
    eager_loss = eager(input_ids=ids, labels=ids).loss
    eager_loss.backward()

    model = _model(cfg)
    dynamo.reset()
    # a per-layer recompilation exceeds Dynamo's limit of 8, which it logs (torch's loggers do not propagate to the
    # root logger, so listen on Dynamo's own)
    handler, logger = _Messages(), logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    dynamo.utils.counters.clear()
    try:
        with dynamo.config.patch(recompile_limit=8):
            compiled = torch.compile(model, backend="eager")
            loss = compiled(input_ids=ids, labels=ids).loss
            loss.backward()
        breaks = dict(dynamo.utils.counters["graph_break"])
    finally:
        logger.removeHandler(handler)
        dynamo.reset()

    ours = [m for m in handler.messages if "molora" in m]
    assert ours == [], ours
    # the only graph breaks are where the runtime's Python state changes (record, the aux-gradient probe); any other
    # (an operator Dynamo cannot trace in a kernel function, say) would split every layer into more graphs
    unexpected = [reason.splitlines()[0] for reason in breaks if "MoLoraRuntime" not in reason]
    assert breaks and unexpected == [], unexpected
    torch.testing.assert_close(loss, eager_loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    eager_grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys() and len(grads) == 42  # A, B, router of 14 projections
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], msg=name)
    assert model.get_routing_stats().keys() == eager.get_routing_stats().keys()
