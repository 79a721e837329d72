"""No host synchronisation per layer in a training step.

On CUDA an operator whose output size or value the host must know (``nonzero``, ``bincount``, boolean indexing,
``.item()``) waits for the GPU to catch up; one per layer serialises the whole step. The CPU cannot observe the
waits, but it sees the operators: a dispatch mode flags every such call made from molora's code during the forward
and backward of a padded batch. The padding mask's row index is computed once per forward and shared by every layer
(``molora.routers.balancing.valid_rows``), so the general loss path may read back once per forward, never per layer.
"""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from conftest import VOCAB, make_llama
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import molora

# operators whose result the host needs before the next one can be launched
_READ_BACK = {"nonzero", "bincount", "masked_select", "_local_scalar_dense", "is_nonzero", "equal", "_unique2"}
_SEP = "/"


class _ReadBacks(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        flagged = name in _READ_BACK or (
            name == "index"
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        )
        if flagged:
            frames = [f for f in traceback.extract_stack() if f"{_SEP}molora{_SEP}" in f.filename]
            # the all-ones mask check reads back CPU tensors only (runtime._cpu_mask_of_ones)
            if frames and frames[-1].name != "_cpu_mask_of_ones":
                self.calls[f"{name} at {frames[-1].filename.rsplit(_SEP, 1)[-1]}:{frames[-1].lineno}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("router", "allowed"),
    [
        ("topk", 0),
        ("topk_bias", 1),
        ("expert_choice", 1),
        ("soft", 1),
        ("mor", 1),
        ("prompt", 1),
        # the top-p routers select in the top-k node: all (token, expert) pairs listed, no nonzero per layer
        ("topp", 0),
        ("dynmole", 0),
        # a variable number of experts per token, all pairs listed on the dense path (a nonzero per layer before)
        ("relu", 1),
        ("adamoe", 1),
    ],
)
def test_training_step_reads_back_at_most_once_per_forward(router, allowed):
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, router=router, init_lora_weights=False)
    model = get_peft_model(make_llama(seed=1), cfg).train()  # 14 adapted layers
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # warm caches
    with _ReadBacks() as seen:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert sum(seen.calls.values()) <= allowed, dict(seen.calls)


@pytest.mark.parametrize("router", ["topk", "topp", "dynmole", "relu", "adamoe"])
@pytest.mark.parametrize("where", ["generate", "general path"])
def test_top_p_routing_on_the_dense_path_lists_no_assignments(router, where):
    """The dense path reads only the dense gates: the top-p routers' routing lists all (token, expert) pairs there
    instead of a ``nonzero`` per layer, in ``generate``'s steps and on the general path (a base layer the fused
    functions do not run, here one with a forward hook)."""
    cfg = molora.MoLoraConfig(r=4, num_experts=4, top_k=2, router=router, init_lora_weights=False)
    model = get_peft_model(make_llama(seed=1), cfg)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    if where == "generate":
        model.eval()

        def run():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)

    else:
        for layer in model.modules():
            if isinstance(layer, molora.MoLoraLayer):
                layer.base_layer.register_forward_hook(lambda *args: None)  # the fused functions skip hooked bases
        model.train()

        def run():
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()

    run()  # warm caches
    with _ReadBacks() as seen:
        run()
    assert not [call for call in seen.calls if call.startswith("nonzero at base.py")], dict(seen.calls)
