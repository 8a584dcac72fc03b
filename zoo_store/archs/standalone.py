"""A path that is a plain dense network (a resampled one) as a standalone file: one safetensors
file with its card, for devices that do not run the service (they need only this package's
architectures, never the zoo, the database or a pickle).

The file holds the full state dict of the smaller network and, in its metadata, the card
(``arch``, ``arch_config``, labels, input spec) plus the shape of every layer that differs from a
fresh instance of the architecture: resized convs and linears, and BatchNorms folded away.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from zoo_store.archs import TapNet, build_arch, build_for
from zoo_store.archs.surgery import replace_module
from zoo_store.core.cards import Card
from zoo_store.core.errors import BadRequest

FORMAT = "zoo-network/1"


def _layer_spec(m: nn.Module) -> dict[str, Any] | None:
    if isinstance(m, nn.Conv2d):
        return {
            "kind": "conv2d",
            "in": m.in_channels,
            "out": m.out_channels,
            "kernel": list(m.kernel_size),
            "stride": list(m.stride),
            "padding": list(m.padding),
            "dilation": list(m.dilation),
            "groups": m.groups,
            "bias": m.bias is not None,
        }
    if isinstance(m, nn.Linear):
        return {"kind": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if isinstance(m, nn.Identity):
        return {"kind": "identity"}
    return None


def _build_layer(spec: dict[str, Any]) -> nn.Module:
    if spec["kind"] == "conv2d":
        return nn.Conv2d(
            spec["in"],
            spec["out"],
            tuple(spec["kernel"]),
            tuple(spec["stride"]),
            tuple(spec["padding"]),
            tuple(spec["dilation"]),
            groups=spec["groups"],
            bias=spec["bias"],
        )
    if spec["kind"] == "linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
    if spec["kind"] == "identity":
        return nn.Identity()
    raise BadRequest(f"standalone network names an unknown layer kind {spec['kind']!r}")


def export_network(net: TapNet, card: Card, path_id: str) -> bytes:
    """The materialized network of a path, with what it takes to rebuild it from its architecture."""
    with torch.device("meta"):
        fresh = build_for(card)
    fresh_specs = {p: _layer_spec(m) for p, m in fresh.named_modules()}
    changed = {p: s for p, m in net.named_modules() if (s := _layer_spec(m)) is not None and s != fresh_specs.get(p)}
    meta_card = {
        "arch": card.arch,
        "arch_config": card.arch_config,
        "labels": list(card.labels),
        "input": card.input.model_dump(),
        "from_path": path_id,
        "base": {"id": card.id, "digest": card.digest},
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    return st_save(state, metadata={"format": FORMAT, "card": json.dumps(meta_card), "layers": json.dumps(changed)})


def load_network(data: bytes) -> tuple[TapNet, dict[str, Any]]:
    """Rebuild a standalone network (eval mode) and return it with its card."""
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        card, layers = json.loads(meta["card"]), json.loads(meta["layers"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadRequest(f"not a standalone zoo network: {e}") from e
    if meta.get("format") != FORMAT:
        raise BadRequest(f"not a standalone zoo network of format {FORMAT} (format={meta.get('format')!r})")
    net = build_arch(card["arch"], {**card["arch_config"], "num_classes": len(card["labels"])})
    for path, spec in layers.items():
        replace_module(net, path, _build_layer(spec))
    net.load_state_dict(st_load(data), strict=True)
    return net.eval(), card
