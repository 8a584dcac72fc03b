"""Small training and evaluation loops shared by the methods and the experiments."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo_store.core.cards import InputSpec


def normalize(x: Tensor, spec: InputSpec) -> Tensor:
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std  # (B, C, H, W)


def deterministic() -> None:
    """Seeded composition must repeat exactly on CUDA too: no autotuning, deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def fit(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    x: Tensor,
    y: Tensor,
    spec: InputSpec | None,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
    slow: Iterable[nn.Parameter] = (),
    slow_lr: float = 0.0,
) -> list[float]:
    """Adam on cross-entropy; returns the mean loss of each epoch. Seeded, so repeatable. ``spec`` None:
    ``x`` is fed as it is (features computed once, for a head alone). ``slow``: more parameters,
    trained at ``slow_lr`` (pretrained layers tuned beside new ones)."""
    deterministic()
    groups = [{"params": [p for p in params if p.requires_grad], "lr": lr}]
    if slow_params := [p for p in slow if p.requires_grad]:
        groups.append({"params": slow_params, "lr": slow_lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * -(-len(x) // batch_size)))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            xb = x[idx].to(device)  # (B, C, H, W), or (B, D) features
            xb = xb if spec is None else normalize(xb, spec)
            yb = y[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        if on_epoch:
            on_epoch(epoch, losses[-1])
    return losses


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, spec: InputSpec, batch_size: int = 512, device: str = "cpu") -> Tensor:
    outs = [model(normalize(x[i : i + batch_size].to(device), spec)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs)  # (N, K)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, spec: InputSpec, device: str = "cpu") -> float:
    return (predict_logits(model, x, spec, device=device).argmax(1) == y).float().mean().item()


@torch.no_grad()
def init_head_rows(head: nn.Linear, base_head: nn.Linear, base_labels: Sequence[str], labels: Sequence[str]) -> None:
    """Rows of a new head for labels the base already knows start from the base head's rows."""
    for i, label in enumerate(labels):
        if label in base_labels:
            j = list(base_labels).index(label)
            head.weight[i].copy_(base_head.weight[j])
            head.bias[i].copy_(base_head.bias[j])


@torch.no_grad()
def fused_head(parts: Sequence[tuple[nn.Linear, Sequence[str], Sequence[str]]], labels: Sequence[str]) -> nn.Linear:
    """A head over several feature vectors, concatenated in the order of ``parts`` (each: the head
    that read that vector, its labels, the labels it brings): each brought label's row starts from
    the row of the first head that brings it, on that head's block, and zero elsewhere; every other
    weight starts at zero."""
    head = nn.Linear(sum(h.in_features for h, _, _ in parts), len(labels))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    start, done = 0, set()
    for base_head, base_labels, brings in parts:
        for label in [x for x in brings if x not in done]:
            done.add(label)
            i, j = list(labels).index(label), list(base_labels).index(label)
            head.weight[i, start : start + base_head.in_features] = base_head.weight[j]
            head.bias[i] = base_head.bias[j]
        start += base_head.in_features
    return head.to(parts[0][0].weight.device)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
