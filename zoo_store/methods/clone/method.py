"""Partial Network Cloning (PNC, CVPR 2023) as a composition method: docs/methods/clone.md.

build: plan (target, sources, labels) -> per source, localize its filters on the labels it brings
-> per source, search the insertion tap from deep to shallow -> train the adapters and the new head
on the correction data. The path holds the bit-packed masks, the taps, the adapters and the head.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.archs.surgery import state_bytes
from zoo_store.core.bundle import PathArtifact
from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.manifest import BaseRef
from zoo_store.core.spec import CompositionSpec
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods.base import BuildContext, ExpectedTensors, Method, no_spatial_tap
from zoo_store.methods.clone.config import plan_clone
from zoo_store.methods.clone.insert import Part, build_cloned, fresh_cloned, search_join, train_cloned
from zoo_store.methods.clone.layers import ADAPTERS, masked_source, pack_mask, unpack_mask
from zoo_store.methods.clone.localize import kept_fraction, localize
from zoo_store.methods.registry import register_method
from zoo_store.training import predict_logits

LOCALIZE_STEPS = 150  # mask-fitting steps per source unless train.steps says otherwise


class SourceLink(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    labels: tuple[str, ...]
    depth: str  # the source tap its masked prefix is cut at
    insert: str  # the target tap R its adapted features are added to
    kernel: Literal[1, 3] = 1  # the adapter conv's kernel (a 1x1 + BatchNorm adapter is stored folded: 1)


class CloneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    sources: tuple[SourceLink, ...]
    num_classes: int  # labels of the composed network (its head's rows)


@register_method
class Clone(Method):
    name = "clone"
    required = ("base", "task")
    adapter = (
        "1x1"  # the adapter kind (clone.layers.ADAPTERS) builds train: chosen on validation in docs/methods/clone.md
    )
    localize = staticmethod(localize)  # step 2 (a benchmark that builds one source many times may memoise it)

    def refusal(self, net: TapNet) -> str | None:
        return no_spatial_tap(net)

    def validate(self, spec: CompositionSpec, cards: dict[str, Card]) -> list[str]:
        plan = plan_clone(spec, cards)
        return [plan.target, *dict.fromkeys(s.model for s in plan.sources)]

    def build(self, spec: CompositionSpec, ctx: BuildContext) -> PathArtifact:
        assert spec.task
        plan = plan_clone(spec, {k: c for k, (c, _) in ctx.bases.items()})
        t_card, target = ctx.bases[plan.target]
        task = spec.task.model_copy(update={"labels": list(plan.labels)})
        data = ctx.load_task(task, t_card)
        if len(data.val_y) == 0:
            raise InvalidInput(
                f"dataset {task.dataset!r} has no validation images of labels {list(plan.labels)}: the clone "
                "chooses where to join on them (a tenth of an upload is held out for validation)"
            )
        tr = spec.train
        metrics: dict[str, Any] = {"sources": [s.model_dump() for s in plan.sources], "sources_chosen": plan.chosen}
        steps = LOCALIZE_STEPS if tr.steps is None else max(1, tr.steps)
        parts: list[Part] = []
        masks: list[dict[str, Tensor]] = []  # per source, the masks of every conv up to its deepest spatial tap
        for i, src in enumerate(plan.sources):  # step 2: localize each source on the labels it brings
            s_card, s_net = ctx.bases[src.model]
            deepest = s_net.spatial_taps()[-1]
            mine = torch.tensor([data.labels[int(k)] in src.labels for k in data.train_y])
            cols = [s_card.labels.index(label) for label in src.labels]

            def on_step(step: int, loss: float, i: int = i, name: str = src.model) -> None:
                done = (i + (step + 1) / steps) / len(plan.sources)
                ctx.progress(fraction=0.3 * done, step=f"localizing {name}", loss=loss)

            loc = self.localize(
                s_net,
                deepest,
                cols,
                data.train_x[mine],
                s_card.input,
                steps=steps,
                seed=tr.seed,
                device=ctx.device,
                on_step=on_step,
            )
            metrics[f"source{i}_fidelity"] = loc.fidelity
            parts.append(_part(s_net, loc.masks, deepest))
            masks.append(loc.masks)
        inserts = [target.spatial_taps()[-1]] * len(parts)
        for i, src in enumerate(plan.sources):  # step 3: search (depth, R) for each source by validation accuracy
            s_net = ctx.bases[src.model][1]
            parts[i], inserts[i], scores = search_join(
                target,
                t_card,
                parts,
                i,
                lambda d, s=s_net, m=masks[i]: _part(s, m, d),
                inserts,
                data,
                adapter=self.adapter,
                epochs=1,
                lr=tr.lr,
                batch_size=tr.batch_size,
                seed=tr.seed,
                device=ctx.device,
                on_candidate=lambda name, acc, i=i: ctx.progress(
                    fraction=0.3 + 0.4 * (i + 1) / len(parts),
                    step=f"join {plan.sources[i].model} {name}",
                    val_accuracy=acc,
                ),
            )
            masks[i] = _prefix_masks(s_net, masks[i], parts[i].depth)  # what the path stores
            metrics[f"source{i}_join_val_accuracy"] = scores
            metrics[f"source{i}_kept_fraction"] = kept_fraction(masks[i])
        model = fresh_cloned(target, t_card, parts, inserts, data.labels, tr.seed, self.adapter)
        train_cloned(
            model,
            data,
            t_card,
            epochs=tr.epochs,
            lr=tr.lr,
            batch_size=tr.batch_size,
            seed=tr.seed,
            device=ctx.device,
            on_epoch=lambda e, loss: ctx.progress(fraction=0.7 + 0.3 * (e + 1) / tr.epochs, epoch=e + 1, loss=loss),
        )
        metrics |= _accuracies(model, target, t_card, data, ctx.device)
        metrics["adapter"] = self.adapter
        links = [
            SourceLink(model=s.model, labels=s.labels, depth=p.depth, insert=r, kernel=ADAPTERS[self.adapter])
            for s, p, r in zip(plan.sources, parts, inserts, strict=True)
        ]
        tensors = {f"mask.{i}.{p}": pack_mask(m) for i, prefix in enumerate(masks) for p, m in prefix.items()}
        tensors |= {
            f"adapter.{i}.{k}": v.detach().cpu().contiguous()
            for i, a in enumerate(model.adapters)
            for k, v in a.folded().state_dict().items()
        }
        tensors |= {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        dense = sum(
            _state_bytes(ctx.bases[k][1]) for k in dict.fromkeys([plan.target, *(s.model for s in plan.sources)])
        )
        metrics |= {"dense_bytes": dense, "train_samples": len(data.train_x), "test_samples": len(data.test_x)}
        refs = [
            BaseRef(id=k, digest=ctx.bases[k][0].digest)
            for k in dict.fromkeys([plan.target, *(s.model for s in plan.sources)])
        ]
        return PathArtifact(
            self.name,
            refs,
            data.labels,
            t_card.input,
            CloneConfig(target=plan.target, sources=tuple(links), num_classes=len(data.labels)).model_dump(mode="json"),
            tensors,
            metrics,
        )

    def expected_tensors(self, config: dict[str, Any], bases: dict[str, TapNet]) -> ExpectedTensors:
        cfg = _config(config, bases)
        target = bases[cfg.target]
        out: ExpectedTensors = {}
        for i, s in enumerate(cfg.sources):
            src = bases[s.model]
            for p in src.prefix_convs(s.depth):
                out[f"mask.{i}.{p}"] = ("uint8", ((src.get_submodule(p).out_channels + 7) // 8,))
            cs, ct = src.tap(s.depth).channels, target.tap(s.insert).channels
            out[f"adapter.{i}.weight"], out[f"adapter.{i}.bias"] = (
                ("float32", (ct, cs, s.kernel, s.kernel)),
                ("float32", (ct,)),
            )
        out["head.weight"], out["head.bias"] = (
            ("float32", (cfg.num_classes, target.feature_dim)),
            ("float32", (cfg.num_classes,)),
        )
        return out

    def materialize(self, config: dict[str, Any], tensors: dict[str, Tensor], bases: dict[str, TapNet]) -> nn.Module:
        cfg = _config(config, bases)
        target = bases[cfg.target]
        parts = []
        for i, s in enumerate(cfg.sources):
            src = bases[s.model]
            masks = {
                p: unpack_mask(tensors[f"mask.{i}.{p}"], src.get_submodule(p).out_channels)
                for p in src.prefix_convs(s.depth)
            }
            if any(not m.any() for m in masks.values()):
                raise InvalidInput(f"source {i} ({s.model}) has a conv with every filter masked out")
            parts.append(Part(masked_source(src, masks), s.depth))
        kinds = [{1: "1x1", 3: "3x3"}[s.kernel] for s in cfg.sources]  # as stored: a 1x1+bn adapter is a folded 1x1
        model = build_cloned(target, parts, [s.insert for s in cfg.sources], cfg.num_classes, kinds)
        for i, a in enumerate(model.adapters):
            a.proj.load_state_dict({"weight": tensors[f"adapter.{i}.weight"], "bias": tensors[f"adapter.{i}.bias"]})
        model.head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        return model.requires_grad_(False).eval()


def _prefix_masks(source: TapNet, masks: dict[str, Tensor], depth: str) -> dict[str, Tensor]:
    """The masks of the convs the source's prefix up to ``depth`` runs."""
    convs = set(source.prefix_convs(depth))
    return {p: m for p, m in masks.items() if p in convs}


def _part(source: TapNet, masks: dict[str, Tensor], depth: str) -> Part:
    """The source's prefix up to ``depth``, masked."""
    return Part(masked_source(source, _prefix_masks(source, masks, depth)), depth)


def _accuracies(model: nn.Module, target: TapNet, t_card: Card, data: TaskData, device: str) -> dict[str, float]:
    """Held-out accuracy on the union of labels, and on the target's own labels for the clone and
    for the target alone (locality: the second must not drop)."""
    logits = predict_logits(model, data.test_x, t_card.input, device=device)  # (M, K)
    out = {"accuracy": (logits.argmax(1) == data.test_y).float().mean().item()}
    own = torch.tensor([data.labels[int(k)] in t_card.labels for k in data.test_y])
    if own.any():
        out["accuracy_target_labels"] = (logits[own].argmax(1) == data.test_y[own]).float().mean().item()
        t_logits = predict_logits(target, data.test_x[own], t_card.input, device=device)
        t_pred = [t_card.labels[int(k)] for k in t_logits.argmax(1)]
        truth = [data.labels[int(k)] for k in data.test_y[own]]
        out["target_alone_accuracy"] = sum(p == t for p, t in zip(t_pred, truth, strict=True)) / len(truth)
    return out


def _state_bytes(net: nn.Module) -> int:
    return state_bytes(net)


def _config(config: dict[str, Any], bases: dict[str, TapNet]) -> CloneConfig:
    try:
        cfg = CloneConfig.model_validate(config)
    except ValidationError as e:
        raise InvalidInput(f"bad clone config: {e.errors()[0]['msg']}") from e
    for name in [cfg.target, *(s.model for s in cfg.sources)]:
        if name not in bases:
            raise InvalidInput(f"clone config names base {name!r}, which the path does not reference")
    for s in cfg.sources:
        if s.depth not in bases[s.model].spatial_taps() or s.insert not in bases[cfg.target].spatial_taps():
            raise InvalidInput(
                f"clone source {s.model!r}: depth {s.depth!r} or insertion tap {s.insert!r} is not a spatial tap"
            )
    return cfg
