"""Routers: one file per routing family, selected by name through the registry.

``MoLoraConfig(router="topk")`` looks the name up in :data:`ROUTER_REGISTRY`; :func:`register_router` adds a
user-defined :class:`Router` subclass under a new name.
"""

from . import balancing
from .base import ROUTER_REGISTRY, Router, RouterParams, Routing, get_router_class, register_router
from .expert_choice import ExpertChoiceParams, ExpertChoiceRouter
from .loss_free import TopKBiasParams, TopKBiasRouter
from .null_experts import AdaMoEParams, AdaMoERouter, NullExpertRouting
from .relu import ReLUParams, ReLURouter
from .soft import SoftParams, SoftRouter
from .topk import TopKParams, TopKRouter, topk_routing

__all__ = [
    "ROUTER_REGISTRY",
    "AdaMoEParams",
    "AdaMoERouter",
    "ExpertChoiceParams",
    "ExpertChoiceRouter",
    "NullExpertRouting",
    "ReLUParams",
    "ReLURouter",
    "Router",
    "RouterParams",
    "Routing",
    "SoftParams",
    "SoftRouter",
    "TopKBiasParams",
    "TopKBiasRouter",
    "TopKParams",
    "TopKRouter",
    "balancing",
    "get_router_class",
    "register_router",
    "topk_routing",
]
