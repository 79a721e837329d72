"""LoRA expert banks that replace the targeted layers."""

from .layer import Linear, MoLoraLayer

__all__ = ["Linear", "MoLoraLayer"]
