"""Tapped networks: every architecture is a sequence of named stages and a final linear head.

A *tap* is the boundary after a stage. Methods address layers only through taps:
``net.run(x, start=None, end="stage2")`` runs the stages after tap ``start`` up to and including
tap ``end``. The last stage's tap is a vector ``(B, D)`` (after a flatten, a pooled token, a mean...)
that the head (``nn.Linear(D, num_classes)``) consumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Tap:
    """A named point in the forward pass: the output of the stage of the same name."""

    name: str
    channels: int
    stride: int  # input size / feature size; 0 for the flattened feature vector

    def as_dict(self) -> dict:
        return asdict(self)


FLATTEN = "<flatten>"  # a stage step that flattens (B, C, 1, 1) -> (B, C)


@dataclass(frozen=True)
class Stage:
    tap: Tap
    steps: tuple[str, ...]  # dotted module paths (or FLATTEN), applied in order


class TapNet(nn.Module):
    """Base of all zoo architectures. Subclasses call ``_set_plan`` at the end of ``__init__``."""

    arch: str = ""
    arch_config: dict | None = None  # as the registry built it (None: built by hand)
    head_path: str = "head"
    probe_size: int = 64  # the side of an input it takes, for shape tracing

    def _set_plan(self, stages: Sequence[Stage], head_path: str = "head") -> None:
        self._stages = tuple(stages)
        self.head_path = head_path
        names = [s.tap.name for s in self._stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tap names in {names}")

    # -- taps -------------------------------------------------------------------------------
    @property
    def taps(self) -> list[Tap]:
        return [s.tap for s in self._stages]

    def tap(self, name: str) -> Tap:
        for s in self._stages:
            if s.tap.name == name:
                return s.tap
        raise KeyError(f"unknown tap {name!r}; taps are {[t.name for t in self.taps]}")

    def spatial_taps(self) -> list[str]:
        """Taps with a feature map (not the flattened vector): where a network can be cut or joined."""
        return [t.name for t in self.taps if t.stride > 0]

    def tap_shapes(self, channels: int, size: int) -> dict[str, tuple[int, ...]]:
        """Each tap's output shape (without the batch) for a ``channels`` x ``size`` x ``size`` input."""
        with torch.no_grad():
            x = torch.zeros(1, channels, size, size, device=self.head_layer.weight.device)
            return {k: tuple(v.shape[1:]) for k, v in self.forward_intermediates(x).items()}

    def tap_index(self, name: str | None) -> int:
        """Index of the stage that ends at ``name``; -1 for the input (``None``)."""
        if name is None:
            return -1
        return [t.name for t in self.taps].index(self.tap(name).name)

    @property
    def head_layer(self) -> nn.Linear:
        """The final linear classifier (``head_path``; ``head`` in our own architectures)."""
        return self.get_submodule(self.head_path)

    @property
    def feature_dim(self) -> int:
        return self.head_layer.in_features

    @property
    def num_classes(self) -> int:
        return self.head_layer.out_features

    def stage_modules(self, start: str | None, end: str) -> list[nn.Module]:
        """The modules of the stages after tap ``start`` (the input when None) through tap ``end``."""
        stages = self._stages[self.tap_index(start) + 1 : self.tap_index(end) + 1]
        return [self.get_submodule(p) for st in stages for p in st.steps if p != FLATTEN]

    def prefix_convs(self, end: str) -> list[str]:
        """Dotted paths of every Conv2d in the stages up to and including tap ``end``, in order."""
        return self._convs(self._stages[: self.tap_index(end) + 1])

    def suffix_convs(self, start: str) -> list[str]:
        """Dotted paths of every Conv2d in the stages after tap ``start``, in order."""
        return self._convs(self._stages[self.tap_index(start) + 1 :])

    def _convs(self, stages: Sequence[Stage]) -> list[str]:
        paths = [p for stage in stages for p in stage.steps if p != FLATTEN]
        return [
            f"{p}.{name}" if name else p
            for p in paths
            for name, m in self.get_submodule(p).named_modules()
            if isinstance(m, nn.Conv2d)
        ]

    # -- forward ----------------------------------------------------------------------------
    def stage_fn(self, index: int) -> Callable[[Tensor], Tensor]:
        steps = [
            (lambda h: torch.flatten(h, 1)) if p == FLATTEN else self.get_submodule(p)
            for p in self._stages[index].steps
        ]

        def run(h: Tensor) -> Tensor:
            for step in steps:
                h = step(h)
            return h

        return run

    def run(self, x: Tensor, start: str | None = None, end: str | None = None) -> Tensor:
        """Run the stages after tap ``start`` (input if None) through tap ``end`` (last if None)."""
        lo = self.tap_index(start) + 1
        hi = len(self._stages) - 1 if end is None else self.tap_index(end)
        for i in range(lo, hi + 1):
            x = self.stage_fn(i)(x)
        return x

    def embed(self, x: Tensor) -> Tensor:
        """The vector the head consumes (the last tap)."""
        return self.run(x)  # (B, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.head_layer(self.embed(x))  # (B, num_classes)

    def forward_intermediates(self, x: Tensor) -> dict[str, Tensor]:
        """Every tap's output, in order (as timm's ``forward_intermediates``)."""
        out: dict[str, Tensor] = {}
        for i, s in enumerate(self._stages):
            x = self.stage_fn(i)(x)
            out[s.tap.name] = x
        return out


def resize_to(f: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, *size): average-pooled down, bilinear up, untouched when equal."""
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    if f.shape[-2] > size[0]:
        return F.adaptive_avg_pool2d(f, size)
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)
