"""Step 2 of cloning, localization (``M``): which filters of a source's prefix carry its behaviour
on the labels to clone.

Mask logits (one per filter of every conv up to the source depth) are fitted so that the masked
source, run to its own head, reproduces the source's outputs restricted to the cloned labels on the
correction images and on occluded copies of them (a LIME-style local fit), with a penalty on the
mean gate that drives unneeded filters to zero. The gates are binarized at 0.5 (every conv keeps at
least its strongest filter). Fidelity is the agreement of the masked and the full source on the
cloned labels, on the unperturbed images.
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


@dataclass
class Localized:
    masks: dict[str, Tensor]  # conv path -> (C_out,) bool, True = kept
    kept_fraction: float  # kept filters / filters, over the prefix
    fidelity: float  # top-1 agreement (cloned labels) of the hard-masked and the full source
    loss: float  # the last fitting loss


def localize(
    source: TapNet,
    depth: str,
    cols: list[int],
    images: Tensor,
    spec: InputSpec,
    *,
    steps: int = 150,
    sparsity: float = 0.5,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> Localized:
    """Masks over every conv of ``source`` up to tap ``depth``; ``cols`` are the source's output
    columns of the cloned labels; ``images`` (N, C, H, W) in [0, 1] the correction data."""
    net = shared_copy(source).eval()  # hooks go on the copy: the resident source never sees them
    convs = source.prefix_convs(depth)
    logits = {
        p: torch.full((net.get_submodule(p).out_channels,), 3.0, device=device, requires_grad=True) for p in convs
    }
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
            out = F.log_softmax(net(x)[:, cols], 1)
        density = torch.cat(list(gates.values())).mean()
        loss = F.kl_div(out, target, log_target=True, reduction="batchmean") + sparsity * density
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
        on_step(step, loss_value)
    masks = {p: _binarize(z.detach()) for p, z in logits.items()}
    return Localized(masks, kept_fraction(masks), fidelity(source, masks, cols, images, spec, device), loss_value)


def kept_fraction(masks: dict[str, Tensor]) -> float:
    """Kept filters / filters over the masked convs (1 when there are none)."""
    filters = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / filters if filters else 1.0


def _binarize(z: Tensor) -> Tensor:
    keep = z > 0  # sigmoid(z) > 0.5
    if not keep.any():
        keep[z.argmax()] = True
    return keep.cpu()


@torch.no_grad()
def fidelity(
    source: TapNet, masks: dict[str, Tensor], cols: list[int], images: Tensor, spec: InputSpec, device: str = "cpu"
) -> float:
    """Top-1 agreement on the cloned labels between the hard-masked and the full source."""
    net = shared_copy(source).eval()
    gates = {p: m.to(device=device, dtype=torch.float32) for p, m in masks.items()}
    agree = 0
    for i in range(0, len(images), 512):
        x = normalize(images[i : i + 512].to(device), spec)
        with soft_masks(net, gates):
            masked = net(x)[:, cols].argmax(1)
        agree += int((masked == source(x)[:, cols].argmax(1)).sum())
    return agree / len(images)
