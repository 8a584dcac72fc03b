"""Step 3 of cloning, insertion (``R``, ``A``, ``F_c``): where the masked source prefix joins the
target. Each candidate tap, from deep to shallow, gets a fresh adapter and head trained briefly on
the correction data; the tap with the lowest converged loss (the last epoch's mean) wins."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.cards import Card
from zoo_store.methods.clone.layers import Adapter, Cloned
from zoo_store.training import fit, init_head_rows


@dataclass
class Part:
    """One source as it will be attached: its masked prefix (a structural copy) cut at ``depth``."""

    source: TapNet
    depth: str


def build_cloned(target: TapNet, parts: list[Part], inserts: list[str], num_labels: int) -> Cloned:
    """The composed network with zero adapters (the target's features untouched) and a new head."""
    adapters = [Adapter(p.source.tap(p.depth).channels, target.tap(r).channels) for p, r in zip(parts, inserts, strict=True)]
    head = nn.Linear(target.feature_dim, num_labels)
    device = next(target.parameters()).device
    return Cloned(target, [p.source for p in parts], [p.depth for p in parts], inserts, adapters, head).to(device)


def fresh_cloned(target: TapNet, target_card: Card, parts: list[Part], inserts: list[str], labels: list[str],
                 seed: int) -> Cloned:  # fmt: skip
    """``build_cloned``, seeded, with the head's rows for the target's own labels from its head."""
    torch.manual_seed(seed)
    model = build_cloned(target, parts, inserts, len(labels))
    init_head_rows(model.head, target.head_layer, target_card.labels, labels)
    return model


def trainable(model: Cloned) -> list[nn.Parameter]:
    return [*model.adapters.parameters(), *model.head.parameters()]


def search_insert(
    target: TapNet, target_card: Card, parts: list[Part], which: int, fixed: list[str], labels: list[str],
    x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int, seed: int, device: str,
    on_candidate: Callable[[str, float], None] = lambda tap, loss: None,
) -> tuple[str, dict[str, float]]:  # fmt: skip
    """The insertion tap of part ``which`` (the others at ``fixed``): candidates from deep to shallow,
    each trained for ``epochs``; returns the best tap and every candidate's converged loss."""
    losses: dict[str, float] = {}
    for tap in reversed(target.spatial_taps()):
        inserts = [tap if i == which else r for i, r in enumerate(fixed)]
        model = fresh_cloned(target, target_card, parts, inserts, labels, seed)
        history = fit(model, trainable(model), x, y, target_card.input, epochs=epochs, lr=lr,
                      batch_size=batch_size, seed=seed, device=device)  # fmt: skip
        losses[tap] = history[-1]
        on_candidate(tap, history[-1])
    return min(losses, key=lambda t: (losses[t], t)), losses
