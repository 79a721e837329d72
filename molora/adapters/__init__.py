"""LoRA expert banks that replace the targeted layers, and DR-LoRA's growing ranks."""

from . import dynamic_rank
from .layer import Linear, MoLoraLayer

__all__ = ["Linear", "MoLoraLayer", "dynamic_rank"]
