"""The container of one adapter's stacked expert weights."""

from __future__ import annotations

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
