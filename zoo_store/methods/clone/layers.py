"""Filter masks on a source's layers: soft (sigmoid logits, for learning them) and hard (kept filters
only, for serving), plus the occlusion perturbations the localization fits on, and the network a clone serves.

A mask multiplies a conv's output channels before anything else sees them, so a masked-out filter
is exactly a filter whose output is zero: a hard mask can skip computing it and scatter zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.archs.base import resize_to
from zoo_store.archs.surgery import replace_module, shared_copy


@contextmanager
def soft_masks(net: TapNet, gates: dict[str, Tensor]) -> Iterator[TapNet]:
    """Within the block, ``net``'s convs named in ``gates`` have their outputs multiplied by the gate
    (C,) of each. Use it on a structural copy (``shared_copy``), never on a resident base: hooks on a
    shared module would reach every request."""
    handles = [
        net.get_submodule(p).register_forward_hook(lambda _m, _i, out, g=g: out * g.view(1, -1, 1, 1))  # (B, C, H, W)
        for p, g in gates.items()
    ]
    try:
        yield net
    finally:
        for h in handles:
            h.remove()


class KeptFilters(nn.Module):
    """A conv that computes only its kept filters and scatters them into a zero tensor of the full
    width, so what follows sees exactly the masked conv's output. It holds the resident conv itself
    (its weights stay shared); the kept filters are gathered per call, never stored."""

    def __init__(self, conv: nn.Conv2d, keep: Tensor):
        super().__init__()
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        if conv.groups != 1 and not self.depthwise:
            raise ValueError("KeptFilters handles plain and depthwise convs")
        self.conv = conv
        self.register_buffer("index", torch.nonzero(keep).flatten().to(conv.weight.device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        c, idx = self.conv, self.index
        w = c.weight.index_select(0, idx)  # (K, C_in / groups, k, k), transient
        b = None if c.bias is None else c.bias.index_select(0, idx)
        if self.depthwise:  # a kept depthwise filter reads only its own channel
            kept = F.conv2d(x.index_select(1, idx), w, b, c.stride, c.padding, c.dilation, groups=len(idx))
        else:
            kept = F.conv2d(x, w, b, c.stride, c.padding, c.dilation)  # (B, K, H', W')
        out = kept.new_zeros(kept.shape[0], c.out_channels, *kept.shape[2:])  # (B, C, H', W')
        return out.index_copy(1, self.index, kept)


def occlude(x: Tensor, gen: torch.Generator, patches: int = 2, fraction: float = 0.25) -> Tensor:
    """LIME-style perturbations: each image gets ``patches`` square patches (side = fraction of the
    image) set to zero. x: (B, C, H, W) in [0, 1] -> same shape."""
    b, _, h, w = x.shape
    side = max(1, round(fraction * min(h, w)))
    out = x.clone()
    for _ in range(patches):
        top = torch.randint(0, h - side + 1, (b,), generator=gen)
        left = torch.randint(0, w - side + 1, (b,), generator=gen)
        rows = torch.arange(h).view(1, h, 1)
        cols = torch.arange(w).view(1, 1, w)
        hole = (
            (rows >= top.view(b, 1, 1))
            & (rows < (top + side).view(b, 1, 1))
            & (cols >= left.view(b, 1, 1))
            & (cols < (left + side).view(b, 1, 1))
        )  # (B, H, W)
        out = out.masked_fill(hole.unsqueeze(1).to(out.device), 0.0)
    return out


class Grafted(nn.Module):
    """The cloned network (the article's topology, SPEC 3.1): the target runs once, tap by tap; at
    each source's insertion tap ``R`` its features are resized to the source's resolution at the cut
    and mapped by the 1x1 conv ``A`` into the source's channels there, and the source's (masked)
    layers after the cut, ``M_f``, run on them to the source's feature vector. The target's own
    later layers run unchanged; the new head ``F_c`` reads the target's feature vector and every
    source's, concatenated."""

    def __init__(
        self,
        target: TapNet,
        sources: list[TapNet],
        inserts: list[str],
        cuts: list[str],
        sizes: list[tuple[int, int]],
        adapters: list[nn.Conv2d],
        head: nn.Linear,
    ):
        super().__init__()
        self.target, self.sources = target, nn.ModuleList(sources)
        self.inserts, self.cuts, self.sizes = list(inserts), list(cuts), [tuple(s) for s in sizes]
        self.adapters, self.head = nn.ModuleList(adapters), head

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D_t + sum D_s): the target's feature vector and each source's."""
        outs: list[Tensor | None] = [None] * len(self.sources)
        h = x
        for i, tap in enumerate(self.target.taps):
            h = self.target.stage_fn(i)(h)  # the target's own stage: run once for every branch
            for j, r in enumerate(self.inserts):
                if r == tap.name:
                    outs[j] = self.branch(j, h)  # (B, D_s)
        return torch.cat([h, *outs], 1)  # type: ignore[list-item]

    def branch(self, j: int, h: Tensor) -> Tensor:
        """Source ``j`` on the target's features at its insertion tap: (B, C_t, H_t, W_t) -> (B, D_s)."""
        a = self.adapters[j](resize_to(h, self.sizes[j]))  # (B, C_s, H_s, W_s)
        return self.sources[j].run(a, self.cuts[j], None)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (B, K)


def masked_source(source: TapNet, masks: dict[str, Tensor]) -> TapNet:
    """A structural copy of ``source`` whose masked convs compute only their kept filters."""
    net = shared_copy(source).eval()
    for path, keep in masks.items():
        if not bool(keep.all()):
            replace_module(net, path, KeptFilters(source.get_submodule(path), keep))
    return net


def pack_mask(keep: Tensor) -> Tensor:
    """(C,) bool -> ((C + 7) // 8,) uint8, bit-packed (big-endian within a byte, as numpy's packbits)."""
    bits = torch.zeros((keep.numel() + 7) // 8 * 8, dtype=torch.uint8)
    bits[: keep.numel()] = keep.cpu().to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_mask(packed: Tensor, channels: int) -> Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.view(-1, 1) >> shifts) & 1  # (bytes, 8)
    return bits.flatten()[:channels].bool()
