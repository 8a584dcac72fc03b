"""Step 3 of cloning, the join (source depth, ``R``, ``A``, ``F_c``): where the masked source prefix
is cut and where it joins the target. Every pair (source depth, target tap) gets a fresh adapter and
head trained briefly on the correction data; the pair with the best validation accuracy wins."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zoo_store.archs import TapNet
from zoo_store.core.cards import Card
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods.clone.layers import Adapter, Cloned
from zoo_store.training import accuracy, fit, init_head_rows


@dataclass
class Part:
    """One source as it will be attached: its masked prefix (a structural copy) cut at ``depth``."""

    source: TapNet
    depth: str


def build_cloned(target: TapNet, parts: list[Part], inserts: list[str], num_labels: int, kinds: list[str]) -> Cloned:
    """The composed network with fresh adapters of the given kinds (the target's features untouched)
    and a new head."""
    adapters = [
        Adapter(p.source.tap(p.depth).channels, target.tap(r).channels, k)
        for p, r, k in zip(parts, inserts, kinds, strict=True)
    ]
    head = nn.Linear(target.feature_dim, num_labels)
    device = next(target.parameters()).device
    return Cloned(target, [p.source for p in parts], [p.depth for p in parts], inserts, adapters, head).to(device)


def fresh_cloned(
    target: TapNet,
    target_card: Card,
    parts: list[Part],
    inserts: list[str],
    labels: list[str],
    seed: int,
    adapter: str = "1x1",
) -> Cloned:
    """``build_cloned``, seeded, with the head's rows for the target's own labels from its head."""
    torch.manual_seed(seed)
    model = build_cloned(target, parts, inserts, len(labels), [adapter] * len(parts))
    init_head_rows(model.head, target.head_layer, target_card.labels, labels)
    return model


def trainable(model: Cloned) -> list[nn.Parameter]:
    return [*model.adapters.parameters(), *model.head.parameters()]


def train_cloned(
    model: Cloned,
    data: TaskData,
    card: Card,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: str,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Cloned:
    """Train the adapters and the head (the bases stay in eval mode); returns the model in eval mode."""
    model.adapters.train()
    fit(
        model,
        trainable(model),
        data.train_x,
        data.train_y,
        card.input,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        on_epoch=on_epoch,
    )
    return model.eval()


def search_join(
    target: TapNet,
    target_card: Card,
    parts: list[Part],
    which: int,
    part_at: Callable[[str], Part],
    fixed: list[str],
    data: TaskData,
    *,
    adapter: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: str,
    on_candidate: Callable[[str, float], None] = lambda name, acc: None,
) -> tuple[Part, str, dict[str, float]]:
    """Source depth and insertion tap of part ``which`` (the others as they are): every pair, deep
    first, trained for ``epochs``; returns the winner's part and tap, and every pair's validation
    accuracy (``"depth->tap"``). Ties go to the pair tried first."""
    scores: dict[str, float] = {}
    best: tuple[Part, str] | None = None
    best_score = -1.0
    for depth in reversed(parts[which].source.spatial_taps()):
        part = part_at(depth)
        for tap in reversed(target.spatial_taps()):
            trial = [part if i == which else p for i, p in enumerate(parts)]
            inserts = [tap if i == which else r for i, r in enumerate(fixed)]
            model = fresh_cloned(target, target_card, trial, inserts, data.labels, seed, adapter)
            train_cloned(
                model, data, target_card, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device
            )
            name = f"{depth}->{tap}"
            scores[name] = accuracy(model, data.val_x, data.val_y, target_card.input, device=device)
            if scores[name] > best_score:
                best, best_score = (part, tap), scores[name]
            on_candidate(name, scores[name])
    assert best is not None
    return best[0], best[1], scores
