"""Glue between molora and ``transformers`` / TRL trainers."""

from .callbacks import MoLoraCallback, molora_on_optimizer_step

__all__ = ["MoLoraCallback", "molora_on_optimizer_step"]
