"""Partial Network Cloning (PNC, CVPR 2023) as a composition method: docs/methods/clone.md.

build: plan (target, sources, labels) -> per source, search its join (target tap R, source cut) from
deep to shallow on validation -> localization and insertion learned together (masks over the
source's layers after the cut given R and A; A and the new head F_c given the masks) -> the path:
bit-packed masks, joins, adapters and head. Paths of the first topology (config ``topology``
absent: the source's prefix added into the target) materialize as they always did (``legacy``).
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
from zoo_store.methods.clone.insert import (
    Part,
    candidates,
    device_of,
    fresh,
    learn_together,
    localize_part,
    search_join,
    train,
)
from zoo_store.methods.clone.layers import Grafted, masked_source, pack_mask, unpack_mask
from zoo_store.methods.clone.legacy import SourcePrefixClone
from zoo_store.methods.clone.localize import kept_fraction, random_like
from zoo_store.methods.registry import register_method
from zoo_store.training import predict_logits

LOCALIZE_STEPS = 150  # mask-fitting steps per source and round unless train.steps says otherwise
ROUNDS = 3  # at most this many alternations of localization and insertion

Topology = Literal["source-prefix", "target-prefix"]
Localization = Literal["joint", "once", "none", "random"]


class SourceLink(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    labels: tuple[str, ...]
    depth: str  # the source tap it is cut at: target-prefix, its layers after it run; source-prefix, up to it
    insert: str  # the target tap R it joins at
    kernel: Literal[1, 3] = 1  # the adapter conv's kernel (source-prefix paths only; target-prefix: 1)
    size: tuple[int, int] | None = None  # target-prefix: the source's feature size at the cut


class CloneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    sources: tuple[SourceLink, ...]
    num_classes: int  # labels of the composed network (its head's rows)
    topology: Topology = "source-prefix"  # paths stored before the article's topology have no field


@register_method
class Clone(Method):
    name = "clone"
    required = ("base", "task")
    fields = ("base", "task", "sources", "train")
    localization: Localization = "joint"  # the ablations of docs/methods/clone.md set the others
    rounds = ROUNDS
    search = staticmethod(search_join)  # a benchmark that builds one join many times may memoise it
    together = staticmethod(learn_together)  # and the alternation (random reuses joint's masks)

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
        residents = [ctx.bases[s.model][1] for s in plan.sources]
        parts = [
            Part(net, ctx.bases[s.model][0], s.labels, candidates(target, net, t_card.input)[0])
            for s, net in zip(plan.sources, residents, strict=True)
        ]
        share = 0.4 / len(parts)
        for i in range(len(parts)):  # insertion: each source's join by validation accuracy, the others as they are
            join, scores = self.search(
                target,
                t_card,
                parts,
                i,
                data,
                lr=tr.lr,
                batch_size=tr.batch_size,
                seed=tr.seed,
                on_candidate=lambda name, acc, i=i: ctx.progress(
                    fraction=share * (i + 1), step=f"join {plan.sources[i].model} {name}", val_accuracy=acc
                ),
            )
            parts[i].join = join
            metrics[f"source{i}_join_val_accuracy"] = scores
        model, rounds = self._localize_and_train(target, t_card, residents, parts, data, spec, ctx)
        metrics["rounds_val_accuracy"] = rounds
        for p, src in zip(parts, residents, strict=True):  # every filter kept is stored as such
            p.masks = p.masks or {
                c: torch.ones(src.get_submodule(c).out_channels, dtype=torch.bool) for c in src.suffix_convs(p.join.cut)
            }
        metrics |= {f"source{i}_kept_fraction": kept_fraction(p.masks or {}) for i, p in enumerate(parts)}
        metrics |= {f"source{i}_fidelity": p.fidelity for i, p in enumerate(parts) if p.fidelity is not None}
        metrics |= held_out(model, target, t_card, data, device_of(target))
        metrics["localization"] = self.localization
        links = [
            SourceLink(model=p.card.id, labels=p.labels, depth=p.join.cut, insert=p.join.insert, size=p.join.size)
            for p in parts
        ]
        tensors = {
            f"mask.{i}.{conv}": pack_mask(keep) for i, p in enumerate(parts) for conv, keep in (p.masks or {}).items()
        }
        tensors |= {
            f"adapter.{i}.{k}": v.detach().cpu().contiguous()
            for i, a in enumerate(model.adapters)
            for k, v in a.state_dict().items()
        }
        tensors |= {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        ids = list(dict.fromkeys([plan.target, *(s.model for s in plan.sources)]))
        dense = sum(state_bytes(ctx.bases[k][1]) for k in ids)
        metrics |= {"dense_bytes": dense, "train_samples": len(data.train_x), "test_samples": len(data.test_x)}
        config = CloneConfig(
            target=plan.target, sources=tuple(links), num_classes=len(data.labels), topology="target-prefix"
        )
        return PathArtifact(
            self.name,
            [BaseRef(id=k, digest=ctx.bases[k][0].digest) for k in ids],
            data.labels,
            t_card.input,
            config.model_dump(mode="json"),
            tensors,
            metrics,
        )

    def _localize_and_train(
        self,
        target: TapNet,
        t_card: Card,
        residents: list[TapNet],
        parts: list[Part],
        data: TaskData,
        spec: CompositionSpec,
        ctx: BuildContext,
    ) -> tuple[Grafted, list[float]]:
        """Masks by ``self.localization``, then ``A`` and ``F_c`` trained for ``train.epochs`` on them:
        joint (the article: alternating with insertion), once (on the source alone, before insertion),
        none (every filter kept), random (as many filters per conv as joint keeps, drawn by the seed).
        Returns the model and the validation accuracy after each alternation (joint only)."""
        tr = spec.train
        steps = LOCALIZE_STEPS if tr.steps is None else max(1, tr.steps)
        fit_args = {"lr": tr.lr, "batch_size": tr.batch_size, "seed": tr.seed}

        def tick(r: int, done: float, what: str, loss: float | None) -> None:  # rounds then training: 0.4 -> 1
            ctx.progress(fraction=0.4 + 0.6 * min(1.0, (r + done) / (self.rounds + 1)), step=what, loss=loss)

        if self.localization == "once":
            for j, (part, src) in enumerate(zip(parts, residents, strict=True)):
                localize_part(
                    part,
                    src,
                    data,
                    t_card,
                    steps=steps,
                    seed=tr.seed,
                    on_step=lambda step, loss, j=j: tick(j, step / steps, f"masks of {parts[j].card.id}", loss),
                )
        if self.localization in ("joint", "random"):
            model = fresh(target, t_card, parts, data, tr.seed)
            history = self.together(
                model,
                residents,
                parts,
                data,
                t_card,
                epochs=tr.epochs,
                rounds=self.rounds,
                steps=steps,
                on_step=tick,
                **fit_args,
            )
            if self.localization == "joint":
                return model, history
            for part in parts:
                part.masks, part.fidelity = random_like(part.masks or {}, tr.seed), None
        for part, src in zip(parts, residents, strict=True):
            part.source = src if part.masks is None else masked_source(src, part.masks)
        model = fresh(target, t_card, parts, data, tr.seed)
        epochs = tr.epochs
        train(
            model,
            data,
            t_card,
            epochs=epochs,
            on_epoch=lambda e, loss: tick(self.rounds, (e + 1) / epochs, "adapters and head", loss),
            **fit_args,
        )
        return model, []  # random: the joint alternation only lent it its sparsity

    def expected_tensors(self, config: dict[str, Any], bases: dict[str, TapNet]) -> ExpectedTensors:
        cfg = _config(config, bases)
        target = bases[cfg.target]
        grafted_ = cfg.topology == "target-prefix"
        out: ExpectedTensors = {}
        for i, s in enumerate(cfg.sources):
            src = bases[s.model]
            for p in _masked_convs(cfg, src, s.depth):
                out[f"mask.{i}.{p}"] = ("uint8", ((src.get_submodule(p).out_channels + 7) // 8,))
            cs, ct = src.tap(s.depth).channels, target.tap(s.insert).channels
            c_in, c_out = (ct, cs) if grafted_ else (cs, ct)
            out[f"adapter.{i}.weight"], out[f"adapter.{i}.bias"] = (
                ("float32", (c_out, c_in, s.kernel, s.kernel)),
                ("float32", (c_out,)),
            )
        width = target.feature_dim + (sum(bases[s.model].feature_dim for s in cfg.sources) if grafted_ else 0)
        out["head.weight"], out["head.bias"] = (("float32", (cfg.num_classes, width)), ("float32", (cfg.num_classes,)))
        return out

    def materialize(self, config: dict[str, Any], tensors: dict[str, Tensor], bases: dict[str, TapNet]) -> nn.Module:
        cfg = _config(config, bases)
        target = bases[cfg.target]
        sources, adapters = [], []
        for i, s in enumerate(cfg.sources):
            src = bases[s.model]
            masks = {
                p: unpack_mask(tensors[f"mask.{i}.{p}"], src.get_submodule(p).out_channels)
                for p in _masked_convs(cfg, src, s.depth)
            }
            if any(not m.any() for m in masks.values()):
                raise InvalidInput(f"source {i} ({s.model}) has a conv with every filter masked out")
            sources.append(masked_source(src, masks))
            weight = tensors[f"adapter.{i}.weight"]
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], s.kernel, padding=s.kernel // 2)
            conv.load_state_dict({"weight": weight, "bias": tensors[f"adapter.{i}.bias"]})
            adapters.append(conv)
        head = nn.Linear(tensors["head.weight"].shape[1], cfg.num_classes)
        head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        inserts, depths = [s.insert for s in cfg.sources], [s.depth for s in cfg.sources]
        if cfg.topology == "source-prefix":
            model: nn.Module = SourcePrefixClone(target, sources, depths, inserts, adapters, head)
        else:
            sizes = [s.size for s in cfg.sources]
            model = Grafted(target, sources, inserts, depths, sizes, adapters, head)  # type: ignore[arg-type]
        device = target.head_layer.weight.device
        return model.to(device).requires_grad_(False).eval()


def _masked_convs(cfg: CloneConfig, source: TapNet, depth: str) -> list[str]:
    """The convs a source's masks may cover: after the cut (target-prefix), up to it (source-prefix)."""
    return source.suffix_convs(depth) if cfg.topology == "target-prefix" else source.prefix_convs(depth)


def held_out(model: nn.Module, target: TapNet, t_card: Card, data: TaskData, device: str = "cpu") -> dict[str, float]:
    """Test accuracy on the union of labels; on the target's own labels, the accuracy of ``model``
    and of the target alone, and the agreement of their predictions (locality: the target's
    behaviour there kept)."""
    logits = predict_logits(model, data.test_x, t_card.input, device=device)  # (M, K)
    out = {"accuracy": (logits.argmax(1) == data.test_y).float().mean().item()}
    own = torch.tensor([data.labels[int(k)] in t_card.labels for k in data.test_y])
    if own.any():
        mine = [data.labels[int(k)] for k in logits[own].argmax(1)]
        t_logits = predict_logits(target, data.test_x[own], t_card.input, device=device)
        t_pred = [t_card.labels[int(k)] for k in t_logits.argmax(1)]
        truth = [data.labels[int(k)] for k in data.test_y[own]]
        out["accuracy_target_labels"] = _share(mine, truth)
        out["target_alone_accuracy"] = _share(t_pred, truth)
        out["agreement_target_labels"] = _share(mine, t_pred)
    return out


def _share(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(b)


def _config(config: dict[str, Any], bases: dict[str, TapNet]) -> CloneConfig:
    try:
        cfg = CloneConfig.model_validate(config)
    except ValidationError as e:
        raise InvalidInput(f"bad clone config: {e.errors()[0]['msg']}") from e
    for name in [cfg.target, *(s.model for s in cfg.sources)]:
        if name not in bases:
            raise InvalidInput(f"clone config names base {name!r}, which the path does not reference")
    for s in cfg.sources:
        if (s.size is None) != (cfg.topology == "source-prefix") or (cfg.topology == "target-prefix" and s.kernel != 1):
            raise InvalidInput(
                f"clone source {s.model!r}: a {cfg.topology} path has "
                + ("a feature size at the cut and a 1x1 adapter" if cfg.topology == "target-prefix" else "no size")
            )
        if s.depth not in bases[s.model].spatial_taps() or s.insert not in bases[cfg.target].spatial_taps():
            raise InvalidInput(
                f"clone source {s.model!r}: depth {s.depth!r} or insertion tap {s.insert!r} is not a spatial tap"
            )
    return cfg
