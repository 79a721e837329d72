"""Glue between molora and ``transformers`` / TRL trainers (callbacks for per-step router work and rank growth)."""

from .callbacks import MoLoraCallback, molora_on_optimizer_step
from .dynamic_rank_callback import DynamicRankCallback

__all__ = ["DynamicRankCallback", "MoLoraCallback", "molora_on_optimizer_step"]
