"""Step 4's network: resident blocks run in place, joined by stitches, then a new head.

A stitch is ``resize -> BatchNorm -> 1x1 conv``: it maps the features one block ends with to those
the next block expects (channels and resolution). Stitches start from a least-squares fit of the
next model's own features at that tap on the probe images, so an untrained assembly already runs
each block on inputs like the ones it was trained on (and its NASWOT score means something).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.archs.base import resize_to
from zoo_store.archs.surgery import shared_copy
from zoo_store.methods.reassemble.profile import Block, needs_stitch


class Stitch(nn.Module):
    def __init__(self, cin: int, cout: int, size: tuple[int, int]):
        super().__init__()
        self.size = size
        self.bn = nn.BatchNorm2d(cin)
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(self.bn(resize_to(h, self.size)))  # (B, C_in, H, W) -> (B, C_out, H', W')

    @torch.no_grad()
    def fit(self, a: Tensor, b: Tensor, ridge: float = 1e-3, max_rows: int = 100_000) -> None:
        """Least squares from features ``a`` (N, C_in, H, W) to ``b`` (N, C_out, H', W'): the BatchNorm
        takes ``a``'s statistics, the conv the ridge solution on the normalized pixels (a fixed
        evenly spaced subset of at most ``max_rows`` pixels, so large inputs stay cheap)."""
        a = resize_to(a, self.size)
        rows = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])  # (N*H'*W', C_in)
        target = b.permute(0, 2, 3, 1).reshape(-1, b.shape[1])  # (N*H'*W', C_out)
        if len(rows) > max_rows:
            pick = torch.linspace(0, len(rows) - 1, max_rows, device=rows.device).long()
            rows, target = rows[pick], target[pick]
        rows, target = rows.double(), target.double()
        mean, var = rows.mean(0), rows.var(0, unbiased=False)
        self.bn.running_mean.copy_(mean)
        self.bn.running_var.copy_(var)
        self.bn.weight.fill_(1.0)
        self.bn.bias.zero_()
        z = (rows - mean) / torch.sqrt(var + self.bn.eps)
        z1 = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], 1)  # (P, C_in + 1)
        gram = z1.T @ z1 + ridge * len(z1) * torch.eye(z1.shape[1], dtype=z.dtype, device=z.device)
        w = torch.linalg.solve(gram, z1.T @ target)  # (C_in + 1, C_out)
        self.proj.weight.copy_(w[:-1].T.reshape(self.proj.weight.shape).float())
        self.proj.bias.copy_(w[-1].float())


class Assembled(nn.Module):
    """Blocks of resident networks (structural copies: their weights are the residents'), stitched,
    then global average pooling and a linear head. The blocks stay in eval mode whatever ``train``
    is set to: freeze-tuning must not move their BatchNorm statistics."""

    def __init__(self, nets: list[TapNet], blocks: list[Block], stitches: list[Stitch | None], head: nn.Linear):
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.spans = [(b.start, b.end) for b in blocks]
        self.stitches = nn.ModuleList([s if s is not None else nn.Identity() for s in stitches])
        self.head = head

    def train(self, mode: bool = True) -> Assembled:
        super().train(mode)
        self.nets.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        h = x
        for net, (start, end), stitch in zip(self.nets, self.spans, self.stitches, strict=True):
            h = net.run(stitch(h), start, end)  # (B, C, H, W)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))  # (B, K)


Shapes = dict[str, dict[str, tuple[int, ...]]]  # model -> tap -> (C, H, W) for the path's input


def shapes_of(nets: dict[str, TapNet], models: list[str], channels: int, size: int) -> Shapes:
    """Tap shapes of each of ``models`` (one dummy forward each): compute once, pass to ``build_assembled``."""
    return {m: nets[m].tap_shapes(channels, size) for m in dict.fromkeys(models)}


def build_assembled(
    blocks: list[Block], bases: dict[str, TapNet], shapes: Shapes, num_labels: int, stitch_all: bool = False
) -> Assembled:
    """The network of ``blocks`` with fresh stitches (identity BatchNorm, default conv) and head.
    ``stitch_all`` puts a stitch at every join, also where consecutive blocks of one model meet: a
    single model cut at the same places gets the reassembled network's trainable parts (the
    control of ``zoo bench --suite reassemble``)."""
    copies = {m: shared_copy(bases[m]).eval() for m in dict.fromkeys(b.model for b in blocks)}
    stitches: list[Stitch | None] = [None]
    for prev, cur in itertools.pairwise(blocks):
        if stitch_all or needs_stitch(prev, cur):
            assert cur.start is not None
            cout, h, w = shapes[cur.model][cur.start]
            stitches.append(Stitch(shapes[prev.model][prev.end][0], cout, (h, w)))
        else:
            stitches.append(None)
    head = nn.Linear(shapes[blocks[-1].model][blocks[-1].end][0], num_labels)
    device = bases[blocks[0].model].head_layer.weight.device
    return Assembled([copies[b.model] for b in blocks], blocks, stitches, head).to(device).eval()


@torch.no_grad()
def fit_stitches(
    model: Assembled,
    blocks: list[Block],
    bases: dict[str, TapNet],
    x: Tensor,
    memo: dict[tuple[str, str], Tensor] | None = None,
) -> None:
    """Initialise every stitch by least squares on normalized probe images ``x`` (N, C, H, W): block by
    block, so each fit sees what the stitches before it produce. ``memo`` keeps each model's own
    features at a tap for the next call on the same images."""
    memo = {} if memo is None else memo
    h = x
    for i, (net, (start, end), stitch) in enumerate(zip(model.nets, model.spans, model.stitches, strict=True)):
        if isinstance(stitch, Stitch):
            assert start is not None
            key = (blocks[i].model, start)
            if key not in memo:
                memo[key] = bases[blocks[i].model].run(x, None, start)  # (N, C_out, H', W'): that model's own features
            stitch.fit(h, memo[key])
        h = net.run(stitch(h), start, end)


def stitch_params(model: Assembled) -> list[nn.Parameter]:
    return [*model.stitches.parameters(), *model.head.parameters()]
