"""Routers: one file per routing family, selected by name through the registry.

``MoLoraConfig(router="topk")`` looks the name up in :data:`ROUTER_REGISTRY`; :func:`register_router` adds a
user-defined :class:`Router` subclass under a new name.
"""

from . import balancing
from .base import ROUTER_REGISTRY, Router, RouterParams, Routing, get_router_class, register_router
from .dynmole import DynMoLEParams, DynMoLERouter, renyi_entropy, tsallis_entropy
from .expert_choice import ExpertChoiceParams, ExpertChoiceRouter
from .loss_free import TopKBiasParams, TopKBiasRouter
from .mixture import MixtureOfRoutersRouter, MoRParams
from .null_experts import AdaMoEParams, AdaMoERouter, NullExpertRouting
from .prompt import PromptParams, PromptRouter
from .relu import ReLUParams, ReLURouter
from .soft import SoftParams, SoftRouter
from .topk import TopKParams, TopKRouter, topk_routing
from .topp import TopPParams, TopPRouter

__all__ = [
    "ROUTER_REGISTRY",
    "AdaMoEParams",
    "AdaMoERouter",
    "DynMoLEParams",
    "DynMoLERouter",
    "ExpertChoiceParams",
    "ExpertChoiceRouter",
    "MixtureOfRoutersRouter",
    "MoRParams",
    "NullExpertRouting",
    "PromptParams",
    "PromptRouter",
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
    "TopPParams",
    "TopPRouter",
    "balancing",
    "get_router_class",
    "register_router",
    "renyi_entropy",
    "topk_routing",
    "tsallis_entropy",
]
