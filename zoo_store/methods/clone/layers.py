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


ADAPTERS = {
    "1x1": 1,
    "1x1+bn": 1,
    "3x3": 3,
}  # the adapter kinds a clone can train: the kernel of the conv it is served as


class Adapter(nn.Module):
    """``A``: a conv from the source's channels to the target's, after resizing the source's
    features to the target's resolution; a fresh connection changes nothing (zero output).

    ``1x1`` and ``3x3``: a zero-initialised conv of that kernel. ``1x1+bn``: a 1x1 conv (default
    init) then a BatchNorm whose scale starts at zero, so the joined features are standardised per
    channel while it trains; ``folded()`` turns it into the plain 1x1 conv that is stored and served."""

    def __init__(self, source_channels: int, target_channels: int, kind: str = "1x1"):
        super().__init__()
        if kind not in ADAPTERS:
            raise ValueError(f"adapter kind {kind!r} is not one of {list(ADAPTERS)}")
        k = ADAPTERS[kind]
        self.proj = nn.Conv2d(source_channels, target_channels, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(target_channels) if kind == "1x1+bn" else None
        if self.bn is None:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            nn.init.zeros_(self.bn.weight)

    def forward(self, f: Tensor, size: tuple[int, int]) -> Tensor:
        out = self.proj(resize_to(f, size))  # (B, C_t, H_t, W_t)
        return out if self.bn is None else self.bn(out)

    @torch.no_grad()
    def folded(self) -> nn.Conv2d:
        """The conv this adapter computes in eval mode (its BatchNorm, if any, folded in)."""
        if self.bn is None:
            return self.proj
        bn, conv = self.bn, self.proj
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_t,)
        out = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, device=conv.weight.device
        )
        out.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        out.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        return out


class Cloned(nn.Module):
    """The composed network: the frozen target, run tap by tap; at each source's insertion tap
    ``R`` the adapted features of that source's (masked) prefix are added; a new head ``F_c`` reads
    the target's last tap."""

    def __init__(
        self,
        target: TapNet,
        sources: list[TapNet],
        depths: list[str],
        inserts: list[str],
        adapters: list[Adapter],
        head: nn.Linear,
    ):
        super().__init__()
        self.target, self.sources = target, nn.ModuleList(sources)
        self.depths, self.inserts = list(depths), list(inserts)
        self.adapters, self.head = nn.ModuleList(adapters), head

    def forward(self, x: Tensor) -> Tensor:
        feats = [s.run(x, None, d) for s, d in zip(self.sources, self.depths, strict=True)]  # (B, C_s, H_s, W_s) each
        h = x
        for i, tap in enumerate(self.target.taps):
            h = self.target.stage_fn(i)(h)
            for f, r, a in zip(feats, self.inserts, self.adapters, strict=True):
                if r == tap.name:
                    h = h + a(f, tuple(h.shape[-2:]))  # (B, C_t, H_t, W_t)
        return self.head(h)  # (B, K): the last tap is the flattened feature vector


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
