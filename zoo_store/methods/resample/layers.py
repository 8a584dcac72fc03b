"""Integral-network conversion and width resampling (INN, CVPR 2023): docs/methods/resample.md.

Every coupled channel group of a base (``zoo_store.archs.groups.channel_groups``) is treated as samples of a
smooth function on [-1, 1]: channel ``i`` of ``n`` sits at the centre of the i-th of n equal cells.
Converting fuses each group's BatchNorms into the convs that feed them (a BatchNorm over a
concatenation, or one not directly after its conv, is kept: its rows are resampled with the
channels) and orders the channels along a short travelling-salesman tour (neighbours alike), which changes nothing
the network
computes. Resampling evaluates every coupled tensor at ``n'`` new cell centres by cubic
convolution and scales the readers by the new cells' widths over the old ones (``n / n'`` on a
uniform grid): a plain dense, smaller network. A group in blocks (a grouped conv's channels) is
ordered, and resampled, block by block: block i is the i-th of equal sub-intervals of [-1, 1], and
every block keeps the same number of channels.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.archs.groups import ChannelGroup, group_width, grouped_columns, in_blocks
from zoo_store.archs.surgery import replace_module, shared_copy

Layer = nn.Conv2d | nn.Linear


@dataclass
class Fused:
    """A conv or linear layer's weight and bias in float64, BatchNorm folded in where it had one; or
    a BatchNorm that is not folded (one over a concatenation): weight (C, 3), each channel's scale,
    running mean and running variance, bias (C,) its shift."""

    weight: Tensor  # (out, in / groups, *kernel), or (C, 3) for a BatchNorm
    bias: Tensor  # (out,)
    norm: bool = False  # a BatchNorm's rows


def _fold_bn(layer: Layer, bn: nn.BatchNorm2d | None) -> Fused:
    w = layer.weight.detach().double().clone()
    b = (
        layer.bias.detach().double().clone()
        if layer.bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    )
    if bn is not None:
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (out,)
        w = w * scale.view(-1, *([1] * (w.dim() - 1)))
        b = (b - bn.running_mean.double()) * scale + bn.bias.detach().double()
    return Fused(w, b)


def _bn_rows(bn: nn.BatchNorm2d | nn.BatchNorm1d) -> Fused:
    """A BatchNorm's rows (tracing carries only those with a scale, a shift and running statistics)."""
    stats = torch.stack([bn.weight.detach(), bn.running_mean, bn.running_var], 1)  # (C, 3)
    return Fused(stats.double().clone(), bn.bias.detach().double().clone(), norm=True)


def fused_layers(net: TapNet, groups: list[ChannelGroup]) -> dict[str, Fused]:
    """Every layer any group touches, BatchNorm folded into the producers and depthwise convs (the
    BatchNorms over a concatenation kept as their rows)."""
    bns = {p: bn for g in groups for p, bn in (*g.producers, *g.depthwise)}
    touched = (
        list(bns) + [c for g in groups for c in (*g.consumers, *g.grouped)] + [c for g in groups for c, _ in g.sliced]
    )
    layers = {p: _fold_bn(net.get_submodule(p), net.get_submodule(bns[p]) if bns.get(p) else None) for p in touched}
    return layers | {b: _bn_rows(net.get_submodule(b)) for g in groups for b, _ in g.carried}


def channel_features(layers: dict[str, Fused], g: ChannelGroup) -> Tensor:
    """(n, d): everything each channel of the group carries, one row per channel."""
    rows = [
        torch.cat([f.weight.flatten(1), f.bias[:, None]], 1)
        for f in (layers[p] for p, _ in (*g.producers, *g.depthwise))
    ]
    cols = [layers[c].weight.transpose(0, 1).flatten(1) for c in g.consumers]  # (n, out * k * k)
    for c in g.grouped:  # (out, n / blocks, *k): channel j of block i is column j of row block i
        w = layers[c].weight
        wv = w.reshape(g.blocks, w.shape[0] // g.blocks, w.shape[1], -1)  # (blocks, out / blocks, n / blocks, k * k)
        cols.append(wv.transpose(1, 2).reshape(g.blocks * w.shape[1], -1))  # (n, out / blocks * k * k)
    n = group_size(layers, g)
    cols += [layers[c].weight[:, at : at + n].transpose(0, 1).flatten(1) for c, at in g.sliced]  # (n, out * k * k)
    rows += [torch.cat([layers[b].weight[at : at + n], layers[b].bias[at : at + n, None]], 1) for b, at in g.carried]
    return torch.cat(rows + cols, 1)


def block_order(x: Tensor, blocks: int) -> np.ndarray:
    """``two_opt_order`` within each of ``blocks`` equal blocks of the rows of ``x`` (n, d): (n,)."""
    b = x.shape[0] // blocks
    return np.concatenate([two_opt_order(x[i * b : (i + 1) * b], seeds=4) + i * b for i in range(blocks)])


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


def block_centres(cells: Tensor, blocks: int) -> list[Tensor]:
    """Cell widths (n',) of a group in ``blocks`` equal blocks, each block's summing to 2 / blocks ->
    each block's cell centres, on a [-1, 1] of its own."""
    return [cell_centres(c * blocks) for c in cells.view(blocks, -1)]


def _along(t: Tensor, axis: int, centres: list[Tensor]) -> Tensor:
    """``resample_axis`` block by block: ``t``'s axis in len(centres) equal blocks, block i resampled
    at centres[i]; no block reads another's samples."""
    if len(centres) == 1:
        return resample_axis(t, axis, centres[0])
    blocks, b = len(centres), t.shape[axis] // len(centres)
    eye = torch.eye(b, dtype=t.dtype, device=t.device)
    m = torch.stack([resample_axis(eye, 0, x) for x in centres])  # (blocks, b', b): each block's interpolation
    moved = t.movedim(axis, 0)  # (n, *rest)
    out = torch.einsum("kji,kir->kjr", m, moved.reshape(blocks, b, -1))  # (blocks, b', prod(rest))
    return out.reshape(-1, *moved.shape[1:]).movedim(0, axis)


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


@dataclass(frozen=True)
class _Edit:
    """What one group does to the tensors it touches (a permutation and a resample, or a selection)."""

    rows: Callable[[Tensor], Tensor]  # (n, ...) -> (n', ...): a writer's rows
    cols: Callable[[Tensor], Tensor]  # (out, n, *kernel) -> (out, n', *kernel): a reader's columns
    grouped: Callable[[Tensor], Tensor]  # (out, n / blocks, *kernel) -> (out, n' / blocks, *kernel)


def permute_and_resample(
    layers: dict[str, Fused],
    groups: list[ChannelGroup],
    perms: dict[str, Tensor],
    cells: dict[str, Tensor],
) -> dict[str, Fused]:
    """Apply each group's permutation (n,) then resample it to its cells (n',), block by block in a
    group in blocks. Readers are scaled by each new cell's width over the old one's, so sums over
    channels keep their magnitude."""

    def edit(g: ChannelGroup) -> _Edit:
        device = layers[g.producers[0][0]].weight.device
        perm, widths = perms[g.name].long().to(device), cells[g.name].to(device)
        xs = block_centres(widths, g.blocks)
        scale = widths.to(torch.float64) * len(perm) / 2  # (n',): new cell width / old cell width

        def cols(w: Tensor) -> Tensor:
            w = _along(w[:, perm], 1, xs)
            return w * scale.view(1, -1, *([1] * (w.dim() - 2))).to(w.dtype)

        def grouped(w: Tensor) -> Tensor:  # row block i reads channel block i: its columns at block i's cells
            w = grouped_columns(w, perm, g.blocks)
            ob, kernel = w.shape[0] // g.blocks, w.shape[2:]
            flat = (
                w.movedim(1, 0).reshape(-1, g.blocks, ob, *kernel).transpose(0, 1).reshape(len(perm), -1)
            )  # (n, ob * k * k)
            flat = _along(flat, 0, xs) * scale.view(-1, 1).to(w.dtype)  # (n', ob * k * k): channel i*b'+j, row block i
            return flat.view(g.blocks, -1, ob, *kernel).transpose(1, 2).reshape(w.shape[0], -1, *kernel)

        return _Edit(lambda t: _along(t[perm], 0, xs), cols, grouped)

    return _edited(layers, groups, {g.name: edit(g) for g in groups})


def select_channels(
    layers: dict[str, Fused], groups: list[ChannelGroup], keep: dict[str, Tensor], rescale: bool = True
) -> dict[str, Fused]:
    """Structured pruning, the baseline: keep the listed channels of each group (as many of each
    block, in block order, in a group in blocks); with ``rescale`` the readers are scaled by n / n'
    as resampling scales them (sums over channels keep their magnitude)."""

    def edit(g: ChannelGroup) -> _Edit:
        idx = keep[g.name].long().to(layers[g.producers[0][0]].weight.device)
        n = group_size(layers, g)
        if not in_blocks(idx, n, g.blocks):
            raise ValueError(f"group {g.name} is in {g.blocks} blocks: keep as many channels of each, in block order")
        scale = n / len(idx) if rescale else 1.0
        return _Edit(lambda t: t[idx], lambda w: w[:, idx] * scale, lambda w: grouped_columns(w, idx, g.blocks) * scale)

    return _edited(layers, groups, {g.name: edit(g) for g in groups})


def _edited(layers: dict[str, Fused], groups: list[ChannelGroup], edits: dict[str, _Edit]) -> dict[str, Fused]:
    """Every tensor each group touches, edited: its writers' rows (producers, depthwise convs), its
    readers' columns (consumers, grouped convs block by block), and its segment of the layers that
    read a concatenation (columns) and of the BatchNorms over one (rows), a layer's last offset
    first, so that the earlier offsets still point where they did."""
    out = dict(layers)
    for g in groups:
        e = edits[g.name]
        for p, _ in (*g.producers, *g.depthwise):
            out[p] = Fused(e.rows(out[p].weight), e.rows(out[p].bias))
        for c in g.consumers:
            out[c] = Fused(e.cols(out[c].weight), out[c].bias)
        for c in g.grouped:
            out[c] = Fused(e.grouped(out[c].weight), out[c].bias)
    sizes = {g.name: group_size(layers, g) for g in groups}
    members = sorted(
        ((layer, at, g.name) for g in groups for layer, at in (*g.sliced, *g.carried)), key=lambda m: (m[0], -m[1])
    )
    for layer, at, name in members:
        f, n, e = out[layer], sizes[name], edits[name]
        if f.norm:  # its rows; an interpolated variance kept at or above the segment's smallest (cubic overshoots)
            stats = e.rows(f.weight[at : at + n])  # (n', 3)
            stats = torch.cat([stats[:, :2], stats[:, 2:].clamp_min(f.weight[at : at + n, 2].min())], 1)
            out[layer] = Fused(
                torch.cat([f.weight[:at], stats, f.weight[at + n :]]),
                torch.cat([f.bias[:at], e.rows(f.bias[at : at + n]), f.bias[at + n :]]),
                norm=True,
            )
        else:
            out[layer] = Fused(
                torch.cat([f.weight[:, :at], e.cols(f.weight[:, at : at + n]), f.weight[:, at + n :]], 1), f.bias
            )
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
    folded = {
        p: (keep[g.name].long(), base.get_submodule(bn)) for g in groups for p, bn in (*g.producers, *g.depthwise) if bn
    }
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


def _rebuilt(old: nn.Module, f: Fused, depthwise: bool) -> nn.Module:
    w = f.weight.float()
    if f.norm:  # a BatchNorm over a concatenation: its rows, (C, 3) and (C,)
        assert isinstance(old, nn.BatchNorm2d | nn.BatchNorm1d)
        bn = type(old)(w.shape[0], eps=old.eps, momentum=old.momentum, device=old.running_mean.device).eval()
        with torch.no_grad():
            bn.weight.copy_(w[:, 0])
            bn.running_mean.copy_(w[:, 1])
            bn.running_var.copy_(w[:, 2])
            bn.bias.copy_(f.bias.float())
        return bn.requires_grad_(False)
    if isinstance(old, nn.Linear):
        new: Layer = nn.Linear(w.shape[1], w.shape[0], device=old.weight.device)
    else:
        groups = w.shape[0] if depthwise else old.groups  # a grouped conv keeps its group count
        new = nn.Conv2d(
            w.shape[1] * groups,
            w.shape[0],
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            groups=groups,
            bias=True,
            padding_mode=old.padding_mode,
            device=old.weight.device,
        )
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(f.bias.float())
    return new.requires_grad_(False)


def module_tensors(layers: dict[str, Fused]) -> dict[str, Tensor]:
    """The tensors of the modules ``assemble`` builds from ``layers``, by state-dict name, float32:
    for ``functional_call`` on that network, with gradients flowing to the layers."""
    out = {}
    for p, f in layers.items():
        if f.norm:  # the statistics are buffers: no gradient flows through them (the scale and shift get it)
            out |= {
                f"{p}.weight": f.weight[:, 0].float(),
                f"{p}.bias": f.bias.float(),
                f"{p}.running_mean": f.weight[:, 1].detach().float(),
                f"{p}.running_var": f.weight[:, 2].detach().float(),
            }
        else:
            out |= {f"{p}.weight": f.weight.float(), f"{p}.bias": f.bias.float()}
    return out


def assemble(base: TapNet, groups: list[ChannelGroup], layers: dict[str, Fused]) -> TapNet:
    """A copy of ``base`` with the given layers rebuilt (the BatchNorms folded into them gone, the
    kept ones rebuilt from their rows); every other layer still shares the resident base's tensors."""
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
    return {g.name: group_width(net, g) for g in groups}


def resampled_params(net: TapNet, groups: list[ChannelGroup], widths: dict[str, int]) -> int:
    """Parameters of the network ``assemble`` would build at these widths (works on a meta-device net)."""
    out_of = {p: widths[g.name] for g in groups for p, _ in (*g.producers, *g.depthwise)}
    in_of = {c: widths[g.name] for g in groups for c in (*g.consumers, *g.grouped)}
    sizes = group_sizes(net, groups)
    narrower: dict[str, int] = {}  # a layer reading a concatenation, or a BatchNorm over one -> channels it loses
    for g in groups:
        for layer, _ in (*g.sliced, *g.carried):
            narrower[layer] = narrower.get(layer, 0) + sizes[g.name] - widths[g.name]
    depthwise = {p for g in groups for p, _ in g.depthwise}
    folded = {bn for g in groups for _, bn in (*g.producers, *g.depthwise) if bn}
    total = sum(p.numel() for p in net.parameters())
    total -= sum(p.numel() for bn in folded for p in net.get_submodule(bn).parameters())
    for path in {*out_of, *in_of, *narrower}:
        layer = net.get_submodule(path)
        total -= sum(p.numel() for p in layer.parameters())
        if isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d):
            total += 2 * (layer.num_features - narrower[path])  # rebuilt with a scale and a shift
            continue
        cout = out_of.get(path, layer.weight.shape[0])
        per_group = getattr(layer, "groups", 1)  # a grouped conv's weight holds its input channels / groups
        cin = (
            1
            if path in depthwise
            else (in_of[path] // per_group if path in in_of else layer.weight.shape[1] - narrower.get(path, 0))
        )
        total += cout * cin * int(np.prod(layer.weight.shape[2:])) + cout  # weight + bias
    return total
