"""What a block costs: parameters and FLOPs of each stage of a network, and of a whole assembly.

Profiles come from the architecture alone (a skeleton on the meta device: no memory, no weights),
so the budget a spec asks for is checked when it is POSTed, before any job runs. FLOPs are those
``torch.utils.flop_counter`` counts (2 per multiply-add of convolutions and matrix products) for
one image at the card's input size.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.flop_counter import FlopCounterMode

from zoo_store.archs import TapNet, build_for
from zoo_store.core.cards import Card


class Block(BaseModel):
    """Stages of ``model`` after tap ``start`` (the input when None) through tap ``end``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    start: str | None
    end: str

    def label(self) -> str:
        return f"{self.model}[{self.start or 'input'}:{self.end}]"


@dataclass(frozen=True)
class StageCost:
    tap: str
    params: int
    flops: int
    shape: tuple[int, int, int]  # (C, H, W) of the tap's output


@dataclass(frozen=True)
class Profile:
    """The spatial stages of one network, in order."""

    stages: tuple[StageCost, ...]

    def index(self, tap: str | None) -> int:
        return -1 if tap is None else [s.tap for s in self.stages].index(tap)

    def shape(self, tap: str) -> tuple[int, int, int]:
        return self.stages[self.index(tap)].shape

    def block(self, start: str | None, end: str) -> tuple[int, int]:
        """(params, flops) of the stages after ``start`` through ``end``."""
        part = self.stages[self.index(start) + 1 : self.index(end) + 1]
        return sum(s.params for s in part), sum(s.flops for s in part)


def profile_of(net: TapNet, channels: int, size: int) -> Profile:
    """Per spatial stage of ``net`` (any device, meta included): its parameters, FLOPs and output shape."""
    spatial = net.spatial_taps()
    device = net.head_layer.weight.device
    h = torch.zeros(1, channels, size, size, device=device)
    out = []
    with torch.no_grad():
        for i, tap in enumerate(spatial):
            mods = {
                id(p): p.numel() for m in net.stage_modules(spatial[i - 1] if i else None, tap) for p in m.parameters()
            }
            counter = FlopCounterMode(display=False)
            with counter:
                h = net.stage_fn(i)(h)  # (1, C, H, W)
            out.append(StageCost(tap, sum(mods.values()), int(counter.get_total_flops()), tuple(h.shape[1:])))
    return Profile(tuple(out))


_PROFILES: dict[str, Profile] = {}


def card_profile(card: Card) -> Profile:
    """The profile of the architecture a card describes, at its input size (cached per architecture)."""
    key = json.dumps(
        [card.arch, card.arch_config, len(card.labels), card.input.channels, card.input.size], sort_keys=True
    )
    if key not in _PROFILES:
        _PROFILES[key] = profile_of(build_for(card, meta=True), card.input.channels, card.input.size)
    return _PROFILES[key]


def needs_stitch(prev: Block, cur: Block) -> bool:
    """A stitch joins blocks from different models, or from one model at positions that do not meet."""
    return prev.model != cur.model or prev.end != cur.start


def stitch_cost(cin: int, cout: int, hw: tuple[int, int]) -> tuple[int, int]:
    """(params, flops) of a stitch: BatchNorm over ``cin`` then a 1x1 conv to ``cout`` at ``hw``."""
    return 2 * cin + cin * cout + cout, 2 * cin * cout * hw[0] * hw[1]


def join_cost(prev: Block, cur: Block, profiles: dict[str, Profile]) -> tuple[int, int]:
    """(params, flops) of what joins two consecutive blocks: a stitch, or nothing."""
    if not needs_stitch(prev, cur):
        return 0, 0
    if cur.start is None:
        raise ValueError("a stitch cannot feed the first stage of a network: it would replace the image")
    cout, h, w = profiles[cur.model].shape(cur.start)
    return stitch_cost(profiles[prev.model].shape(prev.end)[0], cout, (h, w))


def head_cost(last: Block, profiles: dict[str, Profile], num_labels: int) -> tuple[int, int]:
    c = profiles[last.model].shape(last.end)[0]
    return c * num_labels + num_labels, 2 * c * num_labels


def assembly_cost(blocks: list[Block], profiles: dict[str, Profile], num_labels: int) -> tuple[int, int]:
    """(params, flops) of the assembled network: blocks, stitches, a linear head on the pooled last tap."""
    parts = [profiles[b.model].block(b.start, b.end) for b in blocks]
    parts += [join_cost(a, b, profiles) for a, b in itertools.pairwise(blocks)]
    parts.append(head_cost(blocks[-1], profiles, num_labels))
    return sum(p for p, _ in parts), sum(f for _, f in parts)
