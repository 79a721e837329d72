"""Glue between molora and ``transformers`` / TRL trainers.

Callbacks for per-step router work (:class:`MoLoraCallback`), rank growth (:class:`DynamicRankCallback`) and
routing-statistics logging (:class:`RoutingStatsCallback`); YAML recipes and TRL fine-tuning (``molora sft``),
evaluation and generation. The command line (``molora sft|generate|eval|inspect|push``) is a thin layer over these
functions; scripts can use them directly (see ``scripts/sft.py``).
"""

from .callbacks import MoLoraCallback, molora_on_optimizer_step
from .data import load_split
from .dynamic_rank_callback import DynamicRankCallback
from .evaluate import evaluate, format_table, generate
from .logging import RoutingStatsCallback, install_routing_stats_callback
from .models import load_adapter_model, load_base_model, load_tokenizer, resolve_model
from .recipe import RecipeError, build_adapter_config, load_recipe
from .sft import build_trainer, run_sft, sft_config

__all__ = [
    "DynamicRankCallback",
    "MoLoraCallback",
    "RecipeError",
    "RoutingStatsCallback",
    "build_adapter_config",
    "build_trainer",
    "evaluate",
    "format_table",
    "generate",
    "install_routing_stats_callback",
    "load_adapter_model",
    "load_base_model",
    "load_recipe",
    "load_split",
    "load_tokenizer",
    "molora_on_optimizer_step",
    "resolve_model",
    "run_sft",
    "sft_config",
]
