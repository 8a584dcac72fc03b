"""Channel-wise Lightweight Reprogramming (CLR, ICCV 2023): docs/methods/reprogram.md."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo_store.archs import TapNet, build_for
from zoo_store.archs.surgery import tensor_bytes
from zoo_store.core.bundle import PathArtifact
from zoo_store.core.cards import Card
from zoo_store.core.errors import InvalidInput
from zoo_store.core.manifest import BaseRef
from zoo_store.core.spec import CompositionSpec
from zoo_store.methods.base import BuildContext, ExpectedTensors, Method, one_base
from zoo_store.methods.registry import register_method
from zoo_store.methods.reprogram.bank import ReprogramBank
from zoo_store.methods.reprogram.config import ReprogramConfig, ReprogramOptions
from zoo_store.methods.reprogram.layers import (
    NORM_TENSORS,
    Reprogrammed,
    bn_refusal,
    bn_targets,
    build_reprogrammed,
    clr_targets,
    dense_bytes,
    load_delta,
    reprogram_refusal,
)
from zoo_store.training import accuracy, fit, init_head_rows


@register_method
class Reprogram(Method):
    name = "reprogram"
    required = ("base", "task")
    fields = ("base", "task", "train", "options")
    options = ReprogramOptions

    def validate(self, spec: CompositionSpec, cards: dict[str, Card]) -> list[str]:
        card = one_base(self.name, spec, cards)
        if spec.task is None:
            raise InvalidInput("method 'reprogram' needs 'task': {'dataset': id, 'labels': [...]}")
        if self._options(spec).bn and (reason := bn_refusal(build_for(card, meta=True))):
            raise InvalidInput(f"base {card.id!r} ({card.arch}): {reason}")
        return [spec.base]

    def _options(self, spec: CompositionSpec) -> ReprogramOptions:
        opts = self.parse_options(spec)
        assert isinstance(opts, ReprogramOptions)
        return opts

    def refusal(self, net: TapNet) -> str | None:
        return reprogram_refusal(net)

    def build(self, spec: CompositionSpec, ctx: BuildContext) -> PathArtifact:
        assert spec.base and spec.task
        card, base = ctx.bases[spec.base]
        data = ctx.load_task(spec.task, card)
        bn = self._options(spec).bn
        torch.manual_seed(spec.train.seed)
        model = build_reprogrammed(base, len(data.labels), bn=bn)
        init_head_rows(model.head, base.head_layer, card.labels, data.labels)
        epochs = spec.train.epochs

        def on_epoch(epoch: int, loss: float) -> None:
            ctx.progress(fraction=(epoch + 1) / (epochs + 1), epoch=epoch + 1, loss=loss)

        ctx.progress(fraction=0.0, epoch=0)
        losses = fit(
            model,
            model.parameters(),
            data.train_x,
            data.train_y,
            card.input,
            epochs=epochs,
            lr=spec.train.lr,
            batch_size=spec.train.batch_size,
            seed=spec.train.seed,
            device=ctx.device,
            on_epoch=on_epoch,
        )
        model.eval()  # the path's own BatchNorms (``bn``) from here on use their running statistics
        acc = accuracy(model, data.test_x, data.test_y, card.input, device=ctx.device)
        delta = model.delta_state()
        delta_bytes = tensor_bytes(delta.values())
        dense = dense_bytes(base, delta_bytes)
        metrics = {
            "accuracy": acc,
            "train_loss": losses[-1],
            "trainable_params": sum(t.numel() for t in delta.values()),
            "clr_layers": len(model.clr),
            "train_samples": len(data.train_x),
            "test_samples": len(data.test_x),
            "tensor_bytes": delta_bytes,
            "dense_bytes": dense,
        }
        if bn:
            metrics["bn_layers"] = len(model.norms)
        return PathArtifact(
            method=self.name,
            bases=[BaseRef(id=card.id, digest=card.digest)],
            labels=data.labels,
            input=card.input,
            config=ReprogramConfig(base=card.id, num_classes=len(data.labels), bn=bn).stored(),
            tensors={k: v.to("cpu").contiguous() for k, v in delta.items()},
            metrics=metrics,
        )

    def expected_tensors(self, config: dict[str, Any], bases: dict[str, TapNet]) -> ExpectedTensors:
        cfg = _config(config)
        base = bases[cfg.base]
        out: ExpectedTensors = {
            f"clr.{path}": ("float32", (c, 1, cfg.kernel, cfg.kernel)) for path, c in clr_targets(base)
        }
        if cfg.bn:
            for path, c in bn_targets(base):
                out.update({f"bn.{path}.{t}": ("float32", (c,)) for t in NORM_TENSORS})
        out["head.weight"] = ("float32", (cfg.num_classes, base.feature_dim))
        out["head.bias"] = ("float32", (cfg.num_classes,))
        return out

    def materialize(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], bases: dict[str, TapNet]
    ) -> nn.Module:
        cfg = _config(config)
        model = build_reprogrammed(bases[cfg.base], cfg.num_classes, cfg.kernel, fresh=False, bn=cfg.bn)
        return load_delta(model, tensors).eval()

    def bank_key(self, config: dict[str, Any]) -> str | None:
        cfg = _config(config)
        return f"reprogram:{cfg.base}:k{cfg.kernel}"

    def bank(self, config: dict[str, Any], bases: dict[str, TapNet]) -> ReprogramBank:
        cfg = _config(config)
        return ReprogramBank(bases[cfg.base], cfg.kernel)


def _config(config: dict[str, Any]) -> ReprogramConfig:
    try:
        return ReprogramConfig.model_validate(config)
    except Exception as e:
        raise InvalidInput(f"bad reprogram config: {e}") from e


__all__ = ["Reprogram", "Reprogrammed"]
