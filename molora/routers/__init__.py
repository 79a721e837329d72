"""Routers: one file per routing family, selected by name through the registry.

``MoLoraConfig(router="topk")`` looks the name up in :data:`ROUTER_REGISTRY`; :func:`register_router` adds a
user-defined :class:`Router` subclass under a new name.
"""

from . import balancing
from .base import ROUTER_REGISTRY, Router, RouterParams, Routing, get_router_class, register_router
from .dynmole import DynMoLEParams, DynMoLERouter, renyi_entropy, tsallis_entropy
from .mixture import MixtureOfRoutersRouter, MoRParams
from .prompt import PromptParams, PromptRouter
from .soft import SoftParams, SoftRouter
from .topk import TopKParams, TopKRouter, topk_routing
from .topp import TopPParams, TopPRouter

__all__ = [
    "ROUTER_REGISTRY",
    "DynMoLEParams",
    "DynMoLERouter",
    "MixtureOfRoutersRouter",
    "MoRParams",
    "PromptParams",
    "PromptRouter",
    "Router",
    "RouterParams",
    "Routing",
    "SoftParams",
    "SoftRouter",
    "TopKParams",
    "TopKRouter",
    "TopPParams",
    "TopPRouter",
    "balancing",
    "get_router_class",
    "register_router",
    "renyi_entropy",
    "topk_routing",
    "tsallis_entropy",
]
