"""Path banks: how a method lets one forward of a resident base serve a batch mixing many paths.

A method whose paths differ only in small tensors hung on the same base (reprogram: CLR kernels and
a head) returns a ``bank_key`` for a path's config and builds a ``PathBank`` per key. The runtime
owns which path sits in which slot (an LRU within the cache's byte budget); the bank owns the
tensor layout and the forward. Methods whose paths are networks of their own (resample) or have
their own structure (clone, reassemble) return no key and are served one module per path.

To add a bank: subclass ``PathBank`` and implement the five members below; ``ReprogramBank`` in
``zoo_store/methods/reprogram/bank.py`` is the reference. ``forward`` on a batch must give every
sample exactly what the path's own ``Method.materialize`` module gives it (the tests check 1e-5).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor


class PathBank(ABC):
    capacity: int  # slots allocated

    @abstractmethod
    def slot_bytes(self, config: dict[str, Any]) -> int:
        """Bytes one slot takes for a path of this config (what the cache budget counts per slot)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes every allocated slot takes together."""

    @abstractmethod
    def grow(self, capacity: int) -> None:
        """Allocate slots up to ``capacity``, keeping the loaded ones where they are."""

    @abstractmethod
    def load(self, slot: int, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Copy a path's tensors (checked against its manifest already) into ``slot``."""

    @abstractmethod
    def forward(self, x: Tensor, slots: Tensor) -> Tensor:
        """x: (B, C, H, W) normalized, slots: (B,) -> logits (B, K_max); columns past a path's
        label count are -inf."""
