"""The method registry: one plug-in per composition method, duplicates refused (as peft's).

The plug-ins register themselves when ``zoo_store.methods`` is imported (its ``__init__`` imports
each folder), so the registry knows no plug-in by name."""

from __future__ import annotations

from zoo_store.core.errors import InvalidInput
from zoo_store.methods.base import Method

_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"composition method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise InvalidInput(f"unknown method {name!r}; known: {method_names()}")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)
