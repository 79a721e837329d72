"""molora: mixture-of-LoRA-experts adapters for Hugging Face PEFT.

Importing this package registers the PEFT type ``"MOLORA"``, after which PEFT's usual entry points
(``get_peft_model``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, TRL's ``SFTTrainer``) accept a
:class:`MoLoraConfig`. Registration is idempotent: importing or reloading the package again is harmless.
"""

from __future__ import annotations

import sys

from ._peft_type import ensure_peft_type
from .adapters import Linear, MoLoraLayer, dynamic_rank
from .adapters.dynamic_rank import compact_adapter, get_rank_stats, maybe_grow, update_importance
from .config import MoLoraConfig
from .kernels import expert_delta
from .model import MOLORA_TARGET_MODULES, MoLoraModel
from .routers import ROUTER_REGISTRY, Router, RouterParams, Routing, get_router_class, register_router
from .runtime import LayerRoutingStats, RoutingContext

__version__ = "0.1.0"

# the docs name the DR-LoRA helpers `molora.dynamic_rank.*`: importable under that name too
sys.modules.setdefault(__name__ + ".dynamic_rank", dynamic_rank)


def __getattr__(name: str):
    # `molora.training.MoLoraCallback()` after a plain `import molora`, as the README writes it; imported on first use
    # (it pulls in the trainer-side helpers, which inference does not need)
    if name == "training":
        import importlib

        return importlib.import_module(".training", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_with_peft() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        # already registered (a second import after a reload): point PEFT at the current classes
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = MoLoraConfig
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = MoLoraModel
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = MoLoraModel.prefix
        return
    register_peft_method(name="molora", config_cls=MoLoraConfig, model_cls=MoLoraModel, prefix=MoLoraModel.prefix)


_register_with_peft()

__all__ = [
    "MOLORA_TARGET_MODULES",
    "ROUTER_REGISTRY",
    "LayerRoutingStats",
    "Linear",
    "MoLoraConfig",
    "MoLoraLayer",
    "MoLoraModel",
    "Router",
    "RouterParams",
    "Routing",
    "RoutingContext",
    "compact_adapter",
    "dynamic_rank",
    "expert_delta",
    "get_rank_stats",
    "get_router_class",
    "maybe_grow",
    "register_router",
    "update_importance",
]
