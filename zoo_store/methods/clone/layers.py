"""Filter masks on a source prefix: soft (sigmoid logits, for learning them) and hard (kept filters
only, for serving), plus the occlusion perturbations the localization fits on.

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
    width, so what follows sees exactly the masked conv's output."""

    def __init__(self, conv: nn.Conv2d, keep: Tensor):
        super().__init__()
        idx = torch.nonzero(keep).flatten()
        self.register_buffer("index", idx, persistent=False)
        self.weight = nn.Parameter(conv.weight.detach()[idx], requires_grad=False)  # (K, C_in / g, k, k)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach()[idx], requires_grad=False)
        self.out_channels, self.conv = conv.out_channels, conv
        if conv.groups != 1:
            raise ValueError("KeptFilters handles ungrouped convs only")

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        kept = F.conv2d(x, self.weight, self.bias, c.stride, c.padding, c.dilation)  # (B, K, H', W')
        out = kept.new_zeros(kept.shape[0], self.out_channels, *kept.shape[2:])  # (B, C, H', W')
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
        hole = ((rows >= top.view(b, 1, 1)) & (rows < (top + side).view(b, 1, 1))
                & (cols >= left.view(b, 1, 1)) & (cols < (left + side).view(b, 1, 1)))  # (B, H, W)  # fmt: skip
        out = out.masked_fill(hole.unsqueeze(1).to(out.device), 0.0)
    return out
