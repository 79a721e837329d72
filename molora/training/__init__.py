"""Glue between molora and transformers/TRL training loops (Trainer callbacks)."""

from .dynamic_rank_callback import DynamicRankCallback

__all__ = ["DynamicRankCallback"]
