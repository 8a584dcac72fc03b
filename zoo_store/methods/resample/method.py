"""Integral Neural Networks (INN, CVPR 2023) as a composition method: docs/methods/resample.md.

A path is a base resampled to a smaller width without fine-tuning: per channel group, the
permutation that orders its channels (int32), the number of channels kept, and, with partition
tuning, the widths of the cells they sample (float32). Materializing recomputes the dense smaller
network from the resident base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn
from torch.func import functional_call

from zoo_store.archs import TapNet, build_for
from zoo_store.archs.groups import ChannelGroup, channel_groups, keeps_blocks, proven_groups, trace_groups
from zoo_store.archs.surgery import state_bytes
from zoo_store.core.bundle import PathArtifact
from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.manifest import BaseRef
from zoo_store.core.spec import CompositionSpec
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods.base import BuildContext, ExpectedTensors, Method, one_base
from zoo_store.methods.registry import register_method
from zoo_store.methods.resample.config import ResampleBudget, ResampleConfig
from zoo_store.methods.resample.layers import (
    Fused,
    assemble,
    block_order,
    channel_features,
    fused_layers,
    group_sizes,
    module_tensors,
    permute_and_resample,
    resampled_params,
    tour_length,
    two_opt_order,
    uniform_cells,
)
from zoo_store.training import normalize, predict_logits

DEFAULT_STEPS = 100  # partition-tuning steps when a task is given and train.steps is not


@register_method
class Resample(Method):
    name = "resample"
    required = ("base", "budget")
    fields = ("base", "budget", "task", "train")
    budget_model = ResampleBudget
    standalone = True

    def validate(self, spec: CompositionSpec, cards: dict[str, Card]) -> list[str]:
        net = build_for(one_base(self.name, spec, cards), meta=True)
        # a budget no resample meets is a 422 here: with the traced groups (the job proves them)
        widths_for(net, trace_groups(net).groups, _budget(spec.budget))
        return [spec.base]

    def build(self, spec: CompositionSpec, ctx: BuildContext) -> PathArtifact:
        assert spec.base
        card, base = ctx.bases[spec.base]
        groups = channel_groups(base)
        widths = widths_for(base, groups, _budget(spec.budget))
        ctx.progress(fraction=0.0, step="ordering channels")
        layers, perms, gains = convert(
            base, groups, lambda i, g: ctx.progress(fraction=0.5 * (i + 1) / len(groups), step=f"ordered {g}")
        )
        cells = {g.name: uniform_cells(widths[g.name]) for g in groups}
        metrics: dict[str, Any] = {
            "params": resampled_params(base, groups, widths),
            "base_params": sum(p.numel() for p in base.parameters()),
            "groups": len(groups),
            "channel_groups": proven_groups(base).report(),  # traced and proven; the rest left at full width, with why
            "tour_length_ratio": sum(gains) / len(gains),  # tour length / identity order, mean over groups
            "dense_bytes": state_bytes(base),  # the base it stands in for
        }
        metrics["params_removed"] = 1 - metrics["params"] / metrics["base_params"]
        tuned = False
        if spec.task is not None:
            data = ctx.load_task(spec.task, card)
            cols = _label_columns(card, data)
            small = assemble(base, groups, permute_and_resample(layers, groups, perms, cells))
            metrics["base_accuracy"] = _accuracy(base, data, cols, card, ctx.device)
            metrics["uniform_accuracy"] = _accuracy(small, data, cols, card, ctx.device)
            steps = DEFAULT_STEPS if spec.train.steps is None else spec.train.steps
            if steps:
                cells, loss = tune_partition(
                    base,
                    small,
                    groups,
                    layers,
                    perms,
                    cells,
                    data.train_x,
                    card,
                    steps,
                    spec.train.lr,
                    spec.train.batch_size,
                    spec.train.seed,
                    ctx,
                )
                tuned = True
                metrics["tuning_loss"] = loss
                small = assemble(base, groups, permute_and_resample(layers, groups, perms, cells))
            metrics["accuracy"] = _accuracy(small, data, cols, card, ctx.device)
            metrics["test_samples"] = len(data.test_x)
        tensors = {f"perm.{k}": v for k, v in perms.items()}
        if tuned:
            tensors |= {f"grid.{k}": v.float().cpu().contiguous() for k, v in cells.items()}
        ctx.progress(fraction=1.0)
        return PathArtifact(
            method=self.name,
            bases=[BaseRef(id=card.id, digest=card.digest)],
            labels=list(card.labels),
            input=card.input,
            config=ResampleConfig(base=card.id, widths=widths, tuned=tuned).model_dump(),
            tensors=tensors,
            metrics=metrics,
        )

    def expected_tensors(self, config: dict[str, Any], bases: dict[str, TapNet]) -> ExpectedTensors:
        cfg, base, named = _config(config, bases)
        sizes = group_sizes(base, [g for g in channel_groups(base) if g.name in named])
        out: ExpectedTensors = {f"perm.{named[g]}": ("int32", (n,)) for g, n in sizes.items()}
        if cfg.tuned:
            out |= {f"grid.{named[g]}": ("float32", (cfg.widths[g],)) for g in sizes}
        return out

    def materialize(self, config: dict[str, Any], tensors: dict[str, Tensor], bases: dict[str, TapNet]) -> nn.Module:
        cfg, base, named = _config(config, bases)
        groups = [g for g in channel_groups(base) if g.name in named]
        perms = {g.name: _checked_perm(tensors[f"perm.{named[g.name]}"], named[g.name], g.blocks) for g in groups}
        if cfg.tuned:
            cells = {g.name: _checked_cells(tensors[f"grid.{named[g.name]}"], named[g.name], g.blocks) for g in groups}
        else:
            cells = {g.name: uniform_cells(cfg.widths[g.name]) for g in groups}
        return assemble(base, groups, permute_and_resample(fused_layers(base, groups), groups, perms, cells))


def convert(
    base: TapNet, groups: list[ChannelGroup], on_group: Callable[[int, str], None] = lambda i, g: None
) -> tuple[dict[str, Fused], dict[str, Tensor], list[float]]:
    """Fold BatchNorms and order every group's channels along a 2-opt tour: (layers, permutations
    (int32), tour length / identity-order length per group)."""
    layers = fused_layers(base, groups)
    perms, gains = {}, []
    for i, g in enumerate(groups):
        x = channel_features(layers, g).cpu()  # (n, d)
        order = two_opt_order(x, seeds=4) if g.blocks == 1 else block_order(x, g.blocks)
        dist = torch.cdist(x, x, p=1).numpy()
        gains.append(tour_length(dist, order) / max(tour_length(dist, np.arange(len(order))), 1e-12))
        perms[g.name] = torch.as_tensor(order, dtype=torch.int32)
        on_group(i, g.name)
    return layers, perms, gains


def widths_for(net: TapNet, groups: list[ChannelGroup], budget: ResampleBudget) -> dict[str, int]:
    """Channels kept per group: ``round(width * n)`` (at least 1; in a group in blocks, the same
    number from every block), or the widest uniform fraction whose network fits ``max_params``."""
    if not groups:
        full = (trace_groups(net) if next(net.parameters()).is_meta else proven_groups(net)).opaque
        raise InvalidInput(
            f"architecture {net.arch!r} has no channel group that traces and is proven, so it cannot be "
            f"resampled" + (f"; left at full width: {full}" if full else "")
        )
    sizes, blocks = group_sizes(net, groups), {g.name: g.blocks for g in groups}

    def at(fraction: float) -> dict[str, int]:
        return {g: blocks[g] * max(1, min(n // blocks[g], round(fraction * n / blocks[g]))) for g, n in sizes.items()}

    if budget.width is not None:
        return at(budget.width)
    assert budget.max_params is not None
    smallest = resampled_params(net, groups, at(0.0))
    if budget.max_params < smallest:
        raise InvalidInput(
            f"budget.max_params {budget.max_params:,} is below the smallest resample of this base "
            f"(one channel per group): {smallest:,} parameters"
        )
    lo, hi = 0.0, 1.0
    for _ in range(40):  # parameters grow with the fraction: bisect for the widest that fits
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if resampled_params(net, groups, at(mid)) <= budget.max_params else (lo, mid)
    return at(lo)


def tune_partition(
    base: TapNet,
    small: nn.Module,
    groups: list[ChannelGroup],
    layers: dict[str, Fused],
    perms: dict[str, Tensor],
    cells: dict[str, Tensor],
    images: Tensor,
    card: Card,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    ctx: BuildContext,
) -> tuple[dict[str, Tensor], float]:
    """Learn ordered, non-uniform cells per group (softmax widths summing to 2, or to 2 / G in each of G blocks)
    so the small network matches the base's output distribution on a few batches; every weight stays frozen."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {g.name: g.blocks for g in groups}
    logits = {g: torch.log(c.float()).clone().requires_grad_(True) for g, c in cells.items()}  # uniform start
    opt = torch.optim.Adam(logits.values(), lr=lr)
    loss_value = float("nan")
    for step in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
        x = normalize(images[idx].to(ctx.device), card.input)  # (B, C, H, W)
        with torch.no_grad():
            target = F.log_softmax(base(x), 1)  # (B, K)
        current = {g: block_cells(z, blocks[g]).double() for g, z in logits.items()}
        fused = permute_and_resample(layers, groups, perms, current)
        out = F.log_softmax(functional_call(small, module_tensors(fused), (x,)), 1)
        loss = F.kl_div(out, target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()
        ctx.progress(
            fraction=0.5 + 0.5 * (step + 1) / steps, step=f"partition tuning {step + 1}/{steps}", loss=loss_value
        )
    return {g: block_cells(z.detach(), blocks[g]).double() for g, z in logits.items()}, loss_value


def block_cells(z: Tensor, blocks: int) -> Tensor:
    """Cell widths (n',) from logits (n',): a softmax per block, each block's widths summing to 2 / blocks."""
    return (2 / blocks * torch.softmax(z.view(blocks, -1), 1)).reshape(-1)


def _accuracy(net: nn.Module, data: TaskData, cols: list[int], card: Card, device: str) -> float:
    logits = predict_logits(net, data.test_x, card.input, device=device)[:, cols]  # (M, task labels)
    return (logits.argmax(1) == data.test_y).float().mean().item()


def _label_columns(card: Card, data: TaskData) -> list[int]:
    unknown = [label for label in data.labels if label not in card.labels]
    if unknown:
        raise InvalidInput(
            f"task labels {unknown} are not labels of base {card.id!r}: resampling keeps the base's head"
        )
    return [card.labels.index(label) for label in data.labels]


def _budget(raw: dict[str, Any]) -> ResampleBudget:
    try:
        return ResampleBudget.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(["budget", *(str(x) for x in err["loc"])])
        raise InvalidInput(f"bad resample {where}: {err['msg']}") from e


def _config(config: dict[str, Any], bases: dict[str, TapNet]) -> tuple[ResampleConfig, TapNet, dict[str, str]]:
    """The config with its widths by traced group name, the base, and each group's name in the path
    (the traced one, or round one's hand-declared name for a path made before groups were traced).
    A path names the groups traced when it was made: one made before a coupling (a grouped conv, a
    concatenation) was traced names fewer, and the others stay at full width."""
    try:
        cfg = ResampleConfig.model_validate(config)
    except ValidationError as e:
        raise InvalidInput(f"bad resample config: {e.errors()[0]['msg']}") from e
    if cfg.base not in bases:
        raise InvalidInput(f"resample config names base {cfg.base!r}, which the path does not reference")
    base = bases[cfg.base]
    groups = channel_groups(base)
    sizes = group_sizes(base, groups)
    if cfg.widths and set(cfg.widths) <= set(
        sizes
    ):  # fewer: made before more couplings were traced, those stay at full width
        named: dict[str, str] | None = {g: g for g in cfg.widths}
    else:
        named = _round_one_names(list(cfg.widths), groups)
    if named is None:
        raise InvalidInput(f"resample widths name groups {sorted(cfg.widths)}, base {cfg.base!r} has {sorted(sizes)}")
    cfg = cfg.model_copy(update={"widths": {g: cfg.widths[old] for g, old in named.items()}})
    bad = {named[g]: w for g, w in cfg.widths.items() if not 1 <= w <= sizes[g]}
    if bad:
        raise InvalidInput(f"resample widths out of range (1..channels): {bad}")
    blocks = {g.name: g.blocks for g in groups}
    if uneven := {named[g]: f"{w} channels in {blocks[g]} blocks" for g, w in cfg.widths.items() if w % blocks[g]}:
        raise InvalidInput(
            f"resample widths must keep as many channels in every block of a grouped conv's group: {uneven}"
        )
    return cfg, base, named


def _round_one_names(names: list[str], groups: list[ChannelGroup]) -> dict[str, str] | None:
    """Traced group name -> the name round one declared it under (a module path above its layers:
    ``…conv1`` for ``…conv1.0``, ``…body`` for an inverted residual's expanded channels), matched as
    the group with the most layers under that path; None unless every group is matched once."""

    def under(g: ChannelGroup, old: str) -> int:
        layers = [p for pair in (*g.producers, *g.depthwise) for p in pair if p] + list(g.consumers)
        return sum(p == old or p.startswith(old + ".") for p in layers)

    named = {}
    for old in names:
        best = max(groups, key=lambda g: under(g, old), default=None)
        if best is None or under(best, old) == 0 or best.name in named:
            return None
        named[best.name] = old
    return named if len(named) == len(groups) else None


def _checked_perm(t: Tensor, group: str, blocks: int) -> Tensor:
    if not torch.equal(torch.sort(t.long()).values, torch.arange(len(t))):
        raise InvalidInput(f"perm.{group} is not a permutation of 0..{len(t) - 1}")
    if not keeps_blocks(t, blocks):
        raise InvalidInput(f"perm.{group} moves channels across the {blocks} blocks of a grouped conv")
    return t


def _checked_cells(t: Tensor, group: str, blocks: int) -> Tensor:
    t = t.double()
    sums = t.view(blocks, -1).sum(1)  # (blocks,)
    if not bool((t > 0).all()) or float((sums - 2.0 / blocks).abs().max()) > 1e-4:
        raise InvalidInput(
            f"grid.{group} must hold positive cell widths, each of its {blocks} block(s) summing to "
            f"{2 / blocks:.6g} (sums to {[round(float(v), 6) for v in sums[:4]]})"
        )
    return t
