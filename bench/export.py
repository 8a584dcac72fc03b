"""The export suite: each method's path exported as ONNX and run by ONNX Runtime (CPU), against the
service's own forward of the same path (the materialized module, normalization and softmax included:
``zoo_store.archs.export.Served``), in one run on one machine; batch 1 and batch 64. And the bytes:
the exported files, the path's bundle (what the service stores), and the dense base's own ONNX file.

The paths are built here on two random-weight torchvision bases (resnet18 and mobilenet_v2, 3 x 128 x
128 input) with a few training steps: this suite measures speed and size, not accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench.common import Say, macs, time_ratio
from zoo_store.archs import build_arch
from zoo_store.archs.export import Served, export_path
from zoo_store.core.bundle import PathArtifact, encode_bundle, make_manifest
from zoo_store.core.cards import Card, CardIn, InputSpec
from zoo_store.core.spec import CompositionSpec
from zoo_store.core.weights import digest_of
from zoo_store.datasets.tasks import TaskData
from zoo_store.methods import get_method, method_names
from zoo_store.methods.base import BuildContext
from zoo_store.store.store import card_for
from zoo_store.training import freeze

RGB128 = InputSpec(channels=3, size=128, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LABELS = tuple(str(i) for i in range(10))


def method_extra(method: str, b: str, s: str) -> dict:
    """What each method needs beyond a base and a task to build in seconds (``s``: a second base)."""
    steps = {"steps": 2, "batch_size": 4}
    return {
        "resample": {"budget": {"width": 0.5}, "train": {"steps": 0}},  # uniform cells: no partition tuning
        "clone": {"sources": [{"model": s, "labels": ["1", "2"]}], "train": steps},
        "reassemble": {"base": None, "models": [b, s], "blocks": 2},
    }.get(method, {})


def build_path(method: str, b: tuple[Card, nn.Module], s: tuple[Card, nn.Module], n: int = 12) -> PathArtifact:
    """``method``'s path on base ``b`` (and ``s`` where it takes two), trained a few steps on ``n``
    random images of three labels at the bases' input."""
    raw = {"method": method, "base": b[0].id, "task": {"dataset": "t"}, "train": {"epochs": 1, "batch_size": 4}}
    spec = CompositionSpec.model_validate({**raw, **method_extra(method, b[0].id, s[0].id)})
    m = get_method(method)
    by_id = {b[0].id: b, s[0].id: s}
    needed = m.validate(spec, {k: v[0] for k, v in by_id.items()})
    size = b[0].input
    x = torch.rand(n, size.channels, size.size, size.size, generator=torch.Generator().manual_seed(0))  # (N, C, H, W)
    y = torch.arange(n) % 3
    task = TaskData(x, y, x[: n // 2], y[: n // 2], ["0", "1", "2"], x[n // 2 :], y[n // 2 :])
    torch.manual_seed(0)
    return m.build(spec, BuildContext(bases={k: by_id[k] for k in needed}, load_task=lambda t, c: task))


def _base(base_id: str, arch: str) -> tuple[Card, nn.Module]:
    torch.manual_seed(0)
    net = freeze(build_arch(arch, {"num_classes": len(LABELS)}))
    card_in = CardIn(id=base_id, arch=arch, labels=LABELS, input=RGB128, arch_config={})
    return card_for(card_in, net, digest_of(net), 0), net


def export_suite(say: Say, quick: bool) -> list[str]:
    import onnxruntime as ort  # the dev extras install it

    b, s = _base("resnet18", "torchvision:resnet18"), _base("mobilenet-v2", "torchvision:mobilenet_v2")
    repeat = 3 if quick else 15
    rows = [
        "ONNX Runtime (CPU, its default threads) running the exported `.onnx` against the service's own "
        "forward of the same path (PyTorch eager, the same normalization and softmax). A ratio below 1: "
        "ONNX Runtime is faster. Bytes: the exported files, the path's bundle (what the service stores and "
        "hands out) and the ONNX file of the dense resnet18 base alone. Random weights make some outputs "
        "saturate (probabilities of exactly 0 and 1): the max abs diff column is a smoke check, equality is "
        "tested on unsaturated nets in tests/api/test_export.py.\n",
        "| method | MACs per image | ORT / service time, batch 1 | batch 64 | max abs diff | .onnx | .pt2 "
        "| bundle | dense base .onnx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_onnx = len(export_path(b[1], RGB128, LABELS, "base", "onnx", b[0].arch))
    for method in method_names():
        say(f"export: building a {method} path on resnet18 / mobilenet_v2 at 128 x 128")
        art = build_path(method, b, s)
        nets = {ref.id: {b[0].id: b, s[0].id: s}[ref.id][1] for ref in art.bases}
        module = get_method(method).materialize(art.config, art.tensors, nets).eval()
        bundle = encode_bundle(make_manifest(art), art.tensors, art.metrics)
        files = {fmt: export_path(module, RGB128, art.labels, "bench", fmt, b[0].arch) for fmt in ("onnx", "pt2")}
        session = ort.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
        served = Served(module, RGB128).eval()
        cells, diff = _ratios(served, session, repeat)
        with torch.inference_mode():
            mac = macs(served, torch.rand(1, 3, 128, 128))
        rows.append(
            f"| {method} | {mac / 1e6:.0f} M | {cells[0]:.2f} | {cells[1]:.2f} | {diff:.1e} | "
            f"{_mb(len(files['onnx']))} | {_mb(len(files['pt2']))} | {_mb(len(bundle))} | {_mb(base_onnx)} |"
        )
        say(f"export: {rows[-1]}")
    return rows


def _ratios(served: nn.Module, session, repeat: int) -> tuple[list[float], float]:
    """ONNX Runtime's time over the service's forward at batch 1 and 64; the largest difference seen."""
    cells, diff = [], 0.0
    for batch in (1, 64):
        x = torch.rand(batch, 3, 128, 128)  # (B, C, H, W) in [0, 1]
        xn = x.numpy()
        with torch.inference_mode():
            ref = served(x).numpy()  # (B, K)
        diff = max(diff, float(np.abs(session.run(None, {"input": xn})[0] - ref).max()))

        def ours(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                served(x)

        cells.append(time_ratio(lambda xn=xn: session.run(None, {"input": xn}), ours, repeat=repeat))
    return cells, diff


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"
