"""Integral-network conversion and width resampling (INN, CVPR 2023): SPEC section 3.4.

Every coupled channel group of a base (``TapNet.channel_groups``) is treated as samples of a
smooth function on [-1, 1]: channel ``i`` of ``n`` sits at the centre of the i-th of n equal cells.
Converting fuses each group's BatchNorms into the convs that feed them and orders the channels
along a short travelling-salesman tour (neighbours alike), which changes nothing the network
computes. Resampling evaluates every coupled tensor at ``n'`` new cell centres by cubic
convolution and scales the readers by the new cells' widths over the old ones (``n / n'`` on a
uniform grid): a plain dense, smaller network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.archs.base import ChannelGroup
from zoo_store.archs.surgery import replace_module, shared_copy

Layer = nn.Conv2d | nn.Linear


@dataclass
class Fused:
    """A conv or linear layer's weight and bias in float64, BatchNorm folded in where it had one."""

    weight: Tensor  # (out, in / groups, *kernel)
    bias: Tensor  # (out,)


def _fold_bn(layer: Layer, bn: nn.BatchNorm2d | None) -> Fused:
    w = layer.weight.detach().double().clone()
    b = layer.bias.detach().double().clone() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (out,)
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        b = (b - bn.running_mean.double()) * scale + bn.bias.detach().double()
    return Fused(w, b)


def fused_layers(net: TapNet, groups: list[ChannelGroup]) -> dict[str, Fused]:
    """Every layer any group touches, BatchNorm folded into the producers and depthwise convs."""
    bns = {p: bn for g in groups for p, bn in (*g.producers, *g.depthwise)}
    touched = list(bns) + [c for g in groups for c in g.consumers]
    return {p: _fold_bn(net.get_submodule(p), net.get_submodule(bns[p]) if bns.get(p) else None) for p in touched}


def channel_features(layers: dict[str, Fused], g: ChannelGroup) -> Tensor:
    """(n, d): everything each channel of the group carries, one row per channel."""
    rows = [torch.cat([f.weight.flatten(1), f.bias[:, None]], 1) for f in (layers[p] for p, _ in (*g.producers, *g.depthwise))]
    cols = [layers[c].weight.transpose(0, 1).flatten(1) for c in g.consumers]  # (n, out * k * k)
    return torch.cat(rows + cols, 1)


# -- ordering ---------------------------------------------------------------------------------
def tour_length(dist: np.ndarray, order: np.ndarray) -> float:
    return float(dist[order[:-1], order[1:]].sum())


def two_opt_order(x: Tensor, seeds: int = 4, max_sweeps: int = 100) -> np.ndarray:
    """A short open path through the rows of ``x`` (n, d) under L1 distance: nearest-neighbour
    starts from ``seeds`` seeded channels, improved by 2-opt, the shortest kept. Returns (n,) int."""
    n = x.shape[0]
    if n <= 3:
        return np.arange(n)
    x = x.detach().double().cpu()
    dist = torch.cdist(x, x, p=1).numpy()  # (n, n)
    # an extra node at distance 0 from all turns the open path into a closed tour
    d = np.zeros((n + 1, n + 1))
    d[:n, :n] = dist
    best, best_len = np.arange(n), tour_length(dist, np.arange(n))
    rng = np.random.default_rng(0)
    for start in rng.choice(n, size=min(seeds, n), replace=False):
        tour = _two_opt(d, np.concatenate([[n], _nearest_neighbour(dist, int(start))]), max_sweeps)
        cut = int(np.flatnonzero(tour == n)[0])
        order = np.concatenate([tour[cut + 1 :], tour[:cut]])
        if (length := tour_length(dist, order)) < best_len - 1e-12:
            best, best_len = order, length
    return best


def _nearest_neighbour(dist: np.ndarray, start: int) -> np.ndarray:
    n = len(dist)
    seen = np.zeros(n, dtype=bool)
    order = [start]
    seen[start] = True
    for _ in range(n - 1):
        row = np.where(seen, np.inf, dist[order[-1]])
        order.append(int(row.argmin()))
        seen[order[-1]] = True
    return np.array(order)


def _two_opt(d: np.ndarray, tour: np.ndarray, max_sweeps: int) -> np.ndarray:
    """Closed-tour 2-opt: reverse tour[i+1..j] while that shortens the tour (best move per i)."""
    tour = tour.copy()
    m = len(tour)
    for _ in range(max_sweeps):
        improved = False
        for i in range(m - 2):
            a, b = tour[i], tour[i + 1]
            c, e = tour[i + 2 :], np.roll(tour, -1)[i + 2 :]  # edges (c, e) after (a, b); e wraps to tour[0]
            gain = d[a, b] + d[c, e] - d[a, c] - d[b, e]
            if i == 0:
                gain = gain[:-1]  # the edge closing the tour shares tour[0]: not a valid move
            if len(gain) and gain[k := int(gain.argmax())] > 1e-12:
                j = i + 2 + k
                tour[i + 1 : j + 1] = tour[i + 1 : j + 1][::-1]
                improved = True
        if not improved:
            break
    return tour


# -- resampling -------------------------------------------------------------------------------
def uniform_cells(n: int) -> Tensor:
    return torch.full((n,), 2.0 / n, dtype=torch.float64)


def cell_centres(cells: Tensor) -> Tensor:
    """Cell widths (n',) summing to 2 -> their centres on [-1, 1]."""
    return -1 + torch.cumsum(cells, 0) - cells / 2


def _keys(s: Tensor, a: float = -0.5) -> Tensor:
    """Keys' cubic convolution kernel (Catmull-Rom for a = -0.5)."""
    s = s.abs()
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return torch.where(s <= 1, near, torch.where(s < 2, far, torch.zeros_like(s)))


def resample_axis(t: Tensor, axis: int, centres: Tensor) -> Tensor:
    """``t`` holds n samples along ``axis`` at the centres of n equal cells of [-1, 1]; returns its
    cubic interpolation at ``centres`` (n',), edges replicated. Exact at the original centres."""
    n = t.shape[axis]
    u = (centres.to(t.device) + 1) * n / 2 - 0.5  # (n',) continuous channel index
    lo = torch.floor(u.detach())
    shape = [1] * t.dim()
    shape[axis] = -1
    out = torch.zeros((), dtype=t.dtype)
    for k in (-1, 0, 1, 2):
        idx = (lo + k).clamp(0, n - 1).long()
        out = out + t.index_select(axis, idx) * _keys(u - (lo + k)).to(t.dtype).view(shape)
    return out


def permute_and_resample(
    layers: dict[str, Fused],
    groups: list[ChannelGroup],
    perms: dict[str, Tensor],
    cells: dict[str, Tensor],
) -> dict[str, Fused]:
    """Apply each group's permutation (n,) then resample it to its cells (n',). Readers are scaled by
    each new cell's width over the old one's, so sums over channels keep their magnitude."""
    out = {p: Fused(f.weight, f.bias) for p, f in layers.items()}
    for g in groups:
        device = out[g.producers[0][0]].weight.device
        perm, widths = perms[g.name].long().to(device), cells[g.name].to(device)
        n = len(perm)
        x = cell_centres(widths)
        for p, _ in (*g.producers, *g.depthwise):
            f = out[p]
            out[p] = Fused(resample_axis(f.weight[perm], 0, x), resample_axis(f.bias[perm], 0, x))
        scale = widths.to(torch.float64) * n / 2  # (n',): new cell width / old cell width
        for c in g.consumers:
            f = out[c]
            w = resample_axis(f.weight[:, perm], 1, x)  # (out, n', *kernel)
            out[c] = Fused(w * scale.view(1, -1, *([1] * (w.dim() - 2))).to(w.dtype), f.bias)
    return out


def select_channels(
    layers: dict[str, Fused], groups: list[ChannelGroup], keep: dict[str, Tensor], rescale: bool = True
) -> dict[str, Fused]:
    """Structured pruning, the baseline: keep the listed channels of each group; with ``rescale`` the
    readers are scaled by n / n' as resampling scales them (sums over channels keep their magnitude)."""
    out = {p: Fused(f.weight, f.bias) for p, f in layers.items()}
    for g in groups:
        idx = keep[g.name].long().to(out[g.producers[0][0]].weight.device)
        scale = group_size(layers, g) / len(idx) if rescale else 1.0
        for p, _ in (*g.producers, *g.depthwise):
            out[p] = Fused(out[p].weight[idx], out[p].bias[idx])
        for c in g.consumers:
            out[c] = Fused(out[c].weight[:, idx] * scale, out[c].bias)
    return out


@torch.no_grad()
def recalibrate(small: TapNet, base: TapNet, groups: list[ChannelGroup], keep: dict[str, Tensor], x: Tensor) -> None:
    """BatchNorm recalibration of a pruned network (``assemble`` of ``select_channels``), in place,
    in one forward pass over the normalized images ``x`` (N, C, H, W): every BatchNorm of the base
    re-estimates its statistics on ``x``, as one train-mode pass with ``momentum=None`` does.
    BatchNorms outside the groups are still modules: each is replaced by a copy (the resident
    base's stays untouched) that re-estimates its own. Folded ones (a group's writers) live in the
    layer they were folded into: that layer's channels get the affine map that makes the channel
    compute ``gamma * (z - mean) / sqrt(var + eps) + beta`` with z's mean and variance on ``x``."""
    folded = {p: (keep[g.name].long(), base.get_submodule(bn)) for g in groups for p, bn in (*g.producers, *g.depthwise) if bn}
    live = [n for n, m in small.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for path in live:
        bn = copy.deepcopy(small.get_submodule(path))
        bn.momentum = None  # a cumulative average: one pass gives the statistics of x exactly
        bn.reset_running_stats()
        replace_module(small, path, bn.train())

    def fix(path: str):
        idx, bn = folded[path]
        gamma, beta = bn.weight[idx].double(), bn.bias[idx].double()  # (k,)
        a = gamma / torch.sqrt(bn.running_var[idx].double() + bn.eps)  # (k,) the folded scale: f = a z + b

        def gain(var_f: Tensor) -> Tensor:  # (k,): gamma / sqrt(var z + eps) per unit of f, f = a z + b
            var_z = var_f / torch.where(a == 0, 1.0, a).square()
            return torch.where(a == 0, 0.0, gamma / a / torch.sqrt(var_z + bn.eps))

        def hook(layer: nn.Module, _i: object, out: Tensor) -> Tensor:
            f = out.transpose(0, 1).flatten(1).double()  # (k, N * H * W)
            mean = f.mean(1)
            # as a BatchNorm: the pass normalizes by the batch (biased) variance, serving by the
            # running (unbiased) one
            now, kept = gain(f.var(1, unbiased=False)), gain(f.var(1, unbiased=True))
            layer.weight.mul_(kept.view(-1, *([1] * (layer.weight.dim() - 1))).to(layer.weight.dtype))
            layer.bias.copy_(((layer.bias.double() - mean) * kept + beta).to(layer.bias.dtype))
            shape = (1, -1, *([1] * (out.dim() - 2)))
            return ((out.double() - mean.view(shape)) * now.view(shape) + beta.view(shape)).to(out.dtype)

        return hook

    handles = [small.get_submodule(p).register_forward_hook(fix(p)) for p in folded]
    try:
        small(x)
    finally:
        for h in handles:
            h.remove()
        for path in live:
            small.get_submodule(path).eval()


def _rebuilt(old: Layer, f: Fused, depthwise: bool) -> Layer:
    w = f.weight.float()
    if isinstance(old, nn.Linear):
        new: Layer = nn.Linear(w.shape[1], w.shape[0], device=old.weight.device)
    else:
        groups = w.shape[0] if depthwise else 1
        new = nn.Conv2d(w.shape[1] * groups, w.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                        groups=groups, bias=True, padding_mode=old.padding_mode, device=old.weight.device)  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(f.bias.float())
    return new.requires_grad_(False)


def assemble(base: TapNet, groups: list[ChannelGroup], layers: dict[str, Fused]) -> TapNet:
    """A copy of ``base`` with the given layers rebuilt (and their BatchNorms folded away); every
    other layer still shares the resident base's tensors."""
    net = shared_copy(base)
    depthwise = {p for g in groups for p, _ in g.depthwise}
    for p, f in layers.items():
        replace_module(net, p, _rebuilt(base.get_submodule(p), f, p in depthwise))
    for g in groups:
        for _, bn in (*g.producers, *g.depthwise):
            if bn is not None:
                replace_module(net, bn, nn.Identity())
    return net.eval()


def group_size(layers: dict[str, Fused], g: ChannelGroup) -> int:
    return layers[g.producers[0][0]].weight.shape[0]


def group_sizes(net: TapNet, groups: list[ChannelGroup]) -> dict[str, int]:
    return {g.name: net.get_submodule(g.producers[0][0]).weight.shape[0] for g in groups}


def resampled_params(net: TapNet, groups: list[ChannelGroup], widths: dict[str, int]) -> int:
    """Parameters of the network ``assemble`` would build at these widths (works on a meta-device net)."""
    out_of = {p: widths[g.name] for g in groups for p, _ in (*g.producers, *g.depthwise)}
    in_of = {c: widths[g.name] for g in groups for c in g.consumers}
    depthwise = {p for g in groups for p, _ in g.depthwise}
    folded = {bn for g in groups for _, bn in (*g.producers, *g.depthwise) if bn}
    total = sum(p.numel() for p in net.parameters())
    total -= sum(p.numel() for bn in folded for p in net.get_submodule(bn).parameters())
    for path in {*out_of, *in_of}:
        layer = net.get_submodule(path)
        total -= sum(p.numel() for p in layer.parameters())
        cout = out_of.get(path, layer.weight.shape[0])
        cin = 1 if path in depthwise else in_of.get(path, layer.weight.shape[1])
        total += cout * cin * int(np.prod(layer.weight.shape[2:])) + cout  # weight + bias
    return total
