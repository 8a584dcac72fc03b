"""Insertion (``R``, ``A``, ``F_c``), and localization learned together with it.

A join pairs a target tap ``R`` with a source tap (the cut) of the same feature size: the target's
features at ``R`` feed the source's layers after the cut through ``A``. ``A`` starts as the 1x1
conv that best reproduces (ridge, closed form) the source's own features at the cut from the
target's at ``R`` on the correction images; ``F_c`` starts from the target's and the sources' head
rows. The search tries every join from deep to shallow, each trained briefly, and keeps the deepest
within half a point of the best on validation images. ``learn_together`` then alternates the
article's two steps (masks given ``R`` and ``A``; ``A`` and ``F_c`` given the masks) until validation
accuracy stops improving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.archs.base import resize_to
from zoo_store.core.cards import Card, InputSpec
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods.clone.layers import Grafted, masked_source
from zoo_store.methods.clone.localize import Branch, from_pixels, localize
from zoo_store.training import accuracy, fit, fused_head, normalize


@dataclass(frozen=True)
class Join:
    insert: str  # the target tap R whose features feed the source
    cut: str  # the source tap after which the source's layers (M_f) run
    size: tuple[int, int]  # the source's feature size at the cut, at the card's input size


@dataclass
class Part:
    """One source as attached: the network (a masked structural copy, or the resident source), its
    card, the labels it brings, its join and, once localized, its masks."""

    source: TapNet
    card: Card
    labels: tuple[str, ...]
    join: Join
    masks: dict[str, Tensor] | None = None
    fidelity: float | None = None  # the masked branch's top-1 agreement with the source on the cloned labels


def candidates(target: TapNet, source: TapNet, spec: InputSpec) -> list[Join]:
    """Every (R, cut) pair whose feature sizes match, deepest target tap first (then deepest cut);
    every pair when no sizes match."""
    t_shapes = target.tap_shapes(spec.channels, spec.size)
    s_shapes = source.tap_shapes(spec.channels, spec.size)
    pairs = [(r, c) for r in reversed(target.spatial_taps()) for c in reversed(source.spatial_taps())]
    same = [(r, c) for r, c in pairs if t_shapes[r][1:] == s_shapes[c][1:]]
    return [Join(r, c, tuple(s_shapes[c][1:])) for r, c in same or pairs]  # type: ignore[misc]


@torch.no_grad()
def ridge_adapter(
    target: TapNet,
    source: TapNet,
    join: Join,
    images: Tensor,
    spec: InputSpec,
    *,
    ridge: float = 1e-3,
    limit: int = 512,
    seed: int = 0,
) -> nn.Conv2d:
    """The 1x1 conv A that maps the target's features at R (resized to the cut's size) closest, in
    least squares with a ridge, to the source's own features at the cut, on at most ``limit`` of
    ``images`` (N, C, H, W) drawn by ``seed``; the sums are gathered a batch at a time."""
    device = target.head_layer.weight.device
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
    sums: list[Tensor] = []  # [n, sum x, sum y, sum x x^T, sum x y^T]
    for i in range(0, len(pick), 64):
        x = normalize(images[pick[i : i + 64]].to(device), spec)
        f = resize_to(target.run(x, None, join.insert), join.size)  # (B, C_t, h, w)
        g = source.run(x, None, join.cut)  # (B, C_s, h, w)
        xs = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double()  # (B h w, C_t)
        ys = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).double()  # (B h w, C_s)
        part = [
            torch.tensor(float(len(xs)), dtype=torch.float64, device=device),
            xs.sum(0),
            ys.sum(0),
            xs.T @ xs,
            xs.T @ ys,
        ]
        sums = part if not sums else [a + b for a, b in zip(sums, part, strict=True)]
    n, sx, sy, sxx, sxy = sums
    mx, my = sx / n, sy / n
    gram = sxx - n * torch.outer(mx, mx)  # (C_t, C_t): centred
    cross = sxy - n * torch.outer(mx, my)  # (C_t, C_s)
    gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype, device=device)
    w = torch.linalg.solve(gram, cross)  # (C_t, C_s)
    conv = nn.Conv2d(len(mx), len(my), 1, device=device)
    conv.weight.copy_(w.T.reshape(len(my), len(mx), 1, 1).float())
    conv.bias.copy_((my - mx @ w).float())
    return conv


def grafted(target: TapNet, t_card: Card, parts: list[Part], labels: list[str], adapters: list[nn.Conv2d]) -> Grafted:
    """The clone with the given adapters and a new head ``F_c`` started from the bases' head rows."""
    head = fused_head(
        [
            (target.head_layer, t_card.labels, [x for x in labels if x in t_card.labels]),
            *((p.source.head_layer, p.card.labels, p.labels) for p in parts),
        ],
        labels,
    )
    return Grafted(
        target,
        [p.source for p in parts],
        [p.join.insert for p in parts],
        [p.join.cut for p in parts],
        [p.join.size for p in parts],
        adapters,
        head,
    )


def fresh(target: TapNet, t_card: Card, parts: list[Part], data: TaskData, seed: int) -> Grafted:
    """``grafted`` with ridge-fitted adapters (on the training images)."""
    torch.manual_seed(seed)
    adapters = [ridge_adapter(target, p.source, p.join, data.train_x, t_card.input, seed=seed) for p in parts]
    return grafted(target, t_card, parts, data.labels, adapters)


def train(
    model: Grafted,
    data: TaskData,
    card: Card,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> None:
    """Train ``A`` and ``F_c`` (the bases stay frozen and in eval mode)."""
    if epochs > 0:
        params = [*model.adapters.parameters(), *model.head.parameters()]
        fit(
            model,
            params,
            data.train_x,
            data.train_y,
            card.input,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            device=device_of(model.target),
            on_epoch=on_epoch,
        )
    model.eval()


def device_of(net: TapNet) -> str:
    return str(net.head_layer.weight.device)


def val_accuracy(model: Grafted, data: TaskData, card: Card) -> float:
    return accuracy(model, data.val_x, data.val_y, card.input, device=device_of(model.target))


def search_join(
    target: TapNet,
    t_card: Card,
    parts: list[Part],
    which: int,
    data: TaskData,
    *,
    lr: float,
    batch_size: int,
    seed: int,
    tolerance: float = 0.005,
    on_candidate: Callable[[str, float], None] = lambda name, acc: None,
) -> tuple[Join, dict[str, float]]:
    """The join of part ``which`` (the others as they are): every candidate, deepest first, gets a
    fresh ``A`` and ``F_c`` trained one epoch and is scored on validation images; the deepest join
    within ``tolerance`` of the best score wins (a deeper join shares more of the target: it costs
    less). Returns the winner and every score ("R->cut")."""
    scores: dict[str, float] = {}
    joins = candidates(target, parts[which].source, t_card.input)
    for join in joins:
        trial = [Part(p.source, p.card, p.labels, join) if i == which else p for i, p in enumerate(parts)]
        model = fresh(target, t_card, trial, data, seed)
        train(model, data, t_card, epochs=1, lr=lr, batch_size=batch_size, seed=seed)
        scores[_name(join)] = val_accuracy(model, data, t_card)
        on_candidate(_name(join), scores[_name(join)])
    top = max(scores.values())
    return next(j for j in joins if scores[_name(j)] >= top - tolerance), scores


def _name(join: Join) -> str:
    return f"{join.insert}->{join.cut}"


def through(target: TapNet, join: Join, adapter: nn.Conv2d) -> Branch:
    """The gated source reached as the clone reaches it: the target's prefix to R, then ``A`` (both
    fixed), then the source's layers after the cut and its head."""

    def run(net: TapNet, x: Tensor) -> Tensor:
        with torch.no_grad():
            a = adapter(resize_to(target.run(x, None, join.insert), join.size))  # (B, C_s, h, w)
        return net.head_layer(net.run(a, join.cut, None))  # (B, classes)

    return run


def cols_and_images(part: Part, data: TaskData) -> tuple[list[int], Tensor]:
    """The source's output columns of the labels it brings, and the training images of those labels."""
    mine = torch.tensor([data.labels[int(k)] in part.labels for k in data.train_y])
    return [part.card.labels.index(x) for x in part.labels], data.train_x[mine]


def localize_part(
    part: Part,
    source: TapNet,
    data: TaskData,
    t_card: Card,
    *,
    steps: int,
    seed: int,
    branch: Branch = from_pixels,
    start: dict[str, Tensor] | None = None,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> dict[str, Tensor]:
    """Masks over the resident ``source``'s convs after the part's cut, fitted on the training images
    of the labels it brings; sets the part's masks and fidelity, returns the fitted logits."""
    cols, images = cols_and_images(part, data)
    convs = source.suffix_convs(part.join.cut)
    loc = localize(
        source,
        convs,
        cols,
        images,
        t_card.input,
        branch=branch,
        start=start,
        steps=steps,
        seed=seed,
        device=device_of(source),
        on_step=on_step,
    )
    part.masks, part.fidelity = loc.masks, loc.fidelity
    return loc.logits


def learn_together(
    model: Grafted,
    residents: list[TapNet],
    parts: list[Part],
    data: TaskData,
    t_card: Card,
    *,
    epochs: int,
    rounds: int,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_step: Callable[[int, float, str, float | None], None] = lambda r, done, what, loss: None,
) -> list[float]:
    """Alternate (masks given R and A; A and F_c given the masks, one epoch with its own learning-rate
    schedule) for at most ``rounds``, until validation accuracy stops improving; the best round's
    masks, A and F_c are kept and trained on for the rest of ``epochs`` (a dropped round's epoch not
    counted: the kept A and F_c see exactly ``epochs``). Sets each part's masks and fidelity; returns
    the validation accuracy after each round. ``on_step(round, fraction of it done, what, loss)``
    after every mask step and epoch (``round`` = ``rounds`` for the last training)."""
    history: list[float] = []
    best: tuple[float, list[dict[str, Tensor]], dict[str, Tensor]] | None = None
    logits: list[dict[str, Tensor] | None] = [None] * len(parts)
    for r in range(min(rounds, epochs)):
        for j, (part, src) in enumerate(zip(parts, residents, strict=True)):
            logits[j] = localize_part(
                part,
                src,
                data,
                t_card,
                branch=through(model.target, part.join, model.adapters[j]),
                start=logits[j],
                steps=steps,
                seed=seed + r,
                on_step=lambda step, loss, r=r, j=j: on_step(
                    r, (j + (step + 1) / steps) / (len(parts) + 1), f"masks of {parts[j].card.id}", loss
                ),
            )
            model.sources[j] = masked_source(src, part.masks or {})
        train(model, data, t_card, epochs=1, lr=lr, batch_size=batch_size, seed=seed + r)
        history.append(val_accuracy(model, data, t_card))
        on_step(r, 1.0, f"round {r + 1}: validation accuracy {history[-1]:.4f}", None)
        if best is not None and history[-1] <= best[0]:
            break
        best = (history[-1], [(p.masks, p.fidelity) for p in parts], _trained_state(model))
    assert best is not None
    for j, (part, src) in enumerate(zip(parts, residents, strict=True)):  # back to the best round
        part.masks, part.fidelity = best[1][j]
        model.sources[j] = masked_source(src, part.masks or {})
    model.load_state_dict(best[2], strict=False)
    kept = history.index(best[0]) + 1  # the epochs the kept A and F_c were trained (a dropped round's is not)
    left = epochs - kept
    train(
        model,
        data,
        t_card,
        epochs=left,
        lr=lr,
        batch_size=batch_size,
        seed=seed + rounds,
        on_epoch=lambda e, loss: on_step(rounds, (e + 1) / left, "adapters and head", loss),
    )
    return history


def _trained_state(model: Grafted) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(("adapters.", "head."))}
