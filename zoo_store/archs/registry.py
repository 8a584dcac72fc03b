"""The architecture registry: name -> builder of a TapNet from a small JSON config."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from zoo_store.archs.base import TapNet
from zoo_store.archs.traced import build_traced, is_traced
from zoo_store.core.cards import CardIn
from zoo_store.core.errors import InvalidInput

ArchBuilder = Callable[..., TapNet]
_ARCHS: dict[str, ArchBuilder] = {}


def register_arch(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    def deco(builder: ArchBuilder) -> ArchBuilder:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHS[name] = builder
        return builder

    return deco


def arch_names() -> list[str]:
    return sorted(_ARCHS)


def build_for(card: CardIn, meta: bool = False) -> TapNet:
    """The untrained network a card describes (its labels size the head); on the meta device (shapes
    only: no memory, no init cost) when ``meta``."""
    with torch.device("meta") if meta else contextlib.nullcontext():
        return build_arch(card.arch, {**card.arch_config, "num_classes": len(card.labels)})


def build_arch(name: str, config: dict[str, Any] | None = None) -> TapNet:
    """Build an untrained network; unknown names or bad configs are InvalidInput."""
    if is_traced(name):
        net = build_traced(name, config or {})
        net.arch, net.arch_config = name, dict(config or {})
        return net
    if name not in _ARCHS:
        raise InvalidInput(
            f"unknown architecture {name!r}; known: {arch_names()}, or torchvision:<name> "
            f"for any torchvision classifier, or timm:<name> (with timm installed)"
        )
    try:
        net = _ARCHS[name](**(config or {}))
    except (TypeError, ValueError) as e:  # an unknown key, a value of the wrong type or shape
        raise InvalidInput(f"bad config for architecture {name!r}: {e}") from e
    net.arch, net.arch_config = name, dict(config or {})
    return net
