"""The container of one adapter's stacked expert weights."""

from __future__ import annotations

import math

import torch
from torch import nn

#: the layers' attributes that hold expert banks (``<attr>[adapter].weight``), dense and MoE-experts layers
BANK_ATTRS = ("molora_A", "molora_B", "molora_gate_up_A", "molora_gate_up_B", "molora_down_A", "molora_down_B")


class ExpertBank(nn.Module):
    """One adapter's stacked expert weights: ``weight[E, d_in, r]`` (an ``A`` bank) or ``[E, r, d_out]`` (``B``).

    A module rather than a bare parameter so that the parameter is named ``molora_A.<adapter>.weight``, as PEFT's
    LoRA names ``lora_A.<adapter>.weight``: tools that map one adapter's parameters onto another's by the
    ``.<adapter>.`` path component (TRL's DPO, KTO, GRPO and RLOO trainers copy ``default`` into their ``ref``
    adapter that way) find the experts, and the saved key is ``...molora_A.weight`` as LoRA's ``...lora_A.weight``.
    Adapters saved before (``...molora_A``) still load (``MoLoraModel._remap_adapter_state_dict_for_load``).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"num_experts={self.weight.shape[0]}, shape={tuple(self.weight.shape)}"


def initial_banks(
    num_experts: int, d_in: int, d_out: int, rank: int, init: bool | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A new adapter's ``A [E, d_in, r]`` and ``B [E, r, d_out]`` weights, initialised per expert as PEFT's LoRA
    initialises ``lora_A`` / ``lora_B`` for ``init_lora_weights`` (``MoLoraConfig.init_lora_weights``).

    ``A``: kaiming-uniform with ``a = sqrt(5)`` as ``nn.Linear`` (``U(+-1/sqrt(d_in))``), or ``N(0, 1/r)`` for
    ``"gaussian"``. ``B``: zeros (a fresh adapter leaves the model's outputs unchanged), or for ``False``
    ``U(+-1/sqrt(r))`` (random, for tests and debugging).
    """
    weight_A = torch.empty(num_experts, d_in, rank)
    weight_B = torch.zeros(num_experts, rank, d_out)
    with torch.no_grad():
        if init == "gaussian":
            weight_A.normal_(0.0, 1.0 / rank)
        else:
            bound = 1.0 / math.sqrt(d_in)
            weight_A.uniform_(-bound, bound)
        if init is False:
            weight_B.uniform_(-1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank))
    return weight_A, weight_B
