"""Localization (``M``): which filters of a source's layers after the cut carry its behaviour on
the labels to clone.

Mask logits (one per filter of every given conv) are fitted so that the gated source reproduces the
source's own outputs restricted to the cloned labels, on the correction images and on occluded
copies of them (a LIME-style local fit), with a penalty on the mean gate that drives unneeded
filters to zero. ``branch`` says how the gated source is reached: from the pixels (the source
alone: masks fitted once, before insertion) or through the target's prefix and the adapter (the
clone as it will serve: localization given ``R`` and ``A``). The gates are binarized at 0.5 (every
conv keeps at least its strongest filter). Fidelity is the top-1 agreement, on the cloned labels and
the unperturbed images, of the hard-masked branch with the full source from the pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo_store.archs import TapNet
from zoo_store.archs.surgery import shared_copy
from zoo_store.core.cards import InputSpec
from zoo_store.methods.clone.layers import occlude, soft_masks
from zoo_store.training import normalize

Branch = Callable[[TapNet, Tensor], Tensor]  # (gated source copy, normalized images) -> (B, classes) its logits


def from_pixels(net: TapNet, x: Tensor) -> Tensor:
    return net(x)  # (B, classes)


@dataclass
class Localized:
    masks: dict[str, Tensor]  # conv path -> (C_out,) bool, True = kept
    logits: dict[str, Tensor]  # conv path -> (C_out,) the fitted mask logits (a later round starts from them)
    kept_fraction: float  # kept filters / filters
    fidelity: float  # top-1 agreement (cloned labels) of the hard-masked branch and the full source
    loss: float  # the last fitting loss


def localize(
    source: TapNet,
    convs: list[str],
    cols: list[int],
    images: Tensor,
    spec: InputSpec,
    *,
    branch: Branch = from_pixels,
    start: dict[str, Tensor] | None = None,
    steps: int = 150,
    sparsity: float = 0.5,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> Localized:
    """Masks over ``convs`` of ``source``; ``cols`` are the source's output columns of the cloned
    labels; ``images`` (N, C, H, W) in [0, 1] the correction data; ``start`` earlier logits."""
    net = shared_copy(source).eval()  # hooks go on the copy: the resident source never sees them
    init = start or {}
    logits = {
        p: init.get(p, torch.full((net.get_submodule(p).out_channels,), 3.0)).clone().to(device).requires_grad_()
        for p in convs
    }
    if not logits:  # cut after the last conv: nothing to mask
        return Localized({}, {}, 1.0, fidelity(source, {}, cols, images, spec, branch, device), float("nan"))
    opt = torch.optim.Adam(logits.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for step in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
        x = images[idx]
        x = torch.cat([x, occlude(x, gen)])  # (2B, C, H, W): the images and perturbed copies
        x = normalize(x.to(device), spec)
        with torch.no_grad():
            target = F.log_softmax(source(x)[:, cols], 1)  # (2B, K)
        gates = {p: torch.sigmoid(z) for p, z in logits.items()}
        with soft_masks(net, gates):
            out = F.log_softmax(branch(net, x)[:, cols], 1)
        density = torch.cat(list(gates.values())).mean()
        loss = F.kl_div(out, target, log_target=True, reduction="batchmean") + sparsity * density
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
        on_step(step, loss_value)
    masks = {p: _binarize(z.detach()) for p, z in logits.items()}
    agree = fidelity(source, masks, cols, images, spec, branch, device)
    return Localized(masks, {p: z.detach().cpu() for p, z in logits.items()}, kept_fraction(masks), agree, loss_value)


def kept_fraction(masks: dict[str, Tensor]) -> float:
    """Kept filters / filters over the masked convs (1 when there are none)."""
    filters = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / filters if filters else 1.0


def random_like(masks: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Masks keeping as many filters of each conv as ``masks`` do, which ones drawn by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p, m in masks.items():
        keep = torch.zeros_like(m)
        keep[torch.randperm(m.numel(), generator=gen)[: int(m.sum())]] = True
        out[p] = keep
    return out


def _binarize(z: Tensor) -> Tensor:
    keep = z > 0  # sigmoid(z) > 0.5
    if not keep.any():
        keep[z.argmax()] = True
    return keep.cpu()


@torch.no_grad()
def fidelity(
    source: TapNet,
    masks: dict[str, Tensor],
    cols: list[int],
    images: Tensor,
    spec: InputSpec,
    branch: Branch = from_pixels,
    device: str = "cpu",
) -> float:
    """Top-1 agreement on the cloned labels between the hard-masked branch and the full source."""
    net = shared_copy(source).eval()
    gates = {p: m.to(device=device, dtype=torch.float32) for p, m in masks.items()}
    agree = 0
    for i in range(0, len(images), 512):
        x = normalize(images[i : i + 512].to(device), spec)
        with soft_masks(net, gates):
            masked = branch(net, x)[:, cols].argmax(1)
        agree += int((masked == source(x)[:, cols].argmax(1)).sum())
    return agree / len(images)
